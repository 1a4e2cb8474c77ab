//! On-disk formats, one module each. Readers expose tensors under their Hugging Face names
//! through [`WeightSource`], whatever the container.

pub mod gguf;
pub mod pytorch;
pub mod safetensors;

use crate::error::{Error, Result};
use crate::tensor::{RawTensor, TensorInfo};
use std::path::{Path, PathBuf};

/// A read-only set of named tensors (one file, a sharded set, or a GGUF file).
pub trait WeightSource: Send + Sync {
    /// All tensor names, in Hugging Face convention (`model.layers.0.self_attn.q_proj.weight`).
    fn names(&self) -> Vec<String>;
    /// Dtype and shape without reading data; `None` when absent.
    fn info(&self, name: &str) -> Option<TensorInfo>;
    /// Read one tensor in its stored dtype (GGUF block-quantized tensors come back dequantized F32).
    fn read(&self, name: &str) -> Result<RawTensor>;
    /// The file that holds `name` (for error messages); the main file when absent.
    fn file_of(&self, name: &str) -> PathBuf;
    /// Every file this source reads.
    fn files(&self) -> Vec<PathBuf>;
}

/// Read a float tensor as f32, checking it exists, has `shape`, and holds only finite values.
pub fn read_f32_checked(src: &dyn WeightSource, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let info = src.info(name).ok_or_else(|| {
        Error::tensor(src.file_of(name), name, "missing from the checkpoint")
    })?;
    if info.shape != shape {
        return Err(Error::tensor(
            src.file_of(name),
            name,
            format!("shape mismatch: checkpoint has {:?}, the config implies {:?}", info.shape, shape),
        ));
    }
    let raw = src.read(name)?;
    let values = raw.to_f32();
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::tensor(
            src.file_of(name),
            name,
            format!("non-finite value {} at flat index {i}", values[i]),
        ));
    }
    Ok(values)
}

/// Open the weights of a model folder: sharded or single safetensors, else `pytorch_model.bin`
/// (sharded or not). GGUF files are opened with [`gguf::GgufWeights`].
pub fn open_weights(dir: &Path) -> Result<Box<dyn WeightSource>> {
    let _ = dir;
    Err(Error::Unsupported("open_weights: not implemented yet".into()))
}
