"""Driver of the prefetch-bound study (CPU): `moesim bound` on the shipped synthetic Mixtral trace for a
few cache sizes, lookaheads and prefetch budgets, beside LRU and OPT without prefetch. Writes the raw
JSON that ``make_report.py`` turns into ``bound.md``.

    python studies/bound/run_bound.py [-o studies/bound/raw/bound_synth_mixtral.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tqdm import tqdm  # noqa: E402

from moesim.simulator.bound import prefetch_bound  # noqa: E402
from moesim.simulator.cost_model import CostModel  # noqa: E402
from moesim.simulator.replay import simulate  # noqa: E402
from moesim.simulator.timing import simulate_timing  # noqa: E402
from moesim.traces.format import read_trace  # noqa: E402
from studies._shipped_trace import SHIPPED_TRACE, write_raw  # noqa: E402

CACHE_SIZES = (3, 4, 5)
LOOKAHEADS = (1, 2, 3)
BUDGETS = (1, 2)
# moesim's own prefetchers measured against the bound: the timing simulator's demand misses
# (timing_misses: a prefetched expert counts as resident from its issue, as in the bound's model)
PREFETCH_CELLS = [(policy, prefetch, d, b) for policy in ("lru", "opt") for prefetch in ("previous-token", "oracle")
                  for d in (1, 2) for b in BUDGETS]
PREFETCH_CACHE_SIZE = 4
HARDWARE = "h200"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=Path(__file__).parent / "raw" / "bound_synth_mixtral.json")
    args = ap.parse_args(argv)
    trace = read_trace(SHIPPED_TRACE)
    jobs = [(k, d, b) for k in CACHE_SIZES for d in LOOKAHEADS for b in BUDGETS]
    cells = []
    for k in CACHE_SIZES:
        lru = simulate(trace, "lru", k)
        cells.append({"cache_size": k, "lookahead": 0, "prefetch_budget": 0, "requests": lru.requests,
                      "lru_misses": lru.misses, "opt_misses": simulate(trace, "opt", k).misses})
    for k, d, b in tqdm(jobs, desc="bound", unit="cell"):
        r = prefetch_bound(trace, k, d, b)
        cells.append({"cache_size": k, "lookahead": d, "prefetch_budget": b, "requests": r.requests,
                      "misses": r.misses, "achievable_misses": r.achievable_misses, "exact": r.exact,
                      "opt_misses": r.opt_misses, "achievable_prefetches": r.prefetches})
    cost = CostModel.preset(HARDWARE)
    measured = []
    for policy, prefetch, d, b in tqdm(PREFETCH_CELLS, desc="prefetchers", unit="cell"):
        r = simulate_timing(trace, policy, PREFETCH_CACHE_SIZE, cost, prefetch=prefetch,
                            prefetch_params={"distance": d, "budget": b})
        t = r.to_dict()
        measured.append({"policy": policy, "prefetch": prefetch, "cache_size": PREFETCH_CACHE_SIZE,
                         "prefetch_distance": d, "prefetch_budget": b, "timing_requests": t["requests"],
                         "timing_misses": t["misses"], "tokens_per_s": t["tokens_per_s"]})
    write_raw(args.output, trace, cells, hardware=HARDWARE, prefetchers=measured)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
