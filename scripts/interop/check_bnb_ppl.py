#!/usr/bin/env python3
"""Perplexity of SmolLM2-135M quantized by bitsandbytes itself (transformers + bitsandbytes 0.50,
CPU), under the protocol of `autoquant ppl --seqlen 512 --max-windows 40` (the paper protocol:
text tokenized once without special tokens, non-overlapping 512-token windows, each scoring 511
targets, PPL = exp(mean NLL)). Decoder linears are quantized; embeddings and lm_head are kept.

    $(scripts/setup_python.sh) scripts/interop/check_bnb_ppl.py [VARIANT ...] [--bf16-kernel]

VARIANTs: f32 nf4 nf4-dq fp4 fp4-dq int8-deq int8-t6 int8-t0 (default: all).

On a CPU with AVX-512 BF16, bitsandbytes runs 4-bit layers through a bf16 kernel (bf16
activations and absmax); by default this script switches it off so 4-bit layers take the
float32 `gemm_4bit` path (dequantize, float32 matmul), the arithmetic autoquant's default
compute dtype reproduces; --bf16-kernel keeps bitsandbytes' choice. `int8-deq` runs
`Linear8bitLt` in training mode, where the CPU backend uses `MatMul8bitFp` (weights dequantized,
float activations); the int8-t* variants are LLM.int8 inference with that outlier threshold.
"""

import argparse
import math
import os
import shutil
import tempfile
import time

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import bitsandbytes.nn as bnn  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig  # noqa: E402

ASSETS = os.path.join(
    os.environ.get("AUTOQUANT_HOME", os.path.expanduser("~/.cache/autoquant")), "assets"
)
GGUF_DIR = os.path.join(ASSETS, "smollm2")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = os.path.join(ASSETS, "text", "wiki.eval.txt")
SEQLEN, WINDOWS = 512, 40

VARIANTS = {
    "f32": None,
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "int8-deq": dict(load_in_8bit=True),
    "int8-t6": dict(load_in_8bit=True, llm_int8_threshold=6.0),
    "int8-t0": dict(load_in_8bit=True, llm_int8_threshold=0.0),
}


def perplexity(model, ids):
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(WINDOWS):
            x = ids[w * SEQLEN : (w + 1) * SEQLEN].unsqueeze(0)
            logits = model(input_ids=x).logits[0].float()
            loss = F.cross_entropy(logits[:-1], x[0, 1:], reduction="sum")
            nll += float(loss)
            count += SEQLEN - 1
    return math.exp(nll / count), count


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--bf16-kernel", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)
    text = open(TEXT, encoding="utf-8").read()
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    # transformers will not quantize while reading a GGUF file: convert it to a float32 folder
    # once (the same dequantized weights autoquant reads).
    # (A GGUF-loaded model refuses save_pretrained, so its weights go into a fresh model.)
    dense_dir = tempfile.mkdtemp(prefix="smollm2-f32-")
    src = AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    dense.load_state_dict(src.state_dict())
    dense.save_pretrained(dense_dir)
    del src, dense
    for name in args.variants:
        q = VARIANTS[name]
        kwargs = dict(dtype=torch.float32, device_map="cpu")
        if q is not None:
            kwargs["quantization_config"] = BitsAndBytesConfig(**q)
        model = AutoModelForCausalLM.from_pretrained(dense_dir, **kwargs)
        model.eval()
        for mod in model.modules():
            if isinstance(mod, bnn.Linear4bit) and not args.bf16_kernel:
                mod.support_avx512bf16_for_cpu = False
        if name == "int8-deq":
            model.train()  # Linear8bitLt → MatMul8bitFp on the CPU; Llama has no dropout
        t0 = time.time()
        ppl, count = perplexity(model, ids)
        kernel = " (bf16 kernel)" if args.bf16_kernel and name.startswith(("nf4", "fp4")) else ""
        print(f"{name}{kernel}: perplexity {ppl:.4f} over {count} targets ({time.time() - t0:.0f}s)", flush=True)
    shutil.rmtree(dense_dir)


if __name__ == "__main__":
    main()
