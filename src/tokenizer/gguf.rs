//! The tokenizer a GGUF file describes in its `tokenizer.*` metadata, rebuilt as a
//! `tokenizer.json` document.
//!
//! `tokenizer.ggml.model = gpt2` is a byte-level BPE: tokens, merges, token types, and a
//! pre-tokenizer named by `tokenizer.ggml.pre`. `llama` is SentencePiece-style BPE (Metaspace,
//! byte fallback), whose merges are recovered from the token scores when the file has none.

use super::{byte_level_bpe_model, byte_level_decoder, byte_level_pre_tokenizer, gguf_origin};
use super::{tokenizer_document, tokenizer_from_value, SpecialTokens};
use crate::error::{Error, Result};
use crate::formats::gguf::{GgufValue, Metadata};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use tokenizers::{AddedToken, Tokenizer};

/// How to choose the pre-tokenizer of a `gpt2` GGUF vocabulary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GgufPreTokenizerFlavor {
    /// What llama.cpp runs for `tokenizer.ggml.pre`, which is also the model's original Hugging
    /// Face `tokenizer.json` (e.g. SmolLM2: every digit split off, then GPT-2 byte-level).
    #[default]
    Reference,
    /// What transformers' GGUF loader builds. It has no rule for some pre-tokenizers (`smollm`,
    /// `default`, `gpt2`) and uses plain GPT-2 byte-level splitting for them, which differs from
    /// `Reference` on whitespace runs before digits (`"x  1"`). Useful to reproduce numbers
    /// measured with transformers on a GGUF file.
    Transformers,
}

/// Token types of `tokenizer.ggml.token_type`.
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

const GPT2_PRE: &[&str] = &["default", "gpt2"];
const SMOLLM_PRE: &[&str] = &["smollm"];
const LLAMA3_PRE: &[&str] = &["llama-bpe", "llama3", "llama-v3"];
const QWEN2_PRE: &[&str] = &["qwen2", "deepseek-r1-qwen"];

const LLAMA3_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const QWEN2_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// Everything the GGUF says about its tokenizer, ready for [`super::AutoTokenizer`].
pub(super) struct Built {
    pub tokenizer: Tokenizer,
    pub special: SpecialTokens,
    pub add_bos: bool,
    pub add_eos: bool,
    pub chat_template: Option<String>,
    pub source: String,
    pub context_length: Option<u64>,
}

fn err(msg: impl Into<String>) -> Error {
    Error::format(gguf_origin(), msg)
}

fn get_str<'a>(md: &'a Metadata, key: &str) -> Result<Option<&'a str>> {
    match md.get(key) {
        None => Ok(None),
        Some(GgufValue::String(s)) => Ok(Some(s)),
        Some(other) => Err(err(format!(
            "`{key}` should be a string, found {}",
            kind(other)
        ))),
    }
}

fn as_int(v: &GgufValue) -> Option<i64> {
    Some(match *v {
        GgufValue::U8(x) => x as i64,
        GgufValue::I8(x) => x as i64,
        GgufValue::U16(x) => x as i64,
        GgufValue::I16(x) => x as i64,
        GgufValue::U32(x) => x as i64,
        GgufValue::I32(x) => x as i64,
        GgufValue::U64(x) => i64::try_from(x).ok()?,
        GgufValue::I64(x) => x,
        _ => return None,
    })
}

fn kind(v: &GgufValue) -> &'static str {
    match v {
        GgufValue::String(_) => "a string",
        GgufValue::Array(_) => "an array",
        GgufValue::Bool(_) => "a bool",
        GgufValue::F32(_) | GgufValue::F64(_) => "a float",
        _ => "an integer",
    }
}

fn get_int(md: &Metadata, key: &str) -> Result<Option<i64>> {
    match md.get(key) {
        None => Ok(None),
        // The only integer `as_int` refuses: a u64 past i64::MAX.
        Some(GgufValue::U64(n)) if as_int(&GgufValue::U64(*n)).is_none() => Err(err(format!(
            "`{key}` is out of range: {n} (at most {})",
            i64::MAX
        ))),
        Some(v) => as_int(v)
            .map(Some)
            .ok_or_else(|| err(format!("`{key}` should be an integer, found {}", kind(v)))),
    }
}

fn get_bool(md: &Metadata, key: &str) -> Result<Option<bool>> {
    match md.get(key) {
        None => Ok(None),
        Some(GgufValue::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(err(format!(
            "`{key}` should be a bool, found {}",
            kind(other)
        ))),
    }
}

fn get_array<'a>(md: &'a Metadata, key: &str) -> Result<Option<&'a [GgufValue]>> {
    match md.get(key) {
        None => Ok(None),
        Some(GgufValue::Array(a)) => Ok(Some(a)),
        Some(other) => Err(err(format!(
            "`{key}` should be an array, found {}",
            kind(other)
        ))),
    }
}

fn get_strings<'a>(md: &'a Metadata, key: &str) -> Result<Option<Vec<&'a str>>> {
    let Some(items) = get_array(md, key)? else {
        return Ok(None);
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            GgufValue::String(s) => Ok(s.as_str()),
            other => Err(err(format!(
                "`{key}`[{i}] should be a string, found {}",
                kind(other)
            ))),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn get_ints(md: &Metadata, key: &str) -> Result<Option<Vec<i64>>> {
    let Some(items) = get_array(md, key)? else {
        return Ok(None);
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            as_int(v).ok_or_else(|| {
                err(format!(
                    "`{key}`[{i}] should be an integer, found {}",
                    kind(v)
                ))
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn get_floats(md: &Metadata, key: &str) -> Result<Option<Vec<f64>>> {
    let Some(items) = get_array(md, key)? else {
        return Ok(None);
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match *v {
            GgufValue::F32(x) => Ok(x as f64),
            GgufValue::F64(x) => Ok(x),
            ref other => as_int(other).map(|x| x as f64).ok_or_else(|| {
                err(format!(
                    "`{key}`[{i}] should be a number, found {}",
                    kind(other)
                ))
            }),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// The parts common to every GGUF tokenizer type.
struct Common<'a> {
    tokens: Vec<&'a str>,
    token_types: Vec<i64>,
    special: SpecialTokens,
    add_bos: Option<bool>,
    add_eos: bool,
    chat_template: Option<String>,
    context_length: Option<u64>,
}

fn read_common(md: &Metadata) -> Result<Common<'_>> {
    let tokens = get_strings(md, "tokenizer.ggml.tokens")?
        .ok_or_else(|| err("`tokenizer.ggml.tokens` is missing: the file carries no vocabulary"))?;
    let token_types = get_ints(md, "tokenizer.ggml.token_type")?.unwrap_or_default();
    if !token_types.is_empty() && token_types.len() != tokens.len() {
        return Err(err(format!(
            "`tokenizer.ggml.token_type` has {} entries but there are {} tokens",
            token_types.len(),
            tokens.len()
        )));
    }
    let named = |key: &str| -> Result<Option<String>> {
        let Some(id) = get_int(md, key)? else {
            return Ok(None);
        };
        let token = usize::try_from(id)
            .ok()
            .and_then(|i| tokens.get(i))
            .ok_or_else(|| {
                err(format!(
                    "`{key}` = {id} is outside the vocabulary ({} tokens)",
                    tokens.len()
                ))
            })?;
        Ok(Some((*token).to_owned()))
    };
    let special = SpecialTokens {
        bos: named("tokenizer.ggml.bos_token_id")?,
        eos: named("tokenizer.ggml.eos_token_id")?,
        unk: named("tokenizer.ggml.unknown_token_id")?,
        pad: named("tokenizer.ggml.padding_token_id")?,
        additional: Vec::new(),
    };
    let context_length = match get_str(md, "general.architecture")? {
        Some(arch) => {
            get_int(md, &format!("{arch}.context_length"))?.and_then(|n| u64::try_from(n).ok())
        }
        None => None,
    };
    Ok(Common {
        tokens,
        token_types,
        special,
        add_bos: get_bool(md, "tokenizer.ggml.add_bos_token")?,
        add_eos: get_bool(md, "tokenizer.ggml.add_eos_token")?.unwrap_or(false),
        chat_template: get_str(md, "tokenizer.chat_template")?.map(str::to_owned),
        context_length,
    })
}

pub(super) fn build(md: &Metadata, flavor: GgufPreTokenizerFlavor) -> Result<Built> {
    let model = get_str(md, "tokenizer.ggml.model")?
        .ok_or_else(|| err("`tokenizer.ggml.model` is missing: the file carries no tokenizer"))?;
    match model {
        "gpt2" => build_byte_level(md, flavor),
        "llama" => build_sentencepiece(md, flavor),
        other => Err(Error::Unsupported(format!(
            "GGUF tokenizer model `{other}` is not supported; supported: gpt2 (byte-level BPE), llama (SentencePiece BPE)"
        ))),
    }
}

/// GPT-2's map from bytes to printable characters: printable Latin-1 bytes stand for themselves,
/// the others are shifted to 256 and up, in byte order.
pub(crate) fn byte_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            b as char
        } else {
            let c = char::from_u32(256 + shifted).unwrap_or('\u{FFFD}');
            shifted += 1;
            c
        };
    }
    table
}

fn split_regex(pattern: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

fn supported_pre() -> String {
    [GPT2_PRE, SMOLLM_PRE, LLAMA3_PRE, QWEN2_PRE]
        .concat()
        .join(", ")
}

/// The pre-tokenizer for a `tokenizer.ggml.pre` value.
fn pre_tokenizer_for(pre: &str, flavor: GgufPreTokenizerFlavor) -> Result<Value> {
    let split_then_bytes = |pattern: &str, use_regex: bool| json!({"type": "Sequence", "pretokenizers": [split_regex(pattern), byte_level_pre_tokenizer(use_regex)]});
    if GPT2_PRE.contains(&pre) {
        Ok(byte_level_pre_tokenizer(true))
    } else if SMOLLM_PRE.contains(&pre) {
        Ok(match flavor {
            GgufPreTokenizerFlavor::Reference => split_then_bytes(r"\p{N}", true),
            GgufPreTokenizerFlavor::Transformers => byte_level_pre_tokenizer(true),
        })
    } else if LLAMA3_PRE.contains(&pre) {
        Ok(split_then_bytes(LLAMA3_SPLIT, false))
    } else if QWEN2_PRE.contains(&pre) {
        Ok(split_then_bytes(QWEN2_SPLIT, false))
    } else {
        Err(Error::Unsupported(format!(
            "GGUF pre-tokenizer `tokenizer.ggml.pre = {pre}` is not supported; supported: {}",
            supported_pre()
        )))
    }
}

fn merges_from_metadata(md: &Metadata) -> Result<Option<Vec<Value>>> {
    let Some(merges) = get_strings(md, "tokenizer.ggml.merges")? else {
        return Ok(None);
    };
    merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| json!([a, b]))
                .ok_or_else(|| err(format!("`tokenizer.ggml.merges`[{i}] = {m:?} is not two tokens separated by a space")))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn build_byte_level(md: &Metadata, flavor: GgufPreTokenizerFlavor) -> Result<Built> {
    let common = read_common(md)?;
    let pre = get_str(md, "tokenizer.ggml.pre")?.unwrap_or("default");
    let pre_tokenizer = pre_tokenizer_for(pre, flavor)?;

    let spelling = byte_to_unicode();
    let alphabet: std::collections::HashSet<char> = spelling.iter().copied().collect();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    // Tokens are normally already written in the byte alphabet; any that are not (a raw space,
    // say) are respelled from their UTF-8 bytes, so the BPE model can reach them.
    let mut vocab = Map::new();
    for (id, token) in common.tokens.iter().enumerate() {
        let key = if in_alphabet(token) {
            (*token).to_owned()
        } else {
            token.bytes().map(|b| spelling[b as usize]).collect()
        };
        vocab.insert(key, json!(id));
    }
    let merges = merges_from_metadata(md)?
        .ok_or_else(|| err("`tokenizer.ggml.merges` is missing; a gpt2 (byte-level BPE) vocabulary needs its merges"))?;

    let doc = tokenizer_document(
        byte_level_bpe_model(vocab, merges),
        Value::Null,
        pre_tokenizer,
        byte_level_decoder(),
    );
    let mut tokenizer = tokenizer_from_value(doc, &gguf_origin())?;

    // A control token outside the byte alphabet is a converter mislabel; adding it would grow the
    // vocabulary past the model's embedding, so it is left out (as transformers does).
    let control: Vec<AddedToken> = typed_tokens(&common, TOKEN_TYPE_CONTROL)
        .filter(|t| in_alphabet(t))
        .map(|t| AddedToken::from(t, true).normalized(false))
        .collect();
    tokenizer.add_special_tokens(&control);
    let user_defined: Vec<AddedToken> = typed_tokens(&common, TOKEN_TYPE_USER_DEFINED)
        .filter(|t| tokenizer.get_vocab(false).contains_key(*t))
        .map(|t| AddedToken::from(t, false).normalized(false))
        .collect();
    tokenizer.add_tokens(&user_defined);

    Ok(Built {
        tokenizer,
        special: common.special,
        add_bos: common.add_bos.unwrap_or(false),
        add_eos: common.add_eos,
        chat_template: common.chat_template,
        source: format!("gguf:gpt2/{pre}"),
        context_length: common.context_length,
    })
}

fn typed_tokens<'c, 'a>(common: &'c Common<'a>, wanted: i64) -> impl Iterator<Item = &'a str> + 'c {
    common
        .tokens
        .iter()
        .zip(common.token_types.iter())
        .filter(move |(_, &ty)| ty == wanted)
        .map(|(t, _)| *t)
}

/// Merges implied by a SentencePiece vocabulary: every split of a token into two tokens that are
/// both in the vocabulary, ranked by the merged token's score (best first), ties broken by the
/// longer left piece, then the longer right piece, then vocabulary order.
fn merges_from_scores(tokens: &[&str], scores: &[f64]) -> Vec<Value> {
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        index.insert(t, i); // a repeated token keeps its last id
    }
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    let mut score_of: HashMap<&str, f64> = HashMap::with_capacity(tokens.len());
    for (t, &s) in tokens.iter().zip(scores) {
        if score_of.insert(t, s).is_none() {
            order.push(t);
        }
    }
    let mut merges: Vec<(&str, &str, f64, usize, usize)> = Vec::new();
    for token in order {
        let score = score_of[token];
        let mut local: Vec<(&str, &str, f64, usize, usize)> = token
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = token.split_at(at);
                (index.contains_key(l) && index.contains_key(r))
                    .then(|| (l, r, score, l.chars().count(), r.chars().count()))
            })
            .collect();
        local.sort_by_key(|(l, r, ..)| (index[l], index[r]));
        merges.extend(local);
    }
    // Stable sort, descending key: equal keys keep their order, as Python's sorted(reverse=True).
    merges.sort_by(|a, b| {
        b.2.partial_cmp(&a.2)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(b.3.cmp(&a.3))
            .then(b.4.cmp(&a.4))
    });
    merges.into_iter().map(|(l, r, ..)| json!([l, r])).collect()
}

fn build_sentencepiece(md: &Metadata, flavor: GgufPreTokenizerFlavor) -> Result<Built> {
    let common = read_common(md)?;
    let mut vocab = Map::new();
    for (id, token) in common.tokens.iter().enumerate() {
        vocab.insert((*token).to_owned(), json!(id));
    }
    let merges = match merges_from_metadata(md)? {
        Some(m) => m,
        None => {
            let scores = get_floats(md, "tokenizer.ggml.scores")?.ok_or_else(|| {
                err("`tokenizer.ggml.scores` is missing; a llama (SentencePiece) vocabulary without merges needs its scores")
            })?;
            if scores.len() != common.tokens.len() {
                return Err(err(format!(
                    "`tokenizer.ggml.scores` has {} entries but there are {} tokens",
                    scores.len(),
                    common.tokens.len()
                )));
            }
            merges_from_scores(&common.tokens, &scores)
        }
    };
    // transformers always prepends "▁" to the first word; llama.cpp follows the file's flag.
    let add_prefix_space = match flavor {
        GgufPreTokenizerFlavor::Transformers => true,
        GgufPreTokenizerFlavor::Reference => {
            get_bool(md, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true)
        }
    };
    let pre_tokenizer = json!({
        "type": "Metaspace", "replacement": "\u{2581}",
        "prepend_scheme": if add_prefix_space { "first" } else { "never" }, "split": false,
    });
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_prefix_space {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let model = json!({
        "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
        "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
        "vocab": vocab, "merges": merges,
    });
    let doc = tokenizer_document(
        model,
        Value::Null,
        pre_tokenizer,
        json!({"type": "Sequence", "decoders": decoders}),
    );
    let mut tokenizer = tokenizer_from_value(doc, &gguf_origin())?;

    let control: Vec<AddedToken> = typed_tokens(&common, TOKEN_TYPE_CONTROL)
        .map(|t| AddedToken::from(t, true).normalized(false))
        .collect();
    tokenizer.add_special_tokens(&control);
    let user_defined: Vec<AddedToken> = typed_tokens(&common, TOKEN_TYPE_USER_DEFINED)
        .map(|t| AddedToken::from(t, false).normalized(false))
        .collect();
    tokenizer.add_tokens(&user_defined);

    Ok(Built {
        tokenizer,
        special: common.special,
        // llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
        add_bos: common.add_bos.unwrap_or(true),
        add_eos: common.add_eos,
        chat_template: common.chat_template,
        source: "gguf:llama".to_owned(),
        context_length: common.context_length,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_a_bijection_with_gpt2_fixed_points() {
        let t = byte_to_unicode();
        let distinct: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], '\u{120}'); // "Ġ"
        assert_eq!(t[b'\n' as usize], '\u{10A}'); // "Ċ"
        assert_eq!(t[0], '\u{100}');
    }

    #[test]
    fn merges_from_scores_ranks_by_score_then_piece_length() {
        // "ab" (score -1) beats "abc" (score -2); "abc" can split as a+bc or ab+c: the longer
        // left piece ("ab") ranks first.
        let tokens = ["a", "b", "c", "ab", "bc", "abc"];
        let scores = [0.0, 0.0, 0.0, -1.0, -1.5, -2.0];
        let m = merges_from_scores(&tokens, &scores);
        let pairs: Vec<(String, String)> = m
            .iter()
            .map(|v| {
                (
                    v[0].as_str().unwrap_or("").to_owned(),
                    v[1].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        let expect = [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")];
        let expect: Vec<(String, String)> = expect
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(pairs, expect);
    }
}
