"""ONE device run that chooses how the engines order their two streams (moesim.engine.sync), by micro-benchmark.

Every engine mode (``--modes``: ``plain`` = every wait issued, untimed events, the engine before
sync.py; ``elide`` = waits stream order implies left out; ``timing`` = timing-enabled cross-stream
events; ``lagN`` = the CPU at most N layers ahead of the gates) replays synthetic routings that no
validation cell uses (Mixtral geometry, hqq2 experts, random weights, residency proof on):

- batch 1 (``OffloadedEngine``): every request a miss (K = top-k), every request a hit (warm), uniform
  random top-2 at K = 4;
- batch 16 decode (``BatchEngine``): 16 sequences of uniform random top-2 routing, K = 3.

Per mode: ms per token / step (median of ``--repeats`` runs, interleaved), the waits each stream
issued, the device-side residency proof (violations must be 0 in every mode), and a CUPTI trace
(torch.profiler; nothing added to the streams) of the batch-1 all-miss replay, reduced to the stream
hops of :mod:`moesim.engine.cupti_gaps` -- the calibration's ``copy_hop_s`` / ``ready_hop_s`` for
that mode -- plus the raw GPU activities of the batch-16 replay for later analysis.

Writes ``$OUT/engine_sync.json`` (rewritten after every step) and ``$OUT/engine_sync_cupti.json.gz``.
``--cpu-check`` runs it on CPU with a tiny model (tests this script; the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from moesim.engine.batch import BatchEngine, BatchProgram, Lanes  # noqa: E402
from moesim.engine.cupti_gaps import engine_gaps, hop_terms  # noqa: E402
from moesim.engine.gpu_bench import compile_works, log  # noqa: E402
from moesim.engine.plan import Routing  # noqa: E402
from moesim.engine.quant import quant_spec  # noqa: E402
from moesim.engine.runtime import MIXTRAL_8X7B, Geometry, OffloadedEngine, Program, Weights  # noqa: E402
from moesim.engine.sync import COMPUTE, StreamOrder, SyncMode  # noqa: E402
from moesim.traces.format import DECODE, TraceMeta, TraceWriter, read_trace  # noqa: E402
from moesim.traces.steps import build_steps  # noqa: E402
from studies.miss_cost.gpu_miss_cost import all_hit_routing, all_miss_routing, cupti_trace, mixed_routing  # noqa: E402

T0 = time.perf_counter()


def write(out: Path, name: str, obj: Any) -> None:
    tmp = out / f".{name}.tmp"
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, out / name)


def batch_trace(g: Geometry, seqs: int, tokens: int, start: int, seed: int, path: Path):
    """``seqs`` decode sequences of ``tokens`` tokens from position ``start``, uniform random distinct top-k."""
    rng = np.random.default_rng(seed)
    n = seqs * tokens * g.num_layers
    ex = np.argsort(rng.random((n, g.num_experts)), axis=1)[:, : g.top_k]
    w = rng.uniform(0.2, 1.0, size=(n, g.top_k))
    meta = TraceMeta(model="uniform-random", family="mixtral", num_layers=g.num_layers, num_experts=g.num_experts,
                     top_k=g.top_k)
    s = np.repeat(np.arange(seqs), tokens * g.num_layers)
    t = np.tile(np.repeat(np.arange(start, start + tokens), g.num_layers), seqs)
    with TraceWriter(path, meta) as wr:
        wr.write(s, t, DECODE, np.tile(np.arange(g.num_layers), seqs * tokens), ex, w)
    return read_trace(path)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--modes", default="plain,elide,timing,elide+timing,elide+lag1,elide+timing+lag1")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--budget", type=float, default=300.0, help="stop starting new runs after this many s")
    ap.add_argument("--cpu-check", action="store_true", help="tiny model on CPU (tests this script)")
    args = ap.parse_args()
    if not args.cpu_check:
        from moesim.engine.cuda import exit_unless_cuda

        exit_unless_cuda("gpu_engine_sync.py")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    modes = [SyncMode.parse(m) for m in args.modes.split(",")]
    cpu = args.cpu_check
    dev = "cpu" if cpu else "cuda"
    g = Geometry.tiny(4) if cpu else MIXTRAL_8X7B
    res: dict[str, Any] = {"device": "cpu" if cpu else torch.cuda.get_device_name(0), "torch": torch.__version__,
                           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv),
                           "modes": [m.label for m in modes], "runs": [], "hops": {}}
    ok = not cpu and compile_works()
    log(f"pinning {g.num_layers} x {g.num_experts} hqq2 experts ...")
    weights = Weights(dataclasses.replace(g), quant_spec("hqq2"), dev, pin=not cpu)
    program = Program(weights, 4, max(args.tokens, 32), compile_kernels=ok, check_residency=True)
    with tempfile.TemporaryDirectory() as tmp:
        tr = batch_trace(g, args.batch, args.steps, 96, 2026, Path(tmp) / "uniform.parquet")
    steps = build_steps(tr, args.batch)
    b_routing = Routing.from_trace(tr)
    lanes = Lanes(weights, args.batch)
    bprog = BatchProgram(weights, args.batch, False, len(steps), lanes, compile_kernels=ok, check_residency=True)
    log(f"programs ready (graphs {program.graphs}); batch steps {len(steps)}")
    b1 = {"all_miss": (all_miss_routing(g, args.tokens), g.top_k, False),
          "all_hit": (all_hit_routing(g, args.tokens), g.top_k, True),
          "mixed": (mixed_routing(g, args.tokens), 4, False)}

    def run_b1(mode: SyncMode, name: str, instrument: bool = False):
        r, k, warm = b1[name]
        eng = OffloadedEngine(weights, k, "lru", "none", program=program, sync=mode)
        eng.run(r.head(3), warm=warm)
        x = eng.run(r, warm=warm, instrument=instrument)
        return x, eng

    def run_b16(mode: SyncMode, instrument: bool = False):
        eng = BatchEngine(bprog, 3, "lru", sync=mode)
        eng.run(steps, b_routing)
        x = eng.run(steps, b_routing, instrument=instrument)
        return x, eng

    stopped = False
    for rep in range(args.repeats):
        for mode in modes:
            if time.perf_counter() - T0 > args.budget:
                stopped = True
                break
            for name in b1:
                x, eng = run_b1(mode, name)
                res["runs"].append({"mode": mode.label, "shape": f"b1_{name}", "repeat": rep, "unit_ms": x.token_ms,
                                    "ms_median": float(np.median(x.token_ms)), "ms_mean": float(np.mean(x.token_ms)),
                                    "misses": x.misses, "waits": list(eng.order.waits),
                                    "violations": x.violations, "device_copies": x.device_copies,
                                    "issue_ms_median": float(np.median(x.token_issue_ms))})
            x, eng = run_b16(mode)
            res["runs"].append({"mode": mode.label, "shape": f"b{args.batch}_uniform", "repeat": rep,
                                "unit_ms": x.token_ms, "ms_median": float(np.median(x.token_ms)),
                                "ms_mean": float(np.mean(x.token_ms)), "misses": x.misses,
                                "waits": list(eng.order.waits), "violations": x.violations,
                                "device_copies": x.device_copies})
            log(f"{mode.label:20s} rep {rep}: " + ", ".join(
                f"{r['shape']} {r['ms_mean']:.2f} ms (waits {r['waits']}, viol {r['violations']})"
                for r in res["runs"] if r["mode"] == mode.label and r["repeat"] == rep))
            write(out, "engine_sync.json", res)
        if stopped:
            log("budget reached")
            break
    # the device proof still catches an engine whose compute skips every wait for a copy (all-miss: each
    # expert piece then reads a slot whose blob may not have landed)
    real_wait = StreamOrder.wait

    def skip_compute_waits(self, stream, mark):
        return False if stream == COMPUTE else real_wait(self, stream, mark)
    StreamOrder.wait = skip_compute_waits
    try:
        x, _ = run_b1(SyncMode(), "all_miss")
    finally:
        StreamOrder.wait = real_wait
    res["mutation_skip_compute_waits"] = {"violations": x.violations, "misses": x.misses}
    log(f"mutation (compute skips its copy waits): violations {x.violations} of {x.misses} misses")
    # the instrumented replays (CUDA timing events around every piece and copy), as references
    for name in ("all_miss", "mixed"):
        x, _ = run_b1(modes[0], name, instrument=True)
        res["runs"].append({"mode": "instrumented", "shape": f"b1_{name}", "repeat": 0, "unit_ms": x.token_ms,
                            "ms_median": float(np.median(x.token_ms)), "ms_mean": float(np.mean(x.token_ms)),
                            "misses": x.misses, "violations": x.violations})
    x, _ = run_b16(modes[0], instrument=True)
    res["runs"].append({"mode": "instrumented", "shape": f"b{args.batch}_uniform", "repeat": 0, "unit_ms": x.token_ms,
                        "ms_median": float(np.median(x.token_ms)), "ms_mean": float(np.mean(x.token_ms)),
                        "misses": x.misses, "violations": x.violations})
    write(out, "engine_sync.json", res)
    # CUPTI: the batch-1 all-miss replay's hops per mode; the batch replay's raw activities
    traces: dict[str, Any] = {}
    am = b1["all_miss"][0].head(4)
    for mode in modes:
        if time.perf_counter() - T0 > args.budget + 90:
            break
        eng = OffloadedEngine(weights, g.top_k, "lru", "none", program=program, sync=mode)
        try:
            tr_b1 = cupti_trace(lambda eng=eng: eng.run(am), out)
            traces[f"b1_all_miss/{mode.label}"] = tr_b1["gpu"]
            gaps = engine_gaps(tr_b1["gpu"], am, g.top_k)
            res["hops"][mode.label] = {"gaps": gaps, "terms": hop_terms(gaps)}
            log(f"cupti b1 {mode.label}: hops {res['hops'][mode.label]['terms']}")
        except Exception as exc:   # noqa: BLE001 - recorded; the timings above stand
            res["hops"][mode.label] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            log(f"cupti b1 {mode.label}: {res['hops'][mode.label]['error']}")
        beng = BatchEngine(bprog, 3, "lru", sync=mode)
        try:
            traces[f"b{args.batch}_uniform/{mode.label}"] = cupti_trace(lambda beng=beng: beng.run(steps, b_routing),
                                                                       out)["gpu"]
        except Exception as exc:   # noqa: BLE001
            log(f"cupti batch {mode.label}: {type(exc).__name__}: {exc}")
        write(out, "engine_sync.json", res)
    with gzip.open(out / "engine_sync_cupti.json.gz", "wt") as fh:
        json.dump(traces, fh)
    res["elapsed_s"] = time.perf_counter() - T0
    write(out, "engine_sync.json", res)
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
