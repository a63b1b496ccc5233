"""Driver of the hybrid-execution study (issue 24): measures this machine's CPU expert FFN curve
(``moesim calibrate --cpu-only`` at Mixtral-8x7B geometry) into raw/, then prices the execution
policies and the static placements on the first sequences of the shipped synthetic Mixtral-8x7B trace,
with the h200 preset (its CPU: the H100 box's host) and with the h200 preset plus this host's CPU.
``make_report.py`` builds report.md from raw/.

    PYTHONPATH=. python studies/hybrid/run.py [--skip-calibration] [--sequences N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from moesim.analysis.placement import best_placement
from moesim.cli import main
from moesim.simulator.cell import CellSpec, run_cell
from moesim.simulator.cost_model import CostModel
from moesim.traces.format import Trace, read_trace

HERE = Path(__file__).resolve().parent
RAW = HERE / "raw"
TRACE = HERE.parents[1] / "traces" / "synth-mixtral-8x7b.parquet"
EXECUTIONS = ("copy", "n-cpu-moe=8", "n-cpu-moe=16", "fiddler", "hybrid", "hobbit")
CACHE_SIZES = (2, 4, 6)


def first_sequences(trace: Trace, n: int) -> Trace:
    """The rows of the trace's first ``n`` sequences (the Python event path prices every step)."""
    keep = sorted(set(trace.seq.tolist()))[:n]
    mask = pa.array([s in keep for s in trace.seq.tolist()])
    return Trace(trace.meta, trace.table.filter(mask), str(trace.path))


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-calibration", action="store_true", help="keep raw/'s CPU calibration")
    ap.add_argument("--sequences", type=int, default=2, help="sequences of the trace priced (default 2)")
    args = ap.parse_args()
    RAW.mkdir(exist_ok=True)
    cal = RAW / "calibration_cpu_host.json"
    if not args.skip_calibration:
        rc = main(["calibrate", "--cpu-only", "--geometry", "4096x14336", "--repeats", "7", "--name", "h200-this-host",
                   "-o", str(cal), "--raw-out", str(RAW / "cpu_expert_raw.json"), "--force"])
        if rc:
            raise SystemExit(rc)
    trace = first_sequences(read_trace(TRACE), args.sequences)
    machines = {"h200 preset (H100-box host CPU)": CostModel.preset("h200"),
                "h200 + this host's CPU": CostModel.from_json(cal)}
    cells, placements = [], []
    with tqdm(total=len(machines) * len(CACHE_SIZES) * (len(EXECUTIONS) + 1), desc="cells") as bar:
        for label, cost in machines.items():
            for k in CACHE_SIZES:
                for execution in EXECUTIONS:
                    res = run_cell(trace, CellSpec("lru", k, cost=cost, execution=execution, interval=False))
                    cells.append({"machine": label, "cache_size": k, "execution": execution, "result": res.to_json()})
                    bar.update()
            # the static placement at the VRAM of each copy cell's slots (K per layer): equal memory
            xb = cost.expert_bytes(trace.meta.expert_bytes)
            for k in CACHE_SIZES:
                gb = k * trace.meta.num_layers * xb / 1e9 * (1 + 1e-9)
                placements.append({"machine": label, "cache_size": k, "vram_gb": gb,
                                   "result": best_placement(trace, cost, gb)})
                bar.update()
    doc = {"trace": TRACE.name, "sequences": args.sequences, "tokens": int(len(trace) // trace.meta.num_layers),
           "policy": "lru", "cells": cells, "placements": placements}
    (RAW / "cells.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {RAW / 'cells.json'}: {len(cells)} cells, {len(placements)} placements")


if __name__ == "__main__":
    main_()
