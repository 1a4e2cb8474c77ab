//! Dense f32 compute kernels: matrix multiply against `[out, in]` weights, dot products, and the
//! element-wise pieces of a decoder. Packed low-bit kernels live beside these, apart from the
//! quantization algorithms.

pub mod bnb;
pub mod gptq;
pub mod linear;

pub use linear::{forward_rows_parallel, DenseMatrix, LinearKernel};

use gemm::Parallelism;
use half::{bf16, f16};
use rayon::prelude::*;

/// Below this many activation rows a matrix-vector loop beats a GEMM (which packs its inputs).
pub const GEMV_MAX_ROWS: usize = 4;

/// How far ahead of the bytes being read the decoding kernels ask for weights. Decoding streams
/// every weight once per token, and on this machine's Zen 3 the hardware prefetcher alone keeps
/// a single thread at ~4 GB/s of its ~10; asking for the lines ~2 KB ahead lifted 4-bit
/// decoding by ~30% (measured with `--bnb-4bit-decode int16`, 1 and 2 threads; 1–4 KB all
/// helped, 2 KB most).
pub(crate) const PREFETCH_AHEAD: usize = 2048;

/// Ask the CPU to bring the cache line holding `p` into L1. Only a hint: it never faults, so
/// `p` may lie past the end of its buffer (it is formed with `wrapping_add`, never dereferenced).
#[inline(always)]
pub(crate) fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht0` reads nothing architecturally and cannot fault on any address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Dot product written with independent lane accumulators so LLVM emits wide FMA code.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    const L: usize = 32;
    let mut acc = [0f32; L];
    let (ca, ta) = a.split_at(a.len() / L * L);
    let (cb, tb) = b.split_at(ca.len());
    for (xa, xb) in ca.chunks_exact(L).zip(cb.chunks_exact(L)) {
        for l in 0..L {
            acc[l] = xa[l].mul_add(xb[l], acc[l]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ta.iter().zip(tb) {
        s += x * y;
    }
    s
}

/// `y += a * x`
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = a.mul_add(*xi, *yi);
    }
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ` for row-major f32 `w` (the PyTorch Linear layout), as a
/// parallel GEMM. For a few rows (decoding) `nn` uses the row-block [`gemv_block`] instead.
pub fn matmul_nt(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    assert_eq!(out.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    // SAFETY: the slices have the asserted lengths and the strides below stay inside them.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::Rayon(0),
        );
    }
}

/// `out[m, rows] = x[m, k] · w[rows, k]ᵀ` for a block of weight rows, single threaded.
pub fn gemv_block(x: &[f32], m: usize, k: usize, w: &[f32], out: &mut [f32]) {
    let rows = w.len() / k;
    for (j, wrow) in w.chunks_exact(k).enumerate() {
        for r in 0..m {
            out[r * rows + j] = dot(&x[r * k..(r + 1) * k], wrow);
        }
    }
}

/// [`gemv_block`] for 16-bit weights, widened a row at a time.
pub fn gemv_block_half<T: HalfFloat>(x: &[f32], m: usize, k: usize, w: &[T], out: &mut [f32]) {
    let rows = w.len() / k;
    let mut buf = vec![0f32; k];
    for (j, wrow) in w.chunks_exact(k).enumerate() {
        T::convert_slice(wrow, &mut buf);
        for r in 0..m {
            out[r * rows + j] = dot(&x[r * k..(r + 1) * k], &buf);
        }
    }
}

/// A half-precision weight element that converts to f32.
pub trait HalfFloat: Copy + Send + Sync + 'static {
    fn convert_slice(src: &[Self], dst: &mut [f32]);
}
impl HalfFloat for f16 {
    fn convert_slice(src: &[Self], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst);
    }
}
impl HalfFloat for bf16 {
    fn convert_slice(src: &[Self], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst);
    }
}

/// `out = x · wᵀ` for 16-bit weights: rows are widened to f32 in cache-sized blocks, so the
/// weights stay 16-bit in memory while the arithmetic is f32. For a few rows `nn` uses
/// [`gemv_block_half`] instead.
pub fn matmul_nt_half<T: HalfFloat>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[T],
    n: usize,
    out: &mut [f32],
) {
    assert_eq!(w.len(), n * k);
    assert_eq!(out.len(), m * n);
    const BLOCK: usize = 64;
    let nblocks = n.div_ceil(BLOCK);
    let parts: Vec<(usize, Vec<f32>)> = (0..nblocks)
        .into_par_iter()
        .map(|b| {
            let j0 = b * BLOCK;
            let j1 = (j0 + BLOCK).min(n);
            let rows = j1 - j0;
            let mut wf = vec![0f32; rows * k];
            T::convert_slice(&w[j0 * k..j1 * k], &mut wf);
            let mut local = vec![0f32; m * rows];
            gemm_serial(m, rows, k, x, k, 1, &wf, 1, k, &mut local);
            (j0, local)
        })
        .collect();
    for (j0, local) in parts {
        let width = local.len() / m;
        for r in 0..m {
            out[r * n + j0..r * n + j0 + width].copy_from_slice(&local[r * width..(r + 1) * width]);
        }
    }
}

/// e^x for f32 with ~2 ulp error, written branch-free so loops over it vectorize (libm's
/// `expf` is a scalar call and dominated attention and SiLU time). Range reduction
/// x = k·ln2 + r, |r| ≤ ln2/2, then a degree-6 polynomial for e^r and 2^k via the exponent bits.
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let k = (x * LOG2E + ROUND) - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((k as i32 + 127) as u32) << 23)
}

/// Numerically stable in-place softmax.
pub fn softmax(v: &mut [f32]) {
    let max = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        // Every position masked: transformers' SDPA yields zeros for such rows.
        v.fill(0.0);
        return;
    }
    let mut sum = 0.0;
    for x in v.iter_mut() {
        // Masked entries (-inf) must give exactly 0, which the clamp in exp_fast would not.
        *x = if *x == f32::NEG_INFINITY {
            0.0
        } else {
            exp_fast(*x - max)
        };
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in v.iter_mut() {
        *x *= inv;
    }
}

/// log Σ exp(v), stable.
pub fn logsumexp(v: &[f32]) -> f64 {
    let max = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    // exp in f32 (vectorized), sums of 64-element chunks in f32, the total in f64.
    let s: f64 = v
        .chunks(64)
        .map(|c| c.iter().map(|&x| exp_fast(x - max)).sum::<f32>() as f64)
        .sum();
    max as f64 + s.ln()
}

#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp_fast(-x))
}

pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x / std::f32::consts::SQRT_2))
}

pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
}

/// erf with ~1e-7 absolute error (Abramowitz-Stegun 7.1.26 is too coarse for golden tests;
/// this uses the f64 libm-free series/continued-fraction split).
pub fn erf(x: f32) -> f32 {
    erf_f64(x as f64) as f32
}

fn erf_f64(x: f64) -> f64 {
    // W. J. Cody's rational approximations would be longer; a Taylor series for small |x|
    // and the complementary continued fraction for large |x| are accurate to f32 precision.
    let ax = x.abs();
    let r = if ax < 2.5 {
        let mut sum = ax;
        let mut term = ax;
        let x2 = ax * ax;
        let mut n = 0.0;
        loop {
            n += 1.0;
            term *= -x2 / n;
            let add = term / (2.0 * n + 1.0);
            sum += add;
            if add.abs() <= 1e-17 * sum.abs() || n > 200.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc via continued fraction (Lentz), converges fast for ax >= 2.5.
        let x2 = ax * ax;
        let mut f = ax;
        let mut c = ax;
        let mut d = 0.0;
        for i in 1..60 {
            let a = i as f64 * 0.5;
            d = ax + a * d;
            d = if d == 0.0 { 1e-300 } else { 1.0 / d };
            c = ax + a / c;
            let delta = c * d;
            f *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        1.0 - (-x2).exp() / (f * std::f64::consts::PI.sqrt())
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut o = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                o[i * n + j] = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum::<f64>() as f32;
            }
        }
        o
    }

    #[test]
    fn matmul_matches_naive_for_gemv_and_gemm_paths() {
        for &(m, k, n) in &[(1, 67, 130), (3, 64, 65), (9, 100, 33), (17, 1, 5)] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
                .collect();
            let mut out = vec![0f32; m * n];
            matmul_nt(&x, m, k, &w, n, &mut out);
            let want = naive(&x, m, k, &w, n);
            for (a, b) in out.iter().zip(&want) {
                assert!(
                    (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                    "{m}x{k}x{n}: {a} vs {b}"
                );
            }
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let wback: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
            matmul_nt_half(&x, m, k, &wh, n, &mut out);
            let want = naive(&x, m, k, &wback, n);
            for (a, b) in out.iter().zip(&want) {
                assert!(
                    (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                    "f16 {m}x{k}x{n}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn exp_fast_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let rel = ((exp_fast(x) as f64) - (x as f64).exp()).abs() / (x as f64).exp();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 5e-7, "max relative error {worst}");
    }

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_9),
            (1.0, 0.842_700_8),
            (2.0, 0.995_322_3),
            (3.0, 0.999_977_9),
            (-1.5, -0.966_105_1),
        ] {
            assert!(
                (erf(x) - want).abs() < 1e-6,
                "erf({x}) = {} want {want}",
                erf(x)
            );
        }
    }
}

/// Single-threaded `out[m, n] = a[m, k] · b[k, n]` with explicit row/column strides, for use
/// inside already-parallel loops (per attention head).
#[allow(clippy::too_many_arguments)]
pub fn gemm_serial(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    out: &mut [f32],
) {
    assert!(out.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out[..m * n].fill(0.0);
        return;
    }
    assert!(a.len() > (m - 1) * a_rs + (k - 1) * a_cs);
    assert!(b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    // SAFETY: the asserts above bound every index the strides can reach.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// Whether the AVX-512 kernels (F + BW) can run on this CPU.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
}

/// Whether the AVX2 kernels (AVX2 + FMA + F16C) can run; they are used where AVX-512 is missing
/// (e.g. AMD before Zen 4).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}
