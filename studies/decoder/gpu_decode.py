"""ONE device run of the gate-driven offloaded decoder at full Mixtral-8x7B geometry (random bf16 weights
built on the GPU through transformers), then the report's raw material:

1. build MixtralForCausalLM (bf16, random) on the GPU; quantize it with hqq (experts 2-bit g16, attention
   4-bit g64) into the engine's blobs, pinned; write the on-disk cache; reload from it (both timed);
2. capture the decoder program (CUDA graphs, torch.compile'd kernels);
3. micro-benchmarks: H2D copy curve, every piece's GPU time, the per-layer routing hand-off (a layer
   loop that waits for each gate's routing and runs the plan, minus the same loop queued without
   waiting), the host cost of issuing one expert copy, an all-resident replay (engine overhead);
4. cells: gate-driven decoding, policy x K x prefetcher, each run recorded (trace + per-step times);
   for non-speculative cells the recorded trace is replayed with routing forced (replay mode, same
   tokens, same kernels) on the same program.

Writes under --out: decoder_raw.json (rewritten after every cell) and traces.tar (the recorded traces
and their times side files). ``studies/decoder/make_report.py`` turns them into studies/decoder/decoder_h200.*.

    python3 studies/decoder/gpu_decode.py --out $OUT                 # the H200 run
    python3 studies/decoder/gpu_decode.py --cpu-check --out /tmp/x --tokens 4   # CPU smoke test (= --tiny --device cpu)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from moesim.engine.checkpoint import checkpoint_from_model  # noqa: E402
from moesim.engine.cuda import require_device  # noqa: E402
from moesim.engine.decode import Decoder  # noqa: E402
from moesim.engine.decoder_program import DecoderProgram  # noqa: E402
from moesim.engine.expert_store import ExpertStore  # noqa: E402
from moesim.engine.gpu_bench import cuda_ms as gpu_cuda_ms  # noqa: E402
from moesim.engine.pack import pack_checkpoint, pack_matrix  # noqa: E402
from moesim.engine.plan import CachePlan, Routing  # noqa: E402
from moesim.engine.recording import DecodeRecorder, times_path  # noqa: E402
from moesim.traces.format import read_trace  # noqa: E402

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def write(out: Path, name: str, obj) -> None:
    tmp = out / f".{name}.tmp"
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, out / name)


def build_model(tiny: bool, device: str):
    from transformers import MixtralConfig, MixtralForCausalLM

    if tiny:
        cfg = MixtralConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                            max_position_embeddings=512)
    else:   # Mixtral-8x7B's geometry
        cfg = MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                            max_position_embeddings=32768, rope_theta=1e6)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = MixtralForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def cuda_ms(fn, dev, reps: int = 20) -> float:
    """GPU time per call (gpu_bench.cuda_ms: queued behind a GPU sleep); CPU: wall time."""
    if dev.type == "cuda":
        return gpu_cuda_ms(fn, reps=reps)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) * 1e3 / reps


def h2d_curve(dev, expert_bytes: int) -> list[dict]:
    sizes = sorted({1 << 20, 4 << 20, 16 << 20, 64 << 20, expert_bytes, 128 << 20, 256 << 20})
    if dev.type != "cuda":   # CPU smoke test: host memcpy stands in for the copy engine
        sizes = sorted({1 << 20, 4 << 20, 8 << 20, max(expert_bytes, 1 << 12)})
        src, dst = torch.empty(max(sizes), dtype=torch.uint8), torch.empty(max(sizes), dtype=torch.uint8)
        out = []
        for n in sizes:
            t = time.perf_counter()
            for _ in range(4):
                dst[:n].copy_(src[:n])
            ms = (time.perf_counter() - t) * 1e3 / 4
            out.append({"bytes": n, "ms": ms, "gb_per_s": n / ms / 1e6})
        return out
    src = torch.empty(max(sizes), dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(max(sizes), dtype=torch.uint8, device=dev)
    stream = torch.cuda.Stream()
    out = []
    for n in sizes:
        with torch.cuda.stream(stream):
            dst[:n].copy_(src[:n], non_blocking=True)
        stream.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        reps = 8
        a.record(stream)
        for _ in range(reps):
            with torch.cuda.stream(stream):
                dst[:n].copy_(src[:n], non_blocking=True)
        b.record(stream)
        stream.synchronize()
        ms = a.elapsed_time(b) / reps
        out.append({"bytes": n, "ms": ms, "gb_per_s": n / ms / 1e6})
    log("h2d " + ", ".join(f"{r['bytes'] >> 20}MiB:{r['gb_per_s']:.1f}GB/s" for r in out))
    return out


def handoff_benchmark(prog: DecoderProgram, reps: int) -> dict:
    """Per-layer routing hand-off: a loop over the layers' attention+gate pieces that waits for each
    layer's routing and runs the plan's demand step (all hits: K = E, warmed), against the same loop
    queued without waiting. The difference per layer is what the gate-driven decoder pays on top."""
    s, d = prog.spec, prog.d
    L, k = s.num_layers, s.top_k
    plan = CachePlan.live(L, s.num_experts, k, s.num_experts, "lru")
    for layer in range(L):
        plan.demand(layer, list(range(s.num_experts)), -1)
    prog.set_input(1, 0)

    def queued() -> None:
        for layer in range(L):
            prog.attn[layer]()
        d.synchronize()

    now = [0]

    def waiting() -> None:
        for layer in range(L):
            prog.attn[layer]()
            ev = d.event(timing=False)
            ev.record()
            ev.synchronize()
            hand = prog.host_hand[layer].numpy()
            keys = [int(e) for e in hand[:k]]
            plan.demand(layer, keys, now[0], [float(w) for w in hand[k:2 * k]])
            plan.slots(layer, keys)
            now[0] += 1

    out = {}
    with torch.inference_mode():
        for name, fn in (("queued", queued), ("waiting", waiting)):
            fn()
            times = []
            for _ in range(reps):
                d.synchronize()
                t = time.perf_counter()
                fn()
                d.synchronize()
                times.append((time.perf_counter() - t) * 1e3)
            out[f"{name}_ms"] = float(np.median(times))
    out["handoff_ms_per_layer"] = max(out["waiting_ms"] - out["queued_ms"], 0.0) / L
    log(f"hand-off: {out}")
    return out


def miss_issue_benchmark(prog: DecoderProgram, store: ExpertStore, reps: int = 32) -> dict:
    """Host time to issue one expert copy (stream switch, event waits, the async copy, the ready event)."""
    dec = Decoder(prog, store, prog.max_slots, "lru")
    L = prog.spec.num_layers
    dec.ready = [[prog.d.event(timing=False) for _ in range(prog.max_slots)] for _ in range(L)]
    dec.free = [[None] * prog.max_slots for _ in range(L)]
    prog.d.synchronize()
    t = time.perf_counter()
    for i in range(reps):
        dec._copy(i % L, 0, i % prog.spec.num_experts)
    issue_ms = (time.perf_counter() - t) * 1e3 / reps
    prog.d.synchronize()
    log(f"miss issue: {issue_ms:.4f} ms host time per copy")
    return {"issue_ms": issue_ms}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="a small Mixtral (CPU smoke test)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, default=24, help="new tokens per cell")
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--policies", default="lru,lfu")
    ap.add_argument("--sizes", default="4,2,6")
    ap.add_argument("--prefetch", default="none,speculative,transition")
    ap.add_argument("--optimize", default="auto", choices=["auto", "yes", "no"],
                    help="hqq's proximal solver; auto: yes unless its projected time exceeds --quant-budget")
    ap.add_argument("--quant-budget", type=float, default=60.0, help="seconds allowed for quantizing")
    ap.add_argument("--cache-root", default="/tmp/moesim-qcache")
    ap.add_argument("--budget", type=float, default=270.0, help="stop starting new cells after this many s")
    ap.add_argument("--no-cache", action="store_true", help="skip writing and reloading the quantization cache")
    ap.add_argument("--diagnose", action="store_true",
                    help="only the host-time breakdown of gate vs replay cells (decoder_diag.json)")
    ap.add_argument("--cpu-check", action="store_true", help="the same as --tiny --device cpu")
    args = ap.parse_args()
    if args.cpu_check:
        args.tiny, args.device = True, "cpu"
    require_device(args.device, args.tiny, "gpu_decode.py")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    raw: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": platform.python_version(),
                 "torch": torch.__version__, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                 "tiny": args.tiny, "timings": {}, "cells": []}
    import transformers
    raw["transformers"] = transformers.__version__
    try:
        import hqq
        raw["hqq"] = getattr(hqq, "__version__", "installed")
    except ImportError:
        raw["hqq"] = None
    t = time.perf_counter()
    model = build_model(args.tiny, args.device)
    raw["timings"]["build_model_s"] = time.perf_counter() - t
    log(f"model built ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params) in {raw['timings']['build_model_s']:.1f}s")
    ckpt = checkpoint_from_model(model, cache_key=f"random-mixtral-bf16-seed0-tiny{args.tiny}")
    s = ckpt.spec
    # hqq's quantizer on one expert: decides the solver for the whole model within the budget
    efmt = "hqq2"
    from moesim.engine.quant import quant_spec
    t = time.perf_counter()
    for w in ckpt.expert(0, 0):
        pack_matrix(w, quant_spec(efmt), args.device, True)
    if cuda:
        torch.cuda.synchronize()
    per_expert = time.perf_counter() - t
    projected = per_expert * s.num_layers * s.num_experts
    optimize = args.optimize == "yes" or (args.optimize == "auto" and projected <= args.quant_budget)
    raw["quantizer"] = {"hqq_optimize_s_per_expert": per_expert, "projected_optimize_s": projected,
                        "optimize": optimize}
    log(f"hqq (optimize) {per_expert:.3f}s per expert, projected {projected:.0f}s: optimize={optimize}")
    cache_root = None if args.no_cache else Path(args.cache_root)
    if cache_root is not None:
        shutil.rmtree(cache_root, ignore_errors=True)
    packed = pack_checkpoint(ckpt, "hqq2", device=args.device, cache_root=cache_root, progress=True, pin=cuda,
                             optimize=optimize)
    raw["timings"].update(packed.timings)
    log(f"quantized in {packed.timings['quantize_s']:.1f}s, cache written in {packed.timings.get('cache_write_s', 0):.1f}s")
    ckpt.source.tensors.clear()   # drop the bf16 model: only the packed blobs go on
    del model
    if cache_root is not None:
        del packed
        if cuda:
            torch.cuda.empty_cache()
        # reload from the cache (what a second run does): the checkpoint object only names the cache
        from moesim.engine.checkpoint import Checkpoint, StateDict
        ck2 = Checkpoint(s, StateDict({}, "<cache>", f"random-mixtral-bf16-seed0-tiny{args.tiny}"), None,
                         "MixtralForCausalLM")
        packed = pack_checkpoint(ck2, "hqq2", device=args.device, cache_root=cache_root, progress=True, pin=cuda,
                                 optimize=optimize)
        raw["timings"]["cache_load_s"] = packed.timings["cache_load_s"]
        log(f"reloaded from the cache in {packed.timings['cache_load_s']:.1f}s (pinned: {cuda})")
    elif cuda:
        torch.cuda.empty_cache()
    store = ExpertStore.from_packed(packed, pin=cuda)
    raw["expert_bytes"] = store.expert_bytes
    raw["spec"] = {k: v for k, v in s.__dict__.items()}
    ctx = args.prompt_len + args.tokens + 8
    t = time.perf_counter()
    prog = DecoderProgram(packed, args.device, s.num_experts, predict_distance=1, compile_kernels=cuda,
                          max_context=ctx, progress=True)
    raw["timings"]["program_s"] = time.perf_counter() - t
    log(f"program ready in {raw['timings']['program_s']:.1f}s (graphs: {prog.graphs})")
    write(out, "decoder_raw.json", raw)
    if args.diagnose:
        return diagnose(prog, store, s, args, out, raw)

    # -- micro-benchmarks ---------------------------------------------------------------------------
    raw["h2d"] = h2d_curve(dev, store.expert_bytes)
    with torch.inference_mode():
        prog.set_input(1, 0)
        raw["pieces"] = {"embed_ms": cuda_ms(prog.embed, dev), "attn_ms": cuda_ms(prog.attn[1], dev),
                         "combine_ms": cuda_ms(prog.combine[1], dev), "predict_ms": cuda_ms(prog.predict[1], dev),
                         "expert_ms": cuda_ms(prog.expert[1][0][0], dev), "final_ms": cuda_ms(prog.final, dev)}
    log(f"pieces {raw['pieces']}")
    raw["handoff"] = handoff_benchmark(prog, 5)
    raw["miss_issue"] = miss_issue_benchmark(prog, store)
    write(out, "decoder_raw.json", raw)

    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(3, s.vocab, args.prompt_len)]
    raw["prompt"] = prompt
    # every expert resident (K = E, loaded before the clock): the per-token cost beyond the pieces
    res = Decoder(prog, store, s.num_experts, "lru").generate([prompt], args.tokens, stop_at_eos=False,
                                                             record_predictions=False, warm=True)
    routing = _routing_from(res, s)
    rep = Decoder(prog, store, s.num_experts, "lru").generate([prompt], args.tokens, forced=routing,
                                                             forced_tokens=res.token_ids, record_predictions=False,
                                                             warm=True)
    raw["all_resident"] = {"gate": _cell_dict(res), "replay": _cell_dict(rep)}
    log(f"all-resident: gate {res.summary()['decode_tokens_per_s']:.2f} tok/s, "
        f"replay {rep.summary()['decode_tokens_per_s']:.2f} tok/s")
    write(out, "decoder_raw.json", raw)

    # -- cells --------------------------------------------------------------------------------------
    traces = out / "traces"
    traces.mkdir(exist_ok=True)
    cells = [(p, int(k), f) for k in args.sizes.split(",") for f in args.prefetch.split(",")
             for p in args.policies.split(",")]
    for policy, k, pf in cells:
        if time.perf_counter() - T0 > args.budget:
            log(f"budget reached: {len(raw['cells'])} of {len(cells)} cells ran")
            break
        name = f"{policy}_K{k}_{pf}"
        path = traces / f"{name}.parquet"
        rec = DecodeRecorder(path, s, model_name="mixtral-8x7b-geometry-random-bf16", expert_format=store.fmt.name,
                             expert_bytes=store.expert_bytes, pred_distances=(1,) if pf == "speculative" else ())
        live = Decoder(prog, store, k, policy, pf).generate([prompt], args.tokens, stop_at_eos=False,
                                                           record_predictions=pf == "speculative", on_step=rec.on_step)
        rec.close(live.summary())
        cell = {"name": name, "policy": policy, "cache_size": k, "prefetch": pf, "gate": _cell_dict(live)}
        msg = f"{name:24s} gate {cell['gate']['steps_per_s']:.3f} steps/s hit={live.hit_rate:.3f} pf={live.prefetches}"
        # speculative cells replay from their recorded pred1 column
        routing = Routing.from_trace(read_trace(path))
        rep = Decoder(prog, store, k, policy, pf).generate([prompt], args.tokens, forced=routing,
                                                          forced_tokens=live.token_ids, record_predictions=False)
        cell["replay"] = _cell_dict(rep)
        cell["same_routing"] = bool((rep.hits, rep.prefetches) == (live.hits, live.prefetches))
        msg += (f" | replay {cell['replay']['steps_per_s']:.3f} steps/s hit={rep.hit_rate:.3f} "
                f"gate/replay={cell['gate']['steps_per_s'] / cell['replay']['steps_per_s']:.3f}")
        raw["cells"].append(cell)
        log(msg)
        with tarfile.open(out / "traces.tar", "a") as tar:   # grows cell by cell: a killed run keeps what ran
            for p in (path, times_path(path)):
                tar.add(p, arcname=p.name)
                p.unlink()
        write(out, "decoder_raw.json", raw)
    shutil.rmtree(traces)
    raw["timings"]["total_s"] = time.perf_counter() - T0
    write(out, "decoder_raw.json", raw)
    log("done")
    return 0


def diagnose(prog, store, s, args, out: Path, raw: dict) -> int:
    """Host time per layer by phase (wait for the gate, plan, copy issue, launches, GC), gate vs replay on
    the same routing, and gate with the garbage collector off."""
    import gc

    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(3, s.vocab, args.prompt_len)]
    raw["diagnose"] = []
    L = s.num_layers
    for policy, k in [(p, int(x)) for x in args.sizes.split(",") for p in args.policies.split(",")]:
        prof: dict = {}
        live = Decoder(prog, store, k, policy).generate([prompt], args.tokens, stop_at_eos=False,
                                                       record_predictions=False, profile=prof)
        routing = _routing_from(live, s)
        rprof: dict = {}
        rep = Decoder(prog, store, k, policy).generate([prompt], args.tokens, forced=routing,
                                                      forced_tokens=live.token_ids, record_predictions=False,
                                                      profile=rprof)
        gprof: dict = {}
        gc.disable()
        try:
            nogc = Decoder(prog, store, k, policy).generate([prompt], args.tokens, stop_at_eos=False,
                                                           record_predictions=False, profile=gprof)
        finally:
            gc.enable()
        n = len(live.steps) * L

        def per_layer(p: dict, n: int = n) -> dict:
            return {key: round(v * 1e6 / n, 2) for key, v in p.items()}
        row = {"policy": policy, "cache_size": k, "misses_per_layer": live.misses / n,
               "gate_step_ms": float(np.median([st.wall_ms for st in live.steps])),
               "replay_step_ms": float(np.median([st.wall_ms for st in rep.steps])),
               "gate_nogc_step_ms": float(np.median([st.wall_ms for st in nogc.steps])),
               "gate_us_per_layer": per_layer(prof), "replay_us_per_layer": per_layer(rprof),
               "gate_nogc_us_per_layer": per_layer(gprof)}
        raw["diagnose"].append(row)
        log(f"{policy} K={k}: {json.dumps(row)}")
        write(out, "decoder_raw.json", raw)
    log("done")
    return 0


def _routing_from(res, s) -> Routing:
    steps = res.steps
    T, L = len(steps), s.num_layers
    experts = np.stack([st.experts for st in steps]).astype(np.int64)
    weights = np.stack([st.weights for st in steps]).astype(np.float32)
    row = np.arange(T * L, dtype=np.int64).reshape(T, L)
    return Routing(experts, weights, row, np.array([st.seq for st in steps]), np.array([st.token for st in steps]),
                   s.num_experts)


def _cell_dict(res) -> dict:
    d = res.summary()
    d["steps_per_s"] = len(res.steps) / res.wall_s
    d["step_wall_ms"] = [st.wall_ms for st in res.steps]
    d["step_gpu_ms"] = [st.gpu_ms for st in res.steps]
    d["token_ids"] = res.token_ids
    return d


if __name__ == "__main__":
    raise SystemExit(main())
