//! Packed GPTQ-layout weights (2/3/4/8-bit codes, per-group scales and zero points, optional
//! act-order `g_idx`) with a matmul that unpacks on the fly. (Placeholder: being written; it
//! currently dequantizes on every call.)

use crate::error::Result;
use crate::nn::LinearKernel;
use crate::quant::rtn::QuantizedLinear;

/// A quantized `[N, K]` weight kept packed in memory.
pub struct GptqMatrix {
    q: QuantizedLinear,
}

impl GptqMatrix {
    /// Pack a quantized weight for inference (validates shapes).
    pub fn from_quantized(q: &QuantizedLinear) -> Result<Self> {
        Ok(GptqMatrix { q: q.clone() })
    }
    /// The unpacked form (codes, scales, true zero points, `g_idx`), e.g. for saving.
    pub fn to_quantized(&self) -> QuantizedLinear {
        self.q.clone()
    }
}

impl LinearKernel for GptqMatrix {
    fn in_features(&self) -> usize {
        self.q.k
    }
    fn out_features(&self) -> usize {
        self.q.n
    }
    fn forward_rows(&self, x: &[f32], m: usize, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let w = self.q.dequantize();
        let k = self.q.k;
        super::gemv_block(x, m, k, &w[rows.start * k..rows.end * k], out)
    }
    fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let w = self.q.dequantize();
        super::matmul_nt(x, m, self.q.k, &w, self.q.n, out)
    }
    fn storage_bytes(&self) -> usize {
        let g = self.q.num_groups();
        self.q.n * self.q.k * self.q.bits as usize / 8 + g * self.q.n * (2 + self.q.bits as usize / 8) + 4 * self.q.k
    }
    fn storage_name(&self) -> String {
        match self.q.group_size {
            Some(g) => format!("gptq-{}bit-g{g}", self.q.bits),
            None => format!("gptq-{}bit", self.q.bits),
        }
    }
    fn to_f32(&self) -> Vec<f32> {
        self.q.dequantize()
    }
}
