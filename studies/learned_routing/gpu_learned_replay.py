"""The real offloaded engine replaying a recorded trace's routing AND its recorded predictions.

Mixtral-8x7B-size 2-bit experts (``moesim.engine``: hqq2 packed experts pinned in host memory, K GPU
slots per layer, copies on their own stream), as many layers as the trace has, driven by the decode
tokens of a recorded trace; the ``speculative`` prefetcher reads the trace's ``pred{d}_experts``.
Each cell is (policy, K, prefetcher, distance). Nothing is calibrated or simulated here: the
simulated side is computed on a laptop by ``studies/learned_routing/make_report.py`` from the
committed ``h200`` hardware preset.

    PYTHONUNBUFFERED=1 python3 studies/learned_routing/gpu_learned_replay.py --trace traces/learned-mixtral-32l.parquet \
        --out $OUT --tokens 160 --budget 150

Writes ``--out/engine_cells.json`` after every cell (a killed run keeps what it finished).
``--tiny`` runs the same code path on a CPU with a tiny geometry (for tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

T0 = time.perf_counter()

# the cells, most informative first (the run stops starting cells when --budget is spent)
DEFAULT_CELLS = ("lru:2:speculative:1,lru:2:none,lru:2:speculative:2,lru:2:oracle,lru:2:transition,"
                 "lru:4:speculative:1,lru:4:none,lru:4:speculative:2,lru:4:oracle,lru:4:transition,"
                 "lfu:3:speculative:1,lfu:3:none,opt:3:speculative:1,opt:3:none,lru:6:speculative:1,lru:6:none,"
                 "lfu:3:speculative:2,lfu:5:speculative:1,lfu:5:none")


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def parse_cells(spec: str) -> list[tuple[str, int, str, int]]:
    """``policy:K:prefetch[:distance]`` comma-separated."""
    cells = []
    for item in spec.split(","):
        parts = item.split(":")
        if len(parts) not in (3, 4):
            raise SystemExit(f"--cells: {item!r} is not policy:K:prefetch[:distance]")
        cells.append((parts[0], int(parts[1]), parts[2], int(parts[3]) if len(parts) == 4 else 1))
    return cells


def write(out: Path, obj) -> None:
    tmp = out / ".engine_cells.json.tmp"
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, out / "engine_cells.json")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=160, help="decode tokens per cell (first in execution order)")
    ap.add_argument("--cells", default=DEFAULT_CELLS)
    ap.add_argument("--budget", type=float, default=150.0, help="stop starting new cells after this many s")
    ap.add_argument("--tiny", "--cpu-check", action="store_true",
                    help="tiny geometry, eager, on CPU (tests the code path)")
    args = ap.parse_args()
    if not args.tiny:
        from moesim.engine.cuda import exit_unless_cuda

        exit_unless_cuda("gpu_learned_replay.py")
    import torch

    from moesim.engine.plan import Routing
    from moesim.engine.quant import quant_spec
    from moesim.engine.runtime import MIXTRAL_8X7B, Geometry, OffloadedEngine, Program, Weights
    from moesim.traces.format import DECODE, read_trace

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = parse_cells(args.cells)
    trace = read_trace(args.trace)
    decode = trace.filter_phase(DECODE)
    routing = Routing.from_trace(decode, args.tokens)
    L = routing.num_layers
    geometry = Geometry.tiny(L) if args.tiny else dataclasses.replace(MIXTRAL_8X7B, num_layers=L)
    device = "cpu" if args.tiny else "cuda"
    log(f"routing: {routing.num_tokens} decode tokens x {L} layers, predictions d = {sorted(routing.predicted)}")
    compile_ok = False
    if device == "cuda":
        from moesim.engine.gpu_bench import compile_works

        compile_ok = compile_works()
    weights = Weights(geometry, quant_spec("hqq2"), device, pin=device == "cuda")
    log(f"pinned {L * geometry.num_experts} experts of {weights.expert_bytes} B")
    program = Program(weights, geometry.num_experts, routing.num_tokens, compile_kernels=compile_ok)
    program.load_routing(routing)
    log(f"program ready (CUDA graphs: {program.graphs})")
    result = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "trace": str(args.trace),
              "layers": L, "expert_bytes": weights.expert_bytes, "quantization": "hqq2",
              "attention_quantization": weights.attn_quant.name, "cuda_graphs": program.graphs,
              "tokens": routing.num_tokens, "phase": "decode", "compile_dequant": compile_ok, "cells": []}
    warm = OffloadedEngine(weights, 4, "lru", "none", program=program)
    warm.run(routing.head(min(8, routing.num_tokens)))   # first replays pay lazy initialisation
    for pol, k, pf, d in cells:
        if time.perf_counter() - T0 > args.budget:
            log(f"budget reached; {len(result['cells'])} of {len(cells)} cells done")
            break
        params = {"distance": d} if pf != "none" else None
        eng = OffloadedEngine(weights, k, pol, pf, program=program, prefetch_params=params)
        res = eng.run(routing)
        c = res.to_dict()
        c["prefetch_distance"] = d if pf != "none" else None
        c["token_ms_median"] = float(np.median(res.token_ms))
        c["cpu_issue_ms"] = float(sum(res.token_issue_ms))
        result["cells"].append(c)
        write(out, result)
        log(f"{pol:4s} K={k} {pf:11s} d={d} hit={res.hit_rate:.4f} tok/s={res.tokens_per_s:.3f} pf={res.prefetches}")
    write(out, result)
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
