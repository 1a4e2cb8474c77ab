//! Packed GPTQ-layout weights (2/3/4/8-bit codes, per-group scales and zero points, optional
//! act-order `g_idx`) with matrix products that unpack the codes on the fly.
//!
//! # In-memory layout (not the on-disk `qweight` layout)
//!
//! Input channels are first put in *group-contiguous order*: group 0's columns (in increasing
//! column order), then group 1's, and so on, each group padded with zero codes to a multiple of
//! [`BLOCK`] = 32 positions ("slots"). For the usual sequential `g_idx = k / group_size` with
//! group sizes that are multiples of 32 this order is the identity and nothing is stored for it;
//! otherwise (act-order, odd group sizes) the slot → column map is kept and the input is gathered
//! into slot order once per call. Every group is then a whole number of 32-code blocks.
//!
//! Each output row holds its blocks back to back (`4·bits` bytes per block). Inside a block the
//! 32 codes are arranged so that one 512-bit register of 16 lanes unpacks into codes 0..16 and a
//! second into codes 16..32 with a couple of shifts and masks:
//!
//! * 8-bit: byte i = code i.
//! * 4-bit: byte l = code l | code (l+16) << 4.
//! * 2-bit: a little-endian u64 whose nibble `(l % 2)·8 + l / 2` holds code l | code (l+16) << 2
//!   (so a broadcast of the u64 and a per-lane shift by `4·(l / 2)` lines them up).
//! * 3-bit: the low two bits of every code as a 2-bit block (8 bytes), then a u32 whose bit i is
//!   bit 2 of code i.
//!
//! Scales are held as f16 `[N, G]` (what checkpoints store; [`GptqMatrix::from_quantized`]
//! rounds f32 scales to f16) and zero points as u16 `[N, G]` (Z may be 2^bits, e.g. 256).
//!
//! # Arithmetic
//!
//! A group's contribution to output n is `s·Σ q·x − s·Z·Σ x`: the inner loop only converts codes
//! to f32 and multiplies-adds them with the input, and the per-group input sums Σx are computed
//! once per call. Decoding (`forward_rows`, few input rows) uses an AVX-512 kernel that works on
//! several output rows at once so each input load serves them all (scalar fallback without
//! AVX-512). Many input rows (`forward`) dequantize blocks of output rows to f32 in a per-thread
//! scratch buffer and run a serial GEMM on each, the blocks spread over the threads.

use crate::error::{Error, Result};
use crate::kernels;
use crate::nn::{forward_rows_parallel, LinearKernel};
use crate::quant::rtn::{check_bits, maxq, QuantizedLinear};
use half::f16;
use std::cell::RefCell;
use std::ops::Range;

/// Codes per packed block, for every bit width.
const BLOCK: usize = 32;
/// Slot map entry of a padding slot (its code is 0 and its input is 0).
const PAD: u32 = u32::MAX;
/// Output rows dequantized at a time by one task of the GEMM path: big enough that the GEMM
/// amortizes packing the input, small enough to stay in L2 and to balance two or more threads.
const GEMM_ROWS: usize = 128;

/// Bytes of one block of 32 codes.
fn block_bytes(bits: u8) -> usize {
    4 * bits as usize
}

/// A quantized `[N, K]` weight kept packed in memory (see the module docs for the layout).
///
/// Built from the interchange type [`QuantizedLinear`] and convertible back to it, so GPTQ, AWQ
/// and other integer-grid formats share this kernel.
pub struct GptqMatrix {
    bits: u8,
    group_size: Option<usize>,
    n: usize,
    k: usize,
    /// Slots per row: K plus padding, a multiple of [`BLOCK`].
    kp: usize,
    /// Packed bytes per output row: `kp / 32 · 4·bits`.
    row_bytes: usize,
    /// `[N, row_bytes]`.
    packed: Vec<u8>,
    /// `[N, G]`, row-major by output row so a row's groups are adjacent.
    scales: Vec<f16>,
    /// `[N, G]`: true zero points, `0..=2^bits`.
    zeros: Vec<u16>,
    /// `[G + 1]`: group g occupies blocks `group_blocks[g]..group_blocks[g + 1]` of every row.
    group_blocks: Vec<u32>,
    /// `[kp]`: the input column of each slot ([`PAD`] for padding); `None` when slot i is column
    /// i for every i < K (only trailing padding), the common case.
    slot_col: Option<Vec<u32>>,
    /// `g_idx` is not `k / group_size` (act-order or otherwise irregular).
    irregular_g_idx: bool,
}

impl GptqMatrix {
    /// Pack a quantized weight for inference.
    ///
    /// Scales are rounded to f16, as a saved checkpoint stores them, so in-memory results equal
    /// those of the reloaded checkpoint. Errors (`InvalidArgument`) on an unsupported bit width,
    /// an empty shape, inconsistent lengths, a code above `2^bits − 1`, a zero point above
    /// `2^bits`, a `g_idx` entry ≥ G, or a scale that is not finite in f16.
    pub fn from_quantized(q: &QuantizedLinear) -> Result<Self> {
        let (n, k, bits) = (q.n, q.k, q.bits);
        validate(q)?;
        let g_count = q.scales.len() / n;

        // Group-contiguous slot order, each group padded to whole blocks.
        let mut counts = vec![0usize; g_count];
        for &g in &q.g_idx {
            counts[g as usize] += 1;
        }
        let mut group_blocks = Vec::with_capacity(g_count + 1);
        group_blocks.push(0u32);
        let mut total_blocks = 0usize;
        for &c in &counts {
            total_blocks += c.div_ceil(BLOCK);
            let b = u32::try_from(total_blocks).map_err(|_| {
                Error::InvalidArgument(format!(
                    "weight [N={n}, K={k}] with {g_count} groups is too large to pack"
                ))
            })?;
            group_blocks.push(b);
        }
        let kp = total_blocks * BLOCK;
        let mut slot_col = vec![PAD; kp];
        let mut next: Vec<usize> = group_blocks[..g_count]
            .iter()
            .map(|&b| b as usize * BLOCK)
            .collect();
        for (col, &g) in q.g_idx.iter().enumerate() {
            slot_col[next[g as usize]] = col as u32;
            next[g as usize] += 1;
        }
        let identity = slot_col[..k].iter().enumerate().all(|(i, &c)| c == i as u32);
        let irregular_g_idx = match q.group_size {
            Some(gs) => q.g_idx.iter().enumerate().any(|(i, &g)| g as usize != i / gs),
            None => q.g_idx.iter().any(|&g| g != 0),
        };

        let bb = block_bytes(bits);
        let row_bytes = total_blocks * bb;
        let mut packed = vec![0u8; n * row_bytes];
        let mut codes = [0u8; BLOCK];
        for row in 0..n {
            let src = &q.codes[row * k..(row + 1) * k];
            let dst = &mut packed[row * row_bytes..(row + 1) * row_bytes];
            for (b, out) in dst.chunks_exact_mut(bb).enumerate() {
                for (i, c) in codes.iter_mut().enumerate() {
                    let col = slot_col[b * BLOCK + i];
                    *c = if col == PAD { 0 } else { src[col as usize] };
                }
                pack_block(bits, &codes, out);
            }
        }
        let mut scales = vec![f16::ZERO; n * g_count];
        let mut zeros = vec![0u16; n * g_count];
        for g in 0..g_count {
            for row in 0..n {
                scales[row * g_count + g] = f16::from_f32(q.scales[g * n + row]);
                zeros[row * g_count + g] = q.zeros[g * n + row] as u16;
            }
        }
        Ok(GptqMatrix {
            bits,
            group_size: q.group_size,
            n,
            k,
            kp,
            row_bytes,
            packed,
            scales,
            zeros,
            group_blocks,
            slot_col: (!identity).then_some(slot_col),
            irregular_g_idx,
        })
    }

    /// The unpacked form (codes, scales, true zero points, `g_idx`), e.g. for saving. Equal to
    /// what [`from_quantized`](Self::from_quantized) took, except that scales are f16-rounded.
    pub fn to_quantized(&self) -> QuantizedLinear {
        let (n, k, g_count) = (self.n, self.k, self.groups());
        let mut codes = vec![0u8; n * k];
        let mut block = [0u8; BLOCK];
        let bb = block_bytes(self.bits);
        for row in 0..n {
            let src = &self.packed[row * self.row_bytes..(row + 1) * self.row_bytes];
            for (b, bytes) in src.chunks_exact(bb).enumerate() {
                unpack_block(self.bits, bytes, &mut block);
                for (i, &c) in block.iter().enumerate() {
                    let col = self.slot_col(b * BLOCK + i);
                    if col != PAD {
                        codes[row * k + col as usize] = c;
                    }
                }
            }
        }
        let mut g_idx = vec![0u32; k];
        for g in 0..g_count {
            let slots = self.group_blocks[g] as usize * BLOCK..self.group_blocks[g + 1] as usize * BLOCK;
            for slot in slots {
                let col = self.slot_col(slot);
                if col != PAD {
                    g_idx[col as usize] = g as u32;
                }
            }
        }
        let mut scales = vec![0f32; g_count * n];
        let mut zeros = vec![0u32; g_count * n];
        for row in 0..n {
            for g in 0..g_count {
                scales[g * n + row] = self.scales[row * g_count + g].to_f32();
                zeros[g * n + row] = self.zeros[row * g_count + g] as u32;
            }
        }
        QuantizedLinear {
            bits: self.bits,
            group_size: self.group_size,
            n,
            k,
            codes,
            scales,
            zeros,
            g_idx,
        }
    }

    /// Bit width of the codes.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    fn groups(&self) -> usize {
        self.group_blocks.len() - 1
    }

    /// Input column of slot `i` ([`PAD`] for padding).
    fn slot_col(&self, i: usize) -> u32 {
        match &self.slot_col {
            Some(map) => map[i],
            None if i < self.k => i as u32,
            None => PAD,
        }
    }

    /// `x` (`[m, K]`) in slot order (`[m, kp]`, zero in padding slots), into `buf`; or `x` itself
    /// when the slot order is the identity without padding.
    fn gather<'a>(&self, x: &'a [f32], m: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
        let (k, kp) = (self.k, self.kp);
        if self.slot_col.is_none() && kp == k {
            return &x[..m * k];
        }
        buf.clear();
        buf.resize(m * kp, 0.0);
        for (xr, dst) in x.chunks_exact(k).take(m).zip(buf.chunks_exact_mut(kp)) {
            match &self.slot_col {
                Some(map) => {
                    for (d, &c) in dst.iter_mut().zip(map) {
                        if c != PAD {
                            *d = xr[c as usize];
                        }
                    }
                }
                None => dst[..k].copy_from_slice(xr),
            }
        }
        buf
    }

    /// Per-group sums of the slot-ordered input: `[m, G]`.
    fn group_sums(&self, xs: &[f32], m: usize, out: &mut Vec<f32>) {
        let g_count = self.groups();
        out.clear();
        out.resize(m * g_count, 0.0);
        for (xr, sums) in xs.chunks_exact(self.kp).take(m).zip(out.chunks_exact_mut(g_count)) {
            for (g, s) in sums.iter_mut().enumerate() {
                let r = self.group_blocks[g] as usize * BLOCK..self.group_blocks[g + 1] as usize * BLOCK;
                *s = sum(&xr[r]);
            }
        }
    }

    /// Dequantize output rows `rows` to f32 in slot order: `dst` is `[rows.len(), kp]`.
    fn dequantize_rows(&self, rows: Range<usize>, dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: AVX-512F is available (checked above); lengths are checked inside.
            unsafe {
                match self.bits {
                    2 => avx512::dequantize_rows::<2>(self, rows, dst),
                    3 => avx512::dequantize_rows::<3>(self, rows, dst),
                    4 => avx512::dequantize_rows::<4>(self, rows, dst),
                    _ => avx512::dequantize_rows::<8>(self, rows, dst),
                }
            }
            return;
        }
        self.dequantize_rows_scalar(rows, dst)
    }

    fn dequantize_rows_scalar(&self, rows: Range<usize>, dst: &mut [f32]) {
        let g_count = self.groups();
        let bb = block_bytes(self.bits);
        let mut codes = [0u8; BLOCK];
        for (row, d) in rows.zip(dst.chunks_exact_mut(self.kp)) {
            let packed = &self.packed[row * self.row_bytes..];
            for g in 0..g_count {
                let s = self.scales[row * g_count + g].to_f32();
                let z = self.zeros[row * g_count + g] as f32;
                for b in self.group_blocks[g] as usize..self.group_blocks[g + 1] as usize {
                    unpack_block(self.bits, &packed[b * bb..(b + 1) * bb], &mut codes);
                    for (o, &c) in d[b * BLOCK..(b + 1) * BLOCK].iter_mut().zip(&codes) {
                        *o = s * (c as f32 - z);
                    }
                }
            }
        }
    }

    /// `forward_rows` on slot-ordered input `xs` (`[m, kp]`) with group sums `xsum` (`[m, G]`).
    fn rows_kernel(&self, xs: &[f32], xsum: &[f32], m: usize, rows: Range<usize>, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: AVX-512F is available; the caller checked every length.
            unsafe {
                match self.bits {
                    2 => avx512::forward_rows::<2>(self, xs, xsum, m, rows, out),
                    3 => avx512::forward_rows::<3>(self, xs, xsum, m, rows, out),
                    4 => avx512::forward_rows::<4>(self, xs, xsum, m, rows, out),
                    _ => avx512::forward_rows::<8>(self, xs, xsum, m, rows, out),
                }
            }
            return;
        }
        self.rows_kernel_scalar(xs, xsum, m, rows, out)
    }

    /// Portable version of the decode kernel: a block is unpacked to f32 once and used for up
    /// to four input rows.
    fn rows_kernel_scalar(
        &self,
        xs: &[f32],
        xsum: &[f32],
        m: usize,
        rows: Range<usize>,
        out: &mut [f32],
    ) {
        let (kp, g_count, bb) = (self.kp, self.groups(), block_bytes(self.bits));
        let nr = rows.len();
        let mut codes = [0u8; BLOCK];
        let mut wf = [0f32; BLOCK];
        for (j, row) in rows.enumerate() {
            let packed = &self.packed[row * self.row_bytes..];
            for mi0 in (0..m).step_by(4) {
                let mc = (m - mi0).min(4);
                let mut tot = [0f32; 4];
                for g in 0..g_count {
                    let mut acc = [0f32; 4];
                    for b in self.group_blocks[g] as usize..self.group_blocks[g + 1] as usize {
                        unpack_block(self.bits, &packed[b * bb..(b + 1) * bb], &mut codes);
                        for (w, &c) in wf.iter_mut().zip(&codes) {
                            *w = c as f32;
                        }
                        for (i, a) in acc.iter_mut().enumerate().take(mc) {
                            let xr = &xs[(mi0 + i) * kp + b * BLOCK..][..BLOCK];
                            *a += kernels::dot(&wf, xr);
                        }
                    }
                    let s = self.scales[row * g_count + g].to_f32();
                    let sz = s * self.zeros[row * g_count + g] as f32;
                    for i in 0..mc {
                        tot[i] += s * acc[i] - sz * xsum[(mi0 + i) * g_count + g];
                    }
                }
                for i in 0..mc {
                    out[(mi0 + i) * nr + j] = tot[i];
                }
            }
        }
    }

    /// `forward_rows` with an explicit choice of kernel (tests compare the two).
    fn forward_rows_impl(
        &self,
        x: &[f32],
        m: usize,
        rows: Range<usize>,
        out: &mut [f32],
        scalar: bool,
    ) {
        assert!(x.len() >= m * self.k, "input shorter than [m, in_features]");
        assert!(rows.end <= self.n && rows.start <= rows.end, "row range out of bounds");
        assert!(out.len() >= m * rows.len(), "output shorter than [m, rows]");
        if m == 0 || rows.is_empty() {
            return;
        }
        SCRATCH.with(|cell| {
            // A nested call on the same thread (not expected) gets fresh buffers.
            let mut fresh = Scratch::default();
            let mut guard = cell.try_borrow_mut();
            let s = match guard.as_deref_mut() {
                Ok(s) => s,
                Err(_) => &mut fresh,
            };
            let xs = self.gather(x, m, &mut s.x);
            self.group_sums(xs, m, &mut s.sums);
            if scalar {
                self.rows_kernel_scalar(xs, &s.sums, m, rows, out);
            } else {
                self.rows_kernel(xs, &s.sums, m, rows, out);
            }
        });
    }

    /// Many input rows: dequantize [`GEMM_ROWS`] output rows at a time into a per-thread buffer
    /// and multiply with a serial GEMM, the row blocks spread over the threads.
    fn forward_gemm(&self, x: &[f32], m: usize, out: &mut [f32]) {
        use rayon::prelude::*;
        let (n, kp) = (self.n, self.kp);
        let mut gathered = Vec::new();
        let xs = self.gather(x, m, &mut gathered);
        let out_ptr = SyncPtr(out.as_mut_ptr());
        (0..n.div_ceil(GEMM_ROWS)).into_par_iter().for_each(|b| {
            let r0 = b * GEMM_ROWS;
            let r1 = (r0 + GEMM_ROWS).min(n);
            let nr = r1 - r0;
            GEMM_SCRATCH.with(|cell| {
                let mut fresh = (Vec::new(), Vec::new());
                let mut guard = cell.try_borrow_mut();
                let (w, local) = match guard.as_deref_mut() {
                    Ok(s) => s,
                    Err(_) => &mut fresh,
                };
                w.resize(nr * kp, 0.0);
                local.resize(m * nr, 0.0);
                self.dequantize_rows(r0..r1, &mut w[..nr * kp]);
                // local[m, nr] = xs[m, kp] · w[nr, kp]ᵀ
                kernels::gemm_serial(m, nr, kp, xs, kp, 1, &w[..nr * kp], 1, kp, local);
                let out_ptr = &out_ptr;
                for r in 0..m {
                    // SAFETY: `out` has m·n elements (checked by the caller) and each task
                    // writes only its own columns r0..r1 of every row.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            local[r * nr..].as_ptr(),
                            out_ptr.0.add(r * n + r0),
                            nr,
                        );
                    }
                }
            });
        });
    }
}

/// An output pointer shared by tasks that write disjoint parts of it.
struct SyncPtr(*mut f32);
// SAFETY: used only for disjoint writes, see `forward_gemm`.
unsafe impl Sync for SyncPtr {}

#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    sums: Vec<f32>,
}

thread_local! {
    /// Per-thread buffers of `forward_rows` (gathered input, group sums), reused across calls.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    /// Per-thread dequantized row block and GEMM output of `forward`.
    static GEMM_SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

impl LinearKernel for GptqMatrix {
    fn in_features(&self) -> usize {
        self.k
    }
    fn out_features(&self) -> usize {
        self.n
    }
    fn forward_rows(&self, x: &[f32], m: usize, rows: Range<usize>, out: &mut [f32]) {
        self.forward_rows_impl(x, m, rows, out, false)
    }
    fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        assert!(x.len() >= m * self.k, "input shorter than [m, in_features]");
        assert!(out.len() >= m * self.n, "output shorter than [m, out_features]");
        if m <= kernels::GEMV_MAX_ROWS {
            forward_rows_parallel(self, x, m, out)
        } else {
            self.forward_gemm(x, m, out)
        }
    }
    fn storage_bytes(&self) -> usize {
        self.packed.len()
            + 2 * self.scales.len()
            + 2 * self.zeros.len()
            + 4 * self.group_blocks.len()
            + self.slot_col.as_ref().map_or(0, |s| 4 * s.len())
    }
    fn storage_name(&self) -> String {
        let mut name = format!("gptq-{}bit", self.bits);
        if let Some(g) = self.group_size {
            name += &format!("-g{g}");
        }
        if self.irregular_g_idx {
            name += "-actorder";
        }
        name
    }
    fn to_f32(&self) -> Vec<f32> {
        let (n, k, kp) = (self.n, self.k, self.kp);
        let mut slots = vec![0f32; kp];
        let mut w = vec![0f32; n * k];
        for (row, dst) in w.chunks_exact_mut(k).enumerate() {
            self.dequantize_rows(row..row + 1, &mut slots);
            for (i, &v) in slots.iter().enumerate() {
                let col = self.slot_col(i);
                if col != PAD {
                    dst[col as usize] = v;
                }
            }
        }
        w
    }
}

/// Checks of [`GptqMatrix::from_quantized`], each naming what is wrong.
fn validate(q: &QuantizedLinear) -> Result<()> {
    let (n, k, bits) = (q.n, q.k, q.bits);
    let shape = format!("[N={n}, K={k}]");
    check_bits(bits)?;
    let bad = |msg: String| Err(Error::InvalidArgument(format!("quantized weight {shape}: {msg}")));
    if n == 0 || k == 0 {
        return bad("empty shape".into());
    }
    if q.group_size == Some(0) {
        return bad("group size 0 (use per-channel instead)".into());
    }
    if n.checked_mul(k) != Some(q.codes.len()) {
        return bad(format!("has {} codes, expected N·K", q.codes.len()));
    }
    if q.scales.is_empty() || q.scales.len() % n != 0 {
        return bad(format!(
            "scales has {} values, expected G·N for some G ≥ 1",
            q.scales.len()
        ));
    }
    let g_count = q.scales.len() / n;
    if q.zeros.len() != q.scales.len() {
        return bad(format!(
            "zeros has {} values but scales has {} (both are [G={g_count}, N])",
            q.zeros.len(),
            q.scales.len()
        ));
    }
    if q.g_idx.len() != k {
        return bad(format!("g_idx has {} entries, expected K", q.g_idx.len()));
    }
    if let Some((i, g)) = q.g_idx.iter().enumerate().find(|(_, &g)| g as usize >= g_count) {
        return bad(format!(
            "g_idx[{i}] = {g} but there are only {g_count} groups"
        ));
    }
    let max_code = maxq(bits);
    if let Some(i) = q.codes.iter().position(|&c| c as u32 > max_code) {
        return bad(format!(
            "code {} at row {}, column {} does not fit in {bits} bits",
            q.codes[i],
            i / k,
            i % k
        ));
    }
    if let Some(i) = q.zeros.iter().position(|&z| z > max_code + 1) {
        return bad(format!(
            "zero point {} at group {}, column {} exceeds 2^{bits}",
            q.zeros[i],
            i / n,
            i % n
        ));
    }
    if let Some(i) = q
        .scales
        .iter()
        .position(|&s| !f16::from_f32(s).to_f32().is_finite())
    {
        return bad(format!(
            "scale {} at group {}, column {} is not finite as f16 (scales are held as f16)",
            q.scales[i],
            i / n,
            i % n
        ));
    }
    Ok(())
}

/// Sum with independent lane accumulators (vectorizes; a plain fold does not).
fn sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = v.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Pack 32 codes into one block of `4·bits` bytes (layout in the module docs).
fn pack_block(bits: u8, c: &[u8; BLOCK], out: &mut [u8]) {
    match bits {
        8 => out.copy_from_slice(c),
        4 => {
            for l in 0..16 {
                out[l] = c[l] | (c[l + 16] << 4);
            }
        }
        2 => out.copy_from_slice(&pack2(c).to_le_bytes()),
        _ => {
            let low: [u8; BLOCK] = std::array::from_fn(|i| c[i] & 3);
            out[..8].copy_from_slice(&pack2(&low).to_le_bytes());
            let high = (0..BLOCK).fold(0u32, |h, i| h | (((c[i] >> 2) & 1) as u32) << i);
            out[8..12].copy_from_slice(&high.to_le_bytes());
        }
    }
}

/// The 2-bit block word: nibble `(l % 2)·8 + l / 2` holds codes l and l + 16.
fn pack2(c: &[u8; BLOCK]) -> u64 {
    (0..16).fold(0u64, |w, l| {
        let nibble = (c[l] | (c[l + 16] << 2)) as u64;
        w | nibble << (4 * ((l % 2) * 8 + l / 2))
    })
}

fn unpack2(w: u64, out: &mut [u8; BLOCK]) {
    for l in 0..16 {
        let nibble = (w >> (4 * ((l % 2) * 8 + l / 2))) as u8;
        out[l] = nibble & 3;
        out[l + 16] = (nibble >> 2) & 3;
    }
}

/// Inverse of [`pack_block`].
fn unpack_block(bits: u8, bytes: &[u8], out: &mut [u8; BLOCK]) {
    match bits {
        8 => out.copy_from_slice(&bytes[..BLOCK]),
        4 => {
            for l in 0..16 {
                out[l] = bytes[l] & 15;
                out[l + 16] = bytes[l] >> 4;
            }
        }
        2 => unpack2(u64::from_le_bytes(bytes[..8].try_into().unwrap()), out),
        _ => {
            unpack2(u64::from_le_bytes(bytes[..8].try_into().unwrap()), out);
            let high = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
            for (i, c) in out.iter_mut().enumerate() {
                *c |= (((high >> i) & 1) as u8) << 2;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// AVX-512 kernels. Each block unpacks into two vectors of 16 codes (codes 0..16 and 16..32).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{block_bytes, GptqMatrix, BLOCK};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Codes of one block as two vectors of 16 lanes (`p` points at `4·BITS` readable bytes).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn unpack<const BITS: u8>(p: *const u8) -> (__m512i, __m512i) {
        unsafe {
            match BITS {
                8 => (
                    _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i)),
                    _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(16) as *const __m128i)),
                ),
                4 => {
                    let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
                    (_mm512_and_si512(v, _mm512_set1_epi32(15)), _mm512_srli_epi32::<4>(v))
                }
                _ => {
                    let word = std::ptr::read_unaligned(p as *const i64);
                    let shifts =
                        _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
                    let v = _mm512_srlv_epi32(_mm512_set1_epi64(word), shifts);
                    let three = _mm512_set1_epi32(3);
                    let lo = _mm512_and_si512(v, three);
                    let hi = _mm512_and_si512(_mm512_srli_epi32::<2>(v), three);
                    if BITS == 2 {
                        return (lo, hi);
                    }
                    let h = _mm512_set1_epi32(std::ptr::read_unaligned(p.add(8) as *const i32));
                    let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
                    let one = _mm512_set1_epi32(1);
                    let ha = _mm512_and_si512(_mm512_srlv_epi32(h, iota), one);
                    let hb = _mm512_and_si512(
                        _mm512_srlv_epi32(h, _mm512_add_epi32(iota, _mm512_set1_epi32(16))),
                        one,
                    );
                    (
                        _mm512_or_si512(lo, _mm512_slli_epi32::<2>(ha)),
                        _mm512_or_si512(hi, _mm512_slli_epi32::<2>(hb)),
                    )
                }
            }
        }
    }

    /// `R` output rows from `row0` times `M` input rows: `out[mi·out_stride + r]`.
    ///
    /// `x` is `[M, kp]` slot-ordered input, `xsum` its group sums with row stride G.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const BITS: u8, const R: usize, const M: usize>(
        w: &GptqMatrix,
        x: *const f32,
        xsum: *const f32,
        row0: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        unsafe {
            let (kp, bb) = (w.kp, block_bytes(BITS));
            let g_count = w.group_blocks.len() - 1;
            let rp: [*const u8; R] =
                std::array::from_fn(|r| w.packed.as_ptr().add((row0 + r) * w.row_bytes));
            let mut tot = [[_mm512_setzero_ps(); M]; R];
            let mut zt = [[0f32; M]; R];
            for g in 0..g_count {
                let b0 = *w.group_blocks.get_unchecked(g) as usize;
                let b1 = *w.group_blocks.get_unchecked(g + 1) as usize;
                let mut acc = [[_mm512_setzero_ps(); M]; R];
                for b in b0..b1 {
                    let mut xa = [_mm512_setzero_ps(); M];
                    let mut xb = [_mm512_setzero_ps(); M];
                    for mi in 0..M {
                        let px = x.add(mi * kp + b * BLOCK);
                        xa[mi] = _mm512_loadu_ps(px);
                        xb[mi] = _mm512_loadu_ps(px.add(16));
                    }
                    for r in 0..R {
                        let (qa, qb) = unpack::<BITS>(rp[r].add(b * bb));
                        let fa = _mm512_cvtepi32_ps(qa);
                        let fb = _mm512_cvtepi32_ps(qb);
                        for mi in 0..M {
                            acc[r][mi] = _mm512_fmadd_ps(fa, xa[mi], acc[r][mi]);
                            acc[r][mi] = _mm512_fmadd_ps(fb, xb[mi], acc[r][mi]);
                        }
                    }
                }
                for r in 0..R {
                    let at = (row0 + r) * g_count + g;
                    let s = w.scales.get_unchecked(at).to_f32();
                    let sz = s * *w.zeros.get_unchecked(at) as f32;
                    let sv = _mm512_set1_ps(s);
                    for mi in 0..M {
                        tot[r][mi] = _mm512_fmadd_ps(acc[r][mi], sv, tot[r][mi]);
                        zt[r][mi] += sz * *xsum.add(mi * g_count + g);
                    }
                }
            }
            for r in 0..R {
                for mi in 0..M {
                    *out.add(mi * out_stride + r) = _mm512_reduce_add_ps(tot[r][mi]) - zt[r][mi];
                }
            }
        }
    }

    /// Rows `rows` in tiles of `R`, the rest one at a time.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn run<const BITS: u8, const R: usize, const M: usize>(
        w: &GptqMatrix,
        x: *const f32,
        xsum: *const f32,
        rows: Range<usize>,
        out: *mut f32,
        out_stride: usize,
    ) {
        unsafe {
            let mut r = rows.start;
            while r + R <= rows.end {
                tile::<BITS, R, M>(w, x, xsum, r, out.add(r - rows.start), out_stride);
                r += R;
            }
            while r < rows.end {
                tile::<BITS, 1, M>(w, x, xsum, r, out.add(r - rows.start), out_stride);
                r += 1;
            }
        }
    }

    /// See `GptqMatrix::rows_kernel`; input rows are taken four at a time.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn forward_rows<const BITS: u8>(
        w: &GptqMatrix,
        xs: &[f32],
        xsum: &[f32],
        m: usize,
        rows: Range<usize>,
        out: &mut [f32],
    ) {
        let (kp, g_count, nr) = (w.kp, w.group_blocks.len() - 1, rows.len());
        assert!(xs.len() >= m * kp && xsum.len() >= m * g_count && out.len() >= m * nr);
        assert!(rows.end <= w.n && w.packed.len() >= w.n * w.row_bytes);
        unsafe {
            let mut mi = 0;
            while mi < m {
                let mc = (m - mi).min(4);
                let x = xs.as_ptr().add(mi * kp);
                let s = xsum.as_ptr().add(mi * g_count);
                let o = out.as_mut_ptr().add(mi * nr);
                let r = rows.clone();
                match mc {
                    1 => run::<BITS, 8, 1>(w, x, s, r, o, nr),
                    2 => run::<BITS, 4, 2>(w, x, s, r, o, nr),
                    3 => run::<BITS, 2, 3>(w, x, s, r, o, nr),
                    _ => run::<BITS, 2, 4>(w, x, s, r, o, nr),
                }
                mi += mc;
            }
        }
    }

    /// See `GptqMatrix::dequantize_rows`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dequantize_rows<const BITS: u8>(
        w: &GptqMatrix,
        rows: Range<usize>,
        dst: &mut [f32],
    ) {
        let (kp, bb, g_count) = (w.kp, block_bytes(BITS), w.group_blocks.len() - 1);
        assert!(rows.end <= w.n && dst.len() >= rows.len() * kp);
        assert!(w.packed.len() >= w.n * w.row_bytes);
        unsafe {
            for (j, row) in rows.enumerate() {
                let p = w.packed.as_ptr().add(row * w.row_bytes);
                let d = dst.as_mut_ptr().add(j * kp);
                for g in 0..g_count {
                    let at = row * g_count + g;
                    let sv = _mm512_set1_ps(w.scales[at].to_f32());
                    let zv = _mm512_set1_ps(w.zeros[at] as f32);
                    for b in w.group_blocks[g] as usize..w.group_blocks[g + 1] as usize {
                        let (qa, qb) = unpack::<BITS>(p.add(b * bb));
                        let fa = _mm512_sub_ps(_mm512_cvtepi32_ps(qa), zv);
                        let fb = _mm512_sub_ps(_mm512_cvtepi32_ps(qb), zv);
                        _mm512_storeu_ps(d.add(b * BLOCK), _mm512_mul_ps(sv, fa));
                        _mm512_storeu_ps(d.add(b * BLOCK + 16), _mm512_mul_ps(sv, fb));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64: deterministic test data without extra dependencies.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        /// Uniform in [-1, 1).
        fn unit(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
    }

    #[derive(Clone, Copy, Debug)]
    enum Groups {
        Size(usize),
        PerChannel,
    }

    /// A random quantized weight. Scales are f16-representable (so round trips are exact) and
    /// zero points cover the whole `0..=2^bits` range, including the wrapped 2^bits.
    fn make(bits: u8, n: usize, k: usize, groups: Groups, act_order: bool, seed: u64) -> QuantizedLinear {
        let mut rng = Rng(seed);
        let (gs, group_size) = match groups {
            Groups::Size(g) => (g, Some(g)),
            Groups::PerChannel => (k, None),
        };
        let g_count = k.div_ceil(gs);
        let maxq = maxq(bits) as u64;
        let codes = (0..n * k).map(|_| rng.below(maxq + 1) as u8).collect();
        let scales = (0..g_count * n)
            .map(|_| f16::from_f32(0.001 + 0.05 * (rng.unit() + 1.0)).to_f32())
            .collect();
        let zeros = (0..g_count * n).map(|_| rng.below(maxq + 2) as u32).collect();
        let g_idx = if act_order {
            // Groups are consecutive runs of a random permutation: g_idx[perm[i]] = i / gs.
            let mut perm: Vec<usize> = (0..k).collect();
            for i in (1..k).rev() {
                perm.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let mut g_idx = vec![0u32; k];
            for (i, &col) in perm.iter().enumerate() {
                g_idx[col] = (i / gs) as u32;
            }
            g_idx
        } else {
            (0..k).map(|i| (i / gs) as u32).collect()
        };
        QuantizedLinear { bits, group_size, n, k, codes, scales, zeros, g_idx }
    }

    fn input(m: usize, k: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng(seed);
        (0..m * k).map(|_| rng.unit()).collect()
    }

    /// Reference: `QuantizedLinear::dequantize` then an f64 matmul. Also returns Σ|w·x| per
    /// output, the scale for the tolerance (results are sums with cancellation).
    fn reference(q: &QuantizedLinear, x: &[f32], m: usize) -> (Vec<f64>, Vec<f64>) {
        let w = q.dequantize();
        let (n, k) = (q.n, q.k);
        let mut y = vec![0f64; m * n];
        let mut mag = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for t in 0..k {
                    let p = w[j * k + t] as f64 * x[i * k + t] as f64;
                    y[i * n + j] += p;
                    mag[i * n + j] += p.abs();
                }
            }
        }
        (y, mag)
    }

    fn assert_close(got: &[f32], want: &(Vec<f64>, Vec<f64>), what: &str) {
        assert_eq!(got.len(), want.0.len(), "{what}: length");
        for (i, (&g, (&w, &mag))) in got.iter().zip(want.0.iter().zip(&want.1)).enumerate() {
            let err = (g as f64 - w).abs();
            assert!(
                err <= 1e-4 * mag + 1e-6,
                "{what}: output {i}: got {g}, want {w} (|err| {err:.3e}, Σ|w·x| {mag:.3e})"
            );
        }
    }

    /// Rows `rows` of the `[m, n]` reference.
    fn slice_rows(want: &(Vec<f64>, Vec<f64>), m: usize, n: usize, rows: Range<usize>) -> (Vec<f64>, Vec<f64>) {
        let pick = |v: &Vec<f64>| {
            (0..m).flat_map(|i| v[i * n + rows.start..i * n + rows.end].to_vec()).collect()
        };
        (pick(&want.0), pick(&want.1))
    }

    /// forward, forward_rows (AVX-512 and scalar) on a row subset, to_f32 and the round trip
    /// for one weight.
    fn check(q: &QuantizedLinear, ms: &[usize], what: &str) {
        let mat = GptqMatrix::from_quantized(q).unwrap();
        assert_eq!(mat.to_quantized(), *q, "{what}: round trip");
        assert_eq!(mat.to_f32(), q.dequantize(), "{what}: to_f32 must equal dequantize exactly");
        let (n, k) = (q.n, q.k);
        for &m in ms {
            let x = input(m, k, 1000 + m as u64);
            let want = reference(q, &x, m);
            let mut out = vec![f32::NAN; m * n];
            mat.forward(&x, m, &mut out);
            assert_close(&out, &want, &format!("{what} forward m={m}"));
            // A row subset that starts off any tile boundary and ends at N.
            let rows = 3.min(n)..n;
            let sub = slice_rows(&want, m, n, rows.clone());
            for scalar in [false, true] {
                let mut out = vec![f32::NAN; m * rows.len()];
                mat.forward_rows_impl(&x, m, rows.clone(), &mut out, scalar);
                assert_close(&out, &sub, &format!("{what} forward_rows m={m} scalar={scalar}"));
            }
        }
    }

    #[test]
    fn matches_reference_for_all_widths_groupings_and_shapes() {
        let mut seed = 1;
        for bits in [2u8, 3, 4, 8] {
            for k in [576usize, 1536] {
                for (groups, act) in [
                    (Groups::Size(32), false),
                    (Groups::Size(128), false),
                    (Groups::PerChannel, false),
                    (Groups::Size(32), true),
                    (Groups::Size(128), true),
                ] {
                    // N = 37: not a multiple of any tile height (8, 4, 2) nor of a row block.
                    let q = make(bits, 37, k, groups, act, seed);
                    seed += 1;
                    check(&q, &[1, 3, 5, 64], &format!("{bits}-bit K={k} {groups:?} act={act}"));
                }
            }
        }
    }

    #[test]
    fn odd_group_sizes_and_k_need_padding() {
        // Groups that are not multiples of 32 and K not a multiple of 32 go through the padded
        // slot order; 200 rows cover several GEMM row blocks.
        for bits in [2u8, 3, 4, 8] {
            for (k, groups, act) in [
                (100, Groups::PerChannel, false),
                (96, Groups::Size(48), false),
                (150, Groups::Size(20), true),
                (64, Groups::Size(64), false),
            ] {
                let q = make(bits, 200, k, groups, act, 77 + k as u64);
                let mat = GptqMatrix::from_quantized(&q).unwrap();
                assert!(mat.kp % BLOCK == 0 && mat.kp >= k);
                check(&q, &[1, 2, 4, 7], &format!("{bits}-bit K={k} {groups:?} act={act}"));
            }
        }
    }

    #[test]
    fn irregular_g_idx_with_unused_group() {
        // Arbitrary non-monotone g_idx (not from any permutation) where group 2 of 4 is unused.
        let mut q = make(4, 19, 96, Groups::Size(24), false, 5);
        let mut rng = Rng(9);
        for g in q.g_idx.iter_mut() {
            *g = [0, 1, 3][rng.below(3) as usize];
        }
        check(&q, &[1, 4, 6], "irregular g_idx");
        assert_eq!(GptqMatrix::from_quantized(&q).unwrap().storage_name(), "gptq-4bit-g24-actorder");
    }

    #[test]
    fn scales_are_rounded_to_f16() {
        let mut q = make(4, 8, 64, Groups::Size(32), false, 3);
        q.scales[0] = 0.1; // not representable in f16
        let mat = GptqMatrix::from_quantized(&q).unwrap();
        let back = mat.to_quantized();
        assert_eq!(back.scales[0], f16::from_f32(0.1).to_f32());
        assert_ne!(back.scales[0], 0.1);
        assert_eq!(back.scales[1..], q.scales[1..]);
        assert_eq!((back.codes, back.zeros, back.g_idx), (q.codes, q.zeros, q.g_idx));
    }

    #[test]
    fn storage_and_names() {
        let q = make(4, 8, 64, Groups::Size(32), false, 3);
        let mat = GptqMatrix::from_quantized(&q).unwrap();
        // 8 rows × 2 blocks × 16 bytes, f16 scales and u16 zeros for 2 groups, 3 block offsets.
        assert_eq!(mat.storage_bytes(), 8 * 2 * 16 + 8 * 2 * 2 * 2 + 3 * 4);
        assert_eq!(mat.storage_name(), "gptq-4bit-g32");
        let q = make(3, 8, 64, Groups::PerChannel, false, 3);
        assert_eq!(GptqMatrix::from_quantized(&q).unwrap().storage_name(), "gptq-3bit");
        let q = make(2, 8, 256, Groups::Size(128), true, 3);
        let mat = GptqMatrix::from_quantized(&q).unwrap();
        assert_eq!(mat.storage_name(), "gptq-2bit-g128-actorder");
        // The act-order slot map is held: 4 bytes per slot.
        assert_eq!(mat.storage_bytes(), 8 * 8 * 8 + 8 * 2 * 4 + 3 * 4 + 256 * 4);
        // 4-bit g128 at a real shape: about 1/7.5 of f32.
        let q = make(4, 576, 1536, Groups::Size(128), false, 3);
        let mat = GptqMatrix::from_quantized(&q).unwrap();
        let dense = 576 * 1536 * 4;
        assert!(mat.storage_bytes() * 7 < dense && mat.storage_bytes() * 8 > dense);
    }

    #[test]
    fn rejects_bad_input() {
        let good = make(4, 8, 64, Groups::Size(32), false, 3);
        assert!(GptqMatrix::from_quantized(&good).is_ok());
        let cases: Vec<(&str, Box<dyn Fn(&mut QuantizedLinear)>)> = vec![
            ("unsupported bit width", Box::new(|q| q.bits = 5)),
            ("empty shape", Box::new(|q| q.n = 0)),
            ("group size 0", Box::new(|q| q.group_size = Some(0))),
            ("codes", Box::new(|q| {
                q.codes.pop();
            })),
            ("scales has", Box::new(|q| {
                q.scales.pop();
            })),
            ("zeros has", Box::new(|q| {
                q.zeros.pop();
            })),
            ("g_idx has", Box::new(|q| {
                q.g_idx.pop();
            })),
            ("g_idx[5] = 2", Box::new(|q| q.g_idx[5] = 2)),
            ("does not fit in 4 bits", Box::new(|q| q.codes[70] = 16)),
            ("exceeds 2^4", Box::new(|q| q.zeros[3] = 17)),
            ("not finite", Box::new(|q| q.scales[1] = f32::NAN)),
            ("not finite", Box::new(|q| q.scales[1] = 1e6)), // overflows f16
        ];
        for (want, edit) in cases {
            let mut q = good.clone();
            edit(&mut q);
            match GptqMatrix::from_quantized(&q) {
                Err(Error::InvalidArgument(msg)) => {
                    assert!(msg.contains(want), "expected `{want}` in `{msg}`")
                }
                Err(e) => panic!("expected InvalidArgument for `{want}`, got {e}"),
                Ok(_) => panic!("expected an error for `{want}`"),
            }
        }
        // The largest zero point, 2^bits, is accepted.
        let mut q = good.clone();
        q.zeros[0] = 16;
        assert!(GptqMatrix::from_quantized(&q).is_ok());
    }
}
