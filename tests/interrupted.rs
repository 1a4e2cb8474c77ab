//! Runs stopped at random moments — `kill -9` (a crash, an out-of-memory kill, a reboot) and
//! SIGTERM (Ctrl-C, a job scheduler) — while `quantize` (RTN and GPTQ) or `convert` replaces an
//! existing output with `--overwrite`. Whenever it happens, the output folder holds the complete
//! previous output or the complete new one; `quantize --resume` then finishes with exactly the
//! bytes of a run never interrupted; and nothing is left beside the output once a later run of
//! the same command has succeeded.
//!
//! A moment is a point in the command's own progress, not in time: the stop is sent once the
//! process has written a chosen share of the bytes an uninterrupted run writes (its `wchar` in
//! `/proc/PID/io`), so the trials do not depend on the machine's speed and the first trial
//! (share 0) always stops the run before it has written anything.
//!
//! `AUTOQUANT_KILL_TRIALS` sets the moments tried per command (default 8; `scripts/kill_trials.sh`
//! runs 50).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_autoquant"))
}

/// Bytes the process has written so far (`wchar` of `/proc/PID/io`); `None` once it is gone.
fn written_bytes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Poll `child` until it exits or has written at least `bytes`; true if it is still running.
fn wait_until_written(child: &mut Child, bytes: u64) -> bool {
    loop {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        match written_bytes(child.id()) {
            Some(w) if w >= bytes => return true,
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// Run `args` to completion, returning the bytes it wrote (the last `wchar` seen before it
/// exited, a slight underestimate).
fn run_ok_counting_writes(args: &[&str]) -> u64 {
    let mut child = bin()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut last = 0;
    while child.try_wait().unwrap().is_none() {
        last = written_bytes(child.id()).unwrap_or(last).max(last);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(child.wait().unwrap().success(), "autoquant {args:?} failed");
    last
}

fn run_ok(args: &[&str]) {
    let out = bin().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "autoquant {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for (rel, bytes) in common::snapshot(from) {
        let p = to.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
}

/// Hidden entries beside `target` (temporaries, previous versions, resumable work).
fn leftovers(target: &Path) -> Vec<String> {
    let name = target.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::read_dir(target.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!(".{name}.")))
        .collect()
}

fn trials() -> usize {
    std::env::var("AUTOQUANT_KILL_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}

/// A small deterministic generator for the moments (xorshift).
struct Moments(u64);
impl Moments {
    fn next_fraction(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Setup {
    /// Two synthesized llama models (different seeds) and calibration windows.
    fn new(hidden: usize, layers: usize) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let config = root.join("config.json");
        std::fs::write(
            &config,
            format!(
                r#"{{"model_type": "llama", "hidden_size": {hidden}, "intermediate_size": {},
                    "num_hidden_layers": {layers}, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "vocab_size": 256,
                    "max_position_embeddings": 128}}"#,
                2 * hidden
            ),
        )
        .unwrap();
        for (name, seed) in [("model", "0"), ("other", "1")] {
            let out = root.join(name);
            run_ok(&[
                "synth",
                config.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--dtype",
                "f32",
                "--seed",
                seed,
            ]);
            // The smallest tokenizer.json the tokenizers crate reads (`convert` copies one).
            std::fs::write(
                out.join("tokenizer.json"),
                r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
                    "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},
                    "post_processor":null,"decoder":null,"model":{"type":"WordLevel",
                    "vocab":{"a":0,"b":1,"[UNK]":2},"unk_token":"[UNK]"}}"#,
            )
            .unwrap();
        }
        let mut m = Moments(7);
        let windows: Vec<Vec<u32>> = (0..16)
            .map(|_| {
                (0..64)
                    .map(|_| (m.next_fraction() * 256.0) as u32)
                    .collect()
            })
            .collect();
        std::fs::write(
            root.join("windows.json"),
            serde_json::to_string(&windows).unwrap(),
        )
        .unwrap();
        Setup { _tmp: tmp, root }
    }

    fn path(&self, name: &str) -> String {
        self.root.join(name).to_str().unwrap().to_string()
    }
}

/// Interrupt `args` (which writes `target` with `--overwrite`) at random moments of its progress
/// (shares of the `total_written` bytes of an uninterrupted run); `finish` is the command that
/// completes the work afterwards.
fn interrupt_at_random_moments(
    what: &str,
    args: &[String],
    finish: &[String],
    target: &Path,
    old: &BTreeMap<String, Vec<u8>>,
    new: &BTreeMap<String, Vec<u8>>,
    total_written: u64,
) {
    assert_ne!(old, new, "{what}: the two versions must differ");
    let mut moments = Moments(0x9e37_79b9_7f4a_7c15 ^ what.len() as u64);
    let (mut mid_run, mut resumed_blocks) = (0, 0);
    for trial in 0..trials() {
        let root = target.parent().unwrap();
        let old_dir = root.join("old-version");
        copy_dir(&old_dir, target);
        let signal = if trial % 2 == 0 { "-KILL" } else { "-TERM" };
        // The first moment is the start; the others spread over the whole run and a little past it.
        let share = if trial == 0 {
            0.0
        } else {
            moments.next_fraction() * 1.1
        };
        let at = (share * total_written as f64) as u64;
        let mut child = bin()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let still_running = wait_until_written(&mut child, at);
        let _ = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .stderr(Stdio::null()) // "no such process" when the run had already finished
            .status();
        let status = child.wait().unwrap();
        if still_running && !status.success() {
            mid_run += 1;
        }
        let now = common::snapshot(target);
        assert!(
            &now == old || &now == new,
            "{what}, {signal} after {at} bytes: the output is neither the old nor the new \
             version ({} files: {:?})",
            now.len(),
            now.keys().collect::<Vec<_>>()
        );
        if signal == "-TERM" && still_running {
            // The interrupt handler removes its temporaries; only resumable work stays.
            let left = leftovers(target);
            assert!(
                left.iter().all(|n| n.ends_with(".partial")),
                "{what}: SIGTERM left {left:?}"
            );
        }
        if root
            .join(format!(
                ".{}.partial",
                target.file_name().unwrap().to_string_lossy()
            ))
            .join("block-00000.safetensors")
            .exists()
        {
            resumed_blocks += 1;
        }
        let out = bin().args(finish).output().unwrap();
        assert!(
            out.status.success(),
            "{what}: {finish:?} after {signal} at {at} bytes failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            &common::snapshot(target) == new,
            "{what}: finishing after {signal} at {at} bytes gave different bytes"
        );
        assert_eq!(
            leftovers(target),
            Vec::<String>::new(),
            "{what}: left beside the output after {signal} at {at} bytes and a finished run"
        );
    }
    eprintln!(
        "{what}: {} trials, {mid_run} stopped mid-run, {resumed_blocks} resumed with kept blocks",
        trials()
    );
    assert!(
        mid_run > 0,
        "{what}: no trial stopped the run before it finished"
    );
}

fn quantize_trials(method: &str) {
    let s = Setup::new(64, 24);
    let target = s.root.join("target");
    let quantize = |model: &str, out: &str, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "quantize",
            &s.path(model),
            "--method",
            method,
            "--bits",
            "4",
            "--group-size",
            "32",
            "-o",
            out,
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        if method != "rtn" {
            v.extend(["--calib-windows".into(), s.path("windows.json")]);
        }
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let refs = |args: Vec<String>| run_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    refs(quantize("other", &s.path("old-version"), &[]));
    let new_args = quantize("model", &s.path("new-version"), &[]);
    let total = run_ok_counting_writes(&new_args.iter().map(String::as_str).collect::<Vec<_>>());
    let old = common::snapshot(&s.root.join("old-version"));
    let new = common::snapshot(&s.root.join("new-version"));
    let t = target.to_str().unwrap();
    interrupt_at_random_moments(
        &format!("quantize {method}"),
        &quantize("model", t, &["--overwrite"]),
        &quantize("model", t, &["--overwrite", "--resume"]),
        &target,
        &old,
        &new,
        total,
    );
}

#[test]
fn quantize_rtn_stopped_anywhere_keeps_a_whole_output_and_resumes_to_the_same_bytes() {
    quantize_trials("rtn");
}

#[test]
fn quantize_gptq_stopped_anywhere_keeps_a_whole_output_and_resumes_to_the_same_bytes() {
    quantize_trials("gptq");
}

#[test]
fn convert_stopped_anywhere_keeps_a_whole_output() {
    // Large enough (~25 MB written) that stops land inside the write.
    let s = Setup::new(256, 24);
    let target = s.root.join("target");
    let convert = |model: &str, out: &str, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["convert", &s.path(model), "-o", out, "--dtype", "f16"]
            .iter()
            .map(|x| x.to_string())
            .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let refs = |args: Vec<String>| run_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    refs(convert("other", &s.path("old-version"), &[]));
    let new_args = convert("model", &s.path("new-version"), &[]);
    let total = run_ok_counting_writes(&new_args.iter().map(String::as_str).collect::<Vec<_>>());
    let old = common::snapshot(&s.root.join("old-version"));
    let new = common::snapshot(&s.root.join("new-version"));
    let t = target.to_str().unwrap();
    let args = convert("model", t, &["--overwrite"]);
    interrupt_at_random_moments("convert", &args, &args, &target, &old, &new, total);
}

/// A changed setting or input is refused instead of mixing two runs' blocks, and a folder of
/// finished blocks is never thrown away by a run that was not asked to resume.
#[test]
fn resume_refuses_changed_settings_and_inputs() {
    let s = Setup::new(64, 24);
    let out = s.path("out");
    let base = |bits: &str, windows: &str| -> Vec<String> {
        [
            "quantize",
            &s.path("model"),
            "--method",
            "gptq",
            "--bits",
            bits,
            "--group-size",
            "32",
            "--calib-windows",
            windows,
            "-o",
            &out,
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    // Stop a run once it has kept a few blocks.
    let mut child = bin()
        .args(base("4", &s.path("windows.json")))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let kept = s.root.join(".out.partial").join("block-00002.safetensors");
    while !kept.exists() && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .stderr(Stdio::null())
        .status();
    child.wait().unwrap();
    if !s.root.join(".out.partial").exists() {
        panic!("the run finished before it could be stopped");
    }
    let run = |args: Vec<String>| {
        let o = bin().args(&args).output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let with = |mut v: Vec<String>, extra: &str| {
        v.push(extra.into());
        v
    };
    let (ok, err) = run(base("4", &s.path("windows.json")));
    assert!(!ok && err.contains("--resume"), "{err}");
    let (ok, err) = run(with(base("8", &s.path("windows.json")), "--resume"));
    assert!(!ok && err.contains("settings"), "{err}");
    let mut other: Vec<Vec<u32>> =
        serde_json::from_str(&std::fs::read_to_string(s.root.join("windows.json")).unwrap())
            .unwrap();
    other[3][5] ^= 1;
    std::fs::write(
        s.root.join("other.json"),
        serde_json::to_string(&other).unwrap(),
    )
    .unwrap();
    let (ok, err) = run(with(base("4", &s.path("other.json")), "--resume"));
    assert!(!ok && err.contains("calibration"), "{err}");
    assert!(kept.exists(), "a refused run removed the kept blocks");
    // The bitsandbytes methods are not streamed and say so.
    let (ok, err) = run(vec![
        "quantize".into(),
        s.path("model"),
        "--method".into(),
        "bnb-int8".into(),
        "-o".into(),
        s.path("bnb"),
        "--resume".into(),
    ]);
    assert!(!ok && err.contains("nothing to resume"), "{err}");
    let (ok, err) = run(with(base("4", &s.path("windows.json")), "--resume"));
    assert!(ok, "{err}");
    assert!(!s.root.join(".out.partial").exists());
}

/// A file-size limit (`ulimit -f`) makes the write fail with a message naming the file; the
/// process is not ended silently by SIGXFSZ, and no temporary output stays behind.
#[test]
fn a_file_size_limit_is_an_error_that_leaves_nothing_behind() {
    let s = Setup::new(256, 4);
    let out = s.root.join("out");
    let script = format!(
        "ulimit -f 64 && exec '{}' convert '{}' -o '{}' --dtype f32",
        env!("CARGO_BIN_EXE_autoquant"),
        s.path("model"),
        out.display()
    );
    let o = Command::new("sh").args(["-c", &script]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("File too large") && err.contains("out"),
        "{err}"
    );
    assert!(!out.exists());
    assert_eq!(leftovers(&out), Vec::<String>::new());
}
