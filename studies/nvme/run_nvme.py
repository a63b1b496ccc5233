"""Driver of the NVMe-tier study (CPU, any machine): the simulated disk tier against a real reader.

For each trace, host-RAM budget and read mode, the timing simulator's disk-tier time (``disk_busy_ms``
of ``simulate --json``, priced by the disk calibration only) is compared with a stand-alone reader
(:mod:`moesim.engine.disk_reader`) that replays the same GPU misses through a real host-RAM pool and
reads each missing expert from a real file (page cache bypassed, or through a warm page cache). The
calibration comes from ``moesim calibrate --disk`` run beforehand, never from these cells.

    python studies/nvme/run_nvme.py --measure --calibration studies/nvme/raw/disk_cal_cpu_box.json \\
        --scratch /tmp -o studies/nvme/raw/validate_cpu_box.json
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
from tqdm import tqdm  # noqa: E402

from moesim.engine import disk_bench, disk_reader  # noqa: E402
from moesim.safe_write import read_json  # noqa: E402
from moesim.simulator.cost_model import CostModel  # noqa: E402
from moesim.simulator.disk_tier import DiskCurve, HostTierSpec  # noqa: E402
from moesim.simulator.timing import simulate_timing  # noqa: E402
from moesim.traces.format import DECODE, Trace, read_trace  # noqa: E402
from studies._common import relative, write_json  # noqa: E402

TRACES = ("traces/synth-mixtral-8x7b.parquet", "traces/learned-mixtral-32l.parquet")


def head(trace: Trace, tokens: int) -> Trace:
    """The first ``tokens`` decode tokens (all their layers) in execution order: a prefill chunk would
    be one union step in the simulator and many sets in the reader."""
    t = trace.filter_phase(DECODE).execution_order()
    return Trace(t.meta, t.table.slice(0, tokens * t.meta.num_layers), t.path)


def simulated(trace: Trace, curve: DiskCurve, point: tuple[str, int, int], k: int, host: int, policy: str,
              expert_bytes: int) -> dict:
    """One (trace, budget, mode), the simulator's side: its disk time and reads."""
    mode, block, depth = point
    cost = CostModel.preset("h200").with_overrides(expert_bytes=expert_bytes)
    spec = HostTierSpec(curve, host_ram_experts=host, policy=policy, mode=mode, block=block, queue_depth=depth)
    sim = simulate_timing(trace, policy, k, cost, host_tier=spec).to_dict()
    ht = sim["host_tier"]
    return {"trace": Path(trace.path).name, "mode": mode, "block_bytes": block, "queue_depth": depth,
            "host_ram_experts": host, "gpu_cache_size": k, "requests": sim["requests"],
            "sim_tier_requests": sim["tier_requests"], "sim_disk_reads": ht["disk_reads"],
            "sim_disk_ms": ht["disk_busy_ms"], "real_runs": [], "round_sim_disk_ms": []}


def read_once(cell: dict, trace: Trace, misses: list, policy: str, expert_bytes: int, path: str, bar) -> None:
    """One run of the reader on ``cell``'s setting, appended to its runs."""
    if cell["mode"] == "page_cache":
        disk_bench.warm(path)
    cell["real_runs"].append(disk_reader.replay_reads(
        path, misses, trace.meta.num_experts, expert_bytes, cell["host_ram_experts"], policy, cell["block_bytes"],
        cell["queue_depth"], direct=cell["mode"] == "direct", progress=lambda n: bar.update(n)))


def finish(cell: dict) -> dict:
    """The cell with its median reader run (the box is shared: one run can be slowed by anything)."""
    runs = cell.pop("real_runs")
    real = sorted(runs, key=lambda r: r["read_s"])[len(runs) // 2]
    ratios = sorted(sim / (r["read_s"] * 1e3) for sim, r in zip(cell["round_sim_disk_ms"], runs, strict=True))
    return cell | {"round_error_median": ratios[len(ratios) // 2] - 1 if ratios else None,"real_disk_reads": real["reads"], "real_host_hits": real["host_hits"],
                   "real_disk_ms": real["read_s"] * 1e3, "real_read_ms_p50": real["read_ms_p50"],
                   "real_read_ms_p90": real["read_ms_p90"], "method": real["method"],
                   "real_disk_ms_runs": [r["read_s"] * 1e3 for r in runs]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", required=True, help="disk calibration JSON (moesim calibrate --disk)")
    ap.add_argument("--measure", action="store_true",
                    help="first run `moesim calibrate --disk SCRATCH` (this machine, now) into --calibration")
    ap.add_argument("--calibrate-args", default="--disk-file-mb 1024 --disk-blocks-kb 256,1024 --disk-depths 1,4 "
                    "--disk-sizes-kb 1024,2048,4096 --repeats 60", help="with --measure: its settings")
    ap.add_argument("--scratch", required=True, help="directory for the expert file (removed afterwards)")
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--expert-kb", type=int, default=4096, help="expert size (scaled down; default 4096 KiB)")
    ap.add_argument("--tokens", type=int, default=60, help="first decode tokens of each trace (default 60)")
    ap.add_argument("--cache-size", type=int, default=4, help="GPU slots per layer (default 4)")
    ap.add_argument("--budgets", default="0.25,0.5,0.75", help="host RAM as fractions of all experts")
    ap.add_argument("--modes", default="direct", help="read modes (direct, page_cache; default direct)")
    ap.add_argument("--repeats", type=int, default=5, help="reader runs per cell, the median kept (default 5)")
    ap.add_argument("--block-kb", type=int, default=1024)
    ap.add_argument("--queue-depth", type=int, default=4)
    ap.add_argument("--policy", default="lru", help="GPU and host RAM policy (default lru)")
    ap.add_argument("--round-file-mb", type=int, default=512, help="scratch file of each round's micro-benchmark")
    ap.add_argument("--round-repeats", type=int, default=30, help="reads per size in each round's micro-benchmark")
    args = ap.parse_args(argv)
    if args.measure:   # the micro-benchmark alone calibrates; it runs just before the cells, on the same disk
        subprocess.run([sys.executable, "-m", "moesim", "calibrate", "--disk", args.scratch, "-o", args.calibration,
                        "--force", "--name", args.output.stem.replace("validate", "disk"),
                        *args.calibrate_args.split()], check=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    curve = DiskCurve.from_json(args.calibration)
    xb = args.expert_kb * 1024
    traces = [head(read_trace(ROOT / p), args.tokens) for p in TRACES]
    slots = max(t.meta.num_layers * t.meta.num_experts for t in traces)
    points = [curve.point(m, args.block_kb * 1024, args.queue_depth) for m in args.modes.split(",")]
    jobs = [(t, float(f), p) for t in traces for f in args.budgets.split(",") for p in points]
    path = os.path.join(args.scratch, f"moesim-nvme-experts.{os.getpid()}.bin")
    cal = read_json(args.calibration)
    cells, inputs, rounds = [], [], []
    for t, frac, point in jobs:
        host = max(t.meta.top_k, int(frac * t.meta.num_layers * t.meta.num_experts))
        cells.append(simulated(t, curve, point, args.cache_size, host, args.policy, xb))
        inputs.append((t, disk_reader.gpu_misses(t, args.policy, args.cache_size)))
    try:
        disk_reader.write_expert_file(path, slots, xb)
        with tqdm(total=args.repeats * sum(len(m) for _, m in inputs), desc="nvme cells", unit="set") as bar:
            for _ in range(args.repeats):   # round robin: a slow spell of the box falls on every cell alike
                # the micro-benchmark again, just before the round's reads (this box's disk drifts with the
                # other work on it): each round's cells are priced by it alone, never by their own reads
                rounds.append(disk_bench.measure(args.scratch, args.round_file_mb * 2**20, [args.block_kb * 1024],
                                                 [args.queue_depth], cal["disk"]["read_sizes"], args.round_repeats,
                                                 seed=len(rounds) + 1))
                for c, (t, misses), (_, _, point) in zip(cells, inputs, jobs, strict=True):
                    c["round_sim_disk_ms"].append(simulated(t, DiskCurve.from_dict({"disk": rounds[-1]}), point,
                                                            args.cache_size, c["host_ram_experts"], args.policy,
                                                            xb)["sim_disk_ms"])
                    read_once(c, t, misses, args.policy, xb, path, bar)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    cells = [finish(c) for c in cells]
    write_json(args.output, {
        "calibration": relative(args.calibration), "calibration_machine": cal["disk"].get("machine"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "expert_bytes": xb, "tokens": args.tokens,
        "policy": args.policy, "budgets": args.budgets, "repeats": args.repeats, "pyarrow": pa.__version__, "cells": cells,
        "round_calibrations": rounds})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
