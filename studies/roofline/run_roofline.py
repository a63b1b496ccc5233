"""ONE device run of the roofline study (issue 23): the engine's pieces old vs fused, the expert path
the engine chooses per batch (fused kernels or dequantise-then-cuBLAS, ``kernels.expert_path``) with
both candidates' times, the fused kernel's variants against each other (with every tuned tile's time),
the HBM and PCIe peaks they are measured against, all-resident decode, and copy-bound cells. Run on the
GPU box:

    PYTHONUNBUFFERED=1 python3 studies/roofline/run_roofline.py --commit <sha> --out $OUT

Writes ``roofline_<gpu>.json`` under --out (rewritten after every stage, so a killed run keeps what it
finished); ``make_report.py`` turns the committed copy into report.md. Device times are CUDA events
around CUDA-graph replays queued behind a GPU sleep (the engine replays its pieces as graphs).
``--cpu-smoke`` runs every stage on this CPU at the tiny geometry (reference kernels, clock timings,
``roofline_cpu-smoke.json``): a dry run of the driver, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from moesim.engine import kernels  # noqa: E402
from moesim.engine.gpu_bench import all_resident, copy_repeats, cuda_ms, device_seconds, h2d_curve, log  # noqa: E402
from moesim.engine.kernels import expert_path  # noqa: E402
from moesim.engine.plan import Routing  # noqa: E402
from moesim.engine.quant import fill_random_blob, quant_spec  # noqa: E402
from moesim.engine.runtime import (  # noqa: E402
    MIXTRAL_8X7B,
    Geometry,
    OffloadedEngine,
    Program,
    Weights,
    attention_forward,
    compiled,
    expert_forward,
)
from moesim.engine.validation import head_tokens  # noqa: E402
from moesim.traces.format import read_trace  # noqa: E402

BATCHES = (1, 4, 16)
SMOKE_H2D = (64 << 10, 1 << 20, 4 << 20)


def graph_ms(fn, dev: str = "cuda", reps: int = 50) -> float:
    """GPU time of one replay of ``fn`` captured as a CUDA graph (warm-up, compilation, kernel tuning
    and the expert path decision happen on a side stream first); on CPU the clock over eager calls."""
    if dev == "cpu":
        return device_seconds(fn, dev, reps=3, warm=1) * 1e3
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_ms(graph.replay, reps=reps, warm=3)


def rel_err(got, want) -> float:
    return expert_path.max_rel_diff(got, want)


def variant_times(fn, ref, dev: str) -> dict:
    """``fn``'s graph time with each fused-kernel variant alone (its fastest tuned tile; the tiles were
    timed when ``fn`` first ran, so nothing is re-tuned): the old kernel against the new, same process;
    and each variant's max relative error against ``ref`` (the reference path's output). Empty where
    the fused kernels are not active (CPU smoke)."""
    if not kernels.active(dev):
        return {}
    from moesim.engine.kernels import lowbit

    times: dict = {}
    for v in lowbit.VARIANTS:
        try:
            with lowbit.only_variant(v), expert_path.only_path(expert_path.FUSED):
                got = fn()
                times[f"v{v}_max_rel_err"] = rel_err(got[0] if isinstance(got, tuple) else got, ref)
                times[f"v{v}"] = graph_ms(fn, dev)
        except Exception as exc:   # noqa: BLE001 - a variant with no working tile: recorded, run goes on
            times[f"v{v}"] = None
            log(f"variant {v} failed: {type(exc).__name__}: {exc}")
    return times


def tuning_table() -> list[dict]:
    """Every tuned shape's candidate tiles and their times (lowbit.TUNING), as JSON rows."""
    if not kernels.triton_available():
        return []
    from moesim.engine.kernels import lowbit

    rows = []
    for (fmt, n, k, bucket, dual, dtype), cands in lowbit.TUNING.items():
        rows.append({"format": fmt, "rows": n, "cols": k, "batch_bucket": bucket, "dual": dual, "dtype": dtype,
                     "candidates": [{"variant": c[0], "bn": c[1], "bw": c[2], "warps": c[3], "stages": c[4],
                                     "ms": t if t != float("inf") else None,
                                     "error": lowbit.TUNING_ERRORS.get(((fmt, n, k, bucket, dual, dtype), c))}
                                    for c, t in cands]})
    return rows


def hbm_peak(dev: str) -> dict:
    n = (2 << 30) if dev == "cuda" else (8 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = device_seconds(lambda: dst.copy_(src), dev, reps=10) * 1e3
    return {"bytes_moved": 2 * n, "ms": ms, "gb_per_s": 2 * n / ms / 1e6}


def path_times(blob, x, spec, g: Geometry, dev: str) -> dict:
    """The engine's expert path at this batch: the decision (``kernels.expert_path``: each candidate's
    ``do_bench`` ms at warm-up and the choice), then each candidate forced and replayed as a graph, and
    the engine's piece as it runs (the chosen path). Without the fused kernels (CPU smoke) there is no
    decision: the reference path serves."""
    key = expert_path.path_key(spec.name, g.hidden, g.ffn, x)
    engine_ms = graph_ms(lambda: expert_forward(blob, x, spec, g.hidden, g.ffn), dev)   # decides first
    row = expert_path.decision(key)
    graph = {}
    for path in expert_path.PATHS if row else ():
        with expert_path.only_path(path):
            graph[path] = graph_ms(lambda: expert_forward(blob, x, spec, g.hidden, g.ffn), dev)
    chosen = row["chosen"] if row else expert_path.REFERENCE
    fastest = min(graph, key=graph.get) if graph else None
    return {"engine_ms": engine_ms, "path": chosen, "path_graph_ms": graph,
            "path_tuner_ms": row["ms"] if row else {}, "path_errors": row["errors"] if row else {},
            "path_is_fastest_graph": chosen == fastest if fastest else None}


def expert_pieces(spec_name: str, old: bool, g: Geometry, dev: str) -> dict:
    """Expert FFN at each batch: the engine's piece (its chosen path) and both candidate paths, the fused
    kernels alone (and per kernel variant), the previous engine's torch.compile'd dequantise+matmul, and
    an fp16 dense FFN of the same shape (cuBLAS; the peer any low-bit kernel must beat)."""
    spec = quant_spec(spec_name)
    gen = torch.Generator(device=dev).manual_seed(0)
    blob = torch.empty(spec.expert_bytes(g.hidden, g.ffn), dtype=torch.uint8, device=dev)
    fill_random_blob(blob, spec, g.hidden * g.ffn, gen)
    dense_dtype = torch.float16 if dev == "cuda" else torch.float32
    dense = [torch.randn(*s, device=dev, dtype=dense_dtype, generator=gen) * 0.02
             for s in ((g.ffn, g.hidden), (g.ffn, g.hidden), (g.hidden, g.ffn))]
    out: dict = {"format": spec_name, "weight_bytes": blob.numel(), "fp16_weight_bytes": 3 * 2 * g.hidden * g.ffn,
                 "rows": []}
    F = torch.nn.functional
    for m in BATCHES:
        x = torch.randn(m, g.hidden, device=dev, dtype=torch.bfloat16, generator=gen)
        xh = x.to(dense_dtype)
        with torch.inference_mode():
            with kernels.reference_kernels():
                ref = expert_forward(blob, x, spec, g.hidden, g.ffn)
                old_ms = graph_ms(lambda x=x: compiled(expert_forward)(blob, x, spec, g.hidden, g.ffn), dev) \
                    if old else None
            paths = path_times(blob, x, spec, g, dev)
            with expert_path.only_path(expert_path.FUSED):
                fused = expert_forward(blob, x, spec, g.hidden, g.ffn)
                new_ms = graph_ms(lambda x=x: expert_forward(blob, x, spec, g.hidden, g.ffn), dev)
            variant_ms = variant_times(lambda x=x: expert_forward(blob, x, spec, g.hidden, g.ffn), ref, dev)
            fp16_ms = graph_ms(lambda xh=xh: (F.silu(xh @ dense[0].T) * (xh @ dense[1].T)) @ dense[2].T, dev)
        err = rel_err(fused, ref)
        out["rows"].append({"batch": m, "fused_ms": new_ms, "old_compiled_ms": old_ms, "fp16_dense_ms": fp16_ms,
                            "kernel_variant_ms": variant_ms, "max_rel_err_vs_reference": err, **paths})
        log(f"expert {spec_name} batch {m}: engine {paths['engine_ms']:.4f} ms via {paths['path']} (graphs "
            f"{paths['path_graph_ms']}, tuner {paths['path_tuner_ms']}), fused {new_ms:.4f} (per kernel variant "
            f"{variant_ms}), old {old_ms}, fp16 {fp16_ms:.4f}, err {err:.2e}")
    return out


def layer_piece(g: Geometry, dev: str) -> dict:
    """Attention (4-bit q/k/v/o, decode attention over the static KV cache) + gate, batch 1: fused vs
    old (on CPU: eager only)."""
    g = replace(g, num_layers=1)
    cuda = dev == "cuda"
    w = Weights(g, quant_spec("hqq2"), dev, pin=False)
    x = torch.randn(1, g.hidden, device=dev, dtype=torch.bfloat16)
    pos = torch.tensor([g.max_context // 2], device=dev)

    args = (x, w.wq[0], w.wk[0], w.wv[0], w.wo[0], w.wg[0], w.k_cache[0], w.v_cache[0], pos, w.positions, g,
            w.attn_quant)
    with torch.inference_mode():
        with kernels.reference_kernels():
            ref_x, _ = attention_forward(*args)
        new_x, _ = attention_forward(*args)
        new_ms = graph_ms(lambda: attention_forward(*args), dev)
        variant_ms = variant_times(lambda: attention_forward(*args), ref_x, dev)
        # the fused kernels are opaque custom ops: torch.compile fuses the rest of the layer around them
        new_compiled_ms = graph_ms(lambda: compiled(attention_forward)(*args), dev) if cuda else None
        with kernels.reference_kernels():
            old_ms = graph_ms(lambda: (compiled(attention_forward) if cuda else attention_forward)(*args), dev)
    # the fused decode attention reads positions 0..pos only; SDPA (reference path) the whole static cache
    read = int(pos.item()) + 1 if kernels.fused_attention_status() == "ok" else g.max_context
    kv_bytes = 2 * w.k_cache[0].numel() // g.max_context * read * w.k_cache.element_size()
    err = rel_err(new_x, ref_x)
    fastest = min(t for t in (new_ms, new_compiled_ms) if t is not None)
    out = {"attn_weight_bytes": w.attn_bytes, "kv_cache_bytes_read": kv_bytes, "gate_bytes": w.wg[0].numel() * 2,
           "context": g.max_context, "positions_read": read, "fused_eager_ms": new_ms, "fused_compiled_ms": new_compiled_ms,
           "fused_ms": fastest, "compiled": new_compiled_ms == fastest, "old_compiled_ms": old_ms,
           "kernel_variant_eager_ms": variant_ms,
           "max_rel_err_vs_reference": err}
    log(f"layer batch 1: fused {new_ms:.4f} ms (compiled {new_compiled_ms}), old {old_ms:.4f} ms, err {err:.2e}")
    return out


def engine_runs(trace: Path, tokens: int, out: dict, save, compile_layers: bool, g: Geometry, dev: str) -> None:
    """All-resident decode and the copy-bound cells (LRU K=3, 4; no prefetch; batch 1) on one
    32-layer engine with random weights under the trace's routing (the engine's expert path is
    decided in its warm-up, before capture)."""
    routing = Routing.from_trace(head_tokens(read_trace(trace), tokens), tokens)
    w = Weights(g, quant_spec("hqq2"), dev, pin=True, progress=True)
    t0 = time.perf_counter()
    program = Program(w, g.num_experts, routing.num_tokens, compile_kernels=compile_layers, progress=True)
    program.load_routing(routing)
    out["engine"] = {"fused": program.fused, "compiled_layers": compile_layers, "capture_s": time.perf_counter() - t0,
                     "tokens": routing.num_tokens, "trace": trace.name, "expert_blob_bytes": w.blob_bytes,
                     "expert_path": [r for r in expert_path.decisions() if r["batch"] == 1
                                     and (r["hidden"], r["ffn"]) == (g.hidden, g.ffn) and r["format"] == w.quant.name]}
    out["all_resident"] = all_resident(w, program, routing, tokens=min(32, tokens))
    save()
    cop = copy_repeats(dev, w.blob_bytes)
    out["copy"] = cop
    cells = {}
    for k in (3, 4):
        eng = OffloadedEngine(w, k, "lru", "none", program=program)
        eng.run(routing.head(8))   # warm-up
        res = eng.run(routing).to_dict()
        copy_ms = res["misses"] * cop["median_ms"]
        wall_ms = res["wall_s"] * 1e3
        cells[f"lru_k{k}"] = {"misses": res["misses"], "requests": res["requests"], "tokens": res["tokens"],
                              "ms_per_token": res["ms_per_token"], "wall_ms": wall_ms,
                              "gpu_ms_total": float(sum(res["token_ms"])), "violations": res["violations"],
                              "device_copies": res["device_copies"], "copy_ms_total": copy_ms,
                              "copy_bound_ratio": copy_ms / wall_ms}
        log(f"LRU K={k}: {res['ms_per_token']:.3f} ms/token, {res['misses']} misses x {cop['median_ms']:.4f} ms "
            f"= {copy_ms:.1f} ms of {wall_ms:.1f} ms -> {copy_ms / wall_ms:.3f}")
        save()
    out["cells"] = cells


def contract_keys(out: dict) -> None:
    """The keys CONTRACTS.md section 4 names, from whatever stages finished (a failed stage's keys are
    left out rather than invented)."""
    if "all_resident" in out:
        out["all_resident_ms_per_token"] = out["all_resident"]["median_ms_per_token"]
    rows = out.get("expert", {}).get("hqq2", {}).get("rows", [])
    # the engine's expert as it runs (its chosen path); runs before the path choice timed the fused one
    pieces = {f"expert_b{r['batch']}": r.get("engine_ms", r["fused_ms"]) for r in rows}
    if "layer" in out:
        pieces["layer_b1"] = out["layer"]["fused_ms"]
    out["pieces_ms"] = pieces
    if out.get("cells"):
        out["copy_bound_ratio"] = {c: v["copy_bound_ratio"] for c, v in out["cells"].items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--commit", required=True)
    ap.add_argument("--trace", type=Path, default=Path("traces/synth-mixtral-8x7b.parquet"))
    ap.add_argument("--tokens", type=int, default=None, help="trace tokens of the engine cells (default 96; smoke 6)")
    ap.add_argument("--formats", default="hqq2,hqq2-g64,hqq2-v02,hqq4",
                    help="expert formats whose pieces are timed (hqq2, the seed's, is the contract's)")
    ap.add_argument("--pieces-only", action="store_true",
                    help="skip the 32-layer engine runs; writes pieces_<gpu>.json (no contract keys)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="dry-run every stage on this CPU at the tiny geometry (no measurement)")
    args = ap.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: no CUDA device (use --cpu-smoke for a dry run on CPU)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    tokens = args.tokens or (6 if args.cpu_smoke else 96)
    dev = "cpu" if args.cpu_smoke else "cuda"
    g = Geometry.tiny(num_layers=MIXTRAL_8X7B.num_layers) if args.cpu_smoke else MIXTRAL_8X7B
    name = "cpu (smoke run)" if args.cpu_smoke else torch.cuda.get_device_name(0)
    short = "cpu-smoke" if args.cpu_smoke else "h200" if "H200" in name else "h100" if "H100" in name else "gpu"
    out: dict = {"device": name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": args.commit,
                 "torch": torch.__version__,
                 "triton": __import__("triton").__version__ if kernels.triton_available() else None,
                 "fused_kernels": kernels.active(dev), "geometry": {"hidden": g.hidden, "ffn": g.ffn}}
    path = args.out / f"{'pieces' if args.pieces_only else 'roofline'}_{short}.json"

    def save() -> None:
        contract_keys(out)   # a run killed by the time limit still brings back the keys it measured
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, path)

    def stage(key: str, fn) -> None:
        """One stage; a failure is recorded (and printed) and the next stage still runs."""
        try:
            res = fn()
            if res is not None:
                out[key] = res
        except Exception:   # noqa: BLE001 - a device run must bring back what it could measure
            out.setdefault("errors", {})[key] = traceback.format_exc()
            log(f"{key} FAILED:\n{out['errors'][key]}")
        save()

    stage("hbm_peak", lambda: hbm_peak(dev))
    stage("h2d_curve", lambda: h2d_curve(dev, SMOKE_H2D) if args.cpu_smoke else h2d_curve(dev))
    # the previous engine's compiled piece for the seed's format only (each compile takes seconds)
    stage("expert", lambda: {n: expert_pieces(n, n == "hqq2" and not args.cpu_smoke, g, dev)
                             for n in args.formats.split(",")})
    stage("layer", lambda: layer_piece(g, dev))
    out["fused_attention"] = kernels.fused_attention_status()
    stage("tuning", tuning_table)
    stage("expert_paths", expert_path.decisions)
    if args.pieces_only:
        return 1 if "errors" in out else 0
    stage("engine_runs", lambda: engine_runs(args.trace, tokens, out, save,
                                             bool(out.get("layer", {}).get("compiled")), g, dev))
    save()
    log(f"wrote {path}")
    return 1 if "errors" in out else 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
