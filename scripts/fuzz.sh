#!/usr/bin/env bash
# Fuzz every parser of untrusted files with the seeded mutation driver (examples/fuzz.rs,
# docs/fuzzing.md): panics, hangs and memory blow-ups fail the run and the input is saved.
#   scripts/fuzz.sh [--seconds N] [--seed S] [--target NAME]... [--crashes DIR]
# Defaults: 600 seconds shared by the targets, seed from the clock (printed), crashes in
# target/fuzz-crashes. The process also runs under an address-space limit, a second guard
# behind the driver's own allocation cap.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=600
seed="$(date +%s)"
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds="$2"; shift 2 ;;
        --seed) seed="$2"; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
cargo build --release --quiet --example fuzz
echo "fuzz: ${seconds} s, seed ${seed}" >&2
exec prlimit --as=$((8 << 30)) -- target/release/examples/fuzz \
    --seconds "$seconds" --seed "$seed" ${args[@]+"${args[@]}"}
