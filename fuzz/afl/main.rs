//! AFL++ harness for the parsers of untrusted files (docs/fuzzing.md), coverage-guided, on stable
//! Rust through cargo-afl. It runs the same targets as the seeded driver (`fuzz/targets.rs`):
//!
//! ```text
//! fuzz_afl TARGET < INPUT              # one input, outside AFL++ (replay)
//! afl-fuzz -i SEEDS -o OUT -- fuzz_afl TARGET
//! ```
//!
//! Each input is written into a work folder (`AUTOQUANT_FUZZ_DIR`, or one under the temporary
//! folder named after the target and this process) and parsed there. A panic aborts (afl's hook),
//! and so does an allocation past the memory cap: AFL++ records both as crashes. A hang is an
//! input past afl-fuzz's timeout.

#[allow(dead_code)]
#[path = "../targets.rs"]
mod targets;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use targets::{Target, ABORT_NOTE, ABORT_ON_CAP, MAX_INPUT, TARGETS};

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let Some(target) = Target::from_name(&name) else {
        eprintln!(
            "usage: fuzz_afl TARGET (one of {})",
            TARGETS.map(Target::name).join(", ")
        );
        std::process::exit(2);
    };
    let dir = std::env::var_os("AUTOQUANT_FUZZ_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("autoquant-afl-{name}-{}", std::process::id()))
        });
    ABORT_ON_CAP.store(true, Ordering::Relaxed);
    let note = format!("target {name}: the input is in {}\n", dir.display());
    *ABORT_NOTE.lock().expect("note") = Some(Box::leak(note.into_bytes().into_boxed_slice()));

    afl::fuzz!(|input: &[u8]| {
        // The seeded driver's bound on input size, so both drivers hold parsers to one contract.
        if input.len() <= MAX_INPUT {
            targets::run_target(target, input, &dir);
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
}
