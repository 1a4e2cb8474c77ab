//! AutoTokenizer against golden data from scripts/golden/make_tokenizer_golden.py (transformers):
//! GPT-2 vocab.json + merges.txt, the SmolLM2 GGUF tokenizer, and small synthetic GGUF
//! tokenizers (byte-level BPE with several pre-tokenizers, SentencePiece with byte fallback).
//! Tests that need the big assets (scripts/fetch_assets.sh) skip without them, and fail instead
//! under scripts/test.sh (AUTOQUANT_REQUIRE_ASSETS=1).

mod common;

use autoquant::formats::gguf::{GgufValue, Metadata};
use autoquant::tokenizer::{AutoTokenizer, ChatMessage, GgufPreTokenizerFlavor};
use autoquant::Error;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizer")
        .join(name);
    serde_json::from_slice(&std::fs::read(&path).expect("fixture readable"))
        .expect("fixture is JSON")
}

fn smollm2_gguf() -> Option<PathBuf> {
    common::asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn gpt2_dir() -> Option<PathBuf> {
    common::asset("gpt2/vocab.json")?;
    Some(common::asset("gpt2/merges.txt")?.parent()?.to_path_buf())
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|s| s.as_str().expect("string").to_owned())
        .collect()
}

fn id_lists(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|ids| {
            ids.as_array()
                .expect("array")
                .iter()
                .map(|i| i.as_u64().expect("id") as u32)
                .collect()
        })
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|i| i.as_u64().expect("id") as u32)
        .collect()
}

/// Compare encodings text by text, reporting the first differing text.
fn assert_encodes(
    tok: &AutoTokenizer,
    texts: &[String],
    expected: &[Vec<u32>],
    add_special: bool,
    what: &str,
) {
    assert_eq!(texts.len(), expected.len());
    for (text, want) in texts.iter().zip(expected) {
        let got = tok.encode(text, add_special).expect("encode");
        assert_eq!(&got, want, "{what}: ids differ for {text:?}");
    }
}

fn assert_decodes(tok: &AutoTokenizer, expected_ids: &[Vec<u32>], decoded: &Value, what: &str) {
    for (ids, d) in expected_ids.iter().zip(decoded.as_array().expect("array")) {
        assert_eq!(
            tok.decode(ids, true).expect("decode"),
            d["skip"].as_str().expect("skip"),
            "{what}: skip {ids:?}"
        );
        assert_eq!(
            tok.decode(ids, false).expect("decode"),
            d["keep"].as_str().expect("keep"),
            "{what}: keep {ids:?}"
        );
    }
}

/// Streaming must reproduce the full decode, never emitting U+FFFD the full text lacks.
fn assert_streams(tok: &AutoTokenizer, all_ids: &[Vec<u32>]) {
    for ids in all_ids {
        for skip in [false, true] {
            let mut stream = tok.stream_decoder(skip);
            let mut text = String::new();
            for &id in ids {
                if let Some(piece) = stream.push(id).expect("push") {
                    text.push_str(&piece);
                }
            }
            if let Some(rest) = stream.finish().expect("finish") {
                text.push_str(&rest);
            }
            let full = tok.decode(ids, skip).expect("decode");
            assert_eq!(text, full, "streamed text differs for {ids:?}");
        }
    }
}

fn chat_messages(v: &Value) -> Vec<ChatMessage> {
    v.as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            ChatMessage::new(
                m["role"].as_str().expect("role"),
                m["content"].as_str().expect("content"),
            )
        })
        .collect()
}

/// Metadata of a synthetic case; `@key` values name arrays shared in the fixture.
fn synthetic_metadata(case: &Value, arrays: &Value) -> Metadata {
    let mut md = Metadata::new();
    let model = case["metadata"]
        .as_array()
        .expect("metadata")
        .iter()
        .find(|e| e[0] == "tokenizer.ggml.model")
        .and_then(|e| e[2].as_str())
        .expect("model")
        .to_owned();
    for entry in case["metadata"].as_array().expect("metadata") {
        let (key, ty) = (
            entry[0].as_str().expect("key"),
            entry[1].as_str().expect("type"),
        );
        let value = match entry[2].as_str() {
            Some(name) if name.starts_with('@') => &arrays[&model][&name[1..]],
            _ => &entry[2],
        };
        let list = || value.as_array().expect("array").iter();
        let v = match ty {
            "str" => GgufValue::String(value.as_str().expect("str").to_owned()),
            "u32" => GgufValue::U32(value.as_u64().expect("u32") as u32),
            "bool" => GgufValue::Bool(value.as_bool().expect("bool")),
            "str[]" => GgufValue::Array(
                list()
                    .map(|s| GgufValue::String(s.as_str().expect("s").to_owned()))
                    .collect(),
            ),
            "i32[]" => GgufValue::Array(
                list()
                    .map(|i| GgufValue::I32(i.as_i64().expect("i") as i32))
                    .collect(),
            ),
            "f32[]" => GgufValue::Array(
                list()
                    .map(|f| GgufValue::F32(f.as_f64().expect("f") as f32))
                    .collect(),
            ),
            other => panic!("fixture type {other}"),
        };
        md.insert(key.to_owned(), v);
    }
    md
}

fn check_synthetic_case(tok: &AutoTokenizer, case: &Value, what: &str) {
    let texts = strings(&case["texts"]);
    let with_special = id_lists(&case["ids"]);
    assert_encodes(tok, &texts, &with_special, true, what);
    assert_encodes(tok, &texts, &id_lists(&case["ids_no_special"]), false, what);
    assert_decodes(tok, &with_special, &case["decoded"], what);
    assert_eq!(
        tok.vocab_size() as u64,
        case["vocab_size"].as_u64().expect("vocab_size"),
        "{what}"
    );
    assert_eq!(tok.special_token_ids(), ids(&case["special_ids"]), "{what}");
    assert_streams(tok, &with_special);
}

#[test]
fn synthetic_gguf_tokenizers_match_transformers() {
    let golden = fixture("synthetic.json");
    let cases = golden["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 4);
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let md = synthetic_metadata(case, &golden["arrays"]);
        // For these pre-tokenizers the reference and transformers flavors coincide.
        for flavor in [
            GgufPreTokenizerFlavor::Reference,
            GgufPreTokenizerFlavor::Transformers,
        ] {
            let tok = AutoTokenizer::from_gguf_metadata_with(&md, flavor).expect(name);
            check_synthetic_case(&tok, case, &format!("{name} {flavor:?}"));
        }
        let tok = AutoTokenizer::from_gguf_metadata(&md).expect(name);
        assert_eq!(
            tok.model_max_length(),
            Some(256),
            "{name}: llama.context_length"
        );
        assert_eq!(tok.bos_token_id(), Some(1));
        assert_eq!(tok.eos_token_ids(), vec![2]);

        // A saved folder reloads through the tokenizer.json path with the same behaviour.
        // AUTOQUANT_TOKENIZER_SAVE_DIR keeps the folders for `make_tokenizer_golden.py
        // --check-saved-synthetic DIR` (transformers reloading them).
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = match std::env::var_os("AUTOQUANT_TOKENIZER_SAVE_DIR") {
            Some(d) => PathBuf::from(d).join(name),
            None => tmp.path().to_path_buf(),
        };
        tok.save(&dir).expect("save");
        let reloaded = AutoTokenizer::from_dir(&dir).expect("reload");
        check_synthetic_case(&reloaded, case, &format!("{name} saved+reloaded"));
        assert_eq!(reloaded.bos_token(), tok.bos_token());
        assert_eq!(reloaded.eos_token(), tok.eos_token());
        assert_eq!(reloaded.chat_template(), tok.chat_template());
        assert_eq!(reloaded.model_max_length(), Some(256));
    }
}

#[test]
fn synthetic_llama_case_adds_bos_and_falls_back_to_bytes() {
    let golden = fixture("synthetic.json");
    let case = golden["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .find(|c| c["name"] == "llama-sentencepiece")
        .expect("llama case");
    let tok = AutoTokenizer::from_gguf_metadata(&synthetic_metadata(case, &golden["arrays"]))
        .expect("llama");
    assert!(
        tok.adds_bos(),
        "a SentencePiece GGUF without add_bos_token adds BOS"
    );
    assert!(!tok.adds_eos());
    assert_eq!(
        tok.describe(),
        format!("gguf:llama {} tokens", case["vocab_size"])
    );
    // CJK is not in the tiny vocabulary: byte-fallback tokens <0xE4> ... round-trip the text.
    let text = "你好";
    let ids = tok.encode(text, false).expect("encode");
    // "▁" (prepended to the first word), then two 3-byte characters as six byte tokens.
    assert_eq!(ids.len(), 7, "{ids:?}");
    assert_eq!(tok.id_to_token(ids[0]).as_deref(), Some("\u{2581}"));
    let bytes: Vec<String> = "你好".bytes().map(|b| format!("<0x{b:02X}>")).collect();
    let pieces: Vec<String> = ids[1..]
        .iter()
        .map(|&i| tok.id_to_token(i).unwrap_or_default())
        .collect();
    assert_eq!(pieces, bytes);
    assert_eq!(tok.decode(&ids, true).expect("decode"), text);
}

/// The GPT-2 vocabulary from the synthetic byte-level case written as vocab.json + merges.txt
/// must tokenize like transformers' GPT2Tokenizer on the same vocabulary (plain GPT-2 regex).
#[test]
fn vocab_and_merges_files_match_byte_level_golden() {
    let golden = fixture("synthetic.json");
    let arrays = &golden["arrays"]["gpt2"];
    let case = golden["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .find(|c| c["name"] == "gpt2-gpt2")
        .expect("case");
    let dir = tempfile::tempdir().expect("tempdir");
    let vocab: serde_json::Map<String, Value> = strings(&arrays["tokenizer.ggml.tokens"])
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, json!(i)))
        .collect();
    std::fs::write(
        dir.path().join("vocab.json"),
        serde_json::to_vec(&vocab).expect("json"),
    )
    .expect("write");
    let merges = format!(
        "#version: 0.2\n{}\n",
        strings(&arrays["tokenizer.ggml.merges"]).join("\n")
    );
    std::fs::write(dir.path().join("merges.txt"), merges).expect("write");
    let tok = AutoTokenizer::from_dir(dir.path()).expect("vocab+merges");
    assert!(tok.describe().starts_with("vocab.json+merges.txt"));
    let texts = strings(&case["texts"]);
    let expected = id_lists(&case["ids_no_special"]);
    let mut compared = 0;
    for (text, want) in texts.iter().zip(&expected) {
        // Only <|endoftext|> is special in a GPT-2 folder; the GGUF also marks <|im_start|> etc.
        if text.contains('<') {
            continue;
        }
        assert_eq!(
            &tok.encode(text, true).expect("encode"),
            want,
            "ids differ for {text:?}"
        );
        compared += 1;
    }
    assert!(compared >= 10);
    // GPT2Tokenizer defaults: <|endoftext|> is BOS, EOS and UNK, and no BOS is added.
    assert_eq!(tok.bos_token(), Some("<|endoftext|>"));
    assert_eq!(tok.eos_token(), Some("<|endoftext|>"));
    assert_eq!(tok.bos_token_id(), Some(0));
    assert!(!tok.adds_bos());
    assert_eq!(tok.special_token_ids(), vec![0]);
}

#[test]
fn gpt2_vocab_merges_match_transformers() {
    let Some(src) = gpt2_dir() else { return };
    let golden = fixture("gpt2.json");
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(src.join(f), dir.path().join(f)).expect("copy");
    }
    let tok = AutoTokenizer::from_dir(dir.path()).expect("gpt2");
    let texts = strings(&golden["texts"]);
    let expected = id_lists(&golden["ids"]);
    assert_encodes(&tok, &texts, &expected, true, "gpt2");
    assert_decodes(&tok, &expected, &golden["decoded"], "gpt2");
    assert_streams(&tok, &expected);
    assert_eq!(
        tok.vocab_size() as u64,
        golden["vocab_size"].as_u64().expect("n")
    );
    assert_eq!(tok.bos_token(), golden["bos_token"].as_str());
    assert_eq!(tok.eos_token(), golden["eos_token"].as_str());
    assert_eq!(tok.special_token_ids(), ids(&golden["special_ids"]));
    let batch: Vec<&str> = texts.iter().map(String::as_str).collect();
    assert_eq!(tok.encode_batch(&batch, true).expect("batch"), expected);

    // tokenizer_config.json asking for BOS, as OPT's does.
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        golden["bos_config"].to_string(),
    )
    .expect("write");
    let tok = AutoTokenizer::from_dir(dir.path()).expect("gpt2 with bos");
    assert_encodes(
        &tok,
        &strings(&golden["bos_texts"]),
        &id_lists(&golden["bos_ids"]),
        true,
        "gpt2+bos",
    );
    assert_eq!(tok.pad_token_id(), Some(50256));
    assert!(tok.adds_bos());
}

#[test]
fn smollm2_gguf_tokenizer_matches_transformers() {
    let Some(path) = smollm2_gguf() else { return };
    let golden = fixture("smollm2.json");
    let texts = strings(&golden["texts"]);
    let reference = id_lists(&golden["ids_reference"]);

    let tok = AutoTokenizer::from_gguf_file(&path).expect("smollm2");
    assert_eq!(tok.describe(), "gguf:gpt2/smollm 49152 tokens");
    assert_encodes(&tok, &texts, &reference, true, "smollm2 reference");
    assert_decodes(&tok, &reference, &golden["decoded"], "smollm2");
    assert_streams(&tok, &reference);

    let as_transformers =
        AutoTokenizer::from_gguf_file_with(&path, GgufPreTokenizerFlavor::Transformers)
            .expect("tf");
    assert_encodes(
        &as_transformers,
        &texts,
        &id_lists(&golden["ids_transformers"]),
        true,
        "smollm2 transformers",
    );

    assert_eq!(
        tok.vocab_size() as u64,
        golden["vocab_size"].as_u64().expect("n")
    );
    assert_eq!(tok.bos_token(), golden["bos_token"].as_str());
    assert_eq!(tok.eos_token(), golden["eos_token"].as_str());
    assert_eq!(tok.pad_token(), golden["pad_token"].as_str());
    assert_eq!(tok.unk_token(), golden["unk_token"].as_str());
    assert_eq!(
        tok.bos_token_id().map(u64::from),
        golden["bos_token_id"].as_u64()
    );
    assert_eq!(
        tok.eos_token_ids(),
        vec![golden["eos_token_id"].as_u64().expect("eos") as u32]
    );
    assert_eq!(
        tok.pad_token_id().map(u64::from),
        golden["pad_token_id"].as_u64()
    );
    assert_eq!(tok.special_token_ids(), ids(&golden["added_special_ids"]));
    assert!(tok.is_special(1) && !tok.is_special(100));
    assert!(!tok.adds_bos(), "SmolLM2's GGUF says add_bos_token = false");
    assert_eq!(tok.model_max_length(), Some(8192));

    for chat in golden["chats"].as_array().expect("chats") {
        let rendered = tok
            .apply_chat_template(
                &chat_messages(&chat["messages"]),
                chat["add_generation_prompt"].as_bool().expect("agp"),
            )
            .expect("render");
        assert_eq!(rendered, chat["rendered"].as_str().expect("rendered"));
    }
    let rendered = golden["chats"][1]["rendered"].as_str().expect("rendered");
    assert_eq!(
        tok.encode(rendered, true).expect("encode"),
        ids(&golden["chat_ids_reference"])
    );

    // A template using Python string methods, tojson and loop variables, rendered by transformers.
    let dir = tempfile::tempdir().expect("tempdir");
    tok.save(dir.path()).expect("save");
    let mut config: Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("tokenizer_config.json")).expect("read"),
    )
    .expect("json");
    config["chat_template"] = golden["custom_template"].clone();
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).expect("write");
    let custom = AutoTokenizer::from_dir(dir.path()).expect("custom template folder");
    let rendered = custom
        .apply_chat_template(&chat_messages(&golden["custom_messages"]), true)
        .expect("custom");
    assert_eq!(
        rendered,
        golden["custom_rendered"].as_str().expect("custom_rendered")
    );
}

#[test]
fn smollm2_saved_folder_reloads_with_the_same_ids() {
    let Some(path) = smollm2_gguf() else { return };
    let golden = fixture("smollm2.json");
    let tok = AutoTokenizer::from_gguf_file(&path).expect("smollm2");
    // AUTOQUANT_TOKENIZER_SAVE_DIR keeps the folder for the transformers check in
    // `make_tokenizer_golden.py --check-saved DIR`.
    let kept = std::env::var_os("AUTOQUANT_TOKENIZER_SAVE_DIR").map(PathBuf::from);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = kept.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    tok.save(&dir).expect("save");
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        assert!(dir.join(f).is_file(), "{f} written");
    }
    let reloaded = AutoTokenizer::from_dir(&dir).expect("reload");
    assert_eq!(reloaded.describe(), "tokenizer.json 49152 tokens");
    // from_path dispatches on folder versus file.
    assert_eq!(
        AutoTokenizer::from_path(&dir).expect("folder").describe(),
        reloaded.describe()
    );
    assert_eq!(
        AutoTokenizer::from_path(&path).expect("gguf").describe(),
        tok.describe()
    );
    assert!(AutoTokenizer::from_path(&dir.join("absent")).is_err());
    assert_encodes(
        &reloaded,
        &strings(&golden["texts"]),
        &id_lists(&golden["ids_reference"]),
        true,
        "reloaded",
    );
    assert_eq!(reloaded.special_token_ids(), tok.special_token_ids());
    assert_eq!(reloaded.bos_token_id(), tok.bos_token_id());
    assert_eq!(reloaded.eos_token_ids(), tok.eos_token_ids());
    assert_eq!(reloaded.pad_token_id(), tok.pad_token_id());
    assert_eq!(reloaded.model_max_length(), Some(8192));
    let chat = &golden["chats"][1];
    assert_eq!(
        reloaded
            .apply_chat_template(&chat_messages(&chat["messages"]), true)
            .expect("render"),
        chat["rendered"].as_str().expect("rendered")
    );
}

// ----- configuration rules (transformers' precedence) ------------------------------------------

/// A small tokenizer.json folder, from the synthetic byte-level case.
fn small_saved_folder() -> tempfile::TempDir {
    let golden = fixture("synthetic.json");
    let case = golden["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .find(|c| c["name"] == "gpt2-qwen2")
        .expect("case");
    let tok = AutoTokenizer::from_gguf_metadata(&synthetic_metadata(case, &golden["arrays"]))
        .expect("tok");
    let dir = tempfile::tempdir().expect("tempdir");
    tok.save(dir.path()).expect("save");
    dir
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("tokenizer_config.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
    f(v.as_object_mut().expect("object"));
    std::fs::write(path, v.to_string()).expect("write");
}

#[test]
fn generation_config_eos_list_and_bos() {
    let dir = small_saved_folder();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [2, 0], "bos_token_id": 1}"#,
    )
    .expect("write");
    let tok = AutoTokenizer::from_dir(dir.path()).expect("load");
    assert_eq!(tok.eos_token_ids(), vec![2, 0]);
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": 0}"#,
    )
    .expect("write");
    assert_eq!(
        AutoTokenizer::from_dir(dir.path())
            .expect("load")
            .eos_token_ids(),
        vec![0]
    );
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": "x"}"#,
    )
    .expect("write");
    let err = AutoTokenizer::from_dir(dir.path()).expect_err("bad eos");
    assert!(err.to_string().contains("generation_config.json"), "{err}");
}

#[test]
fn special_tokens_map_overrides_only_legacy_configs() {
    let dir = small_saved_folder();
    std::fs::write(
        dir.path().join("special_tokens_map.json"),
        r#"{"eos_token": {"content": "<|endoftext|>"}}"#,
    )
    .expect("write");
    // The saved config carries added_tokens_decoder, so the map is ignored (transformers v5).
    assert_eq!(
        AutoTokenizer::from_dir(dir.path())
            .expect("load")
            .eos_token(),
        Some("<|im_end|>")
    );
    edit_config(dir.path(), |c| {
        c.remove("added_tokens_decoder");
    });
    let tok = AutoTokenizer::from_dir(dir.path()).expect("load");
    assert_eq!(tok.eos_token(), Some("<|endoftext|>"));
    assert_eq!(tok.eos_token_ids(), vec![0]);
}

#[test]
fn chat_template_list_picks_default_and_jinja_file_wins() {
    let dir = small_saved_folder();
    edit_config(dir.path(), |c| {
        c.insert(
            "chat_template".into(),
            json!([{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ messages[0].content }}!"}]),
        );
    });
    let msgs = [ChatMessage::new("user", "hi")];
    let tok = AutoTokenizer::from_dir(dir.path()).expect("load");
    assert_eq!(
        tok.apply_chat_template(&msgs, false).expect("render"),
        "hi!"
    );
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "[{{ messages | length }}]",
    )
    .expect("write");
    let tok = AutoTokenizer::from_dir(dir.path()).expect("load");
    assert_eq!(
        tok.apply_chat_template(&msgs, false).expect("render"),
        "[1]"
    );
}

// ----- errors -------------------------------------------------------------------------------

#[test]
fn malformed_tokenizer_json_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("tokenizer.json"),
        "{\"version\": \"1.0\", \"model\": ",
    )
    .expect("write");
    let err = AutoTokenizer::from_dir(dir.path()).expect_err("truncated JSON");
    assert!(matches!(err, Error::Format { .. }), "{err:?}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    // Valid JSON that is not a tokenizer.
    std::fs::write(
        dir.path().join("tokenizer.json"),
        r#"{"model": {"type": "Nope"}}"#,
    )
    .expect("write");
    let err = AutoTokenizer::from_dir(dir.path()).expect_err("not a tokenizer");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn missing_or_broken_vocab_files_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = AutoTokenizer::from_dir(dir.path()).expect_err("empty folder");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    std::fs::write(
        dir.path().join("vocab.json"),
        r#"{"a": 0, "b": 1, "ab": 2}"#,
    )
    .expect("write");
    std::fs::write(
        dir.path().join("merges.txt"),
        "#version: 0.2\na b\nbroken\n",
    )
    .expect("write");
    let err = AutoTokenizer::from_dir(dir.path()).expect_err("bad merges");
    assert!(
        err.to_string().contains("merges.txt") && err.to_string().contains("line 3"),
        "{err}"
    );

    std::fs::write(dir.path().join("merges.txt"), "a b\n").expect("write");
    std::fs::write(dir.path().join("tokenizer_config.json"), "[1, 2]").expect("write");
    let err = AutoTokenizer::from_dir(dir.path()).expect_err("config not an object");
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
}

#[test]
fn unknown_gguf_pre_tokenizer_is_a_clear_error() {
    let err = AutoTokenizer::from_gguf_metadata(&common::tiny_gguf_metadata("mystery-bpe"))
        .expect_err("unknown pre");
    let msg = err.to_string();
    assert!(
        msg.contains("mystery-bpe") && msg.contains("smollm") && msg.contains("llama-bpe"),
        "{msg}"
    );
    // The same metadata with a known pre-tokenizer works: a + b merge into "ab".
    let tok =
        AutoTokenizer::from_gguf_metadata(&common::tiny_gguf_metadata("gpt2")).expect("known pre");
    assert_eq!(tok.encode("ab", false).expect("encode"), vec![2]);
}

#[test]
fn bad_gguf_tokenizer_metadata_is_an_error() {
    let mut md = common::tiny_gguf_metadata("gpt2");
    md.insert(
        "tokenizer.ggml.model".into(),
        GgufValue::String("rwkv".into()),
    );
    let err = AutoTokenizer::from_gguf_metadata(&md).expect_err("unknown model");
    assert!(
        err.to_string().contains("rwkv") && err.to_string().contains("gpt2"),
        "{err}"
    );

    let mut md = common::tiny_gguf_metadata("gpt2");
    md.remove("tokenizer.ggml.tokens");
    assert!(AutoTokenizer::from_gguf_metadata(&md)
        .expect_err("no tokens")
        .to_string()
        .contains("tokenizer.ggml.tokens"));

    let mut md = common::tiny_gguf_metadata("gpt2");
    md.insert("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(99));
    assert!(AutoTokenizer::from_gguf_metadata(&md)
        .expect_err("eos out of range")
        .to_string()
        .contains("99"));

    let mut md = common::tiny_gguf_metadata("gpt2");
    md.insert(
        "tokenizer.ggml.token_type".into(),
        GgufValue::Array(vec![GgufValue::I32(1)]),
    );
    assert!(AutoTokenizer::from_gguf_metadata(&md)
        .expect_err("type count")
        .to_string()
        .contains("token_type"));
}

#[test]
fn chat_template_errors() {
    let dir = small_saved_folder();
    let msgs = [ChatMessage::new("assistant", "hi")];
    edit_config(dir.path(), |c| {
        c.insert(
            "chat_template".into(),
            json!("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with a user turn') }}{% endif %}ok"),
        );
    });
    let tok = AutoTokenizer::from_dir(dir.path()).expect("load");
    let err = tok
        .apply_chat_template(&msgs, true)
        .expect_err("raise_exception");
    assert!(
        err.to_string()
            .contains("Conversations must start with a user turn"),
        "{err}"
    );
    assert_eq!(
        tok.apply_chat_template(&[ChatMessage::new("user", "x")], true)
            .expect("ok"),
        "ok"
    );

    edit_config(dir.path(), |c| {
        c.insert("chat_template".into(), json!("{% for m in messages %}"));
    });
    let err = AutoTokenizer::from_dir(dir.path())
        .expect("load")
        .apply_chat_template(&msgs, true)
        .expect_err("syntax");
    assert!(err.to_string().contains("chat template"), "{err}");

    edit_config(dir.path(), |c| {
        c.remove("chat_template");
    });
    let err = AutoTokenizer::from_dir(dir.path())
        .expect("load")
        .apply_chat_template(&msgs, true)
        .expect_err("none");
    assert!(err.to_string().contains("no chat template"), "{err}");
}

#[test]
fn decoding_an_id_outside_the_vocabulary_is_an_error() {
    let dir = small_saved_folder();
    let tok = AutoTokenizer::from_dir(dir.path()).expect("load");
    let n = tok.vocab_size() as u32;
    assert!(tok.decode(&[0, n + 5], false).is_err());
    assert!(tok.stream_decoder(false).push(n).is_err());
}
