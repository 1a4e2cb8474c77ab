#!/usr/bin/env python3
"""Check that a bitsandbytes checkpoint written by autoquant is what transformers + bitsandbytes
would write, and that transformers loads it.

    $(scripts/setup_python.sh) scripts/interop/check_bnb.py OURS [--reference DENSE]

OURS is a folder from `autoquant quantize --method bnb-...` (or `quant::bnb::quantize_checkpoint`).

1. transformers loads OURS on the CPU (bitsandbytes 0.50 CPU backend) and every quantized layer
   is a `Linear4bit` / `Linear8bitLt`; their float32 dequantized weights are computed.
2. With --reference (the dense folder or .gguf file OURS was quantized from), transformers
   quantizes that model itself with the same `BitsAndBytesConfig` and saves it; the two
   safetensors must hold the same tensor names, dtypes, shapes and bytes, and the two models must
   give identical logits (float32 reference path: dense bf16/f16 parameters upcast, bitsandbytes'
   bf16 CPU kernel off).

Exits non-zero on any difference.
"""

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
import bitsandbytes.nn as bnn  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

CONFIG_KEYS = [
    "load_in_4bit",
    "load_in_8bit",
    "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant",
    "bnb_4bit_compute_dtype",
    "llm_int8_threshold",
    "llm_int8_skip_modules",
]


def load_tensors(folder):
    out = {}
    for fn in sorted(os.listdir(folder)):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(folder, fn), "pt") as f:
                for k in f.keys():
                    out[k] = f.get_tensor(k)
    return out


def dequantized(model):
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, bnn.Linear4bit):
            st = mod.weight.quant_state
            st32 = F.QuantState(
                absmax=st.absmax, shape=st.shape, code=st.code, blocksize=st.blocksize,
                quant_type=st.quant_type, dtype=torch.float32, offset=st.offset, state2=st.state2,
            )
            out[name] = F.dequantize_4bit(mod.weight.data, st32).float()
        elif isinstance(mod, bnn.Linear8bitLt):
            out[name] = F.int8_vectorwise_dequant(mod.weight.data, mod.weight.SCB).float()
    return out


def float32_reference(model):
    for p in model.parameters():
        if p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    for mod in model.modules():
        if isinstance(mod, bnn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False
    return model.eval()


def load_reference(path, qcfg, dtype, tmp):
    if path.endswith(".gguf"):
        # transformers will not quantize while reading GGUF, and a GGUF-loaded model refuses
        # save_pretrained: copy its (dequantized) weights into a fresh model and save that.
        src = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path),
            dtype=torch.float32,
        )
        config = src.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        dense.load_state_dict(src.state_dict())
        path = os.path.join(tmp, "dense")
        dense.save_pretrained(path)
        del src, dense
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=qcfg, device_map="cpu", dtype=dtype
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ours")
    ap.add_argument("--reference")
    args = ap.parse_args()
    failures = 0

    cfg = json.load(open(os.path.join(args.ours, "config.json")))
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes", qc
    qcfg = BitsAndBytesConfig(**{k: qc[k] for k in CONFIG_KEYS if k in qc})
    dtype = getattr(torch, cfg.get("dtype") or cfg.get("torch_dtype") or "float32")

    ours = AutoModelForCausalLM.from_pretrained(args.ours, device_map="cpu")
    deq_ours = dequantized(ours)
    print(f"transformers loaded {args.ours}: {len(deq_ours)} bitsandbytes layers")
    if not deq_ours:
        print("FAIL: no Linear4bit/Linear8bitLt layer")
        return 1

    if args.reference:
        with tempfile.TemporaryDirectory() as tmp:
            ref = load_reference(args.reference, qcfg, dtype, tmp)
            saved = os.path.join(tmp, "quantized")
            ref.save_pretrained(saved)
            a, b = load_tensors(args.ours), load_tensors(saved)
        if sorted(a) != sorted(b):
            print("FAIL: tensor names differ:", sorted(set(a) ^ set(b))[:10])
            failures += 1
        same = 0
        for k in sorted(set(a) & set(b)):
            x, y = a[k], b[k]
            if x.dtype != y.dtype or x.shape != y.shape:
                print(f"FAIL: {k}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}")
                failures += 1
            elif x.contiguous().view(torch.uint8).numpy().tobytes() != y.contiguous().view(torch.uint8).numpy().tobytes():
                print(f"FAIL: {k}: bytes differ")
                failures += 1
            else:
                same += 1
        print(f"{same} of {len(b)} tensors byte-identical to transformers' own quantization")
        deq_ref = dequantized(ref)
        for k, w in deq_ours.items():
            if not torch.equal(w, deq_ref[k]):
                print(f"FAIL: {k}: dequantized weights differ")
                failures += 1
        ids = torch.tensor([[1, 504, 3437, 282, 4649, 314, 1045, 30, 378, 2]])
        ids = ids % cfg["vocab_size"]
        with torch.no_grad():
            la = float32_reference(ours)(ids).logits
            lb = float32_reference(ref)(ids).logits
        diff = (la - lb).abs().max().item()
        print(f"max |Δlogit| between the two checkpoints: {diff}")
        if diff != 0.0:
            failures += 1
    print("OK" if failures == 0 else f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
