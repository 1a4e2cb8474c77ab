//! Round-to-nearest (RTN) quantization on the GPTQ grid ([`crate::qtypes::grid`]): every group
//! of a weight rounded to its nearest grid point, no calibration.

use crate::error::{Error, Result};
use crate::qtypes::grid::*;

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
    let maxq = params.bits.maxq();
    let mut codes = vec![0u8; n * k];
    let mut scales = vec![0f32; groups * n];
    let mut zeros = vec![0u32; groups * n];
    for row in 0..n {
        for g in 0..groups {
            let start = row * k + g * group;
            let values = &w[start..start + group];
            let (scale, zero) = grid(values, params.bits.get(), params.sym);
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

    fn weighted_error(v: &[f32], wts: &[f32], (s, z): (f32, u32), bits: u8) -> f64 {
        v.iter()
            .zip(wts)
            .map(|(&x, &w)| {
                let q = s * (quantize_value(x, s, z, maxq(bits)) as f32 - z as f32);
                w as f64 * ((q - x) as f64).powi(2)
            })
            .sum()
    }

    #[test]
    fn searched_grid_uses_the_extra_negative_code() {
        // 3-bit symmetric codes span −4…3 steps: the reference scale 2·4/7 rounds both values
        // off the grid, a scale of exactly 1 holds them both.
        assert_eq!(grid(&[-4.0, 3.0], 3, true), (8.0 / 7.0, 4));
        assert_eq!(grid_searched(&[-4.0, 3.0], None, 3, true), (1.0, 4));
        // All zero: the reference's unit range.
        assert_eq!(
            grid_searched(&[0.0; 3], None, 4, false),
            grid(&[0.0; 3], 4, false)
        );
    }

    #[test]
    fn searched_grid_never_loses_to_the_reference_grid() {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        let mut strictly_better = 0;
        for case in 0..200 {
            let bits = [2u8, 3, 4, 8][case % 4];
            let sym = case % 3 != 0;
            // Heavy tails (cubes) make clipping worth it in most groups.
            let v: Vec<f32> = (0..32).map(|_| next().powi(3) + 0.1 * next()).collect();
            let wts: Vec<f32> = (0..32).map(|_| next().abs() + 0.01).collect();
            let reference = weighted_error(&v, &wts, grid(&v, bits, sym), bits);
            let searched = weighted_error(&v, &wts, grid_searched(&v, Some(&wts), bits, sym), bits);
            assert!(
                searched <= reference,
                "case {case}: {searched} > {reference}"
            );
            strictly_better += usize::from(searched < 0.999 * reference);
        }
        assert!(
            strictly_better > 100,
            "only {strictly_better} of 200 improved"
        );
    }

    #[test]
    fn symmetric_zero_is_half_range() {
        for (bits, z) in [(2u8, 2u32), (3, 4), (4, 8), (8, 128)] {
            assert_eq!(grid(&[-1.0, 0.5], bits, true).1, z);
        }
    }
}
