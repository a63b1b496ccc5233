"""Driver of the hybrid-execution study (issue 24): measures this machine's CPU expert FFN curve
(``moesim calibrate --cpu-only`` at Mixtral-8x7B geometry) into raw/, then prices the shipped trace's
execution policies with that calibration and with the h200 preset's H100-box host defaults
(``moesim simulate --execution``), one JSON per cell. ``make_report.py`` builds report.md from raw/.

    PYTHONPATH=. python studies/hybrid/run.py [--skip-calibration]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

from moesim.cli import main

HERE = Path(__file__).resolve().parent
RAW = HERE / "raw"
TRACE = HERE.parents[1] / "traces" / "synth-mixtral-8x7b.parquet"
EXECUTIONS = ("copy", "n-cpu-moe=8", "n-cpu-moe=16", "fiddler", "hybrid", "hobbit")
CACHE_SIZES = (2, 4, 6)


def simulate(trace: Path, k: int, execution: str, source: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["simulate", str(trace), "--policy", "lru", "--cache-size", str(k), *source,
                   "--execution", execution, "--json"])
    if rc:
        raise SystemExit(f"simulate failed ({rc}) for K={k} {execution}")
    return json.loads(out.getvalue())


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-calibration", action="store_true", help="keep raw/'s CPU calibration")
    ap.add_argument("--trace", type=Path, help="trace to price (default: the shipped synthetic Mixtral-8x7B trace)")
    args = ap.parse_args()
    RAW.mkdir(exist_ok=True)
    cal = RAW / "calibration_cpu_host.json"
    if not args.skip_calibration:
        rc = main(["calibrate", "--cpu-only", "--geometry", "4096x14336", "--repeats", "7", "--name", "h200-this-host",
                   "-o", str(cal), "--raw-out", str(RAW / "cpu_expert_raw.json"), "--force"])
        if rc:
            raise SystemExit(rc)
    trace = args.trace or TRACE
    cells = []
    for label, source in (("h200 preset (H100-box host CPU)", ["--hardware", "h200"]),
                          ("h200 + this host's CPU", ["--calibration", str(cal)])):
        for k in CACHE_SIZES:
            for execution in EXECUTIONS:
                cells.append({"machine": label, "cache_size": k, "execution": execution,
                              "result": simulate(trace, k, execution, source)})
    (RAW / "cells.json").write_text(json.dumps({"trace": trace.name, "policy": "lru", "cells": cells}, indent=1) + "\n")
    print(f"wrote {RAW / 'cells.json'}: {len(cells)} cells")


if __name__ == "__main__":
    main_()
