"""ONE device run: environment check, calibration micro-benchmarks, then sim-vs-real validation cells.

Run on the GPU box (see docs/engine.md):

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_validate.py --trace .gpu_data/real.parquet --out $OUT

Writes under --out: env.json, calibration_raw.json, validate.json (one entry per cell, rewritten after
every cell so a killed run still leaves what it finished), events.json (one instrumented replay).
Everything is measured with CUDA events / synchronised wall time; nothing here is simulated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from moesim.engine.gpu_bench import T0, all_resident, calibrate, compile_works, log  # noqa: E402
from moesim.engine.plan import Routing  # noqa: E402
from moesim.engine.quant import quant_spec  # noqa: E402
from moesim.engine.runtime import MIXTRAL_8X7B, OffloadedEngine, Program, Weights  # noqa: E402
from moesim.traces.format import read_trace  # noqa: E402


def write(out: Path, name: str, obj) -> None:
    tmp = out / f".{name}.tmp"
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, out / name)


def env_info() -> dict:
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0), "platform": platform.platform()}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except Exception as exc:   # noqa: BLE001 - informational only
        info["transformers"] = f"missing: {exc}"
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=20).stdout.strip()
    except Exception as exc:   # noqa: BLE001
        info["nvidia_smi"] = f"failed: {exc}"
    return info


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=32, help="fewer for a quick check (routing cut to match)")
    ap.add_argument("--budget", type=float, default=480.0, help="stop starting new cells after this many s")
    ap.add_argument("--quants", default="hqq2", help="expert formats to calibrate before the cells")
    ap.add_argument("--late-quants", default="hqq4,bf16", help="formats calibrated after the cells, if time is left")
    ap.add_argument("--policies", default="lru,lfu,fifo,opt")
    ap.add_argument("--sizes", default="2,3,4,6")
    ap.add_argument("--prefetch", default="none,oracle,transition")
    ap.add_argument("--no-graphs", action="store_true", help="eager launches (the first engine's path)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = env_info()
    write(out, "env.json", env)
    log(f"env {env}")
    trace = read_trace(args.trace)
    routing = Routing.from_trace(trace, args.tokens)
    geometry = MIXTRAL_8X7B
    if args.layers != geometry.num_layers:
        geometry = dataclasses.replace(geometry, num_layers=args.layers)
        routing = routing.first_layers(args.layers)
    log(f"routing: {routing.num_tokens} tokens x {routing.num_layers} layers")

    compile_ok = compile_works()
    env["compile_ok"] = compile_ok
    write(out, "env.json", env)

    spec = quant_spec("hqq2")
    log(f"pinning all experts ({geometry.num_layers} layers x 8, hqq2) ...")
    weights = Weights(geometry, spec, "cuda", pin=True)
    log(f"pinned {geometry.num_layers * geometry.num_experts} experts of {weights.expert_bytes} B; "
        f"attention {weights.attn_quant.name} ({weights.attn_bytes} B per layer)")
    program = Program(weights, geometry.num_experts, routing.num_tokens, compile_kernels=compile_ok,
                      graphs=not args.no_graphs)
    log(f"program ready (CUDA graphs: {program.graphs})")
    program.load_routing(routing)
    cal = calibrate(args.quants.split(","), compile_ok, program)
    cal["compile_ok"] = compile_ok
    cal["engine_quantization"] = "hqq2"

    cal["all_resident"] = all_resident(weights, program, routing)   # the floor, and the overhead beyond the pieces
    floor_ms = cal["all_resident"]["median_ms_per_token"]
    write(out, "calibration_raw.json", cal)
    result = {"device": env["device"], "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "layers": geometry.num_layers, "expert_bytes": weights.expert_bytes, "quantization": "hqq2",
              "attention_quantization": weights.attn_quant.name, "cuda_graphs": program.graphs,
              "tokens": routing.num_tokens, "compile_dequant": compile_ok, "all_resident_ms_per_token": floor_ms,
              "cells": []}
    # one instrumented replay (CUDA events for every piece)
    eng = OffloadedEngine(weights, 4, "lru", "none", program=program)
    eng.run(routing.head(4))
    inst = eng.run(routing.head(12), instrument=True)
    write(out, "events.json", inst.to_dict(events=True))
    cells = [(p, k, f) for f in args.prefetch.split(",") for k in map(int, args.sizes.split(","))
             for p in args.policies.split(",")]
    base = list(cells)
    cells += [(p, k, f + "#repeat") for p, k, f in base[:4]]   # repeatability of identical cells
    # some cells again with the CPU free to queue tokens ahead (no wait for each token's logits)
    cells += [(p, k, f + "#nosync") for p, k, f in base[:: max(len(base) // 6, 1)][:6]]
    for pol, k, pf in cells:
        if time.perf_counter() - T0 > args.budget:
            log(f"budget reached; {len(result['cells'])} of {len(cells)} cells done")
            break
        name, _, variant = pf.partition("#")
        eng = OffloadedEngine(weights, k, pol, name, program=program)
        res = eng.run(routing, sync_tokens=variant != "nosync")
        d = res.to_dict()
        d["variant"] = variant or None
        d["repeat"] = variant == "repeat"
        d["token_ms_median"] = float(np.median(res.token_ms))
        d["cpu_issue_ms"] = float(sum(res.token_issue_ms))
        result["cells"].append(d)
        write(out, "validate.json", result)
        log(f"{pol:4s} K={k} {pf:10s} hit={res.hit_rate:.4f} tok/s={res.tokens_per_s:.3f} pf={res.prefetches} "
            f"issue/wall={sum(res.token_issue_ms) / (res.wall_s * 1e3):.3f}")
    write(out, "validate.json", result)
    late = [q for q in args.late_quants.split(",") if q]
    if late and time.perf_counter() - T0 < args.budget + 30:
        del program, eng, weights
        torch.cuda.empty_cache()
        extra = calibrate(late, compile_ok, h2d=False)   # the copy curve is measured already
        cal["expert"].update(extra["expert"])
        write(out, "calibration_raw.json", cal)
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
