"""Device validation of hybrid execution (issue 24 item 5): the real engine's ms/token against the timing
simulator's, cell by cell, for copy-only, n-cpu-moe at two N, Fiddler's rule, the dynamic split and
HOBBIT's substitute, at K = 2, 4, 6, batch 1 (and B > 1 with ``--batch 1,4``), on two shipped traces that
calibrated nothing.

One 32-layer full-geometry Mixtral engine with random weights (hqq2 experts, their hqq1-g64 substitutes,
their int8 CPU copies) is built once. The simulator's calibration comes from micro-benchmarks in the same
run (copy curve, the engine's captured pieces, an all-resident run, the engine terms, one CPU expert on
the worker's threads, the hidden state's hop through pinned buffers) -- never from the cells. Each cell
runs the engine once and the simulator (the one cell runner) on the same tokens; the engine's executor
counts must equal the simulator's. Batch 1 runs ``moesim.engine.hybrid.HybridEngine``; a batch-B cell runs
``moesim.engine.hybrid_batch.HybridBatchEngine`` on B sequences (segments of the trace) for ``--batch-steps``
decode steps, priced by the simulator at batch B (the step's union per layer) with the batch program's own
pieces (layer, expert and substitute at each token bucket, an all-resident run's overhead per expert call)
and the CPU expert measured at 1..B tokens -- again micro-benchmarks, never a cell.

    PYTHONPATH=. python studies/hybrid/run_validation.py --out /tmp/hv --batch 1,4   # on the GPU box
    PYTHONPATH=. python studies/hybrid/run_validation.py --out /tmp/hv --tiny        # CPU, tiny shapes

Writes ``validation_<gpu>.json`` (``validation_cpu-tiny.json`` with --tiny) and ``validation.log``;
``make_report.py`` turns a committed copy under raw/ into the report's validation section.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[2]
TRACES = ("synth-mixtral-8x7b.parquet", "learned-mixtral-32l.parquet")
CACHE_SIZES = (2, 4, 6)
LOG: list[str] = []
START = time.perf_counter()


def log(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    LOG.append(line)
    print(line, flush=True)


def executions(layers: int) -> list[str]:
    """The cells' execution policies; n-cpu-moe at an eighth and a quarter of the layers."""
    return ["copy", f"n-cpu-moe={max(layers // 8, 1)}", f"n-cpu-moe={max(layers // 4, 2)}", "fiddler", "hybrid",
            "hobbit"]


def decode_trace(path: Path, tokens: int, layers: int, expert_bytes: int, quant: str, batch: int = 1):
    """The first ``tokens`` decode tokens of a shipped trace (its first ``layers`` layers), priced as
    the engine's experts; at ``batch`` > 1 cut into ``batch`` sequences of ``tokens // batch`` tokens
    (:func:`moesim.engine.validation.cell_trace`)."""
    from moesim.engine.validation import cell_trace
    from moesim.traces.format import Trace, read_trace

    trace = cell_trace(read_trace(path), batch=batch, tokens=tokens, expert_bytes=expert_bytes, quantization=quant)
    if layers < trace.meta.num_layers:
        keep = pa.array(np.asarray(trace.layer) < layers)
        trace = Trace(dataclasses.replace(trace.meta, num_layers=layers), trace.table.filter(keep), trace.path)
    return trace


def timer(device: str):
    from moesim.engine.gpu_bench import device_seconds

    return lambda fn, reps=20: device_seconds(fn, device, reps=reps)


def h2d_curve(device: str, sizes: list[int]) -> list[dict]:
    """Pinned host -> device copies of each size (ms)."""
    import torch

    seconds = timer(device)
    out = []
    for n in sizes:
        src = torch.empty(n, dtype=torch.uint8, pin_memory=device != "cpu")
        dst = torch.empty(n, dtype=torch.uint8, device=device)
        # the best of three means: the fit takes the slope, which a burst of other work would bend
        ms = min(seconds(lambda src=src, dst=dst: dst.copy_(src, non_blocking=True)) for _ in range(3)) * 1e3
        out.append({"bytes": n, "ms": ms})
        log(f"h2d {n:>10d} B {ms:.4f} ms")
    return out


def pieces(program, seconds) -> dict:
    """GPU time of the engine's captured pieces (a full expert, a substitute expert, a layer, first, final)."""
    import torch

    with torch.inference_mode():
        out = {"first_ms": seconds(program.first) * 1e3, "layer_ms": seconds(program.layer[1]) * 1e3,
               "expert_ms": seconds(program.expert[1][0][0]) * 1e3,
               "lowbit_expert_ms": seconds(program.lowbit_expert[1][0][0]) * 1e3,
               "final_ms": seconds(program.final) * 1e3, "graphs": program.graphs}
    program.reset_proof()
    log(f"pieces {out}")
    return out


def cpu_expert_calls(cpu, worker_threads: int, calls: int, x):
    """A function timing ``calls`` int8 CPU experts one by one on the worker's thread count, cycling
    through distinct experts so each is read cold from host memory, as in a run (seconds per call)."""
    import torch

    keys = list(cpu.copies)

    def run() -> list[float]:
        torch.set_num_threads(worker_threads)
        times = []
        with torch.inference_mode():
            for i in range(calls):
                t0 = time.perf_counter()
                cpu.forward(*keys[i % len(keys)], x)
                times.append(time.perf_counter() - t0)
        return times
    return run


def blob_copy(weights):
    """One whole expert blob host -> device (pinned on a GPU), waited for."""
    import torch

    from moesim.engine.cpu_bench import copy_once_fn

    src = weights.host[0][0]
    return copy_once_fn(src, torch.empty_like(src, device=weights.d.dev))


def one_cpu_expert(cpu, x):
    """One int8 CPU expert per call, cycling through distinct experts (each read cold, as in a run)."""
    keys = itertools.cycle(list(cpu.copies))
    return lambda: cpu.forward(*next(keys), x)


def cpu_terms(weights, cpu, worker_threads: int, seconds) -> dict:
    """One int8 CPU expert on the worker's thread count, alone and beside running copies of whole expert
    blobs, and those copies alone, in alternating rounds (:func:`moesim.engine.cpu_bench.alone_and_beside`);
    the expert back to back and after idle gaps (:func:`moesim.engine.cpu_bench.after_idle`); and the hidden
    state's hop each way through a pinned buffer (round trip / 2)."""
    import torch

    from moesim.engine import cpu_bench

    g, d = weights.geometry, weights.d
    x = torch.randn(1, g.hidden, dtype=torch.bfloat16)
    calls = max(2 * len(cpu.copies), 24) if len(cpu.copies) < 64 else len(cpu.copies)
    cpu_bench.on_a_worker_thread(cpu_expert_calls(cpu, worker_threads, 4, x))   # the thread pool and first pages
    m = cpu_bench.alone_and_beside(cpu_expert_calls(cpu, worker_threads, calls, x), blob_copy(weights))
    alone, beside, copy_beside = m["alone_s"], m["beside_copies_s"], m["copies_beside_cpu_s"]
    expert_s, beside_s = statistics.median(alone), statistics.median(beside)
    idle = cpu_bench.after_idle(one_cpu_expert(cpu, x), worker_threads, calls=16 if d.cuda else 4)
    curve = cpu_bench.after_idle_curve(idle)
    xd = torch.randn(1, g.hidden, dtype=torch.bfloat16, device=d.dev)
    host = torch.empty(1, g.hidden, dtype=torch.bfloat16, pin_memory=d.cuda)

    def round_trip() -> None:
        host.copy_(xd, non_blocking=True)
        ev = d.event(timing=False)
        ev.record()
        ev.synchronize()
        xd.copy_(host, non_blocking=True)
        d.synchronize()
    hop_s = timer(str(d.dev))(round_trip, reps=200) / 2
    log(f"CPU expert (int8, {worker_threads} threads) {expert_s * 1e3:.3f} ms alone, {beside_s * 1e3:.3f} ms beside "
        f"copies (x{beside_s / expert_s:.2f}); copies {statistics.median(m['copies_alone_s']) * 1e3:.3f} ms alone, "
        f"{statistics.median(copy_beside) * 1e3:.3f} beside CPU experts (x{cpu_bench.copies_factor(m):.2f}) per "
        f"{weights.blob_bytes} B; after idle " + ", ".join(f"{a * 1e3:.2f} ms +{b * 1e3:.3f}" for a, b in curve)
        + f" ms; hop {hop_s * 1e6:.1f} us")
    return {"threads": worker_threads, "format": "int8", "hidden_bytes": g.hidden * 2, "hop_s": hop_s,
            "expert_s": {"int8": [[1, expert_s]]}, "thread_curve": [], "beside_copies": cpu_bench.beside_factor(m),
            "copies_beside_cpu": cpu_bench.copies_factor(m), "after_idle": curve,
            "measured": {**m, "after_idle": idle},
            "sources": {"expert_s": f"the engine's int8 CPU experts, {len(alone)} calls in 2 rounds cycling over "
                                    f"{len(cpu.copies)} experts on a {worker_threads}-thread worker, median",
                        "beside_copies": "the same calls while the main thread ran pinned host-to-device copies of "
                                         "whole expert blobs back to back (alternating rounds with the alone "
                                         "calls): median beside / median alone",
                        "copies_beside_cpu": "those copies: median while the CPU experts ran / median of as many "
                                             "alone, in the same alternating rounds",
                        "after_idle": "the same experts on a fresh worker thread of as many threads, one by one, "
                                      "back to back and after each idle gap (time.sleep; alternating rounds): "
                                      "median after the gap - median back to back",
                        "hop": "the hidden state through a pinned buffer, device->host->device, / 2"}}


POLICY_PROBE = ("import json, sys; from moesim.engine import cpu_bench as b; "
                "m = b.measure_after_idle('int8', (int(sys.argv[1]), int(sys.argv[2])), int(sys.argv[3]), "
                "calls=int(sys.argv[4])); print(json.dumps({'after_idle': b.after_idle_curve(m), "
                "'back_to_back_ms': 1e3 * __import__('statistics').median(m['back_to_back_s'])}))")


def wait_policies(threads: int, geometry: tuple[int, int], calls: int = 16) -> dict:
    """Would a CPU pool that never sleeps remove the wake-up? One int8 expert's after-idle curve in two
    fresh processes: OpenMP's default wait policy, and ``OMP_WAIT_POLICY=ACTIVE`` (its threads spin
    between parallel regions; it is read when the runtime starts, so only a new process can try it)."""
    out = {}
    for name, policy in (("default", None), ("active", "ACTIVE")):
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        if policy:
            env["OMP_WAIT_POLICY"] = policy
        p = subprocess.run([sys.executable, "-c", POLICY_PROBE, *map(str, (*geometry, threads, calls))], env=env,
                           capture_output=True, text=True, timeout=45, cwd=ROOT)
        if p.returncode:
            raise RuntimeError(f"the {name} wait-policy probe failed: {p.stderr.strip().splitlines()[-1:]}")
        out[name] = json.loads(p.stdout.strip().splitlines()[-1])
        log(f"wait policy {name}: back to back {out[name]['back_to_back_ms']:.3f} ms; after idle "
            + ", ".join(f"{g * 1e3:.2f} ms +{x * 1e3:.3f}" for g, x in out[name]["after_idle"]))
    return out


def calibrate(weights, program, routing, cpu, lowbit, worker_threads: int, out: dict) -> object:
    """The simulator's cost model from this run's micro-benchmarks (none of the cells)."""
    from moesim.engine.calibration import to_cost_model
    from moesim.engine.gpu_bench import all_resident, engine_terms
    from moesim.simulator.cost_model import CostModel

    dev = str(weights.d.dev)
    seconds = timer(dev)
    big = weights.blob_bytes
    sizes = sorted({weights.geometry.hidden * 2, 1 << 16, 1 << 20, 4 << 20, 16 << 20, lowbit.nbytes, big} - {0})
    raw: dict = {"h2d": h2d_curve(dev, [s for s in sizes if s <= max(big, 16 << 20)])}
    graph = pieces(program, seconds)
    raw["graph"] = graph
    main = weights.quant.name
    raw["expert"] = {main: {"expert_bytes": weights.expert_bytes, "curve": [{"tokens": 1, "ms": graph["expert_ms"]}]},
                     lowbit.spec.name: {"expert_bytes": lowbit.nbytes,
                                        "curve": [{"tokens": 1, "ms": graph["lowbit_expert_ms"]}]}}
    raw["attention"] = [{"context": weights.geometry.max_context, "ms": graph["layer_ms"]}]
    raw["lm_head_ms"] = graph["final_ms"]
    raw["engine_quantization"] = main
    raw["all_resident"] = all_resident(weights, program, routing, tokens=min(16, routing.num_tokens))
    raw.update(engine_terms(dev, big, layers=weights.geometry.num_layers,
                            copies=40 if weights.d.cuda else 4))
    cal = to_cost_model(raw, name="hybrid-validation", description="issue 24 validation: this run's micro-benchmarks")
    cal["cpu"] = cpu_terms(weights, cpu, worker_threads, seconds)
    out["calibration"], out["calibration_raw"] = cal, raw
    cost = CostModel.from_dict(cal)
    return cost.with_overrides(lowbit_format=lowbit.spec.name)


def cpu_token_curve(cpu, worker_threads: int, rows: int, calls: int) -> list[list[float]]:
    """One int8 CPU expert at 1..``rows`` tokens on a fresh worker thread of the worker's thread count, the
    token counts taking turns call by call (cycling through distinct experts): [tokens, median seconds]."""
    import torch

    from moesim.engine import cpu_bench

    keys = list(cpu.copies)
    hidden = int(cpu.copies[keys[0]][0][0].shape[1])
    xs = {n: torch.randn(n, hidden, dtype=torch.bfloat16) for n in range(1, rows + 1)}

    def run() -> dict[int, list[float]]:
        torch.set_num_threads(worker_threads)
        times: dict[int, list[float]] = {n: [] for n in xs}
        with torch.inference_mode():
            for i in range(calls + 1):   # the first round warms the thread pool and the pages up, untimed
                for n, x in xs.items():
                    key = keys[(i * rows + n) % len(keys)]
                    t0 = time.perf_counter()
                    cpu.forward(*key, x)
                    if i:
                        times[n].append(time.perf_counter() - t0)
        return times
    return [[n, statistics.median(t)] for n, t in cpu_bench.on_a_worker_thread(run).items()]


def batch_calibration(weights, bprog, steps, routing, cpu, threads: int, cost, out: dict):
    """The simulator's cost model for batch-B cells: this run's batch-1 calibration with the batch program's
    layer, token and expert terms (:func:`moesim.engine.calibration.batch_programs` of its pieces and an
    all-resident run), its substitute's pieces at each token bucket plus the same overhead per expert call,
    and the CPU expert at 1..B tokens (``expert_s``: the batch-1 block's one-token time times each count's
    median over the one-token median of the same rounds)."""
    import torch

    from moesim.engine.calibration import batch_cost, batch_programs
    from moesim.engine.gpu_bench import batch_pieces, cuda_ms

    B, key = bprog.rows, f"decode{bprog.rows}"
    pieces = batch_pieces(bprog, steps, routing, not weights.d.cuda)
    if weights.d.cuda:
        with torch.inference_mode():
            pieces["lowbit_expert_ms"] = {str(nb): cuda_ms(bprog.lowbit_expert[1][0][nb], reps=32)
                                          for nb in bprog.token_buckets}
        bprog.reset_proof()
    terms = batch_programs({"batch_pieces": {key: pieces}, "all_resident": {"layers": weights.geometry.num_layers}})
    terms = terms.get(key)   # None on the CPU (no GPU times): the batch-1 terms stand
    bcost = copy.deepcopy(batch_cost(cost, terms))   # the batch-1 cells keep theirs
    if terms and "lowbit_expert_ms" in pieces:
        over = terms["engine_overhead_per_expert_s"]
        bcost.expert_compute = {**bcost.expert_compute, bcost.lowbit(): [
            [int(n), ms * 1e-3 + over] for n, ms in sorted(pieces["lowbit_expert_ms"].items(), key=lambda p: int(p[0]))]}
    curve = cpu_token_curve(cpu, threads, B, calls=16 if weights.d.cuda else 2)
    fmt = cost.cpu["format"]
    one = cost.cpu["expert_s"][fmt][0][1]
    bcost.cpu = {**cost.cpu, "expert_s": {**cost.cpu["expert_s"], fmt: [[n, one * t / curve[0][1]] for n, t in curve]}}
    out.setdefault("batch_calibration", {})[str(B)] = {"pieces": pieces, "terms": terms, "cpu_token_curve": curve,
                                                        "cpu_expert_s": bcost.cpu["expert_s"][fmt]}
    log(f"batch {B} calibration: CPU expert by tokens " + ", ".join(f"{n}: {t * 1e3:.3f} ms" for n, t in curve)
        + (f"; batch terms {terms['source']}" if terms else "; no GPU times (CPU run)"))
    return bcost


def run_cell(weights, program, cpu, routing, trace, cost, k: int, execution: str, threads: int,
             steps: list | None = None) -> dict:
    """One cell: the simulator (its choices recorded for a pricing policy), then the engine; with ``steps``
    (a batch-B program's decode steps) the batch engine, the simulator at that batch size."""
    from moesim.engine.hybrid import HybridEngine, priced_schedule
    from moesim.engine.hybrid_batch import HybridBatchEngine
    from moesim.policies.execution import parse_execution

    exe = parse_execution(execution)
    batch = program.rows if steps is not None else 1
    schedule, sim = priced_schedule(trace, "lru", k, cost, exe, batch_size=batch)
    choice = schedule if exe.prices else exe
    if steps is None:
        res = HybridEngine(weights, k, "lru", choice, program=program, cpu_experts=cpu, cpu_threads=threads).run(
            routing).to_dict()
    else:
        res = HybridBatchEngine(program, k, "lru", choice, cpu_experts=cpu, cpu_threads=threads).run(
            steps, routing).to_dict()
    simd = sim.to_json()
    real_ms, sim_ms = res["ms_per_token"], simd["ms_per_token"]
    row = {"batch": batch, "cache_size": k, "execution": execution, "real_ms_per_token": real_ms,
           "sim_ms_per_token": sim_ms,
           "error": (sim_ms - real_ms) / real_ms, "executed_real": res["executed"], "executed_sim": simd["executed"],
           "executed_equal": res["executed"] == simd["executed"], "violations": res["violations"],
           "device_copies": res["device_copies"], "once_violations": res["once_violations"],
           "cpu_violations": res["cpu_violations"], "token_ms": res["token_ms"], "tokens": res["tokens"],
           # the CPU experts as the run timed them, beside the simulator's CPU stream (why a cell is off)
           "cpu_timing": res.get("cpu_timing"), "sim_cpu_busy_ms": simd.get("cpu_busy_ms")}
    if "executor_violations" in res:   # the batch engine's executor check
        row["executor_violations"] = res["executor_violations"]
    log(f"B={batch} K={k} {execution:>12}: real {real_ms:8.3f} sim {sim_ms:8.3f} ms/token ({row['error'] * 100:+.1f}%) "
        f"executed {'==' if row['executed_equal'] else '!='} {res['executed']} proof {res['violations']}/"
        f"{res['once_violations']}/{res['cpu_violations']}")
    return row


def build(args, out: dict):
    """Weights, substitutes, CPU copies and the program, once for every cell."""
    from moesim.engine.hybrid import CpuExperts, HybridProgram, LowbitCopies
    from moesim.engine.quant import quant_spec
    from moesim.engine.runtime import MIXTRAL_8X7B, Geometry, Weights

    g = Geometry.tiny(4) if args.tiny else MIXTRAL_8X7B
    t0 = time.perf_counter()
    w = Weights(g, quant_spec(args.quant), args.device, pin=True, progress=not args.tiny)
    lowbit = LowbitCopies(w, progress=not args.tiny)
    cpu = CpuExperts.of(w, [(layer, e) for layer in range(g.num_layers) for e in range(g.num_experts)],
                     progress=not args.tiny)
    log(f"weights, substitutes and CPU copies in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    program = HybridProgram(w, g.num_experts, args.tokens, lowbit=lowbit, progress=not args.tiny)
    out["engine"] = {"geometry": dataclasses.asdict(g), "quantization": args.quant, "lowbit": lowbit.spec.name,
                     "cpu_format": "int8", "graphs": program.graphs, "fused": program.fused,
                     "build_s": time.perf_counter() - t0, "expert_blob_bytes": w.blob_bytes,
                     "lowbit_bytes": lowbit.nbytes}
    log(f"program captured in {out['engine']['build_s']:.1f} s")
    return w, program, cpu, lowbit


def batch_programs_for(args, w, program, lowbit) -> dict:
    """A batch-B program per ``--batch`` size above 1, sharing the batch-1 program's expert slots."""
    from moesim.engine.batch import Lanes
    from moesim.engine.hybrid_batch import HybridBatchProgram

    return {b: HybridBatchProgram(w, b, False, args.batch_steps, Lanes(w, b), slots=program.slots, lowbit=lowbit)
            for b in args.batches if b > 1}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for the JSON and the log")
    ap.add_argument("--tiny", action="store_true", help="4-layer tiny geometry on the CPU (tests the code paths)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per cell (default 20; 6 with --tiny)")
    ap.add_argument("--cpu-threads", type=int, default=None, help="the CPU worker's threads (default: cores - 2)")
    ap.add_argument("--quant", default="hqq4", help="the experts' format (default hqq4: its substitute hqq2-g64 "
                    "runs on the fused kernels too)")
    ap.add_argument("--budget-s", type=float, default=320.0,
                    help="start no cell after this many seconds of the run (default 320)")
    ap.add_argument("--commit", default="", help="the commit measured (recorded)")
    ap.add_argument("--batch", default="1", help="decode batch sizes of the cells, e.g. 1,4 (default 1; B > 1: "
                    "B sequences per step, moesim.engine.hybrid_batch)")
    ap.add_argument("--batch-steps", type=int, default=None, help="decode steps per batch-B cell (B x this "
                    "tokens; default 8, 2 with --tiny)")
    args = ap.parse_args(argv)
    LOG.clear()   # one run's log (tests call main more than once)
    try:
        args.batches = sorted({int(b) for b in args.batch.split(",")})
    except ValueError:
        ap.error(f"--batch takes batch sizes like 1,4, got {args.batch!r}")
    if not args.batches or args.batches[0] < 1:
        ap.error(f"--batch sizes must be >= 1, got {args.batch!r}")
    args.batch_steps = args.batch_steps or (2 if args.tiny else 8)
    if args.batch_steps < 1:
        ap.error("--batch-steps must be >= 1")
    import torch

    args.device = "cpu" if args.tiny else "cuda"
    if not args.tiny and not torch.cuda.is_available():
        print("run_validation.py: no CUDA device here (use --tiny for the CPU code path)", file=sys.stderr)
        return 2
    args.tokens = args.tokens or (6 if args.tiny else 20)
    # two cores left to the main thread (it issues the GPU work and spins on its events); at most 16,
    # the physical cores of the H100 box (more would be hyper-threads)
    threads = args.cpu_threads or max(1, min(16, (os.cpu_count() or 2) - 2))
    args.out.mkdir(parents=True, exist_ok=True)
    name = "cpu-tiny" if args.tiny else ("h200" if "H200" in torch.cuda.get_device_name(0) else
                                         "h100" if "H100" in torch.cuda.get_device_name(0) else "gpu")
    path = args.out / f"validation_{name}.json"
    out: dict = {"device": "cpu (tiny)" if args.tiny else torch.cuda.get_device_name(0), "commit": args.commit,
                 "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__,
                 "tokens_per_cell": args.tokens, "cpu_threads": threads, "host_cpus": os.cpu_count(),
                 "policy": "lru", "batch": args.batches[0] if len(args.batches) == 1 else args.batches,
                 "batch_steps": args.batch_steps, "cells": [],
                 # the thread pools' wait policy (set before the run to try a pool that never sleeps)
                 "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}}

    def save() -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, path)
        (args.out / "validation.log").write_text("\n".join(LOG) + "\n")
    try:
        run_all(args, out, threads, save)
    except Exception:   # noqa: BLE001 - a device run must bring back what it measured
        out["error"] = traceback.format_exc()
        log(f"FAILED:\n{out['error']}")
    save()
    log(f"wrote {path}")
    return 1 if "error" in out else 0


def dropped(out: dict, batch: int, where: str) -> None:
    """A batch-B failure (the exception being handled): its traceback kept and logged; that batch's remaining
    cells are not run."""
    out.setdefault("batch_errors", {})[str(batch)] = traceback.format_exc()
    log(f"batch {batch} dropped {where}:\n{out['batch_errors'][str(batch)]}")


def run_all(args, out: dict, threads: int, save) -> None:
    from moesim.engine.plan import Routing
    from moesim.traces.steps import build_steps

    w, program, cpu, lowbit = build(args, out)
    g = w.geometry
    traces = {name: decode_trace(ROOT / "traces" / name, args.tokens, g.num_layers, w.expert_bytes, args.quant)
              for name in TRACES}
    first = Routing.from_trace(next(iter(traces.values())), args.tokens)
    program.load_routing(first)
    cost = calibrate(w, program, first, cpu, lowbit, threads, out)
    save()
    cells = {1: (program, cost, {name: (trace, Routing.from_trace(trace, args.tokens), None)
                                 for name, trace in traces.items()})} if 1 in args.batches else {}
    for b, bprog in batch_programs_for(args, w, program, lowbit).items():
        btraces = {name: decode_trace(ROOT / "traces" / name, b * args.batch_steps, g.num_layers, w.expert_bytes,
                                      args.quant, batch=b) for name in TRACES}
        inputs = {name: (tr, Routing.from_trace(tr), build_steps(tr, b)) for name, tr in btraces.items()}
        _, r0, s0 = inputs[TRACES[0]]
        try:   # the batch engine's first device run: its failure must not cost the batch-1 cells
            cells[b] = (bprog, batch_calibration(w, bprog, s0, r0, cpu, threads, cost, out), inputs)
        except Exception:   # noqa: BLE001
            dropped(out, b, "in its calibration")
        save()
    t0 = time.perf_counter()
    for b, (prog, bcost, inputs) in list(cells.items()):   # warm-up: every executor's first calls, pools, allocator
        tr, r, st = inputs[TRACES[0]]
        for execution in ("n-cpu-moe=2", "hobbit"):
            try:
                run_cell(w, prog, cpu, r, tr, bcost, 2, execution, threads, st)
            except Exception:   # noqa: BLE001 - as below
                if b == 1:
                    raise
                dropped(out, b, "in its warm-up")
                del cells[b]
                break
    for k in CACHE_SIZES:   # K outermost: a run cut by the budget still has both traces and every batch
        for b, (prog, bcost, inputs) in cells.items():
            for name, (trace, routing, steps) in inputs.items():
                for execution in executions(g.num_layers):
                    if time.perf_counter() - START > args.budget_s:
                        out.setdefault("skipped", []).append([name, k, execution, b])
                        log(f"skipped {name} B={b} K={k} {execution}: past the {args.budget_s:.0f} s budget")
                        continue
                    if str(b) in out.get("batch_errors", {}):
                        continue
                    try:
                        row = run_cell(w, prog, cpu, routing, trace, bcost, k, execution, threads, steps)
                    except Exception:   # noqa: BLE001 - a batch-B failure drops that batch, not the run
                        if b == 1:
                            raise
                        dropped(out, b, f"at {name} K={k} {execution}")
                        continue
                    out["cells"].append({"trace": name, **row})
                    save()
    out["cells_s"] = time.perf_counter() - t0
    errs = [abs(c["error"]) for c in out["cells"]] or [float("nan")]
    log(f"{len(out['cells'])} cells in {out['cells_s']:.1f} s: |error| median {statistics.median(errs) * 100:.1f}% "
        f"max {max(errs) * 100:.1f}%; executed equal in {sum(c['executed_equal'] for c in out['cells'])}")
    save()
    if time.perf_counter() - START > args.budget_s:   # an experiment, after the cells: only with time left
        log("skipped the wait-policy probe: past the budget")
        return
    g = w.geometry
    try:   # an experiment: its failure must not fail the run's cells
        out["wait_policy"] = wait_policies(threads, (g.hidden, g.ffn), calls=4 if args.tiny else 16)
    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
        out["wait_policy_error"] = str(exc)
        log(f"the wait-policy probe failed: {exc}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
