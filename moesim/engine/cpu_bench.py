"""The CPU half of calibration (issue 24): one expert FFN (SwiGLU: w2(silu(w1 x) * w3 x)) on this
machine's CPU with torch's own CPU kernels, per weight format, tokens and threads; no GPU needed.

Formats: ``int8`` weight-only (``aten._weight_int8pack_mm``: int8 weights, one bf16 scale per output
row), ``int4`` weight-only (``aten._weight_int4pack_mm_for_cpu``, groups of 32, bf16 scale and zero),
``bf16`` (plain matmul). The weights are random: the kernels' time does not depend on the values.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from moesim.errors import SettingError

FORMATS = ("int8", "int4", "bf16")
MIXTRAL_GEOMETRY = (4096, 14336)
INT4_GROUP = 32
# idle gaps before a CPU expert (seconds): between a layer's CPU experts and the next layer's the workers
# wait for the GPU's attention (~0.1 ms); between tokens of n-cpu-moe, for every GPU layer (tens of ms)
IDLE_GAPS_S = (0.0002, 0.001, 0.005, 0.02, 0.05)


def parse_geometry(text: str) -> tuple[int, int]:
    """``HIDDENxFFN`` (e.g. 4096x14336) as two ints, each a positive multiple of 64."""
    try:
        hidden, ffn = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SettingError("geometry", f"geometry {text!r} is not HIDDENxFFN, e.g. 4096x14336") from None
    if hidden < 64 or ffn < 64 or hidden % 64 or ffn % 64:
        raise SettingError("geometry", f"geometry {text!r}: both sizes must be positive multiples of 64")
    return hidden, ffn


def quantized_linear(fmt: str, w) -> Callable:
    """y = x @ w.T with the float weight ``w`` (out, in) held in ``fmt``, as torch's CPU kernel for that
    format runs it: int8 symmetric per output row; int4 asymmetric per group of 32 inputs (torch's
    layout: q in 0..15, w = (q - 8) x scale + zero); bf16 as is."""
    import torch

    w = w.float()
    if fmt == "bf16":
        wb = w.to(torch.bfloat16)
        return lambda x: x @ wb.T
    if fmt == "int8":
        w8, sb = int8_rows(w)
        return lambda x: torch.ops.aten._weight_int8pack_mm(x, w8, sb)
    if fmt == "int4":
        n_out, n_in = w.shape
        g = w.reshape(n_out, n_in // INT4_GROUP, INT4_GROUP)
        lo, hi = g.amin(2), g.amax(2)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        zero = lo + scale * 8
        q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n_out, n_in)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        sz = torch.stack([scale, zero], 2).transpose(0, 1).contiguous().to(torch.bfloat16)   # (in/32, out, 2)
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, INT4_GROUP, sz)
    raise SettingError("formats", f"unknown CPU format {fmt!r} (known: {', '.join(FORMATS)})")


def int8_rows(w):
    """``w`` (out, in) as torch's int8 weight-only layout: int8 weights symmetric per output row and one
    bf16 scale per row (``aten._weight_int8pack_mm(x, w8, scales)`` computes x @ w.T)."""
    import torch

    w = w.float()
    scales = w.abs().amax(1).clamp(min=1e-8) / 127
    w8 = (w / scales[:, None]).round().clamp(-128, 127).to(torch.int8)
    return w8, scales.to(torch.bfloat16)


def expert_ffn(fmt: str, hidden: int, ffn: int, seed: int = 0) -> Callable:
    """One expert's SwiGLU FFN with random weights in ``fmt``: x (tokens, hidden) bf16 -> (tokens, hidden)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    w1, w3, w2 = (quantized_linear(fmt, torch.randn(o, i, generator=gen) * 0.02)
                  for o, i in ((ffn, hidden), (ffn, hidden), (hidden, ffn)))
    return lambda x: w2(torch.nn.functional.silu(w1(x)) * w3(x))


def time_call(fn: Callable, x, repeats: int) -> list[float]:
    """Wall time of ``fn(x)``, ``repeats`` times after two warm-up calls."""
    for _ in range(2):
        fn(x)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t0)
    return out


def on_a_worker_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` on a fresh thread (as hybrid execution's CPU worker runs its experts), its result back."""
    import threading

    out: list[Any] = []
    th = threading.Thread(target=lambda: out.append(fn()))
    th.start()
    th.join()
    if not out:
        raise RuntimeError("the CPU benchmark thread failed")
    return out[0]


def beside_copies(cpu_calls: Callable[[], list[float]], copy_once: Callable[[], None]) -> tuple[list[float], list[float]]:
    """``cpu_calls()`` (CPU experts timed one by one) on a worker thread while this thread runs
    ``copy_once()`` (one host-to-device copy, issue to completion) back to back until it is done, as a
    copy-bound hybrid run does: both read host memory. Returns the CPU calls' seconds and each copy's."""
    import threading

    started, done, result, copies = threading.Event(), threading.Event(), [], []

    def worker() -> None:
        try:
            started.wait()   # the copies have begun: on a loaded host the CPU calls could else end first
            result.append(cpu_calls())
        finally:
            done.set()
    th = threading.Thread(target=worker)
    th.start()
    started.set()
    while True:   # at least one copy, each one begun while the CPU calls run
        t0 = time.perf_counter()
        copy_once()
        copies.append(time.perf_counter() - t0)
        if done.is_set():
            break
    th.join()
    if not result:
        raise RuntimeError("the CPU benchmark thread failed")
    return result[0], copies


def alone_and_beside(cpu_calls: Callable[[], list[float]], copy_once: Callable[[], None],
                     rounds: int = 2) -> dict[str, list[float]]:
    """Alternating rounds of ``cpu_calls`` alone (on a worker thread), beside running copies, and as many
    copies alone (at least 8), so a drift of the host shows in all three; every call's and copy's seconds."""
    out: dict[str, list[float]] = {"alone_s": [], "beside_copies_s": [], "copies_beside_cpu_s": [],
                                   "copies_alone_s": []}
    for _ in range(rounds):
        out["alone_s"] += on_a_worker_thread(cpu_calls)
        beside, copies = beside_copies(cpu_calls, copy_once)
        out["beside_copies_s"] += beside
        out["copies_beside_cpu_s"] += copies
        for _ in range(max(len(copies), 8)):
            t0 = time.perf_counter()
            copy_once()
            out["copies_alone_s"].append(time.perf_counter() - t0)
    return out


def after_idle(call: Callable[[], Any], threads: int | None = None, gaps_s: Sequence[float] = IDLE_GAPS_S,
               calls: int = 16, rounds: int = 2) -> dict[str, Any]:
    """``call()`` (one CPU expert) on a worker thread, as the engine's CPU worker runs it: ``calls`` times
    back to back, then ``calls`` times after sleeping each gap (a CPU worker waiting for the GPU), the
    gaps in turn and reversed every other round, so a drift of the host shows in all. ``threads``: the
    torch threads the worker sets first (None: leave them). Returns every call's seconds and every
    sleep's measured length."""
    def rounds_on_worker() -> dict[str, Any]:
        import contextlib

        ctx: Any = contextlib.nullcontext()
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
            ctx = torch.inference_mode()
        out: dict[str, Any] = {"gaps_s": list(gaps_s), "back_to_back_s": [],
                               "after_gap_s": [[] for _ in gaps_s], "slept_s": [[] for _ in gaps_s]}
        with ctx:
            call()   # the worker's thread pool starts
            for r in range(rounds):
                for _ in range(calls):
                    t0 = time.perf_counter()
                    call()
                    out["back_to_back_s"].append(time.perf_counter() - t0)
                for j in (reversed if r % 2 else list)(range(len(gaps_s))):
                    for _ in range(calls):
                        t0 = time.perf_counter()
                        time.sleep(gaps_s[j])
                        t1 = time.perf_counter()
                        call()
                        out["after_gap_s"][j].append(time.perf_counter() - t1)
                        out["slept_s"][j].append(t1 - t0)
        return out
    return on_a_worker_thread(rounds_on_worker)


def after_idle_curve(m: dict[str, Any]) -> list[list[float]]:
    """The cost model's ``after_idle`` curve from :func:`after_idle`: per gap, [median measured sleep,
    median call after it - median back-to-back call, at least 0]."""
    base = statistics.median(m["back_to_back_s"])
    return [[statistics.median(slept), max(0.0, statistics.median(calls) - base)]
            for slept, calls in zip(m["slept_s"], m["after_gap_s"], strict=True)]


def copy_once_fn(src, dst) -> Callable[[], None]:
    """One copy of ``src`` into ``dst``, waited for: on a side stream when ``dst`` is on a GPU (the
    engine's copies run beside its compute), else a plain memory copy (a CPU smoke run)."""
    import torch

    stream = torch.cuda.Stream(dst.device) if dst.device.type == "cuda" else None

    def copy_once() -> None:
        if stream is None:
            dst.copy_(src)
            return
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        stream.synchronize()
    return copy_once


def pinned_copy(nbytes: int) -> Callable[[], None] | None:
    """One host-to-device copy of a pinned ``nbytes`` blob (:func:`copy_once_fn`); None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    return copy_once_fn(torch.empty(nbytes, dtype=torch.uint8, pin_memory=True),
                        torch.empty(nbytes, dtype=torch.uint8, device="cuda"))


def measure_after_idle(fmt: str, geometry: tuple[int, int], threads: int, calls: int = 16) -> dict[str, Any]:
    """One-token ``fmt`` experts on ``threads`` threads back to back and after idle gaps (:func:`after_idle`)."""
    import torch

    fn = expert_ffn(fmt, *geometry)
    x = torch.randn(1, geometry[0], dtype=torch.bfloat16)
    return {"format": fmt, "threads": threads, **after_idle(lambda: fn(x), threads, calls=calls)}


def measure_beside_copies(fmt: str, geometry: tuple[int, int], threads: int, calls: int,
                          copy_once: Callable[[], None], copy_bytes: int) -> dict[str, Any]:
    """One-token ``fmt`` experts on ``threads`` threads, alone and beside copies of ``copy_bytes``."""
    import torch

    fn = expert_ffn(fmt, *geometry)
    x = torch.randn(1, geometry[0], dtype=torch.bfloat16)

    def cpu_calls() -> list[float]:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            return time_call(fn, x, calls)
    return {"format": fmt, "threads": threads, "copy_bytes": copy_bytes, **alone_and_beside(cpu_calls, copy_once)}


def measure(formats: Sequence[str] = FORMATS, geometry: tuple[int, int] = MIXTRAL_GEOMETRY,
            batches: Sequence[int] = (1, 4), threads: Sequence[int] = (1,), repeats: int = 5,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every (format, tokens, threads) of one expert FFN: median and spread of ``repeats`` runs."""
    import torch

    hidden, ffn = geometry
    before = torch.get_num_threads()
    rows = []
    try:
        for fmt in formats:
            fn = expert_ffn(fmt, hidden, ffn)
            for n_threads in threads:
                torch.set_num_threads(n_threads)
                for tokens in batches:
                    x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
                    with torch.inference_mode():
                        runs = time_call(fn, x, repeats)
                    rows.append({"format": fmt, "tokens": tokens, "threads": n_threads,
                                 "median_s": statistics.median(runs), "min_s": min(runs), "max_s": max(runs),
                                 "n": len(runs)})
                    if progress:
                        progress(f"{fmt} {tokens} tok {n_threads} thr: {statistics.median(runs) * 1e3:.2f} ms")
            del fn
    finally:
        torch.set_num_threads(before)
    import os

    return {"kind": "cpu_expert_ffn", "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                     "logical_cpus": os.cpu_count(), "torch": torch.__version__},
            "geometry": {"hidden": hidden, "ffn": ffn}, "repeats": repeats, "rows": rows}


def cpu_block(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw measurement as a calibration's ``cpu`` block (docs/timing.md, "Hybrid execution"): the
    per-format tokens curve at the most threads measured, the thread curve of the first format at one
    token. Times at a smaller geometry are scaled to a Mixtral-8x7B expert by parameter count (the batch-1
    kernels stream the weights: time grows with their size); the raw file keeps them unscaled."""
    hidden, ffn = raw["geometry"]["hidden"], raw["geometry"]["ffn"]
    scale = (MIXTRAL_GEOMETRY[0] * MIXTRAL_GEOMETRY[1]) / (hidden * ffn)
    rows = raw["rows"]
    top = max(r["threads"] for r in rows)
    formats = list(dict.fromkeys(r["format"] for r in rows))
    expert_s = {f: sorted([r["tokens"], r["median_s"] * scale] for r in rows if r["format"] == f and r["threads"] == top)
                for f in formats}
    ref = formats[0]
    curve = sorted([r["threads"], r["median_s"] * scale] for r in rows
                   if r["format"] == ref and r["tokens"] == min(x["tokens"] for x in rows))
    host = raw["host"]
    where = (f"measured by the CPU expert benchmark (moesim.engine.cpu_bench) on {host['processor']} ({host['logical_cpus']} logical CPUs, "
             f"torch {host['torch']}), {raw['date']}, median of {raw['repeats']}")
    scaled = "" if scale == 1 else f"; geometry {hidden}x{ffn} scaled x{scale:g} by parameter count"
    block = {"threads": top, "format": "int8" if "int8" in expert_s else ref, "hidden_bytes": MIXTRAL_GEOMETRY[0] * 2,
             "expert_s": expert_s, "thread_curve": curve if len(curve) >= 2 else [],
             "sources": {"expert_s": where + scaled, "thread_curve": f"{ref}, one token: " + where + scaled,
                         "hop": "the hidden state (4096 bf16 per token) each way, priced by the PCIe copy curve"}}
    machine = where.split(", median")[0]
    if raw.get("beside_copies"):
        b = raw["beside_copies"]
        block["beside_copies"] = beside_factor(b)
        block["sources"]["beside_copies"] = (
            f"{b['format']} one-token experts on {b['threads']} threads: median of {len(b['beside_copies_s'])} calls "
            f"while pinned host-to-device copies of {b['copy_bytes']} B ran back to back, over the median of "
            f"{len(b['alone_s'])} alone (alternating rounds), " + machine)
        if b.get("copies_alone_s"):
            block["copies_beside_cpu"] = copies_factor(b)
            block["sources"]["copies_beside_cpu"] = (
                f"pinned host-to-device copies of {b['copy_bytes']} B: median of {len(b['copies_beside_cpu_s'])} "
                f"while those CPU experts ran, over the median of {len(b['copies_alone_s'])} alone, " + machine)
    if raw.get("after_idle"):
        a = raw["after_idle"]
        block["after_idle"] = after_idle_curve(a)
        block["sources"]["after_idle"] = idle_source(a) + ", " + machine
    return block


def idle_source(a: dict[str, Any]) -> str:
    """Where an ``after_idle`` curve comes from, in words."""
    return (f"{a['format']} one-token experts on {a['threads']} threads on a worker thread, "
            f"{len(a['after_gap_s'][0])} calls after each idle gap ({', '.join(f'{g * 1e3:g}' for g in a['gaps_s'])} "
            f"ms) less the median of {len(a['back_to_back_s'])} back to back (alternating rounds)")


def beside_factor(b: dict[str, Any]) -> float:
    """How much longer a CPU expert takes beside running copies: median beside over median alone."""
    return statistics.median(b["beside_copies_s"]) / statistics.median(b["alone_s"])


def copies_factor(b: dict[str, Any]) -> float:
    """How much longer a copy takes while CPU experts run: median beside over median alone."""
    return statistics.median(b["copies_beside_cpu_s"]) / statistics.median(b["copies_alone_s"])
