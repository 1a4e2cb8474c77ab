#!/usr/bin/env bash
# The README's headline table: each method on SmolLM2-135M-Instruct, quantized with the
# quickstart settings (4-bit, group 64, calibration news.txt 32 × 2048), then perplexity on
# wiki.eval (paper protocol, 40 windows of 512), file size, bits per weight and decode speed
# (`autoquant bench`, tg128), one method after the other in the same invocation.
#   scripts/bench/headline.sh [OUT_DIR]     (an existing checkpoint in OUT_DIR is reused)
set -euo pipefail
cd "$(dirname "$0")/../.."
ASSETS="$(scripts/fetch_assets.sh | tail -n 1)"
MODEL="$ASSETS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EVAL="$ASSETS/text/wiki.eval.txt"
CALIB="$ASSETS/text/news.txt"
OUT="${1:-target/headline}"
cargo build --release -q
AQ=target/release/autoquant
mkdir -p "$OUT"
quantize() { # name, args...
    local name=$1; shift
    [ -f "$OUT/$name/config.json" ] || $AQ quantize "$MODEL" "$@" -o "$OUT/$name" --overwrite >&2
}
quantize rtn-4-g64  --method rtn  --bits 4 --group-size 64
quantize gptq-4-g64 --method gptq --bits 4 --group-size 64 --calib "$CALIB" --nsamples 32 --seqlen 2048
quantize awq-4-g64  --method awq  --bits 4 --group-size 64 --calib "$CALIB"
quantize bnb-nf4    --method bnb-nf4
quantize bnb-int8   --method bnb-int8
row() { # label, model, bytes-or-empty, extra load flags... → label|bytes|ppl|decode tok/s|MiB loaded
    local label=$1 model=$2 bytes=$3; shift 3
    local ppl tok
    ppl=$($AQ --json ppl "$model" "$@" --data "$EVAL" --seqlen 512 --max-windows 40 \
        | python3 -c 'import json,sys; print("%.4f" % json.load(sys.stdin)["perplexity"])')
    tok=$($AQ --json bench "$model" "$@" --repetitions 1 \
        | python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.1f|%.0f" % (d["decode_tokens_per_second"], d["footprint_bytes"] / 2**20))')
    echo "$label|$bytes|$ppl|$tok"
}
{
    row "f32 (GGUF Q4_1 dequantized)" "$MODEL" ""
    for m in rtn-4-g64 gptq-4-g64 awq-4-g64 bnb-nf4 bnb-int8; do
        row "$m" "$OUT/$m" "$(du -cb "$OUT/$m"/*.safetensors | tail -n 1 | cut -f1)"
    done
} | tee "$OUT/headline.txt"
