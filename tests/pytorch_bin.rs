//! `pytorch_model.bin` reading against fixtures written by torch.save
//! (scripts/golden/make_pytorch_fixtures.py), and refusal of pickled code.

use autoquant::formats::pytorch::{PytorchFile, ShardedPytorch};
use autoquant::formats::{open_weights, WeightSource};
use autoquant::tensor::{DType, RawTensor};
use half::{bf16, f16};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pytorch")
}

/// Decode stored bytes exactly: floats to f64, integers to i64 (as f64 would lose 2^62).
enum Decoded {
    #[allow(dead_code)]
    Floats(Vec<f64>),
    Ints(Vec<i64>),
}

fn decode(t: &RawTensor) -> Decoded {
    let d = &t.data;
    match t.dtype {
        DType::F32 => Decoded::Floats(
            d.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
        ),
        DType::F64 => Decoded::Floats(
            d.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        DType::F16 => Decoded::Floats(
            d.chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
        ),
        DType::BF16 => Decoded::Floats(
            d.chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
        ),
        DType::I64 => Decoded::Ints(
            d.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        DType::I32 => Decoded::Ints(
            d.chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
        ),
        DType::I16 => Decoded::Ints(
            d.chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as i64)
                .collect(),
        ),
        DType::I8 => Decoded::Ints(d.iter().map(|&b| b as i8 as i64).collect()),
        DType::U8 | DType::Bool => Decoded::Ints(d.iter().map(|&b| b as i64).collect()),
    }
}

/// Every tensor in `expected.json` must be present with the same dtype, shape and exact values.
pub fn check_against_expected(src: &dyn WeightSource, expected_path: &Path) {
    let expected: Value = serde_json::from_slice(&std::fs::read(expected_path).unwrap()).unwrap();
    let expected = expected.as_object().unwrap();
    let mut want_names: Vec<&String> = expected.keys().filter(|k| !k.starts_with("__")).collect();
    want_names.sort();
    let mut got_names = src.names();
    got_names.sort();
    assert_eq!(got_names.iter().collect::<Vec<_>>(), want_names);
    for name in want_names {
        let e = &expected[name];
        let t = src.read(name).unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(
            t.dtype.safetensors_name(),
            e["dtype"].as_str().unwrap(),
            "{name} dtype"
        );
        let shape: Vec<usize> = e["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.shape, shape, "{name} shape");
        assert_eq!(src.info(name).unwrap().shape, shape, "{name} info shape");
        let values = e["values"].as_array().unwrap();
        match decode(&t) {
            Decoded::Floats(_) => {
                // Floats compare by bit pattern: decimal JSON need not round-trip exactly.
                let width = t.dtype.size();
                let got: Vec<u64> = t
                    .data
                    .chunks_exact(width)
                    .map(|c| c.iter().rev().fold(0u64, |acc, &b| (acc << 8) | b as u64))
                    .collect();
                let want: Vec<u64> = e["bits"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap())
                    .collect();
                assert_eq!(got, want, "{name} bits");
                assert_eq!(values.len(), want.len());
            }
            Decoded::Ints(got) => {
                let want: Vec<i64> = values.iter().map(|v| v.as_i64().unwrap()).collect();
                assert_eq!(got, want, "{name} values");
            }
        }
    }
}

#[test]
fn reads_torch_save_state_dict_exactly() {
    let dir = fixtures().join("single");
    let f = PytorchFile::open(&dir.join("pytorch_model.bin")).unwrap();
    check_against_expected(&f, &dir.join("expected.json"));
}

#[test]
fn views_are_made_contiguous_and_ties_shared() {
    let f = PytorchFile::open(&fixtures().join("single/pytorch_model.bin")).unwrap();
    // torch: base = arange(15).reshape(3,5)/4; transposed = base.t()
    let t = f.read("transposed").unwrap();
    assert_eq!(t.shape, vec![5, 3]);
    let want: Vec<f32> = (0..5)
        .flat_map(|i| (0..3).map(move |j| (j * 5 + i) as f32 / 4.0))
        .collect();
    assert_eq!(t.to_f32(), want);
    // cols = (arange(20).reshape(5,4) - 7.5)[:, 1:3]
    let c = f.read("cols").unwrap();
    let want: Vec<f32> = (0..5)
        .flat_map(|i| (1..3).map(move |j| (i * 4 + j) as f32 - 7.5))
        .collect();
    assert_eq!(c.to_f32(), want);
    assert_eq!(
        f.read("embed.weight").unwrap(),
        f.read("head.weight").unwrap()
    );
    assert_eq!(f.read("scalar").unwrap().shape, Vec::<usize>::new());
    assert_eq!(f.read("empty").unwrap().shape, vec![0, 3]);
}

#[test]
fn reads_sharded_bin_through_open_weights() {
    let dir = fixtures().join("sharded");
    let src = open_weights(&dir).unwrap();
    check_against_expected(src.as_ref(), &dir.join("expected.json"));
    assert!(src
        .file_of("transposed")
        .ends_with("pytorch_model-00003-of-00003.bin"));
    assert_eq!(src.files().len(), 4);
    // The type is reachable directly too.
    assert!(ShardedPytorch::open_index(&dir.join("pytorch_model.bin.index.json")).is_ok());
}

#[test]
fn refuses_pickled_code_and_runs_nothing() {
    let dir = fixtures().join("malicious");
    let marker = std::fs::read_to_string(dir.join("marker.txt"))
        .unwrap()
        .trim()
        .to_string();
    let _ = std::fs::remove_file(&marker);
    let err = PytorchFile::open(&dir.join("pytorch_model.bin"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("refusing to load: pickle references global posix.system")
            && err.contains("pickled code is never executed"),
        "{err}"
    );
    assert!(
        err.contains("pytorch_model.bin"),
        "must name the file: {err}"
    );
    assert!(!Path::new(&marker).exists(), "the pickled command ran");
    // Also through the folder-level entry point.
    assert!(open_weights(&dir).is_err());
    assert!(!Path::new(&marker).exists());
}

#[test]
fn legacy_format_is_refused_clearly() {
    let err = PytorchFile::open(&fixtures().join("legacy/pytorch_model.bin"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("legacy torch.save format"), "{err}");
}

#[test]
fn truncated_files_fail_cleanly() {
    let bytes = std::fs::read(fixtures().join("single/pytorch_model.bin")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("pytorch_model.bin");
    for cut in [
        0,
        3,
        30,
        200,
        bytes.len() / 2,
        bytes.len() - 100,
        bytes.len() - 22,
        bytes.len() - 1,
    ] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = PytorchFile::open(&path)
            .expect_err(&format!("cut at {cut} must fail"))
            .to_string();
        assert!(err.contains("pytorch_model.bin"), "cut at {cut}: {err}");
    }
}

#[test]
fn corrupted_bytes_never_panic() {
    // Flip bytes all over the archive (pickle, storages, directory). Opening may fail or, when the
    // byte was inside tensor data, succeed; it must never panic, and reads must stay in bounds.
    let bytes = std::fs::read(fixtures().join("single/pytorch_model.bin")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("pytorch_model.bin");
    let mut opened = 0;
    for pos in (0..bytes.len()).step_by(7) {
        let mut b = bytes.clone();
        b[pos] ^= 0xA5;
        std::fs::write(&path, &b).unwrap();
        if let Ok(f) = PytorchFile::open(&path) {
            opened += 1;
            for name in f.names() {
                let _ = f.read(&name);
            }
        }
    }
    assert!(opened > 0, "flipping storage bytes should still open");
}

#[test]
fn index_shard_escaping_the_folder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(
        fixtures().join("single/pytorch_model.bin"),
        tmp.path().join("outside.bin"),
    )
    .unwrap();
    std::fs::write(
        dir.join("pytorch_model.bin.index.json"),
        r#"{"metadata": {"total_size": 8}, "weight_map": {"half": "../outside.bin"}}"#,
    )
    .unwrap();
    let err = open_weights(&dir).err().expect("must fail").to_string();
    assert!(
        err.contains("../outside.bin") && err.contains("half"),
        "{err}"
    );
}

#[test]
fn safetensors_preferred_over_bin() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("single/pytorch_model.bin"),
        tmp.path().join("pytorch_model.bin"),
    )
    .unwrap();
    assert!(open_weights(tmp.path()).unwrap().files()[0].ends_with("pytorch_model.bin"));
    std::fs::copy(
        fixtures().join("hf_safetensors/single/model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    assert!(open_weights(tmp.path()).unwrap().files()[0].ends_with("model.safetensors"));
}
