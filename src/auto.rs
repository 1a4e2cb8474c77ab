//! `from_pretrained` in one call: find the files, read config, tokenizer and weights, build the
//! model. Works for model folders (safetensors / pytorch_model.bin), GGUF files and hub ids.

use crate::config::AutoConfig;
use crate::error::{Error, Result};
use crate::formats::gguf::GgufWeights;
use crate::formats::WeightSource;
use crate::generate::GenerationConfig;
use crate::hub::{self, HubOptions, ModelFiles};
use crate::models::{AutoModelForCausalLM, CausalLM, LoadOptions};
use crate::tokenizer::AutoTokenizer;
use std::path::{Path, PathBuf};

/// A loaded model with everything needed to run it.
pub struct Pretrained {
    pub files: ModelFiles,
    pub config: AutoConfig,
    pub tokenizer: AutoTokenizer,
    pub model: Box<dyn CausalLM>,
    /// Defaults from `generation_config.json` (EOS ids, sampling settings).
    pub generation: GenerationConfig,
    /// Files the weights were read from.
    pub weight_files: Vec<PathBuf>,
    pub load_seconds: f64,
}

/// Config and weights of a model without building it (for `info`, quantization and streaming).
pub struct Checkpoint {
    pub files: ModelFiles,
    pub config: AutoConfig,
    pub weights: Box<dyn WeightSource>,
}

impl Checkpoint {
    pub fn open(model: &str, hub_opts: &HubOptions) -> Result<Self> {
        let files = hub::resolve(model, hub_opts)?;
        Self::from_files(files)
    }

    pub fn from_files(files: ModelFiles) -> Result<Self> {
        if let Some(gguf) = &files.gguf {
            let weights = GgufWeights::open(gguf)?;
            let value = weights.file().hf_config()?;
            let config = AutoConfig::from_value(value, gguf, Some(gguf))?;
            return Ok(Checkpoint { files, config, weights: Box::new(weights) });
        }
        let config = AutoConfig::from_pretrained(&files.dir)?;
        let weights = crate::formats::open_weights(&files.dir)?;
        Ok(Checkpoint { files, config, weights })
    }

    pub fn tokenizer(&self) -> Result<AutoTokenizer> {
        match &self.files.gguf {
            Some(gguf) => {
                let g = crate::formats::gguf::GgufFile::open(gguf)?;
                AutoTokenizer::from_gguf_metadata(g.metadata())
            }
            None => AutoTokenizer::from_dir(&self.files.dir),
        }
    }
}

impl Pretrained {
    /// Load `model` (folder, `.gguf` file or hub id).
    pub fn load(model: &str, opts: &LoadOptions, hub_opts: &HubOptions) -> Result<Self> {
        let t0 = std::time::Instant::now();
        let ckpt = Checkpoint::open(model, hub_opts)?;
        let tokenizer = ckpt.tokenizer()?;
        let generation = generation_defaults(&ckpt.files.dir, &ckpt.config, &tokenizer, ckpt.files.gguf.is_none())?;
        let weight_files = ckpt.weights.files();
        let model = AutoModelForCausalLM::from_weights(ckpt.config.clone(), ckpt.weights.as_ref(), opts)?;
        Ok(Pretrained {
            files: ckpt.files,
            config: ckpt.config,
            tokenizer,
            model,
            generation,
            weight_files,
            load_seconds: t0.elapsed().as_secs_f64(),
        })
    }

    pub fn from_dir(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        Self::load(&dir.to_string_lossy(), opts, &HubOptions { offline: Some(true), ..Default::default() })
    }
}

/// EOS ids and sampling defaults: `generation_config.json` first, then the config, then the
/// tokenizer, as transformers does.
pub fn generation_defaults(dir: &Path, config: &AutoConfig, tok: &AutoTokenizer, read_file: bool) -> Result<GenerationConfig> {
    let mut g = GenerationConfig::default();
    let path = dir.join("generation_config.json");
    let file = if read_file && path.exists() { Some(crate::error::read_json(&path)?) } else { None };
    let ids = |v: Option<&serde_json::Value>| -> Vec<u32> {
        match v {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
            _ => vec![],
        }
    };
    if let Some(f) = &file {
        g.eos_token_ids = ids(f.get("eos_token_id"));
        if let Some(v) = f.get("do_sample").and_then(|v| v.as_bool()) {
            g.do_sample = v;
        }
        if let Some(v) = f.get("temperature").and_then(|v| v.as_f64()) {
            g.temperature = v as f32;
        }
        if let Some(v) = f.get("top_k").and_then(|v| v.as_u64()) {
            g.top_k = v as usize;
        }
        if let Some(v) = f.get("top_p").and_then(|v| v.as_f64()) {
            g.top_p = v as f32;
        }
        if let Some(v) = f.get("repetition_penalty").and_then(|v| v.as_f64()) {
            g.repetition_penalty = v as f32;
        }
    }
    if g.eos_token_ids.is_empty() {
        g.eos_token_ids = config.token_id("eos_token_id");
    }
    if g.eos_token_ids.is_empty() {
        g.eos_token_ids = tok.eos_token_ids();
    }
    if g.eos_token_ids.iter().any(|&id| id as usize >= config.vocab_size()) {
        return Err(Error::format(&path, "eos_token_id is outside the vocabulary"));
    }
    Ok(g)
}
