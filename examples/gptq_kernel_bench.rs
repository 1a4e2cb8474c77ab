//! Speed of the packed GPTQ kernel (`kernels::gptq::GptqMatrix`) against dense f32 / f16 weights.
//!
//! `cargo run --release --example gptq_kernel_bench [-- --quick]`
//!
//! For each shape `[N=out, K=in]` it times, as the minimum over repetitions (the machine is
//! shared, so the minimum is the least noisy estimate):
//! * decode, m = 1, single thread (`forward_rows` over all rows) and all threads (`forward`);
//!   GB/s are bytes actually held / time, "f32-eq" is N·K·4 bytes / time; "new x" is the single
//!   thread time when every call gets a different input (the packed kernel caches its prepared
//!   input per thread, which the plain column reuses);
//! * m = 4 (batched decoding), single thread;
//! * prefill, m = 512 (`forward`, the GEMM path).
//!
//! At the end it combines the decode times into SmolLM2-135M-shaped tokens/s (30 layers of
//! q,o 576×576, k,v 192×576, gate,up 1536×576, down 576×1536, plus a 49152×576 lm_head), linears only.

use autoquant::kernels::gptq::GptqMatrix;
use autoquant::kernels::{DenseMatrix, LinearKernel};
use autoquant::qtypes::grid::QuantizedLinear;
use autoquant::qtypes::{Bits, GroupSize};
use autoquant::tensor::WeightDType;
use std::time::{Duration, Instant};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn quantized(
    bits: u8,
    n: usize,
    k: usize,
    group: Option<usize>,
    act_order: bool,
) -> QuantizedLinear {
    let mut rng = Rng(bits as u64 * 7919 + n as u64 * 31 + k as u64);
    let gs = group.unwrap_or(k);
    let g_count = k.div_ceil(gs);
    let levels = 1u64 << bits;
    let g_idx = if act_order {
        let mut perm: Vec<usize> = (0..k).collect();
        for i in (1..k).rev() {
            perm.swap(i, (rng.next() % (i as u64 + 1)) as usize);
        }
        let mut g = vec![0u32; k];
        for (i, &c) in perm.iter().enumerate() {
            g[c] = (i / gs) as u32;
        }
        g
    } else {
        (0..k).map(|i| (i / gs) as u32).collect()
    };
    QuantizedLinear {
        bits: Bits::new(bits).unwrap(),
        group_size: GroupSize::from_size(group),
        n,
        k,
        codes: (0..n * k).map(|_| (rng.next() % levels) as u8).collect(),
        scales: (0..g_count * n)
            .map(|_| 0.01 + 0.005 * rng.unit())
            .collect(),
        zeros: (0..g_count * n).map(|_| (levels / 2) as u32).collect(),
        g_idx,
    }
}

/// Minimum time of `f` over at least `min_reps` runs and about `budget` of wall time.
fn time_min(budget: Duration, min_reps: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm up (caches, thread pool, scratch buffers)
    let start = Instant::now();
    let mut best = f64::INFINITY;
    let mut reps = 0;
    while reps < min_reps || start.elapsed() < budget {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        reps += 1;
        if reps > 100_000 {
            break;
        }
    }
    best
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let budget = Duration::from_millis(if quick { 150 } else { 600 });
    let shapes = [(576usize, 576usize), (1536, 576), (576, 1536), (49152, 576)];
    let kinds: Vec<(&str, u8, Option<usize>, bool)> = vec![
        ("gptq 4-bit g128", 4, Some(128), false),
        ("gptq 4-bit g128 act", 4, Some(128), true),
        ("gptq 4-bit g32", 4, Some(32), false),
        ("gptq 4-bit per-ch", 4, None, false),
        ("gptq 8-bit g128", 8, Some(128), false),
        ("gptq 3-bit g128", 3, Some(128), false),
        ("gptq 2-bit g128", 2, Some(128), false),
    ];
    println!(
        "threads: {}; times are the minimum over repetitions",
        rayon::current_num_threads()
    );
    // decode time (all threads) per shape and kind, for the tokens/s estimate
    let mut decode: Vec<Vec<(String, f64)>> = Vec::new();
    for &(n, k) in &shapes {
        println!("\n== N={n} (out) × K={k} (in) ==");
        println!(
            "{:<22} {:>7} | {:>9} {:>6} {:>6} {:>6} {:>9} | {:>9} {:>6} | {:>9} {:>6} | {:>8} {:>6}",
            "kernel", "MB", "m=1 1thr", "GB/s", "f32-eq", "×f32", "new x", "m=1 all", "×f32",
            "m=4 1thr", "×f32", "m=512", "×f32"
        );
        let q4 = quantized(4, n, k, Some(128), false);
        let w = q4.dequantize();
        let mut mats: Vec<(String, Box<dyn LinearKernel>)> = vec![
            (
                "dense f32".into(),
                Box::new(DenseMatrix::new(n, k, w.clone(), WeightDType::F32)),
            ),
            (
                "dense f16".into(),
                Box::new(DenseMatrix::new(n, k, w, WeightDType::F16)),
            ),
        ];
        for &(name, bits, group, act) in &kinds {
            let q = quantized(bits, n, k, group, act);
            mats.push((
                name.into(),
                Box::new(GptqMatrix::from_quantized(&q).unwrap()),
            ));
        }
        let x1: Vec<f32> = {
            let mut r = Rng(5);
            (0..k).map(|_| r.unit()).collect()
        };
        let x2: Vec<f32> = x1.iter().map(|v| -v).collect();
        let xb: Vec<f32> = {
            let mut r = Rng(6);
            (0..512 * k).map(|_| r.unit()).collect()
        };
        let mut out1 = vec![0f32; n];
        let x4 = xb[..4 * k].to_vec();
        let mut out4 = vec![0f32; 4 * n];
        let mut outb = vec![0f32; 512 * n];
        let mut base = (0.0, 0.0, 0.0, 0.0);
        let mut row = Vec::new();
        for (i, (name, mat)) in mats.iter().enumerate() {
            let t1 = time_min(budget, 5, || mat.forward_rows(&x1, 1, 0..n, &mut out1));
            // A different input on every call (as between decoding steps): includes preparing it.
            let mut flip = false;
            let tn = time_min(budget, 5, || {
                flip = !flip;
                let x = if flip { &x1 } else { &x2 };
                mat.forward_rows(x, 1, 0..n, &mut out1)
            });
            let tp = time_min(budget, 5, || mat.forward(&x1, 1, &mut out1));
            let t4 = time_min(budget, 5, || mat.forward_rows(&x4, 4, 0..n, &mut out4));
            let big = !quick || n * k <= 1536 * 576;
            let tb = if big && (i == 0 || name.contains("g128") && !name.contains("act") || !quick)
            {
                time_min(budget, 3, || mat.forward(&xb, 512, &mut outb))
            } else {
                f64::NAN
            };
            if i == 0 {
                base = (t1, tp, tb, t4);
            }
            let bytes = mat.storage_bytes() as f64;
            println!(
                "{:<22} {:>7.2} | {:>7.1}µs {:>6.1} {:>6.1} {:>6.2} {:>7.1}µs | {:>7.1}µs {:>6.2} | {:>7.1}µs {:>6.2} | {:>6.2}ms {:>6.2}",
                name,
                bytes / 1e6,
                t1 * 1e6,
                bytes / t1 / 1e9,
                (n * k * 4) as f64 / t1 / 1e9,
                base.0 / t1,
                tn * 1e6,
                tp * 1e6,
                base.1 / tp,
                t4 * 1e6,
                base.3 / t4,
                tb * 1e3,
                base.2 / tb,
            );
            row.push((name.clone(), tp));
        }
        decode.push(row);
    }
    // SmolLM2-135M-shaped decode: k,v (192×576) taken as a third of 576×576.
    println!("\n== SmolLM2-135M-shaped decode, linears only (m=1, all threads) ==");
    for (j, (name, _)) in decode[0].iter().enumerate() {
        let t = |s: usize| decode[s][j].1;
        let per_token = 30.0 * (t(0) * (2.0 + 2.0 / 3.0) + 2.0 * t(1) + t(2)) + t(3);
        println!(
            "{name:<22} {:>8.2} ms/token  {:>7.1} tok/s",
            per_token * 1e3,
            1.0 / per_token
        );
    }
}
