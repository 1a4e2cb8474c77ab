//! Element types and the raw tensors that checkpoint readers hand to the models.

use crate::error::{Error, Result};
use half::{bf16, f16};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }
    /// The spelling used in safetensors headers.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }
    pub fn from_safetensors_name(s: &str) -> Option<DType> {
        Some(match s {
            "F64" => DType::F64,
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "I64" => DType::I64,
            "I32" => DType::I32,
            "I16" => DType::I16,
            "I8" => DType::I8,
            "U8" => DType::U8,
            "BOOL" => DType::Bool,
            _ => return None,
        })
    }
    pub fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }
}

/// Name and shape of a stored tensor, known without reading its data.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A tensor as stored: little-endian bytes of `dtype`, row-major `shape`.
#[derive(Clone, Debug, PartialEq)]
pub struct RawTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    pub fn new(dtype: DType, shape: Vec<usize>, data: Vec<u8>) -> Result<Self> {
        let want = shape.iter().product::<usize>() * dtype.size();
        if want != data.len() {
            return Err(Error::Other(format!(
                "tensor of dtype {dtype:?} shape {shape:?} needs {want} bytes, got {}",
                data.len()
            )));
        }
        Ok(RawTensor { dtype, shape, data })
    }
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Self {
        RawTensor {
            dtype: DType::F32,
            shape,
            data: bytemuck::cast_slice(values).to_vec(),
        }
    }
    pub fn from_i32(shape: Vec<usize>, values: &[i32]) -> Self {
        RawTensor {
            dtype: DType::I32,
            shape,
            data: bytemuck::cast_slice(values).to_vec(),
        }
    }
    pub fn from_f16(shape: Vec<usize>, values: &[f16]) -> Self {
        RawTensor {
            dtype: DType::F16,
            shape,
            data: bytemuck::cast_slice(values).to_vec(),
        }
    }
    pub fn from_bf16(shape: Vec<usize>, values: &[bf16]) -> Self {
        RawTensor {
            dtype: DType::BF16,
            shape,
            data: bytemuck::cast_slice(values).to_vec(),
        }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Convert any numeric dtype to f32 (integers are converted by value).
    pub fn to_f32(&self) -> Vec<f32> {
        let d = &self.data;
        let chunks = |n: usize| d.chunks_exact(n);
        match self.dtype {
            DType::F32 => chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            DType::F64 => chunks(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            DType::F16 => chunks(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::BF16 => chunks(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::I64 => chunks(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            DType::I32 => chunks(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            DType::I16 => chunks(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as f32)
                .collect(),
            DType::I8 => d.iter().map(|&b| b as i8 as f32).collect(),
            DType::U8 | DType::Bool => d.iter().map(|&b| b as f32).collect(),
        }
    }
    pub fn to_i32(&self) -> Option<Vec<i32>> {
        (self.dtype == DType::I32).then(|| {
            self.data
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        })
    }
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
