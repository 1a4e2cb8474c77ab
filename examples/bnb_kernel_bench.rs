//! Speed of the NF4 kernels (`kernels::bnb::FourBitMatrix`, each `FourBitDecode`) against dense
//! f32 rows.
//!
//! `cargo run --release --example bnb_kernel_bench`
//!
//! Single thread, one input row (decoding), minimum over repetitions (the least noisy estimate
//! on a shared machine), for the SmolLM2-135M layer shapes; "ns/kw" is nanoseconds per 1000
//! weights. Then it combines them into SmolLM2-shaped tokens/s (linears only, lm_head
//! excluded since bitsandbytes keeps it dense), and times the 49152 × 576 output projection
//! itself in f16 against `--lm-head-int8` (LLM.int8 weights, 28 MB: repeated, part of it stays in
//! a 32 MB L3, so this reads faster than decoding does, where 88 MB stream past per token).

use autoquant::kernels::bnb::{FourBitDecode, FourBitMatrix, Int8Matrix};
use autoquant::kernels::{DenseMatrix, LinearKernel};
use autoquant::qtypes::bnb::{
    quantize_4bit, quantize_int8, FourBitType, Int8Compute, DEFAULT_INT8_THRESHOLD,
};
use autoquant::tensor::WeightDType;
use std::time::{Duration, Instant};

fn weights(n: usize, k: usize) -> Vec<f32> {
    let mut s = (n * 31 + k) as u64;
    (0..n * k)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect()
}

fn best(reps: usize, mut f: impl FnMut()) -> Duration {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap()
}

fn main() {
    // (out, in, occurrences per token in SmolLM2-135M)
    let shapes = [
        (576, 576, 60),
        (192, 576, 60),
        (1536, 576, 60),
        (576, 1536, 30),
    ];
    let decodes = [
        ("exact", FourBitDecode::Exact),
        ("int16", FourBitDecode::Int16),
        ("int8", FourBitDecode::Int8),
    ];
    let mut totals = [0f64; 3];
    let mut t_f32 = 0.0;
    println!(
        "shape          exact µs  int16 µs  int8 µs  f32 µs   ns/kw: exact  int16  int8   f32"
    );
    for (n, k, count) in shapes {
        let w = weights(n, k);
        let q = quantize_4bit(&w, [n, k], WeightDType::F32, FourBitType::Nf4, 64, false).unwrap();
        let dense = DenseMatrix::new(n, k, w, WeightDType::F32);
        let x: Vec<f32> = (0..k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0).collect();
        let mut out = vec![0f32; n];
        let reps = 2000;
        let times: Vec<f64> = decodes
            .iter()
            .map(|&(_, decode)| {
                let m = FourBitMatrix::new(q.clone(), WeightDType::F32)
                    .unwrap()
                    .with_decode(decode);
                best(reps, || m.forward_rows(&x, 1, 0..n, &mut out)).as_secs_f64()
            })
            .collect();
        let f = best(reps, || dense.forward_rows(&x, 1, 0..n, &mut out)).as_secs_f64();
        let kw = (n * k) as f64 / 1e3;
        println!(
            "{n:>5}x{k:<5}  {:>8.1} {:>9.1} {:>8.1} {:>7.1} {:>13.1} {:>6.1} {:>5.1} {:>5.1}",
            times[0] * 1e6,
            times[1] * 1e6,
            times[2] * 1e6,
            f * 1e6,
            times[0] * 1e9 / kw,
            times[1] * 1e9 / kw,
            times[2] * 1e9 / kw,
            f * 1e9 / kw,
        );
        for (t, v) in totals.iter_mut().zip(&times) {
            *t += v * count as f64;
        }
        t_f32 += f * count as f64;
    }
    let per_decode: Vec<String> = decodes
        .iter()
        .zip(&totals)
        .map(|((name, _), t)| format!("nf4 {name} {:.0}", 1.0 / t))
        .collect();
    println!(
        "SmolLM2-shaped decode, linears only, 1 thread, tok/s: {}, f32 {:.0}",
        per_decode.join(", "),
        1.0 / t_f32
    );

    let (n, k) = (49152, 576);
    let w = weights(n, k);
    let int8 = Int8Matrix::new(
        quantize_int8(&w, n, k).unwrap(),
        DEFAULT_INT8_THRESHOLD,
        Int8Compute::Int8Matmul,
    )
    .unwrap();
    let f16 = DenseMatrix::new(n, k, w, WeightDType::F16);
    let x: Vec<f32> = (0..k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0).collect();
    let mut out = vec![0f32; n];
    let a = best(20, || int8.forward_rows(&x, 1, 0..n, &mut out)).as_secs_f64();
    let b = best(20, || f16.forward_rows(&x, 1, 0..n, &mut out)).as_secs_f64();
    println!(
        "lm_head {n}x{k}, 1 thread: int8 {:.2} ms, f16 {:.2} ms (f16/int8 {:.2})",
        a * 1e3,
        b * 1e3,
        b / a
    );
}
