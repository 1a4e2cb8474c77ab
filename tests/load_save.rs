//! save_pretrained round trips and bad checkpoints: every failure names the file (and tensor)
//! and leaves nothing half-written.

mod common;

use autoquant::auto::{save_pretrained, SaveOptions};
use autoquant::config::AutoConfig;
use autoquant::models::{load_dir, CausalLM, ForwardInput, LoadOptions, LogitsMode};
use autoquant::tensor::WeightDType;
use common::fixture;
use std::path::Path;

fn logits(m: &dyn CausalLM) -> Vec<f32> {
    m.forward(
        &ForwardInput::single(&[3, 14, 15, 92, 65]),
        &mut m.new_cache(1),
        LogitsMode::All,
    )
    .unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn save_pretrained_round_trips_every_architecture_sharded() {
    for name in [
        "llama_gqa_tied",
        "qwen2",
        "qwen3",
        "opt_350m_style",
        "gpt2",
        "gpt_neox",
        "gpt_neox_sequential",
    ] {
        let src = fixture(&format!("tiny/{name}"));
        let model = load_dir(&src, &LoadOptions::default()).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("saved");
        let opts = SaveOptions {
            max_shard_bytes: 20_000,
            ..Default::default()
        };
        save_pretrained(model.as_ref(), None, None, &out, &opts).unwrap();
        assert!(
            out.join("model.safetensors.index.json").exists(),
            "{name}: expected shards"
        );
        let again = load_dir(&out, &LoadOptions::default()).unwrap();
        assert_eq!(logits(model.as_ref()), logits(again.as_ref()), "{name}");
        // Every tensor of the source is saved, with the same values (qwen3's q_norm/k_norm
        // included).
        let (from, to) = (
            autoquant::formats::open_weights(&src).unwrap(),
            autoquant::formats::open_weights(&out).unwrap(),
        );
        for t in from.names() {
            let a = from.read(&t).unwrap().to_f32();
            let b = to
                .read(&t)
                .unwrap_or_else(|e| panic!("{name}: {t} not saved: {e}"))
                .to_f32();
            assert_eq!(a, b, "{name}: {t}");
        }
        // Parameter count and f32 footprint agree with the tensors actually saved.
        let saved: usize = autoquant::models::state_dict(model.as_ref(), WeightDType::F32)
            .iter()
            .map(|(_, t)| t.numel())
            .sum();
        assert_eq!(model.num_parameters(), saved, "{name}");
        assert_eq!(model.footprint_bytes(), 4 * saved, "{name}");
        // Keys we do not use survive.
        let before = AutoConfig::from_pretrained(&src).unwrap();
        let after = AutoConfig::from_pretrained(&out).unwrap();
        for key in before.raw.keys() {
            assert!(after.raw.contains_key(key), "{name}: config key {key} lost");
        }
        // Only the temporary folder's final name remains.
        let entries: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, vec![std::ffi::OsString::from("saved")]);
    }
}

#[test]
fn save_in_f16_halves_the_files_and_stays_close() {
    let src = fixture("tiny/llama_linear_rope");
    let model = load_dir(&src, &LoadOptions::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("f16");
    save_pretrained(
        model.as_ref(),
        None,
        None,
        &out,
        &SaveOptions {
            dtype: WeightDType::F16,
            ..Default::default()
        },
    )
    .unwrap();
    let f32_size = std::fs::metadata(src.join("model.safetensors"))
        .unwrap()
        .len();
    let f16_size = std::fs::metadata(out.join("model.safetensors"))
        .unwrap()
        .len();
    assert!(f16_size * 10 < f32_size * 6, "{f16_size} vs {f32_size}");
    let cfg = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(cfg.contains("\"float16\""), "{cfg}");
    let again = load_dir(&out, &LoadOptions::default()).unwrap();
    let (a, b) = (logits(model.as_ref()), logits(again.as_ref()));
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 0.05));
}

#[test]
fn saving_over_an_existing_folder_is_refused_without_overwrite() {
    let model = load_dir(&fixture("tiny/gpt2"), &LoadOptions::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("keep.txt"), "mine").unwrap();
    let err = save_pretrained(
        model.as_ref(),
        None,
        None,
        tmp.path(),
        &SaveOptions::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains(&tmp.path().display().to_string()),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("keep.txt")).unwrap(),
        "mine"
    );
}

/// Copy a fixture, break it with `edit`, and check the load error mentions every `needle`.
fn broken(name: &str, edit: impl FnOnce(&Path), needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    copy_dir(&fixture(&format!("tiny/{name}")), &dir);
    edit(&dir);
    let err = match load_dir(&dir, &LoadOptions::default()) {
        Ok(_) => panic!("{name}: broken checkpoint loaded"),
        Err(e) => e.to_string(),
    };
    for n in needles {
        assert!(err.contains(n), "error `{err}` does not mention `{n}`");
    }
}

fn rewrite_tensor(dir: &Path, f: impl Fn(&mut Vec<(String, autoquant::tensor::RawTensor)>)) {
    use autoquant::formats::WeightSource;
    let file = dir.join("model.safetensors");
    let src = autoquant::formats::safetensors::SafetensorsFile::open(&file).unwrap();
    let mut tensors: Vec<_> = src
        .names()
        .into_iter()
        .map(|n| (n.clone(), src.read(&n).unwrap()))
        .collect();
    drop(src);
    f(&mut tensors);
    std::fs::remove_file(&file).unwrap();
    autoquant::formats::safetensors::save_safetensors_in_memory(
        dir,
        &tensors,
        u64::MAX,
        &Default::default(),
    )
    .unwrap();
}

/// A GPT-NeoX checkpoint whose output projection is `lm_head.weight` (transformers ≥ 5 names
/// the module so) loads as one holding `embed_out.weight`, and is saved under the name released
/// checkpoints use; one with neither is refused naming `embed_out.weight`.
#[test]
fn gpt_neox_reads_lm_head_or_embed_out_and_saves_embed_out() {
    let src = fixture("tiny/gpt_neox");
    let model = load_dir(&src, &LoadOptions::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("renamed");
    copy_dir(&src, &dir);
    rewrite_tensor(&dir, |t| {
        for (n, _) in t.iter_mut() {
            if n == "embed_out.weight" {
                *n = "lm_head.weight".into();
            }
        }
    });
    let renamed = load_dir(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(logits(model.as_ref()), logits(renamed.as_ref()));
    let out = tmp.path().join("saved");
    save_pretrained(renamed.as_ref(), None, None, &out, &SaveOptions::default()).unwrap();
    let saved = autoquant::formats::open_weights(&out).unwrap();
    assert!(saved.info("embed_out.weight").is_some());
    assert!(saved.info("lm_head.weight").is_none());

    rewrite_tensor(&dir, |t| t.retain(|(n, _)| n != "lm_head.weight"));
    let err = load_dir(&dir, &LoadOptions::default())
        .err()
        .expect("no output projection")
        .to_string();
    assert!(
        err.contains("embed_out.weight") && err.contains("model.safetensors"),
        "{err}"
    );
}

#[test]
fn bad_checkpoints_give_clear_errors() {
    broken(
        "llama_gqa_tied",
        |d| std::fs::write(d.join("config.json"), "{\"model_type\": \"llama\",").unwrap(),
        &["config.json", "malformed JSON"],
    );
    broken(
        "llama_gqa_tied",
        |d| {
            let c = std::fs::read_to_string(d.join("config.json"))
                .unwrap()
                .replace("\"llama\"", "\"mamba\"");
            std::fs::write(d.join("config.json"), c).unwrap();
        },
        &["config.json", "unknown model_type `mamba`", "supported"],
    );
    let q = "model.layers.1.self_attn.q_proj.weight";
    broken(
        "llama_gqa_tied",
        |d| rewrite_tensor(d, |t| t.retain(|(n, _)| n != q)),
        &["model.safetensors", q, "missing"],
    );
    broken(
        "llama_gqa_tied",
        |d| {
            rewrite_tensor(d, |t| {
                for (n, r) in t.iter_mut() {
                    if n == q {
                        r.shape = vec![r.shape[1], r.shape[0]];
                    }
                }
            })
        },
        &["model.safetensors", q, "shape mismatch"],
    );
    let w = "model.decoder.layers.0.fc1.weight";
    broken(
        "opt_prelayernorm",
        |d| {
            rewrite_tensor(d, |t| {
                for (n, r) in t.iter_mut() {
                    if n == w {
                        r.data[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
                    }
                }
            })
        },
        &["model.safetensors", w, "non-finite"],
    );
    broken(
        "gpt2",
        |d| {
            let f = d.join("model.safetensors");
            let len = std::fs::metadata(&f).unwrap().len();
            let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
            file.set_len(len - 100).unwrap();
        },
        &["model.safetensors"],
    );
    let qkv = "gpt_neox.layers.1.attention.query_key_value.bias";
    broken(
        "gpt_neox",
        |d| rewrite_tensor(d, |t| t.retain(|(n, _)| n != qkv)),
        &["model.safetensors", qkv, "missing"],
    );
    broken(
        "gpt2",
        |d| std::fs::remove_file(d.join("model.safetensors")).unwrap(),
        &["model.safetensors", "pytorch_model.bin"],
    );
}

#[test]
fn out_of_vocabulary_ids_are_rejected() {
    let model = load_dir(&fixture("tiny/qwen2"), &LoadOptions::default()).unwrap();
    let vocab = model.config().vocab_size() as u32;
    let err = model
        .forward(
            &ForwardInput::single(&[1, vocab]),
            &mut model.new_cache(1),
            LogitsMode::All,
        )
        .unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}
