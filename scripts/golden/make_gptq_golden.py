#!/usr/bin/env python3
"""Golden GPTQ data packed and read by AutoGPTQ's own QuantLinear (auto-gptq 0.7.1, CPU path).

Writes into tests/fixtures/gptq/:
  pack/golden.safetensors + pack/cases.json
      (a) per case: the inputs (codes [N,K] U8, true zero points [G,N] I32, scales [G,N] F32
      holding float16 values, g_idx [K] I32) and what AutoGPTQ made of them: `QuantLinear.pack`
      (qweight, qzeros, scales as F16, g_idx) and the weight its CPU forward dequantizes
      (checked equal to scale * (code - zero) here; stored as `deq_cuda` from qlinear_cuda and
      `deq_cuda_old` from qlinear_cuda_old, [N,K] F32, only for the wrap case, where they differ).
      2/3/4/8 bits, symmetric and asymmetric, grouped and per-channel, act-order g_idx, and one
      case whose zero point 0 is written into the top field of its v1 words (the "wrap").
  <variant>/config.json, model.safetensors (or AutoGPTQ's file name), [quantize_config.json],
  expected.json
      (b) tiny GPTQ checkpoints: a tiny Llama (and the committed tiny GPT-2) whose decoder linears
      are RTN-quantized on the reference grid (docs/formats.md §1.2) and packed by QuantLinear.pack;
      expected logits from transformers with every quantized Linear replaced by QuantLinear
      (scripts/interop/autogptq_ref.py; gptq_v2 goes through AutoGPTQ's unpackers).

The tiny Llama is made here rather than taken from tests/fixtures/tiny: AutoGPTQ sizes qweight
as K//32*b rows and qzeros as N//32*b columns, so every in/out feature count must be a multiple
of 32, and the committed tiny Llamas have intermediate_size 48.

    $(scripts/setup_python.sh) scripts/golden/make_gptq_golden.py [--out tests/fixtures/gptq]
"""

import argparse
import json
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "interop"))
import autogptq_ref as ref  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SEED = 20240701
MAX_TOTAL_BYTES = 1_000_000
INPUT_IDS = [
    [1, 17, 42, 5, 88, 23, 61, 9, 77, 30, 54, 12],
    [1, 3, 90, 45, 45, 8, 66, 71, 19, 2, 33, 50, 27, 84, 11, 60, 38, 7, 93, 25],
]


# ------------------------------------------------------------------------------------------
# The quantization grid (docs/formats.md §1.2), written from the spec; scales are rounded to float16
# first so codes, stored scales and AutoGPTQ's re-derived codes all agree exactly.

def grid(x, bits, sym):
    """Scale and zero point per row of x ([rows, cols], f32)."""
    maxq = 2 ** bits - 1
    xmin = torch.clamp(x.min(dim=1).values, max=0)
    xmax = torch.clamp(x.max(dim=1).values, min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        neg = xmin < 0
        xmin = torch.where(neg, -xmax, xmin)
    both0 = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both0, torch.full_like(xmin, -1), xmin)
    xmax = torch.where(both0, torch.full_like(xmax, 1), xmax)
    scale = ((xmax - xmin) / maxq).half().float()
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def act_order_g_idx(k, group, generator):
    """g_idx of act-order GPTQ: columns taken in a (here random) order, consecutive runs of
    `group` columns in that order form the groups; g_idx[perm[i]] = i // group."""
    perm = torch.randperm(k, generator=generator)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = torch.arange(k, dtype=torch.int32) // group
    return g_idx


def rtn(w, bits, group, sym, g_idx):
    """Codes [N,K], scales [G,N], zeros [G,N] for weight w [N,K] with groups given by g_idx."""
    n, k = w.shape
    groups = int(g_idx.max()) + 1
    maxq = 2 ** bits - 1
    codes = torch.zeros(n, k, dtype=torch.int64)
    scales = torch.zeros(groups, n)
    zeros = torch.zeros(groups, n)
    for g in range(groups):
        cols = (g_idx == g).nonzero().flatten()
        s, z = grid(w[:, cols], bits, sym)
        codes[:, cols] = torch.clamp(torch.round(w[:, cols] / s[:, None]) + z[:, None], 0, maxq).long()
        scales[g], zeros[g] = s, z
    return codes, scales, zeros


def fake_quant(codes, scales, zeros, g_idx):
    g = g_idx.long()
    return scales[g].t() * (codes.float() - zeros[g].t())


def pack(kind, bits, group, codes, scales, zeros, g_idx, bias=None, conv1d=False):
    """AutoGPTQ QuantLinear.pack on the fake-quantized weight, held in an nn.Linear or (GPT-2)
    a transformers Conv1D; returns the QuantLinear."""
    n, k = codes.shape
    w = fake_quant(codes, scales, zeros, g_idx)
    if conv1d:
        module = transformers.pytorch_utils.Conv1D(n, k)
        w = w.t()
    else:
        module = torch.nn.Linear(k, n, bias=bias is not None)
    with torch.no_grad():
        module.weight.copy_(w)
        if bias is not None:
            module.bias.copy_(bias)
        elif conv1d:
            module.bias = None
    q = ref.quant_linear_class(kind)(bits, group, k, n, bias is not None, weight_dtype=torch.float32)
    # pack takes scales/zeros as [N, G] (it transposes them); qlinear_cuda_old ignores g_idx.
    # Copies: pack subtracts 1 from zeros in place, and for G = 1 `.t().contiguous()` is a view.
    q.pack(module, scales.t().clone(), zeros.t().clone(), g_idx.clone())
    return q


def dequant(q):
    """[N, K] weight the module computes with (forward on the identity)."""
    q = q.eval()
    q.scales = q.scales.float()
    with torch.no_grad():
        return q(torch.eye(q.infeatures)).t().contiguous()


# ------------------------------------------------------------------------------------------
# (a) packed tensors

def pack_cases(out, generator):
    n, k = 32, 64
    cases, tensors = [], {}
    specs = []
    for bits in (2, 3, 4, 8):
        specs += [
            (f"b{bits}_sym_g32", bits, 32, True, False),
            (f"b{bits}_asym_g16_actorder", bits, 16, False, True),
            (f"b{bits}_asym_perchannel", bits, -1, False, False),
            (f"b{bits}_sym_perchannel", bits, -1, True, False),
        ]
    specs.append(("b4_asym_g32_wrap", 4, 32, False, False))
    for name, bits, group, sym, actorder in specs:
        gsize = k if group == -1 else group
        w = torch.randn(n, k, generator=generator) * 0.05
        if actorder:
            g_idx = act_order_g_idx(k, gsize, generator)
        else:
            g_idx = (torch.arange(k) // gsize).to(torch.int32)
        if name.endswith("wrap"):
            # Rows 7 and 31 (the top 4-bit field of their qzeros word) get groups without
            # negatives, so their asymmetric zero point is 0; v1 stores -1 there.
            w[7, :32] = w[7, :32].abs()
            w[31, 32:] = w[31, 32:].abs()
        codes, scales, zeros = rtn(w, bits, gsize, sym, g_idx)
        if not sym and not name.endswith("wrap") and (zeros == 0).any():
            raise SystemExit(f"{name}: a zero point is 0; AutoGPTQ's v1 packing would corrupt it, pick another seed")
        kind = "cuda" if actorder else "cuda_old"
        q = pack(kind, bits, group, codes, scales, zeros, g_idx)
        deq_cuda = dequant(pack("cuda", bits, group, codes, scales, zeros, g_idx))
        deq_old = dequant(pack("cuda_old", bits, group, codes, scales, zeros, g_idx))
        expect = fake_quant(codes, scales, zeros, g_idx)
        if not name.endswith("wrap") and not torch.equal(deq_cuda, expect):
            raise SystemExit(f"{name}: AutoGPTQ does not read back its own packing exactly")
        if not name.endswith("wrap") and not actorder and not torch.equal(deq_old, expect):
            raise SystemExit(f"{name}: qlinear_cuda_old does not read back the packing exactly")
        p = name
        tensors.update({
            f"{p}.codes": codes.to(torch.uint8).contiguous(),
            f"{p}.zeros": zeros.to(torch.int32).contiguous(),
            f"{p}.scales_f32": scales.contiguous(),
            f"{p}.g_idx_in": g_idx.contiguous(),
            f"{p}.qweight": q.qweight.contiguous(),
            f"{p}.qzeros": q.qzeros.contiguous(),
            f"{p}.scales": q.scales.half().contiguous(),
            f"{p}.g_idx": q.g_idx.to(torch.int32).contiguous(),
        })
        if name.endswith("wrap"):
            # Elsewhere both readers return exactly fake_quant(inputs) (checked above for
            # qlinear_cuda), so only the case where they disagree is stored.
            tensors[f"{p}.deq_cuda"] = deq_cuda
            tensors[f"{p}.deq_cuda_old"] = deq_old
        cases.append({"name": name, "bits": bits, "group_size": group, "sym": sym, "desc_act": actorder,
                      "n": n, "k": k, "packed_by": f"qlinear_{kind}",
                      "zero_point_0_count": int((zeros == 0).sum())})
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "golden.safetensors"), metadata={"format": "pt"})
    meta = {
        "auto_gptq_version": "0.7.1",
        "torch_version": torch.__version__,
        "note": "codes/zeros/scales_f32/g_idx_in are the inputs; qweight/qzeros/scales/g_idx are "
                "QuantLinear.pack's output (scales converted to f16 from the f32 module); deq_* (wrap case "
                "only) are the [N,K] weights AutoGPTQ's CPU forward computes (qlinear_cuda: honours g_idx, zero = field+1; "
                "qlinear_cuda_old: ignores g_idx, zero = (field+1) & maxq for 2/4/8 bits)",
        "cases": cases,
    }
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


# ------------------------------------------------------------------------------------------
# (b) tiny checkpoints

def tiny_llama(seed):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=1, eos_token_id=2, initializer_range=0.15,
    )
    config._attn_implementation = "eager"
    config.architectures = ["LlamaForCausalLM"]
    model = transformers.LlamaForCausalLM(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def tiny_gpt2():
    folder = os.path.join(ROOT, "tests", "fixtures", "tiny", "gpt2")
    model = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    return model


def decoder_linears(model):
    out = []
    for name, m in model.named_modules():
        if ".layers." in name or ".h." in name:
            if isinstance(m, torch.nn.Linear) or isinstance(m, transformers.pytorch_utils.Conv1D):
                out.append((name, m))
    return out


def quantize_model(model, v, generator):
    """Quantize every decoder linear; returns the checkpoint tensors."""
    bits, group, sym, actorder, fmt = v["bits"], v["group_size"], v["sym"], v["desc_act"], v["format"]
    tensors = {}
    quantized = set()
    for name, lin in decoder_linears(model):
        w = lin.weight.data.clone()
        is_conv1d = isinstance(lin, transformers.pytorch_utils.Conv1D)
        if is_conv1d:
            w = w.t().contiguous()
        n, k = w.shape
        gsize = k if group == -1 else group
        if v.get("force_zero_point_0"):
            # Make some groups non-negative so asymmetric zero points of 0 appear (why v2 exists).
            w[::5, :gsize] = w[::5, :gsize].abs()
        g_idx = act_order_g_idx(k, gsize, generator) if actorder else (torch.arange(k) // gsize).to(torch.int32)
        codes, scales, zeros = rtn(w, bits, gsize, sym, g_idx)
        has_zero0 = bool((zeros == 0).any())
        if fmt == "gptq" and has_zero0:
            raise SystemExit(f"{v['name']}: {name} has zero point 0, which v1 cannot store; pick another seed")
        if fmt == "gptq_v2" and not has_zero0 and v.get("force_zero_point_0"):
            raise SystemExit(f"{v['name']}: {name} has no zero point 0")
        kind = "cuda" if actorder else "cuda_old"
        bias = lin.bias.data.clone() if lin.bias is not None else None
        q = pack(kind, bits, group, codes, scales, zeros, g_idx, bias=bias, conv1d=is_conv1d)
        if fmt == "gptq_v2":
            # AutoGPTQ writes Z - 1; packing Z + 1 through it gives the v2 fields (Z) exactly.
            qz = pack(kind, bits, group, codes, scales, zeros + 1, g_idx, bias=bias, conv1d=is_conv1d).qzeros
        else:
            qz = q.qzeros
        tensors[f"{name}.qweight"] = q.qweight.contiguous()
        tensors[f"{name}.qzeros"] = qz.contiguous()
        tensors[f"{name}.scales"] = q.scales.half().contiguous()
        if not v.get("drop_g_idx"):
            tensors[f"{name}.g_idx"] = q.g_idx.to(torch.int32).contiguous()
        if bias is not None:
            tensors[f"{name}.bias"] = bias.half().contiguous()
        quantized.add(name)
    for key, t in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in quantized or key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if key.endswith(".attn.bias") or key.endswith(".masked_bias"):
            continue
        tensors[key] = t.half().contiguous()
    return tensors


def autogptq_071_config(v):
    """quantize_config.json / quantization_config as AutoGPTQ 0.7.1's BaseQuantizeConfig.to_dict()."""
    return {"bits": v["bits"], "group_size": v["group_size"], "damp_percent": 0.01, "desc_act": v["desc_act"],
            "static_groups": False, "sym": v["sym"], "true_sequential": True, "model_name_or_path": None,
            "model_file_base_name": v.get("file_base"), "is_marlin_format": False, "quant_method": "gptq"}


def transformers5_config(v):
    """quantization_config as transformers 5's GPTQConfig.to_dict() writes it (both format keys)."""
    c = transformers.GPTQConfig(bits=v["bits"], group_size=v["group_size"], desc_act=v["desc_act"], sym=v["sym"],
                                damp_percent=0.01, checkpoint_format=v["format"],
                                meta={"quantizer": ["optimum:2.0.0", "gptqmodel:4.0.0"]})
    return c.to_dict()


def gptqmodel_config(v):
    """quantize_config as GPTQModel writes it: method/format plus the compat spellings, meta."""
    return {"bits": v["bits"], "group_size": v["group_size"], "desc_act": v["desc_act"], "lm_head": False,
            "quant_method": "gptq", "checkpoint_format": v["format"], "method": "gptq", "format": v["format"],
            "pack_dtype": "int32", "sym": v["sym"],
            "meta": {"quantizer": ["gptqmodel:4.0.0"], "damp_percent": 0.01, "static_groups": False,
                     "true_sequential": True, "uri": "https://github.com/modelcloud/gptqmodel"}}


def minimal_config(v):
    return {"quant_method": "gptq", "bits": v["bits"], "group_size": v["group_size"], "desc_act": v["desc_act"],
            "sym": v["sym"], "checkpoint_format": v["format"]}


VARIANTS = [
    dict(name="llama_4bit_sym_g32", base="llama", bits=4, group_size=32, sym=True, desc_act=False, format="gptq",
         style="autogptq_071", file_base="gptq_model-4bit-32g"),
    dict(name="llama_4bit_asym_actorder_g32", base="llama", bits=4, group_size=32, sym=False, desc_act=True,
         format="gptq", style="transformers5"),
    dict(name="llama_3bit_asym_g32_quantize_config_only", base="llama", bits=3, group_size=32, sym=False,
         desc_act=False, format="gptq", style="autogptq_legacy"),
    dict(name="llama_2bit_asym_perchannel_no_g_idx", base="llama", bits=2, group_size=-1, sym=False,
         desc_act=False, format="gptq", style="minimal", drop_g_idx=True),
    dict(name="llama_8bit_sym_g32_gptqmodel", base="llama", bits=8, group_size=32, sym=True, desc_act=False,
         format="gptq", style="gptqmodel"),
    dict(name="llama_4bit_asym_v2_g32", base="llama", bits=4, group_size=32, sym=False, desc_act=False,
         format="gptq_v2", style="gptqmodel", force_zero_point_0=True),
    dict(name="gpt2_4bit_sym_g32", base="gpt2", bits=4, group_size=32, sym=True, desc_act=False, format="gptq",
         style="autogptq_071"),
]


def write_variant(out_root, v, base_models, generator):
    folder = os.path.join(out_root, v["name"])
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    model = base_models[v["base"]]
    tensors = quantize_model(model, v, generator)
    file_base = v.get("file_base") or "model"
    save_file(tensors, os.path.join(folder, file_base + ".safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    cfg_path = os.path.join(folder, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["dtype"] = "float16"
    style = v["style"]
    if style == "autogptq_071":
        qc = autogptq_071_config(v)
        cfg["quantization_config"] = qc
        with open(os.path.join(folder, "quantize_config.json"), "w") as f:
            json.dump(qc, f, indent=2)
    elif style == "autogptq_legacy":
        qc = autogptq_071_config(v)
        for key in ("is_marlin_format", "quant_method"):  # AutoGPTQ <= 0.6 wrote neither
            qc.pop(key)
        with open(os.path.join(folder, "quantize_config.json"), "w") as f:
            json.dump(qc, f, indent=2)
    elif style == "transformers5":
        cfg["quantization_config"] = transformers5_config(v)
    elif style == "gptqmodel":
        cfg["quantization_config"] = gptqmodel_config(v)
        with open(os.path.join(folder, "quantize_config.json"), "w") as f:
            json.dump(gptqmodel_config(v), f, indent=2)
    else:
        cfg["quantization_config"] = minimal_config(v)
    with open(cfg_path, "w") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    ref_model, desc = ref.build_model(folder)
    cases = []
    with torch.no_grad():
        for ids in INPUT_IDS:
            logits = ref_model(input_ids=torch.tensor([ids])).logits
            cases.append({"input_ids": [ids], "shape": list(logits.shape),
                          "logits": [float(str(x)) for x in logits.float().numpy().reshape(-1)]})
        dense = model(input_ids=torch.tensor([INPUT_IDS[0]])).logits
    q_logits = torch.tensor(cases[0]["logits"]).view(dense.shape)
    rel = float((q_logits - dense).abs().max() / dense.abs().max())
    expected = {
        "variant": v["name"],
        "reference": desc,
        "auto_gptq_version": "0.7.1",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "bits": v["bits"], "group_size": v["group_size"], "sym": v["sym"], "desc_act": v["desc_act"],
        "checkpoint_format": v["format"], "config_style": style,
        "quantized_vs_float_max_rel": rel,
        "logits_layout": "flat row-major f32, shape [batch, seq, vocab]",
        "cases": cases,
    }
    with open(os.path.join(folder, "expected.json"), "w") as f:
        json.dump(expected, f, separators=(",", ":"))
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(folder, x)) for x in os.listdir(folder))
    print(f"{v['name']}: {size} bytes; quantized vs float logits max rel {rel:.3f}; {desc}")
    return size


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "gptq"))
    args = ap.parse_args()
    generator = torch.Generator().manual_seed(SEED)
    pack_cases(os.path.join(args.out, "pack"), generator)
    base = {"llama": tiny_llama(SEED), "gpt2": tiny_gpt2()}
    total = os.path.getsize(os.path.join(args.out, "pack", "golden.safetensors"))
    for v in VARIANTS:
        total += write_variant(args.out, v, base, generator)
    print(f"total {total} bytes")
    if total > MAX_TOTAL_BYTES:
        raise SystemExit(f"fixtures are {total} bytes, over the {MAX_TOTAL_BYTES} budget")


if __name__ == "__main__":
    main()
