//! GGUF (llama.cpp's single-file format): memory-mapped, fully validated reading, dequantization
//! of the common block types to f32, and a [`WeightSource`] that presents llama / qwen2 GGUFs
//! under Hugging Face tensor names together with the equivalent `config.json`.
//!
//! Layout (v2 and v3, little-endian): magic `GGUF`, u32 version, u64 tensor count, u64 metadata
//! count, the metadata key/value pairs, the tensor infos (name, dims in ggml order — fastest
//! varying first —, type, offset), padding to `general.alignment` (default 32), then the data
//! section that the tensor offsets point into.

use crate::error::{Error, Result};
use crate::formats::WeightSource;
use crate::tensor::{DType, RawTensor, TensorInfo};
use half::f16;
use memmap2::Mmap;
use rayon::prelude::*;
use serde_json::{json, Map, Value};
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

/// ggml tensor element types, with the ids used in GGUF files. Only some can be dequantized
/// (see [`GgmlType::SUPPORTED`]); the others are known so that files holding them still open
/// and their sizes can be validated.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

/// Elements per K-quant super-block.
const QK_K: usize = 256;

impl GgmlType {
    /// The types [`dequantize`] handles.
    pub const SUPPORTED: [GgmlType; 13] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    pub fn from_id(id: u32) -> Option<GgmlType> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            16 => IQ2_XXS,
            17 => IQ2_XS,
            18 => IQ3_XXS,
            19 => IQ1_S,
            20 => IQ4_NL,
            21 => IQ3_S,
            22 => IQ2_S,
            23 => IQ4_XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1_M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            IQ2_XXS => "IQ2_XXS",
            IQ2_XS => "IQ2_XS",
            IQ3_XXS => "IQ3_XXS",
            IQ1_S => "IQ1_S",
            IQ4_NL => "IQ4_NL",
            IQ3_S => "IQ3_S",
            IQ2_S => "IQ2_S",
            IQ4_XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1_M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
        }
    }

    /// (elements per block, bytes per block), as in ggml's type traits.
    pub fn block_layout(self) -> (usize, usize) {
        use GgmlType::*;
        match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            F64 | I64 => (1, 8),
            I8 => (1, 1),
            Q4_0 => (32, 2 + 16),
            Q4_1 => (32, 2 + 2 + 16),
            Q5_0 => (32, 2 + 4 + 16),
            Q5_1 => (32, 2 + 2 + 4 + 16),
            Q8_0 => (32, 2 + 32),
            Q8_1 => (32, 4 + 4 + 32),
            Q2_K => (QK_K, 2 + 2 + QK_K / 16 + QK_K / 4),
            Q3_K => (QK_K, 2 + QK_K / 4 + QK_K / 8 + 12),
            Q4_K => (QK_K, 2 + 2 + QK_K / 2 + 12),
            Q5_K => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 8 + 12),
            Q6_K => (QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16),
            Q8_K => (QK_K, 4 + QK_K + QK_K / 8),
            IQ2_XXS => (QK_K, 2 + QK_K / 4),
            IQ2_XS => (QK_K, 2 + QK_K / 4 + QK_K / 32),
            IQ3_XXS => (QK_K, 2 + QK_K / 4 + QK_K / 8),
            IQ1_S => (QK_K, 2 + QK_K / 8 + QK_K / 16),
            IQ4_NL => (32, 2 + 16),
            IQ3_S => (QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4),
            IQ2_S => (QK_K, 2 + QK_K / 4 + QK_K / 16),
            IQ4_XS => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 64),
            IQ1_M => (QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),
            TQ1_0 => (QK_K, 2 + 4 * 13),
            TQ2_0 => (QK_K, 2 + 64),
            MXFP4 => (32, 1 + 16),
        }
    }

    pub fn is_supported(self) -> bool {
        Self::SUPPORTED.contains(&self)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn supported_list() -> String {
    GgmlType::SUPPORTED
        .iter()
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join(", ")
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

/// Bounds-checked little-endian reader over the file's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
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

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut by_name = HashMap::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = cur.string(&|| format!("the name of tensor {i}"))?;
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

    /// The Hugging Face `config.json` equivalent to this GGUF (llama and qwen2).
    pub fn hf_config(&self) -> Result<Value> {
        let arch = self.known_architecture()?;
        let k = |suffix: &str| format!("{}.{suffix}", arch.prefix);
        let hidden = self.require_u64(&k("embedding_length"))?;
        let n_head = self.require_u64(&k("attention.head_count"))?;
        if n_head == 0 {
            return Err(Error::format(
                &self.path,
                format!("{} is 0", k("attention.head_count")),
            ));
        }
        let n_kv = self
            .head_count_kv(&k("attention.head_count_kv"))?
            .unwrap_or(n_head);
        let head_dim = self
            .get_u64(&k("attention.key_length"))
            .or_else(|| {
                if arch.model_type == "llama" {
                    self.get_u64(&k("rope.dimension_count"))
                } else {
                    None
                }
            })
            .unwrap_or(hidden / n_head);
        let vocab_size = match self.get_u64(&k("vocab_size")) {
            Some(v) => v,
            None => match self.get_array("tokenizer.ggml.tokens") {
                Some(tokens) => tokens.len() as u64,
                None => self
                    .tensor_info("token_embd.weight")
                    .and_then(|t| t.dims.get(1).copied())
                    .ok_or_else(|| {
                        Error::format(&self.path, "cannot tell the vocabulary size: no vocab_size, token list or token_embd")
                    })?,
            },
        };
        let eps = self
            .get_f64(&k("attention.layer_norm_rms_epsilon"))
            .ok_or_else(|| {
                Error::format(
                    &self.path,
                    format!(
                        "metadata key `{}` is missing or not a number",
                        k("attention.layer_norm_rms_epsilon")
                    ),
                )
            })?;
        let has_bias = self.tensor_info("blk.0.attn_q.bias").is_some();

        let mut c = Map::new();
        c.insert("architectures".into(), json!([arch.hf_class]));
        c.insert("model_type".into(), json!(arch.model_type));
        c.insert("hidden_size".into(), json!(hidden));
        c.insert(
            "intermediate_size".into(),
            json!(self.require_u64(&k("feed_forward_length"))?),
        );
        c.insert(
            "num_hidden_layers".into(),
            json!(self.require_u64(&k("block_count"))?),
        );
        c.insert("num_attention_heads".into(), json!(n_head));
        c.insert("num_key_value_heads".into(), json!(n_kv));
        if arch.model_type == "llama" || head_dim != hidden / n_head {
            c.insert("head_dim".into(), json!(head_dim));
        }
        c.insert("hidden_act".into(), json!("silu"));
        c.insert("rms_norm_eps".into(), json!(eps));
        c.insert(
            "rope_theta".into(),
            json!(self.get_f64(&k("rope.freq_base")).unwrap_or(10000.0)),
        );
        if let Some(ctx) = self.get_u64(&k("context_length")) {
            c.insert("max_position_embeddings".into(), json!(ctx));
        }
        c.insert("vocab_size".into(), json!(vocab_size));
        c.insert(
            "tie_word_embeddings".into(),
            json!(self.tensor_info("output.weight").is_none()),
        );
        if arch.model_type == "llama" {
            c.insert("attention_bias".into(), json!(has_bias));
            c.insert("mlp_bias".into(), json!(false));
        }
        for (gguf_key, hf_key) in [
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
            ("tokenizer.ggml.padding_token_id", "pad_token_id"),
        ] {
            if let Some(id) = self.get_u64(gguf_key) {
                c.insert(hf_key.into(), json!(id));
            }
        }
        if let Some(scaling) = self.rope_scaling(arch.prefix, head_dim)? {
            c.insert("rope_scaling".into(), scaling);
        }
        c.insert("torch_dtype".into(), json!("float32"));
        Ok(Value::Object(c))
    }

    fn known_architecture(&self) -> Result<&'static Arch> {
        let name = self.architecture().ok_or_else(|| {
            Error::format(&self.path, "metadata key `general.architecture` is missing")
        })?;
        ARCHITECTURES
            .iter()
            .find(|a| a.prefix == name)
            .ok_or_else(|| {
                let known: Vec<_> = ARCHITECTURES.iter().map(|a| a.prefix).collect();
                Error::Unsupported(format!(
                    "{}: GGUF architecture `{name}` is not supported (supported: {})",
                    self.path.display(),
                    known.join(", ")
                ))
            })
    }

    /// `head_count_kv` may be one number or one per layer; per-layer values must agree.
    fn head_count_kv(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Array(items)) => {
                let values: Option<Vec<u64>> = items.iter().map(GgufValue::as_u64).collect();
                match values.as_deref() {
                    Some([first, rest @ ..]) if rest.iter().all(|v| v == first) => Ok(Some(*first)),
                    _ => Err(Error::format(
                        &self.path,
                        format!("`{key}` varies per layer; not supported"),
                    )),
                }
            }
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                Error::format(
                    &self.path,
                    format!("`{key}` should be an integer, found {v:?}"),
                )
            }),
        }
    }

    /// `rope_scaling` from `{arch}.rope.scaling.*` (or the older `rope.scale_linear`); for
    /// Llama 3.x, whose converter stores a `rope_freqs` tensor instead, the standard llama3
    /// parameters are recovered and checked against that tensor.
    fn rope_scaling(&self, prefix: &str, head_dim: u64) -> Result<Option<Value>> {
        let k = |suffix: &str| format!("{prefix}.{suffix}");
        if let Some(kind) = self.get_str(&k("rope.scaling.type")) {
            if kind == "none" {
                return Ok(None);
            }
            let factor = self.get_f64(&k("rope.scaling.factor")).ok_or_else(|| {
                Error::format(
                    &self.path,
                    format!(
                        "`{}` is `{kind}` but `{}` is missing",
                        k("rope.scaling.type"),
                        k("rope.scaling.factor")
                    ),
                )
            })?;
            let mut s = Map::new();
            s.insert("rope_type".into(), json!(kind));
            s.insert("factor".into(), json!(factor));
            if let Some(orig) = self.get_u64(&k("rope.scaling.original_context_length")) {
                s.insert("original_max_position_embeddings".into(), json!(orig));
            }
            return Ok(Some(Value::Object(s)));
        }
        if let Some(factor) = self.get_f64(&k("rope.scale_linear")) {
            if factor != 1.0 {
                return Ok(Some(json!({"rope_type": "linear", "factor": factor})));
            }
        }
        if self.tensor_info("rope_freqs.weight").is_some() {
            let theta = self.get_f64(&k("rope.freq_base")).unwrap_or(10000.0);
            let freqs = self.dequantize("rope_freqs.weight")?;
            return match recover_llama3_rope(&freqs, theta, head_dim) {
                Some(v) => Ok(Some(v)),
                None => Err(Error::tensor(
                    &self.path,
                    "rope_freqs.weight",
                    "RoPE frequency factors do not match llama3 scaling with the standard parameters \
                     (low_freq_factor 1, high_freq_factor 4, original context 8192); not supported",
                )),
            };
        }
        Ok(None)
    }
}

/// Llama 3.x scaling divides each RoPE frequency by a factor: 1 for short wavelengths,
/// `factor` for long ones, a smooth blend between. Given the stored divisors, find `factor`
/// (the largest divisor) and confirm the standard remaining parameters reproduce all of them.
fn recover_llama3_rope(divisors: &[f32], theta: f64, head_dim: u64) -> Option<Value> {
    let (low_freq_factor, high_freq_factor, original) = (1.0f64, 4.0f64, 8192.0f64);
    if divisors.is_empty() || divisors.len() as u64 * 2 != head_dim {
        return None;
    }
    let factor = divisors.iter().copied().fold(f32::MIN, f32::max) as f64;
    let low_wavelen = original / low_freq_factor;
    let high_wavelen = original / high_freq_factor;
    let all_match = divisors.iter().enumerate().all(|(i, &stored)| {
        let freq = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
        let wavelen = 2.0 * std::f64::consts::PI / freq;
        let expected = if wavelen < high_wavelen {
            1.0
        } else if wavelen > low_wavelen {
            factor
        } else {
            let smooth =
                (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
            1.0 / ((1.0 - smooth) / factor + smooth)
        };
        ((stored as f64) - expected).abs() <= 1e-4 * expected.abs().max(1.0)
    });
    all_match.then(|| {
        json!({
            "rope_type": "llama3",
            "factor": (factor as f32).to_string().parse::<f64>().unwrap_or(factor),
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original as u64,
        })
    })
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

/// Bytes a tensor of `dims` (ggml order) takes, with every overflow and block constraint checked.
fn tensor_byte_size(ty: GgmlType, dims: &[u64]) -> std::result::Result<u64, String> {
    let (block, type_size) = ty.block_layout();
    let numel = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= isize::MAX as u64)
        .ok_or_else(|| format!("dimensions {dims:?} overflow the element count"))?;
    let row = dims.first().copied().unwrap_or(1);
    if !row.is_multiple_of(block as u64) {
        return Err(format!(
            "row length {row} is not a multiple of the {ty} block size {block}"
        ));
    }
    (numel / block as u64)
        .checked_mul(type_size as u64)
        .filter(|&n| n <= isize::MAX as u64)
        .ok_or_else(|| format!("dimensions {dims:?} overflow the byte size"))
}

// ---------------------------------------------------------------------------------------------
// Dequantization. Block layouts follow ggml's `block_*` structs; the arithmetic is ordered as in
// gguf-py's reference (products first, then offsets) so results match it bit for bit.

/// Dequantize `bytes` of type `ty` into `out` (whose length gives the element count).
pub fn dequantize_into(
    ty: GgmlType,
    bytes: &[u8],
    out: &mut [f32],
) -> std::result::Result<(), String> {
    let (block, type_size) = ty.block_layout();
    if !out.len().is_multiple_of(block) || bytes.len() != out.len() / block * type_size {
        return Err(format!(
            "{} bytes of {ty} cannot hold {} values (blocks of {block} values in {type_size} bytes)",
            bytes.len(),
            out.len()
        ));
    }
    let kernel: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => deq_f32,
        GgmlType::F16 => deq_f16,
        GgmlType::BF16 => deq_bf16,
        GgmlType::Q8_0 => deq_q8_0,
        GgmlType::Q4_0 => deq_q4_0,
        GgmlType::Q4_1 => deq_q4_1,
        GgmlType::Q5_0 => deq_q5_0,
        GgmlType::Q5_1 => deq_q5_1,
        GgmlType::Q2_K => deq_q2_k,
        GgmlType::Q3_K => deq_q3_k,
        GgmlType::Q4_K => deq_q4_k,
        GgmlType::Q5_K => deq_q5_k,
        GgmlType::Q6_K => deq_q6_k,
        other => {
            return Err(format!(
                "unsupported GGUF tensor type {other} (supported: {})",
                supported_list()
            ))
        }
    };
    // The plain float kernels take any whole number of elements; the block kernels one block.
    let elems_per_call = if block == 1 { 4096 } else { block };
    let calls_per_task = (1 << 16) / elems_per_call;
    let task_elems = (elems_per_call * calls_per_task).max(block);
    let task_bytes = task_elems / block * type_size;
    let run = |(src, dst): (&[u8], &mut [f32])| {
        if block == 1 {
            kernel(src, dst);
        } else {
            for (b, y) in src.chunks_exact(type_size).zip(dst.chunks_exact_mut(block)) {
                kernel(b, y);
            }
        }
    };
    if out.len() <= task_elems {
        run((bytes, out));
    } else {
        bytes
            .par_chunks(task_bytes)
            .zip(out.par_chunks_mut(task_elems))
            .for_each(run);
    }
    Ok(())
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn deq_f32(b: &[u8], y: &mut [f32]) {
    for (c, v) in b.chunks_exact(4).zip(y) {
        *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

fn deq_f16(b: &[u8], y: &mut [f32]) {
    for (c, v) in b.chunks_exact(2).zip(y) {
        *v = f16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}

fn deq_bf16(b: &[u8], y: &mut [f32]) {
    for (c, v) in b.chunks_exact(2).zip(y) {
        *v = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
    }
}

/// d: f16, qs: 32 × i8.
fn deq_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (v, &q) in y.iter_mut().zip(&b[2..34]) {
        *v = (q as i8 as f32) * d;
    }
}

/// d: f16, qs: 16 bytes; element i < 16 is the low nibble of byte i, element 16 + i its high
/// nibble; value d·(q − 8).
fn deq_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for i in 0..16 {
        y[i] = d * ((qs[i] & 0x0F) as i32 - 8) as f32;
        y[i + 16] = d * ((qs[i] >> 4) as i32 - 8) as f32;
    }
}

/// d, m: f16, qs as Q4_0; value d·q + m.
fn deq_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for i in 0..16 {
        y[i] = d * (qs[i] & 0x0F) as f32 + m;
        y[i + 16] = d * (qs[i] >> 4) as f32 + m;
    }
}

/// d: f16, qh: u32 holding bit 4 of element i at bit i, qs as Q4_0; value d·(q − 16).
fn deq_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for i in 0..16 {
        let lo = (qs[i] & 0x0F) | ((((qh >> i) & 1) as u8) << 4);
        let hi = (qs[i] >> 4) | ((((qh >> (i + 16)) & 1) as u8) << 4);
        y[i] = d * (lo as i32 - 16) as f32;
        y[i + 16] = d * (hi as i32 - 16) as f32;
    }
}

/// d, m: f16, then qh and qs as Q5_0; value d·q + m.
fn deq_q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for i in 0..16 {
        let lo = (qs[i] & 0x0F) | ((((qh >> i) & 1) as u8) << 4);
        let hi = (qs[i] >> 4) | ((((qh >> (i + 16)) & 1) as u8) << 4);
        y[i] = d * lo as f32 + m;
        y[i + 16] = d * hi as f32 + m;
    }
}

/// scales: 16 bytes (low nibble scale, high nibble min, one per 16 elements), qs: 64 bytes of
/// 2-bit values, d, dmin: f16. Each 32-byte half of qs covers 128 elements: element
/// 128·h + 32·s + l is bits 2s..2s+2 of byte 32·h + l. Value (d·sc)·q − dmin·m.
fn deq_q2_k(b: &[u8], y: &mut [f32]) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    for h in 0..2 {
        for s in 0..4 {
            for l in 0..32 {
                let idx = 128 * h + 32 * s + l;
                let sc = scales[idx / 16];
                let dl = d * (sc & 0x0F) as f32;
                let ml = dmin * (sc >> 4) as f32;
                let q = (qs[32 * h + l] >> (2 * s)) & 3;
                y[idx] = dl * q as f32 - ml;
            }
        }
    }
}

/// hmask: 32 bytes (element 32·j + l has its high bit at bit j of byte l; a clear bit means
/// subtract 4), qs: 64 bytes of 2-bit values laid out as in Q2_K, scales: 12 bytes packing
/// sixteen 6-bit signed scales (offset 32), d: f16. Value (d·scale)·q.
fn deq_q3_k(b: &[u8], y: &mut [f32]) {
    let hmask = &b[0..32];
    let qs = &b[32..96];
    let packed = &b[96..108];
    let d = f16_at(b, 108);
    let mut dl = [0f32; 16];
    for (i, v) in dl.iter_mut().enumerate() {
        // Low 4 bits: nibble i/8 of byte i%8; high 2 bits: bits 2·(i/4).. of byte 8 + i%4.
        let low = (packed[i % 8] >> (4 * (i / 8))) & 0x0F;
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 0x03;
        let scale = (low | (high << 4)) as i32 - 32;
        *v = d * scale as f32;
    }
    for h in 0..2 {
        for s in 0..4 {
            for l in 0..32 {
                let idx = 128 * h + 32 * s + l;
                let low = ((qs[32 * h + l] >> (2 * s)) & 3) as i32;
                let high_clear = (hmask[l] >> (idx / 32)) & 1 == 0;
                let q = low - if high_clear { 4 } else { 0 };
                y[idx] = dl[idx / 16] * q as f32;
            }
        }
    }
}

/// Eight 6-bit (scale, min) pairs packed in 12 bytes, shared by Q4_K and Q5_K.
#[inline]
fn k_scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// d, dmin: f16, scales: 12 bytes, qs: 128 bytes; each 32-byte quarter of qs covers 64
/// elements (low nibbles, then high nibbles), one (scale, min) pair per 32 elements.
/// Value (d·sc)·q − dmin·m.
fn deq_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for j in 0..8 {
        let (sc, m) = k_scale_min(scales, j);
        let dl = d * sc as f32;
        let ml = dmin * m as f32;
        let bytes = &qs[32 * (j / 2)..32 * (j / 2) + 32];
        let shift = 4 * (j % 2);
        for (l, &q) in bytes.iter().enumerate() {
            y[32 * j + l] = dl * ((q >> shift) & 0x0F) as f32 - ml;
        }
    }
}

/// As Q4_K plus qh: 32 bytes giving bit 4 of element 32·j + l at bit j of byte l.
fn deq_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for j in 0..8 {
        let (sc, m) = k_scale_min(scales, j);
        let dl = d * sc as f32;
        let ml = dmin * m as f32;
        let bytes = &qs[32 * (j / 2)..32 * (j / 2) + 32];
        let shift = 4 * (j % 2);
        for (l, &q) in bytes.iter().enumerate() {
            let value = ((q >> shift) & 0x0F) | (((qh[l] >> j) & 1) << 4);
            y[32 * j + l] = dl * value as f32 - ml;
        }
    }
}

/// ql: 128 bytes of low nibbles, qh: 64 bytes of 2-bit high parts, scales: 16 × i8, d: f16.
/// Each half h covers 128 elements: element 128·h + 64·k + l (l < 64) takes nibble k of byte
/// 64·h + l of ql; element 128·h + 32·s + l (l < 32) takes bits 2s.. of byte 32·h + l of qh.
/// Value (d·scale)·(q − 32).
fn deq_q6_k(b: &[u8], y: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let scales = &b[192..208];
    let d = f16_at(b, 208);
    for h in 0..2 {
        for s in 0..4 {
            for l in 0..32 {
                let idx = 128 * h + 32 * s + l;
                let within = 32 * s + l; // 0..128 inside this half
                let low = (ql[64 * h + within % 64] >> (4 * (within / 64))) & 0x0F;
                let high = (qh[32 * h + l] >> (2 * s)) & 3;
                let q = (low | (high << 4)) as i32 - 32;
                let dl = d * (scales[idx / 16] as i8) as f32;
                y[idx] = dl * q as f32;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hugging Face view of llama-family GGUFs.

/// A GGUF architecture we can map to a Hugging Face model.
struct Arch {
    /// `general.architecture` and the metadata key prefix.
    prefix: &'static str,
    model_type: &'static str,
    hf_class: &'static str,
    /// llama.cpp's converter permutes q/k rows for llama but not for qwen2.
    permuted_qk: bool,
}

const ARCHITECTURES: &[Arch] = &[
    Arch {
        prefix: "llama",
        model_type: "llama",
        hf_class: "LlamaForCausalLM",
        permuted_qk: true,
    },
    Arch {
        prefix: "qwen2",
        model_type: "qwen2",
        hf_class: "Qwen2ForCausalLM",
        permuted_qk: false,
    },
];

/// Per-layer GGUF tensor stems and their Hugging Face module paths.
const LAYER_TENSORS: &[(&str, &str)] = &[
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
];

/// Tensors llama.cpp stores that have no Hugging Face parameter (they feed the config instead).
const NON_PARAMETER_TENSORS: &[&str] = &["rope_freqs.weight"];

fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty()
        || !layer.bytes().all(|c| c.is_ascii_digit())
        || (layer.len() > 1 && layer.starts_with('0'))
    {
        return None;
    }
    let (stem, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let (_, hf) = LAYER_TENSORS.iter().find(|(g, _)| *g == stem)?;
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

#[derive(Clone, Debug)]
struct WeightEntry {
    gguf_name: String,
    shape: Vec<usize>,
    /// Heads whose rows llama.cpp interleaved (attn_q: n_head, attn_k: n_head_kv).
    unpermute_heads: Option<usize>,
}

/// The tensors of a llama / qwen2 GGUF under Hugging Face names, dequantized to f32, with
/// llama.cpp's q/k row permutation undone.
pub struct GgufWeights {
    file: GgufFile,
    entries: BTreeMap<String, WeightEntry>,
}

impl std::fmt::Debug for GgufWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufWeights")
            .field("file", &self.file)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

impl GgufWeights {
    pub fn open(path: &Path) -> Result<GgufWeights> {
        Self::new(GgufFile::open(path)?)
    }

    pub fn new(file: GgufFile) -> Result<GgufWeights> {
        let arch = file.known_architecture()?;
        let path = file.path().to_path_buf();
        let heads = |key: &str| -> Result<Option<usize>> {
            Ok(match key {
                "attn_q" => Some(
                    file.require_u64(&format!("{}.attention.head_count", arch.prefix))? as usize,
                ),
                "attn_k" => {
                    let n_head =
                        file.require_u64(&format!("{}.attention.head_count", arch.prefix))?;
                    let kv =
                        file.head_count_kv(&format!("{}.attention.head_count_kv", arch.prefix))?;
                    Some(kv.unwrap_or(n_head) as usize)
                }
                _ => None,
            })
        };
        let mut entries = BTreeMap::new();
        for t in file.tensor_infos() {
            if NON_PARAMETER_TENSORS.contains(&t.name.as_str()) {
                continue;
            }
            let hf = hf_tensor_name(&t.name).ok_or_else(|| {
                Error::tensor(
                    &path,
                    &t.name,
                    format!(
                        "has no Hugging Face counterpart for GGUF architecture `{}`",
                        arch.prefix
                    ),
                )
            })?;
            let shape = t.shape();
            let mut unpermute_heads = None;
            if arch.permuted_qk {
                let stem = t.name.split('.').nth(2).unwrap_or("");
                if let Some(n) = heads(stem)? {
                    let rows = shape.first().copied().unwrap_or(0);
                    if n == 0 || !rows.is_multiple_of(2 * n) {
                        return Err(Error::tensor(
                            &path,
                            &t.name,
                            format!("{rows} rows cannot be split into {n} heads of even size (needed to undo llama.cpp's q/k permutation)"),
                        ));
                    }
                    unpermute_heads = Some(n);
                }
            }
            entries.insert(
                hf,
                WeightEntry {
                    gguf_name: t.name.clone(),
                    shape,
                    unpermute_heads,
                },
            );
        }
        Ok(GgufWeights { file, entries })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    pub fn hf_config(&self) -> Result<Value> {
        self.file.hf_config()
    }

    /// The GGUF tensor behind a Hugging Face name.
    pub fn gguf_name(&self, hf_name: &str) -> Option<&str> {
        self.entries.get(hf_name).map(|e| e.gguf_name.as_str())
    }
}

/// Undo llama.cpp's per-head row interleave: GGUF row `h·hd + 2i + j` (i < hd/2, j < 2) is
/// Hugging Face row `h·hd + j·hd/2 + i`.
fn unpermute_rows(values: &[f32], rows: usize, n_head: usize) -> Vec<f32> {
    let row_len = values.len() / rows;
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * head_dim + 2 * i + j) * row_len;
                let dst = (h * head_dim + j * half + i) * row_len;
                out[dst..dst + row_len].copy_from_slice(&values[src..src + row_len]);
            }
        }
    }
    out
}

impl WeightSource for GgufWeights {
    fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    fn info(&self, name: &str) -> Option<TensorInfo> {
        self.entries.get(name).map(|e| TensorInfo {
            dtype: DType::F32,
            shape: e.shape.clone(),
        })
    }

    fn read(&self, name: &str) -> Result<RawTensor> {
        let entry = self.entries.get(name).ok_or_else(|| {
            Error::tensor(self.file.path(), name, "no such tensor in the GGUF file")
        })?;
        let mut values = self.file.dequantize(&entry.gguf_name)?;
        if let Some(n_head) = entry.unpermute_heads {
            values = unpermute_rows(&values, entry.shape[0], n_head);
        }
        Ok(RawTensor::from_f32(entry.shape.clone(), &values))
    }

    fn file_of(&self, _name: &str) -> PathBuf {
        self.file.path().to_path_buf()
    }

    fn files(&self) -> Vec<PathBuf> {
        vec![self.file.path().to_path_buf()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_names_follow_the_llama_mapping() {
        assert_eq!(
            hf_tensor_name("blk.12.attn_output.weight").as_deref(),
            Some("model.layers.12.self_attn.o_proj.weight")
        );
        assert_eq!(
            hf_tensor_name("blk.0.attn_q.bias").as_deref(),
            Some("model.layers.0.self_attn.q_proj.bias")
        );
        assert_eq!(
            hf_tensor_name("blk.3.ffn_norm.weight").as_deref(),
            Some("model.layers.3.post_attention_layernorm.weight")
        );
        assert_eq!(hf_tensor_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_tensor_name("blk.01.attn_q.weight"), None);
        assert_eq!(hf_tensor_name("blk.0.attn_qkv.weight"), None);
        assert_eq!(hf_tensor_name("blk.0.attn_q.scale"), None);
    }

    #[test]
    fn unpermute_inverts_the_converter_permutation() {
        // The converter maps HF row h·hd + j·hd/2 + i to GGUF row h·hd + 2i + j; build a GGUF
        // layout from labelled HF rows that way and check we get the labels back in order.
        let (n_head, head_dim, row_len) = (3, 8, 2);
        let rows = n_head * head_dim;
        let hf: Vec<f32> = (0..rows * row_len).map(|v| v as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..n_head {
            for j in 0..2 {
                for i in 0..head_dim / 2 {
                    let src = (h * head_dim + j * head_dim / 2 + i) * row_len;
                    let dst = (h * head_dim + 2 * i + j) * row_len;
                    gguf[dst..dst + row_len].copy_from_slice(&hf[src..src + row_len]);
                }
            }
        }
        assert_ne!(gguf, hf);
        assert_eq!(unpermute_rows(&gguf, rows, n_head), hf);
    }

    #[test]
    fn byte_sizes_reject_overflow_and_partial_blocks() {
        assert_eq!(tensor_byte_size(GgmlType::Q4_0, &[64, 3]), Ok(3 * 2 * 18));
        assert!(tensor_byte_size(GgmlType::Q4_K, &[128, 2]).is_err());
        assert!(tensor_byte_size(GgmlType::F32, &[u64::MAX / 2, 3]).is_err());
        assert!(tensor_byte_size(GgmlType::F32, &[1 << 62, 1]).is_err());
    }
}
