#!/usr/bin/env bash
# Interop: the checkpoints autoquant writes, read by the reference libraries (from PyPI, in the
# virtualenv scripts/setup_python.sh caches outside the clone). Three checks, all must pass:
#
#  gptq  tiny GPTQ checkpoints (RTN, 2/3/4/8-bit, act-order, gptq_v2) and the logits autoquant
#        computes from them (tests/gptq_checkpoint.rs); AutoGPTQ 0.7.1's QuantLinear reads each
#        one and must give the same logits (check_gptq_with_autogptq.py).
#  awq   a tiny AWQ GEMM checkpoint and its logits (tests/awq_format.rs); AutoAWQ 0.2.7.post3's
#        WQLinear_GEMM and dequantizer read it, transformers runs it (check_awq.py).
#  bnb   SmolLM2-135M quantized by `autoquant quantize --method bnb-nf4 | bnb-nf4 --double-quant
#        | bnb-fp4 | bnb-int8`; transformers + bitsandbytes 0.50 loads each and quantizes the
#        same model itself: tensors byte-identical, logits identical (check_bnb.py).
#
#   scripts/interop/run.sh [--only gptq|awq|bnb]... [OUT_DIR]
#        (OUT_DIR default: a temporary folder, removed at the end)
set -euo pipefail
export TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
cd "$(dirname "$0")/../.."

only=()
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --only) only+=("$2"); shift 2 ;;
    -*) echo "usage: scripts/interop/run.sh [--only gptq|awq|bnb]... [OUT_DIR]" >&2; exit 2 ;;
    *) OUT="$1"; shift ;;
  esac
done
[ ${#only[@]} -gt 0 ] || only=(gptq awq bnb)
wanted() { [[ " ${only[*]} " == *" $1 "* ]]; }

PY="$(scripts/setup_python.sh)"
if [ -n "$OUT" ]; then
  mkdir -p "$OUT"
else
  OUT="$(mktemp -d)"; trap 'rm -rf "$OUT"' EXIT
fi

status=0
summary=()

if wanted gptq; then
  mkdir -p "$OUT/gptq"
  AUTOQUANT_INTEROP_DIR="$OUT/gptq" cargo test --release --test gptq_checkpoint \
    written_checkpoints_load_back_and_export_for_interop -- --exact
  count=0
  ok=1
  for expected in "$OUT"/gptq/*.expected.json; do
    [ -e "$expected" ] || { echo "run.sh: no GPTQ checkpoints were written to $OUT/gptq" >&2; exit 1; }
    count=$((count + 1))
    "$PY" scripts/interop/check_gptq_with_autogptq.py "${expected%.expected.json}" "$expected" || ok=0
  done
  if [ $ok = 1 ]; then summary+=("gptq: all $count checkpoints read by AutoGPTQ match autoquant's logits")
  else summary+=("gptq: FAILED"); status=1; fi
fi

if wanted awq; then
  mkdir -p "$OUT/awq"
  AUTOQUANT_AWQ_INTEROP_DIR="$OUT/awq" cargo test --release --test awq_format \
    written_checkpoint_loads_back_and_exports_for_interop -- --exact
  if "$PY" scripts/interop/check_awq.py "$OUT/awq"; then
    summary+=("awq: AutoAWQ's WQLinear_GEMM reads autoquant's checkpoint, logits match")
  else summary+=("awq: FAILED"); status=1; fi
fi

if wanted bnb; then
  assets="$(scripts/fetch_assets.sh | tail -n 1)"
  model="$assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  cargo build --release --quiet
  bin="$PWD/target/release/autoquant"
  ok=1
  for variant in bnb-nf4 bnb-nf4-dq bnb-fp4 bnb-int8; do
    case "$variant" in
      bnb-nf4-dq) args=(--method bnb-nf4 --double-quant) ;;
      *) args=(--method "$variant") ;;
    esac
    "$bin" quantize "$model" "${args[@]}" -o "$OUT/bnb/$variant"
    echo "== $variant" >&2
    "$PY" scripts/interop/check_bnb.py "$OUT/bnb/$variant" --reference "$model" || ok=0
  done
  if [ $ok = 1 ]; then
    summary+=("bnb: nf4, nf4 + double quant, fp4, int8 byte-identical to transformers + bitsandbytes")
  else summary+=("bnb: FAILED"); status=1; fi
fi

printf 'interop: %s\n' "${summary[@]}"
exit $status
