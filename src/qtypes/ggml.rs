//! ggml's block types as GGUF stores them: the type ids, each block's element count and byte
//! size, and dequantization of the common types to f32 (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
//! Q5_0, Q5_1 and the K-quants Q2_K–Q6_K).

use half::f16;
use rayon::prelude::*;

/// ggml tensor element types, with the ids used in GGUF files. Only some can be dequantized
/// (see [`GgmlType::SUPPORTED`]); the others are known so that files holding them still open
/// and their sizes can be validated.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

/// Elements per K-quant super-block.
const QK_K: usize = 256;

impl GgmlType {
    /// The types [`dequantize`] handles.
    pub const SUPPORTED: [GgmlType; 13] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    pub fn from_id(id: u32) -> Option<GgmlType> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            16 => IQ2_XXS,
            17 => IQ2_XS,
            18 => IQ3_XXS,
            19 => IQ1_S,
            20 => IQ4_NL,
            21 => IQ3_S,
            22 => IQ2_S,
            23 => IQ4_XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1_M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            IQ2_XXS => "IQ2_XXS",
            IQ2_XS => "IQ2_XS",
            IQ3_XXS => "IQ3_XXS",
            IQ1_S => "IQ1_S",
            IQ4_NL => "IQ4_NL",
            IQ3_S => "IQ3_S",
            IQ2_S => "IQ2_S",
            IQ4_XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1_M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
        }
    }

    /// (elements per block, bytes per block), as in ggml's type traits.
    pub fn block_layout(self) -> (usize, usize) {
        use GgmlType::*;
        match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            F64 | I64 => (1, 8),
            I8 => (1, 1),
            Q4_0 => (32, 2 + 16),
            Q4_1 => (32, 2 + 2 + 16),
            Q5_0 => (32, 2 + 4 + 16),
            Q5_1 => (32, 2 + 2 + 4 + 16),
            Q8_0 => (32, 2 + 32),
            Q8_1 => (32, 4 + 4 + 32),
            Q2_K => (QK_K, 2 + 2 + QK_K / 16 + QK_K / 4),
            Q3_K => (QK_K, 2 + QK_K / 4 + QK_K / 8 + 12),
            Q4_K => (QK_K, 2 + 2 + QK_K / 2 + 12),
            Q5_K => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 8 + 12),
            Q6_K => (QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16),
            Q8_K => (QK_K, 4 + QK_K + QK_K / 8),
            IQ2_XXS => (QK_K, 2 + QK_K / 4),
            IQ2_XS => (QK_K, 2 + QK_K / 4 + QK_K / 32),
            IQ3_XXS => (QK_K, 2 + QK_K / 4 + QK_K / 8),
            IQ1_S => (QK_K, 2 + QK_K / 8 + QK_K / 16),
            IQ4_NL => (32, 2 + 16),
            IQ3_S => (QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4),
            IQ2_S => (QK_K, 2 + QK_K / 4 + QK_K / 16),
            IQ4_XS => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 64),
            IQ1_M => (QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),
            TQ1_0 => (QK_K, 2 + 4 * 13),
            TQ2_0 => (QK_K, 2 + 64),
            MXFP4 => (32, 1 + 16),
        }
    }

    pub fn is_supported(self) -> bool {
        Self::SUPPORTED.contains(&self)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

pub fn supported_list() -> String {
    GgmlType::SUPPORTED
        .iter()
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Bytes a tensor of `dims` (ggml order) takes, with every overflow and block constraint checked.
pub fn tensor_byte_size(ty: GgmlType, dims: &[u64]) -> std::result::Result<u64, String> {
    let (block, type_size) = ty.block_layout();
    let numel = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= isize::MAX as u64)
        .ok_or_else(|| format!("dimensions {dims:?} overflow the element count"))?;
    let row = dims.first().copied().unwrap_or(1);
    if !row.is_multiple_of(block as u64) {
        return Err(format!(
            "row length {row} is not a multiple of the {ty} block size {block}"
        ));
    }
    (numel / block as u64)
        .checked_mul(type_size as u64)
        .filter(|&n| n <= isize::MAX as u64)
        .ok_or_else(|| format!("dimensions {dims:?} overflow the byte size"))
}

// ---------------------------------------------------------------------------------------------
// Dequantization. Block layouts follow ggml's `block_*` structs; the arithmetic is ordered as in
// gguf-py's reference (products first, then offsets) so results match it bit for bit.

/// Dequantize `bytes` of type `ty` into `out` (whose length gives the element count).
pub fn dequantize_into(
    ty: GgmlType,
    bytes: &[u8],
    out: &mut [f32],
) -> std::result::Result<(), String> {
    let (block, type_size) = ty.block_layout();
    if !out.len().is_multiple_of(block) || bytes.len() != out.len() / block * type_size {
        return Err(format!(
            "{} bytes of {ty} cannot hold {} values (blocks of {block} values in {type_size} bytes)",
            bytes.len(),
            out.len()
        ));
    }
    let kernel: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => deq_f32,
        GgmlType::F16 => deq_f16,
        GgmlType::BF16 => deq_bf16,
        GgmlType::Q8_0 => deq_q8_0,
        GgmlType::Q4_0 => deq_q4_0,
        GgmlType::Q4_1 => deq_q4_1,
        GgmlType::Q5_0 => deq_q5_0,
        GgmlType::Q5_1 => deq_q5_1,
        GgmlType::Q2_K => deq_q2_k,
        GgmlType::Q3_K => deq_q3_k,
        GgmlType::Q4_K => deq_q4_k,
        GgmlType::Q5_K => deq_q5_k,
        GgmlType::Q6_K => deq_q6_k,
        other => {
            return Err(format!(
                "unsupported GGUF tensor type {other} (supported: {})",
                supported_list()
            ))
        }
    };
    // The plain float kernels take any whole number of elements; the block kernels one block.
    let elems_per_call = if block == 1 { 4096 } else { block };
    let calls_per_task = (1 << 16) / elems_per_call;
    let task_elems = (elems_per_call * calls_per_task).max(block);
    let task_bytes = task_elems / block * type_size;
    let run = |(src, dst): (&[u8], &mut [f32])| {
        if block == 1 {
            kernel(src, dst);
        } else {
            for (b, y) in src.chunks_exact(type_size).zip(dst.chunks_exact_mut(block)) {
                kernel(b, y);
            }
        }
    };
    if out.len() <= task_elems {
        run((bytes, out));
    } else {
        bytes
            .par_chunks(task_bytes)
            .zip(out.par_chunks_mut(task_elems))
            .for_each(run);
    }
    Ok(())
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn deq_f32(b: &[u8], y: &mut [f32]) {
    for (c, v) in b.chunks_exact(4).zip(y) {
        *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

fn deq_f16(b: &[u8], y: &mut [f32]) {
    for (c, v) in b.chunks_exact(2).zip(y) {
        *v = f16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}

fn deq_bf16(b: &[u8], y: &mut [f32]) {
    for (c, v) in b.chunks_exact(2).zip(y) {
        *v = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
    }
}

/// d: f16, qs: 32 × i8.
fn deq_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (v, &q) in y.iter_mut().zip(&b[2..34]) {
        *v = (q as i8 as f32) * d;
    }
}

/// d: f16, qs: 16 bytes; element i < 16 is the low nibble of byte i, element 16 + i its high
/// nibble; value d·(q − 8).
fn deq_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for i in 0..16 {
        y[i] = d * ((qs[i] & 0x0F) as i32 - 8) as f32;
        y[i + 16] = d * ((qs[i] >> 4) as i32 - 8) as f32;
    }
}

/// d, m: f16, qs as Q4_0; value d·q + m.
fn deq_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for i in 0..16 {
        y[i] = d * (qs[i] & 0x0F) as f32 + m;
        y[i + 16] = d * (qs[i] >> 4) as f32 + m;
    }
}

/// d: f16, qh: u32 holding bit 4 of element i at bit i, qs as Q4_0; value d·(q − 16).
fn deq_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for i in 0..16 {
        let lo = (qs[i] & 0x0F) | ((((qh >> i) & 1) as u8) << 4);
        let hi = (qs[i] >> 4) | ((((qh >> (i + 16)) & 1) as u8) << 4);
        y[i] = d * (lo as i32 - 16) as f32;
        y[i + 16] = d * (hi as i32 - 16) as f32;
    }
}

/// d, m: f16, then qh and qs as Q5_0; value d·q + m.
fn deq_q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for i in 0..16 {
        let lo = (qs[i] & 0x0F) | ((((qh >> i) & 1) as u8) << 4);
        let hi = (qs[i] >> 4) | ((((qh >> (i + 16)) & 1) as u8) << 4);
        y[i] = d * lo as f32 + m;
        y[i + 16] = d * hi as f32 + m;
    }
}

/// scales: 16 bytes (low nibble scale, high nibble min, one per 16 elements), qs: 64 bytes of
/// 2-bit values, d, dmin: f16. Each 32-byte half of qs covers 128 elements: element
/// 128·h + 32·s + l is bits 2s..2s+2 of byte 32·h + l. Value (d·sc)·q − dmin·m.
fn deq_q2_k(b: &[u8], y: &mut [f32]) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    for h in 0..2 {
        for s in 0..4 {
            for l in 0..32 {
                let idx = 128 * h + 32 * s + l;
                let sc = scales[idx / 16];
                let dl = d * (sc & 0x0F) as f32;
                let ml = dmin * (sc >> 4) as f32;
                let q = (qs[32 * h + l] >> (2 * s)) & 3;
                y[idx] = dl * q as f32 - ml;
            }
        }
    }
}

/// hmask: 32 bytes (element 32·j + l has its high bit at bit j of byte l; a clear bit means
/// subtract 4), qs: 64 bytes of 2-bit values laid out as in Q2_K, scales: 12 bytes packing
/// sixteen 6-bit signed scales (offset 32), d: f16. Value (d·scale)·q.
fn deq_q3_k(b: &[u8], y: &mut [f32]) {
    let hmask = &b[0..32];
    let qs = &b[32..96];
    let packed = &b[96..108];
    let d = f16_at(b, 108);
    let mut dl = [0f32; 16];
    for (i, v) in dl.iter_mut().enumerate() {
        // Low 4 bits: nibble i/8 of byte i%8; high 2 bits: bits 2·(i/4).. of byte 8 + i%4.
        let low = (packed[i % 8] >> (4 * (i / 8))) & 0x0F;
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 0x03;
        let scale = (low | (high << 4)) as i32 - 32;
        *v = d * scale as f32;
    }
    for h in 0..2 {
        for s in 0..4 {
            for l in 0..32 {
                let idx = 128 * h + 32 * s + l;
                let low = ((qs[32 * h + l] >> (2 * s)) & 3) as i32;
                let high_clear = (hmask[l] >> (idx / 32)) & 1 == 0;
                let q = low - if high_clear { 4 } else { 0 };
                y[idx] = dl[idx / 16] * q as f32;
            }
        }
    }
}

/// Eight 6-bit (scale, min) pairs packed in 12 bytes, shared by Q4_K and Q5_K.
#[inline]
fn k_scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// d, dmin: f16, scales: 12 bytes, qs: 128 bytes; each 32-byte quarter of qs covers 64
/// elements (low nibbles, then high nibbles), one (scale, min) pair per 32 elements.
/// Value (d·sc)·q − dmin·m.
fn deq_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for j in 0..8 {
        let (sc, m) = k_scale_min(scales, j);
        let dl = d * sc as f32;
        let ml = dmin * m as f32;
        let bytes = &qs[32 * (j / 2)..32 * (j / 2) + 32];
        let shift = 4 * (j % 2);
        for (l, &q) in bytes.iter().enumerate() {
            y[32 * j + l] = dl * ((q >> shift) & 0x0F) as f32 - ml;
        }
    }
}

/// As Q4_K plus qh: 32 bytes giving bit 4 of element 32·j + l at bit j of byte l.
fn deq_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for j in 0..8 {
        let (sc, m) = k_scale_min(scales, j);
        let dl = d * sc as f32;
        let ml = dmin * m as f32;
        let bytes = &qs[32 * (j / 2)..32 * (j / 2) + 32];
        let shift = 4 * (j % 2);
        for (l, &q) in bytes.iter().enumerate() {
            let value = ((q >> shift) & 0x0F) | (((qh[l] >> j) & 1) << 4);
            y[32 * j + l] = dl * value as f32 - ml;
        }
    }
}

/// ql: 128 bytes of low nibbles, qh: 64 bytes of 2-bit high parts, scales: 16 × i8, d: f16.
/// Each half h covers 128 elements: element 128·h + 64·k + l (l < 64) takes nibble k of byte
/// 64·h + l of ql; element 128·h + 32·s + l (l < 32) takes bits 2s.. of byte 32·h + l of qh.
/// Value (d·scale)·(q − 32).
fn deq_q6_k(b: &[u8], y: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let scales = &b[192..208];
    let d = f16_at(b, 208);
    for h in 0..2 {
        for s in 0..4 {
            for l in 0..32 {
                let idx = 128 * h + 32 * s + l;
                let within = 32 * s + l; // 0..128 inside this half
                let low = (ql[64 * h + within % 64] >> (4 * (within / 64))) & 0x0F;
                let high = (qh[32 * h + l] >> (2 * s)) & 3;
                let q = (low | (high << 4)) as i32 - 32;
                let dl = d * (scales[idx / 16] as i8) as f32;
                y[idx] = dl * q as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_reject_overflow_and_partial_blocks() {
        assert_eq!(tensor_byte_size(GgmlType::Q4_0, &[64, 3]), Ok(3 * 2 * 18));
        assert!(tensor_byte_size(GgmlType::Q4_K, &[128, 2]).is_err());
        assert!(tensor_byte_size(GgmlType::F32, &[u64::MAX / 2, 3]).is_err());
        assert!(tensor_byte_size(GgmlType::F32, &[1 << 62, 1]).is_err());
    }
}
