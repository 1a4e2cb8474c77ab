//! Hostile input: chat templates that loop, recurse, allocate or print without end, and GGUF
//! containers whose counts and lengths lie. Each must end with a clear error, never a hang, a
//! panic or an allocation out of proportion to the input (docs/fuzzing.md).
//!
//! The chat-template cases run in a child copy of this test binary under an address-space and
//! CPU-time limit, so a regression shows up as a failed child, not as a machine out of memory.

mod common;

use autoquant::formats::gguf::{GgufFile, GgufValue};
use autoquant::tokenizer::{AutoTokenizer, ChatMessage};
use std::os::unix::process::CommandExt;
use std::process::Command;

const CHILD_TEMPLATE_VAR: &str = "AUTOQUANT_HOSTILE_TEMPLATE";

fn tokenizer_with_template(template: &str) -> AutoTokenizer {
    let mut md = common::tiny_gguf_metadata("gpt2");
    md.insert(
        "tokenizer.chat_template".into(),
        GgufValue::String(template.into()),
    );
    AutoTokenizer::from_gguf_metadata(&md).expect("tiny tokenizer")
}

fn render(template: &str) -> Result<String, String> {
    tokenizer_with_template(template)
        .apply_chat_template(&[ChatMessage::new("user", "hello")], true)
        .map_err(|e| e.to_string())
}

/// Not a test of its own: the body the parent runs in a limited child (does nothing otherwise).
#[test]
fn child_render() {
    let Ok(template) = std::env::var(CHILD_TEMPLATE_VAR) else {
        return;
    };
    match render(&template) {
        Ok(text) => println!("RESULT ok {} bytes", text.len()),
        Err(e) => println!("RESULT err {e}"),
    }
}

/// Render `template` in a child process limited to 4 GiB of address space and 60 s of CPU;
/// returns the child's result line, or a description of how it died.
fn render_limited(template: &str) -> String {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args(["--exact", "child_render", "--nocapture", "--test-threads=1"])
        .env(CHILD_TEMPLATE_VAR, template);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let set = |resource, value: u64| {
                let lim = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                if libc::setrlimit(resource, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            };
            set(libc::RLIMIT_AS, 4 << 30)?;
            set(libc::RLIMIT_CPU, 60)?;
            set(libc::RLIMIT_CORE, 0)
        });
    }
    let out = cmd.output().expect("run child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout
        .lines()
        .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
    {
        Some(line) if out.status.success() => line.to_string(),
        _ => format!(
            "child failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn assert_limit_error(name: &str, template: &str) {
    let result = render_limited(template);
    assert!(
        result.starts_with("err ") && result.contains("chat template") && result.contains("limit"),
        "{name}: expected a chat template limit error, got: {result}"
    );
}

#[test]
fn chat_template_nested_loops_run_out_of_fuel() {
    assert_limit_error(
        "nested loops",
        "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}\
         {% endfor %}{% endfor %}{% endfor %}",
    );
}

#[test]
fn chat_template_huge_tojson_indent_is_refused() {
    assert_limit_error(
        "tojson indent",
        "{{ messages|tojson(indent=100000000000) }}",
    );
    assert_limit_error(
        "tojson indent positional",
        "{{ messages|tojson(100000000000) }}",
    );
}

#[test]
fn chat_template_output_is_capped() {
    assert_limit_error(
        "huge output",
        "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",
    );
}

#[test]
fn chat_template_memory_is_bounded() {
    for (name, template) in [
        (
            "doubling concatenation",
            "{% set ns = namespace(s='x' * 10000000) %}{% for i in range(30) %}\
             {% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
        ),
        (
            "doubling addition",
            "{% set ns = namespace(s='x' * 10000000) %}{% for i in range(30) %}\
             {% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
        ),
        (
            "doubling capture",
            "{% set ns = namespace(s='x' * 10000000) %}{% for i in range(30) %}\
             {% set t %}{{ ns.s }}{{ ns.s }}{% endset %}{% set ns.s = t %}{% endfor %}\
             {{ ns.s|length }}",
        ),
        (
            "huge join",
            "{{ (range(100000)|join('x' * 100000))|length }}",
        ),
        (
            "huge list",
            "{% set ns = namespace(l=[0]) %}{% for i in range(40) %}\
             {% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|length }}",
        ),
    ] {
        assert_limit_error(name, template);
    }
}

#[test]
fn chat_template_self_reference_and_recursion_are_errors() {
    for (name, template) in [
        (
            "self-referencing namespace to json",
            "{% set ns = namespace() %}{% set ns.me = ns %}{{ ns|tojson }}",
        ),
        (
            "unbounded macro recursion",
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        ),
    ] {
        let result = render_limited(template);
        assert!(result.starts_with("err "), "{name}: {result}");
    }
}

#[test]
fn chat_template_builtin_size_bounds_are_errors() {
    for template in [
        "{{ 'x' * 10000000000 }}",
        "{{ range(1000000000000)|length }}",
    ] {
        let result = render_limited(template);
        assert!(result.starts_with("err "), "{template}: {result}");
    }
}

#[test]
fn chat_templates_in_use_still_render() {
    // A template in the style of the ones transformers ships, with a long conversation.
    let template =
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}\
        {{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}\
        {{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
        {% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    let messages: Vec<ChatMessage> = (0..2000)
        .map(|i| ChatMessage::new(if i % 2 == 0 { "user" } else { "assistant" }, "hi"))
        .collect();
    let text = tokenizer_with_template(template)
        .apply_chat_template(&messages, true)
        .expect("renders");
    assert_eq!(text.matches("<|im_start|>").count(), 2002);
    let json = tokenizer_with_template("{{ messages|tojson(indent=4) }}")
        .apply_chat_template(&messages[..2], false)
        .expect("tojson");
    assert!(
        json.starts_with("[\n    {\n        \"role\": \"user\""),
        "{json}"
    );

    let Some(gguf) = common::asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let tok = AutoTokenizer::from_gguf_file(&gguf).expect("SmolLM2 tokenizer");
    let long: Vec<ChatMessage> = (0..2000)
        .map(|i| ChatMessage::new(if i % 2 == 0 { "user" } else { "assistant" }, "hello"))
        .collect();
    let text = tok
        .apply_chat_template(&long, true)
        .expect("SmolLM2 renders");
    assert_eq!(text.matches("<|im_start|>").count(), 2002);
}

/// A GGUF v3 file with no tensors and the given raw metadata entries (key, type id, value bytes).
fn gguf_with_metadata(entries: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(0u64.to_le_bytes());
    out.extend((entries.len() as u64).to_le_bytes());
    for (key, type_id, value) in entries {
        out.extend((key.len() as u64).to_le_bytes());
        out.extend(key.as_bytes());
        out.extend(type_id.to_le_bytes());
        out.extend(value);
    }
    out
}

/// An array value: element type, count, then the elements' bytes.
fn gguf_array(elem_type: u32, count: u64, elements: &[u8]) -> Vec<u8> {
    let mut v = elem_type.to_le_bytes().to_vec();
    v.extend(count.to_le_bytes());
    v.extend(elements);
    v
}

fn open_gguf(
    bytes: &[u8],
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    Result<GgufFile, String>,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hostile.gguf");
    std::fs::write(&path, bytes).expect("write");
    let opened = GgufFile::open(&path).map_err(|e| e.to_string());
    (dir, path, opened)
}

#[test]
fn gguf_metadata_memory_is_bounded_by_the_file_size() {
    // 8 MB of one-byte elements: 32 bytes each once decoded, 256 MB in all.
    let n = 8 << 20;
    let bytes =
        gguf_with_metadata(&[("hostile.bytes", 9, gguf_array(0, n, &vec![7u8; n as usize]))]);
    let (_dir, path, opened) = open_gguf(&bytes);
    let err = opened.expect_err("a metadata array decoding to 32 times the file is refused");
    assert!(
        err.contains("hostile.bytes")
            && err.contains("memory")
            && err.contains(&path.display().to_string()),
        "{err}"
    );

    // Arrays of the kinds tokenizers use stay well inside the bound: 500 000 i32 and strings.
    let m = 500_000u64;
    let ints: Vec<u8> = (0..m as i32).flat_map(i32::to_le_bytes).collect();
    let strings: Vec<u8> = (0..m)
        .flat_map(|i| {
            let s = format!("t{i}");
            let mut b = (s.len() as u64).to_le_bytes().to_vec();
            b.extend(s.as_bytes());
            b
        })
        .collect();
    let bytes = gguf_with_metadata(&[
        ("tokenizer.ggml.token_type", 9, gguf_array(5, m, &ints)),
        ("tokenizer.ggml.tokens", 9, gguf_array(8, m, &strings)),
    ]);
    let (_dir, _path, opened) = open_gguf(&bytes);
    let file = opened.expect("tokenizer-sized arrays are accepted");
    assert_eq!(
        file.get_str_array("tokenizer.ggml.tokens").map(|t| t.len()),
        Some(m as usize)
    );
}

#[test]
fn gguf_tensor_table_memory_is_bounded_by_the_file_size() {
    // A header claiming as many tensors as 24-byte records fit, each with an empty name:
    // the table would take several times the file before the first record is read.
    let n_tensors = 1u64 << 20;
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(n_tensors.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    bytes.resize(bytes.len() + 24 * n_tensors as usize, 0);
    let (_dir, _path, opened) = open_gguf(&bytes);
    let err = opened.expect_err("refused");
    assert!(err.contains("tensors") && err.contains("memory"), "{err}");
}

/// Found by the fuzzer (tests/fuzz_corpus/gguf): a llama `attn_q` tensor with zero rows passed
/// the head-split check (0 is a multiple of anything) and reading it divided by zero.
#[test]
fn gguf_query_tensor_without_rows_is_an_error() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_corpus/gguf/regress_attn_q_zero_rows.gguf");
    let file = GgufFile::open(&path).expect("the container itself is sound");
    let q = file
        .tensor_infos()
        .iter()
        .find(|t| t.name.contains("attn_q"))
        .expect("an attn_q tensor");
    assert_eq!(q.shape().first(), Some(&0), "{q:?}");
    let err = autoquant::formats::gguf::GgufWeights::new(file)
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("attn_q") && msg.contains("0 rows"), "{msg}");
}

/// Found by the fuzzer (tests/fuzz_corpus/pytorch): a tensor with a zero-length dimension and a
/// storage offset past its (empty) storage was accepted by the view check, then reading it
/// sliced past the end of the storage.
#[test]
fn pytorch_empty_tensor_with_far_offset_reads_without_panic() {
    use autoquant::formats::pytorch::PytorchFile;
    use autoquant::formats::WeightSource;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_corpus/pytorch/regress_empty_view_offset.bin");
    let file = PytorchFile::open(&path).expect("opens");
    let mut empty = 0;
    for name in file.names() {
        let info = file.info(&name).expect("info");
        if info.shape.contains(&0) {
            empty += 1;
            let t = file.read(&name).expect("an empty tensor reads as empty");
            assert!(t.data.is_empty(), "{name}");
        }
    }
    assert!(empty > 0, "the input holds an empty tensor");
}
