//! On-disk formats, one module each. Readers expose tensors under their Hugging Face names
//! through [`WeightSource`], whatever the container.

pub mod gguf;
pub mod pytorch;
pub mod safetensors;

use crate::error::{Error, Result};
use crate::tensor::{RawTensor, TensorInfo};
use std::collections::HashMap;
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

/// Tensors held in memory under a file-like label (used in errors): tests, and conversions
/// that build a checkpoint before writing it.
pub struct MemoryWeights {
    label: PathBuf,
    tensors: std::collections::BTreeMap<String, RawTensor>,
}

impl MemoryWeights {
    pub fn new(
        label: impl Into<PathBuf>,
        tensors: impl IntoIterator<Item = (String, RawTensor)>,
    ) -> Self {
        MemoryWeights {
            label: label.into(),
            tensors: tensors.into_iter().collect(),
        }
    }
}

impl WeightSource for MemoryWeights {
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
    fn info(&self, name: &str) -> Option<TensorInfo> {
        self.tensors.get(name).map(|t| TensorInfo {
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
    }
    fn read(&self, name: &str) -> Result<RawTensor> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| Error::tensor(&self.label, name, "missing"))
    }
    fn file_of(&self, _name: &str) -> PathBuf {
        self.label.clone()
    }
    fn files(&self) -> Vec<PathBuf> {
        vec![self.label.clone()]
    }
}

/// Dtype and shape of a tensor the checkpoint must hold; the error names file and tensor.
pub fn require_tensor(src: &dyn WeightSource, name: &str) -> Result<TensorInfo> {
    src.info(name)
        .ok_or_else(|| Error::tensor(src.file_of(name), name, "missing from the checkpoint"))
}

/// As [`require_tensor`], and the tensor must have `shape`; `implied_by` says what fixes that
/// shape (e.g. "the config implies"), for the error message.
pub fn require_shape(
    src: &dyn WeightSource,
    name: &str,
    shape: &[usize],
    implied_by: &str,
) -> Result<TensorInfo> {
    let info = require_tensor(src, name)?;
    if info.shape != shape {
        return Err(Error::tensor(
            src.file_of(name),
            name,
            format!(
                "shape mismatch: checkpoint has {:?}, {implied_by} {:?}",
                info.shape, shape
            ),
        ));
    }
    Ok(info)
}

/// Read a float tensor as f32, checking it exists, has `shape`, and holds only finite values.
pub fn read_f32_checked(src: &dyn WeightSource, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    require_shape(src, name, shape, "the config implies")?;
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
///
/// Order: `model.safetensors.index.json`, `model.safetensors`, a single other `*.safetensors`
/// (e.g. AutoGPTQ's `gptq_model-4bit-128g.safetensors`), `pytorch_model.bin.index.json`,
/// `pytorch_model.bin`. Several other `*.safetensors` with no index is ambiguous and an error.
pub fn open_weights(dir: &Path) -> Result<Box<dyn WeightSource>> {
    let st_index = dir.join(safetensors::INDEX_FILE_NAME);
    if st_index.is_file() {
        return Ok(Box::new(safetensors::ShardedSafetensors::open_index(
            &st_index,
        )?));
    }
    let st_single = dir.join(safetensors::SINGLE_FILE_NAME);
    if st_single.is_file() {
        return Ok(Box::new(safetensors::SafetensorsFile::open(&st_single)?));
    }
    let others = other_safetensors_files(dir)?;
    match others.as_slice() {
        [one] => return Ok(Box::new(safetensors::SafetensorsFile::open(one)?)),
        [] => {}
        many => {
            let names: Vec<String> = many.iter().map(|p| p.display().to_string()).collect();
            return Err(Error::format(
                dir,
                format!(
                    "several .safetensors files and no {}; cannot tell which holds the weights: {}",
                    safetensors::INDEX_FILE_NAME,
                    names.join(", ")
                ),
            ));
        }
    }
    let pt_index = dir.join(pytorch::INDEX_FILE_NAME);
    if pt_index.is_file() {
        return Ok(Box::new(pytorch::ShardedPytorch::open_index(&pt_index)?));
    }
    let pt_single = dir.join(pytorch::SINGLE_FILE_NAME);
    if pt_single.is_file() {
        return Ok(Box::new(pytorch::PytorchFile::open(&pt_single)?));
    }
    Err(Error::NotFound {
        model: dir.display().to_string(),
        tried: vec![
            st_index.display().to_string(),
            st_single.display().to_string(),
            format!("{}/*.safetensors (exactly one)", dir.display()),
            pt_index.display().to_string(),
            pt_single.display().to_string(),
        ],
    })
}

/// Visible `*.safetensors` files in `dir` (hidden ones are our own unfinished temporaries), sorted.
fn other_safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let listing = match std::fs::read_dir(dir) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut found = Vec::new();
    for entry in listing {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".safetensors") && !name.starts_with('.') && entry.path().is_file() {
            found.push(entry.path());
        }
    }
    found.sort();
    Ok(found)
}

/// A checkpoint split over several files of one container format, described by an index JSON
/// (`model.safetensors.index.json` or `pytorch_model.bin.index.json`).
#[derive(Debug)]
pub struct ShardedWeights<S> {
    index_path: PathBuf,
    shards: Vec<S>,
    /// Tensor name → shard index, and names in index order.
    owner: HashMap<String, usize>,
    order: Vec<String>,
}

impl<S: WeightSource> ShardedWeights<S> {
    /// Read the index's `weight_map` (shard names checked not to escape the folder), open each
    /// shard once with `open_shard`, and check every listed tensor is in its shard.
    pub fn open(index_path: &Path, open_shard: impl Fn(&Path) -> Result<S>) -> Result<Self> {
        let weight_map = safetensors::read_weight_map(index_path)?;
        let mut shards: Vec<S> = Vec::new();
        let mut shard_of_path: HashMap<PathBuf, usize> = HashMap::new();
        let mut owner = HashMap::new();
        let mut order = Vec::with_capacity(weight_map.len());
        for (name, shard_path) in weight_map {
            let idx = match shard_of_path.get(&shard_path) {
                Some(&i) => i,
                None => {
                    shards.push(open_shard(&shard_path)?);
                    shard_of_path.insert(shard_path.clone(), shards.len() - 1);
                    shards.len() - 1
                }
            };
            if shards[idx].info(&name).is_none() {
                return Err(Error::tensor(
                    &shard_path,
                    name.as_str(),
                    format!(
                        "listed in {} but absent from this shard",
                        index_path.display()
                    ),
                ));
            }
            owner.insert(name.clone(), idx);
            order.push(name);
        }
        Ok(ShardedWeights {
            index_path: index_path.to_path_buf(),
            shards,
            owner,
            order,
        })
    }

    pub fn index_path(&self) -> &Path {
        &self.index_path
    }

    pub fn shards(&self) -> &[S] {
        &self.shards
    }
}

impl<S: WeightSource> WeightSource for ShardedWeights<S> {
    fn names(&self) -> Vec<String> {
        self.order.clone()
    }
    fn info(&self, name: &str) -> Option<TensorInfo> {
        self.shards[*self.owner.get(name)?].info(name)
    }
    fn read(&self, name: &str) -> Result<RawTensor> {
        match self.owner.get(name) {
            Some(&i) => self.shards[i].read(name),
            None => Err(Error::tensor(
                &self.index_path,
                name,
                "not in the weight_map",
            )),
        }
    }
    fn file_of(&self, name: &str) -> PathBuf {
        match self.owner.get(name) {
            Some(&i) => self.shards[i].file_of(name),
            None => self.index_path.clone(),
        }
    }
    fn files(&self) -> Vec<PathBuf> {
        let mut v = vec![self.index_path.clone()];
        v.extend(self.shards.iter().flat_map(|s| s.files()));
        v
    }
}
