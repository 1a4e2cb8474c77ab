//! Scaled dot-product attention over a key/value cache, shared by every architecture.
//! Keys and values are cached per (batch row, kv head) as contiguous `[len, head_dim]` rows.

use crate::kernels;
use rayon::prelude::*;

/// Per-layer key/value cache plus the attention mask of every position seen so far.
#[derive(Default)]
pub struct KvCache {
    batch: usize,
    /// `layers[l].0[b * kv_heads + h]` = keys `[len, head_dim]`; `.1` = values.
    layers: Vec<(Vec<Vec<f32>>, Vec<Vec<f32>>)>,
    /// `mask[b][j]` is 1 when position j of row b may be attended to.
    mask: Vec<Vec<u8>>,
}

impl KvCache {
    pub fn new(num_layers: usize, batch: usize) -> Self {
        KvCache {
            batch,
            layers: (0..num_layers).map(|_| (vec![], vec![])).collect(),
            mask: vec![vec![]; batch],
        }
    }
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.mask.first().map_or(0, Vec::len)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn mask(&self) -> &[Vec<u8>] {
        &self.mask
    }
    /// Register `t` new positions. `attention_mask`, if given, is HF-style `[batch, past + t]`
    /// (or just `[batch, t]`); only its last `t` columns are new.
    pub fn push_positions(&mut self, t: usize, attention_mask: Option<&[Vec<u8>]>) {
        for b in 0..self.batch {
            match attention_mask {
                Some(m) => {
                    let row = &m[b];
                    self.mask[b].extend_from_slice(&row[row.len() - t..]);
                }
                None => self.mask[b].extend(std::iter::repeat(1).take(t)),
            }
        }
    }
    /// Forget the last `t` registered positions (before any layer cached keys for them), when
    /// a forward pass refuses its input after [`KvCache::push_positions`].
    pub fn pop_positions(&mut self, t: usize) {
        for m in &mut self.mask {
            m.truncate(m.len().saturating_sub(t));
        }
    }
    /// Bytes held by the cache.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| {
                4 * (k.iter().map(Vec::len).sum::<usize>() + v.iter().map(Vec::len).sum::<usize>())
            })
            .sum()
    }
    /// Drop everything after the first `len` positions (used to reuse a prompt prefix).
    pub fn truncate(&mut self, len: usize, head_dim: usize) {
        for (k, v) in &mut self.layers {
            for x in k.iter_mut().chain(v.iter_mut()) {
                x.truncate(len * head_dim);
            }
        }
        for m in &mut self.mask {
            m.truncate(len);
        }
    }

    /// Positions following the transformers `generate` convention: the count of attended
    /// tokens before each position (cumsum(mask) - 1), 1 for masked positions.
    pub fn default_positions(&self, t: usize) -> Vec<Vec<usize>> {
        self.mask
            .iter()
            .map(|row| {
                let mut count = 0usize;
                let all: Vec<usize> = row
                    .iter()
                    .map(|&m| {
                        count += m as usize;
                        if m == 0 {
                            1
                        } else {
                            count - 1
                        }
                    })
                    .collect();
                all[all.len() - t..].to_vec()
            })
            .collect()
    }
}

#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Sliding window: a query at cache index `i` sees only keys `j` with
    /// `i - window < j <= i` (transformers' sliding-window causal mask; padding slots count).
    pub window: Option<usize>,
}

impl AttentionShape {
    /// First cache index a query at cache index `i` may see.
    fn first_visible(&self, i: usize) -> usize {
        self.window.map_or(0, |w| (i + 1).saturating_sub(w))
    }
}

/// Append the new keys/values of layer `layer` to the cache and attend.
/// `q` is `[batch * t, heads * head_dim]`, `k`/`v` are `[batch * t, kv_heads * head_dim]`.
/// The new positions must already be registered with [`KvCache::push_positions`].
/// Returns `[batch * t, heads * head_dim]`.
pub fn attend(
    cache: &mut KvCache,
    layer: usize,
    s: &AttentionShape,
    t: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Vec<f32> {
    let (hd, kvh, nh) = (s.head_dim, s.kv_heads, s.heads);
    let batch = cache.batch;
    let (kc, vc) = &mut cache.layers[layer];
    if kc.is_empty() {
        *kc = vec![vec![]; batch * kvh];
        *vc = vec![vec![]; batch * kvh];
    }
    for b in 0..batch {
        for i in 0..t {
            let row = (b * t + i) * kvh * hd;
            for h in 0..kvh {
                kc[b * kvh + h].extend_from_slice(&k[row + h * hd..row + (h + 1) * hd]);
                vc[b * kvh + h].extend_from_slice(&v[row + h * hd..row + (h + 1) * hd]);
            }
        }
    }
    let total = cache.mask[0].len();
    let past = total - t;
    let (kc, vc) = (&cache.layers[layer].0, &cache.layers[layer].1);
    let mask = &cache.mask;
    let group = nh / kvh;
    // Tasks are (batch row, head, block of queries): enough of them to balance the threads, and
    // each block only looks at the keys its last query may see (the causal upper triangle is
    // never computed).
    const QUERY_BLOCK: usize = 64;
    let tasks: Vec<(usize, usize)> = (0..batch * nh)
        .flat_map(|bh| (0..t).step_by(QUERY_BLOCK).map(move |i0| (bh, i0)))
        .collect();
    let blocks: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(bh, i0)| {
            let (b, h) = (bh / nh, bh % nh);
            let kv = b * kvh + h / group;
            let (keys, vals) = (&kc[kv], &vc[kv]);
            if t == 1 {
                return attend_one(
                    &q[b * nh * hd + h * hd..][..hd],
                    keys,
                    vals,
                    &mask[b],
                    s.scale,
                    s.first_visible(past),
                );
            }
            let i1 = (i0 + QUERY_BLOCK).min(t);
            let (rows, width) = (i1 - i0, past + i1);
            // scores[i, j] = q_i · k_j for the block's queries and the keys they can see.
            let mut scores = vec![0f32; rows * width];
            let q0 = (b * t + i0) * nh * hd + h * hd;
            kernels::gemm_serial(
                rows,
                width,
                hd,
                &q[q0..],
                nh * hd,
                1,
                keys,
                1,
                hd,
                &mut scores,
            );
            for r in 0..rows {
                let row = &mut scores[r * width..(r + 1) * width];
                let limit = past + i0 + r; // causal: keys 0..=limit
                let first = s.first_visible(limit);
                let (visible, future) = row.split_at_mut(limit + 1);
                for (j, (sc, &m)) in visible.iter_mut().zip(&mask[b]).enumerate() {
                    *sc = if m != 0 && j >= first {
                        *sc * s.scale
                    } else {
                        f32::NEG_INFINITY
                    };
                }
                kernels::softmax(visible);
                future.fill(0.0);
            }
            let mut out = vec![0f32; rows * hd];
            kernels::gemm_serial(rows, hd, width, &scores, width, 1, vals, hd, 1, &mut out);
            out
        })
        .collect();
    let mut out = vec![0f32; batch * t * nh * hd];
    for (&(bh, i0), o) in tasks.iter().zip(&blocks) {
        let (b, h) = (bh / nh, bh % nh);
        for (r, src) in o.chunks_exact(hd).enumerate() {
            let dst = (b * t + i0 + r) * nh * hd + h * hd;
            out[dst..dst + hd].copy_from_slice(src);
        }
    }
    out
}

/// One query against the whole cache (decoding): plain dot products beat a GEMM call here.
/// Keys before `first` are outside the sliding window.
fn attend_one(
    q: &[f32],
    keys: &[f32],
    vals: &[f32],
    mask: &[u8],
    scale: f32,
    first: usize,
) -> Vec<f32> {
    let hd = q.len();
    let mut scores: Vec<f32> = keys
        .chunks_exact(hd)
        .zip(mask)
        .enumerate()
        .map(|(j, (k, &m))| {
            if m != 0 && j >= first {
                kernels::dot(q, k) * scale
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    kernels::softmax(&mut scores);
    let mut out = vec![0f32; hd];
    for (p, v) in scores.iter().zip(vals.chunks_exact(hd)) {
        if *p != 0.0 {
            kernels::axpy(*p, v, &mut out);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention written out from its definition: for the query at cache index `i`, softmax
    /// over keys `j <= i` that are unmasked and, with a window `w`, satisfy `i - j < w`.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        qs: &[Vec<f32>],
        ks: &[Vec<f32>],
        vs: &[Vec<f32>],
        mask: &[u8],
        i: usize,
        window: Option<usize>,
        scale: f32,
    ) -> Vec<f32> {
        let q = &qs[i];
        let allowed: Vec<usize> = (0..=i)
            .filter(|&j| mask[j] != 0 && window.map_or(true, |w| i - j < w))
            .collect();
        let hd = q.len();
        if allowed.is_empty() {
            return vec![0.0; hd];
        }
        let scores: Vec<f64> = allowed
            .iter()
            .map(|&j| {
                q.iter()
                    .zip(&ks[j])
                    .map(|(a, b)| (a * b) as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = e.iter().sum();
        let mut out = vec![0f64; hd];
        for (p, &j) in e.iter().zip(&allowed) {
            for (o, v) in out.iter_mut().zip(&vs[j]) {
                *o += p / total * *v as f64;
            }
        }
        out.into_iter().map(|v| v as f32).collect()
    }

    #[test]
    fn sliding_window_matches_the_written_out_mask() {
        let hd = 4;
        let n = 11;
        let mut x = 0x1234_5678u64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 2000) as f32 / 1000.0 - 1.0
        };
        let mut gen = |n: usize| -> Vec<Vec<f32>> {
            (0..n).map(|_| (0..hd).map(|_| rnd()).collect()).collect()
        };
        let (qs, ks, vs) = (gen(n), gen(n), gen(n));
        // Two leading padding slots; a prefill of 7 then single-token decoding.
        let mask: Vec<u8> = (0..n).map(|j| u8::from(j >= 2)).collect();
        for window in [None, Some(1), Some(3), Some(20)] {
            let shape = AttentionShape {
                heads: 1,
                kv_heads: 1,
                head_dim: hd,
                scale: 0.5,
                window,
            };
            let mut cache = KvCache::new(1, 1);
            let mut got = vec![];
            for (a, b) in [(0, 7), (7, 8), (8, 9), (9, 10), (10, 11)] {
                cache.push_positions(b - a, Some(&[mask[..b].to_vec()]));
                let cat = |v: &[Vec<f32>]| v[a..b].concat();
                got.extend(attend(
                    &mut cache,
                    0,
                    &shape,
                    b - a,
                    &cat(&qs),
                    &cat(&ks),
                    &cat(&vs),
                ));
            }
            for i in 2..n {
                let want = reference(&qs, &ks, &vs, &mask, i, window, 0.5);
                for (g, w) in got[i * hd..(i + 1) * hd].iter().zip(&want) {
                    assert!(
                        (g - w).abs() < 1e-5,
                        "window {window:?}, query {i}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
