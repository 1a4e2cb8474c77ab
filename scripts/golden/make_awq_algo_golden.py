"""Golden data for the AWQ search (tests/awq_algorithm.rs, src/quant/awq.rs).

Runs AutoAWQ 0.2.7.post3's own `AwqQuantizer.pseudo_quantize_tensor`, `_search_best_scale`
(which calls `_compute_best_scale`) and `_compute_best_clip` on the CPU with seeded random data
(planted outlier input channels, a dead channel, crafted rounding ties) and saves inputs and
outputs to tests/fixtures/awq_algo/.

Usage (venv from scripts/setup_python.sh, which also installs autoawq==0.2.7.post3 --no-deps):
    ~/.cache/autoquant/venv/bin/python scripts/golden/make_awq_algo_golden.py

AutoAWQ's package `__init__` pulls in its CUDA kernels and the whole model zoo, so
`awq/quantize/quantizer.py` is loaded on its own with stub modules for the names it imports
(none of which the three methods above use, apart from `clear_memory`, `get_best_device` and
`get_op_name`, stubbed as no-op / "cpu" / a constant). The quantizer object is made with
`__new__` and given only the attributes those methods read; its `__init__` would load a
calibration dataset.

Numerics. Everything runs in float32 with one torch thread. Inputs and weights are rounded to
float16-representable values so they can be stored as F16 (the fixture stays small) while the
computation itself is f32, as in the Rust code. Where the Rust side can differ:
  * x_mean / w_mean: torch reduces in f32 (cascade sum), Rust accumulates in f64 -> last-ulp
    differences, hence scales are compared with a 1e-5 relative tolerance, not bitwise.
  * pow: torch uses SLEEF powf (1 ulp), Rust rounds an f64 pow -> same tolerance.
  * The module output of `module2inspect` (matmul, SiLU) differs in summation order, so the
    per-ratio losses are compared with a 1e-5 relative tolerance (measured: ~1e-6); the chosen
    ratio must match exactly.
  * Clip errors: torch computes sum(x*q) - sum(x*w) per group, Rust x.(q - w); the chosen
    max_val must match within 1e-5 relative (it is org_max times a grid factor, so a different
    choice would differ by >= 5%).
  * pseudo_quantize_tensor is element-wise f32 with no reductions but amax/amin: codes, scales,
    zeros and the fake-quantized weight must be bit-identical.
"""

import importlib.util
import json
import os
import sys
import types

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "awq_algo")


def load_awq_quantizer():
    """`awq/quantize/quantizer.py` from the installed autoawq, without running `awq/__init__`."""
    from importlib.metadata import version

    assert version("autoawq") == "0.2.7.post3", version("autoawq")
    spec = importlib.util.find_spec("awq")  # locating the package does not execute it
    pkg_dir = spec.submodule_search_locations[0]
    pkg = types.ModuleType("awq")
    pkg.__path__ = [pkg_dir]
    sys.modules["awq"] = pkg
    stubs = {
        "awq.utils.calib_data": {"get_calib_dataset": None},
        "awq.modules.linear": {
            n: None for n in ["WQLinear_GEMM", "WQLinear_GEMV", "WQLinear_Marlin", "WQLinear_GEMVFast"]
        },
        "awq.utils.utils": {"clear_memory": lambda *a, **k: None, "get_best_device": lambda: "cpu"},
        "awq.quantize.scale": {"apply_scale": None, "apply_clip": None},
        "awq.utils.module": {
            "append_str_prefix": None,
            "get_op_name": lambda module, op: "op",
            "get_named_linears": None,
            "set_op_by_name": None,
            "exclude_layers_to_not_quantize": None,
        },
    }
    for name, attrs in stubs.items():
        m = types.ModuleType(name)
        for k, v in attrs.items():
            setattr(m, k, v)
        sys.modules[name] = m
    qspec = importlib.util.spec_from_file_location(
        "awq.quantize.quantizer", os.path.join(pkg_dir, "quantize", "quantizer.py")
    )
    mod = importlib.util.module_from_spec(qspec)
    qspec.loader.exec_module(mod)
    return mod.AwqQuantizer


AwqQuantizer = load_awq_quantizer()

torch.set_num_threads(1)
torch.manual_seed(5)
rng = np.random.default_rng(5)
tensors = {}
cases = {"pseudo": [], "scale": [], "clip": []}


def quantizer(bits, group, zero_point, duo=True):
    q = AwqQuantizer.__new__(AwqQuantizer)
    q.w_bit = bits
    q.group_size = group  # -1: whole row
    q.zero_point = zero_point
    q.duo_scaling = duo
    q.max_chunk_memory = 1024 * 1024 * 1024
    q.n_parallel_calib_samples = None
    return q


def f16ish(a):
    """Round to float16-representable values, returned as an f32 tensor."""
    return torch.from_numpy(np.asarray(a, dtype=np.float32)).half().float()


def store16(name, t):
    tensors[name] = t.half().contiguous()


def store32(name, t):
    tensors[name] = t.float().contiguous()


def make_inputs(rows, k, outliers, dead, scale=1.0):
    x = rng.standard_normal((rows, k)) * scale
    x[:, outliers] *= 25.0
    if dead is not None:
        x[:, dead] = 0.0
    return f16ish(x)


def make_weight(n, k, std=0.05):
    w = rng.standard_normal((n, k)) * std
    idx = rng.integers(0, n * k, size=max(1, n * k // 100))
    w.flat[idx] *= 5.0
    return f16ish(w)


# ---------------------------------------------------------------- pseudo_quantize_tensor
def pseudo_weight():
    n, k = 12, 256
    w = rng.standard_normal((n, k)) * 0.05
    # Row 0, group 0 (of 64): values on a 0.5 grid plus exact half-steps -> round-half-even ties.
    w[0, :64] = (np.arange(64) % 16) * 0.5
    w[0, 1:64:4] += 0.25
    w[0, 0], w[0, 1] = 0.0, 7.5
    # Row 1: an all-zero group (scale clamp 1e-5) and a constant group.
    w[1, :64] = 0.0
    w[1, 64:128] = 0.3
    # Row 2: negative-only group (zero clamps at maxq) and positive-only group (zero clamps at 0).
    w[2, :64] = -1.0 + 0.5 * rng.random(64)
    w[2, 64:128] = 0.5 + 0.5 * rng.random(64)
    # Row 3: a big outlier.
    w[3, 5] = 3.0
    return torch.from_numpy(w.astype(np.float32))


w_pq = pseudo_weight()
store32("pseudo.w", w_pq)
for i, (bits, group, zp) in enumerate(
    [(4, 128, True), (4, 64, True), (3, 32, True), (4, -1, True), (4, 128, False), (8, 64, True), (2, 64, False)]
):
    q = quantizer(bits, group, zp)
    fake, scales, zeros = q.pseudo_quantize_tensor(w_pq.clone())
    n, k = w_pq.shape
    g = group if group > 0 else k
    s_full = scales.repeat_interleave(g, dim=1)
    if zp:
        z_full = zeros.repeat_interleave(g, dim=1)
        codes = torch.round(fake / s_full) + z_full
    else:
        # Symmetric: stored as code = q + 2^(b-1) with zero 2^(b-1).
        codes = torch.round(fake / s_full) + 2 ** (bits - 1)
        zeros = torch.full_like(scales, 2 ** (bits - 1))
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    name = f"pseudo{i}"
    tensors[f"{name}.codes"] = codes.to(torch.uint8).contiguous()
    store32(f"{name}.scales", scales)  # [n, groups]
    tensors[f"{name}.zeros"] = zeros.to(torch.int32).contiguous()
    if i in (0, 4):  # one asymmetric, one symmetric (size); the others check codes/scales/zeros
        store32(f"{name}.fake", fake)
    cases["pseudo"].append({"name": name, "bits": bits, "group_size": group, "zero_point": zp})


# ---------------------------------------------------------------- _search_best_scale
class CopyStateDict:
    """Mixin: `state_dict()` returns copies.

    `_compute_best_scale` saves `{k: v.cpu() for k, v in module2inspect.state_dict().items()}`
    and then scales the weights in place (`fc.weight.mul_`). On a GPU `.cpu()` copies, but on
    the CPU it returns the same tensor, so the saved "original" weights become W*s(ratio 0) and
    every later ratio is evaluated on W*s0*s instead of W*s (losses jump after ratio 0). The
    copy restores the algorithm as it runs on the GPU, which is what src/quant/awq.rs follows.
    """

    def state_dict(self, *args, **kwargs):
        return {k: v.clone() for k, v in super().state_dict(*args, **kwargs).items()}


class Linear(CopyStateDict, torch.nn.Linear):
    pass


class Mlp(CopyStateDict, torch.nn.Module):
    """Llama-style MLP: down(silu(gate(x)) * up(x)); gate and up are the scaled group."""

    def __init__(self, gate, up, down):
        super().__init__()
        self.gate = torch.nn.Linear(gate.shape[1], gate.shape[0], bias=False)
        self.up = torch.nn.Linear(up.shape[1], up.shape[0], bias=False)
        self.down = torch.nn.Linear(down.shape[1], down.shape[0], bias=False)
        self.gate.weight.data = gate.clone()
        self.up.weight.data = up.clone()
        self.down.weight.data = down.clone()

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def run_scale(q, layers, inp, module2inspect):
    losses = []
    orig = q._compute_loss

    def record(*a, **kw):
        loss = orig(*a, **kw)
        losses.append(loss)
        return loss

    q._compute_loss = record
    _, _, best = q._search_best_scale(None, None, layers, inp, module2inspect=module2inspect)
    q._compute_loss = orig
    best_i = min(range(len(losses)), key=lambda i: (losses[i], i))
    return best, losses, best_i / 20.0


def scale_linear_case(name, rows, k, n, group, duo, bits=4, zp=True):
    outl = sorted(rng.choice(k, size=3, replace=False).tolist())
    dead = int(rng.integers(0, k))
    while dead in outl:
        dead = int(rng.integers(0, k))
    x = make_inputs(rows, k, outl, dead)
    w = make_weight(n, k)
    fc = Linear(k, n, bias=False)
    fc.weight.data = w.clone()
    q = quantizer(bits, group, zp, duo)
    best, losses, ratio = run_scale(q, [fc], x, None)
    store16(f"{name}.x", x)
    store16(f"{name}.w0", w)
    store32(f"{name}.scales", best)
    cases["scale"].append(
        {"name": name, "kind": "linear", "rows": rows, "k": k, "n": [n], "bits": bits,
         "group_size": group, "zero_point": zp, "duo_scaling": duo, "outliers": outl,
         "dead": dead, "best_ratio": ratio, "losses": losses}
    )


def scale_mlp_case(name, rows, k, hidden, group, duo):
    outl = sorted(rng.choice(k, size=2, replace=False).tolist())
    x = make_inputs(rows, k, outl, None)
    gate, up = make_weight(hidden, k), make_weight(hidden, k)
    down = make_weight(k, hidden)
    mlp = Mlp(gate, up, down)
    q = quantizer(4, group, True, duo)
    best, losses, ratio = run_scale(q, [mlp.gate, mlp.up], x, mlp)
    store16(f"{name}.x", x)
    store16(f"{name}.w0", gate)
    store16(f"{name}.w1", up)
    store16(f"{name}.down", down)
    store32(f"{name}.scales", best)
    cases["scale"].append(
        {"name": name, "kind": "mlp", "rows": rows, "k": k, "n": [hidden, hidden], "bits": 4,
         "group_size": group, "zero_point": True, "duo_scaling": duo, "outliers": outl,
         "dead": None, "best_ratio": ratio, "losses": losses}
    )


scale_linear_case("scale0", rows=48, k=128, n=32, group=32, duo=True)
scale_linear_case("scale1", rows=48, k=128, n=32, group=64, duo=False)
scale_linear_case("scale2", rows=48, k=64, n=48, group=64, duo=True, bits=3)
scale_mlp_case("scale3", rows=48, k=64, hidden=64, group=32, duo=True)
scale_mlp_case("scale4", rows=40, k=64, hidden=64, group=64, duo=False)


# ---------------------------------------------------------------- _compute_best_clip
def clip_case(name, rows, k, n, group, bits=4, zp=True):
    outl = sorted(rng.choice(k, size=2, replace=False).tolist())
    x = make_inputs(rows, k, outl, None, scale=0.5)
    w = make_weight(n, k)
    q = quantizer(bits, group, zp)
    max_val = q._compute_best_clip(w.clone(), x.clone())  # [n, groups, 1]
    store16(f"{name}.x", x)
    store16(f"{name}.w", w)
    store32(f"{name}.max_val", max_val.reshape(n, -1))
    step = max(1, rows // 512)
    cases["clip"].append(
        {"name": name, "rows": rows, "k": k, "n": n, "bits": bits, "group_size": group,
         "zero_point": zp, "step": step}
    )


clip_case("clip0", rows=1030, k=16, n=64, group=8)  # step 2 -> 515 sampled tokens
clip_case("clip1", rows=60, k=128, n=64, group=64)
clip_case("clip2", rows=100, k=64, n=128, group=32, bits=3, zp=False)

os.makedirs(OUT, exist_ok=True)
save_file(tensors, os.path.join(OUT, "awq_algo.safetensors"))
with open(os.path.join(OUT, "cases.json"), "w") as f:
    json.dump({"autoawq": "0.2.7.post3", "torch": torch.__version__, **cases}, f, indent=1)
    f.write("\n")
for name, t in sorted(tensors.items(), key=lambda kv: -kv[1].numel() * kv[1].element_size())[:8]:
    print(f"  {name}: {t.numel() * t.element_size()} bytes")
total = sum(os.path.getsize(os.path.join(OUT, p)) for p in os.listdir(OUT))
print(f"wrote {OUT} ({total} bytes)")
for c in cases["scale"]:
    print(c["name"], "best ratio", c["best_ratio"])
