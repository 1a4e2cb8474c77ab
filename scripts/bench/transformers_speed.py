"""transformers + torch speed on the SmolLM2 GGUF, the peer numbers of scripts/bench_peers.sh.

Prints one JSON object on stdout:
  prefill: one forward over `seqlen` tokens of real text, logits for every position (what
           perplexity needs; transformers computes them all by default). Best of N repetitions.
  ppl:     the perplexity protocol autoquant's `ppl` command runs (no BOS, non-overlapping windows of
           `seqlen` from the start of the text, each scoring seqlen-1 tokens): window tokens per
           second over forward + loss, and the perplexity as a cross-check of the two runs.
  decode:  greedy `generate` of exactly `gen_len` new tokens (min_new_tokens) from a 1-token
           prompt with the KV cache. Best of N repetitions.
"""

import argparse
import json
import math
import os
import sys
import time


def log(msg):
    print(f"transformers_speed: {msg}", file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="the GGUF file transformers loads (dequantized to f32)")
    ap.add_argument("--text", required=True, help="plain text for the prefill and perplexity windows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--ppl-windows", type=int, default=8)
    args = ap.parse_args()

    # Thread counts must be fixed before torch starts its pools.
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    folder, name = os.path.split(os.path.abspath(args.gguf))

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    load_seconds = time.perf_counter() - t0
    log(f"loaded in {load_seconds:.1f}s")

    # Tokenize only a prefix that certainly holds the windows (whole-text tokenization is slow and
    # the windows start at token 0 either way); fall back to the whole text if it is too short.
    need = args.seqlen * max(args.ppl_windows, 1)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    prefix = text[: need * 12]
    ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    if len(ids) < need + 1 and len(prefix) < len(text):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = min(args.ppl_windows, len(ids) // args.seqlen)
    if windows < 1:
        sys.exit(f"{args.text}: {len(ids)} tokens, fewer than one window of {args.seqlen}")
    ids = torch.tensor(ids[: windows * args.seqlen], dtype=torch.long)

    with torch.inference_mode():
        first = ids[: args.seqlen].unsqueeze(0)
        model(first)  # warm-up: first-call allocations and kernel selection
        prefill = []
        for _ in range(args.repetitions):
            t = time.perf_counter()
            out = model(first)
            prefill.append(time.perf_counter() - t)
        assert out.logits.shape[1] == args.seqlen, "expected logits for every position"

        nll, scored, ppl_seconds = 0.0, 0, 0.0
        for w in range(windows):
            window = ids[w * args.seqlen : (w + 1) * args.seqlen].unsqueeze(0)
            t = time.perf_counter()
            logits = model(window).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum")
            ppl_seconds += time.perf_counter() - t
            nll += loss.item()
            scored += args.seqlen - 1

        prompt = ids[:1].unsqueeze(0)
        gen = dict(do_sample=False, use_cache=True, pad_token_id=tokenizer.eos_token_id)
        model.generate(prompt, max_new_tokens=8, min_new_tokens=8, **gen)  # warm-up
        decode = []
        for _ in range(args.repetitions):
            t = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=args.gen_len, min_new_tokens=args.gen_len, **gen)
            decode.append(time.perf_counter() - t)
            assert out.shape[1] - prompt.shape[1] == args.gen_len

    result = {
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "dtype": "float32",
        "load_seconds": load_seconds,
        "prompt_len": args.seqlen,
        "gen_len": args.gen_len,
        "prefill_tokens_per_second": args.seqlen / min(prefill),
        "prefill_seconds": prefill,
        "ppl": {
            "seqlen": args.seqlen,
            "windows": windows,
            "scored_tokens": scored,
            "perplexity": math.exp(nll / scored),
            "seconds": ppl_seconds,
            "tokens_per_second": windows * args.seqlen / ppl_seconds,
        },
        "decode_tokens_per_second": args.gen_len / min(decode),
        "decode_seconds": decode,
    }
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
