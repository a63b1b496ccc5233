"""Second device run for studies/miss_cost/miss_cost_h200.md: what a cross-stream hop costs, at stream level.

The engine's demand pattern without the engine (as ``gpu_bench.miss_issue``): per layer a gate piece
on compute, two expert-size copies on a copy stream (each waiting on the gate-done event and on its
slot's free event), each expert piece on compute waiting on its copy's ready event; 32 layers. The
chain is timed by CUDA events around it and compared with the same chain priced from the pieces'
and copies' back-to-back times (``gpu_bench.demand_chain_seconds``); the excess per layer is what the
hops cost. One thing varies at a time:

- pieces: ``kernel`` (one ``torch.cuda._sleep`` kernel, as ``miss_issue``), ``graph`` (the same kernel
  captured as a CUDA graph, replayed as the engine replays its pieces), ``graph8`` (a graph of 8
  kernels of 1/8 the time: a multi-kernel piece);
- events: ``plain`` (``enable_timing=False``, the engine's plain replay) or ``timing`` (enabled, as its
  instrumented replay records them);
- issue: ``hidden`` (the whole chain queued behind a GPU sleep) or ``live`` (issued as the CPU goes);
- ``spacer``: a one-cycle kernel between each wait on a copy and the expert piece.

Also: the compiled expert (hqq2, Mixtral geometry) on a 16-byte-aligned and on an 8-byte-aligned slot,
GPU time: Inductor copies a misaligned input to an aligned buffer first.

Writes ``$OUT/stream_hops.json``. ``--cpu-check`` runs it on CPU with tiny sizes (tests the script).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from moesim.engine.gpu_bench import (  # noqa: E402
    busy_kernel,
    demand_chain_seconds,
    demand_miss_chain,
    device_seconds,
    host_copy_buffers,
    log,
)
from moesim.engine.runtime import Device  # noqa: E402


def piece(device: str, seconds: float, kind: str):
    """A compute piece of ``seconds`` GPU time: one sleep kernel, or a CUDA graph of 1 or 8 of them."""
    if kind == "kernel" or torch.device(device).type != "cuda":
        return busy_kernel(device, seconds)
    parts = 8 if kind == "graph8" else 1
    fn = busy_kernel(device, seconds / parts)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(parts):
            fn()
    piece.keep.append(graph)
    return graph.replay


piece.keep = []   # captured graphs stay alive for the run


def chain_excess(device: str, pieces_kind: str, timing: bool, hidden: bool, spacer: bool, nbytes: int,
                 layers: int = 32, misses: int = 2, gate_s: float = 0.2e-3, expert_s: float = 0.26e-3,
                 buffers: int = 8, reps: int = 3, host=None, slots=None) -> dict:
    d = Device(device)
    gate_fn, expert_fn = piece(device, gate_s, pieces_kind), piece(device, expert_s, pieces_kind)
    g_s = device_seconds(gate_fn, device)
    e_s = device_seconds(expert_fn, device)
    a, b = d.event(), d.event()
    d.synchronize()
    with d.copy_context():
        a.record(d.copy_stream)
        for i in range(2 * buffers):
            slots[0].copy_(host[i % buffers], non_blocking=True)
        b.record(d.copy_stream)
    d.synchronize()
    c_s = a.elapsed_time(b) * 1e-3 / (2 * buffers)

    def chain():
        demand_miss_chain(d, gate_fn, expert_fn, host[:buffers], slots, layers, misses, timing, spacer)

    def timed() -> float:
        d.synchronize()
        if d.cuda and hidden:
            torch.cuda._sleep(200_000_000)
        t0, t1 = d.event(), d.event()
        t0.record()
        chain()
        t1.record()
        d.synchronize()
        return t0.elapsed_time(t1) * 1e-3

    timed()
    runs = [timed() for _ in range(reps)]
    measured = float(np.median(runs))
    ideal = demand_chain_seconds(layers, misses, g_s, c_s, e_s)
    out = {"pieces": pieces_kind, "events": "timing" if timing else "plain", "issue": "hidden" if hidden else "live",
           "spacer": spacer, "gate_s": g_s, "expert_s": e_s, "copy_s": c_s, "chain_s": measured, "runs_s": runs,
           "ideal_s": ideal, "excess_per_layer_us": (measured - ideal) / layers * 1e6}
    log(f"{pieces_kind:6s} {out['events']:6s} {out['issue']:6s} spacer={spacer!s:5s}: chain {measured * 1e3:8.3f} ms, "
        f"ideal {ideal * 1e3:8.3f} -> {out['excess_per_layer_us']:7.1f} us per layer")
    return out


def alignment(device: str) -> dict:
    """The compiled hqq2 expert at Mixtral geometry on an aligned and on a misaligned (8 mod 16) slot."""
    from moesim.engine.quant import fill_random_blob, quant_spec
    from moesim.engine.runtime import compiled, expert_forward

    cuda = torch.device(device).type == "cuda"
    hidden, ffn = (4096, 14336) if cuda else (128, 256)
    spec = quant_spec("hqq2")
    n = spec.expert_bytes(hidden, ffn)
    fn = compiled(expert_forward) if cuda else expert_forward
    x = torch.randn(1, hidden, dtype=torch.bfloat16, device=device)
    out = {"expert_bytes": n}
    for name, stride in (("aligned_16", -(-(n + 8) // 16) * 16), ("misaligned_8", n + 8)):
        buf = torch.zeros(2, stride, dtype=torch.uint8, device=device)
        fill_random_blob(buf[0, :n], spec, hidden * ffn)
        buf[1, :n].copy_(buf[0, :n])
        with torch.inference_mode():
            for row in (0, 1):
                blob = buf[row]
                out[f"{name}_row{row}_ms"] = device_seconds(lambda blob=blob: fn(blob, x, spec, hidden, ffn),
                                                            device, reps=20) * 1e3
                out[f"{name}_row{row}_ptr_mod16"] = blob.data_ptr() % 16
    log(f"alignment: {out}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu-check", action="store_true")
    args = ap.parse_args()
    if not args.cpu_check:
        from moesim.engine.cuda import exit_unless_cuda

        exit_unless_cuda("gpu_stream_hops.py")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cuda = not args.cpu_check
    device = "cuda" if cuda else "cpu"
    nbytes = 66748416 if cuda else 1 << 16
    layers = 32 if cuda else 3
    result = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv),
              "bytes": nbytes, "layers": layers, "chains": []}
    d = Device(device)
    host = host_copy_buffers(nbytes, 8, device)
    slots = [torch.empty(nbytes, dtype=torch.uint8, device=d.dev) for _ in range(2)]
    cases = []
    for kind in ("kernel", "graph", "graph8"):
        for timing in (False, True):
            for hidden in (True, False):
                cases.append((kind, timing, hidden, False))
    cases += [("graph", False, False, True), ("graph8", False, False, True), ("kernel", False, False, True)]
    for rep in range(2):
        for kind, timing, hidden, spacer in cases:
            r = chain_excess(device, kind, timing, hidden, spacer, nbytes, layers=layers, host=host, slots=slots,
                             expert_s=0.26e-3 if cuda else 0.0, gate_s=0.2e-3 if cuda else 0.0)
            r["repeat"] = rep
            result["chains"].append(r)
            (out_dir / "stream_hops.json").write_text(json.dumps(result, indent=1))
    try:
        result["alignment"] = alignment(device)
    except Exception as exc:   # noqa: BLE001 - recorded; the chains are the main result
        result["alignment_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        log(result["alignment_error"])
    (out_dir / "stream_hops.json").write_text(json.dumps(result, indent=1))
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
