//! The fuzz targets shared by the two fuzz drivers: the seeded mutation driver
//! (`examples/fuzz.rs`) and the coverage-guided AFL++ harness (`fuzz/afl`). Each target writes
//! its input where the parser expects a file and runs the parser and what reads its result; the
//! counting allocator turns a memory blow-up into a failure either driver sees. Both drivers
//! include this file as a module (`#[path]`), so they run exactly the same code.

use autoquant::config::AutoConfig;
use autoquant::formats::gguf::{GgufFile, GgufValue, GgufWeights, Metadata};
use autoquant::formats::pytorch::PytorchFile;
use autoquant::formats::safetensors::SafetensorsFile;
use autoquant::formats::WeightSource;
use autoquant::quant::calib::CalibData;
use autoquant::tokenizer::{AutoTokenizer, ChatMessage};
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

// ------------------------------------------------------------------------------------------
// Memory cap: a counting allocator that stops the process when live allocations pass the cap.

/// Inputs are at most [`MAX_INPUT`] bytes; no parser should need more than this for one.
pub const MEMORY_CAP: usize = 512 << 20;
pub const MAX_INPUT: usize = 64 << 10;

struct CappedAlloc;
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// Whether passing the cap aborts (SIGABRT, which AFL++ records as a crash) rather than exiting
/// with status 3 (what the seeded driver reports).
pub static ABORT_ON_CAP: AtomicBool = AtomicBool::new(false);
/// What to print when the cap is hit (set before each input; read without allocating).
pub static ABORT_NOTE: std::sync::Mutex<Option<&'static [u8]>> = std::sync::Mutex::new(None);

unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        if live > MEMORY_CAP {
            over_cap(layout.size());
        }
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        if live > MEMORY_CAP {
            over_cap(layout.size());
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            let grow = new_size - layout.size();
            let live = LIVE.fetch_add(grow, Ordering::Relaxed) + grow;
            if live > MEMORY_CAP {
                over_cap(new_size);
            }
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: CappedAlloc = CappedAlloc;

/// Report without allocating and leave. The input being parsed is already on disk (its path is
/// in the note), so it survives.
fn over_cap(size: usize) -> ! {
    let write = |b: &[u8]| unsafe {
        libc::write(2, b.as_ptr().cast(), b.len());
    };
    write(b"\nFUZZ FAILURE: allocation past the memory cap (");
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = size;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    write(&digits[i..]);
    write(b" bytes requested)\n");
    if let Ok(guard) = ABORT_NOTE.try_lock() {
        if let Some(note) = *guard {
            write(note);
        }
    }
    if ABORT_ON_CAP.load(Ordering::Relaxed) {
        unsafe { libc::abort() }
    }
    unsafe { libc::_exit(3) }
}

// ------------------------------------------------------------------------------------------
// Targets.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Safetensors,
    Gguf,
    Pytorch,
    Config,
    Tokenizer,
    TokenizerConfig,
    ChatTemplate,
    Calib,
}

pub const TARGETS: [Target; 8] = [
    Target::Safetensors,
    Target::Gguf,
    Target::Pytorch,
    Target::Config,
    Target::Tokenizer,
    Target::TokenizerConfig,
    Target::ChatTemplate,
    Target::Calib,
];

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Safetensors => "safetensors",
            Target::Gguf => "gguf",
            Target::Pytorch => "pytorch",
            Target::Config => "config",
            Target::Tokenizer => "tokenizer",
            Target::TokenizerConfig => "tokenizer_config",
            Target::ChatTemplate => "chat_template",
            Target::Calib => "calib",
        }
    }
    pub fn from_name(name: &str) -> Option<Target> {
        TARGETS.into_iter().find(|t| t.name() == name)
    }
    pub fn text(self) -> bool {
        !matches!(self, Target::Safetensors | Target::Gguf | Target::Pytorch)
    }
}

/// Run one input through the target's parser (and what reads its result). Errors are fine;
/// only panics, hangs and memory blow-ups are failures.
/// Returns whether the parser accepted the input.
pub fn run_target(target: Target, input: &[u8], dir: &Path) -> bool {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("work dir");
    match target {
        Target::Safetensors => {
            let path = dir.join("model.safetensors");
            std::fs::write(&path, input).expect("write");
            let Ok(f) = SafetensorsFile::open(&path) else {
                return false;
            };
            read_all(&f);
            let _ = f.metadata().len();
        }
        Target::Gguf => {
            let path = dir.join("model.gguf");
            std::fs::write(&path, input).expect("write");
            let Ok(f) = GgufFile::open(&path) else {
                return false;
            };
            for t in f.tensor_infos() {
                let _ = f.dequantize(&t.name);
            }
            if let Ok(tok) = AutoTokenizer::from_gguf_metadata(f.metadata()) {
                exercise_tokenizer(&tok);
            }
            if let Ok(w) = GgufWeights::new(f) {
                let _ = w.hf_config();
                read_all(&w);
            }
        }
        Target::Pytorch => {
            let path = dir.join("pytorch_model.bin");
            std::fs::write(&path, input).expect("write");
            let Ok(f) = PytorchFile::open(&path) else {
                return false;
            };
            read_all(&f);
        }
        Target::Config => {
            let path = dir.join("config.json");
            std::fs::write(&path, input).expect("write");
            let Ok(cfg) = AutoConfig::from_pretrained(&path) else {
                return false;
            };
            let _ = autoquant::checkpoint::quantized_linear_factory(&cfg, None, Default::default());
        }
        Target::Tokenizer => {
            std::fs::write(dir.join("tokenizer.json"), input).expect("write");
            std::fs::write(dir.join("tokenizer_config.json"), SEED_TOKENIZER_CONFIG)
                .expect("write");
            let Ok(tok) = AutoTokenizer::from_dir(dir) else {
                return false;
            };
            exercise_tokenizer(&tok);
        }
        Target::TokenizerConfig => {
            std::fs::write(dir.join("tokenizer.json"), seed_tokenizer_json()).expect("write");
            std::fs::write(dir.join("tokenizer_config.json"), input).expect("write");
            let Ok(tok) = AutoTokenizer::from_dir(dir) else {
                return false;
            };
            exercise_tokenizer(&tok);
        }
        Target::ChatTemplate => {
            let Ok(template) = std::str::from_utf8(input) else {
                return false;
            };
            let mut md = tokenizer_metadata();
            md.insert(
                "tokenizer.chat_template".into(),
                GgufValue::String(template.into()),
            );
            let Ok(tok) = AutoTokenizer::from_gguf_metadata(&md) else {
                return false;
            };
            return exercise_tokenizer(&tok);
        }
        Target::Calib => {
            let path = dir.join("windows.json");
            std::fs::write(&path, input).expect("write");
            let Ok(mut c) = CalibData::from_windows_json(&path) else {
                return false;
            };
            c.check_against(64);
            let _ = c.num_tokens();
        }
    }
    true
}

fn read_all(src: &dyn WeightSource) {
    for name in src.names() {
        let _ = src.info(&name);
        let _ = src.read(&name);
    }
}

/// Encode, decode and render a chat; returns whether the chat rendered (or there is no template).
fn exercise_tokenizer(tok: &AutoTokenizer) -> bool {
    if let Ok(ids) = tok.encode("Hello wörld, ab ba <s>!", true) {
        let _ = tok.decode(&ids, false);
    }
    let _ = tok.decode(&[0, 1, 2, 3, u32::MAX], true);
    let messages = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "hi"),
        ChatMessage::new("assistant", "hello"),
        ChatMessage::new("user", "ab"),
    ];
    tok.chat_template().is_none() || tok.apply_chat_template(&messages, true).is_ok()
}

// ------------------------------------------------------------------------------------------
// Fixed companions of the mutated file (also seeds of their own targets).

pub const SEED_TOKENIZER_CONFIG: &str = r#"{"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
 "add_bos_token": true, "model_max_length": 2048,
 "chat_template": "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"}"#;

pub fn seed_tokenizer_json() -> String {
    let mut vocab = serde_json::Map::new();
    let base = [
        "<unk>", "<s>", "</s>", "a", "b", "c", "d", "e", "h", "l", "o", "r", "w", "Ġ", "ab", "Ġa",
        "he", "ll", "lo", "hell", "hello",
    ];
    for (i, t) in base.iter().enumerate() {
        vocab.insert(t.to_string(), serde_json::json!(i));
    }
    serde_json::to_string_pretty(&serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "vocab": vocab,
            "merges": ["a b", "Ġ a", "h e", "l l", "l o", "he ll", "hell o"]
        }
    }))
    .expect("json")
}

/// GGUF tokenizer metadata of a tiny byte-level BPE.
pub fn tokenizer_metadata() -> Metadata {
    let mut md = Metadata::new();
    md.insert(
        "tokenizer.ggml.model".into(),
        GgufValue::String("gpt2".into()),
    );
    md.insert(
        "tokenizer.ggml.pre".into(),
        GgufValue::String("gpt2".into()),
    );
    let tokens = ["<s>", "</s>", "a", "b", "ab", "Ġ", "Ġa"];
    md.insert(
        "tokenizer.ggml.tokens".into(),
        GgufValue::Array(
            tokens
                .iter()
                .map(|t| GgufValue::String(t.to_string()))
                .collect(),
        ),
    );
    md.insert(
        "tokenizer.ggml.token_type".into(),
        GgufValue::Array(
            [3, 3, 1, 1, 1, 1, 1]
                .iter()
                .map(|&t| GgufValue::I32(t))
                .collect(),
        ),
    );
    md.insert(
        "tokenizer.ggml.merges".into(),
        GgufValue::Array(vec![
            GgufValue::String("a b".into()),
            GgufValue::String("Ġ a".into()),
        ]),
    );
    md.insert("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(0));
    md.insert("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(1));
    md
}
