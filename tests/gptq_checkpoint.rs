//! GPTQ checkpoints: packing byte for byte as AutoGPTQ does, reading what AutoGPTQ packed, tiny
//! checkpoints (AutoGPTQ / transformers 5 / GPTQModel / legacy configs, 2/3/4/8-bit, act-order,
//! gptq_v2, GPT-2 Conv1D) giving AutoGPTQ's logits, round trips, bad input, and the Rust half
//! of the AutoGPTQ interop check (scripts/interop/run.sh).
//!
//! Golden data: scripts/golden/make_gptq_golden.py (auto-gptq 0.7.1 QuantLinear on the CPU).

mod common;
use common::{decode_logits, err_text, logits, max_rel_error};

use autoquant::checkpoint::gptq::{
    choose_format, layer_tensors, linear_factory, read_layer, GptqConfig, GptqParams,
};
use autoquant::checkpoint::gptq_pack::ZeroFormat;
use autoquant::config::AutoConfig;
use autoquant::formats::safetensors::{save_safetensors_in_memory, SafetensorsFile};
use autoquant::formats::MemoryWeights;
use autoquant::formats::WeightSource;
use autoquant::models::{self, AutoModelForCausalLM, CausalLM, LoadOptions};
use autoquant::qtypes::grid::{QuantParams, QuantizedLinear};
use autoquant::qtypes::{Bits, GroupSize};
use autoquant::quant::rtn::quantize_rtn;
use autoquant::tensor::{DType, RawTensor, WeightDType};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

// Bounds at about 10× the measured error (max |Δlogit| / max |logit|, f32, AVX-512 machine):
// AutoGPTQ's logits on its own checkpoints at most 2.08e-6 (2-bit per-channel, 12 tokens);
// packed kernels against dense arithmetic on the dequantized weights: prefill at most 1.18e-6
// (3-bit act-order; 0 for the layouts without a permutation), decode token by token at most
// 7.30e-6 (4-bit v2).
const AUTOGPTQ_TOLERANCE: f32 = 2e-5;
const PACKED_PREFILL_TOLERANCE: f32 = 1.2e-5;
const PACKED_DECODE_TOLERANCE: f32 = 7.5e-5;

fn gptq_fixture(name: &str) -> PathBuf {
    common::fixture("gptq").join(name)
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn i32s(t: &RawTensor) -> Vec<i32> {
    assert_eq!(t.dtype, DType::I32);
    t.data
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn params(bits: Bits, group_size: GroupSize, format: ZeroFormat) -> GptqParams {
    GptqParams {
        bits,
        group_size,
        desc_act: true,
        sym: false,
        format,
        config_file: PathBuf::from("config.json"),
    }
}

/// Round scales to f16 as a checkpoint stores them.
fn f16_scales(mut q: QuantizedLinear) -> QuantizedLinear {
    for s in &mut q.scales {
        *s = half::f16::from_f32(*s).to_f32();
    }
    q
}

/// Deterministic pseudo-random weights in [-0.05, 0.05).
fn weights(n: usize, k: usize, seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n * k)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect()
}

/// RTN with act-order groups: columns in `perm` order, consecutive runs of `group` form the
/// groups (g_idx[perm[i]] = i / group), codes stored in the original column order.
fn rtn_act_order(
    w: &[f32],
    n: usize,
    k: usize,
    bits: u8,
    group: usize,
    sym: bool,
    perm: &[usize],
) -> QuantizedLinear {
    let mut wp = vec![0f32; n * k];
    for r in 0..n {
        for (i, &c) in perm.iter().enumerate() {
            wp[r * k + i] = w[r * k + c];
        }
    }
    let qp = quantize_rtn(
        &wp,
        n,
        k,
        &QuantParams {
            bits: Bits::new(bits).unwrap(),
            group_size: GroupSize::Size(group),
            sym,
        },
    )
    .unwrap();
    let mut q = qp.clone();
    for r in 0..n {
        for (i, &c) in perm.iter().enumerate() {
            q.codes[r * k + c] = qp.codes[r * k + i];
        }
    }
    for (i, &c) in perm.iter().enumerate() {
        q.g_idx[c] = (i / group) as u32;
    }
    q
}

fn permutation(k: usize, seed: u64) -> Vec<usize> {
    let mut p: Vec<usize> = (0..k).collect();
    let mut x = seed;
    for i in (1..k).rev() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        p.swap(i, (x >> 33) as usize % (i + 1));
    }
    p
}

// ---------------------------------------------------------------------------------------------
// (a) AutoGPTQ's packing, byte for byte, and reading it back

struct PackCase {
    name: String,
    bits: u8,
    group_size: Option<usize>,
    n: usize,
    k: usize,
    input: QuantizedLinear,
}

fn pack_cases() -> (SafetensorsFile, Vec<PackCase>) {
    let dir = gptq_fixture("pack");
    let src = SafetensorsFile::open(&dir.join("golden.safetensors")).unwrap();
    let meta = common::read_json(&dir.join("cases.json"));
    let mut cases = vec![];
    for c in meta["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap().to_string();
        let bits = c["bits"].as_u64().unwrap() as u8;
        let group_size = match c["group_size"].as_i64().unwrap() {
            -1 => None,
            g => Some(g as usize),
        };
        let (n, k) = (
            c["n"].as_u64().unwrap() as usize,
            c["k"].as_u64().unwrap() as usize,
        );
        let codes = src.read(&format!("{name}.codes")).unwrap();
        assert_eq!(codes.dtype, DType::U8);
        let input = QuantizedLinear {
            bits: Bits::new(bits).unwrap(),
            group_size: GroupSize::from_size(group_size),
            n,
            k,
            codes: codes.data.clone(),
            scales: src.read(&format!("{name}.scales_f32")).unwrap().to_f32(),
            zeros: i32s(&src.read(&format!("{name}.zeros")).unwrap())
                .into_iter()
                .map(|z| z as u32)
                .collect(),
            g_idx: i32s(&src.read(&format!("{name}.g_idx_in")).unwrap())
                .into_iter()
                .map(|g| g as u32)
                .collect(),
        };
        cases.push(PackCase {
            name,
            bits,
            group_size,
            n,
            k,
            input,
        });
    }
    assert_eq!(cases.len(), 17, "2/3/4/8 bits × 4 layouts + the wrap case");
    (src, cases)
}

#[test]
fn layer_tensors_match_autogptq_pack_byte_for_byte() {
    let (src, cases) = pack_cases();
    for c in cases.iter().filter(|c| !c.name.ends_with("wrap")) {
        let ours = layer_tensors(&c.name, &c.input, ZeroFormat::V1).unwrap();
        assert_eq!(ours.len(), 4);
        for (name, tensor) in &ours {
            let theirs = src.read(name).unwrap();
            assert_eq!(tensor.dtype, theirs.dtype, "{name}");
            assert_eq!(tensor.shape, theirs.shape, "{name}");
            assert!(
                tensor.data == theirs.data,
                "{name}: bytes differ from AutoGPTQ's pack"
            );
        }
    }
}

#[test]
fn reading_autogptq_pack_recovers_the_inputs() {
    let (src, cases) = pack_cases();
    for c in cases.iter().filter(|c| !c.name.ends_with("wrap")) {
        let p = params(
            Bits::new(c.bits).unwrap(),
            GroupSize::from_size(c.group_size),
            ZeroFormat::V1,
        );
        let q = read_layer(&src, &c.name, c.k, c.n, &p).unwrap().unwrap();
        assert_eq!(q, c.input, "{}", c.name);
    }
}

#[test]
fn v1_zero_point_zero_reads_as_vllm_does() {
    let (src, cases) = pack_cases();
    let c = cases.iter().find(|c| c.name.ends_with("wrap")).unwrap();
    // Our writer refuses a zero point v1 cannot hold...
    let msg = err_text(layer_tensors(&c.name, &c.input, ZeroFormat::V1));
    assert!(msg.contains("gptq_v2"), "{msg}");
    // ...and AutoGPTQ's (written in the top field of a word, so nothing else was corrupted)
    // reads back as Z = 16: what qlinear_cuda (act-order path), exllama and vLLM compute.
    let p = params(Bits::B4, GroupSize::Size(32), ZeroFormat::V1);
    let q = read_layer(&src, &c.name, c.k, c.n, &p).unwrap().unwrap();
    let mut want = c.input.zeros.clone();
    let mut wrapped = 0;
    for z in &mut want {
        if *z == 0 {
            *z = 16;
            wrapped += 1;
        }
    }
    assert_eq!(wrapped, 2);
    assert_eq!(q.zeros, want);
    assert_eq!(q.codes, c.input.codes);
    let deq_cuda = src.read(&format!("{}.deq_cuda", c.name)).unwrap().to_f32();
    let deq_old = src
        .read(&format!("{}.deq_cuda_old", c.name))
        .unwrap()
        .to_f32();
    assert_eq!(q.dequantize(), deq_cuda);
    assert_ne!(
        q.dequantize(),
        deq_old,
        "qlinear_cuda_old masks the +1 and reads Z = 0"
    );
    // The packed kernel built by the factory computes with Z = 16 too.
    let qcfg = json!({"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": false});
    let factory = linear_factory(&tiny_llama_config(), &qcfg).unwrap();
    let kernel = factory
        .load_linear(&src, &c.name, c.k, c.n, false)
        .unwrap()
        .unwrap();
    assert_eq!(kernel.to_f32(), deq_cuda);
    let x: Vec<f32> = (0..2 * c.k)
        .map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0)
        .collect();
    let mut y = vec![0f32; 2 * c.n];
    kernel.forward(&x, 2, &mut y);
    for r in 0..2 {
        for col in 0..c.n {
            let want: f32 = (0..c.k)
                .map(|i| x[r * c.k + i] * deq_cuda[col * c.k + i])
                .sum();
            assert!(
                (y[r * c.n + col] - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "row {r} col {col}"
            );
        }
    }
    // A v2 re-save cannot hold Z = 16; v1 can (field 15 again, byte-identical).
    assert!(layer_tensors(&c.name, &q, ZeroFormat::V2).is_err());
    let again = layer_tensors(&c.name, &q, ZeroFormat::V1).unwrap();
    let qz = &again
        .iter()
        .find(|(n, _)| n.ends_with(".qzeros"))
        .unwrap()
        .1;
    assert!(qz.data == src.read(&format!("{}.qzeros", c.name)).unwrap().data);
}

// ---------------------------------------------------------------------------------------------
// (b) tiny checkpoints packed by AutoGPTQ

const VARIANTS: &[&str] = &[
    "llama_4bit_sym_g32",
    "llama_4bit_asym_actorder_g32",
    "llama_3bit_asym_g32_quantize_config_only",
    "llama_2bit_asym_perchannel_no_g_idx",
    "llama_8bit_sym_g32_gptqmodel",
    "llama_4bit_asym_v2_g32",
    "gpt2_4bit_sym_g32",
];

#[test]
fn autogptq_checkpoints_give_autogptq_logits() {
    for name in VARIANTS {
        let dir = gptq_fixture(name);
        let expected = common::read_json(&dir.join("expected.json"));
        let model = models::load_dir(&dir, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let bits = expected["bits"].as_u64().unwrap();
        let linears = model.linears();
        let packed: Vec<_> = linears
            .iter()
            .filter(|l| l.linear.weight.storage_name().starts_with("gptq"))
            .collect();
        let decoder = linears.iter().filter(|l| l.name != "lm_head").count();
        assert_eq!(
            packed.len(),
            decoder,
            "{name}: every decoder linear is held packed"
        );
        assert!(packed[0]
            .linear
            .weight
            .storage_name()
            .starts_with(&format!("gptq-{bits}bit")));
        let f32_bytes = 4 * model.num_parameters();
        assert!(
            model.footprint_bytes() < f32_bytes,
            "{name}: footprint {} is not below f32 {f32_bytes}",
            model.footprint_bytes()
        );
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
                rel <= AUTOGPTQ_TOLERANCE,
                "{name}: logits differ from AutoGPTQ's by {rel:.2e} (relative)"
            );
        }
    }
}

#[test]
fn packed_footprint_is_the_packed_size() {
    let dir = gptq_fixture("llama_4bit_sym_g32");
    let model = models::load_dir(&dir, &LoadOptions::default()).unwrap();
    let l = model
        .linears()
        .into_iter()
        .find(|l| l.name == "model.layers.0.mlp.up_proj")
        .unwrap();
    let w = &l.linear.weight;
    assert_eq!(w.storage_name(), "gptq-4bit-g32");
    // 64×64 4-bit codes are 2048 bytes; scales/zeros/g_idx add a little, f32 would be 16384.
    assert!(
        w.storage_bytes() >= 2048 && w.storage_bytes() < 4096,
        "{}",
        w.storage_bytes()
    );
}

// ---------------------------------------------------------------------------------------------
// Round trips

#[test]
fn round_trip_every_width_and_layout() {
    let (n, k) = (64, 128);
    let w = weights(n, k, 7);
    let mut cases: Vec<(String, QuantizedLinear)> = vec![];
    for bits in [2u8, 3, 4, 8] {
        for (group, sym) in [
            (Some(32), true),
            (Some(64), false),
            (None, false),
            (None, true),
        ] {
            let q = quantize_rtn(
                &w,
                n,
                k,
                &QuantParams {
                    bits: Bits::new(bits).unwrap(),
                    group_size: GroupSize::from_size(group),
                    sym,
                },
            )
            .unwrap();
            cases.push((format!("b{bits} g{group:?} sym{sym}"), q));
        }
        let perm = permutation(k, bits as u64);
        cases.push((
            format!("b{bits} act-order"),
            rtn_act_order(&w, n, k, bits, 32, false, &perm),
        ));
    }
    for (what, q) in cases {
        let q = f16_scales(q);
        for format in [ZeroFormat::V1, ZeroFormat::V2] {
            if format == ZeroFormat::V1 && q.zeros.contains(&0) {
                assert_eq!(choose_format(false, &[&q]), ZeroFormat::V2);
                continue;
            }
            let tensors = layer_tensors("m.layers.0.proj", &q, format).unwrap();
            let src = MemoryWeights::new("mem.safetensors", tensors);
            let mut p = params(q.bits, q.group_size, format);
            let back = read_layer(&src, "m.layers.0.proj", k, n, &p)
                .unwrap()
                .unwrap();
            assert_eq!(back, q, "{what} {format:?}");
            // Through the factory: the kernel computes with the same weights.
            p.desc_act = true;
            let qcfg = json!({"quant_method": "gptq", "bits": q.bits,
                "group_size": q.group_size.to_i64(), "desc_act": true,
                "sym": false, "checkpoint_format": format.as_str()});
            let config = tiny_llama_config();
            let factory = linear_factory(&config, &qcfg).unwrap();
            let kernel = factory
                .load_linear(&src, "m.layers.0.proj", k, n, false)
                .unwrap()
                .unwrap();
            assert_eq!(kernel.to_f32(), q.dequantize(), "{what} {format:?}");
            assert!(kernel.storage_name().starts_with("gptq"));
            assert!(factory
                .load_linear(&src, "lm_head", k, n, false)
                .unwrap()
                .is_none());
        }
    }
}

#[test]
fn choose_format_rule() {
    let w = weights(32, 64, 3);
    let sym = quantize_rtn(
        &w,
        32,
        64,
        &QuantParams {
            bits: Bits::B4,
            group_size: GroupSize::Size(32),
            sym: true,
        },
    )
    .unwrap();
    let asym = quantize_rtn(
        &w,
        32,
        64,
        &QuantParams {
            bits: Bits::B4,
            group_size: GroupSize::Size(32),
            sym: false,
        },
    )
    .unwrap();
    assert!(!asym.zeros.contains(&0));
    let mut asym0 = asym.clone();
    asym0.zeros[5] = 0;
    assert_eq!(choose_format(true, &[&sym]), ZeroFormat::V1);
    assert_eq!(choose_format(true, &[]), ZeroFormat::V1);
    assert_eq!(choose_format(false, &[&asym]), ZeroFormat::V1);
    assert_eq!(choose_format(false, &[&asym, &asym0]), ZeroFormat::V2);
    assert_eq!(
        choose_format(false, &[]),
        ZeroFormat::V2,
        "unknown zeros: asymmetric is v2"
    );
}

fn tiny_llama_config() -> AutoConfig {
    let dir = gptq_fixture("llama_4bit_sym_g32");
    let mut v = common::read_json(&dir.join("config.json"));
    v.as_object_mut().unwrap().remove("quantization_config");
    AutoConfig::from_value(v, &dir.join("config.json"), None).unwrap()
}

#[test]
fn written_configs_parse_back_and_carry_the_keys() {
    let cfg = GptqConfig {
        bits: Bits::B3,
        group_size: GroupSize::PerChannel,
        desc_act: true,
        sym: false,
        static_groups: false,
        true_sequential: true,
        damp_percent: 0.01,
        format: ZeroFormat::V2,
        meta: json!({"calibration": {"source": "news.txt", "nsamples": 32, "seqlen": 2048, "seed": 0}}),
    };
    let qc = cfg.to_quantization_config();
    for key in [
        "bits",
        "group_size",
        "desc_act",
        "sym",
        "damp_percent",
        "true_sequential",
        "static_groups",
        "checkpoint_format",
        "format",
        "quant_method",
        "meta",
    ] {
        assert!(qc.get(key).is_some(), "quantization_config lacks {key}");
    }
    assert_eq!(qc["group_size"], -1);
    assert_eq!(qc["checkpoint_format"], "gptq_v2");
    assert_eq!(qc["meta"]["calibration"]["nsamples"], 32);
    assert!(qc["meta"]["quantizer"][0]
        .as_str()
        .unwrap()
        .starts_with("autoquant:"));
    let p = GptqParams::from_config(&qc, Path::new("config.json")).unwrap();
    assert_eq!(
        (p.bits, p.group_size, p.desc_act, p.sym, p.format),
        (Bits::B3, GroupSize::PerChannel, true, false, ZeroFormat::V2)
    );

    let ac = cfg.quantize_config_json();
    assert_eq!(ac["model_file_base_name"], "model");
    assert_eq!(ac["quant_method"], "gptq");
    let keys: Vec<&str> = ac.as_object().unwrap().keys().map(|s| s.as_str()).collect();
    assert_eq!(
        &keys[..7],
        [
            "bits",
            "group_size",
            "damp_percent",
            "desc_act",
            "static_groups",
            "sym",
            "true_sequential"
        ]
    );
    let p = GptqParams::from_config(&ac, Path::new("quantize_config.json")).unwrap();
    assert_eq!(p.format, ZeroFormat::V2);
}

// ---------------------------------------------------------------------------------------------
// Bad input

fn good_layer() -> (QuantizedLinear, Vec<(String, RawTensor)>) {
    let w = weights(32, 64, 11);
    let q = f16_scales(
        quantize_rtn(
            &w,
            32,
            64,
            &QuantParams {
                bits: Bits::B4,
                group_size: GroupSize::Size(32),
                sym: true,
            },
        )
        .unwrap(),
    );
    let t = layer_tensors("layer", &q, ZeroFormat::V1).unwrap();
    (q, t)
}

fn replace(t: &mut [(String, RawTensor)], name: &str, new: RawTensor) {
    t.iter_mut().find(|(n, _)| n == name).unwrap().1 = new;
}

#[test]
fn bad_tensors_are_named() {
    let p = params(Bits::B4, GroupSize::Size(32), ZeroFormat::V1);
    let read = |t: Vec<(String, RawTensor)>| {
        err_text(read_layer(
            &MemoryWeights::new("mem.safetensors", t),
            "layer",
            64,
            32,
            &p,
        ))
    };

    let (_, mut t) = good_layer();
    replace(
        &mut t,
        "layer.qweight",
        RawTensor::from_i32(vec![16, 32], &[0; 512]),
    );
    let msg = read(t);
    assert!(
        msg.contains("mem.safetensors")
            && msg.contains("layer.qweight")
            && msg.contains("[16, 32]"),
        "{msg}"
    );

    let (_, mut t) = good_layer();
    t.retain(|(n, _)| n != "layer.scales");
    let msg = read(t);
    assert!(
        msg.contains("layer.scales") && msg.contains("missing"),
        "{msg}"
    );

    let (q, mut t) = good_layer();
    let mut s: Vec<half::f16> = q.scales.iter().map(|&v| half::f16::from_f32(v)).collect();
    s[37] = half::f16::NAN;
    replace(&mut t, "layer.scales", RawTensor::from_f16(vec![2, 32], &s));
    let msg = read(t);
    assert!(
        msg.contains("layer.scales") && msg.contains("NaN") && msg.contains("group 1, output 5"),
        "{msg}"
    );

    let (_, mut t) = good_layer();
    replace(
        &mut t,
        "layer.qweight",
        RawTensor::from_f32(vec![8, 32], &[0.0; 256]),
    );
    let msg = read(t);
    assert!(
        msg.contains("layer.qweight") && msg.contains("int32"),
        "{msg}"
    );

    let (_, mut t) = good_layer();
    let mut g = vec![0i32; 64];
    g[9] = 2;
    replace(&mut t, "layer.g_idx", RawTensor::from_i32(vec![64], &g));
    let msg = read(t);
    assert!(
        msg.contains("layer.g_idx") && msg.contains("g_idx[9] = 2"),
        "{msg}"
    );

    // Group size not dividing K: named with the tensor and the config file.
    let (_, t) = good_layer();
    let p48 = params(Bits::B4, GroupSize::Size(48), ZeroFormat::V1);
    let msg = err_text(read_layer(
        &MemoryWeights::new("mem.safetensors", t),
        "layer",
        64,
        32,
        &p48,
    ));
    assert!(
        msg.contains("layer.qweight")
            && msg.contains("group_size 48")
            && msg.contains("config.json"),
        "{msg}"
    );

    // Shapes that cannot be packed.
    let (_, t) = good_layer();
    let msg = err_text(read_layer(
        &MemoryWeights::new("mem.safetensors", t),
        "layer",
        64,
        36,
        &p,
    ));
    assert!(msg.contains("out_features N=36"), "{msg}");
}

#[test]
fn bad_configs_name_the_file() {
    let f = Path::new("/models/x/config.json");
    let cases = [
        (
            json!({"quant_method": "gptq", "bits": 5, "group_size": 128}),
            "bits = 5",
        ),
        (json!({"quant_method": "gptq", "bits": 4}), "group_size"),
        (
            json!({"quant_method": "gptq", "bits": 4, "group_size": 0}),
            "group_size = 0",
        ),
        (
            json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}),
            "marlin",
        ),
        (
            json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "gptq", "format": "gptq_v2"}),
            "format",
        ),
        (
            json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "is_marlin_format": true}),
            "Marlin",
        ),
        (
            json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "pack_dtype": "int16"}),
            "pack_dtype",
        ),
        (
            json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "dynamic": {"-:.*mlp.*": {}}}),
            "dynamic",
        ),
        (
            json!({"quant_method": "gptq", "bits": "4", "group_size": 128}),
            "bits",
        ),
    ];
    for (cfg, needle) in cases {
        let msg = err_text(GptqParams::from_config(&cfg, f));
        assert!(
            msg.contains("/models/x/config.json") && msg.contains(needle),
            "{cfg}: {msg}"
        );
    }
    // transformers 5 spelling (format only) and AutoGPTQ 0.7 (no format key) both parse.
    let p = GptqParams::from_config(
        &json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "format": "gptq_v2"}),
        f,
    )
    .unwrap();
    assert_eq!(p.format, ZeroFormat::V2);
    let p = GptqParams::from_config(
        &json!({"bits": 8, "group_size": -1, "desc_act": true, "is_marlin_format": false}),
        f,
    )
    .unwrap();
    assert_eq!(
        (p.bits, p.group_size, p.desc_act, p.sym, p.format),
        (Bits::B8, GroupSize::PerChannel, true, true, ZeroFormat::V1)
    );
}

#[test]
fn unsupported_bits_in_a_checkpoint_fail_at_load() {
    let src = gptq_fixture("llama_4bit_sym_g32");
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let cfg_path = dir.path().join("config.json");
    let mut cfg = common::read_json(&cfg_path);
    cfg["quantization_config"]["bits"] = json!(6);
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let msg = err_text(models::load_dir(dir.path(), &LoadOptions::default()));
    assert!(
        msg.contains("config.json") && msg.contains("bits = 6"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------------------
// Writing a checkpoint (Rust half of scripts/interop/run.sh)

/// One checkpoint variant we write for AutoGPTQ to read.
struct WriteVariant {
    name: &'static str,
    bits: u8,
    group_size: Option<usize>,
    sym: bool,
    act_order: bool,
    /// Make some groups non-negative so asymmetric zero points of 0 appear (forces gptq_v2).
    zero_point_0: bool,
}

const WRITE_VARIANTS: &[WriteVariant] = &[
    WriteVariant {
        name: "ours_4bit_sym_g32",
        bits: 4,
        group_size: Some(32),
        sym: true,
        act_order: false,
        zero_point_0: false,
    },
    WriteVariant {
        name: "ours_3bit_asym_actorder_g32",
        bits: 3,
        group_size: Some(32),
        sym: false,
        act_order: true,
        zero_point_0: false,
    },
    WriteVariant {
        name: "ours_2bit_asym_g32",
        bits: 2,
        group_size: Some(32),
        sym: false,
        act_order: false,
        zero_point_0: false,
    },
    WriteVariant {
        name: "ours_8bit_sym_perchannel",
        bits: 8,
        group_size: None,
        sym: true,
        act_order: false,
        zero_point_0: false,
    },
    WriteVariant {
        name: "ours_4bit_asym_v2_g32",
        bits: 4,
        group_size: Some(32),
        sym: false,
        act_order: false,
        zero_point_0: true,
    },
];

const INTEROP_IDS: &[u32] = &[1, 17, 42, 5, 88, 23, 61, 9, 77, 30, 54, 12, 3, 90, 45, 8];

/// Quantize the decoder linears of `model` with RTN as `v` says and write a GPTQ checkpoint
/// (config.json with quantization_config, quantize_config.json, model.safetensors) to `dir`.
fn write_checkpoint(model: &dyn CausalLM, v: &WriteVariant, dir: &Path) -> ZeroFormat {
    let mut layers: Vec<(String, QuantizedLinear, Option<Vec<f32>>)> = vec![];
    for (li, l) in model.linears().into_iter().enumerate() {
        if !l.name.contains(".layers.") {
            continue;
        }
        let (n, k) = (l.linear.out_features(), l.linear.in_features());
        let mut w = l.linear.weight.to_f32();
        if v.zero_point_0 {
            for r in (0..n).step_by(5) {
                for x in &mut w[r * k..r * k + 32] {
                    *x = x.abs();
                }
            }
        }
        let q = if v.act_order {
            let g = v.group_size.unwrap_or(k);
            rtn_act_order(&w, n, k, v.bits, g, v.sym, &permutation(k, 100 + li as u64))
        } else {
            quantize_rtn(
                &w,
                n,
                k,
                &QuantParams {
                    bits: Bits::new(v.bits).unwrap(),
                    group_size: GroupSize::from_size(v.group_size),
                    sym: v.sym,
                },
            )
            .unwrap()
        };
        layers.push((l.name.clone(), f16_scales(q), l.linear.bias.clone()));
    }
    let refs: Vec<&QuantizedLinear> = layers.iter().map(|(_, q, _)| q).collect();
    let format = choose_format(v.sym, &refs);
    let cfg = GptqConfig {
        bits: Bits::new(v.bits).unwrap(),
        group_size: GroupSize::from_size(v.group_size),
        desc_act: v.act_order,
        sym: v.sym,
        static_groups: false,
        true_sequential: true,
        damp_percent: 0.01,
        format,
        meta: json!({"method": "rtn", "test": "gptq_checkpoint.rs"}),
    };
    let mut tensors: Vec<(String, RawTensor)> = vec![];
    for (name, values, shape) in model.other_tensors() {
        let h: Vec<half::f16> = values.iter().map(|&x| half::f16::from_f32(x)).collect();
        tensors.push((name, RawTensor::from_f16(shape, &h)));
    }
    for (name, q, bias) in &layers {
        tensors.extend(layer_tensors(name, q, format).unwrap());
        if let Some(b) = bias {
            let h: Vec<half::f16> = b.iter().map(|&x| half::f16::from_f32(x)).collect();
            tensors.push((
                format!("{name}.bias"),
                RawTensor::from_f16(vec![b.len()], &h),
            ));
        }
    }
    let out = autoquant::fsutil::AtomicDir::with_overwrite(dir, true).unwrap();
    let mut config = model.config().clone();
    config
        .raw
        .insert("quantization_config".into(), cfg.to_quantization_config());
    config.raw.insert("dtype".into(), "float16".into());
    autoquant::fsutil::write_atomic(
        &out.path().join("config.json"),
        config.to_json_string().as_bytes(),
    )
    .unwrap();
    let qc = serde_json::to_string_pretty(&cfg.quantize_config_json()).unwrap();
    autoquant::fsutil::write_atomic(&out.path().join("quantize_config.json"), qc.as_bytes())
        .unwrap();
    save_safetensors_in_memory(out.path(), &tensors, u64::MAX, &Default::default()).unwrap();
    out.commit().unwrap();
    format
}

#[test]
fn written_checkpoints_load_back_and_export_for_interop() {
    let interop = std::env::var_os("AUTOQUANT_INTEROP_DIR").map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let root = interop.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let float =
        AutoModelForCausalLM::from_config(tiny_llama_config(), 1234, &LoadOptions::default())
            .unwrap();
    let float_logits = logits(float.as_ref(), INTEROP_IDS);
    for v in WRITE_VARIANTS {
        let dir = root.join(v.name);
        let format = write_checkpoint(float.as_ref(), v, &dir);
        assert_eq!(
            format == ZeroFormat::V2,
            v.zero_point_0,
            "{}: format {format:?}",
            v.name
        );
        let model = models::load_dir(&dir, &LoadOptions::default()).unwrap();
        assert!(model.linears()[0]
            .linear
            .weight
            .storage_name()
            .starts_with("gptq"));
        let got = logits(model.as_ref(), INTEROP_IDS);
        // The same weights dequantized into a dense f32 model: the packed kernels must compute
        // what dense arithmetic on the dequantized weights computes.
        let dense = AutoModelForCausalLM::from_weights(
            tiny_llama_config(),
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
            .starts_with("gptq"));
        let want = logits(dense.as_ref(), INTEROP_IDS);
        let rel_dense = max_rel_error(&got, &want);
        // Token by token through the KV cache: the packed decode kernels.
        let rel_decode = max_rel_error(&decode_logits(model.as_ref(), INTEROP_IDS), &want);
        let rel_float = max_rel_error(&got, &float_logits);
        eprintln!(
            "{}: {format:?}, packed vs dense dequantized max rel: prefill {rel_dense:.2e}, \
             decode {rel_decode:.2e} (vs the unquantized model {rel_float:.3})",
            v.name
        );
        assert!(
            rel_dense < PACKED_PREFILL_TOLERANCE && rel_decode < PACKED_DECODE_TOLERANCE,
            "{}: packed logits differ from the dense dequantized model by {rel_dense:.2e} \
             (prefill), {rel_decode:.2e} (decode)",
            v.name
        );
        let expected = json!({
            "variant": v.name,
            "checkpoint_format": format.as_str(),
            "input_ids": [INTEROP_IDS],
            "shape": [1, INTEROP_IDS.len(), model.config().vocab_size()],
            "logits": got,
            // AutoGPTQ's QuantLinear, measured 7.4e-7 to 1.05e-6 over the five variants.
            "tolerance_rel": 1e-5,
            "tolerance_note": "max |Δlogit| / max |logit|",
        });
        std::fs::write(
            root.join(format!("{}.expected.json", v.name)),
            serde_json::to_string(&expected).unwrap(),
        )
        .unwrap();
    }
    if let Some(d) = interop {
        eprintln!(
            "wrote {} checkpoints and expected logits to {}",
            WRITE_VARIANTS.len(),
            d.display()
        );
    }
}

#[test]
fn old_autogptq_folder_without_quantization_config_is_detected() {
    // The legacy fixture has only quantize_config.json; its settings must be used (3-bit).
    let dir = gptq_fixture("llama_3bit_asym_g32_quantize_config_only");
    let cfg = common::read_json(&dir.join("config.json"));
    assert!(cfg.get("quantization_config").is_none());
    let model = models::load_dir(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(
        model.linears()[0].linear.weight.storage_name(),
        "gptq-3bit-g32"
    );
    // And a config.json naming that file in errors: break the legacy file's bits.
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    let qc_path = tmp.path().join("quantize_config.json");
    let mut qc: Value = common::read_json(&qc_path);
    qc["bits"] = json!(7);
    std::fs::write(&qc_path, serde_json::to_string(&qc).unwrap()).unwrap();
    let msg = err_text(models::load_dir(tmp.path(), &LoadOptions::default()));
    assert!(
        msg.contains("quantize_config.json") && msg.contains("bits = 7"),
        "{msg}"
    );
}
