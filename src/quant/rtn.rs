//! Round-to-nearest (RTN) quantization on the GPTQ grid.
//!
//! The grid is the one shared by the IST-DASLab reference, AutoGPTQ and GPTQModel
//! (formats.md §1.2); GPTQ reuses [`grid`] for its own per-group parameters, so the two methods
//! produce checkpoints that differ only in the codes. Arithmetic is f32 because the reference runs
//! its quantizer on `W.float()`, and rounding is half-to-even as `torch.round` does.

use crate::error::{Error, Result};

/// Bit widths that GPTQ checkpoints can store (formats.md §1.1).
pub const SUPPORTED_BITS: [u8; 4] = [2, 3, 4, 8];

/// How to quantize one linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantParams {
    pub bits: u8,
    /// Input channels per group; `None` is per-channel (one group spanning all of K, `-1` on disk).
    pub group_size: Option<usize>,
    pub sym: bool,
}

/// A quantized `[N, K]` weight with everything a GPTQ checkpoint needs, unpacked.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedLinear {
    pub bits: u8,
    pub group_size: Option<usize>,
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

/// Refuse bit widths that GPTQ checkpoints cannot hold.
pub fn check_bits(bits: u8) -> Result<()> {
    if SUPPORTED_BITS.contains(&bits) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "unsupported bit width {bits}; GPTQ checkpoints store 2, 3, 4 or 8 bits"
        )))
    }
}

/// Scale and zero point for one row (or one group of a row), formats.md §1.2 steps 1–5.
///
/// `bits` must be one of [`SUPPORTED_BITS`] (checked by the callers that take user input).
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

/// Code of one value on a grid: `clamp(round(x / scale) + zero, 0, maxq)` (§1.2 step 6).
pub fn quantize_value(x: f32, scale: f32, zero: u32, maxq: u32) -> u8 {
    let q = (x / scale).round_ties_even() + zero as f32;
    q.clamp(0.0, maxq as f32) as u8
}

/// Check a weight before quantizing it (RTN and GPTQ alike): a supported bit width, `w` of
/// length `n·k` with neither zero, a group size that is positive and divides K (loaders need it
/// to divide `in_features`), and only finite values. Returns the group size (`None`: per-channel).
pub fn check_weight(w: &[f32], n: usize, k: usize, params: &QuantParams) -> Result<Option<usize>> {
    check_bits(params.bits)?;
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
    let group = match params.group_size {
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

/// Quantize `w` (`[N, K]` row-major, the PyTorch layout) to the nearest grid point per group.
///
/// Errors as [`check_weight`] does.
pub fn quantize_rtn(
    w: &[f32],
    n: usize,
    k: usize,
    params: &QuantParams,
) -> Result<QuantizedLinear> {
    let group = check_weight(w, n, k, params)?.unwrap_or(k);

    let groups = k / group;
    let maxq = maxq(params.bits);
    let mut codes = vec![0u8; n * k];
    let mut scales = vec![0f32; groups * n];
    let mut zeros = vec![0u32; groups * n];
    for row in 0..n {
        for g in 0..groups {
            let start = row * k + g * group;
            let values = &w[start..start + group];
            let (scale, zero) = grid(values, params.bits, params.sym);
            // Finite weights can still overflow (xmax − xmin > f32::MAX) or underflow the scale.
            if !(scale.is_finite() && scale > 0.0) {
                return Err(Error::InvalidArgument(format!(
                    "row {row}, group {g} of [N={n}, K={k}] gives scale {scale}; \
                     its range cannot be quantized in f32"
                )));
            }
            for (code, &x) in codes[start..start + group].iter_mut().zip(values) {
                *code = quantize_value(x, scale, zero, maxq);
            }
            scales[g * n + row] = scale;
            zeros[g * n + row] = zero;
        }
    }
    let g_idx = (0..k).map(|col| (col / group) as u32).collect();
    Ok(QuantizedLinear {
        bits: params.bits,
        group_size: params.group_size,
        n,
        k,
        codes,
        scales,
        zeros,
        g_idx,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_zero_row_uses_unit_range() {
        // Step 3: xmin=-1, xmax=1 → scale 2/15. In exact arithmetic -xmin/scale is 7.5, but in
        // f32 (as torch computes it) 1/0.13333334 = 7.4999995, so the zero is 7, not 8.
        let (s, z) = grid(&[0.0; 4], 4, false);
        assert_eq!(s, 2.0f32 / 15.0);
        assert_eq!(z, 7);
        // 2-bit: 1/(2/3 in f32) is exactly 1.5 in f32 and rounds half-to-even to 2.
        assert_eq!(grid(&[0.0; 4], 2, false), (2.0f32 / 3.0, 2));
    }

    #[test]
    fn symmetric_zero_is_half_range() {
        for (bits, z) in [(2u8, 2u32), (3, 4), (4, 8), (8, 128)] {
            assert_eq!(grid(&[-1.0, 0.5], bits, true).1, z);
        }
    }
}
