#!/usr/bin/env python3
"""Interop check: a GPTQ checkpoint written by autoquant, read by AutoGPTQ's own QuantLinear.

    check_gptq_with_autogptq.py CHECKPOINT_DIR EXPECTED_JSON

Rebuilds the model with transformers (f32, eager attention) and AutoGPTQ 0.7.1's QuantLinear for
every layer that has a `qweight` (see autogptq_ref.py; gptq_v2, which AutoGPTQ cannot load, goes
through AutoGPTQ's unpackers with the v2 zero convention), runs EXPECTED_JSON's input ids and
compares the logits with the ones autoquant computed from the same files:
max |Δlogit| / max |logit| must be within `tolerance_rel` (written by the Rust test).
Exit status 0 on a match, 1 on a mismatch, 2 on bad usage or an unreadable checkpoint.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import autogptq_ref as ref  # noqa: E402


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    folder, expected_path = argv[1], argv[2]
    with open(expected_path) as f:
        expected = json.load(f)
    try:
        model, desc = ref.build_model(folder)
    except SystemExit as e:
        print(f"FAIL {folder}: AutoGPTQ could not read it: {e}", file=sys.stderr)
        return 2
    ids = torch.tensor(expected["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    want = torch.tensor(expected["logits"], dtype=torch.float32)
    if want.numel() != logits.numel():
        print(f"FAIL {folder}: {logits.numel()} logits, expected {want.numel()}", file=sys.stderr)
        return 1
    want = want.view(logits.shape)
    rel = float((logits - want).abs().max() / want.abs().max().clamp(min=1e-6))
    tol = float(expected["tolerance_rel"])
    same_argmax = bool((logits.argmax(-1) == want.argmax(-1)).all())
    status = "ok" if rel <= tol else "FAIL"
    print(f"{status} {os.path.basename(os.path.normpath(folder))}: max |Δlogit| / max |logit| = {rel:.2e} "
          f"(tolerance {tol:g}), same argmax everywhere: {same_argmax}; {desc}")
    return 0 if rel <= tol else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
