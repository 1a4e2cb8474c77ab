#!/usr/bin/env python3
"""Reference GPTQ / RTN quantization of SmolLM2-135M on this CPU, for side-by-side comparison.

The algorithm is AutoGPTQ 0.7.1's `GPTQ` class (auto_gptq/quantization/gptq.py, the IST-DASLab
algorithm plus static groups), loaded by file path because the package __init__ fails with
current transformers. The driver is written here in the reference's sequential style
(IST-DASLab llama.py `llama_sequential`): catch the first block's inputs, then for each block run
the true-sequential subsets [k,v,q] → [o] → [up,gate] → [down], accumulating each linear's
Hessian from the block's forward and quantizing it, and finally forward the *quantized* block to
produce the next block's inputs. Embeddings, norms and lm_head stay in float.

Calibration: the calibration text is tokenized once (add_special_tokens=False) and `nsamples`
windows of `seqlen` tokens are drawn as the reference's get_wikitext2 does:
random.seed(seed); i = random.randint(0, len - seqlen - 1). Evaluation: the paper protocol on
the evaluation text (no BOS, non-overlapping windows of 512, first 40, each scoring 511 tokens).

Usage (venv from scripts/setup_python.sh):
    ~/.cache/autoquant/venv/bin/python scripts/bench/gptq_reference.py --bits 4 --group-size 64 \
        --sym --nsamples 32 --seqlen 2048 --json out.json --save-windows windows.json

Prints one JSON object: quantization wall time and CPU seconds, perplexity, per-layer stats.
"""

import argparse
import json
import math
import os
import random
import sys
import time

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "interop"))
import autogptq_ref  # noqa: E402

ASSETS = os.path.join(
    os.environ.get("AUTOQUANT_HOME", os.path.expanduser("~/.cache/autoquant")), "assets"
)
GGUF = os.path.join(ASSETS, "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
CALIB = os.path.join(ASSETS, "text", "news.txt")
EVAL = os.path.join(ASSETS, "text", "wiki.eval.txt")

# true_sequential subsets per architecture (reference llama.py / opt.py, AutoGPTQ
# inside_layer_modules). The driver below is shared with scripts/golden/make_gptq_stream_golden.py.
SEQUENTIAL_BY_TYPE = {
    "llama": [
        ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"],
        ["self_attn.o_proj"],
        ["mlp.up_proj", "mlp.gate_proj"],
        ["mlp.down_proj"],
    ],
    "opt": [
        ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"],
        ["self_attn.out_proj"],
        ["fc1"],
        ["fc2"],
    ],
    "gpt2": [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]],
}
SEQUENTIAL_BY_TYPE["qwen2"] = SEQUENTIAL_BY_TYPE["llama"]
SEQUENTIAL = SEQUENTIAL_BY_TYPE["llama"]


def decoder_layers(model):
    """The ModuleList of decoder blocks of a llama/qwen2, opt or gpt2 model."""
    model_type = model.config.model_type
    if model_type == "opt":
        return model.model.decoder.layers
    if model_type == "gpt2":
        return model.transformer.h
    return model.model.layers


def sample_windows(ids, nsamples, seqlen, seed):
    """The reference sampler (datautils.get_wikitext2): one random window per sample."""
    if len(ids) <= seqlen + 1:
        sys.exit(f"calibration text has {len(ids)} tokens, need more than {seqlen + 1}")
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        i = random.randint(0, len(ids) - seqlen - 1)
        out.append(ids[i:i + seqlen])
    return out


@torch.no_grad()
def capture_first_block_inputs(model, windows):
    layers = decoder_layers(model)
    n, seqlen, hidden = len(windows), len(windows[0]), model.config.hidden_size
    inps = torch.zeros((n, seqlen, hidden), dtype=torch.float32)
    cache = {"i": 0, "args": (), "kwargs": None}

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, hidden_states, *args, **kwargs):
            inps[cache["i"]] = hidden_states[0]
            cache["i"] += 1
            cache["args"] = args  # gpt2 passes cache, mask, ... positionally
            cache["kwargs"] = kwargs
            raise ValueError  # stop the forward here

    layers[0] = Catcher(layers[0])
    for w in windows:
        try:
            model(input_ids=torch.tensor([w]), use_cache=False)
        except ValueError:
            pass
    layers[0] = layers[0].module
    kwargs = dict(cache["kwargs"])
    kwargs.pop("cache", None)
    kwargs["use_cache"] = False
    kwargs["_args"] = cache["args"]
    return inps, kwargs


def block_forward(layer, x, kwargs):
    kwargs = dict(kwargs)
    args = kwargs.pop("_args", ())
    out = layer(x, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def quantize_gptq(model, windows, args, gptq_mod, catcher, on_quantized=None):
    """The reference sequential driver. `on_quantized(block, name, module, scale, zero, g_idx)`,
    if given, sees every linear right after `fasterquant` (module weight = its quantized Q)."""
    layers = decoder_layers(model)
    inps, kwargs = capture_first_block_inputs(model, windows)
    outs = torch.zeros_like(inps)
    sequential = SEQUENTIAL_BY_TYPE[model.config.model_type]
    subsets = sequential if args.true_sequential else [sum(sequential, [])]
    stats = []
    for li, layer in enumerate(layers):
        modules = dict(layer.named_modules())
        layer_stats = {"layer": li, "sublayers": []}
        for names in subsets:
            gptq = {}
            for name in names:
                g = gptq_mod.GPTQ(modules[name])
                g.quantizer.configure(args.bits, perchannel=True, sym=args.sym, mse=False)
                gptq[name] = g

            def hook(name):
                def fn(_, inp, out):
                    gptq[name].add_batch(inp[0].data, out.data)
                return fn

            handles = [modules[n].register_forward_hook(hook(n)) for n in names]
            t0 = time.perf_counter()
            for j in range(len(windows)):
                block_forward(layer, inps[j:j + 1], kwargs)
            t_fwd = time.perf_counter() - t0
            for h in handles:
                h.remove()
            for name in names:
                catcher.avg = None
                t0 = time.perf_counter()
                scale, zero, g_idx = gptq[name].fasterquant(
                    blocksize=128,
                    percdamp=args.damp,
                    group_size=args.group_size,
                    actorder=args.desc_act,
                    static_groups=args.static_groups,
                )
                if on_quantized is not None:
                    on_quantized(li, name, modules[name], scale, zero, g_idx)
                layer_stats["sublayers"].append({
                    "name": name,
                    "loss": catcher.avg * len(windows) if catcher.avg is not None else None,
                    "seconds": round(time.perf_counter() - t0, 4),
                    "hessian_forward_seconds": round(t_fwd / len(names), 4),
                })
                gptq[name].free()
            del gptq
        for j in range(len(windows)):
            outs[j] = block_forward(layer, inps[j:j + 1], kwargs)[0]
        inps, outs = outs, inps
        stats.append(layer_stats)
        print(f"layer {li}: " + ", ".join(
            f"{s['name'].split('.')[-1]} {s['loss']:.3g}" for s in layer_stats["sublayers"]),
            file=sys.stderr, flush=True)
    return stats


@torch.no_grad()
def quantize_rtn(model, args, quantizer_mod):
    """Round to nearest on the same grid, group by group (no calibration)."""
    for layer in model.model.layers:
        for name, m in layer.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            W = m.weight.data.float()
            k = W.shape[1]
            g = args.group_size if args.group_size != -1 else k
            Q = torch.empty_like(W)
            for c in range(0, k, g):
                q = quantizer_mod.Quantizer()
                q.configure(args.bits, perchannel=True, sym=args.sym, mse=False)
                q.find_params(W[:, c:c + g], weight=True)
                Q[:, c:c + g] = q.quantize(W[:, c:c + g])
            m.weight.data = Q.to(m.weight.dtype)
    return []


@torch.no_grad()
def perplexity(model, ids, seqlen, windows):
    nll, count = 0.0, 0
    for w in range(windows):
        x = torch.tensor([ids[w * seqlen:(w + 1) * seqlen]])
        logits = model(input_ids=x).logits[0].float()
        nll += F.cross_entropy(logits[:-1], x[0, 1:], reduction="sum").double().item()
        count += seqlen - 1
    return math.exp(nll / count), count


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=GGUF)
    p.add_argument("--calib", default=CALIB, help="calibration text file")
    p.add_argument("--eval", default=EVAL, help="evaluation text file")
    p.add_argument("--method", choices=["gptq", "rtn", "fp32", "windows"], default="gptq",
                   help="windows: only sample (or load and shuffle) and --save-windows, then stop")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=-1)
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True)
    sym.add_argument("--asym", dest="sym", action="store_false")
    p.add_argument("--desc-act", action="store_true")
    p.add_argument("--static-groups", action="store_true")
    p.add_argument("--no-true-sequential", dest="true_sequential", action="store_false")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the result JSON here")
    p.add_argument("--save-windows", help="write the sampled calibration token windows (JSON)")
    p.add_argument("--windows", help="use these calibration windows (a --save-windows JSON) "
                   "instead of sampling")
    p.add_argument("--shuffle-windows", type=int, metavar="SEED",
                   help="visit the windows in a shuffled order: the Hessians are sums over windows, "
                   "so only float rounding changes (measures the run-to-run spread)")
    args = p.parse_args()

    for path in (args.gguf, args.calib, args.eval):
        if not os.path.isfile(path):
            sys.exit(f"missing {path}; run scripts/fetch_assets.sh first")
    if args.group_size != -1 and args.group_size <= 0:
        sys.exit("--group-size must be positive or -1")
    if args.method == "windows" and not args.save_windows:
        sys.exit("--method windows needs --save-windows")

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    gptq_mod, quantizer_mod, catcher = autogptq_ref.load_gptq_quantizer()

    folder, name = os.path.split(os.path.abspath(args.gguf))
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = None  # --method windows needs only the tokenizer
    if args.method != "windows":
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                     dtype=torch.float32).eval()
        model.config.use_cache = False
    load_s = time.perf_counter() - t0
    if model is not None and args.group_size != -1:
        for layer in model.model.layers:
            for n, m in layer.named_modules():
                if isinstance(m, nn.Linear) and m.in_features % args.group_size:
                    sys.exit(f"group size {args.group_size} does not divide in_features "
                             f"{m.in_features} of {n}")

    with open(args.calib, encoding="utf-8") as f:
        calib_ids = tok(f.read(), add_special_tokens=False).input_ids
    if args.windows:
        with open(args.windows) as f:
            windows = json.load(f)["windows"]
        if not windows or len({len(w) for w in windows}) != 1:
            sys.exit(f"{args.windows}: needs windows of one length")
        args.nsamples, args.seqlen = len(windows), len(windows[0])
    else:
        windows = sample_windows(calib_ids, args.nsamples, args.seqlen, args.seed)
    if args.shuffle_windows is not None:
        random.Random(args.shuffle_windows).shuffle(windows)
    if args.save_windows:
        tmp = args.save_windows + ".tmp"
        with open(tmp, "w") as f:
            json.dump({
                "calib": os.path.abspath(args.calib),
                "calib_tokens": len(calib_ids),
                "tokenized_with": "transformers AutoTokenizer(gguf_file), add_special_tokens=False",
                "sampler": "random.seed(seed); i = random.randint(0, len - seqlen - 1)",
                "seed": args.seed,
                "from_file": os.path.abspath(args.windows) if args.windows else None,
                "shuffled_with": args.shuffle_windows,
                "nsamples": args.nsamples,
                "seqlen": args.seqlen,
                "windows": windows,
            }, f)
        os.replace(tmp, args.save_windows)
    if args.method == "windows":
        return

    load_before = os.getloadavg()[0]
    w0, c0 = time.perf_counter(), time.process_time()
    if args.method == "gptq":
        stats = quantize_gptq(model, windows, args, gptq_mod, catcher)
    elif args.method == "rtn":
        stats = quantize_rtn(model, args, quantizer_mod)
    else:
        stats = []
    quant_wall, quant_cpu = time.perf_counter() - w0, time.process_time() - c0

    with open(args.eval, encoding="utf-8") as f:
        eval_ids = tok(f.read(), add_special_tokens=False).input_ids
    if len(eval_ids) < args.eval_seqlen * args.eval_windows:
        sys.exit(f"{args.eval} has {len(eval_ids)} tokens, need {args.eval_seqlen * args.eval_windows}")
    e0 = time.perf_counter()
    ppl, scored = perplexity(model, eval_ids, args.eval_seqlen, args.eval_windows)
    eval_s = time.perf_counter() - e0

    result = {
        "implementation": "auto-gptq==0.7.1 GPTQ class, reference sequential driver (scripts/bench/gptq_reference.py)",
        "model": os.path.abspath(args.gguf),
        "method": args.method,
        "bits": args.bits,
        "group_size": args.group_size,
        "sym": args.sym,
        "desc_act": args.desc_act,
        "static_groups": args.static_groups,
        "true_sequential": args.true_sequential,
        "damp_percent": args.damp,
        "calib": os.path.abspath(args.calib),
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "seed": args.seed,
        "windows_file": os.path.abspath(args.windows) if args.windows else None,
        "shuffle_windows": args.shuffle_windows,
        "threads": args.threads,
        "torch": torch.__version__,
        "load_seconds": round(load_s, 2),
        "quant_wall_seconds": round(quant_wall, 2),
        "quant_cpu_seconds": round(quant_cpu, 2),
        "loadavg_before": round(load_before, 2),
        "loadavg_after": round(os.getloadavg()[0], 2),
        "eval": {
            "file": os.path.abspath(args.eval),
            "protocol": "paper: non-overlapping windows, no BOS, each scores seqlen-1 tokens",
            "seqlen": args.eval_seqlen,
            "windows": args.eval_windows,
            "scored_tokens": scored,
            "perplexity": ppl,
            "seconds": round(eval_s, 2),
        },
        "per_layer": stats,
    }
    text = json.dumps(result, indent=1)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.json)
    summary = {k: result[k] for k in ("method", "bits", "group_size", "sym", "quant_wall_seconds", "quant_cpu_seconds")}
    summary["perplexity"] = ppl
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
