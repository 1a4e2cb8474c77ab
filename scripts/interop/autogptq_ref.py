"""AutoGPTQ's own QuantLinear as the reference reader of GPTQ checkpoints, on the CPU.

auto-gptq 0.7.1 (pip install --no-deps auto-gptq==0.7.1) cannot be imported as a package with
current transformers, so the two module files that hold its torch CPU path are loaded directly:
  qlinear_cuda_old.py  what AutoGPTQ picks when desc_act is false or group_size is -1;
                       it ignores g_idx and masks v1 zeros ((field + 1) & maxq, except 3-bit)
  qlinear_cuda.py      what it picks for act-order; honours g_idx, zeros are field + 1 unmasked
Both compute `scales * (codes - zeros)` on the CPU and multiply; `pack` writes v1 tensors.

Used by scripts/golden/make_gptq_golden.py (golden data) and check_gptq_with_autogptq.py (interop).
"""

import importlib
import importlib.util
import json
import logging
import os
import re
import sys
import types

import torch
from safetensors import safe_open

_CLASSES = {}


def load_gptq_quantizer():
    """AutoGPTQ's reference GPTQ: its `quantization/gptq.py` and `quantizer.py` modules, loaded
    under a stand-in package name, with a loss catcher attached and CUDA synchronization stubbed.
    Returns (gptq module, quantizer module, LossCatcher)."""
    spec = importlib.util.find_spec("auto_gptq")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("auto_gptq is not installed: pip install auto-gptq==0.7.1 --no-deps")
    qdir = os.path.join(list(spec.submodule_search_locations)[0], "quantization")
    pkg = types.ModuleType("agq_ref")
    pkg.__path__ = [qdir]
    sys.modules["agq_ref"] = pkg
    gptq = importlib.import_module("agq_ref.gptq")
    quantizer = importlib.import_module("agq_ref.quantizer")
    # fasterquant calls torch.cuda.synchronize() unconditionally; there is no GPU here.
    torch.cuda.synchronize = lambda *a, **k: None
    catcher = LossCatcher()
    gptq.logger.addHandler(catcher)
    gptq.logger.setLevel(logging.INFO)
    gptq.logger.propagate = False
    return gptq, quantizer, catcher


class LossCatcher(logging.Handler):
    """fasterquant reports its loss only in a log line: `avg loss: {sum(Losses) / nsamples}`."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.avg = None

    def emit(self, record):
        m = re.match(r"avg loss: (.*)", record.getMessage())
        if m:
            self.avg = float(m.group(1))


def quant_linear_class(kind):
    """QuantLinear from auto_gptq/nn_modules/qlinear/qlinear_<kind>.py, kind "cuda_old" or "cuda"."""
    if kind not in _CLASSES:
        spec = importlib.util.find_spec("auto_gptq")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("auto-gptq is not installed: pip install --no-deps auto-gptq==0.7.1")
        root = list(spec.submodule_search_locations)[0]
        path = os.path.join(root, "nn_modules", "qlinear", f"qlinear_{kind}.py")
        mspec = importlib.util.spec_from_file_location(f"_autogptq_qlinear_{kind}", path)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
        _CLASSES[kind] = module.QuantLinear
    return _CLASSES[kind]


def autogptq_kind(desc_act, group_size):
    """The class AutoGPTQ 0.7.1's dynamically_import_QuantLinear picks on a CPU-only machine."""
    return "cuda_old" if (not desc_act or group_size == -1) else "cuda"


def read_quant_settings(folder):
    """(settings dict, file it came from): config.json's quantization_config, else quantize_config.json."""
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    if "quantization_config" in config:
        return config["quantization_config"], "config.json"
    with open(os.path.join(folder, "quantize_config.json")) as f:
        return json.load(f), "quantize_config.json"


def checkpoint_format(q):
    fmt = q.get("checkpoint_format", q.get("format", "gptq"))
    if fmt not in ("gptq", "gptq_v2"):
        raise SystemExit(f"unsupported checkpoint_format {fmt!r}")
    return fmt


def load_tensors(folder):
    """All tensors of the folder's safetensors file(s)."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors") and not f.startswith("."))
    if not files:
        raise SystemExit(f"{folder}: no .safetensors file")
    tensors = {}
    for fn in files:
        with safe_open(os.path.join(folder, fn), framework="pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    return tensors


def make_module(kind, bits, group_size, in_features, out_features, t, prefix):
    """A QuantLinear holding `prefix`'s packed tensors from `t`, scales in f32 so the CPU path
    computes in f32 (its own buffers default to f16, which torch.matmul cannot mix with f32)."""
    cls = quant_linear_class(kind)
    has_bias = f"{prefix}.bias" in t
    m = cls(bits, group_size, in_features, out_features, has_bias, weight_dtype=torch.float32)
    for name in ("qweight", "qzeros", "g_idx"):
        key = f"{prefix}.{name}"
        if name == "g_idx" and key not in t:
            continue  # keep the module's own k // group_size
        want = getattr(m, name).shape
        if tuple(t[key].shape) != tuple(want):
            raise SystemExit(f"{key}: shape {tuple(t[key].shape)}, AutoGPTQ expects {tuple(want)}")
        setattr(m, name, t[key].clone().to(torch.int32))
    scales = t[f"{prefix}.scales"]
    if tuple(scales.shape) != tuple(m.scales.shape):
        raise SystemExit(f"{prefix}.scales: shape {tuple(scales.shape)}, AutoGPTQ expects {tuple(m.scales.shape)}")
    m.scales = scales.to(torch.float32)
    if has_bias:
        m.bias = t[f"{prefix}.bias"].to(torch.float32)
    return m.eval()


def dequantize_v2(bits, group_size, in_features, out_features, t, prefix):
    """Dense [N, K] weight of a gptq_v2 layer. AutoGPTQ cannot read v2 (it always adds 1 to the
    zero fields), so its unpackers are used for the fields and the formula is applied here:
    codes from qweight with all-zero qzeros and unit scales (giving code - 1), zero fields from
    qzeros with all-zero qweight (giving -(field + 1)); then W = scale[g] * (code - field)."""
    kind = "cuda"  # the one that honours g_idx and does not mask
    eye = torch.eye(in_features, dtype=torch.float32)
    base = {f"{prefix}.g_idx": t.get(f"{prefix}.g_idx")} if f"{prefix}.g_idx" in t else {}
    groups = t[f"{prefix}.scales"].shape[0]
    ones = torch.ones(groups, out_features, dtype=torch.float32)
    zero_qzeros = torch.zeros_like(t[f"{prefix}.qzeros"])
    zero_qweight = torch.zeros_like(t[f"{prefix}.qweight"])
    gs = group_size

    a = dict(base, **{f"{prefix}.qweight": t[f"{prefix}.qweight"], f"{prefix}.qzeros": zero_qzeros,
                      f"{prefix}.scales": ones})
    codes = make_module(kind, bits, gs, in_features, out_features, a, prefix)(eye) + 1  # [K, N]
    b = dict(base, **{f"{prefix}.qweight": zero_qweight, f"{prefix}.qzeros": t[f"{prefix}.qzeros"],
                      f"{prefix}.scales": ones})
    fields = -make_module(kind, bits, gs, in_features, out_features, b, prefix)(eye) - 1  # [K, N] = field[g_idx[k], n]
    m = make_module(kind, bits, gs, in_features, out_features, a, prefix)
    g_idx = m.g_idx.long()
    scales = t[f"{prefix}.scales"].to(torch.float32)[g_idx]  # [K, N]
    return (scales * (codes - fields)).t().contiguous()


class DenseLinear(torch.nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


def build_model(folder):
    """A transformers model (f32, eager attention) whose quantized linears are AutoGPTQ
    QuantLinear modules (v1) or v2 weights dequantized through AutoGPTQ's unpackers; everything
    else loaded from the checkpoint. Returns (model, description)."""
    import transformers

    q, qfile = read_quant_settings(folder)
    bits, group_size = int(q["bits"]), int(q["group_size"])
    desc_act = bool(q.get("desc_act", False))
    fmt = checkpoint_format(q)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop("quantization_config", None)  # transformers would hand it to optimum/gptqmodel
    config = transformers.AutoConfig.for_model(**cfg)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()

    t = load_tensors(folder)
    prefixes = sorted(k[: -len(".qweight")] for k in t if k.endswith(".qweight"))
    kind = autogptq_kind(desc_act, group_size)
    for prefix in prefixes:
        parent_name, _, child = prefix.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        if isinstance(old, torch.nn.Linear):
            k_in, n_out = old.in_features, old.out_features
        else:  # transformers Conv1D: weight [in, out]
            k_in, n_out = old.weight.shape
        if fmt == "gptq":
            new = make_module(kind, bits, group_size, k_in, n_out, t, prefix)
        else:
            w = dequantize_v2(bits, group_size, k_in, n_out, t, prefix)
            b = t.get(f"{prefix}.bias")
            new = DenseLinear(w, None if b is None else b.to(torch.float32))
        setattr(parent, child, new)

    quant_keys = {k for k in t if any(k.startswith(p + ".") for p in prefixes)}
    rest = {k: v.to(torch.float32) for k, v in t.items() if k not in quant_keys}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if not any(k.startswith(p + ".") for p in prefixes)]
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise SystemExit(f"{folder}: tensors missing {missing}, unexpected {unexpected}")
    desc = f"{len(prefixes)} layers, {bits}-bit, group {group_size}, desc_act {desc_act}, {fmt}, " \
           f"settings from {qfile}, reader {'qlinear_' + kind if fmt == 'gptq' else 'v2 via AutoGPTQ unpackers'}"
    return model, desc
