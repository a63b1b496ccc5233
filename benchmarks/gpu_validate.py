"""ONE device run: environment check, calibration micro-benchmarks, then sim-vs-real validation cells.

Run on the GPU box (see docs/engine.md):

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_validate.py --trace .gpu_data/real.parquet --out $OUT

Writes under --out: env.json, calibration_raw.json, validate.json (one entry per cell, rewritten after
every cell so a killed run still leaves what it finished), events.json (one instrumented replay).
Everything is measured with CUDA events / synchronised wall time; nothing here is simulated.
"""

from __future__ import annotations

import argparse
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

from moesim.engine.gpu_bench import T0, calibrate, compile_works, log  # noqa: E402
from moesim.engine.plan import Routing  # noqa: E402
from moesim.engine.quant import quant_spec  # noqa: E402
from moesim.engine.runtime import MIXTRAL_8X7B, OffloadedEngine, Weights, all_resident_token_ms  # noqa: E402
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
    ap.add_argument("--budget", type=float, default=480.0, help="stop starting new cells after this many s")
    ap.add_argument("--quants", default="hqq2,hqq4,bf16")
    ap.add_argument("--policies", default="lru,lfu,fifo,opt")
    ap.add_argument("--sizes", default="2,3,4,6")
    ap.add_argument("--prefetch", default="none,oracle,transition")
    ap.add_argument("--skip-calibration", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = env_info()
    write(out, "env.json", env)
    log(f"env {env}")
    trace = read_trace(args.trace)
    routing = Routing.from_trace(trace, args.tokens)
    log(f"routing: {routing.num_tokens} tokens x {routing.num_layers} layers")

    compile_ok = compile_works()
    env["compile_ok"] = compile_ok
    write(out, "env.json", env)

    if not args.skip_calibration:
        cal = calibrate(args.quants.split(","), compile_ok)
        cal["compile_ok"] = compile_ok
        write(out, "calibration_raw.json", cal)

    spec = quant_spec("hqq2")
    log("pinning all experts (32 layers x 8, hqq2) ...")
    weights = Weights(MIXTRAL_8X7B, spec, "cuda", pin=True)
    log(f"pinned {MIXTRAL_8X7B.num_layers * MIXTRAL_8X7B.num_experts} experts of {weights.expert_bytes} B")
    floor_ms = all_resident_token_ms(weights, routing, 16, compile_dequant=compile_ok)
    log(f"all-resident (compute-only) ms/token {floor_ms:.3f}")
    result = {"device": env["device"], "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "layers": MIXTRAL_8X7B.num_layers, "expert_bytes": weights.expert_bytes, "quantization": "hqq2",
              "tokens": routing.num_tokens, "compile_dequant": compile_ok, "all_resident_ms_per_token": floor_ms,
              "cells": []}
    # one instrumented replay (CUDA events for every piece)
    eng = OffloadedEngine(weights, 4, "lru", "none", compile_dequant=compile_ok)
    eng.run(routing.head(4))   # warm-up (compile, allocator)
    inst = eng.run(routing.head(12), instrument=True)
    write(out, "events.json", inst.to_dict(events=True))
    del eng
    cells = [(p, k, f) for f in args.prefetch.split(",") for k in map(int, args.sizes.split(","))
             for p in args.policies.split(",")]
    cells += [(p, k, f + "#repeat") for p, k, f in cells[:4]]   # repeatability of identical cells
    for pol, k, pf in cells:
        if time.perf_counter() - T0 > args.budget:
            log(f"budget reached; {len(result['cells'])} of {len(cells)} cells done")
            break
        eng = OffloadedEngine(weights, k, pol, pf.split("#")[0], compile_dequant=compile_ok)
        res = eng.run(routing)
        d = res.to_dict()
        d["repeat"] = pf.endswith("#repeat")
        d["token_ms_median"] = float(np.median(res.token_ms))
        result["cells"].append(d)
        write(out, "validate.json", result)
        log(f"{pol:4s} K={k} {pf:10s} hit={res.hit_rate:.4f} tok/s={res.tokens_per_s:.3f} pf={res.prefetches}")
        del eng
        torch.cuda.empty_cache()
    write(out, "validate.json", result)
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
