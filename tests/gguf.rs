//! GGUF reader against golden data from scripts/golden/make_gguf_fixtures.py: gguf-py's own
//! dequantization of every supported type, transformers' GGUF loader for the Hugging Face view
//! (names, shapes, un-permuted q/k, config), and corrupted files for the error paths.

mod common;

use autoquant::formats::gguf::{GgufFile, GgufValue, GgufWeights};
use autoquant::formats::{read_f32_checked, WeightSource};
use autoquant::qtypes::ggml::GgmlType;
use autoquant::Error;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name)
}

fn read_json(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(fixture(name)).unwrap()).unwrap()
}

/// The expected tensors of a fixture: (manifest entry, values).
fn expected_tensors(stem: &str) -> Vec<(Value, Vec<f32>)> {
    let manifest = read_json(&format!("{stem}.json"));
    let bytes = std::fs::read(fixture(&format!("{stem}.bin"))).unwrap();
    let all: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    manifest["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let (off, len) = (
                t["offset"].as_u64().unwrap() as usize,
                t["len"].as_u64().unwrap() as usize,
            );
            (t.clone(), all[off..off + len].to_vec())
        })
        .collect()
}

fn shape_of(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect()
}

/// Bitwise equality (the references compute in f32 with the same operation order).
fn assert_same(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.to_bits() == w.to_bits(), "{name}[{i}]: got {g}, want {w}");
    }
}

fn write_temp(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".gguf").tempfile().unwrap();
    std::io::Write::write_all(&mut f, bytes).unwrap();
    f
}

fn open_bytes(bytes: &[u8]) -> (tempfile::NamedTempFile, Result<GgufFile, Error>) {
    let f = write_temp(bytes);
    let r = GgufFile::open(f.path());
    (f, r)
}

/// Byte position just after the name of tensor `name` in its tensor-info record.
fn tensor_record_end_of_name(bytes: &[u8], name: &str) -> usize {
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(name.as_bytes());
    let pos = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("tensor name in header");
    pos + needle.len()
}

/// Position of the (n_dims, dims, type, offset) fields of a tensor-info record.
struct RecordFields {
    n_dims: usize,
    dims: usize,
    type_id: usize,
    offset: usize,
}

fn record_fields(bytes: &[u8], name: &str) -> RecordFields {
    let n_dims_at = tensor_record_end_of_name(bytes, name);
    let n_dims = u32::from_le_bytes(bytes[n_dims_at..n_dims_at + 4].try_into().unwrap()) as usize;
    let dims = n_dims_at + 4;
    let type_id = dims + 8 * n_dims;
    RecordFields {
        n_dims: n_dims_at,
        dims,
        type_id,
        offset: type_id + 4,
    }
}

fn err_text(e: &Error) -> String {
    e.to_string()
}

// ---------------------------------------------------------------------------------------------

#[test]
fn every_supported_type_dequantizes_exactly_like_gguf_py() {
    let file = GgufFile::open(&fixture("all_types.gguf")).unwrap();
    let expected = expected_tensors("all_types");
    let mut seen = BTreeSet::new();
    for (entry, want) in &expected {
        let name = entry["name"].as_str().unwrap();
        let info = file.tensor_info(name).unwrap();
        assert_eq!(
            info.ggml_type.name(),
            entry["type"].as_str().unwrap(),
            "{name}"
        );
        assert_eq!(info.shape(), shape_of(&entry["shape"]), "{name}");
        assert_same(name, &file.dequantize(name).unwrap(), want);
        seen.insert(info.ggml_type.name());
    }
    let supported: BTreeSet<_> = GgmlType::SUPPORTED.iter().map(|t| t.name()).collect();
    assert_eq!(seen, supported, "the fixture covers every supported type");
}

#[test]
fn dims_are_ggml_order_and_shape_is_row_major() {
    let file = GgufFile::open(&fixture("all_types.gguf")).unwrap();
    // numpy wrote a (2, 3, 4) array; ggml stores ne0 = 4 first.
    let t = file.tensor_info("t.f32").unwrap();
    assert_eq!(t.dims, vec![4, 3, 2]);
    assert_eq!(t.shape(), vec![2, 3, 4]);
    assert_eq!(t.numel(), 24);
    let q = file.tensor_info("t.q6_k").unwrap();
    assert_eq!(q.dims, vec![512, 2]);
    assert_eq!(q.n_bytes, 4 * 210);
    assert_eq!(file.tensor_infos().len(), 13);
}

#[test]
fn metadata_of_every_value_type() {
    let file = GgufFile::open(&fixture("all_types.gguf")).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.alignment(), 64);
    assert_eq!(file.data_start() % 64, 0);
    for t in file.tensor_infos() {
        assert_eq!(t.file_offset % 64, 0, "{}", t.name);
    }
    assert_eq!(file.architecture(), Some("test"));
    let m = file.metadata();
    assert_eq!(m["test.u8"], GgufValue::U8(200));
    assert_eq!(m["test.i8"], GgufValue::I8(-100));
    assert_eq!(m["test.u16"], GgufValue::U16(60000));
    assert_eq!(m["test.i16"], GgufValue::I16(-30000));
    assert_eq!(m["test.u32"], GgufValue::U32(4_000_000_000));
    assert_eq!(m["test.i32"], GgufValue::I32(-2_000_000_000));
    assert_eq!(m["test.u64"], GgufValue::U64((1 << 63) + 5));
    assert_eq!(m["test.i64"], GgufValue::I64(-(1 << 62)));
    assert_eq!(m["test.f32"], GgufValue::F32(1.5));
    assert_eq!(m["test.f64"], GgufValue::F64(-2.25));
    assert_eq!(m["test.bool"], GgufValue::Bool(true));
    assert_eq!(file.get_str("test.string"), Some("héllo wörld"));
    assert_eq!(
        file.get_array("test.array_i32").unwrap(),
        &[GgufValue::I32(1), GgufValue::I32(-2), GgufValue::I32(3)]
    );
    assert_eq!(
        file.get_str_array("test.array_str").unwrap(),
        vec!["a", "", "ccc"]
    );
    assert_eq!(
        file.get_array("test.array_f32").unwrap(),
        &[GgufValue::F32(0.5), GgufValue::F32(-1.0)]
    );
    // Typed getters convert between integer widths but not across kinds.
    assert_eq!(file.get_u64("test.u8"), Some(200));
    assert_eq!(file.get_u64("test.i8"), None);
    assert_eq!(file.get_i64("test.i8"), Some(-100));
    assert_eq!(file.get_f32("test.f64"), Some(-2.25));
    assert_eq!(file.get_u64("test.string"), None);
    assert_eq!(file.get_bool("test.bool"), Some(true));
    assert!(file
        .require_u64("test.missing")
        .unwrap_err()
        .to_string()
        .contains("test.missing"));
    assert!(file
        .require_u64("test.string")
        .unwrap_err()
        .to_string()
        .contains("non-negative integer"));
}

#[test]
fn version_2_reads_like_version_3() {
    let bytes = std::fs::read(fixture("all_types.gguf")).unwrap();
    let mut v2 = bytes.clone();
    v2[4..8].copy_from_slice(&2u32.to_le_bytes());
    let (_f, r) = open_bytes(&v2);
    let f2 = r.unwrap();
    let f3 = GgufFile::open(&fixture("all_types.gguf")).unwrap();
    assert_eq!(f2.version(), 2);
    assert_eq!(f2.metadata(), f3.metadata());
    assert_eq!(f2.tensor_infos(), f3.tensor_infos());
    assert_eq!(
        f2.dequantize("t.q5_k").unwrap(),
        f3.dequantize("t.q5_k").unwrap()
    );
}

// ---------------------------------------------------------------------------------------------
// Malformed files: clear errors naming the file (and tensor), never a panic.

#[test]
fn bad_magic_and_versions() {
    let bytes = std::fs::read(fixture("all_types.gguf")).unwrap();

    let mut bad = bytes.clone();
    bad[0..4].copy_from_slice(b"GGML");
    let (f, r) = open_bytes(&bad);
    let msg = err_text(&r.unwrap_err());
    assert!(
        msg.contains("not a GGUF file") && msg.contains(&f.path().display().to_string()),
        "{msg}"
    );

    for (version, needle) in [
        (1u32, "version 1"),
        (3u32.swap_bytes(), "big-endian"),
        (7, "version 7"),
    ] {
        let mut bad = bytes.clone();
        bad[4..8].copy_from_slice(&version.to_le_bytes());
        let (f, r) = open_bytes(&bad);
        let msg = err_text(&r.unwrap_err());
        assert!(
            msg.contains(needle) && msg.contains(&f.path().display().to_string()),
            "{msg}"
        );
    }
}

#[test]
fn every_truncation_is_an_error_naming_the_file() {
    let bytes = std::fs::read(fixture("all_types.gguf")).unwrap();
    // The writer pads the file after the last tensor; cutting that padding is harmless.
    let file = GgufFile::open(&fixture("all_types.gguf")).unwrap();
    let data_end = file
        .tensor_infos()
        .iter()
        .map(|t| (t.file_offset + t.n_bytes) as usize)
        .max()
        .unwrap();
    assert!(open_bytes(&bytes[..data_end]).1.is_ok());
    for len in 0..data_end {
        let (f, r) = open_bytes(&bytes[..len]);
        let e = r.expect_err(&format!("truncated to {len} bytes should fail"));
        let msg = err_text(&e);
        assert!(
            msg.contains(&f.path().display().to_string()),
            "{len}: {msg}"
        );
        assert!(
            msg.contains("truncated") || msg.contains("past the end") || msg.contains("more than"),
            "{len}: {msg}"
        );
    }
    // Cut inside the data section: the error names the last tensor.
    let (_f, r) = open_bytes(&bytes[..data_end - 1]);
    match r.unwrap_err() {
        Error::Tensor { tensor, msg, .. } => {
            assert_eq!(tensor, "t.q6_k");
            assert!(msg.contains("past the end"), "{msg}");
        }
        other => panic!("expected a tensor error, got {other}"),
    }
}

#[test]
fn lying_tensor_offsets_are_refused() {
    let bytes = std::fs::read(fixture("all_types.gguf")).unwrap();
    let fields = record_fields(&bytes, "t.q4_k");
    let patch = |value: u64| {
        let mut bad = bytes.clone();
        bad[fields.offset..fields.offset + 8].copy_from_slice(&value.to_le_bytes());
        let (f, r) = open_bytes(&bad);
        let path = f.path().display().to_string();
        match r.unwrap_err() {
            Error::Tensor {
                tensor,
                msg,
                path: p,
            } => {
                assert_eq!(tensor, "t.q4_k");
                assert_eq!(p.display().to_string(), path);
                msg
            }
            other => panic!("expected a tensor error, got {other}"),
        }
    };
    assert!(patch(1 << 40).contains("past the end"));
    assert!(patch(u64::MAX - 63).contains("past the end")); // overflows offset + size
    assert!(patch(8).contains("alignment"));
    assert!(patch(0).contains("overlaps")); // t.f32 lives at offset 0
}

#[test]
fn corrupt_counts_lengths_types_and_dims_are_refused() {
    let bytes = std::fs::read(fixture("all_types.gguf")).unwrap();
    let check = |bad: Vec<u8>, needle: &str| {
        let (f, r) = open_bytes(&bad);
        let msg = err_text(&r.unwrap_err());
        assert!(msg.contains(needle), "expected `{needle}` in: {msg}");
        assert!(msg.contains(&f.path().display().to_string()), "{msg}");
        msg
    };
    // Tensor and metadata counts far beyond the file size.
    let mut bad = bytes.clone();
    bad[8..16].copy_from_slice(&(u64::MAX / 3).to_le_bytes());
    check(bad, "tensors");
    let mut bad = bytes.clone();
    bad[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
    check(bad, "metadata entries");
    // The first key's string length beyond the file.
    let mut bad = bytes.clone();
    bad[24..32].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
    check(bad, "past the end");
    // An unknown metadata value type for the first key (general.architecture).
    let key_len = u64::from_le_bytes(bytes[24..32].try_into().unwrap()) as usize;
    let type_at = 32 + key_len;
    let mut bad = bytes.clone();
    bad[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
    check(bad, "unknown value type 99");
    // Invalid alignment value.
    let align_key = b"general.alignment";
    let pos = bytes
        .windows(align_key.len())
        .position(|w| w == align_key)
        .unwrap()
        + align_key.len();
    let mut bad = bytes.clone();
    bad[pos + 4..pos + 8].copy_from_slice(&48u32.to_le_bytes());
    check(bad, "power of two");

    let fields = record_fields(&bytes, "t.q8_0");
    // Dims whose product overflows.
    let mut bad = bytes.clone();
    bad[fields.dims..fields.dims + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    bad[fields.dims + 8..fields.dims + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(check(bad, "t.q8_0").contains("overflow"));
    // A row length that is not a whole number of blocks.
    let mut bad = bytes.clone();
    bad[fields.dims..fields.dims + 8].copy_from_slice(&48u64.to_le_bytes());
    assert!(check(bad, "t.q8_0").contains("block size"));
    // Too many dimensions, and an unknown type id.
    let mut bad = bytes.clone();
    bad[fields.n_dims..fields.n_dims + 4].copy_from_slice(&9u32.to_le_bytes());
    check(bad, "9 dimensions");
    let mut bad = bytes.clone();
    bad[fields.type_id..fields.type_id + 4].copy_from_slice(&4u32.to_le_bytes());
    check(bad, "unknown ggml type id 4");
}

#[test]
fn random_header_corruption_never_panics() {
    let bytes = std::fs::read(fixture("all_types.gguf")).unwrap();
    let header_len = GgufFile::open(&fixture("all_types.gguf"))
        .unwrap()
        .data_start() as usize;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let file = write_temp(&bytes);
    for _ in 0..400 {
        let mut bad = bytes.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() as usize) % header_len;
            bad[at] = next() as u8;
        }
        std::fs::write(file.path(), &bad).unwrap();
        // Ok or Err are both fine; a panic fails the test. If it opens, reading must not panic either.
        if let Ok(f) = GgufFile::open(file.path()) {
            for t in f.tensor_infos() {
                let _ = f.dequantize(&t.name);
            }
        }
    }
}

#[test]
fn unsupported_type_names_type_tensor_file_and_supported_list() {
    let path = fixture("unsupported.gguf");
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(
        file.dequantize("ok.weight").unwrap(),
        (0..8).map(|v| v as f32).collect::<Vec<_>>()
    );
    let info = file.tensor_info("blk.0.attn_q.weight").unwrap();
    assert_eq!(info.ggml_type, GgmlType::IQ2_XXS);
    let msg = err_text(&file.dequantize("blk.0.attn_q.weight").unwrap_err());
    for needle in [
        "unsupported GGUF tensor type IQ2_XXS",
        "blk.0.attn_q.weight",
        "unsupported.gguf",
        "Q4_K",
        "BF16",
    ] {
        assert!(msg.contains(needle), "expected `{needle}` in: {msg}");
    }
    let msg = err_text(&file.dequantize("nope").unwrap_err());
    assert!(
        msg.contains("nope") && msg.contains("unsupported.gguf"),
        "{msg}"
    );
}

#[test]
fn unknown_architecture_is_a_clear_error() {
    let path = fixture("all_types.gguf");
    let msg = err_text(&GgufWeights::open(&path).unwrap_err());
    assert!(
        msg.contains("architecture `test`")
            && msg.contains("llama")
            && msg.contains("all_types.gguf"),
        "{msg}"
    );
    let msg = err_text(&GgufFile::open(&path).unwrap().hf_config().unwrap_err());
    assert!(msg.contains("architecture `test`"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// Hugging Face view, against transformers' GGUF loader.

fn assert_config_matches(got: &Value, want: &Value) {
    for (key, w) in want.as_object().unwrap() {
        let g = &got[key];
        match (g.as_f64(), w.as_f64()) {
            (Some(gf), Some(wf)) if w.is_f64() || g.is_f64() => {
                assert!(
                    (gf - wf).abs() <= 1e-6 * wf.abs(),
                    "{key}: got {g}, transformers has {w}"
                )
            }
            _ => assert_eq!(g, w, "{key}"),
        }
    }
}

fn check_tiny_model(arch: &str) -> (GgufWeights, Value) {
    let weights = GgufWeights::open(&fixture(&format!("tiny_{arch}.gguf"))).unwrap();
    let expected = expected_tensors(&format!("tiny_{arch}"));
    let want_names: Vec<String> = expected
        .iter()
        .map(|(e, _)| e["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(weights.names(), want_names);
    for (entry, want) in &expected {
        let name = entry["name"].as_str().unwrap();
        let shape = shape_of(&entry["shape"]);
        let info = weights.info(name).unwrap();
        assert_eq!(info.shape, shape, "{name}");
        let raw = weights.read(name).unwrap();
        assert_eq!(raw.shape, shape, "{name}");
        assert_same(name, &raw.to_f32(), want);
        assert_same(
            name,
            &read_f32_checked(&weights, name, &shape).unwrap(),
            want,
        );
    }
    let config = weights.hf_config().unwrap();
    let want_config = &read_json(&format!("tiny_{arch}.json"))["config"];
    assert_config_matches(&config, want_config);
    assert_eq!(config["torch_dtype"], "float32");
    assert_eq!(weights.files(), vec![fixture(&format!("tiny_{arch}.gguf"))]);
    (weights, config)
}

#[test]
fn tiny_llama_matches_transformers() {
    let (weights, config) = check_tiny_model("llama");
    assert!(
        weights.info("lm_head.weight").is_none(),
        "tied: no lm_head tensor"
    );
    assert_eq!(
        weights.gguf_name("model.layers.1.self_attn.q_proj.weight"),
        Some("blk.1.attn_q.weight")
    );
    assert_eq!(
        config["architectures"],
        serde_json::json!(["LlamaForCausalLM"])
    );
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["vocab_size"], 32, "from the token list");
    assert_eq!(config["head_dim"], 8);
    assert_eq!(config["attention_bias"], false);
    // transformers ignores llama's rope.scaling keys; the script wrote linear ×2.
    assert_eq!(
        config["rope_scaling"],
        serde_json::json!({"rope_type": "linear", "factor": 2.0})
    );
    // The f32 metadata 1e-5 comes back as the decimal it was written from.
    assert_eq!(config["rms_norm_eps"], 1e-5);

    // Un-permuting really moved rows: the raw GGUF layout differs from the HF one.
    let raw = weights.file().dequantize("blk.0.attn_k.weight").unwrap();
    let hf = weights
        .read("model.layers.0.self_attn.k_proj.weight")
        .unwrap()
        .to_f32();
    assert_ne!(raw, hf);
    let missing = weights
        .read("model.layers.9.self_attn.q_proj.weight")
        .unwrap_err();
    assert!(err_text(&missing).contains("model.layers.9.self_attn.q_proj.weight"));
    let wrong_shape = read_f32_checked(&weights, "model.norm.weight", &[33]).unwrap_err();
    assert!(err_text(&wrong_shape).contains("shape mismatch"));
}

#[test]
fn tiny_qwen2_matches_transformers() {
    let (weights, config) = check_tiny_model("qwen2");
    assert!(weights.info("lm_head.weight").is_some());
    assert_eq!(
        weights
            .info("model.layers.0.self_attn.k_proj.bias")
            .unwrap()
            .shape,
        vec![16]
    );
    assert_eq!(
        config["architectures"],
        serde_json::json!(["Qwen2ForCausalLM"])
    );
    assert_eq!(config["tie_word_embeddings"], false);
    assert!(config.get("rope_scaling").is_none());
    // qwen2 q/k are stored unpermuted: the HF tensor is the GGUF tensor as is.
    let raw = weights.file().dequantize("blk.0.attn_q.weight").unwrap();
    assert_eq!(
        weights
            .read("model.layers.0.self_attn.q_proj.weight")
            .unwrap()
            .to_f32(),
        raw
    );
}

/// tiny_qwen3.gguf holds the weights of tests/fixtures/tiny/qwen3 in f32, laid out as llama.cpp's
/// converter writes a qwen3 (`attn_q_norm`/`attn_k_norm`, no q/k permutation, head size in
/// `attention.key_length`). Read back, it must be that checkpoint exactly and give its
/// transformers logits. (transformers' own GGUF loader is no reference here: it ignores
/// `attention.key_length` for qwen3 and falls back to a head size of 128.)
#[test]
fn tiny_qwen3_is_the_hf_fixture_and_gives_its_transformers_logits() {
    use autoquant::config::AutoConfig;
    use autoquant::models::{AutoModelForCausalLM, LoadOptions};
    let path = fixture("tiny_qwen3.gguf");
    let weights = GgufWeights::open(&path).unwrap();
    let hf_dir = common::fixture("tiny/qwen3");
    let hf = autoquant::formats::open_weights(&hf_dir).unwrap();
    assert_eq!(weights.names(), hf.names());
    assert!(weights
        .names()
        .contains(&"model.layers.1.self_attn.k_norm.weight".to_string()));
    assert_eq!(
        weights.gguf_name("model.layers.1.self_attn.q_norm.weight"),
        Some("blk.1.attn_q_norm.weight")
    );
    for name in hf.names() {
        let (got, want) = (weights.read(&name).unwrap(), hf.read(&name).unwrap());
        assert_eq!(got.shape, want.shape, "{name}");
        assert_same(&name, &got.to_f32(), &want.to_f32());
    }

    let config = weights.hf_config().unwrap();
    let hf_config = common::read_json(&hf_dir.join("config.json"));
    for key in [
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "attention_bias",
        "bos_token_id",
        "eos_token_id",
    ] {
        assert_eq!(config[key], hf_config[key], "{key}");
    }
    assert_eq!(
        config["architectures"],
        serde_json::json!(["Qwen3ForCausalLM"])
    );
    assert_eq!(
        config["rope_theta"],
        hf_config["rope_parameters"]["rope_theta"]
    );

    let config = AutoConfig::from_value(config, &path, None).unwrap();
    let model =
        AutoModelForCausalLM::from_weights(config, &weights, &LoadOptions::default()).unwrap();
    let expected = common::read_json(&hf_dir.join("expected.json"));
    let case = &expected["cases"][0];
    assert_eq!(case["name"], "single_12");
    let ids = common::u32s(&case["input_ids"][0]);
    let want: Vec<f32> = common::f64s(&case["logits"])
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let err = common::max_abs_diff(&common::logits(model.as_ref(), &ids), &want);
    // The weights are the safetensors' bit for bit, so this is the safetensors model's error
    // (1.43e-6 measured on the full fixture in tests/models_golden.rs); bound about 10× that.
    assert!(err <= 1.5e-5, "max |Δlogit| {err}");
}

/// qwen2/qwen3 rotate whole heads; a GGUF asking for partial rotary embeddings is refused.
#[test]
fn qwen3_partial_rotary_is_refused() {
    let bytes = std::fs::read(fixture("tiny_qwen3.gguf")).unwrap();
    let key = b"qwen3.rope.dimension_count";
    let mut needle = (key.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(key);
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap()
        + needle.len();
    // Value type (u32 = 4), then the value: 16 → 8.
    assert_eq!(&bytes[at..at + 4], &4u32.to_le_bytes());
    assert_eq!(&bytes[at + 4..at + 8], &16u32.to_le_bytes());
    let mut bytes = bytes;
    bytes[at + 4..at + 8].copy_from_slice(&8u32.to_le_bytes());
    let (_f, r) = open_bytes(&bytes);
    let msg = err_text(&r.unwrap().hf_config().unwrap_err());
    assert!(
        msg.contains("qwen3.rope.dimension_count") && msg.contains("partial"),
        "{msg}"
    );
}

#[test]
fn llama3_rope_scaling_is_recovered_from_rope_freqs() {
    let weights = GgufWeights::open(&fixture("llama3_rope.gguf")).unwrap();
    assert!(
        weights.names().is_empty(),
        "rope_freqs is not a model parameter"
    );
    let config = weights.hf_config().unwrap();
    assert_eq!(
        config["rope_scaling"],
        serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    );
    assert_eq!(config["head_dim"], 128);
    assert_eq!(config["num_key_value_heads"], 1);
    assert_eq!(config["vocab_size"], 128256);
    assert_eq!(config["rope_theta"], 500000.0);

    // Factors that no llama3 parameters explain are refused, naming the tensor.
    let mut bytes = std::fs::read(fixture("llama3_rope.gguf")).unwrap();
    let at = weights
        .file()
        .tensor_info("rope_freqs.weight")
        .unwrap()
        .file_offset as usize;
    bytes[at..at + 4].copy_from_slice(&3.0f32.to_le_bytes());
    let (_f, r) = open_bytes(&bytes);
    let msg = err_text(&r.unwrap().hf_config().unwrap_err());
    assert!(
        msg.contains("rope_freqs.weight") && msg.contains("llama3"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------------------
// The real SmolLM2-135M-Instruct GGUF (fetched by the assets script; a missing file fails the
// test under scripts/test.sh, which sets AUTOQUANT_REQUIRE_ASSETS).

fn smollm2_path() -> Option<PathBuf> {
    common::asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[test]
fn smollm2_config_and_tensors() {
    let Some(path) = smollm2_path() else { return };
    let golden = read_json("smollm2_golden.json");
    let weights = GgufWeights::open(&path).unwrap();
    let file = weights.file();
    assert_eq!(file.version(), 3);
    assert_eq!(file.architecture(), Some("llama"));
    assert_eq!(file.get_str("tokenizer.ggml.model"), Some("gpt2"));
    assert_eq!(
        file.get_array("tokenizer.ggml.tokens").map(|t| t.len()),
        Some(49152)
    );

    let config = weights.hf_config().unwrap();
    assert_config_matches(&config, &golden["config"]);
    // The values docs/assets.md lists.
    for (key, value) in [
        ("num_hidden_layers", 30.0),
        ("hidden_size", 576.0),
        ("intermediate_size", 1536.0),
        ("num_attention_heads", 9.0),
        ("num_key_value_heads", 3.0),
        ("head_dim", 64.0),
        ("rope_theta", 100000.0),
        ("rms_norm_eps", 1e-5),
        ("max_position_embeddings", 8192.0),
        ("vocab_size", 49152.0),
        ("bos_token_id", 1.0),
        ("eos_token_id", 2.0),
    ] {
        assert_eq!(config[key].as_f64(), Some(value), "{key}");
    }
    assert_eq!(config["tie_word_embeddings"], true);

    // Names and shapes as transformers has them.
    let shapes = golden["shapes"].as_object().unwrap();
    assert_eq!(
        weights.names().len(),
        golden["n_tensors"].as_u64().unwrap() as usize
    );
    for (name, shape) in shapes {
        assert_eq!(
            weights.info(name).map(|i| i.shape),
            Some(shape_of(shape)),
            "{name}"
        );
    }
    let count = |ty: GgmlType| {
        file.tensor_infos()
            .iter()
            .filter(|t| t.ggml_type == ty)
            .count()
    };
    assert_eq!(
        (
            count(GgmlType::Q4_1),
            count(GgmlType::Q8_0),
            count(GgmlType::F32)
        ),
        (210, 1, 61)
    );

    // Slices of transformers' dequantized, un-permuted tensors.
    for slice in golden["slices"].as_array().unwrap() {
        let name = slice["name"].as_str().unwrap();
        let raw = weights.read(name).unwrap();
        let values = raw.to_f32();
        let start = match slice["row"].as_u64() {
            Some(r) => r as usize * raw.shape[1],
            None => 0,
        };
        let want: Vec<f32> = slice["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_same(
            &format!("{name} row {}", slice["row"]),
            &values[start..start + want.len()],
            &want,
        );
    }

    // Every tensor dequantizes, and together they hold the model's parameter count.
    let mut total = 0usize;
    for name in weights.names() {
        total += weights.read(&name).unwrap().numel();
    }
    assert_eq!(total, 134_515_008);
}

/// tiny_gpt_neox.gguf holds the weights of tests/fixtures/tiny/gpt_neox in f32, laid out as
/// llama.cpp's converter writes a `gptneox` (fused `attn_qkv` rows regrouped to all queries,
/// keys, values; LayerNorm biases; `rope.dimension_count` 8 of a head of 16; parallel
/// residual). Read back, it must be that checkpoint exactly — the q/k/v rows in transformers'
/// per-head order — and give its transformers logits.
#[test]
fn tiny_gpt_neox_is_the_hf_fixture_and_gives_its_transformers_logits() {
    use autoquant::config::AutoConfig;
    use autoquant::models::{AutoModelForCausalLM, LoadOptions};
    let path = fixture("tiny_gpt_neox.gguf");
    let weights = GgufWeights::open(&path).unwrap();
    let hf_dir = common::fixture("tiny/gpt_neox");
    let hf = autoquant::formats::open_weights(&hf_dir).unwrap();
    assert_eq!(weights.names(), hf.names());
    let qkv = "gpt_neox.layers.1.attention.query_key_value.weight";
    assert_eq!(weights.gguf_name(qkv), Some("blk.1.attn_qkv.weight"));
    // The file's own row order is not transformers': the reader must regroup.
    let file = GgufFile::open(&path).unwrap();
    assert_ne!(
        file.dequantize("blk.1.attn_qkv.weight").unwrap(),
        hf.read(qkv).unwrap().to_f32()
    );
    for name in hf.names() {
        let (got, want) = (weights.read(&name).unwrap(), hf.read(&name).unwrap());
        assert_eq!(got.shape, want.shape, "{name}");
        assert_same(&name, &got.to_f32(), &want.to_f32());
    }

    let config = weights.hf_config().unwrap();
    let hf_config = common::read_json(&hf_dir.join("config.json"));
    for key in [
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "layer_norm_eps",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "use_parallel_residual",
        "attention_bias",
        "hidden_act",
        "bos_token_id",
        "eos_token_id",
    ] {
        assert_eq!(config[key], hf_config[key], "{key}");
    }
    let rope = &hf_config["rope_parameters"];
    assert_eq!(config["rotary_pct"], rope["partial_rotary_factor"]);
    assert_eq!(config["rotary_emb_base"], rope["rope_theta"]);

    let config = AutoConfig::from_value(config, &path, None).unwrap();
    let model =
        AutoModelForCausalLM::from_weights(config, &weights, &LoadOptions::default()).unwrap();
    let expected = common::read_json(&hf_dir.join("expected.json"));
    let case = &expected["cases"][0];
    assert_eq!(case["name"], "single_12");
    let ids = common::u32s(&case["input_ids"][0]);
    let want: Vec<f32> = common::f64s(&case["logits"])
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let err = common::max_abs_diff(&common::logits(model.as_ref(), &ids), &want);
    // The weights are the safetensors' bit for bit, so this is the safetensors model's error
    // (1.43e-6 measured in tests/models_golden.rs); bound about 10× that.
    assert!(err <= 1.6e-5, "max |Δlogit| {err}");
}
