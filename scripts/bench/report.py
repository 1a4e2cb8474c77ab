"""Summarize the records of scripts/bench_peers.sh: a table and the goal ratios on stdout, all of it
(raw records included) as JSON in --out. Standard library only.

Headline throughputs are the best over rounds of each tool's best repetition: on a shared machine
the fastest run is the one least disturbed by others, and taking it for every system alike keeps
the comparison fair. The per-round ratios are kept too, since rounds interleave the systems.
"""

import argparse
import json
import os
import statistics
import sys

# (key, numerator, denominator, goal description, test on the ratio)
GOALS = [
    ("prefill_vs_transformers", ("autoquant", "f32", "ppl"), ("transformers", "f32", "ppl"),
     ">= 2", lambda r: r >= 2.0),
    ("prefill_vs_llamacpp_f32", ("autoquant", "f32", "prefill"), ("llama.cpp", "F32", "prefill"),
     "~ 1 (>= 0.9)", lambda r: r >= 0.9),
    ("decode_vs_transformers", ("autoquant", "f32", "decode"), ("transformers", "f32", "decode"),
     ">= 4", lambda r: r >= 4.0),
    ("decode_vs_llamacpp_f32", ("autoquant", "f32", "decode"), ("llama.cpp", "F32", "decode"),
     "~ 1 (>= 0.9)", lambda r: r >= 0.9),
]
EXTRA = [
    ("prefill_f16_vs_llamacpp_f16", ("autoquant", "f16", "prefill"), ("llama.cpp", "F16", "prefill")),
    ("decode_f16_vs_llamacpp_f16", ("autoquant", "f16", "decode"), ("llama.cpp", "F16", "decode")),
    # 4-bit decoding against llama.cpp Q4_0 (goal: parity).
    ("decode_nf4_vs_llamacpp_q4_0", ("autoquant", "nf4", "decode"), ("llama.cpp", "Q4_0", "decode")),
    ("decode_gptq4_vs_llamacpp_q4_0", ("autoquant", "gptq4", "decode"), ("llama.cpp", "Q4_0", "decode")),
    # The same with lm_head in int8 (--lm-head-int8), as llama.cpp's Q4_0 file holds it in Q8_0.
    ("decode_nf4_i8head_vs_llamacpp_q4_0", ("autoquant", "nf4+i8head", "decode"), ("llama.cpp", "Q4_0", "decode")),
    ("decode_nf4_int16_vs_llamacpp_q4_0", ("autoquant", "nf4-int16", "decode"), ("llama.cpp", "Q4_0", "decode")),
    ("decode_nf4_int16_i8head_vs_llamacpp_q4_0", ("autoquant", "nf4-int16+i8head", "decode"), ("llama.cpp", "Q4_0", "decode")),
    ("decode_nf4_int8_vs_llamacpp_q4_0", ("autoquant", "nf4-int8", "decode"), ("llama.cpp", "Q4_0", "decode")),
    ("decode_nf4_int8_i8head_vs_llamacpp_q4_0", ("autoquant", "nf4-int8+i8head", "decode"), ("llama.cpp", "Q4_0", "decode")),
    ("decode_gptq4_i8head_vs_llamacpp_q4_0", ("autoquant", "gptq4+i8head", "decode"), ("llama.cpp", "Q4_0", "decode")),
    ("prefill_nf4_vs_llamacpp_q4_0", ("autoquant", "nf4", "prefill"), ("llama.cpp", "Q4_0", "prefill")),
    ("prefill_gptq4_vs_llamacpp_q4_0", ("autoquant", "gptq4", "prefill"), ("llama.cpp", "Q4_0", "prefill")),
]


def throughputs(rec, worst=False):
    """{metric: tokens/s} of one record (one tool run): its best repetition, or its worst."""
    pick = min if worst else max
    res, system, kind = rec["result"], rec["system"], rec["kind"]
    if system == "autoquant" and kind == "bench":
        if worst:
            return {"prefill": res["prompt_len"] / max(res["prefill_seconds"]),
                    "decode": res["gen_len"] / max(res["decode_seconds"])}
        return {"prefill": res["prefill_tokens_per_second"], "decode": res["decode_tokens_per_second"]}
    if system == "autoquant" and kind == "ppl":
        return {"ppl": res["tokens_per_second"]}
    if system == "transformers":
        if worst:
            return {"prefill": res["prompt_len"] / max(res["prefill_seconds"]),
                    "ppl": res["ppl"]["tokens_per_second"],
                    "decode": res["gen_len"] / max(res["decode_seconds"])}
        return {"prefill": res["prefill_tokens_per_second"], "ppl": res["ppl"]["tokens_per_second"],
                "decode": res["decode_tokens_per_second"]}
    if system == "llama.cpp":
        out = {}
        for test in res:  # one entry for pp512 (n_gen 0), one for tg128 (n_prompt 0)
            metric = "prefill" if test["n_gen"] == 0 else "decode"
            samples = test.get("samples_ts") or [test["avg_ts"]]
            out[metric] = pick(samples)
        return out
    raise ValueError(f"unknown record {system}/{kind}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meta", required=True)
    ap.add_argument("--records", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    with open(args.meta) as f:
        meta = json.load(f)
    with open(args.records) as f:
        records = [json.loads(line) for line in f if line.strip()]

    # best[(system, variant, metric)] and per_round[round][(system, variant, metric)]
    best, worst, per_round, extra_info = {}, {}, {}, {}
    for rec in records:
        for metric, tps in throughputs(rec, worst=True).items():
            key = (rec["system"], rec["variant"], metric)
            worst[key] = min(worst.get(key, float("inf")), tps)
        for metric, tps in throughputs(rec).items():
            key = (rec["system"], rec["variant"], metric)
            best[key] = max(best.get(key, 0.0), tps)
            per_round.setdefault(rec["round"], {})[key] = tps
        res = rec["result"]
        info = extra_info.setdefault((rec["system"], rec["variant"]), {})
        if rec["kind"] == "ppl":
            info["perplexity"] = res["perplexity"]
            info["ppl_windows"] = res["windows"]
        if rec["system"] == "transformers":
            info["perplexity"] = res["ppl"]["perplexity"]
            info["ppl_windows"] = res["ppl"]["windows"]
            info["versions"] = res["versions"]
        if rec["system"] == "autoquant" and rec["kind"] == "bench" and res.get("peak_rss_bytes"):
            info["peak_rss_mib"] = round(res["peak_rss_bytes"] / 2**20, 1)
        if rec["system"] == "llama.cpp":
            info["model_type"] = res[0].get("model_type")
            info["build_commit"] = res[0].get("build_commit")
            info["mean_ts"] = {("prefill" if t["n_gen"] == 0 else "decode"): t["avg_ts"] for t in res}

    def ratio(table, num, den):
        n = table.get((num[0], num[1], num[2]))
        d = table.get((den[0], den[1], den[2]))
        return n / d if n and d else None

    ratios = {}
    for key, num, den, goal, ok in GOALS:
        r = ratio(best, num, den)
        rounds = [x for x in (ratio(t, num, den) for _, t in sorted(per_round.items())) if x is not None]
        ratios[key] = {
            "ratio": r, "goal": goal, "met": None if r is None else bool(ok(r)),
            "numerator": "/".join(num), "denominator": "/".join(den),
            "per_round": rounds, "median_of_rounds": statistics.median(rounds) if rounds else None,
        }
    for key, num, den in EXTRA:
        r = ratio(best, num, den)
        rounds = [x for x in (ratio(t, num, den) for _, t in sorted(per_round.items())) if x is not None]
        if r is not None:
            ratios[key] = {"ratio": r, "numerator": "/".join(num), "denominator": "/".join(den),
                           "per_round": rounds,
                           "median_of_rounds": statistics.median(rounds) if rounds else None}

    # Load from others makes every number low and the ratios unreliable; flag it.
    threads = meta["settings"]["threads"]
    loads = [x for x in [meta["machine"]["load1_at_start"]] + [r["load1_after"] for r in records]
             if isinstance(x, (int, float))]
    noisy_reasons = []
    if loads and loads[0] > 1.0:
        noisy_reasons.append(f"load average {loads[0]} before the benchmark started")
    if loads and max(loads) > threads + 1:
        noisy_reasons.append(f"load average reached {max(loads)} with {threads} benchmark threads")
    meta["machine"]["load1_max"] = max(loads) if loads else None
    meta["noisy"] = bool(noisy_reasons)
    meta["noisy_reasons"] = noisy_reasons

    systems = {}
    for (system, variant, metric), tps in sorted(best.items()):
        entry = systems.setdefault(f"{system} {variant}", {"system": system, "variant": variant})
        entry[f"{metric}_tokens_per_second"] = tps
        entry[f"{metric}_slowest_run_tokens_per_second"] = worst[(system, variant, metric)]
        entry.update(extra_info.get((system, variant), {}))

    report = dict(meta, results=list(systems.values()), ratios=ratios, records=records)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(tmp, args.out)

    print_table(report)


def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def print_table(report):
    s = report["settings"]
    print(f"SmolLM2-135M, {s['threads']} threads, {s['rounds']} round(s) x {s['repetitions_per_round']} "
          f"repetitions, best run shown (tokens/s)")
    header = f"{'system':<14}{'weights':<14}{'prefill pp512':>15}{'ppl 512 win':>13}{'decode tg128':>14}{'ppl':>9}"
    print(header)
    print("-" * len(header))
    for e in report["results"]:
        print(f"{e['system']:<14}{e['variant']:<14}{fmt(e.get('prefill_tokens_per_second')):>15}"
              f"{fmt(e.get('ppl_tokens_per_second')):>13}{fmt(e.get('decode_tokens_per_second')):>14}"
              f"{fmt(e.get('perplexity'), 3):>9}")
    print()
    print("ratios (autoquant / peer)")
    for key, r in report["ratios"].items():
        goal = f"goal {r['goal']:<13} {'met' if r['met'] else 'NOT met'}" if "goal" in r and r["ratio"] else ""
        print(f"  {key:<30}{fmt(r['ratio'], 2):>7}  {goal}")
    unstable = [f"{e['system']} {e['variant']} {metric} {e[f'{metric}_slowest_run_tokens_per_second']:.1f}"
                f"..{e[f'{metric}_tokens_per_second']:.1f}"
                for e in report["results"] for metric in ("prefill", "ppl", "decode")
                if f"{metric}_tokens_per_second" in e
                and e[f"{metric}_tokens_per_second"] > 1.5 * e[f"{metric}_slowest_run_tokens_per_second"]]
    if unstable:
        print()
        print("unstable (slowest..fastest run differ by more than 1.5x): " + "; ".join(unstable))
    m = report["machine"]
    print()
    print(f"load average: {m['load1_at_start']} at start, max {m['load1_max']}, {m['nproc']} cores"
          + ("  -> NOISY: " + "; ".join(report["noisy_reasons"]) if report["noisy"] else ""))


if __name__ == "__main__":
    sys.exit(main())
