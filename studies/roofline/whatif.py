"""The balance as a what-if (issue 23, item 6): the same policy cells priced with the old engine's measured
preset and with the fast engine's, on a shipped trace, and which policy conclusions change.

    python studies/roofline/whatif.py [--old h200] [--new h100] [-o studies/roofline/whatif]

Writes ``<o>.json`` (every cell under both presets), ``<o>.md`` and ``<o>.png``. CPU only, seconds: every
cell goes through the one cell runner (``moesim.simulator.cell.run_cell``), as ``moesim simulate`` does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from studies._common import ROOT, md_table, save_figure, write_text  # noqa: E402

POLICIES = ("lru", "lfu", "s3fifo", "opt")
PREFETCH = ("none", "transition")
SIZES = (2, 3, 4, 6)
TRACE = ROOT / "traces" / "synth-mixtral-8x7b.parquet"


def cells(preset: str) -> list[dict]:
    from moesim.simulator.cell import CellSpec, run_cell
    from moesim.simulator.cost_model import CostModel
    from moesim.traces.format import read_trace

    cost = CostModel.preset(preset) if not preset.endswith(".json") else CostModel.from_json(preset)
    trace = read_trace(TRACE)
    rows = []
    for k in SIZES:
        for pol in POLICIES:
            for pf in PREFETCH:
                spec = CellSpec(policy=pol, cache_size=k, cost=cost, prefetch=pf, interval=False,
                                exact_replay=False)
                t = run_cell(trace, spec).timing
                rows.append({"cache_size": k, "policy": pol, "prefetch": pf, "tokens_per_s": t.tokens_per_s,
                             "ms_per_token": t.ms_per_token, "misses": t.misses, "stall_ms": t.stall_s * 1e3,
                             "compute_ms": t.compute_s * 1e3, "copy_busy_ms": t.copy_busy_s * 1e3})
    return rows


def conclusions(rows: list[dict]) -> dict:
    """Per cache size: the best policy with no prefetch, the best prefetcher for LRU and its gain."""
    tps = {(r["cache_size"], r["policy"], r["prefetch"]): r["tokens_per_s"] for r in rows}
    out = {}
    for k in SIZES:
        best_pol = max(POLICIES[:-1], key=lambda p: tps[(k, p, "none")])   # online policies (not OPT)
        best_pf = max(PREFETCH, key=lambda f: tps[(k, "lru", f)])
        out[str(k)] = {"best_policy": best_pol, "best_prefetch_lru": best_pf,
                       "prefetch_gain_lru": tps[(k, "lru", best_pf)] / tps[(k, "lru", "none")],
                       "opt_over_lru": tps[(k, "opt", "none")] / tps[(k, "lru", "none")]}
    return out


def report(data: dict, stem: Path) -> None:
    old, new = data["old"], data["new"]
    co, cn = data["conclusions"]["old"], data["conclusions"]["new"]
    rows, changed = [], []
    for k in map(str, SIZES):
        a, b = co[k], cn[k]
        rows.append([k, a["best_policy"], b["best_policy"], a["best_prefetch_lru"], b["best_prefetch_lru"],
                     f"{a['prefetch_gain_lru']:.3f}", f"{b['prefetch_gain_lru']:.3f}",
                     f"{a['opt_over_lru']:.3f}", f"{b['opt_over_lru']:.3f}"])
        for key in ("best_policy", "best_prefetch_lru"):
            if a[key] != b[key]:
                changed.append(f"K={k}: {key.replace('_', ' ')} {a[key]} -> {b[key]}")
    tps = {(r["cache_size"], r["policy"], r["prefetch"]): r["tokens_per_s"] for r in data["cells"]["new"]}
    tpo = {(r["cache_size"], r["policy"], r["prefetch"]): r["tokens_per_s"] for r in data["cells"]["old"]}
    ratio = [tps[key] / tpo[key] for key in tps]
    lines = [
        "# What-if: the policy conclusions on a fast engine (issue 23, item 6)", "",
        f"Trace `{data['trace']}`; every cell priced by the timing simulator with two measured presets: "
        f"**old** `{old['name']}` ({old['description']}) and **new** `{new['name']}` ({new['description']}). "
        f"Built by `whatif.py` from the committed presets and trace.", "",
        f"Across the {len(ratio)} cells the new preset's tokens/s is {min(ratio):.2f}x to {max(ratio):.2f}x the old's.",
        "",
        "| K | best policy (old) | best policy (new) | best prefetcher for LRU (old) | (new) | its gain (old) | (new) "
        "| OPT / LRU (old) | (new) |",
        "|" + " --- |" * 9,
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Conclusions that change: " + ("; ".join(changed) if changed else "none (the rankings hold; the "
                                                   "gains' sizes change as the table shows)") + ".", "",
              f"![tokens/s under both presets]({stem.name}.png)", "", "Every cell:", "",
              *md_table(["K", "policy", "prefetch", "tok/s old", "tok/s new", "new/old"],
                        [[k, p, f, f"{tpo[(k, p, f)]:.2f}", f"{tps[(k, p, f)]:.2f}", f"{tps[(k, p, f)] / tpo[(k, p, f)]:.2f}"]
                         for (k, p, f) in tps])]
    write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    figure(data, stem.with_suffix(".png"))


def figure(data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for ax, which in zip(axes, ("old", "new"), strict=True):
        tps = {(r["cache_size"], r["policy"], r["prefetch"]): r["tokens_per_s"] for r in data["cells"][which]}
        for pol in POLICIES:
            ax.plot(SIZES, [tps[(k, pol, "none")] for k in SIZES], marker="o", label=f"{pol}")
        ax.plot(SIZES, [tps[(k, "lru", "transition")] for k in SIZES], "k--", marker="x", label="lru + transition")
        ax.set_title(f"{which}: {data[which]['name']}")
        ax.set_xticks(SIZES)
        ax.set_xlabel("expert slots per layer (K)")
        ax.set_ylabel("simulated tokens/s")
        ax.grid(alpha=0.3)
    axes[1].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", default="h200", help="preset name or calibration JSON of the old engine")
    ap.add_argument("--new", default="studies/roofline/h100_fused.json",
                    help="preset name or calibration JSON of the fast engine (default: fast_engine_check.py's)")
    ap.add_argument("-o", "--out", type=Path, default=Path(__file__).resolve().parent / "whatif")
    args = ap.parse_args()
    from moesim.simulator.cost_model import CostModel

    data: dict = {"trace": TRACE.name, "cells": {}, "conclusions": {}}
    for which, preset in (("old", args.old), ("new", args.new)):
        cost = CostModel.preset(preset) if not preset.endswith(".json") else CostModel.from_json(preset)
        data[which] = {"name": preset, "description": cost.description}
        data["cells"][which] = cells(preset)
        data["conclusions"][which] = conclusions(data["cells"][which])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out.with_suffix(".json"), json.dumps(data, indent=1) + "\n")
    report(data, args.out)
    print(f"wrote {args.out}.json/.md/.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
