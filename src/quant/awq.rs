//! AWQ (activation-aware weight quantization) as AutoAWQ 0.2.7 implements it
//! (`awq/quantize/quantizer.py`, `awq/quantize/scale.py`; docs/formats.md §2.7): the per-channel
//! scale search, the clip search and the pseudo-quantizer, as pure functions over f32 slices.
//!
//! Layouts: weights are `[n_out, k_in]` row-major (the PyTorch `Linear` layout), activations
//! `[rows, k_in]`. Nothing here knows about models: the scale search takes a closure that runs
//! "the module whose output is compared" (AutoAWQ's `module2inspect`) with candidate weights, and
//! the layer-streaming driver decides which linears form a group and where the scales are folded.
//!
//! Numerics follow AutoAWQ running in f32, element for element, so the golden test can demand
//! identical codes and the same chosen ratio; the final quantization of each layer runs in
//! half precision as AutoAWQ's `_apply_quant` does ([`pseudo_quantize_half`]). Where we differ,
//! on purpose:
//!
//! * `x_mean`, `w_mean`, the losses and the clip errors are accumulated in f64 (AutoAWQ: f32
//!   reductions, chunked only to bound GPU memory, which does not change what is computed).
//!   Results are rounded back to f32 where AutoAWQ keeps f32.
//! * `pow` with a non-special exponent is an f64 `powf` rounded to f32 (torch: SLEEF `powf`,
//!   1 ulp); exponents 0, 1, 0.5 and 2 take torch's exact shortcuts.
//! * The clip error is computed as `x·(Q(w) − w)` instead of `x·Q(w) − x·w` (less cancellation;
//!   identical quantized weights still give identical errors, so ties resolve the same way).
//! * `group_size = 0` means one group per row (AutoAWQ's `-1`); AutoAWQ's scale search cannot
//!   run with `-1` at all (`view(-1, -1)`), here it uses the whole row as the group.
//! * AutoAWQ on the CPU has an aliasing bug in the scale search (the saved state dict shares
//!   storage with the weights it then scales in place, so every ratio after the first is
//!   evaluated on `W·s₀·s`); we follow the algorithm as it runs on a GPU.

use crate::error::{Error, Result};
use crate::kernels::gemm_serial;
use crate::qtypes::grid::QuantizedLinear;
use crate::qtypes::{Bits, GroupSize};
use rayon::prelude::*;

/// Options of the AWQ search and quantizer. `Default` is AutoAWQ's default
/// (`w_bit=4, q_group_size=128, zero_point=True`, `duo_scaling=True`, `n_grid=20`,
/// `apply_clip=True`, clip `max_shrink=0.5`, `n_grid=20`, `n_sample_token=512`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AwqOptions {
    /// Bits per code, 2…8 (AWQ checkpoints store 4).
    pub bits: u8,
    /// Input channels per group; 0 = one group per row (AutoAWQ's `-1`). Must divide K.
    pub group_size: usize,
    /// Asymmetric min/max grid with an integer zero point (AutoAWQ default); `false` is the
    /// symmetric `[-2^(b-1), 2^(b-1)-1]` grid, which AWQ checkpoints cannot store.
    pub zero_point: bool,
    /// Scale-search grid: ratios `r / n_grid` for `r = 0 … n_grid − 1`.
    pub n_grid: usize,
    /// `s = x_mean^r / w_mean^(1−r)` (AutoAWQ) instead of `s = x_mean^r` (llm-awq).
    pub duo_scaling: bool,
    /// Run the clipping search before rounding (AutoAWQ's `apply_clip`). The layer-streaming
    /// driver reads it; [`search_clip`] itself always searches.
    pub apply_clip: bool,
    /// Clip search tries shrink factors `1 − i/clip_grid` for `i < max_shrink·clip_grid`.
    pub max_shrink: f32,
    pub clip_grid: usize,
    /// Tokens are subsampled with step `max(1, rows / clip_sample_tokens)` for the clip search.
    pub clip_sample_tokens: usize,
}

impl Default for AwqOptions {
    fn default() -> Self {
        AwqOptions {
            bits: 4,
            group_size: 128,
            zero_point: true,
            n_grid: 20,
            duo_scaling: true,
            apply_clip: true,
            max_shrink: 0.5,
            clip_grid: 20,
            clip_sample_tokens: 512,
        }
    }
}

impl AwqOptions {
    /// Refuse options the algorithm cannot run with.
    pub fn validate(&self) -> Result<()> {
        if !(2..=8).contains(&self.bits) {
            return Err(Error::InvalidArgument(format!(
                "AWQ: unsupported bit width {}; expected 2 to 8 (checkpoints store 4)",
                self.bits
            )));
        }
        if self.n_grid == 0 || self.clip_grid == 0 || self.clip_sample_tokens == 0 {
            return Err(Error::InvalidArgument(
                "AWQ: n_grid, clip_grid and clip_sample_tokens must be positive".into(),
            ));
        }
        if !(self.max_shrink.is_finite() && (0.0..1.0).contains(&self.max_shrink)) {
            return Err(Error::InvalidArgument(format!(
                "AWQ: max_shrink must lie in [0, 1), got {}",
                self.max_shrink
            )));
        }
        Ok(())
    }

    /// The group length for rows of `k` values (checks that it divides `k`).
    pub fn group_len(&self, k: usize) -> Result<usize> {
        let g = if self.group_size == 0 {
            k
        } else {
            self.group_size
        };
        if k == 0 || !k.is_multiple_of(g) {
            return Err(Error::InvalidArgument(format!(
                "AWQ: group size {g} does not divide in_features K={k}"
            )));
        }
        Ok(g)
    }

    /// Number of clip candidates, `int(max_shrink · n_grid)` as Python computes it.
    fn clip_candidates(&self) -> usize {
        (self.max_shrink as f64 * self.clip_grid as f64) as usize
    }
}

// ------------------------------------------------------------------------------------------
// Pseudo-quantizer (AutoAWQ `pseudo_quantize_tensor`)

/// Grid of one group: `(scale, zero)`. Asymmetric: `scale = max(max − min, 1e-5) / (2^b − 1)`,
/// `zero = clamp(−round(min / scale), 0, 2^b − 1)`; the range is not forced to contain 0.
/// Symmetric: `scale = max(max|w|, 1e-5) / (2^(b−1) − 1)` and the returned zero is the code
/// offset `2^(b−1)` under which codes are stored.
#[inline]
fn group_grid(v: &[f32], bits: u8, zero_point: bool) -> (f32, f32) {
    if zero_point {
        let (mut hi, mut lo) = (f32::NEG_INFINITY, f32::INFINITY);
        for &x in v {
            hi = hi.max(x);
            lo = lo.min(x);
        }
        let max_int = ((1u32 << bits) - 1) as f32;
        let range = hi - lo;
        let scale = if range < 1e-5 { 1e-5 } else { range } / max_int;
        let zero = (-(lo / scale).round_ties_even()).clamp(0.0, max_int);
        (scale, zero)
    } else {
        let mut m = 0f32;
        for &x in v {
            m = m.max(x.abs());
        }
        let m = if m < 1e-5 { 1e-5 } else { m };
        let half = (1u32 << (bits - 1)) as f32;
        (m / (half - 1.0), half)
    }
}

/// Signed integer level of `x` on the grid: asymmetric `clamp(round(x/s) + z, 0, 2^b−1) − z`,
/// symmetric `clamp(round(x/s), −2^(b−1), 2^(b−1)−1)`. The fake-quantized value is `level · s`,
/// exactly as AutoAWQ evaluates `(q − z) · s`.
#[inline]
fn level(x: f32, scale: f32, zero: f32, bits: u8, zero_point: bool) -> f32 {
    if zero_point {
        let max_int = ((1u32 << bits) - 1) as f32;
        ((x / scale).round_ties_even() + zero).clamp(0.0, max_int) - zero
    } else {
        let half = (1u32 << (bits - 1)) as f32;
        (x / scale).round_ties_even().clamp(-half, half - 1.0)
    }
}

/// `x` rounded to f16 and back: one operation of AutoAWQ's half-precision arithmetic (torch
/// computes each elementwise f16 operation in f32 and rounds the result to f16).
#[inline]
fn h(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// [`group_grid`] in half precision, every operation rounded to f16 as AutoAWQ's
/// `pseudo_quantize_tensor` computes on the f16 layer in `_apply_quant`: asymmetric
/// `scale = h(h(max − min).max(1e-5) / (2^b − 1))`, `zero = clamp(−round(h(min / scale)))`.
/// `v` must hold f16 values.
#[inline]
fn group_grid_half(v: &[f32], bits: u8, zero_point: bool) -> (f32, f32) {
    // The clamp's bound as the f16 comparison sees it (no f16 value lies in [1e-5, h(1e-5))).
    let floor = h(1e-5);
    if zero_point {
        let (mut hi, mut lo) = (f32::NEG_INFINITY, f32::INFINITY);
        for &x in v {
            hi = hi.max(x);
            lo = lo.min(x);
        }
        let max_int = ((1u32 << bits) - 1) as f32;
        let scale = h(h(hi - lo).max(floor) / max_int);
        let zero = (-h(lo / scale).round_ties_even()).clamp(0.0, max_int);
        (scale, zero)
    } else {
        let m = v.iter().fold(0f32, |m, x| m.max(x.abs())).max(floor);
        let half = (1u32 << (bits - 1)) as f32;
        (h(m / (half - 1.0)), half)
    }
}

/// Fake-quantize one row in place, group by group.
#[inline]
fn fake_quant_row(row: &mut [f32], group: usize, bits: u8, zero_point: bool) {
    for g in row.chunks_exact_mut(group) {
        let (scale, zero) = group_grid(g, bits, zero_point);
        for x in g.iter_mut() {
            *x = level(*x, scale, zero, bits, zero_point) * scale;
        }
    }
}

/// Check a weight or activation matrix: right length, not empty, only finite values.
fn check_matrix(what: &str, v: &[f32], rows: usize, cols: usize) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Err(Error::InvalidArgument(format!(
            "AWQ: {what} is empty ([{rows}, {cols}])"
        )));
    }
    if v.len() != rows * cols {
        return Err(Error::InvalidArgument(format!(
            "AWQ: {what} has {} values but its shape [{rows}, {cols}] needs {}",
            v.len(),
            rows * cols
        )));
    }
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "AWQ: {what} holds a non-finite value {} at row {}, column {} of [{rows}, {cols}]",
            v[i],
            i / cols,
            i % cols
        )));
    }
    Ok(())
}

/// Quantize `w` (`[n, k]`) on AutoAWQ's grid. Codes, scales and zeros satisfy
/// `W ≈ scales · (codes − zeros)` (the [`QuantizedLinear`] convention, `scales`/`zeros` stored
/// `[G, N]`); symmetric grids store `code = level + 2^(b−1)` with zero `2^(b−1)`.
/// [`QuantizedLinear::dequantize`] reproduces AutoAWQ's fake-quantized weight bit for bit.
pub fn pseudo_quantize(
    w: &[f32],
    n: usize,
    k: usize,
    opts: &AwqOptions,
) -> Result<QuantizedLinear> {
    let (bits, zp) = (opts.bits, opts.zero_point);
    quantize_by_group(w, n, k, opts, |wg, cg| {
        let (scale, zero) = group_grid(wg, bits, zp);
        // `level + zero` is an integer in 0..=2^b−1 in both variants.
        for (c, &x) in cg.iter_mut().zip(wg) {
            *c = (level(x, scale, zero, bits, zp) + zero) as u8;
        }
        (scale, zero as u32)
    })
}

/// The frame both quantizers share: checks, then `group(weights, codes) -> (scale, zero)` for
/// every group of every row in parallel, then the parameters transposed to `[G, N]`.
fn quantize_by_group(
    w: &[f32],
    n: usize,
    k: usize,
    opts: &AwqOptions,
    group_fn: impl Fn(&[f32], &mut [u8]) -> (f32, u32) + Sync,
) -> Result<QuantizedLinear> {
    opts.validate()?;
    check_matrix("weight", w, n, k)?;
    let group = opts.group_len(k)?;
    let groups = k / group;
    // Per row: codes, then (scale, zero) per group.
    let mut codes = vec![0u8; n * k];
    let mut params = vec![(0f32, 0u32); n * groups];
    codes
        .par_chunks_mut(k)
        .zip(params.par_chunks_mut(groups))
        .zip(w.par_chunks(k))
        .for_each(|((crow, prow), wrow)| {
            for ((cg, wg), p) in crow
                .chunks_exact_mut(group)
                .zip(wrow.chunks_exact(group))
                .zip(prow.iter_mut())
            {
                *p = group_fn(wg, cg);
            }
        });
    let mut scales = vec![0f32; groups * n];
    let mut zeros = vec![0u32; groups * n];
    for row in 0..n {
        for g in 0..groups {
            let (s, z) = params[row * groups + g];
            scales[g * n + row] = s;
            zeros[g * n + row] = z;
        }
    }
    Ok(QuantizedLinear {
        bits: Bits::new(opts.bits)?,
        group_size: GroupSize::from_size((opts.group_size != 0).then_some(group)),
        n,
        k,
        codes,
        scales,
        zeros,
        g_idx: (0..k).map(|c| (c / group) as u32).collect(),
    })
}

/// AutoAWQ's final quantization of a layer (`_apply_quant`): the weight is cast to f16 and
/// `pseudo_quantize_tensor` runs in half precision, so besides the rounding of `w` to f16,
/// the range, the scale, `min / scale` and `w / scale` are each rounded to f16 before the
/// next step (f32 arithmetic on the f16 weights would give another scale for about a quarter
/// of the groups: `h(h(max − min) / 15)` ≠ `h((max − min) / 15)`). `w` is f32; scales are f16
/// values. The search ([`search_scales`], [`search_clip`]) runs in the model's dtype instead,
/// f32 here, as AutoAWQ on an f32 model.
pub fn pseudo_quantize_half(
    w: &[f32],
    n: usize,
    k: usize,
    opts: &AwqOptions,
) -> Result<QuantizedLinear> {
    opts.validate()?; // before the shifts below
    let (bits, zp) = (opts.bits, opts.zero_point);
    let (lo_level, hi_level) = if zp {
        (0.0, ((1u32 << bits) - 1) as f32)
    } else {
        let half = (1u32 << (bits - 1)) as f32;
        (-half, half - 1.0)
    };
    quantize_by_group(w, n, k, opts, |wg, cg| {
        let g16: Vec<f32> = wg.iter().map(|&x| h(x)).collect();
        let (scale, zero) = group_grid_half(&g16, bits, zp);
        for (c, &x) in cg.iter_mut().zip(&g16) {
            // Asymmetric: clamp(round(x/s) + z); symmetric: clamp(round(x/s)) + 2^(b−1).
            let q = h(x / scale).round_ties_even();
            *c = if zp {
                (q + zero).clamp(lo_level, hi_level) as u8
            } else {
                (q.clamp(lo_level, hi_level) + zero) as u8
            };
        }
        (scale, zero as u32)
    })
}

/// The fake-quantized weight `(q − z)·s` (what AutoAWQ's `pseudo_quantize_tensor` returns
/// first), `[n, k]`.
pub fn fake_quantize(w: &[f32], n: usize, k: usize, opts: &AwqOptions) -> Result<Vec<f32>> {
    opts.validate()?;
    check_matrix("weight", w, n, k)?;
    let group = opts.group_len(k)?;
    let mut out = w.to_vec();
    out.par_chunks_mut(k)
        .for_each(|row| fake_quant_row(row, group, opts.bits, opts.zero_point));
    Ok(out)
}

/// `W[n, k] = scales[g, n] · (codes[n, k] − zeros[g, n])`, `[n, k]` row-major (in parallel).
pub fn dequantize(q: &QuantizedLinear) -> Vec<f32> {
    let (n, k) = (q.n, q.k);
    let mut w = vec![0f32; n * k];
    w.par_chunks_mut(k.max(1))
        .enumerate()
        .for_each(|(row, out)| {
            for (col, o) in out.iter_mut().enumerate() {
                let at = q.g_idx[col] as usize * n + row;
                let code = q.codes[row * k + col] as f32;
                *o = q.scales[at] * (code - q.zeros[at] as f32);
            }
        });
    w
}

// ------------------------------------------------------------------------------------------
// Scale search (AutoAWQ `_search_best_scale` / `_compute_best_scale`)

/// Result of [`search_scales`].
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleSearch {
    /// `[k]`: the chosen per-input-channel scales s (weights are multiplied by s, the preceding
    /// op's output divided by s).
    pub scales: Vec<f32>,
    /// The ratio `r / n_grid` that gave them.
    pub best_ratio: f32,
    /// Its mean squared output error.
    pub best_error: f32,
    /// Mean squared output error for every grid point, in order (NaN if the module output
    /// was not finite).
    pub errors: Vec<f32>,
}

/// `x_mean[c] = mean_rows |x[:, c]|` (AutoAWQ accumulates in f32, we in f64; result f32).
pub fn activation_mean(x: &[f32], rows: usize, k: usize) -> Result<Vec<f32>> {
    check_matrix("input activations", x, rows, k)?;
    let sum = column_abs_sums(x, k);
    Ok(sum.iter().map(|&s| (s / rows as f64) as f32).collect())
}

/// `w_mean[c]`: every weight of the group (linears stacked along the output dimension) divided
/// by its quantization group's `max|w| + 1e-6`, then averaged over all output rows.
pub fn weight_mean(linears: &[(&[f32], usize)], k: usize, opts: &AwqOptions) -> Result<Vec<f32>> {
    if linears.is_empty() {
        return Err(Error::InvalidArgument(
            "AWQ: a scaling group needs at least one linear".into(),
        ));
    }
    let group = opts.group_len(k)?;
    let mut total = vec![0f64; k];
    let mut rows = 0usize;
    for (i, &(w, n)) in linears.iter().enumerate() {
        check_matrix(&format!("weight {i} of the scaling group"), w, n, k)?;
        let part = normalized_weight_sums(w, k, group);
        for (t, p) in total.iter_mut().zip(part) {
            *t += p;
        }
        rows += n;
    }
    Ok(total.iter().map(|&s| (s / rows as f64) as f32).collect())
}

/// Per-column sums of `|m|` over rows, in f64, in parallel over fixed row blocks (partials
/// combined in order, so the result does not depend on the thread count).
fn column_abs_sums(m: &[f32], k: usize) -> Vec<f64> {
    const BLOCK: usize = 256;
    let parts: Vec<Vec<f64>> = m
        .par_chunks(BLOCK * k)
        .map(|block| {
            let mut acc = vec![0f64; k];
            for row in block.chunks_exact(k) {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += v.abs() as f64;
                }
            }
            acc
        })
        .collect();
    let mut sum = vec![0f64; k];
    for p in parts {
        for (s, v) in sum.iter_mut().zip(p) {
            *s += v;
        }
    }
    sum
}

/// Column sums of `|w| / (max_group |w| + 1e-6)` (f32 element-wise as AutoAWQ, f64 sums).
fn normalized_weight_sums(w: &[f32], k: usize, group: usize) -> Vec<f64> {
    const BLOCK: usize = 64;
    let parts: Vec<Vec<f64>> = w
        .par_chunks(BLOCK * k)
        .map(|block| {
            let mut acc = vec![0f64; k];
            for row in block.chunks_exact(k) {
                for (g, wg) in row.chunks_exact(group).enumerate() {
                    let denom = wg.iter().fold(0f32, |m, x| m.max(x.abs())) + 1e-6;
                    for (a, &x) in acc[g * group..(g + 1) * group].iter_mut().zip(wg) {
                        *a += (x.abs() / denom) as f64;
                    }
                }
            }
            acc
        })
        .collect();
    let mut sum = vec![0f64; k];
    for p in parts {
        for (s, v) in sum.iter_mut().zip(p) {
            *s += v;
        }
    }
    sum
}

/// `base.pow(e)` as torch evaluates it on an f32 tensor with a Python-float exponent: exact
/// shortcuts for 0, 1, 0.5 and 2, otherwise pow with the exponent rounded to f32.
fn torch_pow(base: f32, e: f64) -> f32 {
    if e == 0.0 {
        1.0
    } else if e == 1.0 {
        base
    } else if e == 0.5 {
        base.sqrt()
    } else if e == 2.0 {
        base * base
    } else {
        (base as f64).powf(e as f32 as f64) as f32
    }
}

/// Candidate scales for one ratio: `s = clamp(x_mean^r / (w_mean^(1−r) + 1e-4), 1e-4)`
/// (`duo_scaling`) or `clamp(x_mean^r, 1e-4)`, then `s / sqrt(max(s)·min(s))`, with inf/NaN
/// entries set to 1. `w_mean` is ignored without duo scaling.
pub fn candidate_scales(x_mean: &[f32], w_mean: &[f32], ratio: f64, duo_scaling: bool) -> Vec<f32> {
    let mut s: Vec<f32> = if duo_scaling {
        x_mean
            .iter()
            .zip(w_mean)
            .map(|(&x, &w)| (torch_pow(x, ratio) / (torch_pow(w, 1.0 - ratio) + 1e-4)).max(1e-4))
            .collect()
    } else {
        x_mean
            .iter()
            .map(|&x| torch_pow(x, ratio).max(1e-4))
            .collect()
    };
    let hi = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lo = s.iter().copied().fold(f32::INFINITY, f32::min);
    let norm = (hi * lo).sqrt();
    for v in &mut s {
        *v /= norm;
        if !v.is_finite() {
            *v = 1.0;
        }
    }
    s
}

/// `dst = Q(w · diag(s)) / s` for one `[n, k]` weight, rows in parallel.
fn scaled_fake_quant(
    w: &[f32],
    k: usize,
    s: &[f32],
    group: usize,
    opts: &AwqOptions,
    dst: &mut [f32],
) {
    dst.par_chunks_mut(k)
        .zip(w.par_chunks(k))
        .for_each(|(d, row)| {
            for ((o, &x), &sc) in d.iter_mut().zip(row).zip(s) {
                *o = x * sc;
            }
            fake_quant_row(d, group, opts.bits, opts.zero_point);
            for (o, &sc) in d.iter_mut().zip(s) {
                *o /= sc;
            }
        });
}

/// Mean of `(a − b)²` with the difference in f32 (as AutoAWQ) and the sum in f64.
fn mse(a: &[f32], b: &[f32]) -> f64 {
    const BLOCK: usize = 1 << 14;
    let parts: Vec<f64> = a
        .par_chunks(BLOCK)
        .zip(b.par_chunks(BLOCK))
        .map(|(x, y)| {
            x.iter()
                .zip(y)
                .map(|(&p, &q)| {
                    let d = (p - q) as f64;
                    d * d
                })
                .sum()
        })
        .collect();
    parts.iter().sum::<f64>() / a.len() as f64
}

/// Search the per-input-channel scales of one scaling group (AutoAWQ `_search_best_scale`).
///
/// * `x`: `[rows, k]`, the captured input of the group's linears (the output of the preceding
///   op), unscaled.
/// * `linears`: the group's weights `(w, n_i)`, each `[n_i, k]`, in order (e.g. q, k, v).
/// * `inspect`: runs the compared module on the captured input with the given weights (one
///   `Vec` per linear, same order and shapes) and returns its output, flattened. It is called
///   once with the original weights (the reference) and then once per grid point with
///   `Q(W·s)/s`. Its output must have the same length every time.
///
/// The smallest mean squared error wins; ties keep the earlier ratio.
pub fn search_scales(
    x: &[f32],
    rows: usize,
    k: usize,
    linears: &[(&[f32], usize)],
    inspect: &mut dyn FnMut(&[Vec<f32>]) -> Vec<f32>,
    opts: &AwqOptions,
) -> Result<ScaleSearch> {
    opts.validate()?;
    let group = opts.group_len(k)?;
    let x_mean = activation_mean(x, rows, k)?;
    let w_mean = weight_mean(linears, k, opts)?;

    let mut bufs: Vec<Vec<f32>> = linears.iter().map(|(w, _)| w.to_vec()).collect();
    let reference = inspect(&bufs);
    if reference.is_empty() {
        return Err(Error::InvalidArgument(
            "AWQ: the inspected module returned an empty output".into(),
        ));
    }
    if let Some(i) = reference.iter().position(|v| !v.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "AWQ: the inspected module's reference output is not finite ({} at index {i})",
            reference[i]
        )));
    }

    let mut errors = Vec::with_capacity(opts.n_grid);
    let mut best: Option<(f64, f64, Vec<f32>)> = None; // (error, ratio, scales)
    for r in 0..opts.n_grid {
        let ratio = r as f64 / opts.n_grid as f64;
        let s = candidate_scales(&x_mean, &w_mean, ratio, opts.duo_scaling);
        for (buf, &(w, _)) in bufs.iter_mut().zip(linears) {
            scaled_fake_quant(w, k, &s, group, opts, buf);
        }
        let out = inspect(&bufs);
        if out.len() != reference.len() {
            return Err(Error::InvalidArgument(format!(
                "AWQ: the inspected module returned {} values for ratio {ratio}, but {} for \
                 the original weights",
                out.len(),
                reference.len()
            )));
        }
        let loss = mse(&reference, &out);
        errors.push(loss as f32);
        // AutoAWQ starts from `best_error = inf`: NaN and inf losses never win.
        if loss < best.as_ref().map_or(f64::INFINITY, |b| b.0) {
            best = Some((loss, ratio, s));
        }
    }
    let (best_error, best_ratio, scales) = best.ok_or_else(|| {
        Error::InvalidArgument(
            "AWQ: no scale candidate gave a finite output error (the module output is NaN/inf \
             for every ratio)"
                .into(),
        )
    })?;
    Ok(ScaleSearch {
        scales,
        best_ratio: best_ratio as f32,
        best_error: best_error as f32,
        errors,
    })
}

// ------------------------------------------------------------------------------------------
// Clip search (AutoAWQ `_compute_best_clip`) and scale folding (`awq/quantize/scale.py`)

/// Best clipping threshold per `(row, group)` of `w` (`[n, k]`), returned `[n, groups]`
/// row-major (AutoAWQ's `best_max_val.squeeze(1)`). `x` (`[rows, k]`) is the linear's input,
/// already divided by the scales when the weights were scaled.
///
/// Tokens are subsampled with step `max(1, rows / clip_sample_tokens)` (every token when there
/// are fewer). For shrink `i = 0 … int(max_shrink·clip_grid) − 1` the group is clamped to
/// `±max|w|·(1 − i/clip_grid)` and fake-quantized; the error is the mean over sampled tokens of
/// the squared change in the group's partial dot product. Strictly smaller errors win.
pub fn search_clip(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    n: usize,
    opts: &AwqOptions,
) -> Result<Vec<f32>> {
    opts.validate()?;
    check_matrix("input activations", x, rows, k)?;
    check_matrix("weight", w, n, k)?;
    let group = opts.group_len(k)?;
    let groups = k / group;

    let step = (rows / opts.clip_sample_tokens).max(1);
    let xs: Vec<f32> = x
        .chunks_exact(k)
        .step_by(step)
        .flat_map(|r| r.iter().copied())
        .collect();
    let t = xs.len() / k;

    // org_max[r, g] = max |w| in the group.
    let org_max: Vec<f32> = w
        .chunks_exact(group)
        .map(|g| g.iter().fold(0f32, |m, v| m.max(v.abs())))
        .collect();

    let cands = opts.clip_candidates();
    // Python computes `org_max * (1 - i/n_grid)`: the factor in f64, the product in f32.
    let factors: Vec<f32> = (0..cands)
        .map(|i| (1.0 - i as f64 / opts.clip_grid as f64) as f32)
        .collect();

    // errs[(g, c)] = per-row errors; each task is one group × one candidate.
    let errs: Vec<Vec<f64>> = (0..groups * cands)
        .into_par_iter()
        .map(|task| {
            let (g, c) = (task / cands, task % cands);
            let mut d = vec![0f32; n * group];
            for (r, drow) in d.chunks_exact_mut(group).enumerate() {
                let wg = &w[r * k + g * group..r * k + (g + 1) * group];
                let mv = org_max[r * groups + g] * factors[c];
                for (o, &v) in drow.iter_mut().zip(wg) {
                    *o = v.max(-mv).min(mv);
                }
                fake_quant_row(drow, group, opts.bits, opts.zero_point);
                for (o, &v) in drow.iter_mut().zip(wg) {
                    *o -= v;
                }
            }
            // out[t, n] = xs[:, group g] · dᵀ
            let mut out = vec![0f32; t * n];
            gemm_serial(t, n, group, &xs[g * group..], k, 1, &d, 1, group, &mut out);
            let mut e = vec![0f64; n];
            for orow in out.chunks_exact(n) {
                for (a, &v) in e.iter_mut().zip(orow) {
                    *a += (v as f64) * (v as f64);
                }
            }
            for a in &mut e {
                *a /= t as f64;
            }
            e
        })
        .collect();

    let mut best = org_max.clone();
    for r in 0..n {
        for g in 0..groups {
            let mut min_err = 1e9f64;
            for c in 0..cands {
                let e = errs[g * cands + c][r];
                if e < min_err {
                    min_err = e;
                    best[r * groups + g] = org_max[r * groups + g] * factors[c];
                }
            }
        }
    }
    Ok(best)
}

/// Clamp every group of `w` (`[n, k]`) to `±max_val[row, group]` (`[n, k/group]`, as returned by
/// [`search_clip`]; `group = 0` means whole rows).
pub fn apply_clip(w: &mut [f32], n: usize, k: usize, group: usize, max_val: &[f32]) -> Result<()> {
    let group = if group == 0 { k } else { group };
    if n == 0 || k == 0 || !k.is_multiple_of(group) || w.len() != n * k {
        return Err(Error::InvalidArgument(format!(
            "AWQ clip: weight of {} values does not fit [N={n}, K={k}] with group {group}",
            w.len()
        )));
    }
    if max_val.len() != n * (k / group) {
        return Err(Error::InvalidArgument(format!(
            "AWQ clip: {} thresholds for a [N={n}, K={k}] weight with group {group} (need {})",
            max_val.len(),
            n * (k / group)
        )));
    }
    if let Some(i) = max_val.iter().position(|v| !(v.is_finite() && *v >= 0.0)) {
        return Err(Error::InvalidArgument(format!(
            "AWQ clip: threshold {} at index {i} is not a finite non-negative number",
            max_val[i]
        )));
    }
    w.par_chunks_mut(group)
        .zip(max_val.par_iter())
        .for_each(|(g, &m)| {
            for v in g {
                *v = v.max(-m).min(m);
            }
        });
    Ok(())
}

/// Scales must be usable as divisors: finite and non-zero, and `len` of them.
fn check_scales(s: &[f32], len: usize, what: &str) -> Result<()> {
    if s.len() != len {
        return Err(Error::InvalidArgument(format!(
            "AWQ: {} scales for {what} of length {len}",
            s.len()
        )));
    }
    if let Some(i) = s.iter().position(|v| !(v.is_finite() && *v != 0.0)) {
        return Err(Error::InvalidArgument(format!(
            "AWQ: scale {} at index {i} is zero or not finite",
            s[i]
        )));
    }
    Ok(())
}

/// `w[:, c] *= s[c]` for a `[n, k]` weight: fold the scales into the group's linears
/// (AutoAWQ `fc.weight.mul_(scales.view(1, -1))`).
pub fn scale_columns(w: &mut [f32], n: usize, k: usize, s: &[f32]) -> Result<()> {
    map_columns(w, n, k, s, "weight", |v, sc| v * sc)
}

/// `x[:, c] /= s[c]` for `[rows, k]` activations: what the captured inputs of the scaled
/// linears become (AutoAWQ `inp.div_(scales.view(1, -1))`), e.g. before the clip search.
pub fn divide_columns(x: &mut [f32], rows: usize, k: usize, s: &[f32]) -> Result<()> {
    map_columns(x, rows, k, s, "activations", |v, sc| v / sc)
}

/// `m[r, c] = f(m[r, c], s[c])` for a `[rows, k]` matrix, rows in parallel.
fn map_columns(
    m: &mut [f32],
    rows: usize,
    k: usize,
    s: &[f32],
    what: &str,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Result<()> {
    check_scales(s, k, "input channels")?;
    if m.len() != rows * k {
        return Err(Error::InvalidArgument(format!(
            "AWQ: {what} has {} values, [{rows}, {k}] needs {}",
            m.len(),
            rows * k
        )));
    }
    m.par_chunks_mut(k.max(1)).for_each(|row| {
        for (v, &sc) in row.iter_mut().zip(s) {
            *v = f(*v, sc);
        }
    });
    Ok(())
}

/// Divide the **last** `s.len()` output rows of a preceding linear (`[n, k]`, e.g. v_proj before
/// o_proj, up_proj before down_proj) by s (AutoAWQ `fc1.weight[-len(s):].div_(s.view(-1, 1))`).
pub fn divide_rows(w: &mut [f32], n: usize, k: usize, s: &[f32]) -> Result<()> {
    if w.len() != n * k || s.len() > n {
        return Err(Error::InvalidArgument(format!(
            "AWQ: cannot divide the last {} rows of a weight with {} values as [N={n}, K={k}]",
            s.len(),
            w.len()
        )));
    }
    check_scales(s, s.len(), "output rows")?;
    w[(n - s.len()) * k..]
        .par_chunks_mut(k.max(1))
        .zip(s.par_iter())
        .for_each(|(row, &sc)| {
            for v in row {
                *v /= sc;
            }
        });
    Ok(())
}

/// `v[i] /= s[i]`: a preceding norm's weight and bias, or a preceding linear's bias.
pub fn divide_vector(v: &mut [f32], s: &[f32]) -> Result<()> {
    check_scales(s, v.len(), "a vector")?;
    for (x, &sc) in v.iter_mut().zip(s) {
        *x /= sc;
    }
    Ok(())
}

/// Gemma-style norms compute `x·(1 + weight)`, so their weight becomes `(w + 1)/s − 1`.
pub fn divide_offset_norm(v: &mut [f32], s: &[f32]) -> Result<()> {
    check_scales(s, v.len(), "a norm weight")?;
    for (x, &sc) in v.iter_mut().zip(s) {
        *x = (*x + 1.0) / sc - 1.0;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asymmetric_grid_follows_the_data_range() {
        // min 1, max 4: not forced through 0 (GPTQ's grid would use [0, 4]).
        let (s, z) = group_grid(&[1.0, 2.5, 4.0], 4, true);
        assert_eq!(s, 3.0 / 15.0);
        assert_eq!(z, 0.0); // -round(1/0.2) = -5, clamped to 0
        let (s, z) = group_grid(&[-2.0, -1.0], 4, true);
        assert_eq!(s, 1.0 / 15.0);
        assert_eq!(z, 15.0); // round(30) clamped to 15
                             // A constant group uses the 1e-5 floor.
        assert_eq!(group_grid(&[0.3; 4], 4, true).0, 1e-5 / 15.0);
    }

    #[test]
    fn symmetric_levels_span_signed_range() {
        let (s, z) = group_grid(&[-1.0, 0.5], 4, false);
        assert_eq!((s, z), (1.0 / 7.0, 8.0));
        assert_eq!(level(-1.0, s, z, 4, false), -7.0);
        assert_eq!(level(-1.2, s, z, 4, false), -8.0);
        assert_eq!(level(1.0, s, z, 4, false), 7.0);
    }

    #[test]
    fn torch_pow_shortcuts() {
        assert_eq!(torch_pow(0.0, 0.0), 1.0);
        assert_eq!(torch_pow(2.0, 0.5), 2f32.sqrt());
        assert_eq!(torch_pow(3.0, 1.0), 3.0);
        assert_eq!(torch_pow(0.0, 0.3), 0.0);
    }
}
