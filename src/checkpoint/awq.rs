//! AWQ checkpoints (docs/formats.md §2): reading AutoAWQ's GEMM, GEMV and GEMV_FAST layouts (and
//! llm-awq's, which is GEMV_FAST) into packed [`GptqMatrix`] kernels, and writing the GEMM layout
//! byte for byte as AutoAWQ's `WQLinear_GEMM.from_linear` does.
//!
//! Every AWQ layout is 4-bit, grouped along K, asymmetric with the raw integer zero point:
//! `W[n, k] = s[k / g, n] · (q[n, k] − z[k / g, n])`. That is exactly the grid of
//! [`QuantizedLinear`] (true zero points, `g_idx = k / g`), so the three layouts differ only in
//! how the codes, zeros and scales are laid out, and all of them share the GPTQ kernel.

use crate::config::AutoConfig;
use crate::error::{Error, Result};
use crate::formats::WeightSource;
use crate::kernels::gptq::GptqMatrix;
use crate::kernels::LinearKernel;
use crate::nn::LinearFactory;
use crate::qtypes::grid::QuantizedLinear;
use crate::qtypes::{Bits, GroupSize};
use crate::tensor::WeightDType;
use crate::tensor::{DType, RawTensor};
use half::f16;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bits of every AWQ layout.
pub const AWQ_BITS: Bits = Bits::B4;
/// Nibble i of a GEMM word holds output column `8c + ORDER[i]` (`AWQ_ORDER` in AutoAWQ).
pub const ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
/// Output column j of a GEMM word is in nibble `REVERSE_ORDER[j]`.
pub const REVERSE_ORDER: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// How the packed tensors are laid out (`version` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AwqVersion {
    /// `qweight` I32 `[K, N/8]` interleaved along N; AutoAWQ's default, the only one vLLM reads.
    Gemm,
    /// `qweight` I32 `[N, K/8]` along K, scales/zeros output-major and padded.
    Gemv,
    /// `qweight` I16 `[N/4, K]`, scales and `−s·z` float `[ZW·8, N]` (llm-awq since 2024-02).
    GemvFast,
}

impl AwqVersion {
    /// The spelling AutoAWQ writes (lowercase).
    pub fn as_str(self) -> &'static str {
        match self {
            AwqVersion::Gemm => "gemm",
            AwqVersion::Gemv => "gemv",
            AwqVersion::GemvFast => "gemv_fast",
        }
    }
}

/// The settings of an AWQ checkpoint (`config.json["quantization_config"]`).
#[derive(Debug, Clone, PartialEq)]
pub struct AwqConfig {
    /// Always 4 (checked when parsing).
    pub bits: Bits,
    /// Input channels per group (positive; AutoAWQ cannot pack `-1`, see [`AwqConfig::from_config`]).
    pub group_size: usize,
    /// Always true in loadable checkpoints (AutoAWQ and llm-awq assert it).
    pub zero_point: bool,
    pub version: AwqVersion,
    /// Modules left dense: any layer whose dotted name contains one of these strings.
    pub modules_to_not_convert: Vec<String>,
}

impl AwqConfig {
    /// AutoAWQ's defaults: 4 bits, group 128, zero point, GEMM.
    pub fn new(group_size: usize) -> Self {
        AwqConfig {
            bits: AWQ_BITS,
            group_size,
            zero_point: true,
            version: AwqVersion::Gemm,
            modules_to_not_convert: Vec::new(),
        }
    }

    /// Parse the keys AutoAWQ (≥ 0.2 and 0.1.x), transformers (`AwqConfig`), GPTQModel and vLLM
    /// write: `bits`/`w_bit`, `group_size`/`q_group_size`, `zero_point`, `version` (or
    /// transformers 5's `format`; `backend: "llm-awq"`), `modules_to_not_convert`. Anything the
    /// reader cannot honour is refused here, naming `config_file`.
    pub fn from_config(qcfg: &Value, config_file: &Path) -> Result<Self> {
        let file = config_file.display();
        let obj = qcfg.as_object().ok_or_else(|| {
            Error::format(
                config_file,
                "the AWQ quantization config is not a JSON object",
            )
        })?;
        let get = |key: &str| obj.get(key).filter(|v| !v.is_null());
        let int = |key: &str| -> Result<Option<i64>> {
            match get(key) {
                None => Ok(None),
                Some(v) => v.as_i64().map(Some).ok_or_else(|| {
                    Error::format(
                        config_file,
                        format!("AWQ `{key}` must be an integer, found {v}"),
                    )
                }),
            }
        };
        let string = |key: &str| -> Result<Option<String>> {
            match get(key) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.to_ascii_lowercase())),
                Some(v) => Err(Error::format(
                    config_file,
                    format!("AWQ `{key}` must be a string, found {v}"),
                )),
            }
        };

        if let Some(m) = string("quant_method")? {
            if m != "awq" {
                return Err(Error::format(
                    config_file,
                    format!("quant_method is {m:?}, not an AWQ checkpoint"),
                ));
            }
        }
        let bits = int("bits")?
            .or(int("w_bit")?)
            .unwrap_or(AWQ_BITS.get() as i64);
        if bits != AWQ_BITS.get() as i64 {
            return Err(Error::Unsupported(format!(
                "{file}: AWQ bits = {bits} is not supported; every AWQ layout (GEMM, GEMV, \
                 GEMV_FAST) packs 4-bit codes"
            )));
        }
        let group_size = match int("group_size")?.or(int("q_group_size")?) {
            None => 128,
            Some(g) if g > 0 => g as usize,
            Some(-1) => {
                return Err(Error::Unsupported(format!(
                    "{file}: AWQ group_size = -1 (per-channel) is not supported; AutoAWQ's packers \
                     cannot write it, so no such checkpoint is expected"
                )))
            }
            Some(g) => {
                return Err(Error::format(
                    config_file,
                    format!("AWQ group_size = {g} is invalid (use a positive size)"),
                ))
            }
        };
        let zero_point = match get("zero_point") {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(Error::format(
                    config_file,
                    format!("AWQ `zero_point` must be true or false, found {v}"),
                ))
            }
        };
        if !zero_point {
            return Err(Error::Unsupported(format!(
                "{file}: AWQ zero_point = false is not supported (AutoAWQ's and llm-awq's packers \
                 require zero points, so their checkpoints always have them)"
            )));
        }
        // transformers lets `version` override `format`; `backend: llm-awq` means GEMV_FAST.
        let name = match (string("version")?, string("format")?) {
            (Some(v), _) | (None, Some(v)) => v,
            (None, None) => "gemm".to_string(),
        };
        let version = match name.as_str() {
            // exllama / ipex are transformers kernels that repack GEMM checkpoints at load time.
            "gemm" | "exllama" | "ipex" => AwqVersion::Gemm,
            "gemv" => AwqVersion::Gemv,
            "gemv_fast" | "llm-awq" => AwqVersion::GemvFast,
            other => {
                return Err(Error::Unsupported(format!(
                    "{file}: AWQ version {other:?} is not supported (gemm, gemv and gemv_fast are)"
                )))
            }
        };
        let version = if string("backend")?.as_deref() == Some("llm-awq") {
            AwqVersion::GemvFast
        } else {
            version
        };
        let modules_to_not_convert = match get("modules_to_not_convert") {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        Error::format(
                            config_file,
                            format!("AWQ `modules_to_not_convert` must list strings, found {v}"),
                        )
                    })
                })
                .collect::<Result<_>>()?,
            Some(v) => {
                return Err(Error::format(
                    config_file,
                    format!("AWQ `modules_to_not_convert` must be a list, found {v}"),
                ))
            }
        };
        Ok(AwqConfig {
            bits: AWQ_BITS,
            group_size,
            zero_point,
            version,
            modules_to_not_convert,
        })
    }

    /// `config.json["quantization_config"]` exactly as AutoAWQ ≥ 0.2 writes it
    /// (`to_transformers_dict`): six keys, `modules_to_not_convert` null when empty. transformers,
    /// vLLM and GPTQModel all read it.
    pub fn to_quantization_config(&self) -> Value {
        let skip = if self.modules_to_not_convert.is_empty() {
            Value::Null
        } else {
            json!(self.modules_to_not_convert)
        };
        json!({
            "quant_method": "awq",
            "zero_point": self.zero_point,
            "group_size": self.group_size,
            "bits": self.bits,
            "version": self.version.as_str(),
            "modules_to_not_convert": skip,
        })
    }

    /// Whether the layer at `prefix` stays dense: its name contains a `modules_to_not_convert`
    /// entry (substring match, as AutoAWQ and transformers do).
    pub fn skips(&self, prefix: &str) -> bool {
        self.modules_to_not_convert
            .iter()
            .any(|m| !m.is_empty() && prefix.contains(m.as_str()))
    }
}

// ---------------------------------------------------------------------------------------------
// Packing

/// Pack `[rows, n]` 4-bit values along n with the GEMM interleave: `[rows, n/8]` words whose
/// nibble i is column `8c + ORDER[i]`. `n` must be a multiple of 8 and values below 16.
pub fn pack_gemm(values: &[u8], rows: usize, n: usize) -> Vec<i32> {
    debug_assert_eq!(values.len(), rows * n);
    let words = n / 8;
    let mut out = vec![0i32; rows * words];
    for r in 0..rows {
        for c in 0..words {
            let base = r * n + 8 * c;
            let mut w = 0u32;
            for (i, &col) in ORDER.iter().enumerate() {
                w |= (values[base + col] as u32 & 0xF) << (4 * i);
            }
            out[r * words + c] = w as i32;
        }
    }
    out
}

/// Inverse of [`pack_gemm`]: `[rows, n/8]` words to `[rows, n]` values.
pub fn unpack_gemm(words: &[i32], rows: usize, n: usize) -> Vec<u8> {
    let per_row = n / 8;
    let mut out = vec![0u8; rows * n];
    for r in 0..rows {
        for c in 0..per_row {
            let w = words[r * per_row + c] as u32;
            for (j, &nib) in REVERSE_ORDER.iter().enumerate() {
                out[r * n + 8 * c + j] = ((w >> (4 * nib)) & 0xF) as u8;
            }
        }
    }
    out
}

/// Width in words of GEMV / GEMV_FAST zero tensors (AutoAWQ `calculate_zeros_width`): groups
/// rounded up to whole words, then to a multiple of 1, 2 or 4 words for g ≥ 128, 64, 32.
/// `None` for other group sizes, which AutoAWQ refuses.
pub fn zeros_width(k: usize, group_size: usize) -> Option<usize> {
    let multiple = match group_size {
        g if g >= 128 => 1,
        64 => 2,
        32 => 4,
        _ => return None,
    };
    let base = (k / group_size).div_ceil(8);
    Some(base.div_ceil(multiple) * multiple)
}

/// The GEMM tensors of one layer as `WQLinear_GEMM.from_linear` writes them: `<prefix>.qweight`
/// (I32 `[K, N/8]`), `<prefix>.qzeros` (I32 `[G, N/8]`), both interleaved, and `<prefix>.scales`
/// (F16 `[G, N]`). The bias, if any, is the caller's (AutoAWQ stores it as F16).
///
/// Refuses what the layout cannot hold, naming the layer: bits other than 4, no group size
/// (per-channel), a group size not dividing K, an act-order `g_idx`, N not a multiple of 8, codes
/// or zero points above 15, scales not finite in f16.
pub fn layer_tensors(prefix: &str, q: &QuantizedLinear) -> Result<Vec<(String, RawTensor)>> {
    let (n, k) = (q.n, q.k);
    let bad = |msg: String| Error::InvalidArgument(format!("AWQ layer `{prefix}`: {msg}"));
    if q.bits != AWQ_BITS {
        return Err(bad(format!(
            "{}-bit codes; the AWQ GEMM layout stores only 4 bits",
            q.bits
        )));
    }
    if n == 0 || k == 0 {
        return Err(bad(format!("empty weight [N={n}, K={k}]")));
    }
    let g =
        match q.group_size.size() {
            Some(g) if g > 0 && k.is_multiple_of(g) => g,
            Some(g) => {
                return Err(bad(format!(
                    "group size {g} does not divide in_features K={k}; AWQ needs full groups"
                )))
            }
            None => return Err(bad(
                "per-channel quantization (no group size); AWQ checkpoints need a positive group \
                 size"
                    .into(),
            )),
        };
    if !n.is_multiple_of(8) {
        return Err(bad(format!(
            "out_features N={n} is not a multiple of 8; GEMM packs 8 output columns per int32"
        )));
    }
    let groups = k / g;
    q.check_parts(groups).map_err(bad)?;
    if let Some(c) = q
        .g_idx
        .iter()
        .enumerate()
        .position(|(c, &gi)| gi as usize != c / g)
    {
        return Err(bad(format!(
            "g_idx[{c}] = {} is not k / group_size = {}; AWQ has no act-order (no g_idx tensor)",
            q.g_idx[c],
            c / g
        )));
    }
    if let Some(i) = q.codes.iter().position(|&c| c > 15) {
        return Err(bad(format!(
            "code {} at row {}, column {} does not fit in 4 bits",
            q.codes[i],
            i / k,
            i % k
        )));
    }
    if let Some(i) = q.zeros.iter().position(|&z| z > 15) {
        return Err(bad(format!(
            "zero point {} at group {}, output {} does not fit in 4 bits",
            q.zeros[i],
            i / n,
            i % n
        )));
    }
    let scales: Vec<f16> = q.scales.iter().map(|&s| f16::from_f32(s)).collect();
    if let Some(i) = scales.iter().position(|s| !s.is_finite()) {
        return Err(bad(format!(
            "scale {} at group {}, output {} is not finite in float16",
            q.scales[i],
            i / n,
            i % n
        )));
    }
    // Codes are [N, K]; GEMM rows are input channels.
    let mut by_k = vec![0u8; n * k];
    for row in 0..n {
        for col in 0..k {
            by_k[col * n + row] = q.codes[row * k + col];
        }
    }
    let zeros: Vec<u8> = q.zeros.iter().map(|&z| z as u8).collect();
    Ok(vec![
        (
            format!("{prefix}.qweight"),
            RawTensor::from_i32(vec![k, n / 8], &pack_gemm(&by_k, k, n)),
        ),
        (
            format!("{prefix}.qzeros"),
            RawTensor::from_i32(vec![groups, n / 8], &pack_gemm(&zeros, groups, n)),
        ),
        (
            format!("{prefix}.scales"),
            RawTensor::from_f16(vec![groups, n], &scales),
        ),
    ])
}

// ---------------------------------------------------------------------------------------------
// Reading

/// The file a config came from (named in errors).
fn config_file_of(config: &AutoConfig) -> PathBuf {
    config
        .source
        .clone()
        .unwrap_or_else(|| PathBuf::from("config.json"))
}

/// Builds the packed linear layers of a checkpoint whose `quantization_config` is `qcfg`.
pub fn linear_factory(config: &AutoConfig, qcfg: &Value) -> Result<Box<dyn LinearFactory>> {
    let config_file = config_file_of(config);
    let cfg = AwqConfig::from_config(qcfg, &config_file)?;
    Ok(Box::new(AwqFactory { cfg, config_file }))
}

struct AwqFactory {
    cfg: AwqConfig,
    config_file: PathBuf,
}

impl LinearFactory for AwqFactory {
    fn load_linear(
        &self,
        src: &dyn WeightSource,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        _conv1d: bool,
    ) -> Result<Option<Arc<dyn LinearKernel>>> {
        if self.cfg.skips(prefix) {
            return Ok(None);
        }
        let qweight = format!("{prefix}.qweight");
        let weight = format!("{prefix}.weight");
        if src.info(&qweight).is_none() && src.info(&weight).is_none() {
            return Err(Error::tensor(
                src.file_of(&qweight),
                qweight,
                format!(
                    "missing from the checkpoint (and no dense `{weight}` either); {} says this is \
                     an AWQ checkpoint",
                    self.config_file.display()
                ),
            ));
        }
        match read_layer(src, prefix, in_features, out_features, &self.cfg)? {
            None => Ok(None),
            Some(q) => Ok(Some(Arc::new(AwqMatrix::new(&q, self.cfg.version)?))),
        }
    }
}

/// A packed AWQ layer: the GPTQ kernel (same grid) under an AWQ name.
pub struct AwqMatrix {
    inner: GptqMatrix,
    group_size: usize,
    version: AwqVersion,
}

impl AwqMatrix {
    pub fn new(q: &QuantizedLinear, version: AwqVersion) -> Result<Self> {
        Ok(AwqMatrix {
            inner: GptqMatrix::from_quantized(q)?,
            group_size: q.group_size.channels(q.k),
            version,
        })
    }
    /// Back to the interchange form (e.g. to save in another format).
    pub fn to_quantized(&self) -> QuantizedLinear {
        self.inner.to_quantized()
    }
}

impl LinearKernel for AwqMatrix {
    fn in_features(&self) -> usize {
        self.inner.in_features()
    }
    fn out_features(&self) -> usize {
        self.inner.out_features()
    }
    fn forward_rows(&self, x: &[f32], m: usize, rows: std::ops::Range<usize>, out: &mut [f32]) {
        self.inner.forward_rows(x, m, rows, out)
    }
    fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.inner.forward(x, m, out)
    }
    fn storage_bytes(&self) -> usize {
        self.inner.storage_bytes()
    }
    fn storage_name(&self) -> String {
        format!("awq-4bit-g{}-{}", self.group_size, self.version.as_str())
    }
    fn to_f32(&self) -> Vec<f32> {
        self.inner.to_f32()
    }
}

/// Read one packed layer `<prefix>.{qweight,qzeros,scales}` in the layout of `cfg.version` into
/// its unpacked form, or `None` when the checkpoint has no `<prefix>.qweight` (a dense layer).
///
/// Checks dtypes and shapes against `in_features` (K), `out_features` (N) and the config, and
/// that scales are finite; errors name the file and tensor.
///
/// GEMV_FAST stores the zero term as the float `−s·z` (named `qzeros` by AutoAWQ,
/// `scaled_zeros` by llm-awq); the integer z is recovered and must reproduce the stored value
/// exactly (it does for everything AutoAWQ and llm-awq write). The weights are then held as
/// `s·(q − z)`, which differs from those kernels' `q·s + (−s·z)` only by the rounding of `s·z`
/// to the stored dtype (at most half an f16 ulp of `s·z`).
pub fn read_layer(
    src: &dyn WeightSource,
    prefix: &str,
    in_features: usize,
    out_features: usize,
    cfg: &AwqConfig,
) -> Result<Option<QuantizedLinear>> {
    let qweight_name = format!("{prefix}.qweight");
    if src.info(&qweight_name).is_none() {
        return Ok(None);
    }
    let (n, k, g) = (out_features, in_features, cfg.group_size);
    let err = |name: &str, msg: String| Error::tensor(src.file_of(name), name, msg);
    if k == 0 || n == 0 || !k.is_multiple_of(g) {
        return Err(err(
            &qweight_name,
            format!(
                "group_size {g} does not divide in_features K={k}; AWQ needs full groups \
                 (layer [N={n}, K={k}])"
            ),
        ));
    }
    let groups = k / g;
    let (codes, zeros, scales) = match cfg.version {
        AwqVersion::Gemm => read_gemm(src, prefix, n, k, groups)?,
        AwqVersion::Gemv => read_gemv(src, prefix, n, k, g)?,
        AwqVersion::GemvFast => read_gemv_fast(src, prefix, n, k, g)?,
    };
    Ok(Some(QuantizedLinear {
        bits: AWQ_BITS,
        group_size: GroupSize::Size(g),
        n,
        k,
        codes,
        scales,
        zeros,
        g_idx: (0..k).map(|c| (c / g) as u32).collect(),
    }))
}

/// Codes `[N, K]`, zeros `[G, N]`, scales `[G, N]`.
type Unpacked = (Vec<u8>, Vec<u32>, Vec<f32>);

fn need_multiple(src: &dyn WeightSource, name: &str, what: &str, v: usize, m: usize) -> Result<()> {
    if v.is_multiple_of(m) {
        Ok(())
    } else {
        Err(Error::tensor(
            src.file_of(name),
            name,
            format!("{what}={v} is not a multiple of {m}, which this AWQ layout needs"),
        ))
    }
}

fn read_gemm(
    src: &dyn WeightSource,
    prefix: &str,
    n: usize,
    k: usize,
    groups: usize,
) -> Result<Unpacked> {
    let qweight_name = format!("{prefix}.qweight");
    let qzeros_name = format!("{prefix}.qzeros");
    need_multiple(src, &qweight_name, "out_features N", n, 8)?;
    let words = read_int(src, &qweight_name, &[k, n / 8], DType::I32)?;
    let zwords = read_int(src, &qzeros_name, &[groups, n / 8], DType::I32)?;
    let scales = read_scales(src, &format!("{prefix}.scales"), &[groups, n])?;
    let by_k = unpack_gemm(&words, k, n);
    let mut codes = vec![0u8; n * k];
    for col in 0..k {
        for row in 0..n {
            codes[row * k + col] = by_k[col * n + row];
        }
    }
    let zeros = unpack_gemm(&zwords, groups, n)
        .into_iter()
        .map(u32::from)
        .collect();
    Ok((codes, zeros, scales))
}

fn read_gemv(
    src: &dyn WeightSource,
    prefix: &str,
    n: usize,
    k: usize,
    g: usize,
) -> Result<Unpacked> {
    let qweight_name = format!("{prefix}.qweight");
    let qzeros_name = format!("{prefix}.qzeros");
    let scales_name = format!("{prefix}.scales");
    need_multiple(src, &qweight_name, "in_features K", k, 8)?;
    let groups = k / g;
    let zw = zeros_width(k, g).ok_or_else(|| {
        Error::tensor(
            src.file_of(&qzeros_name),
            &qzeros_name,
            format!("AWQ GEMV has no layout for group_size {g} (32, 64 or ≥ 128)"),
        )
    })?;
    let words = read_int(src, &qweight_name, &[n, k / 8], DType::I32)?;
    let zwords = read_int(src, &qzeros_name, &[n, zw], DType::I32)?;
    let padded = read_scales(src, &scales_name, &[n, zw * 8])?;
    let mut codes = vec![0u8; n * k];
    for row in 0..n {
        for col in 0..k {
            let w = words[row * (k / 8) + col / 8] as u32;
            codes[row * k + col] = ((w >> (4 * (col % 8))) & 0xF) as u8;
        }
    }
    let mut zeros = vec![0u32; groups * n];
    let mut scales = vec![0f32; groups * n];
    for row in 0..n {
        for grp in 0..groups {
            let w = zwords[row * zw + grp / 8] as u32;
            zeros[grp * n + row] = (w >> (4 * (grp % 8))) & 0xF;
            scales[grp * n + row] = padded[row * zw * 8 + grp];
        }
    }
    Ok((codes, zeros, scales))
}

/// Position of `q[k, n]` in a GEMV_FAST `qweight [N/4, K]` (int16 words of 4 nibbles): returns
/// (row, column, nibble). Derived from AutoAWQ's `pack_intweight` (docs/formats.md §2.3): within each
/// 32 input channels, channel `8d + 2gq + e` sits at position `8gq + 4e + d`; every 64 such
/// positions of 4 consecutive output rows are interleaved nibble by nibble.
pub fn gemv_fast_position(k: usize, n: usize) -> (usize, usize, usize) {
    let (c, r) = (k / 32, k % 32);
    let (d, gq, e) = (r / 8, (r % 8) / 2, r % 2);
    let kp = 32 * c + 8 * gq + 4 * e + d;
    let (kb, j) = (kp / 64, kp % 64);
    let f = (n % 4) * 64 + j;
    (n / 4, 64 * kb + f / 4, f % 4)
}

fn read_gemv_fast(
    src: &dyn WeightSource,
    prefix: &str,
    n: usize,
    k: usize,
    g: usize,
) -> Result<Unpacked> {
    let qweight_name = format!("{prefix}.qweight");
    let scales_name = format!("{prefix}.scales");
    // AutoAWQ calls the zero term `qzeros`, llm-awq `scaled_zeros`.
    let zeros_name = [format!("{prefix}.qzeros"), format!("{prefix}.scaled_zeros")]
        .into_iter()
        .find(|name| src.info(name).is_some())
        .unwrap_or_else(|| format!("{prefix}.qzeros"));
    need_multiple(src, &qweight_name, "out_features N", n, 4)?;
    need_multiple(src, &qweight_name, "in_features K", k, 64)?;
    let groups = k / g;
    let zw = zeros_width(k, g).ok_or_else(|| {
        Error::tensor(
            src.file_of(&zeros_name),
            &zeros_name,
            format!("AWQ GEMV_FAST has no layout for group_size {g} (32, 64 or ≥ 128)"),
        )
    })?;
    let words = read_int(src, &qweight_name, &[n / 4, k], DType::I16)?;
    let padded_scales = read_scales(src, &scales_name, &[zw * 8, n])?;
    let zero_dtype = crate::formats::require_shape(
        src,
        &zeros_name,
        &[zw * 8, n],
        "the layer and AWQ config imply",
    )?
    .dtype;
    let stored_zeros = read_scales(src, &zeros_name, &[zw * 8, n])?;
    let mut codes = vec![0u8; n * k];
    for row in 0..n {
        for col in 0..k {
            let (r, c, t) = gemv_fast_position(col, row);
            let w = words[r * k + c] as u16;
            codes[row * k + col] = ((w >> (4 * t)) & 0xF) as u8;
        }
    }
    let scales = padded_scales[..groups * n].to_vec();
    let mut zeros = vec![0u32; groups * n];
    for (i, z) in zeros.iter_mut().enumerate() {
        let (s, stored) = (scales[i], stored_zeros[i]);
        let bad = |why: &str| {
            Error::tensor(
                src.file_of(&zeros_name),
                &zeros_name,
                format!(
                    "group {}, output {}: {stored} is not −scale·z for an integer zero point 0..15 \
                     (scale {s}): {why}",
                    i / n,
                    i % n
                ),
            )
        };
        let zf = if s == 0.0 { 0.0 } else { (-stored / s).round() };
        if !(0.0..=15.0).contains(&zf) {
            return Err(bad("out of range"));
        }
        let expected = -(s * zf);
        if WeightDType::from_storage(zero_dtype).map_or(expected, |d| d.round(expected)) != stored {
            return Err(bad("the stored value is not its rounding"));
        }
        *z = zf as u32;
    }
    Ok((codes, zeros, scales))
}

/// Integer tensor of `dtype` (I32 or I16) with `shape`, as i32 values (I16 sign-extended).
fn read_int(src: &dyn WeightSource, name: &str, shape: &[usize], dtype: DType) -> Result<Vec<i32>> {
    let info = crate::formats::require_shape(src, name, shape, "the layer and AWQ config imply")?;
    if info.dtype != dtype {
        return Err(Error::tensor(
            src.file_of(name),
            name,
            format!(
                "dtype {:?}; this AWQ layout packs into {dtype:?}",
                info.dtype
            ),
        ));
    }
    let raw = src.read(name)?;
    Ok(match dtype {
        DType::I16 => raw
            .data
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]) as i32)
            .collect(),
        _ => raw
            .data
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    })
}

/// Float tensor (F16, BF16 or F32) with `shape`, finite, as f32.
fn read_scales(src: &dyn WeightSource, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let info = crate::formats::require_shape(src, name, shape, "the layer and AWQ config imply")?;
    if !matches!(info.dtype, DType::F16 | DType::BF16 | DType::F32) {
        return Err(Error::tensor(
            src.file_of(name),
            name,
            format!(
                "dtype {:?}; must be float16, bfloat16 or float32",
                info.dtype
            ),
        ));
    }
    let values = src.read(name)?.to_f32();
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::tensor(
            src.file_of(name),
            name,
            format!(
                "non-finite value {} at row {}, column {}",
                values[i],
                i / shape[1],
                i % shape[1]
            ),
        ));
    }
    Ok(values)
}
