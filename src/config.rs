//! AutoConfig: read `config.json`, dispatch on `model_type` to a typed configuration, and keep
//! every key we do not use so that a load/save round trip loses nothing.

use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// The model types we can build, with the family that implements each. Aliases share a family.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "llama", "mistral", "qwen2", "qwen3", "opt", "gpt2", "gpt_neox",
];

/// Bounds on the sizes a config may declare (docs/formats.md, "Config bounds"). They sit well
/// above every released model and far below what would make a size computation wrap around,
/// so a hostile `config.json` (or GGUF header) is refused before anything is allocated.
pub mod limits {
    pub const MAX_LAYERS: u64 = 1 << 12;
    pub const MAX_HIDDEN: u64 = 1 << 17;
    pub const MAX_INTERMEDIATE: u64 = 1 << 20;
    pub const MAX_VOCAB: u64 = 1 << 24;
    pub const MAX_HEADS: u64 = 1 << 12;
    pub const MAX_HEAD_DIM: u64 = 1 << 12;
    pub const MAX_POSITIONS: u64 = 1 << 24;
    /// Parameters of the whole model (about 4.4 trillion); the byte counts of every storage
    /// scheme then fit a `u64` with room to spare.
    pub const MAX_PARAMETERS: u128 = 1 << 42;
}

#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor` (transformers' "linear").
    Linear { factor: f64 },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// YaRN: frequencies blended between interpolated (÷ `factor`) and original by a linear
    /// ramp over the dimensions whose rotation count at `original_max_position_embeddings`
    /// lies between `beta_slow` and `beta_fast`; cos and sin scaled by `attention_factor`.
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        /// Given, or `0.1·ln(factor) + 1` (with `mscale`/`mscale_all_dim`: the ratio of the
        /// two such terms), 1 when `factor ≤ 1`.
        attention_factor: f64,
        /// Round the ramp's ends to whole dimensions (transformers' default, true).
        truncate: bool,
    },
}

/// Llama-style decoder (Llama 1-3, Mistral, SmolLM, Qwen2 with q/k/v biases, Qwen3 with a
/// per-head RMSNorm on queries and keys).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2 always; Llama and Qwen3 when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama and Qwen3 `attention_bias`; never in Qwen2).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// RMSNorm over each query and key head (weights `[head_dim]`, epsilon `rms_norm_eps`)
    /// between the q/k projections and the rotary embedding (Qwen3).
    pub qk_norm: bool,
    /// Sliding-window attention: a query at cache index `i` sees keys `j` with
    /// `i - window < j <= i` (Mistral on every layer; Qwen2 and Qwen3 on the layers they select).
    pub sliding_window: Option<usize>,
    /// Which layers use the window (empty when there is none).
    pub sliding_layers: Vec<bool>,
}

impl LlamaConfig {
    /// The attention window of decoder layer `i`, if it has one.
    pub fn layer_window(&self, i: usize) -> Option<usize> {
        self.sliding_window
            .filter(|_| self.sliding_layers.get(i).copied().unwrap_or(false))
    }
}

/// OPT decoder (facebook/opt-*): learned positions with offset 2, ReLU, optional post-LN and
/// a `word_embed_proj_dim` narrower than the hidden size (project_in/project_out).
#[derive(Clone, Debug, PartialEq)]
pub struct OptConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub ffn_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub do_layer_norm_before: bool,
    pub word_embed_proj_dim: usize,
    pub enable_bias: bool,
    pub layer_norm_elementwise_affine: bool,
    pub remove_final_layer_norm: bool,
    pub activation: Activation,
    pub tie_word_embeddings: bool,
}

/// GPT-2: learned positions, Conv1D weights stored `[in, out]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_positions: usize,
    pub n_inner: usize,
    pub layer_norm_epsilon: f64,
    pub activation: Activation,
    pub scale_attn_weights: bool,
    pub scale_attn_by_inverse_layer_idx: bool,
    pub tie_word_embeddings: bool,
}

/// GPT-NeoX (Pythia, GPT-NeoX-20B): LayerNorm pre-norms, one fused q/k/v projection laid out
/// per head, rotary embeddings on the first `rotary_ndims` dimensions of each head, a GELU MLP
/// and, by default, the attention and the MLP both reading the block input (parallel residual).
#[derive(Clone, Debug, PartialEq)]
pub struct GptNeoxConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    /// Leading dimensions of each head that are rotated: `int(head_dim × partial_rotary_factor)`
    /// (`rotary_pct` in older configs), even and at least 2.
    pub rotary_ndims: usize,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    pub activation: Activation,
    /// `x + attn(ln1(x)) + mlp(ln2(x))` when true; `y = x + attn(ln1(x)); y + mlp(ln2(y))` when false.
    pub use_parallel_residual: bool,
    /// Bias on `attention.query_key_value` and `attention.dense`.
    pub attention_bias: bool,
    pub tie_word_embeddings: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Relu,
    Silu,
    /// Exact erf GELU.
    Gelu,
    /// tanh approximation ("gelu_new", "gelu_pytorch_tanh").
    GeluTanh,
}

impl Activation {
    fn parse(name: &str, path: &Path) -> Result<Self> {
        Ok(match name {
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            other => {
                return Err(Error::format(
                    path,
                    format!("unsupported activation `{other}` (supported: relu, silu, gelu, gelu_new, gelu_pytorch_tanh)"),
                ))
            }
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Architecture {
    Llama(LlamaConfig),
    Qwen2(LlamaConfig),
    Qwen3(LlamaConfig),
    Opt(OptConfig),
    Gpt2(Gpt2Config),
    GptNeox(GptNeoxConfig),
}

/// A parsed `config.json`: the typed view the models use plus the original JSON object.
#[derive(Clone, Debug)]
pub struct AutoConfig {
    pub model_type: String,
    pub arch: Architecture,
    /// Every key of the original file, in its order. Saved back as is (with our updates).
    pub raw: Map<String, Value>,
    pub source: Option<PathBuf>,
}

impl AutoConfig {
    /// Read `config.json` from a file path or from a model folder.
    pub fn from_pretrained(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let value = crate::error::read_json(&file)?;
        let mut cfg = Self::from_value(value, &file, Some(&file))?;
        cfg.source = Some(file);
        Ok(cfg)
    }

    /// Parse a JSON config. `name_hint` is used to infer `model_type` when the key is missing,
    /// as transformers does from the checkpoint name.
    pub fn from_value(value: Value, origin: &Path, name_hint: Option<&Path>) -> Result<Self> {
        let raw = match value {
            Value::Object(map) => map,
            _ => return Err(Error::format(origin, "config is not a JSON object")),
        };
        let model_type = match raw.get("model_type").and_then(Value::as_str) {
            Some(t) => t.to_string(),
            None => infer_model_type(&name_hint.unwrap_or(origin).to_string_lossy()).ok_or_else(|| {
                Error::format(
                    origin,
                    format!(
                        "no `model_type` key and none of the supported types ({}) appears in the name",
                        SUPPORTED_MODEL_TYPES.join(", ")
                    ),
                )
            })?,
        };
        let r = Reader {
            map: &raw,
            path: origin,
        };
        // Generation stops on these and BOS is prepended: a value that is not a token id would
        // otherwise be dropped by `token_id` and change what is generated.
        for key in ["bos_token_id", "eos_token_id"] {
            r.check_token_ids(key)?;
        }
        let arch = match model_type.as_str() {
            "llama" => Architecture::Llama(r.llama(LlamaKind::Llama)?),
            "mistral" => Architecture::Llama(r.llama(LlamaKind::Mistral)?),
            "qwen2" => Architecture::Qwen2(r.llama(LlamaKind::Qwen2)?),
            "qwen3" => Architecture::Qwen3(r.llama(LlamaKind::Qwen3)?),
            "opt" => Architecture::Opt(r.opt()?),
            "gpt2" => Architecture::Gpt2(r.gpt2()?),
            "gpt_neox" => Architecture::GptNeox(r.gpt_neox()?),
            other => {
                return Err(Error::format(
                    origin,
                    format!(
                        "unknown model_type `{other}`; supported: {}",
                        SUPPORTED_MODEL_TYPES.join(", ")
                    ),
                ))
            }
        };
        Ok(AutoConfig {
            model_type,
            arch,
            raw,
            source: None,
        })
    }

    pub fn vocab_size(&self) -> usize {
        match &self.arch {
            Architecture::Llama(c) | Architecture::Qwen2(c) | Architecture::Qwen3(c) => {
                c.vocab_size
            }
            Architecture::Opt(c) => c.vocab_size,
            Architecture::Gpt2(c) => c.vocab_size,
            Architecture::GptNeox(c) => c.vocab_size,
        }
    }

    pub fn num_layers(&self) -> usize {
        match &self.arch {
            Architecture::Llama(c) | Architecture::Qwen2(c) | Architecture::Qwen3(c) => {
                c.num_hidden_layers
            }
            Architecture::Opt(c) => c.num_hidden_layers,
            Architecture::Gpt2(c) => c.n_layer,
            Architecture::GptNeox(c) => c.num_hidden_layers,
        }
    }

    /// The same config with `n` decoder blocks (e.g. 0 for the embeddings and head alone,
    /// which layer-by-layer quantization runs around the blocks it streams).
    pub fn with_num_layers(&self, n: usize) -> AutoConfig {
        let mut c = self.clone();
        let key = match &mut c.arch {
            Architecture::Llama(a) | Architecture::Qwen2(a) | Architecture::Qwen3(a) => {
                a.num_hidden_layers = n;
                "num_hidden_layers"
            }
            Architecture::Opt(a) => {
                a.num_hidden_layers = n;
                "num_hidden_layers"
            }
            Architecture::Gpt2(a) => {
                a.n_layer = n;
                "n_layer"
            }
            Architecture::GptNeox(a) => {
                a.num_hidden_layers = n;
                "num_hidden_layers"
            }
        };
        c.raw.insert(key.into(), n.into());
        c
    }

    pub fn hidden_size(&self) -> usize {
        match &self.arch {
            Architecture::Llama(c) | Architecture::Qwen2(c) | Architecture::Qwen3(c) => {
                c.hidden_size
            }
            Architecture::Opt(c) => c.hidden_size,
            Architecture::Gpt2(c) => c.n_embd,
            Architecture::GptNeox(c) => c.hidden_size,
        }
    }

    pub fn max_positions(&self) -> usize {
        match &self.arch {
            Architecture::Llama(c) | Architecture::Qwen2(c) | Architecture::Qwen3(c) => {
                c.max_position_embeddings
            }
            Architecture::Opt(c) => c.max_position_embeddings,
            Architecture::Gpt2(c) => c.n_positions,
            Architecture::GptNeox(c) => c.max_position_embeddings,
        }
    }

    /// The config key that holds the context length ([`AutoConfig::max_positions`]).
    pub fn context_key(&self) -> &'static str {
        match &self.arch {
            Architecture::Gpt2(_) => "n_positions",
            _ => "max_position_embeddings",
        }
    }

    /// Refuse `positions` tokens in one sequence when the model's context is shorter: learned
    /// position tables have no row past it, and rotary models were not trained past it
    /// (docs/formats.md, "Config bounds"). `what` names the argument, e.g. `--seqlen`.
    pub fn check_context(&self, positions: usize, what: &str) -> Result<()> {
        let max = self.max_positions();
        if positions > max {
            return Err(Error::InvalidArgument(format!(
                "{what} needs {positions} positions, past the model's context of {max} \
                 (`{}`{})",
                self.context_key(),
                self.source
                    .as_ref()
                    .map(|p| format!(" in {}", p.display()))
                    .unwrap_or_default()
            )));
        }
        Ok(())
    }

    pub fn tie_word_embeddings(&self) -> bool {
        match &self.arch {
            Architecture::Llama(c) | Architecture::Qwen2(c) | Architecture::Qwen3(c) => {
                c.tie_word_embeddings
            }
            Architecture::Opt(c) => c.tie_word_embeddings,
            Architecture::Gpt2(c) => c.tie_word_embeddings,
            Architecture::GptNeox(c) => c.tie_word_embeddings,
        }
    }

    /// Token ids from the config (generation_config.json may override them).
    pub fn token_id(&self, key: &str) -> Vec<u32> {
        token_ids(self.raw.get(key))
    }

    /// The JSON written by `save_pretrained`: the original keys, sorted like transformers
    /// (`sort_keys=True`), 2-space indent, trailing newline.
    pub fn to_json_string(&self) -> String {
        let sorted: std::collections::BTreeMap<&String, &Value> = self.raw.iter().collect();
        let mut s = serde_json::to_string_pretty(&sorted).expect("JSON values always serialize");
        s.push('\n');
        s
    }
}

/// Token ids as configs write them: one integer or a list of integers.
pub fn token_ids(value: Option<&Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_u64().map(|v| v as u32))
            .collect(),
        _ => vec![],
    }
}

/// Infer the model type from a name the way transformers does: the longest supported type
/// that appears in the name.
pub fn infer_model_type(name: &str) -> Option<String> {
    let lower = name.to_lowercase();
    SUPPORTED_MODEL_TYPES
        .iter()
        .filter(|t| lower.contains(*t))
        .max_by_key(|t| t.len())
        .map(|t| t.to_string())
}

/// Typed access to config keys with errors that name the file and key.
struct Reader<'a> {
    map: &'a Map<String, Value>,
    path: &'a Path,
}

impl Reader<'_> {
    fn err(&self, key: &str, what: &str) -> Error {
        Error::format(self.path, format!("key `{key}`: {what}"))
    }

    /// `key` absent, null, a token id or a list of token ids (integers in `0..2^32`).
    fn check_token_ids(&self, key: &str) -> Result<()> {
        let is_id = |v: &Value| v.as_u64().is_some_and(|n| n <= u32::MAX as u64);
        let ok = match self.map.get(key) {
            None | Some(Value::Null) => true,
            Some(Value::Array(a)) => a.iter().all(is_id),
            Some(v) => is_id(v),
        };
        if ok {
            Ok(())
        } else {
            Err(self.err(key, "should be a token id or a list of token ids"))
        }
    }
    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => Ok(Some(n as usize)),
                None => Err(self.err(key, &format!("expected a non-negative integer, found {v}"))),
            },
        }
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| self.err(key, "missing"))
    }
    fn in_range(&self, key: &str, v: usize, min: u64, max: u64) -> Result<usize> {
        if (v as u64) < min || v as u64 > max {
            return Err(self.err(key, &format!("{v} is out of range (must be {min}..={max})")));
        }
        Ok(v)
    }
    /// A required size, `1..=max`.
    fn dim(&self, key: &str, max: u64) -> Result<usize> {
        let v = self.usize(key)?;
        self.in_range(key, v, 1, max)
    }
    /// An optional size, `1..=max` when present.
    fn dim_opt(&self, key: &str, max: u64) -> Result<Option<usize>> {
        match self.usize_opt(key)? {
            Some(v) => self.in_range(key, v, 1, max).map(Some),
            None => Ok(None),
        }
    }
    fn dim_or(&self, key: &str, default: usize, max: u64) -> Result<usize> {
        Ok(self.dim_opt(key, max)?.unwrap_or(default))
    }
    /// A required count that may be 0 (decoder blocks).
    fn count(&self, key: &str, max: u64) -> Result<usize> {
        let v = self.usize(key)?;
        self.in_range(key, v, 0, max)
    }
    /// A finite number `>= 0` (or `> 0` with `strict`).
    fn nonneg_f64_or(&self, key: &str, default: f64, strict: bool) -> Result<f64> {
        let v = self.f64_or(key, default)?;
        if !v.is_finite() || v < 0.0 || (strict && v == 0.0) {
            let want = if strict { "positive" } else { "non-negative" };
            return Err(self.err(key, &format!("{v} is not a finite {want} number")));
        }
        Ok(v)
    }
    /// Refuse a model whose parameter count (an upper bound, biases included) is absurd: the
    /// sizes are each in bounds, their product is not.
    fn check_parameters(&self, params: u128, keys: &str) -> Result<()> {
        if params > limits::MAX_PARAMETERS {
            return Err(Error::format(
                self.path,
                format!(
                    "the sizes ({keys}) describe about {params} parameters, more than the \
                     {} this tool accepts",
                    limits::MAX_PARAMETERS
                ),
            ));
        }
        Ok(())
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(key, &format!("expected a number, found {v}"))),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(key, &format!("expected true/false, found {v}"))),
        }
    }
    fn str_or<'b>(&'b self, key: &str, default: &'b str) -> Result<&'b str> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::String(s)) => Ok(s),
            Some(v) => Err(self.err(key, &format!("expected a string, found {v}"))),
        }
    }

    /// transformers ≥ 5 writes `rope_parameters` (with `rope_theta` inside); older
    /// configs write `rope_scaling` and a top-level `rope_theta`.
    fn rope_object(&self) -> Result<Option<(&'static str, &Map<String, Value>)>> {
        for key in ["rope_parameters", "rope_scaling"] {
            match self.map.get(key) {
                None | Some(Value::Null) => continue,
                Some(Value::Object(o)) => return Ok(Some((key, o))),
                Some(v) => return Err(self.err(key, &format!("expected an object, found {v}"))),
            }
        }
        Ok(None)
    }

    fn rope_theta(&self) -> Result<f64> {
        if let Some((key, o)) = self.rope_object()? {
            if let Some(v) = o.get("rope_theta") {
                return v
                    .as_f64()
                    .filter(|t| t.is_finite() && *t > 0.0)
                    .ok_or_else(|| self.err(key, "`rope_theta` is not a positive number"));
            }
        }
        self.nonneg_f64_or("rope_theta", 10000.0, true)
    }

    fn rope_scaling(&self) -> Result<Option<RopeScaling>> {
        let Some((key, obj)) = self.rope_object()? else {
            return Ok(None);
        };
        let kind = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        // Every parameter is a positive finite number: zero or negative ones turn the rotary
        // frequencies into infinities or NaN.
        let num = |k: &str| -> Result<f64> {
            obj.get(k)
                .and_then(Value::as_f64)
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| self.err(key, &format!("`{k}` missing or not a positive number")))
        };
        Ok(match kind {
            "default" => None,
            "linear" => Some(RopeScaling::Linear {
                factor: num("factor")?,
            }),
            "llama3" => {
                let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
                if high <= low {
                    return Err(self.err(
                        key,
                        "`high_freq_factor` must be larger than `low_freq_factor`",
                    ));
                }
                let original = num("original_max_position_embeddings")?;
                if original > limits::MAX_POSITIONS as f64 {
                    return Err(self.err(
                        key,
                        &format!(
                            "`original_max_position_embeddings` {original} is out of range \
                             (at most {})",
                            limits::MAX_POSITIONS
                        ),
                    ));
                }
                Some(RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: original as usize,
                })
            }
            "yarn" => Some(self.yarn(key, obj, num("factor")?)?),
            other => {
                return Err(self.err(
                    key,
                    &format!(
                        "rope type `{other}` is not supported (supported: default, linear, \
                         llama3, yarn)"
                    ),
                ))
            }
        })
    }

    /// YaRN's parameters with transformers' defaults: `original_max_position_embeddings` from
    /// the top level, else the rope object, else `max_position_embeddings`; `beta_fast` 32,
    /// `beta_slow` 1 when absent or 0; `truncate` true.
    fn yarn(&self, key: &str, obj: &Map<String, Value>, factor: f64) -> Result<RopeScaling> {
        let opt = |k: &str| -> Result<Option<f64>> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .filter(|v| v.is_finite() && *v >= 0.0)
                    .map(Some)
                    .ok_or_else(|| self.err(key, &format!("`{k}` is not a non-negative number"))),
            }
        };
        let original = match self.map.get("original_max_position_embeddings") {
            Some(v) if !v.is_null() => Some(v.clone()),
            _ => obj.get("original_max_position_embeddings").cloned(),
        };
        let original = match original {
            Some(v) => v
                .as_f64()
                .filter(|v| v.is_finite() && *v >= 1.0)
                .ok_or_else(|| {
                    self.err(
                        key,
                        "`original_max_position_embeddings` is not a positive number",
                    )
                })?,
            None => self
                .map
                .get("max_position_embeddings")
                .and_then(Value::as_f64)
                .filter(|v| *v >= 1.0)
                .ok_or_else(|| self.err(key, "yarn needs `original_max_position_embeddings`"))?,
        };
        if original > limits::MAX_POSITIONS as f64 {
            return Err(self.err(
                key,
                &format!(
                    "`original_max_position_embeddings` {original} is out of range (at most {})",
                    limits::MAX_POSITIONS
                ),
            ));
        }
        let beta_fast = opt("beta_fast")?.filter(|v| *v != 0.0).unwrap_or(32.0);
        let beta_slow = opt("beta_slow")?.filter(|v| *v != 0.0).unwrap_or(1.0);
        let mscale = |scale: f64, m: f64| {
            if scale <= 1.0 {
                1.0
            } else {
                0.1 * m * scale.ln() + 1.0
            }
        };
        let attention_factor = match opt("attention_factor")? {
            Some(a) => a,
            None => match (opt("mscale")?, opt("mscale_all_dim")?) {
                (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                    mscale(factor, m) / mscale(factor, all)
                }
                _ => mscale(factor, 1.0),
            },
        };
        let truncate = match obj.get("truncate") {
            None | Some(Value::Null) => true,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(key, "`truncate` is not a boolean"))?,
        };
        Ok(RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: original,
            beta_fast,
            beta_slow,
            attention_factor,
            truncate,
        })
    }

    fn llama(&self, kind: LlamaKind) -> Result<LlamaConfig> {
        use limits::*;
        let qwen2 = kind == LlamaKind::Qwen2;
        let qwen3 = kind == LlamaKind::Qwen3;
        let hidden_size = self.dim("hidden_size", MAX_HIDDEN)?;
        let heads = self.dim("num_attention_heads", MAX_HEADS)?;
        let kv_heads = self.dim_or("num_key_value_heads", heads, MAX_HEADS)?;
        if heads % kv_heads != 0 {
            return Err(self.err(
                "num_key_value_heads",
                &format!("{kv_heads} does not divide num_attention_heads {heads}"),
            ));
        }
        let head_dim = match self.dim_opt("head_dim", MAX_HEAD_DIM)? {
            Some(d) => d,
            // transformers' Qwen3Config declares `head_dim = 128`, so a config without the key
            // gets 128, not hidden_size / num_attention_heads.
            None if qwen3 => 128,
            None if hidden_size % heads == 0 => hidden_size / heads,
            None => {
                return Err(self.err(
                    "head_dim",
                    "missing and hidden_size is not divisible by num_attention_heads",
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(self.err("head_dim", "must be even for rotary embeddings"));
        }
        let act = self.str_or("hidden_act", "silu")?;
        if Activation::parse(act, self.path)? != Activation::Silu {
            return Err(self.err(
                "hidden_act",
                &format!("`{act}` is not supported for this architecture (silu only)"),
            ));
        }
        let attention_bias = self.bool_or("attention_bias", false)?;
        let num_hidden_layers = self.count("num_hidden_layers", MAX_LAYERS)?;
        let (sliding_window, sliding_layers) = self.sliding_window(kind, num_hidden_layers)?;
        let c = LlamaConfig {
            vocab_size: self.dim("vocab_size", MAX_VOCAB)?,
            hidden_size,
            intermediate_size: self.dim("intermediate_size", MAX_INTERMEDIATE)?,
            num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: self.nonneg_f64_or("rms_norm_eps", 1e-6, false)?,
            rope_theta: self.rope_theta()?,
            rope_scaling: self.rope_scaling()?,
            max_position_embeddings: self.dim_or("max_position_embeddings", 2048, MAX_POSITIONS)?,
            tie_word_embeddings: self.bool_or("tie_word_embeddings", false)?,
            qkv_bias: qwen2 || attention_bias,
            o_bias: !qwen2 && attention_bias,
            // transformers' Qwen2 and Qwen3 MLPs have no biases whatever the config says.
            mlp_bias: !qwen2 && !qwen3 && self.bool_or("mlp_bias", false)?,
            qk_norm: qwen3,
            sliding_window,
            sliding_layers,
        };
        let (v, h, i) = (
            c.vocab_size as u128,
            hidden_size as u128,
            c.intermediate_size as u128,
        );
        let (q, kv) = ((heads * head_dim) as u128, (kv_heads * head_dim) as u128);
        let per_layer = h * (q + 2 * kv)
            + q * h
            + 3 * h * i
            + (q + 2 * kv + h + 2 * i + h)
            + 2 * h
            + 2 * head_dim as u128;
        self.check_parameters(
            2 * v * h + num_hidden_layers as u128 * per_layer + h,
            "vocab_size, hidden_size, intermediate_size, num_hidden_layers, heads × head_dim",
        )?;
        Ok(c)
    }

    /// Which layers attend through a sliding window, following transformers: Mistral windows
    /// every layer when `sliding_window` is set; Qwen2 and Qwen3 only with `use_sliding_window`,
    /// on the layers `layer_types` marks `sliding_attention` (by default those from
    /// `max_window_layers` on); Llama has no window.
    fn sliding_window(&self, kind: LlamaKind, layers: usize) -> Result<(Option<usize>, Vec<bool>)> {
        let window = || self.dim_opt("sliding_window", u64::MAX);
        match kind {
            LlamaKind::Llama => Ok((None, vec![])),
            LlamaKind::Mistral => Ok(match window()? {
                Some(w) => (Some(w), vec![true; layers]),
                None => (None, vec![]),
            }),
            LlamaKind::Qwen2 | LlamaKind::Qwen3 => {
                let types: Option<Vec<bool>> = match self.map.get("layer_types") {
                    None | Some(Value::Null) => None,
                    Some(Value::Array(a)) if a.len() == layers => Some(
                        a.iter()
                            .map(|t| match t.as_str() {
                                Some("full_attention") => Ok(false),
                                Some("sliding_attention") => Ok(true),
                                _ => Err(self.err(
                                    "layer_types",
                                    &format!(
                                        "{t} is not supported (full_attention or \
                                         sliding_attention)"
                                    ),
                                )),
                            })
                            .collect::<Result<_>>()?,
                    ),
                    Some(v) => {
                        return Err(self.err(
                            "layer_types",
                            &format!("expected a list of {layers} layer types, found {v}"),
                        ))
                    }
                };
                if !self.bool_or("use_sliding_window", false)? {
                    if types.as_ref().is_some_and(|t| t.contains(&true)) {
                        return Err(self.err(
                            "layer_types",
                            "names sliding_attention layers but use_sliding_window is false",
                        ));
                    }
                    return Ok((None, vec![]));
                }
                let Some(w) = window()? else {
                    return Ok((None, vec![]));
                };
                let sliding = match types {
                    Some(t) => t,
                    None => {
                        let first = self.usize_opt("max_window_layers")?.unwrap_or(28);
                        (0..layers).map(|i| i >= first).collect()
                    }
                };
                Ok((Some(w), sliding))
            }
        }
    }

    fn opt(&self) -> Result<OptConfig> {
        use limits::*;
        let hidden_size = self.dim("hidden_size", MAX_HIDDEN)?;
        let heads = self.dim("num_attention_heads", MAX_HEADS)?;
        if hidden_size % heads != 0 {
            return Err(self.err("num_attention_heads", "does not divide hidden_size"));
        }
        let c = OptConfig {
            vocab_size: self.dim("vocab_size", MAX_VOCAB)?,
            hidden_size,
            ffn_dim: self.dim("ffn_dim", MAX_INTERMEDIATE)?,
            num_hidden_layers: self.count("num_hidden_layers", MAX_LAYERS)?,
            num_attention_heads: heads,
            max_position_embeddings: self.dim_or("max_position_embeddings", 2048, MAX_POSITIONS)?,
            do_layer_norm_before: self.bool_or("do_layer_norm_before", true)?,
            word_embed_proj_dim: self.dim_or("word_embed_proj_dim", hidden_size, MAX_HIDDEN)?,
            enable_bias: self.bool_or("enable_bias", true)?,
            layer_norm_elementwise_affine: self.bool_or("layer_norm_elementwise_affine", true)?,
            remove_final_layer_norm: self.bool_or("_remove_final_layer_norm", false)?,
            activation: Activation::parse(self.str_or("activation_function", "relu")?, self.path)?,
            tie_word_embeddings: self.bool_or("tie_word_embeddings", true)?,
        };
        let (v, h, f) = (c.vocab_size as u128, hidden_size as u128, c.ffn_dim as u128);
        let p = c.word_embed_proj_dim as u128;
        let per_layer = 4 * h * h + 2 * h * f + 9 * h + f;
        self.check_parameters(
            2 * v * p
                + (c.max_position_embeddings as u128 + 2) * h
                + 2 * h * p
                + c.num_hidden_layers as u128 * per_layer
                + 2 * h,
            "vocab_size, hidden_size, ffn_dim, num_hidden_layers, max_position_embeddings",
        )?;
        Ok(c)
    }

    fn gpt2(&self) -> Result<Gpt2Config> {
        use limits::*;
        let n_embd = self.dim("n_embd", MAX_HIDDEN)?;
        let n_head = self.dim("n_head", MAX_HEADS)?;
        if n_embd % n_head != 0 {
            return Err(self.err("n_head", "does not divide n_embd"));
        }
        // `reorder_and_upcast_attn` only changes numerics in half precision; attention is
        // computed in f32 here anyway.
        self.bool_or("reorder_and_upcast_attn", false)?;
        let c = Gpt2Config {
            vocab_size: self.dim("vocab_size", MAX_VOCAB)?,
            n_embd,
            n_layer: self.count("n_layer", MAX_LAYERS)?,
            n_head,
            n_positions: self.dim_or("n_positions", 1024, MAX_POSITIONS)?,
            n_inner: self.dim_or("n_inner", 4 * n_embd, MAX_INTERMEDIATE)?,
            layer_norm_epsilon: self.nonneg_f64_or("layer_norm_epsilon", 1e-5, false)?,
            activation: Activation::parse(
                self.str_or("activation_function", "gelu_new")?,
                self.path,
            )?,
            scale_attn_weights: self.bool_or("scale_attn_weights", true)?,
            scale_attn_by_inverse_layer_idx: self
                .bool_or("scale_attn_by_inverse_layer_idx", false)?,
            tie_word_embeddings: self.bool_or("tie_word_embeddings", true)?,
        };
        let (v, e, n) = (c.vocab_size as u128, n_embd as u128, c.n_inner as u128);
        let per_layer = 4 * e * e + 2 * e * n + 9 * e + n;
        self.check_parameters(
            2 * v * e + c.n_positions as u128 * e + c.n_layer as u128 * per_layer + 2 * e,
            "vocab_size, n_embd, n_inner, n_layer, n_positions",
        )?;
        Ok(c)
    }
}

impl Reader<'_> {
    fn gpt_neox(&self) -> Result<GptNeoxConfig> {
        use limits::*;
        let hidden_size = self.dim("hidden_size", MAX_HIDDEN)?;
        let heads = self.dim("num_attention_heads", MAX_HEADS)?;
        if hidden_size % heads != 0 {
            return Err(self.err("num_attention_heads", "does not divide hidden_size"));
        }
        let head_dim = hidden_size / heads;
        // The attention always splits hidden_size into heads; a `head_dim` key would only move
        // the rotary dimensions, so one that disagrees is refused rather than half-honoured.
        if let Some(d) = self.dim_opt("head_dim", MAX_HEAD_DIM)? {
            if d != head_dim {
                return Err(self.err(
                    "head_dim",
                    &format!("{d} differs from hidden_size / num_attention_heads = {head_dim}"),
                ));
            }
        }
        // Only the default rotary embedding is implemented: any other `rope_type` is refused.
        if let Some(s) = self.rope_scaling()? {
            return Err(self.err(
                "rope_scaling",
                &format!("{s:?} is not supported for gpt_neox (default rotary embedding only)"),
            ));
        }
        // transformers ≥ 5 keeps `rope_theta` and `partial_rotary_factor` in `rope_parameters`;
        // older configs write `rotary_emb_base` and `rotary_pct`.
        let rope_obj = self.rope_object()?;
        let from_obj = |k: &str| -> Result<Option<f64>> {
            match rope_obj.and_then(|(_, o)| o.get(k).map(|v| (v, o))) {
                None => Ok(None),
                Some((Value::Null, _)) => Ok(None),
                Some((v, _)) => v.as_f64().map(Some).ok_or_else(|| {
                    self.err(
                        rope_obj.map_or(k, |(key, _)| key),
                        &format!("`{k}` is not a number"),
                    )
                }),
            }
        };
        let rope_theta = match from_obj("rope_theta")? {
            Some(t) => t,
            None if self.map.contains_key("rope_theta") => {
                self.nonneg_f64_or("rope_theta", 10000.0, true)?
            }
            None => self.nonneg_f64_or("rotary_emb_base", 10000.0, true)?,
        };
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(self.err("rope_theta", "is not a positive number"));
        }
        let (factor_key, factor) = match from_obj("partial_rotary_factor")? {
            Some(f) => ("partial_rotary_factor", f),
            None if self.map.contains_key("partial_rotary_factor") => (
                "partial_rotary_factor",
                self.f64_or("partial_rotary_factor", 0.25)?,
            ),
            None => ("rotary_pct", self.f64_or("rotary_pct", 0.25)?),
        };
        if !(factor.is_finite() && factor > 0.0 && factor <= 1.0) {
            return Err(self.err(factor_key, &format!("{factor} is not in (0, 1]")));
        }
        let rotary_ndims = (head_dim as f64 * factor) as usize;
        if rotary_ndims < 2 || rotary_ndims % 2 != 0 {
            return Err(self.err(
                factor_key,
                &format!(
                    "gives {rotary_ndims} rotary dimensions of a head of {head_dim}; an even \
                     number of at least 2 is needed"
                ),
            ));
        }
        let activation = Activation::parse(self.str_or("hidden_act", "gelu")?, self.path)?;
        let c = GptNeoxConfig {
            vocab_size: self.dim("vocab_size", MAX_VOCAB)?,
            hidden_size,
            intermediate_size: self.dim("intermediate_size", MAX_INTERMEDIATE)?,
            num_hidden_layers: self.count("num_hidden_layers", MAX_LAYERS)?,
            num_attention_heads: heads,
            head_dim,
            rotary_ndims,
            rope_theta,
            max_position_embeddings: self.dim_or("max_position_embeddings", 2048, MAX_POSITIONS)?,
            layer_norm_eps: self.nonneg_f64_or("layer_norm_eps", 1e-5, false)?,
            activation,
            use_parallel_residual: self.bool_or("use_parallel_residual", true)?,
            attention_bias: self.bool_or("attention_bias", true)?,
            tie_word_embeddings: self.bool_or("tie_word_embeddings", false)?,
        };
        let (v, h, i) = (
            c.vocab_size as u128,
            hidden_size as u128,
            c.intermediate_size as u128,
        );
        let per_layer = 4 * h * h + 2 * h * i + 10 * h + i;
        self.check_parameters(
            2 * v * h + c.num_hidden_layers as u128 * per_layer + 2 * h,
            "vocab_size, hidden_size, intermediate_size, num_hidden_layers",
        )?;
        Ok(c)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum LlamaKind {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<AutoConfig> {
        AutoConfig::from_value(v, Path::new("config.json"), None)
    }

    #[test]
    fn infers_longest_matching_type() {
        assert_eq!(
            infer_model_type("Qwen/Qwen2-0.5B").as_deref(),
            Some("qwen2")
        );
        assert_eq!(
            infer_model_type("facebook/opt-125m").as_deref(),
            Some("opt")
        );
        assert_eq!(
            infer_model_type("openai-community/gpt2-large").as_deref(),
            Some("gpt2")
        );
        assert_eq!(infer_model_type("bert-base"), None);
    }

    #[test]
    fn unknown_model_type_lists_supported() {
        let err = parse(json!({"model_type": "bert", "hidden_size": 8}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown model_type `bert`"), "{err}");
        assert!(err.contains("llama") && err.contains("gpt2"), "{err}");
        assert!(err.contains("config.json"), "{err}");
    }

    #[test]
    fn llama_defaults_and_gqa() {
        let c = parse(json!({"model_type":"llama","vocab_size":10,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":8,"num_key_value_heads":2,"unused_key":{"a":1}}))
        .unwrap();
        let Architecture::Llama(l) = &c.arch else {
            panic!("wrong arch")
        };
        assert_eq!(
            (l.head_dim, l.num_key_value_heads, l.rope_theta),
            (8, 2, 10000.0)
        );
        assert!(c.to_json_string().contains("unused_key"));
    }

    #[test]
    fn token_ids_that_are_not_ids_are_refused() {
        let base = json!({"model_type":"llama","vocab_size":10,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":1,"num_attention_heads":4});
        for (key, bad) in [
            ("eos_token_id", json!("2")),
            ("eos_token_id", json!([2, -1])),
            ("bos_token_id", json!(1.5)),
            ("eos_token_id", json!(1u64 << 40)),
        ] {
            let mut v = base.clone();
            v[key] = bad.clone();
            let err = parse(v).unwrap_err().to_string();
            assert!(
                err.contains(key) && err.contains("token id"),
                "{bad}: {err}"
            );
        }
        for good in [json!(null), json!(2), json!([2, 7])] {
            let mut v = base.clone();
            v["eos_token_id"] = good.clone();
            assert!(parse(v).is_ok(), "{good}");
        }
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = parse(
            json!({"model_type":"llama","vocab_size":"ten","hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":8}),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("vocab_size"), "{err}");
        let err = parse(
            json!({"model_type":"llama","vocab_size":10,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":8,"num_key_value_heads":3}),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("num_key_value_heads"), "{err}");
        let err = parse(json!({"model_type":"llama","vocab_size":10,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":8,"rope_scaling":{"rope_type":"yarn","factor":2.0}}))
        .unwrap_err()
        .to_string();
        assert!(err.contains("yarn"), "{err}");
    }

    #[test]
    fn qwen2_has_qkv_bias_only() {
        let c = parse(
            json!({"model_type":"qwen2","vocab_size":10,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":8,"num_key_value_heads":2}),
        )
        .unwrap();
        let Architecture::Qwen2(l) = &c.arch else {
            panic!("wrong arch")
        };
        assert!(l.qkv_bias && !l.o_bias);
        assert!(!l.qk_norm);
    }

    #[test]
    fn qwen3_follows_transformers_defaults() {
        let base = json!({"model_type":"qwen3","vocab_size":10,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":8,"num_key_value_heads":2,"mlp_bias":true});
        let c = parse(base.clone()).unwrap();
        let Architecture::Qwen3(l) = &c.arch else {
            panic!("wrong arch")
        };
        // No `head_dim` key: Qwen3Config's default of 128, not 64 / 8.
        assert_eq!(l.head_dim, 128);
        assert!(l.qk_norm && !l.qkv_bias && !l.o_bias && !l.mlp_bias);
        assert_eq!(l.sliding_window, None);

        let mut v = base.clone();
        v["head_dim"] = json!(16);
        v["attention_bias"] = json!(true);
        let Architecture::Qwen3(l) = parse(v).unwrap().arch else {
            panic!("wrong arch")
        };
        assert_eq!(l.head_dim, 16);
        // attention_bias puts a bias on o_proj too in Qwen3 (unlike Qwen2).
        assert!(l.qkv_bias && l.o_bias && !l.mlp_bias);

        // The window is used only with use_sliding_window, from max_window_layers on.
        let mut v = base.clone();
        v["sliding_window"] = json!(4);
        let Architecture::Qwen3(l) = parse(v.clone()).unwrap().arch else {
            panic!("wrong arch")
        };
        assert_eq!(l.sliding_window, None);
        v["use_sliding_window"] = json!(true);
        v["max_window_layers"] = json!(1);
        let Architecture::Qwen3(l) = parse(v).unwrap().arch else {
            panic!("wrong arch")
        };
        assert_eq!((l.layer_window(0), l.layer_window(1)), (None, Some(4)));

        let mut v = base;
        v["rope_scaling"] =
            json!({"rope_type":"yarn","factor":4.0,"original_max_position_embeddings":32768});
        // Qwen3's long-context setting: YaRN with transformers' defaults.
        let Architecture::Qwen3(l) = parse(v).unwrap().arch else {
            panic!("wrong arch")
        };
        match l.rope_scaling {
            Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
            }) => {
                assert_eq!((factor, original_max_position_embeddings), (4.0, 32768.0));
                assert_eq!((beta_fast, beta_slow, truncate), (32.0, 1.0, true));
                assert!((attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            infer_model_type("Qwen/Qwen3-0.6B").as_deref(),
            Some("qwen3")
        );
    }

    #[test]
    fn gpt_neox_keys_old_and_new_and_refusals() {
        let base = json!({"model_type":"gpt_neox","vocab_size":10,"hidden_size":64,
            "intermediate_size":256,"num_hidden_layers":2,"num_attention_heads":4});
        let Architecture::GptNeox(c) = parse(base.clone()).unwrap().arch else {
            panic!("wrong arch")
        };
        // transformers' defaults: rotary_pct 0.25, base 10000, parallel residual, untied.
        assert_eq!((c.head_dim, c.rotary_ndims, c.rope_theta), (16, 4, 10000.0));
        assert!(c.use_parallel_residual && c.attention_bias && !c.tie_word_embeddings);
        assert_eq!(c.activation, Activation::Gelu);

        let mut v = base.clone();
        v["rotary_pct"] = json!(0.5);
        v["rotary_emb_base"] = json!(500.0);
        let Architecture::GptNeox(c) = parse(v).unwrap().arch else {
            panic!("wrong arch")
        };
        assert_eq!((c.rotary_ndims, c.rope_theta), (8, 500.0));

        let mut v = base.clone();
        v["rope_parameters"] =
            json!({"rope_type":"default","rope_theta":20.0,"partial_rotary_factor":1.0});
        let Architecture::GptNeox(c) = parse(v).unwrap().arch else {
            panic!("wrong arch")
        };
        assert_eq!((c.rotary_ndims, c.rope_theta), (16, 20.0));

        for (key, bad, word) in [
            (
                "rope_scaling",
                json!({"type":"linear","factor":2.0}),
                "rope_scaling",
            ),
            (
                "rope_scaling",
                json!({"type":"dynamic","factor":2.0}),
                "dynamic",
            ),
            ("rotary_pct", json!(0.1), "rotary_pct"),
            ("rotary_pct", json!(0.0), "rotary_pct"),
            ("rotary_pct", json!(1.5), "rotary_pct"),
            ("head_dim", json!(8), "head_dim"),
            ("hidden_act", json!("quick_gelu"), "quick_gelu"),
            ("hidden_size", json!(0), "hidden_size"),
            ("num_attention_heads", json!(3), "num_attention_heads"),
            ("intermediate_size", json!(0), "intermediate_size"),
        ] {
            let mut v = base.clone();
            v[key] = bad.clone();
            let err = parse(v).unwrap_err().to_string();
            assert!(
                err.contains(word) && err.contains("config.json"),
                "{key}={bad}: {err}"
            );
        }
    }
}
