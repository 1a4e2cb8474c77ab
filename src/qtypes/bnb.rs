//! bitsandbytes-style quantization without calibration (docs/formats.md §3): NF4/FP4 blockwise
//! 4-bit with optional double quantization of the block statistics, and LLM.int8 row-wise 8-bit
//! weights with outlier decomposition at run time.
//!
//! Every step reproduces what bitsandbytes 0.50 computes on the CPU, bit for bit, so checkpoints
//! written here are byte-identical to those transformers + bitsandbytes write for the same
//! weights (checked in `tests/bnb.rs` against `scripts/golden/make_bnb_golden.py`):
//!
//! * 4-bit codes: absmax per block of the flattened weight, `x · (1/absmax)` clamped to [−1, 1],
//!   then the code whose bucket holds it, buckets split at the float32 midpoints of the sorted code
//!   book with ties going to the lower bucket (`torch.bucketize`). The short last block divides by
//!   its absmax instead (and stores it clamped to ≥ 1e−38), as the reference does.
//! * Double quantization: `offset = mean(absmax)` with torch's float32 cascade sum (8 lanes,
//!   single-threaded below 32,768 statistics), then 8-bit blockwise quantization
//!   (blocks of 256) of `absmax − offset` with bitsandbytes' CPU kernel: a 65,536-entry lookup table
//!   on the normalised value, index `trunc(fma((v + 1)·0.5, 65535, 0.5))`.
//! * LLM.int8 weights: the weight rounded to fp16, `SCB` = row absmax, codes
//!   `round_half_even(w · ((1/SCB)·127))`.

use crate::error::{Error, Result};
use crate::tensor::WeightDType;
use half::f16;

/// 4-bit code book.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FourBitType {
    #[default]
    Nf4,
    Fp4,
}

/// NF4 code values by code index (`get_4bit_type("nf4")`).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// FP4 (1 sign, 2 exponent, 1 mantissa bit) by code index: the raw values divided by their
/// largest magnitude, 12, in float32. Index 8 is the "negative zero" slot but holds +0: the
/// reference builds the table from the Python integer `-0`.
pub const FP4_CODE: [f32; 16] = [
    0.0,
    0.0625 / 12.0,
    8.0 / 12.0,
    1.0, // 12 / 12
    4.0 / 12.0,
    6.0 / 12.0,
    2.0 / 12.0,
    3.0 / 12.0,
    0.0,
    -0.0625 / 12.0,
    -8.0 / 12.0,
    -1.0, // -12 / 12
    -4.0 / 12.0,
    -6.0 / 12.0,
    -2.0 / 12.0,
    -3.0 / 12.0,
];

/// Code indices in ascending value order, as `torch.argsort` orders them in the reference.
/// For FP4 the two zeros (codes 0 and 8) tie and keep their order, so the bucket just above 0
/// maps to code 8.
const NF4_ORDER: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
const FP4_ORDER: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

impl FourBitType {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "nf4" => Ok(FourBitType::Nf4),
            "fp4" => Ok(FourBitType::Fp4),
            other => Err(Error::InvalidArgument(format!(
                "unknown 4-bit quant type `{other}` (use nf4 or fp4)"
            ))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            FourBitType::Nf4 => "nf4",
            FourBitType::Fp4 => "fp4",
        }
    }
    /// The code book by code index.
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            FourBitType::Nf4 => &NF4_CODE,
            FourBitType::Fp4 => &FP4_CODE,
        }
    }
    fn order(self) -> &'static [u8; 16] {
        match self {
            FourBitType::Nf4 => &NF4_ORDER,
            FourBitType::Fp4 => &FP4_ORDER,
        }
    }
}

/// How a layer loaded in 8 bits computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Int8Compute {
    /// LLM.int8: activations quantized per row to int8 (outlier columns kept in float),
    /// int8 × int8 products with int32 sums (bitsandbytes' `MatMul8bitLt`).
    #[default]
    Int8Matmul,
    /// Weights dequantized to float, activations left as they are (bitsandbytes' `MatMul8bitFp`).
    DequantizedWeights,
}

/// bitsandbytes' `llm_int8_threshold` default.
pub const DEFAULT_INT8_THRESHOLD: f32 = 6.0;

/// Mirrors transformers' `BitsAndBytesConfig`.
#[derive(Clone, Debug, PartialEq)]
pub struct BitsAndBytesConfig {
    pub load_in_8bit: bool,
    pub load_in_4bit: bool,
    pub quant_type: FourBitType,
    pub double_quant: bool,
    /// Rounding applied to dequantized 4-bit weights, activations and outputs (accumulation is
    /// always f32). `bnb_4bit_compute_dtype`.
    pub compute_dtype: WeightDType,
    /// LLM.int8 outlier threshold; 0 disables the decomposition.
    pub int8_threshold: f32,
    /// Module name suffixes kept in float; `lm_head` (and a tied output embedding) always are.
    pub skip_modules: Vec<String>,
    /// Elements per 4-bit block (bitsandbytes' default 64; 32…4096, powers of two). transformers'
    /// config has no such key; checkpoints record it per tensor.
    pub blocksize: usize,
    /// How 8-bit layers compute.
    pub int8_compute: Int8Compute,
}

impl Default for BitsAndBytesConfig {
    fn default() -> Self {
        BitsAndBytesConfig {
            load_in_8bit: false,
            load_in_4bit: false,
            quant_type: FourBitType::Nf4,
            double_quant: false,
            compute_dtype: WeightDType::F32,
            int8_threshold: DEFAULT_INT8_THRESHOLD,
            skip_modules: vec!["lm_head".into()],
            blocksize: DEFAULT_BLOCKSIZE,
            int8_compute: Int8Compute::Int8Matmul,
        }
    }
}

/// bitsandbytes' default 4-bit blocksize.
pub const DEFAULT_BLOCKSIZE: usize = 64;
/// Blocksizes bitsandbytes accepts for 4-bit quantization.
pub const VALID_BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];
/// Statistics per block in double quantization.
pub const NESTED_BLOCKSIZE: usize = 256;

/// Refuse a blocksize bitsandbytes would refuse.
pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if VALID_BLOCKSIZES.contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "unsupported 4-bit blocksize {blocksize} (bitsandbytes accepts {VALID_BLOCKSIZES:?})"
        )))
    }
}

impl BitsAndBytesConfig {
    /// A 4-bit configuration.
    pub fn four_bit(quant_type: FourBitType, double_quant: bool) -> Self {
        BitsAndBytesConfig {
            load_in_4bit: true,
            quant_type,
            double_quant,
            ..Default::default()
        }
    }
    /// An 8-bit (LLM.int8) configuration with the given outlier threshold.
    pub fn eight_bit(threshold: f32) -> Self {
        BitsAndBytesConfig {
            load_in_8bit: true,
            int8_threshold: threshold,
            ..Default::default()
        }
    }

    /// Exactly one of 8 and 4 bits, a valid blocksize, a usable threshold.
    pub fn validate(&self) -> Result<()> {
        match (self.load_in_4bit, self.load_in_8bit) {
            (true, true) => {
                return Err(Error::InvalidArgument(
                    "load_in_4bit and load_in_8bit are both set; choose one".into(),
                ))
            }
            (false, false) => {
                return Err(Error::InvalidArgument(
                    "a bitsandbytes config needs load_in_4bit or load_in_8bit".into(),
                ))
            }
            _ => {}
        }
        check_blocksize(self.blocksize)?;
        if !(self.int8_threshold.is_finite() && self.int8_threshold >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "llm_int8_threshold must be finite and ≥ 0, got {}",
                self.int8_threshold
            )));
        }
        Ok(())
    }

    /// Whether the linear layer `prefix` stays in float: the output projection always (`lm_head`,
    /// GPT-NeoX's `embed_out`), and any module whose dotted name equals or ends with an entry of
    /// `skip_modules` (or lies under one).
    pub fn skips(&self, prefix: &str) -> bool {
        prefix == "lm_head"
            || prefix == "embed_out"
            || self.skip_modules.iter().any(|s| module_matches(prefix, s))
    }

    /// Short storage name for reports: "bnb-nf4", "bnb-fp4-dq", "bnb-int8".
    pub fn method_name(&self) -> String {
        if self.load_in_8bit {
            "bnb-int8".into()
        } else {
            format!(
                "bnb-{}{}",
                self.quant_type.name(),
                if self.double_quant { "-dq" } else { "" }
            )
        }
    }

    /// `quantization_config` as transformers 5 writes it (`BitsAndBytesConfig.to_dict()`),
    /// keys sorted as in `config.json`.
    pub fn to_quantization_config(&self) -> serde_json::Value {
        let skip = if self.skip_modules.is_empty()
            || self.skip_modules == BitsAndBytesConfig::default().skip_modules
        {
            serde_json::Value::Null
        } else {
            serde_json::json!(self.skip_modules)
        };
        let mut m = serde_json::Map::new();
        m.insert("_load_in_4bit".into(), self.load_in_4bit.into());
        m.insert("_load_in_8bit".into(), self.load_in_8bit.into());
        m.insert(
            "bnb_4bit_compute_dtype".into(),
            self.compute_dtype.torch_name().into(),
        );
        m.insert("bnb_4bit_quant_storage".into(), "uint8".into());
        m.insert(
            "bnb_4bit_quant_type".into(),
            // transformers' default is fp4; an 8-bit config keeps that default.
            if self.load_in_4bit {
                self.quant_type.name()
            } else {
                "fp4"
            }
            .into(),
        );
        m.insert(
            "bnb_4bit_use_double_quant".into(),
            (self.load_in_4bit && self.double_quant).into(),
        );
        m.insert("llm_int8_enable_fp32_cpu_offload".into(), false.into());
        m.insert("llm_int8_has_fp16_weight".into(), false.into());
        m.insert("llm_int8_skip_modules".into(), skip);
        m.insert(
            "llm_int8_threshold".into(),
            serde_json::Value::from(self.int8_threshold as f64),
        );
        m.insert("load_in_4bit".into(), self.load_in_4bit.into());
        m.insert("load_in_8bit".into(), self.load_in_8bit.into());
        m.insert("quant_method".into(), "bitsandbytes".into());
        serde_json::Value::Object(m)
    }
}

/// `name` is `module` or ends with `.module`, or lies under it (`module.` prefix / `.module.`).
fn module_matches(name: &str, module: &str) -> bool {
    if module.is_empty() {
        return false;
    }
    name == module
        || name.ends_with(&format!(".{module}"))
        || name.starts_with(&format!("{module}."))
        || name.contains(&format!(".{module}."))
}

// ---------------------------------------------------------------------------------------------
// 4-bit

/// The float32 midpoints between consecutive codes in ascending order (the bucket edges).
fn bucket_edges(t: FourBitType) -> [f32; 15] {
    let (code, order) = (t.code(), t.order());
    std::array::from_fn(|i| (code[order[i] as usize] + code[order[i + 1] as usize]) / 2.0)
}

/// Code of a normalised value: the bucket index is the number of edges strictly below `v`.
#[inline]
fn encode(v: f32, edges: &[f32; 15], order: &[u8; 16]) -> u8 {
    let below = edges.iter().filter(|&&e| e < v).count();
    order[below]
}

/// The absmax statistics of a 4-bit weight, plain or double-quantized.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    Nested(NestedAbsmax),
}

/// Double-quantized absmax: 8-bit codes into `map` scaled per block of `blocksize` statistics,
/// plus a global offset.
#[derive(Clone, Debug, PartialEq)]
pub struct NestedAbsmax {
    pub codes: Vec<u8>,
    pub nested_absmax: Vec<f32>,
    /// The 256-entry dynamic map (`nested_quant_map`).
    pub map: Vec<f32>,
    pub offset: f32,
    pub blocksize: usize,
}

impl NestedAbsmax {
    /// Statistic `b`: `map[code] · nested_absmax[b / blocksize] + offset`, in f32 with both
    /// roundings, as bitsandbytes reconstructs it.
    #[inline]
    pub fn get(&self, b: usize) -> f32 {
        self.map[self.codes[b] as usize] * self.nested_absmax[b / self.blocksize] + self.offset
    }
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.codes.len()).map(|b| self.get(b)).collect()
    }
    pub fn storage_bytes(&self) -> usize {
        self.codes.len() + 4 * (self.nested_absmax.len() + self.map.len()) + 4
    }
}

impl Absmax {
    /// Statistic `b` as bitsandbytes uses it (double quantization undone).
    #[inline]
    pub fn get(&self, b: usize) -> f32 {
        match self {
            Absmax::Plain(v) => v[b],
            Absmax::Nested(n) => n.get(b),
        }
    }
    pub fn len(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len(),
            Absmax::Nested(n) => n.codes.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The float32 statistics.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Absmax::Plain(v) => v.clone(),
            Absmax::Nested(n) => n.dequantize(),
        }
    }
    pub fn storage_bytes(&self) -> usize {
        match self {
            Absmax::Plain(v) => 4 * v.len(),
            Absmax::Nested(n) => n.storage_bytes(),
        }
    }
}

/// A 4-bit weight as bitsandbytes holds it: packed codes of the flattened `[N, K]` weight (first
/// element in the high nibble), block statistics, and the quant state fields.
#[derive(Clone, Debug, PartialEq)]
pub struct FourBitWeight {
    pub quant_type: FourBitType,
    pub blocksize: usize,
    /// `[N, K]` (out, in).
    pub shape: [usize; 2],
    /// The weight's dtype before quantization (the quant state's `dtype`). bitsandbytes'
    /// `dequantize_4bit` returns that dtype, but its matmul dequantizes to the compute dtype.
    pub dtype: WeightDType,
    /// `(N·K + 1) / 2` bytes.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
    /// The code book (`quant_map`); readers use the stored copy.
    pub quant_map: [f32; 16],
}

impl FourBitWeight {
    pub fn numel(&self) -> usize {
        self.shape[0] * self.shape[1]
    }
    /// Code of flattened element `i`.
    #[inline]
    pub fn code_at(&self, i: usize) -> u8 {
        let b = self.packed[i / 2];
        if i.is_multiple_of(2) {
            b >> 4
        } else {
            b & 0x0F
        }
    }
    /// `quant_map[code] · absmax[block]` for every element, `[N, K]` row-major, in f32 (not yet
    /// rounded to `dtype`).
    pub fn dequantize(&self) -> Vec<f32> {
        let absmax = self.absmax.to_f32();
        (0..self.numel())
            .map(|i| self.quant_map[self.code_at(i) as usize] * absmax[i / self.blocksize])
            .collect()
    }
    /// Bytes held: packed codes, statistics, code book.
    pub fn storage_bytes(&self) -> usize {
        self.packed.len() + self.absmax.storage_bytes() + 16 * 4
    }
    /// "bnb-nf4", "bnb-fp4-dq", with "-b128" for a non-default blocksize.
    pub fn storage_name(&self) -> String {
        let mut s = format!("bnb-{}", self.quant_type.name());
        if matches!(self.absmax, Absmax::Nested(_)) {
            s.push_str("-dq");
        }
        if self.blocksize != DEFAULT_BLOCKSIZE {
            s.push_str(&format!("-b{}", self.blocksize));
        }
        s
    }
    /// Structural checks a reader applies to tensors from a file (lengths, finiteness).
    pub fn validate(&self) -> Result<()> {
        check_blocksize(self.blocksize)?;
        let n = self.numel();
        if self.packed.len() != n.div_ceil(2) {
            return Err(Error::InvalidArgument(format!(
                "packed weight has {} bytes but shape {:?} needs {}",
                self.packed.len(),
                self.shape,
                n.div_ceil(2)
            )));
        }
        let nb = n.div_ceil(self.blocksize);
        if self.absmax.len() != nb {
            return Err(Error::InvalidArgument(format!(
                "absmax has {} entries but shape {:?} with blocksize {} needs {nb}",
                self.absmax.len(),
                self.shape,
                self.blocksize
            )));
        }
        if let Absmax::Nested(nested) = &self.absmax {
            if nested.blocksize == 0 {
                return Err(Error::InvalidArgument("nested_blocksize is 0".into()));
            }
            let want = nb.div_ceil(nested.blocksize);
            if nested.nested_absmax.len() != want {
                return Err(Error::InvalidArgument(format!(
                    "nested_absmax has {} entries but {nb} statistics in blocks of {} need {want}",
                    nested.nested_absmax.len(),
                    nested.blocksize
                )));
            }
            if nested.map.len() != 256 {
                return Err(Error::InvalidArgument(format!(
                    "nested_quant_map has {} entries, expected 256",
                    nested.map.len()
                )));
            }
        }
        let absmax = self.absmax.to_f32();
        if let Some(i) = absmax.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "absmax[{i}] is {} (not finite)",
                absmax[i]
            )));
        }
        if let Some(i) = self.quant_map.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "quant_map[{i}] is not finite"
            )));
        }
        Ok(())
    }
}

/// Quantize `w` (`[N, K]` row-major, already rounded to `dtype` if it came from a 16-bit
/// checkpoint) to 4 bits exactly as `bitsandbytes.functional.quantize_4bit` on the CPU.
pub fn quantize_4bit(
    w: &[f32],
    shape: [usize; 2],
    dtype: WeightDType,
    quant_type: FourBitType,
    blocksize: usize,
    double_quant: bool,
) -> Result<FourBitWeight> {
    check_blocksize(blocksize)?;
    let n = shape[0] * shape[1];
    if w.len() != n || n == 0 {
        return Err(Error::InvalidArgument(format!(
            "weight has {} values but shape {shape:?} needs {n} (and must not be empty)",
            w.len()
        )));
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "non-finite weight {} at row {}, column {} of {shape:?}",
            w[i],
            i / shape[1],
            i % shape[1]
        )));
    }
    let edges = bucket_edges(quant_type);
    let order = quant_type.order();
    let nb = n.div_ceil(blocksize);
    let full = n / blocksize;
    let mut absmax = vec![0f32; nb];
    let mut codes = vec![0u8; n + n % 2];
    const TINY: f32 = 1e-38;
    for b in 0..nb {
        let block = &w[b * blocksize..((b + 1) * blocksize).min(n)];
        let out = &mut codes[b * blocksize..b * blocksize + block.len()];
        let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        if b < full {
            // Full blocks: multiply by the reciprocal of the (clamped) absmax.
            let inv = 1.0 / am.max(TINY);
            for (c, &x) in out.iter_mut().zip(block) {
                *c = encode((x * inv).clamp(-1.0, 1.0), &edges, order);
            }
            absmax[b] = am;
        } else {
            // The short last block divides, and keeps the clamped absmax.
            let am = am.max(TINY);
            for (c, &x) in out.iter_mut().zip(block) {
                *c = encode((x / am).clamp(-1.0, 1.0), &edges, order);
            }
            absmax[b] = am;
        }
    }
    if n % 2 == 1 {
        codes[n] = encode(0.0, &edges, order);
    }
    let packed = codes.chunks_exact(2).map(|p| (p[0] << 4) | p[1]).collect();
    let absmax = if double_quant {
        Absmax::Nested(double_quantize(&absmax))
    } else {
        Absmax::Plain(absmax)
    };
    Ok(FourBitWeight {
        quant_type,
        blocksize,
        shape,
        dtype,
        packed,
        absmax,
        quant_map: *quant_type.code(),
    })
}

/// Double quantization of block statistics (`compress_statistics=True`).
pub fn double_quantize(absmax: &[f32]) -> NestedAbsmax {
    let offset = torch_mean_f32(absmax);
    let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let map = dynamic_map_signed();
    let (codes, nested_absmax) = quantize_blockwise_8bit_cpu(&centred, &map, NESTED_BLOCKSIZE);
    NestedAbsmax {
        codes,
        nested_absmax,
        map: map.to_vec(),
        offset,
        blocksize: NESTED_BLOCKSIZE,
    }
}

/// bitsandbytes' CPU 8-bit blockwise quantizer (`quantize_cpu_impl<float>`): per block the
/// absmax, then each value times `1/absmax` looked up in a table of 65,536 evenly spaced points
/// of [−1, 1] that holds the nearest code (ties between codes go to the lower one). An all-zero
/// block gets code 0 everywhere.
pub fn quantize_blockwise_8bit_cpu(
    values: &[f32],
    map: &[f32; 256],
    blocksize: usize,
) -> (Vec<u8>, Vec<f32>) {
    let lut = blockwise_lut(map);
    let mut codes = vec![0u8; values.len()];
    let mut absmax = Vec::with_capacity(values.len().div_ceil(blocksize));
    for (block, out) in values.chunks(blocksize).zip(codes.chunks_mut(blocksize)) {
        let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(am);
        if am == 0.0 {
            continue;
        }
        let inv = 1.0 / am;
        for (c, &v) in out.iter_mut().zip(block) {
            let t = ((v * inv).clamp(-1.0, 1.0) + 1.0) * 0.5;
            // The compiled kernel fuses this multiply-add (one rounding) before truncating.
            let idx = t.mul_add(65535.0, 0.5) as i32 as u16;
            *c = lut[idx as usize];
        }
    }
    (codes, absmax)
}

/// The kernel's table: entry i is the code for `2i/65535 − 1` (in f32), advancing past every
/// midpoint strictly below it.
fn blockwise_lut(map: &[f32; 256]) -> Vec<u8> {
    let mids: Vec<f32> = map.windows(2).map(|p| (p[0] + p[1]) * 0.5).collect();
    let mut lut = vec![0u8; 65536];
    let mut code = 0usize;
    for (i, slot) in lut.iter_mut().enumerate() {
        let fi = i as f32;
        let v = (fi + fi) / 65535.0 - 1.0;
        while code < 255 && mids[code] < v {
            code += 1;
        }
        *slot = code as u8;
    }
    lut
}

/// `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`: for i = 0…6 the means
/// of consecutive points of `torch.linspace(0.1, 1, 2^i + 1)` (float32) times `10^(i−6)`, both
/// signs, plus 0 and 1, sorted.
pub fn dynamic_map_signed() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7 {
        let pts = torch_linspace_f32(0.1, 1.0, (1usize << i) + 1);
        // Python's `10 ** (i − 6)`, a float, used as a float32 scalar.
        let scale = [1e-6f64, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0][i] as f32;
        let means: Vec<f32> = pts.windows(2).map(|p| (p[0] + p[1]) / 2.0).collect();
        data.extend(means.iter().map(|m| scale * m));
        data.extend(means.iter().map(|m| -scale * m));
    }
    data.push(0.0);
    data.push(1.0);
    debug_assert_eq!(data.len(), 256);
    data.sort_by(|a, b| a.total_cmp(b));
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// `torch.linspace(start, end, steps, dtype=float32)` on the CPU: `start + step·i` for the first
/// half and `end − step·(steps − 1 − i)` for the rest, `step = (end − start)/(steps − 1)` in f32,
/// each point one fused multiply-add (as the compiled kernel computes it; checked against torch
/// by the golden dynamic map).
fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if steps == 1 {
        return vec![s];
    }
    let step = (e - s) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, s)
            } else {
                (-step).mul_add((steps - i - 1) as f32, e)
            }
        })
        .collect()
}

/// `torch.mean` of a contiguous float32 vector on the CPU: the cascade sum (8-lane vectors — torch
/// dispatches its sum kernel at AVX2 width even on AVX-512 machines — 4 interleaved accumulators,
/// levels of 16) divided by n in f32. Exact for the single-threaded
/// case (fewer than 32,768 values); beyond that torch splits the sum across threads and the
/// result depends on the thread count, so this stays a close approximation there.
pub fn torch_mean_f32(x: &[f32]) -> f32 {
    if x.is_empty() {
        return f32::NAN;
    }
    torch_sum_f32(x) / x.len() as f32
}

/// torch's float32 `sum` of a contiguous vector (see [`torch_mean_f32`]).
pub fn torch_sum_f32(x: &[f32]) -> f32 {
    const W: usize = 8;
    let n = x.len();
    if n < W {
        return row_sum(n, |i| [x[i]])[0];
    }
    let vecs = n / W;
    let lanes = row_sum(vecs, |i| -> [f32; W] {
        std::array::from_fn(|l| x[i * W + l])
    });
    let mut total = 0f32;
    for &v in &x[vecs * W..] {
        total += v;
    }
    for l in lanes {
        total += l;
    }
    total
}

/// torch's `row_sum`: the row seen as `[-1, 4]`, four column sums by `multi_row_sum`, the tail
/// added to the first, then the four combined. `load(i)` yields element i (a vector of lanes).
fn row_sum<const L: usize>(size: usize, load: impl Fn(usize) -> [f32; L]) -> [f32; L] {
    const ILP: usize = 4;
    let size_ilp = size / ILP;
    let mut partial = multi_row_sum::<L, ILP>(size_ilp, |i, k| load(i * ILP + k));
    for i in size_ilp * ILP..size {
        add_lanes(&mut partial[0], &load(i));
    }
    let mut acc = partial[0];
    for p in &partial[1..] {
        add_lanes(&mut acc, p);
    }
    acc
}

fn add_lanes<const L: usize>(a: &mut [f32; L], b: &[f32; L]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// torch's `multi_row_sum`: `R` running sums over `size` steps, folded into four levels of
/// accumulators every `2^level_power` steps so only similar magnitudes are added.
fn multi_row_sum<const L: usize, const R: usize>(
    size: usize,
    load: impl Fn(usize, usize) -> [f32; L],
) -> [[f32; L]; R] {
    const LEVELS: usize = 4;
    let ceil_log2 = if size <= 2 {
        1
    } else {
        (usize::BITS - (size - 1).leading_zeros()) as usize
    };
    let level_power = 4.max(ceil_log2 / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; L]; R]; LEVELS];
    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                add_lanes(a, &load(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            for (lo, up) in lower[j - 1].iter_mut().zip(upper[0].iter_mut()) {
                add_lanes(up, lo);
                *lo = [0f32; L];
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for (k, a) in acc[0].iter_mut().enumerate() {
            add_lanes(a, &load(i, k));
        }
        i += 1;
    }
    let (first, rest) = acc.split_at_mut(1);
    for level in rest.iter() {
        for (a, u) in first[0].iter_mut().zip(level) {
            add_lanes(a, u);
        }
    }
    acc[0]
}

/// Bits per weight a 4-bit layout costs with its statistics: 4 + 32/blocksize, or with double
/// quantization 4 + 8/blocksize + 32/(256·blocksize) (the shared 256- and 16-entry tables and
/// the offset are a constant per layer and left out): 4.5 and ≈4.127 at blocksize 64.
pub fn four_bit_bits_per_weight(blocksize: usize, double_quant: bool) -> f64 {
    let b = blocksize as f64;
    if double_quant {
        4.0 + 8.0 / b + 32.0 / (NESTED_BLOCKSIZE as f64 * b)
    } else {
        4.0 + 32.0 / b
    }
}

// ---------------------------------------------------------------------------------------------
// 8-bit (LLM.int8)

/// An LLM.int8 weight: row-wise int8 codes and the row absmax `SCB`.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Weight {
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// `[N, K]` row-major.
    pub codes: Vec<i8>,
    /// `[N]`: absmax of each row after rounding the weight to fp16.
    pub scb: Vec<f32>,
}

/// `round_half_even(v · scale)` as int8; NaN (an all-zero row, `0 · ∞`) becomes 0 as in torch.
#[inline]
pub(crate) fn int8_code(v: f32, scale: f32) -> i8 {
    let r = (v * scale).round_ties_even();
    if r.is_nan() {
        0
    } else {
        r.clamp(-128.0, 127.0) as i8
    }
}

/// `127/absmax` the way the reference computes `127.0 / row_stats`: the reciprocal, times 127.
#[inline]
pub(crate) fn int8_scale(absmax: f32) -> f32 {
    (1.0 / absmax) * 127.0
}

/// Quantize `w` (`[N, K]`) as `Int8Params` does: round to fp16, row absmax, codes.
pub fn quantize_int8(w: &[f32], n: usize, k: usize) -> Result<Int8Weight> {
    if w.len() != n * k || n == 0 || k == 0 {
        return Err(Error::InvalidArgument(format!(
            "weight has {} values but shape [N={n}, K={k}] needs {} (and must not be empty)",
            w.len(),
            n * k
        )));
    }
    if let Some(i) = w
        .iter()
        .position(|v| !v.is_finite() || v.abs() > f16::MAX.to_f32())
    {
        return Err(Error::InvalidArgument(format!(
            "weight {} at row {}, column {} of [N={n}, K={k}] is not finite in fp16, which \
             LLM.int8 quantizes from",
            w[i],
            i / k,
            i % k
        )));
    }
    let mut codes = vec![0i8; n * k];
    let mut scb = vec![0f32; n];
    let mut row16 = vec![0f32; k];
    for r in 0..n {
        for (d, &v) in row16.iter_mut().zip(&w[r * k..(r + 1) * k]) {
            *d = f16::from_f32(v).to_f32();
        }
        let am = row16.iter().fold(0f32, |m, v| m.max(v.abs()));
        scb[r] = am;
        let scale = int8_scale(am);
        for (c, &v) in codes[r * k..(r + 1) * k].iter_mut().zip(&row16) {
            *c = int8_code(v, scale);
        }
    }
    Ok(Int8Weight { n, k, codes, scb })
}

impl Int8Weight {
    /// `CB · SCB / 127` as `int8_vectorwise_dequant`: `(CB · SCB) · (1/127 in f32)`.
    pub fn dequantize(&self) -> Vec<f32> {
        let c = INV_127;
        let mut out = Vec::with_capacity(self.n * self.k);
        for r in 0..self.n {
            let s = self.scb[r];
            out.extend(
                self.codes[r * self.k..(r + 1) * self.k]
                    .iter()
                    .map(|&q| (q as f32 * s) * c),
            );
        }
        out
    }
    /// `CB · (SCB · 1/127)` as `MatMul8bitFp` dequantizes (the "int8 weights, float
    /// activations" mode); differs from [`Int8Weight::dequantize`] only in rounding order.
    pub fn dequantize_fp(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.n * self.k);
        for r in 0..self.n {
            let s = self.scb[r] * INV_127;
            out.extend(
                self.codes[r * self.k..(r + 1) * self.k]
                    .iter()
                    .map(|&q| q as f32 * s),
            );
        }
        out
    }
    pub fn validate(&self) -> Result<()> {
        if self.codes.len() != self.n * self.k || self.scb.len() != self.n {
            return Err(Error::InvalidArgument(format!(
                "int8 weight has {} codes and {} SCB entries; [N={}, K={}] needs {} and {}",
                self.codes.len(),
                self.scb.len(),
                self.n,
                self.k,
                self.n * self.k,
                self.n
            )));
        }
        if let Some(i) = self.scb.iter().position(|v| !v.is_finite() || *v < 0.0) {
            return Err(Error::InvalidArgument(format!(
                "SCB[{i}] = {} (must be finite and ≥ 0)",
                self.scb[i]
            )));
        }
        Ok(())
    }
}

/// 1/127 as the reference's float32 scalar (`7.874015718698502e-3` rounds to the same f32).
pub const INV_127: f32 = 1.0 / 127.0;
