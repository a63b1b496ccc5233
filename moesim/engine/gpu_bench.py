"""GPU micro-benchmarks for ``moesim calibrate`` (CUDA only; imported lazily).

Device times come from CUDA events after a GPU sleep, so the CPU has queued every repetition before
the first one runs: launch overhead is not counted (the engine's own dispatch cost is reported apart).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from moesim.engine.quant import quant_spec
from moesim.engine.runtime import MIXTRAL_8X7B, Program, Weights, attention_forward, compiled, expert_forward

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def cuda_ms(fn, reps: int = 10, warm: int = 2) -> float:
    """GPU time per call: a GPU sleep first lets the CPU queue every rep, so launch cost is hidden."""
    for _ in range(warm):
        fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def h2d_curve() -> list[dict]:
    sizes = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 66748416, 128 << 20, 256 << 20, 512 << 20]
    src = torch.empty(512 << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    out = []
    for n in sizes:
        reps = 20 if n <= (64 << 20) else 6

        def copy(n=n):
            with torch.cuda.stream(stream):
                dst[:n].copy_(src[:n], non_blocking=True)
        for _ in range(2):
            copy()
        stream.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(stream)
        for _ in range(reps):
            copy()
        b.record(stream)
        stream.synchronize()
        ms = a.elapsed_time(b) / reps
        out.append({"bytes": n, "ms": ms, "gb_per_s": n / ms / 1e6})
        log(f"h2d {n:>10d} B  {ms:8.4f} ms  {n / ms / 1e6:7.2f} GB/s")
    return out


def graph_pieces(program: Program) -> dict:
    """GPU time of each captured piece of the engine's decode step, replayed back to back (so the
    gap between two graph launches on the GPU is included, as in the engine)."""
    with torch.inference_mode():
        out = {
            "first_ms": cuda_ms(program.first, reps=64),
            "layer_ms": cuda_ms(program.layer[1], reps=64),
            "expert_ms": cuda_ms(program.expert[1][0][0], reps=64),
            "final_ms": cuda_ms(program.final, reps=64),
        }
    out["graphs"] = program.graphs
    log(f"graph pieces: {out}")
    return out


def calibrate(quants: list[str], compile_ok: bool, program: Program | None = None, h2d: bool = True) -> dict:
    """Raw measurements: H2D curve, expert compute vs tokens per quantization (compiled kernels, GPU
    time), attention vs context (eager kernels: the slope), LM head, and, given the engine's
    ``program``, each captured piece of its decode step."""
    g = MIXTRAL_8X7B
    out: dict = {"h2d": h2d_curve() if h2d else [], "expert": {}, "attention": [], "lm_head_ms": None}
    tokens = [1, 2, 4, 8, 16, 32, 64]
    for qn in quants:
        spec = quant_spec(qn)
        w1 = Weights(g.__class__(num_layers=1), spec, "cuda", pin=False)
        blob = torch.empty(w1.expert_bytes, dtype=torch.uint8, device="cuda")
        blob.copy_(w1.host[0][0])
        for comp in ([False, True] if (compile_ok and not spec.is_bf16) else [False]):
            fn = compiled(expert_forward) if comp else expert_forward
            rows = []
            for n in tokens:
                x = torch.randn(n, g.hidden, dtype=torch.bfloat16, device="cuda")
                with torch.inference_mode():
                    ms = cuda_ms(lambda x=x, fn=fn, blob=blob, spec=spec: fn(blob, x, spec, g.hidden, g.ffn))
                rows.append({"tokens": n, "ms": ms})
            key = f"{qn}{'+compile' if comp else ''}"
            out["expert"][key] = {"expert_bytes": w1.expert_bytes, "curve": rows}
            log(f"expert {key}: " + ", ".join(f"{r['tokens']}:{r['ms']:.3f}" for r in rows))
        del w1, blob
        torch.cuda.empty_cache()
    x = torch.randn(1, g.hidden, dtype=torch.bfloat16, device="cuda")
    for ctx in [512, 1024, 2048, 4096]:   # eager kernels; only the slope per cached token is used
        w1 = Weights(g.__class__(num_layers=1, max_context=ctx), quant_spec("hqq2"), "cuda", pin=False)
        pos = torch.tensor([ctx - 1], device="cuda")
        with torch.inference_mode():
            ms = cuda_ms(lambda w1=w1, pos=pos: attention_forward(
                x, w1.wq[0], w1.wk[0], w1.wv[0], w1.wo[0], w1.wg[0], w1.k_cache[0], w1.v_cache[0], pos,
                w1.positions, w1.geometry, w1.attn_quant))
        out["attention"].append({"context": ctx, "compiled": False, "ms": ms, "attn_quant": w1.attn_quant.name})
        if ctx == 4096:
            with torch.inference_mode():
                out["lm_head_ms"] = cuda_ms(lambda w1=w1: x @ w1.lm_head.T)
        del w1
    torch.cuda.empty_cache()
    log(f"attention+gate (eager) {out['attention']}  lm_head {out['lm_head_ms']:.4f} ms")
    if program is not None:
        out["graph"] = graph_pieces(program)
    return out


def compile_works() -> bool:
    """Does torch.compile build the fused expert here, and agree with eager?"""
    compile_ok = True
    try:
        spec = quant_spec("hqq2")
        hidden, ffn = 128, 256
        blob = torch.empty(spec.expert_bytes(hidden, ffn), dtype=torch.uint8, device="cuda")
        from moesim.engine.quant import fill_random_blob
        fill_random_blob(blob, spec, hidden * ffn)
        x = torch.randn(1, hidden, dtype=torch.bfloat16, device="cuda")
        ref = expert_forward(blob, x, spec, hidden, ffn).float()
        got = compiled(expert_forward)(blob, x, spec, hidden, ffn).float()
        compile_ok = bool((ref - got).abs().max() <= 2e-2 * float(ref.abs().max()))   # bf16 rounding order
        log(f"torch.compile expert ok={compile_ok} max|diff|={float((ref - got).abs().max()):.3g}")
    except Exception as exc:   # noqa: BLE001 - recorded, eager fallback
        compile_ok = False
        log(f"torch.compile failed: {type(exc).__name__}: {str(exc)[:300]}")
    return compile_ok


def all_resident(weights: Weights, program: Program, routing, tokens: int = 32) -> dict:
    """Every expert resident (K = E, warm, untimed pre-load): the compute-only floor, whose excess over
    the sum of its pieces is the engine's per-token overhead (``calibration.to_cost_model``)."""
    from moesim.engine.runtime import OffloadedEngine

    g = weights.geometry
    eng = OffloadedEngine(weights, g.num_experts, "lru", "none", program=program)
    head = routing.head(min(tokens, routing.num_tokens))
    eng.run(head, warm=True)   # warm-up
    res = eng.run(head, warm=True)
    free = eng.run(head, warm=True, sync_tokens=False)   # for the record: the CPU queueing tokens ahead
    out = {"layers": g.num_layers, "tokens": res.tokens, "requests": res.requests,
           "gpu_ms_total": float(sum(res.token_ms)), "wall_ms": res.wall_s * 1e3,
           "cpu_issue_ms": float(sum(res.token_issue_ms)), "median_ms_per_token": float(np.median(res.token_ms)),
           "nosync_gpu_ms_total": float(sum(free.token_ms)), "nosync_wall_ms": free.wall_s * 1e3}
    log(f"all-resident ms/token {out['median_ms_per_token']:.3f} (GPU {out['gpu_ms_total']:.1f} ms, CPU issue "
        f"{out['cpu_issue_ms']:.1f} ms for {res.tokens} tokens; without the per-token wait: GPU "
        f"{out['nosync_gpu_ms_total']:.1f} ms)")
    return out


def measure(quants: list[str], layers: int = 32, seed: int = 0) -> dict:
    """Everything ``moesim calibrate`` needs: the micro-benchmarks, the engine's captured pieces and an
    all-resident run on a ``layers``-layer Mixtral-geometry engine (8 slots per layer: ~0.53 GB of GPU
    memory per layer for hqq2) under random top-2 routing."""
    from dataclasses import replace

    from moesim.engine.plan import Routing

    ok = compile_works()
    g = replace(MIXTRAL_8X7B, num_layers=layers)
    w = Weights(g, quant_spec("hqq2"), "cuda", pin=False)
    T = 32
    rng = np.random.default_rng(seed)
    experts = np.argsort(rng.random((T, layers, g.num_experts)), axis=-1)[..., : g.top_k]
    weights = rng.dirichlet(np.ones(g.top_k), size=(T, layers)).astype(np.float32)
    routing = Routing(experts, weights, np.arange(T * layers).reshape(T, layers), np.zeros(T, np.int64),
                      np.arange(T), g.num_experts)
    program = Program(w, g.num_experts, T, compile_kernels=ok)
    program.load_routing(routing)
    out = calibrate(quants, ok, program)
    out["compile_ok"] = ok
    out["engine_quantization"] = "hqq2"
    out["all_resident"] = all_resident(w, program, routing)
    return out
