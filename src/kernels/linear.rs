//! Linear kernels: the trait every weight layout implements (dense f32/f16/bf16 here, packed
//! GPTQ/AWQ and bitsandbytes in the sibling modules) and the row-parallel driver they share.

use crate::kernels;
use crate::tensor::WeightDType;
use half::{bf16, f16};

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
pub fn forward_blocks(
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

pub fn scatter_blocks(
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
