#!/usr/bin/env python3
"""Golden data for bitsandbytes-style quantization (tests/bnb.rs), made with the PyPI
`bitsandbytes` 0.50.2 CPU backend, torch 2.15 and transformers 5.24.

Writes tests/fixtures/bnb/:

  golden.safetensors + golden.json
      4-bit (NF4/FP4, with and without double quantization, several blocksizes) codes and
      statistics from `bitsandbytes.functional.quantize_4bit` on
        * `random`  — a [47, 203] normal weight (odd element count: padding nibble, short block),
        * `ties`    — blocks whose normalised values sit exactly on, and one ulp beside, every
                      rounding threshold of both code books, zeros, ±tiny values, an all-zero block,
        * `real`    — 8 rows of SmolLM2-135M `blk.0.ffn_down` (dequantized from the Q4_1 GGUF),
        * `bsNNN`   — a [8, 1024] weight at blocksizes 32, 128, 256, 4096,
        * `big`     — 300,032 generated values (4,688 blocks, so torch's cascade sum uses more
                      than one level for the double-quant mean); only the statistics and an FNV-1a
                      hash of the packed bytes are stored;
      bnb's `dequantize_4bit` (float32) of the `random` case; the NF4/FP4 tables and the 8-bit
      dynamic map; torch's float32 `mean` (the double-quant offset) of generated vectors;
      LLM.int8: `int8_vectorwise_quant` of a weight (CB, SCB) and of activations with outliers
      (threshold 6 and 0, one row and five rows), the `MatMul8bitLt` output, the
      `int8_vectorwise_dequant` and `MatMul8bitFp` dequantized weights.

  tiny/dense        a tiny random Llama (bf16) saved by transformers
  tiny/{nf4,nf4-dq,fp4,int8}
                    that model loaded by transformers with BitsAndBytesConfig on the CPU and saved
                    again (`save_pretrained`), i.e. exactly what transformers + bitsandbytes write
  tiny/expected.safetensors
                    per checkpoint: bnb's float32 dequantization of every quantized weight and the
                    logits transformers computes for a fixed input

Generated inputs ("gen") avoid storing large arrays: value i of generator (seed, n) is
  s_0 = seed, s_{i+1} = (1664525 · s_i + 1013904223) mod 2^32, x_i = ((s_{i+1} >> 8) − 2^23) · 2^−30
which is exact in float32, so the Rust tests recompute the same inputs.

The CPU backend of bitsandbytes 0.50 computes 4-bit quantization with the torch reference code
(`backends/default/ops.py`: reciprocal of absmax, clamp, `bucketize` on float32 midpoints) and the
8-bit blockwise quantization of double quant with its C++ kernel (`csrc/cpu_ops.cpp`: a 65,536-entry
lookup table on the normalised value). Everything here is produced by those code paths, nothing is
re-implemented in this script.

    $(scripts/setup_python.sh) scripts/golden/make_bnb_golden.py [--out tests/fixtures/bnb]
"""

import argparse
import json
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # torch reductions single-threaded, as documented

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bitsandbytes  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

SEED = 4040
ASSETS = os.path.join(
    os.environ.get("AUTOQUANT_HOME", os.path.expanduser("~/.cache/autoquant")), "assets"
)
GGUF = os.path.join(ASSETS, "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
MAX_FIXTURE_BYTES = 1024 * 1024


def gen_fast(seed, n):
    """The generator of the module docstring."""
    vals = np.empty(n, dtype=np.int64)
    s = seed
    for i in range(n):
        s = (1664525 * s + 1013904223) & 0xFFFFFFFF
        vals[i] = (s >> 8) - 2**23
    return vals.astype(np.float32) * np.float32(2.0**-30)


def fnv1a64(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def f32_bits(x) -> int:
    return int(np.array([x], dtype=np.float32).view(np.uint32)[0])


def ties_input():
    """Blocks of 64 whose first element fixes absmax = 1 (so x/absmax = x exactly), filled with
    every threshold of both code books, the float32 values one ulp either side, zeros, tiny values
    around FP4's ±0.0026 thresholds, then an all-zero block and a block with absmax 3."""
    nf4 = F.get_4bit_type("nf4", device="cpu")
    fp4 = F.get_4bit_type("fp4", device="cpu")
    specials = []
    for code in (nf4, torch.sort(fp4).values):
        mids = ((code[:-1] + code[1:]) / 2).tolist()
        for m in mids:
            m32 = np.float32(m)
            specials += [m32, np.nextafter(m32, np.float32(2)), np.nextafter(m32, np.float32(-2))]
        specials += [np.float32(c) for c in code.tolist()]
    specials += [0.0, -0.0, 1e-3, -1e-3, 2.6e-3, -2.6e-3, 2.7e-3, -2.7e-3, 1e-30, -1e-30, 0.5, -0.5]
    specials = np.array(specials, dtype=np.float32)
    blocks = []
    per_block = 63
    for i in range(0, len(specials), per_block):
        chunk = specials[i : i + per_block]
        sign = 1.0 if (i // per_block) % 2 == 0 else -1.0
        blk = np.concatenate([[np.float32(sign)], chunk]).astype(np.float32)
        blk = np.pad(blk, (0, 64 - len(blk)))
        blocks.append(blk)
    blocks.append(np.zeros(64, dtype=np.float32))
    blocks.append((specials[:64] * np.float32(3.0)).astype(np.float32))
    blocks[-1][5] = np.float32(3.0)
    x = np.concatenate(blocks)
    return x.reshape(1, -1)


def real_input():
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(GGUF)
    t = next(t for t in r.tensors if t.name == "blk.0.ffn_down.weight")
    w = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)][-2:])
    return np.ascontiguousarray(w[:8].astype(np.float32))


def quant4(tensors, meta, name, w, quant_type, blocksize, dq, store_packed=True):
    A = torch.from_numpy(w)
    packed, st = F.quantize_4bit(
        A, blocksize=blocksize, compress_statistics=dq, quant_type=quant_type
    )
    key = f"{name}.{quant_type}.bs{blocksize}" + (".dq" if dq else "")
    entry = {
        "input": name,
        "quant_type": quant_type,
        "blocksize": blocksize,
        "double_quant": dq,
        "shape": list(w.shape),
        "packed_len": int(packed.numel()),
        "packed_fnv1a64": fnv1a64(packed.numpy().tobytes()),
    }
    if store_packed:
        tensors[key + ".packed"] = packed.reshape(-1).contiguous()
    if dq:
        tensors[key + ".absmax_codes"] = st.absmax.contiguous()
        tensors[key + ".nested_absmax"] = st.state2.absmax.contiguous()
        entry["nested_offset_bits"] = f32_bits(st.offset.item())
        entry["nested_blocksize"] = st.state2.blocksize
        assert torch.equal(st.state2.code, F.create_dynamic_map(signed=True))
        # The absmax bnb itself reconstructs from the nested statistics.
        rebuilt = (F.dequantize_blockwise(st.absmax, st.state2) + st.offset).float()
        entry["absmax_rebuilt_fnv1a64"] = fnv1a64(rebuilt.numpy().tobytes())
        if store_packed:
            tensors[key + ".absmax_rebuilt"] = rebuilt.contiguous()
    else:
        tensors[key + ".absmax"] = st.absmax.contiguous()
    # The quant_state JSON bytes bnb serializes for this weight.
    qs = st.as_dict(packed=True)
    (qs_key,) = [k for k in qs if k.startswith("quant_state.")]
    entry["quant_state_json"] = bytes(qs[qs_key].tolist()).decode()
    meta["quant4"][key] = entry
    return st, packed


def int8_cases(tensors, meta):
    rng = np.random.default_rng(SEED + 8)
    n, k = 40, 96
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    w[3] = 0.0  # all-zero row
    w[5, 7] = 1.5  # an outlier weight
    w[9] *= 100.0  # a row past fp16's precision sweet spot
    w[11, :] = np.float32(0.03)  # constant row: every code is 127
    tensors["int8.w"] = torch.from_numpy(w)
    CB, SCB, _ = F.int8_vectorwise_quant(torch.from_numpy(w).to(torch.float16))
    tensors["int8.CB"] = CB.contiguous()
    tensors["int8.SCB"] = SCB.contiguous()
    tensors["int8.deq_vectorwise"] = F.int8_vectorwise_dequant(CB, SCB).contiguous()
    tensors["int8.deq_fp"] = (
        CB.to(torch.float32).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0)).contiguous()
    )
    bias = (rng.standard_normal(n) * 0.1).astype(np.float32)
    tensors["int8.bias"] = torch.from_numpy(bias)

    x = (rng.standard_normal((5, k))).astype(np.float32)
    x[0, 10] = 6.0  # exactly the threshold: an outlier (>=)
    x[1, 20] = -7.5
    x[2, 30] = 5.999
    x[3, 40] = 11.0
    x[4, 50] = -6.0
    x[2, 60] = 0.0
    tensors["int8.x"] = torch.from_numpy(x)
    meta["int8"] = {"n": n, "k": k, "m": 5, "cases": []}
    for rows in (5, 1):
        xs = torch.from_numpy(x[:rows].copy())
        for thr in (6.0, 0.0):
            tag = f"int8.m{rows}.t{int(thr)}"
            CA, SCA, cols = F.int8_vectorwise_quant(xs.to(torch.float16), threshold=thr)
            tensors[tag + ".CA"] = CA.contiguous()
            tensors[tag + ".SCA"] = SCA.contiguous()
            tensors[tag + ".outlier_cols"] = (
                cols.to(torch.int64).contiguous() if cols is not None else torch.zeros(0, dtype=torch.int64)
            )
            state = bitsandbytes.MatmulLtState()
            state.CB = CB
            state.SCB = SCB
            state.threshold = thr
            state.has_fp16_weights = False
            state.is_training = False
            with torch.no_grad():
                out = bitsandbytes.matmul(xs, CB, state=state, threshold=thr, bias=torch.from_numpy(bias))
            assert out.dtype == torch.float32
            tensors[tag + ".out"] = out.contiguous()
            meta["int8"]["cases"].append({"rows": rows, "threshold": thr, "tag": tag})


def tiny_models(out_dir, tensors, meta):
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )
    import bitsandbytes.nn as bnn

    torch.manual_seed(SEED)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        initializer_range=0.1,
        dtype="bfloat16",
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    dense_dir = os.path.join(out_dir, "tiny", "dense")
    model.save_pretrained(dense_dir)
    ids = torch.tensor([[1, 5, 9, 33, 2, 60, 17, 8]])
    expected = {}
    variants = {
        "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        "nf4-dq": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
        ),
        "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
        "int8": BitsAndBytesConfig(load_in_8bit=True),
    }
    for name, qcfg in variants.items():
        qm = AutoModelForCausalLM.from_pretrained(
            dense_dir, quantization_config=qcfg, device_map="cpu"
        )
        qdir = os.path.join(out_dir, "tiny", name)
        qm.save_pretrained(qdir)
        # Reload what was written, so the expected values follow from the files alone. The
        # logits are a float32 reference: the bf16 parameters that stay dense (embeddings, norms,
        # lm_head) are upcast (transformers keeps them bf16 even with dtype=float32), and
        # bitsandbytes' AVX-512 bf16 CPU kernel is switched off, so 4-bit layers take the default
        # path (`gemm_4bit`: dequantize to the activation dtype, float32 matmul).
        qm = AutoModelForCausalLM.from_pretrained(qdir, device_map="cpu", dtype=torch.float32)
        qm.eval()
        for p in qm.parameters():
            if p.dtype == torch.bfloat16:
                p.data = p.data.float()
        for mod in qm.modules():
            if isinstance(mod, bnn.Linear4bit):
                mod.support_avx512bf16_for_cpu = False
        hashes = {}
        for mod_name, mod in qm.named_modules():
            if isinstance(mod, bnn.Linear4bit):
                st = mod.weight.quant_state
                # float32 dequantization (the checkpoint's own dtype is bfloat16).
                st32 = F.QuantState(
                    absmax=st.absmax, shape=st.shape, code=st.code, blocksize=st.blocksize,
                    quant_type=st.quant_type, dtype=torch.float32, offset=st.offset,
                    state2=st.state2,
                )
                w = F.dequantize_4bit(mod.weight.data, st32).float()
            elif isinstance(mod, bnn.Linear8bitLt):
                w = F.int8_vectorwise_dequant(mod.weight.data, mod.weight.SCB).float()
            else:
                continue
            hashes[mod_name] = fnv1a64(w.numpy().tobytes())
            if mod_name == "model.layers.1.mlp.down_proj":
                tensors[f"tiny.{name}.{mod_name}.deq"] = w.contiguous()
        meta.setdefault("tiny_deq_fnv1a64", {})[name] = hashes
        with torch.no_grad():
            logits = qm(ids).logits[0].float()
        expected[name] = logits
        tensors[f"tiny.{name}.logits"] = logits.contiguous()
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    with torch.no_grad():
        tensors["tiny.dense.logits"] = dense(ids).logits[0].float().contiguous()
    tensors["tiny.ids"] = ids[0].contiguous()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/bnb")
    args = ap.parse_args()
    assert bitsandbytes.__version__ == "0.50.2", bitsandbytes.__version__
    out = args.out
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)

    tensors = {}
    meta = {
        "bitsandbytes": bitsandbytes.__version__,
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "quant4": {},
        "gen_seed_note": "see the docstring of scripts/golden/make_bnb_golden.py",
    }
    tensors["table.nf4"] = F.get_4bit_type("nf4", device="cpu").contiguous()
    tensors["table.fp4"] = F.get_4bit_type("fp4", device="cpu").contiguous()
    tensors["table.dynamic"] = F.create_dynamic_map(signed=True).contiguous()

    rng = np.random.default_rng(SEED)
    inputs = {
        "random": (rng.standard_normal((47, 203)) * 0.05).astype(np.float32),
        "ties": ties_input(),
        "real": real_input(),
        "bs": (rng.standard_normal((8, 1024)) * 0.02).astype(np.float32),
    }
    inputs["random"][3, 17:70] = 0.0  # zeros inside blocks
    for name, w in inputs.items():
        tensors[f"input.{name}"] = torch.from_numpy(w)
    for name in ("random", "ties", "real"):
        for qt in ("nf4", "fp4"):
            for dq in (False, True):
                st, packed = quant4(tensors, meta, name, inputs[name], qt, 64, dq)
                if name == "random":
                    key = f"random.{qt}.bs64" + (".dq" if dq else "")
                    deq = F.dequantize_4bit(packed, st).float()
                    meta["quant4"][key]["deq_fnv1a64"] = fnv1a64(deq.numpy().tobytes())
                    if qt == "nf4" and not dq:
                        tensors[key + ".deq"] = deq.contiguous()
    for bs in (32, 128, 256, 4096):
        for dq in (False, True):
            quant4(tensors, meta, "bs", inputs["bs"], "nf4", bs, dq)
    quant4(tensors, meta, "bs", inputs["bs"], "fp4", 128, True)

    # The double-quant mean on more than 1024 statistics (several cascade levels).
    big_n = 300_032
    big = gen_fast(12345, big_n).reshape(1, -1) * np.float32(37.0)
    meta["big"] = {"seed": 12345, "n": big_n, "scale": 37.0}
    for qt in ("nf4", "fp4"):
        quant4(tensors, meta, "big", big, qt, 64, True, store_packed=False)

    # torch's float32 mean (the double-quant offset) of generated vectors.
    means = []
    for n in (1, 7, 15, 16, 17, 63, 64, 65, 100, 255, 256, 1000, 1023, 1024, 1025, 1088, 4096,
              5000, 13824, 20000, 32767):
        v = np.abs(gen_fast(n + 99, n)) * np.float32(3.0)
        t = torch.from_numpy(v)
        means.append({"seed": n + 99, "n": n, "abs_times": 3.0,
                      "mean_bits": f32_bits(t.mean().item()),
                      "sum_bits": f32_bits(t.sum().item())})
    meta["means"] = means

    int8_cases(tensors, meta)
    tiny_models(out, tensors, meta)

    save_file(tensors, os.path.join(out, "golden.safetensors"))
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.write("\n")

    total = 0
    for root, _, files in os.walk(out):
        for fn in files:
            total += os.path.getsize(os.path.join(root, fn))
    print(f"wrote {out}: {total} bytes")
    if total > MAX_FIXTURE_BYTES:
        sys.exit(f"fixtures too large: {total} bytes")


if __name__ == "__main__":
    main()
