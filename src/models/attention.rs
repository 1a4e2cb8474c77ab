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
                let (visible, future) = row.split_at_mut(limit + 1);
                for (sc, &m) in visible.iter_mut().zip(&mask[b]) {
                    *sc = if m != 0 {
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
fn attend_one(q: &[f32], keys: &[f32], vals: &[f32], mask: &[u8], scale: f32) -> Vec<f32> {
    let hd = q.len();
    let mut scores: Vec<f32> = keys
        .chunks_exact(hd)
        .zip(mask)
        .map(|(k, &m)| {
            if m != 0 {
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
