#!/usr/bin/env bash
# GPTQ interop: autoquant writes tiny GPTQ checkpoints (RTN, 2/3/4/8-bit, act-order, gptq_v2) and
# the logits it computes from them (tests/gptq_checkpoint.rs, written_checkpoints_load_back_and_
# export_for_interop); AutoGPTQ's QuantLinear then reads each checkpoint and must give the same
# logits within 1e-3 relative. Exit status is nonzero if any checkpoint fails.
#
#   scripts/interop/run.sh [OUT_DIR]      (default: a temporary folder, removed at the end)
set -euo pipefail
cd "$(dirname "$0")/../.."

PY="$(scripts/setup_python.sh)"
if [ $# -ge 1 ]; then
  OUT="$1"; mkdir -p "$OUT"
else
  OUT="$(mktemp -d)"; trap 'rm -rf "$OUT"' EXIT
fi

AUTOQUANT_INTEROP_DIR="$OUT" cargo test --release --test gptq_checkpoint \
  written_checkpoints_load_back_and_export_for_interop -- --exact

status=0
count=0
for expected in "$OUT"/*.expected.json; do
  [ -e "$expected" ] || { echo "run.sh: no checkpoints were written to $OUT" >&2; exit 1; }
  dir="${expected%.expected.json}"
  count=$((count + 1))
  "$PY" scripts/interop/check_gptq_with_autogptq.py "$dir" "$expected" || status=1
done
if [ "$status" -eq 0 ]; then
  echo "interop: all $count checkpoints read by AutoGPTQ match autoquant's logits"
else
  echo "interop: FAILED (see above)" >&2
fi
exit $status
