//! Matmul kernels for bitsandbytes-style weights, kept packed in memory.
//!
//! * [`FourBitMatrix`] (NF4/FP4): for decoding, a matrix-vector product that decodes codes by
//!   table lookup on the fly — with AVX-512 the 16-entry code book, scaled by the block's absmax,
//!   sits in one register and `vpermps` turns 16 codes into 16 weights (exactly
//!   `quant_map[code] · absmax` in f32, as bitsandbytes dequantizes); for many rows, blocks of
//!   rows are dequantized into a cache-sized buffer and multiplied with a GEMM. Decoding may
//!   instead use integer arithmetic ([`FourBitDecode`]: `Int16`, `Int8`), with activations
//!   quantized per 64 and exact integer sums, as llama.cpp multiplies its 4-bit formats.
//!   `compute_dtype` f16/bf16 is emulated by rounding each dequantized weight, the activations
//!   and each output to it; sums stay f32 (as GPU kernels accumulate). Like bitsandbytes'
//!   `gemm_4bit`, weights are dequantized straight to the compute dtype, whatever dtype the
//!   weight had before quantization.
//! * [`Int8Matrix`] (LLM.int8): activations rounded to fp16; columns holding a value with
//!   |x| ≥ threshold are multiplied in f32 against the dequantized weight columns; the rest is
//!   quantized per row to int8 and multiplied int8 × int8 with exact integer sums, rescaled by
//!   `SCA·SCB·6.200124e-05` — the arithmetic of bitsandbytes' `int8_vectorwise_quant`,
//!   `int8_scaled_mm` and `int8_mixed_scaled_mm`. Or, in the "dequantized weights" mode, a
//!   float matmul against `CB · (SCB · 1/127)` (`MatMul8bitFp`).

use super::{gemm_serial, GEMV_MAX_ROWS};
use crate::error::Result;
use crate::kernels::LinearKernel;
use crate::qtypes::bnb::{
    int8_code, int8_scale, Absmax, FourBitWeight, Int8Compute, Int8Weight, INV_127,
};
use crate::tensor::WeightDType;
use half::f16;
use rayon::prelude::*;

/// Weight rows per parallel task (same trade-off as the dense row blocks).
const ROW_BLOCK: usize = 64;

/// Run `block(r0, r1, local)` for row blocks of an `[m, n]` output in parallel (`local` is
/// `[m, r1 − r0]`) and scatter the results into `out`.
fn parallel_row_blocks(
    n: usize,
    m: usize,
    out: &mut [f32],
    block: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    if m == 1 {
        // One row: each block's output is a slice of `out` already.
        out[..n]
            .par_chunks_mut(ROW_BLOCK)
            .enumerate()
            .for_each(|(b, local)| block(b * ROW_BLOCK, b * ROW_BLOCK + local.len(), local));
        return;
    }
    let parts: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(ROW_BLOCK))
        .into_par_iter()
        .map(|b| {
            let r0 = b * ROW_BLOCK;
            let r1 = (r0 + ROW_BLOCK).min(n);
            let mut local = vec![0f32; m * (r1 - r0)];
            block(r0, r1, &mut local);
            (r0, local)
        })
        .collect();
    for (r0, local) in parts {
        let w = local.len() / m.max(1);
        for r in 0..m {
            out[r * n + r0..r * n + r0 + w].copy_from_slice(&local[r * w..(r + 1) * w]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4-bit

/// How the matrix-vector product for decoding (at most `GEMV_MAX_ROWS` activation rows)
/// multiplies 4-bit weights. Prefill and perplexity (many rows) are exact either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FourBitDecode {
    /// bitsandbytes' arithmetic: weights `quant_map[code] · absmax` in the compute dtype.
    #[default]
    Exact,
    /// Integer arithmetic, as llama.cpp multiplies its 4-bit formats: the code book as 14-bit
    /// integers, each 64 activations as 15-bit integers with their own scale, exact i32 sums
    /// (`vpmaddwd`) scaled by absmax once per 64 weights. About 1e-4 relative from `Exact`,
    /// and about twice as fast.
    Int16,
    /// Byte arithmetic, as llama.cpp's Q4_0 × Q8_0 and IQ4_NL × Q8_0: the code book as 7-bit
    /// integers (stored with an offset of 64 so they are unsigned), each 64 activations as
    /// 8-bit integers with their own scale, exact i32 sums (`vpmaddubsw`). The code book and
    /// activation roundings make it about 2e-3 relative from `Exact` per dot product (+2.7%
    /// token-by-token perplexity on SmolLM2); the fewest instructions per weight.
    Int8,
}

impl FourBitDecode {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "exact" => Ok(FourBitDecode::Exact),
            "int16" => Ok(FourBitDecode::Int16),
            "int8" => Ok(FourBitDecode::Int8),
            _ => Err(crate::error::Error::InvalidArgument(format!(
                "unknown 4-bit decode '{s}' (expected exact, int16 or int8)"
            ))),
        }
    }
}

/// Largest code-book integer of the `Int16` decode (14 bits) and largest activation integer
/// (15 bits): a lane of `vpmaddwd` sums over 64 weights holds 8 products, 8 · 8191 · 16383 <
/// 2^31, so the i32 sums are exact.
const TABLE_INT_MAX: f32 = 8191.0;
const ACT_INT_MAX: f32 = 16383.0;
/// Activations sharing one scale in the integer decodes (and the weights one step decodes).
const INT_CHUNK: usize = 64;
/// The `Int8` decode's code book: `round(value / max|value| · 63.5)` in [−64, 64], stored plus
/// 64 as u8 in [0, 128]. Activations are in [−127, 127], so a `vpmaddubsw` pair sum is at most
/// 2 · 128 · 127 = 32512 and never saturates i16.
const TABLE8_HALF_RANGE: f32 = 63.5;
const TABLE8_OFFSET: i32 = 64;
const ACT8_MAX: f32 = 127.0;

/// A packed NF4/FP4 weight with its matmul.
pub struct FourBitMatrix {
    q: FourBitWeight,
    compute: WeightDType,
    decode: FourBitDecode,
    /// The code book as integers for the `Int16` decode, and the factor back to its values.
    table_int: [i16; 16],
    table_scale: f32,
    /// The same for the `Int8` decode (offset by `TABLE8_OFFSET`).
    table_u8: [u8; 16],
    table8_scale: f32,
}

impl FourBitMatrix {
    /// Validate the packed weight (lengths, finite statistics) and wrap it.
    pub fn new(q: FourBitWeight, compute: WeightDType) -> Result<Self> {
        q.validate()?;
        let qmax = q.quant_map.iter().fold(0f32, |a, v| a.max(v.abs()));
        let table_scale = if qmax > 0.0 {
            qmax / TABLE_INT_MAX
        } else {
            1.0
        };
        let table_int = q.quant_map.map(|v| (v / table_scale).round() as i16);
        let table8_scale = table_scale * TABLE_INT_MAX / TABLE8_HALF_RANGE;
        let table_u8 = q
            .quant_map
            .map(|v| ((v / table8_scale).round() as i32 + TABLE8_OFFSET) as u8);
        Ok(FourBitMatrix {
            q,
            compute,
            decode: FourBitDecode::Exact,
            table_int,
            table_scale,
            table_u8,
            table8_scale,
        })
    }
    /// Choose the decoding arithmetic (see [`FourBitDecode`]).
    pub fn with_decode(mut self, decode: FourBitDecode) -> Self {
        self.decode = decode;
        self
    }
    /// The packed weight as stored (for saving).
    pub fn weight(&self) -> &FourBitWeight {
        &self.q
    }
    pub fn compute_dtype(&self) -> WeightDType {
        self.compute
    }
    fn k(&self) -> usize {
        self.q.shape[1]
    }
    /// No rounding anywhere: the table-lookup fast path applies.
    fn exact_f32(&self) -> bool {
        self.compute == WeightDType::F32
    }
    /// Rows start on block boundaries (so a row is whole blocks and whole bytes).
    fn rows_aligned(&self) -> bool {
        self.k().is_multiple_of(self.q.blocksize)
    }
    #[inline]
    fn block_absmax(&self, b: usize) -> f32 {
        self.q.absmax.get(b)
    }
    /// The statistics of blocks `blocks`: borrowed when stored plain, decoded when nested.
    fn rows_absmax(&self, blocks: std::ops::Range<usize>) -> std::borrow::Cow<'_, [f32]> {
        match &self.q.absmax {
            Absmax::Plain(v) => std::borrow::Cow::Borrowed(&v[blocks]),
            Absmax::Nested(n) => blocks.map(|b| n.get(b)).collect(),
        }
    }
    /// Dequantize rows `r0..r1` into `out` (`[r1 − r0, K]`), rounded as the compute emulation asks.
    fn decode_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let k = self.k();
        let bs = self.q.blocksize;
        let lut = &self.q.quant_map;
        if self.rows_aligned() {
            for (j, row) in (r0..r1).zip(out.chunks_exact_mut(k)) {
                let bytes = &self.q.packed[j * k / 2..(j + 1) * k / 2];
                for (bi, (ob, pb)) in row
                    .chunks_exact_mut(bs)
                    .zip(bytes.chunks_exact(bs / 2))
                    .enumerate()
                {
                    let am = self.block_absmax(j * k / bs + bi);
                    for (o, &p) in ob.chunks_exact_mut(2).zip(pb) {
                        o[0] = lut[(p >> 4) as usize] * am;
                        o[1] = lut[(p & 15) as usize] * am;
                    }
                }
            }
        } else {
            for (j, row) in (r0..r1).zip(out.chunks_exact_mut(k)) {
                for (c, o) in row.iter_mut().enumerate() {
                    let i = j * k + c;
                    *o = lut[self.q.code_at(i) as usize] * self.block_absmax(i / bs);
                }
            }
        }
        if !self.exact_f32() {
            for v in out.iter_mut() {
                *v = self.compute.round(*v);
            }
        }
    }
    fn round_input(&self, x: &[f32]) -> Option<Vec<f32>> {
        (self.compute != WeightDType::F32)
            .then(|| x.iter().map(|&v| self.compute.round(v)).collect())
    }
    fn round_output(&self, out: &mut [f32]) {
        if self.compute != WeightDType::F32 {
            for v in out.iter_mut() {
                *v = self.compute.round(*v);
            }
        }
    }
    /// Rows `r0..r1` for `m` activation rows, `out` `[m, r1 − r0]`; `x` already rounded.
    fn rows_kernel(&self, x: &[f32], m: usize, r0: usize, r1: usize, out: &mut [f32]) {
        let k = self.k();
        let rows = r1 - r0;
        if m <= GEMV_MAX_ROWS && self.int_applies() {
            self.with_int_input(x, m, |xa| self.gemv_int(xa, m, r0, r1, out));
        } else if self.exact_f32() && self.rows_aligned() {
            self.gemv_lookup(x, m, r0, r1, out);
        } else {
            let mut w = vec![0f32; rows * k];
            self.decode_rows(r0, r1, &mut w);
            super::gemv_block(x, m, k, &w, out);
        }
    }
    /// Table-lookup matrix-vector product (f32, rows aligned to blocks).
    fn gemv_lookup(&self, x: &[f32], m: usize, r0: usize, r1: usize, out: &mut [f32]) {
        let k = self.k();
        let bs = self.q.blocksize;
        let rows = r1 - r0;
        let nb_row = k / bs;
        let absmax = self.rows_absmax(r0 * nb_row..r1 * nb_row);
        let packed = &self.q.packed[r0 * k / 2..r1 * k / 2];
        #[cfg(target_arch = "x86_64")]
        {
            // Each kernel wants x with every chunk of `chunk` elements split into its even then
            // its odd elements: the order in which its decoding yields high and low nibbles.
            let simd = if super::has_avx512() {
                Some((lookup_avx512::gemv as LookupGemv, 32))
            } else if super::has_avx2() {
                Some((lookup_avx2::gemv as LookupGemv, 8))
            } else {
                None
            };
            if let Some((kernel, chunk)) = simd {
                let mut xp = vec![0f32; m * k];
                for (src, dst) in x.chunks_exact(chunk).zip(xp.chunks_exact_mut(chunk)) {
                    for i in 0..chunk / 2 {
                        dst[i] = src[2 * i];
                        dst[chunk / 2 + i] = src[2 * i + 1];
                    }
                }
                for g in (0..m).step_by(4) {
                    let mg = (m - g).min(4);
                    let mut tmp = vec![0f32; mg * rows];
                    // SAFETY: the CPU has the kernel's features (checked above); slice lengths:
                    // xp rows are K long (K a multiple of 32), packed holds rows·K/2 bytes,
                    // absmax rows·K/bs entries, tmp mg·rows.
                    unsafe {
                        kernel(
                            &xp[g * k..(g + mg) * k],
                            mg,
                            k,
                            bs,
                            packed,
                            &absmax,
                            &self.q.quant_map,
                            &mut tmp,
                        )
                    };
                    for r in 0..mg {
                        out[(g + r) * rows..(g + r + 1) * rows]
                            .copy_from_slice(&tmp[r * rows..(r + 1) * rows]);
                    }
                }
                return;
            }
        }
        {
            let lut = &self.q.quant_map;
            for j in 0..rows {
                let prow = &packed[j * k / 2..(j + 1) * k / 2];
                for r in 0..m {
                    let xr = &x[r * k..(r + 1) * k];
                    let mut acc = 0f32;
                    for (b, (pb, xb)) in prow
                        .chunks_exact(bs / 2)
                        .zip(xr.chunks_exact(bs))
                        .enumerate()
                    {
                        let am = absmax[j * nb_row + b];
                        let mut s = 0f32;
                        for (&p, xx) in pb.iter().zip(xb.chunks_exact(2)) {
                            s += lut[(p >> 4) as usize] * am * xx[0]
                                + lut[(p & 15) as usize] * am * xx[1];
                        }
                        acc += s;
                    }
                    out[r * rows + j] = acc;
                }
            }
        }
    }
}

/// Activations prepared for an integer decode (`Int16` or `Int8`).
#[derive(Default)]
struct IntActivations {
    /// The input they were made from (`[m, K]`), the decode and the code book scale folded
    /// into `scales`: the key under which a thread reuses them.
    x: Vec<f32>,
    decode: FourBitDecode,
    table_scale: f32,
    /// `Int16`: `[m, K]` integers, each chunk of 64 in the kernel's order ([`INT16_ORDER`]).
    codes16: Vec<i16>,
    /// `Int8`: `[m, K]` integers in [−127, 127], each chunk of 64 in [`INT8_ORDER`].
    codes8: Vec<i8>,
    /// `Int8`: `[m, K / 64]`, 8 · Σ codes of the chunk: what each of the kernel's 8 i32 lanes
    /// subtracts to remove the code book's offset (64 · Σ codes in all).
    offsets: Vec<i32>,
    /// `[m, K / 64]`: chunk scale times the code book's scale (NaN for a chunk holding a
    /// non-finite value, so the output is NaN as in float arithmetic).
    scales: Vec<f32>,
}

thread_local! {
    /// The last activations this thread prepared: decoding sends one input through several
    /// projections (q, k, v; gate, up) split into row blocks, and each block would otherwise
    /// prepare it again.
    static INT_INPUT: std::cell::RefCell<IntActivations> =
        std::cell::RefCell::new(IntActivations::default());
}

/// Position `p` of a prepared `Int16` 64-chunk holds activation `INT16_ORDER[p]`: the order in
/// which the AVX2 kernel's nibble split and byte unpacking yield the weights (vector `v` of 16
/// lanes: even (v < 2) or odd elements, of bytes `lane·16 + (v % 2)·8 + i`).
const INT16_ORDER: [u8; INT_CHUNK] = {
    let mut order = [0u8; INT_CHUNK];
    let mut p = 0;
    while p < INT_CHUNK {
        let (v, lane, i) = (p / 16, (p % 16) / 8, p % 8);
        let byte = lane * 16 + (v % 2) * 8 + i;
        order[p] = (2 * byte + v / 2) as u8;
        p += 1;
    }
    order
};

/// Position `p` of a prepared `Int8` 64-chunk holds activation `INT8_ORDER[p]`: the 32 even
/// elements (high nibbles, byte order), then the 32 odd ones.
const INT8_ORDER: [u8; INT_CHUNK] = {
    let mut order = [0u8; INT_CHUNK];
    let mut p = 0;
    while p < INT_CHUNK {
        order[p] = if p < 32 { 2 * p } else { 2 * (p - 32) + 1 } as u8;
        p += 1;
    }
    order
};

impl FourBitMatrix {
    /// An integer decode runs when chosen, rows are whole blocks, and blocks a power of two of
    /// 64-weight chunks (bitsandbytes' block sizes all are).
    fn int_applies(&self) -> bool {
        self.decode != FourBitDecode::Exact
            && self.rows_aligned()
            && self.q.blocksize.is_multiple_of(INT_CHUNK)
            && (self.q.blocksize / INT_CHUNK).is_power_of_two()
    }

    /// The factor from this decode's integer code book back to its values.
    fn int_table_scale(&self) -> f32 {
        match self.decode {
            FourBitDecode::Int8 => self.table8_scale,
            _ => self.table_scale,
        }
    }

    /// Quantize `[m, K]` activations per 64 to integers, reordered for the kernel.
    fn prepare_int(&self, x: &[f32], m: usize) -> IntActivations {
        let mut xa = IntActivations::default();
        self.prepare_int_into(x, m, &mut xa);
        xa
    }

    fn prepare_int_into(&self, x: &[f32], m: usize, xa: &mut IntActivations) {
        let k = self.k();
        let x = &x[..m * k];
        let int8 = self.decode == FourBitDecode::Int8;
        let act_max = if int8 { ACT8_MAX } else { ACT_INT_MAX };
        let table_scale = self.int_table_scale();
        xa.x.clear();
        xa.x.extend_from_slice(x);
        xa.decode = self.decode;
        xa.table_scale = table_scale;
        xa.codes16.clear();
        xa.codes8.clear();
        if int8 {
            xa.codes8.resize(m * k, 0);
        } else {
            xa.codes16.resize(m * k, 0);
        }
        xa.offsets.clear();
        xa.scales.clear();
        // Adding and subtracting 1.5·2^23 rounds an f32 below 2^22 to the nearest integer
        // (ties to even) without a call into libm.
        const ROUND: f32 = 12_582_912.0;
        for (ci, xc) in x.chunks_exact(INT_CHUNK).enumerate() {
            let amax = xc.iter().fold(0f32, |a, v| a.max(v.abs()));
            let (scale, offset) = if !xc.iter().all(|v| v.is_finite()) {
                (f32::NAN, 0)
            } else if amax == 0.0 {
                (0.0, 0)
            } else {
                let inv = act_max / amax;
                let q = |src: u8| (xc[src as usize] * inv + ROUND) - ROUND;
                let chunk = ci * INT_CHUNK..(ci + 1) * INT_CHUNK;
                let mut sum = 0i32;
                if int8 {
                    for (c, &src) in xa.codes8[chunk].iter_mut().zip(INT8_ORDER.iter()) {
                        *c = q(src) as i8;
                        sum += *c as i32;
                    }
                } else {
                    for (c, &src) in xa.codes16[chunk].iter_mut().zip(INT16_ORDER.iter()) {
                        *c = q(src) as i16;
                    }
                }
                (amax / act_max * table_scale, sum * TABLE8_OFFSET / 8)
            };
            xa.scales.push(scale);
            if int8 {
                xa.offsets.push(offset);
            }
        }
    }

    /// Run `f` on `x` prepared for this matrix's integer decode, from this thread's cache when
    /// it holds the same input.
    fn with_int_input<R>(&self, x: &[f32], m: usize, f: impl FnOnce(&IntActivations) -> R) -> R {
        let x = &x[..m * self.k()];
        let table_scale = self.int_table_scale();
        INT_INPUT.with(|cell| match cell.try_borrow_mut() {
            Ok(mut xa) => {
                let same = xa.decode == self.decode
                    && xa.table_scale == table_scale
                    && bytemuck::cast_slice::<f32, u32>(&xa.x)
                        == bytemuck::cast_slice::<f32, u32>(x);
                if !same {
                    self.prepare_int_into(x, m, &mut xa);
                }
                f(&xa)
            }
            // A nested call on this thread (not expected) prepares its own copy.
            Err(_) => f(&self.prepare_int(x, m)),
        })
    }

    /// Rows `r0..r1` of the integer decode for `m ≤ GEMV_MAX_ROWS` inputs, `out`
    /// `[m, r1 − r0]`.
    fn gemv_int(&self, xa: &IntActivations, m: usize, r0: usize, r1: usize, out: &mut [f32]) {
        assert!(
            m <= GEMV_MAX_ROWS,
            "the integer decodes take at most {GEMV_MAX_ROWS} rows"
        );
        let (k, bs) = (self.k(), self.q.blocksize);
        let absmax = self.rows_absmax(r0 * k / bs..r1 * k / bs);
        let packed = &self.q.packed[r0 * k / 2..r1 * k / 2];
        #[cfg(target_arch = "x86_64")]
        let avx2 = super::has_avx2();
        // SAFETY (the AVX2 kernels): AVX2/FMA are available; `xa` holds m rows of K codes (K a
        // multiple of 64) and K/64 scales (and offsets) each, `w` whole rows, `out` m·rows.
        match xa.decode {
            FourBitDecode::Int8 => {
                let w = IntRows::new(k, bs, packed, &absmax, &self.table_u8);
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    return unsafe { lookup_int_avx2::gemv8(&w, xa, m, out) };
                }
                gemv_int8_scalar(&w, xa, m, out);
            }
            _ => {
                let w = IntRows::new(k, bs, packed, &absmax, &self.table_int);
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    return unsafe { lookup_int_avx2::gemv16(&w, xa, m, out) };
                }
                gemv_int16_scalar(&w, xa, m, out);
            }
        }
    }
}

/// The weight side of an integer decode: rows of packed codes (`K/2` bytes each), their block
/// statistics and the integer code book.
struct IntRows<'a, T> {
    k: usize,
    bs: usize,
    packed: &'a [u8],
    absmax: &'a [f32],
    table: &'a [T; 16],
}

impl<'a, T> IntRows<'a, T> {
    fn new(k: usize, bs: usize, packed: &'a [u8], absmax: &'a [f32], table: &'a [T; 16]) -> Self {
        IntRows {
            k,
            bs,
            packed,
            absmax,
            table,
        }
    }
    fn rows(&self) -> usize {
        self.packed.len() * 2 / self.k
    }
    /// The code of weight `e` (in 0..64) of chunk `c` of row `j`.
    fn code(&self, j: usize, c: usize, e: u8) -> usize {
        let byte = self.packed[j * self.k / 2 + c * INT_CHUNK / 2 + e as usize / 2];
        (if e.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 15
        }) as usize
    }
    /// The absmax of the block holding chunk `c` of row `j`.
    fn chunk_absmax(&self, j: usize, c: usize) -> f32 {
        self.absmax[j * (self.k / self.bs) + c * INT_CHUNK / self.bs]
    }
}

/// The integer decodes without SIMD: `chunk_sum(j, r, c)` is the exact integer sum the SIMD
/// kernel computes, so the results agree up to the order of the float additions.
fn gemv_int_scalar<T>(
    w: &IntRows<T>,
    xa: &IntActivations,
    m: usize,
    out: &mut [f32],
    chunk_sum: impl Fn(usize, usize, usize) -> i32,
) {
    let (rows, nchunk) = (w.rows(), w.k / INT_CHUNK);
    for j in 0..rows {
        for r in 0..m {
            let mut acc = 0f32;
            for c in 0..nchunk {
                let s = chunk_sum(j, r, c);
                acc += s as f32 * (w.chunk_absmax(j, c) * xa.scales[r * nchunk + c]);
            }
            out[r * rows + j] = acc;
        }
    }
}

fn gemv_int16_scalar(w: &IntRows<i16>, xa: &IntActivations, m: usize, out: &mut [f32]) {
    gemv_int_scalar(w, xa, m, out, |j, r, c| {
        let xq = &xa.codes16[r * w.k + c * INT_CHUNK..][..INT_CHUNK];
        xq.iter()
            .zip(INT16_ORDER.iter())
            .map(|(&q, &e)| w.table[w.code(j, c, e)] as i32 * q as i32)
            .sum()
    });
}

fn gemv_int8_scalar(w: &IntRows<u8>, xa: &IntActivations, m: usize, out: &mut [f32]) {
    let nchunk = w.k / INT_CHUNK;
    gemv_int_scalar(w, xa, m, out, |j, r, c| {
        let xq = &xa.codes8[r * w.k + c * INT_CHUNK..][..INT_CHUNK];
        let s: i32 = xq
            .iter()
            .zip(INT8_ORDER.iter())
            .map(|(&q, &e)| w.table[w.code(j, c, e)] as i32 * q as i32)
            .sum();
        s - 8 * xa.offsets[r * nchunk + c]
    });
}

/// The integer decodes with AVX2. Per 64 weights, 32 packed bytes split into high nibbles (even
/// elements) and low nibbles (odd), and `vpshufb` looks the codes up in the integer code book:
/// * `Int16`: two lookups per half (low and high bytes of the 14-bit code book), unpacked into
///   four vectors of 16 i16 weights; `vpmaddwd` against the 15-bit activations sums exactly in
///   i32.
/// * `Int8`: one lookup per half (the 7-bit code book stored +64 as unsigned bytes);
///   `vpmaddubsw` against the 8-bit activations (pair sums fit i16, see `TABLE8_OFFSET`),
///   `vpmaddwd` by ones to i32, less the chunk's offset correction: exact signed sums.
///
/// Both share one row loop ([`gemv_rows`]); a [`ChunkDot`] says how a chunk is decoded and
/// multiplied.
#[cfg(target_arch = "x86_64")]
mod lookup_int_avx2 {
    use super::lookup_avx2::hsum;
    use super::{IntActivations, IntRows, INT_CHUNK};
    use crate::kernels::{prefetch, PREFETCH_AHEAD};
    use std::arch::x86_64::*;

    /// One integer decode's arithmetic on a 64-weight chunk.
    trait ChunkDot {
        type Weights;
        /// The 64 weights of the 32 packed bytes at `p`.
        unsafe fn decode(&self, p: *const u8) -> Self::Weights;
        /// Σ w · x against prepared activation chunk `i` (of the `[m, K/64]` chunks), as f32
        /// lanes of the exact integer sums.
        unsafe fn dot(&self, w: &Self::Weights, i: usize) -> __m256;
    }

    /// The high nibbles (even elements) and low nibbles (odd) of the 32 bytes at `p`.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> (__m256i, __m256i) {
        let nib = _mm256_set1_epi8(15);
        let bytes = _mm256_loadu_si256(p as *const __m256i);
        let even = _mm256_and_si256(_mm256_srli_epi16::<4>(bytes), nib);
        (even, _mm256_and_si256(bytes, nib))
    }

    struct Int16Dot {
        lo: __m256i,
        hi: __m256i,
        codes: *const i16,
    }

    impl ChunkDot for Int16Dot {
        type Weights = [__m256i; 4];
        #[inline(always)]
        unsafe fn decode(&self, p: *const u8) -> [__m256i; 4] {
            let (even, odd) = nibbles(p);
            let (el, eh) = (
                _mm256_shuffle_epi8(self.lo, even),
                _mm256_shuffle_epi8(self.hi, even),
            );
            let (ol, oh) = (
                _mm256_shuffle_epi8(self.lo, odd),
                _mm256_shuffle_epi8(self.hi, odd),
            );
            // Order: see `INT16_ORDER`.
            [
                _mm256_unpacklo_epi8(el, eh),
                _mm256_unpackhi_epi8(el, eh),
                _mm256_unpacklo_epi8(ol, oh),
                _mm256_unpackhi_epi8(ol, oh),
            ]
        }
        #[inline(always)]
        unsafe fn dot(&self, w: &[__m256i; 4], i: usize) -> __m256 {
            let x = self.codes.add(i * INT_CHUNK) as *const __m256i;
            let s01 = _mm256_add_epi32(
                _mm256_madd_epi16(w[0], _mm256_loadu_si256(x)),
                _mm256_madd_epi16(w[1], _mm256_loadu_si256(x.add(1))),
            );
            let s23 = _mm256_add_epi32(
                _mm256_madd_epi16(w[2], _mm256_loadu_si256(x.add(2))),
                _mm256_madd_epi16(w[3], _mm256_loadu_si256(x.add(3))),
            );
            _mm256_cvtepi32_ps(_mm256_add_epi32(s01, s23))
        }
    }

    struct Int8Dot {
        table: __m256i,
        codes: *const i8,
        offsets: *const i32,
    }

    impl ChunkDot for Int8Dot {
        type Weights = [__m256i; 2];
        #[inline(always)]
        unsafe fn decode(&self, p: *const u8) -> [__m256i; 2] {
            let (even, odd) = nibbles(p);
            // Order: see `INT8_ORDER`.
            [
                _mm256_shuffle_epi8(self.table, even),
                _mm256_shuffle_epi8(self.table, odd),
            ]
        }
        #[inline(always)]
        unsafe fn dot(&self, w: &[__m256i; 2], i: usize) -> __m256 {
            let x = self.codes.add(i * INT_CHUNK) as *const __m256i;
            let ones = _mm256_set1_epi16(1);
            let s0 = _mm256_madd_epi16(_mm256_maddubs_epi16(w[0], _mm256_loadu_si256(x)), ones);
            let s1 = _mm256_madd_epi16(
                _mm256_maddubs_epi16(w[1], _mm256_loadu_si256(x.add(1))),
                ones,
            );
            let offset = _mm256_set1_epi32(*self.offsets.add(i));
            _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_add_epi32(s0, s1), offset))
        }
    }

    /// `out[r, j] = Σ_c W[j, c] · x[r, c]` for `m ≤ 4` prepared input rows, `Int16` decode.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gemv16(w: &IntRows<i16>, xa: &IntActivations, m: usize, out: &mut [f32]) {
        let lo: [u8; 16] = std::array::from_fn(|v| w.table[v].to_le_bytes()[0]);
        let hi: [u8; 16] = std::array::from_fn(|v| w.table[v].to_le_bytes()[1]);
        let lo = _mm_loadu_si128(lo.as_ptr() as *const __m128i);
        let hi = _mm_loadu_si128(hi.as_ptr() as *const __m128i);
        let d = Int16Dot {
            lo: _mm256_set_m128i(lo, lo),
            hi: _mm256_set_m128i(hi, hi),
            codes: xa.codes16.as_ptr(),
        };
        debug_assert!(xa.codes16.len() >= m * w.k);
        gemv_m(&d, w, &xa.scales, m, out);
    }

    /// `out[r, j] = Σ_c W[j, c] · x[r, c]` for `m ≤ 4` prepared input rows, `Int8` decode.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gemv8(w: &IntRows<u8>, xa: &IntActivations, m: usize, out: &mut [f32]) {
        let t = _mm_loadu_si128(w.table.as_ptr() as *const __m128i);
        let d = Int8Dot {
            table: _mm256_set_m128i(t, t),
            codes: xa.codes8.as_ptr(),
            offsets: xa.offsets.as_ptr(),
        };
        debug_assert!(xa.codes8.len() >= m * w.k && xa.offsets.len() == xa.scales.len());
        gemv_m(&d, w, &xa.scales, m, out);
    }

    #[inline(always)]
    unsafe fn gemv_m<T, D: ChunkDot>(d: &D, w: &IntRows<T>, xs: &[f32], m: usize, out: &mut [f32]) {
        match m {
            1 => gemv_rows::<1, T, D>(d, w, xs, out),
            2 => gemv_rows::<2, T, D>(d, w, xs, out),
            3 => gemv_rows::<3, T, D>(d, w, xs, out),
            _ => gemv_rows::<4, T, D>(d, w, xs, out),
        }
    }

    /// The row loop; `w.table` is unused here (the code book is in `d`).
    #[inline(always)]
    unsafe fn gemv_rows<const M: usize, T, D: ChunkDot>(
        d: &D,
        w: &IntRows<T>,
        xs: &[f32],
        out: &mut [f32],
    ) {
        let (k, bs, packed, absmax) = (w.k, w.bs, w.packed, w.absmax);
        debug_assert!(k.is_multiple_of(INT_CHUNK) && bs.is_multiple_of(INT_CHUNK));
        debug_assert!(xs.len() >= M * k / INT_CHUNK);
        let rows = w.rows();
        let nb_row = k / bs;
        // Chunk c lies in block c >> shift (blocks are a power of two of chunks).
        let shift = (bs / INT_CHUNK).trailing_zeros();
        let nchunk = k / INT_CHUNK;
        // One input row (decoding proper): two weight rows at a time share the input loads,
        // two chunks per step (a cache line of each row) give four independent chains.
        let pairs = if M == 1 { rows / 2 } else { 0 };
        let chunk = |row: *const u8, am: *const f32, c: usize| {
            let scale = *am.add(c >> shift) * *xs.get_unchecked(c);
            (d.dot(&d.decode(row.add(c * 32)), c), _mm256_set1_ps(scale))
        };
        for jp in 0..pairs {
            let j = 2 * jp;
            let p0 = packed.as_ptr().add(j * k / 2);
            let p1 = p0.add(k / 2);
            let a0 = absmax.as_ptr().add(j * nb_row);
            let a1 = a0.add(nb_row);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c + 2 <= nchunk {
                prefetch(p0.wrapping_add(c * 32 + PREFETCH_AHEAD));
                prefetch(p1.wrapping_add(c * 32 + PREFETCH_AHEAD));
                for (t, (row, am)) in [(p0, a0), (p1, a1), (p0, a0), (p1, a1)]
                    .into_iter()
                    .enumerate()
                {
                    let (s, scale) = chunk(row, am, c + t / 2);
                    acc[t] = _mm256_fmadd_ps(s, scale, acc[t]);
                }
                c += 2;
            }
            if c < nchunk {
                for (t, (row, am)) in [(p0, a0), (p1, a1)].into_iter().enumerate() {
                    let (s, scale) = chunk(row, am, c);
                    acc[t] = _mm256_fmadd_ps(s, scale, acc[t]);
                }
            }
            *out.get_unchecked_mut(j) = hsum(_mm256_add_ps(acc[0], acc[2]));
            *out.get_unchecked_mut(j + 1) = hsum(_mm256_add_ps(acc[1], acc[3]));
        }
        // Even and odd chunks in separate sums, added as the pair loop adds them: a row gives
        // the same bits whichever loop computes it (`forward_rows` on any row range agrees with
        // `forward`).
        for j in 2 * pairs..rows {
            let prow = packed.as_ptr().add(j * k / 2);
            let am = absmax.as_ptr().add(j * nb_row);
            let mut acc = [[_mm256_setzero_ps(); 2]; M];
            for c in 0..nchunk {
                if c % 2 == 0 {
                    prefetch(prow.wrapping_add(c * 32 + PREFETCH_AHEAD));
                }
                let wv = d.decode(prow.add(c * 32));
                let amc = *am.add(c >> shift);
                for (r, a) in acc.iter_mut().enumerate() {
                    let i = r * nchunk + c;
                    let scale = _mm256_set1_ps(amc * *xs.get_unchecked(i));
                    a[c % 2] = _mm256_fmadd_ps(d.dot(&wv, i), scale, a[c % 2]);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                *out.get_unchecked_mut(r * rows + j) = hsum(_mm256_add_ps(a[0], a[1]));
            }
        }
    }
}

/// A table-lookup kernel: `(xp, m, k, bs, packed, absmax, quant_map, out)`.
#[cfg(target_arch = "x86_64")]
type LookupGemv = unsafe fn(&[f32], usize, usize, usize, &[u8], &[f32], &[f32; 16], &mut [f32]);

#[cfg(target_arch = "x86_64")]
mod lookup_avx512 {
    use std::arch::x86_64::*;

    /// `out[r, j] = Σ_c W[j, c] · x[r, c]` for `m ≤ 4` activation rows given with each chunk
    /// of 32 elements split into 16 even then 16 odd. Per block the code book is multiplied by the block's absmax once, so each
    /// lookup yields `quant_map[code] · absmax` exactly.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gemv(
        xp: &[f32],
        m: usize,
        k: usize,
        bs: usize,
        packed: &[u8],
        absmax: &[f32],
        lut: &[f32; 16],
        out: &mut [f32],
    ) {
        match m {
            1 => gemv_m::<1>(xp, k, bs, packed, absmax, lut, out),
            2 => gemv_m::<2>(xp, k, bs, packed, absmax, lut, out),
            3 => gemv_m::<3>(xp, k, bs, packed, absmax, lut, out),
            _ => gemv_m::<4>(xp, k, bs, packed, absmax, lut, out),
        }
    }

    /// Decode 32 weights (16 packed bytes at `p`) with the scaled table: (even, odd) elements.
    #[inline(always)]
    unsafe fn decode32(p: *const u8, scaled: __m512) -> (__m512, __m512) {
        let idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
        // vpermps uses the low 4 bits of each index: the low nibble (odd element) as is, the
        // high nibble (even element) after a shift.
        let odd = _mm512_permutexvar_ps(idx, scaled);
        let even = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(idx), scaled);
        (even, odd)
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn gemv_m<const M: usize>(
        xp: &[f32],
        k: usize,
        bs: usize,
        packed: &[u8],
        absmax: &[f32],
        lut: &[f32; 16],
        out: &mut [f32],
    ) {
        debug_assert!(k.is_multiple_of(32) && bs.is_multiple_of(32) && xp.len() >= M * k);
        let rows = packed.len() * 2 / k;
        let nb_row = k / bs;
        let chunks = bs / 32;
        let lutv = _mm512_loadu_ps(lut.as_ptr());
        let xptr = xp.as_ptr();
        for j in 0..rows {
            let prow = packed.as_ptr().add(j * k / 2);
            // Two independent accumulator sets (alternate chunks) so consecutive FMAs do not
            // wait on each other's latency.
            let mut a0 = [_mm512_setzero_ps(); M];
            let mut a1 = [_mm512_setzero_ps(); M];
            for b in 0..nb_row {
                let am = _mm512_set1_ps(*absmax.get_unchecked(j * nb_row + b));
                let scaled = _mm512_mul_ps(lutv, am);
                let base = b * bs;
                let mut c = 0;
                while c + 1 < chunks {
                    let off0 = base + c * 32;
                    let off1 = off0 + 32;
                    let (e0, o0) = decode32(prow.add(off0 / 2), scaled);
                    let (e1, o1) = decode32(prow.add(off1 / 2), scaled);
                    for r in 0..M {
                        let x = xptr.add(r * k);
                        a0[r] = _mm512_fmadd_ps(e0, _mm512_loadu_ps(x.add(off0)), a0[r]);
                        a1[r] = _mm512_fmadd_ps(o0, _mm512_loadu_ps(x.add(off0 + 16)), a1[r]);
                        a0[r] = _mm512_fmadd_ps(e1, _mm512_loadu_ps(x.add(off1)), a0[r]);
                        a1[r] = _mm512_fmadd_ps(o1, _mm512_loadu_ps(x.add(off1 + 16)), a1[r]);
                    }
                    c += 2;
                }
                if c < chunks {
                    let off = base + c * 32;
                    let (e, o) = decode32(prow.add(off / 2), scaled);
                    for r in 0..M {
                        let x = xptr.add(r * k);
                        a0[r] = _mm512_fmadd_ps(e, _mm512_loadu_ps(x.add(off)), a0[r]);
                        a1[r] = _mm512_fmadd_ps(o, _mm512_loadu_ps(x.add(off + 16)), a1[r]);
                    }
                }
            }
            for r in 0..M {
                *out.get_unchecked_mut(r * rows + j) =
                    _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
            }
        }
    }
}

/// The AVX2 kernel. `vpermps` reaches only 8 lanes (and is slow on AMD), so the code book is
/// looked up bytewise instead: the 16 f32 entries split into 4 byte planes, one `vpshufb` per
/// plane turns 32 codes into 32 bytes, and two rounds of unpacking reassemble 32 f32 weights.
/// The table is not scaled per block; each block's sum is multiplied by its absmax instead.
#[cfg(target_arch = "x86_64")]
mod lookup_avx2 {
    use crate::kernels::{prefetch, PREFETCH_AHEAD};
    use std::arch::x86_64::*;

    /// `out[r, j] = Σ_c W[j, c] · x[r, c]` for `m ≤ 4` activation rows given with each chunk
    /// of 8 elements split into 4 even then 4 odd: vector t of a 32-weight step (see
    /// `decode32`) holds even elements 4t..4t+4 in its low lane and the odd ones in its high.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gemv(
        xq: &[f32],
        m: usize,
        k: usize,
        bs: usize,
        packed: &[u8],
        absmax: &[f32],
        lut: &[f32; 16],
        out: &mut [f32],
    ) {
        let mut planes = [_mm256_setzero_si256(); 4];
        for (p, plane) in planes.iter_mut().enumerate() {
            let bytes: [u8; 16] = std::array::from_fn(|v| lut[v].to_bits().to_le_bytes()[p]);
            let half = _mm_loadu_si128(bytes.as_ptr() as *const __m128i);
            *plane = _mm256_set_m128i(half, half);
        }
        // FMA chains per row: enough independent chains to hide the FMA latency, few enough
        // to stay in the 16 registers.
        match m {
            1 => gemv_m::<1, 4>(xq, k, bs, packed, absmax, &planes, out),
            2 => gemv_m::<2, 2>(xq, k, bs, packed, absmax, &planes, out),
            3 => gemv_m::<3, 2>(xq, k, bs, packed, absmax, &planes, out),
            _ => gemv_m::<4, 1>(xq, k, bs, packed, absmax, &planes, out),
        }
    }

    /// Decode 32 weights (16 packed bytes at `p`) into 4 vectors of 8 (order: see `gemv`).
    #[inline(always)]
    unsafe fn decode32(p: *const u8, planes: &[__m256i; 4]) -> [__m256; 4] {
        let bytes = _mm_loadu_si128(p as *const __m128i);
        let nib = _mm_set1_epi8(15);
        let high = _mm_and_si128(_mm_srli_epi16::<4>(bytes), nib); // even elements
        let low = _mm_and_si128(bytes, nib); // odd elements
        let idx = _mm256_set_m128i(low, high);
        let b0 = _mm256_shuffle_epi8(planes[0], idx);
        let b1 = _mm256_shuffle_epi8(planes[1], idx);
        let b2 = _mm256_shuffle_epi8(planes[2], idx);
        let b3 = _mm256_shuffle_epi8(planes[3], idx);
        let (lo01, hi01) = (_mm256_unpacklo_epi8(b0, b1), _mm256_unpackhi_epi8(b0, b1));
        let (lo23, hi23) = (_mm256_unpacklo_epi8(b2, b3), _mm256_unpackhi_epi8(b2, b3));
        [
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23)),
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23)),
        ]
    }

    /// The sum of the 8 lanes.
    #[inline(always)]
    pub(super) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    #[inline(always)]
    unsafe fn gemv_m<const M: usize, const CH: usize>(
        xq: &[f32],
        k: usize,
        bs: usize,
        packed: &[u8],
        absmax: &[f32],
        planes: &[__m256i; 4],
        out: &mut [f32],
    ) {
        debug_assert!(k.is_multiple_of(32) && bs.is_multiple_of(32) && xq.len() >= M * k);
        let rows = packed.len() * 2 / k;
        let nb_row = k / bs;
        let xptr = xq.as_ptr();
        for j in 0..rows {
            let prow = packed.as_ptr().add(j * k / 2);
            let mut acc = [_mm256_setzero_ps(); M];
            for b in 0..nb_row {
                let am = _mm256_set1_ps(*absmax.get_unchecked(j * nb_row + b));
                // The block's sum, scaled into the row sum at its end.
                let mut blk = [[_mm256_setzero_ps(); CH]; M];
                for off in (b * bs..(b + 1) * bs).step_by(32) {
                    if off % 128 == 0 {
                        prefetch(prow.wrapping_add(off / 2 + PREFETCH_AHEAD));
                    }
                    let w = decode32(prow.add(off / 2), planes);
                    for r in 0..M {
                        let x = xptr.add(r * k + off);
                        for (t, wt) in w.iter().enumerate() {
                            let c = &mut blk[r][t % CH];
                            *c = _mm256_fmadd_ps(*wt, _mm256_loadu_ps(x.add(8 * t)), *c);
                        }
                    }
                }
                for r in 0..M {
                    let mut sum = blk[r][0];
                    for c in &blk[r][1..] {
                        sum = _mm256_add_ps(sum, *c);
                    }
                    acc[r] = _mm256_fmadd_ps(sum, am, acc[r]);
                }
            }
            for r in 0..M {
                *out.get_unchecked_mut(r * rows + j) = hsum(acc[r]);
            }
        }
    }
}

impl LinearKernel for FourBitMatrix {
    fn in_features(&self) -> usize {
        self.q.shape[1]
    }
    fn out_features(&self) -> usize {
        self.q.shape[0]
    }
    fn forward_rows(&self, x: &[f32], m: usize, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let xr = self.round_input(x);
        self.rows_kernel(xr.as_deref().unwrap_or(x), m, rows.start, rows.end, out);
        self.round_output(out);
    }
    fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (n, k) = (self.out_features(), self.in_features());
        let xr = self.round_input(x);
        let x = xr.as_deref().unwrap_or(x);
        if m <= GEMV_MAX_ROWS {
            parallel_row_blocks(n, m, out, |r0, r1, local| {
                self.rows_kernel(x, m, r0, r1, local)
            });
        } else {
            parallel_row_blocks(n, m, out, |r0, r1, local| {
                let rows = r1 - r0;
                let mut w = vec![0f32; rows * k];
                self.decode_rows(r0, r1, &mut w);
                gemm_serial(m, rows, k, x, k, 1, &w, 1, k, local);
            });
        }
        self.round_output(out);
    }
    fn storage_bytes(&self) -> usize {
        self.q.storage_bytes()
    }
    fn storage_name(&self) -> String {
        self.q.storage_name()
    }
    /// `quant_map[code] · absmax` in f32, as bitsandbytes' float32 dequantization (not rounded
    /// to the original or compute dtype).
    fn to_f32(&self) -> Vec<f32> {
        self.q.dequantize()
    }
}

// ---------------------------------------------------------------------------------------------
// 8-bit

/// The reference's float32 `1/127²` (as written in bitsandbytes, `6.200124e-05`).
const INT8_MM_SCALE: f32 = 6.200_124e-5;

/// Largest K for which an int8 × int8 dot product (|terms| ≤ 127·128) summed in f32 is exact.
const EXACT_F32_K: usize = 1024;

/// An LLM.int8 weight with its matmul.
pub struct Int8Matrix {
    q: Int8Weight,
    threshold: f32,
    mode: Int8Compute,
    /// `SCB · (1/127)` per row (the dequantized-weights mode's row scale).
    row_scale: Vec<f32>,
}

/// Activations prepared for the int8 matmul.
struct QuantizedActivations {
    /// `[m, K]` int8 codes, outlier columns zeroed.
    codes: Vec<i8>,
    /// Per-row absmax of the fp16 activations without the outlier entries (`SCA`).
    row_stats: Vec<f32>,
    /// Columns holding at least one |x| ≥ threshold.
    outlier_cols: Vec<usize>,
    /// Some code is −128 (cannot happen for |x| ≤ row absmax, but the SIMD dot products'
    /// sign trick would wrap on it, so it is checked once here).
    has_min_code: bool,
    /// `[m, outlier_cols.len()]`: those columns of the original activations.
    outliers: Vec<f32>,
}

impl Int8Matrix {
    pub fn new(q: Int8Weight, threshold: f32, mode: Int8Compute) -> Result<Self> {
        q.validate()?;
        let row_scale = q.scb.iter().map(|s| s * INV_127).collect();
        Ok(Int8Matrix {
            q,
            threshold,
            mode,
            row_scale,
        })
    }
    pub fn weight(&self) -> &Int8Weight {
        &self.q
    }
    pub fn threshold(&self) -> f32 {
        self.threshold
    }
    pub fn mode(&self) -> Int8Compute {
        self.mode
    }

    fn quantize_activations(&self, x: &[f32], m: usize) -> QuantizedActivations {
        quantize_activations(x, m, self.q.k, self.threshold)
    }

    /// `(CB · SCB) · (1/127)`: a weight entry as `int8_vectorwise_dequant` gives it.
    #[inline]
    fn deq_vectorwise(&self, j: usize, c: usize) -> f32 {
        (self.q.codes[j * self.q.k + c] as f32 * self.q.scb[j]) * INV_127
    }

    /// Combine exact integer sums `acc` (`[m, rows]`) with the scales, and add the outlier
    /// columns' float product against the dequantized weight columns.
    fn finish(
        &self,
        qa: &QuantizedActivations,
        m: usize,
        r0: usize,
        r1: usize,
        acc: &[i64],
        out: &mut [f32],
    ) {
        let rows = r1 - r0;
        for ((o, a), sca) in out
            .chunks_exact_mut(rows)
            .zip(acc.chunks_exact(rows))
            .zip(&qa.row_stats[..m])
        {
            for ((o, a), scb) in o.iter_mut().zip(a).zip(&self.q.scb[r0..r1]) {
                *o = (*a as f32 * (sca * scb)) * INT8_MM_SCALE;
            }
        }
        let nc = qa.outlier_cols.len();
        if nc == 0 {
            return;
        }
        if m <= GEMV_MAX_ROWS {
            // Decoding: a few dot products of length `nc` per weight row, read while the row
            // is still in cache; gathering the outlier columns first would cost more.
            for (jj, j) in (r0..r1).enumerate() {
                for r in 0..m {
                    let xo = &qa.outliers[r * nc..(r + 1) * nc];
                    let s: f32 = xo
                        .iter()
                        .zip(&qa.outlier_cols)
                        .map(|(x, &c)| x * self.deq_vectorwise(j, c))
                        .sum();
                    out[r * rows + jj] += s;
                }
            }
            return;
        }
        let wo: Vec<f32> = (r0..r1)
            .flat_map(|j| {
                qa.outlier_cols
                    .iter()
                    .map(move |&c| self.deq_vectorwise(j, c))
            })
            .collect();
        let mut part = vec![0f32; m * rows];
        gemm_serial(m, rows, nc, &qa.outliers, nc, 1, &wo, 1, nc, &mut part);
        for (o, p) in out.iter_mut().zip(&part) {
            *o += p;
        }
    }

    /// Integer dot products for a few activation rows.
    fn int8_rows(
        &self,
        qa: &QuantizedActivations,
        m: usize,
        r0: usize,
        r1: usize,
        out: &mut [f32],
    ) {
        let k = self.q.k;
        let rows = r1 - r0;
        let mut acc = vec![0i64; m * rows];
        #[cfg(target_arch = "x86_64")]
        let simd = super::has_avx2() && !qa.has_min_code;
        #[cfg(target_arch = "x86_64")]
        if simd && m == 1 {
            // SAFETY: AVX2 is available; the activation codes hold no -128 and are `[K]`; the
            // weight rows are `[rows, K]`.
            unsafe { dot_rows_i8_avx2(&self.q.codes[r0 * k..r1 * k], &qa.codes[..k], &mut acc) };
            self.finish(qa, m, r0, r1, &acc, out);
            return;
        }
        for (jj, j) in (r0..r1).enumerate() {
            let w = &self.q.codes[j * k..(j + 1) * k];
            #[cfg(target_arch = "x86_64")]
            if simd {
                for g in (0..m).step_by(4) {
                    let mut d = [0i32; 4];
                    let mg = (m - g).min(4);
                    // SAFETY: AVX2 is available; the activation codes hold no -128 (the sign
                    // trick's one inexact case) and are `[m, K]` like `w` is `[K]`.
                    unsafe { dots_i8_avx2(w, &qa.codes[g * k..(g + mg) * k], mg, &mut d) };
                    for (r, v) in d.iter().take(mg).enumerate() {
                        acc[(g + r) * rows + jj] = *v as i64;
                    }
                }
                continue;
            }
            for r in 0..m {
                acc[r * rows + jj] = dot_i8(&qa.codes[r * k..(r + 1) * k], w) as i64;
            }
        }
        self.finish(qa, m, r0, r1, &acc, out);
    }

    /// The same sums for many rows with a float GEMM: each K-chunk of at most 1024 products of
    /// integers below 2^14 sums exactly in f32, and the chunk sums add exactly as integers.
    fn int8_gemm_block(
        &self,
        qa: &QuantizedActivations,
        xq: &[f32],
        m: usize,
        r0: usize,
        r1: usize,
        out: &mut [f32],
    ) {
        let k = self.q.k;
        let rows = r1 - r0;
        let wf: Vec<f32> = self.q.codes[r0 * k..r1 * k]
            .iter()
            .map(|&c| c as f32)
            .collect();
        let mut acc = vec![0i64; m * rows];
        let mut part = vec![0f32; m * rows];
        for k0 in (0..k).step_by(EXACT_F32_K) {
            let kc = (k - k0).min(EXACT_F32_K);
            gemm_serial(m, rows, kc, &xq[k0..], k, 1, &wf[k0..], 1, k, &mut part);
            for (a, p) in acc.iter_mut().zip(&part) {
                *a += *p as i64;
            }
        }
        self.finish(qa, m, r0, r1, &acc, out);
    }

    /// `CB · (SCB · 1/127)` rows (the dequantized-weights mode).
    fn decode_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let k = self.q.k;
        for (j, row) in (r0..r1).zip(out.chunks_exact_mut(k)) {
            let s = self.row_scale[j];
            for (o, &c) in row.iter_mut().zip(&self.q.codes[j * k..(j + 1) * k]) {
                *o = c as f32 * s;
            }
        }
    }
}

/// `int8_vectorwise_quant(x.to(float16), threshold)` for `[m, k]` activations: returns the int8
/// codes (outlier columns zeroed), the per-row statistics `SCA` and the outlier columns.
pub fn int8_quantize_activations(
    x: &[f32],
    m: usize,
    k: usize,
    threshold: f32,
) -> (Vec<i8>, Vec<f32>, Vec<usize>) {
    let qa = quantize_activations(x, m, k, threshold);
    (qa.codes, qa.row_stats, qa.outlier_cols)
}

fn quantize_activations(x: &[f32], m: usize, k: usize, threshold: f32) -> QuantizedActivations {
    let x16: Vec<f32> = x.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
    let thr = f16::from_f32(threshold).to_f32();
    let is_outlier = |v: f32| threshold > 0.0 && v.abs() >= thr;
    let mut col_has = vec![false; k];
    if threshold > 0.0 {
        for row in x16.chunks_exact(k) {
            for (c, &v) in row.iter().enumerate() {
                if is_outlier(v) {
                    col_has[c] = true;
                }
            }
        }
    }
    let outlier_cols: Vec<usize> = (0..k).filter(|&c| col_has[c]).collect();
    let mut codes = vec![0i8; m * k];
    let mut row_stats = vec![0f32; m];
    for r in 0..m {
        let row = &x16[r * k..(r + 1) * k];
        // Outlier entries are zeroed before the row statistics, other entries of outlier
        // columns still count.
        let am = row
            .iter()
            .filter(|v| !is_outlier(**v))
            .fold(0f32, |a, v| a.max(v.abs()));
        row_stats[r] = am;
        let scale = int8_scale(am);
        for (c, (o, &v)) in codes[r * k..(r + 1) * k].iter_mut().zip(row).enumerate() {
            *o = if col_has[c] { 0 } else { int8_code(v, scale) };
        }
    }
    let mut outliers = Vec::with_capacity(m * outlier_cols.len());
    for r in 0..m {
        outliers.extend(outlier_cols.iter().map(|&c| x[r * k + c]));
    }
    QuantizedActivations {
        has_min_code: codes.contains(&i8::MIN),
        codes,
        row_stats,
        outlier_cols,
        outliers,
    }
}

/// Σ a·b over int8 vectors with an exact i32 sum (written so LLVM emits `vpmaddwd`).
#[inline]
fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    const L: usize = 64;
    let mut acc = [0i32; L];
    let (ca, ta) = a.split_at(a.len() / L * L);
    let (cb, tb) = b.split_at(ca.len());
    for (xa, xb) in ca.chunks_exact(L).zip(cb.chunks_exact(L)) {
        for l in 0..L {
            acc[l] += xa[l] as i16 as i32 * xb[l] as i16 as i32;
        }
    }
    let mut s: i32 = acc.iter().sum();
    for (x, y) in ta.iter().zip(tb) {
        s += *x as i32 * *y as i32;
    }
    s
}

/// 32 int8 products `w · x` summed in pairs and fours into 8 i32 lanes, exactly: `vpmaddubsw`
/// multiplies |w| (unsigned) by x carrying w's sign — pair sums are at most 2 · 128 · 127 < 2^15,
/// so nothing saturates — and `vpmaddwd` widens to i32.
///
/// # Safety
/// AVX2 must be available, and `x` must hold no -128 (its sign flip would wrap).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn dot32_i8(
    w: std::arch::x86_64::__m256i,
    x: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
    _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
}

/// `out[r] = Σ w · x[r]` for `m ≤ 4` rows `x` (`[m, K]`) of int8 codes against one weight row,
/// exactly ([`dot32_i8`]).
///
/// # Safety
/// AVX2 must be available, and `x` must hold no -128 (its sign flip would wrap).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dots_i8_avx2(w: &[i8], x: &[i8], m: usize, out: &mut [i32; 4]) {
    use std::arch::x86_64::*;
    let k = w.len();
    debug_assert!(m <= 4 && x.len() >= m * k);
    let mut acc = [_mm256_setzero_si256(); 4];
    let body = k / 32 * 32;
    for c in (0..body).step_by(32) {
        let wv = _mm256_loadu_si256(w.as_ptr().add(c) as *const __m256i);
        for (r, a) in acc.iter_mut().enumerate().take(m) {
            let xv = _mm256_loadu_si256(x.as_ptr().add(r * k + c) as *const __m256i);
            *a = _mm256_add_epi32(*a, dot32_i8(wv, xv));
        }
    }
    for r in 0..m {
        let v = acc[r];
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        let tail: i32 = w[body..]
            .iter()
            .zip(&x[r * k + body..(r + 1) * k])
            .map(|(&a, &b)| a as i32 * b as i32)
            .sum();
        out[r] = _mm_cvtsi128_si32(s) + tail;
    }
}

/// `out[j] = Σ w[j] · x` for weight rows `w` (`[rows, K]`) against one row of codes `x`,
/// exactly (the sign trick of [`dots_i8_avx2`]), four rows per step so each activation load
/// serves four rows, with the weights prefetched ahead of the stream.
///
/// # Safety
/// AVX2 must be available, and `x` must hold no -128.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_rows_i8_avx2(w: &[i8], x: &[i8], out: &mut [i64]) {
    use std::arch::x86_64::*;
    let k = x.len();
    let rows = out.len();
    debug_assert!(w.len() >= rows * k);
    let body = k / 32 * 32;
    let tail = |j: usize| -> i32 {
        w[j * k + body..(j + 1) * k]
            .iter()
            .zip(&x[body..])
            .map(|(&a, &b)| a as i32 * b as i32)
            .sum()
    };
    let quads = rows / 4;
    for q in 0..quads {
        let j = 4 * q;
        let p = w.as_ptr().add(j * k);
        let mut acc = [_mm256_setzero_si256(); 4];
        for c in (0..body).step_by(32) {
            // The four rows consume 128 bytes per step: two cache lines.
            let ahead = (p as *const u8).wrapping_add(4 * c + super::PREFETCH_AHEAD);
            super::prefetch(ahead);
            super::prefetch(ahead.wrapping_add(64));
            let xv = _mm256_loadu_si256(x.as_ptr().add(c) as *const __m256i);
            for (r, a) in acc.iter_mut().enumerate() {
                let wv = _mm256_loadu_si256(p.add(r * k + c) as *const __m256i);
                *a = _mm256_add_epi32(*a, dot32_i8(wv, xv));
            }
        }
        // Horizontal sums of the four accumulators at once.
        let s01 = _mm256_hadd_epi32(acc[0], acc[1]);
        let s23 = _mm256_hadd_epi32(acc[2], acc[3]);
        let s = _mm256_hadd_epi32(s01, s23);
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let mut v = [0i32; 4];
        _mm_storeu_si128(v.as_mut_ptr() as *mut __m128i, s);
        for r in 0..4 {
            out[j + r] = (v[r] + tail(j + r)) as i64;
        }
    }
    for j in 4 * quads..rows {
        let mut d = [0i32; 4];
        dots_i8_avx2(&w[j * k..(j + 1) * k], x, 1, &mut d);
        out[j] = d[0] as i64;
    }
}

impl LinearKernel for Int8Matrix {
    fn in_features(&self) -> usize {
        self.q.k
    }
    fn out_features(&self) -> usize {
        self.q.n
    }
    fn forward_rows(&self, x: &[f32], m: usize, rows: std::ops::Range<usize>, out: &mut [f32]) {
        match self.mode {
            Int8Compute::DequantizedWeights => {
                let k = self.q.k;
                let mut w = vec![0f32; rows.len() * k];
                self.decode_rows(rows.start, rows.end, &mut w);
                super::gemv_block(x, m, k, &w, out);
            }
            Int8Compute::Int8Matmul => {
                let qa = self.quantize_activations(x, m);
                self.int8_rows(&qa, m, rows.start, rows.end, out);
            }
        }
    }
    fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (n, k) = (self.q.n, self.q.k);
        match self.mode {
            Int8Compute::DequantizedWeights => {
                parallel_row_blocks(n, m, out, |r0, r1, local| {
                    let rows = r1 - r0;
                    let mut w = vec![0f32; rows * k];
                    self.decode_rows(r0, r1, &mut w);
                    if m <= GEMV_MAX_ROWS {
                        super::gemv_block(x, m, k, &w, local);
                    } else {
                        gemm_serial(m, rows, k, x, k, 1, &w, 1, k, local);
                    }
                });
            }
            Int8Compute::Int8Matmul => {
                let qa = self.quantize_activations(x, m);
                if m <= GEMV_MAX_ROWS {
                    parallel_row_blocks(n, m, out, |r0, r1, local| {
                        self.int8_rows(&qa, m, r0, r1, local)
                    });
                } else {
                    let xq: Vec<f32> = qa.codes.iter().map(|&c| c as f32).collect();
                    parallel_row_blocks(n, m, out, |r0, r1, local| {
                        self.int8_gemm_block(&qa, &xq, m, r0, r1, local)
                    });
                }
            }
        }
    }
    fn storage_bytes(&self) -> usize {
        self.q.codes.len() + 4 * self.q.scb.len()
    }
    fn storage_name(&self) -> String {
        "bnb-int8".into()
    }
    /// `(CB · SCB) · (1/127)`, as `int8_vectorwise_dequant`.
    fn to_f32(&self) -> Vec<f32> {
        self.q.dequantize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qtypes::bnb::{quantize_4bit, FourBitType};

    /// Whether the AVX2 kernels can be tested here (says so when not).
    #[cfg(target_arch = "x86_64")]
    fn avx2_or_skip() -> bool {
        let ok = crate::kernels::has_avx2();
        if !ok {
            eprintln!("skipped: no AVX2 on this CPU");
        }
        ok
    }

    fn values(seed: u32, n: usize, scale: f32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * scale
            })
            .collect()
    }

    /// The portable integer decodes (used without AVX2) and the AVX2 kernels compute the same
    /// integer sums: equal up to float summation order, for both decodes, every m, odd row
    /// counts (the AVX2 kernels pair rows for one input) and blocks of one and two chunks.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn integer_decodes_portable_and_avx2_agree() {
        if !avx2_or_skip() {
            return;
        }
        for decode in [FourBitDecode::Int16, FourBitDecode::Int8] {
            // Blocks that straddle rows (K = 192, blocksize 128) take the exact path.
            let q = quantize_4bit(
                &values(9, 3 * 192, 0.2),
                [3, 192],
                WeightDType::F32,
                FourBitType::Nf4,
                128,
                false,
            )
            .unwrap();
            let straddling = FourBitMatrix::new(q, WeightDType::F32)
                .unwrap()
                .with_decode(decode);
            assert!(!straddling.int_applies());
            for (bs, dq, qt) in [
                (64, false, FourBitType::Nf4),
                (128, true, FourBitType::Nf4),
                (64, true, FourBitType::Fp4),
            ] {
                let (n, k) = (7, 256);
                let q = quantize_4bit(&values(1, n * k, 0.2), [n, k], WeightDType::F32, qt, bs, dq)
                    .unwrap();
                let kern = FourBitMatrix::new(q, WeightDType::F32)
                    .unwrap()
                    .with_decode(decode);
                assert!(kern.int_applies());
                for m in 1..=4 {
                    let mut x = values(2 + m as u32, m * k, 4.0);
                    x[3] = 90.0; // an outlier
                    x[70] = -90.0;
                    let xa = kern.prepare_int(&x, m);
                    let absmax = kern.rows_absmax(0..n * k / bs);
                    let (mut simd, mut portable) = (vec![0f32; m * n], vec![0f32; m * n]);
                    let packed = &kern.q.packed;
                    if decode == FourBitDecode::Int8 {
                        // The largest code-book byte is the one that could saturate a pair.
                        assert_eq!(kern.table_u8.iter().max(), Some(&128));
                        let w = IntRows::new(k, bs, packed, &absmax, &kern.table_u8);
                        // SAFETY: AVX2 checked above; shapes as built.
                        unsafe { lookup_int_avx2::gemv8(&w, &xa, m, &mut simd) };
                        gemv_int8_scalar(&w, &xa, m, &mut portable);
                    } else {
                        let w = IntRows::new(k, bs, packed, &absmax, &kern.table_int);
                        // SAFETY: AVX2 checked above; shapes as built.
                        unsafe { lookup_int_avx2::gemv16(&w, &xa, m, &mut simd) };
                        gemv_int16_scalar(&w, &xa, m, &mut portable);
                    }
                    for (a, b) in simd.iter().zip(&portable) {
                        assert!(
                            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                            "{decode:?} {qt:?} bs={bs} m={m}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    /// The one-input LLM.int8 kernel (four weight rows per step, prefetching) gives the exact
    /// integer sums of the portable loop: row counts that are not a multiple of four and a K
    /// with a tail after the last 32 columns.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn int8_row_kernel_sums_exactly() {
        if !avx2_or_skip() {
            return;
        }
        for (rows, k) in [(67, 581), (4, 64), (3, 32), (9, 7)] {
            let to_i8 = |v: Vec<f32>| -> Vec<i8> {
                v.iter()
                    .map(|x| (x * 254.0).round().clamp(-127.0, 127.0) as i8)
                    .collect()
            };
            let w = to_i8(values(5, rows * k, 1.0));
            let mut x = to_i8(values(6, k, 1.0));
            x[0] = 127;
            x[k - 1] = -127;
            let mut got = vec![0i64; rows];
            // SAFETY: AVX2 checked above; no -128 in `x`; `w` is `[rows, k]`.
            unsafe { dot_rows_i8_avx2(&w, &x, &mut got) };
            for (j, g) in got.iter().enumerate() {
                let want = dot_i8(&x, &w[j * k..(j + 1) * k]) as i64;
                assert_eq!(*g, want, "rows={rows} k={k} row {j}");
            }
        }
    }
}
