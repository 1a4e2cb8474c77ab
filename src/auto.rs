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
            crate::models::check_against_weights(&config, &weights)?;
            return Ok(Checkpoint {
                files,
                config,
                weights: Box::new(weights),
            });
        }
        let config = AutoConfig::from_pretrained(&files.dir)?;
        let weights = crate::formats::open_weights(&files.dir)?;
        crate::models::check_against_weights(&config, weights.as_ref())?;
        Ok(Checkpoint {
            files,
            config,
            weights,
        })
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
    /// Every file the model was read from: the weights, and the folder (or GGUF file) holding
    /// config and tokenizer.
    pub fn input_files(&self) -> Vec<PathBuf> {
        let mut v = self.weight_files.clone();
        v.push(self.files.dir.clone());
        v.extend(self.files.gguf.clone());
        v
    }

    /// Load `model` (folder, `.gguf` file or hub id).
    pub fn load(model: &str, opts: &LoadOptions, hub_opts: &HubOptions) -> Result<Self> {
        let t0 = std::time::Instant::now();
        let ckpt = Checkpoint::open(model, hub_opts)?;
        let tokenizer = ckpt.tokenizer()?;
        let generation = generation_defaults(
            &ckpt.files.dir,
            &ckpt.config,
            &tokenizer,
            ckpt.files.gguf.is_none(),
        )?;
        let weight_files = ckpt.weights.files();
        let model =
            AutoModelForCausalLM::from_weights(ckpt.config.clone(), ckpt.weights.as_ref(), opts)?;
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
        Self::load(
            &dir.to_string_lossy(),
            opts,
            &HubOptions {
                offline: Some(true),
                ..Default::default()
            },
        )
    }
}

/// EOS ids and sampling defaults: `generation_config.json` first, then the config, then the
/// tokenizer, as transformers does.
pub fn generation_defaults(
    dir: &Path,
    config: &AutoConfig,
    tok: &AutoTokenizer,
    read_file: bool,
) -> Result<GenerationConfig> {
    let mut g = GenerationConfig::default();
    let path = dir.join("generation_config.json");
    let file = if read_file && path.exists() {
        Some(crate::error::read_json(&path)?)
    } else {
        None
    };
    if let Some(f) = &file {
        read_generation_file(f, &path, &mut g)?;
    }
    if g.eos_token_ids.is_empty() {
        g.eos_token_ids = config.token_id("eos_token_id");
    }
    if g.eos_token_ids.is_empty() {
        g.eos_token_ids = tok.eos_token_ids();
    }
    if g.eos_token_ids
        .iter()
        .any(|&id| id as usize >= config.vocab_size())
    {
        return Err(Error::format(
            &path,
            "eos_token_id is outside the vocabulary",
        ));
    }
    Ok(g)
}

/// The sampling settings of `generation_config.json`, held to the rules the command line
/// applies to the same settings: a value that is out of range or of the wrong type is an
/// error naming the file and key, never skipped.
fn read_generation_file(
    f: &serde_json::Value,
    path: &Path,
    g: &mut GenerationConfig,
) -> Result<()> {
    use serde_json::Value;
    let bad = |key: &str, what: &str, v: &Value| {
        Error::format(path, format!("key `{key}`: {what}, found {v}"))
    };
    let get = |key: &str| f.get(key).filter(|v| !v.is_null());
    let number = |key: &str, ok: &dyn Fn(f64) -> bool, what: &str| -> Result<Option<f64>> {
        match get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && ok(x) => Ok(Some(x)),
                _ => Err(bad(key, what, v)),
            },
        }
    };
    let count = |key: &str| -> Result<Option<u64>> {
        match get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| bad(key, "expected a non-negative integer", v)),
        }
    };
    if let Some(v) = get("eos_token_id") {
        let ids: Option<Vec<u32>> = match v {
            Value::Array(a) => a
                .iter()
                .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
                .collect(),
            x => x
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(|n| vec![n]),
        };
        g.eos_token_ids = ids.ok_or_else(|| {
            bad(
                "eos_token_id",
                "expected a token id or a list of token ids",
                v,
            )
        })?;
    }
    if let Some(v) = get("do_sample") {
        g.do_sample = v
            .as_bool()
            .ok_or_else(|| bad("do_sample", "expected true/false", v))?;
    }
    if let Some(t) = number("temperature", &|x| x >= 0.0, "expected a number >= 0")? {
        g.temperature = t as f32;
    }
    if g.do_sample && !(g.temperature > 0.0) {
        return Err(Error::format(
            path,
            format!(
                "key `temperature`: {} with do_sample true; sampling needs a temperature > 0",
                g.temperature
            ),
        ));
    }
    if let Some(k) = count("top_k")? {
        g.top_k = usize::try_from(k).unwrap_or(usize::MAX);
    }
    if let Some(p) = number(
        "top_p",
        &|x| x > 0.0 && x <= 1.0,
        "expected a number in (0, 1]",
    )? {
        g.top_p = p as f32;
    }
    if let Some(r) = number("repetition_penalty", &|x| x > 0.0, "expected a number > 0")? {
        g.repetition_penalty = r as f32;
    }
    // Not used here (the command line sets the length), but a wrong value is still refused.
    for key in ["max_new_tokens", "max_length"] {
        count(key)?;
    }
    Ok(())
}

/// Options for [`save_pretrained`].
#[derive(Clone, Debug)]
pub struct SaveOptions {
    pub dtype: crate::tensor::WeightDType,
    /// Shard past this many bytes (transformers' default is 5 GB).
    pub max_shard_bytes: u64,
    pub overwrite: bool,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            dtype: crate::tensor::WeightDType::F32,
            max_shard_bytes: 5_000_000_000,
            overwrite: false,
        }
    }
}

/// Write a model folder that transformers loads: `config.json` (original keys kept),
/// `generation_config.json`, tokenizer files and safetensors (sharded past the limit, with the
/// standard index). Everything is written into a temporary folder that is renamed at the end,
/// so a failure leaves nothing behind.
pub fn save_pretrained(
    model: &dyn CausalLM,
    tokenizer: Option<&AutoTokenizer>,
    generation: Option<&GenerationConfig>,
    dir: &Path,
    opts: &SaveOptions,
) -> Result<PathBuf> {
    use crate::formats::safetensors::{save_safetensors, TensorSpec};
    let out = crate::fsutil::AtomicDir::with_overwrite(dir, opts.overwrite)?;
    write_model_files(
        out.path(),
        model.config(),
        opts.dtype,
        None,
        tokenizer,
        generation,
    )?;
    let tensors = crate::models::state_dict(model, opts.dtype);
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(n, t)| TensorSpec::new(n.clone(), t.dtype, t.shape.clone()))
        .collect();
    let mut by_name: std::collections::HashMap<String, crate::tensor::RawTensor> =
        tensors.into_iter().collect();
    save_safetensors(
        out.path(),
        &specs,
        opts.max_shard_bytes,
        &Default::default(),
        |spec| {
            by_name
                .remove(&spec.name)
                .ok_or_else(|| Error::tensor(dir, &spec.name, "produced twice"))
        },
    )?;
    out.commit()
}

/// Everything of a model folder but its weights: `config.json` (original keys kept, the dtype
/// of the stored float tensors, and `quantization_config` when given), `generation_config.json`
/// and the tokenizer files. Shared by every writer of model folders.
pub fn write_model_files(
    dir: &Path,
    config: &AutoConfig,
    dtype: crate::tensor::WeightDType,
    quantization_config: Option<serde_json::Value>,
    tokenizer: Option<&AutoTokenizer>,
    generation: Option<&GenerationConfig>,
) -> Result<()> {
    let mut config = config.clone();
    let dtype_key = if config.raw.contains_key("torch_dtype") {
        "torch_dtype"
    } else {
        "dtype"
    };
    config
        .raw
        .insert(dtype_key.into(), dtype.torch_name().into());
    config
        .raw
        .insert("model_type".into(), config.model_type.clone().into());
    if let Some(q) = quantization_config {
        config.raw.insert("quantization_config".into(), q);
    }
    crate::fsutil::write_atomic(&dir.join("config.json"), config.to_json_string().as_bytes())?;
    if let Some(g) = generation {
        write_generation_config(dir, &config, g)?;
    }
    if let Some(t) = tokenizer {
        t.save(dir)?;
    }
    Ok(())
}

/// Write `generation_config.json` into `dir`: BOS/EOS ids and the sampling settings that differ
/// from greedy decoding, as transformers reads them.
fn write_generation_config(dir: &Path, config: &AutoConfig, g: &GenerationConfig) -> Result<()> {
    let mut m = serde_json::Map::new();
    if let Some(b) = config.token_id("bos_token_id").first() {
        m.insert("bos_token_id".into(), (*b).into());
    }
    match g.eos_token_ids.as_slice() {
        [] => {}
        [one] => {
            m.insert("eos_token_id".into(), (*one).into());
        }
        many => {
            m.insert("eos_token_id".into(), many.to_vec().into());
        }
    }
    if g.do_sample {
        m.insert("do_sample".into(), true.into());
        m.insert("temperature".into(), (g.temperature as f64).into());
        m.insert("top_k".into(), g.top_k.into());
        m.insert("top_p".into(), (g.top_p as f64).into());
    }
    if g.repetition_penalty != 1.0 {
        m.insert(
            "repetition_penalty".into(),
            (g.repetition_penalty as f64).into(),
        );
    }
    let text = serde_json::to_string_pretty(&m).expect("JSON map serializes") + "\n";
    crate::fsutil::write_atomic(&dir.join("generation_config.json"), text.as_bytes())
}

/// Parse sizes like "5GB", "500MB", "2GiB", "1000" (bytes).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| Error::InvalidArgument(format!("bad size `{s}`")))?;
    let mult = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1048576.0,
        "GIB" => 1073741824.0,
        _ => {
            return Err(Error::InvalidArgument(format!(
                "bad size unit in `{s}` (use B, KB, MB, GB, KiB, MiB, GiB)"
            )))
        }
    };
    Ok((n * mult) as u64)
}

/// Write a model with seeded random weights (as [`AutoModelForCausalLM::from_config`] makes
/// them) into `dir` as safetensors in `dtype`, one tensor in memory at a time: a synthetic
/// checkpoint far larger than memory, for testing streaming. Config and generation config are
/// written too; the folder appears only when complete.
pub fn write_random_checkpoint(
    config: &AutoConfig,
    seed: u64,
    dtype: crate::tensor::WeightDType,
    dir: &Path,
    opts: &SaveOptions,
) -> Result<crate::formats::safetensors::SavedSafetensors> {
    use crate::formats::safetensors::{save_safetensors, TensorSpec};
    let weights = crate::models::RandomWeights::new(config, seed);
    let specs: Vec<TensorSpec> = crate::models::checkpoint_tensors(config)
        .into_iter()
        .map(|(name, shape)| TensorSpec::new(name, dtype.storage(), shape))
        .collect();
    let out = crate::fsutil::AtomicDir::with_overwrite(dir, opts.overwrite)?;
    write_model_files(out.path(), config, dtype, None, None, None)?;
    let saved = save_safetensors(
        out.path(),
        &specs,
        opts.max_shard_bytes,
        &Default::default(),
        |spec| {
            let values = weights.tensor_values(&spec.name)?;
            Ok(dtype.encode(spec.shape.clone(), &values))
        },
    )?;
    let final_dir = out.commit()?;
    Ok(crate::formats::safetensors::SavedSafetensors {
        files: saved
            .files
            .iter()
            .map(|f| final_dir.join(f.file_name().expect("shard files have names")))
            .collect(),
        index: saved
            .index
            .map(|_| final_dir.join("model.safetensors.index.json")),
        total_size: saved.total_size,
    })
}
