#!/usr/bin/env python3
"""End-to-end AWQ golden data from AutoAWQ 0.2.7.post3's own quantizer, for tests/awq_stream.rs.

What runs, and whose code it is:

  * AutoAWQ's: `AutoAWQForCausalLM.from_pretrained` (float32, CPU) on the tiny llama folder
    written here, and `.quantize(None, quant_config, calib_data=<token windows>, ...)`, i.e.
    `AwqQuantizer.__init__` -> `init_quant` (`get_calib_dataset` with lists of token ids, the
    Catcher capturing the first block's input), and `AwqQuantizer.quantize`, which per block runs
    `_get_input_feat` (float block, inputs of every linear captured, the float outputs feed the
    next block), `LlamaAWQForCausalLM.get_layers_for_scaling` (input_layernorm -> q,k,v;
    v_proj -> o_proj, present because v and o have the same shape here; post_attention_layernorm
    -> gate,up; up_proj -> down_proj), `_search_best_scale` / `_compute_best_scale` per scaling
    group, `apply_scale`, `_search_best_clip` / `_compute_best_clip` and `apply_clip`, then
    `_apply_quant` (f16 cast, `pseudo_quantize_tensor`, `WQLinear_GEMM.from_linear`). Then
    `save_quantized` writes the AWQ GEMM checkpoint in autoawq/.
  * Around it, this script only: builds the float model and the calibration windows, and
    subclasses AwqQuantizer (passed as `quantizer_cls`, which `quantize` accepts) to
      - record what the search chose: the scales `_search_best_scale` returns (with the loss of
        every ratio, captured by wrapping `_compute_loss`), and the thresholds
        `_search_best_clip` returns; nothing recorded is changed;
      - work around AutoAWQ's CPU aliasing bug in `_compute_best_scale`: it saves the inspected
        module's weights with `{k: v.cpu() ...}`, which on the CPU returns the very tensors it
        then scales in place, so every ratio after the first would be scored on W*s0*s instead
        of W*s. While `_compute_best_scale` runs, the module's `state_dict()` returns copies,
        which is what `.cpu()` gives on a GPU (the same workaround as make_awq_algo_golden.py).
        autoquant follows the GPU behaviour (docs/formats.md 2.7);
      - check that the block inputs AutoAWQ's driver propagates equal the float model's hidden
        states (transformers, eager attention), so its per-block forwards are causal and
        complete under transformers 5.
  * The reference logits come from transformers' LlamaForCausalLM (float32, eager) holding the
    AutoAWQ checkpoint: its float tensors as saved, and each quantized linear as AutoAWQ's
    `packing_utils.dequantize_gemm` of the saved qweight/qzeros with the float16 scales passed
    as float32 (exactly scale * (q - z); AutoAWQ's own CPU GEMM forward casts activations to
    float16, which would bury the comparison in float16 rounding).

Two runs on the same model and windows: `clip` with AutoAWQ's defaults (apply_clip=True) and
`noclip` with apply_clip=False (autoquant: --awq-no-clip). Both: 4-bit, group 32 (it must
divide the tiny model's 64 columns), zero point, GEMM, duo scaling; 8 windows of 32 tokens with
`max_calib_seq_len=32`, so `get_calib_dataset` keeps every window as one block and the scale
search runs on all 256 tokens (autoquant's default --awq-search-tokens 8192 covers them too).
Everything is float32 on one torch thread, as autoquant computes; AutoAWQ's `_apply_quant`
casts each layer to float16 for the final pseudo-quantization whatever the model's dtype, and
autoquant does the same in half-precision arithmetic.

Where the two can legitimately differ (tests/awq_stream.rs checks that every difference is one
of these): the clip search meets exact ties when a candidate clamps both ends of a group to
+-m (the grid is then [-m, m] in 15 steps and m / scale is 7.5), which the last bits of m
break; and a scaled weight within float32 rounding of a float16 rounding midpoint can round to
either neighbour. Seeds whose chosen scale ratios beat the runner-up by less than 1e-4
(relative loss) are skipped, so the ratio choices are not such ties.

Model: a llama with hidden 64 (AutoAWQ's clip search processes output rows in batches of 64
and needs out_features % 64 == 0), intermediate 64, 4 heads of 16 with 4 kv heads (MHA, so
v_proj -> o_proj is a scaling group), 2 blocks, vocabulary 96, tied embeddings. Weights as in
make_tiny_models.py (std 0.15 plus noise), stored as float16 to keep the fixture small (both
sides compute in float32 on these exact values). Channels 3, 19 and 40 of both block norms are
multiplied by 8, so the norm outputs have the outlier channels that make AWQ's scales matter.

Writes tests/fixtures/awq_stream/ (< 300 KB):
  model/              config.json, generation_config.json, model.safetensors (the float model)
  calib_windows.json  {"windows": [[ids]...]}: read by autoquant's CalibData::from_windows_json
  <run>/autoawq/      AutoAWQ's save_quantized output (config.json, model.safetensors; the
                      tensors as saved, the header metadata reduced to {"format": "pt"})
  <run>/search.safetensors
                      per block b and scaling group g `scales.{b}.{g}` [K] f32 (the scales
                      `_search_best_scale` returned); per clipped linear `clip.<name>` [N, groups]
                      f32 (the thresholds `_search_best_clip` returned); `logits` [1, 16, 96] f32
  golden.json         versions, seed, the logits input ids, and per run: settings, the groups
                      (prev op, linears, best ratio, every ratio's loss, the relative margin to
                      the runner-up), the clipped linears, the block-input check

Reruns write identical bytes.

    $(scripts/setup_python.sh) scripts/golden/make_awq_stream_golden.py [--out DIR]
"""

import argparse
import json
import os
import re
import shutil
import sys
import types

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SEED = 20241203
VOCAB = 96
HIDDEN = 64
INTERMEDIATE = 64
OUTLIER_CHANNELS = [3, 19, 40]
OUTLIER_GAIN = 8.0
WINDOWS, WINDOW_LEN = 8, 32
LOGITS_LEN = 16
GROUP = 32
# A scaling group whose best ratio beats the runner-up by less than this (relative loss) would
# make the chosen ratio depend on float rounding; such seeds are skipped.
MIN_RATIO_MARGIN = 1e-4
MAX_FIXTURE_BYTES = 300_000


def load_autoawq():
    """AutoAWQ's package. Its quantizer imports `datasets` at module level for the default
    calibration sets; token windows are passed here, so a stub stands in for it."""
    from importlib.metadata import version

    v = version("autoawq")
    if v != "0.2.7.post3":
        raise SystemExit(f"autoawq {v} installed; the fixtures were made with 0.2.7.post3")
    if "datasets" not in sys.modules:
        try:
            import datasets  # noqa: F401
        except ImportError:
            stub = types.ModuleType("datasets")

            def load_dataset(*a, **k):
                raise RuntimeError("datasets is not installed (calibration is passed as tokens)")

            stub.load_dataset = load_dataset
            sys.modules["datasets"] = stub
    import awq
    from awq.quantize.quantizer import AwqQuantizer
    from awq.utils.packing_utils import dequantize_gemm

    return awq.AutoAWQForCausalLM, AwqQuantizer, dequantize_gemm


AutoAWQForCausalLM, AwqQuantizer, dequantize_gemm = load_autoawq()


# ------------------------------------------------------------------------------------------
# The float model and the calibration windows

def build_float_model(folder, seed):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, tie_word_embeddings=True,
        max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=1, eos_token_id=2, initializer_range=0.15,
    )
    config.architectures = ["LlamaForCausalLM"]
    model = transformers.LlamaForCausalLM(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=gen) * (0.1 if p.dim() == 1 else 0.02))
            if name.endswith("layernorm.weight"):
                p[OUTLIER_CHANNELS] *= OUTLIER_GAIN
    shutil.rmtree(folder, ignore_errors=True)
    model.half().save_pretrained(folder, safe_serialization=True)
    windows = torch.randint(3, VOCAB - 1, (WINDOWS, WINDOW_LEN), generator=gen).tolist()
    logits_ids = torch.randint(3, VOCAB - 1, (1, LOGITS_LEN), generator=gen).tolist()
    return windows, logits_ids


def float_reference(folder):
    return transformers.LlamaForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()


# ------------------------------------------------------------------------------------------
# AutoAWQ's quantizer, recorded

class RecordingQuantizer(AwqQuantizer):
    """AwqQuantizer with the CPU state_dict workaround and records of what it chose."""

    expected_block_inputs = None  # set before quantize: the float model's hidden states

    def _block_index(self, module):
        return next(i for i, m in enumerate(self.modules) if m is module)

    def _get_input_feat(self, layer, named_linears):
        i = self._block_index(layer)
        want = self.expected_block_inputs[i]
        diff = ((self.inps - want).abs().max() / want.abs().max()).item()
        self.records.setdefault("block_input_max_rel_diff", []).append(diff)
        return super()._get_input_feat(layer, named_linears)

    def _compute_best_scale(self, x, w_mean, x_mean, module2inspect, linears2scale,
                            fp16_output, kwargs={}):
        saved = module2inspect.state_dict
        module2inspect.state_dict = lambda *a, **k: {
            n: t.clone() for n, t in saved(*a, **k).items()
        }
        losses = []
        compute_loss = self._compute_loss

        def record(*a, **k):
            loss = compute_loss(*a, **k)
            losses.append(loss)
            return loss

        self._compute_loss = record
        try:
            scales = super()._compute_best_scale(
                x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs
            )
        finally:
            del module2inspect.state_dict
            del self._compute_loss
        self._last_losses = losses
        return scales

    def _search_best_scale(self, module, prev_op, layers, inp, module2inspect=None, kwargs={}):
        prev_name, names, scales = super()._search_best_scale(
            module, prev_op, layers, inp, module2inspect=module2inspect, kwargs=kwargs
        )
        losses = self._last_losses
        best = min(range(len(losses)), key=lambda r: (losses[r], r))  # strict <: first minimum
        others = [l for r, l in enumerate(losses) if r != best]
        block = self._block_index(module)
        groups = self.records.setdefault("groups", [])
        groups.append({
            "block": block,
            "index": sum(1 for g in groups if g["block"] == block),
            "prev_op": prev_name,
            "linears": list(names),
            "best_ratio": best / len(losses),
            "losses": losses,
            "margin": (min(others) - losses[best]) / losses[best],
        })
        self.records.setdefault("scales", []).append(scales.clone())
        return prev_name, names, scales

    def _search_best_clip(self, layer, named_linears, input_feat):
        clip_list = super()._search_best_clip(layer, named_linears, input_feat)
        block = self._block_index(layer)
        for name, max_val in clip_list:
            self.records.setdefault("clip", {})[f"model.layers.{block}.{name}"] = (
                max_val.reshape(max_val.shape[0], -1).clone()
            )
        return clip_list


def run_autoawq(folder, windows, out_dir, apply_clip):
    reference = float_reference(folder)
    with torch.no_grad():
        hidden = reference(input_ids=torch.tensor(windows), output_hidden_states=True).hidden_states
    RecordingQuantizer.expected_block_inputs = hidden
    RecordingQuantizer.records = {}
    awq_model = AutoAWQForCausalLM.from_pretrained(
        folder, torch_dtype=torch.float32, device_map="cpu", use_cache=False,
        attn_implementation="sdpa",
    )
    quant_config = {"zero_point": True, "q_group_size": GROUP, "w_bit": 4, "version": "GEMM"}
    awq_model.quantize(
        None, quant_config=quant_config, calib_data=windows, max_calib_seq_len=WINDOW_LEN,
        max_calib_samples=WINDOWS, apply_clip=apply_clip, quantizer_cls=RecordingQuantizer,
    )
    records = RecordingQuantizer.records
    worst = max(records["block_input_max_rel_diff"])
    if worst > 1e-6:
        raise SystemExit(f"AutoAWQ's block inputs differ from the float model's by {worst}")
    shutil.rmtree(out_dir, ignore_errors=True)
    awq_model.save_quantized(out_dir)
    # Written by save_pretrained from the model's generation config; nothing here reads it.
    gen = os.path.join(out_dir, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)
    # The hub's writer notes the dropped tied lm_head in a second metadata key, and the order of
    # metadata keys in the header varies from run to run; the same tensors with {"format": "pt"}
    # make reruns byte-identical.
    path = os.path.join(out_dir, "model.safetensors")
    save_file(load_file(path), path, metadata={"format": "pt"})
    return quant_config, records


# ------------------------------------------------------------------------------------------
# Logits of the quantized model

def quantized_reference(folder, awq_dir):
    """transformers' llama holding what the AutoAWQ checkpoint stores, the quantized linears as
    dequantize_gemm(qweight, qzeros, float32 scales) = scale * (q - z)."""
    model = float_reference(folder)
    saved = load_file(os.path.join(awq_dir, "model.safetensors"))
    state = {}
    for key, t in saved.items():
        if key.endswith(".qweight"):
            p = key[: -len(".qweight")]
            w = dequantize_gemm(t, saved[f"{p}.qzeros"], saved[f"{p}.scales"].float(), 4, GROUP)
            state[f"{p}.weight"] = w.t().contiguous()
        elif not key.endswith((".qzeros", ".scales")):
            state[key] = t.float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise SystemExit(f"quantized reference: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model


RUNS = [("clip", True), ("noclip", False)]


def run_case(out, name, apply_clip, model_dir, windows, logits_ids):
    """One AutoAWQ run into out/<name>/; returns its golden.json entry, or None when a chosen
    ratio is too close to call."""
    case_dir = os.path.join(out, name)
    awq_dir = os.path.join(case_dir, "autoawq")
    os.makedirs(case_dir, exist_ok=True)
    quant_config, records = run_autoawq(model_dir, windows, awq_dir, apply_clip)
    margin = min(g["margin"] for g in records["groups"])
    if margin < MIN_RATIO_MARGIN:
        print(f"{name}: a best ratio beats the runner-up by only {margin:.2e}")
        return None
    q = quantized_reference(model_dir, awq_dir)
    f = float_reference(model_dir)
    with torch.no_grad():
        logits = q(input_ids=torch.tensor(logits_ids)).logits.float()
        dense = f(input_ids=torch.tensor(logits_ids)).logits.float()
    tensors = {"logits": logits.contiguous()}
    for g, sc in zip(records["groups"], records["scales"]):
        tensors[f"scales.{g['block']}.{g['index']}"] = sc.float().contiguous()
    for lin, v in records.get("clip", {}).items():
        tensors[f"clip.{lin}"] = v.float().contiguous()
    save_file(tensors, os.path.join(case_dir, "search.safetensors"), metadata={"format": "pt"})
    return {
        "name": name,
        "apply_clip": apply_clip,
        "quant_config": quant_config,
        "groups": records["groups"],
        "clipped_linears": sorted(records.get("clip", {})),
        "block_input_max_rel_diff": records["block_input_max_rel_diff"],
        "logits_shape": list(logits.shape),
        "quantized_vs_float_max_rel_logit": float((logits - dense).abs().max() / dense.abs().max()),
    }


def build(out, seed):
    model_dir = os.path.join(out, "model")
    windows, logits_ids = build_float_model(model_dir, seed)
    runs = []
    for name, apply_clip in RUNS:
        run = run_case(out, name, apply_clip, model_dir, windows, logits_ids)
        if run is None:
            print(f"seed {seed}: next seed")
            return None
        runs.append(run)
    with open(os.path.join(out, "calib_windows.json"), "w") as fh:
        json.dump({"note": f"{WINDOWS} windows of {WINDOW_LEN} token ids, seed {seed}",
                   "windows": windows}, fh)
        fh.write("\n")
    meta = {
        "autoawq_version": "0.2.7.post3",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "seed": seed,
        "duo_scaling": True,
        "max_calib_seq_len": WINDOW_LEN,
        "outlier_channels": OUTLIER_CHANNELS,
        "outlier_gain": OUTLIER_GAIN,
        "logits_input_ids": logits_ids,
        "note": "per run, <name>/search.safetensors holds scales.{block}.{index} (the scales of "
                "groups[...] with that block and index), clip.<linear> ([out_features, groups], "
                "with apply_clip) and logits (the quantized model's, dequantize_gemm of "
                "<name>/autoawq/, on logits_input_ids)",
        "runs": runs,
    }
    text = json.dumps(meta, indent=1)
    # Lists of numbers on one line each (the losses of every ratio).
    text = re.sub(r"\[\s+([-+0-9.e,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    with open(os.path.join(out, "golden.json"), "w") as fh:
        fh.write(text + "\n")
    return meta


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "awq_stream"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    for seed in range(SEED, SEED + 20):
        meta = build(out, seed)
        if meta is not None:
            break
    else:
        raise SystemExit("no seed gave clear ratio choices")
    total = 0
    for dirpath, _, files in os.walk(out):
        for name in files:
            total += os.path.getsize(os.path.join(dirpath, name))
    if total > MAX_FIXTURE_BYTES:
        raise SystemExit(f"fixture is {total} bytes (> {MAX_FIXTURE_BYTES})")
    print(f"wrote {out} ({total} bytes), seed {meta['seed']}")
    for run in meta["runs"]:
        print(f"{run['name']}:")
        for g in run["groups"]:
            print(f"  block {g['block']} {g['prev_op']} -> {','.join(g['linears'])}: ratio "
                  f"{g['best_ratio']}, margin {g['margin']:.2e}")
        print(f"  quantized vs float logits: max rel {run['quantized_vs_float_max_rel_logit']:.3e}")


if __name__ == "__main__":
    main()
