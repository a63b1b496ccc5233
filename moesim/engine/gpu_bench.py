"""GPU micro-benchmarks for ``moesim calibrate`` (CUDA only; imported lazily).

Device times come from CUDA events after a GPU sleep, so the CPU has queued every repetition before
the first one runs: launch overhead is not counted (the engine's own dispatch cost is reported apart).
"""

from __future__ import annotations

import time
from collections.abc import Callable

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


H2D_SIZES = (64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 66748416, 128 << 20, 256 << 20, 512 << 20)


def h2d_curve(device: str = "cuda", sizes: tuple[int, ...] = H2D_SIZES) -> list[dict]:
    """Pinned host-to-device copy time per size, back to back on a copy stream (CUDA events); on CPU
    (a driver's smoke run) plain memory copies timed by the clock."""
    cuda = torch.device(device).type == "cuda"
    top = max(sizes)
    src = torch.empty(top, dtype=torch.uint8, pin_memory=cuda)
    dst = torch.empty(top, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream() if cuda else None
    out = []
    for n in sizes:
        reps = 20 if n <= (64 << 20) else 6

        def copy(n=n):
            if stream is None:
                dst[:n].copy_(src[:n])
                return
            with torch.cuda.stream(stream):
                dst[:n].copy_(src[:n], non_blocking=True)
        if stream is None:
            ms = device_seconds(copy, device, reps=reps) * 1e3
        else:
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


def calibrate(quants: list[str], compile_ok: bool, program: Program | None = None, h2d: bool = True,
              tokens: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
              contexts: tuple[int, ...] = (512, 1024, 2048, 4096)) -> dict:
    """Raw measurements: H2D curve, expert compute vs tokens per quantization (compiled kernels, GPU
    time), attention vs context (eager kernels: the slope), LM head, and, given the engine's
    ``program``, each captured piece of its decode step."""
    g = MIXTRAL_8X7B
    out: dict = {"h2d": h2d_curve() if h2d else [], "expert": {}, "attention": [], "lm_head_ms": None}
    for qn in quants:
        spec = quant_spec(qn)
        w1 = Weights(g.__class__(num_layers=1), spec, "cuda", pin=False)
        blob = torch.empty(w1.expert_bytes, dtype=torch.uint8, device="cuda")
        blob.copy_(w1.host[0][0][:w1.expert_bytes])
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
    for ctx in contexts:   # eager kernels; only the slope per cached token is used
        w1 = Weights(g.__class__(num_layers=1, max_context=ctx), quant_spec("hqq2"), "cuda", pin=False)
        pos = torch.tensor([ctx - 1], device="cuda")
        with torch.inference_mode():
            ms = cuda_ms(lambda w1=w1, pos=pos: attention_forward(
                x, w1.wq[0], w1.wk[0], w1.wv[0], w1.wo[0], w1.wg[0], w1.k_cache[0], w1.v_cache[0], pos,
                w1.positions, w1.geometry, w1.attn_quant))
        out["attention"].append({"context": ctx, "compiled": False, "ms": ms, "attn_quant": w1.attn_quant.name})
        if ctx == max(contexts):
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
    out.update(engine_terms("cuda", w.expert_bytes, layers=layers))
    return out


# ---- engine terms and copy spread (docs/timing.md, "Engine terms"); CPU-testable with tiny sizes -----

def device_seconds(fn, device: str, reps: int = 20, warm: int = 2) -> float:
    """Time per call of ``fn``: CUDA events after a GPU sleep on a GPU, perf_counter on CPU."""
    if torch.device(device).type == "cuda":
        return cuda_ms(fn, reps, warm) * 1e-3
    for _ in range(warm):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def busy_kernel(device: str, seconds: float):
    """A kernel that keeps the GPU busy ``seconds`` (``torch.cuda._sleep``, rate measured here), or on
    CPU a sleep: stands for the engine's layer and expert pieces in the stream benchmarks."""
    if torch.device(device).type == "cuda":
        probe = 1_000_000
        rate = probe / device_seconds(lambda: torch.cuda._sleep(probe), device, reps=5)   # cycles per second
        cycles = max(int(seconds * rate), 1)
        return lambda: torch.cuda._sleep(cycles)
    if seconds <= 0:
        return lambda: None
    return lambda: time.sleep(seconds)


def demand_chain_seconds(layers: int, misses: int, gate_s: float, copy_s: float, expert_s: float) -> float:
    """What the timing simulator charges for :func:`miss_issue`'s chain with no per-miss cost: per layer
    a gate on compute; ``misses`` copies on one copy stream, each after the gate (and after the last
    compute that read its slot); each expert after its copy, in order."""
    t = cfree = 0.0
    free = [0.0] * misses
    for _ in range(layers):
        t += gate_s
        ready = []
        for m in range(misses):
            cfree = max(cfree, t, free[m]) + copy_s
            ready.append(cfree)
        for m in range(misses):
            t = max(t, ready[m]) + expert_s
            free[m] = t
    return t


def host_copy_buffers(nbytes: int, count: int, device: str) -> list:
    """``count`` host buffers of ``nbytes`` (pinned on CUDA), each filled with its own byte pattern."""
    pin = torch.device(device).type == "cuda"
    bufs = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(count)]
    for i, b in enumerate(bufs):
        b.fill_(i % 251)
    return bufs


def copy_repeats(device: str = "cuda", nbytes: int = 66748416, repeats: int = 40, buffers: int = 8) -> dict:
    """Host->device copies of ``nbytes`` (one expert) timed one by one, back to back on a dedicated copy
    stream, from ``buffers`` different pinned buffers in turn (as the engine copies 256 different
    experts): the spread of one expert copy, for the calibration's interval."""
    from moesim.engine.runtime import Device

    d = Device(device)
    host = host_copy_buffers(nbytes, buffers, device)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=d.dev)
    for b in host[:2]:   # warm-up
        dst.copy_(b, non_blocking=True)
    d.synchronize()
    marks = []
    with d.copy_context():
        for i in range(repeats):
            a, b = d.event(), d.event()
            a.record(d.copy_stream)
            dst.copy_(host[i % buffers], non_blocking=True)
            b.record(d.copy_stream)
            marks.append((a, b))
    d.synchronize()
    ms = np.array([a.elapsed_time(b) for a, b in marks])
    out = {"bytes": int(nbytes), "buffers": int(buffers), "n": int(repeats), "ms": [round(float(x), 5) for x in ms],
           "median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
           "p90_ms": float(np.percentile(ms, 90)), "min_ms": float(ms.min()), "max_ms": float(ms.max())}
    log(f"expert copy x{repeats} ({buffers} buffers): median {out['median_ms']:.4f} ms, p10 {out['p10_ms']:.4f}, "
        f"p90 {out['p90_ms']:.4f}, min {out['min_ms']:.4f}, max {out['max_ms']:.4f} "
        f"({nbytes / out['median_ms'] / 1e6:.2f} GB/s)")
    return out


def demand_miss_chain(d, gate_fn: Callable[[], object], expert_fn: Callable[[], object], host: list, slots: list,
                      layers: int, misses: int, timing: bool = False, spacer: bool = False) -> None:
    """Issue the engine's demand-miss pattern once on Device ``d``: per layer ``gate_fn`` on compute,
    then ``misses`` copies from ``host`` (round robin) into ``slots`` on the copy stream, each waiting on
    the gate-done event and on its slot's free event, then per copy ``expert_fn`` on compute waiting on
    its ready event. ``timing``: the events record times (the engine's instrumented replay); ``spacer``:
    a one-cycle kernel between each wait on a copy and the expert piece."""
    free: list = [None] * misses
    for layer in range(layers):
        gate_fn()
        gate_done = d.event(timing=timing)
        gate_done.record()
        ready = []
        for m in range(misses):
            with d.copy_context():
                d.wait(gate_done, d.copy_stream)
                if free[m] is not None:
                    d.wait(free[m], d.copy_stream)
                slots[m].copy_(host[(layer * misses + m) % len(host)], non_blocking=True)
                ev = d.event(timing=timing)
                ev.record(d.copy_stream)
            ready.append(ev)
        for m in range(misses):
            d.wait(ready[m])
            if spacer and d.cuda:
                torch.cuda._sleep(1)
            expert_fn()
            fr = d.event(timing=timing)
            fr.record()
            free[m] = fr


def miss_issue(device: str = "cuda", nbytes: int = 66748416, layers: int = 32, misses: int = 2,
               gate_s: float = 0.2e-3, expert_s: float = 0.26e-3, buffers: int = 8, reps: int = 3) -> dict:
    """The engine's demand-miss pattern without the engine: per layer a gate kernel, then ``misses``
    expert copies on a copy stream that waits on the gate-done event and on the slot's free event, then
    per copy an expert kernel on compute waiting on its ready event (the events the engine records).
    ``miss_issue_s`` = (measured chain - the chain priced by the simulator's rules from the same
    kernels' and copies' back-to-back times) / misses: what each demand miss costs beyond its transfer.
    On a GPU the chain starts behind a GPU sleep (device-side cost only); ``unhidden_s`` is the same
    chain issued as the CPU goes (the host's issue cost shows where the GPU catches up)."""
    from moesim.engine.runtime import Device

    d = Device(device)
    host = host_copy_buffers(nbytes, buffers, device)
    slots = [torch.empty(nbytes, dtype=torch.uint8, device=d.dev) for _ in range(misses)]
    gate_fn, expert_fn = busy_kernel(device, gate_s), busy_kernel(device, expert_s)
    g_s = device_seconds(gate_fn, device)
    e_s = device_seconds(expert_fn, device)
    n_copy = 2 * buffers
    i_copy = iter(range(1 << 30))

    def one_copy():
        with d.copy_context():
            slots[0].copy_(host[next(i_copy) % buffers], non_blocking=True)
    c_s = device_seconds(one_copy, device, reps=n_copy)
    if d.cuda:   # the copy stream ran them: time them there (device_seconds timed the compute stream)
        a, b = d.event(), d.event()
        d.synchronize()
        with d.copy_context():
            a.record(d.copy_stream)
            for i in range(n_copy):
                slots[0].copy_(host[i % buffers], non_blocking=True)
            b.record(d.copy_stream)
        d.synchronize()
        c_s = a.elapsed_time(b) * 1e-3 / n_copy

    def chain():
        demand_miss_chain(d, gate_fn, expert_fn, host, slots, layers, misses)

    def timed(hide_host: bool) -> float:
        d.synchronize()
        if d.cuda and hide_host:
            torch.cuda._sleep(200_000_000)
        a, b = d.event(), d.event()
        a.record()
        chain()
        b.record()
        d.synchronize()
        return a.elapsed_time(b) * 1e-3

    timed(True)   # warm-up
    hidden = float(np.median([timed(True) for _ in range(reps)]))
    unhidden = float(np.median([timed(False) for _ in range(reps)]))
    ideal = demand_chain_seconds(layers, misses, g_s, c_s, e_s)
    n = layers * misses
    out = {"bytes": int(nbytes), "layers": layers, "misses_per_layer": misses, "gate_s": g_s, "expert_s": e_s,
           "copy_s": c_s, "chain_s": hidden, "chain_unhidden_s": unhidden, "ideal_s": ideal,
           "miss_issue_s": max((hidden - ideal) / n, 0.0), "unhidden_s": max((unhidden - ideal) / n, 0.0)}
    log(f"miss issue ({misses}/layer x {layers}): chain {hidden * 1e3:.3f} ms vs simulator {ideal * 1e3:.3f} ms -> "
        f"{out['miss_issue_s'] * 1e6:.1f} us per miss ({out['unhidden_s'] * 1e6:.1f} us issued as the CPU goes)")
    return out


def routing_handoff(device: str = "cuda", hidden: int = 4096, experts: int = 8, top_k: int = 2, layers: int = 32,
                    reps: int = 4) -> dict:
    """A gate-driven decoder's per-layer hand-off at Mixtral geometry: the gate (1 x hidden @ hidden x
    experts, bf16), softmax, top-k, and the ids and weights read back to the host (the CPU must know
    them before it issues the layer's copies and experts). ``routing_handoff_s`` = wall time per layer
    of gate + read-back - the GPU time of the gate kernels alone = the time the GPU sits idle between
    the gate and the next piece. On a GPU the gate is also replayed as one CUDA graph
    (``graph_handoff_s``, how a graph-captured engine runs it: the field uses that one when it exists)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    x = torch.randn(1, hidden, dtype=torch.bfloat16, device=dev)
    wg = torch.randn(experts, hidden, dtype=torch.bfloat16, device=dev) * 0.02
    host = torch.empty(2, top_k, dtype=torch.float32, pin_memory=cuda)
    out_buf = torch.empty(2, top_k, dtype=torch.float32, device=dev)

    def gate():
        p = torch.softmax((x @ wg.T).float(), dim=-1)
        w, i = torch.topk(p, top_k, dim=-1)
        out_buf[0].copy_(w[0])
        out_buf[1].copy_(i[0].float())

    def handoff_loop(step) -> float:
        n = layers * reps
        if cuda:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(n):
            step()
            host.copy_(out_buf, non_blocking=cuda)
            if cuda:
                torch.cuda.current_stream(dev).synchronize()
            ids = host[1].tolist()   # the CPU's decision: which experts to copy and run
            assert len(ids) == top_k
        return (time.perf_counter() - t0) / n

    with torch.inference_mode():
        gpu_s = device_seconds(gate, device)
        handoff_loop(gate)   # warm-up
        eager = float(np.median([handoff_loop(gate) for _ in range(3)]))
        out = {"hidden": hidden, "experts": experts, "top_k": top_k, "gate_gpu_s": gpu_s, "eager_wall_s": eager,
               "eager_handoff_s": max(eager - gpu_s, 0.0)}
        if cuda:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                gate()
            torch.cuda.synchronize(dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                gate()
            g_gpu = device_seconds(graph.replay, device)
            handoff_loop(graph.replay)
            g_wall = float(np.median([handoff_loop(graph.replay) for _ in range(3)]))
            out.update({"graph_gate_gpu_s": g_gpu, "graph_wall_s": g_wall, "graph_handoff_s": max(g_wall - g_gpu, 0.0)})
    out["routing_handoff_s"] = out.get("graph_handoff_s", out["eager_handoff_s"])
    log(f"routing hand-off (gate {hidden}x{experts}, top-{top_k}, read-back): {out['routing_handoff_s'] * 1e6:.1f} us "
        f"per layer (eager {out['eager_handoff_s'] * 1e6:.1f} us; gate GPU {gpu_s * 1e6:.1f} us)")
    return out


def engine_terms(device: str = "cuda", nbytes: int = 66748416, layers: int = 32, copies: int = 40,
                 buffers: int = 8) -> dict:
    """The raw file's ``engine_terms`` and ``copy_repeats`` (``calibration.to_cost_model`` reads them)."""
    return {"copy_repeats": copy_repeats(device, nbytes, copies, buffers),
            "engine_terms": {"miss_issue": miss_issue(device, nbytes, layers, buffers=buffers),
                             "routing_handoff": routing_handoff(device, layers=layers),
                             "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}


def batch_pieces(prog, steps, routing, cpu: bool) -> dict:
    """A batch program's captured pieces (GPU time, replayed back to back) at each context bucket and
    token bucket its steps use, and an all-resident run of its steps (K = E, warm): the excess of that
    run over its pieces is the per-step engine overhead (moesim.engine.calibration.batch_cost). ``prog``: a
    :class:`~moesim.engine.batch.BatchProgram` of ``num_experts`` slots; ``cpu``: counts only, no GPU times."""
    from moesim.engine.batch import BatchEngine, token_bucket

    g = prog.w.geometry
    eng = BatchEngine(prog, g.num_experts, "lru")
    eng.run(steps, routing, warm=True)   # warm-up (captures the pieces)
    res = eng.run(steps, routing, warm=True)
    buckets = sorted(set(res.buckets))
    out = {"rows": prog.rows, "phase": "prefill" if prog.prefill else "decode", "steps": len(steps),
           "tokens": res.tokens, "requests": res.requests, "step_buckets": res.buckets,
           "token_buckets": prog.token_buckets, "all_resident_step_ms": res.token_ms,
           "all_resident_gpu_ms_total": float(sum(res.token_ms)),
           "expert_calls": {str(nb): 0 for nb in prog.token_buckets}}
    for st in steps:
        for cnt in st.counts.values():
            for c in cnt.values():
                out["expert_calls"][str(token_bucket(c, prog.rows))] += 1
    if cpu:
        return out
    with torch.inference_mode():
        out["layer0_ms"] = {str(b): cuda_ms(prog.layer[0][b], reps=32) for b in buckets}
        out["layer_ms"] = {str(b): cuda_ms(prog.layer[1][b], reps=32) for b in buckets}
        out["expert_ms"] = {str(nb): cuda_ms(prog.expert[1][0][nb], reps=32) for nb in prog.token_buckets}
        out["final_ms"] = cuda_ms(prog.final, reps=32)
    prog.reset_proof()
    log(f"batch pieces {out['phase']}{prog.rows}: layer {out['layer_ms']} expert {out['expert_ms']} final "
        f"{out['final_ms']:.4f}; all-resident {out['all_resident_gpu_ms_total'] / len(steps):.2f} ms/step")
    return out
