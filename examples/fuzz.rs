//! Seeded mutation fuzzer for every parser of untrusted files, on plain stable cargo
//! (docs/fuzzing.md). Each target starts from its seed files in `tests/fuzz_corpus/<target>/`,
//! mutates them (bit flips, byte runs, boundary integers, JSON/Jinja tokens, truncation,
//! splicing) and runs the parser in-process (the targets are in `fuzz/targets.rs`, shared with
//! the AFL++ harness). A failure is a panic, a run past the per-input deadline, or an allocation
//! past the memory cap; the input is saved to the crash folder and the run exits non-zero.
//!
//! ```text
//! cargo run --release --example fuzz -- [--seconds N] [--seed S] [--target NAME]... [--crashes DIR]
//! cargo run --release --example fuzz -- --make-corpus     # (re)write the seed files
//! cargo run --release --example fuzz -- --replay FILE --target NAME
//! ```

#[path = "../fuzz/targets.rs"]
mod targets;

use autoquant::formats::gguf::GgufValue;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use targets::{
    run_target, seed_tokenizer_json, tokenizer_metadata, Target, ABORT_NOTE, MAX_INPUT,
    SEED_TOKENIZER_CONFIG, TARGETS,
};

/// Per-input deadline. Chat templates may use up to their own 20 s CPU limit.
const DEADLINE: Duration = Duration::from_secs(40);

// ------------------------------------------------------------------------------------------
// Mutation.

/// xorshift64*: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const BOUNDARY: [u64; 14] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
];

const TOKENS: [&str; 40] = [
    "{",
    "}",
    "[",
    "]",
    "\"",
    ",",
    ":",
    "null",
    "true",
    "-1",
    "0",
    "1e308",
    "-1e308",
    "18446744073709551615",
    "4294967296",
    "9223372036854775808",
    "1.5",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "[[[[[[[[",
    "{% for i in range(100000) %}",
    "{% endfor %}",
    "{% if x %}",
    "{% endif %}",
    "{{ messages|tojson(indent=100) }}",
    "{% set ns = namespace(s='x') %}",
    "{% set ns.s = ns.s ~ ns.s %}",
    "{{ ns.s }}",
    "{% macro m(n) %}{{ m(n) }}{% endmacro %}",
    "{{ m(1) }}",
    "{{ raise_exception('x') }}",
    "{{ 'x' * 1000000 }}",
    "\"quantization_config\"",
    "\"bits\"",
    "\"group_size\"",
    "\"num_hidden_layers\"",
    "\"hidden_size\"",
    "\"vocab_size\"",
    "\"model_type\"",
    "\"shape\"",
];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, other: &[u8], text: bool) {
    let rounds = if rng.below(2) == 0 {
        1
    } else {
        2 + rng.below(6)
    };
    for _ in 0..rounds {
        let len = input.len();
        match rng.below(if text { 11 } else { 9 }) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                input.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                input.drain(i..i + n);
            }
            4 if len >= 1 => {
                // A boundary integer over 1, 2, 4 or 8 bytes at any offset, either endianness.
                let width = [1, 2, 4, 8][rng.below(4)];
                if len >= width {
                    let i = rng.below(len - width + 1);
                    let mut v = BOUNDARY[rng.below(BOUNDARY.len())];
                    if rng.below(4) == 0 {
                        v = v.wrapping_add(rng.below(3) as u64).wrapping_sub(1);
                    }
                    let bytes = if rng.below(8) == 0 {
                        v.to_be_bytes()
                    } else {
                        v.to_le_bytes()
                    };
                    input[i..i + width].copy_from_slice(&bytes[..width]);
                }
            }
            5 if len > 0 => input.truncate(rng.below(len)),
            6 if !other.is_empty() => {
                // Splice: our head and the other seed's tail.
                let cut = rng.below(len + 1);
                let from = rng.below(other.len());
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
            7 if len > 0 => {
                // Duplicate a run.
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(256));
                let run = input[i..i + n].to_vec();
                let at = rng.below(input.len() + 1);
                input.splice(at..at, run);
            }
            8 if len > 0 => {
                // Copy a run over another place (keeps the length).
                let a = rng.below(len);
                let b = rng.below(len);
                let n = 1 + rng.below((len - a.max(b)).min(32));
                let run = input[a..a + n].to_vec();
                input[b..b + n].copy_from_slice(&run);
            }
            9 | 10 => {
                let token = TOKENS[rng.below(TOKENS.len())].as_bytes();
                let i = rng.below(len + 1);
                if rng.below(2) == 0 || len == 0 {
                    input.splice(i..i, token.iter().copied());
                } else {
                    // Replace a few bytes with the token.
                    let end = (i + 1 + rng.below(8)).min(len);
                    input.splice(i.min(end)..end, token.iter().copied());
                }
            }
            _ => {}
        }
    }
    input.truncate(MAX_INPUT);
}

// ------------------------------------------------------------------------------------------
// Driver.

struct Job {
    target: Target,
    input: Vec<u8>,
    dir: PathBuf,
}

enum Outcome {
    Done(bool),
    Panicked(String),
}

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus")
}

/// The seeds, and whether each is one the parser must accept (names starting `refused_` are
/// seeds of inputs it must refuse cleanly).
fn load_corpus(target: Target) -> Vec<(Vec<u8>, bool)> {
    let dir = corpus_root().join(target.name());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| rd.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .filter(|p| p.is_file())
        .filter_map(|p| {
            let refused = p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("refused_"));
            Some((std::fs::read(p).ok()?, !refused))
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut seconds = 60.0f64;
    let mut seed = 1u64;
    let mut targets = Vec::new();
    let mut crashes = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-crashes");
    let mut replay = None;
    let mut make_corpus = false;
    let mut i = 0;
    while i < args.len() {
        let value = || args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--seconds" => seconds = value().parse().expect("--seconds N"),
            "--seed" => seed = value().parse().expect("--seed S"),
            "--target" => targets.push(Target::from_name(&value()).unwrap_or_else(|| {
                panic!(
                    "unknown target {}; known: {:?}",
                    value(),
                    TARGETS.map(Target::name)
                )
            })),
            "--crashes" => crashes = PathBuf::from(value()),
            "--replay" => replay = Some(PathBuf::from(value())),
            "--make-corpus" => {
                make_corpus = true;
                i += 1;
                continue;
            }
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    if make_corpus {
        write_corpus();
        return;
    }
    if targets.is_empty() {
        targets = TARGETS.to_vec();
    }
    let work = std::env::temp_dir().join(format!("autoquant-fuzz-{}", std::process::id()));

    // Silence the default panic message; panics are reported with their input below.
    let last_panic = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    {
        let last_panic = last_panic.clone();
        std::panic::set_hook(Box::new(move |info| {
            let location = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            if let Ok(mut p) = last_panic.lock() {
                *p = format!("{msg}{location}");
            }
        }));
    }

    // One worker thread runs the inputs; this thread keeps the deadline.
    let (job_tx, job_rx) = mpsc::channel::<Job>();
    let (done_tx, done_rx) = mpsc::channel::<Outcome>();
    {
        let last_panic = last_panic.clone();
        std::thread::Builder::new()
            .name("fuzz-worker".into())
            .stack_size(64 << 20)
            .spawn(move || {
                for job in job_rx {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_target(job.target, &job.input, &job.dir)
                    }));
                    let outcome = match r {
                        Ok(accepted) => Outcome::Done(accepted),
                        Err(_) => Outcome::Panicked(
                            last_panic.lock().map(|p| p.clone()).unwrap_or_default(),
                        ),
                    };
                    if done_tx.send(outcome).is_err() {
                        return;
                    }
                }
            })
            .expect("worker thread");
    }

    let mut noted = None;
    let mut run_one = |target: Target, input: Vec<u8>| -> Result<bool, String> {
        let dir = work.join(target.name());
        if noted != Some(target) {
            // Once per target: the note is leaked so the allocator can read it at any time.
            let note = format!(
                "target {}: the input is in {}\n",
                target.name(),
                dir.display()
            );
            *ABORT_NOTE.lock().expect("note") =
                Some(Box::leak(note.into_bytes().into_boxed_slice()));
            noted = Some(target);
        }
        let saved = input.clone();
        job_tx
            .send(Job { target, input, dir })
            .map_err(|_| "worker gone".to_string())?;
        let failure = match done_rx.recv_timeout(DEADLINE) {
            Ok(Outcome::Done(accepted)) => return Ok(accepted),
            Ok(Outcome::Panicked(msg)) => format!("panic: {msg}"),
            Err(_) => format!("no result within {} s (hang)", DEADLINE.as_secs()),
        };
        std::fs::create_dir_all(&crashes).expect("crash dir");
        let file = crashes.join(format!(
            "{}-{:016x}",
            target.name(),
            saved.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            })
        ));
        std::fs::write(&file, &saved).expect("save crash");
        Err(format!(
            "FUZZ FAILURE in {}: {failure}; input saved to {}",
            target.name(),
            file.display()
        ))
    };

    if let Some(path) = replay {
        let target = *targets.first().expect("--replay needs --target");
        let input = std::fs::read(&path).expect("replay input");
        let r = run_one(target, input);
        let _ = std::fs::remove_dir_all(&work);
        match r {
            Ok(accepted) => println!(
                "{}: {} handled without failure ({})",
                target.name(),
                path.display(),
                if accepted { "accepted" } else { "refused" }
            ),
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
        return;
    }

    let per_target = Duration::from_secs_f64(seconds / targets.len() as f64);
    let mut failures = 0;
    for (k, &target) in targets.iter().enumerate() {
        let corpus = load_corpus(target);
        assert!(
            !corpus.is_empty(),
            "no seeds in tests/fuzz_corpus/{} (run --make-corpus)",
            target.name()
        );
        let mut rng = Rng::new(seed.wrapping_add(k as u64 * 0x1_0000));
        let start = Instant::now();
        let mut iterations = 0u64;
        let mut accepted = 0u64;
        // Every seed as is first (each must be accepted), then mutants until the time is spent.
        for (n, (s, must_accept)) in corpus.iter().enumerate() {
            match run_one(target, s.clone()) {
                Ok(true) => accepted += 1,
                Ok(false) if !must_accept => {}
                Ok(false) => {
                    eprintln!("FUZZ FAILURE in {}: seed {n} is refused", target.name());
                    failures += 1;
                }
                Err(e) => {
                    eprintln!("{e}");
                    failures += 1;
                }
            }
            iterations += 1;
        }
        while start.elapsed() < per_target {
            let base = &corpus[rng.below(corpus.len())].0;
            let other = &corpus[rng.below(corpus.len())].0;
            let mut input = base.clone();
            mutate(&mut rng, &mut input, other, target.text());
            match run_one(target, input) {
                Ok(ok) => accepted += u64::from(ok),
                Err(e) => {
                    eprintln!("{e}");
                    failures += 1;
                    if e.contains("hang") {
                        // The worker is stuck; nothing more can run in this process.
                        println!(
                            "fuzz {}: {iterations} inputs before the hang",
                            target.name()
                        );
                        std::process::exit(1);
                    }
                }
            }
            iterations += 1;
        }
        println!(
            "fuzz {:<16} {iterations:>8} inputs ({accepted:>6} accepted) in {:>5.1} s (seed {seed})",
            target.name(),
            start.elapsed().as_secs_f64()
        );
    }
    let _ = std::fs::remove_dir_all(&work);
    if failures > 0 {
        eprintln!("{failures} failing inputs");
        std::process::exit(1);
    }
    println!("fuzz: no panics, hangs or memory blow-ups");
}

// ------------------------------------------------------------------------------------------
// Seed corpus: written by `--make-corpus`, a few KB per target.

/// Serialize GGUF v3: metadata, then tensors (name, ggml dims, type id, data).
fn gguf_bytes(md: &[(&str, GgufValue)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    fn type_id(v: &GgufValue) -> u32 {
        match v {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }
    fn value(out: &mut Vec<u8>, v: &GgufValue) {
        match v {
            GgufValue::U8(x) => out.push(*x),
            GgufValue::I8(x) => out.push(*x as u8),
            GgufValue::U16(x) => out.extend(x.to_le_bytes()),
            GgufValue::I16(x) => out.extend(x.to_le_bytes()),
            GgufValue::U32(x) => out.extend(x.to_le_bytes()),
            GgufValue::I32(x) => out.extend(x.to_le_bytes()),
            GgufValue::F32(x) => out.extend(x.to_le_bytes()),
            GgufValue::Bool(x) => out.push(u8::from(*x)),
            GgufValue::String(s) => string(out, s),
            GgufValue::Array(items) => {
                out.extend(items.first().map_or(0, type_id).to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for item in items {
                    value(out, item);
                }
            }
            GgufValue::U64(x) => out.extend(x.to_le_bytes()),
            GgufValue::I64(x) => out.extend(x.to_le_bytes()),
            GgufValue::F64(x) => out.extend(x.to_le_bytes()),
        }
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((md.len() as u64).to_le_bytes());
    for (k, v) in md {
        string(&mut out, k);
        out.extend(type_id(v).to_le_bytes());
        value(&mut out, v);
    }
    let mut offset = 0u64;
    for (name, dims, ty, data) in tensors {
        string(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(ty.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (data.len() as u64).div_ceil(32) * 32;
    }
    out.resize(out.len().div_ceil(32) * 32, 0);
    for (_, _, _, data) in tensors {
        out.extend(data);
        out.resize(out.len().div_ceil(32) * 32, 0);
    }
    out
}

fn safetensors_bytes(header: serde_json::Value, data: &[u8]) -> Vec<u8> {
    let mut h = serde_json::to_vec(&header).expect("json");
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

fn write_corpus() {
    use serde_json::json;
    let root = corpus_root();
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(name), bytes).expect("write seed");
    };
    let fixture = |p: &str| {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(p),
        )
        .expect("fixture")
    };

    // safetensors: f32, bf16 and i8 tensors with metadata; an empty file's header.
    let f32s: Vec<u8> = (0..6)
        .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
        .collect();
    let mut data = f32s.clone();
    data.extend([0x80, 0x3f, 0x00, 0x40, 0x40, 0x40, 0x80, 0x40]);
    data.extend([1, 2, 255, 128]);
    put(
        "safetensors",
        "three_dtypes.safetensors",
        &safetensors_bytes(
            json!({
                "__metadata__": {"format": "pt"},
                "model.embed_tokens.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                "model.norm.weight": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
                "lm_head.qweight": {"dtype": "I8", "shape": [2, 2], "data_offsets": [32, 36]}
            }),
            &data,
        ),
    );
    put(
        "safetensors",
        "empty.safetensors",
        &safetensors_bytes(json!({}), &[]),
    );

    // GGUF: the project's small fixtures, and a llama-like file with a tokenizer and a template.
    put(
        "gguf",
        "llama3_rope.gguf",
        &fixture("gguf/llama3_rope.gguf"),
    );
    put(
        "gguf",
        "unsupported.gguf",
        &fixture("gguf/unsupported.gguf"),
    );
    put("gguf", "all_types.gguf", &fixture("gguf/all_types.gguf"));
    let mut md: Vec<(&str, GgufValue)> = vec![
        ("general.architecture", GgufValue::String("llama".into())),
        ("general.alignment", GgufValue::U32(32)),
        ("llama.block_count", GgufValue::U32(1)),
        ("llama.context_length", GgufValue::U32(64)),
        ("llama.embedding_length", GgufValue::U32(32)),
        ("llama.feed_forward_length", GgufValue::U32(64)),
        ("llama.attention.head_count", GgufValue::U32(2)),
        ("llama.attention.head_count_kv", GgufValue::U32(1)),
        ("llama.rope.freq_base", GgufValue::F32(10000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::F32(1e-5),
        ),
        (
            "tokenizer.chat_template",
            GgufValue::String(
                "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                    .into(),
            ),
        ),
    ];
    for (k, v) in tokenizer_metadata() {
        md.push((Box::leak(k.into_boxed_str()), v));
    }
    let q8: Vec<u8> = [0x00u8, 0x3c]
        .into_iter()
        .chain((0..32).map(|i| i as u8))
        .collect();
    let tensors = vec![
        (
            "token_embd.weight",
            vec![32, 7],
            0u32,
            vec![0u8; 32 * 7 * 4],
        ),
        ("output_norm.weight", vec![32], 0, vec![0u8; 32 * 4]),
        ("blk.0.attn_q.weight", vec![32, 1], 8, q8),
    ];
    put(
        "gguf",
        "tiny_llama_tokenizer.gguf",
        &gguf_bytes(&md, &tensors),
    );

    // pytorch_model.bin: the project's own small fixtures (zip of a pickle, the legacy
    // format, and a pickle that asks to run code).
    put(
        "pytorch",
        "single.bin",
        &fixture("pytorch/single/pytorch_model.bin"),
    );
    put(
        "pytorch",
        "refused_legacy.bin",
        &fixture("pytorch/legacy/pytorch_model.bin"),
    );
    put(
        "pytorch",
        "refused_malicious.bin",
        &fixture("pytorch/malicious/pytorch_model.bin"),
    );
    put(
        "pytorch",
        "shard.bin",
        &fixture("pytorch/sharded/pytorch_model-00001-of-00003.bin"),
    );

    // config.json: each architecture, and the quantization configs a checkpoint carries.
    let llama = json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    });
    let with_q = |q: serde_json::Value| {
        let mut c = llama.clone();
        c["quantization_config"] = q;
        serde_json::to_vec_pretty(&c).expect("json")
    };
    put(
        "config",
        "llama.json",
        &serde_json::to_vec_pretty(&llama).expect("json"),
    );
    put(
        "config",
        "llama_gptq.json",
        &with_q(
            json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": false,
                       "sym": true, "checkpoint_format": "gptq"}),
        ),
    );
    put(
        "config",
        "llama_awq.json",
        &with_q(
            json!({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": true,
                       "version": "gemm"}),
        ),
    );
    put(
        "config",
        "llama_bnb.json",
        &with_q(json!({"quant_method": "bitsandbytes", "load_in_4bit": true,
                       "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32",
                       "bnb_4bit_use_double_quant": true})),
    );
    put(
        "config",
        "opt.json",
        &serde_json::to_vec_pretty(&json!({
            "model_type": "opt", "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 256, "max_position_embeddings": 128,
            "word_embed_proj_dim": 32, "do_layer_norm_before": true, "activation_function": "relu"
        }))
        .expect("json"),
    );
    put(
        "config",
        "gpt2.json",
        &serde_json::to_vec_pretty(&json!({
            "model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256,
            "n_positions": 128, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"
        }))
        .expect("json"),
    );

    // Tokenizer files.
    put("tokenizer", "bpe.json", seed_tokenizer_json().as_bytes());
    put(
        "tokenizer_config",
        "chat.json",
        SEED_TOKENIZER_CONFIG.as_bytes(),
    );
    put(
        "tokenizer_config",
        "named_templates.json",
        serde_json::to_vec_pretty(&json!({
            "bos_token": {"content": "<s>", "lstrip": false, "normalized": false,
                          "rstrip": false, "single_word": false, "__type": "AddedToken"},
            "eos_token": "</s>",
            "additional_special_tokens": ["<s>"],
            "chat_template": [
                {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"},
                {"name": "tool_use", "template": "{{ tools|tojson }}"}
            ]
        }))
        .expect("json")
        .as_slice(),
    );

    // Chat templates in the styles models ship.
    put(
        "chat_template",
        "chatml.jinja",
        b"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    );
    put(
        "chat_template",
        "llama3_style.jinja",
        b"{{- bos_token }}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{{- \"Today Date: \" + strftime_now(\"%d %b %Y\") + \"\\n\\n\" }}\n{{- system_message }}\n{{- \"<|eot_id|>\" }}\n{%- for message in messages %}\n    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n",
    );
    put(
        "chat_template",
        "namespace_macro.jinja",
        b"{% macro render(m, n) %}[{{ n }}:{{ m.role|upper }}] {{ m.content.strip() }}{% endmacro %}{% set ns = namespace(count=0, text='') %}{% for m in messages %}{% set ns.count = ns.count + 1 %}{% set ns.text = ns.text ~ render(m, ns.count) %}{% endfor %}{{ ns.text }}{{ messages|tojson(indent=2) }}{% if messages|length > 10 %}{{ raise_exception('too long') }}{% endif %}",
    );

    // Calibration windows.
    put(
        "calib",
        "windows.json",
        b"[[1, 2, 3, 4], [5, 6], [7, 8, 9]]",
    );
    put(
        "calib",
        "wrapped.json",
        b"{\"note\": \"made by the reference runner\", \"windows\": [[0, 1], [65535, 4294967295]]}",
    );
    println!("seed corpus written to {}", root.display());
}
