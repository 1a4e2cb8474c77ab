//! AWQ checkpoints: GEMM packing byte for byte as AutoAWQ's `WQLinear_GEMM.from_linear`, reading
//! AutoAWQ's GEMM / GEMV / GEMV_FAST buffers back to the exact codes, zeros and scales, weights
//! equal to AutoAWQ's `dequantize_gemm`, tiny checkpoints giving the reference logits with their
//! layers held packed, the config AutoAWQ writes, and bad input named by file and tensor.
//!
//! Golden data: scripts/golden/make_awq_golden.py (AutoAWQ 0.2.7.post3 on the CPU).

mod common;
use common::{decode_logits, err_text, logits, max_rel_error};

use autoquant::checkpoint::awq::{
    gemv_fast_position, layer_tensors, linear_factory, pack_gemm, read_layer, unpack_gemm,
    zeros_width, AwqConfig, AwqMatrix, AwqVersion,
};
use autoquant::config::AutoConfig;
use autoquant::formats::safetensors::{save_safetensors_in_memory, SafetensorsFile};
use autoquant::formats::MemoryWeights;
use autoquant::formats::WeightSource;
use autoquant::kernels::LinearKernel;
use autoquant::models::{self, LoadOptions};
use autoquant::qtypes::grid::QuantizedLinear;
use autoquant::qtypes::{Bits, GroupSize};
use autoquant::tensor::{DType, RawTensor, WeightDType};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn awq_fixture(name: &str) -> PathBuf {
    common::fixture("awq").join(name)
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn config(version: AwqVersion, group_size: usize) -> AwqConfig {
    AwqConfig {
        version,
        ..AwqConfig::new(group_size)
    }
}

fn i32s(t: &RawTensor) -> Vec<i32> {
    assert_eq!(t.dtype, DType::I32);
    t.data
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Deterministic pseudo-random stream (LCG).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// A random AWQ-grid layer: codes and zeros in 0..=15, positive f16-valued scales.
fn random_layer(n: usize, k: usize, g: usize, seed: u64) -> QuantizedLinear {
    let mut r = Lcg(seed);
    let groups = k / g;
    QuantizedLinear {
        bits: Bits::B4,
        group_size: GroupSize::Size(g),
        n,
        k,
        codes: (0..n * k).map(|_| (r.next() % 16) as u8).collect(),
        scales: (0..groups * n)
            .map(|_| half::f16::from_f32(1e-3 + (r.next() % 1000) as f32 * 1e-5).to_f32())
            .collect(),
        zeros: (0..groups * n).map(|_| (r.next() % 16) as u32).collect(),
        g_idx: (0..k).map(|c| (c / g) as u32).collect(),
    }
}

// Bounds at about 10× the measured error (max |Δlogit| / max |logit|, f32, AVX-512 machine):
// AutoAWQ's logits on its own checkpoints at most 7.07e-7; packed kernels against dense
// arithmetic on the dequantized weights: prefill 0 (the same bound as GPTQ's, 1.2e-5, leaves
// room for another summation order), decode token by token 4.67e-6.
const AUTOAWQ_TOLERANCE: f32 = 1e-5;
const PACKED_PREFILL_TOLERANCE: f32 = 1.2e-5;
const PACKED_DECODE_TOLERANCE: f32 = 5e-5;

fn tensors_of(path: &Path) -> Vec<(String, RawTensor)> {
    let f = SafetensorsFile::open(path).unwrap();
    f.names()
        .into_iter()
        .map(|n| {
            let t = f.read(&n).unwrap();
            (n, t)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Packing identities

#[test]
fn gemm_interleave_is_autoawq_order() {
    // Column j of each group of 8 goes to nibble [0, 4, 1, 5, 2, 6, 3, 7][j] (docs/formats.md §2.1).
    let values: Vec<u8> = (0..8).collect();
    let w = pack_gemm(&values, 1, 8)[0] as u32;
    let nibbles: Vec<u32> = (0..8).map(|i| (w >> (4 * i)) & 0xF).collect();
    assert_eq!(nibbles, [0, 2, 4, 6, 1, 3, 5, 7]);
    assert_eq!(unpack_gemm(&[w as i32], 1, 8), values);
}

#[test]
fn pack_unpack_identity_over_shapes_and_groups() {
    let mut seed = 1;
    for g in [32usize, 64, 128] {
        for n in [8usize, 16, 24, 40, 64] {
            for groups in [1usize, 2, 3] {
                let k = g * groups;
                seed += 1;
                let q = random_layer(n, k, g, seed);
                let t = layer_tensors("l", &q).unwrap();
                let shapes: Vec<_> = t
                    .iter()
                    .map(|(n, t)| (n.as_str(), t.shape.clone()))
                    .collect();
                assert_eq!(
                    shapes,
                    [
                        ("l.qweight", vec![k, n / 8]),
                        ("l.qzeros", vec![groups, n / 8]),
                        ("l.scales", vec![groups, n]),
                    ]
                );
                let src = MemoryWeights::new("mem.safetensors", t);
                let back = read_layer(&src, "l", k, n, &config(AwqVersion::Gemm, g))
                    .unwrap()
                    .unwrap();
                assert_eq!(back, q, "n={n} k={k} g={g}");
                // The packed kernel holds the same grid.
                let m = AwqMatrix::new(&back, AwqVersion::Gemm).unwrap();
                assert_eq!(m.to_quantized().codes, q.codes);
                assert_eq!(m.to_f32(), q.dequantize(), "n={n} k={k} g={g}");
            }
        }
    }
}

#[test]
fn gemv_fast_positions_are_a_bijection() {
    let (n, k) = (8, 128);
    let mut seen = vec![false; (n / 4) * k * 4];
    for row in 0..n {
        for col in 0..k {
            let (r, c, t) = gemv_fast_position(col, row);
            let at = (r * k + c) * 4 + t;
            assert!(!seen[at], "k={col} n={row} collides");
            seen[at] = true;
        }
    }
    assert_eq!(zeros_width(4096, 128), Some(4));
    assert_eq!(zeros_width(256, 64), Some(2));
    assert_eq!(zeros_width(64, 32), Some(4));
    assert_eq!(zeros_width(96, 48), None);
}

// ---------------------------------------------------------------------------------------------
// AutoAWQ golden data

struct PackCase {
    name: String,
    n: usize,
    k: usize,
    g: usize,
    input: QuantizedLinear,
}

fn pack_cases() -> (SafetensorsFile, Vec<PackCase>) {
    let dir = awq_fixture("pack");
    let src = SafetensorsFile::open(&dir.join("golden.safetensors")).unwrap();
    let meta = common::read_json(&dir.join("cases.json"));
    assert_eq!(meta["autoawq_version"], "0.2.7.post3");
    let cases = meta["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let name = c["name"].as_str().unwrap().to_string();
            let (n, k, g) = (
                c["n"].as_u64().unwrap() as usize,
                c["k"].as_u64().unwrap() as usize,
                c["group_size"].as_u64().unwrap() as usize,
            );
            let codes = src.read(&format!("{name}.codes")).unwrap().data;
            let zeros = i32s(&src.read(&format!("{name}.zeros")).unwrap());
            let scales = src.read(&format!("{name}.scales_f32")).unwrap().to_f32();
            let input = QuantizedLinear {
                bits: Bits::B4,
                group_size: GroupSize::Size(g),
                n,
                k,
                codes,
                scales,
                zeros: zeros.into_iter().map(|z| z as u32).collect(),
                g_idx: (0..k).map(|c| (c / g) as u32).collect(),
            };
            PackCase {
                name,
                n,
                k,
                g,
                input,
            }
        })
        .collect();
    (src, cases)
}

#[test]
fn layer_tensors_match_autoawq_gemm_byte_for_byte() {
    let (src, cases) = pack_cases();
    assert_eq!(cases.len(), 3);
    for c in &cases {
        let t = layer_tensors("x", &c.input).unwrap();
        for (ours, suffix) in t.iter().zip(["qweight", "qzeros", "scales"]) {
            let want = src.read(&format!("{}.gemm.{suffix}", c.name)).unwrap();
            assert_eq!(ours.0, format!("x.{suffix}"));
            assert_eq!(
                (ours.1.dtype, &ours.1.shape),
                (want.dtype, &want.shape),
                "{}: {suffix}",
                c.name
            );
            assert!(
                ours.1.data == want.data,
                "{}: {suffix} bytes differ",
                c.name
            );
        }
    }
}

/// AutoAWQ's buffers of layout `layout` for case `c`, named as a checkpoint names them.
fn autoawq_layer(src: &SafetensorsFile, c: &PackCase, layout: &str) -> MemoryWeights {
    MemoryWeights::new(
        "mem.safetensors",
        ["qweight", "qzeros", "scales"]
            .iter()
            .map(|s| {
                (
                    format!("layer.{s}"),
                    src.read(&format!("{}.{layout}.{s}", c.name)).unwrap(),
                )
            })
            .collect::<Vec<_>>(),
    )
}

#[test]
fn reading_every_autoawq_layout_recovers_the_inputs() {
    let (src, cases) = pack_cases();
    for c in &cases {
        for (layout, version) in [
            ("gemm", AwqVersion::Gemm),
            ("gemv", AwqVersion::Gemv),
            ("gemv_fast", AwqVersion::GemvFast),
        ] {
            let mem = autoawq_layer(&src, c, layout);
            let q = read_layer(&mem, "layer", c.k, c.n, &config(version, c.g))
                .unwrap_or_else(|e| panic!("{} {layout}: {e}", c.name))
                .unwrap();
            assert_eq!(q.codes, c.input.codes, "{} {layout}: codes", c.name);
            assert_eq!(q.zeros, c.input.zeros, "{} {layout}: zeros", c.name);
            assert_eq!(q.scales, c.input.scales, "{} {layout}: scales", c.name);
            assert_eq!(q, c.input, "{} {layout}", c.name);
        }
    }
}

#[test]
fn unpacked_weights_equal_autoawq_dequantize_gemm() {
    let (src, cases) = pack_cases();
    for c in &cases {
        let mem = autoawq_layer(&src, c, "gemm");
        let q = read_layer(&mem, "layer", c.k, c.n, &config(AwqVersion::Gemm, c.g))
            .unwrap()
            .unwrap();
        let m = AwqMatrix::new(&q, AwqVersion::Gemm).unwrap();
        let ours = m.to_f32(); // [N, K], exact s·(q − z) in f32
                               // AutoAWQ computes (q − z)·s in float16 arithmetic: [K, N] f16.
        let deq = src.read(&format!("{}.deq_f16", c.name)).unwrap();
        assert_eq!((deq.dtype, deq.shape.clone()), (DType::F16, vec![c.k, c.n]));
        let want = deq.to_f32();
        let mut exact_matches = 0;
        for row in 0..c.n {
            for col in 0..c.k {
                let v = ours[row * c.k + col];
                let w = want[col * c.n + row];
                assert_eq!(
                    half::f16::from_f32(v).to_f32(),
                    w,
                    "{}: W[{row}, {col}]",
                    c.name
                );
                exact_matches += (v == w) as usize;
            }
        }
        // Most products are exact in f16 too; the rest differ only by AutoAWQ's f16 rounding.
        assert!(exact_matches > c.n * c.k / 2, "{}", c.name);
        // And the packed kernel multiplies with these weights.
        let x: Vec<f32> = (0..2 * c.k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0)
            .collect();
        let mut y = vec![0f32; 2 * c.n];
        m.forward(&x, 2, &mut y);
        for r in 0..2 {
            for o in 0..c.n {
                let want: f32 = (0..c.k).map(|i| x[r * c.k + i] * ours[o * c.k + i]).sum();
                assert!(
                    (y[r * c.n + o] - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{}: y[{r}, {o}] = {} vs {want}",
                    c.name,
                    y[r * c.n + o]
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tiny checkpoints

const VARIANTS: [&str; 2] = ["llama_gemm_g32", "llama_gemv_g64_skip_down"];

#[test]
fn tiny_checkpoints_load_packed_and_give_reference_logits() {
    for name in VARIANTS {
        let dir = awq_fixture(name);
        let expected = common::read_json(&dir.join("expected.json"));
        let model = models::load_dir(&dir, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let quantized: Vec<&str> = expected["quantized"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let g = expected["group_size"].as_u64().unwrap();
        let version = expected["version"].as_str().unwrap();
        let linears = model.linears();
        let mut packed = 0;
        for l in &linears {
            let storage = l.linear.weight.storage_name();
            if quantized.contains(&l.name.as_str()) {
                assert_eq!(
                    storage,
                    format!("awq-4bit-g{g}-{version}"),
                    "{name}: {}",
                    l.name
                );
                let dense_f16 = 2 * l.linear.in_features() * l.linear.out_features();
                assert!(
                    l.linear.weight.storage_bytes() < dense_f16 / 2,
                    "{name}: {} holds {} bytes",
                    l.name,
                    l.linear.weight.storage_bytes()
                );
                packed += 1;
            } else {
                assert!(
                    !storage.starts_with("awq"),
                    "{name}: {} is {storage}",
                    l.name
                );
            }
        }
        assert_eq!(
            packed,
            quantized.len(),
            "{name}: every quantized linear is held packed"
        );
        let f32_bytes = 4 * model.num_parameters();
        eprintln!(
            "{name}: footprint {} bytes vs {f32_bytes} in f32",
            model.footprint_bytes()
        );
        assert!(model.footprint_bytes() < f32_bytes / 2, "{name}");
        for case in expected["cases"].as_array().unwrap() {
            let ids = common::u32s(&case["input_ids"][0]);
            let want: Vec<f32> = common::f64s(&case["logits"])
                .iter()
                .map(|&v| v as f32)
                .collect();
            let got = logits(model.as_ref(), &ids);
            let rel = max_rel_error(&got, &want);
            eprintln!(
                "{name}: {} tokens, max |Δlogit| / max |logit| = {rel:.2e}",
                ids.len()
            );
            assert!(
                rel <= AUTOAWQ_TOLERANCE,
                "{name}: logits differ from the reference by {rel:.2e}"
            );
        }
    }
}

/// AutoAWQ 0.1 wrote no `quantization_config`; its settings (`w_bit`, `q_group_size`,
/// `zero_point`, `version: "GEMM"`) are in `quant_config.json` beside `config.json`.
#[test]
fn autoawq_0_1_quant_config_json_is_read() {
    let src = awq_fixture("llama_gemm_g32");
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, tmp.path().join(path.file_name().unwrap())).unwrap();
    }
    let mut cfg = common::read_json(&src.join("config.json"));
    cfg.as_object_mut().unwrap().remove("quantization_config");
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let legacy =
        serde_json::json!({"zero_point": true, "q_group_size": 32, "w_bit": 4, "version": "GEMM"});
    std::fs::write(tmp.path().join("quant_config.json"), legacy.to_string()).unwrap();

    let model = models::load_dir(tmp.path(), &LoadOptions::default()).unwrap();
    let reference = models::load_dir(&src, &LoadOptions::default()).unwrap();
    let storages: Vec<String> = model
        .linears()
        .iter()
        .map(|l| l.linear.weight.storage_name())
        .collect();
    assert!(
        storages.iter().any(|s| s == "awq-4bit-g32-gemm"),
        "{storages:?}"
    );
    let ids = [1u32, 5, 9, 2];
    assert_eq!(
        logits(model.as_ref(), &ids),
        logits(reference.as_ref(), &ids)
    );

    // Its settings are really used: a wrong group size there fails, naming the file.
    let legacy =
        serde_json::json!({"zero_point": true, "q_group_size": 64, "w_bit": 4, "version": "GEMM"});
    std::fs::write(tmp.path().join("quant_config.json"), legacy.to_string()).unwrap();
    let e = models::load_dir(tmp.path(), &LoadOptions::default())
        .err()
        .expect("group size 64 does not match the tensors")
        .to_string();
    assert!(e.contains("shape mismatch") && e.contains("q_proj"), "{e}");
}

#[test]
fn skipped_modules_stay_dense() {
    let dir = awq_fixture("llama_gemv_g64_skip_down");
    let model = models::load_dir(&dir, &LoadOptions::default()).unwrap();
    let down = model
        .linears()
        .into_iter()
        .find(|l| l.name == "model.layers.0.mlp.down_proj")
        .unwrap();
    assert_eq!(down.linear.weight.storage_name(), "f32");
}

#[test]
fn gemm_checkpoint_resaves_byte_for_byte() {
    // Read every packed layer of the AutoAWQ checkpoint and write it again: same bytes.
    let dir = awq_fixture("llama_gemm_g32");
    let path = dir.join("model.safetensors");
    let src = SafetensorsFile::open(&path).unwrap();
    let cfg_json = common::read_json(&dir.join("config.json"));
    let cfg =
        AwqConfig::from_config(&cfg_json["quantization_config"], &dir.join("config.json")).unwrap();
    let mut layers = 0;
    for name in src.names() {
        let Some(prefix) = name.strip_suffix(".qweight") else {
            continue;
        };
        let info = src.info(&format!("{prefix}.scales")).unwrap();
        let (n, k) = (info.shape[1], src.info(&name).unwrap().shape[0]);
        let q = read_layer(&src, prefix, k, n, &cfg).unwrap().unwrap();
        for (tname, t) in layer_tensors(prefix, &q).unwrap() {
            assert!(src.read(&tname).unwrap() == t, "{tname}");
        }
        layers += 1;
    }
    assert_eq!(layers, 14);
}

// ---------------------------------------------------------------------------------------------
// Config

#[test]
fn config_matches_what_autoawq_writes() {
    let dir = awq_fixture("llama_gemm_g32");
    let file = dir.join("config.json");
    let written = common::read_json(&file)["quantization_config"].clone();
    let cfg = AwqConfig::from_config(&written, &file).unwrap();
    assert_eq!(cfg, AwqConfig::new(32));
    assert_eq!(cfg.to_quantization_config(), written);
    let mut skip = config(AwqVersion::GemvFast, 128);
    skip.modules_to_not_convert = vec!["gate".into()];
    assert_eq!(
        skip.to_quantization_config(),
        json!({"quant_method": "awq", "zero_point": true, "group_size": 128, "bits": 4,
               "version": "gemv_fast", "modules_to_not_convert": ["gate"]})
    );
    assert!(skip.skips("model.layers.0.block_sparse_moe.gate"));
    assert!(!skip.skips("model.layers.0.mlp.up_proj"));
}

#[test]
fn config_spellings_of_every_writer_parse() {
    let f = Path::new("config.json");
    let parse = |v: Value| AwqConfig::from_config(&v, f).unwrap();
    // transformers 5 (both `format` and `version`, GPTQ leftovers such as `sym: true`).
    let dir = awq_fixture("llama_gemv_g64_skip_down");
    let t5 = common::read_json(&dir.join("config.json"))["quantization_config"].clone();
    let c = parse(t5);
    assert_eq!((c.version, c.group_size), (AwqVersion::Gemv, 64));
    assert_eq!(c.modules_to_not_convert, ["down_proj"]);
    // AutoAWQ 0.1.x quant_config.json and vLLM's spellings.
    let c = parse(json!({"zero_point": true, "q_group_size": 64, "w_bit": 4, "version": "GEMM"}));
    assert_eq!(c, AwqConfig::new(64));
    // transformers' llm-awq format/backend mean GEMV_FAST; exllama / ipex read GEMM checkpoints.
    assert_eq!(
        parse(json!({"quant_method": "awq", "bits": 4, "group_size": 128, "format": "llm-awq"}))
            .version,
        AwqVersion::GemvFast
    );
    assert_eq!(
        parse(json!({"quant_method": "awq", "backend": "llm-awq"})).version,
        AwqVersion::GemvFast
    );
    assert_eq!(
        parse(json!({"quant_method": "awq", "version": "exllama"})).version,
        AwqVersion::Gemm
    );
    assert_eq!(parse(json!({"quant_method": "awq"})), AwqConfig::new(128));
}

#[test]
fn bad_configs_name_the_file() {
    let f = Path::new("/models/x/config.json");
    let bad = |v: Value| err_text(AwqConfig::from_config(&v, f));
    for (v, needle) in [
        (json!({"quant_method": "awq", "bits": 3}), "bits = 3"),
        (json!({"quant_method": "awq", "w_bit": 8}), "bits = 8"),
        (
            json!({"quant_method": "awq", "bits": "4"}),
            "`bits` must be an integer",
        ),
        (
            json!({"quant_method": "awq", "group_size": 0}),
            "group_size = 0",
        ),
        (
            json!({"quant_method": "awq", "group_size": -1}),
            "group_size = -1",
        ),
        (
            json!({"quant_method": "awq", "zero_point": false}),
            "zero_point = false",
        ),
        (
            json!({"quant_method": "awq", "version": "marlin"}),
            "\"marlin\"",
        ),
        (json!({"quant_method": "gptq"}), "not an AWQ checkpoint"),
        (
            json!({"quant_method": "awq", "modules_to_not_convert": "gate"}),
            "must be a list",
        ),
        (json!([1, 2]), "not a JSON object"),
    ] {
        let msg = bad(v);
        assert!(
            msg.contains("/models/x/config.json") && msg.contains(needle),
            "{msg}"
        );
    }
}

#[test]
fn bad_bits_in_a_checkpoint_fail_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = awq_fixture("llama_gemm_g32");
    let mut cfg = common::read_json(&dir.join("config.json"));
    cfg["quantization_config"]["bits"] = json!(3);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        dir.join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let msg = err_text(models::load_dir(tmp.path(), &LoadOptions::default()));
    assert!(
        msg.contains("config.json") && msg.contains("bits = 3"),
        "{msg}"
    );
    // The factory is what the loader dispatches to for quant_method "awq".
    let ac = AutoConfig::from_pretrained(&dir).unwrap();
    let qc = ac.raw.get("quantization_config").unwrap().clone();
    assert!(linear_factory(&ac, &qc).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Bad tensors

fn good_layer() -> (QuantizedLinear, Vec<(String, RawTensor)>) {
    let q = random_layer(32, 64, 32, 99);
    let t = layer_tensors("layer", &q).unwrap();
    (q, t)
}

fn replace(t: &mut [(String, RawTensor)], name: &str, new: RawTensor) {
    t.iter_mut().find(|(n, _)| n == name).unwrap().1 = new;
}

#[test]
fn bad_tensors_are_named() {
    let cfg = config(AwqVersion::Gemm, 32);
    let read = |t: Vec<(String, RawTensor)>| {
        err_text(read_layer(
            &MemoryWeights::new("mem.safetensors", t),
            "layer",
            64,
            32,
            &cfg,
        ))
    };

    // qweight in GPTQ's [K/8, N] shape instead of AWQ's [K, N/8].
    let (_, mut t) = good_layer();
    replace(
        &mut t,
        "layer.qweight",
        RawTensor::from_i32(vec![8, 32], &[0; 256]),
    );
    let msg = read(t);
    assert!(
        msg.contains("mem.safetensors")
            && msg.contains("layer.qweight")
            && msg.contains("[8, 32]")
            && msg.contains("[64, 4]"),
        "{msg}"
    );

    let (_, mut t) = good_layer();
    t.retain(|(n, _)| n != "layer.scales");
    let msg = read(t);
    assert!(
        msg.contains("layer.scales") && msg.contains("missing"),
        "{msg}"
    );

    let (_, mut t) = good_layer();
    t.retain(|(n, _)| n != "layer.qzeros");
    let msg = read(t);
    assert!(
        msg.contains("layer.qzeros") && msg.contains("missing"),
        "{msg}"
    );

    let (_, mut t) = good_layer();
    replace(
        &mut t,
        "layer.qweight",
        RawTensor::from_f32(vec![64, 4], &[0.0; 256]),
    );
    let msg = read(t);
    assert!(
        msg.contains("layer.qweight") && msg.contains("I32"),
        "{msg}"
    );

    let (q, mut t) = good_layer();
    let mut s: Vec<half::f16> = q.scales.iter().map(|&v| half::f16::from_f32(v)).collect();
    s[37] = half::f16::INFINITY;
    replace(&mut t, "layer.scales", RawTensor::from_f16(vec![2, 32], &s));
    let msg = read(t);
    assert!(
        msg.contains("layer.scales") && msg.contains("inf") && msg.contains("row 1, column 5"),
        "{msg}"
    );

    // Group size not dividing K.
    let (_, t) = good_layer();
    let msg = err_text(read_layer(
        &MemoryWeights::new("mem.safetensors", t),
        "layer",
        64,
        32,
        &config(AwqVersion::Gemm, 48),
    ));
    assert!(
        msg.contains("layer.qweight") && msg.contains("group_size 48") && msg.contains("K=64"),
        "{msg}"
    );

    // N not a multiple of 8.
    let (_, t) = good_layer();
    let msg = err_text(read_layer(
        &MemoryWeights::new("mem.safetensors", t),
        "layer",
        64,
        36,
        &cfg,
    ));
    assert!(
        msg.contains("layer.qweight") && msg.contains("N=36"),
        "{msg}"
    );

    // A GEMV_FAST zero term that is not −s·z for an integer z.
    let (src, cases) = pack_cases();
    let c = &cases[0];
    let mut t: Vec<(String, RawTensor)> = ["qweight", "qzeros", "scales"]
        .iter()
        .map(|s| {
            (
                format!("layer.{s}"),
                src.read(&format!("{}.gemv_fast.{s}", c.name)).unwrap(),
            )
        })
        .collect();
    let mut z = t[1].1.to_f32();
    z[5] += 0.3 * t[2].1.to_f32()[5];
    let zh: Vec<half::f16> = z.iter().map(|&v| half::f16::from_f32(v)).collect();
    let shape = t[1].1.shape.clone();
    t[1].1 = RawTensor::from_f16(shape, &zh);
    let msg = err_text(read_layer(
        &MemoryWeights::new("mem.safetensors", t),
        "layer",
        c.k,
        c.n,
        &config(AwqVersion::GemvFast, c.g),
    ));
    assert!(
        msg.contains("layer.qzeros") && msg.contains("group 0, output 5"),
        "{msg}"
    );
}

#[test]
fn missing_packed_and_dense_weight_is_named_at_load() {
    let dir = awq_fixture("llama_gemm_g32");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("config.json"), tmp.path().join("config.json")).unwrap();
    let mut ts = tensors_of(&dir.join("model.safetensors"));
    ts.retain(|(n, _)| n != "model.layers.1.self_attn.o_proj.qweight");
    save_safetensors_in_memory(tmp.path(), &ts, u64::MAX, &Default::default()).unwrap();
    let msg = err_text(models::load_dir(tmp.path(), &LoadOptions::default()));
    assert!(
        msg.contains("model.safetensors")
            && msg.contains("model.layers.1.self_attn.o_proj.qweight")
            && msg.contains("missing"),
        "{msg}"
    );

    // A wrong qzeros shape in the file is named with the file.
    let mut ts = tensors_of(&dir.join("model.safetensors"));
    let name = "model.layers.0.mlp.up_proj.qzeros";
    let slot = ts.iter_mut().find(|(n, _)| n == name).unwrap();
    slot.1 = RawTensor::from_i32(vec![2, 8], &[0; 16]);
    save_safetensors_in_memory(tmp.path(), &ts, u64::MAX, &Default::default()).unwrap();
    let msg = err_text(models::load_dir(tmp.path(), &LoadOptions::default()));
    assert!(
        msg.contains("model.safetensors") && msg.contains(name) && msg.contains("[2, 16]"),
        "{msg}"
    );
}

#[test]
fn writer_refuses_what_the_layout_cannot_hold() {
    let base = random_layer(32, 64, 32, 5);
    let refuse = |q: QuantizedLinear, needle: &str| {
        let msg = err_text(layer_tensors("model.layers.3.mlp.up_proj", &q));
        assert!(
            msg.contains("model.layers.3.mlp.up_proj") && msg.contains(needle),
            "{msg}"
        );
    };
    refuse(
        QuantizedLinear {
            bits: Bits::B3,
            ..base.clone()
        },
        "3-bit",
    );
    refuse(
        QuantizedLinear {
            group_size: GroupSize::Size(48),
            ..base.clone()
        },
        "group size 48",
    );
    refuse(
        QuantizedLinear {
            group_size: GroupSize::PerChannel,
            ..base.clone()
        },
        "per-channel",
    );
    let mut q = base.clone();
    q.g_idx.swap(0, 40);
    refuse(q, "act-order");
    let mut q = base.clone();
    q.zeros[3] = 16;
    refuse(q, "zero point 16");
    let mut q = base.clone();
    q.scales[0] = 1e6;
    refuse(q, "not finite in float16");
    let q = random_layer(36, 64, 32, 6);
    refuse(q, "N=36");
}

// ---------------------------------------------------------------------------------------------
// Writing a whole checkpoint (and the Rust half of scripts/interop/check_awq.py)

/// AWQ's zero-point grid for one group (docs/formats.md §2.7, without the scale search): the range is
/// the group's own min/max, scale rounded to f16.
fn awq_grid(values: &[f32]) -> (f32, u32) {
    let mx = values.iter().copied().fold(f32::MIN, f32::max);
    let mn = values.iter().copied().fold(f32::MAX, f32::min);
    let s = half::f16::from_f32((mx - mn).max(1e-5) / 15.0).to_f32();
    (s, (-(mn / s).round_ties_even()).clamp(0.0, 15.0) as u32)
}

fn quantize_awq(w: &[f32], n: usize, k: usize, g: usize) -> QuantizedLinear {
    let groups = k / g;
    let mut q = QuantizedLinear {
        bits: Bits::B4,
        group_size: GroupSize::Size(g),
        n,
        k,
        codes: vec![0; n * k],
        scales: vec![0.0; groups * n],
        zeros: vec![0; groups * n],
        g_idx: (0..k).map(|c| (c / g) as u32).collect(),
    };
    for row in 0..n {
        for grp in 0..groups {
            let vals = &w[row * k + grp * g..row * k + (grp + 1) * g];
            let (s, z) = awq_grid(vals);
            q.scales[grp * n + row] = s;
            q.zeros[grp * n + row] = z;
            for (i, v) in vals.iter().enumerate() {
                let c = ((v / s).round_ties_even() + z as f32).clamp(0.0, 15.0);
                q.codes[row * k + grp * g + i] = c as u8;
            }
        }
    }
    q
}

const INTEROP_IDS: &[u32] = &[1, 17, 42, 5, 88, 23, 61, 9, 77, 30, 54, 12, 3, 90, 45, 8];

#[test]
fn written_checkpoint_loads_back_and_exports_for_interop() {
    let interop = std::env::var_os("AUTOQUANT_AWQ_INTEROP_DIR").map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let dir = interop
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf())
        .join("ours_gemm_g32_skip_o_proj");
    let src = awq_fixture("llama_gemm_g32");
    let mut v = common::read_json(&src.join("config.json"));
    v.as_object_mut().unwrap().remove("quantization_config");
    let base = AutoConfig::from_value(v, &src.join("config.json"), None).unwrap();
    let float =
        models::AutoModelForCausalLM::from_config(base, 77, &LoadOptions::default()).unwrap();

    let mut cfg = AwqConfig::new(32);
    cfg.modules_to_not_convert = vec!["o_proj".into()];
    let mut tensors: Vec<(String, RawTensor)> = vec![];
    let f16s =
        |v: &[f32]| -> Vec<half::f16> { v.iter().map(|&x| half::f16::from_f32(x)).collect() };
    for (name, values, shape) in float.other_tensors() {
        tensors.push((name, RawTensor::from_f16(shape, &f16s(&values))));
    }
    let mut written = BTreeMap::new();
    for l in float.linears() {
        let (n, k) = (l.linear.out_features(), l.linear.in_features());
        let w = l.linear.weight.to_f32();
        if !l.name.contains(".layers.") || cfg.skips(&l.name) {
            if l.name != "lm_head" {
                tensors.push((
                    format!("{}.weight", l.name),
                    RawTensor::from_f16(vec![n, k], &f16s(&w)),
                ));
            }
            continue;
        }
        let q = quantize_awq(&w, n, k, 32);
        tensors.extend(layer_tensors(&l.name, &q).unwrap());
        written.insert(l.name.clone(), q);
    }
    assert_eq!(written.len(), 12);
    let out = autoquant::fsutil::AtomicDir::with_overwrite(&dir, true).unwrap();
    let mut config = float.config().clone();
    config
        .raw
        .insert("quantization_config".into(), cfg.to_quantization_config());
    config.raw.insert("dtype".into(), "float16".into());
    autoquant::fsutil::write_atomic(
        &out.path().join("config.json"),
        config.to_json_string().as_bytes(),
    )
    .unwrap();
    save_safetensors_in_memory(out.path(), &tensors, u64::MAX, &Default::default()).unwrap();
    out.commit().unwrap();

    let model = models::load_dir(&dir, &LoadOptions::default()).unwrap();
    for l in model.linears() {
        match written.get(&l.name) {
            Some(q) => {
                assert_eq!(l.linear.weight.storage_name(), "awq-4bit-g32-gemm");
                assert_eq!(l.linear.weight.to_f32(), q.dequantize(), "{}", l.name);
            }
            None => assert!(
                !l.linear.weight.storage_name().starts_with("awq"),
                "{}",
                l.name
            ),
        }
    }
    let got = logits(model.as_ref(), INTEROP_IDS);
    // The same weights dequantized into a dense f32 model: the packed kernels must compute what
    // dense arithmetic on the dequantized weights computes.
    let dense = models::AutoModelForCausalLM::from_weights(
        float.config().clone(),
        &MemoryWeights::new(
            "<dequantized>",
            models::state_dict(model.as_ref(), WeightDType::F32),
        ),
        &LoadOptions::default(),
    )
    .unwrap();
    assert!(!dense.linears()[0]
        .linear
        .weight
        .storage_name()
        .starts_with("awq"));
    let want = logits(dense.as_ref(), INTEROP_IDS);
    let rel_dense = max_rel_error(&got, &want);
    // Token by token through the KV cache: the packed decode kernels.
    let rel_decode = max_rel_error(&decode_logits(model.as_ref(), INTEROP_IDS), &want);
    let rel_float = max_rel_error(&got, &logits(float.as_ref(), INTEROP_IDS));
    eprintln!(
        "written AWQ checkpoint: packed vs dense dequantized max rel: prefill {rel_dense:.2e}, \
         decode {rel_decode:.2e} (vs the unquantized model {rel_float:.3})"
    );
    assert!(
        rel_dense < PACKED_PREFILL_TOLERANCE && rel_decode < PACKED_DECODE_TOLERANCE,
        "packed logits differ from the dense dequantized model by {rel_dense:.2e} (prefill), \
         {rel_decode:.2e} (decode)"
    );
    let expected = json!({
        "input_ids": [INTEROP_IDS],
        "shape": [1, INTEROP_IDS.len(), model.config().vocab_size()],
        "logits": got,
        // AutoAWQ's dequantizer + transformers, measured 8.9e-7.
        "tolerance_rel": 1e-5,
        "tolerance_note": "max |Δlogit| / max |logit|",
    });
    std::fs::write(
        dir.with_extension("expected.json"),
        serde_json::to_string(&expected).unwrap(),
    )
    .unwrap();
    if interop.is_some() {
        eprintln!("wrote {} and its expected logits", dir.display());
    }
}
