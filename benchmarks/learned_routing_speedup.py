"""What speculative prefetch buys, simulated: tokens/s on the learned trace for LRU / LFU / OPT x
K = 2..6 x prefetch none / speculative d=1 / speculative d=2 / transition / oracle, on hardware presets.

    python benchmarks/learned_routing_speedup.py -o reports/learned_routing_speedup   # writes PREFIX.{md,json}

Every decode token of traces/learned-mixtral-32l.parquet, batch 1, one cache per layer, experts sized
as Mixtral-8x7B's 2-bit experts (hqq2, the seed paper's setting): the learned model supplies the
routing and the predictions, the preset the copy and compute times. Prints the table and, per cell,
the ratio to no prefetch on the same preset, policy and K.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moesim.safe_write import atomic_open  # noqa: E402
from moesim.simulator.cost_model import CostModel  # noqa: E402
from moesim.simulator.timing import simulate_timing  # noqa: E402
from moesim.traces.format import DECODE, Trace, read_trace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PREFETCH = (("none", None), ("speculative", 1), ("speculative", 2), ("transition", 1), ("oracle", 1))


def name(prefetch: str, d: int | None) -> str:
    return f"speculative d={d}" if prefetch == "speculative" else prefetch


def run(trace: Trace, presets: list[str], policies: list[str], sizes: list[int], ready: str = "hidden") -> list[dict]:
    from tqdm import tqdm

    rows = []
    cells = [(h, p, k, pf, d) for h in presets for p in policies for k in sizes for pf, d in PREFETCH]
    for hw, pol, k, pf, d in tqdm(cells, desc="simulate", unit="cell", file=sys.stderr):
        cost = CostModel.preset(hw).with_overrides(quantization="hqq2")
        res = simulate_timing(trace, pol, k, cost, prefetch=pf, prefetch_params={"distance": d} if d else None,
                              speculative_ready=ready)
        rows.append({"hardware": hw, "policy": pol, "cache_size": k, "prefetch": pf, "prefetch_distance": d,
                     "tokens_per_s": round(float(res.tokens_per_s), 3), "hit_rate": round(float(res.hit_rate), 4),
                     "prefetches": int(res.prefetches), "stall_ms_per_token": round(res.stall_s * 1e3 / res.tokens, 3)})
    base = {(r["hardware"], r["policy"], r["cache_size"]): r["tokens_per_s"] for r in rows if r["prefetch"] == "none"}
    for r in rows:
        r["speedup_vs_none"] = round(r["tokens_per_s"] / base[(r["hardware"], r["policy"], r["cache_size"])], 4)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# What speculative prefetch buys on the learned trace (simulated)", "",
             f"Trace `{meta['trace']}`: {meta['tokens']:,} decode tokens x {meta['layers']} layers of the learned "
             "32-layer Mixtral-architecture model (traces/README.md); experts sized as Mixtral-8x7B's 2-bit "
             f"experts ({meta['expert_bytes']:,} B); batch 1, one cache of K slots per layer, cold start. "
             "Command: `python benchmarks/learned_routing_speedup.py -o reports/learned_routing_speedup`.", "",
             f"Speculative copies for layer l+d are issued when their prediction exists (`--speculative-ready "
             f"{meta['speculative_ready']}`): " + (
                 "after layer l's experts and the predict piece, since the prediction applies layer l+d's router "
                 "to layer l's output -- what a live decoder can do (docs/timing.md). `--speculative-ready gate` "
                 "(right after layer l's gate, as the replay engine issues recorded predictions) gives the upper "
                 "bound." if meta["speculative_ready"] == "hidden" else
                 "right after layer l's gate, as the replay engine issues recorded predictions: an upper bound "
                 "on what a live decoder gets (docs/timing.md)."), "",
             "Cells: tokens/s (speed-up over no prefetch, same hardware, policy and K).", ""]
    for hw in dict.fromkeys(r["hardware"] for r in rows):
        lines += [f"## `{hw}`", "", "| policy | K | " + " | ".join(name(p, d) for p, d in PREFETCH) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in PREFETCH) + " |"]
        for pol in dict.fromkeys(r["policy"] for r in rows):
            for k in sorted({r["cache_size"] for r in rows}):
                cells = []
                for pf, d in PREFETCH:
                    r = next(x for x in rows if (x["hardware"], x["policy"], x["cache_size"], x["prefetch"],
                                                 x["prefetch_distance"]) == (hw, pol, k, pf, d))
                    cells.append(f"{r['tokens_per_s']:.2f}" if pf == "none"
                                 else f"{r['tokens_per_s']:.2f} ({r['speedup_vs_none']:.2f}x)")
                lines.append(f"| {pol} | {k} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(ROOT / "traces/learned-mixtral-32l.parquet"))
    ap.add_argument("--presets", default="a6000,h200")
    ap.add_argument("--policies", default="lru,lfu,opt")
    ap.add_argument("--sizes", default="2,3,4,5,6")
    ap.add_argument("--speculative-ready", choices=("hidden", "gate"), default="hidden",
                    help="when speculative copies may start (docs/timing.md); default: a live decoder's")
    ap.add_argument("-o", "--output", required=True,
                    help="output prefix (the committed one: reports/learned_routing_speedup)")
    args = ap.parse_args()
    full = read_trace(args.trace).filter_phase(DECODE)
    # the learned model's own experts are small; the seed paper's question is about Mixtral-size experts
    trace = Trace(dataclasses.replace(full.meta, expert_bytes=0, quantization="hqq2"), full.table, full.path)
    rows = run(trace, args.presets.split(","), args.policies.split(","), [int(s) for s in args.sizes.split(",")],
               args.speculative_ready)
    meta = {"trace": str(Path(args.trace).resolve().relative_to(ROOT)) if Path(args.trace).resolve().is_relative_to(ROOT)
            else args.trace, "tokens": len(trace) // trace.meta.num_layers, "layers": trace.meta.num_layers,
            "speculative_ready": args.speculative_ready,
            "expert_bytes": CostModel.preset(args.presets.split(",")[0]).with_overrides(quantization="hqq2").expert_bytes(0)}
    prefix = Path(args.output)
    with atomic_open(prefix.with_suffix(".json")) as fh:
        json.dump({**meta, "cells": rows}, fh, indent=1)
        fh.write("\n")
    text = markdown(rows, meta)
    with atomic_open(prefix.with_suffix(".md")) as fh:
        fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
