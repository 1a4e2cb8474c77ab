//! Round-to-nearest (RTN) quantization on the GPTQ grid.
//!
//! The grid is the one shared by the IST-DASLab reference, AutoGPTQ and GPTQModel
//! (docs/formats.md §1.2); GPTQ reuses [`grid`] for its own per-group parameters, so the two methods
//! produce checkpoints that differ only in the codes. Arithmetic is f32 because the reference runs
//! its quantizer on `W.float()`, and rounding is half-to-even as `torch.round` does.

use super::{Bits, GroupSize};
use crate::error::{Error, Result};

/// How to quantize one linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantParams {
    pub bits: Bits,
    /// Input channels per group, or per-channel (one group spanning all of K, `-1` on disk).
    pub group_size: GroupSize,
    pub sym: bool,
}

/// A quantized `[N, K]` weight with everything a GPTQ checkpoint needs, unpacked.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedLinear {
    pub bits: Bits,
    pub group_size: GroupSize,
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// Codes in `0..=maxq`, `[N, K]` row-major like the PyTorch weight.
    pub codes: Vec<u8>,
    /// `[G, N]`: scale of group g for output n.
    pub scales: Vec<f32>,
    /// `[G, N]`: the true zero point Z (not the v1 stored `Z - 1`).
    pub zeros: Vec<u32>,
    /// `[K]`: group of each input channel.
    pub g_idx: Vec<u32>,
}

impl QuantizedLinear {
    /// Number of groups G (rows of `scales`/`zeros`).
    pub fn num_groups(&self) -> usize {
        self.scales.len().checked_div(self.n).unwrap_or(0)
    }

    /// Check that codes and g_idx fit `[N, K]` and scales and zeros `[groups, N]` (for
    /// writers, whose layouts would silently misplace values otherwise).
    pub fn check_parts(&self, groups: usize) -> std::result::Result<(), String> {
        let (n, k) = (self.n, self.k);
        if self.codes.len() != n * k || self.g_idx.len() != k {
            return Err(format!(
                "{} codes and {} g_idx entries do not match [N={n}, K={k}]",
                self.codes.len(),
                self.g_idx.len()
            ));
        }
        if self.scales.len() != groups * n || self.zeros.len() != groups * n {
            return Err(format!(
                "{} scales and {} zeros do not match [G={groups}, N={n}]",
                self.scales.len(),
                self.zeros.len()
            ));
        }
        Ok(())
    }

    /// `W[n, k] = scales[g_idx[k], n] · (q[n, k] − Z[g_idx[k], n])`, as `[N, K]` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = Vec::with_capacity(self.n * self.k);
        for row in 0..self.n {
            for col in 0..self.k {
                let at = self.g_idx[col] as usize * self.n + row;
                let q = self.codes[row * self.k + col] as f32;
                w.push(self.scales[at] * (q - self.zeros[at] as f32));
            }
        }
        w
    }
}

/// `2^bits − 1`.
pub fn maxq(bits: u8) -> u32 {
    (1u32 << bits) - 1
}

/// Scale and zero point for one row (or one group of a row), docs/formats.md §1.2 steps 1–5.
///
/// `bits` is a grid width ([`crate::qtypes::Bits`]: 2, 3, 4 or 8).
pub fn grid(values: &[f32], bits: u8, sym: bool) -> (f32, u32) {
    let maxq = maxq(bits);
    // The range always contains 0, so a zero weight is exactly representable.
    let mut xmin = values.iter().copied().fold(0.0f32, f32::min);
    let mut xmax = values.iter().copied().fold(0.0f32, f32::max);
    if sym {
        xmax = xmax.max(xmin.abs());
        // Reference quirk, kept for bit-exactness: with no negatives xmin stays 0 while the zero
        // is still 2^(b-1), so the upper half of the range clips.
        if xmin < 0.0 {
            xmin = -xmax;
        }
    }
    if xmin == 0.0 && xmax == 0.0 {
        xmin = -1.0;
        xmax = 1.0;
    }
    let scale = (xmax - xmin) / maxq as f32;
    let zero = if sym {
        1 << (bits - 1) // (maxq + 1) / 2 in the reference
    } else {
        // -xmin/scale lies in [0, maxq] up to rounding, so the cast cannot wrap.
        (-xmin / scale).round_ties_even().clamp(0.0, maxq as f32) as u32
    };
    (scale, zero)
}

/// Shrink steps of [`grid_searched`]: scales `s₀·(1 − i/100)` for `i < CLIP_STEPS`, down to 0.21 s₀
/// (the range the reference's optional `mse` quantizer searches).
const CLIP_STEPS: usize = 80;

/// Scale and zero point for one group chosen to minimise the weighted squared rounding error
/// `Σ wⱼ·(Q(xⱼ) − xⱼ)²` (`weights` `None`: all 1) — a clipping search, which the reference's
/// default grid ([`grid`]) does not do. Candidates shrink the range from its no-clip extent; for
/// the symmetric grid, whose codes reach `−2^(b−1)` steps below zero but only `2^(b−1) − 1`
/// above, the no-clip scale is fitted to each side separately (the reference's symmetric scale,
/// which clips the positive side, is tried too), so a group whose largest magnitude is negative
/// uses the extra code. Never worse than [`grid`] on this error.
pub fn grid_searched(values: &[f32], weights: Option<&[f32]>, bits: u8, sym: bool) -> (f32, u32) {
    let maxq = maxq(bits);
    let reference = grid(values, bits, sym);
    let xmin = values.iter().copied().fold(0.0f32, f32::min);
    let xmax = values.iter().copied().fold(0.0f32, f32::max);
    if xmin == 0.0 && xmax == 0.0 {
        return reference;
    }
    let error = |(scale, zero): (f32, u32)| -> f64 {
        let mut e = 0f64;
        for (j, &x) in values.iter().enumerate() {
            let q = scale * (quantize_value(x, scale, zero, maxq) as f32 - zero as f32);
            let d = (q - x) as f64;
            e += d * d * weights.map_or(1.0, |w| w[j] as f64);
        }
        e
    };
    // Symmetric: the zero is fixed, and the smallest scale that clips neither side.
    let sym_zero = 1u32 << (bits - 1);
    let sym_scale = (xmax / (maxq - sym_zero) as f32).max(-xmin / sym_zero as f32);
    let mut best = (error(reference), reference);
    for i in 0..CLIP_STEPS {
        let p = 1.0 - i as f32 / 100.0;
        let candidate = if sym {
            (sym_scale * p, sym_zero)
        } else {
            let (lo, hi) = (xmin * p, xmax * p);
            let scale = (hi - lo) / maxq as f32;
            let zero = (-lo / scale).round_ties_even().clamp(0.0, maxq as f32) as u32;
            (scale, zero)
        };
        if !(candidate.0.is_finite() && candidate.0 > 0.0) {
            continue;
        }
        let e = error(candidate);
        if e < best.0 {
            best = (e, candidate);
        }
    }
    best.1
}

/// Code of one value on a grid: `clamp(round(x / scale) + zero, 0, maxq)` (§1.2 step 6).
pub fn quantize_value(x: f32, scale: f32, zero: u32, maxq: u32) -> u8 {
    let q = (x / scale).round_ties_even() + zero as f32;
    q.clamp(0.0, maxq as f32) as u8
}

/// Check a weight before quantizing it (RTN and GPTQ alike): a supported bit width, `w` of
/// length `n·k` with neither zero, a group size that is positive and divides K (loaders need it
/// to divide `in_features`), and only finite values. Returns the group size (`None`: per-channel).
pub fn check_weight(w: &[f32], n: usize, k: usize, params: &QuantParams) -> Result<Option<usize>> {
    if w.len() != n * k {
        return Err(Error::InvalidArgument(format!(
            "weight has {} values but its shape [N={n}, K={k}] needs {}",
            w.len(),
            n * k
        )));
    }
    if n == 0 || k == 0 {
        return Err(Error::InvalidArgument(format!(
            "cannot quantize an empty weight [N={n}, K={k}]"
        )));
    }
    let group = match params.group_size.size() {
        None => None,
        Some(0) => {
            return Err(Error::InvalidArgument(
                "group size must be positive (or per-channel)".into(),
            ))
        }
        Some(g) if !k.is_multiple_of(g) => {
            return Err(Error::InvalidArgument(format!(
                "group size {g} does not divide in_features K={k} (weight [N={n}, K={k}]); \
                 GPTQ loaders need every group to be full"
            )))
        }
        Some(g) => Some(g),
    };
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "non-finite weight {} at row {}, column {} of [N={n}, K={k}]",
            w[i],
            i / k,
            i % k
        )));
    }
    Ok(group)
}
