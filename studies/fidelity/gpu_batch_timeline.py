"""Where a batch step's time goes on the GPU: one batch (or prefill) cell of moesim.engine.batch replayed
plain, instrumented (CUDA events around every layer piece, copy and expert), with the residency check
off, and all-resident; for the residual of the batch cells in studies/fidelity/fidelity_h200.md.

    PYTHONUNBUFFERED=1 python3 studies/fidelity/gpu_batch_timeline.py --trace real.parquet --skip-tokens 128 --out OUT

Writes OUT/batch_timeline.json: step times of every variant, the instrumented events and a summary
(copy durations, gaps on the copy stream, copy end -> expert start, expert durations). ``--cpu-check``
runs it on CPU with a tiny model (tests the script; the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from moesim.engine.batch import BatchEngine, BatchProgram, Lanes  # noqa: E402
from moesim.engine.gpu_bench import compile_works, log  # noqa: E402
from moesim.engine.plan import Routing  # noqa: E402
from moesim.engine.quant import quant_spec  # noqa: E402
from moesim.engine.runtime import MIXTRAL_8X7B, Geometry, Weights  # noqa: E402
from moesim.engine.sync import SyncMode  # noqa: E402
from moesim.engine.validation import cell_trace  # noqa: E402
from moesim.traces.format import read_trace  # noqa: E402
from moesim.traces.steps import build_steps  # noqa: E402


def summary(events: list[dict]) -> dict:
    """Copy-stream gaps and cross-stream hand-offs of one instrumented replay (ms)."""
    def stats(x) -> dict:
        x = np.asarray(x, float)
        return {"n": int(len(x)), "median": float(np.median(x)), "p10": float(np.percentile(x, 10)),
                "p90": float(np.percentile(x, 90)), "sum": float(x.sum())} if len(x) else {"n": 0}
    copies = sorted((e for e in events if e["kind"] == "miss"), key=lambda e: e["start_ms"])
    same = [b["start_ms"] - a["end_ms"] for a, b in zip(copies[:-1], copies[1:], strict=True)
            if (a["step"], a["layer"]) == (b["step"], b["layer"])]
    across = [b["start_ms"] - a["end_ms"] for a, b in zip(copies[:-1], copies[1:], strict=True)
              if (a["step"], a["layer"]) != (b["step"], b["layer"])]
    gates = {(e["step"], e["layer"]): e for e in events if e["kind"] == "attention+gate"}
    first_copy: dict = {}
    for c in copies:
        first_copy.setdefault((c["step"], c["layer"]), c)
    gate_to_copy = [c["start_ms"] - gates[k]["end_ms"] for k, c in first_copy.items() if k in gates]
    ends = {(c["step"], c["layer"], c["expert"]): c["end_ms"] for c in copies}
    experts = [e for e in events if e["kind"] == "expert"]
    landed = [e["start_ms"] - ends[(e["step"], e["layer"], e["expert"])] for e in experts
              if (e["step"], e["layer"], e["expert"]) in ends]
    span = max(e["end_ms"] for e in events) - min(e["start_ms"] for e in events) if events else 0.0
    return {"copy_ms": stats([c["end_ms"] - c["start_ms"] for c in copies]),
            "copy_gap_within_layer_ms": stats(same), "copy_gap_across_layers_ms": stats(across),
            "gate_to_first_copy_ms": stats(gate_to_copy), "copy_end_to_expert_start_ms": stats(landed),
            "expert_ms": stats([e["end_ms"] - e["start_ms"] for e in experts]),
            "layer_piece_ms": stats([g["end_ms"] - g["start_ms"] for g in gates.values()]),
            "copy_busy_ms": float(sum(c["end_ms"] - c["start_ms"] for c in copies)), "span_ms": float(span)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip-tokens", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cache-size", type=int, default=3)
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--cpu-check", action="store_true")
    args = ap.parse_args()
    if not args.cpu_check:
        from moesim.engine.cuda import exit_unless_cuda

        exit_unless_cuda("gpu_batch_timeline.py")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    geometry = Geometry.tiny(args.layers) if args.cpu_check else MIXTRAL_8X7B
    dev = "cpu" if args.cpu_check else "cuda"
    sub = cell_trace(read_trace(args.trace), batch=args.batch, tokens=args.batch * args.steps, skip=args.skip_tokens,
                     seq_len=args.steps)
    steps = build_steps(sub, args.batch)
    routing = Routing.from_trace(sub)
    if args.layers != routing.num_layers:
        routing = routing.first_layers(args.layers)
        for st in steps:
            for attr in ("layers", "counts", "weights"):
                setattr(st, attr, {la: v for la, v in getattr(st, attr).items() if la < args.layers})
    compile_ok = False if args.cpu_check else compile_works()
    weights = Weights(geometry, quant_spec("hqq2"), dev, pin=not args.cpu_check)
    lanes = Lanes(weights, args.batch)
    on = BatchProgram(weights, args.batch, False, len(steps), lanes, compile_kernels=compile_ok)
    off = BatchProgram(weights, args.batch, False, len(steps), lanes, slots=on.slots, compile_kernels=compile_ok,
                       check_residency=False)
    res: dict = {"trace": Path(args.trace).name, "skip_tokens": args.skip_tokens, "batch": args.batch,
                 "steps": len(steps), "cache_size": args.cache_size, "policy": args.policy}
    eng = BatchEngine(on, args.cache_size, args.policy)
    eng.run(steps, routing)   # capture + warm-up
    plain = [eng.run(steps, routing) for _ in range(2)]
    inst = eng.run(steps, routing, instrument=True)
    res["plain_step_ms"] = [r.token_ms for r in plain]
    res["instrumented_step_ms"] = inst.token_ms
    res["misses"], res["violations"] = inst.misses, [r.violations for r in plain + [inst]]
    res["summary"] = summary(inst.events)
    res["events"] = inst.events
    log(f"plain {[round(float(np.sum(r.token_ms)), 1) for r in plain]} ms, instrumented "
        f"{float(np.sum(inst.token_ms)):.1f} ms; {res['summary']}")
    eoff = BatchEngine(off, args.cache_size, args.policy)
    eoff.run(steps, routing)
    res["check_off_step_ms"] = [eoff.run(steps, routing).token_ms for _ in range(2)]
    # the engine's other stream orderings (moesim.engine.sync): every wait issued, timestamped events, the
    # CPU held back
    for name in ("plain", "elide+timing", "elide+lag2", "elide+lag0"):
        e = BatchEngine(on, args.cache_size, args.policy, sync=SyncMode.parse(name))
        res[f"sync_{name}_step_ms"] = [e.run(steps, routing).token_ms for _ in range(2)]
        log(f"{name}: {[round(float(np.sum(x)), 1) for x in res[f'sync_{name}_step_ms']]} ms")
    full = BatchEngine(on, geometry.num_experts, "lru")
    full.run(steps, routing, warm=True)
    allres = full.run(steps, routing, warm=True, instrument=True)
    res["all_resident_instrumented"] = {"step_ms": allres.token_ms, "summary": summary(allres.events)}
    log(f"check off {[round(float(np.sum(x)), 1) for x in res['check_off_step_ms']]} ms; all-resident "
        f"{float(np.sum(allres.token_ms)):.1f} ms, experts {res['all_resident_instrumented']['summary']['expert_ms']}")
    (out / "batch_timeline.json").write_text(json.dumps(res))
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
