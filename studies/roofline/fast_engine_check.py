"""The fast engine's cost model from the roofline run's micro-benchmarks, and what it predicts for that
run's engine measurements (issue 23 items 5-6, as far as one device run goes).

    python studies/roofline/fast_engine_check.py [-o studies/roofline/fast_engine_check]

1. ``h100_fused.json`` (beside the report): a calibration whose GPU terms are the H100 roofline run's micro-benchmarks
   (pinned copy curve, the engine's hqq2/hqq4 expert pieces at batch 1/4/16 -- its chosen path where the
   run recorded one, else the fused one --, the fused layer piece) and
   whose other terms (final piece, per-token engine overhead, engine terms, bf16 curve) stay the
   measured H200 preset's, which this run did not re-measure. Nothing is taken from the cells below.
2. The all-resident decode and the LRU K=3/4 copy cells that run measured, priced by the one cell
   runner on the same tokens: simulated against measured ms/token.

Writes ``<o>.json`` and ``<o>.md``; every number comes from the committed raw files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from studies._common import ROOT, md_table, pct, relative, write_text  # noqa: E402

HERE = Path(__file__).resolve().parent
RUN = HERE / "raw" / "roofline_h100.json"
BASE = ROOT / "moesim" / "data" / "hardware" / "h200.json"


def fused_calibration(run: dict, base: dict) -> dict:
    """``base`` (a measured calibration) with the roofline run's measured GPU terms put in."""
    cal = json.loads(json.dumps(base))
    curve = [[c["bytes"], c["ms"] * 1e-3] for c in run["h2d_curve"]]
    big = np.array([(b, s) for b, s in curve if b >= 4 << 20])
    slope, intercept = np.polyfit(big[:, 0], big[:, 1], 1)   # t = latency + bytes / bandwidth
    cal["pcie"].update({"latency_us": max(float(intercept), 0.0) * 1e6, "bandwidth_gbps": 1 / float(slope) / 1e9,
                        "curve": curve})
    # the engine's piece: its chosen path per batch (runs before the path choice had the fused one only)
    piece = "engine_ms" if any("engine_ms" in r for e in run["expert"].values() for r in e["rows"]) else "fused_ms"
    for fmt in ("hqq2", "hqq4"):
        rows = run["expert"].get(fmt, {}).get("rows", [])
        if rows:
            cal["expert_compute"][fmt] = [[float(r["batch"]), r[piece] * 1e-3] for r in rows]
    cal["layer"]["base_s"] = run["layer"]["fused_ms"] * 1e-3
    cal.pop("batch_programs", None)   # the batch engine's pieces were not re-measured
    cal["name"] = "h100-fused"
    cal["description"] = (f"{run['device']}: copies and fused expert/layer pieces from the roofline run "
                          f"({run['date']}, commit {run['commit'][:7]}); other terms from the measured h200 preset")
    cal["sources"] = dict(cal.get("sources", {}), pcie=f"{relative(RUN)} h2d_curve (fit over copies >= 4 MB)",
                          expert_compute=f"{relative(RUN)} expert.*.rows {piece} (CUDA-graph replays)",
                          layer=f"{relative(RUN)} layer.fused_ms")
    return cal


def check(run: dict, cal_path: Path) -> dict:
    from moesim.engine.validation import head_tokens
    from moesim.simulator.cell import CellSpec, run_cell
    from moesim.simulator.cost_model import CostModel
    from moesim.traces.format import read_trace

    cost = CostModel.from_json(cal_path)
    eng = run["engine"]
    trace = read_trace(ROOT / "traces" / eng["trace"])
    rows = []
    resident = run["all_resident"]
    t = run_cell(head_tokens(trace, resident["tokens"], eng["expert_blob_bytes"], "hqq2"),
                 CellSpec(policy="lru", cache_size=8, cost=cost, interval=False, exact_replay=False)).timing
    # the engine pre-loads every expert untimed and reports the median token; the simulator starts cold,
    # so its median token (past the first tokens' cold misses) is the comparable figure
    rows.append({"cell": "all-resident (K=8, median token)", "tokens": resident["tokens"], "measured_ms_per_token":
                 resident["median_ms_per_token"], "simulated_ms_per_token": float(np.median(t.per_token_ms))})
    cells = head_tokens(trace, eng["tokens"], eng["expert_blob_bytes"], "hqq2")
    for name, cell in run["cells"].items():
        k = int(name.split("_k")[1])
        t = run_cell(cells, CellSpec(policy="lru", cache_size=k, cost=cost, interval=False, exact_replay=False)).timing
        rows.append({"cell": f"LRU K={k}, no prefetch", "tokens": cell["tokens"],
                     "measured_ms_per_token": cell["ms_per_token"], "simulated_ms_per_token": t.ms_per_token,
                     "measured_misses": cell["misses"], "simulated_misses": t.misses})
    for r in rows:
        r["error"] = r["simulated_ms_per_token"] / r["measured_ms_per_token"] - 1
    return {"device": run["device"], "run": relative(RUN), "calibration": cal_path.name, "rows": rows}


def report(data: dict, stem: Path) -> None:
    rows = [[r["cell"], r["tokens"], f"{r['measured_ms_per_token']:.2f}", f"{r['simulated_ms_per_token']:.2f}",
             pct(r["error"], signed=True), r.get("measured_misses", "-"), r.get("simulated_misses", "-")]
            for r in data["rows"]]
    worst = max(abs(r["error"]) for r in data["rows"])
    text = "\n".join([
        "# The fast engine, simulated from its own micro-benchmarks", "",
        f"Device: **{data['device']}**. Calibration `{data['calibration']}` (built by `fast_engine_check.py`): the "
        f"roofline run's copy curve and fused expert/layer pieces, the rest from the measured h200 preset. "
        f"Measured cells: `{data['run']}` (same run). No term was fitted to these cells.", "",
        *md_table(["cell", "tokens", "measured ms/token", "simulated ms/token", "error", "measured misses",
                   "simulated misses"], rows), "",
        f"Largest error: {pct(worst)}. The final piece and the per-token engine overhead were not re-measured "
        "on the fast engine (they are the h200 preset's), and the cells are one short cold-start run each.",
    ])
    write_text(stem.with_suffix(".md"), text + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", type=Path, default=HERE / "fast_engine_check")
    args = ap.parse_args()
    run = json.loads(RUN.read_text())
    cal = fused_calibration(run, json.loads(BASE.read_text()))
    preset = args.out.parent / "h100_fused.json"
    write_text(preset, json.dumps(cal, indent=1) + "\n")
    data = check(run, preset)
    write_text(args.out.with_suffix(".json"), json.dumps(data, indent=1) + "\n")
    report(data, args.out)
    print(f"wrote {relative(preset)}, {args.out}.json/.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
