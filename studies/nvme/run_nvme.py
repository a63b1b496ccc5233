"""Driver of the NVMe-tier study (CPU, any machine): the simulated disk tier against a real reader.

For each trace, host-RAM budget and read mode, the timing simulator's disk-tier time (``disk_busy_ms``
of ``simulate --json``) is compared with a stand-alone reader (:mod:`moesim.engine.disk_reader`) that
replays the same GPU misses through a real host-RAM pool and reads each missing expert from a real file
(page cache bypassed, or through a warm page cache). Two prices:

- "one calibration": ``moesim calibrate --disk`` run once beforehand (with ``--measure``);
- "sampled during the run": the disk of a shared box drifts by more than 10% within seconds, so during
  each run, after every ``--sample-every`` of the reader's reads, one micro-benchmark read (a host-RAM
  buffer drawn at random, resident or free, read again from the same file with the expert it holds,
  through the same reader) samples the disk and the host memory as they are then; that run is priced by
  the samples' mean alone, never by its own reads.

    python studies/nvme/run_nvme.py --measure --calibration studies/nvme/raw/disk_cal_cpu_box.json \\
        --scratch /tmp -o studies/nvme/raw/validate_cpu_box.json
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from tqdm import tqdm  # noqa: E402

from moesim.engine import disk_bench, disk_reader  # noqa: E402
from moesim.safe_write import read_json  # noqa: E402
from moesim.simulator.cost_model import CostModel  # noqa: E402
from moesim.simulator.disk_tier import DiskCurve, HostTierSpec  # noqa: E402
from moesim.simulator.timing import simulate_timing  # noqa: E402
from moesim.traces.format import DECODE, Trace, read_trace  # noqa: E402
from studies._common import relative, write_json  # noqa: E402

SEGMENTS = 8   # the samples of one run, kept as this many consecutive means (the disk over time)
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
            "sim_disk_ms": ht["disk_busy_ms"], "runs": []}


def read_once(cell: dict, trace: Trace, misses: list, policy: str, xb: int, path: str, sample_every: int,
              seed: int, bar) -> dict:
    """One run of the reader on ``cell``'s setting. After every ``sample_every`` of its reads, one
    micro-benchmark read (a host-RAM buffer read again with its expert: ``disk_reader.replay_reads``)
    samples the disk and the host memory as they are during this run; the run is priced by those samples'
    mean alone, never by its own reads."""
    if cell["mode"] == "page_cache":
        disk_bench.warm(path)
    with disk_bench.Reader(path, cell["block_bytes"], cell["queue_depth"], cell["mode"] == "direct") as reader:
        run = disk_reader.replay_reads(reader, misses, trace.meta.num_experts, xb, cell["host_ram_experts"], policy,
                                       sample_every=sample_every, seed=seed, progress=lambda n: bar.update(n))
    samples = run.pop("sample_s")
    point = disk_bench.point_summary(cell["block_bytes"], cell["queue_depth"], {xb: samples})
    curve = DiskCurve.from_dict({"disk": {cell["mode"]: [point], "default": {
        "mode": cell["mode"], "block_bytes": cell["block_bytes"], "queue_depth": cell["queue_depth"]}}})
    sim = simulated(trace, curve, (cell["mode"], cell["block_bytes"], cell["queue_depth"]), cell["gpu_cache_size"],
                    cell["host_ram_experts"], policy, xb)
    seg = max(1, -(-len(samples) // SEGMENTS))
    return run | {"sim_disk_ms": sim["sim_disk_ms"], "sim_disk_reads": sim["sim_disk_reads"],
                  "samples": len(samples)} | {f"sample_{k}": v for k, v in disk_reader.read_stats(samples).items()} | {
        "sample_ms_segments": [statistics.fmean(samples[i:i + seg]) * 1e3 for i in range(0, len(samples), seg)]}


def buffer_probe(path: str, xb: int, block: int, depth: int, slots: int, buffers: int = 32,
                 passes: int = 4) -> dict:
    """Why the reads are sampled into the reader's own buffers (O_DIRECT, random experts): the first read
    into each of ``buffers`` fresh buffers, then ``passes`` passes over them in shuffled order (does a
    buffer keep its speed from pass to pass?), then reads into one buffer over and over against reads
    into the buffers in turn, alternating (the old calibration read into one buffer)."""
    rng = random.Random(0)
    pool = [disk_bench.allocate(xb) for _ in range(buffers)]
    ms = np.zeros((passes, buffers))
    try:
        with disk_bench.Reader(path, block, depth, direct=True) as reader:
            def one(buf) -> float:
                return reader.read_region(rng.randrange(slots) * xb, xb, memoryview(buf)) * 1e3
            first = [one(b) for b in pool]
            for p in range(passes):
                for b in rng.sample(range(buffers), buffers):
                    ms[p, b] = one(pool[b])
            same, turn = [], []
            for _ in range(8):
                same += [one(pool[0]) for _ in range(16)]
                turn += [one(b) for b in pool[:16]]
    finally:
        for b in pool:
            b.close()
    half = passes // 2
    per_buffer = ms.mean(0)
    return {"buffers": buffers, "passes": passes, "first_read_ms_mean": statistics.fmean(first),
            "later_read_ms_mean": float(ms.mean()),
            "per_buffer_corr": float(np.corrcoef(ms[:half].mean(0), ms[half:].mean(0))[0, 1]),
            "per_buffer_ms_min": float(per_buffer.min()), "per_buffer_ms_max": float(per_buffer.max()),
            "per_buffer_ms_median": float(np.median(per_buffer)),
            "one_buffer_ms_mean": statistics.fmean(same), "in_turn_ms_mean": statistics.fmean(turn)}


def finish(cell: dict) -> dict:
    """The cell with its runs' summary: the median of the runs' simulated-over-real errors (one slow run
    of a shared box moves a median least)."""
    runs = cell["runs"]
    errors = [r["sim_disk_ms"] / (r["read_s"] * 1e3) - 1 for r in runs]
    return cell | {"run_errors": errors, "error_median": statistics.median(errors),
                   "real_disk_reads": runs[0]["reads"], "real_host_hits": runs[0]["host_hits"],
                   "method": runs[0]["method"], "real_disk_ms_median": statistics.median(r["read_s"] * 1e3 for r in runs),
                   "reads_equal_every_run": all(r["reads"] == cell["sim_disk_reads"] == r["sim_disk_reads"]
                                                for r in runs)}


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
    ap.add_argument("--modes", default="direct,page_cache", help="read modes (default direct,page_cache)")
    ap.add_argument("--repeats", type=int, default=5, help="reader runs per cell, round robin (default 5)")
    ap.add_argument("--block-kb", type=int, default=1024)
    ap.add_argument("--queue-depth", type=int, default=4)
    ap.add_argument("--policy", default="lru", help="GPU and host RAM policy (default lru)")
    ap.add_argument("--sample-every", type=int, default=2,
                    help="one micro-benchmark read after every N reader reads (default 2)")
    args = ap.parse_args(argv)
    if args.sample_every < 1 or args.repeats < 1:
        ap.error("--sample-every and --repeats must be >= 1")
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
    cells, inputs = [], []
    for t, frac, point in jobs:
        host = max(t.meta.top_k, int(frac * t.meta.num_layers * t.meta.num_experts))
        cells.append(simulated(t, curve, point, args.cache_size, host, args.policy, xb))
        inputs.append((t, disk_reader.gpu_misses(t, args.policy, args.cache_size)))
    try:
        disk_reader.write_expert_file(path, slots, xb)
        probe = buffer_probe(path, xb, args.block_kb * 1024, args.queue_depth, slots)
        with tqdm(total=args.repeats * sum(len(m) for _, m in inputs), desc="nvme cells", unit="set") as bar:
            for rnd in range(args.repeats):   # round robin: a slow spell of the box falls on every cell alike
                for i, (c, (t, misses)) in enumerate(zip(cells, inputs, strict=True)):
                    c["runs"].append(read_once(c, t, misses, args.policy, xb, path, args.sample_every,
                                               rnd * len(cells) + i, bar))
    finally:
        if os.path.exists(path):
            os.unlink(path)
    cells = [finish(c) for c in cells]
    write_json(args.output, {
        "format": 2, "sampling": "pool", "calibration": relative(args.calibration), "calibration_machine": cal["disk"].get("machine"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "expert_bytes": xb, "tokens": args.tokens,
        "policy": args.policy, "budgets": args.budgets, "repeats": args.repeats, "sample_every": args.sample_every,
        "pyarrow": pa.__version__, "buffer_probe": probe, "cells": cells})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
