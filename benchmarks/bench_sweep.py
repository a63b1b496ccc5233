"""Sweep throughput: cells/s vs workers for a 200-cell sweep of the real Mixtral trace, and the
overhead of Ray against the local process pool, all measured in the same run.

    python benchmarks/bench_sweep.py [--workers 1,2] [--timing] [--no-ray] [--policies lru,lfu]

Grid (200 cells): 10 eviction policies x cache sizes 2..6 x scope {layer, global} x semantics
{atomic, sequential} -- hit-rate replays, a mix of compiled (lru, lfu, fifo, opt) and plain-Python
policies. ``--timing`` swaps the scope/semantics axes for hardware {a6000, h200} x prefetch {none,
transition} (timing simulations, ~10x costlier per cell).

Every configuration starts from an empty output, so nothing is skipped; "startup" is executor
creation (Ray: ray.init) and is reported apart from the sweep itself; a process pool starts its
workers lazily, so its start-up (a forkserver importing the simulator) is inside "sweep s".
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moesim.commands._common import print_table  # noqa: E402
from moesim.sweep.executors import InProcessExecutor, ProcessPoolExecutorBackend, RayExecutor  # noqa: E402
from moesim.sweep.result_store import read_results  # noqa: E402
from moesim.sweep.spec import SweepSpec, expand  # noqa: E402
from moesim.sweep.sweep import run_sweep  # noqa: E402

POLICIES = ["lru", "lfu", "fifo", "opt", "arc", "sieve", "s3fifo", "lfu-decay", "lrfu", "gate-weighted"]


def real_trace(tmp: Path) -> Path:
    from moesim.traces.vllm import import_vllm_jsonl

    src = sorted(glob.glob(str(REPO.parent / "shared" / "traces" / "real" / "*.jsonl")))
    if not src:
        sys.exit("no real trace under ../shared/traces/real/")
    out = tmp / "real.parquet"
    import_vllm_jsonl(src[0], out)
    return out


def grid(trace: Path, timing: bool, policies: list[str] = POLICIES) -> SweepSpec:
    if timing:
        return SweepSpec(traces=[str(trace)], policies=policies, cache_sizes=[2, 3, 4, 5, 6],
                         hardware=["a6000", "h200"], prefetch=["none", "transition"], prefetch_budgets=[2])
    return SweepSpec(traces=[str(trace)], policies=policies, cache_sizes=[2, 3, 4, 5, 6],
                     scopes=["layer", "global"], semantics=["atomic", "sequential"])


def measure(label: str, make, spec: SweepSpec, tmp: Path) -> dict:
    t0 = time.perf_counter()
    executor = make()
    startup = time.perf_counter() - t0
    out = tmp / f"{label.replace(' ', '_')}.parquet"
    report = run_sweep(spec, out, executor, progress=sys.stderr.isatty())
    assert report.failed == 0 and report.ran == len(expand(spec)), report
    busy = float(read_results(out).column("elapsed_s").to_numpy().sum())  # seconds spent inside cells
    return {"label": label, "workers": report.workers, "startup_s": startup, "sweep_s": report.elapsed_s,
            "cells_per_s": report.cells_per_s, "busy_s": busy, "out": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2", help="process-pool sizes to try (default 1,2)")
    ap.add_argument("--timing", action="store_true", help="timing-simulation cells instead of hit-rate cells")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray executor")
    ap.add_argument("--policies", default=",".join(POLICIES), help="policy axis (fewer = a smaller grid)")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        spec = grid(real_trace(tmp), args.timing, args.policies.split(","))
        n = len(expand(spec))
        print(f"{n} cells ({'timing' if args.timing else 'hit-rate'}) of the real Mixtral-8x7B trace")
        results = [measure("inprocess", InProcessExecutor, spec, tmp)]
        for w in workers:
            results.append(measure(f"process x{w}", lambda w=w: ProcessPoolExecutorBackend(w), spec, tmp))
        if not args.no_ray:
            for w in workers:
                results.append(measure(f"ray x{w}", lambda w=w: RayExecutor(workers=w), spec, tmp))
        # every executor must produce the same numbers
        cols = ["cell_id", "hits", "requests"] + (["tokens_per_s"] if args.timing else [])
        ref = read_results(results[0]["out"]).select(cols).sort_by("cell_id")
        for r in results[1:]:
            assert read_results(r["out"]).select(cols).sort_by("cell_id").equals(ref), r["label"]
        base = next((r for r in results if r["label"] == "process x1"), results[0])
        # busy workers = cell seconds / wall seconds: how many workers were computing on average;
        # mean cell ms rising with workers means the cores are contended, not the executor slow.
        rows = [[r["label"], r["workers"], round(r["startup_s"], 2), round(r["sweep_s"], 2), round(r["cells_per_s"], 1),
                 round(r["cells_per_s"] / base["cells_per_s"], 2),
                 round((r["startup_s"] + r["sweep_s"]) / (base["startup_s"] + base["sweep_s"]), 2),
                 round(r["busy_s"] / r["sweep_s"], 2), round(1e3 * r["busy_s"] / n, 1)]
                for r in results]
        print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end")
        print_table(["executor", "workers", "startup s", "sweep s", "cells/s", "cells/s vs process x1",
                     "total time vs process x1", "busy workers", "mean cell ms"], rows)
        print("all executors produced identical results")


if __name__ == "__main__":
    main()
