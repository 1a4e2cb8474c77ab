//! Packed GPTQ-layout weights (2/3/4/8-bit codes, per-group scales and zero points, optional
//! act-order `g_idx`) with matrix products that unpack the codes on the fly.
//!
//! # In-memory layout (not the on-disk `qweight` layout)
//!
//! Input channels are put in *group-contiguous order*: group 0's columns (in increasing column
//! order), then group 1's, and so on, each group padded with zero codes to a multiple of
//! `BLOCK` = 32 positions ("slots"). For the usual sequential `g_idx = k / group_size` with
//! group sizes that are multiples of 32 this order is the identity and nothing is stored for it;
//! otherwise (act-order, odd group sizes) the slot → column map is kept and the input is gathered
//! into slot order once per call.
//!
//! Output rows are stored in *panels* of 16 (the lanes of a 512-bit register), the last panel
//! padded with zero rows. A panel holds its blocks back to back, `64·bits` bytes each. Inside a
//! block, slots are taken four at a time ("quads"): the quad vector of quad q is 64 bytes whose
//! byte `4r + i` is the code of row r at slot `4q + i` — exactly the operand layout of the
//! VNNI instruction `vpdpbusd`, which multiplies four byte pairs per 32-bit lane and adds them.
//! The 8 quad vectors of a block are stored as:
//!
//! * 8-bit: the 8 vectors as they are (512 bytes).
//! * 4-bit: 4 vectors; low nibbles are quad 2j, high nibbles quad 2j+1.
//! * 2-bit: 2 vectors; bits `2t..2t+2` of vector j are quad 4j+t.
//! * 3-bit: the low two bits as a 2-bit block, then one vector whose bit q is bit 2 of quad q.
//!
//! Scales are f16 and zero points u8 (u16 if some Z is 256), both `[panel, G, 16]` so a panel's
//! 16 values for a group are one vector load. Scales are f16 because checkpoints store them so;
//! [`GptqMatrix::from_quantized`] rounds f32 scales to f16.
//!
//! # Arithmetic
//!
//! A group's contribution to output n is `s·Σ q·x − s·Z·Σ x`, with the per-group input sums Σx
//! computed once per call. For few input rows (decoding, `forward_rows`) Σ q·x is computed in
//! integers: the input is split, per group, into three signed 8-bit limbs,
//! `x ≈ a·(l₀ + l₁/2⁷ + l₂/2¹⁴)` with `a = max|x|/127`, which keeps about 22 bits of each value
//! relative to the group's largest (f32 keeps 24), and `vpdpbusd` multiplies codes with limbs
//! exactly. The prepared limbs are cached per thread and reused while the same input comes
//! back (several projections of one input, and all row blocks of one call). With AVX2 but not
//! AVX-512 VNNI, one input row of 2–4 bit codes goes through the same arithmetic with
//! `vpmaddubsw` (which would overflow with 8-bit codes); otherwise f32 kernels (AVX2 + FMA,
//! else portable code) take each code as a bit field of its row's 32-bit lane with a single
//! AND and convert it to f32 as is, the code times a power of two; the input, prepared and
//! cached the same way, carries the inverse power (see [`Field`]).
//! For many input rows (`forward`) blocks of output rows are dequantized to f32 in a per-thread
//! buffer and multiplied with a serial GEMM, the blocks spread over the threads.

use crate::error::{Error, Result};
use crate::kernels;
use crate::kernels::{forward_rows_parallel, LinearKernel};
use crate::qtypes::grid::{maxq, QuantizedLinear};
use crate::qtypes::{Bits, GroupSize};
use half::f16;
use std::cell::RefCell;
use std::ops::Range;
use std::sync::Arc;

/// Slots per block, for every bit width.
const BLOCK: usize = 32;
/// Output rows per panel (f32 / i32 lanes of a 512-bit register).
const LANES: usize = 16;
/// Slot map entry of a padding slot (its code is 0 and its input is 0).
const PAD: u32 = u32::MAX;
/// Signed 8-bit limbs an input value is split into for the integer kernel.
const LIMBS: usize = 3;
/// Longest run of blocks accumulated in i32 before converting to f32: each `vpdpbusd` adds at
/// most 4·255·127 per lane, 8 per block, so 1024 blocks stay below 2³¹.
const SEG_BLOCKS: usize = 1024;
/// Output rows dequantized at a time by one task of the GEMM path (about; see `forward_gemm`):
/// big enough that the GEMM amortizes packing the input, small enough for L2 and for balance.
const GEMM_ROWS: usize = 128;

/// Bytes of one block of one panel: 16 rows × 32 codes × bits / 8.
fn panel_block_bytes(bits: u8) -> usize {
    64 * bits as usize
}

/// Slot order of the input channels, shared by every row (see the module docs).
#[derive(Debug, Clone, PartialEq)]
struct SlotLayout {
    k: usize,
    /// Slots: K plus padding, a multiple of [`BLOCK`].
    kp: usize,
    /// `[G + 1]`: group g occupies blocks `group_blocks[g]..group_blocks[g + 1]`.
    group_blocks: Vec<u32>,
    /// Block ranges accumulated in integers with one input scale: the groups, split every
    /// [`SEG_BLOCKS`] blocks.
    segs: Vec<[u32; 2]>,
    /// `[G + 1]`: group g's segments are `segs[group_segs[g]..group_segs[g + 1]]`.
    group_segs: Vec<u32>,
    /// `[kp]`: input column of each slot ([`PAD`] for padding); `None` when slot i is column i
    /// for every i < K (only trailing padding), the common case.
    slot_col: Option<Vec<u32>>,
}

impl SlotLayout {
    /// `g_idx` must have K entries, all below `g_count` (checked by the caller).
    fn new(g_idx: &[u32], g_count: usize) -> Result<Self> {
        let k = g_idx.len();
        let mut counts = vec![0usize; g_count];
        for &g in g_idx {
            counts[g as usize] += 1;
        }
        let too_big = || {
            Error::InvalidArgument(format!(
                "quantized weight with K={k} and {g_count} groups is too large to pack"
            ))
        };
        let mut group_blocks = Vec::with_capacity(g_count + 1);
        let mut segs = Vec::new();
        let mut group_segs = Vec::with_capacity(g_count + 1);
        let mut blocks = 0usize;
        group_blocks.push(0);
        group_segs.push(0);
        for &c in &counts {
            let end = blocks + c.div_ceil(BLOCK);
            let end32 = u32::try_from(end).map_err(|_| too_big())?;
            for b0 in (blocks..end).step_by(SEG_BLOCKS) {
                segs.push([b0 as u32, (b0 + SEG_BLOCKS).min(end) as u32]);
            }
            blocks = end;
            group_blocks.push(end32);
            group_segs.push(segs.len() as u32);
        }
        let kp = blocks * BLOCK;
        let mut slot_col = vec![PAD; kp];
        let mut next: Vec<usize> = group_blocks[..g_count]
            .iter()
            .map(|&b| b as usize * BLOCK)
            .collect();
        for (col, &g) in g_idx.iter().enumerate() {
            slot_col[next[g as usize]] = col as u32;
            next[g as usize] += 1;
        }
        let identity = slot_col[..k]
            .iter()
            .enumerate()
            .all(|(i, &c)| c == i as u32);
        Ok(SlotLayout {
            k,
            kp,
            group_blocks,
            segs,
            group_segs,
            slot_col: (!identity).then_some(slot_col),
        })
    }

    fn groups(&self) -> usize {
        self.group_blocks.len() - 1
    }

    fn blocks(&self, g: usize) -> Range<usize> {
        self.group_blocks[g] as usize..self.group_blocks[g + 1] as usize
    }

    /// Input column of slot `i` ([`PAD`] for padding).
    fn col(&self, i: usize) -> u32 {
        match &self.slot_col {
            Some(map) => map[i],
            None if i < self.k => i as u32,
            None => PAD,
        }
    }

    fn bytes(&self) -> usize {
        4 * (self.group_blocks.len() + self.group_segs.len() + 2 * self.segs.len())
            + self.slot_col.as_ref().map_or(0, |s| 4 * s.len())
    }

    /// `x` (`[m, K]`) in slot order (`[m, kp]`, zero in padding slots), into `buf`; or `x`
    /// itself when the slot order is the identity without padding.
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

    /// Per-group sums of slot-ordered input `xs`: `out` is `[m, G]`.
    fn group_sums(&self, xs: &[f32], m: usize, out: &mut Vec<f32>) {
        let g_count = self.groups();
        out.clear();
        out.resize(m * g_count, 0.0);
        for (xr, sums) in xs
            .chunks_exact(self.kp)
            .take(m)
            .zip(out.chunks_exact_mut(g_count))
        {
            for (g, s) in sums.iter_mut().enumerate() {
                let b = self.blocks(g);
                *s = sum(&xr[b.start * BLOCK..b.end * BLOCK]);
            }
        }
    }
}

/// Zero points, `[panel, G, 16]`: one byte each unless some Z is 256 (8-bit, wrapped v1).
enum Zeros {
    U8(Vec<u8>),
    U16(Vec<u16>),
}

impl Zeros {
    fn get(&self, i: usize) -> u32 {
        match self {
            Zeros::U8(z) => z[i] as u32,
            Zeros::U16(z) => z[i] as u32,
        }
    }
    fn bytes(&self) -> usize {
        match self {
            Zeros::U8(z) => z.len(),
            Zeros::U16(z) => 2 * z.len(),
        }
    }
}

/// A quantized `[N, K]` weight kept packed in memory (see the module docs for the layout).
///
/// Built from the interchange type [`QuantizedLinear`] and convertible back to it, so GPTQ, AWQ
/// and other integer-grid formats share this kernel.
pub struct GptqMatrix {
    bits: Bits,
    group_size: GroupSize,
    n: usize,
    /// `ceil(N / 16)`.
    panels: usize,
    /// Bytes per panel: blocks × `64·bits`.
    panel_bytes: usize,
    /// `[panels, panel_bytes]`.
    packed: Vec<u8>,
    /// `[panels, G, 16]`.
    scales: Vec<f16>,
    zeros: Zeros,
    layout: Arc<SlotLayout>,
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
        validate(q)?;
        let (n, k, bits) = (q.n, q.k, q.bits.get());
        let g_count = q.scales.len() / n;
        let layout = SlotLayout::new(&q.g_idx, g_count)?;
        let irregular_g_idx = match q.group_size.size() {
            Some(gs) => q
                .g_idx
                .iter()
                .enumerate()
                .any(|(i, &g)| g as usize != i / gs),
            None => q.g_idx.iter().any(|&g| g != 0),
        };

        let panels = n.div_ceil(LANES);
        let pbb = panel_block_bytes(bits);
        let nblocks = layout.kp / BLOCK;
        let panel_bytes = nblocks * pbb;
        let mut packed = vec![0u8; panels * panel_bytes];
        let mut codes = [[0u8; BLOCK]; LANES];
        for p in 0..panels {
            for b in 0..nblocks {
                for (r, row_codes) in codes.iter_mut().enumerate() {
                    let row = p * LANES + r;
                    for (i, c) in row_codes.iter_mut().enumerate() {
                        let col = layout.col(b * BLOCK + i);
                        *c = if row < n && col != PAD {
                            q.codes[row * k + col as usize]
                        } else {
                            0
                        };
                    }
                }
                let at = p * panel_bytes + b * pbb;
                pack_panel_block(bits, &codes, &mut packed[at..at + pbb]);
            }
        }

        let mut scales = vec![f16::ZERO; panels * g_count * LANES];
        let mut zeros = vec![0u16; panels * g_count * LANES];
        for g in 0..g_count {
            for row in 0..n {
                let at = ((row / LANES) * g_count + g) * LANES + row % LANES;
                scales[at] = f16::from_f32(q.scales[g * n + row]);
                zeros[at] = q.zeros[g * n + row] as u16;
            }
        }
        let zeros = if zeros.iter().all(|&z| z <= u8::MAX as u16) {
            Zeros::U8(zeros.iter().map(|&z| z as u8).collect())
        } else {
            Zeros::U16(zeros)
        };
        Ok(GptqMatrix {
            bits: q.bits,
            group_size: q.group_size,
            n,
            panels,
            panel_bytes,
            packed,
            scales,
            zeros,
            layout: Arc::new(layout),
            irregular_g_idx,
        })
    }

    /// The unpacked form (codes, scales, true zero points, `g_idx`), e.g. for saving. Equal to
    /// what [`from_quantized`](Self::from_quantized) took, except that scales are f16-rounded.
    pub fn to_quantized(&self) -> QuantizedLinear {
        let (n, k, g_count) = (self.n, self.layout.k, self.layout.groups());
        let lay = &self.layout;
        let pbb = panel_block_bytes(self.bits.get());
        let mut codes = vec![0u8; n * k];
        let mut block = [[0u8; BLOCK]; LANES];
        for p in 0..self.panels {
            for b in 0..lay.kp / BLOCK {
                let at = p * self.panel_bytes + b * pbb;
                unpack_panel_block(self.bits.get(), &self.packed[at..at + pbb], &mut block);
                for (r, row_codes) in block.iter().enumerate() {
                    let row = p * LANES + r;
                    for (i, &c) in row_codes.iter().enumerate() {
                        let col = lay.col(b * BLOCK + i);
                        if row < n && col != PAD {
                            codes[row * k + col as usize] = c;
                        }
                    }
                }
            }
        }
        let mut g_idx = vec![0u32; k];
        for g in 0..g_count {
            let b = lay.blocks(g);
            for slot in b.start * BLOCK..b.end * BLOCK {
                let col = lay.col(slot);
                if col != PAD {
                    g_idx[col as usize] = g as u32;
                }
            }
        }
        let mut scales = vec![0f32; g_count * n];
        let mut zeros = vec![0u32; g_count * n];
        for g in 0..g_count {
            for row in 0..n {
                let at = ((row / LANES) * g_count + g) * LANES + row % LANES;
                scales[g * n + row] = self.scales[at].to_f32();
                zeros[g * n + row] = self.zeros.get(at);
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
        self.bits.get()
    }

    /// Dequantize panels `panels` into `dst[slot · ld + 16·(p − panels.start) + lane]` (slot
    /// order, output rows contiguous: the `[K, N]` operand of a GEMM). All 16 lanes of every
    /// panel are written; padding rows come out as zeros.
    fn dequantize_panels(&self, panels: Range<usize>, dst: &mut [f32], ld: usize, simd: bool) {
        assert!(panels.end <= self.panels && ld >= panels.len() * LANES);
        assert!(dst.len() >= self.layout.kp * ld);
        // One panel kernel per instruction set and bit width; the loop over panels is shared.
        #[cfg(target_arch = "x86_64")]
        {
            type PanelKernel = unsafe fn(&GptqMatrix, usize, *mut f32, usize);
            let kernel: Option<PanelKernel> = if !simd {
                None
            } else if kernels::has_avx512() {
                Some(match self.bits.get() {
                    2 => avx512::dequantize_panel::<2>,
                    3 => avx512::dequantize_panel::<3>,
                    4 => avx512::dequantize_panel::<4>,
                    _ => avx512::dequantize_panel::<8>,
                })
            } else if kernels::has_avx2() {
                Some(match self.bits.get() {
                    2 => avx2::dequantize_panel::<2>,
                    3 => avx2::dequantize_panel::<3>,
                    4 => avx2::dequantize_panel::<4>,
                    _ => avx2::dequantize_panel::<8>,
                })
            } else {
                None
            };
            if let Some(kernel) = kernel {
                for (j, p) in panels.enumerate() {
                    // SAFETY: the kernel's instruction set is available (checked above); the
                    // asserts above bound every store (slot < kp, lane offset + 16 ≤ ld).
                    unsafe { kernel(self, p, dst.as_mut_ptr().add(j * LANES), ld) };
                }
                return;
            }
        }
        let _ = simd;
        let lay = &self.layout;
        let g_count = lay.groups();
        let pbb = panel_block_bytes(self.bits.get());
        let fields: Vec<Field> = (0..BLOCK).map(|f| field(self.bits.get(), f)).collect();
        let mask = (1u32 << fields[0].width) - 1;
        for (j, p) in panels.enumerate() {
            for g in 0..g_count {
                let at = (p * g_count + g) * LANES;
                let s: [f32; LANES] = std::array::from_fn(|r| self.scales[at + r].to_f32());
                let z: [f32; LANES] = std::array::from_fn(|r| self.zeros.get(at + r) as f32);
                for b in lay.blocks(g) {
                    let from = p * self.panel_bytes + b * pbb;
                    let blk = &self.packed[from..from + pbb];
                    // One field per slot (the low two bits for 3-bit, whose bit 2 is added).
                    let hi = (self.bits.get() == 3).then(|| block_lanes(blk, 2));
                    for fd in &fields {
                        let v = block_lanes(blk, fd.vec);
                        let e = high_bit(fd.slot);
                        let d = &mut dst[(b * BLOCK + fd.slot) * ld + j * LANES..][..LANES];
                        for r in 0..LANES {
                            let mut c = (v[r] >> fd.shift) & mask;
                            if let Some(h) = &hi {
                                c |= ((h[r] >> e) & 1) << 2;
                            }
                            d[r] = s[r] * (c as f32 - z[r]);
                        }
                    }
                }
            }
        }
    }

    /// `forward_rows` with a choice of kernel (tests run both): when `simd`, the integer
    /// AVX-512 VNNI kernel or else the AVX2 f32 one if available; otherwise the portable f32 one.
    fn forward_rows_impl(
        &self,
        x: &[f32],
        m: usize,
        rows: Range<usize>,
        out: &mut [f32],
        simd: bool,
    ) {
        let k = self.layout.k;
        assert!(x.len() >= m * k, "input shorter than [m, in_features]");
        assert!(
            rows.start <= rows.end && rows.end <= self.n,
            "row range out of bounds"
        );
        assert!(out.len() >= m * rows.len(), "output shorter than [m, rows]");
        if m == 0 || rows.is_empty() {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if simd && has_avx512_vnni() {
            // SAFETY: AVX-512F/BW/VNNI are available; `prep` matches this layout and m.
            unsafe {
                with_prepared(self, x, m, |prep| match self.bits.get() {
                    2 => avx512::forward_rows::<2>(self, prep, rows, out),
                    3 => avx512::forward_rows::<3>(self, prep, rows, out),
                    4 => avx512::forward_rows::<4>(self, prep, rows, out),
                    _ => avx512::forward_rows::<8>(self, prep, rows, out),
                })
            };
            return;
        }
        // With AVX2 alone the integer kernel beats the f32 one for a single input (decoding),
        // not for several; and 8-bit codes would overflow its 16-bit pair sums.
        #[cfg(target_arch = "x86_64")]
        if simd && m == 1 && self.bits.get() != 8 && kernels::has_avx2() {
            // SAFETY: AVX2/FMA/F16C are available; `prep` matches this layout and m = 1.
            unsafe {
                with_prepared(self, x, m, |prep| match self.bits.get() {
                    2 => avx2::forward_row_int::<2>(self, prep, rows, out),
                    3 => avx2::forward_row_int::<3>(self, prep, rows, out),
                    _ => avx2::forward_row_int::<4>(self, prep, rows, out),
                })
            };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if simd && kernels::has_avx2() {
            with_field_input(self, x, m, |prep| {
                // SAFETY: AVX2/FMA/F16C are available; `prep` was made for this layout, bit
                // width and m.
                unsafe {
                    match self.bits.get() {
                        2 => avx2::forward_rows::<2>(self, prep, rows, out),
                        3 => avx2::forward_rows::<3>(self, prep, rows, out),
                        4 => avx2::forward_rows::<4>(self, prep, rows, out),
                        _ => avx2::forward_rows::<8>(self, prep, rows, out),
                    }
                }
            });
            return;
        }
        let _ = simd;
        with_field_input(self, x, m, |prep| {
            self.forward_rows_portable(prep, rows, out)
        })
    }

    /// Portable f32 kernel, the same arithmetic as `avx2::forward_rows` written so that it
    /// vectorizes over the 16 rows of a panel; inputs are taken up to four at a time.
    fn forward_rows_portable(&self, prep: &FieldInput, rows: Range<usize>, out: &mut [f32]) {
        let lay = &self.layout;
        let (m, g_count) = (prep.m, lay.groups());
        let pbb = panel_block_bytes(self.bits.get());
        let nf = block_fields(self.bits.get());
        let xstride = lay.kp / BLOCK * nf;
        let fields: Vec<Field> = (0..nf).map(|f| field(self.bits.get(), f)).collect();
        let nr = rows.len();
        for p in rows.start / LANES..rows.end.div_ceil(LANES) {
            for mi0 in (0..m).step_by(4) {
                let mc = (m - mi0).min(4);
                let mut tot = [[0f32; LANES]; 4];
                for g in 0..g_count {
                    let mut acc = [[0f32; LANES]; 4];
                    for b in lay.blocks(g) {
                        let from = p * self.panel_bytes + b * pbb;
                        let blk = &self.packed[from..from + pbb];
                        let xb = &prep.xf[mi0 * xstride + b * nf..];
                        // Four fields at a time, summed before they reach the accumulator: one
                        // dependent add per four fields instead of one per field.
                        for (f4, fd4) in fields.chunks_exact(4).enumerate() {
                            let c: [[f32; LANES]; 4] = std::array::from_fn(|t| {
                                let v = block_lanes(blk, fd4[t].vec);
                                std::array::from_fn(|r| fd4[t].take(v[r]) as f32)
                            });
                            for (i, a) in acc.iter_mut().enumerate().take(mc) {
                                let x = &xb[i * xstride + 4 * f4..][..4];
                                for (r, ar) in a.iter_mut().enumerate() {
                                    *ar += (c[0][r] * x[0] + c[1][r] * x[1])
                                        + (c[2][r] * x[2] + c[3][r] * x[3]);
                                }
                            }
                        }
                    }
                    let at = (p * g_count + g) * LANES;
                    for i in 0..mc {
                        let xsum = prep.xsum[(mi0 + i) * g_count + g];
                        for r in 0..LANES {
                            let s = self.scales[at + r].to_f32();
                            let sz = s * self.zeros.get(at + r) as f32;
                            tot[i][r] += s * acc[i][r] - sz * xsum;
                        }
                    }
                }
                for (i, t) in tot.iter().enumerate().take(mc) {
                    for (r, &v) in t.iter().enumerate() {
                        let row = p * LANES + r;
                        if rows.contains(&row) {
                            out[(mi0 + i) * nr + row - rows.start] = v;
                        }
                    }
                }
            }
        }
    }

    /// Many input rows: dequantize about [`GEMM_ROWS`] output rows at a time into a per-thread buffer
    /// and multiply with a serial GEMM, the row blocks spread over the threads.
    fn forward_gemm(&self, x: &[f32], m: usize, out: &mut [f32], simd: bool) {
        use rayon::prelude::*;
        let (n, kp) = (self.n, self.layout.kp);
        let mut gathered = Vec::new();
        let xs = self.layout.gather(x, m, &mut gathered);
        let out_ptr = SyncPtr(out.as_mut_ptr());
        // About GEMM_ROWS rows per task, but a multiple of the thread count of tasks so the
        // last round does not leave threads idle (576 rows on 2 threads: 6 × 96, not 5 × 128).
        let threads = rayon::current_num_threads().max(1);
        let tasks = n.div_ceil(GEMM_ROWS).div_ceil(threads) * threads;
        let step = n.div_ceil(tasks).next_multiple_of(LANES);
        (0..n.div_ceil(step)).into_par_iter().for_each(|task| {
            let r0 = task * step;
            let r1 = (r0 + step).min(n);
            let nr = r1 - r0;
            let panels = r0 / LANES..r1.div_ceil(LANES);
            let ld = panels.len() * LANES;
            GEMM_SCRATCH.with(|cell| {
                let mut fresh = (Vec::new(), Vec::new());
                let mut guard = cell.try_borrow_mut();
                let (w, local) = match guard.as_deref_mut() {
                    Ok(s) => s,
                    Err(_) => &mut fresh,
                };
                w.resize(kp * ld, 0.0);
                local.resize(m * nr, 0.0);
                self.dequantize_panels(panels, w, ld, simd);
                // local[m, nr] = xs[m, kp] · W where W[slot, j] = w[slot·ld + j]
                kernels::gemm_serial(m, nr, kp, xs, kp, 1, &w[..kp * ld], ld, 1, local);
                let out_ptr = &out_ptr;
                for r in 0..m {
                    // SAFETY: `out` has m·n elements (checked by `forward`) and each task
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

    fn forward_impl(&self, x: &[f32], m: usize, out: &mut [f32], simd: bool) {
        assert!(
            x.len() >= m * self.layout.k,
            "input shorter than [m, in_features]"
        );
        assert!(
            out.len() >= m * self.n,
            "output shorter than [m, out_features]"
        );
        if m == 0 {
            return;
        }
        if m <= kernels::GEMV_MAX_ROWS {
            forward_rows_parallel(self, x, m, out)
        } else {
            self.forward_gemm(x, m, out, simd)
        }
    }

    fn to_f32_impl(&self, simd: bool) -> Vec<f32> {
        let (n, k, kp) = (self.n, self.layout.k, self.layout.kp);
        let mut buf = vec![0f32; kp * LANES];
        let mut w = vec![0f32; n * k];
        for p in 0..self.panels {
            self.dequantize_panels(p..p + 1, &mut buf, LANES, simd);
            for r in 0..LANES.min(n - p * LANES) {
                let dst = &mut w[(p * LANES + r) * k..][..k];
                for slot in 0..kp {
                    let col = self.layout.col(slot);
                    if col != PAD {
                        dst[col as usize] = buf[slot * LANES + r];
                    }
                }
            }
        }
        w
    }
}

/// The input of the integer kernel, prepared once and cached per thread: slot-ordered,
/// split into limbs per segment, with per-group sums.
struct Prepared {
    layout: Arc<SlotLayout>,
    m: usize,
    /// The `[m, K]` input it was made from (compared bitwise to decide reuse).
    x: Vec<f32>,
    /// `[m, kp / 16, LIMBS, 16]` signed bytes.
    limbs: Vec<i8>,
    /// `[m, segments]`: the value of one unit of limb 0.
    seg_scale: Vec<f32>,
    /// `[m, G]`: Σ x over each group.
    xsum: Vec<f32>,
}

impl Prepared {
    fn empty(layout: &Arc<SlotLayout>) -> Self {
        Prepared {
            layout: layout.clone(),
            m: 0,
            x: Vec::new(),
            limbs: Vec::new(),
            seg_scale: Vec::new(),
            xsum: Vec::new(),
        }
    }

    fn matches(&self, layout: &Arc<SlotLayout>, x: &[f32], m: usize) -> bool {
        let k = layout.k;
        self.m == m
            && (Arc::ptr_eq(&self.layout, layout) || *self.layout == **layout)
            && bytemuck::cast_slice::<f32, u32>(&self.x)
                == bytemuck::cast_slice::<f32, u32>(&x[..m * k])
    }

    /// Prepare `x` (`[m, K]`) for `layout`, reusing this value's buffers.
    ///
    /// # Safety
    /// AVX-512F/BW or else AVX2/FMA must be available.
    #[cfg(target_arch = "x86_64")]
    unsafe fn rebuild(
        &mut self,
        layout: &Arc<SlotLayout>,
        x: &[f32],
        m: usize,
        buf: &mut Vec<f32>,
    ) {
        let (k, kp, nseg) = (layout.k, layout.kp, layout.segs.len());
        if !Arc::ptr_eq(&self.layout, layout) {
            self.layout = layout.clone();
        }
        self.m = m;
        self.x.clear();
        self.x.extend_from_slice(&x[..m * k]);
        let xs = layout.gather(x, m, buf);
        layout.group_sums(xs, m, &mut self.xsum);
        self.limbs.resize(m * kp * LIMBS, 0);
        self.seg_scale.resize(m * nseg, 0.0);
        let avx512 = kernels::has_avx512();
        for mi in 0..m {
            let xr = &xs[mi * kp..(mi + 1) * kp];
            let lr = &mut self.limbs[mi * kp * LIMBS..(mi + 1) * kp * LIMBS];
            for (si, &[b0, b1]) in layout.segs.iter().enumerate() {
                let (s0, s1) = (b0 as usize * BLOCK, b1 as usize * BLOCK);
                let (xseg, lseg) = (&xr[s0..s1], &mut lr[s0 * LIMBS..s1 * LIMBS]);
                // SAFETY: AVX-512F/BW as checked, else AVX2/FMA as the caller guarantees.
                self.seg_scale[mi * nseg + si] = unsafe {
                    if avx512 {
                        avx512::split_limbs(xseg, lseg)
                    } else {
                        avx2::split_limbs(xseg, lseg)
                    }
                };
            }
        }
    }
}

/// The input of the f32 kernels (AVX2 and portable), prepared once and cached per thread like
/// [`Prepared`]: per block, the input value of every [`Field`] times its multiplier, in field
/// order, so the kernels multiply field `f` of a block by the `f`-th value.
struct FieldInput {
    layout: Arc<SlotLayout>,
    bits: u8,
    m: usize,
    /// The `[m, K]` input it was made from (compared bitwise to decide reuse).
    x: Vec<f32>,
    /// `[m, blocks, block_fields(bits)]`.
    xf: Vec<f32>,
    /// `[m, G]`: Σ x over each group.
    xsum: Vec<f32>,
}

impl FieldInput {
    fn matches(&self, layout: &Arc<SlotLayout>, bits: u8, x: &[f32], m: usize) -> bool {
        self.m == m
            && self.bits == bits
            && (Arc::ptr_eq(&self.layout, layout) || *self.layout == **layout)
            && bytemuck::cast_slice::<f32, u32>(&self.x)
                == bytemuck::cast_slice::<f32, u32>(&x[..m * layout.k])
    }

    /// Prepare `x` (`[m, K]`) for `layout` and `bits`, reusing this value's buffers.
    fn rebuild(&mut self, layout: &Arc<SlotLayout>, bits: u8, x: &[f32], m: usize) {
        let (k, kp) = (layout.k, layout.kp);
        if !Arc::ptr_eq(&self.layout, layout) {
            self.layout = layout.clone();
        }
        self.bits = bits;
        self.m = m;
        self.x.clear();
        self.x.extend_from_slice(&x[..m * k]);
        let mut buf = Vec::new();
        let xs = layout.gather(x, m, &mut buf);
        layout.group_sums(xs, m, &mut self.xsum);
        let nf = block_fields(bits);
        let fields: Vec<(usize, f32)> = (0..nf)
            .map(|f| {
                let fd = field(bits, f);
                (fd.slot, fd.x_mult())
            })
            .collect();
        self.xf.clear();
        self.xf.reserve(m * kp / BLOCK * nf);
        for xb in xs[..m * kp].chunks_exact(BLOCK) {
            self.xf
                .extend(fields.iter().map(|&(slot, mult)| xb[slot] * mult));
        }
    }
}

/// Run `f` on `x` prepared for the integer kernels and `w`'s layout, from this thread's cache
/// if it holds the same input.
///
/// # Safety
/// AVX-512F/BW or else AVX2/FMA must be available.
#[cfg(target_arch = "x86_64")]
unsafe fn with_prepared<R>(
    w: &GptqMatrix,
    x: &[f32],
    m: usize,
    f: impl FnOnce(&Prepared) -> R,
) -> R {
    PREPARED.with(|cell| {
        let mut fresh = None;
        let mut guard = cell.try_borrow_mut();
        // A nested call on the same thread (not expected) prepares its own copy.
        let slot = match guard.as_deref_mut() {
            Ok(s) => s,
            Err(_) => &mut fresh,
        };
        let prep = slot.get_or_insert_with(|| Prepared::empty(&w.layout));
        if !prep.matches(&w.layout, x, m) {
            let mut buf = Vec::new();
            // SAFETY: guaranteed by the caller.
            unsafe { prep.rebuild(&w.layout, x, m, &mut buf) };
        }
        f(prep)
    })
}

/// Run `f` on `x` prepared for `w`'s layout and bit width, from this thread's cache if it
/// holds the same input.
fn with_field_input<R>(w: &GptqMatrix, x: &[f32], m: usize, f: impl FnOnce(&FieldInput) -> R) -> R {
    FIELD_INPUT.with(|cell| {
        let mut fresh = None;
        let mut guard = cell.try_borrow_mut();
        // A nested call on the same thread (not expected) prepares its own copy.
        let slot = match guard.as_deref_mut() {
            Ok(s) => s,
            Err(_) => &mut fresh,
        };
        let prep = slot.get_or_insert_with(|| FieldInput {
            layout: w.layout.clone(),
            bits: 0,
            m: 0,
            x: Vec::new(),
            xf: Vec::new(),
            xsum: Vec::new(),
        });
        if !prep.matches(&w.layout, w.bits.get(), x, m) {
            prep.rebuild(&w.layout, w.bits.get(), x, m);
        }
        f(prep)
    })
}

/// Where the f32 kernels find a code in a packed block (module docs): in the 32-bit lane of
/// row r of quad vector `vec` (bytes `64·vec + 4r..64·vec + 4r + 4`), bits
/// `shift..shift + width` hold row r's code at slot `slot`; for 3-bit, the fields with
/// `weight` 4 hold bit 2 of it and the others its low two bits.
///
/// A field is read as `lane & (mask << shift)`, the code times 2^shift and exact in f32, so
/// each costs a single AND; the input is multiplied by 2^−shift instead (exact too). The top
/// field of a lane would set the sign bit, so it is shifted down instead.
#[derive(Clone, Copy, Debug)]
struct Field {
    vec: usize,
    shift: u32,
    width: u32,
    slot: usize,
    weight: f32,
}

impl Field {
    fn top(self) -> bool {
        self.shift + self.width == 32
    }

    /// The field of `lane` as the kernels convert it to f32 (see the type docs).
    #[inline(always)]
    fn take(self, lane: u32) -> i32 {
        if self.top() {
            (lane >> self.shift) as i32
        } else {
            (lane & (((1 << self.width) - 1) << self.shift)) as i32
        }
    }

    /// What the input at `slot` is multiplied by: `weight`, divided by 2^shift unless `top`.
    fn x_mult(self) -> f32 {
        let unshift = if self.top() {
            1.0
        } else {
            f32::from_bits((127 - self.shift) << 23)
        };
        self.weight * unshift
    }
}

/// Fields per block: one per slot, plus one per slot for bit 2 of 3-bit codes.
const fn block_fields(bits: u8) -> usize {
    if bits == 3 {
        2 * BLOCK
    } else {
        BLOCK
    }
}

/// Field `f` (`< block_fields(bits)`) of a block: vectors in order, each lane from its low bits.
const fn field(bits: u8, f: usize) -> Field {
    // 3-bit: fields 0..32 are a 2-bit block, 32..64 the bit-2 vector (a 1-bit block).
    let (width, vec0, f, weight) = match bits {
        3 if f >= BLOCK => (1, 2, f - BLOCK, 4.0),
        3 => (2, 0, f, 1.0),
        _ => (bits as u32, 0, f, 1.0),
    };
    let per_lane = 32 / width as usize;
    let shift = (f % per_lane) as u32 * width;
    // Byte i of the lane holds slots 4q + i for the 8/width quads q packed in that vector.
    let quad = f / per_lane * (8 / width as usize) + (shift % 8 / width) as usize;
    Field {
        vec: vec0 + f / per_lane,
        shift,
        width,
        slot: 4 * quad + (shift / 8) as usize,
        weight,
    }
}

/// Bit of a 3-bit block's third vector that holds bit 2 of `slot`'s code (in every lane).
const fn high_bit(slot: usize) -> u32 {
    (8 * (slot % 4) + slot / 4) as u32
}

/// The 16 lanes (rows) of quad vector `vec` of a packed block.
#[inline(always)]
fn block_lanes(blk: &[u8], vec: usize) -> [u32; LANES] {
    let v = &blk[64 * vec..64 * vec + 64];
    std::array::from_fn(|r| {
        u32::from_le_bytes([v[4 * r], v[4 * r + 1], v[4 * r + 2], v[4 * r + 3]])
    })
}

/// An output pointer shared by tasks that write disjoint parts of it.
struct SyncPtr(*mut f32);
// SAFETY: used only for disjoint writes, see `forward_gemm`.
unsafe impl Sync for SyncPtr {}

thread_local! {
    /// The last input prepared for the integer kernel on this thread.
    static PREPARED: RefCell<Option<Prepared>> = const { RefCell::new(None) };
    /// The last input prepared for the f32 kernels on this thread.
    static FIELD_INPUT: RefCell<Option<FieldInput>> = const { RefCell::new(None) };
    /// Per-thread dequantized row block and GEMM output of `forward`.
    static GEMM_SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

impl LinearKernel for GptqMatrix {
    fn in_features(&self) -> usize {
        self.layout.k
    }
    fn out_features(&self) -> usize {
        self.n
    }
    fn forward_rows(&self, x: &[f32], m: usize, rows: Range<usize>, out: &mut [f32]) {
        self.forward_rows_impl(x, m, rows, out, true)
    }
    fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.forward_impl(x, m, out, true)
    }
    fn storage_bytes(&self) -> usize {
        self.packed.len() + 2 * self.scales.len() + self.zeros.bytes() + self.layout.bytes()
    }
    fn storage_name(&self) -> String {
        let mut name = format!("gptq-{}bit", self.bits.get());
        if let GroupSize::Size(g) = self.group_size {
            name += &format!("-g{g}");
        }
        if self.irregular_g_idx {
            name += "-actorder";
        }
        name
    }
    fn to_f32(&self) -> Vec<f32> {
        self.to_f32_impl(true)
    }
}

/// Checks of [`GptqMatrix::from_quantized`], each naming what is wrong.
fn validate(q: &QuantizedLinear) -> Result<()> {
    let (n, k, bits) = (q.n, q.k, q.bits.get());
    let bad = |msg: String| {
        Err(Error::InvalidArgument(format!(
            "quantized weight [N={n}, K={k}]: {msg}"
        )))
    };
    if n == 0 || k == 0 {
        return bad("empty shape".into());
    }
    if q.group_size == GroupSize::Size(0) {
        return bad("group size 0 (use per-channel instead)".into());
    }
    if n.checked_mul(k) != Some(q.codes.len()) {
        return bad(format!("has {} codes, expected N·K", q.codes.len()));
    }
    if q.scales.is_empty() || !q.scales.len().is_multiple_of(n) {
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
    if let Some((i, g)) = q
        .g_idx
        .iter()
        .enumerate()
        .find(|(_, &g)| g as usize >= g_count)
    {
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

/// Where code (row r, slot s) of a block lives: byte `4r + s % 4` of quad vector `s / 4`.
fn quad_byte(r: usize, s: usize) -> (usize, usize) {
    (s / 4, 4 * r + s % 4)
}

/// Pack one block of a panel, `codes[row][slot]`, into `64·bits` bytes (module docs).
fn pack_panel_block(bits: u8, codes: &[[u8; BLOCK]; LANES], out: &mut [u8]) {
    out.fill(0);
    for (r, row) in codes.iter().enumerate() {
        for (s, &c) in row.iter().enumerate() {
            let (q, byte) = quad_byte(r, s);
            match bits {
                8 => out[64 * q + byte] = c,
                4 => out[64 * (q / 2) + byte] |= c << (4 * (q % 2)),
                2 => out[64 * (q / 4) + byte] |= c << (2 * (q % 4)),
                _ => {
                    out[64 * (q / 4) + byte] |= (c & 3) << (2 * (q % 4));
                    out[128 + byte] |= ((c >> 2) & 1) << q;
                }
            }
        }
    }
}

/// Inverse of [`pack_panel_block`].
fn unpack_panel_block(bits: u8, bytes: &[u8], codes: &mut [[u8; BLOCK]; LANES]) {
    for (r, row) in codes.iter_mut().enumerate() {
        for (s, c) in row.iter_mut().enumerate() {
            let (q, byte) = quad_byte(r, s);
            *c = match bits {
                8 => bytes[64 * q + byte],
                4 => (bytes[64 * (q / 2) + byte] >> (4 * (q % 2))) & 15,
                2 => (bytes[64 * (q / 4) + byte] >> (2 * (q % 4))) & 3,
                _ => {
                    ((bytes[64 * (q / 4) + byte] >> (2 * (q % 4))) & 3)
                        | (((bytes[128 + byte] >> q) & 1) << 2)
                }
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx512_vnni() -> bool {
    kernels::has_avx512() && std::arch::is_x86_feature_detected!("avx512vnni")
}

/// Call `run::<BITS, MC, RB>` on the inputs `mi0..mi0 + MC` in chunks of up to four (`MC`),
/// with `RB` register blocks per chunk width: the SIMD kernels' shared driver loop.
#[cfg(target_arch = "x86_64")]
macro_rules! for_input_chunks {
    ($m:expr, $mi0:ident => $run:ident::<$bits:ident>($($arg:expr),*)) => {{
        let mut $mi0 = 0;
        while $mi0 < $m {
            let mc = ($m - $mi0).min(4);
            match mc {
                1 => $run::<$bits, 1, 4>($($arg),*),
                2 => $run::<$bits, 2, 2>($($arg),*),
                3 => $run::<$bits, 3, 1>($($arg),*),
                _ => $run::<$bits, 4, 1>($($arg),*),
            }
            $mi0 += mc;
        }
    }};
}

/// AVX-512 kernels on the panel layout.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{panel_block_bytes, GptqMatrix, Prepared, Zeros, BLOCK, LANES, LIMBS};
    use std::arch::x86_64::*;
    use std::ops::Range;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn srl(v: __m512i, n: i32) -> __m512i {
        _mm512_srl_epi32(v, _mm_cvtsi32_si128(n))
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn sll(v: __m512i, n: i32) -> __m512i {
        _mm512_sll_epi32(v, _mm_cvtsi32_si128(n))
    }

    /// The 8 quad vectors of one block (`p` points at `64·BITS` readable bytes): byte `4r + i`
    /// of vector q is the code of row r at slot `4q + i`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn unpack<const BITS: u8>(p: *const u8) -> [__m512i; 8] {
        unsafe {
            let load = |j: usize| _mm512_loadu_si512(p.add(64 * j) as *const _);
            match BITS {
                8 => std::array::from_fn(load),
                4 => {
                    let m = _mm512_set1_epi8(15);
                    std::array::from_fn(|q| {
                        _mm512_and_si512(srl(load(q / 2), 4 * (q % 2) as i32), m)
                    })
                }
                2 => {
                    let m = _mm512_set1_epi8(3);
                    std::array::from_fn(|q| {
                        _mm512_and_si512(srl(load(q / 4), 2 * (q % 4) as i32), m)
                    })
                }
                _ => {
                    let m = _mm512_set1_epi8(3);
                    let four = _mm512_set1_epi8(4);
                    let h = load(2);
                    std::array::from_fn(|q| {
                        let low = _mm512_and_si512(srl(load(q / 4), 2 * (q % 4) as i32), m);
                        // Bring bit q of every byte to bit 2; other bits are masked off below.
                        let hs = if q < 2 {
                            sll(h, 2 - q as i32)
                        } else {
                            srl(h, q as i32 - 2)
                        };
                        // low | (hs & 4)
                        _mm512_ternarylogic_epi32::<0xF8>(low, hs, four)
                    })
                }
            }
        }
    }

    /// The 16 scales and zero points of panel `p`, group `g`, as f32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn scale_zero(w: &GptqMatrix, p: usize, g: usize) -> (__m512, __m512) {
        unsafe {
            let at = (p * w.layout.groups() + g) * LANES;
            debug_assert!(at + LANES <= w.scales.len());
            let s = _mm512_cvtph_ps(_mm256_loadu_si256(w.scales.as_ptr().add(at) as *const _));
            let z = match &w.zeros {
                Zeros::U8(z) => {
                    _mm512_cvtepu8_epi32(_mm_loadu_si128(z.as_ptr().add(at) as *const _))
                }
                Zeros::U16(z) => {
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256(z.as_ptr().add(at) as *const _))
                }
            };
            (s, _mm512_cvtepi32_ps(z))
        }
    }

    /// Outputs of panel `p` for `M` prepared inputs starting at input `mi0`: lane r of result
    /// mi is output row `16p + r` for input `mi0 + mi`. `S` independent accumulators per limb
    /// hide the latency of `vpdpbusd`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn panel<const BITS: u8, const M: usize, const S: usize>(
        w: &GptqMatrix,
        prep: &Prepared,
        mi0: usize,
        p: usize,
    ) -> [__m512; M] {
        unsafe {
            let lay = &*w.layout;
            let (kp, g_count, nseg) = (lay.kp, lay.groups(), lay.segs.len());
            let pbb = panel_block_bytes(BITS);
            let base = w.packed.as_ptr().add(p * w.panel_bytes);
            let limbs = prep.limbs.as_ptr().add(mi0 * kp * LIMBS) as *const u8;
            let seg_scale = prep.seg_scale.as_ptr().add(mi0 * nseg);
            let xsum = prep.xsum.as_ptr().add(mi0 * g_count);
            let inv128 = _mm512_set1_ps(1.0 / 128.0);
            let mut tot = [_mm512_setzero_ps(); M];
            for g in 0..g_count {
                let (s, z) = scale_zero(w, p, g);
                for si in lay.group_segs[g] as usize..lay.group_segs[g + 1] as usize {
                    let [b0, b1] = *lay.segs.get_unchecked(si);
                    let mut acc = [[[_mm512_setzero_si512(); S]; LIMBS]; M];
                    for b in b0 as usize..b1 as usize {
                        let qv = unpack::<BITS>(base.add(b * pbb));
                        for (q, &codes) in qv.iter().enumerate() {
                            for (mi, a) in acc.iter_mut().enumerate() {
                                // Limbs of slots 4q..4q+4 of this block: chunk 2b + q/4.
                                let xp = limbs.add(
                                    mi * kp * LIMBS + (2 * b + q / 4) * 16 * LIMBS + (q % 4) * 4,
                                );
                                for (l, al) in a.iter_mut().enumerate() {
                                    let xl = _mm512_set1_epi32(std::ptr::read_unaligned(
                                        xp.add(16 * l) as *const i32,
                                    ));
                                    al[q % S] = _mm512_dpbusd_epi32(al[q % S], codes, xl);
                                }
                            }
                        }
                    }
                    for (mi, a) in acc.iter().enumerate() {
                        // c = A₀ + A₁/128 + A₂/128², by Horner from the last limb.
                        let mut c = _mm512_setzero_ps();
                        for al in a.iter().rev() {
                            let mut sum = al[0];
                            for part in &al[1..] {
                                sum = _mm512_add_epi32(sum, *part);
                            }
                            c = _mm512_fmadd_ps(c, inv128, _mm512_cvtepi32_ps(sum));
                        }
                        let scale =
                            _mm512_mul_ps(s, _mm512_set1_ps(*seg_scale.add(mi * nseg + si)));
                        tot[mi] = _mm512_fmadd_ps(c, scale, tot[mi]);
                    }
                }
                let sz = _mm512_mul_ps(s, z);
                for (mi, t) in tot.iter_mut().enumerate() {
                    *t = _mm512_fnmadd_ps(sz, _mm512_set1_ps(*xsum.add(mi * g_count + g)), *t);
                }
            }
            tot
        }
    }

    /// Panels covering `rows` for inputs `mi0..mi0 + M`, results written to `out` (`[m, rows]`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn run<const BITS: u8, const M: usize, const S: usize>(
        w: &GptqMatrix,
        prep: &Prepared,
        mi0: usize,
        rows: &Range<usize>,
        out: &mut [f32],
    ) {
        unsafe {
            let nr = rows.len();
            for p in rows.start / LANES..rows.end.div_ceil(LANES) {
                let tot = panel::<BITS, M, S>(w, prep, mi0, p);
                let r0 = p * LANES;
                for (mi, t) in tot.iter().enumerate() {
                    let orow = &mut out[(mi0 + mi) * nr..(mi0 + mi + 1) * nr];
                    if r0 >= rows.start && r0 + LANES <= rows.end {
                        _mm512_storeu_ps(orow[r0 - rows.start..][..LANES].as_mut_ptr(), *t);
                    } else {
                        let mut lanes = [0f32; LANES];
                        _mm512_storeu_ps(lanes.as_mut_ptr(), *t);
                        for (r, &v) in lanes.iter().enumerate() {
                            if rows.contains(&(r0 + r)) {
                                orow[r0 + r - rows.start] = v;
                            }
                        }
                    }
                }
            }
        }
    }

    /// See `GptqMatrix::forward_rows_impl`; inputs are taken up to four at a time.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn forward_rows<const BITS: u8>(
        w: &GptqMatrix,
        prep: &Prepared,
        rows: Range<usize>,
        out: &mut [f32],
    ) {
        let m = prep.m;
        assert!(rows.end <= w.n && out.len() >= m * rows.len());
        assert!(w.packed.len() == w.panels * w.panel_bytes);
        assert!(prep.limbs.len() == m * w.layout.kp * LIMBS);
        unsafe { for_input_chunks!(m, mi0 => run::<BITS>(w, prep, mi0, &rows, out)) }
    }

    /// Split `x` (a multiple of 16 values) into limbs, `out[chunk of 16][limb][16]`, with
    /// `x ≈ a·(l₀ + l₁/2⁷ + l₂/2¹⁴)`; returns `a = max|x| / 127`, or NaN if some x is not
    /// finite (so the outputs become NaN as in f32 arithmetic).
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn split_limbs(x: &[f32], out: &mut [i8]) -> f32 {
        assert!(x.len().is_multiple_of(16) && out.len() >= x.len() * LIMBS);
        unsafe {
            let mut amax = _mm512_setzero_ps();
            let mut finite: u16 = 0xFFFF;
            for c in x.chunks_exact(16) {
                let a = _mm512_abs_ps(_mm512_loadu_ps(c.as_ptr()));
                finite &= _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, _mm512_set1_ps(f32::INFINITY));
                amax = _mm512_max_ps(amax, a);
            }
            if finite != 0xFFFF {
                out.fill(0);
                return f32::NAN;
            }
            let amax = _mm512_reduce_max_ps(amax);
            // Below this, 127/amax·x would overflow or be denormal; such inputs are zero for
            // every practical purpose.
            if amax < 1e-30 {
                out.fill(0);
                return 0.0;
            }
            let inv = _mm512_set1_ps(127.0 / amax);
            let radix = _mm512_set1_ps(128.0);
            for (c, o) in x.chunks_exact(16).zip(out.chunks_exact_mut(16 * LIMBS)) {
                let mut t = _mm512_mul_ps(_mm512_loadu_ps(c.as_ptr()), inv);
                for l in 0..LIMBS {
                    // Round half to even; t − round(t) and the ×128 are exact in f32, so only
                    // the last limb rounds.
                    let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                        t,
                    );
                    let bytes = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r));
                    _mm_storeu_si128(o.as_mut_ptr().add(16 * l) as *mut __m128i, bytes);
                    t = _mm512_mul_ps(_mm512_sub_ps(t, r), radix);
                }
            }
            amax / 127.0
        }
    }

    /// All 16 rows of panel `p` dequantized to `dst[slot · ld + lane]`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn dequantize_panel<const BITS: u8>(
        w: &GptqMatrix,
        p: usize,
        dst: *mut f32,
        ld: usize,
    ) {
        unsafe {
            let lay = &*w.layout;
            let pbb = panel_block_bytes(BITS);
            let base = w.packed.as_ptr().add(p * w.panel_bytes);
            let byte = _mm512_set1_epi32(0xFF);
            for g in 0..lay.groups() {
                let (s, z) = scale_zero(w, p, g);
                for b in lay.blocks(g) {
                    let qv = unpack::<BITS>(base.add(b * pbb));
                    for (q, &codes) in qv.iter().enumerate() {
                        for i in 0..4 {
                            // Byte i of every lane: the codes of all 16 rows at slot 4q + i.
                            let c = _mm512_and_si512(srl(codes, 8 * i as i32), byte);
                            let v = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(c), z), s);
                            _mm512_storeu_ps(dst.add((b * BLOCK + 4 * q + i) * ld), v);
                        }
                    }
                }
            }
        }
    }
}

/// AVX2 + FMA kernels on the panel layout, for machines without AVX-512: f32 arithmetic on
/// the [`Field`]s of each block, a panel handled as two halves of 8 rows (one register each).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{
        block_fields, field, high_bit, panel_block_bytes, Field, FieldInput, GptqMatrix, Prepared,
        Zeros, BLOCK, LANES, LIMBS,
    };
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// `$body` for `$f` = 0, 1, …, `$n` − 1 (`$n` ≤ 64), written out so that each field's
    /// shift, mask and slot are constants in the generated code.
    macro_rules! unroll {
        ($n:expr, |$f:ident| $body:block) => {
            unroll!(@ $n, $f, $body,
                0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15
                16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31
                32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47
                48 49 50 51 52 53 54 55 56 57 58 59 60 61 62 63
            )
        };
        (@ $n:expr, $f:ident, $body:block, $($k:literal)*) => {
            $(
                if $k < $n {
                    let $f: usize = $k;
                    $body
                }
            )*
        };
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn srl(v: __m256i, n: u32) -> __m256i {
        _mm256_srl_epi32(v, _mm_cvtsi32_si128(n as i32))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn sll(v: __m256i, n: u32) -> __m256i {
        _mm256_sll_epi32(v, _mm_cvtsi32_si128(n as i32))
    }

    /// Half `h` (rows 8h..8h + 8) of quad vector `vec` of the block at `blk`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load(blk: *const u8, vec: usize, h: usize) -> __m256i {
        unsafe { _mm256_loadu_si256(blk.add(64 * vec + 32 * h) as *const __m256i) }
    }

    /// Field `fd` of every lane of `v`, as the f32 kernels read it (see [`Field`]).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn take(v: __m256i, fd: Field) -> __m256 {
        let c = if fd.top() {
            srl(v, fd.shift)
        } else {
            _mm256_and_si256(
                v,
                _mm256_set1_epi32((((1u32 << fd.width) - 1) << fd.shift) as i32),
            )
        };
        _mm256_cvtepi32_ps(c)
    }

    /// The scales and zero points of panel `p`, group `g`, as f32, by half panel.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn scale_zero(w: &GptqMatrix, p: usize, g: usize) -> ([__m256; 2], [__m256; 2]) {
        unsafe {
            let at = (p * w.layout.groups() + g) * LANES;
            debug_assert!(at + LANES <= w.scales.len());
            let s = |h: usize| {
                _mm256_cvtph_ps(_mm_loadu_si128(
                    w.scales.as_ptr().add(at + 8 * h) as *const _
                ))
            };
            let z = |h: usize| {
                _mm256_cvtepi32_ps(match &w.zeros {
                    Zeros::U8(z) => _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                        z.as_ptr().add(at + 8 * h) as *const _,
                    )),
                    Zeros::U16(z) => _mm256_cvtepu16_epi32(_mm_loadu_si128(
                        z.as_ptr().add(at + 8 * h) as *const _,
                    )),
                })
            };
            ([s(0), s(1)], [z(0), z(1)])
        }
    }

    /// Adds Σ code·x over the block at `blk` to `acc[mi][half]` for the `M` inputs whose
    /// prepared fields for this block start at `xb + mi·xstride`. The `S` accumulators per half
    /// take turns, to hide the FMA latency when `M` is small.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block<const BITS: u8, const M: usize, const S: usize>(
        blk: *const u8,
        xb: *const f32,
        xstride: usize,
        acc: &mut [[[__m256; S]; 2]; M],
    ) {
        unsafe {
            unroll!(block_fields(BITS), |f| {
                let fd = field(BITS, f);
                let c0 = take(load(blk, fd.vec, 0), fd);
                let c1 = take(load(blk, fd.vec, 1), fd);
                for (mi, a) in acc.iter_mut().enumerate() {
                    let x = _mm256_broadcast_ss(&*xb.add(mi * xstride + f));
                    a[0][f % S] = _mm256_fmadd_ps(c0, x, a[0][f % S]);
                    a[1][f % S] = _mm256_fmadd_ps(c1, x, a[1][f % S]);
                }
            });
        }
    }

    /// Outputs of panel `p` for the `M` inputs from `mi0`: `[mi][half]`, lane r of half h is
    /// output row `16p + 8h + r`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn panel<const BITS: u8, const M: usize, const S: usize>(
        w: &GptqMatrix,
        prep: &FieldInput,
        mi0: usize,
        p: usize,
    ) -> [[__m256; 2]; M] {
        unsafe {
            let lay = &*w.layout;
            let g_count = lay.groups();
            let (pbb, nf) = (panel_block_bytes(BITS), block_fields(BITS));
            let xstride = lay.kp / BLOCK * nf;
            let base = w.packed.as_ptr().add(p * w.panel_bytes);
            let xf = prep.xf.as_ptr().add(mi0 * xstride);
            let xsum = prep.xsum.as_ptr().add(mi0 * g_count);
            let mut tot = [[_mm256_setzero_ps(); 2]; M];
            for g in 0..g_count {
                let mut acc = [[[_mm256_setzero_ps(); S]; 2]; M];
                for b in lay.blocks(g) {
                    block::<BITS, M, S>(base.add(b * pbb), xf.add(b * nf), xstride, &mut acc);
                }
                // s·Σ c·x − s·z·Σ x
                let (s, z) = scale_zero(w, p, g);
                for (mi, (t, a)) in tot.iter_mut().zip(&acc).enumerate() {
                    let xs = _mm256_set1_ps(*xsum.add(mi * g_count + g));
                    for h in 0..2 {
                        let mut sum = a[h][0];
                        for part in &a[h][1..] {
                            sum = _mm256_add_ps(sum, *part);
                        }
                        t[h] = _mm256_fmadd_ps(s[h], sum, t[h]);
                        t[h] = _mm256_fnmadd_ps(_mm256_mul_ps(s[h], z[h]), xs, t[h]);
                    }
                }
            }
            tot
        }
    }

    /// Panels covering `rows` for inputs `mi0..mi0 + M`, results written to `out` (`[m, rows]`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<const BITS: u8, const M: usize, const S: usize>(
        w: &GptqMatrix,
        prep: &FieldInput,
        mi0: usize,
        rows: &Range<usize>,
        out: &mut [f32],
    ) {
        unsafe {
            let nr = rows.len();
            for p in rows.start / LANES..rows.end.div_ceil(LANES) {
                let tot = panel::<BITS, M, S>(w, prep, mi0, p);
                for (mi, t) in tot.iter().enumerate() {
                    store(&mut out[(mi0 + mi) * nr..(mi0 + mi + 1) * nr], rows, p, t);
                }
            }
        }
    }

    /// Panel `p`'s outputs `t` (by half) into `orow`, the output row for `rows`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn store(orow: &mut [f32], rows: &Range<usize>, p: usize, t: &[__m256; 2]) {
        let r0 = p * LANES;
        let mut lanes = [0f32; LANES];
        let full = r0 >= rows.start && r0 + LANES <= rows.end;
        let dst = if full {
            &mut orow[r0 - rows.start..][..LANES]
        } else {
            &mut lanes
        };
        // SAFETY: `dst` has 16 elements.
        unsafe {
            _mm256_storeu_ps(dst.as_mut_ptr(), t[0]);
            _mm256_storeu_ps(dst.as_mut_ptr().add(8), t[1]);
        }
        if !full {
            for (r, &v) in lanes.iter().enumerate() {
                if rows.contains(&(r0 + r)) {
                    orow[r0 + r - rows.start] = v;
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn srl16(v: __m256i, n: u32) -> __m256i {
        _mm256_srl_epi16(v, _mm_cvtsi32_si128(n as i32))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn sll16(v: __m256i, n: u32) -> __m256i {
        _mm256_sll_epi16(v, _mm_cvtsi32_si128(n as i32))
    }

    /// Quad vector `q` of the block at `blk`, half `h` (2, 3 or 4 bits): byte `4r + i` is the
    /// code of row 8h + r at slot 4q + i. Shifts may carry bits across bytes; the byte masks
    /// drop them.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn quad<const BITS: u8>(blk: *const u8, h: usize, q: usize) -> __m256i {
        unsafe {
            match BITS {
                4 => {
                    let v = load(blk, q / 2, h);
                    _mm256_and_si256(srl16(v, 4 * (q % 2) as u32), _mm256_set1_epi8(15))
                }
                2 => {
                    let v = load(blk, q / 4, h);
                    _mm256_and_si256(srl16(v, 2 * (q % 4) as u32), _mm256_set1_epi8(3))
                }
                _ => {
                    let v = load(blk, q / 4, h);
                    let low = _mm256_and_si256(srl16(v, 2 * (q % 4) as u32), _mm256_set1_epi8(3));
                    // Bit q of every byte of the third vector, moved to bit 2.
                    let hv = load(blk, 2, h);
                    let hs = if q < 2 {
                        sll16(hv, 2 - q as u32)
                    } else {
                        srl16(hv, q as u32 - 2)
                    };
                    _mm256_or_si256(low, _mm256_and_si256(hs, _mm256_set1_epi8(4)))
                }
            }
        }
    }

    /// The integer kernel of `avx512::panel` for one input, with `vpmaddubsw` (code·limb pairs
    /// summed into i16) in place of `vpdpbusd`: panel `p`'s outputs by half.
    ///
    /// Within a block the i16 sums stay below 2·8·15·127 < 2¹⁵ (4-bit codes); each block's
    /// are widened to i32 with `vpmaddwd`, and the segments bound the i32 sums as there.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn panel_int<const BITS: u8>(w: &GptqMatrix, prep: &Prepared, p: usize) -> [__m256; 2] {
        unsafe {
            let lay = &*w.layout;
            let g_count = lay.groups();
            let pbb = panel_block_bytes(BITS);
            let base = w.packed.as_ptr().add(p * w.panel_bytes);
            let limbs = prep.limbs.as_ptr() as *const u8;
            let ones = _mm256_set1_epi16(1);
            let inv128 = _mm256_set1_ps(1.0 / 128.0);
            let mut tot = [_mm256_setzero_ps(); 2];
            for g in 0..g_count {
                let (s, z) = scale_zero(w, p, g);
                for si in lay.group_segs[g] as usize..lay.group_segs[g + 1] as usize {
                    let [b0, b1] = *lay.segs.get_unchecked(si);
                    let mut acc = [[_mm256_setzero_si256(); LIMBS]; 2];
                    for b in b0 as usize..b1 as usize {
                        let blk = base.add(b * pbb);
                        for line in (0..pbb).step_by(64) {
                            crate::kernels::prefetch(
                                blk.wrapping_add(crate::kernels::PREFETCH_AHEAD + line),
                            );
                        }
                        let mut acc16 = [[_mm256_setzero_si256(); LIMBS]; 2];
                        for q in 0..8 {
                            // Limbs of slots 4q..4q+4 of this block: chunk 2b + q/4.
                            let xp = limbs.add((2 * b + q / 4) * 16 * LIMBS + (q % 4) * 4);
                            let xl: [__m256i; LIMBS] = std::array::from_fn(|l| {
                                _mm256_set1_epi32(std::ptr::read_unaligned(
                                    xp.add(16 * l) as *const i32
                                ))
                            });
                            for (h, a) in acc16.iter_mut().enumerate() {
                                let codes = quad::<BITS>(blk, h, q);
                                for (al, &x) in a.iter_mut().zip(&xl) {
                                    *al = _mm256_add_epi16(*al, _mm256_maddubs_epi16(codes, x));
                                }
                            }
                        }
                        for (a, a16) in acc.iter_mut().zip(&acc16) {
                            for (al, &a16l) in a.iter_mut().zip(a16) {
                                *al = _mm256_add_epi32(*al, _mm256_madd_epi16(a16l, ones));
                            }
                        }
                    }
                    let seg_scale = _mm256_set1_ps(*prep.seg_scale.get_unchecked(si));
                    for (h, a) in acc.iter().enumerate() {
                        // c = A₀ + A₁/128 + A₂/128², by Horner from the last limb.
                        let mut c = _mm256_setzero_ps();
                        for &al in a.iter().rev() {
                            c = _mm256_fmadd_ps(c, inv128, _mm256_cvtepi32_ps(al));
                        }
                        tot[h] = _mm256_fmadd_ps(c, _mm256_mul_ps(s[h], seg_scale), tot[h]);
                    }
                }
                let xs = _mm256_set1_ps(*prep.xsum.get_unchecked(g));
                for h in 0..2 {
                    tot[h] = _mm256_fnmadd_ps(_mm256_mul_ps(s[h], z[h]), xs, tot[h]);
                }
            }
            tot
        }
    }

    /// `forward_rows` for one input with the integer kernel (2, 3 or 4 bits).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn forward_row_int<const BITS: u8>(
        w: &GptqMatrix,
        prep: &Prepared,
        rows: Range<usize>,
        out: &mut [f32],
    ) {
        assert!(BITS != 8 && prep.m == 1);
        assert!(rows.end <= w.n && out.len() >= rows.len());
        assert!(w.packed.len() == w.panels * w.panel_bytes);
        assert!(prep.limbs.len() == w.layout.kp * LIMBS);
        assert!(prep.seg_scale.len() == w.layout.segs.len());
        assert!(prep.xsum.len() == w.layout.groups());
        for p in rows.start / LANES..rows.end.div_ceil(LANES) {
            // SAFETY: the asserts above bound every read (see `panel_int`).
            let t = unsafe { panel_int::<BITS>(w, prep, p) };
            store(out, &rows, p, &t);
        }
    }

    /// `avx512::split_limbs` with AVX2 (the same limbs and scale).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn split_limbs(x: &[f32], out: &mut [i8]) -> f32 {
        assert!(x.len().is_multiple_of(16) && out.len() >= x.len() * LIMBS);
        unsafe {
            let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
            let inf = _mm256_set1_ps(f32::INFINITY);
            let mut amax = _mm256_setzero_ps();
            let mut finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
            for c in x.chunks_exact(8) {
                let a = _mm256_and_ps(_mm256_loadu_ps(c.as_ptr()), abs);
                finite = _mm256_and_ps(finite, _mm256_cmp_ps::<_CMP_LT_OQ>(a, inf));
                amax = _mm256_max_ps(amax, a);
            }
            if _mm256_movemask_ps(finite) != 0xFF {
                out.fill(0);
                return f32::NAN;
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), amax);
            let amax = lanes.iter().fold(0f32, |a, &b| a.max(b));
            if amax < 1e-30 {
                out.fill(0);
                return 0.0;
            }
            let inv = _mm256_set1_ps(127.0 / amax);
            let radix = _mm256_set1_ps(128.0);
            for (c, o) in x.chunks_exact(16).zip(out.chunks_exact_mut(16 * LIMBS)) {
                let mut t = [0, 8].map(|i| _mm256_mul_ps(_mm256_loadu_ps(c.as_ptr().add(i)), inv));
                for l in 0..LIMBS {
                    // Round half to even as there; only the last limb rounds.
                    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
                    let r = t.map(|v| _mm256_round_ps::<NEAREST>(v));
                    // 16 i32 → 16 i8 in order (packs work within 128-bit lanes).
                    let w16 = _mm256_permute4x64_epi64::<0xD8>(_mm256_packs_epi32(
                        _mm256_cvtps_epi32(r[0]),
                        _mm256_cvtps_epi32(r[1]),
                    ));
                    let bytes = _mm_packs_epi16(
                        _mm256_castsi256_si128(w16),
                        _mm256_extracti128_si256::<1>(w16),
                    );
                    _mm_storeu_si128(o.as_mut_ptr().add(16 * l) as *mut __m128i, bytes);
                    for (ti, ri) in t.iter_mut().zip(r) {
                        *ti = _mm256_mul_ps(_mm256_sub_ps(*ti, ri), radix);
                    }
                }
            }
            amax / 127.0
        }
    }

    /// See `GptqMatrix::forward_rows_impl`; inputs are taken up to four at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn forward_rows<const BITS: u8>(
        w: &GptqMatrix,
        prep: &FieldInput,
        rows: Range<usize>,
        out: &mut [f32],
    ) {
        let m = prep.m;
        assert!(rows.end <= w.n && out.len() >= m * rows.len());
        assert!(w.packed.len() == w.panels * w.panel_bytes);
        assert!(prep.bits == BITS);
        assert!(prep.xf.len() == m * w.layout.kp / BLOCK * block_fields(BITS));
        assert!(prep.xsum.len() == m * w.layout.groups());
        unsafe { for_input_chunks!(m, mi0 => run::<BITS>(w, prep, mi0, &rows, out)) }
    }

    /// All 16 rows of panel `p` dequantized to `dst[slot · ld + lane]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dequantize_panel<const BITS: u8>(
        w: &GptqMatrix,
        p: usize,
        dst: *mut f32,
        ld: usize,
    ) {
        unsafe {
            let lay = &*w.layout;
            let pbb = panel_block_bytes(BITS);
            let base = w.packed.as_ptr().add(p * w.panel_bytes);
            for g in 0..lay.groups() {
                let (s, z) = scale_zero(w, p, g);
                for b in lay.blocks(g) {
                    let blk = base.add(b * pbb);
                    // The block's BITS quad vectors, loaded once (the stores below could alias
                    // them as far as the compiler knows).
                    let v: [[__m256i; 2]; 8] = std::array::from_fn(|j| {
                        if j < BITS as usize {
                            [load(blk, j, 0), load(blk, j, 1)]
                        } else {
                            [_mm256_setzero_si256(); 2]
                        }
                    });
                    // One field per slot; for 3-bit, bit 2 of the code is added from vector 2.
                    unroll!(BLOCK, |f| {
                        let fd = field(BITS, f);
                        let mask = _mm256_set1_epi32((1 << fd.width) - 1);
                        for h in 0..2 {
                            let mut c = _mm256_and_si256(srl(v[fd.vec][h], fd.shift), mask);
                            if BITS == 3 {
                                let e = high_bit(fd.slot);
                                let hb = if e >= 2 {
                                    srl(v[2][h], e - 2)
                                } else {
                                    sll(v[2][h], 2 - e)
                                };
                                c = _mm256_or_si256(c, _mm256_and_si256(hb, _mm256_set1_epi32(4)));
                            }
                            let x = _mm256_sub_ps(_mm256_cvtepi32_ps(c), z[h]);
                            let d = dst.add((b * BLOCK + fd.slot) * ld + 8 * h);
                            _mm256_storeu_ps(d, _mm256_mul_ps(x, s[h]));
                        }
                    });
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
    fn make(
        bits: u8,
        n: usize,
        k: usize,
        groups: Groups,
        act_order: bool,
        seed: u64,
    ) -> QuantizedLinear {
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
        let zeros = (0..g_count * n)
            .map(|_| rng.below(maxq + 2) as u32)
            .collect();
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
        QuantizedLinear {
            bits: Bits::new(bits).unwrap(),
            group_size: GroupSize::from_size(group_size),
            n,
            k,
            codes,
            scales,
            zeros,
            g_idx,
        }
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
    fn slice_rows(
        want: &(Vec<f64>, Vec<f64>),
        m: usize,
        n: usize,
        rows: Range<usize>,
    ) -> (Vec<f64>, Vec<f64>) {
        let pick = |v: &Vec<f64>| {
            (0..m)
                .flat_map(|i| v[i * n + rows.start..i * n + rows.end].to_vec())
                .collect()
        };
        (pick(&want.0), pick(&want.1))
    }

    /// forward, forward_rows (SIMD — AVX-512 or AVX2, whichever the machine has — and
    /// portable) on a row subset, to_f32 and the round trip for one weight.
    fn check(q: &QuantizedLinear, ms: &[usize], what: &str) {
        let mat = GptqMatrix::from_quantized(q).unwrap();
        assert_eq!(mat.to_quantized(), *q, "{what}: round trip");
        let dense = q.dequantize();
        for simd in [true, false] {
            assert_eq!(
                mat.to_f32_impl(simd),
                dense,
                "{what}: to_f32 (simd={simd}) must equal dequantize"
            );
        }
        let (n, k) = (q.n, q.k);
        for &m in ms {
            let x = input(m, k, 1000 + m as u64);
            let want = reference(q, &x, m);
            for simd in [true, false] {
                let mut out = vec![f32::NAN; m * n];
                mat.forward_impl(&x, m, &mut out, simd);
                assert_close(&out, &want, &format!("{what} forward m={m} simd={simd}"));
                // Row subsets that start and end off panel boundaries.
                for rows in [3.min(n)..n, 0..n.min(21), n / 2..n / 2 + 1] {
                    let sub = slice_rows(&want, m, n, rows.clone());
                    let mut out = vec![f32::NAN; m * rows.len()];
                    mat.forward_rows_impl(&x, m, rows.clone(), &mut out, simd);
                    assert_close(
                        &out,
                        &sub,
                        &format!("{what} forward_rows {rows:?} m={m} simd={simd}"),
                    );
                }
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
                    check(
                        &q,
                        &[1, 2, 3, 4, 5, 64],
                        &format!("{bits}-bit K={k} {groups:?} act={act}"),
                    );
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
                assert!(mat.layout.kp.is_multiple_of(BLOCK) && mat.layout.kp >= k);
                check(
                    &q,
                    &[1, 2, 4, 7],
                    &format!("{bits}-bit K={k} {groups:?} act={act}"),
                );
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
        assert_eq!(
            GptqMatrix::from_quantized(&q).unwrap().storage_name(),
            "gptq-4bit-g24-actorder"
        );
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
        assert_eq!(
            (back.codes, back.zeros, back.g_idx),
            (q.codes, q.zeros, q.g_idx)
        );
    }

    #[test]
    fn storage_and_names() {
        let q = make(4, 8, 64, Groups::Size(32), false, 3);
        let mat = GptqMatrix::from_quantized(&q).unwrap();
        // One panel (8 rows padded to 16) × 2 blocks × 256 bytes; f16 scales and u8 zeros for
        // 16 rows × 2 groups; layout: 3 group offsets, 3 segment offsets, 2 segments of 2 u32.
        assert_eq!(
            mat.storage_bytes(),
            2 * 256 + 16 * 2 * 2 + 16 * 2 + 4 * (3 + 3 + 2 * 2)
        );
        assert_eq!(mat.storage_name(), "gptq-4bit-g32");
        let q = make(3, 8, 64, Groups::PerChannel, false, 3);
        assert_eq!(
            GptqMatrix::from_quantized(&q).unwrap().storage_name(),
            "gptq-3bit"
        );
        let q = make(2, 8, 256, Groups::Size(128), true, 3);
        let mat = GptqMatrix::from_quantized(&q).unwrap();
        assert_eq!(mat.storage_name(), "gptq-2bit-g128-actorder");
        // The act-order slot map is held: 4 bytes per slot.
        assert_eq!(
            mat.storage_bytes(),
            8 * 128 + 16 * 2 * 3 + 4 * (3 + 3 + 2 * 2) + 256 * 4
        );
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
        type Edit = Box<dyn Fn(&mut QuantizedLinear)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("empty shape", Box::new(|q| q.n = 0)),
            (
                "group size 0",
                Box::new(|q| q.group_size = GroupSize::Size(0)),
            ),
            (
                "codes",
                Box::new(|q| {
                    q.codes.pop();
                }),
            ),
            (
                "scales has",
                Box::new(|q| {
                    q.scales.pop();
                }),
            ),
            (
                "zeros has",
                Box::new(|q| {
                    q.zeros.pop();
                }),
            ),
            (
                "g_idx has",
                Box::new(|q| {
                    q.g_idx.pop();
                }),
            ),
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

    #[test]
    fn cached_input_is_reused_only_for_the_same_input_and_layout() {
        // Same layout, different weights; inputs alternate, so a stale cache would show. The
        // f32 kernels' prepared input also depends on the bit width.
        let qs = [
            make(4, 40, 576, Groups::Size(128), false, 11),
            make(4, 40, 576, Groups::Size(128), false, 12),
            make(4, 40, 576, Groups::Size(128), true, 13), // other slot order
            make(2, 40, 576, Groups::Size(128), false, 14),
            make(3, 40, 576, Groups::Size(128), false, 15),
            make(8, 40, 576, Groups::Size(128), false, 16),
        ];
        let mats: Vec<_> = qs
            .iter()
            .map(|q| GptqMatrix::from_quantized(q).unwrap())
            .collect();
        let x1 = input(1, 576, 1);
        let mut x2 = x1.clone();
        x2[300] += 0.5; // one value differs
        for round in 0..3 {
            for (q, mat) in qs.iter().zip(&mats) {
                for x in [&x1, &x2, &x1] {
                    let want = reference(q, x, 1);
                    for simd in [true, false] {
                        let mut out = vec![f32::NAN; 40];
                        mat.forward_rows_impl(x, 1, 0..40, &mut out, simd);
                        let what = format!("round {round} {}-bit simd={simd}", q.bits);
                        assert_close(&out, &want, &what);
                    }
                }
            }
        }
    }

    #[test]
    fn fields_read_back_every_code() {
        // Packing random codes and reading them back through the field table, as the f32
        // kernels do (the code times 2^shift, then the input multiplier), gives the codes.
        let mut rng = Rng(7);
        for bits in [2u8, 3, 4, 8] {
            let codes: [[u8; BLOCK]; LANES] = std::array::from_fn(|_| {
                std::array::from_fn(|_| rng.below(maxq(bits) as u64 + 1) as u8)
            });
            let mut blk = vec![0u8; panel_block_bytes(bits)];
            pack_panel_block(bits, &codes, &mut blk);
            let mut got = [[0f32; BLOCK]; LANES];
            for f in 0..block_fields(bits) {
                let fd = field(bits, f);
                assert!(
                    fd.vec < bits as usize && fd.shift + fd.width <= 32,
                    "{bits}-bit {fd:?}"
                );
                if bits == 3 {
                    assert_eq!(fd.weight == 4.0, f >= BLOCK);
                    if fd.weight == 4.0 {
                        assert_eq!((fd.vec, fd.shift), (2, high_bit(fd.slot)));
                    }
                }
                let lanes = block_lanes(&blk, fd.vec);
                for (r, g) in got.iter_mut().enumerate() {
                    g[fd.slot] += fd.take(lanes[r]) as f32 * fd.x_mult();
                }
            }
            for r in 0..LANES {
                let want: Vec<f32> = codes[r].iter().map(|&c| c as f32).collect();
                assert_eq!(got[r].to_vec(), want, "{bits}-bit row {r}");
            }
        }
    }

    #[test]
    fn activation_outliers_keep_precision() {
        // One input 1000× larger than the rest of its group: the other values are then
        // represented relative to it by the limbs; the error must stay within tolerance. One
        // input row and two (the AVX2 integer kernel takes only one).
        for bits in [2u8, 3, 4, 8] {
            let q = make(bits, 33, 576, Groups::Size(128), false, 21);
            let mut x = input(2, 576, 22);
            x[7] = 1000.0;
            x[576 + 200] = -3000.0;
            let mat = GptqMatrix::from_quantized(&q).unwrap();
            for m in [1, 2] {
                let want = reference(&q, &x, m);
                let mut out = vec![0f32; m * 33];
                mat.forward_rows(&x, m, 0..33, &mut out);
                assert_close(&out, &want, &format!("{bits}-bit outliers m={m}"));
            }
        }
    }

    #[test]
    fn zero_and_non_finite_inputs() {
        let q = make(4, 20, 64, Groups::Size(32), false, 31);
        let mat = GptqMatrix::from_quantized(&q).unwrap();
        for simd in [true, false] {
            let mut out = vec![f32::NAN; 20];
            mat.forward_rows_impl(&[0.0; 64], 1, 0..20, &mut out, simd);
            assert!(
                out.iter().all(|&v| v == 0.0),
                "zero input, simd={simd}: {out:?}"
            );
            for bad in [f32::NAN, f32::INFINITY] {
                let mut x = input(1, 64, 32);
                x[40] = bad;
                mat.forward_rows_impl(&x, 1, 0..20, &mut out, simd);
                assert!(
                    out.iter().all(|v| !v.is_finite()),
                    "{bad} input, simd={simd}: {out:?}"
                );
            }
        }
    }

    #[test]
    fn long_rows_are_split_before_i32_overflow() {
        // 8-bit per-channel with the largest codes and inputs: one i32 sum over 70,000 channels
        // would be 255·127·70000 > 2³¹; segments of SEG_BLOCKS blocks keep it in range.
        let k = 70_000;
        let n = 3;
        let q = QuantizedLinear {
            bits: Bits::B8,
            group_size: GroupSize::PerChannel,
            n,
            k,
            codes: vec![255; n * k],
            scales: vec![0.5; n],
            zeros: vec![0, 1, 256],
            g_idx: vec![0; k],
        };
        let mat = GptqMatrix::from_quantized(&q).unwrap();
        assert!(mat.layout.segs.len() > 1);
        let x = vec![1.0f32; k];
        let mut out = vec![0f32; n];
        mat.forward_rows(&x, 1, 0..n, &mut out);
        for (j, z) in [0.0, 1.0, 256.0].iter().enumerate() {
            let want = 0.5 * (255.0 - z) * k as f64;
            assert!(
                (out[j] as f64 - want).abs() <= 1e-5 * want.abs() + 1e-3,
                "row {j}: {} vs {want}",
                out[j]
            );
        }
        // And with varied data against the reference.
        let mut q = make(8, 5, k, Groups::PerChannel, false, 41);
        q.codes.iter_mut().step_by(3).for_each(|c| *c = 255);
        let x = input(1, k, 42);
        let mut out = vec![0f32; 5];
        GptqMatrix::from_quantized(&q)
            .unwrap()
            .forward_rows(&x, 1, 0..5, &mut out);
        assert_close(&out, &reference(&q, &x, 1), "8-bit K=70000");
    }
}
