//! The Hugging Face `config.json` a GGUF file stands for: llama.cpp's architecture metadata
//! (`<arch>.embedding_length`, `<arch>.rope.*`, ...) mapped to the keys transformers reads.

use super::names::{Arch, ARCHITECTURES};
use super::{GgufFile, GgufValue};
use crate::config::limits;
use crate::error::{Error, Result};
use serde_json::{json, Map, Value};

/// An integer metadata value as a number (any width, any sign), or `None` for other types.
fn integer(v: &GgufValue) -> Option<i128> {
    Some(match *v {
        GgufValue::U8(x) => x.into(),
        GgufValue::I8(x) => x.into(),
        GgufValue::U16(x) => x.into(),
        GgufValue::I16(x) => x.into(),
        GgufValue::U32(x) => x.into(),
        GgufValue::I32(x) => x.into(),
        GgufValue::U64(x) => x.into(),
        GgufValue::I64(x) => x.into(),
        _ => return None,
    })
}

impl GgufFile {
    /// An integer size under `key` within `min..=max` (docs/formats.md, "Config bounds"), or
    /// `None` when the key is absent. A value of another type, or out of range, is an error
    /// naming the key and the value — before any size derived from it is used.
    fn size_opt(&self, key: &str, min: u64, max: u64) -> Result<Option<u64>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = integer(v).ok_or_else(|| {
            Error::format(
                &self.path,
                format!(
                    "metadata key `{key}` should be an integer, found {} {v:?}",
                    v.type_name()
                ),
            )
        })?;
        if n < min as i128 || n > max as i128 {
            return Err(Error::format(
                &self.path,
                format!("metadata key `{key}`: {n} is out of range (must be {min}..={max})"),
            ));
        }
        Ok(Some(n as u64))
    }

    fn size(&self, key: &str, min: u64, max: u64) -> Result<u64> {
        self.size_opt(key, min, max)?
            .ok_or_else(|| Error::format(&self.path, format!("metadata key `{key}` is missing")))
    }

    /// The Hugging Face `config.json` equivalent to this GGUF (llama, qwen2 and qwen3).
    pub fn hf_config(&self) -> Result<Value> {
        let arch = self.known_architecture()?;
        if arch.neox {
            return self.gpt_neox_config(arch);
        }
        let k = |suffix: &str| format!("{}.{suffix}", arch.prefix);
        let hidden = self.size(&k("embedding_length"), 1, limits::MAX_HIDDEN)?;
        let n_head = self.size(&k("attention.head_count"), 1, limits::MAX_HEADS)?;
        let n_kv = match self.get(&k("attention.head_count_kv")) {
            Some(GgufValue::Array(_)) => self.head_count_kv(&k("attention.head_count_kv"))?,
            _ => self.size_opt(&k("attention.head_count_kv"), 1, limits::MAX_HEADS)?,
        }
        .unwrap_or(n_head);
        let key_length = self.size_opt(&k("attention.key_length"), 1, limits::MAX_HEAD_DIM)?;
        let rope_dims = if arch.model_type == "llama" {
            self.size_opt(&k("rope.dimension_count"), 1, limits::MAX_HEAD_DIM)?
        } else {
            None
        };
        let head_dim = key_length.or(rope_dims).unwrap_or(hidden / n_head);
        if arch.model_type != "llama" {
            // llama.cpp rotates the first `rope.dimension_count` dimensions of each head;
            // transformers' qwen2/qwen3 rotate them all.
            let key = k("rope.dimension_count");
            if let Some(d) = self.size_opt(&key, 1, limits::MAX_HEAD_DIM)? {
                if d != head_dim {
                    return Err(Error::format(
                        &self.path,
                        format!(
                            "metadata key `{key}` is {d}, not the head size {head_dim}: partial                              rotary embeddings are not supported"
                        ),
                    ));
                }
            }
        }
        let vocab_size = match self.size_opt(&k("vocab_size"), 1, limits::MAX_VOCAB)? {
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

        let mut c = self.common_config(arch, hidden, n_head)?;
        c.insert("num_key_value_heads".into(), json!(n_kv));
        // Qwen3Config's default head_dim is 128, not hidden / heads: always written for qwen3.
        if arch.model_type != "qwen2" || head_dim != hidden / n_head {
            c.insert("head_dim".into(), json!(head_dim));
        }
        c.insert("hidden_act".into(), json!("silu"));
        c.insert("rms_norm_eps".into(), json!(eps));
        c.insert(
            "rope_theta".into(),
            json!(self.get_f64(&k("rope.freq_base")).unwrap_or(10000.0)),
        );
        if let Some(ctx) = self.size_opt(&k("context_length"), 1, limits::MAX_POSITIONS)? {
            c.insert("max_position_embeddings".into(), json!(ctx));
        }
        c.insert("vocab_size".into(), json!(vocab_size));
        c.insert(
            "tie_word_embeddings".into(),
            json!(self.tensor_info("output.weight").is_none()),
        );
        match arch.model_type {
            "llama" => {
                c.insert("attention_bias".into(), json!(has_bias));
                c.insert("mlp_bias".into(), json!(false));
            }
            "qwen3" => {
                c.insert("attention_bias".into(), json!(has_bias));
            }
            _ => {}
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

    /// The `config.json` of a llama.cpp `gptneox` GGUF (`GPTNeoXForCausalLM`).
    /// The config keys every architecture writes the same way: class, type, hidden size,
    /// MLP width, block count and head count.
    fn common_config(&self, arch: &Arch, hidden: u64, n_head: u64) -> Result<Map<String, Value>> {
        let k = |suffix: &str| format!("{}.{suffix}", arch.prefix);
        let mut c = Map::new();
        c.insert("architectures".into(), json!([arch.hf_class]));
        c.insert("model_type".into(), json!(arch.model_type));
        c.insert("hidden_size".into(), json!(hidden));
        c.insert(
            "intermediate_size".into(),
            json!(self.size(&k("feed_forward_length"), 1, limits::MAX_INTERMEDIATE)?),
        );
        c.insert(
            "num_hidden_layers".into(),
            json!(self.size(&k("block_count"), 0, limits::MAX_LAYERS)?),
        );
        c.insert("num_attention_heads".into(), json!(n_head));
        Ok(c)
    }

    fn gpt_neox_config(&self, arch: &Arch) -> Result<Value> {
        let k = |suffix: &str| format!("{}.{suffix}", arch.prefix);
        let hidden = self.size(&k("embedding_length"), 1, limits::MAX_HIDDEN)?;
        let n_head = self.size(&k("attention.head_count"), 1, limits::MAX_HEADS)?;
        let head_dim = hidden / n_head;
        let rope_key = k("rope.dimension_count");
        let rope_dims = self
            .size_opt(&rope_key, 1, limits::MAX_HEAD_DIM)?
            .unwrap_or(head_dim);
        let vocab_size = self
            .tensor_info("token_embd.weight")
            .and_then(|t| t.dims.get(1).copied())
            .ok_or_else(|| Error::format(&self.path, "tensor `token_embd.weight` is missing"))?;
        let eps_key = k("attention.layer_norm_epsilon");
        let eps = self.get_f64(&eps_key).ok_or_else(|| {
            Error::format(
                &self.path,
                format!("metadata key `{eps_key}` is missing or not a number"),
            )
        })?;
        let mut c = self.common_config(arch, hidden, n_head)?;
        // The rotated share of each head; the config refuses one that gives an odd count.
        c.insert(
            "rotary_pct".into(),
            json!(rope_dims as f64 / head_dim as f64),
        );
        c.insert(
            "rotary_emb_base".into(),
            json!(self.get_f64(&k("rope.freq_base")).unwrap_or(10000.0)),
        );
        c.insert(
            "use_parallel_residual".into(),
            json!(self.get_bool(&k("use_parallel_residual")).unwrap_or(true)),
        );
        c.insert("layer_norm_eps".into(), json!(eps));
        c.insert("hidden_act".into(), json!("gelu"));
        c.insert(
            "attention_bias".into(),
            json!(self.tensor_info("blk.0.attn_qkv.bias").is_some()),
        );
        if let Some(ctx) = self.size_opt(&k("context_length"), 1, limits::MAX_POSITIONS)? {
            c.insert("max_position_embeddings".into(), json!(ctx));
        }
        c.insert("vocab_size".into(), json!(vocab_size));
        c.insert(
            "tie_word_embeddings".into(),
            json!(self.tensor_info("output.weight").is_none()),
        );
        for (gguf_key, hf_key) in [
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
            ("tokenizer.ggml.padding_token_id", "pad_token_id"),
        ] {
            if let Some(id) = self.get_u64(gguf_key) {
                c.insert(hf_key.into(), json!(id));
            }
        }
        c.insert("torch_dtype".into(), json!("float32"));
        Ok(Value::Object(c))
    }

    pub(super) fn known_architecture(&self) -> Result<&'static Arch> {
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
    pub(super) fn head_count_kv(&self, key: &str) -> Result<Option<u64>> {
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
            if let Some(orig) = self.size_opt(
                &k("rope.scaling.original_context_length"),
                1,
                limits::MAX_POSITIONS,
            )? {
                s.insert("original_max_position_embeddings".into(), json!(orig));
            }
            if kind == "yarn" {
                for (key, name) in [
                    ("yarn_beta_fast", "beta_fast"),
                    ("yarn_beta_slow", "beta_slow"),
                ] {
                    if let Some(v) = self.get_f64(&k(&format!("rope.scaling.{key}"))) {
                        s.insert(name.into(), json!(v));
                    }
                }
                // Keys whose meaning in llama.cpp differs from transformers' parameters: refused
                // rather than read as something else.
                for key in ["yarn_log_multiplier", "attn_factor", "yarn_ext_factor"] {
                    let full = k(&format!("rope.scaling.{key}"));
                    if self.get_f64(&full).is_some() {
                        return Err(Error::format(
                            &self.path,
                            format!("`{full}` (YaRN) is not supported"),
                        ));
                    }
                }
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
