"""studies/engine_sync/engine_sync_h200.md from studies/engine_sync/gpu_engine_sync.py's raw output (CPU only).

    python studies/engine_sync/make_report.py -o studies/engine_sync/engine_sync_h200.md   # raw: studies/engine_sync/raw

Per stream order (moesim.engine.sync.SyncMode) and synthetic routing: ms per token / step (mean of the
run's tokens, each repeat), the waits each stream issued, the residency proof; the CUPTI stream hops of
the batch-1 all-miss replay per order; the mutation check.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from studies._common import ROOT, md_table, pct, relative, write_text  # noqa: E402

SHAPES = {"b1_all_miss": "batch 1, every request a miss (K=2)", "b1_all_hit": "batch 1, every request a hit (K=2, warm)",
          "b1_mixed": "batch 1, uniform random top-2 (K=4)", "b16_uniform": "batch 16, uniform random top-2 (K=3)"}


def mean_ms(r: dict, mode: str, shape: str) -> float:
    """The mean over repeats of one stream order's ms per token (or step) on one routing shape."""
    return float(np.mean([x["ms_mean"] for x in r["runs"] if x["mode"] == mode and x["shape"] == shape]))


def waits(r: dict, mode: str, shape: str) -> list[int]:
    return next(x["waits"] for x in r["runs"] if x["mode"] == mode and x["shape"] == shape)


def hop_span(h: dict) -> str:
    """The smallest and largest mean of one order's three hop kinds, in us."""
    g = h["gaps"]
    means = [g[k]["mean_us"] for k in ("gate_to_copy", "copy_to_copy", "ready_to_expert")]
    return f"{min(means):.0f}-{max(means):.0f} us"


def findings(r: dict) -> list[str]:
    """The report's conclusions, every number read from the run (plain vs elide, then the default order)."""
    modes = r["modes"]
    change = {s: mean_ms(r, "elide", s) / mean_ms(r, "plain", s) - 1 for s in ("b16_uniform", "b1_all_miss", "b1_all_hit")}
    b16p, b16e = waits(r, "plain", "b16_uniform"), waits(r, "elide", "b16_uniform")
    hitp, hite = waits(r, "plain", "b1_all_hit"), waits(r, "elide", "b1_all_hit")
    plain, lag = r["hops"]["plain"], r["hops"]["elide+lag1"]
    b16 = {mode: mean_ms(r, mode, "b16_uniform") for mode in modes}
    am = {mode: mean_ms(r, mode, "b1_all_miss") for mode in modes}
    fastest = {s: min(modes, key=lambda mode, s=s: mean_ms(r, mode, s)) for s in SHAPES
               if any(x["shape"] == s for x in r["runs"])}
    return [
        f"- Leaving out the waits stream order implies cuts them by a lot (batch 16: compute {b16p[0]} -> {b16e[0]}, "
        f"copy {b16p[1]} -> {b16e[1]}; all-hit: {hitp[0]} -> {hite[0]} compute waits) but on its own changes the time "
        f"little (batch-16 step {pct(change['b16_uniform'], signed=True)}, all-miss token "
        f"{pct(change['b1_all_miss'], signed=True)}, all-hit {pct(change['b1_all_hit'], signed=True)}).",
        f"- What costs is the CPU queueing a whole step ahead with untimed events: the copies themselves run slower "
        f"in situ ({plain['gaps']['copy_ms']['mean']:.3f} ms with `plain` vs {lag['gaps']['copy_ms']['mean']:.3f} ms "
        f"with `elide+lag1`) and the hops stretch to {hop_span(plain)}. Timing-enabled events recover part of it; "
        f"holding the CPU to one layer ahead (`lag1`) brings the hops to {hop_span(lag)}.",
        "- Per step shape (mean of repeats): batch-16 step " + ", ".join(f"`{k}` {v:.1f} ms" for k, v in b16.items())
        + "; all-miss token " + ", ".join(f"`{k}` {v:.2f} ms" for k, v in am.items()) + ".",
        "- Fastest order per shape: " + "; ".join(f"{SHAPES[s]}: `{mode}`" for s, mode in fastest.items())
        + ". The engines' default is `elide+lag1` (moesim.engine.sync.DEFAULT_SYNC): it needs no timing events, and "
        "its hops are the committed calibration's `copy_hop_s` / `ready_hop_s`."]


def markdown(r: dict, raw_dir: str) -> str:
    modes = r["modes"]
    shapes = [s for s in SHAPES if any(x["shape"] == s for x in r["runs"])]
    lines = ["# How the engine orders its two streams: measured (NVIDIA H200)", "",
             f"Device run {r['date']} (`python3 studies/engine_sync/gpu_engine_sync.py --out $OUT --budget 230`), report "
             f"`python studies/engine_sync/make_report.py {relative(raw_dir)} -o studies/engine_sync/engine_sync_h200.md`"
             + (f"; code: {r['code']}" if r.get("code") else "") + ". Mixtral "
             "geometry, hqq2 experts, random weights, residency proof on; synthetic routings no validation cell uses.",
             "", "Stream orders (`moesim.engine.sync.SyncMode`): `plain` = every cross-stream wait issued, untimed "
             "events, the CPU queueing a whole step ahead (the engine before this change); `elide` = waits that "
             "stream order already implies left out; `timing` = timing-enabled events; `lagN` = the CPU at most N "
             "layers ahead of the gates. The engines' default is `elide+lag1`.", "",
             "## ms per token (batch 1) or per step (batch 16), mean over the run, each repeat", ""]
    table = []
    for mode in modes + ["instrumented"]:
        cells = []
        for s in shapes:
            xs = [x for x in r["runs"] if x["mode"] == mode and x["shape"] == s]
            if not xs:
                cells.append("-")
                continue
            waits = xs[0].get("waits")
            w = f" (waits {waits[0]} / {waits[1]})" if waits else ""
            cells.append(", ".join(f"{x['ms_mean']:.2f}" for x in xs) + w)
        table.append([mode, *cells])
    lines += md_table(["order", *(SHAPES[s] for s in shapes)], table)
    viol = {x["violations"] for x in r["runs"]}
    lines += ["", f"Waits: compute / copy stream, one run. Residency violations over every run above: {sorted(viol)}.",
              "`instrumented` = CUDA timing events around every piece and copy (the stream order of the first row).",
              "", "## Stream hops: CUPTI trace of the all-miss batch-1 replay (4 tokens, GPU timestamps)", "",
              ]
    hops = []
    for mode, h in r["hops"].items():
        if "gaps" not in h:
            hops.append([mode, h.get("error", "-"), "", "", "", "", ""])
            continue
        g, t = h["gaps"], h["terms"]
        hops.append([mode, f"{g['gate_to_copy']['mean_us']:.1f}", f"{g['copy_to_copy']['mean_us']:.1f}",
                     f"{g['ready_to_expert']['mean_us']:.1f}", f"{g['copy_ms']['mean']:.4f}",
                     f"{t['copy_hop_s'] * 1e6:.1f}", f"{t['ready_hop_s'] * 1e6:.1f}"])
    lines += md_table(["order", "gate -> copy (us)", "copy -> copy (us)", "copy landed -> expert (us)",
                       "copy in situ (ms)", "copy_hop_s (us)", "ready_hop_s (us)"], hops)
    m = r.get("mutation_skip_compute_waits")
    lines += ["", "Means over all hops of the trace; `copy_hop_s` pools gate -> copy and copy -> copy (the calibration "
              "field, moesim.engine.cupti_gaps.hop_terms). With the residency check on, copy -> copy includes its "
              "count kernel.", "", "## What it says", "", *findings(r)]
    if m:
        lines.append(f"- The device-side residency proof still catches an engine whose compute skips every wait for a "
                     f"copy (default order): {m['violations']} violations in {m['misses']} misses (0 in every run "
                     "above).")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("raw", nargs="?", default=str(ROOT / "studies/engine_sync/raw"),
                    help="folder with engine_sync.json (default: the committed run)")
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    path = Path(args.raw) / "engine_sync.json"
    try:
        r = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"{path}: cannot read ({exc.__class__.__name__})", file=sys.stderr)
        return 1
    write_text(Path(args.out), markdown(r, args.raw))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
