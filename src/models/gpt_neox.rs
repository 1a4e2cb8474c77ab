//! GPT-NeoX decoder (EleutherAI Pythia, GPT-NeoX-20B): LayerNorm before each sub-layer, one
//! fused `query_key_value` projection whose output holds, for every head in turn, that head's
//! query, key and value (`[heads, 3, head_dim]`), rotary embeddings on the first
//! `rotary_ndims` dimensions of each head only, a GELU MLP, and — with `use_parallel_residual`
//! — the attention and the MLP both reading the block input: `x + attn(ln1(x)) + mlp(ln2(x))`.

use super::attention::{attend, AttentionShape, KvCache};
use super::{
    AwqGroup, AwqPrev, BlockContext, BlockState, CausalLM, DecoderBlock, ForwardInput, LinearRef,
};
use crate::config::{AutoConfig, GptNeoxConfig};
use crate::error::Result;
use crate::kernels::DenseMatrix;
use crate::nn::{activate, add_in_place, LayerNorm, Linear, Loader};
use std::sync::Arc;

/// The output projection's name in released checkpoints (transformers ≥ 5 calls the module
/// `lm_head` and reads either name).
const OUTPUT: &str = "embed_out";

pub struct GptNeoxLayer {
    pub input_layernorm: LayerNorm,
    pub query_key_value: Linear,
    pub dense: Linear,
    pub post_attention_layernorm: LayerNorm,
    pub dense_h_to_4h: Linear,
    pub dense_4h_to_h: Linear,
    attention: AttentionShape,
    rotary_ndims: usize,
    inv_freq: Arc<[f32]>,
    parallel_residual: bool,
    activation: crate::config::Activation,
}

pub struct GptNeox {
    pub config: AutoConfig,
    pub cfg: GptNeoxConfig,
    pub embed_in: Arc<DenseMatrix>,
    pub layers: Vec<GptNeoxLayer>,
    pub final_layer_norm: LayerNorm,
    /// `embed_out`; `None` when tied to `embed_in`.
    pub embed_out: Option<Linear>,
}

/// Checkpoint tensor names and shapes for a GPT-NeoX config.
pub fn tensor_shapes(c: &GptNeoxConfig) -> Vec<(String, Vec<usize>)> {
    let (h, im) = (c.hidden_size, c.intermediate_size);
    let mut v = vec![(
        "gpt_neox.embed_in.weight".to_string(),
        vec![c.vocab_size, h],
    )];
    for i in 0..c.num_hidden_layers {
        let p = format!("gpt_neox.layers.{i}");
        for n in ["input_layernorm", "post_attention_layernorm"] {
            v.push((format!("{p}.{n}.weight"), vec![h]));
            v.push((format!("{p}.{n}.bias"), vec![h]));
        }
        for (n, o, inp, bias) in [
            ("attention.query_key_value", 3 * h, h, c.attention_bias),
            ("attention.dense", h, h, c.attention_bias),
            ("mlp.dense_h_to_4h", im, h, true),
            ("mlp.dense_4h_to_h", h, im, true),
        ] {
            v.push((format!("{p}.{n}.weight"), vec![o, inp]));
            if bias {
                v.push((format!("{p}.{n}.bias"), vec![o]));
            }
        }
    }
    v.push(("gpt_neox.final_layer_norm.weight".into(), vec![h]));
    v.push(("gpt_neox.final_layer_norm.bias".into(), vec![h]));
    if !c.tie_word_embeddings {
        v.push((format!("{OUTPUT}.weight"), vec![c.vocab_size, h]));
    }
    v
}

/// Rotary frequencies over the rotated part of a head (`rotary_ndims`), shared by every layer.
fn layer_inv_freq(c: &GptNeoxConfig) -> Arc<[f32]> {
    super::llama::rope_inv_freq(c.rotary_ndims, c.rope_theta, None).into()
}

/// Rotate the first `rot` dimensions of each head of `x` (`[rows, heads * head_dim]`) by the
/// row's position, "rotate half" within those `rot` dimensions; the rest pass through.
fn apply_partial_rope(
    x: &mut [f32],
    head_dim: usize,
    rot: usize,
    positions: &[usize],
    inv_freq: &[f32],
) {
    let half = rot / 2;
    let row_len = x.len() / positions.len().max(1);
    for (row, &pos) in x.chunks_exact_mut(row_len).zip(positions) {
        let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
            .iter()
            .map(|f| {
                let angle = (pos as f32 * f) as f64;
                (angle.cos() as f32, angle.sin() as f32)
            })
            .unzip();
        for h in row.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (a, b) = (h[i], h[i + half]);
                h[i] = a * cos[i] - b * sin[i];
                h[i + half] = b * cos[i] + a * sin[i];
            }
        }
    }
}

impl GptNeoxLayer {
    /// Decoder block `i` (`gpt_neox.layers.{i}`).
    pub fn load(cfg: &GptNeoxConfig, ld: &Loader, i: usize, inv_freq: Arc<[f32]>) -> Result<Self> {
        let (h, im, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let p = format!("gpt_neox.layers.{i}");
        let eps = cfg.layer_norm_eps;
        let b = cfg.attention_bias;
        Ok(GptNeoxLayer {
            input_layernorm: ld.layer_norm(&format!("{p}.input_layernorm"), h, eps, true)?,
            query_key_value: ld.linear(&format!("{p}.attention.query_key_value"), h, 3 * h, b)?,
            dense: ld.linear(&format!("{p}.attention.dense"), h, h, b)?,
            post_attention_layernorm: ld.layer_norm(
                &format!("{p}.post_attention_layernorm"),
                h,
                eps,
                true,
            )?,
            dense_h_to_4h: ld.linear(&format!("{p}.mlp.dense_h_to_4h"), h, im, true)?,
            dense_4h_to_h: ld.linear(&format!("{p}.mlp.dense_4h_to_h"), im, h, true)?,
            attention: AttentionShape {
                heads: cfg.num_attention_heads,
                kv_heads: cfg.num_attention_heads,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
                window: None,
            },
            rotary_ndims: cfg.rotary_ndims,
            inv_freq,
            parallel_residual: cfg.use_parallel_residual,
            activation: cfg.activation,
        })
    }
}

/// One group per linear: the fused q/k/v projection is a single linear layer (as AutoGPTQ
/// quantizes it), and every other linear has an input of its own.
pub const GPT_NEOX_GROUPS: &[&[&str]] = &[
    &["attention.query_key_value"],
    &["attention.dense"],
    &["mlp.dense_h_to_4h"],
    &["mlp.dense_4h_to_h"],
];

impl DecoderBlock for GptNeoxLayer {
    fn groups(&self) -> &'static [&'static [&'static str]] {
        GPT_NEOX_GROUPS
    }
    fn linear_mut(&mut self, name: &str) -> &mut Linear {
        match name {
            "attention.query_key_value" => &mut self.query_key_value,
            "attention.dense" => &mut self.dense,
            "mlp.dense_h_to_4h" => &mut self.dense_h_to_4h,
            "mlp.dense_4h_to_h" => &mut self.dense_4h_to_h,
            other => panic!("gpt_neox block has no linear `{other}`"),
        }
    }
    /// AutoAWQ's groups for GPT-NeoX, less one: input_layernorm → query_key_value and
    /// post_attention_layernorm → dense_h_to_4h. AutoAWQ does not scale attention.dense either
    /// (its values are interleaved with queries and keys in the fused projection); its
    /// dense_4h_to_h scales go into an activation-scale tensor (`mlp.act.scales`) that GELU
    /// needs and other loaders do not read, so that layer is only clipped and rounded here.
    fn awq_groups(&self) -> Vec<AwqGroup> {
        vec![
            AwqGroup {
                prev: AwqPrev::Norm("input_layernorm"),
                linears: &["attention.query_key_value"],
                stages: 0..2,
            },
            AwqGroup {
                prev: AwqPrev::Norm("post_attention_layernorm"),
                linears: &["mlp.dense_h_to_4h"],
                stages: 2..4,
            },
        ]
    }
    fn norm_names(&self) -> &'static [&'static str] {
        &["input_layernorm", "post_attention_layernorm"]
    }
    fn norm_mut(&mut self, name: &str) -> (Option<&mut Vec<f32>>, Option<&mut Vec<f32>>) {
        let n = match name {
            "input_layernorm" => &mut self.input_layernorm,
            "post_attention_layernorm" => &mut self.post_attention_layernorm,
            _ => return (None, None),
        };
        (n.weight.as_mut(), n.bias.as_mut())
    }
    fn begin(&self, x: Vec<f32>) -> BlockState {
        BlockState {
            input: self.input_layernorm.forward(&x),
            residual: x,
        }
    }
    fn step(&self, g: usize, st: &mut BlockState, ctx: &mut BlockContext) {
        let rows = st.residual.len() / self.input_layernorm.dim;
        let s = &self.attention;
        let hd = s.head_dim;
        match g {
            0 => {
                // Per head: [q | k | v], each head_dim wide.
                let qkv = self.query_key_value.forward(&st.input, rows);
                let width = s.heads * hd;
                let mut q = vec![0f32; rows * width];
                let mut k = vec![0f32; rows * width];
                let mut v = vec![0f32; rows * width];
                for (r, src) in qkv.chunks_exact(3 * width).enumerate() {
                    for (head, part) in src.chunks_exact(3 * hd).enumerate() {
                        let at = r * width + head * hd;
                        q[at..at + hd].copy_from_slice(&part[..hd]);
                        k[at..at + hd].copy_from_slice(&part[hd..2 * hd]);
                        v[at..at + hd].copy_from_slice(&part[2 * hd..]);
                    }
                }
                apply_partial_rope(&mut q, hd, self.rotary_ndims, ctx.positions, &self.inv_freq);
                apply_partial_rope(&mut k, hd, self.rotary_ndims, ctx.positions, &self.inv_freq);
                st.input = attend(ctx.cache, ctx.cache_layer, s, ctx.t, &q, &k, &v);
            }
            1 => {
                let attn = self.dense.forward(&st.input, rows);
                if self.parallel_residual {
                    // The MLP reads the block input, which the residual still is.
                    st.input = self.post_attention_layernorm.forward(&st.residual);
                    add_in_place(&mut st.residual, &attn);
                } else {
                    add_in_place(&mut st.residual, &attn);
                    st.input = self.post_attention_layernorm.forward(&st.residual);
                }
            }
            2 => {
                let mut f = self.dense_h_to_4h.forward(&st.input, rows);
                activate(self.activation, &mut f);
                st.input = f;
            }
            _ => {
                add_in_place(
                    &mut st.residual,
                    &self.dense_4h_to_h.forward(&st.input, rows),
                );
                st.input = Vec::new();
            }
        }
    }
}

impl GptNeox {
    pub fn load(config: AutoConfig, cfg: GptNeoxConfig, ld: &Loader) -> Result<Self> {
        let h = cfg.hidden_size;
        let embed_in = Arc::new(ld.matrix("gpt_neox.embed_in.weight", cfg.vocab_size, h)?);
        let inv_freq = layer_inv_freq(&cfg);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| GptNeoxLayer::load(&cfg, ld, i, inv_freq.clone()))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm =
            ld.layer_norm("gpt_neox.final_layer_norm", h, cfg.layer_norm_eps, true)?;
        // Released checkpoints call it `embed_out`; one saved by transformers ≥ 5 from a model
        // it built may call it `lm_head`.
        let name = if !ld.has(&format!("{OUTPUT}.weight")) && ld.has("lm_head.weight") {
            "lm_head"
        } else {
            OUTPUT
        };
        let embed_out = ld.output_projection_named(
            name,
            cfg.tie_word_embeddings,
            &embed_in,
            h,
            cfg.vocab_size,
        )?;
        Ok(GptNeox {
            config,
            cfg,
            embed_in,
            layers,
            final_layer_norm,
            embed_out,
        })
    }
}

impl CausalLM for GptNeox {
    fn config(&self) -> &AutoConfig {
        &self.config
    }

    fn embed(&self, input: &ForwardInput, cache: &mut KvCache) -> Result<(Vec<f32>, Vec<usize>)> {
        super::embed_tokens_and_positions(
            input,
            cache,
            self.config.vocab_size(),
            &self.embed_in,
            self.cfg.hidden_size,
        )
    }

    fn blocks(&self) -> Vec<&dyn DecoderBlock> {
        self.layers.iter().map(|l| l as &dyn DecoderBlock).collect()
    }

    fn head(&self, x: &[f32]) -> Vec<f32> {
        let x = self.final_layer_norm.forward(x);
        super::project_logits(&x, self.embed_out.as_ref(), &self.embed_in)
    }

    fn linears(&self) -> Vec<LinearRef<'_>> {
        let mut out = vec![];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("gpt_neox.layers.{i}");
            for (name, lin) in [
                ("attention.query_key_value", &l.query_key_value),
                ("attention.dense", &l.dense),
                ("mlp.dense_h_to_4h", &l.dense_h_to_4h),
                ("mlp.dense_4h_to_h", &l.dense_4h_to_h),
            ] {
                out.push(LinearRef {
                    name: format!("{p}.{name}"),
                    linear: lin,
                });
            }
        }
        if let Some(l) = &self.embed_out {
            // A tied model's int8 copy of the embedding is not a checkpoint tensor; it goes by
            // `lm_head`, the name `checkpoint_linears` leaves out for tied models.
            let name = if self.cfg.tie_word_embeddings {
                "lm_head"
            } else {
                OUTPUT
            };
            out.push(LinearRef {
                name: name.into(),
                linear: l,
            });
        }
        out
    }

    fn other_tensors(&self) -> Vec<(String, Vec<f32>, Vec<usize>)> {
        let h = self.cfg.hidden_size;
        let mut out = vec![(
            "gpt_neox.embed_in.weight".to_string(),
            crate::kernels::LinearKernel::to_f32(self.embed_in.as_ref()),
            vec![self.cfg.vocab_size, h],
        )];
        let mut ln = |name: String, n: &LayerNorm| {
            if let (Some(w), Some(b)) = (&n.weight, &n.bias) {
                out.push((format!("{name}.weight"), w.clone(), vec![h]));
                out.push((format!("{name}.bias"), b.clone(), vec![h]));
            }
        };
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("gpt_neox.layers.{i}");
            ln(format!("{p}.input_layernorm"), &l.input_layernorm);
            ln(
                format!("{p}.post_attention_layernorm"),
                &l.post_attention_layernorm,
            );
        }
        ln("gpt_neox.final_layer_norm".into(), &self.final_layer_norm);
        out
    }

    fn embedding(&self) -> &DenseMatrix {
        &self.embed_in
    }
}

impl super::Family for GptNeoxConfig {
    fn load(&self, config: AutoConfig, ld: &Loader) -> Result<Box<dyn super::CausalLM>> {
        Ok(Box::new(GptNeox::load(config, self.clone(), ld)?))
    }
    fn load_block(&self, ld: &Loader, i: usize) -> Result<Box<dyn super::DecoderBlock>> {
        Ok(Box::new(GptNeoxLayer::load(
            self,
            ld,
            i,
            layer_inv_freq(self),
        )?))
    }
    fn block_groups(&self) -> &'static [&'static [&'static str]] {
        GPT_NEOX_GROUPS
    }
    fn block_prefix(&self, i: usize) -> String {
        format!("gpt_neox.layers.{i}")
    }
    fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        tensor_shapes(self)
    }
}
