"""Where the engine's GPU time goes, from a CUPTI trace of a plain (uninstrumented) replay.

``studies/miss_cost/gpu_miss_cost.py`` profiles the engine with ``torch.profiler`` and keeps every GPU
activity (kernel or copy: stream, start, duration, correlation id). The engine launches each piece of
its decode step as one CUDA graph, so a graph's kernels share the correlation id of its launch: grouping
kernels by it gives each piece's GPU start and end. Replaying the engine's :class:`CachePlan` on the same
routing gives the host's issue order (per layer: the layer piece, the demand copies, the prefetch copies,
the experts, resident ones first), which aligns pieces and copies with what they were for.

The gaps this yields are the GPU's own timestamps, with nothing added to the streams:

- ``gate_to_copy``: a demand copy's start after its layer's gate ended (copy stream idle before it);
- ``copy_to_copy``: a copy's start after the previous copy on the copy stream ended;
- ``ready_to_expert``: an expert's start after the copy it waited on landed, when it did wait (compute
  was idle);
- ``expert_after_expert`` / ``piece_after_piece``: the launch gap between two compute pieces that did
  not wait for a copy;
- the durations of copies and pieces in situ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moesim.engine.plan import CachePlan, Routing


@dataclass
class Piece:
    start: float   # us, GPU clock
    end: float
    kernels: int


def pieces_and_copies(acts: list[dict[str, Any]], min_copy_bytes: int = 1 << 20) -> tuple[list[Piece], list[Piece]]:
    """Compute-stream pieces (kernels grouped by launch correlation id, in start order) and large
    host-to-device copies (in start order) of one CUPTI trace."""
    kernels = [a for a in acts if a["cat"] == "kernel"]
    if not kernels:
        return [], []
    streams: dict[Any, int] = {}
    for a in kernels:
        streams[a["stream"]] = streams.get(a["stream"], 0) + 1
    compute = max(streams, key=streams.__getitem__)
    groups: dict[Any, Piece] = {}
    for a in kernels:
        if a["stream"] != compute:
            continue
        key = a["corr"] if a["corr"] is not None else id(a)
        p = groups.get(key)
        if p is None:
            groups[key] = Piece(a["ts"], a["ts"] + a["dur"], 1)
        else:
            p.start, p.end, p.kernels = min(p.start, a["ts"]), max(p.end, a["ts"] + a["dur"]), p.kernels + 1
    pieces = sorted(groups.values(), key=lambda p: p.start)
    copies = sorted((Piece(a["ts"], a["ts"] + a["dur"], 0) for a in acts
                     if a["cat"] == "gpu_memcpy" and (a.get("bytes") or 0) >= min_copy_bytes), key=lambda p: p.start)
    return pieces, copies


def _stats(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    a = np.asarray(xs, float)
    return {"n": len(a), "median_us": float(np.median(a)), "mean_us": float(a.mean()), "p10_us": float(np.percentile(a, 10)),
            "p90_us": float(np.percentile(a, 90)), "sum_us": float(a.sum())}


def engine_gaps(acts: list[dict[str, Any]], routing: Routing, cache_size: int, policy: str = "lru",
                prefetch: str = "none", warm: bool = False, max_lead: int = 8) -> dict[str, Any]:
    """Align a plain replay's CUPTI activities with the engine's issue order and measure its gaps.
    Raises ValueError when the trace does not hold the pieces and copies the plan says it must."""
    pieces, copies = pieces_and_copies(acts)
    plan = CachePlan(routing, cache_size, policy, prefetch)
    L, k = routing.num_layers, routing.top_k
    if warm:
        for layer in range(L):
            for e in range(min(cache_size, routing.num_experts)):
                plan._admit(layer, e, -1, ())
    want_pieces = routing.num_tokens * (L + 1) + int((routing.row >= 0).sum()) * k
    # a replay first loads its routing and zeroes its counters (a few plain kernels before token 0)
    lead = len(pieces) - want_pieces
    if not 0 <= lead <= max_lead:
        raise ValueError(f"trace has {len(pieces)} compute pieces, the plan issues {want_pieces}")
    pieces = pieces[lead:]
    ip = ic = 0
    out: dict[str, list[float]] = {key: [] for key in (
        "gate_to_copy", "copy_to_copy", "ready_to_expert", "expert_after_expert", "expert_after_gate",
        "gate_after_expert", "copy_ms", "expert_ms", "layer_ms", "stall_expert_ms", "token_ms")}
    token_start = None
    for t in range(routing.num_tokens):
        tok0 = pieces[ip].start
        if token_start is not None:
            out["token_ms"].append((tok0 - token_start) / 1e3)
        token_start = tok0
        prev_end = None
        for layer in range(L):
            gate = pieces[ip]
            ip += 1
            if prev_end is not None:
                out["gate_after_expert"].append(gate.start - prev_end)
            out["layer_ms"].append((gate.end - gate.start) / 1e3)
            step = plan.step(t, layer)
            if step is None:
                prev_end = gate.end
                continue
            n_copies = len(step.copies) + len(step.prefetches)
            mine = copies[ic:ic + n_copies]
            if len(mine) != n_copies:
                raise ValueError(f"token {t} layer {layer}: {len(mine)} copies in the trace, {n_copies} issued")
            ic += n_copies
            ready: dict[int, Piece] = {}
            for n, ((_, e), c) in enumerate(zip(step.copies, mine, strict=False)):
                ready[e] = c
                out["copy_ms"].append((c.end - c.start) / 1e3)
                if n == 0 and (ic - n_copies == 0 or copies[ic - n_copies - 1].end <= gate.end):
                    out["gate_to_copy"].append(c.start - gate.end)   # copy stream was idle at the gate
                elif n > 0:
                    out["copy_to_copy"].append(c.start - mine[n - 1].end)
            missed = set(ready)
            order = sorted(range(len(step.experts)), key=lambda j: step.experts[j] in missed)
            last = gate.end
            for n, j in enumerate(order):
                ex = pieces[ip]
                ip += 1
                out["expert_ms"].append((ex.end - ex.start) / 1e3)
                c = ready.get(step.experts[j])
                if c is not None and c.end > last:
                    out["ready_to_expert"].append(ex.start - c.end)
                    out["stall_expert_ms"].append((ex.end - ex.start) / 1e3)
                elif n == 0:
                    out["expert_after_gate"].append(ex.start - last)
                else:
                    out["expert_after_expert"].append(ex.start - last)
                last = ex.end
            prev_end = last
        ip += 1   # the final piece
    if ip != len(pieces) or ic != len(copies):
        raise ValueError(f"aligned {ip} of {len(pieces)} pieces and {ic} of {len(copies)} copies")
    res: dict[str, Any] = {}
    for key, xs in out.items():
        if key.endswith("_ms"):
            res[key] = None if not xs else {"n": len(xs), "median": float(np.median(xs)), "mean": float(np.mean(xs))}
        else:
            res[key] = _stats(xs)
    return res


def hop_terms(gaps: dict[str, Any]) -> dict[str, float]:
    """The cost model's hop terms from :func:`engine_gaps` of an all-miss replay: ``copy_hop_s`` = the mean
    wait of a copy on the copy stream (after its gate, or behind the previous copy: both pooled),
    ``ready_hop_s`` = the mean wait of an expert after the copy it waited for landed. Means, not medians:
    the hops are spread over ~10-80 us and their sum is what a token pays."""
    copies = [gaps[k] for k in ("gate_to_copy", "copy_to_copy") if gaps.get(k)]
    if not copies or not gaps.get("ready_to_expert"):
        raise ValueError("no copy or expert waits in these gaps (an all-miss replay has both)")
    n = sum(c["n"] for c in copies)
    return {"copy_hop_s": sum(c["sum_us"] for c in copies) / n * 1e-6,
            "ready_hop_s": gaps["ready_to_expert"]["sum_us"] / gaps["ready_to_expert"]["n"] * 1e-6,
            "copy_waits": n, "expert_waits": int(gaps["ready_to_expert"]["n"])}
