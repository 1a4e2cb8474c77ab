//! Layer-by-layer quantization of a checkpoint into a GPTQ checkpoint.
//!
//! Only one decoder block's weights and the calibration activations are in memory at a time:
//! the embeddings turn the calibration samples into the first block's input; each block is read
//! (memory-mapped), its linear layers are quantized group by group (true-sequential: each group
//! sees inputs that already went through the quantized groups before it), the quantized block
//! computes the next block's input, its packed tensors are written, and it is dropped. Peak
//! memory is one block plus the activations, whatever the depth of the model.
//!
//! Each finished block's tensors are kept in the run's resumable folder
//! ([`super::resume::Journal`]) together with, from time to time, the activations entering the
//! next block; once every block is done the checkpoint is assembled through
//! [`save_safetensors`], one tensor at a time, from those files and the source. A run
//! interrupted in any way continues with `resume` from its last kept block and writes the same
//! bytes.

use crate::auto::write_model_files;
use crate::checkpoint::awq::AwqConfig;
use crate::checkpoint::gptq::{layer_tensors, GptqConfig};
use crate::checkpoint::gptq_pack::check_loader_shape;
use crate::checkpoint::gptq_pack::ZeroFormat;
use crate::config::AutoConfig;
use crate::error::{Error, Result};
use crate::formats::safetensors::{save_safetensors, SafetensorsFile, TensorSpec};
use crate::formats::WeightSource;
use crate::generate::GenerationConfig;
use crate::kernels::DenseMatrix;
use crate::models::attention::KvCache;
use crate::models::{
    block_groups, block_of, block_prefix, checkpoint_tensors, load_block, AutoModelForCausalLM,
    BlockContext, BlockState, DecoderBlock, ForwardInput, LoadOptions,
};
use crate::models::{AwqPrev, BlockState as State};
use crate::nn::Loader;
use crate::qtypes::grid::{QuantParams, QuantizedLinear};
use crate::qtypes::{Bits, GroupSize};
use crate::quant::awq::{self as awq_search, AwqOptions};
use crate::quant::calib::CalibData;
use crate::quant::gptq::{gptq_quantize_factored, GptqFactor, GptqOptions, Hessian};
use crate::quant::resume::{BlockRecord, Fingerprint, Journal};
use crate::quant::rtn::quantize_rtn;
use crate::tensor::WeightDType;
use crate::tensor::{DType, RawTensor};
use crate::tokenizer::AutoTokenizer;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Default Hessian weight of each calibration sample's first position (see
/// [`StreamOptions::sink_weight`]); the reference GPTQ is 1. Chosen on SmolLM2-135M (README):
/// with act-order it turns GPTQ from worse than RTN at 4 bits into better.
pub const DEFAULT_SINK_WEIGHT: f32 = 16.0;

/// Default of [`StreamOptions::awq_search_tokens`].
pub const DEFAULT_AWQ_SEARCH_TOKENS: usize = 8192;

/// How each linear layer is rounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Round to nearest on the GPTQ grid; needs no calibration data.
    Rtn,
    /// GPTQ with Hessians from calibration activations.
    Gptq,
    /// AWQ (AutoAWQ's search: activation-aware scales folded into the previous op, clipping,
    /// asymmetric grid), saved in the AutoAWQ GEMM layout.
    Awq,
    /// AWQ's scales and clipping, then GPTQ rounding; saved as a GPTQ checkpoint.
    AwqGptq,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Gptq => "gptq",
            Method::Awq => "awq",
            Method::AwqGptq => "awq-gptq",
        }
    }
    /// Whether the method runs calibration data through the model.
    pub fn calibrated(self) -> bool {
        self != Method::Rtn
    }
    fn uses_awq(self) -> bool {
        matches!(self, Method::Awq | Method::AwqGptq)
    }
}

/// Settings of a streamed quantization run.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    pub method: Method,
    pub params: QuantParams,
    /// GPTQ damping as a fraction of mean(diag H) (reference: 0.01).
    pub damp_percent: f64,
    /// GPTQ lazy-update block (reference: 128 columns).
    pub block_size: usize,
    pub desc_act: bool,
    pub static_groups: bool,
    /// Quantize the groups of a block one after the other, each on inputs that went through the
    /// groups already quantized (reference default). Off: every group sees float inputs.
    pub true_sequential: bool,
    /// GPTQ scales from a loss-weighted clipping search ([`GptqOptions::clip_search`]) instead
    /// of the reference's min/max grid.
    pub clip_search: bool,
    /// Weight, in the GPTQ Hessian, of the first position of every calibration sample relative
    /// to the others. 1 is the reference. The first position is the attention sink every later
    /// token reads, so its keys and values matter far more than one row in thousands.
    pub sink_weight: f32,
    /// AWQ search settings (grid points, duo scaling, clipping); bits and group size come from
    /// `params`.
    pub awq: AwqOptions,
    /// Calibration tokens (whole samples, from the first) that AWQ's scale search runs its
    /// 21 forward passes per group on; activation statistics use every token. `None`: all,
    /// as AutoAWQ on a GPU. On a CPU the search costs ~21 block forwards per token.
    pub awq_search_tokens: Option<usize>,
    /// Dtype of the tensors kept in float (embeddings, norms, biases, lm_head).
    pub dtype: WeightDType,
    pub max_shard_bytes: u64,
    pub overwrite: bool,
    /// Continue the interrupted run of the same output, settings and inputs from its last kept
    /// block ([`super::resume`]); with nothing to continue, start from the first block.
    pub resume: bool,
    /// Progress bars on stderr (per block and per layer, with ETA).
    pub progress: bool,
    /// Keep what AWQ's search chose (every scaling group's scales and losses, every clipping
    /// threshold) in [`StreamReport::awq_search`], for tests and inspection. Off by default:
    /// the thresholds alone are 1/group_size of the model's weights. Does not change the output.
    pub record_awq_search: bool,
}

impl StreamOptions {
    /// Defaults for `method` and `params`: the reference's damp 0.01, blocks of 128 columns and
    /// true-sequential order; act-order for the GPTQ methods and our attention-sink weight
    /// (together they make GPTQ beat RTN where the reference loses); f16 float tensors, 5 GB
    /// shards.
    pub fn new(method: Method, params: QuantParams) -> Self {
        StreamOptions {
            method,
            params,
            damp_percent: 0.01,
            block_size: 128,
            desc_act: matches!(method, Method::Gptq | Method::AwqGptq),
            static_groups: false,
            true_sequential: true,
            clip_search: method == Method::Gptq,
            sink_weight: DEFAULT_SINK_WEIGHT,
            awq: AwqOptions::default(),
            awq_search_tokens: Some(DEFAULT_AWQ_SEARCH_TOKENS),
            dtype: WeightDType::F16,
            max_shard_bytes: 5_000_000_000,
            overwrite: false,
            resume: false,
            progress: false,
            record_awq_search: false,
        }
    }

    /// The reference GPTQ exactly (IST-DASLab / AutoGPTQ defaults): no act-order, every
    /// calibration position weighted alike.
    pub fn reference(method: Method, params: QuantParams) -> Self {
        StreamOptions {
            desc_act: false,
            clip_search: false,
            sink_weight: 1.0,
            ..Self::new(method, params)
        }
    }

    /// Every setting that shapes the output, as text for [`super::resume::Fingerprint`]: the
    /// options without the ones that only say how the run is shown or where it may write.
    fn settings_text(&self) -> String {
        format!(
            "{:?}",
            StreamOptions {
                overwrite: false,
                resume: false,
                progress: false,
                record_awq_search: false,
                ..self.clone()
            }
        )
    }

    /// Whether the method runs GPTQ's rounding (GPTQ and AWQ+GPTQ).
    pub fn runs_gptq(&self) -> bool {
        matches!(self.method, Method::Gptq | Method::AwqGptq)
    }

    /// The rounding settings that shaped the codes, for run summaries: the GPTQ options for the
    /// GPTQ methods; nothing for RTN (the reference grid) or AWQ (AutoAWQ's settings).
    pub fn rounding_settings(&self) -> serde_json::Value {
        if !self.runs_gptq() {
            return serde_json::json!({});
        }
        serde_json::json!({
            "desc_act": self.desc_act,
            "static_groups": self.static_groups,
            "true_sequential": self.true_sequential,
            "damp_percent": self.damp_percent,
            "sink_weight": self.sink_weight,
            "clip_search": self.clip_search,
        })
    }

    /// The first-position weight the GPTQ Hessians get (GPTQ and AWQ+GPTQ).
    fn hessian_sink_weight(&self) -> f32 {
        if self.runs_gptq() {
            self.sink_weight
        } else {
            1.0
        }
    }

    /// The AWQ search settings with this run's bits and group size.
    pub fn awq_options(&self) -> AwqOptions {
        AwqOptions {
            bits: self.params.bits.get(),
            group_size: self.params.group_size.channels(0),
            ..self.awq
        }
    }

    fn gptq_options(&self) -> GptqOptions {
        GptqOptions {
            params: self.params,
            damp_percent: self.damp_percent,
            block_size: self.block_size,
            desc_act: self.desc_act,
            static_groups: self.static_groups,
            clip_search: self.clip_search,
        }
    }

    /// The zero-point format of the checkpoint. Streaming cannot see every layer before the
    /// first is written, so asymmetric checkpoints are `gptq_v2` (a zero point of 0 is likely
    /// somewhere and v1 cannot store it), symmetric ones v1.
    pub fn format(&self) -> ZeroFormat {
        if self.params.sym {
            ZeroFormat::V1
        } else {
            ZeroFormat::V2
        }
    }

    /// Whether the checkpoint is AutoAWQ's GEMM layout: AWQ at 4 bits. That layout (and every
    /// AWQ kernel) holds 4-bit codes only, so AWQ at other widths is written as a GPTQ
    /// checkpoint (asymmetric, `gptq_v2`), which stores the same grid: `(q − zero) · scale`.
    pub fn writes_awq_gemm(&self) -> bool {
        self.method == Method::Awq && self.params.bits == Bits::B4
    }

    /// The checkpoint layout's name: "awq-gemm", "gptq" or "gptq_v2".
    pub fn checkpoint_format(&self) -> &'static str {
        if self.writes_awq_gemm() {
            "awq-gemm"
        } else {
            self.format().as_str()
        }
    }

    fn check(&self) -> Result<()> {
        if self.params.group_size == GroupSize::Size(0) {
            return Err(Error::InvalidArgument(
                "group size must be positive, or -1 for per-channel".into(),
            ));
        }
        if !(self.damp_percent.is_finite() && self.damp_percent > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "damp must be a positive number, got {}",
                self.damp_percent
            )));
        }
        if !(self.sink_weight.is_finite() && self.sink_weight >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "sink weight must be finite and ≥ 0, got {}",
                self.sink_weight
            )));
        }
        if self.static_groups && (self.params.group_size == GroupSize::PerChannel) {
            return Err(Error::InvalidArgument(
                "--static-groups needs a group size (it has no effect per-channel)".into(),
            ));
        }
        if self.clip_search && !self.runs_gptq() {
            return Err(Error::InvalidArgument(format!(
                "--clip-search is part of GPTQ's rounding; {} has none (AWQ runs its own clip \
                 search)",
                self.method.name()
            )));
        }
        if matches!(self.method, Method::Rtn | Method::Awq) && self.desc_act {
            return Err(Error::InvalidArgument(format!(
                "--desc-act orders GPTQ's columns; {} has no column order",
                self.method.name()
            )));
        }
        if self.method.uses_awq() {
            if self.params.group_size == GroupSize::PerChannel {
                return Err(Error::InvalidArgument(
                    "AWQ needs a group size (its checkpoints have no per-channel layout)".into(),
                ));
            }
            self.awq_options().validate()?;
        }
        Ok(())
    }
}

/// What happened to one linear layer.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LayerReport {
    pub name: String,
    /// GPTQ's loss Σ (w − q)² / (2·Hinv[i,i]²); `None` for RTN.
    pub loss: Option<f64>,
    /// Damping that made the Cholesky factorization succeed (GPTQ).
    pub damp_used: Option<f64>,
    /// Input channels never active in calibration.
    pub dead_columns: usize,
    pub seconds: f64,
}

/// One AWQ scaling group's search result ([`StreamOptions::record_awq_search`]).
#[derive(Clone, Debug)]
pub struct AwqGroupRecord {
    /// The op the scales were folded into (a norm or a linear; name relative to the block).
    pub prev: String,
    /// The linears whose input channels were multiplied by the scales, in order.
    pub linears: Vec<String>,
    /// The ratio `r / n_grid` that won.
    pub best_ratio: f32,
    /// Mean squared output error of every ratio, in order.
    pub errors: Vec<f32>,
    /// The chosen per-input-channel scales `[k]`.
    pub scales: Vec<f32>,
}

/// What AWQ's search chose in one block ([`StreamOptions::record_awq_search`]).
#[derive(Clone, Debug)]
pub struct AwqBlockRecord {
    /// The block's tensor prefix, e.g. `model.layers.0`.
    pub prefix: String,
    /// The scaling groups in the order they were searched.
    pub groups: Vec<AwqGroupRecord>,
    /// Clipping thresholds per clipped linear (name relative to the block), `[n, k / group]`
    /// row-major, as AutoAWQ's `_compute_best_clip` returns them.
    pub clips: Vec<(String, Vec<f32>)>,
}

/// Summary of a streamed quantization run.
#[derive(Clone, Debug)]
pub struct StreamReport {
    pub dir: PathBuf,
    pub method: Method,
    pub format: ZeroFormat,
    pub seconds: f64,
    pub peak_rss_bytes: Option<u64>,
    /// Bytes of tensor data written.
    pub output_bytes: u64,
    /// Weights of the quantized linear layers.
    pub quantized_params: u64,
    /// Bytes their qweight, qzeros, scales and g_idx take.
    pub quantized_bytes: u64,
    /// `8 · quantized_bytes / quantized_params`: bits per weight including scales and zeros.
    pub bits_per_weight: f64,
    pub layers: Vec<LayerReport>,
    pub warnings: Vec<String>,
    pub calibration: Option<String>,
    /// AWQ's choices per block quantized by this invocation (blocks kept from an interrupted
    /// run are not repeated); empty unless [`StreamOptions::record_awq_search`] is set.
    pub awq_search: Vec<AwqBlockRecord>,
}

/// What will be written, known from the config and tensor headers alone.
#[derive(Clone, Debug)]
pub struct Plan {
    pub specs: Vec<TensorSpec>,
    /// Quantized linear layers (checkpoint prefix) with `[out_features N, in_features K]`.
    pub quantized: BTreeMap<String, (usize, usize)>,
    pub output_bytes: u64,
    pub quantized_params: u64,
    pub quantized_bytes: u64,
}

impl Plan {
    pub fn bits_per_weight(&self) -> f64 {
        8.0 * self.quantized_bytes as f64 / self.quantized_params.max(1) as f64
    }
}

/// The tensors of the quantized checkpoint, in the order they will be produced (everything
/// outside the blocks, then block by block), after checking that every linear layer can be
/// stored: the group size must divide its `in_features` and K/N must be packable.
pub fn plan(config: &AutoConfig, src: &dyn WeightSource, opts: &StreamOptions) -> Result<Plan> {
    opts.check()?;
    if let Some(q) = config.raw.get("quantization_config") {
        let method = q
            .get("quant_method")
            .and_then(|m| m.as_str())
            .unwrap_or("?");
        return Err(Error::InvalidArgument(format!(
            "{} is already quantized ({method}); quantize the float checkpoint instead",
            config
                .source
                .as_deref()
                .unwrap_or(Path::new("config.json"))
                .display()
        )));
    }
    if let Some(why) = crate::models::family(config).awq_refusal() {
        if opts.method.uses_awq() {
            return Err(Error::Unsupported(format!(
                "{why}, from `{}` on. Use --method gptq or rtn",
                block_prefix(config, 0)
            )));
        }
    }
    let conv1d = crate::models::family(config).conv1d_weights();
    let groups = block_groups(config);
    let bits = opts.params.bits.get() as usize;
    let mut specs = vec![];
    let mut quantized = BTreeMap::new();
    let (mut quantized_params, mut quantized_bytes) = (0u64, 0u64);
    for (name, shape) in checkpoint_tensors(config) {
        crate::formats::require_shape(src, &name, &shape, "the config implies")?;
        let block = block_of(config, &name);
        let linear = block.and_then(|i| {
            let prefix = block_prefix(config, i);
            let rel = name
                .strip_prefix(&format!("{prefix}."))?
                .strip_suffix(".weight")?;
            groups.iter().flat_map(|g| g.iter()).find(|&&l| l == rel)?;
            Some(format!("{prefix}.{rel}"))
        });
        let Some(layer) = linear else {
            specs.push((block, TensorSpec::new(name, opts.dtype.storage(), shape)));
            continue;
        };
        let (n, k) = if conv1d {
            (shape[1], shape[0])
        } else {
            (shape[0], shape[1])
        };
        let g = match opts.params.group_size.size() {
            None => 1,
            Some(gs) if k.is_multiple_of(gs) => k / gs,
            Some(gs) => {
                let fits: Vec<String> = [32usize, 64, 128, 256]
                    .into_iter()
                    .filter(|d| k.is_multiple_of(*d))
                    .map(|d| d.to_string())
                    .collect();
                return Err(Error::InvalidArgument(format!(
                    "group size {gs} does not divide in_features {k} of `{layer}`; GPTQ loaders \
                     (AutoGPTQ, vLLM, transformers) need every group to be full. Sizes that fit: {} \
                     or -1 (per-channel)",
                    if fits.is_empty() { "none of 32/64/128/256".into() } else { fits.join(", ") }
                )));
            }
        };
        let layer_specs = if opts.writes_awq_gemm() {
            if !n.is_multiple_of(8) {
                return Err(Error::InvalidArgument(format!(
                    "`{layer}` has out_features {n}, not a multiple of 8, which the AWQ GEMM \
                     layout packs"
                )));
            }
            vec![
                TensorSpec::new(format!("{layer}.qweight"), DType::I32, vec![k, n / 8]),
                TensorSpec::new(format!("{layer}.qzeros"), DType::I32, vec![g, n / 8]),
                TensorSpec::new(format!("{layer}.scales"), DType::F16, vec![g, n]),
            ]
        } else {
            check_loader_shape(n, k, opts.params.bits.get())
                .map_err(|e| Error::InvalidArgument(format!("`{layer}` [N={n}, K={k}]: {e}")))?;
            vec![
                TensorSpec::new(
                    format!("{layer}.qweight"),
                    DType::I32,
                    vec![k * bits / 32, n],
                ),
                TensorSpec::new(
                    format!("{layer}.qzeros"),
                    DType::I32,
                    vec![g, n * bits / 32],
                ),
                TensorSpec::new(format!("{layer}.scales"), DType::F16, vec![g, n]),
                TensorSpec::new(format!("{layer}.g_idx"), DType::I32, vec![k]),
            ]
        };
        quantized_params += (n * k) as u64;
        quantized_bytes += layer_specs.iter().map(TensorSpec::nbytes).sum::<u64>();
        specs.extend(layer_specs.into_iter().map(|s| (block, s)));
        quantized.insert(layer, (n, k));
    }
    // Stable: checkpoint order within a block; tensors outside the blocks first.
    specs.sort_by_key(|(block, _)| block.map_or(0, |b| b + 1));
    let specs: Vec<TensorSpec> = specs.into_iter().map(|(_, s)| s).collect();
    Ok(Plan {
        output_bytes: specs.iter().map(TensorSpec::nbytes).sum(),
        specs,
        quantized,
        quantized_params,
        quantized_bytes,
    })
}

/// `--dry-run`: what a run would write and hold in memory, before any work.
#[derive(Clone, Debug)]
pub struct Estimate {
    pub output_bytes: u64,
    pub bits_per_weight: f64,
    /// Largest decoder block held in f32 while it is quantized.
    pub block_bytes: u64,
    /// Calibration activations (block input/output plus the widest group input).
    pub activation_bytes: u64,
    /// The largest GPTQ Hessian and its f64 inverse-Cholesky work space.
    pub hessian_bytes: u64,
    /// Embeddings and head kept in memory to embed the calibration samples.
    pub stem_bytes: u64,
    /// Sum of the above: the expected peak beyond the program itself.
    pub peak_bytes: u64,
    pub quantized_layers: usize,
}

/// Estimate a run from the config, the tensor headers and the calibration size
/// (`samples × seqlen` tokens; 0 for RTN).
pub fn estimate(
    config: &AutoConfig,
    src: &dyn WeightSource,
    opts: &StreamOptions,
    calib_tokens: usize,
) -> Result<Estimate> {
    let plan = plan(config, src, opts)?;
    let mut per_block: BTreeMap<usize, u64> = BTreeMap::new();
    let mut widest_k = 0usize;
    for (layer, &(n, k)) in &plan.quantized {
        if let Some(b) = block_of(config, layer) {
            *per_block.entry(b).or_default() += 4 * (n * k) as u64;
        }
        widest_k = widest_k.max(k);
    }
    let block_bytes = per_block.values().copied().max().unwrap_or(0);
    let h = config.hidden_size();
    let calibrated = opts.method.calibrated();
    let tokens = if calibrated { calib_tokens as u64 } else { 0 };
    // GPTQ holds each sample's residual and one group input; AWQ every stage's input at once.
    let activation_bytes = if opts.method.uses_awq() {
        let first_block = block_prefix(config, 0);
        let stage_widths: u64 = block_groups(config)
            .iter()
            .filter_map(|g| plan.quantized.get(&format!("{first_block}.{}", g[0])))
            .map(|&(_, k)| k as u64)
            .sum();
        4 * tokens * (h as u64 + stage_widths)
    } else {
        4 * tokens * (2 * h as u64 + widest_k as u64)
    };
    let hessian_bytes = if calibrated {
        (4 + 8 + 8) * (widest_k * widest_k) as u64
    } else {
        0
    };
    let stem_bytes = if calibrated {
        checkpoint_tensors(config)
            .iter()
            .filter(|(n, _)| block_of(config, n).is_none())
            .map(|(_, s)| 4 * s.iter().product::<usize>() as u64)
            .sum()
    } else {
        0
    };
    Ok(Estimate {
        output_bytes: plan.output_bytes,
        bits_per_weight: plan.bits_per_weight(),
        block_bytes,
        activation_bytes,
        hessian_bytes,
        stem_bytes,
        peak_bytes: block_bytes + activation_bytes + hessian_bytes + stem_bytes,
        quantized_layers: plan.quantized.len(),
    })
}

/// One calibration sample on its way through the blocks.
struct Activation {
    /// Hidden states `[t, hidden]` entering the next block.
    x: Vec<f32>,
    positions: Vec<usize>,
    t: usize,
}

/// Quantize the float checkpoint `src` (with `config`) into a GPTQ checkpoint folder `dir`,
/// streaming block by block. `calib` is required for GPTQ and ignored by RTN. The tokenizer and
/// generation config, when given, are written beside the weights. The folder appears only when
/// everything has been written.
#[allow(clippy::too_many_arguments)]
pub fn quantize_to_gptq(
    config: &AutoConfig,
    src: &dyn WeightSource,
    tokenizer: Option<&AutoTokenizer>,
    generation: Option<&GenerationConfig>,
    calib: Option<&CalibData>,
    dir: &Path,
    opts: &StreamOptions,
) -> Result<StreamReport> {
    let t0 = Instant::now();
    let plan = plan(config, src, opts)?;
    let calib = match opts.method {
        Method::Rtn => None,
        _ => Some(check_calibration(calib, opts.method)?),
    };
    if let Some(longest) = calib.and_then(|c| c.samples.iter().map(Vec::len).max()) {
        config.check_context(
            longest,
            &format!("a calibration sample of {longest} tokens"),
        )?;
    }
    let mut warnings = calib.map(|c| c.warnings.clone()).unwrap_or_default();
    let weight_files = src.files();
    let mut inputs = weight_files.clone();
    inputs.extend(config.source.clone());
    crate::fsutil::refuse_output_over_inputs(dir, &inputs)?;
    let out = crate::fsutil::AtomicDir::with_overwrite(dir, opts.overwrite)?;
    let fingerprint = Fingerprint::new(
        &opts.settings_text(),
        &serde_json::Value::Object(config.raw.clone()).to_string(),
        &weight_files,
        calib.map_or(&[][..], |c| &c.samples[..]),
    );
    let mut journal = Journal::open(
        dir,
        fingerprint,
        config.num_layers(),
        opts.method.calibrated(),
        opts.resume,
    )?;

    let mut streamer = match Streamer::new(config, src, opts, calib, &journal) {
        Ok(s) => s,
        Err(e) => return Err(stopped(e, journal)),
    };
    if let Err(e) = streamer.run_blocks(&mut journal) {
        return Err(stopped(e, journal));
    }
    if let Err(e) = save_safetensors(
        out.path(),
        &plan.specs,
        opts.max_shard_bytes,
        &Default::default(),
        |spec| streamer.tensor(spec, &journal),
    ) {
        return Err(stopped(e, journal));
    }
    streamer.finish();
    warnings.append(&mut streamer.warnings);

    if opts.writes_awq_gemm() {
        let awq = AwqConfig::new(opts.params.group_size.channels(0));
        write_model_files(
            out.path(),
            config,
            opts.dtype,
            Some(awq.to_quantization_config()),
            tokenizer,
            generation,
        )?;
    } else {
        write_gptq_configs(out.path(), config, opts, calib, tokenizer, generation)?;
    }
    let dir = out.commit()?;
    journal.finish()?;
    Ok(StreamReport {
        dir,
        method: opts.method,
        format: opts.format(),
        seconds: t0.elapsed().as_secs_f64(),
        peak_rss_bytes: crate::eval::memory::peak_rss_bytes(),
        output_bytes: plan.output_bytes,
        quantized_params: plan.quantized_params,
        quantized_bytes: plan.quantized_bytes,
        bits_per_weight: plan.bits_per_weight(),
        layers: streamer.layers,
        warnings,
        calibration: calib.map(|c| c.description.clone()),
        awq_search: streamer.awq_search,
    })
}

/// `config.json` with the GPTQ `quantization_config` (how it was made, in `meta`),
/// `quantize_config.json`, generation config and tokenizer.
fn write_gptq_configs(
    dir: &Path,
    config: &AutoConfig,
    opts: &StreamOptions,
    calib: Option<&CalibData>,
    tokenizer: Option<&AutoTokenizer>,
    generation: Option<&GenerationConfig>,
) -> Result<()> {
    let mut meta = serde_json::Map::new();
    meta.insert("method".into(), opts.method.name().into());
    if let Some(c) = calib {
        meta.insert("calibration".into(), c.description.clone().into());
        if let Some(sha) = &c.sha256 {
            meta.insert("calibration_sha256".into(), sha.clone().into());
        }
        meta.insert("calibration_samples".into(), c.samples.len().into());
        meta.insert("calibration_tokens".into(), c.num_tokens().into());
        let sink_weight = opts.hessian_sink_weight();
        if sink_weight != 1.0 {
            meta.insert("sink_weight".into(), (sink_weight as f64).into());
        }
    }
    if opts.clip_search {
        meta.insert("clip_search".into(), true.into());
    }
    let qcfg = GptqConfig {
        bits: opts.params.bits,
        group_size: opts.params.group_size,
        desc_act: opts.desc_act,
        sym: opts.params.sym,
        static_groups: opts.static_groups,
        true_sequential: opts.true_sequential,
        damp_percent: opts.damp_percent,
        format: opts.format(),
        meta: serde_json::Value::Object(meta),
    };
    write_model_files(
        dir,
        config,
        opts.dtype,
        Some(qcfg.to_quantization_config()),
        tokenizer,
        generation,
    )?;
    let text = serde_json::to_string_pretty(&qcfg.quantize_config_json())
        .map_err(|e| Error::Other(e.to_string()))?;
    crate::fsutil::write_atomic(&dir.join("quantize_config.json"), text.as_bytes())
}

/// The error `e` that stopped a run. A failure of the system (a full disk, a file-size limit,
/// a vanished mount) keeps the finished blocks for `--resume`, with a word on them; a failure of
/// the input itself (a NaN weight, a bad token id) would fail again, so its resumable folder is
/// deleted and nothing is left behind.
fn stopped(e: Error, journal: Journal) -> Error {
    if !matches!(e, Error::Io { .. }) || journal.finished() == 0 {
        let _ = journal.discard();
        return e;
    }
    Error::Other(format!(
        "{e}\n{} finished blocks are kept in {}; once the cause is fixed, the same command with \
         --resume continues from there",
        journal.finished(),
        journal.dir().display()
    ))
}

fn check_calibration(calib: Option<&CalibData>, method: Method) -> Result<&CalibData> {
    let calib = calib.ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{} needs calibration data (--calib FILE)",
            method.name()
        ))
    })?;
    if calib.samples.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "calibration data {} has no samples",
            calib.description
        )));
    }
    if let Some(i) = calib.samples.iter().position(Vec::is_empty) {
        return Err(Error::InvalidArgument(format!(
            "calibration sample {i} of {} is empty",
            calib.description
        )));
    }
    Ok(calib)
}

/// The work behind [`quantize_to_gptq`]: hands out output tensors in plan order, quantizing
/// each block when its first tensor is asked for.
struct Streamer<'a> {
    config: &'a AutoConfig,
    src: &'a dyn WeightSource,
    opts: &'a StreamOptions,
    /// Calibration activations entering block `next_block` (empty for RTN).
    acts: Vec<Activation>,
    next_block: usize,
    /// Tensors of the block being processed, kept in the journal when it is done.
    pending: BTreeMap<String, RawTensor>,
    /// The block file the assembly is reading from.
    reading: Option<(usize, SafetensorsFile)>,
    layers: Vec<LayerReport>,
    warnings: Vec<String>,
    awq_search: Vec<AwqBlockRecord>,
    bars: Bars,
}

struct Bars {
    _multi: MultiProgress,
    blocks: ProgressBar,
    layers: ProgressBar,
    /// Progress asked for but stderr is no terminal (a log file, CI): one plain line per block
    /// instead of bars, so long runs still show where they are.
    plain_lines: bool,
}

impl Bars {
    fn new(num_blocks: usize, layers_per_block: usize, show: bool) -> Self {
        use std::io::IsTerminal;
        let plain_lines = show && !std::io::stderr().is_terminal();
        let multi = MultiProgress::with_draw_target(if show && !plain_lines {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        let style = |what: &str| {
            ProgressStyle::with_template(&format!(
                "{what:>7} [{{bar:30}}] {{pos}}/{{len}} {{msg}} (elapsed {{elapsed}}, ETA {{eta}})"
            ))
            .expect("valid template")
            .progress_chars("=> ")
        };
        let blocks = multi.add(ProgressBar::new(num_blocks as u64));
        blocks.set_style(style("blocks"));
        let layers = multi.add(ProgressBar::new(layers_per_block as u64));
        layers.set_style(style("layers"));
        Bars {
            _multi: multi,
            blocks,
            layers,
            plain_lines,
        }
    }

    /// Count one finished block (and log it as a line when there are no bars).
    fn block_done(&self, prefix: &str) {
        self.blocks.inc(1);
        if self.plain_lines {
            let (done, total) = (self.blocks.position(), self.blocks.length().unwrap_or(0));
            let elapsed = self.blocks.elapsed().as_secs_f64();
            let eta = elapsed / done.max(1) as f64 * total.saturating_sub(done) as f64;
            eprintln!(
                "block {done}/{total} ({prefix}) done: elapsed {elapsed:.0} s, ETA {eta:.0} s"
            );
        }
    }
}

impl<'a> Streamer<'a> {
    fn new(
        config: &'a AutoConfig,
        src: &'a dyn WeightSource,
        opts: &'a StreamOptions,
        calib: Option<&CalibData>,
        journal: &Journal,
    ) -> Result<Self> {
        let start = journal.start_block();
        let mut acts = match calib {
            Some(c) => embed_samples(config, src, c)?,
            None => vec![],
        };
        let sizes: Vec<usize> = acts.iter().map(|a| a.x.len()).collect();
        if let Some(saved) = journal.load_inputs(&sizes)? {
            for (a, x) in acts.iter_mut().zip(saved) {
                a.x = x;
            }
        }
        let kept = journal.records_before(start);
        let per_block = block_groups(config).iter().map(|g| g.len()).sum();
        let bars = Bars::new(config.num_layers(), per_block, opts.progress);
        bars.blocks.set_position(start as u64);
        bars.blocks.reset_eta();
        Ok(Streamer {
            config,
            src,
            opts,
            acts,
            next_block: start,
            pending: BTreeMap::new(),
            reading: None,
            layers: kept.iter().flat_map(|r| r.layers.clone()).collect(),
            warnings: kept.iter().flat_map(|r| r.warnings.clone()).collect(),
            awq_search: vec![],
            bars,
        })
    }

    /// Quantize every block not yet kept, keeping each in the journal as it is done.
    fn run_blocks(&mut self, journal: &mut Journal) -> Result<()> {
        let h = self.config.hidden_size();
        while self.next_block < self.config.num_layers() {
            let i = self.next_block;
            let (layers0, warnings0) = (self.layers.len(), self.warnings.len());
            self.pending.clear();
            self.process_block(i)?;
            let record = BlockRecord {
                layers: self.layers[layers0..].to_vec(),
                warnings: self.warnings[warnings0..].to_vec(),
            };
            let inputs: Vec<&[f32]> = self.acts.iter().map(|a| a.x.as_slice()).collect();
            journal.record_block(i, &self.pending, record, &inputs, h)?;
            self.pending.clear();
            self.next_block += 1;
        }
        Ok(())
    }

    /// The output tensor `spec`: from the block file that produced it, or from the source.
    fn tensor(&mut self, spec: &TensorSpec, journal: &Journal) -> Result<RawTensor> {
        if let Some(b) = block_of(self.config, &spec.name) {
            if self.reading.as_ref().map(|(i, _)| *i) != Some(b) {
                self.reading = Some((b, SafetensorsFile::open(&journal.block_path(b))?));
            }
            let (_, file) = self.reading.as_ref().expect("opened above");
            if file.info(&spec.name).is_some() {
                return file.read(&spec.name);
            }
        }
        let values = crate::formats::read_f32_checked(self.src, &spec.name, &spec.shape)?;
        Ok(self.opts.dtype.encode(spec.shape.clone(), &values))
    }

    fn finish(&self) {
        self.bars.layers.finish_and_clear();
        self.bars.blocks.finish();
    }

    /// Quantize block `i` and advance the calibration activations through it.
    fn process_block(&mut self, i: usize) -> Result<()> {
        let prefix = block_prefix(self.config, i);
        self.bars.blocks.set_message(prefix.clone());
        self.bars.layers.reset();
        let ld = Loader::new(self.src, WeightDType::F32);
        let mut block = load_block(self.config, &ld, i)?;
        if self.opts.method.uses_awq() {
            self.awq_block(block.as_mut(), &prefix)?;
        } else {
            self.round_block(block.as_mut(), &prefix)?;
        }
        for (s, a) in self.acts.iter().enumerate() {
            if let Some(j) = a.x.iter().position(|v| !v.is_finite()) {
                return Err(Error::InvalidArgument(format!(
                    "calibration sample {s} has a non-finite activation ({}) at position {} after \
                     block `{prefix}` was quantized",
                    a.x[j],
                    j / self.config.hidden_size()
                )));
            }
        }
        drop(block);
        crate::eval::memory::release_free_memory();
        self.bars.block_done(&prefix);
        Ok(())
    }

    /// Round every linear of `block` in group order: RTN without calibration data, GPTQ with
    /// it (true-sequential: each group's Hessian from inputs that went through the groups
    /// already quantized). The calibration activations advance through the quantized block.
    fn round_block(&mut self, block: &mut dyn DecoderBlock, prefix: &str) -> Result<()> {
        let groups = block.groups();
        if self.acts.is_empty() {
            for name in groups.iter().flat_map(|g| g.iter()) {
                self.quantize_layer(block, prefix, name, None)?;
            }
        } else if self.opts.true_sequential {
            let mut states = self.begin_all(block);
            for (g, names) in groups.iter().enumerate() {
                let h = self.hessian(states.iter().map(|st| st.input.as_slice()));
                let f = self.factor(&h, prefix, names)?;
                drop(h);
                for name in names.iter() {
                    self.quantize_layer(block, prefix, name, Some(&f))?;
                }
                drop(f);
                self.step_all(block, g, &mut states);
            }
            self.end_all(states);
        } else {
            // Every group's Hessian from the float block, then one pass through the quantized one.
            let mut hessians = vec![];
            let mut states: Vec<BlockState> =
                self.acts.iter().map(|a| block.begin(a.x.clone())).collect();
            for g in 0..groups.len() {
                hessians.push(self.hessian(states.iter().map(|st| st.input.as_slice())));
                self.step_all(block, g, &mut states);
            }
            drop(states);
            for (names, h) in groups.iter().zip(&hessians) {
                let f = self.factor(h, prefix, names)?;
                for name in names.iter() {
                    self.quantize_layer(block, prefix, name, Some(&f))?;
                }
            }
            drop(hessians);
            let mut states = self.begin_all(block);
            for g in 0..groups.len() {
                self.step_all(block, g, &mut states);
            }
            self.end_all(states);
        }
        Ok(())
    }

    /// Every calibration sample's state at the start of `block` (its input moved in).
    fn begin_all(&mut self, block: &dyn DecoderBlock) -> Vec<BlockState> {
        self.acts
            .iter_mut()
            .map(|a| block.begin(std::mem::take(&mut a.x)))
            .collect()
    }

    /// Take each sample's block output as its next input.
    fn end_all(&mut self, states: Vec<BlockState>) {
        for (a, st) in self.acts.iter_mut().zip(states) {
            a.x = st.residual;
        }
    }

    /// Run group `g` of `block` for every calibration sample.
    fn step_all(&self, block: &dyn DecoderBlock, g: usize, states: &mut [BlockState]) {
        for (st, a) in states.iter_mut().zip(&self.acts) {
            run_stage(block, g, st, a);
        }
    }

    /// The GPTQ Hessian of one group input per calibration sample (`[t, k]` each, in sample
    /// order), with the first position of each sample weighted as the options say.
    fn hessian<'x>(&self, inputs: impl Iterator<Item = &'x [f32]>) -> Hessian {
        let sink_weight = self.opts.hessian_sink_weight();
        let mut h: Option<Hessian> = None;
        for (x, a) in inputs.zip(&self.acts) {
            let t = a.t;
            let h = h.get_or_insert_with(|| Hessian::new(x.len() / t));
            if sink_weight == 1.0 {
                h.add_sample(x, t);
            } else {
                let mut w = vec![1f32; t];
                w[0] = sink_weight;
                h.add_sample_weighted(x, t, &w);
            }
        }
        h.expect("checked: calibration has samples")
    }

    /// The GPTQ factor of one group's Hessian, shared by the group's linears.
    fn factor(&self, h: &Hessian, prefix: &str, names: &[&str]) -> Result<GptqFactor> {
        GptqFactor::new(h, &self.opts.gptq_options()).map_err(|e| {
            Error::InvalidArgument(format!("quantizing `{prefix}` {}: {e}", names.join(", ")))
        })
    }

    /// Quantize one linear of `block`, keep its packed tensors for writing, and put the
    /// dequantized weight in its place so later groups and blocks see what a loader will run.
    fn quantize_layer(
        &mut self,
        block: &mut dyn DecoderBlock,
        prefix: &str,
        name: &str,
        factor: Option<&GptqFactor>,
    ) -> Result<()> {
        let t0 = Instant::now();
        let full = format!("{prefix}.{name}");
        self.bars.layers.set_message(name.to_string());
        let linear = block.linear_mut(name);
        let (n, k) = (linear.out_features(), linear.in_features());
        let w = linear.weight.to_f32();
        let in_layer = |e: Error| Error::InvalidArgument(format!("quantizing `{full}`: {e}"));
        let (mut q, loss, damp_used, dead_columns) = match factor {
            None if self.opts.method == Method::Awq => {
                // AutoAWQ casts the scaled, clipped layer to f16 and quantizes it in f16.
                let q = awq_search::pseudo_quantize_half(&w, n, k, &self.opts.awq_options())
                    .map_err(in_layer)?;
                (q, None, None, 0)
            }
            None => (
                quantize_rtn(&w, n, k, &self.opts.params).map_err(in_layer)?,
                None,
                None,
                0,
            ),
            Some(f) => {
                let r = gptq_quantize_factored(&w, n, k, f, &self.opts.gptq_options())
                    .map_err(in_layer)?;
                if r.damp_used != self.opts.damp_percent {
                    self.warnings.push(format!(
                        "`{full}`: Cholesky needed damp {} (asked {})",
                        r.damp_used, self.opts.damp_percent
                    ));
                }
                (r.quantized, Some(r.loss), Some(r.damp_used), r.dead_columns)
            }
        };
        drop(w);
        round_scales_to_f16(&mut q);
        let tensors = if self.opts.writes_awq_gemm() {
            crate::checkpoint::awq::layer_tensors(&full, &q)?
        } else {
            layer_tensors(&full, &q, self.opts.format())?
        };
        for (tname, t) in tensors {
            self.pending.insert(tname, t);
        }
        linear.weight = Arc::new(DenseMatrix::new(n, k, q.dequantize(), WeightDType::F32));
        self.layers.push(LayerReport {
            name: full,
            loss,
            damp_used,
            dead_columns,
            seconds: t0.elapsed().as_secs_f64(),
        });
        self.bars.layers.inc(1);
        Ok(())
    }
}

impl Streamer<'_> {
    /// AWQ on one block (AutoAWQ's order): capture every stage's input on the float block,
    /// search each scaling group's scales against its sub-layer output, fold all scales in,
    /// then either search clipping on the scaled inputs and round to the AWQ grid, with the float
    /// block's outputs feeding the next block (AutoAWQ), or, for `awq-gptq`, run GPTQ on the
    /// scaled block exactly as `round_block` does for plain GPTQ.
    fn awq_block(&mut self, block: &mut dyn DecoderBlock, prefix: &str) -> Result<()> {
        let awq_groups = block.awq_groups();
        if awq_groups.is_empty() {
            return Err(Error::Unsupported(format!(
                "`{prefix}`: this block has no op to fold AWQ scales into (post-norm or \
                 non-affine norms)"
            )));
        }
        let num_stages = block.groups().len();
        let rows: usize = self.acts.iter().map(|a| a.t).sum();
        // Inputs of every stage, all samples concatenated; the float outputs for the next block.
        let mut inputs: Vec<Vec<f32>> = vec![Vec::new(); num_stages];
        // AWQ+GPTQ runs GPTQ on the scaled block afterwards, from this block's inputs.
        let block_inputs: Option<Vec<Vec<f32>>> = (self.opts.method == Method::AwqGptq)
            .then(|| self.acts.iter().map(|a| a.x.clone()).collect());
        let mut states = self.begin_all(block);
        for (st, a) in states.iter_mut().zip(&self.acts) {
            for (g, input) in inputs.iter_mut().enumerate() {
                input.extend_from_slice(&st.input);
                run_stage(block, g, st, a);
            }
        }
        self.end_all(states);
        let widths: Vec<usize> = inputs.iter().map(|x| x.len() / rows.max(1)).collect();
        // The samples the scale search's forward passes use (at least one).
        let limit = self.opts.awq_search_tokens.unwrap_or(usize::MAX);
        let mut search_samples = 0;
        let mut search_rows = 0;
        for a in &self.acts {
            if search_samples > 0 && search_rows + a.t > limit {
                break;
            }
            search_samples += 1;
            search_rows += a.t;
        }
        let opts = self.opts.awq_options();
        let h = self.config.hidden_size();

        let mut record = self.opts.record_awq_search.then(|| AwqBlockRecord {
            prefix: prefix.to_string(),
            groups: vec![],
            clips: vec![],
        });

        // 1. Scale search on the unmodified block, every group before any scale is applied.
        let mut found = Vec::with_capacity(awq_groups.len());
        for group in &awq_groups {
            self.bars
                .layers
                .set_message(format!("scales {}", group.linears.join(",")));
            let stage = group.stages.start;
            let k = widths[stage];
            let originals: Vec<(
                std::sync::Arc<dyn crate::kernels::LinearKernel>,
                Vec<f32>,
                usize,
            )> = group
                .linears
                .iter()
                .map(|name| {
                    let l = block.linear_mut(name);
                    (l.weight.clone(), l.weight.to_f32(), l.out_features())
                })
                .collect();
            let weights: Vec<(&[f32], usize)> = originals
                .iter()
                .map(|(_, w, n)| (w.as_slice(), *n))
                .collect();
            let x = &inputs[stage];
            let acts = &self.acts[..search_samples];
            let mut inspect = |ws: &[Vec<f32>]| -> Vec<f32> {
                for ((name, w), (_, _, n)) in group.linears.iter().zip(ws).zip(&originals) {
                    block.linear_mut(name).weight =
                        Arc::new(DenseMatrix::new(*n, k, w.clone(), WeightDType::F32));
                }
                let mut out = Vec::with_capacity(search_rows * h);
                let mut row0 = 0;
                for a in acts {
                    let mut st = State {
                        residual: vec![0.0; a.t * h],
                        input: x[row0 * k..(row0 + a.t) * k].to_vec(),
                    };
                    for g in group.stages.clone() {
                        run_stage(block, g, &mut st, a);
                    }
                    out.extend_from_slice(&st.residual);
                    row0 += a.t;
                }
                out
            };
            let search = awq_search::search_scales(x, rows, k, &weights, &mut inspect, &opts)
                .map_err(|e| {
                    Error::InvalidArgument(format!(
                        "AWQ scales for `{prefix}` {}: {e}",
                        group.linears.join(", ")
                    ))
                })?;
            for (name, (orig, _, _)) in group.linears.iter().zip(&originals) {
                block.linear_mut(name).weight = orig.clone();
            }
            if let Some(r) = record.as_mut() {
                r.groups.push(AwqGroupRecord {
                    prev: match group.prev {
                        AwqPrev::Norm(n) | AwqPrev::Linear(n) => n.to_string(),
                    },
                    linears: group.linears.iter().map(|l| l.to_string()).collect(),
                    best_ratio: search.best_ratio,
                    errors: search.errors.clone(),
                    scales: search.scales.clone(),
                });
            }
            found.push(search.scales);
        }

        // 2. Fold the scales: previous op ÷ s, the group's input columns × s (and the captured
        // inputs ÷ s, for the clipping search).
        for (group, s) in awq_groups.iter().zip(&found) {
            match group.prev {
                AwqPrev::Norm(name) => {
                    let (w, b) = block.norm_mut(name);
                    let w = w.ok_or_else(|| {
                        Error::Unsupported(format!("`{prefix}.{name}` has no weight to scale"))
                    })?;
                    awq_search::divide_vector(w, s)?;
                    if let Some(b) = b {
                        awq_search::divide_vector(b, s)?;
                    }
                }
                AwqPrev::Linear(name) => {
                    let l = block.linear_mut(name);
                    let (n, k) = (l.out_features(), l.in_features());
                    let mut w = l.weight.to_f32();
                    awq_search::divide_rows(&mut w, n, k, s)?;
                    l.weight = Arc::new(DenseMatrix::new(n, k, w, WeightDType::F32));
                    if let Some(b) = l.bias.as_mut() {
                        let at = b.len() - s.len();
                        awq_search::divide_vector(&mut b[at..], s)?;
                    }
                }
            }
            for name in group.linears {
                let l = block.linear_mut(name);
                let (n, k) = (l.out_features(), l.in_features());
                let mut w = l.weight.to_f32();
                awq_search::scale_columns(&mut w, n, k, s)?;
                l.weight = Arc::new(DenseMatrix::new(n, k, w, WeightDType::F32));
            }
            let stage = group.stages.start;
            let k = widths[stage];
            awq_search::divide_columns(&mut inputs[stage], rows, k, s)?;
        }

        // 3. Clipping (not for q/k, whose errors the softmax amplifies), then rounding: the AWQ
        // grid layer by layer, or GPTQ over the scaled block from its quantized inputs.
        let groups = block.groups();
        // AWQ+GPTQ does not clip: GPTQ chooses its grid and compensates rounding error itself.
        let clip = self.opts.method == Method::Awq && opts.apply_clip;
        for (stage, names) in groups.iter().enumerate() {
            let x = &inputs[stage];
            let k = widths[stage];
            for name in names.iter() {
                if clip && !is_query_or_key(name) {
                    self.bars.layers.set_message(format!("clip {name}"));
                    let l = block.linear_mut(name);
                    let n = l.out_features();
                    let mut w = l.weight.to_f32();
                    let max_val = awq_search::search_clip(x, rows, k, &w, n, &opts)?;
                    awq_search::apply_clip(&mut w, n, k, opts.group_size, &max_val)?;
                    l.weight = Arc::new(DenseMatrix::new(n, k, w, WeightDType::F32));
                    if let Some(r) = record.as_mut() {
                        r.clips.push((name.to_string(), max_val));
                    }
                }
                if block_inputs.is_none() {
                    self.quantize_layer(block, prefix, name, None)?;
                }
            }
        }
        drop(inputs);
        self.awq_search.extend(record);
        if let Some(saved) = block_inputs {
            for (a, x) in self.acts.iter_mut().zip(saved) {
                a.x = x;
            }
            self.round_block(block, prefix)?;
        }

        // 4. The float tensors the scales changed (norms, biases), from the block.
        for name in block.norm_names() {
            let (w, b) = block.norm_mut(name);
            for (suffix, v) in [("weight", w), ("bias", b)] {
                if let Some(v) = v {
                    let t = self.opts.dtype.encode(vec![v.len()], v);
                    self.pending.insert(format!("{prefix}.{name}.{suffix}"), t);
                }
            }
        }
        for name in groups.iter().flat_map(|g| g.iter()) {
            if let Some(b) = &block.linear_mut(name).bias {
                let t = self.opts.dtype.encode(vec![b.len()], b);
                self.pending.insert(format!("{prefix}.{name}.bias"), t);
            }
        }
        Ok(())
    }
}

/// q/k projections (also GPT-2's fused c_attn), which AutoAWQ never clips: its test is a
/// substring match on the layer name.
fn is_query_or_key(name: &str) -> bool {
    ["q_", "k_", "query", "key", "Wqkv", "c_attn"]
        .iter()
        .any(|p| name.contains(p))
}

/// Run stage `g` of `block` on one calibration sample's state.
fn run_stage(block: &dyn DecoderBlock, g: usize, st: &mut State, a: &Activation) {
    let mut cache = KvCache::new(1, 1);
    cache.push_positions(a.t, None);
    let mut ctx = BlockContext {
        t: a.t,
        positions: &a.positions,
        cache: &mut cache,
        cache_layer: 0,
    };
    block.step(g, st, &mut ctx);
}

/// Checkpoints store scales in f16; dequantize with exactly those values.
fn round_scales_to_f16(q: &mut QuantizedLinear) {
    for s in &mut q.scales {
        *s = WeightDType::F16.round(*s);
    }
}

/// The first block's input for every calibration sample, from a model with no blocks (the
/// embeddings only), held in the checkpoint's own dtype.
fn embed_samples(
    config: &AutoConfig,
    src: &dyn WeightSource,
    calib: &CalibData,
) -> Result<Vec<Activation>> {
    let embed_name = checkpoint_tensors(config)
        .into_iter()
        .map(|(n, _)| n)
        .find(|n| n.ends_with("embed_tokens.weight") || n.ends_with("wte.weight"));
    let dtype = embed_name
        .and_then(|n| src.info(&n))
        .and_then(|i| WeightDType::from_storage(i.dtype))
        .unwrap_or(WeightDType::F32);
    let stem = AutoModelForCausalLM::from_weights(
        config.with_num_layers(0),
        src,
        &LoadOptions {
            dtype,
            ..Default::default()
        },
    )?;
    let vocab = config.vocab_size();
    calib
        .samples
        .iter()
        .enumerate()
        .map(|(s, ids)| {
            if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(Error::InvalidArgument(format!(
                    "calibration sample {s} has token id {bad}, outside the vocabulary of {vocab}"
                )));
            }
            let mut cache = stem.new_cache(1);
            let (x, positions) = stem.embed(&ForwardInput::single(ids), &mut cache)?;
            Ok(Activation {
                x,
                positions,
                t: ids.len(),
            })
        })
        .collect()
}
