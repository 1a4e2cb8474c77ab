//! Llama-family decoder (Llama 1–3, Mistral-style, SmolLM; Qwen2 adds q/k/v biases; Qwen3 an
//! RMSNorm over each query and key head before the rotary embedding): RMSNorm, rotary position
//! embeddings (default, linear or llama3 scaling), grouped-query attention and a SwiGLU MLP.

use super::attention::{attend, AttentionShape, KvCache};
use super::{
    AwqGroup, AwqPrev, BlockContext, BlockState, CausalLM, DecoderBlock, ForwardInput, LinearRef,
};
use crate::config::{AutoConfig, LlamaConfig, RopeScaling};
use crate::error::Result;
use crate::kernels::DenseMatrix;
use crate::nn::{add_in_place, forward_many, Linear, Loader, RmsNorm};
use std::sync::Arc;

pub struct LlamaLayer {
    pub input_layernorm: RmsNorm,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// Qwen3's per-head RMSNorm on queries and keys (`[head_dim]` weights), applied after the
    /// projections and before the rotary embedding; `None` for the other members.
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub post_attention_layernorm: RmsNorm,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    attention: AttentionShape,
    inv_freq: Arc<[f32]>,
    /// YaRN's cos/sin factor (1 otherwise).
    rope_attention: f32,
}

pub struct Llama {
    pub config: AutoConfig,
    pub cfg: LlamaConfig,
    pub embed_tokens: Arc<DenseMatrix>,
    pub layers: Vec<LlamaLayer>,
    pub norm: RmsNorm,
    /// `None` when tied to the input embeddings.
    pub lm_head: Option<Linear>,
}

/// Inverse rotary frequencies, with the configured scaling folded in.
pub fn rope_inv_freq(head_dim: usize, theta: f64, scaling: Option<&RopeScaling>) -> Vec<f32> {
    let base: Vec<f32> = (0..head_dim / 2)
        .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
        .collect();
    match scaling {
        None => base,
        Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / *factor as f32).collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let old = *original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let f = f as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                    if medium {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                    } else {
                        scaled as f32
                    }
                })
                .collect()
        }
        Some(RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            truncate,
            ..
        }) => {
            // The dimension (of head_dim) whose frequency turns `rotations` times over the
            // original context; the ramp runs between the dimensions of beta_fast and beta_slow.
            let dim = head_dim as f64;
            let correction = |rotations: f64| {
                dim * (original_max_position_embeddings / (rotations * 2.0 * std::f64::consts::PI))
                    .ln()
                    / (2.0 * theta.ln())
            };
            let (mut low, mut high) = (correction(*beta_fast), correction(*beta_slow));
            if *truncate {
                (low, high) = (low.floor(), high.ceil());
            }
            let (low, mut high) = (low.max(0.0) as f32, high.min(dim - 1.0) as f32);
            if low == high {
                high += 0.001; // as transformers: no division by zero
            }
            let factor = *factor as f32;
            base.iter()
                .enumerate()
                .map(|(i, &extrapolated)| {
                    let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                    let keep = 1.0 - ramp; // share of the original frequency
                    let interpolated = 1.0 / (factor * (1.0 / extrapolated));
                    interpolated * (1.0 - keep) + extrapolated * keep
                })
                .collect()
        }
    }
}

/// The factor YaRN multiplies cos and sin by (1 for the other scalings); applied to the
/// rotated queries and keys, which is the same product.
pub fn rope_attention_factor(scaling: Option<&RopeScaling>) -> f32 {
    match scaling {
        Some(RopeScaling::Yarn {
            attention_factor, ..
        }) => *attention_factor as f32,
        _ => 1.0,
    }
}

/// Rotate each head of `x` (`[rows, heads * head_dim]`) by its row's position, in the
/// "rotate half" layout transformers uses.
pub fn apply_rope(
    x: &mut [f32],
    heads: usize,
    head_dim: usize,
    positions: &[usize],
    inv_freq: &[f32],
) {
    use rayon::prelude::*;
    let half = head_dim / 2;
    let rotate = |(row, &pos): (&mut [f32], &usize)| {
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
    };
    if positions.len() >= 16 {
        x.par_chunks_exact_mut(heads * head_dim)
            .zip(positions.par_iter())
            .for_each(rotate);
    } else {
        x.chunks_exact_mut(heads * head_dim)
            .zip(positions.iter())
            .for_each(rotate);
    }
}

/// Rotary frequencies shared by every layer.
pub fn layer_inv_freq(cfg: &LlamaConfig) -> Arc<[f32]> {
    rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling.as_ref()).into()
}

impl LlamaLayer {
    /// Decoder block `i` (`model.layers.{i}`).
    pub fn load(cfg: &LlamaConfig, ld: &Loader, i: usize, inv_freq: Arc<[f32]>) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_dim, kv_dim) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let p = format!("model.layers.{i}");
        let im = cfg.intermediate_size;
        Ok(LlamaLayer {
            input_layernorm: ld.rms_norm(
                &format!("{p}.input_layernorm.weight"),
                h,
                cfg.rms_norm_eps,
            )?,
            q_proj: ld.linear(&format!("{p}.self_attn.q_proj"), h, q_dim, cfg.qkv_bias)?,
            k_proj: ld.linear(&format!("{p}.self_attn.k_proj"), h, kv_dim, cfg.qkv_bias)?,
            v_proj: ld.linear(&format!("{p}.self_attn.v_proj"), h, kv_dim, cfg.qkv_bias)?,
            o_proj: ld.linear(&format!("{p}.self_attn.o_proj"), q_dim, h, cfg.o_bias)?,
            q_norm: cfg
                .qk_norm
                .then(|| {
                    ld.rms_norm(
                        &format!("{p}.self_attn.q_norm.weight"),
                        hd,
                        cfg.rms_norm_eps,
                    )
                })
                .transpose()?,
            k_norm: cfg
                .qk_norm
                .then(|| {
                    ld.rms_norm(
                        &format!("{p}.self_attn.k_norm.weight"),
                        hd,
                        cfg.rms_norm_eps,
                    )
                })
                .transpose()?,
            post_attention_layernorm: ld.rms_norm(
                &format!("{p}.post_attention_layernorm.weight"),
                h,
                cfg.rms_norm_eps,
            )?,
            gate_proj: ld.linear(&format!("{p}.mlp.gate_proj"), h, im, cfg.mlp_bias)?,
            up_proj: ld.linear(&format!("{p}.mlp.up_proj"), h, im, cfg.mlp_bias)?,
            down_proj: ld.linear(&format!("{p}.mlp.down_proj"), im, h, cfg.mlp_bias)?,
            attention: AttentionShape {
                heads: cfg.num_attention_heads,
                kv_heads: cfg.num_key_value_heads,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
                window: cfg.layer_window(i),
            },
            inv_freq,
            rope_attention: rope_attention_factor(cfg.rope_scaling.as_ref()),
        })
    }
}

pub const LLAMA_GROUPS: &[&[&str]] = &[
    &["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"],
    &["self_attn.o_proj"],
    &["mlp.up_proj", "mlp.gate_proj"],
    &["mlp.down_proj"],
];

impl DecoderBlock for LlamaLayer {
    fn groups(&self) -> &'static [&'static [&'static str]] {
        LLAMA_GROUPS
    }
    fn linear_mut(&mut self, name: &str) -> &mut Linear {
        match name {
            "self_attn.q_proj" => &mut self.q_proj,
            "self_attn.k_proj" => &mut self.k_proj,
            "self_attn.v_proj" => &mut self.v_proj,
            "self_attn.o_proj" => &mut self.o_proj,
            "mlp.gate_proj" => &mut self.gate_proj,
            "mlp.up_proj" => &mut self.up_proj,
            "mlp.down_proj" => &mut self.down_proj,
            other => panic!("llama block has no linear `{other}`"),
        }
    }
    fn awq_groups(&self) -> Vec<AwqGroup> {
        let mut g = vec![AwqGroup {
            prev: AwqPrev::Norm("input_layernorm"),
            linears: &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            stages: 0..2,
        }];
        // v → o only when the two weights have the same shape, AutoAWQ's test (not with
        // grouped-query heads, nor when heads × head_dim differs from the hidden size).
        let (v, o) = (&self.v_proj, &self.o_proj);
        if (v.out_features(), v.in_features()) == (o.out_features(), o.in_features()) {
            g.push(AwqGroup {
                prev: AwqPrev::Linear("self_attn.v_proj"),
                linears: &["self_attn.o_proj"],
                stages: 1..2,
            });
        }
        g.push(AwqGroup {
            prev: AwqPrev::Norm("post_attention_layernorm"),
            linears: &["mlp.gate_proj", "mlp.up_proj"],
            stages: 2..4,
        });
        g.push(AwqGroup {
            prev: AwqPrev::Linear("mlp.up_proj"),
            linears: &["mlp.down_proj"],
            stages: 3..4,
        });
        g
    }
    /// q_norm/k_norm are not listed: nothing AWQ scales feeds them, so they are never folded
    /// into and are copied to a checkpoint unchanged.
    fn norm_names(&self) -> &'static [&'static str] {
        &["input_layernorm", "post_attention_layernorm"]
    }
    fn norm_mut(&mut self, name: &str) -> (Option<&mut Vec<f32>>, Option<&mut Vec<f32>>) {
        match name {
            "input_layernorm" => (Some(&mut self.input_layernorm.weight), None),
            "post_attention_layernorm" => (Some(&mut self.post_attention_layernorm.weight), None),
            _ => (None, None),
        }
    }
    fn begin(&self, x: Vec<f32>) -> BlockState {
        BlockState {
            input: self.input_layernorm.forward(&x),
            residual: x,
        }
    }
    fn step(&self, g: usize, st: &mut BlockState, ctx: &mut BlockContext) {
        let rows = st.residual.len() / self.input_layernorm.weight.len();
        match g {
            0 => {
                let [mut q, mut k, v]: [Vec<f32>; 3] =
                    forward_many(&[&self.q_proj, &self.k_proj, &self.v_proj], &st.input, rows)
                        .try_into()
                        .expect("three outputs");
                let s = &self.attention;
                // Qwen3: each head normalized on its own (the weights are `[head_dim]`, so
                // the norm's rows are heads), before the rotation.
                if let Some(n) = &self.q_norm {
                    q = n.forward(&q);
                }
                if let Some(n) = &self.k_norm {
                    k = n.forward(&k);
                }
                apply_rope(&mut q, s.heads, s.head_dim, ctx.positions, &self.inv_freq);
                apply_rope(
                    &mut k,
                    s.kv_heads,
                    s.head_dim,
                    ctx.positions,
                    &self.inv_freq,
                );
                if self.rope_attention != 1.0 {
                    let f = self.rope_attention;
                    q.iter_mut().chain(k.iter_mut()).for_each(|v| *v *= f);
                }
                st.input = attend(ctx.cache, ctx.cache_layer, s, ctx.t, &q, &k, &v);
            }
            1 => {
                add_in_place(&mut st.residual, &self.o_proj.forward(&st.input, rows));
                st.input = self.post_attention_layernorm.forward(&st.residual);
            }
            2 => {
                let [mut gate, up]: [Vec<f32>; 2] =
                    forward_many(&[&self.gate_proj, &self.up_proj], &st.input, rows)
                        .try_into()
                        .expect("two outputs");
                let im = up.len() / rows;
                crate::nn::for_each_row_in_place(&mut gate, &up, im, |g, u| {
                    for (g, u) in g.iter_mut().zip(u) {
                        *g = crate::kernels::silu(*g) * u;
                    }
                });
                st.input = gate;
            }
            _ => {
                add_in_place(&mut st.residual, &self.down_proj.forward(&st.input, rows));
                st.input = Vec::new();
            }
        }
    }
}

impl Llama {
    pub fn load(config: AutoConfig, cfg: LlamaConfig, ld: &Loader) -> Result<Self> {
        let h = cfg.hidden_size;
        let embed_tokens = Arc::new(ld.matrix("model.embed_tokens.weight", cfg.vocab_size, h)?);
        let inv_freq = layer_inv_freq(&cfg);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| LlamaLayer::load(&cfg, ld, i, inv_freq.clone()))
            .collect::<Result<Vec<_>>>()?;
        let norm = ld.rms_norm("model.norm.weight", h, cfg.rms_norm_eps)?;
        // Some tied checkpoints still carry lm_head.weight; the config decides.
        let lm_head =
            ld.output_projection(cfg.tie_word_embeddings, &embed_tokens, h, cfg.vocab_size)?;
        Ok(Llama {
            config,
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }
}

impl CausalLM for Llama {
    fn config(&self) -> &AutoConfig {
        &self.config
    }

    fn embed(&self, input: &ForwardInput, cache: &mut KvCache) -> Result<(Vec<f32>, Vec<usize>)> {
        super::embed_tokens_and_positions(
            input,
            cache,
            self.config.vocab_size(),
            &self.embed_tokens,
            self.cfg.hidden_size,
        )
    }

    fn blocks(&self) -> Vec<&dyn DecoderBlock> {
        self.layers.iter().map(|l| l as &dyn DecoderBlock).collect()
    }

    fn head(&self, x: &[f32]) -> Vec<f32> {
        let x = self.norm.forward(x);
        super::project_logits(&x, self.lm_head.as_ref(), &self.embed_tokens)
    }

    fn linears(&self) -> Vec<LinearRef<'_>> {
        let mut out = vec![];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            for (name, lin) in [
                ("self_attn.q_proj", &l.q_proj),
                ("self_attn.k_proj", &l.k_proj),
                ("self_attn.v_proj", &l.v_proj),
                ("self_attn.o_proj", &l.o_proj),
                ("mlp.gate_proj", &l.gate_proj),
                ("mlp.up_proj", &l.up_proj),
                ("mlp.down_proj", &l.down_proj),
            ] {
                out.push(LinearRef {
                    name: format!("{p}.{name}"),
                    linear: lin,
                });
            }
        }
        if let Some(l) = &self.lm_head {
            out.push(LinearRef {
                name: "lm_head".into(),
                linear: l,
            });
        }
        out
    }

    fn other_tensors(&self) -> Vec<(String, Vec<f32>, Vec<usize>)> {
        let h = self.cfg.hidden_size;
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            crate::kernels::LinearKernel::to_f32(self.embed_tokens.as_ref()),
            vec![self.cfg.vocab_size, h],
        )];
        for (i, l) in self.layers.iter().enumerate() {
            out.push((
                format!("model.layers.{i}.input_layernorm.weight"),
                l.input_layernorm.weight.clone(),
                vec![h],
            ));
            out.push((
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                l.post_attention_layernorm.weight.clone(),
                vec![h],
            ));
            for (name, norm) in [("q_norm", &l.q_norm), ("k_norm", &l.k_norm)] {
                if let Some(n) = norm {
                    out.push((
                        format!("model.layers.{i}.self_attn.{name}.weight"),
                        n.weight.clone(),
                        vec![n.weight.len()],
                    ));
                }
            }
        }
        out.push((
            "model.norm.weight".into(),
            self.norm.weight.clone(),
            vec![h],
        ));
        out
    }

    fn embedding(&self) -> &DenseMatrix {
        &self.embed_tokens
    }
}

/// Checkpoint tensor names and shapes for a llama-family config.
pub fn tensor_shapes(c: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, hd, im) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let (q, kv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    let mut v = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![c.vocab_size, h],
    )];
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        v.push((format!("{p}.input_layernorm.weight"), vec![h]));
        for (n, o, inp, bias) in [
            ("self_attn.q_proj", q, h, c.qkv_bias),
            ("self_attn.k_proj", kv, h, c.qkv_bias),
            ("self_attn.v_proj", kv, h, c.qkv_bias),
            ("self_attn.o_proj", h, q, c.o_bias),
            ("mlp.gate_proj", im, h, c.mlp_bias),
            ("mlp.up_proj", im, h, c.mlp_bias),
            ("mlp.down_proj", h, im, c.mlp_bias),
        ] {
            v.push((format!("{p}.{n}.weight"), vec![o, inp]));
            if bias {
                v.push((format!("{p}.{n}.bias"), vec![o]));
            }
        }
        if c.qk_norm {
            v.push((format!("{p}.self_attn.q_norm.weight"), vec![hd]));
            v.push((format!("{p}.self_attn.k_norm.weight"), vec![hd]));
        }
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
    }
    v.push(("model.norm.weight".into(), vec![h]));
    if !c.tie_word_embeddings {
        v.push(("lm_head.weight".into(), vec![c.vocab_size, h]));
    }
    v
}

impl super::Family for LlamaConfig {
    fn load(&self, config: AutoConfig, ld: &Loader) -> Result<Box<dyn super::CausalLM>> {
        Ok(Box::new(Llama::load(config, self.clone(), ld)?))
    }
    fn load_block(&self, ld: &Loader, i: usize) -> Result<Box<dyn super::DecoderBlock>> {
        Ok(Box::new(LlamaLayer::load(
            self,
            ld,
            i,
            layer_inv_freq(self),
        )?))
    }
    fn block_groups(&self) -> &'static [&'static [&'static str]] {
        LLAMA_GROUPS
    }
    fn block_prefix(&self, i: usize) -> String {
        format!("model.layers.{i}")
    }
    fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        tensor_shapes(self)
    }
}
