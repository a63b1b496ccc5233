"""reports/miss_cost_h200.{json,md,png} from one run of benchmarks/gpu_miss_cost.py (CPU only).

    python benchmarks/make_miss_cost_report.py reports/miss_cost_h200_raw -o reports/miss_cost_h200

Part 1, the mechanism: every engine variant's ms/token (median of its tokens, median over repeats)
against the plain engine and against the overhead-free schedule of the same routing priced from the
run's own back-to-back piece and copy times, and the gaps of the CUPTI traces.
Part 2, the model: the committed cells of reports/fidelity_h200_cells/ and reports/decoder_h200_raw/
re-simulated with and without the new engine term (the term from the micro-benchmark, never fitted
to a cell).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def variants_table(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (routing, variant): median ms/token over repeats, its spread, and its excess over
    the plain engine and over the overhead-free schedule, per miss."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for v in raw["variants"]:
        groups.setdefault((v["routing"], v["variant"]), []).append(v)
    base = {r: float(np.median([v["ms_per_token_mean"] for v in vs]))
            for (r, name), vs in groups.items() if name == "engine"}
    rows = []
    for (r, name), vs in groups.items():
        ms = [float(v["ms_per_token_mean"]) for v in vs]   # the ideal is a mean over the same tokens
        med = float(np.median(ms))
        misses = vs[0]["misses"] / vs[0]["tokens"]
        ideal = raw["routings"][r]["ideal_ms_per_token"]
        rows.append({"routing": r, "variant": name, "repeats": len(vs), "ms_per_token": round(med, 3),
                     "spread_ms": round(max(ms) - min(ms), 3), "misses_per_token": round(misses, 2),
                     "issue_ms_per_token": round(float(np.median([v["issue_ms_median"] for v in vs])), 3),
                     "vs_engine_ms": round(med - base[r], 3) if r in base else None,
                     "ideal_ms_per_token": round(ideal, 3), "excess_ms": round(med - ideal, 3),
                     "excess_per_miss_us": round((med - ideal) / misses * 1e3, 1) if misses else None})
    return rows


def stream_chains(hops: dict[str, Any]) -> list[dict[str, Any]]:
    """gpu_stream_hops.py: per (pieces, events, issue, spacer) the median chain excess per layer."""
    groups: dict[tuple, list[dict]] = {}
    for c in hops["chains"]:
        groups.setdefault((c["pieces"], c["events"], c["issue"], c["spacer"]), []).append(c)
    rows = []
    for (pieces, events, issue, spacer), cs in groups.items():
        chain = [c["chain_s"] * 1e3 for c in cs]
        rows.append({"pieces": pieces, "events": events, "issue": issue, "spacer": spacer,
                     "chain_ms": [round(x, 3) for x in chain],
                     "ideal_ms": [round(c["ideal_s"] * 1e3, 3) for c in cs],
                     "excess_per_layer_us": [round(c["excess_per_layer_us"], 1) for c in cs]})
    return rows


def fidelity_cells(cost, hops_cost, real: Path) -> list[dict[str, Any]]:
    """The committed fidelity cells (reports/fidelity_h200_cells/) priced by the committed calibration
    with and without the hop terms: real tokens/s (median of repeats) against both."""
    import tempfile

    from make_fidelity_report import traces  # noqa: PLC0415 - a sibling script

    from moesim.engine.validation import head_tokens
    from moesim.simulator.timing import simulate_timing
    from moesim.traces.format import read_trace

    cells_dir = ROOT / "reports/fidelity_h200_cells"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = traces(real, Path(tmp))
        for fname in sorted(p.name for p in cells_dir.glob("validate*.json")):
            engine = json.loads((cells_dir / fname).read_text())
            name = engine.get("trace", "real.parquet")
            sub = head_tokens(read_trace(paths[name]), int(engine["tokens"]), int(engine["expert_bytes"]),
                              engine.get("quantization"), int(engine.get("skip_tokens", 0)))
            groups: dict[tuple, list[float]] = {}
            for c in engine["cells"]:
                if c.get("variant") == "nosync":
                    continue
                groups.setdefault((c["policy"], int(c["cache_size"]), c["prefetch"]), []).append(float(c["tokens_per_s"]))
            for (pol, k, pf), tps in groups.items():
                real_tps = float(np.median(tps))
                before = simulate_timing(sub, pol, k, cost, prefetch=pf).tokens_per_s
                after = simulate_timing(sub, pol, k, hops_cost, prefetch=pf).tokens_per_s
                rows.append({"trace": name, "policy": pol, "cache_size": k, "prefetch": pf,
                             "real_tokens_per_s": round(real_tps, 4), "repeat_spread": round((max(tps) - min(tps)) / real_tps, 4),
                             "sim_before": round(before, 4), "sim_after": round(after, 4),
                             "rel_error_before": round(before / real_tps - 1, 4),
                             "rel_error_after": round(after / real_tps - 1, 4)})
    return rows


def decoder_cells(terms: dict[str, float]) -> list[dict[str, Any]]:
    """reports/decoder_h200_raw/ priced as make_decoder_report.py prices it (gate-driven and replay), with
    and without the hop terms (the decoder records its gate, ready and free events without timing too)."""
    import make_decoder_report as mdr  # noqa: PLC0415 - a sibling script

    from moesim.engine.recording import as_single_token_steps
    from moesim.simulator.timing import simulate_timing

    run = ROOT / "reports/decoder_h200_raw"
    raw = json.loads((run / "decoder_raw.json").read_text())
    traces = mdr.read_traces(run / "traces.tar")
    rows = []
    for c in raw["cells"]:
        trace = as_single_token_steps(traces[c["name"]])
        spec = c["prefetch"] == "speculative"
        row = {"policy": c["policy"], "cache_size": c["cache_size"], "prefetch": c["prefetch"],
               "misses_per_step": round(c["gate"]["requests"] * (1 - c["gate"]["hit_rate"]) / c["gate"]["steps"], 2)
               if "requests" in c["gate"] else None}
        for mode in ("gate", "replay"):
            if mode == "replay" and "replay" not in c:
                continue
            cal = mdr.calibration(raw, spec)
            if mode == "replay" and spec:
                cal = dict(cal, layer=mdr.calibration(raw, spec, previous=True)["layer"])
            cost, _ = mdr.cost_for(cal, mode)
            ready = "hidden" if mode == "gate" else "gate"
            real = float(c[mode]["steps_per_s"])
            for label, cst in (("before", cost), ("after", cost.with_overrides(
                    copy_hop_us=terms["copy_hop_s"] * 1e6, ready_hop_us=terms["ready_hop_s"] * 1e6))):
                sim = simulate_timing(trace, c["policy"], int(c["cache_size"]), cst, prefetch=c["prefetch"],
                                      speculative_ready=ready)
                row[f"{mode}_real"] = round(real, 3)
                row[f"{mode}_rel_error_{label}"] = round(sim.tokens_per_s / real - 1, 4)
        rows.append(row)
    return rows


def cupti(raw_dir: Path) -> dict[str, Any]:
    path = raw_dir / "cupti.json.gz"
    if not path.exists():
        return {}
    with gzip.open(path, "rt") as fh:
        return json.load(fh)


def summary(errs: list[float]) -> dict[str, float]:
    a = np.abs(np.asarray(errs))
    return {"max_abs": round(float(a.max()), 4), "median_abs": round(float(np.median(a)), 4),
            "mean_signed": round(float(np.mean(errs)), 4), "within_5pct": int((a <= 0.05).sum()),
            "within_2pct": int((a <= 0.02).sum()), "cells": len(a)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("raw_dir")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--real", default="/work/shared/traces/real/mixtral-8x7b-instruct-fp8_humaneval-2_vllm.jsonl",
                    help="the shared real trace (vllm-jsonl), never copied into the repository")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from moesim.engine.cupti_gaps import hop_terms
    from moesim.simulator.cost_model import CostModel

    raw_dir = Path(args.raw_dir)
    raw = json.loads((raw_dir / "miss_cost.json").read_text())
    hops_raw = json.loads((raw_dir / "stream_hops.json").read_text()) if (raw_dir / "stream_hops.json").exists() else None
    terms = hop_terms(raw["cupti_gaps"]["all_miss_engine"])
    cross = {k: hop_terms(v) for k, v in raw["cupti_gaps"].items() if isinstance(v, dict)}
    cost = CostModel.preset("h200")
    # the committed calibration as it was before this report's terms (a preset that already has them is
    # priced "before" without them)
    base = cost.with_overrides(copy_hop_us=0.0, ready_hop_us=0.0)
    after = cost.with_overrides(copy_hop_us=terms["copy_hop_s"] * 1e6, ready_hop_us=terms["ready_hop_s"] * 1e6)
    report: dict[str, Any] = {
        "device": raw["device"], "date": raw["date"],
        "commands": {"device": ["python3 benchmarks/gpu_miss_cost.py --out $OUT --budget 200",
                                "python3 benchmarks/gpu_stream_hops.py --out $OUT"],
                     "report": f"python benchmarks/make_miss_cost_report.py {args.raw_dir} -o {args.out}"},
        "terms": {"copy_hop_s": terms["copy_hop_s"], "ready_hop_s": terms["ready_hop_s"],
                  "source": "CUPTI trace of the plain engine, all-miss routing (benchmarks/gpu_miss_cost.py, "
                            "cupti_gaps.hop_terms)", "cross_checks": cross},
        "pieces": raw["pieces"], "variants": variants_table(raw), "cupti_gaps": raw["cupti_gaps"],
        "launch_after_handoff": raw.get("launch_after_handoff"),
        "stream_chains": stream_chains(hops_raw) if hops_raw else None,
        "alignment": hops_raw.get("alignment") if hops_raw else None,
    }
    report["fidelity_cells"] = fidelity_cells(base, after, Path(args.real))
    report["fidelity_summary"] = {"before": summary([c["rel_error_before"] for c in report["fidelity_cells"]]),
                                  "after": summary([c["rel_error_after"] for c in report["fidelity_cells"]])}
    report["decoder_cells"] = decoder_cells(terms)
    for mode in ("gate", "replay"):
        for label in ("before", "after"):
            errs = [c[f"{mode}_rel_error_{label}"] for c in report["decoder_cells"] if f"{mode}_rel_error_{label}" in c]
            report.setdefault("decoder_summary", {})[f"{mode}_{label}"] = summary(errs)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"terms": report["terms"], "fidelity": report["fidelity_summary"],
                      "decoder": report["decoder_summary"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
