//! Building blocks shared by the model files: linear layers (dense or packed), embeddings,
//! norms, rotary embeddings, and the loader that reads them from a checkpoint with checks.

use crate::error::{Error, Result};
use crate::formats::{read_f32_checked, WeightSource};
use crate::kernels;
use half::{bf16, f16};
use std::sync::Arc;

/// The matrix part of a linear layer: `y[m, out] = x[m, in] · Wᵀ`. Dense and packed
/// (GPTQ, AWQ, NF4, int8) weights implement this, so models do not care how weights are held.
pub trait LinearKernel: Send + Sync {
    fn in_features(&self) -> usize;
    fn out_features(&self) -> usize;
    /// Output features `rows` only: `out` is `[m, rows.len()]` and is overwritten. Single
    /// threaded; callers parallelize over row blocks (see [`forward_many`]).
    fn forward_rows(&self, x: &[f32], m: usize, rows: std::ops::Range<usize>, out: &mut [f32]);
    /// All output features: `out` has `m * out_features` elements and is overwritten.
    /// Packed kernels can use [`forward_rows_parallel`]; dense weights use a GEMM for large `m`.
    fn forward(&self, x: &[f32], m: usize, out: &mut [f32]);
    /// Bytes held in memory for this weight (packed size for quantized kernels).
    fn storage_bytes(&self) -> usize;
    /// Short description of the storage, e.g. "f32", "gptq-4bit-g128".
    fn storage_name(&self) -> String;
    /// The weight as a dense row-major `[out, in]` f32 matrix.
    fn to_f32(&self) -> Vec<f32>;
}

/// Element type used to hold dense weights in memory (`--dtype`). Compute is always f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WeightDType {
    #[default]
    F32,
    F16,
    BF16,
}

impl WeightDType {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(WeightDType::F32),
            "f16" | "float16" => Ok(WeightDType::F16),
            "bf16" | "bfloat16" => Ok(WeightDType::BF16),
            other => Err(Error::InvalidArgument(format!(
                "unknown dtype `{other}` (use f32, f16 or bf16)"
            ))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            WeightDType::F32 => "f32",
            WeightDType::F16 => "f16",
            WeightDType::BF16 => "bf16",
        }
    }
    pub fn torch_name(self) -> &'static str {
        match self {
            WeightDType::F32 => "float32",
            WeightDType::F16 => "float16",
            WeightDType::BF16 => "bfloat16",
        }
    }
    pub fn bytes(self) -> usize {
        match self {
            WeightDType::F32 => 4,
            _ => 2,
        }
    }
    /// The in-memory dtype of a checkpoint float dtype (`None` for non-float dtypes).
    pub fn from_storage(dtype: crate::tensor::DType) -> Option<Self> {
        match dtype {
            crate::tensor::DType::F32 => Some(WeightDType::F32),
            crate::tensor::DType::F16 => Some(WeightDType::F16),
            crate::tensor::DType::BF16 => Some(WeightDType::BF16),
            _ => None,
        }
    }
    /// Round to this dtype and back (the emulation of a compute or storage dtype).
    #[inline]
    pub fn round(self, v: f32) -> f32 {
        match self {
            WeightDType::F32 => v,
            WeightDType::F16 => f16::from_f32(v).to_f32(),
            WeightDType::BF16 => bf16::from_f32(v).to_f32(),
        }
    }
    /// The matching checkpoint dtype.
    pub fn storage(self) -> crate::tensor::DType {
        match self {
            WeightDType::F32 => crate::tensor::DType::F32,
            WeightDType::F16 => crate::tensor::DType::F16,
            WeightDType::BF16 => crate::tensor::DType::BF16,
        }
    }
    /// `values` as a checkpoint tensor of this dtype (rounded to nearest).
    pub fn encode(self, shape: Vec<usize>, values: &[f32]) -> crate::tensor::RawTensor {
        use crate::tensor::RawTensor;
        match self {
            WeightDType::F32 => RawTensor::from_f32(shape, values),
            WeightDType::F16 => {
                let h: Vec<f16> = values.iter().map(|&x| f16::from_f32(x)).collect();
                RawTensor::from_f16(shape, &h)
            }
            WeightDType::BF16 => {
                let h: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
                RawTensor::from_bf16(shape, &h)
            }
        }
    }
}

/// A dense `[rows, cols]` matrix held in f32, f16 or bf16.
pub enum DenseMatrix {
    F32 {
        rows: usize,
        cols: usize,
        data: Vec<f32>,
    },
    F16 {
        rows: usize,
        cols: usize,
        data: Vec<f16>,
    },
    BF16 {
        rows: usize,
        cols: usize,
        data: Vec<bf16>,
    },
}

impl DenseMatrix {
    pub fn new(rows: usize, cols: usize, data: Vec<f32>, dtype: WeightDType) -> Self {
        assert_eq!(data.len(), rows * cols);
        match dtype {
            WeightDType::F32 => DenseMatrix::F32 { rows, cols, data },
            WeightDType::F16 => DenseMatrix::F16 {
                rows,
                cols,
                data: data.iter().map(|&v| f16::from_f32(v)).collect(),
            },
            WeightDType::BF16 => DenseMatrix::BF16 {
                rows,
                cols,
                data: data.iter().map(|&v| bf16::from_f32(v)).collect(),
            },
        }
    }
    pub fn rows(&self) -> usize {
        match self {
            DenseMatrix::F32 { rows, .. }
            | DenseMatrix::F16 { rows, .. }
            | DenseMatrix::BF16 { rows, .. } => *rows,
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            DenseMatrix::F32 { cols, .. }
            | DenseMatrix::F16 { cols, .. }
            | DenseMatrix::BF16 { cols, .. } => *cols,
        }
    }
    pub fn dtype(&self) -> WeightDType {
        match self {
            DenseMatrix::F32 { .. } => WeightDType::F32,
            DenseMatrix::F16 { .. } => WeightDType::F16,
            DenseMatrix::BF16 { .. } => WeightDType::BF16,
        }
    }
    /// Copy row `i` into `out` as f32 (embedding lookup).
    pub fn row_into(&self, i: usize, out: &mut [f32]) {
        let c = self.cols();
        match self {
            DenseMatrix::F32 { data, .. } => out.copy_from_slice(&data[i * c..(i + 1) * c]),
            DenseMatrix::F16 { data, .. } => {
                kernels::HalfFloat::convert_slice(&data[i * c..(i + 1) * c], out)
            }
            DenseMatrix::BF16 { data, .. } => {
                kernels::HalfFloat::convert_slice(&data[i * c..(i + 1) * c], out)
            }
        }
    }
}

impl LinearKernel for DenseMatrix {
    fn in_features(&self) -> usize {
        self.cols()
    }
    fn out_features(&self) -> usize {
        self.rows()
    }
    fn forward_rows(&self, x: &[f32], m: usize, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let k = self.cols();
        let (r0, r1) = (rows.start, rows.end);
        match self {
            DenseMatrix::F32 { data, .. } => {
                kernels::gemv_block(x, m, k, &data[r0 * k..r1 * k], out)
            }
            DenseMatrix::F16 { data, .. } => {
                kernels::gemv_block_half(x, m, k, &data[r0 * k..r1 * k], out)
            }
            DenseMatrix::BF16 { data, .. } => {
                kernels::gemv_block_half(x, m, k, &data[r0 * k..r1 * k], out)
            }
        }
    }
    fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (n, k) = (self.rows(), self.cols());
        match self {
            DenseMatrix::F32 { data, .. } if m > kernels::GEMV_MAX_ROWS => {
                kernels::matmul_nt(x, m, k, data, n, out)
            }
            DenseMatrix::F16 { data, .. } if m > kernels::GEMV_MAX_ROWS => {
                kernels::matmul_nt_half(x, m, k, data, n, out)
            }
            DenseMatrix::BF16 { data, .. } if m > kernels::GEMV_MAX_ROWS => {
                kernels::matmul_nt_half(x, m, k, data, n, out)
            }
            _ => forward_rows_parallel(self, x, m, out),
        }
    }
    fn storage_bytes(&self) -> usize {
        self.rows() * self.cols() * self.dtype().bytes()
    }
    fn storage_name(&self) -> String {
        self.dtype().name().to_string()
    }
    fn to_f32(&self) -> Vec<f32> {
        match self {
            DenseMatrix::F32 { data, .. } => data.clone(),
            DenseMatrix::F16 { data, .. } => data.iter().map(|v| v.to_f32()).collect(),
            DenseMatrix::BF16 { data, .. } => data.iter().map(|v| v.to_f32()).collect(),
        }
    }
}

/// Output rows per parallel task in matrix-vector mode: big enough to amortize scheduling,
/// small enough to balance two to a few dozen threads.
const ROW_BLOCK: usize = 64;

/// Compute all output rows of several kernels sharing the input `x` (`[m, in]`), as one
/// parallel pass over (kernel, row block) tasks. Returns `(kernel index, first row, [m, rows])`.
fn forward_blocks(
    kernels: &[&dyn LinearKernel],
    x: &[f32],
    m: usize,
) -> Vec<(usize, usize, Vec<f32>)> {
    use rayon::prelude::*;
    let tasks: Vec<(usize, usize)> = kernels
        .iter()
        .enumerate()
        .flat_map(|(i, k)| {
            (0..k.out_features())
                .step_by(ROW_BLOCK)
                .map(move |r| (i, r))
        })
        .collect();
    tasks
        .into_par_iter()
        .map(|(i, r0)| {
            let r1 = (r0 + ROW_BLOCK).min(kernels[i].out_features());
            let mut out = vec![0f32; m * (r1 - r0)];
            kernels[i].forward_rows(x, m, r0..r1, &mut out);
            (i, r0, out)
        })
        .collect()
}

/// `forward` for any kernel by splitting its output rows across threads.
pub fn forward_rows_parallel(kernel: &dyn LinearKernel, x: &[f32], m: usize, out: &mut [f32]) {
    let n = kernel.out_features();
    scatter_blocks(forward_blocks(&[kernel], x, m), m, &mut [(out, n)]);
}

fn scatter_blocks(
    parts: Vec<(usize, usize, Vec<f32>)>,
    m: usize,
    outs: &mut [(&mut [f32], usize)],
) {
    for (i, r0, block) in parts {
        let (out, n) = &mut outs[i];
        let width = block.len() / m;
        for r in 0..m {
            out[r * *n + r0..r * *n + r0 + width]
                .copy_from_slice(&block[r * width..(r + 1) * width]);
        }
    }
}

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
        if !self.lm_head_int8 {
            return Ok(if tied {
                None
            } else {
                Some(self.linear("lm_head", in_features, vocab, false)?)
            });
        }
        let w = if tied {
            embed.to_f32()
        } else {
            if let Some(weight) = self.factory_kernel("lm_head", in_features, vocab, false)? {
                // Already quantized by the checkpoint: keep it as it is.
                return Ok(Some(Linear { weight, bias: None }));
            }
            read_f32_checked(self.src, "lm_head.weight", &[vocab, in_features])?
        };
        let q = crate::quant::bnb::quantize_int8(&w, vocab, in_features)?;
        let m = crate::kernels::bnb::Int8Matrix::new(
            q,
            crate::quant::bnb::DEFAULT_INT8_THRESHOLD,
            crate::quant::bnb::Int8Compute::Int8Matmul,
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
