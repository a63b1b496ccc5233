"""``moesim validate``: the real engine's measured cells vs the timing simulator's predictions.

``--engine FILE`` is the engine's cell file from a GPU run (``benchmarks/gpu_validate.py``); the
simulator replays the same tokens of TRACE with the calibration and writes PREFIX.json / .md / .png.
"""

from __future__ import annotations

import argparse
import json

from moesim.commands._common import add_force_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="compare the real GPU engine's tokens/s and hit rates with the simulator",
                       description="Replay the tokens the GPU engine ran (its cells file, from "
                                   "benchmarks/gpu_validate.py) through the timing simulator and compare "
                                   "tokens/s and hit rates cell by cell; writes PREFIX.json, .md and .png. "
                                   "The cells file names its trace by content digest: another trace is refused.")
    p.add_argument("trace", help="the trace the engine replayed")
    p.add_argument("--engine", required=True, help="engine results (validate.json from the GPU run)")
    p.add_argument("--calibration", help="calibration JSON (default: the h200 preset)")
    p.add_argument("--hardware", default="h200", help="hardware preset when no --calibration (default h200)")
    p.add_argument("-o", "--out", default="sim_vs_real", help="output prefix (writes .json, .md, .png)")
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    add_force_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moesim.engine import validation as v
    from moesim.errors import DataError
    from moesim.safe_write import refuse_overwrite
    from moesim.simulator.cost_model import CostModel
    from moesim.traces.format import read_trace

    refuse_overwrite(v.report_paths(args.out), args.force)
    trace = read_trace(args.trace)
    path = Path(args.engine)
    if not path.exists():
        raise DataError(path, "no such file")
    try:
        engine = json.loads(path.read_text())
        engine["cells"], engine["tokens"], engine["expert_bytes"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(path, f"not an engine results file ({type(exc).__name__}: {exc})") from None
    unchecked = v.check_trace_digest(engine, trace, path)
    if unchecked:
        import sys

        print(f"moesim validate: {unchecked}", file=sys.stderr)
    cost = CostModel.from_json(args.calibration) if args.calibration else CostModel.preset(args.hardware)
    programs = None   # the batch engine's step shapes (moesim calibrate --from-raw ... --add-to writes them)
    if args.calibration:
        try:
            programs = json.loads(Path(args.calibration).read_text()).get("batch_programs")
        except (OSError, ValueError, AttributeError):
            programs = None   # CostModel.from_json has read it: a calibration without the block
    result = v.compare(engine, trace, cost, programs=programs)
    report = {"device": engine.get("device"), "date": engine.get("date"), "layers": engine.get("layers"),
              "expert_bytes": engine["expert_bytes"], "quantization": engine.get("quantization"),
              "tokens": engine["tokens"], "all_resident_ms_per_token": engine.get("all_resident_ms_per_token"),
              "trace_digest": trace.routing_digest(),
              "calibration": cost.name, **v.git_state(Path(__file__).resolve().parents[2]), **result,
              "notes": args.note}
    if "a100-pcie" in CostModel.presets():
        sub = v.head_tokens(trace, int(engine["tokens"]), int(engine["expert_bytes"]), engine.get("quantization"),
                          int(engine.get("skip_tokens", 0)))
        report["a100"] = v.a100_comparison(sub, cost, CostModel.preset("a100-pcie"))
    check = result.get("in_situ_copy")
    if check and not check["within_calibration_interval"]:
        import sys

        lo, hi = check["calibration_interval_gbps"]
        print(f"warning: {path}: in-situ copy bandwidth {check['gbps']:.2f} GB/s is outside the calibration's "
              f"interval {lo:.2f}-{hi:.2f} GB/s", file=sys.stderr)
    paths = v.write_report(report, args.out)
    print(f"{len(result['cells'])} cells; hit rates identical: {result['hit_rates_identical']}; tokens/s error "
          f"max {result['max_rel_error']:.1%}, median {result['median_rel_error']:.1%}; wrote "
          + ", ".join(map(str, paths)))
    return 0
