"""Report maker of the prefetch-bound study: raw/bound_synth_mixtral.json -> bound.md (CPU only).

    python studies/bound/make_report.py [-o studies/bound/bound.md]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from studies._common import md_table, pct, write_text  # noqa: E402

HERE = Path(__file__).parent
RAW = HERE / "raw" / "bound_synth_mixtral.json"


def render(data: dict) -> str:
    base = {c["cache_size"]: c for c in data["cells"] if c["lookahead"] == 0}
    cells = [c for c in data["cells"] if c["lookahead"] > 0]
    rows = []
    for c in cells:
        b = base[c["cache_size"]]
        n = c["requests"]
        rows.append([c["cache_size"], c["lookahead"], c["prefetch_budget"], b["lru_misses"], b["opt_misses"],
                     c["misses"], c["achievable_misses"], "yes" if c["exact"] else f"no (gap {c['achievable_misses'] - c['misses']})",
                     pct(1 - c["misses"] / n, 2)])
    exact = sum(c["exact"] for c in cells)
    bound_at = {(c["cache_size"], c["lookahead"], c["prefetch_budget"]): c for c in cells}
    measured = []
    for m in data["prefetchers"]:
        b = bound_at[(m["cache_size"], m["prefetch_distance"], m["prefetch_budget"])]
        n = m["timing_requests"]
        measured.append([m["policy"], m["prefetch"], m["cache_size"], m["prefetch_distance"], m["prefetch_budget"],
                         m["timing_misses"], b["misses"], pct(1 - m["timing_misses"] / n, 2),
                         pct(1 - b["misses"] / b["requests"], 2),
                         f"{(1 - m['timing_misses'] / n) / (1 - b['misses'] / b['requests']):.3f}"])
    one = [c for c in cells if c["lookahead"] == 1 and c["prefetch_budget"] == 1]
    lines = [
        "# How far prefetching can go: the offline bound",
        "",
        f"Trace: `{data['trace']}` ({data['rows']} rows, {data['num_layers']} layers, {data['num_experts']} experts, "
        f"top-{data['top_k']}). `moesim bound` (docs/bound.md) gives the fewest demand misses any eviction policy plus "
        "prefetcher could have with per-layer caches of K slots, routing known D layers ahead and at most B prefetch "
        "copies per layer; `achievable` is an offline schedule's misses, so the optimum lies between the two. "
        "LRU and OPT are the misses without prefetch.",
        "",
        *md_table(["K", "D", "B", "LRU misses", "OPT misses", "bound", "achievable", "exact",
                   "bound hit rate"], rows),
        "",
        f"{exact} of {len(cells)} cells are exact (the bound is attained). With one copy per layer looking one "
        "layer ahead, demand misses fall from OPT's "
        + ", ".join(f"{base[c['cache_size']]['opt_misses']} to {c['misses']} (K={c['cache_size']})" for c in one)
        + ". The model counts a prefetch that lands late as a saved miss (copy time is not modelled), so these are "
        "bounds on misses, not on stall time. Raw data: `studies/bound/raw/bound_synth_mixtral.json` "
        "(`studies/bound/run_bound.py`).",
        "",
        "## moesim's prefetchers against the bound",
        "",
        f"The timing simulator (`{data['hardware']}` preset, batch 1) with each prefetcher at distance d and budget B; "
        "its demand misses (`timing_misses`: a prefetched expert counts as resident from its issue, as in the bound) "
        "beside the bound at lookahead D = d. `share` is the prefetcher's hit rate over the bound's. moesim's "
        "prefetchers never target layer 0 nor across a token, which the bound allows.",
        "",
        *md_table(["policy", "prefetch", "K", "d", "B", "misses", "bound", "hit rate", "bound hit rate", "share"],
                  measured),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=HERE / "bound.md")
    args = ap.parse_args(argv)
    write_text(args.output, render(json.loads(RAW.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
