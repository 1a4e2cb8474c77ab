//! AutoTokenizer: one tokenizer type for every place a model keeps its vocabulary.
//!
//! Sources, in the order [`AutoTokenizer::from_dir`] tries them: `tokenizer.json` (the `tokenizers`
//! serialization), GPT-2/OPT style `vocab.json` + `merges.txt`; and, through
//! [`AutoTokenizer::from_gguf_metadata`], the vocabulary embedded in a GGUF file. Every source is
//! turned into a `tokenizers::Tokenizer`, so encoding, decoding and saving share one code path.
//! Special tokens, BOS/EOS rules and the chat template follow what transformers reads from
//! `tokenizer_config.json`, `special_tokens_map.json` and `generation_config.json`.

mod chat;
mod gguf;
mod stream;

pub use chat::ChatMessage;
pub use gguf::GgufPreTokenizerFlavor;
pub use stream::StreamDecoder;

use crate::error::{read_file, read_json, Error, Result};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use tokenizers::{AddedToken, Tokenizer};

/// A tokenizer with the special-token and chat-template information transformers keeps beside it.
#[derive(Clone, Debug)]
pub struct AutoTokenizer {
    inner: Tokenizer,
    /// Where it came from, for [`AutoTokenizer::describe`] (e.g. `gguf:gpt2/smollm`).
    source: String,
    special: SpecialTokens,
    chat_template: Option<String>,
    /// `generation_config.json`'s stop tokens; they take precedence over the tokenizer's EOS.
    generation_eos_ids: Vec<u32>,
    generation_bos_id: Option<u32>,
    model_max_length: Option<u64>,
}

/// The named special tokens, as strings (ids are looked up in the vocabulary when needed).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub unk: Option<String>,
    pub pad: Option<String>,
    /// `additional_special_tokens` / `extra_special_tokens` given as a list.
    pub additional: Vec<String>,
}

impl SpecialTokens {
    const KEYS: [&'static str; 4] = ["bos_token", "eos_token", "unk_token", "pad_token"];

    fn slot(&mut self, key: &str) -> Option<&mut Option<String>> {
        match key {
            "bos_token" => Some(&mut self.bos),
            "eos_token" => Some(&mut self.eos),
            "unk_token" => Some(&mut self.unk),
            "pad_token" => Some(&mut self.pad),
            _ => None,
        }
    }

    /// Override from a JSON object (tokenizer_config.json or special_tokens_map.json). A key that
    /// is present but null clears the token, as passing `None` to transformers does.
    fn override_from(&mut self, obj: &Map<String, Value>) {
        for key in Self::KEYS {
            if let Some(v) = obj.get(key) {
                if let Some(slot) = self.slot(key) {
                    *slot = token_content(v);
                }
            }
        }
        for key in ["additional_special_tokens", "extra_special_tokens"] {
            if let Some(Value::Array(list)) = obj.get(key) {
                for t in list.iter().filter_map(token_content) {
                    if !self.additional.contains(&t) {
                        self.additional.push(t);
                    }
                }
            }
        }
    }

    fn named(&self) -> impl Iterator<Item = &String> {
        [&self.bos, &self.eos, &self.unk, &self.pad]
            .into_iter()
            .flatten()
    }
}

/// A special token written either as `"<s>"` or as `{"content": "<s>", ...}`.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

fn as_object(v: Value, path: &Path) -> Result<Map<String, Value>> {
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(Error::format(
            path,
            "expected a JSON object at the top level",
        )),
    }
}

fn tokenizers_error(context: &str, e: impl std::fmt::Display) -> Error {
    Error::Other(format!("{context}: {e}"))
}

/// The GPT-2 byte-level pre-tokenizer and decoder, as transformers' GPT2Tokenizer sets them.
fn byte_level_pre_tokenizer(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn byte_level_decoder() -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true})
}

/// A byte-level BPE model (GPT-2 settings: no unk, no prefix/suffix, no byte fallback).
fn byte_level_bpe_model(vocab: Map<String, Value>, merges: Vec<Value>) -> Value {
    json!({
        "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
        "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
        "vocab": vocab, "merges": merges,
    })
}

/// A complete `tokenizer.json` document around the given parts.
fn tokenizer_document(
    model: Value,
    normalizer: Value,
    pre_tokenizer: Value,
    decoder: Value,
) -> Value {
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": null,
        "decoder": decoder, "model": model,
    })
}

fn tokenizer_from_value(doc: Value, origin: &Path) -> Result<Tokenizer> {
    serde_json::from_value(doc)
        .map_err(|e| Error::format(origin, format!("not a valid tokenizer definition: {e}")))
}

/// GPT-2/OPT `vocab.json` + `merges.txt`, built the way transformers' GPT2Tokenizer builds them.
fn byte_level_from_files(vocab_path: &Path, merges_path: &Path) -> Result<Tokenizer> {
    let vocab = as_object(read_json(vocab_path)?, vocab_path)?;
    if let Some((token, _)) = vocab
        .iter()
        .find(|(_, id)| id.as_u64().is_none_or(|i| i > u32::MAX as u64))
    {
        return Err(Error::format(
            vocab_path,
            format!("token {token:?} has no valid integer id"),
        ));
    }
    let bytes = read_file(merges_path)?;
    let text =
        String::from_utf8(bytes).map_err(|_| Error::format(merges_path, "not valid UTF-8"))?;
    let mut merges = Vec::new();
    for (lineno, line) in text.lines().enumerate() {
        // The first line of GPT-2's file is a `#version: 0.2` header.
        if (lineno == 0 && line.starts_with("#version")) || line.trim().is_empty() {
            continue;
        }
        let (a, b) = line.trim_end_matches('\r').split_once(' ').ok_or_else(|| {
            Error::format(
                merges_path,
                format!(
                    "line {}: expected two tokens separated by a space",
                    lineno + 1
                ),
            )
        })?;
        merges.push(json!([a, b]));
    }
    let doc = tokenizer_document(
        byte_level_bpe_model(vocab, merges),
        Value::Null,
        byte_level_pre_tokenizer(true),
        byte_level_decoder(),
    );
    tokenizer_from_value(doc, merges_path)
}

/// Read `generation_config.json` if present: (eos ids, bos id).
fn read_generation_config(dir: &Path) -> Result<(Vec<u32>, Option<u32>)> {
    let path = dir.join("generation_config.json");
    if !path.is_file() {
        return Ok((Vec::new(), None));
    }
    let cfg = as_object(read_json(&path)?, &path)?;
    let as_id = |v: &Value| v.as_u64().and_then(|i| u32::try_from(i).ok());
    let eos = match cfg.get("eos_token_id") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| {
                as_id(v).ok_or_else(|| {
                    Error::format(&path, format!("eos_token_id: {v} is not a token id"))
                })
            })
            .collect::<Result<_>>()?,
        Some(v) => vec![as_id(v)
            .ok_or_else(|| Error::format(&path, format!("eos_token_id: {v} is not a token id")))?],
    };
    let bos =
        match cfg.get("bos_token_id") {
            None | Some(Value::Null) => None,
            Some(v) => Some(as_id(v).ok_or_else(|| {
                Error::format(&path, format!("bos_token_id: {v} is not a token id"))
            })?),
        };
    Ok((eos, bos))
}

/// `chat_template.jinja` wins over `tokenizer_config.json`'s entry, as in transformers. A list of
/// named templates yields the one called `default`.
fn read_chat_template(
    dir: &Path,
    config: &Map<String, Value>,
    config_path: &Path,
) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let bytes = read_file(&jinja)?;
        return String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| Error::format(&jinja, "not valid UTF-8"));
    }
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let mut first = None;
            for entry in list {
                let name = entry.get("name").and_then(Value::as_str);
                let template = entry
                    .get("template")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        Error::format(
                            config_path,
                            "chat_template: list entries need a `template` string",
                        )
                    })?;
                if name == Some("default") {
                    return Ok(Some(template.to_owned()));
                }
                first.get_or_insert(template);
            }
            match first {
                None => Ok(None),
                Some(_) => Err(Error::format(
                    config_path,
                    "chat_template: several named templates and none is called `default`",
                )),
            }
        }
        Some(_) => Err(Error::format(
            config_path,
            "chat_template: expected a string or a list of {name, template}",
        )),
    }
}

/// Parse a `{"id": {"content": ..., "special": ...}}` map as tokenizers' added tokens.
fn added_tokens_decoder(config: &Map<String, Value>) -> Vec<AddedToken> {
    let Some(Value::Object(map)) = config.get("added_tokens_decoder") else {
        return Vec::new();
    };
    let mut entries: Vec<(u64, AddedToken)> = map
        .iter()
        .filter_map(|(id, v)| {
            let id = id.parse::<u64>().ok()?;
            let content = token_content(v)?;
            let flag =
                |k: &str, default: bool| v.get(k).and_then(Value::as_bool).unwrap_or(default);
            let special = flag("special", false);
            let token = AddedToken::from(content, special)
                .single_word(flag("single_word", false))
                .lstrip(flag("lstrip", false))
                .rstrip(flag("rstrip", false))
                .normalized(flag("normalized", !special));
            Some((id, token))
        })
        .collect();
    // Added in id order so tokens new to the vocabulary get the ids the file gives them.
    entries.sort_by_key(|(id, _)| *id);
    entries.into_iter().map(|(_, t)| t).collect()
}

impl AutoTokenizer {
    /// Load the tokenizer of a model folder, as `AutoTokenizer.from_pretrained(dir)` would.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            as_object(read_json(&config_path)?, &config_path)?
        } else {
            Map::new()
        };

        let tokenizer_json = dir.join("tokenizer.json");
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        let mut special = SpecialTokens::default();
        let (mut inner, source) = if tokenizer_json.is_file() {
            let doc = read_json(&tokenizer_json)?;
            (
                tokenizer_from_value(doc, &tokenizer_json)?,
                "tokenizer.json",
            )
        } else if vocab_path.is_file() && merges_path.is_file() {
            // GPT2Tokenizer's defaults; the config may override them.
            let eot = Some("<|endoftext|>".to_owned());
            special.bos = eot.clone();
            special.eos = eot.clone();
            special.unk = eot;
            (
                byte_level_from_files(&vocab_path, &merges_path)?,
                "vocab.json+merges.txt",
            )
        } else {
            return Err(Error::format(
                dir,
                "no tokenizer found: expected tokenizer.json, or vocab.json together with merges.txt",
            ));
        };
        // transformers sets padding and truncation per call (off by default), never from the file.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| tokenizers_error("disabling truncation", e))?;

        special.override_from(&config);
        // special_tokens_map.json is the legacy source: transformers only reads it when the config
        // does not carry `added_tokens_decoder`, and then it overrides the config.
        let map_path = dir.join("special_tokens_map.json");
        if !config.contains_key("added_tokens_decoder") && map_path.is_file() {
            special.override_from(&as_object(read_json(&map_path)?, &map_path)?);
        }

        inner.add_tokens(&added_tokens_decoder(&config));
        add_named_special_tokens(&mut inner, &special);

        // With a tokenizer.json, transformers drops add_bos_token/add_eos_token and keeps the file's
        // post-processor; otherwise the flags decide.
        if source != "tokenizer.json" {
            let flag = |k: &str| config.get(k).and_then(Value::as_bool).unwrap_or(false);
            set_template_post_processor(
                &mut inner,
                &special,
                flag("add_bos_token"),
                flag("add_eos_token"),
            )?;
        }

        let (generation_eos_ids, generation_bos_id) = read_generation_config(dir)?;
        let chat_template = read_chat_template(dir, &config, &config_path)?;
        // transformers writes 1e30 for "no limit"; only a real integer is worth keeping.
        let model_max_length = config.get("model_max_length").and_then(Value::as_u64);
        Ok(AutoTokenizer {
            inner,
            source: source.to_owned(),
            special,
            chat_template,
            generation_eos_ids,
            generation_bos_id,
            model_max_length,
        })
    }

    /// A model folder ([`AutoTokenizer::from_dir`]) or a `.gguf` file
    /// ([`AutoTokenizer::from_gguf_file`]).
    pub fn from_path(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Self::from_dir(path)
        } else if path.is_file() {
            Self::from_gguf_file(path)
        } else {
            Err(Error::io(
                path,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ))
        }
    }

    /// The tokenizer embedded in a GGUF file (see [`AutoTokenizer::from_gguf_metadata`]).
    pub fn from_gguf_file(path: &Path) -> Result<Self> {
        Self::from_gguf_file_with(path, GgufPreTokenizerFlavor::Reference)
    }

    pub fn from_gguf_file_with(path: &Path, flavor: GgufPreTokenizerFlavor) -> Result<Self> {
        let file = crate::formats::gguf::GgufFile::open(path)?;
        Self::from_gguf_metadata_with(file.metadata(), flavor).map_err(|e| match e {
            // Name the real file instead of the in-memory placeholder.
            Error::Format { path: p, msg } if p == gguf_origin() => Error::format(path, msg),
            Error::Unsupported(msg) => Error::Unsupported(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Build the tokenizer embedded in a GGUF file's metadata, matching llama.cpp and the
    /// original Hugging Face tokenizer (see [`GgufPreTokenizerFlavor::Reference`]).
    pub fn from_gguf_metadata(md: &crate::formats::gguf::Metadata) -> Result<Self> {
        Self::from_gguf_metadata_with(md, GgufPreTokenizerFlavor::Reference)
    }

    /// Like [`AutoTokenizer::from_gguf_metadata`], choosing how the pre-tokenizer is picked.
    pub fn from_gguf_metadata_with(
        md: &crate::formats::gguf::Metadata,
        flavor: GgufPreTokenizerFlavor,
    ) -> Result<Self> {
        let built = gguf::build(md, flavor)?;
        let mut inner = built.tokenizer;
        add_named_special_tokens(&mut inner, &built.special);
        set_template_post_processor(&mut inner, &built.special, built.add_bos, built.add_eos)?;
        Ok(AutoTokenizer {
            inner,
            source: built.source,
            special: built.special,
            chat_template: built.chat_template,
            generation_eos_ids: Vec::new(),
            generation_bos_id: None,
            model_max_length: built.context_length,
        })
    }

    /// Token ids of `text`; with `add_special_tokens`, BOS/EOS are added as the tokenizer's
    /// post-processor says (from `add_bos_token`/`add_eos_token` or `tokenizer.json`).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| tokenizers_error("encoding", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// [`AutoTokenizer::encode`] for several texts (in parallel), no padding.
    pub fn encode_batch(&self, texts: &[&str], add_special_tokens: bool) -> Result<Vec<Vec<u32>>> {
        let encs = self
            .inner
            .encode_batch_fast(texts.to_vec(), add_special_tokens)
            .map_err(|e| tokenizers_error("encoding", e))?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Text of `ids`; an id outside the vocabulary is an error rather than silently dropped.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        if let Some(bad) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} is not in the vocabulary ({} tokens)",
                self.vocab_size()
            )));
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| tokenizers_error("decoding", e))
    }

    /// A decoder that turns generated ids into text piece by piece (see [`StreamDecoder`]).
    pub fn stream_decoder(&self, skip_special_tokens: bool) -> StreamDecoder<'_> {
        StreamDecoder::new(self, skip_special_tokens)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of tokens including added ones (`len(tokenizer)` in transformers).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.special.bos.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.special.eos.as_deref()
    }

    pub fn pad_token(&self) -> Option<&str> {
        self.special.pad.as_deref()
    }

    pub fn unk_token(&self) -> Option<&str> {
        self.special.unk.as_deref()
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// The tokenizer's BOS id, else `generation_config.json`'s.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.special
            .bos
            .as_deref()
            .and_then(|t| self.token_to_id(t))
            .or(self.generation_bos_id)
    }

    /// Ids that end generation: `generation_config.json`'s `eos_token_id` (int or list) when
    /// given, else the tokenizer's EOS.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        if !self.generation_eos_ids.is_empty() {
            return self.generation_eos_ids.clone();
        }
        self.special
            .eos
            .as_deref()
            .and_then(|t| self.token_to_id(t))
            .into_iter()
            .collect()
    }

    pub fn pad_token_id(&self) -> Option<u32> {
        self.special
            .pad
            .as_deref()
            .and_then(|t| self.token_to_id(t))
    }

    pub fn unk_token_id(&self) -> Option<u32> {
        self.special
            .unk
            .as_deref()
            .and_then(|t| self.token_to_id(t))
    }

    /// Whether encoding with special tokens puts BOS first (what the post-processor really does).
    pub fn adds_bos(&self) -> bool {
        match (self.bos_token_id(), self.encode("", true)) {
            (Some(bos), Ok(ids)) => ids.first() == Some(&bos),
            _ => false,
        }
    }

    /// Whether encoding with special tokens puts EOS last.
    pub fn adds_eos(&self) -> bool {
        let eos = self
            .special
            .eos
            .as_deref()
            .and_then(|t| self.token_to_id(t));
        match (eos, self.encode("", true)) {
            (Some(eos), Ok(ids)) => ids.last() == Some(&eos),
            _ => false,
        }
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .id_to_token(id)
            .is_some_and(|t| self.inner.get_added_vocabulary().is_special_token(&t))
    }

    /// Ids of all special tokens, ascending.
    pub fn special_token_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        ids.sort_unstable();
        ids
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    pub fn model_max_length(&self) -> Option<u64> {
        self.model_max_length
    }

    /// One line for logs and JSON reports, e.g. `gguf:gpt2/smollm 49152 tokens`.
    pub fn describe(&self) -> String {
        format!("{} {} tokens", self.source, self.vocab_size())
    }

    /// The underlying `tokenizers` object.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Render a conversation with the model's chat template, as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "this tokenizer ({}) has no chat template; chat mode needs one",
                self.source
            ))
        })?;
        chat::render(template, messages, add_generation_prompt, &self.special)
    }

    /// Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` into `dir`
    /// (created if needed), so that both this type and transformers reload the same ids.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tokenizer_json = self
            .inner
            .to_string(true)
            .map_err(|e| tokenizers_error("serializing tokenizer.json", e))?;
        crate::fsutil::write_atomic(&dir.join("tokenizer.json"), tokenizer_json.as_bytes())?;

        let mut map = Map::new();
        let named = [
            ("bos_token", &self.special.bos),
            ("eos_token", &self.special.eos),
            ("unk_token", &self.special.unk),
            ("pad_token", &self.special.pad),
        ];
        for (key, value) in named {
            if let Some(v) = value {
                map.insert(key.to_owned(), json!(v));
            }
        }
        if !self.special.additional.is_empty() {
            map.insert(
                "additional_special_tokens".into(),
                json!(self.special.additional),
            );
        }

        let mut config = Map::new();
        config.insert("add_bos_token".into(), json!(self.adds_bos()));
        config.insert("add_eos_token".into(), json!(self.adds_eos()));
        let mut decoder: Vec<(u32, AddedToken)> =
            self.inner.get_added_tokens_decoder().into_iter().collect();
        decoder.sort_by_key(|(id, _)| *id);
        let decoder: Map<String, Value> = decoder
            .into_iter()
            .map(|(id, t)| {
                let entry = json!({
                    "content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                    "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special,
                });
                (id.to_string(), entry)
            })
            .collect();
        config.insert("added_tokens_decoder".into(), Value::Object(decoder));
        for (k, v) in &map {
            config.insert(k.clone(), v.clone());
        }
        if let Some(t) = &self.chat_template {
            config.insert("chat_template".into(), json!(t));
        }
        config.insert("clean_up_tokenization_spaces".into(), json!(false));
        if let Some(n) = self.model_max_length {
            config.insert("model_max_length".into(), json!(n));
        }
        // The generic class: a model-specific one (GPT2Tokenizer, LlamaTokenizer) would rebuild
        // the pipeline from its own defaults instead of using tokenizer.json as written.
        config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));

        let pretty = |v: &Map<String, Value>| {
            serde_json::to_vec_pretty(v).map_err(|e| Error::Other(e.to_string()))
        };
        crate::fsutil::write_atomic(&dir.join("tokenizer_config.json"), &pretty(&config)?)?;
        crate::fsutil::write_atomic(&dir.join("special_tokens_map.json"), &pretty(&map)?)?;
        Ok(())
    }
}

/// transformers adds every named special token to the backend as a special, un-normalized added
/// token (a no-op for tokens already added); this makes them match whole in text.
fn add_named_special_tokens(inner: &mut Tokenizer, special: &SpecialTokens) {
    let tokens: Vec<AddedToken> = special
        .named()
        .chain(special.additional.iter())
        .map(|t| AddedToken::from(t.clone(), true).normalized(false))
        .collect();
    inner.add_special_tokens(&tokens);
}

/// A TemplateProcessing post-processor adding BOS and/or EOS, as transformers'
/// `update_post_processor` builds from `add_bos_token` / `add_eos_token`.
fn set_template_post_processor(
    inner: &mut Tokenizer,
    special: &SpecialTokens,
    add_bos: bool,
    add_eos: bool,
) -> Result<()> {
    let lookup = |t: &Option<String>| {
        t.as_ref()
            .and_then(|s| inner.token_to_id(s).map(|id| (s.clone(), id)))
    };
    // A flag without its token is dropped, as transformers does.
    let bos = if add_bos { lookup(&special.bos) } else { None };
    let eos = if add_eos { lookup(&special.eos) } else { None };
    let piece_special =
        |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let piece_seq = |s: &str, type_id: u32| json!({"Sequence": {"id": s, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (seq, type_id) in [("A", 0u32), ("B", 1u32)] {
        let mut part = Vec::new();
        if let Some((t, _)) = &bos {
            part.push(piece_special(t, type_id));
        }
        part.push(piece_seq(seq, type_id));
        if let Some((t, _)) = &eos {
            part.push(piece_special(t, type_id));
        }
        if seq == "A" {
            single = part.clone();
        }
        pair.extend(part);
    }
    let mut specials = Map::new();
    for (t, id) in bos.iter().chain(eos.iter()) {
        specials.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    let doc = json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials});
    let processor: tokenizers::PostProcessorWrapper = serde_json::from_value(doc)
        .map_err(|e| tokenizers_error("building the BOS/EOS post-processor", e))?;
    inner.with_post_processor(Some(processor));
    Ok(())
}

/// For error messages when a GGUF is parsed from memory rather than a named file.
pub(crate) fn gguf_origin() -> PathBuf {
    PathBuf::from("GGUF metadata")
}
