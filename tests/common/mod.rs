//! Shared helpers for integration tests that use the real assets (scripts/fetch_assets.sh).
#![allow(dead_code)]

use std::path::PathBuf;

/// The asset folder: `$AUTOQUANT_ASSETS`, else `${AUTOQUANT_HOME:-~/.cache/autoquant}/assets`.
/// Returns `None` (the test then skips its checks) unless the file exists; with
/// `AUTOQUANT_REQUIRE_ASSETS=1` (scripts/test.sh sets it unless told `=0`) a missing asset fails
/// the test instead. A skip is printed, and also appended to the file `AUTOQUANT_SKIP_LOG` names,
/// so scripts/test.sh can count them (libtest hides the output of passing tests).
pub fn asset(relative: &str) -> Option<PathBuf> {
    let root = std::env::var_os("AUTOQUANT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("AUTOQUANT_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                        .join(".cache/autoquant")
                });
            home.join("assets")
        });
    let path = root.join(relative);
    if path.exists() {
        return Some(path);
    }
    if std::env::var("AUTOQUANT_REQUIRE_ASSETS").as_deref() == Ok("1") {
        panic!(
            "asset {} is missing (run scripts/fetch_assets.sh)",
            path.display()
        );
    }
    let test = std::thread::current().name().unwrap_or("?").to_string();
    let line = format!(
        "SKIPPED {test}: asset {} not found (run scripts/fetch_assets.sh)",
        path.display()
    );
    eprintln!("{line}");
    if let Some(log) = std::env::var_os("AUTOQUANT_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(log)
        {
            let _ = writeln!(f, "{line}");
        }
    }
    None
}

pub fn fixture(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(relative)
}

pub fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// The message of an expected error (panics when there is none).
pub fn err_text<T>(r: autoquant::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// Deterministic normal samples (xorshift + Box–Muller), so property tests need no extra crates.
pub struct Rng(pub u64);
impl Rng {
    pub fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
}

/// Largest absolute difference between two equally long vectors; infinite when any pair is
/// not comparable (a NaN on either side), so no bound passes it (`f32::max` alone would skip
/// NaNs).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(
            0.0,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        )
}

/// GGUF tokenizer metadata of the smallest byte-level BPE (`a`, `b`, `ab`; one merge) with the
/// pre-tokenizer name `pre`.
pub fn tiny_gguf_metadata(pre: &str) -> autoquant::formats::gguf::Metadata {
    use autoquant::formats::gguf::GgufValue;
    let mut md = autoquant::formats::gguf::Metadata::new();
    md.insert(
        "tokenizer.ggml.model".into(),
        GgufValue::String("gpt2".into()),
    );
    md.insert("tokenizer.ggml.pre".into(), GgufValue::String(pre.into()));
    let tokens = ["a", "b", "ab"]
        .iter()
        .map(|t| GgufValue::String(t.to_string()))
        .collect();
    md.insert("tokenizer.ggml.tokens".into(), GgufValue::Array(tokens));
    md.insert(
        "tokenizer.ggml.merges".into(),
        GgufValue::Array(vec![GgufValue::String("a b".into())]),
    );
    md
}

/// Every file under `dir` (recursively) by path relative to `dir`, with its bytes.
pub fn snapshot(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    fn walk(
        root: &std::path::Path,
        dir: &std::path::Path,
        out: &mut std::collections::BTreeMap<String, Vec<u8>>,
    ) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Largest |Δ| relative to the largest |want| (the scale of the logits).
pub fn max_rel_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    max_abs_diff(got, want) / scale
}

/// Logits `[t, vocab]` of one sequence run through the model at once (prefill kernels).
pub fn logits(model: &dyn autoquant::models::CausalLM, ids: &[u32]) -> Vec<f32> {
    use autoquant::models::{ForwardInput, LogitsMode};
    let mut cache = model.new_cache(1);
    model
        .forward(&ForwardInput::single(ids), &mut cache, LogitsMode::All)
        .unwrap()
}

/// The same logits computed one token at a time through the KV cache (decode kernels).
pub fn decode_logits(model: &dyn autoquant::models::CausalLM, ids: &[u32]) -> Vec<f32> {
    use autoquant::models::{ForwardInput, LogitsMode};
    let mut cache = model.new_cache(1);
    ids.iter()
        .flat_map(|&id| {
            model
                .forward(&ForwardInput::single(&[id]), &mut cache, LogitsMode::All)
                .unwrap()
        })
        .collect()
}
