//! bitsandbytes checkpoints as transformers writes them (docs/formats.md §3): reading them into
//! packed kernels, the per-layer tensors a writer produces, and the factory that quantizes dense
//! layers while they load (`load_in_4bit` / `load_in_8bit`).
//!
//! 4-bit layers (`Linear4bit`) are recognised by `<p>.weight.quant_state.bitsandbytes__nf4|fp4`,
//! 8-bit layers (`Linear8bitLt`) by `<p>.SCB`; anything else loads dense (skipped modules,
//! `lm_head`). The quant state JSON decides the blocksize, shape and nesting; every tensor is
//! checked against it and errors name the file and tensor.

use crate::config::AutoConfig;
use crate::error::{Error, Result};
use crate::formats::WeightSource;
use crate::kernels::bnb::{FourBitDecode, FourBitMatrix, Int8Matrix};
use crate::kernels::LinearKernel;
use crate::nn::LinearFactory;
use crate::qtypes::bnb::{
    check_blocksize, quantize_4bit, quantize_int8, Absmax, BitsAndBytesConfig, FourBitType,
    FourBitWeight, Int8Compute, Int8Weight, NestedAbsmax,
};
use crate::tensor::WeightDType;
use crate::tensor::{DType, RawTensor};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;

/// Run-time settings read from a checkpoint's `quantization_config`.
#[derive(Clone, Debug, PartialEq)]
pub struct BnbCheckpointParams {
    /// `bnb_4bit_compute_dtype` (float32 when absent).
    pub compute_dtype: WeightDType,
    /// `llm_int8_threshold` (6.0 when absent).
    pub int8_threshold: f32,
    pub config_file: PathBuf,
}

impl BnbCheckpointParams {
    pub fn from_config(qcfg: &Value, config_file: PathBuf) -> Result<Self> {
        let bad = |msg: String| Error::format(&config_file, format!("quantization_config: {msg}"));
        let compute_dtype = match qcfg.get("bnb_4bit_compute_dtype") {
            None | Some(Value::Null) => WeightDType::F32,
            Some(Value::String(s)) => WeightDType::parse(s.trim_start_matches("torch."))
                .map_err(|e| bad(e.to_string()))?,
            Some(v) => return Err(bad(format!("bnb_4bit_compute_dtype {v} is not a string"))),
        };
        let int8_threshold = match qcfg.get("llm_int8_threshold") {
            None | Some(Value::Null) => 6.0,
            Some(v) => v
                .as_f64()
                .filter(|t| t.is_finite() && *t >= 0.0)
                .ok_or_else(|| bad(format!("llm_int8_threshold {v} is not a number ≥ 0")))?
                as f32,
        };
        if let Some(s) = qcfg.get("bnb_4bit_quant_storage").and_then(|v| v.as_str()) {
            // Other storage dtypes hold the same bytes; only the tensor dtype differs.
            if !matches!(
                s,
                "uint8" | "int8" | "float16" | "bfloat16" | "float32" | "torch.uint8"
            ) {
                return Err(bad(format!(
                    "bnb_4bit_quant_storage `{s}` is not supported"
                )));
            }
        }
        if qcfg
            .get("llm_int8_has_fp16_weight")
            .and_then(|v| v.as_bool())
            == Some(true)
        {
            return Err(Error::Unsupported(format!(
                "{}: llm_int8_has_fp16_weight=true checkpoints keep float weights and are not \
                 bitsandbytes-serialized; load the original model instead",
                config_file.display()
            )));
        }
        Ok(BnbCheckpointParams {
            compute_dtype,
            int8_threshold,
            config_file,
        })
    }
}

struct BnbFactory {
    params: BnbCheckpointParams,
    decode: FourBitDecode,
}

/// Builds the packed linear layers of a checkpoint whose `quantization_config` is `qcfg`;
/// 4-bit layers decode with `decode`.
pub fn linear_factory(
    config: &AutoConfig,
    qcfg: &Value,
    decode: FourBitDecode,
) -> Result<Box<dyn LinearFactory>> {
    let file = config
        .source
        .clone()
        .unwrap_or_else(|| PathBuf::from("config.json"));
    Ok(Box::new(BnbFactory {
        params: BnbCheckpointParams::from_config(qcfg, file)?,
        decode,
    }))
}

impl LinearFactory for BnbFactory {
    fn load_linear(
        &self,
        src: &dyn WeightSource,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        _conv1d: bool,
    ) -> Result<Option<Arc<dyn LinearKernel>>> {
        // transformers quantizes Conv1D weights after transposing them, so both layouts are
        // stored as [out, in].
        if let Some(q) = read_four_bit(src, prefix, out_features, in_features)? {
            let name = format!("{prefix}.weight");
            let k = FourBitMatrix::new(q, self.params.compute_dtype)
                .map_err(|e| Error::tensor(src.file_of(&name), name, e.to_string()))?
                .with_decode(self.decode);
            return Ok(Some(Arc::new(k)));
        }
        if let Some(q) = read_int8(src, prefix, out_features, in_features)? {
            let name = format!("{prefix}.SCB");
            let k = Int8Matrix::new(q, self.params.int8_threshold, Int8Compute::Int8Matmul)
                .map_err(|e| Error::tensor(src.file_of(&name), name, e.to_string()))?;
            return Ok(Some(Arc::new(k)));
        }
        Ok(None)
    }
}

/// The fields of a `quant_state.bitsandbytes__*` JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantStateJson {
    pub quant_type: FourBitType,
    pub blocksize: usize,
    pub dtype: WeightDType,
    pub shape: [usize; 2],
    /// `(nested_blocksize, nested_offset)` with double quantization.
    pub nested: Option<(usize, f32)>,
}

const QS_KEYS: [&str; 7] = [
    "quant_type",
    "blocksize",
    "dtype",
    "shape",
    "nested_blocksize",
    "nested_dtype",
    "nested_offset",
];

/// Parse and check a quant state JSON (the bytes of the uint8 tensor).
pub fn parse_quant_state(bytes: &[u8]) -> std::result::Result<QuantStateJson, String> {
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("malformed quant state JSON: {e}"))?;
    let obj = v.as_object().ok_or("quant state JSON is not an object")?;
    if let Some(k) = obj.keys().find(|k| !QS_KEYS.contains(&k.as_str())) {
        return Err(format!("unknown quant state key `{k}`"));
    }
    let get = |k: &str| obj.get(k).ok_or(format!("quant state JSON has no `{k}`"));
    let quant_type = get("quant_type")?
        .as_str()
        .ok_or("`quant_type` is not a string")
        .map_err(str::to_string)
        .and_then(|s| {
            FourBitType::parse(s)
                .map_err(|_| format!("unknown quant_type `{s}` (nf4 and fp4 are supported)"))
        })?;
    let blocksize = get("blocksize")?
        .as_u64()
        .ok_or("`blocksize` is not a positive integer")? as usize;
    check_blocksize(blocksize).map_err(|e| e.to_string())?;
    let dtype = parse_torch_dtype(get("dtype")?)?;
    let shape = get("shape")?
        .as_array()
        .filter(|a| a.len() == 2)
        .and_then(|a| Some([a[0].as_u64()? as usize, a[1].as_u64()? as usize]))
        .ok_or("`shape` is not a list of two integers")?;
    let nested = match (
        obj.get("nested_blocksize"),
        obj.get("nested_dtype"),
        obj.get("nested_offset"),
    ) {
        (None, None, None) => None,
        (Some(b), Some(d), Some(o)) => {
            let b = b
                .as_u64()
                .filter(|b| *b > 0)
                .ok_or("`nested_blocksize` is not a positive integer")?
                as usize;
            if parse_torch_dtype(d)? != WeightDType::F32 {
                return Err(format!("nested_dtype {d} is not supported (float32 is)"));
            }
            let o = o
                .as_f64()
                .filter(|o| o.is_finite())
                .ok_or("`nested_offset` is not a finite number")?;
            Some((b, o as f32))
        }
        _ => {
            return Err(
                "nested_blocksize, nested_dtype and nested_offset must appear together".into(),
            )
        }
    };
    Ok(QuantStateJson {
        quant_type,
        blocksize,
        dtype,
        shape,
        nested,
    })
}

fn parse_torch_dtype(v: &Value) -> std::result::Result<WeightDType, String> {
    match v.as_str() {
        Some("float32") => Ok(WeightDType::F32),
        Some("float16") => Ok(WeightDType::F16),
        Some("bfloat16") => Ok(WeightDType::BF16),
        _ => Err(format!(
            "dtype {v} is not supported (float32, float16, bfloat16 are)"
        )),
    }
}

/// The JSON bitsandbytes writes for `q`, byte for byte (`json.dumps` defaults, keys in
/// `QuantState.as_dict` order, floats as Python's `repr`).
pub fn quant_state_json(q: &FourBitWeight) -> String {
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}, {}]",
        q.quant_type.name(),
        q.blocksize,
        q.dtype.torch_name(),
        q.shape[0],
        q.shape[1]
    );
    if let Absmax::Nested(n) = &q.absmax {
        s.push_str(&format!(
            ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            n.blocksize,
            python_float_repr(n.offset as f64)
        ));
    }
    s.push('}');
    s
}

/// Python's `repr(float)`: the shortest digits that round-trip, in positional notation for
/// exponents −4…15 (always with a fractional part) and as `d.ddde±XX` otherwise.
pub fn python_float_repr(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if v == 0.0 {
        return if v.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let sci = format!("{:e}", v.abs());
    let (mant, exp) = sci.split_once('e').expect("LowerExp has an exponent");
    let exp: i32 = exp.parse().expect("LowerExp exponent is an integer");
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let sign = if v < 0.0 { "-" } else { "" };
    if !(-4..16).contains(&exp) {
        let m = if digits.len() == 1 {
            digits
        } else {
            format!("{}.{}", &digits[..1], &digits[1..])
        };
        let es = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{es}{:02}", exp.abs())
    } else if exp < 0 {
        format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize))
    } else {
        let int_len = exp as usize + 1;
        if digits.len() <= int_len {
            format!("{sign}{digits}{}.0", "0".repeat(int_len - digits.len()))
        } else {
            format!("{sign}{}.{}", &digits[..int_len], &digits[int_len..])
        }
    }
}

/// The tensors `Linear4bit` saves for `q` under `prefix`.
pub fn four_bit_tensors(prefix: &str, q: &FourBitWeight) -> Vec<(String, RawTensor)> {
    let w = format!("{prefix}.weight");
    let u8s = |shape: Vec<usize>, data: Vec<u8>| RawTensor {
        dtype: DType::U8,
        shape,
        data,
    };
    let mut out = vec![
        (w.clone(), u8s(vec![q.packed.len(), 1], q.packed.clone())),
        (
            format!("{w}.quant_map"),
            RawTensor::from_f32(vec![16], &q.quant_map),
        ),
    ];
    match &q.absmax {
        Absmax::Plain(a) => {
            out.push((format!("{w}.absmax"), RawTensor::from_f32(vec![a.len()], a)))
        }
        Absmax::Nested(n) => {
            out.push((
                format!("{w}.absmax"),
                u8s(vec![n.codes.len()], n.codes.clone()),
            ));
            out.push((
                format!("{w}.nested_absmax"),
                RawTensor::from_f32(vec![n.nested_absmax.len()], &n.nested_absmax),
            ));
            out.push((
                format!("{w}.nested_quant_map"),
                RawTensor::from_f32(vec![n.map.len()], &n.map),
            ));
        }
    }
    let js = quant_state_json(q).into_bytes();
    out.push((
        format!("{w}.quant_state.bitsandbytes__{}", q.quant_type.name()),
        u8s(vec![js.len()], js),
    ));
    out
}

/// The tensors `Linear8bitLt` saves for `q` under `prefix` (row-major format, code 0).
pub fn int8_tensors(prefix: &str, q: &Int8Weight) -> Vec<(String, RawTensor)> {
    vec![
        (
            format!("{prefix}.weight"),
            RawTensor {
                dtype: DType::I8,
                shape: vec![q.n, q.k],
                data: bytemuck::cast_slice(&q.codes).to_vec(),
            },
        ),
        (
            format!("{prefix}.SCB"),
            RawTensor::from_f32(vec![q.n], &q.scb),
        ),
        (
            format!("{prefix}.weight_format"),
            RawTensor {
                dtype: DType::U8,
                shape: vec![],
                data: vec![0],
            },
        ),
    ]
}

/// Read the 4-bit state of layer `prefix` (`None` if it has none).
pub fn read_four_bit(
    src: &dyn WeightSource,
    prefix: &str,
    out_features: usize,
    in_features: usize,
) -> Result<Option<FourBitWeight>> {
    let w = format!("{prefix}.weight");
    let keys: Vec<(String, FourBitType)> = [FourBitType::Nf4, FourBitType::Fp4]
        .into_iter()
        .map(|t| (format!("{w}.quant_state.bitsandbytes__{}", t.name()), t))
        .filter(|(k, _)| src.info(k).is_some())
        .collect();
    let (qs_name, key_type) = match keys.as_slice() {
        [] => return Ok(None),
        [one] => one.clone(),
        _ => {
            return Err(Error::tensor(
                src.file_of(&w),
                &w,
                "has both quant_state.bitsandbytes__nf4 and __fp4; expected exactly one",
            ))
        }
    };
    let err = |name: &str, msg: String| Error::tensor(src.file_of(name), name, msg);
    let qs_raw = src.read(&qs_name)?;
    if qs_raw.dtype != DType::U8 {
        return Err(err(
            &qs_name,
            format!("dtype {:?}, expected U8 (JSON bytes)", qs_raw.dtype),
        ));
    }
    let qs = parse_quant_state(&qs_raw.data).map_err(|m| err(&qs_name, m))?;
    if qs.quant_type != key_type {
        return Err(err(
            &qs_name,
            format!(
                "quant_type `{}` disagrees with the key suffix `{}`",
                qs.quant_type.name(),
                key_type.name()
            ),
        ));
    }
    if qs.shape != [out_features, in_features] {
        return Err(err(
            &qs_name,
            format!(
                "shape {:?} disagrees with the model config [{out_features}, {in_features}]",
                qs.shape
            ),
        ));
    }
    let n = out_features * in_features;
    let nb = n.div_ceil(qs.blocksize);

    let packed_raw = read_required(src, &w)?;
    if packed_raw.data.len() != n.div_ceil(2) {
        return Err(err(
            &w,
            format!(
                "{} bytes of packed 4-bit codes ({:?} {:?}), but shape {:?} needs {}",
                packed_raw.data.len(),
                packed_raw.dtype,
                packed_raw.shape,
                qs.shape,
                n.div_ceil(2)
            ),
        ));
    }
    let absmax_name = format!("{w}.absmax");
    let absmax_raw = read_required(src, &absmax_name)?;
    let absmax = match qs.nested {
        None => {
            if !absmax_raw.dtype.is_float() {
                return Err(err(
                    &absmax_name,
                    format!(
                        "dtype {:?}; without double quantization absmax is float",
                        absmax_raw.dtype
                    ),
                ));
            }
            check_len(&absmax_name, absmax_raw.numel(), nb, src, &qs)?;
            Absmax::Plain(absmax_raw.to_f32())
        }
        Some((nested_bs, offset)) => {
            if absmax_raw.dtype != DType::U8 {
                return Err(err(
                    &absmax_name,
                    format!(
                        "dtype {:?}; with double quantization absmax holds uint8 codes",
                        absmax_raw.dtype
                    ),
                ));
            }
            check_len(&absmax_name, absmax_raw.numel(), nb, src, &qs)?;
            let na = format!("{w}.nested_absmax");
            let nested_absmax = read_float(src, &na, nb.div_ceil(nested_bs))?;
            let nm = format!("{w}.nested_quant_map");
            let map = read_float(src, &nm, 256)?;
            Absmax::Nested(NestedAbsmax {
                codes: absmax_raw.data,
                nested_absmax,
                map,
                offset,
                blocksize: nested_bs,
            })
        }
    };
    let qm_name = format!("{w}.quant_map");
    let qm = read_float(src, &qm_name, 16)?;
    let q = FourBitWeight {
        quant_type: qs.quant_type,
        blocksize: qs.blocksize,
        shape: qs.shape,
        dtype: qs.dtype,
        packed: packed_raw.data,
        absmax,
        quant_map: qm.try_into().expect("length checked"),
    };
    q.validate().map_err(|e| err(&absmax_name, e.to_string()))?;
    Ok(Some(q))
}

fn check_len(
    name: &str,
    got: usize,
    want: usize,
    src: &dyn WeightSource,
    qs: &QuantStateJson,
) -> Result<()> {
    if got != want {
        return Err(Error::tensor(
            src.file_of(name),
            name,
            format!(
                "has {got} entries but shape {:?} in blocks of {} needs {want}",
                qs.shape, qs.blocksize
            ),
        ));
    }
    Ok(())
}

fn read_required(src: &dyn WeightSource, name: &str) -> Result<RawTensor> {
    crate::formats::require_tensor(src, name)?;
    src.read(name)
}

/// A float tensor of `len` elements (any shape), finite.
fn read_float(src: &dyn WeightSource, name: &str, len: usize) -> Result<Vec<f32>> {
    let raw = read_required(src, name)?;
    let err = |msg: String| Error::tensor(src.file_of(name), name, msg);
    if !raw.dtype.is_float() {
        return Err(err(format!(
            "dtype {:?}, expected a float tensor",
            raw.dtype
        )));
    }
    if raw.numel() != len {
        return Err(err(format!("has {} entries, expected {len}", raw.numel())));
    }
    let v = raw.to_f32();
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(err(format!("non-finite value {} at index {i}", v[i])));
    }
    Ok(v)
}

/// Read the LLM.int8 state of layer `prefix` (`None` if it has no `SCB`).
pub fn read_int8(
    src: &dyn WeightSource,
    prefix: &str,
    out_features: usize,
    in_features: usize,
) -> Result<Option<Int8Weight>> {
    let scb_name = format!("{prefix}.SCB");
    if src.info(&scb_name).is_none() {
        return Ok(None);
    }
    let w = format!("{prefix}.weight");
    let raw = read_required(src, &w)?;
    if raw.dtype != DType::I8 || raw.shape != [out_features, in_features] {
        return Err(Error::tensor(
            src.file_of(&w),
            &w,
            format!(
                "{:?} {:?}; an LLM.int8 weight is I8 [{out_features}, {in_features}]",
                raw.dtype, raw.shape
            ),
        ));
    }
    let scb = read_float(src, &scb_name, out_features)?;
    let wf = format!("{prefix}.weight_format");
    if src.info(&wf).is_some() {
        let f = src.read(&wf)?;
        let code = f.to_f32();
        if f.numel() != 1 || code[0] != 0.0 {
            return Err(Error::Unsupported(format!(
                "{}: `{wf}` = {:?}; only the row-major layout (0) is supported (col32/turing/\
                 ampere layouts are GPU-specific)",
                src.file_of(&wf).display(),
                code
            )));
        }
    }
    let q = Int8Weight {
        n: out_features,
        k: in_features,
        codes: bytemuck::cast_slice(&raw.data).to_vec(),
        scb,
    };
    q.validate()
        .map_err(|e| Error::tensor(src.file_of(&scb_name), &scb_name, e.to_string()))?;
    Ok(Some(q))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_repr_matches_known_strings() {
        for (v, s) in [
            (0.0301513671875, "0.0301513671875"),
            (1e-05, "1e-05"),
            (1.5e-07, "1.5e-07"),
            (0.0001, "0.0001"),
            (123.0, "123.0"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (0.050878897309303284, "0.050878897309303284"),
            (-2.5, "-2.5"),
            (6.0, "6.0"),
        ] {
            assert_eq!(python_float_repr(v), s);
        }
    }

    #[test]
    fn quant_state_json_rejects_bad_input() {
        for bad in [
            &b"{not json"[..],
            b"[1, 2]",
            b"{\"quant_type\": \"nf3\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [2, 2]}",
            b"{\"quant_type\": \"nf4\", \"blocksize\": 48, \"dtype\": \"float32\", \"shape\": [2, 2]}",
            b"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"int8\", \"shape\": [2, 2]}",
            b"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [2]}",
            b"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [2, 2], \"nested_offset\": 0.1}",
            b"{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", \"shape\": [2, 2], \"extra\": 1}",
        ] {
            assert!(parse_quant_state(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
// ---------------------------------------------------------------------------------------------
// Quantization at load time

struct LoadTimeFactory {
    cfg: BitsAndBytesConfig,
    decode: crate::kernels::bnb::FourBitDecode,
}

/// Quantizes every eligible linear layer as it is loaded (transformers' `load_in_4bit` /
/// `load_in_8bit`): the dense weight is read (GPT-2 Conv1D transposed to `[out, in]`) and
/// quantized exactly as bitsandbytes would; `lm_head` and `skip_modules` stay dense.
/// `decode` chooses the 4-bit decoding arithmetic.
pub fn load_time_factory(
    cfg: &BitsAndBytesConfig,
    decode: crate::kernels::bnb::FourBitDecode,
) -> Result<Box<dyn LinearFactory>> {
    cfg.validate()?;
    Ok(Box::new(LoadTimeFactory {
        cfg: cfg.clone(),
        decode,
    }))
}

/// Read a dense linear weight as `[out, in]` f32, with the dtype it is stored in.
pub fn read_dense_linear(
    src: &dyn WeightSource,
    prefix: &str,
    in_features: usize,
    out_features: usize,
    conv1d: bool,
) -> Result<(Vec<f32>, WeightDType)> {
    let name = format!("{prefix}.weight");
    let shape = if conv1d {
        [in_features, out_features]
    } else {
        [out_features, in_features]
    };
    let w = crate::formats::read_f32_checked(src, &name, &shape)?;
    let dtype = match src.info(&name).map(|i| i.dtype) {
        Some(crate::tensor::DType::F16) => WeightDType::F16,
        Some(crate::tensor::DType::BF16) => WeightDType::BF16,
        _ => WeightDType::F32,
    };
    if !conv1d {
        return Ok((w, dtype));
    }
    let mut t = vec![0f32; w.len()];
    for i in 0..in_features {
        for o in 0..out_features {
            t[o * in_features + i] = w[i * out_features + o];
        }
    }
    Ok((t, dtype))
}

/// Build the kernel for one weight under `cfg`, 4-bit ones decoding with `decode`.
pub fn quantize_linear_kernel(
    w: &[f32],
    out_features: usize,
    in_features: usize,
    dtype: WeightDType,
    cfg: &BitsAndBytesConfig,
    decode: crate::kernels::bnb::FourBitDecode,
) -> Result<Arc<dyn LinearKernel>> {
    use crate::kernels::bnb::{FourBitMatrix, Int8Matrix};
    if cfg.load_in_8bit {
        let q = quantize_int8(w, out_features, in_features)?;
        Ok(Arc::new(Int8Matrix::new(
            q,
            cfg.int8_threshold,
            cfg.int8_compute,
        )?))
    } else {
        let q = quantize_4bit(
            w,
            [out_features, in_features],
            dtype,
            cfg.quant_type,
            cfg.blocksize,
            cfg.double_quant,
        )?;
        Ok(Arc::new(
            FourBitMatrix::new(q, cfg.compute_dtype)?.with_decode(decode),
        ))
    }
}

impl LinearFactory for LoadTimeFactory {
    fn load_linear(
        &self,
        src: &dyn WeightSource,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        conv1d: bool,
    ) -> Result<Option<Arc<dyn LinearKernel>>> {
        if self.cfg.skips(prefix) {
            return Ok(None);
        }
        let (w, dtype) = read_dense_linear(src, prefix, in_features, out_features, conv1d)?;
        let name = format!("{prefix}.weight");
        quantize_linear_kernel(&w, out_features, in_features, dtype, &self.cfg, self.decode)
            .map(Some)
            .map_err(|e| Error::tensor(src.file_of(&name), name, e.to_string()))
    }
}
