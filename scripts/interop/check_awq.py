#!/usr/bin/env python3
"""Interop check: an AWQ (GEMM) checkpoint written by autoquant, read with AutoAWQ 0.2.7.post3.

    AUTOQUANT_AWQ_INTEROP_DIR=OUT cargo test --release --test awq_format \\
        written_checkpoint_loads_back_and_exports_for_interop -- --exact
    $(scripts/setup_python.sh) scripts/interop/check_awq.py OUT

For every OUT/<name>/ with OUT/<name>.expected.json: AutoAWQ's AwqConfig must parse the config,
every packed layer is loaded into AutoAWQ's WQLinear_GEMM (its buffers, shapes and dtypes as
AutoAWQ allocates them) and dequantized with its `dequantize_gemm` (scales as float32, i.e.
exactly scale * (q - z)); transformers' LlamaForCausalLM (float32, eager) holding those weights
must give autoquant's logits within `tolerance_rel` (max |Δlogit| / max |logit|).
Exit status 0 when all match, 1 on a mismatch, 2 on bad usage or an unreadable checkpoint.
"""

import glob
import json
import os
import sys

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "golden"))
import make_awq_golden as awq  # noqa: E402  (loads AutoAWQ's modules without its __init__)


def build_model(folder):
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    qc = awq.AUTOAWQ_CONFIG(**awq.AUTOAWQ_CONFIG.from_transformers_dict(None, cfg["quantization_config"]))
    if qc.version != "gemm" or qc.w_bit != 4 or not qc.zero_point:
        raise SystemExit(f"unexpected AWQ config {qc}")
    config = transformers.AutoConfig.from_pretrained(folder)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    state, packed = {}, 0
    for key, t in tensors.items():
        if key.endswith((".qzeros", ".scales")):
            continue
        if not key.endswith(".qweight"):
            state[key] = t.float()
            continue
        prefix = key[: -len(".qweight")]
        k, n = t.shape[0], t.shape[1] * 8
        module = awq.GEMM.from_linear(torch.nn.Linear(k, n, bias=False), 4, qc.q_group_size, init_only=True)
        buffers = {"qweight": t, "qzeros": tensors[f"{prefix}.qzeros"], "scales": tensors[f"{prefix}.scales"]}
        missing, unexpected = module.load_state_dict(buffers, strict=False)
        if missing or unexpected:
            raise SystemExit(f"{prefix}: WQLinear_GEMM state mismatch: missing {missing}, unexpected {unexpected}")
        w = awq.PACKING.dequantize_gemm(module.qweight, module.qzeros, module.scales.float(), 4, qc.q_group_size)
        state[f"{prefix}.weight"] = w.t().contiguous()
        packed += 1
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model, packed


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    status, count = 0, 0
    for expected_path in sorted(glob.glob(os.path.join(argv[1], "*.expected.json"))):
        folder = expected_path[: -len(".expected.json")]
        with open(expected_path) as f:
            expected = json.load(f)
        try:
            model, packed = build_model(folder)
        except (SystemExit, Exception) as e:  # noqa: BLE001 - report any reader failure
            print(f"FAIL {folder}: AutoAWQ could not read it: {e}", file=sys.stderr)
            return 2
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(expected["input_ids"])).logits.float()
        want = torch.tensor(expected["logits"]).view(expected["shape"])
        rel = float((logits - want).abs().max() / want.abs().max())
        ok = rel <= expected["tolerance_rel"]
        status |= 0 if ok else 1
        count += 1
        print(f"{'ok' if ok else 'FAIL'} {os.path.basename(folder)}: {packed} WQLinear_GEMM layers, "
              f"max rel {rel:.2e} (tolerance {expected['tolerance_rel']})")
    if count == 0:
        print(f"no *.expected.json in {argv[1]}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
