"""Rebuild studies/fidelity/fidelity_h200.{json,md,png} from the committed engine cells (CPU only).

    python studies/fidelity/make_report.py -o studies/fidelity/fidelity_h200

The cells (studies/fidelity/raw/cells/: validate.json = the real trace from token 128 on,
validate.synth-mixtral-8x7b.json = traces/synth-mixtral-8x7b.parquet, validate.learned-mixtral-32l.json =
traces/learned-mixtral-32l.parquet; calibration_raw.json = the cells run's own micro-benchmarks, used for
cross-checks only) come from device runs of benchmarks/gpu_validate.py (commands in run.json and the
report): batch-1 decode cells (the batch-1 engine), batch 4 and 16 decode cells and prefill cells
(moesim.engine.batch). The simulator prices them with the committed calibration alone
(moesim/data/hardware/h200.json, every term measured in other device calls than the cells': copies,
engine pieces, per-token overhead and the batch engine's pieces ``batch_programs`` by micro-benchmark,
stream hops from a CUPTI trace). Nothing is fitted to these cells.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from moesim.cli import main as moesim_main  # noqa: E402
from moesim.engine.calibration import batch_cost, to_cost_model  # noqa: E402
from moesim.engine.validation import (  # noqa: E402
    cell_inputs,
    in_situ_check,
    independent_bound,
    peak_bandwidth,
    sim_interval,
    simulate_cell,
)
from moesim.simulator.cost_model import CostModel  # noqa: E402
from moesim.simulator.timing import simulate_timing  # noqa: E402
from moesim.traces.format import DECODE, TraceMeta, TraceWriter, read_trace  # noqa: E402
from studies._common import (  # noqa: E402
    md_table,
    pct,
    pct_range,
    relative,
    render_from_json,
    save_figure,
    write_json,
    write_text,
)

REAL = ROOT.parent / "shared" / "traces" / "real" / "mixtral-8x7b-instruct-fp8_humaneval-2_vllm.jsonl"
TRACES = {"synth-mixtral-8x7b.parquet": ROOT / "traces" / "synth-mixtral-8x7b.parquet",
          "learned-mixtral-32l.parquet": ROOT / "traces" / "learned-mixtral-32l.parquet"}
COLORS = {"real.parquet": "tab:blue", "synth-mixtral-8x7b.parquet": "tab:orange",
          "learned-mixtral-32l.parquet": "tab:green"}
CALIBRATION_SOURCE = ("moesim/data/hardware/h200.json as committed, measured in other device calls than the "
                      "cells': copy curve 2026-11-29 (+ copy sessions of 2026-12-02), engine pieces, per-token "
                      "overhead, engine terms and batch_programs 2026-12-02T07:18Z "
                      "(studies/calibration/raw/2026-12-02/), stream hops 2026-12-02T07:09Z "
                      "(studies/engine_sync/gpu_engine_sync.py, studies/engine_sync/raw/)")
SHAPES = {("decode", 1): "o", ("decode", 4): "s", ("decode", 16): "D", ("prefill", 1): "^"}


def traces(real: Path, tmp: Path) -> dict[str, Path]:
    """The traces the device run replayed: the real one imported here (it is never copied in), the
    synthetic and the learned-routing ones as committed."""
    out = {"real.parquet": tmp / "real.parquet", **TRACES}
    if moesim_main(["import", "--from", "vllm-jsonl", str(real), str(out["real.parquet"])]) != 0:
        raise SystemExit(f"{real}: import failed")
    return out


def all_miss_excess(raw: dict, cost: CostModel, tmp: Path) -> dict | None:
    """The engine's own all-miss run against the simulator's price of it (no per-miss term): what a
    demand miss costs in the real engine beyond its transfer -- a cross-check of the micro-benchmark."""
    am = raw.get("all_miss")
    if not am:
        return None
    L, T = int(am["layers"]), int(am["tokens"])
    meta = TraceMeta(model="all-miss", family="mixtral", num_layers=L, num_experts=8, top_k=2,
                     expert_bytes=int(raw["copy_repeats"]["bytes"]), quantization="hqq2")
    ex = np.repeat(np.asarray(am["experts"], np.int64), L, axis=0)
    tok = np.repeat(np.arange(T), L)
    path = tmp / "all_miss.parquet"
    with TraceWriter(path, meta) as w:
        w.write(np.zeros(T * L, np.int32), tok, DECODE, np.tile(np.arange(L), T), ex, np.full((T * L, 2), 0.5))
    sim = simulate_timing(read_trace(path), "lru", int(am["cache_size"]), cost.with_overrides(miss_issue_us=0.0))
    real_s = float(am["gpu_ms_total"]) * 1e-3
    return {"tokens": T, "misses": int(am["misses"]), "real_ms_per_token": round(real_s * 1e3 / T, 3),
            "sim_ms_per_token_without_miss_term": round(sim.ms_per_token, 3),
            "excess_per_miss_us": round((real_s - sim.total_s) / int(am["misses"]) * 1e6, 2)}


def trace_entry(engine: dict, trace, cost: CostModel, name: str, programs: dict,
                all_miss_us: float | None = None) -> dict:
    """One trace's cells: each (policy, K, prefetch, batch, phase) priced once over the very tokens
    and steps the engine ran (moesim.engine.validation.cell_inputs), real = median of its repeats."""
    groups: dict[tuple, list[dict]] = {}
    for c in engine["cells"]:
        if c.get("variant") == "nosync":
            continue
        groups.setdefault((c["policy"], int(c["cache_size"]), c["prefetch"], int(c.get("batch", 1)),
                           c.get("phase", "decode")), []).append(c)
    cells, subs = [], {}
    for (pol, k, pf, batch, phase), runs in groups.items():
        if (batch, phase) not in subs:
            subs[(batch, phase)] = cell_inputs(engine, runs[0], trace)
        sub, b, chunk, ph, shape = subs[(batch, phase)]
        terms = programs.get(shape) if shape else None
        c_cost = batch_cost(cost, terms)
        tps = np.array([float(r["tokens_per_s"]) for r in runs])
        real = float(np.median(tps))
        sim, sim_tps = simulate_cell(sub, pol, k, pf, c_cost, b, chunk, ph)
        bound_s = simulate_cell(sub, pol, k, pf, independent_bound(batch_cost(cost, terms, overhead=False)), b, chunk,
                                ph)[0].total_s
        # what-if: the engine's all-miss excess charged as the per-miss term (a second micro-benchmark,
        # at engine level; not the calibration's field)
        am_tps = (simulate_cell(sub, pol, k, pf, c_cost.with_overrides(miss_issue_us=max(all_miss_us, 0.0)), b, chunk,
                                ph)[1] if all_miss_us is not None else None)
        hits = {int(r["hits"]) for r in runs}
        steps = int(runs[0].get("steps") or len(runs[0]["token_ms"]))
        cells.append({
            "policy": pol, "cache_size": k, "prefetch": pf, "batch": batch, "phase": phase,
            "real_tokens_per_s": round(real, 4), "sim_tokens_per_s": round(sim_tps, 4),
            "sim_interval": sim_interval(sub, pol, k, pf, c_cost, b, chunk, ph),
            "rel_error": round(sim_tps / real - 1.0, 4),
            "repeat_spread": round(float((tps.max() - tps.min()) / real), 4), "repeats": len(runs),
            "real_tokens_per_s_runs": [round(float(x), 4) for x in tps],
            "real_in_sim_interval": None,
            "rel_error_with_all_miss_term": round(am_tps / real - 1.0, 4) if am_tps else None,
            "tokens": int(runs[0]["tokens"]), "steps": steps,
            "prefill_chunk": chunk if phase == "prefill" else None,
            "priced_with": f"batch_programs[{shape}]" if terms else "the calibration's batch-1 terms",
            "real_hit_rate": round(float(runs[0]["hit_rate"]), 6), "sim_hit_rate": round(sim.hit_rate, 6),
            "hits_identical": hits == {int(sim.hits)}, "misses": int(runs[0]["misses"]),
            "misses_per_step": round(int(runs[0]["misses"]) / steps, 2),
            "prefetches": int(runs[0]["prefetches"]),
            "violations": [r.get("violations") for r in runs], "device_copies": runs[0].get("device_copies"),
            # bound / measured time of the cell's tokens
            "efficiency": round(float(bound_s / ((sim.prefill_tokens if phase == "prefill" else sim.decode_tokens)
                                                 / real)), 4),
        })
        iv = cells[-1]["sim_interval"]
        if iv:
            cells[-1]["real_in_sim_interval"] = bool(iv[0] <= real <= iv[1])
    errs = np.abs([c["rel_error"] for c in cells])
    per_phase = {}
    for c in cells:
        per_phase.setdefault(f"{c['phase']} batch {c['batch']}", []).append(abs(c["rel_error"]))
    return {"trace": name, "skip_tokens": int(engine.get("skip_tokens", 0)), "tokens": int(engine["tokens"]),
            "calibration_source": CALIBRATION_SOURCE, "cells": cells,
            "max_rel_error": round(float(errs.max()), 4), "median_rel_error": round(float(np.median(errs)), 4),
            "cells_within_5pct": int((errs <= 0.05).sum()), "cells_within_2pct": int((errs <= 0.02).sum()),
            "max_repeat_spread": round(max(c["repeat_spread"] for c in cells), 4),
            "per_phase": {k: {"cells": len(v), "max_rel_error": round(max(v), 4),
                              "median_rel_error": round(float(np.median(v)), 4),
                              "cells_within_5pct": sum(e <= 0.05 for e in v)} for k, v in per_phase.items()},
            "in_situ_copy": in_situ_check(engine, cost), "all_resident_ms_per_token": engine.get(
                "all_resident_ms_per_token")}


def timeline_check(path: Path, engine: dict, trace, cost: CostModel, programs: dict) -> dict | None:
    """studies/fidelity/gpu_batch_timeline.py's run of one batch cell (same device session, after the cells):
    its plain and instrumented step times against the simulator, priced as in the report and with the
    copy time the instrumented replay measured in situ (not a calibration: an attribution)."""
    if not path.exists():
        return None
    tl = json.loads(path.read_text())
    cell = next(c for c in engine["cells"] if c.get("batch") == tl["batch"] and c.get("phase") == "decode"
                and int(c["cache_size"]) == tl["cache_size"] and c["policy"] == tl["policy"])
    sub, b, chunk, ph, shape = cell_inputs(engine, cell, trace)
    c_cost = batch_cost(cost, programs.get(shape))
    s = tl["summary"]
    in_situ = float(s["copy_ms"]["median"]) * 1e-3
    point = c_cost.copy_seconds(int(engine["expert_bytes"])) / c_cost.copy_scale
    sim = simulate_cell(sub, tl["policy"], tl["cache_size"], "none", c_cost, b, chunk, ph)[0].total_s * 1e3
    sim_in_situ = simulate_cell(sub, tl["policy"], tl["cache_size"], "none",
                                c_cost.with_overrides(copy_scale=in_situ / point), b, chunk, ph)[0].total_s * 1e3
    plain = [float(np.sum(x)) for x in tl["plain_step_ms"]]
    off = [float(np.sum(x)) for x in tl["check_off_step_ms"]]
    inst = float(np.sum(tl["instrumented_step_ms"]))
    allres = tl["all_resident_instrumented"]["summary"]
    return {"trace": tl["trace"], "batch": tl["batch"], "cache_size": tl["cache_size"], "policy": tl["policy"],
            "steps": tl["steps"], "misses": tl["misses"], "violations": tl["violations"],
            "plain_ms": [round(x, 1) for x in plain], "check_off_ms": [round(x, 1) for x in off],
            "instrumented_ms": round(inst, 1), "sim_ms": round(sim, 1), "sim_in_situ_copy_ms": round(sim_in_situ, 1),
            "in_situ_copy_ms": round(in_situ * 1e3, 4), "calibration_copy_ms": round(point * 1e3, 4),
            "copy_gap_within_layer_us": round(s["copy_gap_within_layer_ms"]["median"] * 1e3, 1),
            "copy_gap_across_layers_ms": round(s["copy_gap_across_layers_ms"]["median"], 3),
            "gate_to_first_copy_us": round(s["gate_to_first_copy_ms"]["median"] * 1e3, 1),
            "copy_end_to_expert_us": round(s["copy_end_to_expert_start_ms"]["median"] * 1e3, 1),
            "copy_busy_ms": round(s["copy_busy_ms"], 1), "span_ms": round(s["span_ms"], 1),
            "variants_ms": {k[len("sync_"):-len("_step_ms")]: [round(float(np.sum(x)), 1) for x in v]
                            for k, v in tl.items() if k.startswith("sync_") and k.endswith("_step_ms")},
            "all_resident_instrumented_ms": round(float(np.sum(tl["all_resident_instrumented"]["step_ms"])), 1),
            "all_resident_expert_in_flow_ms": round(allres["expert_ms"]["median"], 4)}


def cache_effect(report: dict, raw: dict) -> list[dict]:
    """Measured tokens/s by cache size per trace and step shape (median of repeats, lru and lfu), and the
    all-resident engine runs of the same device session (K = 8, every expert on the GPU, warm; the real
    trace's steps): does an expert cache help beyond batch 1 and in prefill?"""
    rows = []
    full = {("decode", 1): 1e3 / float(raw["all_resident"]["median_ms_per_token"])}
    for p in (raw.get("batch_pieces") or {}).values():
        full[(p["phase"], 1 if p["phase"] == "prefill" else int(p["rows"]))] = (
            float(p["tokens"]) / (float(p["all_resident_gpu_ms_total"]) * 1e-3))
    for tr in report["traces"]:
        for phase, batch in SHAPES:
            cs = [c for c in tr["cells"] if (c["phase"], c["batch"]) == (phase, batch) and c["prefetch"] == "none"]
            if not cs:
                continue
            row = {"trace": tr["trace"], "phase": phase, "batch": batch}
            for k in sorted({c["cache_size"] for c in cs}):
                row[f"K{k}"] = {c["policy"]: c["real_tokens_per_s"] for c in cs if c["cache_size"] == k}
                row[f"K{k}_hit_rate"] = {c["policy"]: c["real_hit_rate"] for c in cs if c["cache_size"] == k}
            row["all_resident_real_trace"] = round(full[(phase, batch)], 2) if (phase, batch) in full else None
            rows.append(row)
    return rows


def cache_answer(rows: list[dict]) -> list[str]:
    """Does an expert cache help beyond batch 1 and in prefill? The answer, read off the cache-effect rows
    (K = 3 -> 5 gains per step shape, the real trace's hit rates and its all-resident runs)."""
    def shape(row):
        return "prefill" if row["phase"] == "prefill" else f"batch {row['batch']}"

    gains: dict[str, list[float]] = {}
    for row in rows:
        if row.get("K3", {}).get("lru") and row.get("K5", {}).get("lru"):
            gains.setdefault(shape(row), []).append(row["K5"]["lru"] / row["K3"]["lru"])
    if not gains:
        return []
    real = {shape(row): row for row in rows if row["trace"] == "real.parquet"}
    text = ("**Measured: going from 3 to 5 slots per layer raises tokens/s** "
            + ", ".join(f"{min(v):.2f}-{max(v):.2f}x at {k}" for k, v in gains.items()) + " (lru, over the traces).")
    b1, b16, pre = real.get("batch 1"), real.get("batch 16"), real.get("prefill")
    if b1 and b16 and pre:
        text += (f" Hit rates fall as the batch grows (real trace, K = 3: {b1['K3_hit_rate']['lru']:.0%} at batch 1, "
                 f"{b16['K3_hit_rate']['lru']:.0%} at batch 16, {pre['K3_hit_rate']['lru']:.0%} in prefill chunks), but "
                 "every shape stays copy-bound, so each resident expert still saves a copy per step: all experts "
                 f"resident (K = 8) runs {b16['all_resident_real_trace'] / b16['K5']['lru']:.1f}x faster than K = 5 at "
                 f"batch 16, {pre['all_resident_real_trace'] / pre['K5']['lru']:.1f}x in prefill and "
                 f"{b1['all_resident_real_trace'] / b1['K5']['lru']:.1f}x at batch 1. Batching amortises the copies on "
                 f"its own too: K = 3 at batch 16 gives {b16['K3']['lru']:.1f} tok/s vs {b1['K3']['lru']:.1f} at batch 1.")
    return [text]


def calibration_provenance(log_path: Path) -> dict:
    """Which routing the calibration session's all-resident run and batch pieces replayed. gpu_validate.py
    runs both on the first routing it loads (``routings[0]``, ``batch_inputs[(0, key)]``) and logs that
    routing first, as ``routing PATH (from token N)``; the log is the session's raw record of it."""
    for line in log_path.read_text().splitlines():
        m = re.search(r"\] routing (\S+) \(from token (\d+)\)", line)
        if m:
            return {"log": relative(log_path), "routing": m.group(1), "from_token": int(m.group(2))}
    raise ValueError(f"{log_path}: no 'routing PATH (from token N)' line")


def provenance_sentence(r: dict) -> str:
    """What the all-resident overhead and the batch pieces were measured on, from the session's log."""
    p, skip = r["calibration_provenance"], r["real_cells_skip_tokens"]
    same = Path(p["routing"]).name == "real.parquet"
    return (f"Two of those terms ran on {'the real trace' if same else p['routing']}'s own steps, with every expert "
            f"resident: the per-token overhead (an all-resident run) and the batch engine's pieces, both replaying "
            f"`{p['routing']}` from token {p['from_token']} (the calibration session's log, `{p['log']}`)"
            + (f"; the real-trace cells replay that trace from token {skip} too, with the cache in play" if same else "")
            + ". The other terms are micro-benchmarks and CUPTI traces of synthetic routing:")


def by_phase(r: dict) -> str:
    """Signed error range per step shape over the three traces, and the largest repeat spread."""
    shapes: dict[str, list[float]] = {}
    for tr in r["traces"]:
        for c in tr["cells"]:
            name = "prefill" if c["phase"] == "prefill" else f"batch-{c['batch']} decode"
            shapes.setdefault(name, []).append(c["rel_error"])
    parts = [f"{k} {pct_range(v, signed=True)} ({sum(abs(e) <= 0.02 for e in v)}/{len(v)} within 2%)"
             for k, v in shapes.items()]
    spread = max(tr["max_repeat_spread"] for tr in r["traces"])
    return (f"By step shape (sim / real - 1): {'; '.join(parts)}. Largest spread between a cell's repeats: "
            f"{pct(spread)}.")


def definitions(r: dict) -> list[str]:
    """The terms of the cell tables, and the heading of the notes that follow them."""
    return ["## Definitions", "",
              "- `rel_error` = sim / real - 1 (real = median over the repeats); decode cells compare decode tokens/s, "
              "prefill cells prompt tokens/s; `repeat_spread` = (max - min) / median of the repeats of identical cells "
              "in this run.",
              "- batch B decode: B sequences per step (token j of each); the trace's tokens are cut into B segments of "
              "consecutive tokens of one sequence (positions kept), `moesim.engine.validation.cell_trace`; prefill: "
              "prompts of 64 tokens in chunks of 32 (the learned trace's real prompts; the other two offer their "
              "decode tokens as prompts). Engine and simulator group them with the one definition "
              "`moesim.traces.steps.build_steps`; each layer requests the union of the step's experts.",
              "- attention reads the first `bucket` cache positions, bucket = the smallest power of two >= 64 holding "
              "the step's largest position + 1; the simulator's `layer.per_context_s` (fitted over the buckets each "
              "shape used; 0 where a shape used one bucket) is what it is compared with.",
              "- `error, all-miss term`: the same simulation with the engine-level all-miss excess (above) charged as "
              "`miss_issue_s` (a what-if, not the calibration).",
              "- `violations`: the device-side residency proof per repeat (batch engine: the trace's routed experts "
              "each computed exactly once from a slot holding its identity; `-` = the batch-1 engine, built without "
              "the check as its calibration was).",
              f"- `efficiency` = {r['efficiency_definition']}.", "", "## Notes", ""]


def markdown(r: dict) -> str:
    t = r["engine_terms"]
    lines = [f"# Fidelity out of sample: {r['device']}", "",
             f"Rebuilt by `{r['command']}` from `studies/fidelity/raw/cells/` (device run: `{r['device_command']}`, "
             f"{r['device_date']}).", "",
             f"**Result**: {r['cells_within_5pct']} of {r['cells']} cells within 5%, {r['cells_within_2pct']} within 2%; "
             f"max error {r['max_rel_error']:.1%}, median {r['median_rel_error']:.1%}. The goal (every cell within 5%, "
             "median within 2%) is " + ("**met**." if r["cells_within_5pct"] == r["cells"] and r["median_rel_error"] <= 0.02
                                        else "**not met**; see the per-phase lines and the notes for what misses."),
             "", by_phase(r), "",
             "## What the simulator was given", "",
             "The committed calibration `moesim/data/hardware/h200.json`, nothing else: every term in it was measured "
             "in other device calls than the cells' (micro-benchmarks and CUPTI traces). " + provenance_sentence(r), "",
             f"- expert copy: the copy curve of 2026-11-29 ({r['calibration_copy_ms']:.4f} ms per expert); "
             "`sim_interval` = the simulation with every copy at the slow and at the fast end of p10..p90 over the "
             "calibration's copy sessions (" + "; ".join(f"{x['date']}: median {x['median_ms']:.4f} ms, p10-p90 "
                                                        f"{x['p10_ms']:.4f}-{x['p90_ms']:.4f}"
                                                        for x in t["copy_sessions"]) + ")",
             "- the engine's captured pieces, its per-token overhead beyond them "
             f"({t['token_overhead_ms']:.3f} ms per token, an all-resident run), the per-miss issue cost "
             f"({t['miss_issue_us']:.1f} us) and the batch engine's pieces per step shape (`batch_programs`, below): "
             "`benchmarks/gpu_validate.py` with no cells, 2026-12-02T07:18Z (studies/calibration/raw/2026-12-02/; "
             "`moesim calibrate --from-raw ... --add-to moesim/data/hardware/h200.json --with-pieces`)",
             f"- stream hops: {t['copy_hop_us']:.1f} us before every copy, {t['ready_hop_us']:.1f} us when compute "
             "waits for a copy: the GPU timestamps (CUPTI) of the engine's all-miss replay on synthetic routing, "
             "`studies/engine_sync/gpu_engine_sync.py`, 2026-12-02T07:09Z (studies/engine_sync/raw/, "
             "studies/engine_sync/engine_sync_h200.md)",
             "- batch 4 / 16 decode and prefill cells: layer, token and expert terms of the batch engine's own "
             "captured pieces for that step shape (`batch_programs`, moesim.engine.calibration.batch_programs):", ""]
    for key, bp in r["batch_programs"].items():
        lines.append(f"  - `{key}`: {bp['source']}; simulator terms: layer base {bp['layer']['base_s'] * 1e3:.4f} ms, "
                     f"per_context_s {bp['layer']['per_context_s']:.3g}; token {bp['token']['base_s'] * 1e3:.4f} ms")
    lines.append("")
    if r.get("all_miss"):
        a = r["all_miss"]
        lines += [f"- cross-check, the batch-1 engine with every request a miss ({a['misses']} misses, synthetic "
                  f"routing): {a['real_ms_per_token']} ms/token measured vs {a['sim_ms_per_token_without_miss_term']} "
                  f"simulated with this session's own pieces and per-token overhead and the calibration's stream hops, "
                  f"without a per-miss term: "
                  f"{a['excess_per_miss_us']} us per miss (the `error, all-miss term` column charges it)", ""]
    tl = r.get("timeline")
    if tl:
        lines += ["## One batch-16 cell on a timeline (studies/fidelity/gpu_batch_timeline.py)", "",
                  f"One cell again ({tl['trace']}, decode batch {tl['batch']}, {tl['policy']} K={tl['cache_size']}, "
                  f"{tl['steps']} steps, {tl['misses']} misses; residency violations {tl['violations']}), same kind of "
                  f"machine, a second device call after the cells (`{r.get('timeline_command', '')}`):", "",
                  f"- the engine's replay (default stream order, moesim.engine.sync.DEFAULT_SYNC) {tl['plain_ms']} ms "
                  f"(residency check off: {tl['check_off_ms']} ms); instrumented "
                  f"replay (CUDA events around every piece and copy) {tl['instrumented_ms']} ms; simulated "
                  f"{tl['sim_ms']} ms, or {tl['sim_in_situ_copy_ms']} ms with the copy time the instrumented replay "
                  f"measured in situ ({tl['in_situ_copy_ms']} ms per expert vs {tl['calibration_copy_ms']} ms calibrated)",
                  f"- in the instrumented replay the copy stream is busy {tl['copy_busy_ms']} of {tl['span_ms']} ms; "
                  f"gaps between copies of one layer {tl['copy_gap_within_layer_us']} us (the residency count "
                  f"kernels), across layers {tl['copy_gap_across_layers_ms']} ms (last expert + next layer piece, "
                  f"as simulated); gate -> first copy {tl['gate_to_first_copy_us']} us, copy end -> its expert "
                  f"{tl['copy_end_to_expert_us']} us",
                  "- the same replay in the engine's other stream orders: " + "; ".join(
                      f"`{k}` {v} ms" for k, v in tl["variants_ms"].items()) + " (`plain`: every wait issued and the "
                  "CPU a whole step ahead, the engine before moesim.engine.sync)", ""]
    lines += ["## Does an expert cache help beyond batch 1 and in prefill?", "",
              "Measured tokens/s (median of repeats; lru / lfu), hit rate in brackets; `K=8` is the all-resident "
              "engine run of the same session (every expert on the GPU, warm, the real trace's steps).", "",
              ]
    effect = []
    for row in r["cache_effect"]:
        k3, k5 = row.get("K3", {}), row.get("K5", {})
        h3, h5 = row.get("K3_hit_rate", {}), row.get("K5_hit_rate", {})
        gain = (k5.get("lru", np.nan) / k3.get("lru", np.nan)) if k3 and k5 else np.nan
        effect.append([row["trace"], row["phase"], row["batch"],
                       f"{k3.get('lru', 0):.1f} / {k3.get('lfu', 0):.1f} ({h3.get('lru', 0):.0%})",
                       f"{k5.get('lru', 0):.1f} / {k5.get('lfu', 0):.1f} ({h5.get('lru', 0):.0%})", f"{gain:.2f}x",
                       f"{row['all_resident_real_trace'] or '-':.1f}"])
    lines += md_table(["trace", "phase", "batch", "K=3 lru / lfu", "K=5 lru / lfu", "K=5 / K=3", "K=8 (all resident)"],
                      effect)
    lines += ["", *cache_answer(r["cache_effect"]), ""]
    for tr in r["traces"]:
        lines += [f"## {tr['trace']}", "",
                  f"- tokens/s error: max {tr['max_rel_error']:.1%}, median {tr['median_rel_error']:.1%}; "
                  f"{tr['cells_within_5pct']} of {len(tr['cells'])} cells within 5%, {tr['cells_within_2pct']} within 2%; "
                  f"largest repeat spread {tr['max_repeat_spread']:.1%}"]
        for k, v in tr["per_phase"].items():
            lines.append(f"- {k}: {v['cells_within_5pct']} of {v['cells']} within 5%, max {v['max_rel_error']:.1%}, "
                         f"median {v['median_rel_error']:.1%}")
        ins = tr.get("in_situ_copy")
        if ins:
            lo, hi = ins["calibration_interval_gbps"]
            lines.append(f"- in-situ copies (instrumented batch-1 replay, {ins['n']} copies): {ins['gbps']:.2f} GB/s, "
                         f"{'inside' if ins['within_calibration_interval'] else '**outside**'} the calibration's "
                         f"interval {lo:.2f}-{hi:.2f} GB/s")
        cells = []
        for c in tr["cells"]:
            iv = c["sim_interval"]
            cells.append([c["policy"], c["cache_size"], c["batch"], c["phase"], f"{c['steps']} x {c['tokens'] // c['steps']}",
                          f"{c['real_tokens_per_s']:.2f}", f"{pct(c['repeat_spread'])} (n={c['repeats']})",
                          f"{c['sim_tokens_per_s']:.2f}", f"{iv[0]:.2f}-{iv[1]:.2f}" if iv else "-",
                          pct(c["rel_error"], signed=True), pct(c["rel_error_with_all_miss_term"], signed=True),
                          f"{c['misses_per_step']:.1f}", c["hits_identical"],
                          ",".join("-" if v is None else str(v) for v in c["violations"]), f"{c['efficiency']:.0%}"])
        lines += ["", *md_table(["policy", "K", "batch", "phase", "steps x tokens", "real tok/s (median)",
                                 "repeats spread", "sim tok/s", "sim interval", "error", "error, all-miss term",
                                 "misses/step", "hits equal", "violations", "efficiency"], cells), ""]
    lines += definitions(r)
    lines += [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5.8), gridspec_kw={"width_ratios": [1, 1.7]})
    lo_lim, hi_lim = float("inf"), 0.0
    labels, x = [], 0
    for tr in r["traces"]:
        col = COLORS.get(tr["trace"], "k")
        for c in tr["cells"]:
            real, sim = c["real_tokens_per_s"], c["sim_tokens_per_s"]
            m = SHAPES.get((c["phase"], c["batch"]), "o")
            ax1.plot(real, sim, m, color=col, ms=6)
            lo_lim, hi_lim = min(lo_lim, real, sim), max(hi_lim, real, sim)
            iv = c["sim_interval"] or [sim, sim]
            err = [[max(c["rel_error"] - (iv[0] / real - 1), 0)], [max((iv[1] / real - 1) - c["rel_error"], 0)]]
            ax2.errorbar(x, c["rel_error"], yerr=err, fmt=m, color=col, capsize=2, ms=5)
            if c.get("rel_error_with_all_miss_term") is not None:
                ax2.plot(x, c["rel_error_with_all_miss_term"], m, mfc="none", color=col, ms=5)
            ax2.plot([x - 0.3, x + 0.3], [c["repeat_spread"] / 2] * 2, color="grey", lw=1)
            ax2.plot([x - 0.3, x + 0.3], [-c["repeat_spread"] / 2] * 2, color="grey", lw=1)
            labels.append(f"{c['policy']} K{c['cache_size']} {'P' if c['phase'] == 'prefill' else 'B'}{c['batch']}")
            x += 1
    lo_lim, hi_lim = lo_lim * 0.8, hi_lim * 1.2
    ax1.plot([lo_lim, hi_lim], [lo_lim, hi_lim], "k-", lw=0.8)
    xs = np.geomspace(lo_lim, hi_lim, 50)
    ax1.fill_between(xs, xs * 0.95, xs * 1.05, color="grey", alpha=0.25)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for axis in (ax1.xaxis, ax1.yaxis):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    for name, col in COLORS.items():
        ax1.plot([], [], "o", color=col, label=name)
    for (phase, batch), m in SHAPES.items():
        ax1.plot([], [], m, color="grey", label=f"{phase} batch {batch}" if phase == "decode" else "prefill (chunk 32)")
    ax1.set(xlabel="real tokens/s (H200 engine, median of repeats)", ylabel="simulated tokens/s",
            xlim=(lo_lim, hi_lim), ylim=(lo_lim, hi_lim), title="tokens/s, log scale (grey band: +/-5%)")
    ticks = [t for t in (10, 15, 20, 30, 50, 70, 100, 150, 200, 300) if lo_lim <= t <= hi_lim]
    ax1.set_xticks(ticks, [str(t) for t in ticks])
    ax1.set_yticks(ticks, [str(t) for t in ticks])
    ax1.legend(fontsize=7)
    ax2.axhspan(-0.05, 0.05, color="grey", alpha=0.15)
    ax2.axhspan(-0.02, 0.02, color="grey", alpha=0.2)
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    from matplotlib.ticker import PercentFormatter

    ax2.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax2.set(ylabel="sim / real - 1", title="error per cell, traces left to right (bar: copy interval; hollow: "
            "all-miss term; grey: +/- half the repeat spread; B = decode batch, P = prefill)")
    ax2.title.set_fontsize(8)
    fig.suptitle("Out-of-sample fidelity on the H200: three traces, batch 1/4/16 decode and prefill\nthe committed "
                 "calibration alone (copies 2026-11-29; engine and batch pieces, overhead, stream hops 2026-12-02), "
                 "all measured in other device calls than the cells'", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", default=str(ROOT / "studies/fidelity/raw/cells"))
    ap.add_argument("--real", default=str(REAL), help="the shared real trace (vllm-jsonl)")
    ap.add_argument("--calibration", default=str(ROOT / "moesim/data/hardware/h200.json"))
    ap.add_argument("--calibration-log", default=str(ROOT / "studies/calibration/raw/2026-12-02/device_log.txt"),
                    help="the device log of the session that measured the committed calibration's engine terms")
    ap.add_argument("--from-json", help="re-render .md/.png from this report json (no real trace needed)")
    ap.add_argument("-o", "--out", required=True, help="output prefix (the committed one: studies/fidelity/fidelity_h200)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.from_json:
        render_from_json(args.from_json, out, markdown, plot)
        return 0
    cells = Path(args.cells)
    raw = json.loads((cells / "calibration_raw.json").read_text())
    meta = json.loads((cells / "run.json").read_text()) if (cells / "run.json").exists() else {}
    committed = json.loads(Path(args.calibration).read_text())
    # the committed calibration alone (measured in other device calls); the cells run's own micro-benchmarks
    # (raw) only feed the cross-checks below
    cost = CostModel.from_dict(committed)
    programs = committed.get("batch_programs", {})
    # this session's own pieces and per-token overhead, with the calibration's stream hops: what a miss
    # costs in the engine beyond everything the calibration already charges
    same_day = CostModel.from_dict(to_cost_model(raw, path=cells / "calibration_raw.json")).with_overrides(
        copy_hop_us=cost.copy_hop_s * 1e6, ready_hop_us=cost.ready_hop_s * 1e6)
    mi, rh, cr = raw["engine_terms"]["miss_issue"], raw["engine_terms"]["routing_handoff"], raw["copy_repeats"]
    report: dict = {"device": None, "command": "python studies/fidelity/make_report.py -o studies/fidelity/fidelity_h200",
                    "device_command": meta.get("command", "benchmarks/gpu_validate.py"),
                    "device_date": meta.get("date"), "calibration": cost.description,
                    "timeline_command": meta.get("timeline_command"),
                    "calibration_copy_ms": round(cost.copy_seconds(int(cr["bytes"])) / cost.copy_scale * 1e3, 4),
                    "engine_terms": {   # what the simulator charged (the committed calibration)
                        "miss_issue_us": cost.miss_issue_s * 1e6, "copy_hop_us": cost.copy_hop_s * 1e6,
                        "ready_hop_us": cost.ready_hop_s * 1e6,
                        "token_overhead_ms": float(committed["token"].get("engine_overhead_s", 0.0)) * 1e3,
                        "copy_sessions": [{"date": x["date"], "median_ms": round(x["median_s"] * 1e3, 4),
                                           "p10_ms": round(x["p10_s"] * 1e3, 4), "p90_ms": round(x["p90_s"] * 1e3, 4)}
                                          for x in committed["pcie"].get("expert_copy", {}).get("sessions", [])]},
                    "cells_run_micro_benchmarks": {   # the cells run's own (cross-checks; not used to price)
                        "miss_issue_us": mi["miss_issue_s"] * 1e6, "miss_issue_unhidden_us": mi["unhidden_s"] * 1e6,
                        "routing_handoff_us": rh["routing_handoff_s"] * 1e6,
                        "routing_handoff_eager_us": rh["eager_handoff_s"] * 1e6,
                        "copy_median_ms": cr["median_ms"], "copy_p10_ms": cr["p10_ms"], "copy_p90_ms": cr["p90_ms"],
                        "copy_n": cr["n"], "copy_buffers": cr["buffers"],
                        "copy_median_gbps": cr["bytes"] / cr["median_ms"] / 1e6,
                        "all_resident_ms_per_token": raw["all_resident"]["median_ms_per_token"]},
                    "batch_programs": programs,
                    "efficiency_definition": f"independent bound / measured time; bound = the cell's own copies at the "
                                             f"peak measured bandwidth ({peak_bandwidth(cost) / 1e9:.2f} GB/s), kernels at "
                                             "their micro-benchmark times (batch pieces without the per-call overhead), "
                                             "no engine overhead term, with the dependencies of the schedule",
                    "traces": [], "notes": meta.get("notes", []),
                    "calibration_provenance": calibration_provenance(Path(args.calibration_log))}
    with tempfile.TemporaryDirectory() as tmp:
        paths = traces(Path(args.real), Path(tmp))
        report["all_miss"] = all_miss_excess(raw, same_day, Path(tmp))
        order = ["validate.json", "validate.synth-mixtral-8x7b.json", "validate.learned-mixtral-32l.json"]
        for fname in [f for f in order if (cells / f).exists()]:
            engine = json.loads((cells / fname).read_text())
            report["device"] = engine.get("device")
            name = engine.get("trace", "real.parquet")
            am = report["all_miss"]["excess_per_miss_us"] if report["all_miss"] else None
            report["traces"].append(trace_entry(engine, read_trace(paths[name]), cost, name, programs, am))
            if fname == "validate.json":
                report["real_cells_skip_tokens"] = engine.get("skip_tokens", 0)
                report["timeline"] = timeline_check(cells / "batch_timeline.json", engine, read_trace(paths[name]),
                                                    cost, programs)
    all_errs = np.array([abs(c["rel_error"]) for t in report["traces"] for c in t["cells"]])
    report["cells"] = int(len(all_errs))
    report["cells_within_5pct"] = int((all_errs <= 0.05).sum())
    report["cells_within_2pct"] = int((all_errs <= 0.02).sum())
    report["max_rel_error"] = round(float(all_errs.max()), 4)
    report["median_rel_error"] = round(float(np.median(all_errs)), 4)
    report["cache_effect"] = cache_effect(report, raw)
    write_json(out.with_suffix(".json"), report)
    write_text(out.with_suffix(".md"), markdown(report))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out}.json/.md/.png: {report['cells_within_5pct']} of {report['cells']} cells within 5%, max error "
          f"{report['max_rel_error']:.1%}, median {report['median_rel_error']:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
