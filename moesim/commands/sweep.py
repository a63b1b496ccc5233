"""``moesim sweep``: resumable parameter sweeps (traces x policies x params x slots x prefetchers x
budgets x hardware) on an in-process, process-pool or Ray executor; ``moesim sweep-summary`` and
``moesim sweep-plot`` read the results table."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from moesim.commands._common import add_force_arg, emit_json, positive_int, print_table
from moesim.errors import UsageError


def _int_axis(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if ".." in part:
                lo_text, _, hi_text = part.partition("..")
                lo, hi = int(lo_text), int(hi_text)
                if lo > hi:
                    raise argparse.ArgumentTypeError(f"range {part!r} is reversed (did you mean {hi}..{lo}?)")
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers (e.g. 2,4,6 or 2..8)") from None
    return out


def _str_axis(text: str) -> list[str]:
    from moesim.sweep.spec import split_list

    return split_list(text)


def _param_axes(items: list[str] | None) -> dict[str, dict[str, list[Any]]]:
    """``--param POLICY.KEY=V1,V2``: values parsed as JSON where they can be."""
    out: dict[str, dict[str, list[Any]]] = {}
    for item in items or []:
        lhs, sep, rhs = item.partition("=")
        policy, dot, key = lhs.partition(".")
        if not sep or not dot or not policy or not key or not rhs:
            raise UsageError(f"--param expects POLICY.KEY=V1,V2,..., got {item!r}")
        values = []
        for v in rhs.split(","):
            try:
                values.append(json.loads(v))
            except ValueError:
                values.append(v)
        out.setdefault(policy, {})[key.replace("-", "_")] = values
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="run a resumable parameter sweep into one Parquet table",
        description="Run every cell of a grid (from --config FILE.toml and/or comma lists) and write one row per "
                    "cell to OUTPUT. Re-running skips finished cells; an interrupted sweep loses only the cells "
                    "in flight. See docs/sweeps.md.")
    p.add_argument("-o", "--output", required=True, metavar="RESULTS.parquet", help="results table")
    p.add_argument("--config", metavar="FILE.toml", help="sweep config (command-line lists override its keys)")
    p.add_argument("--trace", type=_str_axis, metavar="T1,T2", help="trace files")
    p.add_argument("--policy", type=_str_axis, metavar="P1,P2", help="eviction policies")
    p.add_argument("--cache-size", type=_int_axis, metavar="K1,K2|LO..HI", help="expert slots per cache")
    p.add_argument("--param", action="append", metavar="POLICY.KEY=V1,V2",
                   help="policy parameter axis, repeatable (e.g. --param lfu-decay.half_life=100,1000)")
    p.add_argument("--scope", type=_str_axis, metavar="layer,global", help="cache scopes (default layer)")
    p.add_argument("--semantics", type=_str_axis, metavar="atomic,sequential", help="replay semantics (default atomic)")
    p.add_argument("--hardware", type=_str_axis, metavar="H1,H2",
                   help="hardware presets for the timing model; 'none' = hit-rate replay only (default)")
    p.add_argument("--prefetch", type=_str_axis, metavar="none,P", help="prefetchers (need --hardware)")
    p.add_argument("--prefetch-budget", type=_int_axis, metavar="B1,B2", help="prefetch budgets (default 1)")
    p.add_argument("--batch-size", type=_int_axis, metavar="N1,N2", help="decode batch sizes for the timing model")
    p.add_argument("--execution", type=_str_axis, metavar="none,SPEC",
                   help="who serves each miss, as simulate --execution: copy, n-cpu-moe=N, fiddler, hybrid, "
                        "hobbit[=T], pinned=FILE (need --hardware); none (default): copies, rows without 'executed'")
    p.add_argument("--vs-bound", action="store_true",
                   help="every cell also measured against the offline bound, as simulate --vs-bound")
    p.add_argument("--executor", choices=("process", "inprocess", "ray"), default="process",
                   help="where cells run: a local process pool (default), this process (debugging), or Ray")
    p.add_argument("--workers", type=positive_int, metavar="N", help="worker processes / Ray CPUs (default: all cores)")
    p.add_argument("--address", metavar="ADDR", help="Ray cluster address (e.g. auto, ray://head:10001); default: a local Ray")
    p.add_argument("--max-cells", type=positive_int, metavar="N", help="run at most N unfinished cells, then stop")
    p.add_argument("--dry-run", action="store_true", help="list how many cells there are and how many are done; run nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the run's report as one JSON object")
    p.set_defaults(func=run)

    s = sub.add_parser("sweep-summary", help="best policy per slot count and ratios against a baseline",
                       description="Summarise a sweep table: the best policy per condition and slot count, and each "
                                   "policy against a baseline policy under identical conditions.")
    s.add_argument("results", metavar="RESULTS.parquet")
    s.add_argument("--metric", help="column to rank by (default: tokens_per_s if present, else hit_rate)")
    s.add_argument("--baseline", help="baseline policy for ratios (default lru, when the table has it)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=run_summary)

    g = sub.add_parser("sweep-plot", help="plot a sweep table: metric vs slots, one line per policy",
                       description="Plot a metric against slot count, one line per policy, one panel per "
                                   "trace x hardware x prefetcher x budget.")
    g.add_argument("results", metavar="RESULTS.parquet")
    g.add_argument("-o", "--output", required=True, metavar="FIG.png", help="figure file (.png, .pdf, .svg)")
    g.add_argument("--metric", help="column to plot (default: tokens_per_s if present, else hit_rate = the exact "
                                    "replay's; timing_hit_rate = the timing run's, prefetched experts included)")
    add_force_arg(g)
    g.set_defaults(func=run_plot)


def _spec(args: argparse.Namespace):
    from moesim.sweep.spec import load_config, spec_from_lists

    base = load_config(args.config) if args.config else None
    lists = {"traces": args.trace, "policies": args.policy, "cache_sizes": args.cache_size,
             "scopes": args.scope, "semantics": args.semantics, "hardware": args.hardware,
             "prefetch": args.prefetch, "prefetch_budgets": args.prefetch_budget, "batch_sizes": args.batch_size,
             "executions": args.execution}
    spec = spec_from_lists(base, lists, _param_axes(args.param))
    spec.vs_bound = spec.vs_bound or args.vs_bound
    return spec


def _require_predictions(spec) -> None:
    """A speculative prefetcher on a trace without recorded predictions: one line, before any cell runs
    (sweeps have no distance axis: the prefetchers' default distance 1)."""
    from moesim.policies.resolve import needs_predictions
    from moesim.simulator.cell import require_predictions
    from moesim.traces.predictions import pred_distances_of

    if any(needs_predictions(p) for p in spec.prefetch) and any(h != "none" for h in spec.hardware):
        for t in dict.fromkeys(spec.traces):
            require_predictions(t, pred_distances_of(t), spec.prefetch)


def _note_clamped_sizes(spec) -> None:
    """Sizes past everything resident run as one cell per trace and scope (moesim.sweep.spec.expand)."""
    from moesim.commands._replay_args import note_clamped_sizes
    from moesim.traces.format import read_meta

    for trace in dict.fromkeys(spec.traces):
        meta = read_meta(trace)
        for scope in dict.fromkeys(s for s in spec.scopes if s in ("layer", "global")):  # others: a usage error later
            note_clamped_sizes("sweep", meta, spec.cache_sizes, scope)


def run(args: argparse.Namespace) -> int:
    from moesim.sweep.executors import make_executor
    from moesim.sweep.result_store import ResultStore
    from moesim.sweep.spec import expand
    from moesim.sweep.sweep import run_sweep

    spec = _spec(args)
    _require_predictions(spec)
    _note_clamped_sizes(spec)
    if args.address and args.executor != "ray":
        raise UsageError("--address is for --executor ray")
    if args.dry_run:
        cells = expand(spec)
        done = ResultStore(args.output).finished_keys()
        finished = sum(c.key in done for c in cells)
        report = {"cells": len(cells), "finished": finished, "pending": len(cells) - finished}
        if args.json:
            emit_json(report)
        else:
            print(f"{len(cells)} cells: {finished} finished, {len(cells) - finished} to run")
        return 0
    def executor():
        return make_executor(args.executor, args.workers, args.address, debug=getattr(args, "debug", False))

    report = run_sweep(spec, args.output, executor, progress=False if args.no_progress else None,
                       max_cells=args.max_cells)
    if args.json:
        emit_json(report.to_dict())
    else:
        print(f"{report.cells} cells: {report.skipped} already done, ran {report.ran} ({report.failed} failed) "
              f"in {report.elapsed_s:.1f} s ({report.cells_per_s:.1f} cells/s, {report.executor} x{report.workers}) "
              f"-> {report.output} ({report.rows} rows)")
    if report.failed:
        print(f"moesim sweep: {report.failed} cells failed; see the 'error' column of {report.output} "
              "(re-running retries them)", file=sys.stderr)
        return 1
    return 0


def run_summary(args: argparse.Namespace) -> int:
    from moesim.sweep.analysis import as_frame, best_per_size, default_metric, versus_baseline
    from moesim.sweep.result_store import read_results

    df = as_frame(read_results(args.results))
    metric = args.metric or default_metric(df)
    best = best_per_size(df, metric)
    policies = sorted(set(df["policy"].to_list()))
    if args.baseline is not None and args.baseline not in policies:
        raise UsageError(f"--baseline {args.baseline!r} is not a policy of {args.results} "
                         f"(its policies: {', '.join(policies)})")
    args.baseline = args.baseline or "lru"
    have_base = args.baseline in policies
    if not have_base:
        print(f"moesim sweep-summary: note: {args.results} has no lru cells, so no ratios; pick a baseline "
              f"with --baseline ({', '.join(policies)})", file=sys.stderr)
    versus = versus_baseline(df, args.baseline, metric) if have_base else None
    if args.json:
        emit_json({"metric": metric, "baseline": args.baseline if have_base else None,
                   "best": best.to_dicts(), "versus_baseline": versus.to_dicts() if versus is not None else []})
        return 0
    shown = [c for c in best.columns if c != "trace_sha256" and (c not in ("hardware", "prefetch", "prefetch_budget", "batch_size", "execution", "scope", "semantics") or best[c].n_unique() > 1)]
    print(f"best policy by {metric}:")
    print_table(shown, [[_short(c, v) for c, v in zip(shown, r, strict=True)] for r in best.select(shown).rows()])
    if versus is not None:
        print(f"\n{metric} relative to {args.baseline} (ratio > 1: better than {args.baseline}):")
        cols = [c for c in versus.columns if c in shown or c in ("policy", "params", "ratio") or c.startswith(metric)]
        print_table(cols, [[_short(c, v) for c, v in zip(cols, r, strict=True)] for r in versus.select(cols).rows()])
    return 0


def _short(col: str, value: Any) -> Any:
    import os

    if col == "trace" and isinstance(value, str):
        return os.path.basename(value)
    return "-" if value is None else value


def run_plot(args: argparse.Namespace) -> int:
    from moesim.analysis.style import metric as metric_info
    from moesim.safe_write import refuse_overwrite
    from moesim.sweep.analysis import as_frame, default_metric
    from moesim.sweep.plots import plot_sweep
    from moesim.sweep.result_store import read_results

    refuse_overwrite([args.output], args.force)
    results = read_results(args.results)
    metric = args.metric or default_metric(as_frame(results))
    panels = plot_sweep(results, args.output, metric)
    print(f"wrote {args.output}: {metric} = {metric_info(metric).label}, vs slots "
          f"({panels} panel{'s' if panels != 1 else ''})")
    return 0
