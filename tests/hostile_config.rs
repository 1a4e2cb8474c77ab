//! Hostile configs and arguments: absurd sizes, zero dimensions, keys that change the output,
//! positions past the model's context, bad generation settings, thread counts and calibration
//! sizes. Each gets a clear error naming the file and key — never a panic, an abort on
//! allocation, or a silently different answer.

mod common;

use autoquant::config::AutoConfig;
use autoquant::models::{AutoModelForCausalLM, CausalLM, ForwardInput, LoadOptions, LogitsMode};
use common::asset;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_autoquant");

/// Run the binary under a 1 GiB address-space limit (an unbounded allocation then aborts
/// instead of exhausting the machine), with two worker threads.
fn run_limited(args: &[&str]) -> Output {
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 1048576; exec \"$0\" --threads 2 \"$@\"")
        .arg(BIN)
        .args(args)
        .output()
        .unwrap();
    assert_small_children();
    out
}

/// Peak resident memory of every child this test process has waited for stays small: a
/// refusal must come before the allocation, not after it.
fn assert_small_children() {
    // SAFETY: getrusage only writes into the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    assert_eq!(rc, 0);
    let kib = usage.ru_maxrss as u64;
    assert!(
        kib < 200 * 1024,
        "a child reached {kib} KiB of resident memory"
    );
}

/// Exit status 1 with `error:` and every `needle` in stderr (not a panic, abort or success).
fn assert_clear_error(out: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected a clean error exit, got {:?}: {stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("error:"), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "`{n}` missing from: {stderr}");
    }
    stderr
}

fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

fn tiny_llama() -> Value {
    json!({"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 64})
}

fn with(mut base: Value, key: &str, value: Value) -> Value {
    base[key] = value;
    base
}

fn parse(v: Value) -> autoquant::Result<AutoConfig> {
    AutoConfig::from_value(v, Path::new("config.json"), None)
}

/// A model folder: random weights for a sane config (written with `synth`), then `config.json`
/// replaced by `hostile`.
fn folder_with_config(dir: &Path, hostile: &Value) -> std::path::PathBuf {
    let sane = dir.join("sane.json");
    write_json(&sane, &tiny_llama());
    let model = dir.join("model");
    let out = Command::new(BIN)
        .args([
            "synth",
            sane.to_str().unwrap(),
            "-o",
            model.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    write_json(&model.join("config.json"), hostile);
    model
}

#[test]
fn absurd_sizes_are_refused_before_anything_is_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("num_hidden_layers", json!(1_000_000_000_000u64)),
        ("vocab_size", json!(1u64 << 32)),
        ("hidden_size", json!(1u64 << 32)),
        ("intermediate_size", json!(1u64 << 40)),
        ("num_attention_heads", json!(1u64 << 30)),
        ("max_position_embeddings", json!(1u64 << 62)),
    ];
    for (key, value) in cases {
        let cfg = dir.path().join(format!("{key}.json"));
        write_json(&cfg, &with(tiny_llama(), key, value));
        let out = run_limited(&["estimate", cfg.to_str().unwrap()]);
        assert_clear_error(&out, &[key, &format!("{key}.json"), "out of range"]);
    }
    // Each size in bounds, their product not: the parameter count is refused too (today's
    // estimate wraps around to a few bytes or prints nonsense).
    let huge = json!({"model_type": "llama", "vocab_size": 1 << 20, "hidden_size": 1 << 16,
        "intermediate_size": 1 << 20, "num_hidden_layers": 4000, "num_attention_heads": 64,
        "max_position_embeddings": 4096});
    let cfg = dir.path().join("huge.json");
    write_json(&cfg, &huge);
    let out = run_limited(&["estimate", cfg.to_str().unwrap()]);
    assert_clear_error(&out, &["parameters", "huge.json"]);

    // gpt2 / opt position tables and widths.
    let gpt2 = json!({"model_type": "gpt2", "vocab_size": 64, "n_embd": 32, "n_layer": 2,
                      "n_head": 4, "n_positions": 1_000_000_000_000u64});
    let cfg = dir.path().join("gpt2.json");
    write_json(&cfg, &gpt2);
    assert_clear_error(
        &run_limited(&["estimate", cfg.to_str().unwrap()]),
        &["n_positions"],
    );
    let opt = json!({"model_type": "opt", "vocab_size": 64, "hidden_size": 32, "ffn_dim": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4,
                     "word_embed_proj_dim": 1u64 << 40});
    let cfg = dir.path().join("opt.json");
    write_json(&cfg, &opt);
    assert_clear_error(
        &run_limited(&["estimate", cfg.to_str().unwrap()]),
        &["word_embed_proj_dim"],
    );

    // info and quantize read config.json the same way.
    let model = folder_with_config(
        dir.path(),
        &with(
            tiny_llama(),
            "num_hidden_layers",
            json!(1_000_000_000_000u64),
        ),
    );
    let m = model.to_str().unwrap();
    assert_clear_error(&run_limited(&["info", m]), &["num_hidden_layers"]);
    assert_clear_error(
        &run_limited(&["quantize", m, "--method", "rtn", "--dry-run"]),
        &["num_hidden_layers"],
    );
}

#[test]
fn config_must_agree_with_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    // In bounds, but the checkpoint holds 2 blocks: refused up front, naming both counts.
    let model = folder_with_config(
        dir.path(),
        &with(tiny_llama(), "num_hidden_layers", json!(4000)),
    );
    let m = model.to_str().unwrap();
    for args in [
        vec!["info", m],
        vec!["quantize", m, "--method", "rtn", "--dry-run"],
    ] {
        assert_clear_error(
            &run_limited(&args),
            &["num_hidden_layers", "4000", "2 blocks"],
        );
    }
    // Fewer layers in the config than in the weights would silently drop blocks.
    write_json(
        &model.join("config.json"),
        &with(tiny_llama(), "num_hidden_layers", json!(1)),
    );
    assert_clear_error(
        &run_limited(&["info", m]),
        &["num_hidden_layers", "2 blocks"],
    );
    // A wrong width is named with the tensor that contradicts it.
    write_json(
        &model.join("config.json"),
        &with(tiny_llama(), "vocab_size", json!(100)),
    );
    assert_clear_error(
        &run_limited(&["info", m]),
        &["model.embed_tokens.weight", "vocab_size"],
    );
}

#[test]
fn zero_dimensions_are_refused_with_the_key() {
    let llama_keys = [
        "head_dim",
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "intermediate_size",
        "max_position_embeddings",
    ];
    for key in llama_keys {
        for model_type in ["llama", "mistral", "qwen2", "qwen3"] {
            let cfg = with(
                with(tiny_llama(), key, json!(0)),
                "model_type",
                json!(model_type),
            );
            let err = common::err_text(parse(cfg));
            assert!(
                err.contains(key) && err.contains("config.json"),
                "{model_type} {key}: {err}"
            );
        }
    }
    let gpt2 = json!({"model_type": "gpt2", "vocab_size": 64, "n_embd": 32, "n_layer": 2,
                      "n_head": 4, "n_positions": 64, "n_inner": 64});
    for key in ["n_positions", "n_inner", "n_embd", "n_head", "vocab_size"] {
        let err = common::err_text(parse(with(gpt2.clone(), key, json!(0))));
        assert!(err.contains(key), "gpt2 {key}: {err}");
    }
    let opt = json!({"model_type": "opt", "vocab_size": 64, "hidden_size": 32, "ffn_dim": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4,
                     "max_position_embeddings": 64, "word_embed_proj_dim": 32});
    for key in [
        "word_embed_proj_dim",
        "ffn_dim",
        "hidden_size",
        "num_attention_heads",
        "vocab_size",
        "max_position_embeddings",
    ] {
        let err = common::err_text(parse(with(opt.clone(), key, json!(0))));
        assert!(err.contains(key), "opt {key}: {err}");
    }
    let neox = json!({"model_type": "gpt_neox", "vocab_size": 64, "hidden_size": 32,
                      "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "max_position_embeddings": 64, "rotary_pct": 0.25});
    for key in [
        "intermediate_size",
        "hidden_size",
        "num_attention_heads",
        "vocab_size",
        "max_position_embeddings",
    ] {
        let err = common::err_text(parse(with(neox.clone(), key, json!(0))));
        assert!(err.contains(key), "gpt_neox {key}: {err}");
    }
    for (key, v) in [
        ("hidden_size", json!(1u64 << 40)),
        ("rotary_emb_base", json!(0.0)),
        ("rotary_pct", json!(-0.5)),
        ("layer_norm_eps", json!(-1.0)),
    ] {
        let err = common::err_text(parse(with(neox.clone(), key, v)));
        assert!(err.contains(key), "gpt_neox {key}: {err}");
    }
    // Numbers that make every output NaN are refused as well.
    for (key, v) in [("rms_norm_eps", json!(-1.0)), ("rope_theta", json!(0.0))] {
        let err = common::err_text(parse(with(tiny_llama(), key, v)));
        assert!(err.contains(key), "{key}: {err}");
    }
    let err = common::err_text(parse(with(
        tiny_llama(),
        "rope_scaling",
        json!({"rope_type": "linear", "factor": 0.0}),
    )));
    assert!(err.contains("factor"), "{err}");
}

fn model(cfg: Value) -> Box<dyn CausalLM> {
    AutoModelForCausalLM::from_config(parse(cfg).unwrap(), 7, &LoadOptions::default()).unwrap()
}

fn ids(n: usize, vocab: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7 + 3) % vocab).collect()
}

/// A one-layer Mistral with a window of `W` keys computes, at position `i`, exactly what the
/// same weights without a window compute on the `W` tokens ending at `i` (given their
/// original position ids): an independent statement of transformers' rule (a query at cache
/// index `i` sees keys `j` with `i - W < j <= i`).
#[test]
fn mistral_sliding_window_is_applied() {
    const W: usize = 4;
    let one_layer = with(tiny_llama(), "num_hidden_layers", json!(1));
    let full = model(one_layer.clone());
    let windowed = model(with(
        with(one_layer, "model_type", json!("mistral")),
        "sliding_window",
        json!(W),
    ));
    let vocab = 64;
    let seq = ids(12, vocab as u32);
    let mut cache = windowed.new_cache(1);
    let got = windowed
        .forward(&ForwardInput::single(&seq), &mut cache, LogitsMode::All)
        .unwrap();
    for i in 0..seq.len() {
        let lo = (i + 1).saturating_sub(W);
        let input = ForwardInput {
            ids: seq[lo..=i].to_vec(),
            batch: 1,
            attention_mask: None,
            position_ids: Some(vec![(lo..=i).collect()]),
        };
        let mut c = full.new_cache(1);
        let want = full.forward(&input, &mut c, LogitsMode::Last).unwrap();
        let d = common::max_abs_diff(&got[i * vocab..(i + 1) * vocab], &want);
        assert!(d < 1e-4, "position {i}: max |diff| {d}");
    }
    // Decoding through the cache one token at a time gives the same logits as the prefill.
    let mut cache = windowed.new_cache(1);
    for (i, &t) in seq.iter().enumerate() {
        let step = windowed
            .forward(&ForwardInput::single(&[t]), &mut cache, LogitsMode::Last)
            .unwrap();
        let d = common::max_abs_diff(&step, &got[i * vocab..(i + 1) * vocab]);
        assert!(d < 1e-4, "decode step {i}: max |diff| {d}");
    }
    // A left-padded batch: the window counts cache slots, padding included, so the padded
    // row matches its unpadded run (and the other row its own).
    let pad = 3;
    let other = ids(seq.len() + pad, 61);
    let mut padded = vec![0u32; pad];
    padded.extend_from_slice(&seq);
    let row_mask: Vec<u8> = std::iter::repeat(0)
        .take(pad)
        .chain(std::iter::repeat(1).take(seq.len()))
        .collect();
    let input = ForwardInput {
        ids: [padded, other.clone()].concat(),
        batch: 2,
        attention_mask: Some(vec![row_mask, vec![1; other.len()]]),
        position_ids: None,
    };
    let mut cache = windowed.new_cache(2);
    let out = windowed
        .forward(&input, &mut cache, LogitsMode::All)
        .unwrap();
    let t = seq.len() + pad;
    let d = common::max_abs_diff(&out[pad * vocab..t * vocab], &got);
    assert!(d < 1e-4, "left-padded row: max |diff| {d}");
    let mut c = windowed.new_cache(1);
    let alone = windowed
        .forward(&ForwardInput::single(&other), &mut c, LogitsMode::All)
        .unwrap();
    let d = common::max_abs_diff(&out[t * vocab..], &alone);
    assert!(d < 1e-4, "unpadded row: max |diff| {d}");
}

/// Qwen2 and Qwen3 window only when `use_sliding_window` is true, and then only layers from
/// `max_window_layers` on (or those `layer_types` names `sliding_attention`).
#[test]
fn qwen_sliding_window_follows_its_switches() {
    for model_type in ["qwen2", "qwen3"] {
        qwen_sliding_window(model_type);
    }
}

fn qwen_sliding_window(model_type: &str) {
    let base = with(
        with(tiny_llama(), "model_type", json!(model_type)),
        "num_hidden_layers",
        json!(1),
    );
    let seq = ids(10, 64);
    let logits = |cfg: Value| {
        let m = model(cfg);
        let mut c = m.new_cache(1);
        m.forward(&ForwardInput::single(&seq), &mut c, LogitsMode::All)
            .unwrap()
    };
    let plain = logits(base.clone());
    let off = logits(with(
        with(base.clone(), "sliding_window", json!(3)),
        "use_sliding_window",
        json!(false),
    ));
    assert_eq!(plain, off, "use_sliding_window false must not window");
    let on = |extra: &[(&str, Value)]| {
        let mut c = with(
            with(base.clone(), "sliding_window", json!(3)),
            "use_sliding_window",
            json!(true),
        );
        for (k, v) in extra {
            c[*k] = v.clone();
        }
        logits(c)
    };
    // Layer 0 is below max_window_layers 1: full attention.
    assert_eq!(on(&[("max_window_layers", json!(1))]), plain);
    let windowed = on(&[("max_window_layers", json!(0))]);
    assert!(
        common::max_abs_diff(&windowed, &plain) > 1e-3,
        "window ignored"
    );
    assert_eq!(
        on(&[("layer_types", json!(["sliding_attention"]))]),
        windowed
    );
    assert_eq!(on(&[("layer_types", json!(["full_attention"]))]), plain);
    let err = common::err_text(parse(with(
        base.clone(),
        "layer_types",
        json!(["chunked_attention"]),
    )));
    assert!(err.contains("layer_types"), "{model_type}: {err}");
    let err = common::err_text(parse(with(
        with(base, "sliding_window", json!(0)),
        "use_sliding_window",
        json!(true),
    )));
    assert!(err.contains("sliding_window"), "{model_type}: {err}");
}

#[test]
fn learned_positions_past_the_table_are_refused() {
    let gpt2 = model(
        json!({"model_type": "gpt2", "vocab_size": 64, "n_embd": 32, "n_layer": 1,
                            "n_head": 4, "n_positions": 16, "n_inner": 64}),
    );
    let opt = model(
        json!({"model_type": "opt", "vocab_size": 64, "hidden_size": 32,
                           "ffn_dim": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                           "max_position_embeddings": 16}),
    );
    for (m, key) in [(gpt2, "n_positions"), (opt, "max_position_embeddings")] {
        // 16 positions fit; the 17th is refused, in one call or one token at a time.
        let mut cache = m.new_cache(1);
        m.forward(
            &ForwardInput::single(&ids(16, 64)),
            &mut cache,
            LogitsMode::Last,
        )
        .unwrap();
        let err =
            common::err_text(m.forward(&ForwardInput::single(&[1]), &mut cache, LogitsMode::Last));
        assert!(err.contains("16") && err.contains(key), "{err}");
        let mut cache = m.new_cache(1);
        let err = common::err_text(m.forward(
            &ForwardInput::single(&ids(20, 64)),
            &mut cache,
            LogitsMode::All,
        ));
        assert!(err.contains(key), "{err}");
        // Perplexity refuses the window length up front.
        let opts = autoquant::eval::perplexity::PplOptions {
            seqlen: 20,
            protocol: autoquant::eval::perplexity::Protocol::Paper,
            max_windows: None,
            token_by_token: false,
        };
        let err = common::err_text(autoquant::eval::perplexity::perplexity(
            m.as_ref(),
            &ids(100, 64),
            "ids",
            &opts,
            |_, _, _| {},
        ));
        assert!(err.contains("20") && err.contains("16"), "{err}");
        // Generation refuses a prompt plus new tokens past the table.
        let cfg = autoquant::generate::GenerationConfig {
            max_new_tokens: 10,
            ..Default::default()
        };
        let err = common::err_text(autoquant::generate::generate(
            m.as_ref(),
            &ids(10, 64),
            &cfg,
            |_| Ok(false),
        ));
        assert!(err.contains("16"), "{err}");
    }
}

#[test]
fn lengths_past_the_context_are_refused_by_every_command() {
    let Some(model) = asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let Some(text) = asset("text/wiki.calib.txt") else {
        return;
    };
    let (m, t) = (model.to_str().unwrap(), text.to_str().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let o = dir.path().join("q");
    let o = o.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["ppl", m, "--data", t, "--seqlen", "9000"],
        vec![
            "bench",
            m,
            "--prompt-len",
            "9000",
            "--gen-len",
            "1",
            "--repetitions",
            "1",
        ],
        vec![
            "bench",
            m,
            "--prompt-len",
            "8",
            "--gen-len",
            "9000",
            "--repetitions",
            "1",
        ],
        vec![
            "generate",
            m,
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "9000",
        ],
        vec![
            "quantize", m, "--method", "gptq", "--calib", t, "--seqlen", "9000", "-o", o,
        ],
    ];
    // Saved windows longer than the context, also when only estimating (--dry-run).
    let windows = dir.path().join("windows.json");
    std::fs::write(
        &windows,
        serde_json::to_vec(&vec![vec![1u32; 9000]]).unwrap(),
    )
    .unwrap();
    let w = windows.to_str().unwrap();
    let mut cases = cases;
    for dry in [false, true] {
        let mut args = vec![
            "quantize",
            m,
            "--method",
            "gptq",
            "--calib-windows",
            w,
            "-o",
            o,
        ];
        if dry {
            args.push("--dry-run");
        }
        cases.push(args);
    }
    for args in cases {
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert_clear_error(&out, &["9000", "8192"]);
    }
    assert!(!Path::new(o).exists());
}

#[test]
fn generation_config_values_are_validated() {
    let Some(gguf) = asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let file = autoquant::formats::gguf::GgufFile::open(&gguf).unwrap();
    let config = AutoConfig::from_value(file.hf_config().unwrap(), &gguf, Some(&gguf)).unwrap();
    let tok = autoquant::tokenizer::AutoTokenizer::from_gguf_metadata(file.metadata()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("temperature", json!(-1.0)),
        ("temperature", json!("hot")),
        ("top_p", json!(2.0)),
        ("top_p", json!(0.0)),
        ("top_k", json!(-5)),
        ("top_k", json!(1.5)),
        ("repetition_penalty", json!(0.0)),
        ("do_sample", json!("yes")),
        ("max_new_tokens", json!(-3)),
    ];
    for (key, value) in cases {
        write_json(
            &dir.path().join("generation_config.json"),
            &json!({ key: value, "eos_token_id": 2 }),
        );
        let err = common::err_text(autoquant::auto::generation_defaults(
            dir.path(),
            &config,
            &tok,
            true,
        ));
        assert!(
            err.contains("generation_config.json") && err.contains(key),
            "{key} = {value}: {err}"
        );
    }
    // Sampling settings that are valid (temperature 0 with greedy decoding among them) load.
    write_json(
        &dir.path().join("generation_config.json"),
        &json!({"do_sample": false, "temperature": 0.0, "top_p": 0.9, "top_k": 20,
                "eos_token_id": 2}),
    );
    let g = autoquant::auto::generation_defaults(dir.path(), &config, &tok, true).unwrap();
    assert_eq!((g.top_k, g.top_p), (20, 0.9));
}

#[test]
fn thread_counts_are_bounded_and_pool_failures_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    write_json(&cfg, &tiny_llama());
    let c = cfg.to_str().unwrap();
    for n in ["0", "100000"] {
        let out = Command::new(BIN)
            .args(["--threads", n, "estimate", c])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--threads {n} accepted");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            stderr.contains("--threads") && stderr.contains("1024"),
            "{stderr}"
        );
    }
    // 400 threads with 8 MiB stacks do not fit in 512 MiB of address space: the pool cannot
    // be built, which is an error, not a panic.
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 524288; exec \"$0\" --threads 400 estimate \"$1\"")
        .arg(BIN)
        .arg(c)
        .output()
        .unwrap();
    assert_clear_error(&out, &["threads"]);
}

#[test]
fn calibration_sizes_are_bounded_before_allocating() {
    let Some(model) = asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let Some(text) = asset("text/wiki.calib.txt") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let o = dir.path().join("q");
    for method in ["gptq", "awq"] {
        let out = run_limited(&[
            "quantize",
            model.to_str().unwrap(),
            "--method",
            method,
            "--calib",
            text.to_str().unwrap(),
            "--nsamples",
            "1000000000",
            "--seqlen",
            "64",
            "-o",
            o.to_str().unwrap(),
        ]);
        assert_clear_error(&out, &["--nsamples", "1000000000"]);
        // The dry run's memory estimate multiplies the same numbers.
        let out = run_limited(&[
            "quantize",
            model.to_str().unwrap(),
            "--method",
            method,
            "--nsamples",
            "1000000000",
            "--seqlen",
            "64",
            "--dry-run",
        ]);
        assert_clear_error(&out, &["--nsamples"]);
    }
    assert!(!o.exists());
}

/// A minimal GGUF (v3): `kv` metadata and no tensors.
fn gguf_bytes(kv: &[(&str, GgufKv)]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend((kv.len() as u64).to_le_bytes());
    for (key, value) in kv {
        b.extend((key.len() as u64).to_le_bytes());
        b.extend(key.as_bytes());
        match value {
            GgufKv::U32(v) => {
                b.extend(4u32.to_le_bytes());
                b.extend(v.to_le_bytes());
            }
            GgufKv::U64(v) => {
                b.extend(10u32.to_le_bytes());
                b.extend(v.to_le_bytes());
            }
            GgufKv::F32(v) => {
                b.extend(6u32.to_le_bytes());
                b.extend(v.to_le_bytes());
            }
            GgufKv::Str(s) => {
                b.extend(8u32.to_le_bytes());
                b.extend((s.len() as u64).to_le_bytes());
                b.extend(s.as_bytes());
            }
        }
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b
}

enum GgufKv {
    U32(u32),
    U64(u64),
    F32(f32),
    Str(&'static str),
}

fn tiny_gguf_kv(block_count: u64, context: u64) -> Vec<(&'static str, GgufKv)> {
    vec![
        ("general.architecture", GgufKv::Str("llama")),
        ("llama.embedding_length", GgufKv::U32(32)),
        ("llama.feed_forward_length", GgufKv::U32(64)),
        ("llama.attention.head_count", GgufKv::U32(4)),
        ("llama.attention.layer_norm_rms_epsilon", GgufKv::F32(1e-5)),
        ("llama.vocab_size", GgufKv::U32(64)),
        ("llama.block_count", GgufKv::U64(block_count)),
        ("llama.context_length", GgufKv::U64(context)),
    ]
}

#[test]
fn gguf_sizes_are_bounded_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (100_000_000u64, 2048u64, "llama.block_count", "100000000"),
        (2, 1u64 << 63, "llama.context_length", "9223372036854775808"),
    ];
    for (blocks, ctx, key, value) in cases {
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, gguf_bytes(&tiny_gguf_kv(blocks, ctx))).unwrap();
        let p = path.to_str().unwrap();
        for cmd in ["estimate", "info"] {
            let stderr = assert_clear_error(&run_limited(&[cmd, p]), &[key, value, "m.gguf"]);
            assert!(stderr.contains("out of range"), "{stderr}");
        }
    }
}

#[test]
fn gguf_yarn_scaling_is_read_or_refused() {
    use autoquant::formats::gguf::GgufWeights;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let mut kv = tiny_gguf_kv(2, 2048);
    kv.push(("llama.rope.scaling.type", GgufKv::Str("yarn")));
    kv.push(("llama.rope.scaling.factor", GgufKv::F32(4.0)));
    kv.push((
        "llama.rope.scaling.original_context_length",
        GgufKv::U32(512),
    ));
    kv.push(("llama.rope.scaling.yarn_beta_fast", GgufKv::F32(16.0)));
    std::fs::write(&path, gguf_bytes(&kv)).unwrap();
    let config = GgufWeights::open(&path).unwrap().hf_config().unwrap();
    assert_eq!(
        config["rope_scaling"],
        json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
               "beta_fast": 16.0})
    );
    // A YaRN key whose llama.cpp meaning transformers' parameters do not carry is refused.
    kv.push(("llama.rope.scaling.yarn_log_multiplier", GgufKv::F32(0.1)));
    std::fs::write(&path, gguf_bytes(&kv)).unwrap();
    let err = match GgufWeights::open(&path).and_then(|w| w.hf_config()) {
        Ok(c) => panic!("accepted: {}", c["rope_scaling"]),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("yarn_log_multiplier"), "{err}");
}
