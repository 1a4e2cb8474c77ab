#!/usr/bin/env bash
# The main job on the default model: fetch SmolLM2-135M-Instruct and the evaluation text,
# build autoquant, show the model, generate text, measure perplexity, memory and speed, then
# quantize it (GPTQ 4-bit, group 64, streamed block by block) and measure the result.
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS="$(scripts/fetch_assets.sh | tail -n 1)"
MODEL="$ASSETS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
cargo build --release
AQ=target/release/autoquant
set -x
$AQ info "$MODEL"
$AQ estimate "$MODEL"
$AQ generate "$MODEL" --chat --prompt "What is the capital of France?" --max-new-tokens 48
$AQ ppl "$MODEL" --data "$ASSETS/text/wiki.eval.txt" --seqlen 512 --max-windows 40 --peak-rss
$AQ bench "$MODEL" --repetitions 1
OUT="${AUTOQUANT_OUT:-target/quickstart}"
$AQ quantize "$MODEL" --method gptq --bits 4 --group-size 64 \
    --calib "$ASSETS/text/news.txt" --nsamples 32 --seqlen 2048 -o "$OUT/gptq-4bit-g64" --overwrite
$AQ ppl "$OUT/gptq-4bit-g64" --data "$ASSETS/text/wiki.eval.txt" --seqlen 512 --max-windows 40 --peak-rss
$AQ generate "$OUT/gptq-4bit-g64" --chat --prompt "What is the capital of France?" --max-new-tokens 32
