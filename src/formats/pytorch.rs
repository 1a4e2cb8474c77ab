//! `pytorch_model.bin` (the zip format `torch.save` has written since PyTorch 1.6), read without
//! Python and without ever executing pickled code.
//!
//! The archive holds `<root>/data.pkl`, a pickle of the state dict in which each tensor is a call
//! to `torch._utils._rebuild_tensor_v2` on a storage given by a persistent id, and the storages
//! themselves as raw little-endian bytes in `<root>/data/<key>` (stored, not compressed).
//!
//! The pickle is interpreted by a small stack machine that knows only the opcodes torch emits
//! and only an allow-list of globals (`OrderedDict`, the tensor/parameter rebuild functions, the
//! storage types, `torch.device`, `_codecs.encode`). Those globals are never called: each one is
//! recognised by name and its effect (build a dict, describe a tensor view) is reproduced here.
//! Any other global is refused outright, so a malicious checkpoint can do nothing but fail.

use crate::error::{Error, Result};
use crate::formats::WeightSource;
use crate::tensor::{DType, RawTensor, TensorInfo};
use memmap2::Mmap;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::rc::Rc;

pub const SINGLE_FILE_NAME: &str = "pytorch_model.bin";
pub const INDEX_FILE_NAME: &str = "pytorch_model.bin.index.json";

// ---------------------------------------------------------------------------------------------
// Minimal zip reader: torch writes every entry uncompressed ("stored"), so no inflate is needed.

#[derive(Clone, Copy, Debug)]
struct ZipEntry {
    data_offset: usize,
    size: usize,
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;

/// Parse the central directory; returns entry name → location of its (stored) bytes.
fn read_zip_directory(path: &Path, b: &[u8]) -> Result<HashMap<String, ZipEntry>> {
    let corrupt = |msg: &str| Error::format(path, format!("corrupt zip archive: {msg}"));
    // End of central directory: 22 bytes plus a comment of up to 65535 bytes, at the very end.
    if b.len() < 22 {
        return Err(corrupt(
            "too short for an end-of-central-directory record (truncated?)",
        ));
    }
    let lowest = b.len().saturating_sub(22 + 65535);
    let eocd = (lowest..=b.len() - 22)
        .rev()
        .find(|&i| le_u32(b, i) == Some(EOCD_SIG))
        .ok_or_else(|| corrupt("no end-of-central-directory record (truncated?)"))?;
    let mut count = le_u16(b, eocd + 10).unwrap_or(0) as u64;
    let mut cd_size = le_u32(b, eocd + 12).unwrap_or(0) as u64;
    let mut cd_offset = le_u32(b, eocd + 16).unwrap_or(0) as u64;
    if eocd >= 20 && le_u32(b, eocd - 20) == Some(ZIP64_LOCATOR_SIG) {
        let rec = le_u64(b, eocd - 20 + 8).ok_or_else(|| corrupt("bad zip64 locator"))?;
        let rec = usize::try_from(rec).map_err(|_| corrupt("bad zip64 locator"))?;
        if le_u32(b, rec) != Some(ZIP64_EOCD_SIG) {
            return Err(corrupt(
                "zip64 locator does not point at a zip64 end-of-central-directory record",
            ));
        }
        count = le_u64(b, rec + 32).ok_or_else(|| corrupt("truncated zip64 record"))?;
        cd_size = le_u64(b, rec + 40).ok_or_else(|| corrupt("truncated zip64 record"))?;
        cd_offset = le_u64(b, rec + 48).ok_or_else(|| corrupt("truncated zip64 record"))?;
    } else if count == 0xFFFF || cd_size == 0xFFFF_FFFF || cd_offset == 0xFFFF_FFFF {
        return Err(corrupt("zip64 values announced but no zip64 locator found"));
    }
    let cd_end = cd_offset
        .checked_add(cd_size)
        .filter(|&e| e <= b.len() as u64);
    if cd_end.is_none() {
        return Err(corrupt(
            "central directory lies outside the file (truncated?)",
        ));
    }
    let mut at = cd_offset as usize;
    let mut entries = HashMap::new();
    for _ in 0..count {
        if le_u32(b, at) != Some(CENTRAL_SIG) {
            return Err(corrupt("bad central directory entry"));
        }
        let field =
            |off: usize| le_u16(b, at + off).ok_or_else(|| corrupt("truncated central directory"));
        let flags = field(8)?;
        let method = field(10)?;
        let mut csize =
            le_u32(b, at + 20).ok_or_else(|| corrupt("truncated central directory"))? as u64;
        let mut usize_ =
            le_u32(b, at + 24).ok_or_else(|| corrupt("truncated central directory"))? as u64;
        let name_len = field(28)? as usize;
        let extra_len = field(30)? as usize;
        let comment_len = field(32)? as usize;
        let mut local =
            le_u32(b, at + 42).ok_or_else(|| corrupt("truncated central directory"))? as u64;
        let name_bytes = b
            .get(at + 46..at + 46 + name_len)
            .ok_or_else(|| corrupt("truncated entry name"))?;
        let name = String::from_utf8_lossy(name_bytes).into_owned();
        let extra = b
            .get(at + 46 + name_len..at + 46 + name_len + extra_len)
            .ok_or_else(|| corrupt("truncated extra field"))?;
        // The zip64 extra field holds, in order, only the values whose 32-bit slot is saturated.
        let mut e = 0;
        while e + 4 <= extra.len() {
            let id = le_u16(extra, e).unwrap_or(0);
            let len = le_u16(extra, e + 2).unwrap_or(0) as usize;
            let body = extra
                .get(e + 4..e + 4 + len)
                .ok_or_else(|| corrupt("truncated extra field"))?;
            if id == 0x0001 {
                let mut p = 0;
                let mut take = |slot: &mut u64| -> Result<()> {
                    if *slot == 0xFFFF_FFFF {
                        *slot = le_u64(body, p)
                            .ok_or_else(|| corrupt("truncated zip64 extra field"))?;
                        p += 8;
                    }
                    Ok(())
                };
                take(&mut usize_)?;
                take(&mut csize)?;
                take(&mut local)?;
            }
            e += 4 + len;
        }
        if flags & 1 != 0 {
            return Err(Error::format(
                path,
                format!("zip entry `{name}` is encrypted"),
            ));
        }
        if method != 0 {
            return Err(Error::format(
                path,
                format!("zip entry `{name}` is compressed (method {method}); torch.save writes stored entries only"),
            ));
        }
        if csize != usize_ {
            return Err(corrupt(&format!(
                "stored entry `{name}` has differing sizes"
            )));
        }
        let local = usize::try_from(local).map_err(|_| corrupt("entry offset too large"))?;
        if le_u32(b, local) != Some(LOCAL_SIG) {
            return Err(corrupt(&format!(
                "entry `{name}` has no local header (truncated?)"
            )));
        }
        let lname =
            le_u16(b, local + 26).ok_or_else(|| corrupt("truncated local header"))? as usize;
        let lextra =
            le_u16(b, local + 28).ok_or_else(|| corrupt("truncated local header"))? as usize;
        let data_offset = local + 30 + lname + lextra;
        let size = usize::try_from(usize_).map_err(|_| corrupt("entry too large"))?;
        if data_offset
            .checked_add(size)
            .is_none_or(|end| end > b.len())
        {
            return Err(Error::format(
                path,
                format!("zip entry `{name}` runs past the end of the file (truncated?)"),
            ));
        }
        entries.insert(name, ZipEntry { data_offset, size });
        at += 46 + name_len + extra_len + comment_len;
    }
    Ok(entries)
}

// ---------------------------------------------------------------------------------------------
// Restricted unpickler

/// The only globals a state dict may reference. Each is recognised, never called.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    Storage(DType),
    Device,
    CodecsEncode,
}

fn resolve_global(module: &str, name: &str) -> Result<Global, String> {
    let storage = |d| Ok(Global::Storage(d));
    match (module, name) {
        ("collections", "OrderedDict") => Ok(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Ok(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_parameter") => Ok(Global::RebuildParameter),
        ("torch._utils", "_rebuild_parameter_with_state") => Ok(Global::RebuildParameterWithState),
        ("torch", "FloatStorage") => storage(DType::F32),
        ("torch", "DoubleStorage") => storage(DType::F64),
        ("torch", "HalfStorage") => storage(DType::F16),
        ("torch", "BFloat16Storage") => storage(DType::BF16),
        ("torch", "LongStorage") => storage(DType::I64),
        ("torch", "IntStorage") => storage(DType::I32),
        ("torch", "ShortStorage") => storage(DType::I16),
        ("torch", "CharStorage") => storage(DType::I8),
        ("torch", "ByteStorage") => storage(DType::U8),
        ("torch", "BoolStorage") => storage(DType::Bool),
        ("torch", "UntypedStorage") | ("torch.storage", "UntypedStorage") | ("torch.storage", "TypedStorage") => {
            storage(DType::U8)
        }
        ("torch", "device") => Ok(Global::Device),
        ("_codecs", "encode") => Ok(Global::CodecsEncode),
        _ => Err(format!(
            "refusing to load: pickle references global {module}.{name} (only tensor state dicts are read; pickled code is never executed)"
        )),
    }
}

#[derive(Clone, Debug)]
struct StorageRef {
    key: String,
    dtype: DType,
    numel: usize,
}

/// A tensor as a strided view of a storage, the way torch describes it.
#[derive(Clone, Debug)]
struct TensorRecord {
    storage: StorageRef,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

// Scalar payloads are parsed faithfully even where the weights never need them.
#[allow(dead_code)]
#[derive(Clone, Debug)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRecord>),
}

/// Dropping is iterative: a hostile pickle can nest millions of tuples with one byte each, and
/// the default recursive drop would overflow the stack.
impl Drop for Value {
    fn drop(&mut self) {
        fn take_children(v: &mut Value, work: &mut Vec<Value>) {
            match v {
                Value::Tuple(rc) => {
                    if let Some(items) = Rc::get_mut(rc) {
                        work.append(items);
                    }
                }
                Value::List(rc) => {
                    if let Some(cell) = Rc::get_mut(rc) {
                        work.append(cell.get_mut());
                    }
                }
                Value::Dict(rc) => {
                    if let Some(cell) = Rc::get_mut(rc) {
                        for (k, v) in cell.get_mut().drain(..) {
                            work.push(k);
                            work.push(v);
                        }
                    }
                }
                _ => {}
            }
        }
        let mut work = Vec::new();
        take_children(self, &mut work);
        while let Some(mut v) = work.pop() {
            take_children(&mut v, &mut work);
        }
    }
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
    fn items(&self) -> Option<Vec<Value>> {
        match self {
            Value::Tuple(t) => Some(t.as_ref().clone()),
            Value::List(l) => Some(l.borrow().clone()),
            _ => None,
        }
    }
    fn as_usize(&self) -> Option<usize> {
        match self {
            Value::Int(i) => usize::try_from(*i).ok(),
            _ => None,
        }
    }
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    storages: HashMap<String, Rc<StorageRef>>,
}

type VmResult<T> = std::result::Result<T, String>;

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Unpickler {
            data,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            storages: HashMap::new(),
        }
    }

    fn take(&mut self, n: usize) -> VmResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or("pickle ends unexpectedly (truncated?)")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> VmResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> VmResult<u16> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().map_err(|_| "short read")?,
        ))
    }
    fn u32(&mut self) -> VmResult<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| "short read")?,
        ))
    }
    fn u64(&mut self) -> VmResult<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| "short read")?,
        ))
    }
    fn len_u64(&mut self) -> VmResult<usize> {
        usize::try_from(self.u64()?).map_err(|_| "length too large".to_string())
    }
    fn line(&mut self) -> VmResult<&'a str> {
        let rest = &self.data[self.pos..];
        let nl = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or("pickle ends inside a text line (truncated?)")?;
        let s = std::str::from_utf8(&rest[..nl]).map_err(|_| "text line is not UTF-8")?;
        self.pos += nl + 1;
        Ok(s)
    }
    fn pop(&mut self) -> VmResult<Value> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("stack underflow (pop across a mark)".into());
        }
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }
    fn top(&mut self) -> VmResult<&mut Value> {
        self.stack
            .last_mut()
            .ok_or_else(|| "stack underflow".into())
    }
    fn pop_mark(&mut self) -> VmResult<Vec<Value>> {
        let m = self.marks.pop().ok_or("no mark on the stack")?;
        if m > self.stack.len() {
            return Err("mark beyond the stack".into());
        }
        Ok(self.stack.split_off(m))
    }
    fn memo_put(&mut self, key: u64) -> VmResult<()> {
        let v = self
            .stack
            .last()
            .ok_or("memo put on an empty stack")?
            .clone();
        self.memo.insert(key, v);
        Ok(())
    }
    fn memo_get(&mut self, key: u64) -> VmResult<()> {
        let v = self
            .memo
            .get(&key)
            .ok_or_else(|| format!("memo key {key} is unset"))?
            .clone();
        self.stack.push(v);
        Ok(())
    }
    fn push_global(&mut self, module: &str, name: &str) -> VmResult<()> {
        self.stack
            .push(Value::Global(resolve_global(module, name)?));
        Ok(())
    }
    fn int_from_le(bytes: &[u8]) -> VmResult<i64> {
        if bytes.is_empty() {
            return Ok(0);
        }
        if bytes.len() > 8 {
            return Err("integer wider than 64 bits".into());
        }
        let fill = if bytes[bytes.len() - 1] & 0x80 != 0 {
            0xFF
        } else {
            0
        };
        let mut buf = [fill; 8];
        buf[..bytes.len()].copy_from_slice(bytes);
        Ok(i64::from_le_bytes(buf))
    }

    fn run(&mut self) -> VmResult<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(format!("unsupported pickle protocol {proto}"));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a size hint only
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b')' => self.stack.push(Value::Tuple(Rc::new(Vec::new()))),
                b']' => self.stack.push(Value::List(Rc::new(RefCell::new(Vec::new())))),
                b'}' => self.stack.push(Value::Dict(Rc::new(RefCell::new(Vec::new())))),
                0x8f => self.stack.push(Value::List(Rc::new(RefCell::new(Vec::new())))), // EMPTY_SET
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                0x91 => {
                    let items = self.pop_mark()?; // FROZENSET
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n || self.marks.last().is_some_and(|&m| m > self.stack.len() - n) {
                        return Err("stack underflow in TUPLEn".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs_of(items)?;
                    self.stack.push(Value::Dict(Rc::new(RefCell::new(pairs))));
                }
                b'a' => {
                    let v = self.pop()?;
                    self.extend_top(vec![v])?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    self.extend_top(items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items_top(vec![(k, v)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs_of(items)?;
                    self.set_items_top(pairs)?;
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let v = Self::int_from_le(self.take(n)?)?;
                    self.stack.push(Value::Int(v));
                }
                0x8b => {
                    let n = self.u32()? as usize;
                    let v = Self::int_from_le(self.take(n)?)?;
                    self.stack.push(Value::Int(v));
                }
                b'I' => {
                    let line = self.line()?;
                    let v = match line {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        s => Value::Int(s.parse().map_err(|_| format!("bad INT `{s}`"))?),
                    };
                    self.stack.push(v);
                }
                b'L' => {
                    let line = self.line()?;
                    let v = line.trim_end_matches('L').parse().map_err(|_| format!("bad LONG `{line}`"))?;
                    self.stack.push(Value::Int(v));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().map_err(|_| "short read")?);
                    self.stack.push(Value::Float(v));
                }
                b'F' => {
                    let line = self.line()?;
                    let v = line.parse().map_err(|_| format!("bad FLOAT `{line}`"))?;
                    self.stack.push(Value::Float(v));
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.u32()? as usize,
                        0x8c => self.u8()? as usize,
                        _ => self.len_u64()?,
                    };
                    let s = std::str::from_utf8(self.take(n)?).map_err(|_| "string is not UTF-8")?;
                    self.stack.push(Value::Str(s.to_string()));
                }
                b'V' => {
                    let s = self.line()?.to_string();
                    self.stack.push(Value::Str(s));
                }
                b'T' | b'U' => {
                    // Python 2 byte strings: read as Latin-1 text.
                    let n = if op == b'T' { self.u32()? as usize } else { self.u8()? as usize };
                    let s = self.take(n)?.iter().map(|&c| c as char).collect();
                    self.stack.push(Value::Str(s));
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => self.u32()? as usize,
                        b'C' => self.u8()? as usize,
                        _ => self.len_u64()?,
                    };
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push_global(module, name)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(m), Value::Str(n)) = (&module, &name) else {
                        return Err("STACK_GLOBAL needs two strings".into());
                    };
                    let (m, n) = (m.clone(), n.clone());
                    self.push_global(&m, &n)?;
                }
                b'i' => {
                    // INST: class named inline, arguments since the mark.
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = resolve_global(module, name)?;
                    let args = self.pop_mark()?;
                    let v = self.call(g, args)?;
                    self.stack.push(v);
                }
                b'o' => {
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        return Err("OBJ without a class".into());
                    }
                    let cls = items.remove(0);
                    let Value::Global(g) = cls else {
                        return Err(format!("OBJ on a {}", cls.kind()));
                    };
                    let v = self.call(g, items)?;
                    self.stack.push(v);
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let Value::Global(g) = func else {
                        return Err(format!("call of a {} (not an allowed global)", func.kind()));
                    };
                    let args = args.items().ok_or("call arguments are not a tuple")?;
                    let v = self.call(g, args)?;
                    self.stack.push(v);
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let Value::Global(g) = cls else {
                        return Err(format!("NEWOBJ_EX on a {}", cls.kind()));
                    };
                    let args = args.items().ok_or("call arguments are not a tuple")?;
                    let v = self.call(g, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD sets attributes (OrderedDict._metadata, parameter state): not needed for
                    // the weights, so the state is dropped.
                    self.pop()?;
                    self.top()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.stack.push(v);
                }
                b'P' => return Err("text persistent ids (PERSID) are not used by torch.save".into()),
                b'q' => {
                    let k = self.u8()? as u64;
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = self.u32()? as u64;
                    self.memo_put(k)?;
                }
                b'p' => {
                    let k = self.line()?.parse().map_err(|_| "bad PUT index")?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = self.u8()? as u64;
                    self.memo_get(k)?;
                }
                b'j' => {
                    let k = self.u32()? as u64;
                    self.memo_get(k)?;
                }
                b'g' => {
                    let k = self.line()?.parse().map_err(|_| "bad GET index")?;
                    self.memo_get(k)?;
                }
                b'0' => {
                    if self.marks.last() == Some(&self.stack.len()) {
                        self.marks.pop();
                    } else {
                        self.pop()?;
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                0x82..=0x84 => return Err("refusing to load: pickle uses the copyreg extension registry (EXTn opcode); only tensor state dicts are read".into()),
                other => return Err(format!("unsupported pickle opcode 0x{other:02x} at byte {}", self.pos - 1)),
            }
        }
    }

    fn extend_top(&mut self, items: Vec<Value>) -> VmResult<()> {
        match self.top()? {
            Value::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            other => Err(format!("APPEND to a {}", other.kind())),
        }
    }

    fn set_items_top(&mut self, pairs: Vec<(Value, Value)>) -> VmResult<()> {
        match self.top()? {
            Value::Dict(d) => {
                let mut d = d.borrow_mut();
                for (k, v) in pairs {
                    // Later keys replace earlier ones in place, as in a Python dict.
                    match d.iter_mut().find(|(ek, _)| same_key(ek, &k)) {
                        Some(slot) => slot.1 = v,
                        None => d.push((k, v)),
                    }
                }
                Ok(())
            }
            other => Err(format!("SETITEM on a {}", other.kind())),
        }
    }

    fn persistent_load(&mut self, pid: Value) -> VmResult<Value> {
        let items = pid.items().ok_or("persistent id is not a tuple")?;
        match items.as_slice() {
            [Value::Str(tag), Value::Global(Global::Storage(dtype)), Value::Str(key), _location, numel]
                if tag == "storage" =>
            {
                let numel = numel
                    .as_usize()
                    .ok_or("storage numel is not a non-negative integer")?;
                if let Some(s) = self.storages.get(key) {
                    if s.dtype != *dtype || s.numel != numel {
                        return Err(format!(
                            "storage `{key}` is described twice with different types or sizes"
                        ));
                    }
                    return Ok(Value::Storage(s.clone()));
                }
                let s = Rc::new(StorageRef {
                    key: key.clone(),
                    dtype: *dtype,
                    numel,
                });
                self.storages.insert(key.clone(), s.clone());
                Ok(Value::Storage(s))
            }
            _ => {
                Err("persistent id is not (\"storage\", storage_type, key, location, numel)".into())
            }
        }
    }

    fn call(&mut self, g: Global, args: Vec<Value>) -> VmResult<Value> {
        match g {
            Global::OrderedDict => {
                let mut pairs = Vec::new();
                if let Some(init) = args.first() {
                    for item in init.items().ok_or("OrderedDict argument is not a list")? {
                        let kv = item
                            .items()
                            .filter(|kv| kv.len() == 2)
                            .ok_or("OrderedDict item is not a pair")?;
                        pairs.push((kv[0].clone(), kv[1].clone()));
                    }
                }
                Ok(Value::Dict(Rc::new(RefCell::new(pairs))))
            }
            Global::RebuildTensorV2 => {
                if args.len() < 4 {
                    return Err("_rebuild_tensor_v2 with too few arguments".into());
                }
                let Value::Storage(storage) = &args[0] else {
                    return Err(format!(
                        "_rebuild_tensor_v2 on a {}, not a storage",
                        args[0].kind()
                    ));
                };
                let offset = args[1]
                    .as_usize()
                    .ok_or("tensor storage offset is not a non-negative integer")?;
                let dims = |v: &Value, what: &str| -> VmResult<Vec<usize>> {
                    v.items()
                        .and_then(|xs| xs.iter().map(Value::as_usize).collect::<Option<Vec<_>>>())
                        .ok_or_else(|| {
                            format!("tensor {what} is not a tuple of non-negative integers")
                        })
                };
                let shape = dims(&args[2], "size")?;
                let stride = dims(&args[3], "stride")?;
                if shape.len() != stride.len() {
                    return Err(format!(
                        "tensor size {shape:?} and stride {stride:?} differ in length"
                    ));
                }
                Ok(Value::Tensor(Rc::new(TensorRecord {
                    storage: storage.as_ref().clone(),
                    offset,
                    shape,
                    stride,
                })))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                match args.into_iter().next() {
                    Some(t @ Value::Tensor(_)) => Ok(t),
                    _ => Err("_rebuild_parameter without a tensor".into()),
                }
            }
            Global::Device => match args.first() {
                Some(Value::Str(s)) => Ok(Value::Str(s.clone())),
                _ => Err("torch.device without a name".into()),
            },
            Global::CodecsEncode => match args.as_slice() {
                [Value::Str(s), Value::Str(enc)] if enc == "latin1" || enc == "latin-1" => {
                    let bytes = s
                        .chars()
                        .map(|c| u8::try_from(c as u32).map_err(|_| "non-Latin-1 character"))
                        .collect::<Result<Vec<u8>, _>>()?;
                    Ok(Value::Bytes(bytes))
                }
                [Value::Str(s), Value::Str(enc)] if enc == "utf-8" || enc == "utf8" => {
                    Ok(Value::Bytes(s.as_bytes().to_vec()))
                }
                [Value::Str(s)] => Ok(Value::Bytes(s.as_bytes().to_vec())),
                _ => Err("unsupported _codecs.encode call".into()),
            },
            Global::Storage(_) => Err("storage types may only appear in persistent ids".into()),
        }
    }
}

fn same_key(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Str(x), Value::Str(y)) => x == y,
        (Value::Int(x), Value::Int(y)) => x == y,
        _ => false,
    }
}

fn pairs_of(items: Vec<Value>) -> VmResult<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        return Err("odd number of items for a dict".into());
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The file

/// One `pytorch_model.bin`, memory-mapped; tensors are described at open and copied out on read.
pub struct PytorchFile {
    path: PathBuf,
    mmap: Mmap,
    /// Tensor name → view description, and names in state-dict order.
    tensors: HashMap<String, TensorRecord>,
    order: Vec<String>,
    /// Storage key → bytes location in the archive.
    storages: HashMap<String, ZipEntry>,
}

impl std::fmt::Debug for PytorchFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PytorchFile")
            .field("path", &self.path)
            .field("tensors", &self.order.len())
            .finish()
    }
}

impl PytorchFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only map; concurrent truncation by another process is the accepted mmap risk.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let bytes: &[u8] = &mmap;
        if !bytes.starts_with(b"PK\x03\x04") {
            let msg = if bytes.first() == Some(&0x80) || bytes.starts_with(b"\x8a\x0a") {
                "legacy torch.save format (PyTorch before 1.6) is not supported; re-save it with a recent torch or convert it to safetensors"
            } else if bytes.is_empty() {
                "file is empty"
            } else {
                "not a zip archive (expected the torch.save format of PyTorch 1.6 and later)"
            };
            return Err(Error::format(path, msg));
        }
        let entries = read_zip_directory(path, bytes)?;
        let pkl_names: Vec<&String> = entries
            .keys()
            .filter(|n| {
                n.strip_suffix("data.pkl")
                    .is_some_and(|root| root.ends_with('/') && root.matches('/').count() == 1)
            })
            .collect();
        let pkl_name = match pkl_names.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(Error::format(
                    path,
                    "zip archive has no `<root>/data.pkl`: not a torch.save checkpoint",
                ))
            }
            many => {
                return Err(Error::format(
                    path,
                    format!("zip archive has several data.pkl entries: {many:?}"),
                ))
            }
        };
        let root = pkl_name.trim_end_matches("data.pkl").to_string();
        let slice = |e: &ZipEntry| &bytes[e.data_offset..e.data_offset + e.size];
        if let Some(bo) = entries.get(&format!("{root}byteorder")) {
            let order = String::from_utf8_lossy(slice(bo));
            if order.trim() != "little" {
                return Err(Error::format(
                    path,
                    format!(
                        "byte order `{}` is not supported (only little-endian)",
                        order.trim()
                    ),
                ));
            }
        }
        let pickle = slice(&entries[&pkl_name]);
        let mut vm = Unpickler::new(pickle);
        let result = vm
            .run()
            .map_err(|msg| Error::format(path, format!("{pkl_name}: {msg}")))?;
        let Value::Dict(ref dict) = result else {
            return Err(Error::format(
                path,
                format!("the pickle holds a {}, not a state dict", result.kind()),
            ));
        };

        let mut tensors = HashMap::new();
        let mut order = Vec::new();
        let mut storages = HashMap::new();
        for (k, v) in dict.borrow().iter() {
            // Non-tensor entries (rare extras such as step counters) carry no weights: skipped.
            let (Value::Str(name), Value::Tensor(t)) = (k, v) else {
                continue;
            };
            let entry_name = format!("{root}data/{}", t.storage.key);
            let entry = *entries.get(&entry_name).ok_or_else(|| {
                Error::tensor(
                    path,
                    name.as_str(),
                    format!("its storage `{entry_name}` is missing from the archive"),
                )
            })?;
            check_view(t, entry.size).map_err(|msg| Error::tensor(path, name.as_str(), msg))?;
            storages.insert(t.storage.key.clone(), entry);
            if tensors.insert(name.clone(), t.as_ref().clone()).is_none() {
                order.push(name.clone());
            }
        }
        Ok(PytorchFile {
            path: path.to_path_buf(),
            mmap,
            tensors,
            order,
            storages,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Check that every element the view can touch lies inside the storage and the archive entry.
fn check_view(t: &TensorRecord, entry_bytes: usize) -> std::result::Result<(), String> {
    let elem = t.storage.dtype.size();
    let storage_bytes = t
        .storage
        .numel
        .checked_mul(elem)
        .ok_or("storage size overflows")?;
    if storage_bytes > entry_bytes {
        return Err(format!(
            "storage `{}` should hold {} elements ({storage_bytes} bytes) but its archive entry has {entry_bytes} bytes (truncated?)",
            t.storage.key, t.storage.numel
        ));
    }
    if t.shape.contains(&0) {
        return Ok(());
    }
    let mut last = t.offset;
    for (&d, &s) in t.shape.iter().zip(&t.stride) {
        last = (d - 1)
            .checked_mul(s)
            .and_then(|x| x.checked_add(last))
            .ok_or("view extent overflows")?;
    }
    if last >= t.storage.numel {
        return Err(format!(
            "view (offset {}, size {:?}, stride {:?}) reaches element {last} of a {}-element storage",
            t.offset, t.shape, t.stride, t.storage.numel
        ));
    }
    Ok(())
}

/// Copy a strided view into a contiguous row-major buffer.
fn gather(storage: &[u8], t: &TensorRecord) -> Vec<u8> {
    let elem = t.storage.dtype.size();
    let numel: usize = t.shape.iter().product();
    let mut contiguous_stride = vec![1usize; t.shape.len()];
    for i in (0..t.shape.len().saturating_sub(1)).rev() {
        contiguous_stride[i] = contiguous_stride[i + 1] * t.shape[i + 1];
    }
    let is_contiguous = t
        .shape
        .iter()
        .zip(&t.stride)
        .zip(&contiguous_stride)
        .all(|((&d, &s), &c)| d <= 1 || s == c);
    // An empty view reads nothing, whatever its offset (check_view does not bound it).
    if numel == 0 {
        return Vec::new();
    }
    if is_contiguous {
        let start = t.offset * elem;
        return storage[start..start + numel * elem].to_vec();
    }
    let mut out = Vec::with_capacity(numel * elem);
    let rank = t.shape.len();
    let mut index = vec![0usize; rank];
    let mut src = t.offset;
    for _ in 0..numel {
        out.extend_from_slice(&storage[src * elem..(src + 1) * elem]);
        // Odometer increment, keeping `src` in step with the index.
        for ax in (0..rank).rev() {
            index[ax] += 1;
            src += t.stride[ax];
            if index[ax] < t.shape[ax] {
                break;
            }
            src -= t.stride[ax] * t.shape[ax];
            index[ax] = 0;
        }
    }
    out
}

impl WeightSource for PytorchFile {
    fn names(&self) -> Vec<String> {
        self.order.clone()
    }
    fn info(&self, name: &str) -> Option<TensorInfo> {
        let t = self.tensors.get(name)?;
        Some(TensorInfo {
            dtype: t.storage.dtype,
            shape: t.shape.clone(),
        })
    }
    fn read(&self, name: &str) -> Result<RawTensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::tensor(&self.path, name, "not in this file"))?;
        let entry = self.storages[&t.storage.key];
        let storage = &self.mmap[entry.data_offset..entry.data_offset + entry.size];
        RawTensor::new(t.storage.dtype, t.shape.clone(), gather(storage, t))
            .map_err(|e| Error::tensor(&self.path, name, e.to_string()))
    }
    fn file_of(&self, _name: &str) -> PathBuf {
        self.path.clone()
    }
    fn files(&self) -> Vec<PathBuf> {
        vec![self.path.clone()]
    }
}

/// A checkpoint split over several `.bin` files, described by `pytorch_model.bin.index.json`.
pub type ShardedPytorch = crate::formats::ShardedWeights<PytorchFile>;

impl ShardedPytorch {
    pub fn open_index(index_path: &Path) -> Result<Self> {
        Self::open(index_path, PytorchFile::open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pickle: &[u8]) -> VmResult<Value> {
        Unpickler::new(pickle).run()
    }

    #[test]
    fn refuses_any_other_global() {
        // protocol 2: GLOBAL 'posix system', then a call.
        let p = b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.";
        let err = run(p).unwrap_err();
        assert!(
            err.contains("refusing to load: pickle references global posix.system"),
            "{err}"
        );
        let p = b"\x80\x04\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94.";
        let err = run(p).unwrap_err();
        assert!(err.contains("global builtins.eval"), "{err}");
    }

    #[test]
    fn deeply_nested_pickle_does_not_overflow_the_stack() {
        let mut p = b"\x80\x02N".to_vec();
        p.extend(std::iter::repeat_n(0x85u8, 2_000_000)); // TUPLE1, two million times
        p.push(b'.');
        let v = run(&p).unwrap();
        assert!(matches!(v, Value::Tuple(_)));
        drop(v);
        // Same through lists: EMPTY_LIST, then (EMPTY_LIST, APPEND) pairs nest nothing, so use
        // MARK ... LIST wrapping instead.
        let mut p = b"\x80\x02N".to_vec();
        for _ in 0..500_000 {
            p.extend_from_slice(b"(");
        }
        p.push(b'N');
        for _ in 0..500_000 {
            p.push(b'l');
        }
        p.push(b'.');
        assert!(run(&p).is_ok());
    }

    #[test]
    fn truncated_pickle_is_an_error() {
        assert!(run(b"\x80\x02}q\x00(X\x05\x00\x00\x00ab").is_err());
        assert!(run(b"").is_err());
    }

    #[test]
    fn gather_transposed_view() {
        // storage [0..6) as 2x3, viewed transposed as 3x2 with stride (1, 3).
        let storage: Vec<u8> = (0..6u8).collect();
        let t = TensorRecord {
            storage: StorageRef {
                key: "0".into(),
                dtype: DType::U8,
                numel: 6,
            },
            offset: 0,
            shape: vec![3, 2],
            stride: vec![1, 3],
        };
        assert_eq!(gather(&storage, &t), vec![0, 3, 1, 4, 2, 5]);
        assert!(check_view(&t, 6).is_ok());
        let out_of_range = TensorRecord {
            offset: 1,
            ..t.clone()
        };
        assert!(check_view(&out_of_range, 6).is_err());
    }

    /// A hand-built zip64 archive (every size and offset moved to the zip64 fields) must read.
    #[test]
    fn reads_zip64_directory() {
        let name = b"archive/data/0";
        let payload = b"abcd";
        let mut z = Vec::new();
        // local header with a zip64 extra field
        z.extend_from_slice(&LOCAL_SIG.to_le_bytes());
        z.extend_from_slice(&[45, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        z.extend_from_slice(&u32::MAX.to_le_bytes());
        z.extend_from_slice(&u32::MAX.to_le_bytes());
        z.extend_from_slice(&(name.len() as u16).to_le_bytes());
        z.extend_from_slice(&20u16.to_le_bytes());
        z.extend_from_slice(name);
        z.extend_from_slice(&1u16.to_le_bytes());
        z.extend_from_slice(&16u16.to_le_bytes());
        z.extend_from_slice(&4u64.to_le_bytes());
        z.extend_from_slice(&4u64.to_le_bytes());
        z.extend_from_slice(payload);
        let cd_start = z.len();
        z.extend_from_slice(&CENTRAL_SIG.to_le_bytes());
        z.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        z.extend_from_slice(&u32::MAX.to_le_bytes()); // compressed
        z.extend_from_slice(&u32::MAX.to_le_bytes()); // uncompressed
        z.extend_from_slice(&(name.len() as u16).to_le_bytes());
        z.extend_from_slice(&28u16.to_le_bytes()); // extra len
        z.extend_from_slice(&[0u8; 8]); // comment len, disk, internal attr, external attr (part)
        z.extend_from_slice(&[0u8; 2]);
        z.extend_from_slice(&u32::MAX.to_le_bytes()); // local header offset
        z.extend_from_slice(name);
        z.extend_from_slice(&1u16.to_le_bytes());
        z.extend_from_slice(&24u16.to_le_bytes());
        z.extend_from_slice(&4u64.to_le_bytes());
        z.extend_from_slice(&4u64.to_le_bytes());
        z.extend_from_slice(&0u64.to_le_bytes());
        let cd_size = z.len() - cd_start;
        let zip64_eocd = z.len();
        z.extend_from_slice(&ZIP64_EOCD_SIG.to_le_bytes());
        z.extend_from_slice(&44u64.to_le_bytes());
        z.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        z.extend_from_slice(&1u64.to_le_bytes());
        z.extend_from_slice(&1u64.to_le_bytes());
        z.extend_from_slice(&(cd_size as u64).to_le_bytes());
        z.extend_from_slice(&(cd_start as u64).to_le_bytes());
        z.extend_from_slice(&ZIP64_LOCATOR_SIG.to_le_bytes());
        z.extend_from_slice(&0u32.to_le_bytes());
        z.extend_from_slice(&(zip64_eocd as u64).to_le_bytes());
        z.extend_from_slice(&1u32.to_le_bytes());
        z.extend_from_slice(&EOCD_SIG.to_le_bytes());
        z.extend_from_slice(&[0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF]);
        z.extend_from_slice(&u32::MAX.to_le_bytes());
        z.extend_from_slice(&u32::MAX.to_le_bytes());
        z.extend_from_slice(&0u16.to_le_bytes());
        let dir = read_zip_directory(Path::new("t.bin"), &z).unwrap();
        let e = dir["archive/data/0"];
        assert_eq!(&z[e.data_offset..e.data_offset + e.size], payload);
        // Cut inside the central directory: a clear error, no panic.
        assert!(read_zip_directory(Path::new("t.bin"), &z[..z.len() - 30]).is_err());
    }
}
