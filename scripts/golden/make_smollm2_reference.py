#!/usr/bin/env python3
"""Golden reference for the real SmolLM2-135M-Instruct GGUF, computed with transformers + torch.

Writes tests/fixtures/smollm2/reference.json with tokenization cases, greedy continuations
(plain and chat prompt), per-position logit summaries for a fixed 24-token input, and
perplexity on the evaluation text under three protocols (GPTQ paper, llama.cpp, HF-docs stride),
plus timings that serve as the transformers baseline for benchmarks.

Needs the assets from scripts/fetch_assets.sh and the venv from scripts/setup_python.sh:

    $(scripts/setup_python.sh) scripts/golden/make_smollm2_reference.py [--out FILE]

Takes a few minutes on 2 cores (three perplexity passes over ~61k tokens).
"""

import argparse
import hashlib
import json
import math
import os
import platform
import resource
import sys
import time

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
THREADS = 2
SEQLEN = 512
WINDOWS = 40
STRIDE = 256
LLAMA_CPP_FIRST = SEQLEN // 2
MAX_NEW_TOKENS = 32
PLAIN_PROMPT = "The capital of France is"
CHAT_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
LOGITS_TEXT = (
    "In 1969, Neil Armstrong and Buzz Aldrin landed on the Moon; the Apollo 11 mission "
    "returned safely to Earth eight days after its launch from Florida."
)
LOGITS_TOKENS = 24
FIRST_VOCAB_IDS = list(range(64))
# 64 ids spread over the whole vocabulary (deterministic stride), beyond the first 64.
SPREAD_VOCAB_IDS = [64 + (i * 769) % (49152 - 64) for i in range(64)]
TOKENIZATION_TEXTS = [
    "Hello world! How are you doing today?",
    "Digits: 1234567890, 3.14159, 2024-06-01, $1,000,000 and 42nd.",
    "Unicode: café naïve Ünïcödé — “quotes” 東京 日本語 Привет мир 🚀🎉 ñ",
    "Whitespace  runs   here\t\ttabs\n\n\nnewlines    \n  indented\r\nend   ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "Contractions: don't, I'll, we're, it's, they've, she'd. CAPS and MiXeD.",
    "code: def f(x):\n    return x**2  # square\n",
]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def f32(x):
    """Shortest decimal that round-trips the float32 value."""
    return float(str(torch.tensor(float(x), dtype=torch.float32).numpy()))


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def token_nll(model, ids):
    """Per-target negative log-likelihoods (f32 logits, f64 result) for one window [1, n]."""
    logits = model(input_ids=ids).logits[0].float()
    return F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none").double()


def tokenization_cases(tok):
    cases = []
    for text in TOKENIZATION_TEXTS:
        ids = tok(text, add_special_tokens=False).input_ids
        cases.append({
            "text": text,
            "ids": ids,
            "tokens": tok.convert_ids_to_tokens(ids),
            "decoded": tok.decode(ids),
            "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
        })
    return cases


def greedy(model, ids, stop_on_eos):
    extra = {} if stop_on_eos else {"eos_token_id": None}
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
        return_dict_in_generate=True,
        output_logits=True,
        **extra,
    )
    seconds = time.perf_counter() - start
    new = out.sequences[0, ids.shape[1]:].tolist()
    margins = []
    for step in out.logits:
        top2 = torch.topk(step[0].float(), 2).values
        margins.append(f32(top2[0] - top2[1]))
    return new, margins, seconds


def generation_cases(model, tok):
    plain_ids = tok(PLAIN_PROMPT, add_special_tokens=False, return_tensors="pt").input_ids
    chat_text = tok.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, tokenize=False)
    chat_ids = tok(chat_text, add_special_tokens=False, return_tensors="pt").input_ids
    cases = []
    runs = [
        # The plain prompt ends with EOS before 32 tokens, so it is also run without EOS stop
        # to get a full 32-token continuation.
        ("plain", PLAIN_PROMPT, plain_ids, True),
        ("plain_ignore_eos", PLAIN_PROMPT, plain_ids, False),
        ("chat", chat_text, chat_ids, True),
    ]
    for name, prompt, ids, stop_on_eos in runs:
        new, margins, seconds = greedy(model, ids, stop_on_eos)
        cases.append({
            "name": name,
            "prompt": prompt,
            "messages": CHAT_MESSAGES if name == "chat" else None,
            "prompt_ids": ids[0].tolist(),
            "max_new_tokens": MAX_NEW_TOKENS,
            "stop_on_eos": stop_on_eos,
            "generated_ids": new,
            "generated_text": tok.decode(new, skip_special_tokens=False),
            "stopped_on_eos": len(new) < MAX_NEW_TOKENS,
            "top2_margin_per_step": margins,
            "seconds": round(seconds, 3),
            "decode_tokens_per_second": round(len(new) / seconds, 2),
        })
    return cases


def logits_case(model, tok):
    ids = tok(LOGITS_TEXT, add_special_tokens=False).input_ids[:LOGITS_TOKENS]
    if len(ids) != LOGITS_TOKENS:
        raise SystemExit(f"logits text gives {len(ids)} tokens, need {LOGITS_TOKENS}")
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    first = torch.tensor(FIRST_VOCAB_IDS)
    spread = torch.tensor(SPREAD_VOCAB_IDS)
    return {
        "text": LOGITS_TEXT,
        "input_ids": ids,
        "argmax": logits.argmax(-1).tolist(),
        "logsumexp": [f32(v) for v in torch.logsumexp(logits, -1)],
        "first_ids": FIRST_VOCAB_IDS,
        "logits_first_ids": [[f32(v) for v in row[first]] for row in logits],
        "spread_ids": SPREAD_VOCAB_IDS,
        "logits_spread_ids": [[f32(v) for v in row[spread]] for row in logits],
        "max_logit": [f32(v) for v in logits.max(-1).values],
    }


def ppl_gptq_and_llama_cpp(model, all_ids):
    """Both non-overlapping protocols share one forward pass per window (no BOS is added or
    overwritten: the GGUF has add_bos_token = false, so llama.cpp would not overwrite either)."""
    gptq_nll, gptq_count, gptq_windows = 0.0, 0, []
    lcpp_nll, lcpp_count, lcpp_windows = 0.0, 0, []
    start = time.perf_counter()
    for w in range(WINDOWS):
        ids = all_ids[:, w * SEQLEN:(w + 1) * SEQLEN]
        nll = token_nll(model, ids)  # nll[j] scores token j+1 from logits at position j
        gptq_nll += float(nll.sum())
        gptq_count += nll.numel()
        gptq_windows.append(float(nll.mean()))
        tail = nll[LLAMA_CPP_FIRST:]  # logits positions 256..510 -> tokens 257..511
        lcpp_nll += float(tail.sum())
        lcpp_count += tail.numel()
        lcpp_windows.append(float(tail.mean()))
    seconds = time.perf_counter() - start
    tokens = WINDOWS * SEQLEN
    gptq = {
        "protocol": "gptq",
        "description": "text tokenized once without special tokens; non-overlapping windows of "
                       "seqlen from token 0; first `windows` windows; each scores seqlen-1 "
                       "targets (tokens 1..seqlen-1 of the window); PPL = exp(mean NLL over all "
                       "scored tokens)",
        "seqlen": SEQLEN,
        "windows": WINDOWS,
        "scored_per_window": SEQLEN - 1,
        "scored_tokens": gptq_count,
        "mean_nll": gptq_nll / gptq_count,
        "perplexity": math.exp(gptq_nll / gptq_count),
        "window_mean_nll": gptq_windows,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 2),
    }
    lcpp = {
        "protocol": "llama.cpp",
        "description": "same windows and forward passes as gptq; only logits at window positions "
                       f"{LLAMA_CPP_FIRST}..{SEQLEN - 2} are scored (predicting window tokens "
                       f"{LLAMA_CPP_FIRST + 1}..{SEQLEN - 1}); no BOS inserted or overwritten "
                       "because tokenizer.ggml.add_bos_token is false",
        "seqlen": SEQLEN,
        "windows": WINDOWS,
        "first_scored_logit_position": LLAMA_CPP_FIRST,
        "bos_overwrite": False,
        "scored_per_window": SEQLEN - 1 - LLAMA_CPP_FIRST,
        "scored_tokens": lcpp_count,
        "mean_nll": lcpp_nll / lcpp_count,
        "perplexity": math.exp(lcpp_nll / lcpp_count),
        "window_mean_nll": lcpp_windows,
    }
    return gptq, lcpp


def ppl_hf_stride(model, all_ids):
    """The loop of the transformers docs page "Perplexity of fixed-length models"."""
    ids_all = all_ids[:, :WINDOWS * SEQLEN]
    seq_len = ids_all.shape[1]
    windows = []
    docs_weighted_nll, docs_weight = 0.0, 0
    exact_nll, exact_count = 0.0, 0
    prev_end = 0
    start = time.perf_counter()
    for begin in range(0, seq_len, STRIDE):
        end = min(begin + SEQLEN, seq_len)
        trg_len = end - prev_end
        ids = ids_all[:, begin:end]
        nll = token_nll(model, ids)
        # labels[:, :-trg_len] = -100; after the internal shift the loss averages over the
        # targets that remain, i.e. window tokens max(1, n - trg_len) .. n-1.
        n = ids.shape[1]
        first_target = max(1, n - trg_len)
        scored = nll[first_target - 1:]
        loss = float(scored.mean())
        num_valid = trg_len  # labels != -100
        num_loss_tokens = num_valid - 1  # the docs subtract batch_size (1) for the shift
        docs_weighted_nll += loss * num_loss_tokens
        docs_weight += num_loss_tokens
        exact_nll += float(scored.sum())
        exact_count += scored.numel()
        windows.append({
            "begin": begin, "end": end, "trg_len": trg_len,
            "scored_targets": scored.numel(), "docs_weight": num_loss_tokens, "mean_nll": loss,
        })
        prev_end = end
        if end == seq_len:
            break
    seconds = time.perf_counter() - start
    return {
        "protocol": "hf-stride",
        "description": "transformers docs loop over the first windows*seqlen tokens: for begin in "
                       "range(0, N, stride): end = min(begin+max_length, N); trg_len = end - "
                       "prev_end; labels = ids[begin:end] with the first n-trg_len set to -100; "
                       "loss = mean NLL over the labels left after the one-token shift; "
                       "perplexity = exp(sum(loss*(trg_len-1)) / sum(trg_len-1)) exactly as the "
                       "docs weight it; perplexity_exact = exp(total NLL / total scored targets)",
        "max_length": SEQLEN,
        "stride": STRIDE,
        "tokens": seq_len,
        "windows": len(windows),
        "scored_tokens": exact_count,
        "perplexity": math.exp(docs_weighted_nll / docs_weight),
        "mean_nll": docs_weighted_nll / docs_weight,
        "perplexity_exact": math.exp(exact_nll / exact_count),
        "window_details": windows,
        "seconds": round(seconds, 3),
    }


def main():
    home = os.environ.get("AUTOQUANT_HOME", os.path.join(os.path.expanduser("~"), ".cache", "autoquant"))
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=os.path.join(home, "assets", "smollm2"))
    parser.add_argument("--text", default=os.path.join(home, "assets", "text", "wiki.eval.txt"))
    parser.add_argument("--out", default=os.path.normpath(
        os.path.join(here, "..", "..", "tests", "fixtures", "smollm2", "reference.json")))
    args = parser.parse_args()
    gguf_path = os.path.join(args.model_dir, GGUF_NAME)
    for path in (gguf_path, args.text):
        if not os.path.isfile(path):
            sys.exit(f"missing {path}; run scripts/fetch_assets.sh first")

    torch.set_num_threads(THREADS)
    transformers.logging.set_verbosity_error()

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model_dir, gguf_file=GGUF_NAME)
    t1 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, gguf_file=GGUF_NAME, dtype=torch.float32
    ).eval()
    t2 = time.perf_counter()

    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    t3 = time.perf_counter()
    all_ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    t4 = time.perf_counter()
    adds_bos = tok("x").input_ids != tok("x", add_special_tokens=False).input_ids
    if all_ids.shape[1] < WINDOWS * SEQLEN:
        sys.exit(f"{args.text} has {all_ids.shape[1]} tokens, need {WINDOWS * SEQLEN}")

    with torch.no_grad():
        print("tokenization / generation / logits ...", file=sys.stderr)
        tokenization = tokenization_cases(tok)
        generation = generation_cases(model, tok)
        logits = logits_case(model, tok)
        print("perplexity gptq + llama.cpp ...", file=sys.stderr)
        gptq, lcpp = ppl_gptq_and_llama_cpp(model, all_ids)
        print(f"  gptq {gptq['perplexity']:.4f}  llama.cpp {lcpp['perplexity']:.4f}", file=sys.stderr)
        print("perplexity hf-stride ...", file=sys.stderr)
        stride = ppl_hf_stride(model, all_ids)
        print(f"  hf-stride {stride['perplexity']:.4f}", file=sys.stderr)

    reference = {
        "model": {
            "file": GGUF_NAME,
            "sha256": sha256(gguf_path),
            "loaded_as": "AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=torch.float32)",
            "rms_norm_eps": model.config.rms_norm_eps,
            "rope_theta": model.config.rope_parameters["rope_theta"],
        },
        "tokenizer": {
            "loaded_as": "AutoTokenizer.from_pretrained(dir, gguf_file=...)",
            "adds_bos": adds_bos,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "unk_token_id": tok.unk_token_id,
        },
        "text": {
            "file": os.path.basename(args.text),
            "sha256": sha256(args.text),
            "chars": len(text),
            "total_tokens": all_ids.shape[1],
            "first_16_ids": all_ids[0, :16].tolist(),
            "tokenized_with": "tok(text, add_special_tokens=False)",
        },
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "dtype": "float32",
        "threads": THREADS,
        "tokenization": tokenization,
        "generation": generation,
        "logits": logits,
        "perplexity": [gptq, lcpp, stride],
        "timings": {
            "tokenizer_load_seconds": round(t1 - t0, 3),
            "model_load_seconds": round(t2 - t1, 3),
            "tokenize_text_seconds": round(t4 - t3, 3),
            "tokenize_text_tokens_per_second": round(all_ids.shape[1] / (t4 - t3), 1),
            "ppl_seconds": gptq["seconds"],
            "ppl_tokens_per_second": gptq["tokens_per_second"],
            "greedy_decode_tokens_per_second": generation[1]["decode_tokens_per_second"],
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}",
            # Timings on a shared machine are only meaningful when these are below the core count.
            "load_average_1m_at_start": round(load_before, 2),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        },
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(reference, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(tmp, args.out)
    size = os.path.getsize(args.out)
    print(f"wrote {args.out} ({size} bytes)", file=sys.stderr)
    if size > 300 * 1024:
        sys.exit(f"{args.out} is {size} bytes, over the 300 KB budget")


if __name__ == "__main__":
    main()
