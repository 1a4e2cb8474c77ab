#!/usr/bin/env python3
"""Golden AWQ data packed and dequantized by AutoAWQ 0.2.7.post3's own code (CPU), for
tests/awq_format.rs.

Writes into tests/fixtures/awq/:
  pack/golden.safetensors + pack/cases.json
      per case (a few [N, K] shapes, group 32/64/128, zero_point=True): the inputs (codes [N,K] U8,
      zero points [G,N] I32, scales [G,N] F32 holding float16 values) and what AutoAWQ made of
      them with `WQLinear_GEMM.from_linear` (gemm.qweight/qzeros/scales), `WQLinear_GEMV.from_linear`
      (gemv.*) and `WQLinear_GEMVFast.from_linear` (gemv_fast.*, int16 qweight, float -s*z
      "qzeros"), plus `packing_utils.dequantize_gemm` of the GEMM tensors as AutoAWQ runs it
      (float16 scales, so a float16 [K,N] result: `deq_f16`). `dequantize_gemm` with the scales
      in float32 is checked here to equal scale * (code - zero) exactly.
  <variant>/config.json, model.safetensors, expected.json
      tiny AWQ checkpoints of a tiny random Llama (llama_gemm_g32: 2 layers, GEMM, group 32, config
      from AutoAWQ's AwqConfig; llama_gemv_g64_skip_down: 1 layer, GEMV, group 64, down_proj left
      dense via modules_to_not_convert, config from transformers 5's AwqConfig): every decoder linear (except those matching
      modules_to_not_convert) quantized with AWQ's pseudo-quantizer (docs/formats.md §2.7, no scale or
      clip search: the loader does not care how the grid was chosen) and packed by from_linear;
      other tensors float16. Expected logits come from transformers' LlamaForCausalLM (float32,
      eager) whose quantized linears hold AutoAWQ's `dequantize_gemm` of the packed tensors
      (scales passed as float32, i.e. exactly scale * (q - z)); for GEMV, which has no CPU
      dequantizer in AutoAWQ, the codes are first re-packed as GEMM by from_linear.

transformers 5 loads AWQ checkpoints only through gptqmodel, which is not installed; the
dequantized-weight model is what its CPU path computes.

AutoAWQ's package __init__ imports its whole model zoo; stub modules stand in for `awq`,
`awq.utils.module` (`try_import`), `awq.utils.utils` (`get_best_device`), `awq.modules*` and
`awq.models` so that only packing_utils.py, the three linear modules and models/_config.py
(`to_transformers_dict`, the config AutoAWQ writes) run (assets.md).

    $(scripts/setup_python.sh) scripts/golden/make_awq_golden.py [--out tests/fixtures/awq]
"""

import argparse
import importlib
import json
import os
import shutil
import sys
import types

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SEED = 20240905
MAX_TOTAL_BYTES = 300_000
INPUT_IDS = [
    [1, 17, 42, 5, 88, 23, 61, 9, 77, 30, 54, 12],
    [1, 3, 90, 45, 45, 8, 66, 71, 19, 2, 33, 50, 27, 84, 11, 60, 38, 7, 93, 25],
]


# ------------------------------------------------------------------------------------------
# AutoAWQ pieces without its package __init__

def load_autoawq():
    import importlib.util
    spec = importlib.util.find_spec("awq")
    if spec is None:
        raise SystemExit("autoawq is not installed: pip install --no-deps autoawq==0.2.7.post3")
    pkg_dir = list(spec.submodule_search_locations)[0]

    def package(name, path):
        m = types.ModuleType(name)
        m.__path__ = [path] if path else []
        sys.modules[name] = m
        return m

    package("awq", pkg_dir)
    package("awq.utils", os.path.join(pkg_dir, "utils"))
    package("awq.modules", os.path.join(pkg_dir, "modules"))
    package("awq.modules.linear", os.path.join(pkg_dir, "modules", "linear"))
    package("awq.modules.triton", None)  # gemm.py's optional triton import then fails cleanly
    package("awq.models", os.path.join(pkg_dir, "models"))
    module = types.ModuleType("awq.utils.module")
    module.try_import = lambda name: (None, f" ({name} not loaded: golden data on the CPU)")
    sys.modules["awq.utils.module"] = module
    utils = types.ModuleType("awq.utils.utils")
    utils.get_best_device = lambda: "cpu"
    sys.modules["awq.utils.utils"] = utils
    from importlib.metadata import version
    v = version("autoawq")
    if v != "0.2.7.post3":
        raise SystemExit(f"autoawq {v} installed; the fixtures were made with 0.2.7.post3")
    return (importlib.import_module("awq.models._config").AwqConfig,
            importlib.import_module("awq.utils.packing_utils"),
            importlib.import_module("awq.modules.linear.gemm").WQLinear_GEMM,
            importlib.import_module("awq.modules.linear.gemv").WQLinear_GEMV,
            importlib.import_module("awq.modules.linear.gemv_fast").WQLinear_GEMVFast)


AUTOAWQ_CONFIG, PACKING, GEMM, GEMV, GEMV_FAST = load_autoawq()


# ------------------------------------------------------------------------------------------
# AWQ's pseudo-quantizer (docs/formats.md §2.7, zero_point=True), written from the spec and run in
# float16 like AutoAWQ (`_apply_quant` casts the layer to half first).

def awq_grid(w, group):
    """Codes [N,K] (int64), scales [G,N] (float32 holding float16 values), zeros [G,N] (float32)."""
    n, k = w.shape
    x = w.half().reshape(-1, group)
    mx = x.amax(dim=1, keepdim=True)
    mn = x.amin(dim=1, keepdim=True)
    scales = (mx - mn).clamp(min=1e-5) / 15
    zeros = (-torch.round(mn / scales)).clamp(0, 15)
    codes = torch.clamp(torch.round(x / scales) + zeros, 0, 15)
    codes = codes.reshape(n, k).long()
    scales = scales.reshape(n, k // group).t().float().contiguous()
    zeros = zeros.reshape(n, k // group).t().float().contiguous()
    return codes, scales, zeros


def fake_quant(codes, scales, zeros, group):
    """scale * (code - zero) as [N, K] float32: exact, since the scales are float16 values."""
    s = scales.t().repeat_interleave(group, dim=1)
    z = zeros.t().repeat_interleave(group, dim=1)
    return s * (codes.float() - z)


def linear_holding(w, bias=None):
    n, k = w.shape
    lin = torch.nn.Linear(k, n, bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def pack_all(codes, scales, zeros, group, versions=("gemm", "gemv", "gemv_fast")):
    """from_linear of each layout on the fake-quantized weight (which makes from_linear's own
    re-derivation of the codes, round((W + z*s) / s), exact); checks the codes came back."""
    lin = linear_holding(fake_quant(codes, scales, zeros, group))
    out = {}
    with torch.no_grad():
        if "gemm" in versions:
            out["gemm"] = GEMM.from_linear(lin, 4, group, scales=scales.clone(), zeros=zeros.clone())
        if "gemv" in versions:
            out["gemv"] = GEMV.from_linear(lin, 4, group, scales=scales.t().contiguous(),
                                           zeros=zeros.t().contiguous())
        if "gemv_fast" in versions:
            out["gemv_fast"] = GEMV_FAST.from_linear(lin, 4, group, scales=scales.t().contiguous(),
                                                     zeros=zeros.t().contiguous())
    if "gemm" in versions:
        m = out["gemm"]
        deq32 = PACKING.dequantize_gemm(m.qweight, m.qzeros, m.scales.float(), 4, group)
        if not torch.equal(deq32.t(), fake_quant(codes, scales, zeros, group)):
            raise SystemExit("dequantize_gemm does not return scale * (code - zero) for the packed inputs")
    return out


# ------------------------------------------------------------------------------------------
# (a) packed tensors

# from_linear sizes qweight/qzeros as N // 32 * 4 columns, so AutoAWQ can only pack N % 32 == 0
# (the layout itself, and the loaders, need only N % 8 == 0).
PACK_CASES = [  # name, N, K, group
    ("n32_k64_g32", 32, 64, 32),
    ("n64_k128_g64", 64, 128, 64),
    ("n32_k256_g128", 32, 256, 128),
]


def pack_cases(out, generator):
    tensors, cases = {}, []
    for name, n, k, group in PACK_CASES:
        w = torch.randn(n, k, generator=generator) * 0.05
        # Edge zero points: a group with no negatives (z = 0) and one with no positives (z = 15),
        # in different nibbles of their words.
        w[3, :group] = w[3, :group].abs() + 0.01
        w[n - 2, k - group:] = -w[n - 2, k - group:].abs() - 0.01
        codes, scales, zeros = awq_grid(w, group)
        if not ((zeros == 0).any() and (zeros == 15).any() and (codes == 15).any()):
            raise SystemExit(f"{name}: edge values 0 / 15 missing")
        packed = pack_all(codes, scales, zeros, group)
        gemm = packed["gemm"]
        deq16 = PACKING.dequantize_gemm(gemm.qweight, gemm.qzeros, gemm.scales, 4, group)
        assert deq16.dtype == torch.float16
        p = name
        tensors.update({
            f"{p}.codes": codes.to(torch.uint8).contiguous(),
            f"{p}.zeros": zeros.to(torch.int32).contiguous(),
            f"{p}.scales_f32": scales.contiguous(),
            f"{p}.gemm.qweight": gemm.qweight.contiguous(),
            f"{p}.gemm.qzeros": gemm.qzeros.contiguous(),
            f"{p}.gemm.scales": gemm.scales.contiguous(),
            f"{p}.gemv.qweight": packed["gemv"].qweight.contiguous(),
            f"{p}.gemv.qzeros": packed["gemv"].qzeros.contiguous(),
            f"{p}.gemv.scales": packed["gemv"].scales.contiguous(),
            f"{p}.gemv_fast.qweight": packed["gemv_fast"].qweight.contiguous(),
            f"{p}.gemv_fast.qzeros": packed["gemv_fast"].qzeros.contiguous(),
            f"{p}.gemv_fast.scales": packed["gemv_fast"].scales.contiguous(),
            f"{p}.deq_f16": deq16.contiguous(),
        })
        cases.append({"name": name, "n": n, "k": k, "group_size": group})
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "golden.safetensors"), metadata={"format": "pt"})
    meta = {
        "autoawq_version": "0.2.7.post3",
        "torch_version": torch.__version__,
        "note": "codes [N,K] / zeros [G,N] / scales_f32 [G,N] are the inputs; <layout>.* are "
                "WQLinear_<layout>.from_linear's buffers; deq_f16 [K,N] is packing_utils.dequantize_gemm "
                "of the gemm tensors (float16 arithmetic, as AutoAWQ runs it)",
        "cases": cases,
    }
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


# ------------------------------------------------------------------------------------------
# (b) tiny checkpoints

def tiny_llama(seed, layers):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
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
        for _, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def skipped(name, modules_to_not_convert):
    return any(m in name for m in (modules_to_not_convert or []))


def quantize_model(model, v):
    """Checkpoint tensors and the [N, K] float32 weight each quantized linear computes with."""
    group, version, skip = v["group_size"], v["version"], v["modules_to_not_convert"]
    tensors, dequantized = {}, {}
    for name, lin in model.named_modules():
        if ".layers." not in name or not isinstance(lin, torch.nn.Linear) or skipped(name, skip):
            continue
        codes, scales, zeros = awq_grid(lin.weight.data, group)
        packed = pack_all(codes, scales, zeros, group, versions=("gemm", version))
        m = packed[version]
        tensors[f"{name}.qweight"] = m.qweight.contiguous()
        tensors[f"{name}.qzeros"] = m.qzeros.contiguous()
        tensors[f"{name}.scales"] = m.scales.contiguous()
        g = packed["gemm"]
        deq = PACKING.dequantize_gemm(g.qweight, g.qzeros, g.scales.float(), 4, group)
        dequantized[name] = deq.t().contiguous()
    for key, t in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in dequantized or key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        tensors[key] = t.half().contiguous()
    return tensors, dequantized


def autoawq_config(v):
    """What AutoAWQ 0.2.7 writes: its AwqConfig.to_transformers_dict()."""
    return AUTOAWQ_CONFIG(zero_point=True, q_group_size=v["group_size"], w_bit=4, version=v["version"],
                          modules_to_not_convert=v["modules_to_not_convert"]).to_transformers_dict()


def transformers5_config(v):
    """transformers 5's AwqConfig.to_dict() (both `format` and `version`, GPTQ leftovers)."""
    return transformers.AwqConfig(bits=4, group_size=v["group_size"], zero_point=True, version=v["version"],
                                  modules_to_not_convert=v["modules_to_not_convert"]).to_dict()


VARIANTS = [
    dict(name="llama_gemm_g32", group_size=32, version="gemm", modules_to_not_convert=None,
         style="autoawq", cases=2, layers=2),
    dict(name="llama_gemv_g64_skip_down", group_size=64, version="gemv", modules_to_not_convert=["down_proj"],
         style="transformers5", cases=1, layers=1),
]


def reference_model(model, tensors, dequantized):
    """transformers' Llama holding exactly what the checkpoint stores: float16 tensors as float32,
    AutoAWQ's dequantized weights for the quantized linears."""
    ref = transformers.LlamaForCausalLM(model.config).float().eval()
    state = {k: t.float() for k, t in tensors.items() if not k.endswith((".qweight", ".qzeros", ".scales"))}
    for name, w in dequantized.items():
        state[f"{name}.weight"] = w
    missing, unexpected = ref.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise SystemExit(f"reference model: missing {missing}, unexpected {unexpected}")
    ref.tie_weights()
    return ref


def write_variant(out_root, v, model):
    folder = os.path.join(out_root, v["name"])
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    tensors, dequantized = quantize_model(model, v)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    cfg_path = os.path.join(folder, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["dtype"] = "float16"
    cfg["quantization_config"] = autoawq_config(v) if v["style"] == "autoawq" else transformers5_config(v)
    with open(cfg_path, "w") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    ref = reference_model(model, tensors, dequantized)
    cases = []
    with torch.no_grad():
        for ids in INPUT_IDS[: v["cases"]]:
            logits = ref(input_ids=torch.tensor([ids])).logits
            cases.append({"input_ids": [ids], "shape": list(logits.shape),
                          "logits": [float(str(x)) for x in logits.float().numpy().reshape(-1)]})
        dense = model(input_ids=torch.tensor([INPUT_IDS[0]])).logits
    q_logits = torch.tensor(cases[0]["logits"]).view(dense.shape)
    rel = float((q_logits - dense).abs().max() / dense.abs().max())
    expected = {
        "variant": v["name"],
        "reference": "transformers LlamaForCausalLM (float32, eager) with AutoAWQ dequantize_gemm weights",
        "autoawq_version": "0.2.7.post3",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "group_size": v["group_size"], "version": v["version"],
        "modules_to_not_convert": v["modules_to_not_convert"], "config_style": v["style"],
        "quantized": sorted(dequantized),
        "quantized_vs_float_max_rel": rel,
        "logits_layout": "flat row-major f32, shape [batch, seq, vocab]",
        "cases": cases,
    }
    with open(os.path.join(folder, "expected.json"), "w") as f:
        json.dump(expected, f, separators=(",", ":"))
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(folder, x)) for x in os.listdir(folder))
    print(f"{v['name']}: {size} bytes; {len(dequantized)} quantized linears; quantized vs float logits max rel {rel:.3f}")
    return size


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "awq"))
    args = ap.parse_args()
    generator = torch.Generator().manual_seed(SEED)
    pack_cases(os.path.join(args.out, "pack"), generator)
    total = sum(os.path.getsize(os.path.join(args.out, "pack", f)) for f in ("golden.safetensors", "cases.json"))
    print(f"pack: {total} bytes")
    models = {layers: tiny_llama(SEED, layers) for layers in (1, 2)}
    for v in VARIANTS:
        total += write_variant(args.out, v, models[v["layers"]])
    print(f"total {total} bytes")
    if total > MAX_TOTAL_BYTES:
        raise SystemExit(f"fixtures are {total} bytes, over the {MAX_TOTAL_BYTES} budget")


if __name__ == "__main__":
    main()
