//! safetensors: memory-mapped, fully validated reading (single file or sharded with
//! `model.safetensors.index.json`) and streaming writing with transformers' shard naming.
//!
//! Layout: 8-byte little-endian header length N, N bytes of JSON (padded with spaces), then the
//! data buffer. The JSON maps each tensor name to `{dtype, shape, data_offsets: [begin, end]}`
//! relative to the data buffer, and the tensors must cover that buffer exactly, with no gap,
//! overlap or trailing bytes.

use crate::error::{Error, Result};
use crate::formats::WeightSource;
use crate::fsutil::{safe_join, AtomicFile};
use crate::tensor::{DType, RawTensor, TensorInfo};
use memmap2::Mmap;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// The reference implementation's limit; larger headers are corrupt or hostile.
const MAX_HEADER_BYTES: u64 = 100_000_000;
pub const SINGLE_FILE_NAME: &str = "model.safetensors";
pub const INDEX_FILE_NAME: &str = "model.safetensors.index.json";

#[derive(Clone, Debug)]
struct Entry {
    info: TensorInfo,
    /// Byte range within the data buffer.
    begin: usize,
    end: usize,
}

/// One memory-mapped `.safetensors` file whose header has been checked against its data.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    /// Tensor names in the order their bytes appear in the file.
    order: Vec<String>,
    entries: HashMap<String, Entry>,
    metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.order.len())
            .finish()
    }
}

fn json_usize(v: &Value) -> Option<usize> {
    v.as_u64().and_then(|n| usize::try_from(n).ok())
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if file_len < 8 {
            return Err(Error::format(
                path,
                format!(
                    "file is {file_len} bytes, too short for the 8-byte header length (truncated?)"
                ),
            ));
        }
        // SAFETY: the map is read-only; if another process truncates the file while we read it,
        // the OS may fault, which is the accepted trade-off of mmap-based model loaders.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let bytes: &[u8] = &mmap;
        let header_len = u64::from_le_bytes(
            bytes[..8]
                .try_into()
                .map_err(|_| Error::format(path, "short read"))?,
        );
        if header_len > MAX_HEADER_BYTES {
            return Err(Error::format(
                path,
                format!("header length {header_len} is absurdly large (limit {MAX_HEADER_BYTES}); not a safetensors file, or corrupt"),
            ));
        }
        if 8 + header_len > file_len {
            return Err(Error::format(
                path,
                format!("header length {header_len} runs past the end of the {file_len}-byte file (truncated, or the header length lies)"),
            ));
        }
        let data_start = 8 + header_len as usize;
        let header = std::str::from_utf8(&bytes[8..data_start])
            .map_err(|e| Error::format(path, format!("header is not valid UTF-8: {e}")))?;
        let json: Value = serde_json::from_str(header)
            .map_err(|e| Error::format(path, format!("header is not valid JSON: {e}")))?;
        let Value::Object(map) = json else {
            return Err(Error::format(path, "header is not a JSON object"));
        };
        let data_len = bytes.len() - data_start;

        let mut metadata = BTreeMap::new();
        let mut entries = HashMap::new();
        for (name, value) in map {
            if name == "__metadata__" {
                let Value::Object(m) = value else {
                    return Err(Error::format(path, "`__metadata__` is not a JSON object"));
                };
                for (k, v) in m {
                    let Value::String(s) = v else {
                        return Err(Error::format(
                            path,
                            format!("`__metadata__` value for `{k}` is not a string"),
                        ));
                    };
                    metadata.insert(k, s);
                }
                continue;
            }
            let entry = parse_entry(path, &name, &value, data_len)?;
            entries.insert(name, entry);
        }

        // The data buffer must be covered exactly: sort by offset and walk it.
        let mut order: Vec<&String> = entries.keys().collect();
        order.sort_by_key(|n| (entries[*n].begin, entries[*n].end, n.as_str()));
        let mut covered = 0usize;
        let mut previous: Option<&String> = None;
        for name in &order {
            let e = &entries[*name];
            if e.begin < covered {
                let prev = previous.map(|p| p.as_str()).unwrap_or("?");
                return Err(Error::tensor(
                    path,
                    name.as_str(),
                    format!(
                        "data_offsets [{}, {}] overlap tensor `{prev}` (which ends at {covered})",
                        e.begin, e.end
                    ),
                ));
            }
            if e.begin > covered {
                return Err(Error::tensor(
                    path,
                    name.as_str(),
                    format!(
                        "data_offsets [{}, {}] leave bytes {covered}..{} of the data buffer unused (tensors must cover it exactly)",
                        e.begin, e.end, e.begin
                    ),
                ));
            }
            covered = e.end;
            if e.end > e.begin {
                previous = Some(name);
            }
        }
        if covered != data_len {
            let msg = format!(
                "the data buffer has {data_len} bytes but the tensors cover only {covered}; {} trailing bytes belong to no tensor",
                data_len - covered
            );
            return Err(match previous {
                Some(last) => Error::tensor(
                    path,
                    last.as_str(),
                    format!("last tensor ends early: {msg}"),
                ),
                None => Error::format(path, msg),
            });
        }
        let order: Vec<String> = order.into_iter().cloned().collect();
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            data_start,
            order,
            entries,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `__metadata__` (always a string → string map; empty when absent).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The stored bytes of a tensor, without copying.
    pub fn tensor_bytes(&self, name: &str) -> Option<&[u8]> {
        let e = self.entries.get(name)?;
        self.mmap
            .get(self.data_start + e.begin..self.data_start + e.end)
    }
}

fn parse_entry(path: &Path, name: &str, value: &Value, data_len: usize) -> Result<Entry> {
    let bad = |msg: String| Error::tensor(path, name, msg);
    let Value::Object(obj) = value else {
        return Err(bad("header entry is not a JSON object".into()));
    };
    let dtype_name = obj
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("header entry has no string `dtype`".into()))?;
    let dtype = DType::from_safetensors_name(dtype_name)
        .ok_or_else(|| bad(format!("unknown or unsupported dtype `{dtype_name}`")))?;
    let shape_json = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("header entry has no array `shape`".into()))?;
    let shape = shape_json
        .iter()
        .map(json_usize)
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| {
            bad(format!(
                "shape {shape_json:?} is not a list of non-negative integers"
            ))
        })?;
    let offsets = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .filter(|a| a.len() == 2)
        .ok_or_else(|| bad("header entry has no two-element `data_offsets`".into()))?;
    let (Some(begin), Some(end)) = (json_usize(&offsets[0]), json_usize(&offsets[1])) else {
        return Err(bad(format!(
            "data_offsets {offsets:?} are not non-negative integers"
        )));
    };
    if end < begin {
        return Err(bad(format!(
            "data_offsets [{begin}, {end}] end before they begin"
        )));
    }
    let nbytes = shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    if end - begin != nbytes {
        return Err(bad(format!(
            "data_offsets [{begin}, {end}] span {} bytes but dtype {dtype_name} shape {shape:?} needs {nbytes}",
            end - begin
        )));
    }
    if end > data_len {
        return Err(bad(format!(
            "data_offsets [{begin}, {end}] run past the {data_len}-byte data buffer (file truncated, or the offsets lie)"
        )));
    }
    Ok(Entry {
        info: TensorInfo { dtype, shape },
        begin,
        end,
    })
}

impl WeightSource for SafetensorsFile {
    fn names(&self) -> Vec<String> {
        self.order.clone()
    }
    fn info(&self, name: &str) -> Option<TensorInfo> {
        self.entries.get(name).map(|e| e.info.clone())
    }
    fn read(&self, name: &str) -> Result<RawTensor> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| Error::tensor(&self.path, name, "not in this file"))?;
        let bytes = self
            .tensor_bytes(name)
            .ok_or_else(|| Error::tensor(&self.path, name, "bytes out of range"))?;
        let tensor = RawTensor::new(e.info.dtype, e.info.shape.clone(), bytes.to_vec())
            .map_err(|err| Error::tensor(&self.path, name, err.to_string()));
        // The caller now owns a copy: let the mapped pages go, so streaming through a
        // checkpoint larger than memory does not keep every page it read in this process's
        // resident set (they stay in the OS page cache).
        // SAFETY: the mapping is read-only and private, so dropping its pages loses nothing;
        // they are read back from the file if touched again.
        let _ = unsafe {
            self.mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                self.data_start + e.begin,
                e.end - e.begin,
            )
        };
        tensor
    }
    fn file_of(&self, _name: &str) -> PathBuf {
        self.path.clone()
    }
    fn files(&self) -> Vec<PathBuf> {
        vec![self.path.clone()]
    }
}

/// Read an index JSON (`model.safetensors.index.json`, `pytorch_model.bin.index.json`) and
/// return `(tensor name, shard path)` in index order, every shard path checked with [`safe_join`].
pub(crate) fn read_weight_map(index_path: &Path) -> Result<Vec<(String, PathBuf)>> {
    let json = crate::error::read_json(index_path)?;
    let dir = index_path.parent().unwrap_or(Path::new("."));
    let map = json
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::format(index_path, "no `weight_map` object"))?;
    let mut out = Vec::with_capacity(map.len());
    let mut checked: HashMap<&str, PathBuf> = HashMap::new();
    for (name, shard) in map {
        let shard = shard.as_str().ok_or_else(|| {
            Error::tensor(
                index_path,
                name.as_str(),
                "weight_map value is not a file name string",
            )
        })?;
        let shard_path = match checked.get(shard) {
            Some(p) => p.clone(),
            None => {
                let p = safe_join(dir, shard)
                    .map_err(|e| Error::tensor(index_path, name.as_str(), e.to_string()))?;
                if !p.is_file() {
                    return Err(Error::tensor(
                        index_path,
                        name.as_str(),
                        format!(
                            "shard `{shard}` listed in weight_map does not exist ({})",
                            p.display()
                        ),
                    ));
                }
                checked.insert(shard, p.clone());
                p
            }
        };
        out.push((name.clone(), shard_path));
    }
    Ok(out)
}

/// A checkpoint split over several safetensors files, described by `model.safetensors.index.json`.
pub type ShardedSafetensors = crate::formats::ShardedWeights<SafetensorsFile>;

impl ShardedSafetensors {
    pub fn open_index(index_path: &Path) -> Result<Self> {
        Self::open(index_path, SafetensorsFile::open)
    }
}

// ---------------------------------------------------------------------------------------------
// Writing

/// What will be written for one tensor, known before its data exists.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, dtype: DType, shape: Vec<usize>) -> Self {
        TensorSpec {
            name: name.into(),
            dtype,
            shape,
        }
    }
    pub fn nbytes(&self) -> u64 {
        self.shape.iter().fold(self.dtype.size() as u64, |acc, &d| {
            acc.saturating_mul(d as u64)
        })
    }
}

/// Streams one `.safetensors` file: the header is written from the specs up front, then each
/// tensor's bytes in spec order, so only one tensor needs to be in memory at a time. The file
/// appears under its final name only after [`SafetensorsWriter::finish`].
pub struct SafetensorsWriter {
    file: AtomicFile,
    specs: Vec<TensorSpec>,
    next: usize,
}

impl SafetensorsWriter {
    /// `metadata` is added to `__metadata__` next to `"format": "pt"`.
    pub fn create(
        path: &Path,
        specs: Vec<TensorSpec>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let header = build_header(path, &specs, metadata)?;
        let mut file = AtomicFile::create(path)?;
        file.write_bytes(&(header.len() as u64).to_le_bytes())?;
        file.write_bytes(&header)?;
        Ok(SafetensorsWriter {
            file,
            specs,
            next: 0,
        })
    }

    /// The spec of the tensor expected next, if any.
    pub fn next_spec(&self) -> Option<&TensorSpec> {
        self.specs.get(self.next)
    }

    /// Write the next tensor; its dtype and shape must match the spec given at creation.
    pub fn write_tensor(&mut self, tensor: &RawTensor) -> Result<()> {
        let path = self.file.final_path().to_path_buf();
        let Some(spec) = self.specs.get(self.next) else {
            return Err(Error::format(path, "more tensors written than declared"));
        };
        if tensor.dtype != spec.dtype || tensor.shape != spec.shape {
            return Err(Error::tensor(
                path,
                spec.name.as_str(),
                format!(
                    "declared as {:?} {:?} but the data given is {:?} {:?}",
                    spec.dtype, spec.shape, tensor.dtype, tensor.shape
                ),
            ));
        }
        if tensor.data.len() as u64 != spec.nbytes() {
            return Err(Error::tensor(
                path,
                spec.name.as_str(),
                format!(
                    "{} data bytes given, {} expected",
                    tensor.data.len(),
                    spec.nbytes()
                ),
            ));
        }
        self.file.write_bytes(&tensor.data)?;
        self.next += 1;
        Ok(())
    }

    /// Check every declared tensor was written, fsync, and move the file into place.
    pub fn finish(self) -> Result<PathBuf> {
        if self.next != self.specs.len() {
            let missing = &self.specs[self.next].name;
            return Err(Error::tensor(
                self.file.final_path(),
                missing.as_str(),
                format!(
                    "declared but never written ({} of {} tensors written)",
                    self.next,
                    self.specs.len()
                ),
            ));
        }
        self.file.commit()
    }
}

fn build_header(
    path: &Path,
    specs: &[TensorSpec],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), Value::String("pt".into()));
    for (k, v) in metadata {
        if k == "format" && v != "pt" {
            return Err(Error::InvalidArgument(format!(
                "safetensors metadata `format` must be \"pt\" (transformers refuses other values), got {v:?}"
            )));
        }
        meta.insert(k.clone(), Value::String(v.clone()));
    }
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), Value::Object(meta));
    let mut offset = 0u64;
    for spec in specs {
        if spec.name == "__metadata__" || header.contains_key(&spec.name) {
            return Err(Error::tensor(
                path,
                spec.name.as_str(),
                "duplicate or reserved tensor name",
            ));
        }
        let end = offset + spec.nbytes();
        header.insert(
            spec.name.clone(),
            serde_json::json!({
                "dtype": spec.dtype.safetensors_name(),
                "shape": spec.shape,
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    let mut bytes =
        serde_json::to_vec(&Value::Object(header)).map_err(|e| Error::Other(e.to_string()))?;
    // Pad so the data buffer starts 8-byte aligned (the length prefix itself is 8 bytes).
    while bytes.len() % 8 != 0 {
        bytes.push(b' ');
    }
    Ok(bytes)
}

/// Split tensors into shards the way huggingface_hub does: greedily in the given order, starting
/// a new shard when the next tensor would push the current one past `max_shard_bytes`; a tensor
/// larger than the limit gets a shard of its own, placed where it is met (before the shard that
/// is still being filled). Returns indices into `specs`.
pub fn plan_shards(specs: &[TensorSpec], max_shard_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_bytes = 0u64;
    for (i, spec) in specs.iter().enumerate() {
        let size = spec.nbytes();
        if size > max_shard_bytes {
            shards.push(vec![i]);
            continue;
        }
        if current_bytes + size > max_shard_bytes && !current.is_empty() {
            shards.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.push(i);
        current_bytes += size;
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    shards
}

/// The name transformers gives shard `i` (1-based) of `n`.
pub fn shard_file_name(i: usize, n: usize) -> String {
    format!("model-{i:05}-of-{n:05}.safetensors")
}

/// What [`save_safetensors`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct SavedSafetensors {
    pub files: Vec<PathBuf>,
    /// `model.safetensors.index.json`, present only when sharded.
    pub index: Option<PathBuf>,
    pub total_size: u64,
}

/// Write `specs` into `dir` as `model.safetensors`, or, when they do not fit in
/// `max_shard_bytes`, as `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`.
///
/// `produce` is called once per spec, in order, and each tensor is written and dropped before the
/// next is asked for, so checkpoints far larger than memory can be written. Every file carries
/// `{"format": "pt"}` plus `metadata` in `__metadata__`.
pub fn save_safetensors(
    dir: &Path,
    specs: &[TensorSpec],
    max_shard_bytes: u64,
    metadata: &BTreeMap<String, String>,
    mut produce: impl FnMut(&TensorSpec) -> Result<RawTensor>,
) -> Result<SavedSafetensors> {
    let mut seen = std::collections::HashSet::new();
    for s in specs {
        if !seen.insert(s.name.as_str()) {
            return Err(Error::tensor(
                dir.join(SINGLE_FILE_NAME),
                s.name.as_str(),
                "duplicate tensor name",
            ));
        }
    }
    let plan = plan_shards(specs, max_shard_bytes);
    let n = plan.len();
    let mut files = Vec::with_capacity(n);
    let mut weight_map = BTreeMap::new();
    for (k, members) in plan.iter().enumerate() {
        let file_name = if n == 1 {
            SINGLE_FILE_NAME.to_string()
        } else {
            shard_file_name(k + 1, n)
        };
        let path = dir.join(&file_name);
        let shard_specs: Vec<TensorSpec> = members.iter().map(|&i| specs[i].clone()).collect();
        let mut writer = SafetensorsWriter::create(&path, shard_specs.clone(), metadata)?;
        for spec in &shard_specs {
            let tensor = produce(spec)?;
            writer.write_tensor(&tensor)?;
            weight_map.insert(spec.name.clone(), file_name.clone());
        }
        files.push(writer.finish()?);
    }
    let total_size = specs.iter().map(TensorSpec::nbytes).sum();
    let index = if n > 1 {
        let index = serde_json::json!({
            "metadata": { "total_size": total_size },
            "weight_map": weight_map,
        });
        let mut text =
            serde_json::to_string_pretty(&index).map_err(|e| Error::Other(e.to_string()))?;
        text.push('\n');
        let path = dir.join(INDEX_FILE_NAME);
        crate::fsutil::write_atomic(&path, text.as_bytes())?;
        Some(path)
    } else {
        None
    };
    Ok(SavedSafetensors {
        files,
        index,
        total_size,
    })
}

/// Convenience for small, in-memory tensor sets (tests, tiny models).
pub fn save_safetensors_in_memory(
    dir: &Path,
    tensors: &[(String, RawTensor)],
    max_shard_bytes: u64,
    metadata: &BTreeMap<String, String>,
) -> Result<SavedSafetensors> {
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(n, t)| TensorSpec::new(n.clone(), t.dtype, t.shape.clone()))
        .collect();
    let by_name: HashMap<&str, &RawTensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    save_safetensors(dir, &specs, max_shard_bytes, metadata, |spec| {
        by_name
            .get(spec.name.as_str())
            .map(|t| (*t).clone())
            .ok_or_else(|| Error::Other(format!("tensor `{}` vanished", spec.name)))
    })
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<SafetensorsFile>();
    check::<ShardedSafetensors>();
}
