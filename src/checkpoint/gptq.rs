//! GPTQ checkpoints (docs/formats.md §1): reading them into packed [`GptqMatrix`] kernels, and the
//! pure pieces a writer needs (per-layer tensors, `quantization_config`, `quantize_config.json`).
//!
//! Reading accepts what AutoGPTQ, GPTQModel and optimum write: v1 (`"gptq"`, zero fields hold
//! `Z − 1`) and `"gptq_v2"` (fields hold `Z`), 2/3/4/8 bits, grouped or per-channel, act-order
//! `g_idx` (any order), `scales` in f16/bf16/f32. Writing produces exactly AutoGPTQ's packing;
//! which zero format to use is decided by [`choose_format`].

use crate::checkpoint::gptq_pack::{self, ZeroFormat};
use crate::config::AutoConfig;
use crate::error::{Error, Result};
use crate::formats::WeightSource;
use crate::kernels::gptq::GptqMatrix;
use crate::kernels::LinearKernel;
use crate::nn::LinearFactory;
use crate::qtypes::grid::QuantizedLinear;
use crate::qtypes::{Bits, GroupSize};
use crate::tensor::{DType, RawTensor};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The quantization settings a GPTQ reader needs, parsed from `quantization_config` (or
/// `quantize_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct GptqParams {
    pub bits: Bits,
    /// `None` is per-channel (`group_size: -1`).
    pub group_size: GroupSize,
    pub desc_act: bool,
    pub sym: bool,
    pub format: ZeroFormat,
    /// The file the settings came from, named in every error and warning.
    pub config_file: PathBuf,
}

impl GptqParams {
    /// Parse and check the settings; anything this reader cannot honour is refused here, with
    /// the file named, rather than producing wrong numbers later.
    pub fn from_config(qcfg: &Value, config_file: &Path) -> Result<Self> {
        let file = config_file.display();
        let obj = qcfg.as_object().ok_or_else(|| {
            Error::format(
                config_file,
                "the GPTQ quantization config is not a JSON object",
            )
        })?;
        let int = |key: &str| -> Result<Option<i64>> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_i64().map(Some).ok_or_else(|| {
                    Error::format(
                        config_file,
                        format!("GPTQ `{key}` must be an integer, found {v}"),
                    )
                }),
            }
        };
        let boolean = |key: &str, default: bool| -> Result<bool> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => Err(Error::format(
                    config_file,
                    format!("GPTQ `{key}` must be true or false, found {v}"),
                )),
            }
        };
        let string = |key: &str| -> Result<Option<String>> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.to_ascii_lowercase())),
                Some(v) => Err(Error::format(
                    config_file,
                    format!("GPTQ `{key}` must be a string, found {v}"),
                )),
            }
        };

        // `w_bit` is an alias AutoGPTQ accepts.
        let bits = match (int("bits")?, int("w_bit")?) {
            (Some(b), _) | (None, Some(b)) => b,
            (None, None) => return Err(Error::format(config_file, "GPTQ config has no `bits`")),
        };
        let bits = Bits::from_i64(bits).map_err(|_| {
            Error::Unsupported(format!(
                "{file}: GPTQ bits = {bits} is not supported (the integer grid holds 2, 3, 4 or 8 bits)"
            ))
        })?;
        // Defaults differ by tool (transformers 128, AutoGPTQ -1), so a missing value is refused.
        let group_size = match (int("group_size")?, int("q_group_size")?) {
            (Some(g), _) | (None, Some(g)) => g,
            (None, None) => {
                return Err(Error::format(
                    config_file,
                    "GPTQ config has no `group_size` (tools disagree on the default)",
                ))
            }
        };
        let group_size = GroupSize::from_i64(group_size).map_err(|_| {
            Error::format(
                config_file,
                format!(
                    "GPTQ group_size = {group_size} is invalid (a positive size, or -1 for one \
                     group per output channel)"
                ),
            )
        })?;

        // `checkpoint_format` (AutoGPTQ, transformers, vLLM) and `format` (GPTQModel, newer
        // optimum) name the same thing; transformers lets `checkpoint_format` win.
        let ck = string("checkpoint_format")?;
        let fm = string("format")?;
        if let (Some(a), Some(b)) = (&ck, &fm) {
            if a != b {
                return Err(Error::format(
                    config_file,
                    format!("GPTQ `checkpoint_format` is {a:?} but `format` is {b:?}"),
                ));
            }
        }
        let format = match ck.or(fm).as_deref() {
            None | Some("gptq") => ZeroFormat::V1,
            Some("gptq_v2") => ZeroFormat::V2,
            Some(other) => {
                return Err(Error::Unsupported(format!(
                "{file}: GPTQ checkpoint_format {other:?} is not supported (gptq and gptq_v2 are; \
                     marlin, bitblas and GPTQModel's gptq_p repack the weights differently)"
            )))
            }
        };
        if boolean("is_marlin_format", false)? {
            return Err(Error::Unsupported(format!(
                "{file}: Marlin-format GPTQ checkpoints (is_marlin_format) are not supported"
            )));
        }
        if let Some(method) = string("quant_method")?.or(string("method")?) {
            if method != "gptq" {
                return Err(Error::format(
                    config_file,
                    format!("quant_method is {method:?}, not a GPTQ checkpoint"),
                ));
            }
        }
        if let Some(p) = string("pack_dtype")? {
            if p != "int32" {
                return Err(Error::Unsupported(format!(
                    "{file}: GPTQ pack_dtype {p:?} is not supported (only int32 packing is)"
                )));
            }
        }
        match obj.get("dynamic") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) if m.is_empty() => {}
            Some(_) => {
                return Err(Error::Unsupported(format!(
                    "{file}: GPTQModel per-module overrides (`dynamic`) are not supported"
                )))
            }
        }
        Ok(GptqParams {
            bits,
            group_size,
            desc_act: boolean("desc_act", false)?,
            sym: boolean("sym", true)?,
            format,
            config_file: config_file.to_path_buf(),
        })
    }
}

/// The file a GPTQ config came from: `config.json` when it holds `quantization_config`,
/// otherwise AutoGPTQ's `quantize_config.json` beside it.
fn config_file_of(config: &AutoConfig) -> PathBuf {
    let source = config
        .source
        .clone()
        .unwrap_or_else(|| PathBuf::from("config.json"));
    if config.raw.contains_key("quantization_config") {
        source
    } else {
        source.with_file_name("quantize_config.json")
    }
}

/// Builds the packed linear layers of a checkpoint whose GPTQ settings are `qcfg`.
pub fn linear_factory(config: &AutoConfig, qcfg: &Value) -> Result<Box<dyn LinearFactory>> {
    let params = GptqParams::from_config(qcfg, &config_file_of(config))?;
    Ok(Box::new(GptqFactory {
        params,
        warned_wrap: AtomicBool::new(false),
        warned_g_idx: AtomicBool::new(false),
    }))
}

struct GptqFactory {
    params: GptqParams,
    warned_wrap: AtomicBool,
    warned_g_idx: AtomicBool,
}

impl LinearFactory for GptqFactory {
    fn load_linear(
        &self,
        src: &dyn WeightSource,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        _conv1d: bool,
    ) -> Result<Option<Arc<dyn LinearKernel>>> {
        // GPT-2 Conv1D layers are packed exactly like Linear ones (AutoGPTQ's QuantLinear takes
        // in/out features from the Conv1D weight), so `conv1d` changes nothing here.
        let Some(q) = read_layer(src, prefix, in_features, out_features, &self.params)? else {
            return Ok(None);
        };
        let p = &self.params;
        let top = 1u32 << p.bits.get();
        // Only v1 adds 1, so only v1 can produce Z = 2^b; warn once per checkpoint.
        if q.zeros.contains(&top) && !self.warned_wrap.swap(true, Ordering::Relaxed) {
            eprintln!(
                "warning: {}: GPTQ v1 checkpoint stores zero points as {} ({}-bit all ones), first in \
                 `{prefix}.qzeros`. v1 stores Z-1, so this is a zero point of 0 that wrapped when it was \
                 written; tools disagree on reading it. Reading it as Z = {top}, as vLLM and exllama do. \
                 Re-quantize and save as gptq_v2 to avoid the ambiguity.",
                p.config_file.display(),
                p.bits.maxq(),
                p.bits,
            );
        }
        if !p.desc_act && !self.warned_g_idx.load(Ordering::Relaxed) {
            let g = p.group_size.channels(in_features);
            if q.g_idx
                .iter()
                .enumerate()
                .any(|(k, &gi)| gi as usize != k / g)
            {
                self.warned_g_idx.store(true, Ordering::Relaxed);
                eprintln!(
                    "warning: {}: desc_act is false but `{prefix}.g_idx` is not k / group_size; using g_idx \
                     (kernels that assume desc_act=false would ignore it and compute other weights)",
                    p.config_file.display()
                );
            }
        }
        Ok(Some(Arc::new(GptqMatrix::from_quantized(&q)?)))
    }
}

/// Read one packed layer `<prefix>.{qweight,qzeros,scales,g_idx}` into its unpacked form, or
/// `None` when the checkpoint has no `<prefix>.qweight` (the layer is stored dense).
///
/// Checks dtypes and shapes against `in_features` (K), `out_features` (N) and the config, the
/// `g_idx` range, and that scales are finite. v1 zero fields are read as `field + 1` without
/// a modulo (vLLM/exllama), so a wrapped field gives `Z = 2^b`.
pub fn read_layer(
    src: &dyn WeightSource,
    prefix: &str,
    in_features: usize,
    out_features: usize,
    params: &GptqParams,
) -> Result<Option<QuantizedLinear>> {
    let qweight_name = format!("{prefix}.qweight");
    if src.info(&qweight_name).is_none() {
        return Ok(None);
    }
    let (n, k, bits) = (out_features, in_features, params.bits.get());
    let err = |name: &str, msg: String| Error::tensor(src.file_of(name), name, msg);
    let cfg = params.config_file.display();

    // A run of 32 codes fills whole words for 3 bits; 32/b codes per word otherwise.
    let run = if bits == 3 { 32 } else { 32 / bits as usize };
    if k == 0 || !k.is_multiple_of(run) {
        return Err(err(
            &qweight_name,
            format!(
                "in_features K={k} cannot be packed at {bits} bits (needs a multiple of {run})"
            ),
        ));
    }
    if n == 0 || !n.is_multiple_of(run) {
        return Err(err(
            &format!("{prefix}.qzeros"),
            format!(
                "out_features N={n} cannot be packed at {bits} bits (needs a multiple of {run})"
            ),
        ));
    }
    let groups = match params.group_size.size() {
        None => 1,
        Some(g) if k.is_multiple_of(g) => k / g,
        Some(g) => {
            return Err(err(
                &qweight_name,
                format!(
                    "group_size {g} (from {cfg}) does not divide in_features K={k}; GPTQ loaders \
                     need full groups"
                ),
            ))
        }
    };

    let qweight = read_i32(src, &qweight_name, &[k * bits as usize / 32, n])?;
    let qzeros_name = format!("{prefix}.qzeros");
    let qzeros = read_i32(src, &qzeros_name, &[groups, n * bits as usize / 32])?;
    let scales_name = format!("{prefix}.scales");
    let scales = read_scales(src, &scales_name, &[groups, n])?;
    let g_idx_name = format!("{prefix}.g_idx");
    let g_idx = match src.info(&g_idx_name) {
        None => {
            let g = params.group_size.channels(k);
            (0..k).map(|c| (c / g) as u32).collect()
        }
        Some(_) => read_g_idx(src, &g_idx_name, k, groups)?,
    };

    let codes = gptq_pack::unpack_qweight(&qweight, n, k, bits)
        .map_err(|e| err(&qweight_name, e.to_string()))?;
    // Raw fields, then the v1 offset without wrapping (see the doc comment).
    let fields = gptq_pack::unpack_qzeros(&qzeros, groups, n, bits, ZeroFormat::V2)
        .map_err(|e| err(&qzeros_name, e.to_string()))?;
    let zeros = match params.format {
        ZeroFormat::V1 => fields.into_iter().map(|f| f + 1).collect(),
        ZeroFormat::V2 => fields,
    };
    Ok(Some(QuantizedLinear {
        bits: params.bits,
        group_size: params.group_size,
        n,
        k,
        codes,
        scales,
        zeros,
        g_idx,
    }))
}

fn check_present(src: &dyn WeightSource, name: &str, shape: &[usize]) -> Result<DType> {
    Ok(crate::formats::require_shape(src, name, shape, "the layer and GPTQ config imply")?.dtype)
}

fn read_i32(src: &dyn WeightSource, name: &str, shape: &[usize]) -> Result<Vec<i32>> {
    let dtype = check_present(src, name, shape)?;
    if dtype != DType::I32 {
        return Err(Error::tensor(
            src.file_of(name),
            name,
            format!("dtype {dtype:?}; GPTQ packs into int32 (other pack_dtype values are not supported)"),
        ));
    }
    Ok(i32_values(&src.read(name)?))
}

fn i32_values(t: &RawTensor) -> Vec<i32> {
    t.data
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn read_scales(src: &dyn WeightSource, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let dtype = check_present(src, name, shape)?;
    if !matches!(dtype, DType::F16 | DType::BF16 | DType::F32) {
        return Err(Error::tensor(
            src.file_of(name),
            name,
            format!("dtype {dtype:?}; scales must be float16, bfloat16 or float32"),
        ));
    }
    let values = src.read(name)?.to_f32();
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::tensor(
            src.file_of(name),
            name,
            format!(
                "non-finite scale {} at group {}, output {}",
                values[i],
                i / shape[1],
                i % shape[1]
            ),
        ));
    }
    Ok(values)
}

fn read_g_idx(src: &dyn WeightSource, name: &str, k: usize, groups: usize) -> Result<Vec<u32>> {
    let dtype = check_present(src, name, &[k])?;
    let raw = src.read(name)?;
    let values: Vec<i64> = match dtype {
        DType::I32 => i32_values(&raw).into_iter().map(i64::from).collect(),
        DType::I64 => raw
            .data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8-byte chunk")))
            .collect(),
        other => {
            return Err(Error::tensor(
                src.file_of(name),
                name,
                format!("dtype {other:?}; g_idx must be int32"),
            ))
        }
    };
    values
        .into_iter()
        .enumerate()
        .map(|(c, v)| {
            if (0..groups as i64).contains(&v) {
                Ok(v as u32)
            } else {
                Err(Error::tensor(
                    src.file_of(name),
                    name,
                    format!("g_idx[{c}] = {v} is outside the {groups} groups of scales/qzeros"),
                ))
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Writing

/// Settings recorded in a GPTQ checkpoint we write.
#[derive(Debug, Clone, PartialEq)]
pub struct GptqConfig {
    pub bits: Bits,
    /// `None` is per-channel (`-1` on disk).
    pub group_size: GroupSize,
    pub desc_act: bool,
    pub sym: bool,
    pub static_groups: bool,
    pub true_sequential: bool,
    pub damp_percent: f64,
    pub format: ZeroFormat,
    /// Free-form facts about how the checkpoint was made (e.g. the calibration source). Must be
    /// a JSON object (or null); `quantizer: ["autoquant:<version>"]` is added when absent.
    pub meta: Value,
}

impl GptqConfig {
    fn group_size_value(&self) -> i64 {
        self.group_size.size().map_or(-1, |g| g as i64)
    }

    fn meta_with_quantizer(&self) -> Value {
        let mut meta = match &self.meta {
            Value::Object(m) => m.clone(),
            _ => serde_json::Map::new(),
        };
        meta.entry("quantizer")
            .or_insert_with(|| json!([format!("autoquant:{}", env!("CARGO_PKG_VERSION"))]));
        Value::Object(meta)
    }

    /// `config.json["quantization_config"]`: the keys transformers (`GPTQConfig`), vLLM,
    /// GPTQModel and AutoGPTQ read. The format is written under both names in use,
    /// `checkpoint_format` (AutoGPTQ, vLLM, transformers ≤ 4) and `format` (GPTQModel, optimum and
    /// transformers 5, which write both themselves); `damp_percent`, `static_groups` and
    /// `true_sequential` go at the top level, where AutoGPTQ and transformers look for them.
    pub fn to_quantization_config(&self) -> Value {
        json!({
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size_value(),
            "desc_act": self.desc_act,
            "sym": self.sym,
            "damp_percent": self.damp_percent,
            "true_sequential": self.true_sequential,
            "static_groups": self.static_groups,
            "checkpoint_format": self.format.as_str(),
            "format": self.format.as_str(),
            "pack_dtype": "int32",
            "lm_head": false,
            "meta": self.meta_with_quantizer(),
        })
    }

    /// `quantize_config.json` as AutoGPTQ writes it (its key order), plus `checkpoint_format`
    /// (AutoGPTQ main) and `meta`. `model_file_base_name` is `model` so AutoGPTQ finds
    /// `model.safetensors`. AutoGPTQ 0.7 ignores `checkpoint_format`, so it misreads `gptq_v2`;
    /// later versions refuse it.
    pub fn quantize_config_json(&self) -> Value {
        json!({
            "bits": self.bits,
            "group_size": self.group_size_value(),
            "damp_percent": self.damp_percent,
            "desc_act": self.desc_act,
            "static_groups": self.static_groups,
            "sym": self.sym,
            "true_sequential": self.true_sequential,
            "model_name_or_path": null,
            "model_file_base_name": "model",
            "is_marlin_format": false,
            "quant_method": "gptq",
            "checkpoint_format": self.format.as_str(),
            "meta": self.meta_with_quantizer(),
        })
    }
}

/// The zero-point format to save `layers` in: v1, which every loader reads,
/// unless some zero point is 0, which v1 cannot store (it holds `Z − 1`). Symmetric layers
/// always have `Z = 2^(b−1)`, so they always get v1; asymmetric ones get `gptq_v2` only when
/// needed. A streaming writer that cannot see every layer first should pass `sym` only and
/// treat asymmetric as v2 (what optimum does).
pub fn choose_format(sym: bool, layers: &[&QuantizedLinear]) -> ZeroFormat {
    let has_zero_point_0 = layers.iter().any(|q| q.zeros.contains(&0));
    if has_zero_point_0 || (!sym && layers.is_empty()) {
        ZeroFormat::V2
    } else {
        ZeroFormat::V1
    }
}

/// The packed tensors of one layer as AutoGPTQ writes them: `<prefix>.qweight` (I32
/// `[K·b/32, N]`), `.qzeros` (I32 `[G, N·b/32]`, `Z − 1` in v1, `Z` in v2), `.scales` (F16
/// `[G, N]`) and `.g_idx` (I32 `[K]`). The bias, if any, is the caller's.
///
/// Refuses shapes the loaders cannot take (K not a multiple of 32, N not packable, a group
/// size not dividing K), zero points the format cannot hold (0 in v1, `2^b` in v2), and
/// scales that are not finite in f16.
pub fn layer_tensors(
    prefix: &str,
    q: &QuantizedLinear,
    format: ZeroFormat,
) -> Result<Vec<(String, RawTensor)>> {
    let (n, k, bits) = (q.n, q.k, q.bits.get());
    let bad = |msg: String| Error::InvalidArgument(format!("GPTQ layer `{prefix}`: {msg}"));
    gptq_pack::check_loader_shape(n, k, bits).map_err(|e| bad(e.to_string()))?;
    let groups = match q.group_size.size() {
        None => 1,
        Some(g) if g > 0 && k.is_multiple_of(g) => k / g,
        Some(g) => {
            return Err(bad(format!(
                "group size {g} does not divide in_features K={k}; loaders need full groups"
            )))
        }
    };
    q.check_parts(groups).map_err(bad)?;
    if let Some(c) = q.g_idx.iter().position(|&g| g as usize >= groups) {
        return Err(bad(format!(
            "g_idx[{c}] = {} is not below G={groups}",
            q.g_idx[c]
        )));
    }
    let scales: Vec<half::f16> = q.scales.iter().map(|&s| half::f16::from_f32(s)).collect();
    if let Some(i) = scales.iter().position(|s| !s.is_finite()) {
        return Err(bad(format!(
            "scale {} at group {}, output {} is not finite in float16",
            q.scales[i],
            i / n,
            i % n
        )));
    }
    // Stored fields: Z − 1 in v1 (so Z = 2^b, from reading a wrapped v1 checkpoint, survives a
    // re-save), Z in v2.
    let top = 1u32 << bits;
    let fields: Vec<u32> = match format {
        ZeroFormat::V1 => {
            if let Some(i) = q.zeros.iter().position(|&z| z == 0 || z > top) {
                return Err(bad(format!(
                    "zero point {} at group {}, output {} cannot be stored in GPTQ v1 (it holds Z-1 \
                     in {bits} bits); save as gptq_v2",
                    q.zeros[i],
                    i / n,
                    i % n
                )));
            }
            q.zeros.iter().map(|z| z - 1).collect()
        }
        ZeroFormat::V2 => q.zeros.clone(),
    };
    let qweight = gptq_pack::pack_qweight(&q.codes, n, k, bits).map_err(|e| bad(e.to_string()))?;
    let qzeros = gptq_pack::pack_qzeros(&fields, groups, n, bits, ZeroFormat::V2)
        .map_err(|e| bad(e.to_string()))?;
    let g_idx: Vec<i32> = q.g_idx.iter().map(|&g| g as i32).collect();
    Ok(vec![
        (
            format!("{prefix}.qweight"),
            RawTensor::from_i32(vec![k * bits as usize / 32, n], &qweight),
        ),
        (
            format!("{prefix}.qzeros"),
            RawTensor::from_i32(vec![groups, n * bits as usize / 32], &qzeros),
        ),
        (
            format!("{prefix}.scales"),
            RawTensor::from_f16(vec![groups, n], &scales),
        ),
        (
            format!("{prefix}.g_idx"),
            RawTensor::from_i32(vec![k], &g_idx),
        ),
    ])
}
