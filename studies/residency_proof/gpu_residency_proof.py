"""ONE device run: the replay engine's residency proof under stress, a skip-the-wait mutation, and the
check's cost (issue 14, item 4).

    PYTHONUNBUFFERED=1 python3 studies/residency_proof/gpu_residency_proof.py --trace real.parquet \
        --trace synth.parquet --trace traces/learned-mixtral-32l.parquet --out $OUT

Every expert blob carries its (layer, expert) identity (moesim/engine/runtime.py); each expert piece
checks it on the GPU against the trace's expert and counts mismatches, and the copy stream counts the
copies whose identity landed. Per stress cell (K = top-k and up, prefetch storms with a big budget, long
replays) this writes the device's ``violations`` and ``device_copies`` beside the plan's copies; then
one cell with the compute stream's wait on each copy skipped (the mutation must be caught: violations
> 0); then the check's cost: one token's 64 checks captured as a graph, and the copy counter's issue
time. Results: ``residency_proof.json`` under --out, rewritten after every cell. ``--cpu-check`` runs it
all on CPU with a tiny model (tests this script; the numbers mean nothing, and the mutation cannot race
on CPU, so it is skipped there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from moesim.engine.plan import Routing  # noqa: E402
from moesim.engine.quant import quant_spec  # noqa: E402
from moesim.engine.runtime import MIXTRAL_8X7B, Geometry, OffloadedEngine, Program, Weights  # noqa: E402
from moesim.engine.validation import head_tokens  # noqa: E402
from moesim.traces.format import read_trace  # noqa: E402

T0 = time.perf_counter()

# (policy, K, prefetcher, prefetch params): K = top-k (every slot turns over), prefetch storms (budget 8 =
# every expert of the next layer(s)), distance 2, and a roomy cache; "speculative" only where recorded
CELLS = [
    ("lru", 2, "none", None),
    ("lru", 2, "oracle", {"budget": 8}),
    ("lfu", 2, "transition", {"budget": 8}),
    ("fifo", 3, "oracle", {"budget": 8, "distance": 2}),
    ("opt", 4, "transition", {"budget": 8, "distance": 2}),
    ("lru", 2, "speculative", {"budget": 8}),
]


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def write(out: Path, obj) -> None:
    tmp = out / ".residency_proof.json.tmp"
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, out / "residency_proof.json")


def check_cost(program: Program, cuda: bool, pieces: int) -> dict:
    """GPU time of ``pieces`` residency checks (one token's worth) captured as one graph, and the CPU
    time to issue one copy counter on the copy stream."""
    layer, slot = 0, 0
    program.tok.fill_(0)   # after capture it is -1 (the first piece advances it); a valid row here

    def checks() -> None:
        for j in range(pieces):
            want = program.expect[layer, j % 2].index_select(0, program.tok.view(1))
            program.violations.add_(program.slot_tags[layer][slot:slot + 1].ne(want).sum())
    out: dict = {"pieces": pieces}
    if cuda:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            checks()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            checks()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ms = []
        for _ in range(20):
            a.record()
            graph.replay()
            b.record()
            b.synchronize()
            ms.append(a.elapsed_time(b))
        out["gpu_ms_per_token_median"] = float(np.median(ms[2:]))
    n = 200
    t = time.perf_counter()
    for _ in range(n):
        program.count_copy(layer, slot, 0)
    if cuda:
        torch.cuda.synchronize()
    out["count_copy_issue_us"] = (time.perf_counter() - t) / n * 1e6
    program.reset_proof()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", action="append", required=True, help="replay trace (repeatable)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--budget", type=float, default=200.0, help="stop starting cells after this many s")
    ap.add_argument("--ab-slack", type=float, default=40.0,
                    help="run the with/without-check A/B only if at most budget + this many s have passed")
    ap.add_argument("--cells", type=int, default=len(CELLS), help="only the first N cell kinds")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--cpu-check", action="store_true", help="tiny model on CPU: tests this script")
    args = ap.parse_args()
    if not args.cpu_check:
        from moesim.engine.cuda import exit_unless_cuda

        exit_unless_cuda("gpu_residency_proof.py")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = not args.cpu_check
    geometry = Geometry.tiny(4) if args.cpu_check else MIXTRAL_8X7B
    tokens = min(args.tokens, 8) if args.cpu_check else args.tokens

    def load(path: str) -> Routing:
        r = Routing.from_trace(head_tokens(read_trace(path), tokens), tokens)
        return r.first_layers(geometry.num_layers) if r.num_layers != geometry.num_layers else r

    routings = {Path(p).name: load(p) for p in args.trace}
    result: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "layers": geometry.num_layers,
                    "quantization": "hqq2", "tokens": tokens, "cells": [], "mutation": None, "check_cost": None}
    compile_ok = False
    if cuda and not args.no_compile:
        from moesim.engine.gpu_bench import compile_works
        compile_ok = compile_works()
    result["compile_dequant"] = compile_ok
    log(f"pinning {geometry.num_layers} x 8 hqq2 experts ...")
    weights = Weights(geometry, quant_spec("hqq2"), "cuda" if cuda else "cpu", pin=cuda)
    result["expert_bytes"], result["blob_bytes"] = weights.expert_bytes, weights.blob_bytes
    program = Program(weights, 8, tokens, compile_kernels=compile_ok, progress=cuda)
    log(f"program ready (graphs {program.graphs}, compiled {compile_ok})")
    result["check_cost"] = check_cost(program, cuda, 2 * geometry.num_layers)
    log(f"check cost {result['check_cost']}")
    write(out, result)
    first = next(iter(routings.values()))   # warm-up (compiled kernels, allocator) outside the cells
    OffloadedEngine(weights, 2, "lru", "none", program=program).run(first.head(4))
    if cuda:   # the mutation: the compute stream no longer waits for any copy
        name, r = next(iter(routings.items()))
        eng = OffloadedEngine(weights, 2, "lru", "none", program=program)
        real_wait = weights.d.wait
        ready = {id(e) for row in eng.ready for e in row}

        def skip(event, stream=None):
            if stream is None and id(event) in ready:
                return
            real_wait(event, stream)
        weights.d.wait = skip
        try:
            bad = eng.run(r.head(min(64, r.num_tokens)))
        finally:
            weights.d.wait = real_wait
        good = eng.run(r.head(min(64, r.num_tokens)))
        result["mutation"] = {"what": "compute skips its wait on every copy's ready event", "trace": name,
                              "policy": "lru", "cache_size": 2, "tokens": bad.tokens, "misses": bad.misses,
                              "violations": bad.violations, "device_copies": bad.device_copies,
                              "caught": bool(bad.violations), "control_violations": good.violations,
                              "control_device_copies": good.device_copies, "control_plan_copies": good.misses}
        log(f"mutation: {result['mutation']}")
        write(out, result)
    for pol, k, pf, params in CELLS[:args.cells]:
        for name, r in routings.items():
            if time.perf_counter() - T0 > args.budget:
                log("budget reached")
                break
            if pf == "speculative" and 1 not in r.predicted:
                continue
            res = OffloadedEngine(weights, k, pol, pf, program=program, prefetch_params=params).run(r)
            cell = {"trace": name, "policy": pol, "cache_size": k, "prefetch": pf, "prefetch_params": params,
                    "tokens": res.tokens, "requests": res.requests, "hits": res.hits, "misses": res.misses,
                    "prefetches": res.prefetches, "plan_copies": res.misses + res.prefetches,
                    "device_copies": res.device_copies, "violations": res.violations,
                    "tokens_per_s": res.tokens_per_s, "gb_h2d": res.bytes_h2d / 1e9}
            result["cells"].append(cell)
            write(out, result)
            log(f"{name} {pol} K={k} {pf} {params}: violations={res.violations} device_copies={res.device_copies} "
                f"plan={cell['plan_copies']} tok/s={res.tokens_per_s:.2f}")
    if time.perf_counter() - T0 < args.budget + args.ab_slack:
        # end to end: the all-resident floor (K = 8, warm) with and without the check, same weights
        from moesim.engine.gpu_bench import all_resident
        plain = Program(weights, 8, tokens, compile_kernels=compile_ok, check_residency=False)
        with_check = all_resident(weights, program, first)
        without = all_resident(weights, plain, first)
        result["all_resident_ab"] = {
            "with_check_ms_per_token": with_check["median_ms_per_token"],
            "without_check_ms_per_token": without["median_ms_per_token"],
            "overhead_ms_per_token": with_check["median_ms_per_token"] - without["median_ms_per_token"]}
        log(f"all-resident A/B: {result['all_resident_ab']}")
        write(out, result)
    result["all_zero"] = all(c["violations"] == 0 for c in result["cells"])
    result["all_copies_equal"] = all(c["device_copies"] == c["plan_copies"] for c in result["cells"])
    result["wall_s"] = time.perf_counter() - T0
    write(out, result)
    log(f"done: {len(result['cells'])} cells, zero violations {result['all_zero']}, device copies == plan "
        f"{result['all_copies_equal']}")
    return 0 if result["all_zero"] and result["all_copies_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
