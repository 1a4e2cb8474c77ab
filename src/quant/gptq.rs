//! GPTQ: quantize a linear layer column by column, pushing each column's rounding error onto the
//! columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.
//!
//! This follows the reference (IST-DASLab `gptq.py` `fasterquant`, and AutoGPTQ 0.7.1, which adds
//! `static_groups` and returns `g_idx`; docs/formats.md §4) step by step, including its quirks, so that
//! `tests/gptq_algorithm.rs` can compare codes against it:
//!
//! * per-channel parameters come from the whole weight *before* dead columns are zeroed;
//! * a group's parameters come from the weight as it stood at the start of the current lazy
//!   block (the reference reads the outer `W`, which is only updated at block boundaries);
//! * the act-order permutation sorts `diag(H)` descending after the dead-column fix.
//!
//! Where we differ, on purpose:
//!
//! * The inverse Cholesky factor is computed in f64 (in f32 above K = 4096, as the reference
//!   does everywhere: its cost grows as K³ and f64 doubles it), as
//!   `U = J·chol(J·H·J)⁻¹·J` (J reverses the order): one Cholesky and one triangular inverse
//!   instead of the reference's Cholesky → `cholesky_inverse` → Cholesky. In exact arithmetic both
//!   give the upper factor of H⁻¹; ours is cheaper and more stable. Everything else is f32.
//! * Cholesky failure retries with ten times the damping (the reference stops with an error).
//! * Ties in the act-order sort keep the lower column first (torch's sort is not stable).
//!
//! Rows are independent given H⁻¹, so the column loop runs on chunks of rows in parallel; the
//! lazy block update of each chunk is a GEMM.

use crate::error::{Error, Result};
use crate::qtypes::grid::{self, QuantParams, QuantizedLinear};
use rayon::prelude::*;

/// Running Hessian estimate H = 2/n Σ xᵀx for one linear layer's inputs (the reference's
/// `add_batch`, f32, with its running rescale).
///
/// The reference counts *samples* (batch entries), not tokens: after n samples H is
/// `2/n · Σ_samples Σ_rows x xᵀ`. The scale does not change GPTQ's result (damping is relative),
/// but the loss it reports does.
#[derive(Debug, Clone)]
pub struct Hessian {
    k: usize,
    samples: usize,
    /// `[k, k]` row-major, kept symmetric.
    h: Vec<f32>,
    /// The first misuse seen (wrong lengths, bad row weights); reported by [`Hessian::check`]
    /// and by [`gptq_quantize`] instead of panicking inside the calibration loop.
    fault: Option<String>,
}

impl Hessian {
    pub fn new(k: usize) -> Self {
        Hessian {
            k,
            samples: 0,
            h: vec![0.0; k * k],
            fault: None,
        }
    }

    /// A Hessian computed elsewhere (golden data, a saved state). `matrix` is `[k, k]` row-major.
    pub fn from_matrix(k: usize, matrix: Vec<f32>, samples: usize) -> Result<Self> {
        if matrix.len() != k * k {
            return Err(Error::InvalidArgument(format!(
                "Hessian has {} values, but K={k} needs {}",
                matrix.len(),
                k * k
            )));
        }
        Ok(Hessian {
            k,
            samples,
            h: matrix,
            fault: None,
        })
    }

    /// Add `rows` input rows (`x` is `[rows, k]` row-major) as ONE calibration sample.
    ///
    /// A length mismatch is recorded (see [`Hessian::check`]) and the sample skipped.
    pub fn add_sample(&mut self, x: &[f32], rows: usize) {
        self.add_scaled(x, rows, None);
    }

    /// As [`Hessian::add_sample`], with row `r` scaled by `sqrt(row_weights[r])` before `xᵀx`,
    /// i.e. its outer product counted `row_weights[r]` times. Weights must be finite and ≥ 0.
    pub fn add_sample_weighted(&mut self, x: &[f32], rows: usize, row_weights: &[f32]) {
        self.add_scaled(x, rows, Some(row_weights));
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn samples(&self) -> usize {
        self.samples
    }

    /// `[k, k]` row-major, symmetric.
    pub fn matrix(&self) -> &[f32] {
        &self.h
    }

    /// Errors if a sample was rejected (wrong length, bad row weights) or H holds NaN/Inf (from
    /// non-finite activations).
    pub fn check(&self) -> Result<()> {
        if let Some(f) = &self.fault {
            return Err(Error::InvalidArgument(format!("Hessian: {f}")));
        }
        if let Some(i) = self.h.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "Hessian [K={}] holds {} at ({}, {}) after {} samples: the calibration inputs \
                 of this layer contain NaN or Inf, or overflow f32",
                self.k,
                self.h[i],
                i / self.k,
                i % self.k,
                self.samples
            )));
        }
        Ok(())
    }

    fn add_scaled(&mut self, x: &[f32], rows: usize, weights: Option<&[f32]>) {
        let k = self.k;
        if self.fault.is_some() {
            return;
        }
        if x.len() != rows * k {
            self.fault = Some(format!(
                "sample {} has {} values, but {rows} rows of K={k} need {}",
                self.samples,
                x.len(),
                rows * k
            ));
            return;
        }
        if let Some(w) = weights {
            if w.len() != rows {
                self.fault = Some(format!(
                    "sample {} has {} row weights for {rows} rows",
                    self.samples,
                    w.len()
                ));
                return;
            }
            if let Some(r) = w.iter().position(|v| !(v.is_finite() && *v >= 0.0)) {
                self.fault = Some(format!(
                    "sample {}: row weight {} at row {r} is not finite and ≥ 0",
                    self.samples, w[r]
                ));
                return;
            }
        }
        // Reference: H *= n/(n+1); n += 1; x *= sqrt(2/n); H += xᵀx (all in f32).
        let n_old = self.samples;
        self.samples += 1;
        let keep = (n_old as f64 / self.samples as f64) as f32;
        let scale = (2.0 / self.samples as f64).sqrt() as f32;
        if rows == 0 || k == 0 {
            self.h.iter_mut().for_each(|v| *v *= keep);
            return;
        }
        let mut xs: Vec<f32> = Vec::with_capacity(rows * k);
        for (r, row) in x.chunks_exact(k).enumerate() {
            let f = match weights {
                Some(w) => w[r].sqrt() * scale,
                None => scale,
            };
            xs.extend(row.iter().map(|v| f * v));
        }
        syrk_lower_acc(&xs, rows, k, &mut self.h, keep);
        mirror_lower(&mut self.h, k);
    }
}

/// Copy the lower triangle of `h` (`[k, k]`) into the upper one, in cache-sized tiles.
fn mirror_lower(h: &mut [f32], k: usize) {
    const T: usize = 64;
    for i0 in (0..k).step_by(T) {
        for j0 in (i0..k).step_by(T) {
            for i in i0..(i0 + T).min(k) {
                for j in j0.max(i + 1)..(j0 + T).min(k) {
                    h[i * k + j] = h[j * k + i];
                }
            }
        }
    }
}

/// Raw pointer that rayon tasks may share because each writes a disjoint block.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}
impl SharedMut {
    /// Through a method, so closures capture the whole (Send) wrapper, not the raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Lower triangle (by tiles, diagonal tiles in full) of `h = keep·h + xᵀx`, `x` `[rows, k]`.
/// Tiles of 256 columns run in parallel; skipping the upper tiles halves the work of the
/// calibration hot spot.
fn syrk_lower_acc(x: &[f32], rows: usize, k: usize, h: &mut [f32], keep: f32) {
    const TILE: usize = 256;
    let tiles = k.div_ceil(TILE);
    let pairs: Vec<(usize, usize)> = (0..tiles)
        .flat_map(|bi| (0..=bi).map(move |bj| (bi, bj)))
        .collect();
    let hp = SharedMut(h.as_mut_ptr());
    pairs.into_par_iter().for_each(|(bi, bj)| {
        let (i0, j0) = (bi * TILE, bj * TILE);
        let (m, n) = ((k - i0).min(TILE), (k - j0).min(TILE));
        // SAFETY: tile (bi, bj) of h is written by this task only; the strides keep every
        // index inside x ([rows, k]) and h ([k, k]).
        unsafe {
            gemm::gemm(
                m,
                n,
                rows,
                hp.get().add(i0 * k + j0),
                1,
                k as isize,
                keep != 0.0,
                x.as_ptr().add(i0),
                k as isize,
                1,
                x.as_ptr().add(j0),
                1,
                k as isize,
                keep,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
}

/// GPTQ settings; the defaults in comments are the reference's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqOptions {
    pub params: QuantParams,
    /// Fraction of mean(diag H) added to the diagonal (0.01).
    pub damp_percent: f64,
    /// Columns per lazy block update (128).
    pub block_size: usize,
    /// Act-order: quantize columns by descending diag(H).
    pub desc_act: bool,
    /// Group parameters from the original weight, before any update (only with groups).
    pub static_groups: bool,
    /// Group (or per-channel) scales from a clipping search weighted by each column's GPTQ loss
    /// factor `1/Hinv[j,j]²` ([`grid::grid_searched`]) instead of the reference's min/max grid.
    pub clip_search: bool,
}

impl GptqOptions {
    /// The reference defaults for `params`.
    pub fn new(params: QuantParams) -> Self {
        GptqOptions {
            params,
            damp_percent: 0.01,
            block_size: 128,
            desc_act: false,
            static_groups: false,
            clip_search: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GptqResult {
    pub quantized: QuantizedLinear,
    /// The reference's `torch.sum(Losses)`: Σ (w − q)² / (2·Hinv[i,i]²) over all weights.
    pub loss: f64,
    /// Damping fraction that made the Cholesky succeed (`damp_percent`, or more after retries).
    pub damp_used: f64,
    /// Input channels never active in calibration (diag H = 0); their weights become 0.
    pub dead_columns: usize,
}

/// How many damping values are tried: `damp`, then ×10 each time (0.01 → … → 100).
const DAMP_ATTEMPTS: usize = 5;

/// What GPTQ derives from a Hessian alone: the dead columns, the act-order permutation and the
/// damped inverse factor. Linears that read the same input (q/k/v, gate/up) share one.
#[derive(Debug, Clone)]
pub struct GptqFactor {
    k: usize,
    /// Input channels never active in calibration (diag H = 0).
    dead: Vec<usize>,
    /// Act-order processing order (descending diag H, ties by column), if act-order.
    perm: Option<Vec<usize>>,
    /// Upper factor of H⁻¹ in processing order, `[k, k]`.
    hinv: Vec<f32>,
    damp_used: f64,
}

impl GptqFactor {
    /// Factor `h` with the damping and act-order of `opts` (retrying with more damping when
    /// the Cholesky fails). Does not modify `h`.
    pub fn new(h: &Hessian, opts: &GptqOptions) -> Result<Self> {
        let k = h.k();
        if !(opts.damp_percent.is_finite() && opts.damp_percent >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "damping {} must be a finite fraction ≥ 0 (e.g. 0.01)",
                opts.damp_percent
            )));
        }
        h.check()?;
        if h.samples() == 0 {
            return Err(Error::InvalidArgument(format!(
                "Hessian for K={k} has no calibration samples; run calibration data through the \
                 layer first"
            )));
        }
        let mut hm = h.matrix().to_vec();
        let mut dead = Vec::new();
        for i in 0..k {
            if hm[i * k + i] == 0.0 {
                hm[i * k + i] = 1.0;
                dead.push(i);
            }
        }
        // Act-order permutation (descending diag H, ties by column index).
        let perm: Option<Vec<usize>> = opts.desc_act.then(|| {
            let mut p: Vec<usize> = (0..k).collect();
            p.sort_by(|&a, &b| hm[b * k + b].total_cmp(&hm[a * k + a]));
            p
        });
        if let Some(p) = &perm {
            let mut hp = vec![0f32; k * k];
            for (i, &pi) in p.iter().enumerate() {
                for (j, &pj) in p.iter().enumerate() {
                    hp[i * k + j] = hm[pi * k + pj];
                }
            }
            hm = hp;
        }
        let (hinv, damp_used) = damped_inverse_factor(&hm, k, opts.damp_percent)?;
        Ok(GptqFactor {
            k,
            dead,
            perm,
            hinv,
            damp_used,
        })
    }

    /// Damping fraction that made the Cholesky succeed.
    pub fn damp_used(&self) -> f64 {
        self.damp_used
    }
}

/// Quantize `w` (`[N, K]` row-major, PyTorch Linear layout) with GPTQ. Does not modify `h`.
pub fn gptq_quantize(
    w: &[f32],
    n: usize,
    k: usize,
    h: &Hessian,
    opts: &GptqOptions,
) -> Result<GptqResult> {
    // Weight and shape errors first: they name the layer's problem better than a failed
    // factorization would.
    check_inputs(w, n, k, h.k(), &opts.params)?;
    gptq_quantize_factored(w, n, k, &GptqFactor::new(h, opts)?, opts)
}

/// The weight's values and shape against the params and a Hessian for `hk` inputs; the group
/// size (`None`: per-channel).
fn check_inputs(
    w: &[f32],
    n: usize,
    k: usize,
    hk: usize,
    params: &QuantParams,
) -> Result<Option<usize>> {
    let group = grid::check_weight(w, n, k, params)?;
    if hk != k {
        return Err(Error::InvalidArgument(format!(
            "Hessian is for K={hk} inputs but the weight [N={n}, K={k}] has K={k}"
        )));
    }
    Ok(group)
}

/// [`gptq_quantize`] with the Hessian already factored (with the same `opts`).
pub fn gptq_quantize_factored(
    w: &[f32],
    n: usize,
    k: usize,
    factor: &GptqFactor,
    opts: &GptqOptions,
) -> Result<GptqResult> {
    let params = &opts.params;
    let group = check_inputs(w, n, k, factor.k, params)?;
    if opts.block_size == 0 {
        return Err(Error::InvalidArgument(
            "GPTQ block size must be positive".into(),
        ));
    }
    if opts.desc_act != factor.perm.is_some() {
        return Err(Error::InvalidArgument(
            "GPTQ factor was made with another act-order setting".into(),
        ));
    }

    let bits = params.bits.get();
    let sym = params.sym;
    let maxq = grid::maxq(bits);

    // Clip search: each column's rounding error weighs as in the GPTQ loss, 1/Hinv[j,j]², here
    // in processing order and in original column order.
    let loss_weights: Option<Vec<f32>> = opts.clip_search.then(|| {
        (0..k)
            .map(|j| {
                let d = factor.hinv[j * k + j];
                1.0 / (d * d)
            })
            .collect()
    });
    let loss_weights_orig: Option<Vec<f32>> = loss_weights.as_ref().map(|lw| {
        let mut o = vec![0f32; k];
        to_column_order(factor.perm.as_deref(), lw, &mut o);
        o
    });

    // Per-channel parameters: from the whole weight, before dead columns are zeroed (reference).
    let row_grid: Vec<(f32, u32)> = if group.is_none() {
        let g: Vec<(f32, u32)> = w
            .chunks_exact(k)
            .map(|r| group_params(r, loss_weights_orig.as_deref(), bits, sym))
            .collect();
        for (row, &(s, _)) in g.iter().enumerate() {
            check_scale(s, row, 0, n, k)?;
        }
        g
    } else {
        Vec::new()
    };

    let mut wm = w.to_vec();
    for &i in &factor.dead {
        for row in 0..n {
            wm[row * k + i] = 0.0;
        }
    }

    // Static groups: parameters per (group, row) from the dead-zeroed, unpermuted weight.
    let static_grid: Option<Vec<(f32, u32)>> = match group {
        Some(g) if opts.static_groups => {
            let groups = k / g;
            let mut out = vec![(0f32, 0u32); groups * n];
            for gi in 0..groups {
                for row in 0..n {
                    let v = &wm[row * k + gi * g..row * k + (gi + 1) * g];
                    let wts = loss_weights_orig.as_deref();
                    let p = group_params(v, wts.map(|lw| &lw[gi * g..(gi + 1) * g]), bits, sym);
                    check_scale(p.0, row, gi, n, k)?;
                    out[gi * n + row] = p;
                }
            }
            Some(out)
        }
        _ => None,
    };

    let perm = factor.perm.as_ref();
    if let Some(p) = perm {
        let mut wp = vec![0f32; n * k];
        for row in 0..n {
            for (j, &c) in p.iter().enumerate() {
                wp[row * k + j] = wm[row * k + c];
            }
        }
        wm = wp;
    }

    // Column loop on chunks of rows in parallel.
    let threads = rayon::current_num_threads().max(1);
    let chunk_rows = n.div_ceil(2 * threads).clamp(16, 256);
    let ctx = LoopCtx {
        k,
        n,
        bits,
        sym,
        maxq,
        group,
        block: opts.block_size,
        hinv: &factor.hinv,
        row_grid: &row_grid,
        static_grid: static_grid.as_deref(),
        perm: perm.map(|p| p.as_slice()),
        loss_weights: loss_weights.as_deref(),
    };
    let chunks: Vec<ChunkOut> = wm
        .par_chunks_mut(chunk_rows * k)
        .enumerate()
        .map(|(c, wc)| ctx.run_chunk(c * chunk_rows, wc))
        .collect::<Result<_>>()?;

    let groups = group.map_or(1, |g| k / g);
    let mut codes = vec![0u8; n * k];
    let mut scales = vec![0f32; groups * n];
    let mut zeros = vec![0u32; groups * n];
    let mut loss = 0f64;
    for ch in &chunks {
        let rows = ch.codes.len() / k;
        for r in 0..rows {
            let row = ch.row0 + r;
            let src = &ch.codes[r * k..(r + 1) * k];
            to_column_order(
                perm.map(|p| p.as_slice()),
                src,
                &mut codes[row * k..(row + 1) * k],
            );
        }
        loss += ch.loss;
    }
    match (&static_grid, group) {
        (Some(sg), _) => {
            for (i, &(s, z)) in sg.iter().enumerate() {
                scales[i] = s;
                zeros[i] = z;
            }
        }
        (None, None) => {
            for (row, &(s, z)) in row_grid.iter().enumerate() {
                scales[row] = s;
                zeros[row] = z;
            }
        }
        (None, Some(_)) => {
            for ch in &chunks {
                let rows = ch.codes.len() / k;
                for gi in 0..groups {
                    for r in 0..rows {
                        let (s, z) = ch.group_grid[gi * rows + r];
                        scales[gi * n + ch.row0 + r] = s;
                        zeros[gi * n + ch.row0 + r] = z;
                    }
                }
            }
        }
    }

    // g_idx: groups are consecutive in *processing* order, except static groups, which keep
    // the original column ranges (AutoGPTQ's g_idx[invperm] of perm[i]//g is then i//g).
    let gsize = group.unwrap_or(k);
    let mut g_idx: Vec<u32> = (0..k).map(|c| (c / gsize) as u32).collect();
    if let (Some(p), None) = (&perm, &static_grid) {
        for (j, &c) in p.iter().enumerate() {
            g_idx[c] = (j / gsize) as u32;
        }
    }

    Ok(GptqResult {
        quantized: QuantizedLinear {
            bits: params.bits,
            group_size: params.group_size,
            n,
            k,
            codes,
            scales,
            zeros,
            g_idx,
        },
        loss,
        damp_used: factor.damp_used,
        dead_columns: factor.dead.len(),
    })
}

/// `columns[perm[j]] = processed[j]`: values in act-order processing order back to the
/// weight's column order (a plain copy without act-order).
fn to_column_order<T: Copy>(perm: Option<&[usize]>, processed: &[T], columns: &mut [T]) {
    match perm {
        Some(p) => {
            for (&c, &v) in p.iter().zip(processed) {
                columns[c] = v;
            }
        }
        None => columns.copy_from_slice(processed),
    }
}

/// A group's scale and zero: the clipping search weighted by `loss_weights` when given
/// ([`GptqOptions::clip_search`]), else the reference's min/max grid.
fn group_params(v: &[f32], loss_weights: Option<&[f32]>, bits: u8, sym: bool) -> (f32, u32) {
    match loss_weights {
        Some(w) => grid::grid_searched(v, Some(w), bits, sym),
        None => grid::grid(v, bits, sym),
    }
}

fn check_scale(s: f32, row: usize, group: usize, n: usize, k: usize) -> Result<()> {
    if s.is_finite() && s > 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "row {row}, group {group} of [N={n}, K={k}] gives scale {s}; its range cannot be \
             quantized in f32"
        )))
    }
}

/// Damp H, factor it; on failure retry with ten times the damping. Returns the upper factor
/// U of H⁻¹ (f32, `[k, k]` row-major) and the damping fraction used.
fn damped_inverse_factor(hm: &[f32], k: usize, damp_percent: f64) -> Result<(Vec<f32>, f64)> {
    // mean(diag H) as torch computes it in f32 (accumulated here in f64, then rounded).
    let mean = ((0..k).map(|i| hm[i * k + i] as f64).sum::<f64>() / k as f64) as f32;
    let mut damp = damp_percent;
    let mut failures = Vec::new();
    for attempt in 0..DAMP_ATTEMPTS {
        let add = (damp as f32) * mean;
        let mut a = hm.to_vec();
        for i in 0..k {
            a[i * k + i] += add;
        }
        match inverse_upper_factor(&a, k) {
            Ok(u) => {
                if attempt > 0 {
                    eprintln!(
                        "gptq: Cholesky failed with damping {damp_percent} ({}); succeeded with \
                         damping {damp}",
                        failures.join("; ")
                    );
                }
                return Ok((u, damp));
            }
            Err(why) => failures.push(format!("damp {damp}: {why}")),
        }
        damp = if damp == 0.0 { 0.01 } else { damp * 10.0 };
    }
    Err(Error::InvalidArgument(format!(
        "GPTQ: the damped Hessian [K={k}] is not positive definite even after {DAMP_ATTEMPTS} \
         damping values ({})",
        failures.join("; ")
    )))
}

/// Above this K the factorization runs in f32 (as the reference's): it costs K³, and f64 doubles
/// that and its two K×K temporaries.
const F64_MAX_K: usize = 4096;

/// Upper U with UᵀU = A⁻¹, in f64 (f32 above `F64_MAX_K`), returned as f32.
fn inverse_upper_factor(a: &[f32], k: usize) -> std::result::Result<Vec<f32>, String> {
    if k <= F64_MAX_K {
        inverse_upper_factor_t::<f64>(a, k, |v| v as f64, |v| v as f32)
    } else {
        inverse_upper_factor_t::<f32>(a, k, |v| v, |v| v)
    }
}

/// With J the order reversal, JAJ = L Lᵀ gives A⁻¹ = J L⁻ᵀ L⁻¹ J = UᵀU for the upper
/// U = J L⁻¹ J; one Cholesky and one triangular inverse.
fn inverse_upper_factor_t<T>(
    a: &[f32],
    k: usize,
    from: impl Fn(f32) -> T + Sync,
    to: impl Fn(T) -> f32 + Sync,
) -> std::result::Result<Vec<f32>, String>
where
    T: faer::traits::RealField + Copy + Into<f64>,
{
    use faer::dyn_stack::{MemBuffer, MemStack};
    use faer::linalg::cholesky::llt::factor;
    let par = faer::Par::rayon(0);
    let r = |i: usize| k - 1 - i;
    let mut l = faer::Mat::<T>::from_fn(k, k, |i, j| from(a[r(j) * k + r(i)]));
    let mut mem = MemBuffer::new(factor::cholesky_in_place_scratch::<T>(
        k,
        par,
        Default::default(),
    ));
    factor::cholesky_in_place(
        l.as_mut(),
        Default::default(),
        par,
        MemStack::new(&mut mem),
        Default::default(),
    )
    .map_err(|e| match e {
        factor::LltError::NonPositivePivot { index } => {
            format!("non-positive pivot at column {}", r(index))
        }
    })?;
    // A pivot this small means H is numerically singular; its inverse would be noise.
    let max_diag = (0..k).map(|i| a[i * k + i] as f64).fold(0.0, f64::max);
    for i in 0..k {
        let p: f64 = l[(i, i)].into();
        if p.is_nan() || p * p <= 1e-10 * max_diag {
            return Err(format!(
                "pivot² {:.3e} at column {} is negligible against max diag {max_diag:.3e}",
                p * p,
                r(i)
            ));
        }
    }
    let mut inv = faer::Mat::<T>::zeros(k, k);
    faer::linalg::triangular_inverse::invert_lower_triangular(inv.as_mut(), l.as_ref(), par);
    drop(l);
    let mut u = vec![0f32; k * k];
    u.par_chunks_mut(k).enumerate().for_each(|(i, urow)| {
        for (j, x) in urow.iter_mut().enumerate().skip(i) {
            *x = to(inv[(r(i), r(j))]);
        }
    });
    if let Some(i) = u.iter().position(|v| !v.is_finite()) {
        return Err(format!("inverse overflows at ({}, {})", i / k, i % k));
    }
    Ok(u)
}

/// Everything the per-chunk column loop reads.
struct LoopCtx<'a> {
    k: usize,
    n: usize,
    bits: u8,
    sym: bool,
    maxq: u32,
    group: Option<usize>,
    block: usize,
    /// Upper factor of H⁻¹ in processing order, `[k, k]`.
    hinv: &'a [f32],
    /// Per-channel parameters (per-channel mode only), `[n]`.
    row_grid: &'a [(f32, u32)],
    /// Static group parameters, `[groups, n]`, original column order.
    static_grid: Option<&'a [(f32, u32)]>,
    perm: Option<&'a [usize]>,
    /// Clip-search weights per column in processing order ([`GptqOptions::clip_search`]).
    loss_weights: Option<&'a [f32]>,
}

struct ChunkOut {
    row0: usize,
    /// `[rows, k]` in processing (permuted) order.
    codes: Vec<u8>,
    /// Dynamic group parameters `[groups, rows]` (empty unless grouped and not static).
    group_grid: Vec<(f32, u32)>,
    loss: f64,
}

impl LoopCtx<'_> {
    /// GPTQ on rows `row0..row0 + wc.len()/k`; `wc` is their (permuted) weight, updated in place.
    fn run_chunk(&self, row0: usize, wc: &mut [f32]) -> Result<ChunkOut> {
        let k = self.k;
        let rows = wc.len() / k;
        let mut codes = vec![0u8; rows * k];
        let dynamic_groups = self.group.filter(|_| self.static_grid.is_none());
        let mut group_grid = match dynamic_groups {
            Some(g) => vec![(0f32, 0u32); (k / g) * rows],
            None => Vec::new(),
        };
        // Current parameters per row.
        let mut cur: Vec<(f32, u32)> = match self.group {
            None => self.row_grid[row0..row0 + rows].to_vec(),
            Some(_) => vec![(0.0, 0); rows],
        };
        let mut loss = 0f64;
        let mut w1 = Vec::with_capacity(rows * self.block);
        let mut err1 = Vec::with_capacity(rows * self.block);

        for i1 in (0..k).step_by(self.block) {
            let i2 = (i1 + self.block).min(k);
            let cnt = i2 - i1;
            // W1 = W[:, i1:i2].clone()
            w1.clear();
            for r in 0..rows {
                w1.extend_from_slice(&wc[r * k + i1..r * k + i2]);
            }
            err1.clear();
            err1.resize(rows * cnt, 0f32);

            for i in 0..cnt {
                let col = i1 + i;
                if let Some(g) = self.group {
                    match self.static_grid {
                        Some(sg) => {
                            let orig = self.perm.map_or(col, |p| p[col]);
                            let gi = orig / g;
                            cur.copy_from_slice(&sg[gi * self.n + row0..gi * self.n + row0 + rows]);
                        }
                        None if col % g == 0 => {
                            // From the outer W: stale inside the block, as in the reference
                            // (reading the block's updated W1 instead measured no better).
                            let gi = col / g;
                            let wts = self.loss_weights.map(|lw| &lw[col..col + g]);
                            for r in 0..rows {
                                let v = &wc[r * k + col..r * k + col + g];
                                let p = group_params(v, wts, self.bits, self.sym);
                                check_scale(p.0, row0 + r, gi, self.n, k)?;
                                cur[r] = p;
                                group_grid[gi * rows + r] = p;
                            }
                        }
                        None => {}
                    }
                }
                let d = self.hinv[col * k + col];
                let d2 = d * d;
                let urow = &self.hinv[col * k + col..col * k + i2];
                for r in 0..rows {
                    let (s, z) = cur[r];
                    let wrow = &mut w1[r * cnt + i..(r + 1) * cnt];
                    let x = wrow[0];
                    let code = grid::quantize_value(x, s, z, self.maxq);
                    let q = s * (code as f32 - z as f32);
                    let diff = x - q;
                    loss += ((diff * diff) / d2 / 2.0) as f64;
                    let e = diff / d;
                    // W1[:, i:] -= err ⊗ Hinv1[i, i:]  (product rounded, then subtracted)
                    for (wv, &hv) in wrow.iter_mut().zip(urow) {
                        *wv -= e * hv;
                    }
                    err1[r * cnt + i] = e;
                    codes[r * k + col] = code;
                }
            }

            // W[:, i2:] -= Err1 · Hinv[i1:i2, i2:]
            if i2 < k {
                // SAFETY: dst is rows × (k − i2) inside wc (row stride k); lhs is err1
                // [rows, cnt]; rhs is hinv rows i1..i2, columns i2..k (row stride k).
                unsafe {
                    gemm::gemm(
                        rows,
                        k - i2,
                        cnt,
                        wc.as_mut_ptr().add(i2),
                        1,
                        k as isize,
                        true,
                        err1.as_ptr(),
                        1,
                        cnt as isize,
                        self.hinv.as_ptr().add(i1 * k + i2),
                        1,
                        k as isize,
                        1.0,
                        -1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
        }
        Ok(ChunkOut {
            row0,
            codes,
            group_grid,
            loss,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qtypes::{Bits, GroupSize};

    /// U from the reversal trick satisfies UᵀU·A = I.
    #[test]
    fn inverse_factor_is_upper_and_inverts() {
        let k = 5;
        let mut a = vec![0f32; k * k];
        for i in 0..k {
            for j in 0..k {
                a[i * k + j] =
                    1.0 / (1.0 + (i as f32 - j as f32).abs()) + if i == j { 1.0 } else { 0.0 };
            }
        }
        let u = inverse_upper_factor(&a, k).unwrap();
        for i in 0..k {
            for j in 0..i {
                assert_eq!(u[i * k + j], 0.0);
            }
            assert!(u[i * k + i] > 0.0);
        }
        for i in 0..k {
            for j in 0..k {
                // (UᵀU A)[i, j]
                let mut s = 0f64;
                for m in 0..k {
                    let mut utu = 0f64;
                    for l in 0..k {
                        utu += u[l * k + i] as f64 * u[l * k + m] as f64;
                    }
                    s += utu * a[m * k + j] as f64;
                }
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((s - want).abs() < 1e-5, "({i},{j}) = {s}");
            }
        }
    }

    /// With a diagonal Hessian GPTQ pushes no error onto other columns, so it is RTN on its own
    /// group parameters: with the clip search, each group's [`grid::grid_searched`] weighted by
    /// the damped diagonal (1/Hinv[j,j]²) — checked grouped in column order and per-channel
    /// under act-order, where the weights must follow the permutation back to the columns.
    #[test]
    fn clip_search_with_diagonal_hessian_is_weighted_searched_rtn() {
        let (n, k) = (6, 16);
        let diag: Vec<f32> = (0..k).map(|j| 0.5 + ((j * 7) % 11) as f32).collect();
        let mut hm = vec![0f32; k * k];
        for j in 0..k {
            hm[j * k + j] = diag[j];
        }
        let h = Hessian::from_matrix(k, hm, 1).unwrap();
        let damp = 0.01 * diag.iter().sum::<f32>() / k as f32;
        let loss_weight: Vec<f32> = diag.iter().map(|d| d + damp).collect();
        // Heavy-tailed rows, so clipping pays in most groups.
        let w: Vec<f32> = (0..n * k)
            .map(|i| {
                let t = (((i * 7919) % 997) as f32 / 498.5) - 1.0;
                t * t * t + 0.05 * t
            })
            .collect();
        for (group, desc_act) in [(Some(8), false), (None, true)] {
            let params = QuantParams {
                bits: Bits::B3,
                group_size: GroupSize::from_size(group),
                sym: true,
            };
            let opts = GptqOptions {
                desc_act,
                clip_search: true,
                ..GptqOptions::new(params)
            };
            let got = gptq_quantize(&w, n, k, &h, &opts).unwrap().quantized;
            let g = group.unwrap_or(k);
            for row in 0..n {
                for gi in 0..k / g {
                    let cols = gi * g..(gi + 1) * g;
                    let (s, z) = grid::grid_searched(
                        &w[row * k + cols.start..row * k + cols.end],
                        Some(&loss_weight[cols.clone()]),
                        3,
                        true,
                    );
                    let stored = gi * n + row;
                    let rel = (got.scales[stored] - s).abs() / s;
                    assert!(
                        rel < 1e-5,
                        "{group:?} row {row} group {gi}: {} vs {s}",
                        got.scales[stored]
                    );
                    assert_eq!(got.zeros[stored], z);
                    for c in cols {
                        let want = grid::quantize_value(w[row * k + c], s, z, 7);
                        assert_eq!(got.codes[row * k + c], want, "{group:?} row {row} col {c}");
                    }
                }
            }
            // And the search changed something against the reference's min/max grid.
            let plain = GptqOptions {
                clip_search: false,
                ..opts
            };
            let reference = gptq_quantize(&w, n, k, &h, &plain).unwrap().quantized;
            assert_ne!(reference.scales, got.scales);
        }
    }

    #[test]
    fn hessian_matches_direct_sum() {
        let k = 300; // two tiles, one partial
        let rows = [7usize, 3, 0];
        let mut hs = Hessian::new(k);
        let mut all: Vec<Vec<f32>> = Vec::new();
        for (s, &r) in rows.iter().enumerate() {
            let x: Vec<f32> = (0..r * k)
                .map(|i| (((i * 7919 + s * 104729) % 1000) as f32 / 500.0) - 1.0)
                .collect();
            hs.add_sample(&x, r);
            all.push(x);
        }
        assert_eq!(hs.samples(), 3);
        let h = hs.matrix();
        for i in (0..k).step_by(37) {
            for j in (0..k).step_by(29) {
                let mut want = 0f64;
                for (x, &r) in all.iter().zip(&rows) {
                    for row in 0..r {
                        want += x[row * k + i] as f64 * x[row * k + j] as f64;
                    }
                }
                want *= 2.0 / 3.0;
                assert!((h[i * k + j] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()));
                assert_eq!(h[i * k + j], h[j * k + i]);
            }
        }
    }
}
