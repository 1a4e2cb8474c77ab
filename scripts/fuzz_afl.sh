#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser of untrusted files with AFL++ through cargo-afl, on
# stable Rust (fuzz/afl, docs/fuzzing.md); the targets are the seeded driver's (fuzz/targets.rs).
#   scripts/fuzz_afl.sh [--seconds N] [--target NAME]...
# Defaults: 600 seconds shared by the targets, all targets. The first run installs cargo-afl
# (pinned; its install builds AFL++) into ${AUTOQUANT_HOME:-~/.cache/autoquant}/cargo-afl, outside
# the clone; later runs reuse it. The instrumented harness is built into target/afl. Each target
# starts from its seeds in tests/fuzz_corpus/<target>/; AFL++'s own output is in
# target/afl-out/<target>/. Crashes (panics, the harness's 512 MiB allocation cap) and hangs
# (no result within 40 s) are copied to target/fuzz-crashes-afl/<target>/ and fail the run.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

AFL_RS_VERSION=0.18.2 # cargo-afl, and the `afl` crate in fuzz/afl/Cargo.toml
ALL_TARGETS=(safetensors gguf pytorch config tokenizer tokenizer_config chat_template calib)

seconds=600
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds="$2"; shift 2 ;;
        --target) targets+=("$2"); shift 2 ;;
        *) echo "usage: scripts/fuzz_afl.sh [--seconds N] [--target NAME]..." >&2; exit 2 ;;
    esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${ALL_TARGETS[@]}")
for t in "${targets[@]}"; do
    [ -d "tests/fuzz_corpus/$t" ] || { echo "fuzz_afl: unknown target $t" >&2; exit 2; }
done

# --- Install: cargo-afl and AFL++ under the cache folder (XDG_DATA_HOME is where cargo-afl
# keeps AFL++ and its runtime, one build per rustc version).
home="${AUTOQUANT_HOME:-$HOME/.cache/autoquant}/cargo-afl"
export PATH="$home/bin:$PATH"
export XDG_DATA_HOME="$home/share"
SECONDS=0
if ! cargo-afl afl --version 2>/dev/null | grep -qF "$AFL_RS_VERSION"; then
    echo "fuzz_afl: installing cargo-afl $AFL_RS_VERSION and AFL++ into $home" >&2
    cargo install --quiet --locked --force --root "$home" --version "$AFL_RS_VERSION" cargo-afl
fi
rustc_tag="rustc-$(rustc -vV | sed -n 's/^release: //p')"
commit="$(rustc -vV | sed -n 's/^commit-hash: //p')"
[ -z "$commit" ] || [ "$commit" = unknown ] || rustc_tag="$rustc_tag-${commit:0:7}"
afl_data="$XDG_DATA_HOME/afl.rs/$rustc_tag/afl.rs-$AFL_RS_VERSION"
if [ ! -f "$afl_data/afl-llvm/afl-compiler-rt.o" ] || [ ! -x "$afl_data/afl/bin/afl-fuzz" ]; then
    # The install builds AFL++ for the rustc of that moment; a new rustc needs its own build.
    echo "fuzz_afl: building AFL++ for $rustc_tag" >&2
    cargo afl config --build --force
fi
echo "fuzz_afl: cargo-afl and AFL++ ready (${SECONDS} s)" >&2

# --- Build: the harness and all it depends on, instrumented (the main crate's versions: the
# harness starts from its Cargo.lock, and afl is added to it). An explicit --target keeps
# build scripts and proc macros out of the instrumented, optimized build.
if [ ! -f fuzz/afl/Cargo.lock ] || [ Cargo.lock -nt fuzz/afl/Cargo.lock ]; then
    cp Cargo.lock fuzz/afl/Cargo.lock
fi
SECONDS=0
host="$(rustc -vV | sed -n 's/^host: //p')"
(cd fuzz/afl && CARGO_TARGET_DIR="$root/target/afl" cargo afl build --release --quiet --target "$host")
harness="$root/target/afl/$host/release/fuzz_afl"
echo "fuzz_afl: harness built (${SECONDS} s)" >&2

# --- Fuzz: each target for its share of the time, headless.
per=$(( seconds / ${#targets[@]} ))
[ "$per" -ge 1 ] || per=1
echo "fuzz_afl: ${per} s per target" >&2
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1
# An input slower than 2 s is set aside; it is a hang only if it also takes 40 s (the seeded
# driver's deadline, above a chat template's own 20 s CPU limit).
export AFL_HANG_TMOUT=40000
failed=0
report=()
for t in "${targets[@]}"; do
    out="target/afl-out/$t"
    dest="target/fuzz-crashes-afl/$t"
    rm -rf "$out" "$dest"
    mkdir -p "$out"
    # -m: an 8 GiB address-space limit behind the harness's own allocation cap.
    if ! AUTOQUANT_FUZZ_DIR="$work/$t" cargo afl fuzz -i "tests/fuzz_corpus/$t" -o "$out" \
        -V "$per" -t 2000 -m 8192 -- "$harness" "$t" >"$out/afl-fuzz.log" 2>&1; then
        tail -n 30 "$out/afl-fuzz.log" >&2
        echo "fuzz_afl: afl-fuzz failed on $t (log: $out/afl-fuzz.log)" >&2
        failed=1
        continue
    fi
    stats="$out/default/fuzzer_stats"
    stat() { sed -n "s/^$1 *: *//p" "$stats"; }
    crashes="$(stat saved_crashes)"
    hangs="$(stat saved_hangs)"
    report+=("$(printf '%-16s %10s execs %8s/s %6s in corpus %4s crashes %4s hangs' \
        "$t" "$(stat execs_done)" "$(stat execs_per_sec)" "$(stat corpus_count)" "$crashes" "$hangs")")
    if [ "${crashes:-0}" != 0 ] || [ "${hangs:-0}" != 0 ]; then
        mkdir -p "$dest"
        for kind in crash hang; do
            folder="$out/default/hangs"
            [ "$kind" = hang ] || folder="$out/default/crashes"
            for f in "$folder"/id:*; do
                [ -e "$f" ] || continue
                cp "$f" "$dest/$kind-$(basename "$f" | sed 's/^id:\([0-9]*\).*/\1/')"
            done
        done
        echo "FUZZ FAILURE in $t: $crashes crashes, $hangs hangs saved to $dest" \
            "(replay: $harness $t < FILE)" >&2
        failed=1
    fi
done
printf 'fuzz_afl %s\n' "${report[@]}"
if [ "$failed" != 0 ]; then
    exit 1
fi
echo "fuzz_afl: no crashes or hangs"
