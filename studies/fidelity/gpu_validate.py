"""ONE device run: environment check, calibration micro-benchmarks, then sim-vs-real validation cells.

Run on the GPU box (see docs/engine.md):

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_validate.py --trace .gpu_data/real.parquet --out $OUT

Writes under --out: env.json, calibration_raw.json, validate.json (one entry per cell, rewritten after
every cell so a killed run still leaves what it finished), events.json (one instrumented replay).
Everything is measured with CUDA events / synchronised wall time; nothing here is simulated.

Added for the fidelity report (studies/fidelity/fidelity_h200.md; the defaults keep the old run): the engine-term
micro-benchmarks and repeated expert copies go into calibration_raw.json (``--no-engine-terms`` skips
them); ``--skip-tokens N`` replays tokens N .. N+tokens-1 (recorded as ``skip_tokens``, which
``moesim validate`` honours); ``--extra-trace T`` (repeatable) runs the same cells on more traces in the
same process, each into ``validate.<stem>.json``; ``--repeats R`` runs every cell R times (cells 2..R are
``variant: "repeat"``) instead of the default 4 repeats + 6 unsynchronised cells; ``--calib-tokens`` /
``--calib-contexts`` shorten the calibration; every validate file gets ``in_situ_copies`` (the copy
events of a 12-token instrumented replay at K = 2 of its own trace) and an engine run with every request
a miss (``all_miss``, synthetic routing) goes into calibration_raw.json.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from moesim.engine.batch import BatchEngine, BatchProgram, Lanes  # noqa: E402
from moesim.engine.gpu_bench import (  # noqa: E402
    T0,
    all_resident,
    batch_pieces,
    calibrate,
    compile_works,
    engine_terms,
    log,
)
from moesim.engine.plan import Routing  # noqa: E402
from moesim.engine.quant import quant_spec  # noqa: E402
from moesim.engine.runtime import MIXTRAL_8X7B, Geometry, OffloadedEngine, Program, Weights  # noqa: E402
from moesim.engine.validation import cell_trace, head_tokens  # noqa: E402
from moesim.traces.format import DECODE, PREFILL, read_trace  # noqa: E402
from moesim.traces.steps import build_steps  # noqa: E402


def write(out: Path, name: str, obj) -> None:
    tmp = out / f".{name}.tmp"
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, out / name)


def env_info() -> dict:
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "platform": platform.platform()}
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


def all_miss_routing(geometry, tokens: int) -> Routing:
    """Synthetic routing where every request misses at K = top-k: token t uses experts
    {2t, 2t+1} mod 8 at every layer (consecutive tokens are disjoint)."""
    L, k, E = geometry.num_layers, geometry.top_k, geometry.num_experts
    t = np.arange(tokens)
    experts = ((k * t[:, None] + np.arange(k)[None, :]) % E)[:, None, :].repeat(L, axis=1).astype(np.int64)
    weights = np.full((tokens, L, k), 1.0 / k, np.float32)
    return Routing(experts, weights, np.arange(tokens * L).reshape(tokens, L), np.zeros(tokens, np.int64),
                   t.astype(np.int64), E)


def all_miss(weights, program, routing: Routing) -> dict:
    """The engine itself with every request a demand miss (K = top-k): GPU time per token, to set
    against the simulator's price of the same run (the fidelity report does that, on CPU)."""
    k = routing.top_k
    eng = OffloadedEngine(weights, k, "lru", "none", program=program)
    eng.run(routing.head(4))   # warm-up
    res = eng.run(routing)
    out = {"tokens": res.tokens, "layers": routing.num_layers, "requests": res.requests, "misses": res.misses,
           "gpu_ms_total": float(sum(res.token_ms)), "wall_s": res.wall_s, "cache_size": k,
           "experts": routing.experts[:, 0, :].tolist()}
    log(f"all-miss engine run: {res.misses} misses in {res.tokens} tokens, {out['gpu_ms_total'] / res.tokens:.2f} "
        f"ms/token")
    return out


def copy_stats(events: list[dict], expert_bytes: int) -> dict:
    """Copy durations (miss and prefetch events) of an instrumented replay."""
    ms = np.array([e["end_ms"] - e["start_ms"] for e in events if e["kind"] in ("miss", "prefetch")])
    if not len(ms):
        return {"n": 0}
    return {"n": int(len(ms)), "bytes": int(expert_bytes), "median_ms": float(np.median(ms)),
            "p10_ms": float(np.percentile(ms, 10)), "p90_ms": float(np.percentile(ms, 90)),
            "min_ms": float(ms.min()), "max_ms": float(ms.max())}


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
    ap.add_argument("--skip-tokens", type=int, default=0, help="replay tokens N.. of --trace (default 0)")
    ap.add_argument("--extra-trace", action="append", default=[], help="more traces, same cells (from token 0)")
    ap.add_argument("--repeats", type=int, default=None, help="run every cell this many times")
    ap.add_argument("--no-engine-terms", action="store_true", help="skip the engine-term micro-benchmarks")
    # Off by default: the committed h200 calibration was measured without the check, which costs about
    # 2% per token (studies/residency_proof/residency_proof_h200.md); validation cells must time the calibrated engine.
    ap.add_argument("--residency-check", action="store_true",
                    help="build the engine with the device-side residency proof (counts violations and "
                         "device copies per cell; about 2%% slower, see studies/residency_proof/residency_proof_h200.md)")
    ap.add_argument("--no-residency-check", action="store_true", help="the default; kept for old command lines")
    ap.add_argument("--calib-tokens", default="1,2,4,8,16,32,64", help="expert-curve token counts")
    ap.add_argument("--calib-contexts", default="512,1024,2048,4096", help="attention contexts")
    ap.add_argument("--batch", default="1",
                    help="decode batch sizes (1: the batch-1 engine, as before; B > 1: moesim.engine.batch, "
                         "B sequences per step, prefetch none only)")
    ap.add_argument("--batch-steps", type=int, default=8, help="decode steps per batched cell (B x this tokens)")
    ap.add_argument("--prefill-chunk", type=int, default=0,
                    help="also run prefill cells in chunks of this many tokens (0: none; prefetch none only)")
    ap.add_argument("--prefill-tokens", type=int, default=192, help="prompt tokens per prefill cell")
    ap.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt in a prefill cell")
    ap.add_argument("--cpu-check", action="store_true",
                    help="run the whole orchestration on CPU with a tiny model (tests this script; the GPU "
                         "micro-benchmarks that need CUDA are skipped, the numbers mean nothing)")
    args = ap.parse_args()
    if not args.cpu_check:
        from moesim.engine.cuda import exit_unless_cuda

        exit_unless_cuda("gpu_validate.py")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = env_info()
    write(out, "env.json", env)
    log(f"env {env}")
    geometry = Geometry.tiny(args.layers) if args.cpu_check else MIXTRAL_8X7B
    dev = "cpu" if args.cpu_check else "cuda"
    if args.layers != geometry.num_layers:
        geometry = dataclasses.replace(geometry, num_layers=args.layers)

    decode_only: dict[str, bool] = {}
    digests: dict[str, str] = {}   # each trace's routing digest: `moesim validate` refuses the cells for another

    def load(path: str, skip: int) -> Routing:
        full = read_trace(path)
        digests[path] = full.routing_digest()
        # a trace with prompts: batch-1 decode cells replay its decode rows (prefill has cells of its own)
        decode_only[path] = bool((full.phase == PREFILL).any())
        if decode_only[path]:
            full = full.filter_phase(DECODE)
        r = Routing.from_trace(head_tokens(full, args.tokens, skip=skip), args.tokens)
        return r.first_layers(args.layers) if args.layers != r.num_layers else r

    runs = [(args.trace, args.skip_tokens, "validate.json")]
    runs += [(t, 0, f"validate.{Path(t).stem}.json") for t in args.extra_trace]
    routings = [load(path, skip) for path, skip, _ in runs]
    routing = routings[0]
    for (path, skip, _), r in zip(runs, routings, strict=True):
        log(f"routing {path} (from token {skip}): {r.num_tokens} tokens x {r.num_layers} layers")

    compile_ok = False if args.cpu_check else compile_works()
    env["compile_ok"] = compile_ok
    write(out, "env.json", env)

    spec = quant_spec("hqq2")
    log(f"pinning all experts ({geometry.num_layers} layers x 8, hqq2) ...")
    weights = Weights(geometry, spec, dev, pin=not args.cpu_check)
    log(f"pinned {geometry.num_layers * geometry.num_experts} experts of {weights.expert_bytes} B; "
        f"attention {weights.attn_quant.name} ({weights.attn_bytes} B per layer)")
    miss_routing = all_miss_routing(geometry, 16)
    program = Program(weights, geometry.num_experts, max(max(r.num_tokens for r in routings), 32),
                      compile_kernels=compile_ok, graphs=not args.no_graphs,
                      check_residency=args.residency_check and not args.no_residency_check)
    log(f"program ready (CUDA graphs: {program.graphs})")
    program.load_routing(routing)
    if args.cpu_check:   # the CUDA micro-benchmarks cannot run here
        cal = {"h2d": [], "expert": {}, "attention": [], "lm_head_ms": None}
    else:
        cal = calibrate(args.quants.split(","), compile_ok, program,
                        tokens=tuple(map(int, args.calib_tokens.split(","))),
                        contexts=tuple(map(int, args.calib_contexts.split(","))))
    cal["compile_ok"] = compile_ok
    cal["engine_quantization"] = "hqq2"

    cal["all_resident"] = all_resident(weights, program, routing)   # the floor, and the overhead beyond the pieces
    floor_ms = cal["all_resident"]["median_ms_per_token"]
    write(out, "calibration_raw.json", cal)
    if not args.no_engine_terms:
        cal.update(engine_terms(dev, weights.expert_bytes, layers=geometry.num_layers))
        cal["all_miss"] = all_miss(weights, program, miss_routing)
        write(out, "calibration_raw.json", cal)
    results = []
    for (path, skip, fname), r in zip(runs, routings, strict=True):
        results.append({"device": env["device"], "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "trace": Path(path).name, "trace_digest": digests[path], "skip_tokens": skip,
                        "decode_rows_only": decode_only[path],
                        "layers": geometry.num_layers, "expert_bytes": weights.expert_bytes, "quantization": "hqq2",
                        "attention_quantization": weights.attn_quant.name, "cuda_graphs": program.graphs,
                        "tokens": r.num_tokens, "compile_dequant": compile_ok, "all_resident_ms_per_token": floor_ms,
                        "cells": []})
        # one instrumented replay per trace (CUDA events for every piece): the in-situ copy times
        eng = OffloadedEngine(weights, 2 if (args.extra_trace or args.repeats) else 4, "lru", "none",
                              program=program)
        eng.run(r.head(4))
        inst = eng.run(r.head(12), instrument=True)
        if fname == "validate.json":
            write(out, "events.json", inst.to_dict(events=True))
        results[-1]["in_situ_copies"] = copy_stats(inst.events, weights.expert_bytes)
        log(f"in-situ copies {fname}: {results[-1]['in_situ_copies']}")
        write(out, fname, results[-1])
    batches = [int(b) for b in args.batch.split(",") if b]
    shapes = [("decode", b) for b in batches if b > 1] + ([("prefill", args.prefill_chunk)] if args.prefill_chunk else [])
    kinds = (["b1"] if 1 in batches else []) + [f"{ph}{n}" for ph, n in shapes]
    # batch / prefill cells: the tokens each replays (segments of one sequence, moesim.engine.validation.cell_trace),
    # grouped into steps by the simulator's own definition (moesim.traces.steps.build_steps)
    batch_inputs: dict[tuple[int, str], tuple] = {}
    for ti, (path, skip, _) in enumerate(runs):
        full = read_trace(path)
        for ph, n in shapes:
            if ph == "decode":
                spec_ = {"phase": ph, "batch": n, "tokens": n * args.batch_steps, "skip": skip, "seq_len": args.batch_steps}
                chunk = 512
            else:
                spec_ = {"phase": ph, "batch": 1, "tokens": args.prefill_tokens, "skip": skip, "seq_len": args.prompt_len}
                chunk = n
            sub = cell_trace(full, **spec_)
            br = Routing.from_trace(sub)
            if args.layers != br.num_layers:
                br = br.first_layers(args.layers)
            st = build_steps(sub, spec_["batch"], chunk)
            if args.layers != full.meta.num_layers:
                for x in st:   # the model cut short: its first layers only
                    x.layers = {la: v for la, v in x.layers.items() if la < args.layers}
                    x.counts = {la: v for la, v in x.counts.items() if la < args.layers}
                    x.weights = {la: v for la, v in x.weights.items() if la < args.layers}
            batch_inputs[(ti, f"{ph}{n}")] = (spec_, chunk, st, br)
            log(f"{path} {ph}{n}: {len(st)} steps of {[x.tokens for x in st][:4]}... tokens, contexts "
                f"{min(x.context for x in st)}-{max(x.context for x in st)}")
    programs: dict[str, BatchProgram] = {}
    if shapes:
        lanes = Lanes(weights, max([n for ph, n in shapes if ph == "decode"] + [1]))
        for ph, n in shapes:
            max_steps = max(len(v[2]) for (ti, key), v in batch_inputs.items() if key == f"{ph}{n}")
            programs[f"{ph}{n}"] = BatchProgram(weights, n, ph == "prefill", max_steps, lanes, slots=program.slots,
                                                compile_kernels=compile_ok, graphs=not args.no_graphs)
        # the batch programs' own pieces, per step shape and context bucket: what the simulator's layer,
        # token and per-step overhead terms are for these shapes (moesim.engine.calibration.batch_cost)
        cal["batch_pieces"] = {}
        for key, prog in programs.items():
            spec_, chunk, st, br = batch_inputs[(0, key)]
            cal["batch_pieces"][key] = batch_pieces(prog, st, br, args.cpu_check)
            write(out, "calibration_raw.json", cal)
    cells = [(p, k, f, kind) for kind in kinds for f in (args.prefetch.split(",") if kind == "b1" else ["none"])
             for k in map(int, args.sizes.split(",")) for p in args.policies.split(",")]
    base = list(cells)
    if args.repeats:
        cells = [(p, k, f + ("#repeat" if rep else ""), kind) for rep in range(args.repeats) for p, k, f, kind in base]
    else:
        cells += [(p, k, f + "#repeat", kind) for p, k, f, kind in base[:4]]   # repeatability of identical cells
        # some cells again with the CPU free to queue tokens ahead (no wait for each token's logits)
        cells += [(p, k, f + "#nosync", kind) for p, k, f, kind in base[:: max(len(base) // 6, 1)][:6] if kind == "b1"]
    done = 0
    for pol, k, pf, kind in cells:
        for ti, ((_, _, fname), r, result) in enumerate(zip(runs, routings, results, strict=True)):   # traces interleaved
            if time.perf_counter() - T0 > args.budget:
                break
            name, _, variant = pf.partition("#")
            if kind != "b1":
                spec_, chunk, st, br = batch_inputs[(ti, kind)]
                res = BatchEngine(programs[kind], k, pol).run(st, br)
                d = res.to_dict()
                d.update({"variant": variant or None, "repeat": variant == "repeat", "cell_tokens": spec_["tokens"],
                          "skip_tokens": spec_["skip"], "seq_len": spec_["seq_len"],
                          "prefill_chunk": chunk if spec_["phase"] == "prefill" else None,
                          "step_ms_median": float(np.median(res.token_ms)), "buckets": sorted(set(res.buckets))})
                result["cells"].append(d)
                done += 1
                write(out, fname, result)
                log(f"{fname} {kind} {pol:4s} K={k} hit={res.hit_rate:.4f} tok/s={res.tokens_per_s:.3f} "
                    f"steps={res.steps} violations={res.violations} device_copies={res.device_copies} misses={res.misses}")
                continue
            eng = OffloadedEngine(weights, k, pol, name, program=program)
            res = eng.run(r, sync_tokens=variant != "nosync")
            d = res.to_dict()   # batch 1, phase decode
            d["variant"] = variant or None
            d["repeat"] = variant == "repeat"
            d["token_ms_median"] = float(np.median(res.token_ms))
            d["cpu_issue_ms"] = float(sum(res.token_issue_ms))
            result["cells"].append(d)
            done += 1
            write(out, fname, result)
            log(f"{fname} {pol:4s} K={k} {pf:10s} hit={res.hit_rate:.4f} tok/s={res.tokens_per_s:.3f} "
                f"violations={res.violations} device_copies={res.device_copies} "
                f"pf={res.prefetches} issue/wall={sum(res.token_issue_ms) / (res.wall_s * 1e3):.3f}")
        else:
            continue
        log(f"budget reached; {done} of {len(cells) * len(runs)} cells done")
        break
    for (_, _, fname), result in zip(runs, results, strict=True):
        write(out, fname, result)
    late = [q for q in args.late_quants.split(",") if q]
    if late and not args.cpu_check and time.perf_counter() - T0 < args.budget + 30:
        del program, eng, weights
        torch.cuda.empty_cache()
        extra = calibrate(late, compile_ok, h2d=False)   # the copy curve is measured already
        cal["expert"].update(extra["expert"])
        write(out, "calibration_raw.json", cal)
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
