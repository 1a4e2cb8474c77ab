//! AutoModelForCausalLM: one file per architecture behind the [`CausalLM`] trait, plus loading
//! (`from_pretrained`, `from_config`) and saving (`save_pretrained`).

pub mod attention;
pub mod gpt2;
pub mod gpt_neox;
pub mod llama;
pub mod opt;

pub use attention::KvCache;

use crate::config::{Architecture, AutoConfig};
use crate::error::{Error, Result};
use crate::formats::WeightSource;
use crate::kernels::{DenseMatrix, LinearKernel};
use crate::nn::{Linear, Loader};
use crate::tensor::WeightDType;
use crate::tensor::{DType, RawTensor, TensorInfo};
use std::collections::BTreeMap;
use std::path::Path;

/// Which positions need logits: all (perplexity) or only the last of each row (generation),
/// which skips most of the vocabulary projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsMode {
    All,
    Last,
}

/// A batch of token ids `[batch, t]` (flattened), with an optional HF-style attention mask
/// covering past and new positions, and optional explicit position ids for the new tokens.
#[derive(Clone, Debug, Default)]
pub struct ForwardInput {
    pub ids: Vec<u32>,
    pub batch: usize,
    pub attention_mask: Option<Vec<Vec<u8>>>,
    pub position_ids: Option<Vec<Vec<usize>>>,
}

impl ForwardInput {
    pub fn single(ids: &[u32]) -> Self {
        ForwardInput {
            ids: ids.to_vec(),
            batch: 1,
            ..Default::default()
        }
    }
    pub fn batch(rows: &[Vec<u32>]) -> Result<Self> {
        let t = rows.first().map_or(0, Vec::len);
        if rows.iter().any(|r| r.len() != t) {
            return Err(Error::InvalidArgument(
                "all rows of a batch must have the same length (pad them)".into(),
            ));
        }
        Ok(ForwardInput {
            ids: rows.concat(),
            batch: rows.len(),
            ..Default::default()
        })
    }
    /// Validate against the cache and vocabulary; returns `(batch, t)`.
    pub fn dims(&self, cache: &KvCache, vocab_size: usize) -> Result<(usize, usize)> {
        if let Some(&bad) = self.ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary of {vocab_size}"
            )));
        }
        if self.batch == 0 || self.ids.is_empty() || self.ids.len() % self.batch != 0 {
            return Err(Error::InvalidArgument(format!(
                "input of {} ids does not split into {} rows",
                self.ids.len(),
                self.batch
            )));
        }
        if cache.batch() != self.batch {
            return Err(Error::InvalidArgument(format!(
                "cache was made for batch {} but input has batch {}",
                cache.batch(),
                self.batch
            )));
        }
        let t = self.ids.len() / self.batch;
        if let Some(m) = &self.attention_mask {
            if m.len() != self.batch || m.iter().any(|r| r.len() != t && r.len() != cache.len() + t)
            {
                return Err(Error::InvalidArgument(
                    "attention mask must be [batch, t] or [batch, past + t]".into(),
                ));
            }
        }
        if let Some(p) = &self.position_ids {
            if p.len() != self.batch || p.iter().any(|r| r.len() != t) {
                return Err(Error::InvalidArgument(
                    "position ids must be [batch, t]".into(),
                ));
            }
        }
        Ok((self.batch, t))
    }
}

/// Where a decoder block runs: the new positions of this call and the cache it attends over.
pub struct BlockContext<'a> {
    /// New positions per batch row.
    pub t: usize,
    /// Position id of every new row (`[batch * t]`), for rotary embeddings.
    pub positions: &'a [usize],
    pub cache: &'a mut KvCache,
    /// Which of the cache's layers this block uses.
    pub cache_layer: usize,
}

/// A decoder block's forward pass paused between its groups of linear layers.
pub struct BlockState {
    /// The residual stream `[rows, hidden]`; the block's output once every stage has run.
    pub residual: Vec<f32>,
    /// The input shared by the linears of the next group (`[rows, in_features]`).
    pub input: Vec<f32>,
}

/// One decoder block as a sequence of stages, one per group of linears that share an input
/// (q/k/v; the attention output projection; the MLP input projections; the MLP output).
/// Inference runs every stage at once; true-sequential quantization advances all calibration
/// samples one stage at a time so each group is quantized on inputs that went through the
/// already-quantized groups before it, and no stage is computed twice.
pub trait DecoderBlock: Send + Sync {
    /// Linear names relative to the block prefix, grouped by shared input, in forward order
    /// (within a group, in the reference's true-sequential order).
    fn groups(&self) -> &'static [&'static [&'static str]];
    /// The linear named in [`DecoderBlock::groups`] (to swap in its quantized weight).
    fn linear_mut(&mut self, name: &str) -> &mut Linear;
    /// Start from the block input `x` (`[rows, hidden]`): the state before group 0.
    fn begin(&self, x: Vec<f32>) -> BlockState;
    /// Apply group `g` to `state.input` and run on to the next group's input (or the output).
    fn step(&self, g: usize, state: &mut BlockState, ctx: &mut BlockContext);
    /// AWQ scaling groups, in AutoAWQ's order; empty when the architecture cannot fold scales.
    fn awq_groups(&self) -> Vec<AwqGroup> {
        Vec::new()
    }
    /// Norms of the block (names relative to the block prefix, without `.weight`).
    fn norm_names(&self) -> &'static [&'static str] {
        &[]
    }
    /// Weight and bias of a norm in [`DecoderBlock::norm_names`] (`None` when absent, e.g. a
    /// LayerNorm without affine parameters).
    fn norm_mut(&mut self, _name: &str) -> (Option<&mut Vec<f32>>, Option<&mut Vec<f32>>) {
        (None, None)
    }
    /// The whole block.
    fn forward(&self, x: Vec<f32>, ctx: &mut BlockContext) -> Vec<f32> {
        let mut state = self.begin(x);
        for g in 0..self.groups().len() {
            self.step(g, &mut state, ctx);
        }
        state.residual
    }
}

/// What precedes the linears of an AWQ scaling group: the op whose output their input is, so
/// dividing it by the scales (and multiplying the linears' input columns) changes nothing in
/// float.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AwqPrev {
    /// A norm (weight and bias divided).
    Norm(&'static str),
    /// A linear layer (its last `k` output rows and bias entries divided; the last third of a
    /// fused q/k/v projection is v).
    Linear(&'static str),
}

/// One AWQ scaling group: linears sharing an input, the op before them, and the stages of
/// [`DecoderBlock::step`] whose output AWQ compares (run from a zero residual, so the
/// result is the sub-layer's own output, as AutoAWQ's `module2inspect`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwqGroup {
    pub prev: AwqPrev,
    pub linears: &'static [&'static str],
    pub stages: std::ops::Range<usize>,
}

/// A named linear layer of a model, for quantization and saving.
pub struct LinearRef<'a> {
    pub name: String,
    pub linear: &'a Linear,
}

pub trait CausalLM: Send + Sync {
    fn config(&self) -> &AutoConfig;
    /// Hidden states entering the first block (`[batch * t, hidden]`) and the position id of
    /// every row; registers the new positions (and mask) in `cache`.
    fn embed(&self, input: &ForwardInput, cache: &mut KvCache) -> Result<(Vec<f32>, Vec<usize>)>;
    /// The decoder blocks in order.
    fn blocks(&self) -> Vec<&dyn DecoderBlock>;
    /// Final norm (and projection) and the vocabulary projection: hidden rows → logits.
    fn head(&self, x: &[f32]) -> Vec<f32>;

    /// Logits `[batch, t, vocab]` (or `[batch, vocab]` with [`LogitsMode::Last`]). The cache
    /// is extended with the new positions.
    fn forward(
        &self,
        input: &ForwardInput,
        cache: &mut KvCache,
        mode: LogitsMode,
    ) -> Result<Vec<f32>> {
        let (batch, t) = input.dims(cache, self.config().vocab_size())?;
        let (mut x, positions) = self.embed(input, cache)?;
        for (i, block) in self.blocks().into_iter().enumerate() {
            let mut ctx = BlockContext {
                t,
                positions: &positions,
                cache,
                cache_layer: i,
            };
            x = block.forward(x, &mut ctx);
        }
        let h = self.config().hidden_size();
        Ok(self.head(&select_rows(&x, batch, t, h, mode)))
    }
    /// Every linear layer with its checkpoint prefix (GPT-2 Conv1D layers report their
    /// checkpoint prefix too; they are held as `[out, in]`).
    fn linears(&self) -> Vec<LinearRef<'_>>;
    /// The linears that are tensors of the checkpoint: all of them, except the int8 lm_head a
    /// tied model holds with `LoadOptions::lm_head_int8` (a copy of the embedding).
    fn checkpoint_linears(&self) -> Vec<LinearRef<'_>> {
        let tied = self.config().tie_word_embeddings();
        let mut linears = self.linears();
        linears.retain(|l| !(tied && l.name == "lm_head"));
        linears
    }
    /// Every other parameter (embeddings, norms, biases of non-linear parts) with its name and shape.
    fn other_tensors(&self) -> Vec<(String, Vec<f32>, Vec<usize>)>;
    /// The token embedding table (also the output projection when tied).
    fn embedding(&self) -> &DenseMatrix;
    /// Linear weights stored transposed in checkpoints (GPT-2 Conv1D).
    fn conv1d_weights(&self) -> bool {
        false
    }

    fn new_cache(&self, batch: usize) -> KvCache {
        KvCache::new(self.config().num_layers(), batch)
    }

    /// Bytes of all parameters as held in memory (packed sizes for quantized layers).
    /// Derived from the config's tensor list so nothing is copied to count it.
    fn footprint_bytes(&self) -> usize {
        // A tied model's int8 lm_head copy counts in bytes; its parameters are the embedding's.
        let linear_bytes: usize = self
            .linears()
            .iter()
            .map(|l| l.linear.storage_bytes())
            .sum();
        let linear_params: usize = self
            .checkpoint_linears()
            .iter()
            .map(|l| linear_params(l.linear))
            .sum();
        let embed = self.embedding();
        // Norms, biases and position tables are held in f32.
        let rest = self.num_parameters() - linear_params - embed.rows() * embed.cols();
        linear_bytes + embed.storage_bytes() + 4 * rest
    }

    /// Number of parameters (tied weights counted once).
    fn num_parameters(&self) -> usize {
        checkpoint_tensors(self.config())
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum()
    }
}

fn linear_params(l: &Linear) -> usize {
    l.in_features() * l.out_features() + l.bias.as_ref().map_or(0, Vec::len)
}

/// Keep only the last position of every row when only next-token logits are needed.
pub(crate) fn select_rows(
    x: &[f32],
    batch: usize,
    t: usize,
    h: usize,
    mode: LogitsMode,
) -> Vec<f32> {
    match mode {
        LogitsMode::All => x.to_vec(),
        LogitsMode::Last => (0..batch)
            .flat_map(|b| x[((b + 1) * t - 1) * h..(b + 1) * t * h].iter().copied())
            .collect(),
    }
}

/// Token embeddings of `input` (rows of `embed`) and the position of each row: the given
/// `position_ids`, else those the cache assigns (after the mask's padding); the embedding step
/// of the families with rotary positions.
pub(crate) fn embed_tokens_and_positions(
    input: &ForwardInput,
    cache: &mut KvCache,
    vocab_size: usize,
    embed: &DenseMatrix,
    hidden: usize,
) -> Result<(Vec<f32>, Vec<usize>)> {
    let (_, t) = input.dims(cache, vocab_size)?;
    let mut x = vec![0f32; input.ids.len() * hidden];
    for (row, &id) in x.chunks_exact_mut(hidden).zip(&input.ids) {
        embed.row_into(id as usize, row);
    }
    cache.push_positions(t, input.attention_mask.as_deref());
    let positions: Vec<usize> = match &input.position_ids {
        Some(p) => p.iter().flatten().copied().collect(),
        None => cache.default_positions(t).into_iter().flatten().collect(),
    };
    Ok((x, positions))
}

/// Project hidden states to the vocabulary with `lm_head`, or the tied embedding matrix.
pub(crate) fn project_logits(x: &[f32], lm_head: Option<&Linear>, embed: &DenseMatrix) -> Vec<f32> {
    match lm_head {
        Some(l) => l.forward(x, x.len() / l.in_features()),
        None => {
            let rows = x.len() / embed.cols();
            let mut out = vec![0f32; rows * embed.rows()];
            embed.forward(x, rows, &mut out);
            out
        }
    }
}

/// Options for [`AutoModelForCausalLM::from_pretrained`].
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub dtype: WeightDType,
    /// Quantize linear layers while loading, bitsandbytes style (`load_in_8bit`/`load_in_4bit`).
    pub bnb: Option<crate::qtypes::bnb::BitsAndBytesConfig>,
    /// Hold the output projection (lm_head, or the tied embedding as lm_head) as LLM.int8
    /// weights: faster decoding at a small perplexity cost. Not what transformers does (it keeps
    /// lm_head in float), so it is opt-in.
    pub lm_head_int8: bool,
    /// How 4-bit (NF4/FP4) layers multiply when decoding; `Exact` is bitsandbytes' arithmetic.
    pub four_bit_decode: crate::kernels::bnb::FourBitDecode,
}

/// The Auto class: picks the architecture from the config.
pub struct AutoModelForCausalLM;

impl AutoModelForCausalLM {
    /// Build the model for `config` from the tensors in `weights`.
    pub fn from_weights(
        config: AutoConfig,
        weights: &dyn WeightSource,
        opts: &LoadOptions,
    ) -> Result<Box<dyn CausalLM>> {
        let factory = crate::checkpoint::quantized_linear_factory(
            &config,
            opts.bnb.as_ref(),
            opts.four_bit_decode,
        )?;
        let ld = Loader::new(weights, opts.dtype)
            .with_factory(factory.as_deref())
            .with_lm_head_int8(opts.lm_head_int8);
        family(&config).load(config.clone(), &ld)
    }

    /// A model with seeded random weights (HF-style init: normal(0, 0.02) matrices, unit norm
    /// weights, zero biases).
    pub fn from_config(
        config: AutoConfig,
        seed: u64,
        opts: &LoadOptions,
    ) -> Result<Box<dyn CausalLM>> {
        let weights = RandomWeights::new(&config, seed);
        Self::from_weights(config, &weights, opts)
    }
}

/// Everything the rest of the crate needs to know about one architecture, declared in that
/// architecture's file (`impl Family for <its typed config>`). Adding an architecture means one
/// model file, one `Architecture` variant in `config`, and one arm in [`family`].
pub trait Family: Send + Sync {
    /// The whole model, read through `ld`.
    fn load(&self, config: AutoConfig, ld: &Loader) -> Result<Box<dyn CausalLM>>;
    /// Decoder block `i`, read through `ld` (for layer-by-layer work).
    fn load_block(&self, ld: &Loader, i: usize) -> Result<Box<dyn DecoderBlock>>;
    /// The linear layers of every decoder block, grouped by shared input in true-sequential
    /// order (what [`DecoderBlock::groups`] returns, known without loading).
    fn block_groups(&self) -> &'static [&'static [&'static str]];
    /// Checkpoint prefix of decoder block `i` (`model.layers.3`, `transformer.h.3`, ...).
    fn block_prefix(&self, i: usize) -> String;
    /// The tensors a checkpoint holds: names and shapes in Hugging Face convention.
    fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)>;
    /// Linear weights stored `[in, out]` as GPT-2's Conv1D does, instead of `[out, in]`.
    fn conv1d_weights(&self) -> bool {
        false
    }
    /// Why AWQ cannot fold its scales into this model's blocks, if it cannot.
    fn awq_refusal(&self) -> Option<&'static str> {
        None
    }
}

/// The [`Family`] of `config`'s architecture: the one `match` over architectures.
pub fn family(config: &AutoConfig) -> &dyn Family {
    match &config.arch {
        Architecture::Llama(c) | Architecture::Qwen2(c) | Architecture::Qwen3(c) => c,
        Architecture::Opt(c) => c,
        Architecture::Gpt2(c) => c,
        Architecture::GptNeox(c) => c,
    }
}

/// Decoder block `i` of `config`, read through `ld` (for layer-by-layer work).
pub fn load_block(config: &AutoConfig, ld: &Loader, i: usize) -> Result<Box<dyn DecoderBlock>> {
    family(config).load_block(ld, i)
}

/// The linear layers of every decoder block of `config` ([`Family::block_groups`]).
pub fn block_groups(config: &AutoConfig) -> &'static [&'static [&'static str]] {
    family(config).block_groups()
}

/// Checkpoint prefix of decoder block `i` ([`Family::block_prefix`]).
pub fn block_prefix(config: &AutoConfig, i: usize) -> String {
    family(config).block_prefix(i)
}

/// The decoder block a checkpoint tensor belongs to, if any.
pub fn block_of(config: &AutoConfig, name: &str) -> Option<usize> {
    let stem = block_prefix(config, 0);
    let stem = &stem[..stem.len() - 1];
    let rest = name.strip_prefix(stem)?;
    let (index, _) = rest.split_once('.')?;
    index.parse().ok()
}

/// The tensors a checkpoint of `config` holds ([`Family::tensor_shapes`]).
pub fn checkpoint_tensors(config: &AutoConfig) -> Vec<(String, Vec<usize>)> {
    family(config).tensor_shapes()
}

/// Deterministic random tensors for every name of a config's checkpoint, generated on demand
/// (so a synthetic model larger than memory can be streamed to disk).
pub struct RandomWeights {
    shapes: BTreeMap<String, Vec<usize>>,
    seed: u64,
    std: f64,
}

impl RandomWeights {
    pub fn new(config: &AutoConfig, seed: u64) -> Self {
        let std = config
            .raw
            .get("initializer_range")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.02);
        RandomWeights {
            shapes: checkpoint_tensors(config).into_iter().collect(),
            seed,
            std,
        }
    }
    /// The values of tensor `name`, without going through a [`RawTensor`] (for writers that
    /// encode them straight into another dtype).
    pub fn tensor_values(&self, name: &str) -> Result<Vec<f32>> {
        let shape = self.shapes.get(name).ok_or_else(|| {
            Error::tensor(
                "<random weights>",
                name,
                "no such tensor in this architecture",
            )
        })?;
        Ok(self.values(name, shape.iter().product()))
    }

    fn values(&self, name: &str, n: usize) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let is_norm_weight = name.ends_with(".weight")
            && (name.contains("norm") || name.contains("ln_") || name.contains("layer_norm"));
        if name.ends_with(".bias") {
            return vec![0.0; n];
        }
        if is_norm_weight {
            return vec![1.0; n];
        }
        let mut h: u64 = self.seed ^ 0x9E37_79B9_7F4A_7C15;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01B3);
        }
        // Chunks of 2^20 values, each with its own stream, generated in parallel (synthetic
        // models can hold billions of weights); chunk 0 keeps the tensor's own seed.
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 20;
        let mut out = vec![0f32; n];
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                let seed = h ^ (c as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93);
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                for v in chunk {
                    // Box-Muller normal sample.
                    let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
                    let u2: f64 = rng.gen();
                    *v = ((-2.0 * u1.ln()).sqrt()
                        * (2.0 * std::f64::consts::PI * u2).cos()
                        * self.std) as f32;
                }
            });
        out
    }
}

impl WeightSource for RandomWeights {
    fn names(&self) -> Vec<String> {
        self.shapes.keys().cloned().collect()
    }
    fn info(&self, name: &str) -> Option<TensorInfo> {
        self.shapes.get(name).map(|s| TensorInfo {
            dtype: DType::F32,
            shape: s.clone(),
        })
    }
    fn read(&self, name: &str) -> Result<RawTensor> {
        let values = self.tensor_values(name)?;
        Ok(RawTensor::from_f32(self.shapes[name].clone(), &values))
    }
    fn file_of(&self, _name: &str) -> std::path::PathBuf {
        "<random weights>".into()
    }
    fn files(&self) -> Vec<std::path::PathBuf> {
        vec![]
    }
}

/// All tensors of a loaded model under their checkpoint names, converted to `dtype`.
pub fn state_dict(model: &dyn CausalLM, dtype: WeightDType) -> Vec<(String, RawTensor)> {
    let conv = |shape: Vec<usize>, v: &[f32]| dtype.encode(shape, v);
    let mut out = vec![];
    for (name, values, shape) in model.other_tensors() {
        out.push((name, conv(shape, &values)));
    }
    for l in model.checkpoint_linears() {
        let (o, i) = (l.linear.out_features(), l.linear.in_features());
        let w = l.linear.weight.to_f32();
        if model.conv1d_weights() && l.name != "lm_head" {
            let mut t = vec![0f32; w.len()];
            for r in 0..o {
                for c in 0..i {
                    t[c * o + r] = w[r * i + c];
                }
            }
            out.push((format!("{}.weight", l.name), conv(vec![i, o], &t)));
        } else {
            out.push((format!("{}.weight", l.name), conv(vec![o, i], &w)));
        }
        if let Some(b) = &l.linear.bias {
            out.push((format!("{}.bias", l.name), conv(vec![o], b)));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Check that a checkpoint holds no tensor the architecture does not know (a sign of a wrong
/// config), ignoring buffers transformers also ignores.
pub fn unexpected_tensors(config: &AutoConfig, weights: &dyn WeightSource) -> Vec<String> {
    let known: std::collections::HashSet<String> = checkpoint_tensors(config)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    weights
        .names()
        .into_iter()
        .filter(|n| !known.contains(n))
        .filter(|n| {
            !n.ends_with("rotary_emb.inv_freq")
                && !n.ends_with(".attn.bias")
                && !n.ends_with(".attn.masked_bias")
                && !n.ends_with(".attention.bias")
                && !n.ends_with(".attention.masked_bias")
        })
        .filter(|n| n != "lm_head.weight")
        .collect()
}

/// Refuse a config that contradicts its checkpoint before anything is built from it: the number
/// of decoder blocks must be the number the weights hold (a larger count would allocate for
/// blocks that are not there, a smaller one silently drop blocks), and the embedding and
/// position tables must have the shapes the config's sizes give.
pub fn check_against_weights(config: &AutoConfig, weights: &dyn WeightSource) -> Result<()> {
    let origin = config
        .source
        .clone()
        .or_else(|| weights.files().into_iter().next())
        .unwrap_or_else(|| "config.json".into());
    let names = weights.names();
    let blocks = names
        .iter()
        .filter_map(|n| block_of(config, n))
        .max()
        .map_or(0, |b| b + 1);
    let (layers_key, hidden_key) = match &config.arch {
        Architecture::Gpt2(_) => ("n_layer", "n_embd"),
        Architecture::Opt(_) => ("num_hidden_layers", "hidden_size / word_embed_proj_dim"),
        _ => ("num_hidden_layers", "hidden_size"),
    };
    if config.num_layers() != blocks {
        return Err(Error::format(
            &origin,
            format!(
                "key `{layers_key}` is {} but the weights hold {blocks} blocks",
                config.num_layers()
            ),
        ));
    }
    for (name, shape) in checkpoint_tensors(config) {
        let table = [
            "embed_tokens",
            "embed_positions",
            "wte.",
            "wpe.",
            "embed_in.",
        ]
        .iter()
        .any(|t| name.contains(t));
        if !table {
            continue;
        }
        let Some(info) = weights.info(&name) else {
            continue;
        };
        if info.shape != shape {
            let keys = if name.contains("pos") || name.contains("wpe") {
                config.context_key()
            } else {
                "vocab_size"
            };
            return Err(Error::format(
                &origin,
                format!(
                    "tensor `{name}` is {:?} in the weights, but the config's `{keys}` and \
                     `{hidden_key}` give {shape:?}",
                    info.shape
                ),
            ));
        }
    }
    Ok(())
}

/// Load config + weights from a model folder.
pub fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<Box<dyn CausalLM>> {
    let config = AutoConfig::from_pretrained(dir)?;
    let weights = crate::formats::open_weights(dir)?;
    AutoModelForCausalLM::from_weights(config, weights.as_ref(), opts)
}
