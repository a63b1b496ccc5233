"""Sim-vs-real: compare the engine's measured cells with the timing simulator's predictions.

The engine's cells come from a GPU run (benchmarks/gpu_validate.py writes ``validate.json``); the
simulator runs here, on CPU, over the very same tokens of the same trace, with a calibration made
from the same GPU's micro-benchmarks. Nothing in the comparison is tuned per cell.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from moesim.safe_write import atomic_open, atomic_path
from moesim.traces.format import Trace

MIXTRAL_OFFLOADING_A100_TOKENS_PER_S = 3.06   # published: Mixtral-8x7B, 2-bit experts, 4 slots, A100


def head_tokens(trace: Trace, tokens: int, expert_bytes: int = 0, quantization: str | None = None,
                skip: int = 0) -> Trace:
    """(sequence, token) pairs ``skip`` .. ``skip + tokens - 1`` of ``trace`` in execution order (what
    the engine ran: ``benchmarks/gpu_validate.py --skip-tokens``)."""
    trace = trace.execution_order()
    pair = trace.seq.astype(np.int64) * (1 << 32) + trace.token.astype(np.int64)
    keep = np.isin(pair, np.unique(pair)[skip:skip + tokens])
    meta = trace.meta
    if expert_bytes:
        meta = dataclasses.replace(meta, expert_bytes=int(expert_bytes), quantization=quantization or meta.quantization)
    return Trace(meta, trace.table.filter(pa.array(keep)), trace.path)


def cell_trace(trace: Trace, *, phase: str = "decode", batch: int = 1, tokens: int, skip: int = 0,
               seq_len: int | None = None, expert_bytes: int = 0, quantization: str | None = None) -> Trace:
    """The tokens one batch or prefill cell replays (``benchmarks/gpu_validate.py --batch /
    --prefill-chunk``), as a trace both the engine and the simulator group with
    :func:`moesim.traces.steps.build_steps`.

    The rows of ``phase`` (a trace without prefill rows offers its decode tokens as prompts), from the
    ``skip``-th (sequence, token) pair on in execution order, cut into segments of ``seq_len``
    consecutive tokens of one sequence (default ``tokens // batch``; remainders dropped); the first
    ``tokens // seq_len`` segments become sequences 0, 1, ... (positions kept: their real context).
    So a trace with few long sequences still fills a batch of 16."""
    from moesim.traces.format import DECODE, PREFILL

    if phase not in ("decode", "prefill"):
        raise ValueError(f"unknown phase {phase!r}")
    trace = trace.execution_order()
    want = PREFILL if phase == "prefill" else DECODE
    ph = np.asarray(trace.phase)
    rows = ph == want if (ph == want).any() else np.ones(len(ph), bool)
    seq, tok = np.asarray(trace.seq, np.int64)[rows], np.asarray(trace.token, np.int64)[rows]
    pair = seq * (1 << 32) + tok
    _, first = np.unique(pair, return_index=True)
    order = np.sort(first)   # pairs in execution order
    pseq, ptok = seq[order][skip:], tok[order][skip:]
    seg = int(seq_len or max(tokens // batch, 1))
    wanted = max(tokens // seg, 1)
    new_id: dict[int, int] = {}
    i, n = 0, len(pseq)
    while i < n and len(new_id) // seg < wanted:
        j = i
        while j < n and pseq[j] == pseq[i] and j - i < seg:
            j += 1
        if j - i == seg:
            sid = len(new_id) // seg
            for r in range(i, j):
                new_id[int(pseq[r] * (1 << 32) + ptok[r])] = sid
            i = j
        else:   # a remainder shorter than a segment: skip to the next sequence
            while j < n and pseq[j] == pseq[i]:
                j += 1
            i = j
    if len(new_id) < wanted * seg:
        raise ValueError(f"{trace.path}: only {len(new_id) // seg} segments of {seg} tokens after token {skip}; "
                         f"the cell needs {wanted}")
    all_pair = np.asarray(trace.seq, np.int64) * (1 << 32) + np.asarray(trace.token, np.int64)
    keep = rows & np.isin(all_pair, np.fromiter(new_id, np.int64))
    table = trace.table.filter(pa.array(keep))
    sid = np.array([new_id[int(p)] for p in all_pair[keep]], np.int32)
    table = table.set_column(table.schema.get_field_index("seq"), table.schema.field("seq"), pa.array(sid, pa.int32()))
    table = table.set_column(table.schema.get_field_index("phase"), table.schema.field("phase"),
                             pa.array(np.full(len(sid), want, np.int8), pa.int8()))
    meta = trace.meta
    if expert_bytes:
        meta = dataclasses.replace(meta, expert_bytes=int(expert_bytes), quantization=quantization or meta.quantization)
    return Trace(meta, table, trace.path).execution_order()


def check_trace_digest(engine: dict[str, Any], trace: Trace, engine_path: object) -> str | None:
    """The engine cells name the trace they were measured on (``trace_digest``, written by
    benchmarks/gpu_validate.py): another trace is an error. Files from before the digest (the
    committed reports' cells) cannot be checked: a warning to print, so they still rebuild."""
    from moesim.errors import DataError

    want = engine.get("trace_digest")
    if want is None:
        return (f"warning: {engine_path}: names no trace digest (written before engine files carried one), so "
                f"nothing checks that it was measured on {trace.path}")
    have = trace.routing_digest()
    if want != have:
        raise DataError(engine_path, f"was measured on another trace (routing digest {str(want)[:12]}..., "
                                     f"{engine.get('trace', '?')}); {trace.path} has {have[:12]}...")
    return None


def git_state(repo: Path) -> dict[str, Any]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True,
                                    timeout=30).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "uncommitted_changes": None}
    return {"commit": head or None, "uncommitted_changes": dirty}


def peak_bandwidth(cost) -> float:
    """The highest bandwidth the calibration measured (B/s): its fastest copy per byte on the curve, or
    its fitted bandwidth without one."""
    pts = [b / s for b, s in cost.curve if s > 0]
    return max(pts) if pts else cost.bandwidth_Bps


def independent_bound(cost):
    """The engine's lower bound on time, set by no engine at all: every copy at the calibration's peak
    measured bandwidth (no per-copy latency), every kernel at its micro-benchmark time, and no engine
    term (no per-token overhead, no per-miss issue cost, no hand-off). ``efficiency`` = this bound's
    time / the measured time: how close the engine gets to what its copies and kernels allow -- unlike
    the simulator's prediction, it owes nothing to a model of the engine."""
    overhead_s = float(cost.token.get("engine_overhead_s", 0.0))
    bound = cost.with_overrides(pcie_gbps=peak_bandwidth(cost) / 1e9, pcie_latency_us=0.0, miss_issue_us=0.0,
                                routing_handoff_us=0.0, copy_hop_us=0.0, ready_hop_us=0.0)
    bound.copy_scale = 1.0
    if overhead_s:
        bound = bound.with_overrides(token_ms=(cost.token_seconds() - overhead_s) * 1e3)
    return bound


# the validation engine replays a trace: a speculative cell issues the recorded predictions right after
# the gate, so it is compared with the simulator doing the same (docs/timing.md, --speculative-ready)
REPLAY_READY = "gate"


def timing_cell(sub: Trace, policy: str, size: int, prefetch: str, cost, batch: int = 1, chunk: int = 512,
                interval: bool = False):
    """The simulator's run of one engine cell (:func:`moesim.simulator.cell.run_cell`: the timing run
    only, speculative predictions issued as the replay engine issues them); with ``interval``, also at
    both ends of the calibration's measured copy interval."""
    from moesim.simulator.cell import CellSpec, run_cell

    return run_cell(sub, CellSpec(policy, size, cost=cost, prefetch=prefetch, batch_size=batch, prefill_chunk=chunk,
                                  speculative_ready=REPLAY_READY, exact_replay=False, interval=interval))


def phase_tokens_per_s(sim, phase: str) -> float:
    """Tokens/s of a cell's phase: decode tokens/s, or prompt tokens/s for prefill."""
    return float(sim.prefill_tokens_per_s if phase == "prefill" else sim.tokens_per_s)


def sim_interval(sub: Trace, policy: str, size: int, prefetch: str, cost, batch: int = 1, chunk: int = 512,
                 phase: str = "decode") -> list[float] | None:
    """Simulated tokens/s with every copy at the slow and at the fast end of the calibration's
    measured copy interval (None without one)."""
    return timing_cell(sub, policy, size, prefetch, cost, batch, chunk, interval=True).interval(
        lambda t: phase_tokens_per_s(t, phase))


def simulate_cell(sub: Trace, policy: str, size: int, prefetch: str, cost, batch: int = 1, chunk: int = 512,
                  phase: str = "decode"):
    """(TimingResult, tokens/s of the cell's phase)."""
    sim = timing_cell(sub, policy, size, prefetch, cost, batch, chunk).timing
    return sim, phase_tokens_per_s(sim, phase)


def cell_inputs(engine: dict[str, Any], cell: dict[str, Any], trace: Trace) -> tuple[Trace, int, int, str, str]:
    """What the simulator replays for one engine cell: (tokens, batch size, prefill chunk, phase, shape
    key of :func:`moesim.engine.calibration.batch_programs`). Cells without ``batch`` / ``phase`` (files
    of older runs) are batch-1 decode cells over the file's tokens."""
    from moesim.traces.format import DECODE

    phase, batch = str(cell.get("phase", "decode")), int(cell.get("batch", 1))
    eb, q = int(engine["expert_bytes"]), engine.get("quantization")
    if "cell_tokens" in cell:   # a batch or prefill cell (moesim.engine.batch): its own tokens
        sub = cell_trace(trace, phase=phase, batch=batch, tokens=int(cell["cell_tokens"]),
                         skip=int(cell.get("skip_tokens", 0)), seq_len=int(cell["seq_len"]), expert_bytes=eb,
                         quantization=q)
        chunk = int(cell.get("prefill_chunk") or 512)
        return sub, batch, chunk, phase, f"{phase}{chunk if phase == 'prefill' else batch}"
    base = trace.filter_phase(DECODE) if engine.get("decode_rows_only") else trace
    return head_tokens(base, int(engine["tokens"]), eb, q, int(engine.get("skip_tokens", 0))), 1, 512, "decode", ""


def in_situ_check(engine: dict[str, Any], cost) -> dict[str, Any] | None:
    """The run's own copy times (``in_situ_copies``: copy events of an instrumented replay) against the
    calibration's copy interval: outside it, the calibration describes another day's PCIe."""
    ins = engine.get("in_situ_copies")
    if not ins or not ins.get("n"):
        return None
    nbytes = int(ins.get("bytes", engine["expert_bytes"]))
    fast, slow = cost.copy_interval_scales()
    point = cost.copy_seconds(nbytes)
    lo, hi = point * fast, point * slow
    med = float(ins["median_ms"]) * 1e-3
    return {"n": int(ins["n"]), "median_s": med, "gbps": round(nbytes / med / 1e9, 3),
            "calibration_point_s": point, "calibration_interval_s": [lo, hi],
            "calibration_interval_gbps": [round(nbytes / hi / 1e9, 3), round(nbytes / lo / 1e9, 3)],
            "within_calibration_interval": bool(lo <= med <= hi),
            "has_interval": (fast, slow) != (1.0, 1.0)}


def compare(engine: dict[str, Any], trace: Trace, cost, *, include_repeats: bool = False,
            programs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One report cell per engine cell: measured vs simulated tokens/s and hit rates, efficiency. Batch and
    prefill cells are simulated with the same batch size / prefill chunk over the same tokens, priced with
    the calibration's ``batch_programs`` terms for their step shape when ``programs`` has them."""

    from moesim.engine.calibration import batch_cost

    copy_s = cost.copy_seconds(int(engine["expert_bytes"]))
    cells, repeats, run_ahead = [], [], []
    subs: dict[tuple, Any] = {}
    for c in engine["cells"]:
        key = (c.get("phase"), c.get("batch"), c.get("cell_tokens"), c.get("skip_tokens"), c.get("seq_len"),
               c.get("prefill_chunk"))
        if key not in subs:
            subs[key] = cell_inputs(engine, c, trace)
        sub, batch, chunk, phase, shape = subs[key]
        terms = (programs or {}).get(shape) if shape else None
        c_cost = batch_cost(cost, terms)
        bound_cost = independent_bound(batch_cost(cost, terms, overhead=False))
        priced = timing_cell(sub, c["policy"], int(c["cache_size"]), c["prefetch"], c_cost, batch, chunk, interval=True)
        sim, sim_tps = priced.timing, phase_tokens_per_s(priced.timing, phase)
        real_tps = float(c["tokens_per_s"])
        # the independent bound: the critical path through this cell's own copies (at the peak measured
        # bandwidth) and kernels (at their micro-benchmark times), with their real dependencies (a copy
        # waits for its layer's gate, an expert for its copy, a layer for the one before), no engine term
        bound_s = simulate_cell(sub, c["policy"], int(c["cache_size"]), c["prefetch"], bound_cost, batch, chunk,
                                phase)[0].total_s
        copies = int(c["misses"]) + int(c["prefetches"])
        cell = {
            "policy": c["policy"], "cache_size": int(c["cache_size"]), "prefetch": c["prefetch"],
            "batch": batch, "phase": phase, "batch_terms": bool(terms) if shape else None,
            "real_tokens_per_s": round(real_tps, 4), "sim_tokens_per_s": round(sim_tps, 4),
            "rel_error": round(sim_tps / real_tps - 1.0, 4),
            "real_hit_rate": round(float(c["hit_rate"]), 6), "sim_hit_rate": round(float(sim.hit_rate), 6),
            "real_hits": int(c["hits"]), "sim_hits": int(sim.hits), "requests": int(c["requests"]),
            "real_prefetches": int(c["prefetches"]), "sim_prefetches": int(sim.prefetches),
            "efficiency": round(bound_s / float(c["wall_s"]), 4),
            "real_ms_per_token": round(1e3 / real_tps, 3), "sim_ms_per_token": round(1e3 / sim_tps, 3),
            "sim_compute_ms_per_token": round(sim.compute_s * 1e3 / sim.tokens, 3),
            "sim_stall_ms_per_token": round(sim.stall_s * 1e3 / sim.tokens, 3),
            "bound_ms_per_token": round(bound_s * 1e3 / sim.tokens, 3),
            "copy_ms_per_token": round(copies * copy_s * 1e3 / sim.tokens, 3),
            "sim_interval": priced.interval(lambda t, ph=phase: phase_tokens_per_s(t, ph)),
        }
        variant = c.get("variant") or ("repeat" if c.get("repeat") else None)
        if variant == "nosync":
            run_ahead.append(cell)
        elif variant == "repeat":
            repeats.append(cell)
        else:
            cells.append(cell)
    errs = np.abs([c["rel_error"] for c in cells])
    out: dict[str, Any] = {
        "cells": cells,
        "max_rel_error": round(float(errs.max()), 4) if len(errs) else None,
        "median_rel_error": round(float(np.median(errs)), 4) if len(errs) else None,
        "hit_rates_identical": all(c["real_hits"] == c["sim_hits"] for c in cells),
        "cells_within_5pct": int((errs <= 0.05).sum()),
        "min_efficiency": round(min(c["efficiency"] for c in cells), 4) if cells else None,
        "cells_efficiency_at_least_85pct": sum(c["efficiency"] >= 0.85 for c in cells),
        "efficiency_definition": "independent bound (every copy at the peak measured bandwidth "
                                 f"{peak_bandwidth(cost) / 1e9:.2f} GB/s, kernels at their micro-benchmark times, "
                                 "no engine overhead term) / measured time",
        "in_situ_copy": in_situ_check(engine, cost),
    }
    phases: dict[str, Any] = {}
    for c in cells:
        phases.setdefault(f"{c['phase']} batch {c['batch']}", []).append(abs(c["rel_error"]))
    out["per_phase"] = {k: {"cells": len(v), "max_rel_error": round(max(v), 4),
                            "median_rel_error": round(float(np.median(v)), 4),
                            "cells_within_5pct": sum(e <= 0.05 for e in v)} for k, v in phases.items()}

    def key(c: dict[str, Any]) -> tuple:
        return c["policy"], c["cache_size"], c["prefetch"], c["batch"], c["phase"]
    by_key = {key(c): c for c in cells}
    if repeats:
        out["repeatability"] = [
            {"policy": r["policy"], "cache_size": r["cache_size"], "prefetch": r["prefetch"], "batch": r["batch"],
             "phase": r["phase"], "first_tokens_per_s": by_key[key(r)]["real_tokens_per_s"],
             "repeat_tokens_per_s": r["real_tokens_per_s"]}
            for r in repeats if key(r) in by_key]
    if run_ahead:   # the same cells with the CPU queueing tokens ahead (no wait for each token's logits)
        out["without_token_sync"] = [
            {"policy": r["policy"], "cache_size": r["cache_size"], "prefetch": r["prefetch"],
             "synced_tokens_per_s": by_key[key(r)]["real_tokens_per_s"],
             "unsynced_tokens_per_s": r["real_tokens_per_s"], "sim_tokens_per_s": r["sim_tokens_per_s"]}
            for r in run_ahead if key(r) in by_key]
    return out


def a100_comparison(trace: Trace, calibrated, a100) -> dict[str, Any]:
    """mixtral-offloading's published 3.06 tok/s (A100, 2-bit experts, 4 slots/layer, LRU) vs simulation."""
    from moesim.simulator.timing import simulate_timing

    res = {}
    for name, cost in (("a100_preset", a100), ("h200_calibrated_with_a100_pcie", calibrated.with_overrides(
            pcie_gbps=a100.bandwidth_Bps / 1e9, pcie_latency_us=a100.latency_s * 1e6))):
        for pf in ("none", "transition"):
            sim = simulate_timing(trace, "lru", 4, cost, prefetch=pf)
            res[f"{name}/{pf}"] = round(float(sim.tokens_per_s), 3)
    return {"published_tokens_per_s": MIXTRAL_OFFLOADING_A100_TOKENS_PER_S, "policy": "lru", "cache_size": 4,
            "quantization": "hqq2", "simulated_tokens_per_s": res}


def report_paths(prefix: str | Path) -> list[Path]:
    """The files ``write_report`` writes for ``prefix``: .json, .md, .png."""
    prefix = Path(prefix)
    return [prefix.with_suffix(".json"), prefix.with_suffix(".md"), prefix.with_suffix(".png")]


def write_report(report: dict[str, Any], prefix: str | Path) -> list[Path]:
    """``prefix``.json, .md and .png (atomic writes)."""
    paths = report_paths(prefix)
    with atomic_open(paths[0]) as fh:
        json.dump(report, fh, indent=1)
        fh.write("\n")
    with atomic_open(paths[1]) as fh:
        fh.write(markdown(report))
    plot(report, paths[2])
    return paths


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# Sim vs real: {r['device']}", "",
             f"- date: {r['date']}; commit: {r['commit']} (uncommitted changes: {r['uncommitted_changes']})",
             f"- layers: {r['layers']}; tokens per cell: {r['tokens']}; expert bytes: {r['expert_bytes']} "
             f"({r.get('quantization', '')}); all-resident engine ms/token: {r.get('all_resident_ms_per_token')}",
             f"- hit rates identical in every cell: {r['hit_rates_identical']}",
             f"- tokens/s error: max {r['max_rel_error']:.1%}, median {r['median_rel_error']:.1%}; "
             f"{r['cells_within_5pct']} of {len(r['cells'])} cells within 5%",
             f"- engine efficiency ({r.get('efficiency_definition', 'ideal schedule / measured time')}): min "
             f"{r.get('min_efficiency') or 0:.1%}; {r.get('cells_efficiency_at_least_85pct')} of {len(r['cells'])} "
             "cells at 85% or more", *in_situ_lines(r.get("in_situ_copy")), "",
             *[f"- {k}: {v['cells_within_5pct']} of {v['cells']} cells within 5%, max {v['max_rel_error']:.1%}, "
               f"median {v['median_rel_error']:.1%}" for k, v in (r.get("per_phase") or {}).items()], "",
             "| policy | K | prefetch | batch | phase | real tok/s | sim tok/s | error | real hit | sim hit | efficiency |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in r["cells"]:
        lines.append(f"| {c['policy']} | {c['cache_size']} | {c['prefetch']} | {c.get('batch', 1)} | "
                     f"{c.get('phase', 'decode')} | {c['real_tokens_per_s']:.2f} | "
                     f"{c['sim_tokens_per_s']:.2f} | {c['rel_error']:+.1%} | {c['real_hit_rate']:.4f} | "
                     f"{c['sim_hit_rate']:.4f} | {c['efficiency']:.0%} |")
    if r.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    if r.get("a100"):
        a = r["a100"]
        lines += ["", "## mixtral-offloading on an A100", "",
                  f"Published: {a['published_tokens_per_s']} tok/s (2-bit experts, {a['cache_size']} slots). Simulated:", ""]
        lines += [f"- {k}: {v} tok/s" for k, v in a["simulated_tokens_per_s"].items()]
    return "\n".join(lines) + "\n"


def in_situ_lines(check: dict[str, Any] | None) -> list[str]:
    if not check:
        return ["- in-situ copy bandwidth: not recorded in the engine file"]
    lo, hi = check["calibration_interval_gbps"]
    verdict = ("inside" if check["within_calibration_interval"] else
               "**OUTSIDE** (the calibration describes another day's PCIe: re-calibrate)")
    return [f"- in-situ copy bandwidth {check['gbps']:.2f} GB/s (median of {check['n']} copy events) is {verdict} "
            f"the calibration's interval {lo:.2f}-{hi:.2f} GB/s"]


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    marks = {"none": "o", "oracle": "s", "transition": "^"}
    for pf, m in marks.items():
        cs = [c for c in r["cells"] if c["prefetch"] == pf]
        if cs:
            ax1.scatter([c["real_tokens_per_s"] for c in cs], [c["sim_tokens_per_s"] for c in cs], marker=m, label=pf)
            ax2.scatter([c["real_hit_rate"] for c in cs], [c["rel_error"] for c in cs], marker=m, label=pf)
    lim = max(max(c["real_tokens_per_s"] for c in r["cells"]), max(c["sim_tokens_per_s"] for c in r["cells"])) * 1.05
    ax1.plot([0, lim], [0, lim], "k-", lw=0.8)
    ax1.fill_between([0, lim], [0, lim * 0.95], [0, lim * 1.05], color="grey", alpha=0.2, label="±5%")
    ax1.set(xlabel="real tokens/s (H200 engine)", ylabel="simulated tokens/s", xlim=(0, lim), ylim=(0, lim))
    ax2.axhspan(-0.05, 0.05, color="grey", alpha=0.2)
    ax2.set(xlabel="hit rate", ylabel="tokens/s error (sim / real - 1)")
    from matplotlib.ticker import PercentFormatter

    ax2.yaxis.set_major_formatter(PercentFormatter(1.0))
    for ax in (ax1, ax2):
        ax.legend(title="prefetch")
    fig.suptitle(f"sim vs real, {r['device']}, {r['layers']} layers, {r['tokens']} tokens per cell")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
