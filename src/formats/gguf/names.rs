//! Hugging Face names for the tensors of llama-family GGUFs (`blk.3.attn_q.weight` →
//! `model.layers.3.self_attn.q_proj.weight`), with the q/k row order llama.cpp's converter
//! permutes undone, presented as a [`WeightSource`].

use super::GgufFile;
use crate::error::{Error, Result};
use crate::formats::WeightSource;
use crate::tensor::{DType, RawTensor, TensorInfo};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A GGUF architecture we can map to a Hugging Face model.
pub(super) struct Arch {
    /// `general.architecture` and the metadata key prefix.
    pub(super) prefix: &'static str,
    pub(super) model_type: &'static str,
    pub(super) hf_class: &'static str,
    /// llama.cpp's converter permutes q/k rows for llama but not for qwen2 or qwen3.
    pub(super) permuted_qk: bool,
    /// Per-head q/k norms (`attn_q_norm`, `attn_k_norm`; qwen3).
    pub(super) qk_norm: bool,
    /// GPT-NeoX names (`gpt_neox.layers.N.*`, fused `attn_qkv`, LayerNorm biases) instead of
    /// the llama family's.
    pub(super) neox: bool,
}

pub(super) const ARCHITECTURES: &[Arch] = &[
    Arch {
        prefix: "llama",
        model_type: "llama",
        hf_class: "LlamaForCausalLM",
        permuted_qk: true,
        qk_norm: false,
        neox: false,
    },
    Arch {
        prefix: "qwen2",
        model_type: "qwen2",
        hf_class: "Qwen2ForCausalLM",
        permuted_qk: false,
        qk_norm: false,
        neox: false,
    },
    Arch {
        prefix: "qwen3",
        model_type: "qwen3",
        hf_class: "Qwen3ForCausalLM",
        permuted_qk: false,
        qk_norm: true,
        neox: false,
    },
    Arch {
        prefix: "gptneox",
        model_type: "gpt_neox",
        hf_class: "GPTNeoXForCausalLM",
        permuted_qk: false,
        qk_norm: false,
        neox: true,
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

/// Per-layer tensors only architectures with q/k norms have.
const QK_NORM_TENSORS: &[(&str, &str)] = &[
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
];

/// Per-layer GGUF tensor stems of llama.cpp's `gptneox` and their Hugging Face module paths.
const NEOX_LAYER_TENSORS: &[(&str, &str)] = &[
    ("attn_qkv", "attention.query_key_value"),
    ("attn_output", "attention.dense"),
    ("ffn_up", "mlp.dense_h_to_4h"),
    ("ffn_down", "mlp.dense_4h_to_h"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
];

/// Tensors llama.cpp stores that have no Hugging Face parameter (they feed the config instead).
const NON_PARAMETER_TENSORS: &[&str] = &["rope_freqs.weight"];

fn hf_tensor_name(gguf_name: &str, arch: &Arch) -> Option<String> {
    if arch.neox {
        match gguf_name {
            "token_embd.weight" => return Some("gpt_neox.embed_in.weight".into()),
            "output_norm.weight" => return Some("gpt_neox.final_layer_norm.weight".into()),
            "output_norm.bias" => return Some("gpt_neox.final_layer_norm.bias".into()),
            "output.weight" => return Some("embed_out.weight".into()),
            _ => {}
        }
    }
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
    if arch.neox {
        let (_, hf) = NEOX_LAYER_TENSORS.iter().find(|(g, _)| *g == stem)?;
        return Some(format!("gpt_neox.layers.{layer}.{hf}.{suffix}"));
    }
    let qk_norm: &[(&str, &str)] = if arch.qk_norm { QK_NORM_TENSORS } else { &[] };
    let (_, hf) = LAYER_TENSORS
        .iter()
        .chain(qk_norm)
        .find(|(g, _)| *g == stem)?;
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

#[derive(Clone, Debug)]
struct WeightEntry {
    gguf_name: String,
    shape: Vec<usize>,
    /// Heads whose rows llama.cpp interleaved (attn_q: n_head, attn_k: n_head_kv).
    unpermute_heads: Option<usize>,
    /// Heads of a GPT-NeoX `attn_qkv` (weight or bias) whose rows llama.cpp regrouped.
    qkv_heads: Option<usize>,
}

/// The tensors of a llama / qwen2 / qwen3 GGUF under Hugging Face names, dequantized to f32, with
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
            let hf = hf_tensor_name(&t.name, arch).ok_or_else(|| {
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
            let mut qkv_heads = None;
            if arch.neox && t.name.split('.').nth(2) == Some("attn_qkv") {
                let n =
                    file.require_u64(&format!("{}.attention.head_count", arch.prefix))? as usize;
                let rows = shape.first().copied().unwrap_or(0);
                if n == 0 || rows == 0 || !rows.is_multiple_of(3 * n) {
                    return Err(Error::tensor(
                        &path,
                        &t.name,
                        format!("{rows} rows cannot be split into q, k and v of {n} heads"),
                    ));
                }
                qkv_heads = Some(n);
            }
            let mut unpermute_heads = None;
            if arch.permuted_qk {
                let stem = t.name.split('.').nth(2).unwrap_or("");
                if let Some(n) = heads(stem)? {
                    let rows = shape.first().copied().unwrap_or(0);
                    if n == 0 || rows == 0 || !rows.is_multiple_of(2 * n) {
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
                    qkv_heads,
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

/// Undo llama.cpp's regrouping of GPT-NeoX's fused q/k/v rows: GGUF holds every query row,
/// then every key row, then every value row (`[3, heads, head_dim]`); transformers holds them
/// head by head (`[heads, 3, head_dim]`). GGUF row `p·n·hd + h·hd + i` is Hugging Face row
/// `h·3·hd + p·hd + i`.
fn ungroup_qkv_rows(values: &[f32], rows: usize, n_head: usize) -> Vec<f32> {
    let row_len = values.len() / rows;
    let head_dim = rows / (3 * n_head);
    let mut out = vec![0f32; values.len()];
    for p in 0..3 {
        for h in 0..n_head {
            for i in 0..head_dim {
                let src = (p * n_head * head_dim + h * head_dim + i) * row_len;
                let dst = (h * 3 * head_dim + p * head_dim + i) * row_len;
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
        if let Some(n_head) = entry.qkv_heads {
            values = ungroup_qkv_rows(&values, entry.shape[0], n_head);
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

    const LLAMA: &Arch = &ARCHITECTURES[0];

    #[test]
    fn qk_norms_map_for_qwen3_only() {
        let qwen3 = ARCHITECTURES.iter().find(|a| a.prefix == "qwen3").unwrap();
        assert_eq!(
            hf_tensor_name("blk.2.attn_q_norm.weight", qwen3).as_deref(),
            Some("model.layers.2.self_attn.q_norm.weight")
        );
        assert_eq!(
            hf_tensor_name("blk.0.attn_k_norm.weight", qwen3).as_deref(),
            Some("model.layers.0.self_attn.k_norm.weight")
        );
        assert_eq!(hf_tensor_name("blk.0.attn_k_norm.weight", LLAMA), None);
    }

    #[test]
    fn hf_names_follow_the_llama_mapping() {
        assert_eq!(
            hf_tensor_name("blk.12.attn_output.weight", LLAMA).as_deref(),
            Some("model.layers.12.self_attn.o_proj.weight")
        );
        assert_eq!(
            hf_tensor_name("blk.0.attn_q.bias", LLAMA).as_deref(),
            Some("model.layers.0.self_attn.q_proj.bias")
        );
        assert_eq!(
            hf_tensor_name("blk.3.ffn_norm.weight", LLAMA).as_deref(),
            Some("model.layers.3.post_attention_layernorm.weight")
        );
        assert_eq!(hf_tensor_name("blk.x.attn_q.weight", LLAMA), None);
        assert_eq!(hf_tensor_name("blk.01.attn_q.weight", LLAMA), None);
        assert_eq!(hf_tensor_name("blk.0.attn_qkv.weight", LLAMA), None);
        assert_eq!(hf_tensor_name("blk.0.attn_q.scale", LLAMA), None);
    }

    #[test]
    fn gptneox_names_and_qkv_rows() {
        let neox = ARCHITECTURES
            .iter()
            .find(|a| a.prefix == "gptneox")
            .unwrap();
        for (g, hf) in [
            ("token_embd.weight", "gpt_neox.embed_in.weight"),
            ("output_norm.bias", "gpt_neox.final_layer_norm.bias"),
            ("output.weight", "embed_out.weight"),
            (
                "blk.3.attn_qkv.bias",
                "gpt_neox.layers.3.attention.query_key_value.bias",
            ),
            (
                "blk.0.ffn_up.weight",
                "gpt_neox.layers.0.mlp.dense_h_to_4h.weight",
            ),
            (
                "blk.1.ffn_norm.bias",
                "gpt_neox.layers.1.post_attention_layernorm.bias",
            ),
        ] {
            assert_eq!(hf_tensor_name(g, neox).as_deref(), Some(hf), "{g}");
        }
        assert_eq!(hf_tensor_name("blk.0.attn_q.weight", neox), None);
        assert_eq!(hf_tensor_name("blk.0.attn_qkv.weight", LLAMA), None);
        // Converter: HF row h·3·hd + p·hd + i → GGUF row p·n·hd + h·hd + i.
        let (n_head, head_dim, row_len) = (2, 4, 3);
        let rows = 3 * n_head * head_dim;
        let hf: Vec<f32> = (0..rows * row_len).map(|v| v as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..n_head {
            for p in 0..3 {
                for i in 0..head_dim {
                    let src = (h * 3 * head_dim + p * head_dim + i) * row_len;
                    let dst = (p * n_head * head_dim + h * head_dim + i) * row_len;
                    gguf[dst..dst + row_len].copy_from_slice(&hf[src..src + row_len]);
                }
            }
        }
        assert_ne!(gguf, hf);
        assert_eq!(ungroup_qkv_rows(&gguf, rows, n_head), hf);
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
}
