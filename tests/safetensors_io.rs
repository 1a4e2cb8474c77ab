//! safetensors reading and writing: files written by huggingface_hub (the reference) read back
//! exactly, our writer reproduces its shard naming and index, round trips, and every kind of
//! corrupt file gives a clear error naming the file (and the tensor) without panicking.

use autoquant::formats::safetensors::{
    plan_shards, save_safetensors, save_safetensors_in_memory, SafetensorsFile, SafetensorsWriter,
    ShardedSafetensors, TensorSpec,
};
use autoquant::formats::{open_weights, WeightSource};
use autoquant::fsutil::AtomicDir;
use autoquant::tensor::{DType, RawTensor};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pytorch/hf_safetensors")
}

fn expected() -> serde_json::Map<String, Value> {
    let v: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("expected.json")).unwrap()).unwrap();
    v.as_object().unwrap().clone()
}

/// The tensors of the reference fixture, in state-dict order.
fn reference_tensors() -> Vec<(String, RawTensor)> {
    let src = SafetensorsFile::open(&fixtures().join("single/model.safetensors")).unwrap();
    expected()["__order__"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let n = n.as_str().unwrap().to_string();
            let t = src.read(&n).unwrap();
            (n, t)
        })
        .collect()
}

fn names_sorted(src: &dyn WeightSource) -> Vec<String> {
    let mut v = src.names();
    v.sort();
    v
}

fn assert_same_tensors(a: &dyn WeightSource, b: &dyn WeightSource) {
    assert_eq!(names_sorted(a), names_sorted(b));
    for n in a.names() {
        assert_eq!(a.read(&n).unwrap(), b.read(&n).unwrap(), "{n}");
        assert_eq!(a.info(&n), b.info(&n), "{n}");
    }
}

/// Reference values: check dtype, shape and bit patterns from torch.
fn assert_matches_expected(src: &dyn WeightSource) {
    let exp = expected();
    for name in exp["__order__"].as_array().unwrap() {
        let name = name.as_str().unwrap();
        let e = &exp[name];
        let t = src.read(name).unwrap();
        assert_eq!(
            t.dtype.safetensors_name(),
            e["dtype"].as_str().unwrap(),
            "{name}"
        );
        let shape: Vec<usize> = e["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.shape, shape, "{name}");
        let width = t.dtype.size();
        let words: Vec<u64> = t
            .data
            .chunks_exact(width)
            .map(|c| c.iter().rev().fold(0u64, |acc, &b| (acc << 8) | b as u64))
            .collect();
        if let Some(bits) = e.get("bits") {
            let want: Vec<u64> = bits
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            assert_eq!(words, want, "{name}");
        } else {
            let want: Vec<i64> = e["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            let got: Vec<i64> = words
                .iter()
                .map(|&w| match t.dtype {
                    DType::I64 => w as i64,
                    DType::I32 => w as u32 as i32 as i64,
                    DType::I16 => w as u16 as i16 as i64,
                    DType::I8 => w as u8 as i8 as i64,
                    _ => w as i64,
                })
                .collect();
            assert_eq!(got, want, "{name}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the reference writer's files

#[test]
fn reads_huggingface_hub_single_file() {
    let f = SafetensorsFile::open(&fixtures().join("single/model.safetensors")).unwrap();
    assert_eq!(f.metadata().get("format").map(String::as_str), Some("pt"));
    assert_matches_expected(&f);
}

#[test]
fn reads_huggingface_hub_shards() {
    let dir = fixtures().join("sharded");
    let src = open_weights(&dir).unwrap();
    assert_matches_expected(src.as_ref());
    assert!(src
        .file_of("param")
        .ends_with("model-00005-of-00005.safetensors"));
    assert_eq!(src.files().len(), 6);
}

// ---------------------------------------------------------------------------------------------
// Writing

#[test]
fn single_file_round_trip_with_metadata() {
    let tensors = reference_tensors();
    let tmp = tempfile::tempdir().unwrap();
    let mut meta = BTreeMap::new();
    meta.insert("quant_method".to_string(), "gptq".to_string());
    let saved = save_safetensors_in_memory(tmp.path(), &tensors, 1 << 30, &meta).unwrap();
    assert_eq!(saved.files, vec![tmp.path().join("model.safetensors")]);
    assert_eq!(saved.index, None);
    assert!(!tmp.path().join("model.safetensors.index.json").exists());

    let back = SafetensorsFile::open(&saved.files[0]).unwrap();
    assert_eq!(
        back.metadata().get("format").map(String::as_str),
        Some("pt")
    );
    assert_eq!(
        back.metadata().get("quant_method").map(String::as_str),
        Some("gptq")
    );
    // Order as given, values exactly the reference's.
    let order: Vec<String> = tensors
        .iter()
        .filter(|(_, t)| !t.data.is_empty())
        .map(|(n, _)| n.clone())
        .collect();
    let got: Vec<String> = back.names().into_iter().filter(|n| n != "empty").collect();
    assert_eq!(got, order);
    assert_matches_expected(&back);

    // Header padded with spaces to a multiple of 8, data right after it.
    let bytes = std::fs::read(&saved.files[0]).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0);
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    assert!(
        header.starts_with(r#"{"__metadata__":{"format":"pt","quant_method":"gptq"}"#),
        "{header}"
    );
    assert!(header.trim_end().ends_with('}'));
    assert!(header[header.trim_end().len()..].bytes().all(|b| b == b' '));
}

#[test]
fn sharding_matches_huggingface_hub() {
    let tensors = reference_tensors();
    let exp = expected();
    let limit = exp["__max_shard_size__"].as_u64().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = std::env::var_os("AUTOQUANT_KEEP_SAFETENSORS")
        .map(PathBuf::from)
        .unwrap_or(tmp.path().to_path_buf());
    let saved = save_safetensors_in_memory(&out, &tensors, limit, &BTreeMap::new()).unwrap();

    // Same file names and tensor placement as the reference writer.
    let ours: Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let theirs: Value = serde_json::from_slice(
        &std::fs::read(fixtures().join("sharded/model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(ours["weight_map"], theirs["weight_map"]);
    assert_eq!(
        ours["metadata"]["total_size"],
        theirs["metadata"]["total_size"]
    );
    let names: Vec<String> = saved
        .files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        (1..=5)
            .map(|i| format!("model-{i:05}-of-00005.safetensors"))
            .collect::<Vec<_>>()
    );
    assert_eq!(saved.index, Some(out.join("model.safetensors.index.json")));

    // The index text: transformers' json.dumps(indent=2, sort_keys=True) + "\n".
    let text = std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap();
    assert!(text.starts_with("{\n  \"metadata\": {\n    \"total_size\": 361\n  },\n  \"weight_map\": {\n    \"bfloat\": \"model-00002-of-00005.safetensors\",\n"), "{text}");
    assert!(text.ends_with("}\n}\n"));
    let keys: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("    \"") && l.contains(".safetensors"))
        .map(|l| l.trim())
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);

    // Every shard carries the format metadata; the set reads back identically.
    let sharded =
        ShardedSafetensors::open_index(&out.join("model.safetensors.index.json")).unwrap();
    for shard in sharded.shards() {
        assert_eq!(
            shard.metadata().get("format").map(String::as_str),
            Some("pt")
        );
    }
    assert_matches_expected(&sharded);
    let reference = open_weights(&fixtures().join("sharded")).unwrap();
    assert_same_tensors(&sharded, reference.as_ref());
}

#[test]
fn oversized_tensors_get_their_own_shard_like_huggingface_hub() {
    let tensors = reference_tensors();
    let exp = expected();
    let want = exp["__split_50__"].as_object().unwrap();
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(n, t)| TensorSpec::new(n.clone(), t.dtype, t.shape.clone()))
        .collect();
    let plan = plan_shards(&specs, 50);
    let n = plan.len();
    for (k, members) in plan.iter().enumerate() {
        for &i in members {
            let file = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
            assert_eq!(
                want[&specs[i].name].as_str().unwrap(),
                file,
                "{}",
                specs[i].name
            );
        }
    }
    assert_eq!(plan.iter().map(Vec::len).sum::<usize>(), want.len());
}

#[test]
fn streaming_writer_asks_for_one_tensor_at_a_time_in_order() {
    let specs: Vec<TensorSpec> = (0..6)
        .map(|i| TensorSpec::new(format!("layer.{i}.weight"), DType::F32, vec![4, 4]))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let mut asked = Vec::new();
    let saved = save_safetensors(tmp.path(), &specs, 128, &BTreeMap::new(), |spec| {
        asked.push(spec.name.clone());
        let i: f32 = spec.name[6..7].parse().unwrap();
        Ok(RawTensor::from_f32(spec.shape.clone(), &[i; 16]))
    })
    .unwrap();
    assert_eq!(
        asked,
        specs.iter().map(|s| s.name.clone()).collect::<Vec<_>>()
    );
    assert_eq!(saved.files.len(), 3);
    assert_eq!(saved.total_size, 6 * 64);
    let back = open_weights(tmp.path()).unwrap();
    for i in 0..6 {
        assert_eq!(
            back.read(&format!("layer.{i}.weight")).unwrap().to_f32(),
            vec![i as f32; 16]
        );
    }
}

#[test]
fn failed_write_leaves_nothing_behind() {
    let specs: Vec<TensorSpec> = (0..4)
        .map(|i| TensorSpec::new(format!("t{i}"), DType::F32, vec![8]))
        .collect();
    let root = tempfile::tempdir().unwrap();
    let final_dir = root.path().join("saved");
    {
        let out = AtomicDir::new(&final_dir).unwrap();
        let err = save_safetensors(out.path(), &specs, 40, &BTreeMap::new(), |spec| {
            if spec.name == "t2" {
                return Err(autoquant::Error::Other("producer failed".into()));
            }
            Ok(RawTensor::from_f32(vec![8], &[1.0; 8]))
        })
        .unwrap_err();
        assert!(err.to_string().contains("producer failed"));
        // Within the temp folder, the unfinished shard is not under its final name either.
        assert!(!out.path().join("model-00003-of-00004.safetensors").exists());
    }
    assert!(
        std::fs::read_dir(root.path()).unwrap().next().is_none(),
        "temp folder left behind"
    );

    let out = AtomicDir::new(&final_dir).unwrap();
    save_safetensors(out.path(), &specs, 40, &BTreeMap::new(), |_| {
        Ok(RawTensor::from_f32(vec![8], &[1.0; 8]))
    })
    .unwrap();
    out.commit().unwrap();
    assert_eq!(open_weights(&final_dir).unwrap().names().len(), 4);
}

#[test]
fn writer_rejects_mismatched_or_missing_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.safetensors");
    let specs = vec![
        TensorSpec::new("a", DType::F32, vec![2]),
        TensorSpec::new("b", DType::F16, vec![3]),
    ];
    let mut w = SafetensorsWriter::create(&path, specs.clone(), &BTreeMap::new()).unwrap();
    w.write_tensor(&RawTensor::from_f32(vec![2], &[1.0, 2.0]))
        .unwrap();
    let err = w
        .write_tensor(&RawTensor::from_f32(vec![3], &[1.0; 3]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`b`") && err.contains("model.safetensors"),
        "{err}"
    );
    let err = w.finish().unwrap_err().to_string();
    assert!(
        err.contains("`b`") && err.contains("never written"),
        "{err}"
    );
    assert!(!path.exists());
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "temporary file left behind"
    );

    let dup = vec![
        TensorSpec::new("a", DType::F32, vec![2]),
        TensorSpec::new("a", DType::F32, vec![2]),
    ];
    let err = save_safetensors(
        tmp.path(),
        &dup,
        1 << 20,
        &BTreeMap::new(),
        |_| unreachable!(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("duplicate"), "{err}");
    let mut bad_meta = BTreeMap::new();
    bad_meta.insert("format".to_string(), "np".to_string());
    assert!(SafetensorsWriter::create(&path, specs, &bad_meta).is_err());
}

// ---------------------------------------------------------------------------------------------
// Corrupt files

/// A file from a header JSON and a data buffer, header padded as the format requires.
fn make_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

/// Write `bytes` as a safetensors file, open it, and return the error text.
fn open_err(bytes: &[u8]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("broken.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let err = SafetensorsFile::open(&path)
        .expect_err("corrupt file must not open")
        .to_string();
    assert!(
        err.contains("broken.safetensors"),
        "error must name the file: {err}"
    );
    err
}

const GOOD_HEADER: &str = r#"{"__metadata__":{"format":"pt"},"a.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b.bias":{"dtype":"F16","shape":[4],"data_offsets":[16,24]}}"#;

fn good_file() -> Vec<u8> {
    make_file(GOOD_HEADER, &(0..24u8).collect::<Vec<_>>())
}

#[test]
fn the_good_file_opens() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ok.safetensors");
    std::fs::write(&path, good_file()).unwrap();
    let f = SafetensorsFile::open(&path).unwrap();
    assert_eq!(f.names(), vec!["a.weight", "b.bias"]);
    assert_eq!(
        f.read("b.bias").unwrap().data,
        (16..24u8).collect::<Vec<_>>()
    );
}

#[test]
fn truncation_anywhere_is_an_error() {
    let full = good_file();
    let header_end = full.len() - 24;
    for cut in [
        0,
        1,
        7,
        8,
        20,
        header_end - 1,
        header_end,
        header_end + 5,
        full.len() - 1,
    ] {
        let err = open_err(&full[..cut]);
        if cut > header_end {
            assert!(
                err.contains("`b.bias`") || err.contains("`a.weight`"),
                "cut {cut}: must name a tensor: {err}"
            );
            assert!(err.contains("truncated"), "cut {cut}: {err}");
        }
    }
}

#[test]
fn header_length_that_lies() {
    let mut f = good_file();
    let len = f.len() as u64;
    f[..8].copy_from_slice(&len.to_le_bytes());
    assert!(open_err(&f).contains("runs past the end"));
    f[..8].copy_from_slice(&(200_000_000u64).to_le_bytes());
    assert!(open_err(&f).contains("absurdly large"));
    f[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(open_err(&f).contains("absurdly large"));
    // Too short: the JSON is cut off.
    f[..8].copy_from_slice(&40u64.to_le_bytes());
    assert!(open_err(&f).contains("not valid JSON"));
}

#[test]
fn malformed_header_json() {
    assert!(open_err(&make_file("{\"a\": ", &[])).contains("not valid JSON"));
    assert!(open_err(&make_file("[1, 2]", &[])).contains("not a JSON object"));
    let mut f = make_file("{}", &[]);
    f[8] = 0xFF;
    assert!(open_err(&f).contains("UTF-8"));
    let err = open_err(&make_file(r#"{"__metadata__":{"format":3}}"#, &[]));
    assert!(
        err.contains("__metadata__") && err.contains("format"),
        "{err}"
    );
    let err = open_err(&make_file(r#"{"w":{"dtype":"F32","shape":[1]}}"#, &[0; 4]));
    assert!(err.contains("`w`") && err.contains("data_offsets"), "{err}");
    let err = open_err(&make_file(
        r#"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
        &[0; 4],
    ));
    assert!(err.contains("`w`") && err.contains("shape"), "{err}");
}

#[test]
fn unknown_dtype_names_the_tensor() {
    let err = open_err(&make_file(
        r#"{"q.weight":{"dtype":"F7","shape":[1],"data_offsets":[0,1]}}"#,
        &[0],
    ));
    assert!(
        err.contains("`q.weight`") && err.contains("dtype `F7`"),
        "{err}"
    );
}

#[test]
fn offsets_that_lie() {
    let data = [0u8; 24];
    // Span disagrees with shape x dtype.
    let err = open_err(&make_file(
        r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,20]},"b":{"dtype":"F16","shape":[2],"data_offsets":[20,24]}}"#,
        &data,
    ));
    assert!(err.contains("`a`") && err.contains("needs 16"), "{err}");
    // Out of range.
    let err = open_err(&make_file(
        r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F16","shape":[4],"data_offsets":[100,108]}}"#,
        &data,
    ));
    assert!(err.contains("`b`") && err.contains("run past"), "{err}");
    // End before begin.
    let err = open_err(&make_file(
        r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#,
        &data,
    ));
    assert!(err.contains("`a`") && err.contains("end before"), "{err}");
    // Overlapping.
    let err = open_err(&make_file(
        r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]}}"#,
        &data,
    ));
    assert!(
        err.contains("`b`") && err.contains("overlap") && err.contains("`a`"),
        "{err}"
    );
    // Same bytes claimed twice (aliasing).
    let err = open_err(&make_file(
        r#"{"a":{"dtype":"F32","shape":[6],"data_offsets":[0,24]},"b":{"dtype":"F32","shape":[6],"data_offsets":[0,24]}}"#,
        &data,
    ));
    assert!(err.contains("overlap"), "{err}");
    // A gap between tensors.
    let err = open_err(&make_file(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}}"#,
        &data,
    ));
    assert!(err.contains("`b`") && err.contains("unused"), "{err}");
    // Trailing bytes no tensor owns.
    let err = open_err(&make_file(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
        &data,
    ));
    assert!(err.contains("`a`") && err.contains("trailing"), "{err}");
    // Huge shape must not overflow.
    let err = open_err(&make_file(
        r#"{"a":{"dtype":"F64","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}}"#,
        &data[..8],
    ));
    assert!(err.contains("`a`") && err.contains("overflow"), "{err}");
}

#[test]
fn random_byte_flips_never_panic() {
    let good = good_file();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("f.safetensors");
    for pos in 0..good.len() {
        for flip in [0x01u8, 0x80, 0xFF] {
            let mut b = good.clone();
            b[pos] ^= flip;
            std::fs::write(&path, &b).unwrap();
            if let Ok(f) = SafetensorsFile::open(&path) {
                for n in f.names() {
                    f.read(&n).unwrap();
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sharded index problems

fn sharded_copy() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join("sharded")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    tmp
}

fn set_index(dir: &Path, json: &str) -> PathBuf {
    let p = dir.join("model.safetensors.index.json");
    std::fs::write(&p, json).unwrap();
    p
}

#[test]
fn shard_escaping_the_folder_is_refused() {
    let tmp = sharded_copy();
    let inner = tmp.path().join("inner");
    std::fs::create_dir(&inner).unwrap();
    let index = set_index(
        &inner,
        r#"{"weight_map": {"half": "../model-00002-of-00005.safetensors"}}"#,
    );
    let err = ShardedSafetensors::open_index(&index)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("../model-00002-of-00005.safetensors") && err.contains("`half`"),
        "{err}"
    );
    assert!(err.contains("model.safetensors.index.json"), "{err}");
    let index = set_index(&inner, r#"{"weight_map": {"half": "/etc/passwd"}}"#);
    assert!(ShardedSafetensors::open_index(&index)
        .unwrap_err()
        .to_string()
        .contains("absolute"));
}

#[test]
fn missing_shard_or_tensor_is_named() {
    let tmp = sharded_copy();
    std::fs::remove_file(tmp.path().join("model-00004-of-00005.safetensors")).unwrap();
    let err = open_weights(tmp.path())
        .err()
        .expect("missing shard")
        .to_string();
    assert!(
        err.contains("model-00004-of-00005.safetensors") && err.contains("does not exist"),
        "{err}"
    );

    let tmp = sharded_copy();
    let index = set_index(
        tmp.path(),
        r#"{"weight_map": {"ghost.weight": "model-00001-of-00005.safetensors"}}"#,
    );
    let err = ShardedSafetensors::open_index(&index)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`ghost.weight`")
            && err.contains("absent")
            && err.contains("model-00001-of-00005"),
        "{err}"
    );

    let index = set_index(tmp.path(), r#"{"metadata": {}}"#);
    assert!(ShardedSafetensors::open_index(&index)
        .unwrap_err()
        .to_string()
        .contains("weight_map"));
    let index = set_index(tmp.path(), r#"{"weight_map": {"#);
    assert!(ShardedSafetensors::open_index(&index)
        .unwrap_err()
        .to_string()
        .contains("malformed JSON"));
}

// ---------------------------------------------------------------------------------------------
// Choosing the files of a folder

#[test]
fn open_weights_lookup_order_and_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let err = open_weights(tmp.path())
        .err()
        .expect("empty folder")
        .to_string();
    for looked_for in [
        "model.safetensors.index.json",
        "model.safetensors",
        "*.safetensors",
        "pytorch_model.bin.index.json",
        "pytorch_model.bin",
    ] {
        assert!(err.contains(looked_for), "{looked_for} not listed: {err}");
    }

    // A single differently named file (as AutoGPTQ writes) is used; a hidden temporary is ignored.
    let single = fixtures().join("single/model.safetensors");
    std::fs::copy(&single, tmp.path().join("gptq_model-4bit-128g.safetensors")).unwrap();
    std::fs::write(tmp.path().join(".model.safetensors.tmp-1-2"), b"partial").unwrap();
    assert!(
        open_weights(tmp.path()).unwrap().files()[0].ends_with("gptq_model-4bit-128g.safetensors")
    );
    // Two of them without an index is ambiguous.
    std::fs::copy(&single, tmp.path().join("other.safetensors")).unwrap();
    let err = open_weights(tmp.path())
        .err()
        .expect("ambiguous")
        .to_string();
    assert!(
        err.contains("several") && err.contains("other.safetensors"),
        "{err}"
    );
    // model.safetensors wins over the others.
    std::fs::copy(&single, tmp.path().join("model.safetensors")).unwrap();
    assert!(open_weights(tmp.path()).unwrap().files()[0].ends_with("model.safetensors"));
    // And the index wins over everything.
    let sharded = sharded_copy();
    std::fs::copy(&single, sharded.path().join("model.safetensors")).unwrap();
    assert!(
        open_weights(sharded.path()).unwrap().files()[0].ends_with("model.safetensors.index.json")
    );
}
