//! bitsandbytes-style quantization against bitsandbytes 0.50.2 itself (CPU backend): fixtures
//! from scripts/golden/make_bnb_golden.py in tests/fixtures/bnb.

mod common;

use autoquant::formats::safetensors::{save_safetensors_in_memory, SafetensorsFile};
use autoquant::formats::WeightSource;
use autoquant::kernels::bnb::{
    int8_quantize_activations, FourBitDecode, FourBitMatrix, Int8Matrix,
};
use autoquant::kernels::LinearKernel;
use autoquant::models::{load_dir, CausalLM, ForwardInput, LoadOptions, LogitsMode};
use autoquant::qtypes::bnb::{
    dynamic_map_signed, quantize_4bit, quantize_int8, torch_mean_f32, torch_sum_f32, Absmax,
    BitsAndBytesConfig, FourBitType, Int8Compute, FP4_CODE, NF4_CODE,
};
use autoquant::quant::bnb::{
    memory_report, quantize_checkpoint, quantized_state_dict, BnbSaveOptions,
};
use autoquant::tensor::WeightDType;
use autoquant::tensor::{DType, RawTensor};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    common::fixture("bnb")
}

struct Golden {
    st: SafetensorsFile,
    meta: Value,
}

impl Golden {
    fn load() -> Self {
        Golden {
            st: SafetensorsFile::open(&dir().join("golden.safetensors")).unwrap(),
            meta: common::read_json(&dir().join("golden.json")),
        }
    }
    fn has(&self, name: &str) -> bool {
        self.st.info(name).is_some()
    }
    fn raw(&self, name: &str) -> RawTensor {
        self.st.read(name).unwrap_or_else(|e| panic!("{name}: {e}"))
    }
    fn f32s(&self, name: &str) -> Vec<f32> {
        let r = self.raw(name);
        assert_eq!(r.dtype, DType::F32, "{name}");
        r.to_f32()
    }
    fn bytes(&self, name: &str) -> Vec<u8> {
        self.raw(name).data
    }
}

/// The generator of make_bnb_golden.py (exact in f32).
fn gen(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed as u32;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (((s >> 8) as i32) - (1 << 23)) as f32 * (2f32).powi(-30)
        })
        .collect()
}

fn fnv1a64(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Indices where two f32 vectors differ bit for bit (first few), for messages.
fn bit_diffs(a: &[f32], b: &[f32]) -> Vec<(usize, f32, f32)> {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .enumerate()
        .filter(|(_, (x, y))| x.to_bits() != y.to_bits())
        .map(|(i, (x, y))| (i, *x, *y))
        .take(5)
        .collect()
}

#[test]
fn code_tables_and_dynamic_map_are_bitsandbytes_own() {
    let g = Golden::load();
    assert!(bit_diffs(&g.f32s("table.nf4"), &NF4_CODE).is_empty());
    assert!(bit_diffs(&g.f32s("table.fp4"), &FP4_CODE).is_empty());
    let d = bit_diffs(&g.f32s("table.dynamic"), &dynamic_map_signed());
    assert!(d.is_empty(), "dynamic map differs: {d:?}");
}

#[test]
fn double_quant_offset_is_torch_float32_mean() {
    let g = Golden::load();
    for case in g.meta["means"].as_array().unwrap() {
        let n = case["n"].as_u64().unwrap() as usize;
        let v: Vec<f32> = gen(case["seed"].as_u64().unwrap(), n)
            .into_iter()
            .map(|x| x.abs() * 3.0)
            .collect();
        let sum = torch_sum_f32(&v).to_bits();
        let mean = torch_mean_f32(&v).to_bits();
        assert_eq!(
            sum,
            case["sum_bits"].as_u64().unwrap() as u32,
            "sum of n={n}"
        );
        assert_eq!(
            mean,
            case["mean_bits"].as_u64().unwrap() as u32,
            "mean of n={n}"
        );
    }
}

fn input(g: &Golden, name: &str) -> (Vec<f32>, [usize; 2]) {
    if name == "big" {
        let b = &g.meta["big"];
        let n = b["n"].as_u64().unwrap() as usize;
        let scale = b["scale"].as_f64().unwrap() as f32;
        let v = gen(b["seed"].as_u64().unwrap(), n)
            .into_iter()
            .map(|x| x * scale)
            .collect();
        return (v, [1, n]);
    }
    let r = g.raw(&format!("input.{name}"));
    (r.to_f32(), [r.shape[0], r.shape[1]])
}

#[test]
fn four_bit_codes_and_statistics_are_bit_exact() {
    let g = Golden::load();
    let cases = g.meta["quant4"].as_object().unwrap();
    assert!(cases.len() >= 20);
    for (key, c) in cases {
        let (w, shape) = input(&g, c["input"].as_str().unwrap());
        assert_eq!(
            shape.to_vec(),
            serde_json::from_value::<Vec<usize>>(c["shape"].clone()).unwrap()
        );
        let qt = FourBitType::parse(c["quant_type"].as_str().unwrap()).unwrap();
        let bs = c["blocksize"].as_u64().unwrap() as usize;
        let dq = c["double_quant"].as_bool().unwrap();
        let q = quantize_4bit(&w, shape, WeightDType::F32, qt, bs, dq).unwrap();
        assert_eq!(
            fnv1a64(&q.packed),
            c["packed_fnv1a64"].as_str().unwrap(),
            "{key}: packed hash"
        );
        if g.has(&format!("{key}.packed")) {
            let want = g.bytes(&format!("{key}.packed"));
            let bad: Vec<usize> = (0..want.len())
                .filter(|&i| want[i] != q.packed[i])
                .take(5)
                .collect();
            assert!(bad.is_empty(), "{key}: packed bytes differ at {bad:?}");
        }
        assert_eq!(
            autoquant::checkpoint::bnb::quant_state_json(&q),
            c["quant_state_json"].as_str().unwrap(),
            "{key}: quant state JSON"
        );
        match &q.absmax {
            Absmax::Plain(a) => {
                let d = bit_diffs(a, &g.f32s(&format!("{key}.absmax")));
                assert!(d.is_empty(), "{key}: absmax {d:?}");
            }
            Absmax::Nested(n) => {
                assert_eq!(
                    n.offset.to_bits(),
                    c["nested_offset_bits"].as_u64().unwrap() as u32,
                    "{key}: offset"
                );
                assert_eq!(n.blocksize, 256);
                let rebuilt = n.dequantize();
                assert_eq!(
                    fnv1a64(&f32_bytes(&rebuilt)),
                    c["absmax_rebuilt_fnv1a64"].as_str().unwrap(),
                    "{key}: rebuilt absmax"
                );
                assert_eq!(
                    n.codes,
                    g.bytes(&format!("{key}.absmax_codes")),
                    "{key}: absmax codes"
                );
                let d = bit_diffs(&n.nested_absmax, &g.f32s(&format!("{key}.nested_absmax")));
                assert!(d.is_empty(), "{key}: nested absmax {d:?}");
                if g.has(&format!("{key}.absmax_rebuilt")) {
                    let d = bit_diffs(&rebuilt, &g.f32s(&format!("{key}.absmax_rebuilt")));
                    assert!(d.is_empty(), "{key}: rebuilt {d:?}");
                }
                assert!(bit_diffs(&n.map, &g.f32s("table.dynamic")).is_empty());
            }
        }
        if let Some(h) = c.get("deq_fnv1a64") {
            let deq = q.dequantize();
            assert_eq!(
                fnv1a64(&f32_bytes(&deq)),
                h.as_str().unwrap(),
                "{key}: dequantized"
            );
            if g.has(&format!("{key}.deq")) {
                assert!(bit_diffs(&deq, &g.f32s(&format!("{key}.deq"))).is_empty());
            }
        }
    }
}

#[test]
fn fp4_small_values_follow_the_reference_sort_of_signed_zeros() {
    // bitsandbytes' torch path sorts +0 before −0, so (−0.0026, 0] → code 0 and (0, 0.0026] → 8.
    let w = [1.0f32, 0.0, 1e-3, -1e-3, 0.5, -0.5];
    let q = quantize_4bit(&w, [1, 6], WeightDType::F32, FourBitType::Fp4, 64, false).unwrap();
    let codes: Vec<u8> = (0..6).map(|i| q.code_at(i)).collect();
    assert_eq!(codes, vec![3, 0, 8, 0, 5, 13]);
    // NF4's zero is code 7; an odd count pads with it.
    let q = quantize_4bit(
        &[0.5, 0.0, -1.0],
        [1, 3],
        WeightDType::F32,
        FourBitType::Nf4,
        64,
        false,
    )
    .unwrap();
    assert_eq!(q.packed, vec![(12 << 4) | 7, 7]);
}

#[test]
fn four_bit_matmul_matches_dequantized_weights() {
    let g = Golden::load();
    // "random" has rows that are not whole blocks (the decode path); "real" runs the lookup
    // kernel with block sizes of one, two and four SIMD steps of 32 codes.
    for (name, dq, qt, bs) in [
        ("random", false, FourBitType::Nf4, 64),
        ("real", true, FourBitType::Nf4, 64),
        ("real", false, FourBitType::Fp4, 64),
        ("real", false, FourBitType::Nf4, 32),
        ("real", true, FourBitType::Fp4, 128),
    ] {
        let (w, shape) = input(&g, name);
        let q = quantize_4bit(&w, shape, WeightDType::F32, qt, bs, dq).unwrap();
        let deq = q.dequantize();
        let (n, k) = (shape[0], shape[1]);
        let kern = FourBitMatrix::new(q, WeightDType::F32).unwrap();
        for m in [1usize, 3, 9] {
            let x: Vec<f32> = gen(m as u64, m * k).iter().map(|v| v * 500.0).collect();
            let mut out = vec![0f32; m * n];
            kern.forward(&x, m, &mut out);
            let mut rows = vec![0f32; m * 5];
            kern.forward_rows(&x, m, 2..7, &mut rows);
            for r in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|c| x[r * k + c] as f64 * deq[j * k + c] as f64)
                        .sum();
                    let scale: f64 = (0..k)
                        .map(|c| (x[r * k + c] as f64 * deq[j * k + c] as f64).abs())
                        .sum();
                    let got = out[r * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * scale + 1e-7,
                        "{name} m={m} [{r},{j}]: {got} vs {want}"
                    );
                    if (2..7).contains(&j) {
                        let g2 = rows[r * 5 + j - 2] as f64;
                        assert!((g2 - want).abs() <= 1e-5 * scale + 1e-7);
                    }
                }
            }
        }
    }
}

#[test]
fn integer_decodes_stay_within_their_rounding_bounds() {
    // The integer decodes round each code-book value to 1/8191 (int16) or 1/63.5 (int8) of the
    // largest and each activation to 1/16383 or 1/127 of its 64-chunk's largest; the result
    // must stay within what those roundings can move a dot product, and far closer than that
    // on average.
    for (decode, table_steps, act_steps, mean_limit) in [
        (FourBitDecode::Int16, 8191.0, 16383.0, 2e-4),
        (FourBitDecode::Int8, 63.5, 127.0, 4e-3),
    ] {
        integer_decode_within_bound(decode, table_steps, act_steps, mean_limit);
    }
}

fn integer_decode_within_bound(
    decode: FourBitDecode,
    table_steps: f64,
    act_steps: f64,
    mean_limit: f64,
) {
    let g = Golden::load();
    let (w, shape) = input(&g, "real");
    let (n, k) = (shape[0], shape[1]);
    for (qt, bs, dq) in [
        (FourBitType::Nf4, 64, false),
        (FourBitType::Nf4, 128, true),
        (FourBitType::Fp4, 64, true),
    ] {
        let q = quantize_4bit(&w, shape, WeightDType::F32, qt, bs, dq).unwrap();
        let deq = q.dequantize();
        let absmax: Vec<f32> = (0..n * k / bs).map(|b| q.absmax.get(b)).collect();
        let exact = FourBitMatrix::new(q.clone(), WeightDType::F32).unwrap();
        let kern = FourBitMatrix::new(q, WeightDType::F32)
            .unwrap()
            .with_decode(decode);
        for m in [1usize, 2, 4] {
            // Activations with outliers, as LLM hidden states have.
            let mut x: Vec<f32> = gen(40 + m as u64, m * k).iter().map(|v| v * 3.0).collect();
            for i in (5..m * k).step_by(97) {
                x[i] *= 60.0;
            }
            let mut out = vec![0f32; m * n];
            kern.forward(&x, m, &mut out);
            let mut rows = vec![0f32; m * 5];
            kern.forward_rows(&x, m, 2..7, &mut rows);
            // The integer path really ran: its sums are not the float ones bit for bit.
            let mut float = vec![0f32; m * n];
            exact.forward(&x, m, &mut float);
            assert!(
                out.iter().zip(&float).any(|(a, b)| a != b),
                "{qt:?} bs={bs} m={m}"
            );
            let mut rel_sum = 0f64;
            for r in 0..m {
                let xr = &x[r * k..(r + 1) * k];
                let chunk_max: Vec<f32> = xr
                    .chunks(64)
                    .map(|c| c.iter().fold(0f32, |a, v| a.max(v.abs())))
                    .collect();
                for j in 0..n {
                    let (mut want, mut bound, mut scale) = (0f64, 0f64, 0f64);
                    for c in 0..k {
                        let (xv, wv) = (xr[c] as f64, deq[j * k + c] as f64);
                        want += xv * wv;
                        scale += (xv * wv).abs();
                        let am = absmax[(j * k + c) / bs] as f64;
                        bound += xv.abs() * 0.5 * am / table_steps
                            + wv.abs() * 0.5 * chunk_max[c / 64] as f64 / act_steps;
                    }
                    let got = out[r * n + j] as f64;
                    let err = (got - want).abs();
                    assert!(
                        err <= bound + 1e-6 * scale,
                        "{decode:?} {qt:?} bs={bs} m={m} [{r},{j}]: {got} vs {want} (bound {bound})"
                    );
                    if (2..7).contains(&j) {
                        assert_eq!(rows[r * 5 + j - 2], out[r * n + j], "forward_rows agrees");
                    }
                    rel_sum += err / scale;
                }
            }
            let mean_rel = rel_sum / (m * n) as f64;
            eprintln!("{decode:?} {qt:?} bs={bs} m={m}: mean relative error {mean_rel:.2e}");
            assert!(
                mean_rel < mean_limit,
                "{decode:?} {qt:?} bs={bs} m={m}: mean relative error {mean_rel}"
            );
        }
        // A non-finite activation poisons its row, as in float arithmetic.
        let mut x = gen(3, 2 * k);
        x[k + 10] = f32::NAN;
        let mut out = vec![0f32; 2 * n];
        kern.forward(&x, 2, &mut out);
        assert!(out[..n].iter().all(|v| v.is_finite()));
        assert!(out[n..].iter().all(|v| v.is_nan()));
    }
}

#[test]
fn compute_dtype_rounds_weights_activations_and_outputs() {
    let g = Golden::load();
    let (w, shape) = input(&g, "real");
    let q = quantize_4bit(&w, shape, WeightDType::F32, FourBitType::Nf4, 64, false).unwrap();
    let deq = q.dequantize();
    let (n, k) = (shape[0], shape[1]);
    let kern = FourBitMatrix::new(q, WeightDType::BF16).unwrap();
    let x: Vec<f32> = gen(7, k).iter().map(|v| v * 300.0).collect();
    let mut out = vec![0f32; n];
    kern.forward(&x, 1, &mut out);
    let bf = |v: f32| half::bf16::from_f32(v).to_f32();
    for j in 0..n {
        let want: f64 = (0..k)
            .map(|c| bf(x[c]) as f64 * bf(deq[j * k + c]) as f64)
            .sum();
        assert_eq!(out[j], bf(out[j]), "output rounded to bf16");
        assert!(
            (out[j] as f64 - want).abs() <= 1e-2 * want.abs() + 1e-4,
            "{j}: {} vs {want}",
            out[j]
        );
    }
}

#[test]
fn int8_weights_match_bitsandbytes() {
    let g = Golden::load();
    let n = g.meta["int8"]["n"].as_u64().unwrap() as usize;
    let k = g.meta["int8"]["k"].as_u64().unwrap() as usize;
    let w = g.f32s("int8.w");
    let q = quantize_int8(&w, n, k).unwrap();
    let cb: Vec<i8> = g.bytes("int8.CB").into_iter().map(|b| b as i8).collect();
    assert_eq!(q.codes, cb);
    assert!(bit_diffs(&q.scb, &g.f32s("int8.SCB")).is_empty());
    assert!(bit_diffs(&q.dequantize(), &g.f32s("int8.deq_vectorwise")).is_empty());
    assert!(bit_diffs(&q.dequantize_fp(), &g.f32s("int8.deq_fp")).is_empty());
}

#[test]
fn llm_int8_activation_quantization_and_matmul_match_bitsandbytes() {
    let g = Golden::load();
    let n = g.meta["int8"]["n"].as_u64().unwrap() as usize;
    let k = g.meta["int8"]["k"].as_u64().unwrap() as usize;
    let q = quantize_int8(&g.f32s("int8.w"), n, k).unwrap();
    let bias = g.f32s("int8.bias");
    let x_all = g.f32s("int8.x");
    let mut outs = vec![];
    for case in g.meta["int8"]["cases"].as_array().unwrap() {
        let tag = case["tag"].as_str().unwrap();
        let m = case["rows"].as_u64().unwrap() as usize;
        let thr = case["threshold"].as_f64().unwrap() as f32;
        let x = &x_all[..m * k];
        let (ca, sca, cols) = int8_quantize_activations(x, m, k, thr);
        let want_ca: Vec<i8> = g
            .bytes(&format!("{tag}.CA"))
            .into_iter()
            .map(|b| b as i8)
            .collect();
        assert_eq!(ca, want_ca, "{tag}: CA");
        assert!(
            bit_diffs(&sca, &g.f32s(&format!("{tag}.SCA"))).is_empty(),
            "{tag}: SCA"
        );
        let want_cols: Vec<usize> = g
            .raw(&format!("{tag}.outlier_cols"))
            .to_f32()
            .iter()
            .map(|&c| c as usize)
            .collect();
        assert_eq!(cols, want_cols, "{tag}: outlier columns");
        if thr > 0.0 {
            assert!(!cols.is_empty(), "{tag}: the fixture has outliers");
        }

        let kern = Int8Matrix::new(q.clone(), thr, Int8Compute::Int8Matmul).unwrap();
        let mut out = vec![0f32; m * n];
        kern.forward(x, m, &mut out);
        for r in 0..m {
            for j in 0..n {
                out[r * n + j] += bias[j];
            }
        }
        let want = g.f32s(&format!("{tag}.out"));
        for (i, (a, b)) in out.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 2e-6 * (1.0 + b.abs()),
                "{tag}[{i}]: {a} vs {b}"
            );
        }
        // Our own float reference of the decomposition: int8 part from the codes, outlier columns
        // against the dequantized weight.
        let deq = q.dequantize();
        for r in 0..m {
            for j in 0..n {
                let int: i64 = (0..k)
                    .map(|c| ca[r * k + c] as i64 * q.codes[j * k + c] as i64)
                    .sum();
                let mut v = int as f64 * sca[r] as f64 * q.scb[j] as f64 / (127.0 * 127.0);
                v += cols
                    .iter()
                    .map(|&c| x[r * k + c] as f64 * deq[j * k + c] as f64)
                    .sum::<f64>();
                v += bias[j] as f64;
                let got = out[r * n + j] as f64;
                assert!(
                    (got - v).abs() <= 1e-4 * (1.0 + v.abs()),
                    "{tag} [{r},{j}]: {got} vs {v}"
                );
            }
        }
        outs.push((tag.to_string(), out));
    }
    // The decomposition changes the result (threshold 6 vs 0 on the same rows).
    assert_ne!(outs[0].1, outs[1].1);
}

#[test]
fn int8_gemm_path_equals_integer_dot_path() {
    // K above the 1024-term exact-f32 chunk, many rows (GEMM path) vs row-wise integer dots.
    let (n, k, m) = (70usize, 2500usize, 37usize);
    let w: Vec<f32> = gen(11, n * k).iter().map(|v| v * 100.0).collect();
    let q = quantize_int8(&w, n, k).unwrap();
    // |x| < 4.7 except two planted outliers.
    let mut x: Vec<f32> = gen(12, m * k).iter().map(|v| v * 600.0).collect();
    x[5 * k + 17] = 9.0;
    x[30 * k + 2000] = -12.0;
    let run = |kern: &Int8Matrix| {
        let mut big = vec![0f32; m * n];
        kern.forward(&x, m, &mut big);
        let mut rows = vec![0f32; m * n];
        kern.forward_rows(&x, m, 0..n, &mut rows);
        (big, rows)
    };
    // Without outliers both are exact integer sums with the same scaling: bit-identical.
    let (big, rows) = run(&Int8Matrix::new(q.clone(), 0.0, Int8Compute::Int8Matmul).unwrap());
    assert!(bit_diffs(&big, &rows).is_empty());
    // The outlier columns' float products may be summed in another order.
    let kern = Int8Matrix::new(q, 6.0, Int8Compute::Int8Matmul).unwrap();
    let (big, rows) = run(&kern);
    for (a, b) in big.iter().zip(&rows) {
        assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
    }
    // Dequantized-weights mode: a float matmul against CB·(SCB/127).
    let kd = Int8Matrix::new(kern.weight().clone(), 6.0, Int8Compute::DequantizedWeights).unwrap();
    let deq = kern.weight().dequantize_fp();
    let mut out = vec![0f32; m * n];
    kd.forward(&x, m, &mut out);
    for r in 0..m {
        for j in 0..n {
            let terms = (0..k).map(|c| x[r * k + c] as f64 * deq[j * k + c] as f64);
            let (want, scale) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
            let got = out[r * n + j] as f64;
            assert!(
                (got - want).abs() < 1e-6 * scale,
                "[{r},{j}] {got} vs {want}"
            );
        }
    }
}

// ----------------------------------------------------------------------------------------------
// Checkpoints written by transformers + bitsandbytes

const VARIANTS: [&str; 4] = ["nf4", "nf4-dq", "fp4", "int8"];

fn variant_config(v: &str) -> BitsAndBytesConfig {
    match v {
        "nf4" => BitsAndBytesConfig::four_bit(FourBitType::Nf4, false),
        "nf4-dq" => BitsAndBytesConfig::four_bit(FourBitType::Nf4, true),
        "fp4" => BitsAndBytesConfig::four_bit(FourBitType::Fp4, false),
        "int8" => BitsAndBytesConfig::eight_bit(6.0),
        _ => unreachable!(),
    }
}

fn tiny(v: &str) -> PathBuf {
    dir().join("tiny").join(v)
}

#[test]
fn transformers_checkpoints_load_with_identical_dequantized_weights() {
    let g = Golden::load();
    for v in VARIANTS {
        let model = load_dir(&tiny(v), &LoadOptions::default()).unwrap();
        let hashes = g.meta["tiny_deq_fnv1a64"][v].as_object().unwrap();
        let mut seen = 0;
        for l in model.linears() {
            if l.name == "lm_head" {
                assert!(
                    !l.linear.weight.storage_name().starts_with("bnb"),
                    "lm_head stays dense"
                );
                continue;
            }
            let storage = l.linear.weight.storage_name();
            assert!(storage.starts_with("bnb-"), "{v} {}: {storage}", l.name);
            let w = l.linear.weight.to_f32();
            assert_eq!(
                fnv1a64(&f32_bytes(&w)),
                hashes[&l.name].as_str().unwrap(),
                "{v} {}",
                l.name
            );
            if l.name == "model.layers.1.mlp.down_proj" {
                let want = g.f32s(&format!("tiny.{v}.{}.deq", l.name));
                assert!(bit_diffs(&w, &want).is_empty());
            }
            seen += 1;
        }
        assert_eq!(seen, hashes.len(), "{v}: every quantized layer was checked");
        // Logits against transformers running the same checkpoint in float32.
        let ids: Vec<u32> = g
            .raw("tiny.ids")
            .to_f32()
            .iter()
            .map(|&i| i as u32)
            .collect();
        let mut cache = model.new_cache(1);
        let logits = model
            .forward(&ForwardInput::single(&ids), &mut cache, LogitsMode::All)
            .unwrap();
        let want = g.f32s(&format!("tiny.{v}.logits"));
        let dense = g.f32s("tiny.dense.logits");
        let err = max_abs(&logits, &want);
        let quant_effect = max_abs(&want, &dense);
        assert!(err < 2e-5, "{v}: max |Δlogit| vs transformers {err}");
        assert!(
            quant_effect > 1e-2,
            "{v}: quantization changed the logits ({quant_effect})"
        );
    }
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn tensors_of(path: &Path) -> Vec<(String, RawTensor)> {
    let f = SafetensorsFile::open(path).unwrap();
    let mut names = f.names();
    names.sort();
    names
        .into_iter()
        .map(|n| (n.clone(), f.read(&n).unwrap()))
        .collect()
}

#[test]
fn our_quantization_of_the_dense_model_is_byte_identical_to_transformers() {
    let dense = load_dir(&tiny("dense"), &LoadOptions::default()).unwrap();
    for v in VARIANTS {
        let opts = BnbSaveOptions {
            config: variant_config(v),
            dtype: WeightDType::BF16,
            ..Default::default()
        };
        let (ours, report) = quantized_state_dict(dense.as_ref(), &opts).unwrap();
        let theirs = tensors_of(&tiny(v).join("model.safetensors"));
        let on: Vec<&String> = ours.iter().map(|(n, _)| n).collect();
        let tn: Vec<&String> = theirs.iter().map(|(n, _)| n).collect();
        assert_eq!(on, tn, "{v}: tensor names");
        for ((name, a), (_, b)) in ours.iter().zip(&theirs) {
            assert_eq!((a.dtype, &a.shape), (b.dtype, &b.shape), "{v} {name}");
            assert!(a.data == b.data, "{v} {name}: bytes differ");
        }
        assert_eq!(report.quantized_layers, 14);
        assert_eq!(report.skipped_layers, vec!["lm_head".to_string()]);
        // And the quantization_config transformers wrote.
        let cfg = common::read_json(&tiny(v).join("config.json"));
        assert_eq!(
            opts.config.to_quantization_config(),
            cfg["quantization_config"],
            "{v}"
        );
    }
}

#[test]
fn load_time_quantization_equals_the_checkpoint() {
    let g = Golden::load();
    for v in VARIANTS {
        let opts = LoadOptions {
            bnb: Some(variant_config(v)),
            ..Default::default()
        };
        let model = load_dir(&tiny("dense"), &opts).unwrap();
        let hashes = g.meta["tiny_deq_fnv1a64"][v].as_object().unwrap();
        for l in model.linears().iter().filter(|l| l.name != "lm_head") {
            let w = l.linear.weight.to_f32();
            assert_eq!(
                fnv1a64(&f32_bytes(&w)),
                hashes[&l.name].as_str().unwrap(),
                "{v} {}",
                l.name
            );
        }
        let report = memory_report(model.as_ref());
        // Per layer q, o, gate, up, down 64×64 and k, v 32×64; two layers.
        assert_eq!(report.quantized_params, 2 * (5 * 64 * 64 + 2 * 32 * 64));
        // An int8 lm_head (`lm_head_int8`) is not part of the bitsandbytes method's report.
        let with_head = load_dir(
            &tiny("dense"),
            &LoadOptions {
                lm_head_int8: true,
                ..opts.clone()
            },
        )
        .unwrap();
        let r8 = memory_report(with_head.as_ref());
        assert_eq!(
            (&r8.method, r8.quantized_params, r8.quantized_bytes),
            (
                &report.method,
                report.quantized_params,
                report.quantized_bytes
            ),
            "{v}"
        );
        if v == "nf4" {
            // 4 bits + one f32 absmax per 64 weights (4.5 bits), plus the 16-entry f32 table per
            // layer, which is visible in layers this small (64 bytes per 4,096 or 2,048 weights).
            let want = 4.5 + 8.0 * 64.0 * 14.0 / report.quantized_params as f64;
            assert!(
                (report.bits_per_param - want).abs() < 1e-9,
                "{}",
                report.bits_per_param
            );
        }
        if v == "nf4-dq" {
            // Per layer: codes, one uint8 statistic per 64 weights, the nested absmax (one f32
            // per 256 statistics), the 256-entry map, the offset and the 16-entry table.
            let bytes: usize = [4096usize, 2048, 2048, 4096, 4096, 4096, 4096]
                .iter()
                .map(|&nk| nk / 2 + nk / 64 + 4 * (nk / 64).div_ceil(256) + 1024 + 4 + 64)
                .sum::<usize>()
                * 2;
            assert_eq!(report.quantized_bytes, bytes as u64);
        }
        assert!(report.bytes_after < report.bytes_before);
    }
}

#[test]
fn saved_checkpoints_round_trip_and_match_load_time_results() {
    let dense = load_dir(&tiny("dense"), &LoadOptions::default()).unwrap();
    let ids = [3u32, 14, 15, 9, 26, 5];
    for v in VARIANTS {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("q");
        // The dense checkpoint is bf16, which load-time quantization records as the weights'
        // dtype; saving in bf16 records the same.
        let opts = BnbSaveOptions {
            config: variant_config(v),
            dtype: WeightDType::BF16,
            ..Default::default()
        };
        let report = quantize_checkpoint(dense.as_ref(), None, None, &out, &opts).unwrap();
        assert_eq!(report.dir, out);
        let reloaded = load_dir(&out, &LoadOptions::default()).unwrap();
        let at_load = load_dir(
            &tiny("dense"),
            &LoadOptions {
                bnb: Some(variant_config(v)),
                ..Default::default()
            },
        )
        .unwrap();
        for (a, b) in reloaded.linears().iter().zip(at_load.linears().iter()) {
            assert_eq!(a.name, b.name);
            assert_eq!(
                a.linear.weight.storage_name(),
                b.linear.weight.storage_name()
            );
            assert!(
                bit_diffs(&a.linear.weight.to_f32(), &b.linear.weight.to_f32()).is_empty(),
                "{v} {}",
                a.name
            );
        }
        let run = |m: &dyn CausalLM| {
            let mut c = m.new_cache(1);
            m.forward(&ForwardInput::single(&ids), &mut c, LogitsMode::All)
                .unwrap()
        };
        assert!(
            bit_diffs(&run(reloaded.as_ref()), &run(at_load.as_ref())).is_empty(),
            "{v}: logits"
        );
        // Saving again refuses to overwrite a non-empty folder and leaves it as it was.
        let before = std::fs::read(out.join("model.safetensors")).unwrap();
        assert!(quantize_checkpoint(dense.as_ref(), None, None, &out, &opts).is_err());
        assert_eq!(
            std::fs::read(out.join("model.safetensors")).unwrap(),
            before
        );
    }
}

#[test]
fn conv1d_layers_are_transposed_before_quantization() {
    let src = common::fixture("tiny/gpt2");
    let dense = load_dir(&src, &LoadOptions::default()).unwrap();
    let cfg = BitsAndBytesConfig::four_bit(FourBitType::Nf4, true);
    let q = load_dir(
        &src,
        &LoadOptions {
            bnb: Some(cfg.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let mut n = 0;
    for (d, l) in dense.linears().iter().zip(q.linears().iter()) {
        if cfg.skips(&l.name) || !l.linear.weight.storage_name().starts_with("bnb") {
            continue;
        }
        let (o, i) = (d.linear.out_features(), d.linear.in_features());
        let want = quantize_4bit(
            &d.linear.weight.to_f32(),
            [o, i],
            WeightDType::F32,
            FourBitType::Nf4,
            64,
            true,
        )
        .unwrap();
        assert!(
            bit_diffs(&l.linear.weight.to_f32(), &want.dequantize()).is_empty(),
            "{}",
            l.name
        );
        n += 1;
    }
    assert!(n >= 4, "GPT-2 Conv1D layers were quantized ({n})");
}

// ----------------------------------------------------------------------------------------------
// Bad input

/// Copy a tiny checkpoint into a temp folder with `edit` applied to its tensors.
fn edited(v: &str, edit: impl Fn(&mut Vec<(String, RawTensor)>)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(tiny(v).join("config.json"), tmp.path().join("config.json")).unwrap();
    let mut ts = tensors_of(&tiny(v).join("model.safetensors"));
    edit(&mut ts);
    save_safetensors_in_memory(tmp.path(), &ts, u64::MAX, &Default::default()).unwrap();
    tmp
}

fn load_err(dir: &Path) -> String {
    match load_dir(dir, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn set(ts: &mut [(String, RawTensor)], name: &str, t: RawTensor) {
    let slot = ts
        .iter_mut()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{name}"));
    slot.1 = t;
}

const QP: &str = "model.layers.0.self_attn.q_proj.weight";

#[test]
fn absmax_of_the_wrong_length_is_refused() {
    let d = edited("nf4", |ts| {
        let a = ts
            .iter()
            .find(|(n, _)| n == &format!("{QP}.absmax"))
            .unwrap()
            .1
            .to_f32();
        set(
            ts,
            &format!("{QP}.absmax"),
            RawTensor::from_f32(vec![a.len() - 1], &a[1..]),
        );
    });
    let e = load_err(d.path());
    assert!(
        e.contains(&format!("{QP}.absmax")) && e.contains("entries"),
        "{e}"
    );
    // Double quant: codes stored as floats.
    let d = edited("nf4-dq", |ts| {
        set(
            ts,
            &format!("{QP}.absmax"),
            RawTensor::from_f32(vec![64], &[0.1; 64]),
        );
    });
    let e = load_err(d.path());
    assert!(e.contains("uint8 codes"), "{e}");
}

#[test]
fn malformed_or_inconsistent_quant_state_json_is_refused() {
    let key = format!("{QP}.quant_state.bitsandbytes__nf4");
    let cases: [(&str, &str); 5] = [
        ("{\"quant_type\": \"nf4\", \"blocksize\": 64,", "malformed quant state JSON"),
        ("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [64, 32]}", "disagrees with the model config"),
        ("{\"quant_type\": \"fp4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [64, 64]}", "disagrees with the key suffix"),
        ("{\"quant_type\": \"af4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [64, 64]}", "unknown quant_type `af4`"),
        ("{\"quant_type\": \"nf4\", \"blocksize\": 100, \"dtype\": \"bfloat16\", \"shape\": [64, 64]}", "unsupported 4-bit blocksize 100"),
    ];
    for (json, want) in cases {
        let d = edited("nf4", |ts| {
            let b = json.as_bytes().to_vec();
            set(
                ts,
                &key,
                RawTensor::new(DType::U8, vec![b.len()], b).unwrap(),
            );
        });
        let e = load_err(d.path());
        assert!(e.contains(want) && e.contains(&key), "{json}: {e}");
    }
    // A blocksize that disagrees with the stored absmax.
    let d = edited("nf4", |ts| {
        let b = b"{\"quant_type\": \"nf4\", \"blocksize\": 128, \"dtype\": \"bfloat16\", \"shape\": [64, 64]}".to_vec();
        set(
            ts,
            &key,
            RawTensor::new(DType::U8, vec![b.len()], b).unwrap(),
        );
    });
    assert!(load_err(d.path()).contains("absmax"));
}

#[test]
fn bad_configs_and_weights_are_refused() {
    assert!(quantize_4bit(
        &[1.0; 96],
        [2, 48],
        WeightDType::F32,
        FourBitType::Nf4,
        48,
        false
    )
    .unwrap_err()
    .to_string()
    .contains("blocksize 48"));
    assert!(quantize_4bit(
        &[f32::NAN; 4],
        [2, 2],
        WeightDType::F32,
        FourBitType::Nf4,
        64,
        false
    )
    .is_err());
    assert!(FourBitType::parse("int4").is_err());
    let both = BitsAndBytesConfig {
        load_in_8bit: true,
        ..BitsAndBytesConfig::four_bit(FourBitType::Nf4, false)
    };
    let e = load_dir(
        &tiny("dense"),
        &LoadOptions {
            bnb: Some(both),
            ..Default::default()
        },
    );
    assert!(e.is_err());
    // An int8 weight beyond fp16 range.
    assert!(quantize_int8(&[1e6, 0.0], 1, 2).is_err());
    // Quantizing an already quantized checkpoint at load time.
    let e = load_dir(
        &tiny("nf4"),
        &LoadOptions {
            bnb: Some(BitsAndBytesConfig::four_bit(FourBitType::Nf4, false)),
            ..Default::default()
        },
    );
    assert!(e.err().unwrap().to_string().contains("already quantized"));
    // An int8 checkpoint in a GPU-only layout.
    let d = edited("int8", |ts| {
        let n = "model.layers.0.mlp.up_proj.weight_format";
        set(ts, n, RawTensor::new(DType::U8, vec![], vec![1]).unwrap());
    });
    assert!(load_err(d.path()).contains("row-major"));
}

/// GPT-NeoX's output projection is `embed_out`: bitsandbytes keeps it in float as it keeps
/// `lm_head` (transformers never quantizes the output embeddings), while every block linear is
/// quantized, and the memory report counts exactly the block linears.
#[test]
fn gpt_neox_embed_out_stays_float_under_bitsandbytes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/gpt_neox");
    for v in ["nf4", "int8"] {
        let opts = LoadOptions {
            bnb: Some(variant_config(v)),
            ..Default::default()
        };
        let model = load_dir(&dir, &opts).unwrap();
        let mut block = 0;
        for l in model.linears() {
            let s = l.linear.weight.storage_name();
            if l.name == "embed_out" {
                assert!(!s.starts_with("bnb-"), "{v}: embed_out is {s}");
            } else {
                assert!(s.starts_with("bnb-"), "{v} {}: {s}", l.name);
                block += l.linear.in_features() * l.linear.out_features();
            }
        }
        // Per layer: query_key_value 96×32, dense 32×32, h_to_4h 64×32, 4h_to_h 32×64.
        assert_eq!(block, 2 * (96 * 32 + 32 * 32 + 2 * 64 * 32), "{v}");
        assert_eq!(memory_report(model.as_ref()).quantized_params, block as u64);
    }
}
