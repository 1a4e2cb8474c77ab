//! GGUF (llama.cpp's single-file format): memory-mapped, fully validated reading, dequantization
//! of the common block types to f32, and a [`WeightSource`] that presents llama / qwen2 GGUFs
//! under Hugging Face tensor names together with the equivalent `config.json`.
//!
//! Layout (v2 and v3, little-endian): magic `GGUF`, u32 version, u64 tensor count, u64 metadata
//! count, the metadata key/value pairs, the tensor infos (name, dims in ggml order — fastest
//! varying first —, type, offset), padding to `general.alignment` (default 32), then the data
//! section that the tensor offsets point into.

mod config;
mod names;

pub use names::GgufWeights;

use crate::error::{Error, Result};
use crate::qtypes::ggml::{dequantize_into, supported_list, tensor_byte_size, GgmlType};
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// One metadata value of a GGUF file.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

pub type Metadata = BTreeMap<String, GgufValue>;

impl GgufValue {
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F32(_) => "f32",
            GgufValue::F64(_) => "f64",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
        }
    }
    /// Any integer type holding a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// Any integer type whose value fits an i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    /// Floats and integers as f64. An f32 is widened through its shortest decimal form, so the
    /// `1e-5` a converter stored as f32 comes back as `1e-5`, as it was in `config.json`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.to_string().parse().unwrap_or(v as f64)),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file and what it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    pub ggml_type: GgmlType,
    /// Dimensions in ggml order: `dims[0]` (ne0) varies fastest, i.e. is the row length.
    pub dims: Vec<u64>,
    /// Offset relative to the start of the data section, as stored.
    pub offset: u64,
    /// Absolute byte range in the file.
    pub file_offset: u64,
    pub n_bytes: u64,
}

impl GgufTensorInfo {
    /// Row-major shape (`[ne1, ne0]` for a matrix): the order numpy and Hugging Face use.
    pub fn shape(&self) -> Vec<usize> {
        // Fits usize: the element count was checked at open.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
    pub fn numel(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
}

/// A memory-mapped GGUF file whose header, metadata and tensor table have been validated.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    alignment: u64,
    data_start: u64,
    metadata: Metadata,
    tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions.
const MAX_DIMS: u32 = 4;
/// Nested arrays are legal in the spec but unused; bound the recursion a hostile file could ask for.
const MAX_ARRAY_DEPTH: usize = 4;
/// Memory the decoded metadata and tensor table may take: this many times the file's size, plus
/// [`MEMORY_SLACK`]. A one-byte array element becomes a whole [`GgufValue`] in memory, so without
/// this bound a file of metadata alone could ask for 32 times its size (docs/fuzzing.md).
const MEMORY_PER_FILE_BYTE: u64 = 4;
const MEMORY_SLACK: u64 = 16 << 20;

/// Bounds-checked little-endian reader over the file's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// Bytes of memory the decoded header may still take.
    budget: u64,
}

impl<'a> Cursor<'a> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::format(self.path, msg)
    }
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let remaining = (self.bytes.len() - self.pos) as u64;
        if n > remaining {
            return Err(self.err(format!(
                "truncated file: {} needs {n} bytes at offset {}, but the file is {} bytes long",
                what(),
                self.pos,
                self.bytes.len()
            )));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }
    /// Account for `bytes` of memory about to be allocated for `what`, refusing past the budget.
    fn charge(&mut self, bytes: u64, what: &dyn Fn() -> String) -> Result<()> {
        if bytes > self.budget {
            let limit = self.bytes.len() as u64 * MEMORY_PER_FILE_BYTE + MEMORY_SLACK;
            return Err(self.err(format!(
                "{} would take {bytes} bytes of memory, past the limit of {limit} bytes for the \
                 header of a {}-byte file (corrupt or hostile)",
                what(),
                self.bytes.len()
            )));
        }
        self.budget -= bytes;
        Ok(())
    }
    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(&|| format!("the length of {}", what()))?;
        if len > self.remaining() {
            return Err(self.err(format!(
                "{} claims a length of {len} bytes at offset {}, past the end of the {}-byte file (truncated or corrupt)",
                what(),
                self.pos,
                self.bytes.len()
            )));
        }
        self.charge(len, what)?;
        let raw = self.take(len, what)?;
        String::from_utf8(raw.to_vec())
            .map_err(|_| self.err(format!("{} is not valid UTF-8", what())))
    }

    fn value(&mut self, type_id: u32, key: &str, depth: usize) -> Result<GgufValue> {
        let what = || format!("the value of metadata key `{key}`");
        Ok(match type_id {
            0 => GgufValue::U8(self.array::<1>(&what)?[0]),
            1 => GgufValue::I8(self.array::<1>(&what)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(&what)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match self.array::<1>(&what)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(self.err(format!("metadata key `{key}`: invalid bool byte {b}"))),
            },
            8 => GgufValue::String(self.string(&what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(format!(
                        "metadata key `{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    )));
                }
                let elem_type =
                    self.u32(&|| format!("the element type of metadata array `{key}`"))?;
                let count = self.u64(&|| format!("the length of metadata array `{key}`"))?;
                let min_elem_bytes = match elem_type {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10 | 11 | 12 => 8,
                    9 => 12,
                    t => {
                        return Err(self.err(format!(
                            "metadata array `{key}` has unknown element type {t}"
                        )))
                    }
                };
                // Refuse counts the rest of the file cannot hold before allocating for them.
                if count
                    .checked_mul(min_elem_bytes)
                    .is_none_or(|n| n > self.remaining())
                {
                    return Err(self.err(format!(
                        "metadata array `{key}` claims {count} elements, more than the rest of the file can hold (truncated or corrupt)"
                    )));
                }
                self.charge(
                    count.saturating_mul(std::mem::size_of::<GgufValue>() as u64),
                    &|| format!("metadata array `{key}` of {count} elements"),
                )?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem_type, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array(&what)?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(&what)?)),
            t => {
                return Err(self.err(format!(
                    "metadata key `{key}` has unknown value type {t} (known: 0-12)"
                )))
            }
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; like every mmap reader we assume nobody truncates the
        // file while it is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path.to_path_buf(), mmap)
    }

    fn parse(path: PathBuf, mmap: Mmap) -> Result<GgufFile> {
        let bytes: &[u8] = &mmap;
        let mut cur = Cursor {
            bytes,
            pos: 0,
            path: &path,
            budget: (bytes.len() as u64)
                .saturating_mul(MEMORY_PER_FILE_BYTE)
                .saturating_add(MEMORY_SLACK),
        };
        let magic = cur.take(4, &|| "the magic number".into())?;
        if magic != b"GGUF" {
            return Err(Error::format(
                &path,
                format!("not a GGUF file: starts with {magic:02x?} instead of the magic `GGUF`"),
            ));
        }
        let version = cur.u32(&|| "the version".into())?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(Error::format(
                    &path,
                    "GGUF version 1 is not supported (only versions 2 and 3)",
                ))
            }
            v if (2..=3).contains(&v.swap_bytes()) => {
                return Err(Error::format(
                    &path,
                    "big-endian GGUF files are not supported (only little-endian)",
                ))
            }
            v => {
                return Err(Error::format(
                    &path,
                    format!("unsupported GGUF version {v} (only versions 2 and 3)"),
                ))
            }
        }
        let n_tensors = cur.u64(&|| "the tensor count".into())?;
        let n_kv = cur.u64(&|| "the metadata count".into())?;
        // Smallest encodings: a key/value pair is a key length, a type and a 1-byte value; a tensor
        // info is a name length, n_dims, type and offset.
        if n_kv
            .checked_mul(8 + 4 + 1)
            .is_none_or(|n| n > cur.remaining())
        {
            return Err(Error::format(
                &path,
                format!("header claims {n_kv} metadata entries, more than the file can hold (truncated or corrupt)"),
            ));
        }
        if n_tensors
            .checked_mul(8 + 4 + 4 + 8)
            .is_none_or(|n| n > cur.remaining())
        {
            return Err(Error::format(
                &path,
                format!("header claims {n_tensors} tensors, more than the file can hold (truncated or corrupt)"),
            ));
        }

        let mut metadata = Metadata::new();
        for i in 0..n_kv {
            let key = cur.string(&|| format!("the key of metadata entry {i}"))?;
            let type_id = cur.u32(&|| format!("the value type of metadata key `{key}`"))?;
            let value = cur.value(type_id, &key, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(Error::format(
                    &path,
                    format!("metadata key `{key}` appears twice"),
                ));
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(Error::format(
                        &path,
                        format!("general.alignment must be a power of two, found {v:?}"),
                    ))
                }
            },
        };

        // The table and the name index: an info, and a copy of the name's `String` in the index.
        let per_tensor = (std::mem::size_of::<GgufTensorInfo>()
            + std::mem::size_of::<(String, usize)>()
            + 8 * MAX_DIMS as usize) as u64;
        cur.charge(n_tensors.saturating_mul(per_tensor), &|| {
            format!("the table of {n_tensors} tensors")
        })?;
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut by_name = HashMap::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = cur.string(&|| format!("the name of tensor {i}"))?;
            // The index holds a second copy of the name.
            cur.charge(name.len() as u64, &|| format!("the name of tensor {i}"))?;
            let n_dims = cur.u32(&|| format!("the dimension count of tensor `{name}`"))?;
            if n_dims > MAX_DIMS {
                return Err(Error::tensor(
                    &path,
                    &name,
                    format!("{n_dims} dimensions (ggml allows at most {MAX_DIMS})"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(cur.u64(&|| format!("dimension {d} of tensor `{name}`"))?);
            }
            let type_id = cur.u32(&|| format!("the type of tensor `{name}`"))?;
            let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
                Error::tensor(&path, &name, format!("unknown ggml type id {type_id}"))
            })?;
            let offset = cur.u64(&|| format!("the data offset of tensor `{name}`"))?;
            let n_bytes = tensor_byte_size(ggml_type, &dims)
                .map_err(|msg| Error::tensor(&path, &name, msg))?;
            if !offset.is_multiple_of(alignment) {
                return Err(Error::tensor(
                    &path,
                    &name,
                    format!("data offset {offset} is not a multiple of the alignment {alignment}"),
                ));
            }
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                return Err(Error::tensor(&path, &name, "tensor name appears twice"));
            }
            tensors.push(GgufTensorInfo {
                name,
                ggml_type,
                dims,
                offset,
                file_offset: 0,
                n_bytes,
            });
        }

        let header_end = cur.pos as u64;
        let data_start = header_end.div_ceil(alignment) * alignment;
        let file_len = bytes.len() as u64;
        for t in &mut tensors {
            let end = data_start
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.n_bytes));
            match end {
                Some(end) if end <= file_len => t.file_offset = data_start + t.offset,
                _ => {
                    return Err(Error::tensor(
                        &path,
                        &t.name,
                        format!(
                            "data ({} bytes at offset {} of the data section, which starts at byte {data_start}) \
                             extends past the end of the {file_len}-byte file (truncated or lying offset)",
                            t.n_bytes, t.offset
                        ),
                    ))
                }
            }
        }
        // Tensors must not share bytes: a lying offset could otherwise alias another tensor.
        let mut order: Vec<&GgufTensorInfo> = tensors.iter().filter(|t| t.n_bytes > 0).collect();
        order.sort_by_key(|t| t.file_offset);
        for pair in order.windows(2) {
            if pair[0].file_offset + pair[0].n_bytes > pair[1].file_offset {
                return Err(Error::tensor(
                    &path,
                    &pair[1].name,
                    format!("data overlaps that of tensor `{}`", pair[0].name),
                ));
            }
        }

        Ok(GgufFile {
            path,
            mmap,
            version,
            alignment,
            data_start,
            metadata,
            tensors,
            by_name,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn version(&self) -> u32 {
        self.version
    }
    pub fn alignment(&self) -> u64 {
        self.alignment
    }
    /// Absolute file offset of the data section.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(GgufValue::as_str)
    }
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(GgufValue::as_u64)
    }
    pub fn get_i64(&self, key: &str) -> Option<i64> {
        self.get(key).and_then(GgufValue::as_i64)
    }
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(GgufValue::as_f64)
    }
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        match self.get(key)? {
            GgufValue::F32(v) => Some(*v),
            other => other.as_f64().map(|v| v as f32),
        }
    }
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(GgufValue::as_bool)
    }
    pub fn get_array(&self, key: &str) -> Option<&[GgufValue]> {
        self.get(key).and_then(GgufValue::as_array)
    }
    /// A string array (e.g. `tokenizer.ggml.tokens`); `None` if absent or not all strings.
    pub fn get_str_array(&self, key: &str) -> Option<Vec<&str>> {
        self.get_array(key)?.iter().map(GgufValue::as_str).collect()
    }

    /// A required unsigned integer; the error tells missing from mistyped.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        match self.get(key) {
            None => Err(Error::format(
                &self.path,
                format!("metadata key `{key}` is missing"),
            )),
            Some(v) => v.as_u64().ok_or_else(|| {
                Error::format(
                    &self.path,
                    format!("metadata key `{key}` should be a non-negative integer, found {v:?}"),
                )
            }),
        }
    }

    /// `general.architecture` (e.g. `llama`, `qwen2`).
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    pub fn tensor_infos(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    fn info_or_err(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensor_info(name)
            .ok_or_else(|| Error::tensor(&self.path, name, "no such tensor in the GGUF file"))
    }

    /// The stored bytes of a tensor (validated to lie inside the file at open).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.info_or_err(name)?;
        Ok(&self.mmap[t.file_offset as usize..(t.file_offset + t.n_bytes) as usize])
    }

    /// Dequantize a tensor to f32, in row-major order of [`GgufTensorInfo::shape`].
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.info_or_err(name)?;
        if !t.ggml_type.is_supported() {
            return Err(unsupported_type_error(&self.path, t));
        }
        let bytes = self.tensor_bytes(name)?;
        let mut out = vec![0f32; t.numel()];
        dequantize_into(t.ggml_type, bytes, &mut out)
            .map_err(|msg| Error::tensor(&self.path, name, msg))?;
        Ok(out)
    }
}

fn unsupported_type_error(path: &Path, t: &GgufTensorInfo) -> Error {
    Error::Unsupported(format!(
        "unsupported GGUF tensor type {} for tensor `{}` in {} (supported: {})",
        t.ggml_type,
        t.name,
        path.display(),
        supported_list()
    ))
}
