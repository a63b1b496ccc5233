"""Driver of the budgets study (CPU): optimal per-layer budgets against the same total spread evenly,
on the shipped synthetic Mixtral trace, for a few policies and totals. Writes the raw JSON that
``make_report.py`` turns into ``budgets.md``.

    python studies/budgets/run_budgets.py [-o studies/budgets/raw/budgets_synth_mixtral.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tqdm import tqdm  # noqa: E402

from moesim.simulator.budgets import budgets_report  # noqa: E402
from moesim.traces.format import read_trace  # noqa: E402
from studies._shipped_trace import SHIPPED_TRACE, write_raw  # noqa: E402

POLICIES = ("lru", "lfu", "fifo", "opt")
SLOTS_PER_LAYER = (3, 4, 5, 6)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=Path(__file__).parent / "raw" / "budgets_synth_mixtral.json")
    args = ap.parse_args(argv)
    trace = read_trace(SHIPPED_TRACE)
    cells = []
    jobs = [(p, s) for p in POLICIES for s in SLOTS_PER_LAYER]
    for policy, per_layer in tqdm(jobs, desc="budgets", unit="cell"):
        cells.append(budgets_report(trace, policy, per_layer * trace.meta.num_layers))
    write_raw(args.output, trace, cells)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
