//! Bit packing of GPTQ `qweight` and `qzeros` (docs/formats.md §1.3, §1.4).
//!
//! Every layout in §1.3 — 2/4/8-bit fields and the 3-bit "32 codes → 3 words" runs — is the same
//! thing seen as a little-endian bit stream: code i of a run occupies stream bits `[b·i, b·i + b)`,
//! and stream bit p is bit `p mod 32` of word `p / 32`. For 3 bits this is exactly why `v10` and
//! `v21` straddle word boundaries. So one packer serves all widths.
//!
//! `qweight` is `[K·b/32, N]`, packed along K; `qzeros` is `[G, N·b/32]`, packed along N. Words are
//! returned as `i32` because the on-disk dtype is I32; negative values are normal.

use crate::error::{Error, Result};
use crate::qtypes::grid::maxq;
use crate::qtypes::Bits;

/// How zero points are stored in `qzeros` (`checkpoint_format` in the quantization config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroFormat {
    /// `"gptq"`: each field holds `Z − 1`; readers compute `(field + 1) mod 2^b`.
    V1,
    /// `"gptq_v2"`: each field holds `Z`.
    V2,
}

impl ZeroFormat {
    /// The `checkpoint_format` string of the quantization config.
    pub fn as_str(self) -> &'static str {
        match self {
            ZeroFormat::V1 => "gptq",
            ZeroFormat::V2 => "gptq_v2",
        }
    }
}

/// Codes per run that must not be split: a run of `run_len(b)` codes fills whole words.
fn run_len(bits: u8) -> usize {
    if bits == 3 {
        32
    } else {
        32 / bits as usize
    }
}

/// Words that hold `len` codes of `bits` bits (`len` a multiple of [`run_len`]).
pub fn packed_len(len: usize, bits: u8) -> usize {
    len * bits as usize / 32
}

fn check_packable(len: usize, bits: u8, what: &str) -> Result<()> {
    Bits::new(bits)?;
    let run = run_len(bits);
    if !len.is_multiple_of(run) {
        return Err(Error::InvalidArgument(format!(
            "{what} = {len} is not a multiple of {run}, which {bits}-bit GPTQ packing needs"
        )));
    }
    Ok(())
}

fn check_len(actual: usize, expected: usize, what: &str) -> Result<()> {
    if actual != expected {
        return Err(Error::InvalidArgument(format!(
            "{what} has {actual} elements, expected {expected}"
        )));
    }
    Ok(())
}

/// Read field i (`bits` wide) of the bit stream `words`, at stride `stride` between words.
fn get_field(words: &[i32], base: usize, stride: usize, i: usize, bits: u8) -> u32 {
    let pos = i * bits as usize;
    let (w, off) = (pos / 32, pos % 32);
    let lo = words[base + w * stride] as u32 as u64;
    // A field can straddle into the next word only in the 3-bit layout.
    let hi = if off + bits as usize > 32 {
        words[base + (w + 1) * stride] as u32 as u64
    } else {
        0
    };
    (((hi << 32) | lo) >> off) as u32 & maxq(bits)
}

/// OR `value` into field i of the bit stream `words` (same addressing as [`get_field`]).
fn put_field(words: &mut [u32], base: usize, stride: usize, i: usize, bits: u8, value: u32) {
    let pos = i * bits as usize;
    let (w, off) = (pos / 32, pos % 32);
    let wide = (value as u64) << off;
    words[base + w * stride] |= wide as u32;
    if off + bits as usize > 32 {
        words[base + (w + 1) * stride] |= (wide >> 32) as u32;
    }
}

fn check_codes_fit(values: impl Iterator<Item = u32>, bits: u8, what: &str) -> Result<()> {
    let maxq = maxq(bits);
    for (i, v) in values.enumerate() {
        if v > maxq {
            return Err(Error::InvalidArgument(format!(
                "{what}[{i}] = {v} does not fit in {bits} bits (max {maxq})"
            )));
        }
    }
    Ok(())
}

/// Pack codes `[N, K]` (row-major, PyTorch weight layout) into `qweight` `[K·b/32, N]`.
///
/// K must be a multiple of 32/b (32 for 3-bit); see [`check_loader_shape`] for what loaders need.
pub fn pack_qweight(codes: &[u8], n: usize, k: usize, bits: u8) -> Result<Vec<i32>> {
    check_packable(k, bits, "in_features K")?;
    check_len(codes.len(), n * k, &format!("codes of [N={n}, K={k}]"))?;
    check_codes_fit(codes.iter().map(|&c| c as u32), bits, "codes")?;
    let rows = packed_len(k, bits);
    let mut words = vec![0u32; rows * n];
    for col in 0..n {
        for (i, &c) in codes[col * k..(col + 1) * k].iter().enumerate() {
            put_field(&mut words, col, n, i, bits, c as u32);
        }
    }
    Ok(words.into_iter().map(|w| w as i32).collect())
}

/// Unpack `qweight` `[K·b/32, N]` into codes `[N, K]`.
pub fn unpack_qweight(qweight: &[i32], n: usize, k: usize, bits: u8) -> Result<Vec<u8>> {
    check_packable(k, bits, "in_features K")?;
    let rows = packed_len(k, bits);
    check_len(
        qweight.len(),
        rows * n,
        &format!("qweight [{rows}, {n}] for K={k}"),
    )?;
    let mut codes = Vec::with_capacity(n * k);
    for col in 0..n {
        for i in 0..k {
            codes.push(get_field(qweight, col, n, i, bits) as u8);
        }
    }
    Ok(codes)
}

/// Pack true zero points `[G, N]` into `qzeros` `[G, N·b/32]`, storing `Z − 1` (v1) or `Z` (v2).
///
/// v1 cannot represent Z = 0: AutoGPTQ writes −1 as 0xFFFFFFFF OR-ed in, which sets every higher
/// field of the word to all-ones and corrupts neighbouring columns, and GPTQModel's conversion
/// borrows from the next field instead. Rather than write either, this refuses; use v2 for such
/// asymmetric layers.
pub fn pack_qzeros(
    zeros: &[u32],
    groups: usize,
    n: usize,
    bits: u8,
    format: ZeroFormat,
) -> Result<Vec<i32>> {
    check_packable(n, bits, "out_features N")?;
    check_len(
        zeros.len(),
        groups * n,
        &format!("zeros of [G={groups}, N={n}]"),
    )?;
    check_codes_fit(zeros.iter().copied(), bits, "zeros")?;
    if format == ZeroFormat::V1 {
        if let Some(i) = zeros.iter().position(|&z| z == 0) {
            return Err(Error::InvalidArgument(format!(
                "zero point 0 at group {}, column {} cannot be stored in GPTQ v1 (it stores Z-1, and \
                 -1 corrupts neighbouring fields); save as gptq_v2 instead",
                i / n,
                i % n
            )));
        }
    }
    let cols = packed_len(n, bits);
    let offset = if format == ZeroFormat::V1 { 1 } else { 0 };
    let mut words = vec![0u32; groups * cols];
    for g in 0..groups {
        for (i, &z) in zeros[g * n..(g + 1) * n].iter().enumerate() {
            put_field(&mut words, g * cols, 1, i, bits, z - offset);
        }
    }
    Ok(words.into_iter().map(|w| w as i32).collect())
}

/// Unpack `qzeros` `[G, N·b/32]` into true zero points `[G, N]`.
///
/// v1 fields are read as `(field + 1) mod 2^b`, the masked reading of AutoGPTQ's torch path,
/// exllamav2 and vLLM, so a field wrapped by a Z = 0 writer reads back as 0.
pub fn unpack_qzeros(
    qzeros: &[i32],
    groups: usize,
    n: usize,
    bits: u8,
    format: ZeroFormat,
) -> Result<Vec<u32>> {
    check_packable(n, bits, "out_features N")?;
    let cols = packed_len(n, bits);
    check_len(
        qzeros.len(),
        groups * cols,
        &format!("qzeros [{groups}, {cols}] for N={n}"),
    )?;
    let maxq = maxq(bits);
    let mut zeros = Vec::with_capacity(groups * n);
    for g in 0..groups {
        for i in 0..n {
            let field = get_field(qzeros, g * cols, 1, i, bits);
            zeros.push(match format {
                ZeroFormat::V1 => (field + 1) & maxq,
                ZeroFormat::V2 => field,
            });
        }
    }
    Ok(zeros)
}

/// The shape rules AutoGPTQ's and GPTQModel's packers assume (docs/formats.md §1.1): K divisible by 32
/// for every width, N by 32/b (by 32 for 3-bit). Stricter than what [`pack_qweight`] needs.
pub fn check_loader_shape(n: usize, k: usize, bits: u8) -> Result<()> {
    Bits::new(bits)?;
    if !k.is_multiple_of(32) {
        return Err(Error::InvalidArgument(format!(
            "in_features K={k} is not a multiple of 32, which GPTQ packers and loaders assume"
        )));
    }
    check_packable(n, bits, "out_features N")
}
