//! Building blocks shared by the model files: linear layers (dense or packed), embeddings,
//! norms, rotary embeddings, and the loader that reads them from a checkpoint with checks.

use crate::error::Result;
use crate::formats::{read_f32_checked, WeightSource};
use crate::kernels::linear::{forward_blocks, scatter_blocks};
use crate::kernels::{self, DenseMatrix, LinearKernel};
use crate::tensor::WeightDType;
use std::sync::Arc;

/// Several linear layers applied to the same input. For a few rows (decoding) all their
/// matrix-vector work is spread over the threads in one pass, which matters because each
/// layer alone is too small to keep both cores busy; for many rows each uses its GEMM.
pub fn forward_many(linears: &[&Linear], x: &[f32], m: usize) -> Vec<Vec<f32>> {
    let mut outs: Vec<Vec<f32>> = linears
        .iter()
        .map(|l| vec![0f32; m * l.out_features()])
        .collect();
    if m > kernels::GEMV_MAX_ROWS {
        for (l, o) in linears.iter().zip(outs.iter_mut()) {
            l.weight.forward(x, m, o);
        }
    } else {
        let ks: Vec<&dyn LinearKernel> = linears.iter().map(|l| l.weight.as_ref()).collect();
        let parts = forward_blocks(&ks, x, m);
        let mut views: Vec<(&mut [f32], usize)> = outs
            .iter_mut()
            .zip(linears)
            .map(|(o, l)| (o.as_mut_slice(), l.out_features()))
            .collect();
        scatter_blocks(parts, m, &mut views);
    }
    for (l, o) in linears.iter().zip(outs.iter_mut()) {
        l.add_bias(o);
    }
    outs
}

/// A linear layer: a weight kernel plus an optional f32 bias.
#[derive(Clone)]
pub struct Linear {
    pub weight: Arc<dyn LinearKernel>,
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    pub fn in_features(&self) -> usize {
        self.weight.in_features()
    }
    pub fn out_features(&self) -> usize {
        self.weight.out_features()
    }
    /// `x` is `[m, in]`; returns `[m, out]`.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let n = self.out_features();
        let mut out = vec![0f32; m * n];
        self.weight.forward(x, m, &mut out);
        self.add_bias(&mut out);
        out
    }
    fn add_bias(&self, out: &mut [f32]) {
        if let Some(b) = &self.bias {
            for row in out.chunks_exact_mut(b.len()) {
                for (o, bi) in row.iter_mut().zip(b) {
                    *o += bi;
                }
            }
        }
    }
    pub fn storage_bytes(&self) -> usize {
        self.weight.storage_bytes() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }
}

/// Rows below which element-wise work stays on one thread (decoding has one row).
const PAR_MIN_ROWS: usize = 16;

/// Apply `f(input_row, output_row)` to every row of width `d`, in parallel for many rows.
pub fn for_each_row(x: &[f32], out: &mut [f32], d: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) {
    use rayon::prelude::*;
    if x.len() / d.max(1) >= PAR_MIN_ROWS {
        x.par_chunks_exact(d)
            .zip(out.par_chunks_exact_mut(d))
            .for_each(|(xr, or)| f(xr, or));
    } else {
        x.chunks_exact(d)
            .zip(out.chunks_exact_mut(d))
            .for_each(|(xr, or)| f(xr, or));
    }
}

/// Apply `f(row_of_a, row_of_b)` to rows of width `d`, mutating `a`, in parallel for many rows.
pub fn for_each_row_in_place(
    a: &mut [f32],
    b: &[f32],
    d: usize,
    f: impl Fn(&mut [f32], &[f32]) + Sync,
) {
    use rayon::prelude::*;
    if a.len() / d.max(1) >= PAR_MIN_ROWS {
        a.par_chunks_exact_mut(d)
            .zip(b.par_chunks_exact(d))
            .for_each(|(x, y)| f(x, y));
    } else {
        a.chunks_exact_mut(d)
            .zip(b.chunks_exact(d))
            .for_each(|(x, y)| f(x, y));
    }
}

/// RMSNorm (Llama): `x / sqrt(mean(x²) + eps) * w`.
pub struct RmsNorm {
    pub weight: Vec<f32>,
    pub eps: f32,
}

impl RmsNorm {
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let d = self.weight.len();
        let mut out = vec![0f32; x.len()];
        for_each_row(x, &mut out, d, |xr, or| {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let inv = 1.0 / (ms + self.eps).sqrt();
            for ((o, v), w) in or.iter_mut().zip(xr).zip(&self.weight) {
                *o = w * (v * inv);
            }
        });
        out
    }
}

/// LayerNorm with optional affine parameters.
pub struct LayerNorm {
    pub weight: Option<Vec<f32>>,
    pub bias: Option<Vec<f32>>,
    pub dim: usize,
    pub eps: f32,
}

impl LayerNorm {
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let d = self.dim;
        let mut out = vec![0f32; x.len()];
        for_each_row(x, &mut out, d, |xr, or| {
            let mean = xr.iter().sum::<f32>() / d as f32;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let inv = 1.0 / (var + self.eps).sqrt();
            for (i, (o, v)) in or.iter_mut().zip(xr).enumerate() {
                let mut y = (v - mean) * inv;
                if let Some(w) = &self.weight {
                    y *= w[i];
                }
                if let Some(b) = &self.bias {
                    y += b[i];
                }
                *o = y;
            }
        });
        out
    }
    pub fn storage_bytes(&self) -> usize {
        4 * (self.weight.as_ref().map_or(0, Vec::len) + self.bias.as_ref().map_or(0, Vec::len))
    }
}

/// Builds linear layers that are not plain dense weights: packed checkpoints (GPTQ, AWQ,
/// bitsandbytes) or quantization at load time. One implementation per format or method.
pub trait LinearFactory: Send + Sync {
    /// The kernel for the layer stored under `prefix` (e.g. `model.layers.0.mlp.up_proj`), or
    /// `None` to load it as a dense weight (skipped modules, `lm_head`). `conv1d` is true for
    /// GPT-2 `Conv1D` layers, whose dense weight is stored transposed as `[in, out]`.
    fn load_linear(
        &self,
        src: &dyn WeightSource,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        conv1d: bool,
    ) -> Result<Option<Arc<dyn LinearKernel>>>;
}

/// Reads layers from a checkpoint, checking names, shapes and finiteness, and converting dense
/// weights to the requested in-memory dtype.
pub struct Loader<'a> {
    pub src: &'a dyn WeightSource,
    pub dtype: WeightDType,
    /// Takes over linear layers of quantized checkpoints (or quantizes at load time).
    pub factory: Option<&'a dyn LinearFactory>,
    /// Hold a float output projection as LLM.int8 weights (see [`Loader::output_projection`]).
    pub lm_head_int8: bool,
}

impl<'a> Loader<'a> {
    pub fn new(src: &'a dyn WeightSource, dtype: WeightDType) -> Self {
        Loader {
            src,
            dtype,
            factory: None,
            lm_head_int8: false,
        }
    }
    pub fn with_factory(mut self, factory: Option<&'a dyn LinearFactory>) -> Self {
        self.factory = factory;
        self
    }
    pub fn with_lm_head_int8(mut self, on: bool) -> Self {
        self.lm_head_int8 = on;
        self
    }
    /// The output projection `lm_head` (`[vocab, in]`). Tied models have none: the embedding
    /// matrix `embed` projects. With `lm_head_int8`, a float projection (the tied one included)
    /// is held as LLM.int8 weights instead — half the bytes of f16, and decoding streams the
    /// whole matrix for every token. The dense embedding stays for the lookups.
    pub fn output_projection(
        &self,
        tied: bool,
        embed: &DenseMatrix,
        in_features: usize,
        vocab: usize,
    ) -> Result<Option<Linear>> {
        self.output_projection_named("lm_head", tied, embed, in_features, vocab)
    }
    /// [`Loader::output_projection`] for an architecture whose checkpoints give the output
    /// projection another name (GPT-NeoX's `embed_out`).
    pub fn output_projection_named(
        &self,
        name: &str,
        tied: bool,
        embed: &DenseMatrix,
        in_features: usize,
        vocab: usize,
    ) -> Result<Option<Linear>> {
        if !self.lm_head_int8 {
            return Ok(if tied {
                None
            } else {
                Some(self.linear(name, in_features, vocab, false)?)
            });
        }
        let w = if tied {
            embed.to_f32()
        } else {
            if let Some(weight) = self.factory_kernel(name, in_features, vocab, false)? {
                // Already quantized by the checkpoint: keep it as it is.
                return Ok(Some(Linear { weight, bias: None }));
            }
            read_f32_checked(self.src, &format!("{name}.weight"), &[vocab, in_features])?
        };
        let q = crate::qtypes::bnb::quantize_int8(&w, vocab, in_features)?;
        let m = crate::kernels::bnb::Int8Matrix::new(
            q,
            crate::qtypes::bnb::DEFAULT_INT8_THRESHOLD,
            crate::qtypes::bnb::Int8Compute::Int8Matmul,
        )?;
        Ok(Some(Linear {
            weight: Arc::new(m),
            bias: None,
        }))
    }
    fn factory_kernel(
        &self,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        conv1d: bool,
    ) -> Result<Option<Arc<dyn LinearKernel>>> {
        match self.factory {
            Some(f) => f.load_linear(self.src, prefix, in_features, out_features, conv1d),
            None => Ok(None),
        }
    }
    pub fn has(&self, name: &str) -> bool {
        self.src.info(name).is_some()
    }
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        read_f32_checked(self.src, name, &[len])
    }
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<DenseMatrix> {
        let data = read_f32_checked(self.src, name, &[rows, cols])?;
        Ok(DenseMatrix::new(rows, cols, data, self.dtype))
    }
    /// A PyTorch `nn.Linear` stored as `<prefix>.weight` `[out, in]` (+ `<prefix>.bias`).
    pub fn linear(
        &self,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Linear> {
        let weight = match self.factory_kernel(prefix, in_features, out_features, false)? {
            Some(k) => k,
            None => {
                Arc::new(self.matrix(&format!("{prefix}.weight"), out_features, in_features)?)
            }
        };
        let bias = if bias {
            Some(self.vector(&format!("{prefix}.bias"), out_features)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }
    /// A GPT-2 `Conv1D`, stored transposed as `[in, out]`; held as `[out, in]` like Linear.
    pub fn conv1d(&self, prefix: &str, in_features: usize, out_features: usize) -> Result<Linear> {
        if let Some(weight) = self.factory_kernel(prefix, in_features, out_features, true)? {
            let bias = Some(self.vector(&format!("{prefix}.bias"), out_features)?);
            return Ok(Linear { weight, bias });
        }
        let t = read_f32_checked(
            self.src,
            &format!("{prefix}.weight"),
            &[in_features, out_features],
        )?;
        let mut w = vec![0f32; t.len()];
        for i in 0..in_features {
            for o in 0..out_features {
                w[o * in_features + i] = t[i * out_features + o];
            }
        }
        let bias = Some(self.vector(&format!("{prefix}.bias"), out_features)?);
        Ok(Linear {
            weight: Arc::new(DenseMatrix::new(out_features, in_features, w, self.dtype)),
            bias,
        })
    }
    pub fn layer_norm(
        &self,
        prefix: &str,
        dim: usize,
        eps: f64,
        affine: bool,
    ) -> Result<LayerNorm> {
        let (weight, bias) = if affine {
            (
                Some(self.vector(&format!("{prefix}.weight"), dim)?),
                Some(self.vector(&format!("{prefix}.bias"), dim)?),
            )
        } else {
            (None, None)
        };
        Ok(LayerNorm {
            weight,
            bias,
            dim,
            eps: eps as f32,
        })
    }
    pub fn rms_norm(&self, name: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: self.vector(name, dim)?,
            eps: eps as f32,
        })
    }
}

/// Apply `act` in place.
pub fn activate(act: crate::config::Activation, v: &mut [f32]) {
    use crate::config::Activation::*;
    let f: fn(f32) -> f32 = match act {
        Relu => |x| x.max(0.0),
        Silu => kernels::silu,
        Gelu => kernels::gelu_erf,
        GeluTanh => kernels::gelu_tanh,
    };
    for x in v {
        *x = f(*x);
    }
}

pub fn add_in_place(a: &mut [f32], b: &[f32]) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    if a.len() >= 4 * CHUNK {
        a.par_chunks_mut(CHUNK)
            .zip(b.par_chunks(CHUNK))
            .for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(x, y)| *x += y));
    } else {
        a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
    }
}
