//! Command-line interface: argument definitions and one function per command.

mod commands;

use autoquant::qtypes::{Bits, GroupSize};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "autoquant",
    version,
    about = "Load, quantize, save and measure Hugging Face causal LMs on the CPU"
)]
pub struct Cli {
    /// Print results as JSON on stdout (progress and logs go to stderr).
    #[arg(long, global = true)]
    pub json: bool,
    /// Report the peak resident memory (RSS) of the process at the end.
    #[arg(long, global = true)]
    pub peak_rss: bool,
    /// Worker threads, 1 to 1024 (default: all cores).
    #[arg(long, global = true, value_parser = parse_threads)]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

/// Most worker threads `--threads` accepts: beyond it each thread's stack alone adds up to
/// gigabytes, and no machine this runs on has that many cores.
pub const MAX_THREADS: usize = 1024;

fn parse_threads(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=MAX_THREADS).contains(&n) => Ok(n),
        _ => Err(format!(
            "--threads must be a whole number from 1 to {MAX_THREADS}, not `{s}`"
        )),
    }
}

/// Where a hub id is looked up.
#[derive(Args, Debug, Clone)]
pub struct HubArgs {
    /// Hub revision (branch, tag or commit).
    #[arg(long)]
    pub revision: Option<String>,
    /// Never use the network (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
    /// Hugging Face cache folder (default: HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

/// How to find and load a model.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A model folder, a .gguf file, or a hub id `org/name[@revision]` (Hugging Face cache).
    pub model: String,
    /// In-memory dtype of dense weights: f32, f16 or bf16 (compute is f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    #[command(flatten)]
    pub hub: HubArgs,
    /// Quantize linear layers to 8 bits while loading (LLM.int8, bitsandbytes style).
    #[arg(long, conflicts_with = "load_in_4bit")]
    pub load_in_8bit: bool,
    /// Quantize linear layers to 4 bits while loading (NF4/FP4, bitsandbytes style).
    #[arg(long)]
    pub load_in_4bit: bool,
    /// 4-bit code book: nf4 or fp4.
    #[arg(long, default_value = "nf4", requires = "load_in_4bit")]
    pub bnb_4bit_quant_type: String,
    /// Also quantize the 4-bit block statistics (double quantization).
    #[arg(long, requires = "load_in_4bit")]
    pub double_quant: bool,
    /// 4-bit compute dtype: f32, f16 or bf16 (16-bit types round weights, activations, outputs).
    #[arg(long, default_value = "f32", requires = "load_in_4bit")]
    pub compute_dtype: String,
    /// LLM.int8 outlier threshold (0 disables the decomposition).
    #[arg(long, default_value_t = 6.0, requires = "load_in_8bit")]
    pub int8_threshold: f32,
    /// 8-bit weights dequantized to float, activations kept in float (no int8 matmul).
    #[arg(long, requires = "load_in_8bit")]
    pub int8_dequantized: bool,
    /// Hold the output projection (lm_head, or the tied embedding) as LLM.int8 weights: half
    /// the bytes of f16 per decoded token, at a small perplexity cost. transformers keeps it in
    /// float; llama.cpp's Q4_0 files hold it in Q8_0.
    #[arg(long)]
    pub lm_head_int8: bool,
    /// How NF4/FP4 layers multiply while decoding: `exact` (bitsandbytes' float arithmetic),
    /// `int16` (integer code book and activations, ~1e-4 relative, about twice as fast) or
    /// `int8` (7-bit code book, 8-bit activations per 64 as llama.cpp's Q8_0, ~2e-3 relative,
    /// fastest). Prefill and perplexity are exact either way.
    #[arg(long, default_value = "exact", value_parser = ["exact", "int16", "int8"])]
    pub bnb_4bit_decode: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show a model's config, architecture, parameter count, dtypes and files.
    Info(InfoArgs),
    /// Estimate memory from config.json alone (no weights are read).
    Estimate(EstimateArgs),
    /// Generate text from a prompt, streamed to the terminal.
    Generate(GenerateArgs),
    /// Perplexity of a model on a text file.
    Ppl(PplArgs),
    /// Prefill and decode speed, and peak memory.
    Bench(BenchArgs),
    /// Load a model and write it as a Hugging Face folder (safetensors), e.g. GGUF → HF.
    Convert(ConvertArgs),
    /// Quantize a float model: RTN or GPTQ (streamed block by block, GPTQ checkpoint), or
    /// bitsandbytes NF4/FP4/int8.
    Quantize(QuantizeArgs),
    /// Write a model with seeded random weights from a config.json, streamed tensor by tensor
    /// (synthetic models larger than memory, for testing).
    Synth(SynthArgs),
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Also list every tensor with its dtype and shape.
    #[arg(long)]
    pub tensors: bool,
}

#[derive(Args, Debug)]
pub struct EstimateArgs {
    /// A model folder, config.json, .gguf file or hub id.
    pub model: String,
    /// Group size assumed for the int4 row (-1 for per-channel).
    #[arg(long, default_value = "128", allow_hyphen_values = true)]
    pub group_size: GroupSize,
    #[arg(long)]
    pub offline: bool,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Always pick the most likely token (the default unless --temperature/--top-k/--top-p is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
    pub greedy: bool,
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when this text appears (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
}

#[derive(Args, Debug)]
pub struct PplArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text file: plain, WikiText raw, or JSON lines with a `text` field.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value_t = 2048)]
    pub seqlen: usize,
    /// Sliding-window mode (transformers docs): move windows by this many tokens.
    #[arg(long, conflicts_with = "llama_cpp")]
    pub stride: Option<usize>,
    /// llama.cpp convention: score only the second half of each window, first token set to BOS.
    #[arg(long)]
    pub llama_cpp: bool,
    /// Use only the first K windows.
    #[arg(long)]
    pub max_windows: Option<usize>,
    /// Feed each window one token at a time through the KV cache, as generation does: the
    /// perplexity of the decoding arithmetic (`--bnb-4bit-decode`, `--lm-head-int8`), slower.
    #[arg(long)]
    pub token_by_token: bool,
    /// Prepend BOS to the text before tokenizing (off: the papers' protocol adds none for Llama-style
    /// tokenizers that do not add BOS).
    #[arg(long)]
    pub add_special_tokens: bool,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 512)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 128)]
    pub gen_len: usize,
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output folder (written atomically).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Replace the output folder if it exists.
    #[arg(long)]
    pub overwrite: bool,
    /// Shard size limit, e.g. 5GB, 500MB.
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
}

/// `quantize --method`: parsed once here; the streamed methods map to
/// [`autoquant::quant::stream::Method`], the bitsandbytes ones to a bitsandbytes config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum QuantMethod {
    Rtn,
    Gptq,
    Awq,
    AwqGptq,
    BnbNf4,
    BnbFp4,
    BnbInt8,
}

impl QuantMethod {
    pub fn name(self) -> &'static str {
        match self {
            QuantMethod::Rtn => "rtn",
            QuantMethod::Gptq => "gptq",
            QuantMethod::Awq => "awq",
            QuantMethod::AwqGptq => "awq-gptq",
            QuantMethod::BnbNf4 => "bnb-nf4",
            QuantMethod::BnbFp4 => "bnb-fp4",
            QuantMethod::BnbInt8 => "bnb-int8",
        }
    }
}

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// A float model: folder, .gguf file or hub id `org/name[@revision]`.
    pub model: String,
    #[command(flatten)]
    pub hub: HubArgs,
    /// The quantization method.
    #[arg(long, value_enum, default_value_t = QuantMethod::Gptq)]
    pub method: QuantMethod,
    /// Bits per weight (rtn/gptq: 2, 3, 4 or 8).
    #[arg(long, default_value = "4")]
    pub bits: Bits,
    /// Input channels per group; -1 for one group per output channel. Must divide every
    /// layer's in_features.
    #[arg(long, default_value = "128", allow_hyphen_values = true)]
    pub group_size: GroupSize,
    /// Symmetric grid (the default; zero point fixed at the middle).
    #[arg(long, conflicts_with = "asym")]
    pub sym: bool,
    /// Asymmetric grid (a zero point per group), saved as gptq_v2.
    #[arg(long)]
    pub asym: bool,
    /// GPTQ act-order: quantize columns by decreasing Hessian diagonal (the default for gptq
    /// and awq-gptq).
    #[arg(long, conflicts_with = "no_desc_act")]
    pub desc_act: bool,
    /// GPTQ without act-order (groups in column order, g_idx trivial).
    #[arg(long)]
    pub no_desc_act: bool,
    /// Reproduce the reference GPTQ (IST-DASLab / AutoGPTQ): no act-order, sink weight 1 and
    /// no clipping search, unless those flags are given.
    #[arg(long)]
    pub reference: bool,
    /// GPTQ static groups: group parameters from the original weights (with --desc-act).
    #[arg(long)]
    pub static_groups: bool,
    /// GPTQ damping, a fraction of the mean Hessian diagonal (retried ×10 if Cholesky fails).
    #[arg(long, default_value_t = 0.01)]
    pub damp: f64,
    /// Quantize each block's linear groups on float inputs instead of true-sequentially.
    #[arg(long)]
    pub no_true_sequential: bool,
    /// GPTQ scales from a clipping search weighted by each column's GPTQ loss factor instead of
    /// the min/max grid [default for gptq; off with --reference].
    #[arg(long, conflicts_with = "no_clip_search")]
    pub clip_search: bool,
    /// The reference's min/max grid: each group's scale spans its largest weight.
    #[arg(long)]
    pub no_clip_search: bool,
    /// Hessian weight of each calibration sample's first position (the attention sink) relative
    /// to the other positions [default: 16; 1 with --reference, as the reference GPTQ].
    #[arg(long)]
    pub sink_weight: Option<f32>,
    /// Calibration text: plain/WikiText text (random windows) or JSON lines (one sample each).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Calibration token windows saved as JSON `[[ids...], ...]` (e.g. by the reference runner).
    #[arg(long, conflicts_with = "calib")]
    pub calib_windows: Option<PathBuf>,
    /// Calibration samples: random windows (GPTQ, default 128) or documents (AWQ, default 128).
    #[arg(long)]
    pub nsamples: Option<usize>,
    /// Tokens per sample (GPTQ default 2048; AWQ default 512, AutoAWQ's).
    #[arg(long)]
    pub seqlen: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// AWQ: calibration tokens the scale search's forward passes run on (whole samples; 0 = all,
    /// as AutoAWQ). Activation statistics always use every token.
    #[arg(long, default_value_t = autoquant::quant::stream::DEFAULT_AWQ_SEARCH_TOKENS)]
    pub awq_search_tokens: usize,
    /// AWQ: the original activation-only scale formula instead of AutoAWQ's duo scaling.
    #[arg(long)]
    pub awq_activation_only: bool,
    /// AWQ: skip the clipping search (AutoAWQ's `apply_clip=False`); the scales are still
    /// searched and folded.
    #[arg(long)]
    pub awq_no_clip: bool,
    /// Dtype of the tensors kept in float (embeddings, norms, biases, lm_head).
    #[arg(long, default_value = "f16")]
    pub out_dtype: String,
    /// bnb-nf4/bnb-fp4: also quantize the 4-bit absmax statistics (double quantization).
    #[arg(long)]
    pub double_quant: bool,
    /// Output folder (written atomically).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Replace the output folder if it exists.
    #[arg(long)]
    pub overwrite: bool,
    /// Continue an interrupted run of this command (same model, settings and calibration) from
    /// its last finished block; the result is the same bytes as a run never interrupted. With
    /// nothing to continue, the run starts from the first block.
    #[arg(long)]
    pub resume: bool,
    /// Shard size limit, e.g. 5GB, 500MB.
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
    /// Print the memory and output-size estimate, then stop.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// A config.json (any supported model_type).
    pub config: PathBuf,
    /// Output folder (written atomically).
    #[arg(short, long)]
    pub output: PathBuf,
    #[arg(long, default_value = "f16")]
    pub dtype: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(cli: Cli) -> autoquant::Result<()> {
    let ctx = commands::Context { json: cli.json };
    match cli.command {
        Command::Info(a) => commands::info(&ctx, a),
        Command::Estimate(a) => commands::estimate(&ctx, a),
        Command::Generate(a) => commands::generate(&ctx, a),
        Command::Ppl(a) => commands::ppl(&ctx, a),
        Command::Bench(a) => commands::bench(&ctx, a),
        Command::Convert(a) => commands::convert(&ctx, a),
        Command::Quantize(a) => commands::quantize(&ctx, a),
        Command::Synth(a) => commands::synth(&ctx, a),
    }
}
