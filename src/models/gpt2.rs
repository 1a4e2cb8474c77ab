//! GPT-2: learned absolute positions, pre-LayerNorm blocks, GELU (tanh) MLP. Its `Conv1D`
//! weights are stored `[in, out]`; they are transposed once at load into the Linear layout.

use super::attention::{attend, AttentionShape, KvCache};
use super::{
    AwqGroup, AwqPrev, BlockContext, BlockState, CausalLM, DecoderBlock, ForwardInput, LinearRef,
};
use crate::config::{AutoConfig, Gpt2Config};
use crate::error::{Error, Result};
use crate::kernels::DenseMatrix;
use crate::nn::{activate, add_in_place, LayerNorm, Linear, Loader};
use std::sync::Arc;

pub struct Gpt2Block {
    pub ln_1: LayerNorm,
    pub c_attn: Linear,
    pub attn_c_proj: Linear,
    pub ln_2: LayerNorm,
    pub c_fc: Linear,
    pub mlp_c_proj: Linear,
    attention: AttentionShape,
    activation: crate::config::Activation,
}

pub struct Gpt2 {
    pub config: AutoConfig,
    pub cfg: Gpt2Config,
    pub wte: Arc<DenseMatrix>,
    pub wpe: Vec<f32>,
    pub h: Vec<Gpt2Block>,
    pub ln_f: LayerNorm,
    pub lm_head: Option<Linear>,
}

/// Checkpoint tensor names and shapes (Conv1D weights as stored, `[in, out]`).
pub fn tensor_shapes(c: &Gpt2Config) -> Vec<(String, Vec<usize>)> {
    let e = c.n_embd;
    let mut v = vec![
        ("transformer.wte.weight".to_string(), vec![c.vocab_size, e]),
        ("transformer.wpe.weight".to_string(), vec![c.n_positions, e]),
    ];
    for i in 0..c.n_layer {
        let p = format!("transformer.h.{i}");
        for (n, inp, out) in [
            ("attn.c_attn", e, 3 * e),
            ("attn.c_proj", e, e),
            ("mlp.c_fc", e, c.n_inner),
            ("mlp.c_proj", c.n_inner, e),
        ] {
            v.push((format!("{p}.{n}.weight"), vec![inp, out]));
            v.push((format!("{p}.{n}.bias"), vec![out]));
        }
        for n in ["ln_1", "ln_2"] {
            v.push((format!("{p}.{n}.weight"), vec![e]));
            v.push((format!("{p}.{n}.bias"), vec![e]));
        }
    }
    v.push(("transformer.ln_f.weight".into(), vec![e]));
    v.push(("transformer.ln_f.bias".into(), vec![e]));
    if !c.tie_word_embeddings {
        v.push(("lm_head.weight".into(), vec![c.vocab_size, e]));
    }
    v
}

impl Gpt2Block {
    /// Decoder block `i` (`transformer.h.{i}`).
    pub fn load(cfg: &Gpt2Config, ld: &Loader, i: usize) -> Result<Self> {
        let (e, eps) = (cfg.n_embd, cfg.layer_norm_epsilon);
        let p = format!("transformer.h.{i}");
        let hd = e / cfg.n_head;
        let mut scale = if cfg.scale_attn_weights {
            1.0 / (hd as f32).sqrt()
        } else {
            1.0
        };
        if cfg.scale_attn_by_inverse_layer_idx {
            scale /= (i + 1) as f32;
        }
        Ok(Gpt2Block {
            ln_1: ld.layer_norm(&format!("{p}.ln_1"), e, eps, true)?,
            c_attn: ld.conv1d(&format!("{p}.attn.c_attn"), e, 3 * e)?,
            attn_c_proj: ld.conv1d(&format!("{p}.attn.c_proj"), e, e)?,
            ln_2: ld.layer_norm(&format!("{p}.ln_2"), e, eps, true)?,
            c_fc: ld.conv1d(&format!("{p}.mlp.c_fc"), e, cfg.n_inner)?,
            mlp_c_proj: ld.conv1d(&format!("{p}.mlp.c_proj"), cfg.n_inner, e)?,
            attention: AttentionShape {
                heads: cfg.n_head,
                kv_heads: cfg.n_head,
                head_dim: hd,
                scale,
                window: None,
            },
            activation: cfg.activation,
        })
    }
}

pub const GPT2_GROUPS: &[&[&str]] = &[
    &["attn.c_attn"],
    &["attn.c_proj"],
    &["mlp.c_fc"],
    &["mlp.c_proj"],
];

impl DecoderBlock for Gpt2Block {
    fn groups(&self) -> &'static [&'static [&'static str]] {
        GPT2_GROUPS
    }
    fn linear_mut(&mut self, name: &str) -> &mut Linear {
        match name {
            "attn.c_attn" => &mut self.c_attn,
            "attn.c_proj" => &mut self.attn_c_proj,
            "mlp.c_fc" => &mut self.c_fc,
            "mlp.c_proj" => &mut self.mlp_c_proj,
            other => panic!("gpt2 block has no linear `{other}`"),
        }
    }
    fn awq_groups(&self) -> Vec<AwqGroup> {
        if self.ln_1.weight.is_none() || self.ln_2.weight.is_none() {
            return Vec::new();
        }
        // No c_fc → c_proj group: GELU does not commute with scaling, and folding it needs an
        // activation-scale tensor other loaders do not read.
        vec![
            AwqGroup {
                prev: AwqPrev::Norm("ln_1"),
                linears: &["attn.c_attn"],
                stages: 0..2,
            },
            AwqGroup {
                prev: AwqPrev::Linear("attn.c_attn"),
                linears: &["attn.c_proj"],
                stages: 1..2,
            },
            AwqGroup {
                prev: AwqPrev::Norm("ln_2"),
                linears: &["mlp.c_fc"],
                stages: 2..4,
            },
        ]
    }
    fn norm_names(&self) -> &'static [&'static str] {
        &["ln_1", "ln_2"]
    }
    fn norm_mut(&mut self, name: &str) -> (Option<&mut Vec<f32>>, Option<&mut Vec<f32>>) {
        let n = match name {
            "ln_1" => &mut self.ln_1,
            "ln_2" => &mut self.ln_2,
            _ => return (None, None),
        };
        (n.weight.as_mut(), n.bias.as_mut())
    }
    fn begin(&self, x: Vec<f32>) -> BlockState {
        BlockState {
            input: self.ln_1.forward(&x),
            residual: x,
        }
    }
    fn step(&self, g: usize, st: &mut BlockState, ctx: &mut BlockContext) {
        let e = self.ln_1.dim;
        let rows = st.residual.len() / e;
        match g {
            0 => {
                let qkv = self.c_attn.forward(&st.input, rows);
                let (mut q, mut k, mut v) = (
                    Vec::with_capacity(rows * e),
                    Vec::with_capacity(rows * e),
                    Vec::with_capacity(rows * e),
                );
                for row in qkv.chunks_exact(3 * e) {
                    q.extend_from_slice(&row[..e]);
                    k.extend_from_slice(&row[e..2 * e]);
                    v.extend_from_slice(&row[2 * e..]);
                }
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
                add_in_place(&mut st.residual, &self.attn_c_proj.forward(&st.input, rows));
                st.input = self.ln_2.forward(&st.residual);
            }
            2 => {
                let mut f = self.c_fc.forward(&st.input, rows);
                activate(self.activation, &mut f);
                st.input = f;
            }
            _ => {
                add_in_place(&mut st.residual, &self.mlp_c_proj.forward(&st.input, rows));
                st.input = Vec::new();
            }
        }
    }
}

impl Gpt2 {
    pub fn load(config: AutoConfig, cfg: Gpt2Config, ld: &Loader) -> Result<Self> {
        let e = cfg.n_embd;
        let eps = cfg.layer_norm_epsilon;
        let wte = Arc::new(ld.matrix("transformer.wte.weight", cfg.vocab_size, e)?);
        let wpe = crate::formats::read_f32_checked(
            ld.src,
            "transformer.wpe.weight",
            &[cfg.n_positions, e],
        )?;
        let h = (0..cfg.n_layer)
            .map(|i| Gpt2Block::load(&cfg, ld, i))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = ld.layer_norm("transformer.ln_f", e, eps, true)?;
        let lm_head = ld.output_projection(cfg.tie_word_embeddings, &wte, e, cfg.vocab_size)?;
        Ok(Gpt2 {
            config,
            cfg,
            wte,
            wpe,
            h,
            ln_f,
            lm_head,
        })
    }
}

impl CausalLM for Gpt2 {
    fn config(&self) -> &AutoConfig {
        &self.config
    }

    fn embed(&self, input: &ForwardInput, cache: &mut KvCache) -> Result<(Vec<f32>, Vec<usize>)> {
        let (_, t) = input.dims(cache, self.config.vocab_size())?;
        let e = self.cfg.n_embd;
        let mut x = vec![0f32; input.ids.len() * e];
        for (row, &id) in x.chunks_exact_mut(e).zip(&input.ids) {
            self.wte.row_into(id as usize, row);
        }
        cache.push_positions(t, input.attention_mask.as_deref());
        let positions: Vec<usize> = match &input.position_ids {
            Some(p) => p.iter().flatten().copied().collect(),
            None => cache.default_positions(t).into_iter().flatten().collect(),
        };
        // No row past the table: refused, never clamped (docs/formats.md, "Config bounds").
        if let Some(&bad) = positions.iter().find(|&&p| p >= self.cfg.n_positions) {
            cache.pop_positions(t);
            return Err(Error::InvalidArgument(format!(
                "position {bad} is past GPT-2's position table (n_positions = {})",
                self.cfg.n_positions
            )));
        }
        for (row, &pos) in x.chunks_exact_mut(e).zip(&positions) {
            add_in_place(row, &self.wpe[pos * e..(pos + 1) * e]);
        }
        Ok((x, positions))
    }

    fn blocks(&self) -> Vec<&dyn DecoderBlock> {
        self.h.iter().map(|b| b as &dyn DecoderBlock).collect()
    }

    fn head(&self, x: &[f32]) -> Vec<f32> {
        let x = self.ln_f.forward(x);
        super::project_logits(&x, self.lm_head.as_ref(), &self.wte)
    }

    fn linears(&self) -> Vec<LinearRef<'_>> {
        let mut out = vec![];
        for (i, b) in self.h.iter().enumerate() {
            for (name, lin) in [
                ("attn.c_attn", &b.c_attn),
                ("attn.c_proj", &b.attn_c_proj),
                ("mlp.c_fc", &b.c_fc),
                ("mlp.c_proj", &b.mlp_c_proj),
            ] {
                out.push(LinearRef {
                    name: format!("transformer.h.{i}.{name}"),
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
        let c = &self.cfg;
        let e = c.n_embd;
        let mut out = vec![
            (
                "transformer.wte.weight".to_string(),
                crate::kernels::LinearKernel::to_f32(self.wte.as_ref()),
                vec![c.vocab_size, e],
            ),
            (
                "transformer.wpe.weight".to_string(),
                self.wpe.clone(),
                vec![c.n_positions, e],
            ),
        ];
        let mut ln = |name: String, n: &LayerNorm| {
            out.push((
                format!("{name}.weight"),
                n.weight.clone().unwrap_or_default(),
                vec![e],
            ));
            out.push((
                format!("{name}.bias"),
                n.bias.clone().unwrap_or_default(),
                vec![e],
            ));
        };
        for (i, b) in self.h.iter().enumerate() {
            ln(format!("transformer.h.{i}.ln_1"), &b.ln_1);
            ln(format!("transformer.h.{i}.ln_2"), &b.ln_2);
        }
        ln("transformer.ln_f".into(), &self.ln_f);
        out
    }

    fn embedding(&self) -> &DenseMatrix {
        &self.wte
    }

    fn conv1d_weights(&self) -> bool {
        true
    }
}

impl super::Family for Gpt2Config {
    fn load(&self, config: AutoConfig, ld: &Loader) -> Result<Box<dyn super::CausalLM>> {
        Ok(Box::new(Gpt2::load(config, self.clone(), ld)?))
    }
    fn load_block(&self, ld: &Loader, i: usize) -> Result<Box<dyn super::DecoderBlock>> {
        Ok(Box::new(Gpt2Block::load(self, ld, i)?))
    }
    fn block_groups(&self) -> &'static [&'static [&'static str]] {
        GPT2_GROUPS
    }
    fn block_prefix(&self, i: usize) -> String {
        format!("transformer.h.{i}")
    }
    fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        tensor_shapes(self)
    }
    fn conv1d_weights(&self) -> bool {
        true
    }
}
