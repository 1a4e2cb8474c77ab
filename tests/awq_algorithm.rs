//! The AWQ search (`quant::awq`) against AutoAWQ 0.2.7.post3, and its properties.
//!
//! Golden data: `scripts/golden/make_awq_algo_golden.py` runs AutoAWQ's own
//! `pseudo_quantize_tensor`, `_search_best_scale` (a single `nn.Linear`, or a Llama-style MLP
//! with gate/up as the scaled group) and `_compute_best_clip` on the CPU in f32 with seeded data
//! (planted outlier input channels, a dead channel, crafted rounding ties) and saves inputs and
//! outputs to `tests/fixtures/awq_algo/`. The script's docstring says where CPU numerics force a
//! tolerance.

mod common;

use autoquant::formats::safetensors::SafetensorsFile;
use autoquant::kernels::matmul_nt;
use autoquant::quant::awq::{
    activation_mean, apply_clip, candidate_scales, dequantize, divide_columns, divide_offset_norm,
    divide_rows, divide_vector, fake_quantize, pseudo_quantize, scale_columns, search_clip,
    search_scales, weight_mean, AwqOptions,
};
use common::{fixture, read_json, Rng};
use serde_json::Value;

fn open_golden() -> (SafetensorsFile, Value) {
    let st = SafetensorsFile::open(&fixture("awq_algo/awq_algo.safetensors")).unwrap();
    let meta = read_json(&fixture("awq_algo/cases.json"));
    (st, meta)
}

fn bytes<'a>(st: &'a SafetensorsFile, name: &str) -> &'a [u8] {
    st.tensor_bytes(name)
        .unwrap_or_else(|| panic!("missing {name}"))
}

fn f32s(st: &SafetensorsFile, name: &str) -> Vec<f32> {
    bytes(st, name)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn f16s(st: &SafetensorsFile, name: &str) -> Vec<f32> {
    bytes(st, name)
        .chunks_exact(2)
        .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
        .collect()
}

fn i32s(st: &SafetensorsFile, name: &str) -> Vec<i32> {
    bytes(st, name)
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn usize_of(v: &Value) -> usize {
    v.as_u64().unwrap() as usize
}

/// AutoAWQ's `group_size` (-1 = whole row) as our option (0 = whole row).
fn opts_of(case: &Value) -> AwqOptions {
    let g = case["group_size"].as_i64().unwrap();
    AwqOptions {
        bits: case["bits"].as_u64().unwrap() as u8,
        group_size: if g < 0 { 0 } else { g as usize },
        zero_point: case["zero_point"].as_bool().unwrap(),
        duo_scaling: case
            .get("duo_scaling")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        ..AwqOptions::default()
    }
}

fn rel(a: f32, b: f32) -> f32 {
    (a - b).abs() / b.abs().max(1e-30)
}

fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// `out = x · wᵀ`, `[rows, n]`.
fn linear(x: &[f32], rows: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * n];
    matmul_nt(x, rows, k, w, n, &mut out);
    out
}

/// Llama MLP `down(silu(gate(x)) · up(x))`.
fn mlp(
    x: &[f32],
    rows: usize,
    k: usize,
    gate: &[f32],
    up: &[f32],
    down: &[f32],
    h: usize,
) -> Vec<f32> {
    let g = linear(x, rows, k, gate, h);
    let u = linear(x, rows, k, up, h);
    let a: Vec<f32> = g.iter().zip(&u).map(|(&g, &u)| silu(g) * u).collect();
    linear(&a, rows, h, down, k)
}

#[test]
fn pseudo_quantize_matches_autoawq() {
    let (st, meta) = open_golden();
    let w = f32s(&st, "pseudo.w");
    let (n, k) = (12, 256);
    assert_eq!(w.len(), n * k);
    let mut with_fake = 0;
    for case in meta["pseudo"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let opts = opts_of(case);
        let q = pseudo_quantize(&w, n, k, &opts).unwrap();
        let groups = q.num_groups();
        assert_eq!(groups, k / opts.group_len(k).unwrap(), "{name}");

        let codes: Vec<u8> = bytes(&st, &format!("{name}.codes")).to_vec();
        assert_eq!(q.codes, codes, "{name}: codes differ from AutoAWQ");
        // AutoAWQ's scales/zeros are [n, groups]; QuantizedLinear stores [groups, n].
        let scales = f32s(&st, &format!("{name}.scales"));
        let zeros = i32s(&st, &format!("{name}.zeros"));
        for r in 0..n {
            for g in 0..groups {
                assert_eq!(
                    q.scales[g * n + r].to_bits(),
                    scales[r * groups + g].to_bits(),
                    "{name}: scale of row {r}, group {g}"
                );
                assert_eq!(
                    q.zeros[g * n + r] as i32,
                    zeros[r * groups + g],
                    "{name}: zero of row {r}, group {g}"
                );
            }
        }
        // Dequantization and the fake-quant path agree exactly (up to the sign of zero: the
        // symmetric fake value is `round(w/s)·s`, which is −0 for small negatives, while
        // `(code − zero)·s` is +0) ...
        let deq = dequantize(&q);
        assert_eq!(deq, q.dequantize(), "{name}");
        let fake = fake_quantize(&w, n, k, &opts).unwrap();
        assert!(
            deq.iter().zip(&fake).all(|(a, b)| a == b),
            "{name}: dequantize(pseudo_quantize) != fake_quantize"
        );
        // ... and with AutoAWQ's fake-quantized weight.
        if st.tensor_bytes(&format!("{name}.fake")).is_some() {
            let want = f32s(&st, &format!("{name}.fake"));
            for (i, (a, b)) in fake.iter().zip(&want).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{name}: fake value {i}: {a} vs {b}"
                );
            }
            with_fake += 1;
        }
    }
    assert_eq!(with_fake, 2);
}

#[test]
fn scale_search_matches_autoawq() {
    let (st, meta) = open_golden();
    let cases = meta["scale"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let opts = opts_of(case);
        let (rows, k) = (usize_of(&case["rows"]), usize_of(&case["k"]));
        let ns: Vec<usize> = case["n"].as_array().unwrap().iter().map(usize_of).collect();
        let x = f16s(&st, &format!("{name}.x"));
        let ws: Vec<Vec<f32>> = (0..ns.len())
            .map(|i| f16s(&st, &format!("{name}.w{i}")))
            .collect();
        let linears: Vec<(&[f32], usize)> = ws
            .iter()
            .zip(&ns)
            .map(|(w, &n)| (w.as_slice(), n))
            .collect();
        let kind = case["kind"].as_str().unwrap();
        let down = (kind == "mlp").then(|| f16s(&st, &format!("{name}.down")));
        let mut calls = 0;
        let mut inspect = |w: &[Vec<f32>]| -> Vec<f32> {
            calls += 1;
            match &down {
                None => linear(&x, rows, k, &w[0], ns[0]),
                Some(d) => mlp(&x, rows, k, &w[0], &w[1], d, ns[0]),
            }
        };
        let got = search_scales(&x, rows, k, &linears, &mut inspect, &opts).unwrap();
        assert_eq!(calls, 21, "{name}: one reference call and 20 candidates");

        let want_ratio = case["best_ratio"].as_f64().unwrap() as f32;
        assert_eq!(got.best_ratio, want_ratio, "{name}: best ratio");
        let losses: Vec<f64> = case["losses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(got.errors.len(), losses.len());
        for (i, (&e, &l)) in got.errors.iter().zip(&losses).enumerate() {
            // Module outputs differ in summation order (and SiLU) from torch.
            assert!(rel(e, l as f32) < 1e-5, "{name}: loss {i}: {e} vs {l}");
        }
        let want = f32s(&st, &format!("{name}.scales"));
        assert_eq!(got.scales.len(), k);
        let worst = got
            .scales
            .iter()
            .zip(&want)
            .map(|(&a, &b)| rel(a, b))
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "{name}: scales differ by {worst} relative");
        let worst_loss = got
            .errors
            .iter()
            .zip(&losses)
            .map(|(&e, &l)| rel(e, l as f32))
            .fold(0f32, f32::max);
        println!(
            "{name}: ratio {} scales max rel {worst:.2e}, losses max rel {worst_loss:.2e}",
            got.best_ratio
        );
        // The outlier channels get the largest scales, a dead channel the smallest.
        let outliers: Vec<usize> = case["outliers"]
            .as_array()
            .unwrap()
            .iter()
            .map(usize_of)
            .collect();
        let min_outlier = outliers
            .iter()
            .map(|&c| got.scales[c])
            .fold(f32::MAX, f32::min);
        let max_other = (0..k)
            .filter(|c| !outliers.contains(c))
            .map(|c| got.scales[c])
            .fold(0f32, f32::max);
        assert!(
            min_outlier > max_other,
            "{name}: outlier channels not scaled most"
        );
        if let Some(dead) = case["dead"].as_u64() {
            let dead = dead as usize;
            let min = got.scales.iter().copied().fold(f32::MAX, f32::min);
            assert_eq!(got.scales[dead], min, "{name}: dead channel");
        }
    }
}

#[test]
fn clip_search_matches_autoawq() {
    let (st, meta) = open_golden();
    let cases = meta["clip"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    let mut shrunk = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let opts = opts_of(case);
        let (rows, k, n) = (
            usize_of(&case["rows"]),
            usize_of(&case["k"]),
            usize_of(&case["n"]),
        );
        let x = f16s(&st, &format!("{name}.x"));
        let w = f16s(&st, &format!("{name}.w"));
        let got = search_clip(&x, rows, k, &w, n, &opts).unwrap();
        let want = f32s(&st, &format!("{name}.max_val"));
        assert_eq!(got.len(), want.len(), "{name}");
        let group = opts.group_len(k).unwrap();
        for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
            assert!(rel(a, b) < 1e-5, "{name}: max_val {i}: {a} vs {b}");
            // Count thresholds below the group's max |w|, so the test sees real clipping.
            let (r, g) = (i / (k / group), i % (k / group));
            let org = w[r * k + g * group..r * k + (g + 1) * group]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            if b < org {
                shrunk += 1;
            }
        }
        // apply_clip bounds every group by its threshold.
        let mut wc = w.clone();
        apply_clip(&mut wc, n, k, opts.group_size, &got).unwrap();
        for (i, v) in wc.iter().enumerate() {
            let (r, c) = (i / k, i % k);
            assert!(v.abs() <= got[r * (k / group) + c / group]);
        }
    }
    println!("{shrunk} clipped groups matched");
    assert!(shrunk > 20, "only {shrunk} groups were clipped");
}

fn mse(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64
}

#[test]
fn planted_salient_channels_get_the_largest_scales_and_beat_rtn() {
    let (rows, k, n) = (256, 256, 96);
    let salient = [17usize, 90, 161, 230];
    let mut rng = Rng(0x5eed);
    let mut x: Vec<f32> = (0..rows * k).map(|_| rng.normal()).collect();
    for r in 0..rows {
        for &c in &salient {
            x[r * k + c] *= 30.0;
        }
    }
    let w: Vec<f32> = (0..n * k).map(|_| 0.05 * rng.normal()).collect();
    let opts = AwqOptions {
        group_size: 64,
        ..AwqOptions::default()
    };
    let reference = linear(&x, rows, k, &w, n);
    let mut inspect = |ws: &[Vec<f32>]| linear(&x, rows, k, &ws[0], n);
    let found = search_scales(&x, rows, k, &[(&w, n)], &mut inspect, &opts).unwrap();

    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &b| found.scales[b].total_cmp(&found.scales[a]));
    let mut top: Vec<usize> = order[..salient.len()].to_vec();
    top.sort();
    assert_eq!(
        top, salient,
        "largest scales are not on the salient channels"
    );
    assert!(found.best_ratio > 0.0);

    // RTN on AWQ's grid: plain pseudo-quantization without scales.
    let rtn = fake_quantize(&w, n, k, &opts).unwrap();
    let rtn_err = mse(&linear(&x, rows, k, &rtn, n), &reference);
    assert!(
        (found.best_error as f64) < 0.7 * rtn_err,
        "AWQ error {} is not clearly below RTN's {rtn_err}",
        found.best_error
    );

    // The whole per-linear pipeline: fold s into W and x, clip, quantize. The output error with
    // the real quantized weight matches the search's estimate and stays below RTN.
    let mut ws = w.clone();
    scale_columns(&mut ws, n, k, &found.scales).unwrap();
    let mut xs = x.clone();
    divide_columns(&mut xs, rows, k, &found.scales).unwrap();
    let q = pseudo_quantize(&ws, n, k, &opts).unwrap();
    let awq_err = mse(&linear(&xs, rows, k, &dequantize(&q), n), &reference);
    assert!(
        (awq_err - found.best_error as f64).abs() < 0.05 * awq_err,
        "{awq_err} vs {}",
        found.best_error
    );
    let max_val = search_clip(&xs, rows, k, &ws, n, &opts).unwrap();
    apply_clip(&mut ws, n, k, opts.group_size, &max_val).unwrap();
    let qc = pseudo_quantize(&ws, n, k, &opts).unwrap();
    let clip_err = mse(&linear(&xs, rows, k, &dequantize(&qc), n), &reference);
    assert!(
        clip_err <= awq_err * 1.001,
        "clipping made it worse: {clip_err} vs {awq_err}"
    );
    println!(
        "RTN {rtn_err:.6}  AWQ scales {awq_err:.6}  + clip {clip_err:.6}  (ratio {})",
        found.best_ratio
    );
}

#[test]
fn means_and_candidates_follow_the_formulas() {
    // x_mean = mean |x|; w_mean from |w| / (group max + 1e-6) over all stacked rows.
    let x = [1.0f32, -2.0, 3.0, -4.0];
    assert_eq!(activation_mean(&x, 2, 2).unwrap(), vec![2.0, 3.0]);
    let w1 = [1.0f32, -2.0, 4.0, 4.0]; // [2, 2], group 2
    let w2 = [0.0f32, 1.0]; // [1, 2]
    let opts = AwqOptions {
        group_size: 2,
        ..AwqOptions::default()
    };
    let wm = weight_mean(&[(&w1, 2), (&w2, 1)], 2, &opts).unwrap();
    let e = |a: f32, m: f32| a / (m + 1e-6);
    let want0 = (e(1.0, 2.0) + e(4.0, 4.0) + e(0.0, 1.0)) / 3.0;
    let want1 = (e(2.0, 2.0) + e(4.0, 4.0) + e(1.0, 1.0)) / 3.0;
    assert!(
        rel(wm[0], want0) < 1e-6 && rel(wm[1], want1) < 1e-6,
        "{wm:?}"
    );
    // Ratio 0 without duo scaling: all ones. With a dead channel (x_mean 0) the floor 1e-4
    // applies before normalization by sqrt(max·min).
    assert_eq!(
        candidate_scales(&[0.5, 2.0], &[0.1, 0.1], 0.0, false),
        vec![1.0, 1.0]
    );
    let s = candidate_scales(&[0.0, 4.0], &[0.5, 0.5], 0.5, false);
    let norm = (2.0f32 * 1e-4).sqrt();
    assert_eq!(s, vec![1e-4 / norm, 2.0 / norm]);
}

#[test]
fn scale_folding_helpers() {
    let s = [2.0f32, 0.5, 4.0];
    // (x / s) · (W·s)ᵀ = x · Wᵀ
    let x = [1.0f32, 2.0, 3.0, -1.0, 0.5, 2.0];
    let w = [0.5f32, -1.0, 2.0, 1.5, 0.25, -0.75];
    let mut ws = w;
    scale_columns(&mut ws, 2, 3, &s).unwrap();
    let mut xs = x;
    divide_columns(&mut xs, 2, 3, &s).unwrap();
    let a = linear(&x, 2, 3, &w, 2);
    let b = linear(&xs, 2, 3, &ws, 2);
    assert!(a.iter().zip(&b).all(|(p, q)| (p - q).abs() < 1e-6));
    // divide_rows divides the *last* len(s) rows.
    let mut m: Vec<f32> = (0..8).map(|v| v as f32).collect(); // [4, 2]
    divide_rows(&mut m, 4, 2, &[2.0, 4.0]).unwrap();
    assert_eq!(m, vec![0.0, 1.0, 2.0, 3.0, 2.0, 2.5, 1.5, 1.75]);
    let mut v = [2.0f32, 3.0, 4.0];
    divide_vector(&mut v, &s).unwrap();
    assert_eq!(v, [1.0, 6.0, 1.0]);
    let mut g = [1.0f32, 0.0, -1.0];
    divide_offset_norm(&mut g, &s).unwrap();
    assert_eq!(g, [0.0, 1.0, -1.0]);
}

#[test]
fn bad_inputs_are_errors() {
    let opts = AwqOptions {
        group_size: 4,
        ..AwqOptions::default()
    };
    let w = vec![0.1f32; 8]; // [2, 4]
    let x = vec![1.0f32; 12]; // [3, 4]
    let mut lin = |ws: &[Vec<f32>]| linear(&x, 3, 4, &ws[0], 2);

    // pseudo_quantize / fake_quantize
    let mut bad = w.clone();
    bad[3] = f32::NAN;
    assert!(pseudo_quantize(&bad, 2, 4, &opts).is_err());
    bad[3] = f32::INFINITY;
    assert!(fake_quantize(&bad, 2, 4, &opts).is_err());
    assert!(pseudo_quantize(&w, 3, 4, &opts).is_err()); // wrong length
    assert!(pseudo_quantize(&[], 0, 4, &opts).is_err()); // empty
    let g3 = AwqOptions {
        group_size: 3,
        ..opts
    };
    assert!(pseudo_quantize(&w, 2, 4, &g3).is_err()); // group does not divide K
    for bits in [0u8, 1, 9] {
        assert!(pseudo_quantize(&w, 2, 4, &AwqOptions { bits, ..opts }).is_err());
    }
    let shrink = AwqOptions {
        max_shrink: 1.5,
        ..opts
    };
    assert!(search_clip(&x, 3, 4, &w, 2, &shrink).is_err());
    let grid0 = AwqOptions { n_grid: 0, ..opts };
    assert!(search_scales(&x, 3, 4, &[(&w, 2)], &mut lin, &grid0).is_err());

    // search_scales
    let mut xn = x.clone();
    xn[5] = f32::NAN;
    assert!(search_scales(&xn, 3, 4, &[(&w, 2)], &mut lin, &opts).is_err());
    assert!(search_scales(&x, 0, 4, &[(&w, 2)], &mut lin, &opts).is_err());
    assert!(search_scales(&x, 3, 4, &[], &mut lin, &opts).is_err());
    assert!(search_scales(&x, 3, 4, &[(&bad, 2)], &mut lin, &opts).is_err());
    assert!(search_scales(&x, 3, 4, &[(&w[..6], 2)], &mut lin, &opts).is_err());
    let mut empty = |_: &[Vec<f32>]| Vec::new();
    assert!(search_scales(&x, 3, 4, &[(&w, 2)], &mut empty, &opts).is_err());
    let mut calls = 0;
    let mut shrinking = |ws: &[Vec<f32>]| {
        calls += 1;
        vec![ws[0][0]; if calls == 1 { 4 } else { 3 }]
    };
    assert!(search_scales(&x, 3, 4, &[(&w, 2)], &mut shrinking, &opts).is_err());
    let mut first = true;
    let mut nan_after_reference = |_: &[Vec<f32>]| {
        let v = if first { 1.0 } else { f32::NAN };
        first = false;
        vec![v; 4]
    };
    assert!(search_scales(&x, 3, 4, &[(&w, 2)], &mut nan_after_reference, &opts).is_err());
    let mut nan_reference = |_: &[Vec<f32>]| vec![f32::NAN; 4];
    assert!(search_scales(&x, 3, 4, &[(&w, 2)], &mut nan_reference, &opts).is_err());

    // search_clip / apply_clip
    assert!(search_clip(&xn, 3, 4, &w, 2, &opts).is_err());
    assert!(search_clip(&x, 3, 4, &bad, 2, &opts).is_err());
    assert!(search_clip(&x, 4, 4, &w, 2, &opts).is_err());
    let mut wc = w.clone();
    assert!(apply_clip(&mut wc, 2, 4, 4, &[1.0]).is_err());
    assert!(apply_clip(&mut wc, 2, 4, 3, &[1.0, 1.0]).is_err());
    assert!(apply_clip(&mut wc, 2, 4, 4, &[1.0, f32::NAN]).is_err());

    // scale folding
    let mut wm = w.clone();
    assert!(scale_columns(&mut wm, 2, 4, &[1.0, 2.0]).is_err());
    assert!(scale_columns(&mut wm, 2, 4, &[1.0, 0.0, 1.0, 1.0]).is_err());
    assert!(divide_columns(&mut wm, 2, 4, &[1.0, 1.0, f32::INFINITY, 1.0]).is_err());
    assert!(divide_rows(&mut wm, 2, 4, &[1.0, 1.0, 1.0]).is_err());
    assert!(divide_vector(&mut [1.0, 2.0], &[1.0]).is_err());
    assert_eq!(wm, w, "a failed call must not modify its input");
}
