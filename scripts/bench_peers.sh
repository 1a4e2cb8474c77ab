#!/usr/bin/env bash
# Side-by-side speed of autoquant and its peers (llama.cpp, transformers + torch) on SmolLM2-135M,
# measured in ONE invocation on this machine, rounds interleaved so machine noise hits all of them.
# See docs/benchmarks.md for what every number means.
#
#   scripts/bench_peers.sh [--quick] [--skip-llamacpp] [--skip-transformers] [--rounds N]
#                          [--threads N] [--prepare-only] [OUT_JSON]
#   env: AUTOQUANT_BIN=path (skip cargo build), LLAMA_BENCH_ARGS="--poll 0" (extra llama-bench args)
#
# OUT_JSON defaults to target/bench_peers.json. A table and the goal ratios go to stdout,
# progress to stderr.
#
# llama.cpp is built once from the PyPI sdist of llama-cpp-python (which vendors its source) and
# cached, with the F32/F16/Q4_0 GGUFs made from the shipped Q4_1 file, under
# ${AUTOQUANT_HOME:-$HOME/.cache/autoquant}/peers/. Nothing of llama.cpp lives in this repository.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
AQ_HOME=${AUTOQUANT_HOME:-$HOME/.cache/autoquant}
ASSETS=$AQ_HOME/assets
PEERS=$AQ_HOME/peers
MODEL_Q41=$ASSETS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
EVAL_TEXT=$ASSETS/text/wiki.eval.txt
# AUTOQUANT_BIN: benchmark this binary instead of building target/release/autoquant.
AQ_BIN=${AUTOQUANT_BIN:-$ROOT/target/release/autoquant}
# Extra llama-bench arguments, e.g. LLAMA_BENCH_ARGS="--poll 0" (word-split on purpose).
LLAMA_BENCH_ARGS=${LLAMA_BENCH_ARGS:-}
PYTHON=${PYTHON:-python3}
# Pinned so every machine builds the same llama.cpp; override to try another release.
LLAMA_CPP_PYTHON_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}

QUICK=0 SKIP_LLAMACPP=0 SKIP_TRANSFORMERS=0 PREPARE_ONLY=0
ROUNDS="" THREADS=2 OUT=""

say() { printf 'bench_peers: %s\n' "$*" >&2; }
die() { printf 'bench_peers: error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case $1 in
        --quick) QUICK=1 ;;
        --skip-llamacpp) SKIP_LLAMACPP=1 ;;
        --skip-transformers) SKIP_TRANSFORMERS=1 ;;
        --prepare-only) PREPARE_ONLY=1 ;;
        --rounds) ROUNDS=${2:?--rounds needs a number}; shift ;;
        --threads) THREADS=${2:?--threads needs a number}; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [ -z "$OUT" ] || die "more than one output path given"; OUT=$1 ;;
    esac
    shift
done
OUT=${OUT:-$ROOT/target/bench_peers.json}
case $ROUNDS in "") if [ "$QUICK" = 1 ]; then ROUNDS=1; else ROUNDS=3; fi ;; esac
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "--rounds must be a positive integer"
[[ $THREADS =~ ^[1-9][0-9]*$ ]] || die "--threads must be a positive integer"
# Repetitions inside one round; every system reports its best repetition (see docs/benchmarks.md).
if [ "$QUICK" = 1 ]; then REPS=2 PPL_WINDOWS=4; else REPS=3 PPL_WINDOWS=8; fi

load1() { cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo null; }
LOAD_AT_START=$(load1)

# ---------------------------------------------------------------- inputs
if [ ! -f "$MODEL_Q41" ] || [ ! -f "$EVAL_TEXT" ]; then
    say "model or evaluation text missing; running scripts/fetch_assets.sh"
    "$SCRIPT_DIR/fetch_assets.sh" >/dev/null
fi

# ---------------------------------------------------------------- llama.cpp (cached build)
LLAMA_SRC=$PEERS/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION
LLAMA_BIN=$LLAMA_SRC/vendor/llama.cpp/build/bin
LLAMA_STAMP=$LLAMA_SRC/.built

build_llama_cpp() {
    [ -f "$LLAMA_STAMP" ] && [ -x "$LLAMA_BIN/llama-bench" ] && return 0
    local tools=$PEERS/buildenv dl=$PEERS/download
    mkdir -p "$PEERS" "$dl"
    if [ ! -x "$tools/bin/cmake" ] || [ ! -x "$tools/bin/ninja" ]; then
        say "creating build-tool venv $tools (scikit-build-core cmake ninja)"
        "$PYTHON" -m venv "$tools"
        "$tools/bin/pip" install -q scikit-build-core cmake ninja >&2
    fi
    local sdist=$dl/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz
    if [ ! -f "$sdist" ]; then
        say "downloading the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist from PyPI"
        # pip prepares the sdist's metadata, which needs scikit-build-core: hence the tool venv.
        "$tools/bin/pip" download -q --no-deps --no-binary :all: --no-build-isolation \
            "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$dl" >&2
    fi
    [ -f "$sdist" ] || die "pip did not produce $sdist"
    rm -rf "$LLAMA_SRC" "$LLAMA_SRC.tmp"
    mkdir -p "$LLAMA_SRC.tmp"
    tar -xzf "$sdist" -C "$LLAMA_SRC.tmp" --strip-components=1
    mv "$LLAMA_SRC.tmp" "$LLAMA_SRC"
    say "building llama.cpp (llama-bench llama-perplexity llama-quantize); several minutes on 2 cores"
    (
        cd "$LLAMA_SRC/vendor/llama.cpp"
        PATH=$tools/bin:$PATH
        cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF >&2
        cmake --build build --target llama-bench llama-perplexity llama-quantize -j "$(nproc)" >&2
    )
    touch "$LLAMA_STAMP"
}

# F32 / F16 / Q4_0 GGUFs made from the shipped Q4_1 file. Q4_1 and Q8_0 dequantize exactly to F32,
# so the F32 file holds the same weights autoquant runs in f32.
GGUF_DIR=$LLAMA_SRC/gguf  # beside the llama.cpp that made them
make_gguf() { # TYPE -> path on stdout
    local type=$1 out=$GGUF_DIR/SmolLM2-135M-Instruct.$1.gguf
    if [ ! -f "$out" ]; then
        mkdir -p "$GGUF_DIR"
        say "llama-quantize --allow-requantize Q4_1 -> $type"
        "$LLAMA_BIN/llama-quantize" --allow-requantize "$MODEL_Q41" "$out.tmp" "$type" >"$out.log" 2>&1 \
            || die "llama-quantize to $type failed, see $out.log"
        mv "$out.tmp" "$out"
    fi
    printf '%s\n' "$out"
}

if [ "$SKIP_LLAMACPP" = 0 ]; then
    build_llama_cpp
    GGUF_F32=$(make_gguf F32)
    GGUF_F16=$(make_gguf F16)
    GGUF_Q40=$(make_gguf Q4_0)
fi

# ---------------------------------------------------------------- transformers venv, autoquant
TF_PY=$AQ_HOME/venv/bin/python
if [ "$SKIP_TRANSFORMERS" = 0 ] && ! "$TF_PY" -c 'import torch, transformers, gguf' 2>/dev/null; then
    say "transformers venv missing or incomplete; running scripts/setup_python.sh"
    "$SCRIPT_DIR/setup_python.sh" >/dev/null
fi

if [ -z "${AUTOQUANT_BIN:-}" ]; then
    say "cargo build --release"
    (cd "$ROOT" && cargo build --release --quiet >&2)
fi
[ -x "$AQ_BIN" ] || die "$AQ_BIN not built"

# autoquant's 4-bit runs: bitsandbytes NF4 at load time (--load-in-4bit), and a packed GPTQ
# checkpoint in Q4_0's shape (4-bit, symmetric, groups of 32) made by RTN from the same weights.
# Both keep the tensors they do not quantize (the tied embedding / lm_head) in f16 (--dtype f16),
# as transformers holds them in the checkpoint's torch_dtype; llama.cpp's Q4_0 file has them
# in Q8_0.
GPTQ4_DIR=$AQ_HOME/peers/smollm2-rtn4-g32
if [ ! -f "$GPTQ4_DIR/config.json" ]; then
    say "autoquant quantize --method rtn --bits 4 --group-size 32 -> $GPTQ4_DIR"
    "$AQ_BIN" quantize "$MODEL_Q41" --method rtn --bits 4 --group-size 32 --overwrite -o "$GPTQ4_DIR" >&2 \
        || die "autoquant quantize failed"
fi

[ "$PREPARE_ONLY" = 1 ] && { say "prepared; not measuring (--prepare-only)"; exit 0; }

# ---------------------------------------------------------------- measurements
RAW=$(mktemp -d)
trap 'rm -rf "$RAW"' EXIT
RECORDS=$RAW/records.jsonl

# record SYSTEM VARIANT KIND ROUND FILE: wrap one tool's JSON output with where it came from.
record() {
    local system=$1 variant=$2 kind=$3 round=$4 file=$5
    jq -c --arg s "$system" --arg v "$variant" --arg k "$kind" --argjson r "$round" --argjson l "$(load1)" \
        '{system:$s, variant:$v, kind:$k, round:$r, load1_after:$l, result:.}' "$file" >>"$RECORDS" \
        || die "$system $variant $kind: output is not JSON: $(head -c 300 "$file")"
}

# aq_bench ROUND VARIANT LABEL MODEL ARGS...: one `autoquant bench`, recorded as VARIANT.
aq_bench() {
    local r=$1 variant=$2 label=$3 model=$4
    shift 4
    say "round $r: autoquant bench $label"
    "$AQ_BIN" --json --threads "$THREADS" bench "$model" "$@" \
        --prompt-len 512 --gen-len 128 --repetitions "$REPS" >"$RAW/out.json" 2>"$RAW/err.log" \
        || die "autoquant bench $label failed: $(tail -5 "$RAW/err.log")"
    record autoquant "$variant" bench "$r" "$RAW/out.json"
}

run_autoquant() { # ROUND
    local r=$1
    aq_bench "$r" f32 "--dtype f32" "$MODEL_Q41" --dtype f32
    aq_bench "$r" f16 "--dtype f16" "$MODEL_Q41" --dtype f16
    # 4-bit: lm_head stays f16 as in bitsandbytes / GPTQ checkpoints; the "+i8head" runs hold
    # it in int8 (--lm-head-int8), as llama.cpp's Q4_0 file holds it in Q8_0.
    aq_bench "$r" nf4 "--load-in-4bit (NF4)" "$MODEL_Q41" --load-in-4bit --dtype f16
    aq_bench "$r" nf4+i8head "--load-in-4bit --lm-head-int8" "$MODEL_Q41" --load-in-4bit \
        --dtype f16 --lm-head-int8
    # --bnb-4bit-decode int16: integer decoding arithmetic (as llama.cpp's Q4_0 has).
    aq_bench "$r" nf4-int16 "--load-in-4bit --bnb-4bit-decode int16" "$MODEL_Q41" --load-in-4bit \
        --dtype f16 --bnb-4bit-decode int16
    aq_bench "$r" nf4-int16+i8head "--load-in-4bit --bnb-4bit-decode int16 --lm-head-int8" \
        "$MODEL_Q41" --load-in-4bit --dtype f16 --bnb-4bit-decode int16 --lm-head-int8
    # --bnb-4bit-decode int8: byte arithmetic with 8-bit activations per 64, Q4_0 × Q8_0's.
    aq_bench "$r" nf4-int8 "--load-in-4bit --bnb-4bit-decode int8" "$MODEL_Q41" --load-in-4bit \
        --dtype f16 --bnb-4bit-decode int8
    aq_bench "$r" nf4-int8+i8head "--load-in-4bit --bnb-4bit-decode int8 --lm-head-int8" \
        "$MODEL_Q41" --load-in-4bit --dtype f16 --bnb-4bit-decode int8 --lm-head-int8
    aq_bench "$r" gptq4 "on the GPTQ 4-bit g32 checkpoint" "$GPTQ4_DIR" --dtype f16
    aq_bench "$r" gptq4+i8head "on the GPTQ 4-bit g32 checkpoint, --lm-head-int8" "$GPTQ4_DIR" \
        --dtype f16 --lm-head-int8
    say "round $r: autoquant ppl ($PPL_WINDOWS windows of 512)"
    "$AQ_BIN" --json --threads "$THREADS" ppl "$MODEL_Q41" --data "$EVAL_TEXT" --seqlen 512 \
        --max-windows "$PPL_WINDOWS" >"$RAW/out.json" 2>"$RAW/err.log" \
        || die "autoquant ppl failed: $(tail -5 "$RAW/err.log")"
    record autoquant f32 ppl "$r" "$RAW/out.json"
}

run_llama_cpp() { # ROUND
    local r=$1 type file
    for type in F32 F16 Q4_0 Q4_1; do
        case $type in F32) file=$GGUF_F32 ;; F16) file=$GGUF_F16 ;; Q4_0) file=$GGUF_Q40 ;; Q4_1) file=$MODEL_Q41 ;; esac
        say "round $r: llama-bench $type"
        "$LLAMA_BIN/llama-bench" -m "$file" -p 512 -n 128 -t "$THREADS" -r "$REPS" -o json $LLAMA_BENCH_ARGS \
            >"$RAW/out.json" 2>"$RAW/err.log" || die "llama-bench $type failed: $(tail -5 "$RAW/err.log")"
        record llama.cpp "$type" bench "$r" "$RAW/out.json"
    done
}

run_transformers() { # ROUND
    local r=$1
    say "round $r: transformers (prefill, ppl windows, generate)"
    "$TF_PY" "$SCRIPT_DIR/bench/transformers_speed.py" --gguf "$MODEL_Q41" --text "$EVAL_TEXT" \
        --threads "$THREADS" --repetitions "$REPS" --ppl-windows "$PPL_WINDOWS" \
        >"$RAW/out.json" 2>"$RAW/err.log" \
        || die "transformers benchmark failed: $(tail -5 "$RAW/err.log")"
    record transformers f32 bench "$r" "$RAW/out.json"
}

for round in $(seq 1 "$ROUNDS"); do
    say "round $round of $ROUNDS (load average $(load1))"
    run_autoquant "$round"
    [ "$SKIP_LLAMACPP" = 1 ] || run_llama_cpp "$round"
    [ "$SKIP_TRANSFORMERS" = 1 ] || run_transformers "$round"
done

# ---------------------------------------------------------------- summary
LLAMA_COMMIT=null
if [ "$SKIP_LLAMACPP" = 0 ]; then
    LLAMA_COMMIT=$(jq -s -c 'map(select(.system == "llama.cpp"))[0].result[0].build_commit // null' "$RECORDS")
fi
jq -n \
    --arg started "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --arg cpu "$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//')" \
    --argjson nproc "$(nproc)" --argjson threads "$THREADS" --argjson rounds "$ROUNDS" \
    --argjson reps "$REPS" --argjson windows "$PPL_WINDOWS" --argjson quick "$QUICK" \
    --argjson load_start "$LOAD_AT_START" --argjson load_end "$(load1)" \
    --arg uptime "$(uptime)" --arg aq_version "$("$AQ_BIN" --version)" \
    --arg aq_commit "$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)" \
    --arg lcp "$LLAMA_CPP_PYTHON_VERSION" --argjson llama_commit "$LLAMA_COMMIT" \
    --arg lb_args "$LLAMA_BENCH_ARGS" \
    '{date:$started, machine:{cpu:$cpu, nproc:$nproc, load1_at_start:$load_start, load1_at_end:$load_end,
      uptime_at_end:$uptime}, settings:{threads:$threads, rounds:$rounds, repetitions_per_round:$reps,
      prompt_len:512, gen_len:128, ppl_seqlen:512, ppl_windows:$windows, quick:($quick==1)},
      versions:{autoquant:$aq_version, autoquant_commit:$aq_commit,
      llama_cpp_python_sdist:$lcp, llama_cpp_build_commit:$llama_commit, llama_bench_extra_args:$lb_args}}' >"$RAW/meta.json"

mkdir -p "$(dirname "$OUT")"
"$PYTHON" "$SCRIPT_DIR/bench/report.py" --meta "$RAW/meta.json" --records "$RECORDS" --out "$OUT"
say "wrote $OUT"
