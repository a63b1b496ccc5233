"""From raw GPU measurements (benchmarks/gpu_validate.py, ``moesim calibrate``) to the cost model's
calibration JSON (the format of ``moesim.simulator.cost_model.CostModel``; see docs/timing.md).

Raw file keys: ``h2d`` [{bytes, ms, gb_per_s}], ``expert`` {quant[+compile]: {expert_bytes, curve:
[{tokens, ms}]}}, ``attention`` [{context, compiled, ms}] (attention + gate of one layer),
``lm_head_ms``, ``compile_ok``; optionally ``graph`` {first_ms, layer_ms, expert_ms, final_ms} (the
engine's captured pieces, which then set the layer, batch-1 expert and token costs) and
``all_resident`` {layers, tokens, requests, gpu_ms_total} (a run with every expert resident: what it
took beyond its pieces becomes the per-token overhead); ``copy_repeats`` (one expert copied N times
from several pinned buffers: the copy spread, ``gpu_bench.copy_repeats``) and ``engine_terms``
{miss_issue, routing_handoff} (``gpu_bench.miss_issue`` / ``routing_handoff``: the calibration's
``engine`` block).
All GPU times are measured with CUDA events after a GPU sleep, so they are device times, not launch
overhead.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from moesim.errors import DataError


def fit_copy_latency(h2d: list[dict]) -> tuple[float, float]:
    """Least-squares ``ms = latency + bytes / bandwidth`` over copies of >= 4 MB (the linear regime)."""
    big = [r for r in h2d if r["bytes"] >= (4 << 20)] or h2d
    x = np.array([r["bytes"] for r in big], float)
    y = np.array([r["ms"] for r in big], float) * 1e-3
    slope, intercept = np.polyfit(x, y, 1)
    return max(float(intercept), 0.0), 1.0 / float(slope)


def to_cost_model(raw: dict[str, Any], name: str = "h200", description: str = "",
                  path: object = None) -> dict[str, Any]:
    """Build a calibration dict (CostModel.from_dict format) from raw measurements."""
    try:
        h2d = raw["h2d"]
        latency_s, bw = fit_copy_latency(h2d)
        compiled = bool(raw.get("compile_ok"))
        expert_compute: dict[str, list[list[float]]] = {}
        expert_bytes: dict[str, int] = {}
        for key, table in raw["expert"].items():
            quant, _, variant = key.partition("+")
            if compiled and not variant and f"{quant}+compile" in raw["expert"]:
                continue   # the engine runs the compiled kernels when they work
            expert_compute[quant] = [[float(r["tokens"]), float(r["ms"]) * 1e-3] for r in table["curve"]]
            expert_bytes[quant] = int(table["expert_bytes"])
        att = [r for r in raw["attention"] if bool(r.get("compiled", False)) == compiled] or raw["attention"]
        ctx = np.array([r["context"] for r in att], float)
        ms = np.array([r["ms"] for r in att], float) * 1e-3
        per_ctx, base = np.polyfit(ctx, ms, 1) if len(att) > 1 else (0.0, float(ms[0]))
        token_s = float(raw["lm_head_ms"]) * 1e-3
        sources_layer = "attention (q/k/v/o dequantised, GQA SDPA over the KV cache) + gate of one layer, GPU time"
        sources_token = "LM head (vocab x hidden bf16), GPU time"
        graph = raw.get("graph")
        overhead_ms = None
        if graph:   # the engine's own captured pieces: what it actually runs
            engine_quant = raw.get("engine_quantization", "hqq2")
            base, per_ctx = float(graph["layer_ms"]) * 1e-3, 0.0
            if engine_quant in expert_compute:
                expert_compute[engine_quant][0][1] = float(graph["expert_ms"]) * 1e-3
            token_s = (float(graph["final_ms"]) + max(float(graph["first_ms"]) - float(graph["layer_ms"]), 0.0)) * 1e-3
            sources_layer = ("the engine's captured layer piece (combine the previous layer's experts, RMS norm, "
                             "4-bit q/k/v/o dequant, GQA SDPA over the whole static KV cache, gate), replayed "
                             "back to back; constant in context because the engine attends over its full static "
                             "cache (the eager per-context slope is in the raw file)")
            sources_token = "the engine's final piece (combine, LM head) + the first layer's extra (token counter)"
            resident = raw.get("all_resident")
            if resident:   # per-token overhead the pieces do not show: measured, all experts resident
                L = int(resident["layers"])
                expected = (int(resident["tokens"]) * ((L - 1) * float(graph["layer_ms"]) + float(graph["first_ms"])
                                                       + float(graph["final_ms"]))
                            + int(resident["requests"]) * float(graph["expert_ms"]))
                overhead_ms = max((float(resident["gpu_ms_total"]) - expected) / int(resident["tokens"]), 0.0)
                token_s += overhead_ms * 1e-3
                sources_token += (f"; plus {overhead_ms:.3f} ms per token of engine overhead (all-resident run "
                                  f"minus the sum of its pieces: event waits and launch gaps)")
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise DataError(path, f"not a raw calibration file ({type(exc).__name__}: {exc})") from None
    engine, expert_copy = _engine_block(raw, path), _expert_copy(raw, path)
    token: dict[str, float] = {"base_s": token_s, "per_token_s": 0.0}
    if overhead_ms is not None:
        token["engine_overhead_s"] = overhead_ms * 1e-3   # part of base_s; efficiency bounds leave it out
    return {
        "name": name,
        "description": description or "calibrated by moesim calibrate on the lent GPU",
        "sources": {
            "pcie": "pinned host-to-device copies on a dedicated stream, CUDA events; latency and bandwidth "
                    "fitted over copies >= 4 MB, curve = every measured size",
            "expert_compute": "dequantise (torch.compile'd hqq-style kernels) + SwiGLU FFN of one expert, GPU time",
            "layer": sources_layer,
            "token": sources_token,
        },
        "pcie": {"latency_us": latency_s * 1e6, "bandwidth_gbps": bw / 1e9, "copy_engines": 1,
                 "curve": [[int(r["bytes"]), float(r["ms"]) * 1e-3] for r in h2d],
                 **({"expert_copy": expert_copy} if expert_copy else {})},
        "expert_bytes": expert_bytes,
        "quantization": "hqq2" if "hqq2" in expert_compute else next(iter(expert_compute)),
        "expert_compute": expert_compute,
        "layer": {"base_s": max(float(base), 0.0), "per_token_s": 0.0, "per_context_s": max(float(per_ctx), 0.0)},
        "token": token,
        "engine": engine,
    }


def _engine_block(raw: dict[str, Any], path: object) -> dict[str, Any]:
    """The cost model's ``engine`` terms from the raw micro-benchmarks (0 = not measured)."""
    terms = raw.get("engine_terms") or {}
    try:
        miss = float(terms["miss_issue"]["miss_issue_s"]) if "miss_issue" in terms else 0.0
        handoff = float(terms["routing_handoff"]["routing_handoff_s"]) if "routing_handoff" in terms else 0.0
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(path, f"bad engine_terms ({type(exc).__name__}: {exc})") from None
    when = terms.get("date", "unknown date")
    sources = {
        "miss_issue_s": (f"gpu_bench.miss_issue ({when}): the engine's demand pattern (gate kernel; copies on a copy "
                         "stream waiting on the gate-done and slot-free events; experts waiting on ready events) "
                         "minus the same chain priced by the simulator from back-to-back kernel and copy times, "
                         "per miss" if "miss_issue" in terms else "not measured: 0"),
        "routing_handoff_s": (f"gpu_bench.routing_handoff ({when}): gate (1x4096 @ 4096x8) + softmax + top-2 as a "
                              "CUDA graph, read back to pinned host memory and synchronised, per layer, minus the "
                              "gate's GPU time; charged only in the gate-driven engine mode"
                              if "routing_handoff" in terms else "not measured: 0"),
    }
    out: dict[str, Any] = {"miss_issue_s": miss, "routing_handoff_s": handoff}
    hops = terms.get("stream_hops")
    if hops:   # studies/miss_cost/gpu_miss_cost.py: the engine's own CUPTI trace (cupti_gaps.hop_terms)
        try:
            out["copy_hop_s"], out["ready_hop_s"] = float(hops["copy_hop_s"]), float(hops["ready_hop_s"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(path, f"bad engine_terms.stream_hops ({type(exc).__name__}: {exc})") from None
        src = hops.get("source", "studies/miss_cost/gpu_miss_cost.py")
        sources["copy_hop_s"] = (f"{src}: CUPTI trace of the engine replaying an all-miss routing (GPU "
                                 "timestamps, nothing added to the streams): mean wait of a copy after its gate "
                                 "or behind the previous copy (moesim.engine.cupti_gaps.hop_terms)")
        sources["ready_hop_s"] = (f"{src}: the same trace: mean wait of an expert piece after the copy it waited "
                                  "for landed")
    if "routing_handoff" in terms and "eager_handoff_s" in terms["routing_handoff"]:
        out["routing_handoff_eager_s"] = float(terms["routing_handoff"]["eager_handoff_s"])
        sources["routing_handoff_eager_s"] = ("the same read-back with the gate's kernels launched eagerly (no CUDA "
                                              "graph): what each sync of the mixtral-offloading profile costs")
    return {**out, "sources": sources}


def _expert_copy(raw: dict[str, Any], path: object) -> dict[str, Any] | None:
    """One session of repeated expert-size copies -> the calibration's copy spread."""
    rep = raw.get("copy_repeats")
    if not rep:
        return None
    try:
        session = {"date": (raw.get("engine_terms") or {}).get("date", "unknown"), "n": int(rep["n"]),
                   "buffers": int(rep.get("buffers", 1)),
                   **{f"{k}_s": float(rep[f"{k}_ms"]) * 1e-3 for k in ("median", "p10", "p90", "min", "max")}}
        nbytes = int(rep["bytes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(path, f"bad copy_repeats ({type(exc).__name__}: {exc})") from None
    return expert_copy_block(nbytes, [session])


def expert_copy_block(nbytes: int, sessions: list[dict[str, Any]]) -> dict[str, Any]:
    """The copy interval over every session's p10..p90: a calibration that has seen several days
    carries the day-to-day spread, not only one run's."""
    return {"bytes": int(nbytes), "median_s": float(sessions[-1]["median_s"]),
            "low_s": min(float(s["p10_s"]) for s in sessions), "high_s": max(float(s["p90_s"]) for s in sessions),
            "sessions": sessions}


def add_session(cal: dict[str, Any], raw: dict[str, Any], path: object = None, pieces: bool = False) -> dict[str, Any]:
    """``cal`` (a calibration) with the engine terms and the expert-copy session of ``raw`` (another
    device session's micro-benchmarks; engine terms ``raw`` did not measure stay the calibration's):
    its copies and kernels stay as they were measured; the copy
    interval then spans both days. A calibration without sessions counts its own curve's time at the
    expert size as its first (a mean of back-to-back copies: no spread of its own).

    ``pieces``: the engine itself changed, so its captured pieces and per-token overhead (``layer``,
    ``token``, the engine's expert curve) are taken from ``raw`` too; copies and other formats' kernels
    stay the calibration's."""
    from moesim.simulator.cost_model import CostModel

    out = json.loads(json.dumps(cal))
    if pieces:
        if not raw.get("graph"):
            raise DataError(path, "no engine pieces (graph) in this raw file")
        fresh = to_cost_model(raw, out.get("name", "calibration"), path=path)
        out["layer"], out["token"] = fresh["layer"], fresh["token"]
        out["expert_compute"] = {**out.get("expert_compute", {}), **fresh["expert_compute"]}
        when = (raw.get("engine_terms") or {}).get("date", "another session")
        out.setdefault("sources", {}).update({k: f"{fresh['sources'][k]} ({when})"
                                              for k in ("layer", "token", "expert_compute")})
    engine = _engine_block(raw, path)
    if not raw.get("engine_terms"):
        raise DataError(path, "no engine_terms in this raw file")
    # terms this raw file measured replace the calibration's; the ones it did not (e.g. the stream hops of
    # studies/miss_cost/gpu_miss_cost.py, the host issue cost of gpu_decode.py) stay as measured before
    old_engine = out.get("engine") or {}
    out["engine"] = {**{k: v for k, v in old_engine.items() if k != "sources"}, **engine,
                     "sources": {**old_engine.get("sources", {}), **engine["sources"]}}
    new = _expert_copy(raw, path)
    if new:
        old = out["pcie"].get("expert_copy")
        if old:
            sessions = old["sessions"]
        else:
            point = CostModel.from_dict(cal).copy_seconds(new["bytes"])
            sessions = [{"date": cal.get("date", "the calibration's own run"), "n": None, "buffers": 1,
                         "median_s": point, "p10_s": point, "p90_s": point, "min_s": point, "max_s": point,
                         "note": "the calibration's copy curve at this size (a mean of back-to-back copies)"}]
        out["pcie"]["expert_copy"] = expert_copy_block(new["bytes"], sessions + new["sessions"])
        out["pcie"]["expert_copy"]["median_s"] = float(sessions[0]["median_s"])   # the point the curve uses
    programs = batch_programs(raw, path)
    if programs:   # the batch engine's shapes (``moesim validate`` prices batch and prefill cells with them)
        out["batch_programs"] = programs
    return out


def batch_programs(raw: dict[str, Any], path: object = None) -> dict[str, dict[str, Any]]:
    """Per step shape (``decode16``, ``prefill32``: :mod:`moesim.engine.batch`), the cost terms of the
    batch engine's own captured pieces (``batch_pieces`` in a raw file of benchmarks/gpu_validate.py),
    measured the way the batch-1 calibration measures its pieces -- micro-benchmarks, never a cell:

    - ``layer``: the layer piece at each context bucket its steps used, ``ms = base + slope * bucket``
      (least squares; one bucket: slope 0); the simulator's ``layer_seconds(context, tokens)`` =
      ``base_s + per_context_s * context * tokens`` with ``per_context_s = slope / rows``, so the
      simulator's context term (linear in the step's mean context) stands for the engine's buckets;
    - ``expert_curve``: the expert piece at each token bucket (gathered rows; the simulator interpolates
      it at the routed count) plus the engine overhead per expert call: an all-resident run of the
      steps (K = E, warm) minus the sum of its pieces, divided by its expert calls. Per call, not per
      step, because that is how it scales: 43-47 us per call in steps of 170 to 252 calls on the H200
      (studies/fidelity/fidelity_h200.md), as the batch-1 engine's all-resident excess on the same day;
    - ``token``: the final piece + layer 0's extra (step tables, embeddings)."""
    out: dict[str, dict[str, Any]] = {}
    layers = int((raw.get("all_resident") or {}).get("layers", 32))
    for key, p in (raw.get("batch_pieces") or {}).items():
        if "layer_ms" not in p:
            continue   # a CPU check: no GPU times
        try:
            layer = {int(b): float(ms) for b, ms in p["layer_ms"].items()}
            layer0 = {int(b): float(ms) for b, ms in p["layer0_ms"].items()}
            expert = {int(n): float(ms) for n, ms in p["expert_ms"].items()}
            final, rows = float(p["final_ms"]), int(p["rows"])
            buckets = sorted(layer)
            if len(buckets) >= 2:
                slope, base = (float(v) for v in np.polyfit(buckets, [layer[b] for b in buckets], 1))
            else:
                slope, base = 0.0, layer[buckets[0]]
            expected = sum(layer0[int(b)] + (layers - 1) * layer[int(b)] + final for b in p["step_buckets"])
            expected += sum(int(c) * expert[int(n)] for n, c in p["expert_calls"].items())
            calls = sum(int(c) for c in p["expert_calls"].values())
            overhead = max((float(p["all_resident_gpu_ms_total"]) - expected) / calls, 0.0)   # per expert call
            extra0 = float(np.mean([layer0[b] - layer[b] for b in buckets]))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(path, f"bad batch_pieces[{key!r}] ({type(exc).__name__}: {exc})") from None
        out[key] = {
            "rows": rows, "phase": p["phase"], "buckets": buckets,
            "layer": {"base_s": base * 1e-3, "per_token_s": 0.0, "per_context_s": slope * 1e-3 / rows},
            "token": {"base_s": (final + max(extra0, 0.0)) * 1e-3, "per_token_s": 0.0},
            "engine_overhead_per_expert_s": overhead * 1e-3,
            "expert_curve": [[float(n), (expert[n] + overhead) * 1e-3] for n in sorted(expert)],
            "source": (f"benchmarks/gpu_validate.py batch_pieces[{key}]: layer piece "
                       f"{ {b: round(v, 4) for b, v in layer.items()} } ms by context bucket, expert piece "
                       f"{ {n: round(v, 4) for n, v in expert.items()} } ms by token bucket, final {final:.4f} ms, "
                       f"layer-0 extra "
                       f"{extra0:.4f} ms, all-resident overhead {overhead * 1e3:.1f} us per expert call"),
        }
    return out


def batch_cost(cost, terms: dict[str, Any] | None, overhead: bool = True):
    """``cost`` with the layer, token and expert terms of one batch-program shape (:func:`batch_programs`);
    copies, engine terms and the copy interval stay the calibration's. ``terms`` None: ``cost``.
    ``overhead`` False: the expert pieces alone, without the engine's per-call overhead (for bounds)."""
    import copy

    if not terms:
        return cost
    m = copy.deepcopy(cost)
    m.layer = dict(terms["layer"])
    m.token = dict(terms["token"])
    extra = 0.0 if overhead else float(terms.get("engine_overhead_per_expert_s", 0.0))
    m.expert_compute = {**m.expert_compute, m.quantization: [[n, s - extra] for n, s in terms["expert_curve"]]}
    return m
