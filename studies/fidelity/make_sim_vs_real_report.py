"""studies/fidelity/sim_vs_real_h200.{json,md,png}: the H200 engine's cells beside the simulator (CPU only).

    python studies/fidelity/make_sim_vs_real_report.py -o studies/fidelity/sim_vs_real_h200 [--real JSONL]
    python studies/fidelity/make_sim_vs_real_report.py -o PREFIX --from-json studies/fidelity/sim_vs_real_h200.json

With the shared real trace: imports it, runs ``moesim validate`` on the committed engine cells
(raw/engine_cells_h200.json, a device run of gpu_validate.py) with the committed calibration
(moesim/data/hardware/h200.json), then adds the notes below. ``--from-json`` recomputes the notes for a
committed report and re-renders it (no trace needed). Every number in the notes is read from the engine
cells, the calibration, the cells' session's raw calibration or the report itself.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moesim.cli import main as moesim_main  # noqa: E402
from moesim.engine.validation import write_report  # noqa: E402
from moesim.simulator.cost_model import CostModel  # noqa: E402
from studies._common import REAL_TRACE, ROOT, pct, pct_range, relative  # noqa: E402

STUDY = ROOT / "studies" / "fidelity"
CALIBRATION = ROOT / "moesim" / "data" / "hardware" / "h200.json"
CELLS_SESSION_RAW = ROOT / "studies" / "calibration" / "raw" / "calibration_h200.json"


def engine_note(engine: dict) -> str:
    return (f"Engine run: {engine['source']}, {engine['device']}, {engine['date']}. {engine['tokens']} tokens of the "
            f"real Mixtral trace per cell, all {engine['layers']} layers, {engine['quantization']} experts "
            f"({engine['expert_bytes']:,} B each), {engine['attention_quantization']} attention, CUDA graphs: "
            f"{engine['cuda_graphs']}, compiled dequantisation: {engine['compile_dequant']}. The CPU waits for each "
            "token's logits before issuing the next token, as a real decoder must.")


def calibration_note(cal: dict, expert_bytes: int) -> str:
    cost = CostModel.from_dict(cal)
    copy_s = cost.copy_seconds(expert_bytes)
    return (f"Calibration: `{relative(CALIBRATION)}` as committed ({cost.description}), nothing else; nothing is "
            f"fitted to the cells. It charges an expert copy {copy_s * 1e3:.4f} ms ({expert_bytes / copy_s / 1e9:.1f} GB/s), "
            f"a layer piece {cost.layer_seconds() * 1e3:.4f} ms, an expert piece {cost.expert_seconds(1) * 1e3:.4f} ms "
            f"and {cal['token'].get('engine_overhead_s', 0.0) * 1e3:.3f} ms per token of engine overhead (an "
            "all-resident run minus the sum of its pieces). Its terms were measured in other device sessions than "
            f"these cells' (its `sources`); the cells' own session measured `{relative(CELLS_SESSION_RAW)}`.")


def host_note(engine: dict, session: dict) -> str:
    ar = session["all_resident"]
    # the synced cells (and their repeats): the `nosync` variant lets the CPU run ahead by design
    synced = [c for c in engine["cells"] if c.get("variant") != "nosync" and c.get("cpu_issue_ms")]
    ratios = [c["cpu_issue_ms"] / (c["wall_s"] * 1e3) for c in synced]
    gpu_ms = [c["ms_per_token"] for c in synced]
    return (f"Host: issuing a token takes the CPU {ar['cpu_issue_ms'] / ar['tokens']:.1f} ms all-resident (the "
            f"cells' session) against {min(gpu_ms):.0f}-{max(gpu_ms):.0f} ms per token in the cells: CPU issue / "
            f"wall is {min(ratios):.2f}-{max(ratios):.2f} in every cell that waits for its logits"
            + (", so no cell is host-bound." if max(ratios) < 0.5 else "."))


def bias_note(report: dict) -> str:
    errs = [c["rel_error"] for c in report["cells"]]
    side = "optimistic" if min(errs) > 0 else "pessimistic" if max(errs) < 0 else "off"
    unsynced = [x["unsynced_tokens_per_s"] / x["synced_tokens_per_s"] - 1 for x in report.get("without_token_sync", [])]
    text = (f"Remaining bias: the simulator is {pct_range(errs)} {side} across the cells (median "
            f"{pct(statistics.median(errs))}); studies/fidelity/fidelity_h200.md follows the residual on later cells "
            "and a timeline.")
    if unsynced:
        text += (f" Letting the CPU run tokens ahead without waiting for logits ({len(unsynced)} cells, "
                 f"without_token_sync) changes tokens/s by {pct_range(unsynced, signed=True)}.")
    return text


def repeat_note(report: dict) -> str | None:
    reps = report.get("repeatability") or []
    if not reps:
        return None
    worst = max(abs(x["repeat_tokens_per_s"] / x["first_tokens_per_s"] - 1) for x in reps)
    return f"Repeatability: {len(reps)} cells re-run at the end of the run agree within {pct(worst)}."


EFFICIENCY_NOTE = ("Efficiency = an independent bound / the measured time. The bound is the critical path through the "
                   "cell's own copies (misses and prefetches, each at the peak bandwidth the calibration measured, no "
                   "per-copy latency) and kernels (at their micro-benchmark times), with their dependencies (a copy "
                   "waits for its layer's gate, an expert for its copy), and no engine term (no per-token overhead, no "
                   "per-miss cost). It owes nothing to the simulator's model of the engine, so it is not the "
                   "simulator's error restated.")
A100_NOTE = ("mixtral-offloading on an A100 (below): its own engine swaps on the compute stream and reads routing back "
             "per layer; studies/mixtral_offloading_comparison/mixtral_offloading_comparison.md models that schedule "
             "(--engine-profile mixtral-offloading) and says what the model still lacks.")


def notes(report: dict, engine: dict, cal: dict, session: dict) -> list[str]:
    out = [engine_note(engine), calibration_note(cal, engine["expert_bytes"]), host_note(engine, session),
           bias_note(report), EFFICIENCY_NOTE, repeat_note(report), A100_NOTE]
    return [n for n in out if n]


def simulate(real: Path, engine_path: Path, tmp: Path) -> dict:
    """``moesim validate`` on the imported real trace; returns its report."""
    trace = tmp / "real.parquet"
    if moesim_main(["import", "--from", "vllm-jsonl", str(real), str(trace)]) != 0:
        raise SystemExit(f"{real}: import failed")
    prefix = tmp / "sim_vs_real"
    if moesim_main(["validate", str(trace), "--engine", str(engine_path), "--calibration", str(CALIBRATION),
                    "-o", str(prefix)]) != 0:
        raise SystemExit(f"{engine_path}: moesim validate failed")
    return json.loads(prefix.with_suffix(".json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", default=str(REAL_TRACE), help="the shared real trace (vllm-jsonl)")
    ap.add_argument("--engine", default=str(STUDY / "raw" / "engine_cells_h200.json"))
    ap.add_argument("--from-json", help="recompute the notes of this report and re-render it (no trace needed)")
    ap.add_argument("-o", "--out", required=True, help="output prefix (the committed one: studies/fidelity/sim_vs_real_h200)")
    args = ap.parse_args()
    engine = json.loads(Path(args.engine).read_text())
    cal = json.loads(CALIBRATION.read_text())
    session = json.loads(CELLS_SESSION_RAW.read_text())
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            report = simulate(Path(args.real), Path(args.engine), Path(tmp))
    report["notes"] = notes(report, engine, cal, session)
    paths = write_report(report, args.out)
    print(f"wrote {', '.join(str(p) for p in paths)}: max error {report['max_rel_error']:.1%}, "
          f"median {report['median_rel_error']:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
