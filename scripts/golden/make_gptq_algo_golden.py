"""Golden data for the GPTQ algorithm core (tests/gptq_algorithm.rs).

Runs the reference GPTQ (AutoGPTQ 0.7.1 `auto_gptq/quantization/gptq.py` + `quantizer.py`, the
IST-DASLab algorithm plus static_groups and g_idx) on small random layers and saves inputs and
outputs to tests/fixtures/gptq_algo/.

Usage (venv from scripts/setup_python.sh, which also installs auto-gptq==0.7.1 --no-deps):
    ~/.cache/autoquant/venv/bin/python scripts/golden/make_gptq_algo_golden.py

The package's __init__ imports half of the Hugging Face stack and fails with current
transformers, so the two files are loaded on their own under a stand-in package name.
"""

import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "gptq_algo")

sys.path.insert(0, os.path.join(ROOT, "scripts", "interop"))
import autogptq_ref  # noqa: E402

gptq_mod, _, catcher = autogptq_ref.load_gptq_quantizer()
GPTQ = gptq_mod.GPTQ



torch.set_num_threads(1)  # deterministic reductions
torch.manual_seed(1234)
rng = np.random.default_rng(1234)


def make_inputs(k, samples, rows, outliers, dead):
    """Correlated activations with a few outlier channels and one dead channel."""
    mix = np.eye(k) + 0.4 * rng.standard_normal((k, k)) / np.sqrt(k)
    xs = []
    for _ in range(samples):
        z = rng.standard_normal((rows, k))
        x = z @ mix
        x[:, outliers] *= 12.0
        x[0] *= 6.0  # a first-position "sink" row with a large norm
        x[:, dead] = 0.0
        xs.append(x.astype(np.float32))
    return np.stack(xs)


def make_weight(n, k):
    w = rng.standard_normal((n, k)) * 0.02
    idx = rng.integers(0, n * k, size=max(1, n * k // 200))
    w.flat[idx] *= 6.0  # a few outlier weights
    return w.astype(np.float32)


def reference_hessian(w, x):
    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight.data = torch.from_numpy(w).clone()
    g = GPTQ(layer)
    for s in range(x.shape[0]):
        # The hook input of a batch-1 forward: [1, rows, K]; nsamples counts batch entries.
        g.add_batch(torch.from_numpy(x[s])[None], None)
    return g.H.clone(), g.nsamples


def run_case(w, h, nsamples, bits, group, sym, desc, static, block, damp, dtype=torch.float32):
    n, k = w.shape
    # The quantizer's buffers and temporaries follow the default dtype; fasterquant's
    # `W.float()` is redirected for the float64 comparison run.
    torch.set_default_dtype(dtype)
    to_float = torch.Tensor.float
    if dtype == torch.float64:
        torch.Tensor.float = torch.Tensor.double
    try:
        return _run_case(w, h, nsamples, bits, group, sym, desc, static, block, damp, dtype)
    finally:
        torch.set_default_dtype(torch.float32)
        torch.Tensor.float = to_float


def _run_case(w, h, nsamples, bits, group, sym, desc, static, block, damp, dtype):
    n, k = w.shape
    layer = torch.nn.Linear(k, n, bias=False)
    layer.weight.data = torch.from_numpy(w).clone().to(dtype)
    g = GPTQ(layer)
    g.H = h.clone().to(dtype)
    g.nsamples = nsamples
    g.quantizer.configure(bits, perchannel=True, sym=sym, mse=False)
    catcher.avg = None
    scale, zero, g_idx = g.fasterquant(
        blocksize=block,
        percdamp=damp,
        group_size=group if group is not None else -1,
        actorder=desc,
        static_groups=static,
    )
    loss = catcher.avg * nsamples
    q = layer.weight.data
    gi = g_idx.long()
    codes = torch.round(q / scale[:, gi] + zero[:, gi])
    assert torch.all(codes >= 0) and torch.all(codes <= 2**bits - 1)
    # The fake-quantized weight must be exactly scale·(code − zero).
    assert torch.equal(scale[:, gi] * (codes - zero[:, gi]), q)
    return dict(
        codes=codes.to(torch.uint8).contiguous(),
        scales=scale.t().contiguous().float(),
        zeros=zero.t().contiguous().to(torch.int32),
        g_idx=g_idx.to(torch.int32).contiguous(),
        loss=loss,
    )


SETS = {
    # name: (N, K, samples, rows per sample, outlier channels, dead channel, store X?)
    "a": (48, 64, 4, 32, [3, 17, 40], 5, True),
    "b": (32, 256, 4, 96, [7, 100, 201], 130, False),
}

CASES = [
    # name, set, bits, group, sym, desc_act, static_groups, block, damp
    ("a_4b_g32_sym", "a", 4, 32, True, False, False, 128, 0.01),
    ("a_4b_pc_asym", "a", 4, None, False, False, False, 128, 0.01),
    ("a_2b_g32_asym", "a", 2, 32, False, False, False, 128, 0.01),
    ("a_4b_g16_sym_static", "a", 4, 16, True, False, True, 128, 0.01),
    ("b_3b_g64_asym", "b", 3, 64, False, False, False, 128, 0.01),
    ("b_8b_g64_sym", "b", 8, 64, True, False, False, 128, 0.01),
    ("b_4b_pc_sym", "b", 4, None, True, False, False, 128, 0.01),
    ("b_4b_g32_sym_desc", "b", 4, 32, True, True, False, 128, 0.01),
    ("b_4b_g32_asym_desc_static", "b", 4, 32, False, True, True, 128, 0.01),
    ("b_4b_pc_asym_desc", "b", 4, None, False, True, False, 128, 0.01),
    ("b_4b_g64_sym_block32", "b", 4, 64, True, False, False, 32, 0.01),
    ("b_3b_g32_asym_desc_block48", "b", 3, 32, False, True, False, 48, 0.01),
    ("b_2b_g128_sym_damp10", "b", 2, 128, True, False, False, 128, 0.1),
]


def main():
    os.makedirs(OUT, exist_ok=True)
    tensors = {}
    sets = {}
    data = {}
    for name, (n, k, samples, rows, outliers, dead, store_x) in SETS.items():
        x = make_inputs(k, samples, rows, outliers, dead)
        w = make_weight(n, k)
        h, ns = reference_hessian(w, x)
        data[name] = (w, h, ns)
        tensors[f"{name}.w"] = torch.from_numpy(w)
        tensors[f"{name}.h"] = h.contiguous()
        if store_x:
            tensors[f"{name}.x"] = torch.from_numpy(x)
        sets[name] = dict(n=n, k=k, samples=ns, rows=rows, dead_columns=[dead], has_x=store_x)
    cases = []
    for name, s, bits, group, sym, desc, static, block, damp in CASES:
        w, h, ns = data[s]
        r = run_case(w, h, ns, bits, group, sym, desc, static, block, damp)
        # The same algorithm in float64: how many codes move with rounding noise alone.
        r64 = run_case(w, h, ns, bits, group, sym, desc, static, block, damp, torch.float64)
        f64_diff = int((r64["codes"] != r["codes"]).sum())
        for key in ("codes", "scales", "zeros", "g_idx"):
            tensors[f"{name}.{key}"] = r[key]
        cases.append(
            dict(
                name=name,
                set=s,
                bits=bits,
                group_size=group,
                sym=sym,
                desc_act=desc,
                static_groups=static,
                block_size=block,
                damp_percent=damp,
                loss=r["loss"],
                loss_f64=r64["loss"],
                f64_code_diffs=f64_diff,
            )
        )
        print(f"{name}: loss {r['loss']:.6g} (f64 {r64['loss']:.6g}), "
              f"codes differing in f64: {f64_diff}/{w.size}")
    save_file(tensors, os.path.join(OUT, "gptq_algo.safetensors"))
    meta = dict(
        generator="scripts/golden/make_gptq_algo_golden.py",
        reference="auto-gptq==0.7.1 auto_gptq/quantization/gptq.py (GPTQ.add_batch, fasterquant)",
        torch=torch.__version__,
        sets=sets,
        cases=cases,
    )
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
