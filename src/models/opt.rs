//! OPT decoder (facebook/opt-*): learned positions offset by 2, LayerNorm before (or, as in
//! opt-350m, after) each sub-layer, ReLU MLP, and optional project_in/project_out when the
//! word embeddings are narrower than the hidden size.

use super::attention::{attend, AttentionShape, KvCache};
use super::{
    AwqGroup, AwqPrev, BlockContext, BlockState, CausalLM, DecoderBlock, ForwardInput, LinearRef,
};
use crate::config::{AutoConfig, OptConfig};
use crate::error::{Error, Result};
use crate::kernels::DenseMatrix;
use crate::nn::{activate, add_in_place, forward_many, LayerNorm, Linear, Loader};
use std::sync::Arc;

/// OPT's learned position table starts two rows in (a fairseq leftover).
const POSITION_OFFSET: usize = 2;
const LN_EPS: f64 = 1e-5;

pub struct OptLayer {
    pub self_attn_layer_norm: LayerNorm,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub final_layer_norm: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    attention: AttentionShape,
    /// LayerNorm before each sub-layer (most OPT) or after it (opt-350m).
    pre_norm: bool,
    activation: crate::config::Activation,
}

pub struct Opt {
    pub config: AutoConfig,
    pub cfg: OptConfig,
    pub embed_tokens: Arc<DenseMatrix>,
    pub embed_positions: Vec<f32>,
    pub project_in: Option<Linear>,
    pub project_out: Option<Linear>,
    pub layers: Vec<OptLayer>,
    pub final_layer_norm: Option<LayerNorm>,
    pub lm_head: Option<Linear>,
}

fn has_final_norm(c: &OptConfig) -> bool {
    c.do_layer_norm_before && !c.remove_final_layer_norm
}

/// Checkpoint tensor names and shapes for an OPT config.
pub fn tensor_shapes(c: &OptConfig) -> Vec<(String, Vec<usize>)> {
    let (h, p) = (c.hidden_size, c.word_embed_proj_dim);
    let d = "model.decoder";
    let mut v = vec![
        (format!("{d}.embed_tokens.weight"), vec![c.vocab_size, p]),
        (
            format!("{d}.embed_positions.weight"),
            vec![c.max_position_embeddings + POSITION_OFFSET, h],
        ),
    ];
    if p != h {
        v.push((format!("{d}.project_in.weight"), vec![h, p]));
        v.push((format!("{d}.project_out.weight"), vec![p, h]));
    }
    let ln = |v: &mut Vec<(String, Vec<usize>)>, name: String| {
        if c.layer_norm_elementwise_affine {
            v.push((format!("{name}.weight"), vec![h]));
            v.push((format!("{name}.bias"), vec![h]));
        }
    };
    for i in 0..c.num_hidden_layers {
        let l = format!("{d}.layers.{i}");
        for (n, o, inp) in [
            ("self_attn.k_proj", h, h),
            ("self_attn.v_proj", h, h),
            ("self_attn.q_proj", h, h),
            ("self_attn.out_proj", h, h),
            ("fc1", c.ffn_dim, h),
            ("fc2", h, c.ffn_dim),
        ] {
            v.push((format!("{l}.{n}.weight"), vec![o, inp]));
            if c.enable_bias {
                v.push((format!("{l}.{n}.bias"), vec![o]));
            }
        }
        ln(&mut v, format!("{l}.self_attn_layer_norm"));
        ln(&mut v, format!("{l}.final_layer_norm"));
    }
    if has_final_norm(c) {
        ln(&mut v, format!("{d}.final_layer_norm"));
    }
    if !c.tie_word_embeddings {
        v.push(("lm_head.weight".into(), vec![c.vocab_size, p]));
    }
    v
}

impl OptLayer {
    /// Decoder block `i` (`model.decoder.layers.{i}`).
    pub fn load(cfg: &OptConfig, ld: &Loader, i: usize) -> Result<Self> {
        let h = cfg.hidden_size;
        let (b, affine) = (cfg.enable_bias, cfg.layer_norm_elementwise_affine);
        let l = format!("model.decoder.layers.{i}");
        let hd = h / cfg.num_attention_heads;
        Ok(OptLayer {
            self_attn_layer_norm: ld.layer_norm(
                &format!("{l}.self_attn_layer_norm"),
                h,
                LN_EPS,
                affine,
            )?,
            q_proj: ld.linear(&format!("{l}.self_attn.q_proj"), h, h, b)?,
            k_proj: ld.linear(&format!("{l}.self_attn.k_proj"), h, h, b)?,
            v_proj: ld.linear(&format!("{l}.self_attn.v_proj"), h, h, b)?,
            out_proj: ld.linear(&format!("{l}.self_attn.out_proj"), h, h, b)?,
            final_layer_norm: ld.layer_norm(&format!("{l}.final_layer_norm"), h, LN_EPS, affine)?,
            fc1: ld.linear(&format!("{l}.fc1"), h, cfg.ffn_dim, b)?,
            fc2: ld.linear(&format!("{l}.fc2"), cfg.ffn_dim, h, b)?,
            attention: AttentionShape {
                heads: cfg.num_attention_heads,
                kv_heads: cfg.num_attention_heads,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
                window: None,
            },
            pre_norm: cfg.do_layer_norm_before,
            activation: cfg.activation,
        })
    }
}

pub const OPT_GROUPS: &[&[&str]] = &[
    &["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"],
    &["self_attn.out_proj"],
    &["fc1"],
    &["fc2"],
];

impl DecoderBlock for OptLayer {
    fn groups(&self) -> &'static [&'static [&'static str]] {
        OPT_GROUPS
    }
    fn linear_mut(&mut self, name: &str) -> &mut Linear {
        match name {
            "self_attn.q_proj" => &mut self.q_proj,
            "self_attn.k_proj" => &mut self.k_proj,
            "self_attn.v_proj" => &mut self.v_proj,
            "self_attn.out_proj" => &mut self.out_proj,
            "fc1" => &mut self.fc1,
            "fc2" => &mut self.fc2,
            other => panic!("opt block has no linear `{other}`"),
        }
    }
    fn awq_groups(&self) -> Vec<AwqGroup> {
        // Post-norm blocks (opt-350m) normalize after the residual add: no op to fold into.
        if !self.pre_norm || self.self_attn_layer_norm.weight.is_none() {
            return Vec::new();
        }
        vec![
            AwqGroup {
                prev: AwqPrev::Norm("self_attn_layer_norm"),
                linears: &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                stages: 0..2,
            },
            AwqGroup {
                prev: AwqPrev::Linear("self_attn.v_proj"),
                linears: &["self_attn.out_proj"],
                stages: 1..2,
            },
            AwqGroup {
                prev: AwqPrev::Norm("final_layer_norm"),
                linears: &["fc1"],
                stages: 2..4,
            },
            // ReLU(x/s) = ReLU(x)/s for s > 0, so fc1's rows can carry fc2's scales.
            AwqGroup {
                prev: AwqPrev::Linear("fc1"),
                linears: &["fc2"],
                stages: 3..4,
            },
        ]
    }
    fn norm_names(&self) -> &'static [&'static str] {
        &["self_attn_layer_norm", "final_layer_norm"]
    }
    fn norm_mut(&mut self, name: &str) -> (Option<&mut Vec<f32>>, Option<&mut Vec<f32>>) {
        let n = match name {
            "self_attn_layer_norm" => &mut self.self_attn_layer_norm,
            "final_layer_norm" => &mut self.final_layer_norm,
            _ => return (None, None),
        };
        (n.weight.as_mut(), n.bias.as_mut())
    }
    fn begin(&self, x: Vec<f32>) -> BlockState {
        let input = if self.pre_norm {
            self.self_attn_layer_norm.forward(&x)
        } else {
            x.clone()
        };
        BlockState { residual: x, input }
    }
    fn step(&self, g: usize, st: &mut BlockState, ctx: &mut BlockContext) {
        let rows = st.residual.len() / self.self_attn_layer_norm.dim;
        match g {
            0 => {
                let [q, k, v]: [Vec<f32>; 3] =
                    forward_many(&[&self.q_proj, &self.k_proj, &self.v_proj], &st.input, rows)
                        .try_into()
                        .expect("three outputs");
                st.input = attend(
                    ctx.cache,
                    ctx.cache_layer,
                    &self.attention,
                    ctx.t,
                    &q,
                    &k,
                    &v,
                );
            }
            1 => {
                add_in_place(&mut st.residual, &self.out_proj.forward(&st.input, rows));
                if self.pre_norm {
                    st.input = self.final_layer_norm.forward(&st.residual);
                } else {
                    st.residual = self.self_attn_layer_norm.forward(&st.residual);
                    st.input = st.residual.clone();
                }
            }
            2 => {
                let mut f = self.fc1.forward(&st.input, rows);
                activate(self.activation, &mut f);
                st.input = f;
            }
            _ => {
                add_in_place(&mut st.residual, &self.fc2.forward(&st.input, rows));
                if !self.pre_norm {
                    st.residual = self.final_layer_norm.forward(&st.residual);
                }
                st.input = Vec::new();
            }
        }
    }
}

impl Opt {
    pub fn load(config: AutoConfig, cfg: OptConfig, ld: &Loader) -> Result<Self> {
        let (h, p) = (cfg.hidden_size, cfg.word_embed_proj_dim);
        let d = "model.decoder";
        let affine = cfg.layer_norm_elementwise_affine;
        let embed_tokens =
            Arc::new(ld.matrix(&format!("{d}.embed_tokens.weight"), cfg.vocab_size, p)?);
        let embed_positions = crate::formats::read_f32_checked(
            ld.src,
            &format!("{d}.embed_positions.weight"),
            &[cfg.max_position_embeddings + POSITION_OFFSET, h],
        )?;
        let (project_in, project_out) = if p != h {
            (
                Some(ld.linear(&format!("{d}.project_in"), p, h, false)?),
                Some(ld.linear(&format!("{d}.project_out"), h, p, false)?),
            )
        } else {
            (None, None)
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| OptLayer::load(&cfg, ld, i))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = if has_final_norm(&cfg) {
            Some(ld.layer_norm(&format!("{d}.final_layer_norm"), h, LN_EPS, affine)?)
        } else {
            None
        };
        let lm_head =
            ld.output_projection(cfg.tie_word_embeddings, &embed_tokens, p, cfg.vocab_size)?;
        Ok(Opt {
            config,
            cfg,
            embed_tokens,
            embed_positions,
            project_in,
            project_out,
            layers,
            final_layer_norm,
            lm_head,
        })
    }
}

impl CausalLM for Opt {
    fn config(&self) -> &AutoConfig {
        &self.config
    }

    fn embed(&self, input: &ForwardInput, cache: &mut KvCache) -> Result<(Vec<f32>, Vec<usize>)> {
        let (batch, t) = input.dims(cache, self.config.vocab_size())?;
        let c = &self.cfg;
        let (h, p) = (c.hidden_size, c.word_embed_proj_dim);
        let mut e = vec![0f32; batch * t * p];
        for (row, &id) in e.chunks_exact_mut(p).zip(&input.ids) {
            self.embed_tokens.row_into(id as usize, row);
        }
        let mut x = match &self.project_in {
            Some(l) => l.forward(&e, batch * t),
            None => e,
        };
        cache.push_positions(t, input.attention_mask.as_deref());
        // OPT derives positions from the mask: cumsum(mask) * mask - 1, i.e. -1 at padding.
        let positions: Vec<i64> = match &input.position_ids {
            Some(pids) => pids.iter().flatten().map(|&v| v as i64).collect(),
            None => cache
                .mask()
                .iter()
                .flat_map(|row| {
                    let mut n = 0i64;
                    let all: Vec<i64> = row
                        .iter()
                        .map(|&m| {
                            n += m as i64;
                            n * m as i64 - 1
                        })
                        .collect();
                    all[all.len() - t..].to_vec()
                })
                .collect(),
        };
        // No row past the table: refused, never clamped (docs/formats.md, "Config bounds").
        // Padding has position -1 (row 1), always inside.
        if let Some(&bad) = positions
            .iter()
            .find(|&&p| p >= c.max_position_embeddings as i64)
        {
            cache.pop_positions(t);
            return Err(Error::InvalidArgument(format!(
                "position {bad} is past OPT's position table (max_position_embeddings = {})",
                c.max_position_embeddings
            )));
        }
        for (row, &pos) in x.chunks_exact_mut(h).zip(&positions) {
            let r = (pos + POSITION_OFFSET as i64).max(0) as usize;
            add_in_place(row, &self.embed_positions[r * h..(r + 1) * h]);
        }
        // Blocks do not use positions (they are added here); keep the clamped rows for callers.
        let positions = positions.iter().map(|&p| p.max(0) as usize).collect();
        Ok((x, positions))
    }

    fn blocks(&self) -> Vec<&dyn DecoderBlock> {
        self.layers.iter().map(|l| l as &dyn DecoderBlock).collect()
    }

    fn head(&self, x: &[f32]) -> Vec<f32> {
        let h = self.cfg.hidden_size;
        let mut x = x.to_vec();
        if let Some(ln) = &self.final_layer_norm {
            x = ln.forward(&x);
        }
        if let Some(l) = &self.project_out {
            x = l.forward(&x, x.len() / h);
        }
        super::project_logits(&x, self.lm_head.as_ref(), &self.embed_tokens)
    }

    fn linears(&self) -> Vec<LinearRef<'_>> {
        let mut out = vec![];
        let d = "model.decoder";
        if let Some(l) = &self.project_in {
            out.push(LinearRef {
                name: format!("{d}.project_in"),
                linear: l,
            });
        }
        for (i, l) in self.layers.iter().enumerate() {
            for (name, lin) in [
                ("self_attn.k_proj", &l.k_proj),
                ("self_attn.v_proj", &l.v_proj),
                ("self_attn.q_proj", &l.q_proj),
                ("self_attn.out_proj", &l.out_proj),
                ("fc1", &l.fc1),
                ("fc2", &l.fc2),
            ] {
                out.push(LinearRef {
                    name: format!("{d}.layers.{i}.{name}"),
                    linear: lin,
                });
            }
        }
        if let Some(l) = &self.project_out {
            out.push(LinearRef {
                name: format!("{d}.project_out"),
                linear: l,
            });
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
        let c = &self.cfg;
        let (h, d) = (c.hidden_size, "model.decoder");
        let mut out = vec![
            (
                format!("{d}.embed_tokens.weight"),
                crate::kernels::LinearKernel::to_f32(self.embed_tokens.as_ref()),
                vec![c.vocab_size, c.word_embed_proj_dim],
            ),
            (
                format!("{d}.embed_positions.weight"),
                self.embed_positions.clone(),
                vec![c.max_position_embeddings + POSITION_OFFSET, h],
            ),
        ];
        let mut ln = |name: String, n: &LayerNorm| {
            if let (Some(w), Some(b)) = (&n.weight, &n.bias) {
                out.push((format!("{name}.weight"), w.clone(), vec![h]));
                out.push((format!("{name}.bias"), b.clone(), vec![h]));
            }
        };
        for (i, l) in self.layers.iter().enumerate() {
            ln(
                format!("{d}.layers.{i}.self_attn_layer_norm"),
                &l.self_attn_layer_norm,
            );
            ln(
                format!("{d}.layers.{i}.final_layer_norm"),
                &l.final_layer_norm,
            );
        }
        if let Some(n) = &self.final_layer_norm {
            ln(format!("{d}.final_layer_norm"), n);
        }
        out
    }

    fn embedding(&self) -> &DenseMatrix {
        &self.embed_tokens
    }
}

impl super::Family for OptConfig {
    fn load(&self, config: AutoConfig, ld: &Loader) -> Result<Box<dyn super::CausalLM>> {
        Ok(Box::new(Opt::load(config, self.clone(), ld)?))
    }
    fn load_block(&self, ld: &Loader, i: usize) -> Result<Box<dyn super::DecoderBlock>> {
        Ok(Box::new(OptLayer::load(self, ld, i)?))
    }
    fn block_groups(&self) -> &'static [&'static [&'static str]] {
        OPT_GROUPS
    }
    fn block_prefix(&self, i: usize) -> String {
        format!("model.decoder.layers.{i}")
    }
    fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        tensor_shapes(self)
    }
    fn awq_refusal(&self) -> Option<&'static str> {
        (!self.do_layer_norm_before).then_some(
            "AWQ needs pre-norm blocks to fold its scales into; this OPT model is post-norm \
             (do_layer_norm_before=false)",
        )
    }
}
