"""``moesim budgets TRACE --policy NAME --total-slots N [--json]``: the per-layer cache sizes that
maximise total hits for N expert slots in all (docs/budgets.md)."""

from __future__ import annotations

import argparse
import sys

from moesim.commands._common import emit_json, positive_int, print_table
from moesim.commands._replay_args import add_policy_args, load, policy_params
from moesim.commands._timing_args import add_timing_args, timing_requested
from moesim.errors import SettingError, UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("budgets", help="per-layer cache sizes that maximise hits for a total slot budget",
                       description="Per-layer cache sizes (each >= top-k, summing to --total-slots) that maximise "
                                   "total hits, exact over every layer's hit curve (dynamic programming; "
                                   "docs/budgets.md), and the same total spread evenly for comparison.")
    add_policy_args(p)
    p.add_argument("--total-slots", type=positive_int, required=True, metavar="N",
                   help="expert slots over all layers (at least layers x top-k)")
    p.add_argument("--objective", choices=("hits", "tokens-per-s"), default="hits",
                   help="maximise hits (default; exact over the hit curves) or the timing simulator's tokens/s "
                        "(needs --hardware or --calibration; docs/budgets.md)")
    add_timing_args(p)  # tokens/s of both allocations under the cost model (and any --prefetch)
    p.set_defaults(func=run)


def _with_timing(args: argparse.Namespace, trace, out: dict) -> None:
    """Add the timing simulator's tokens/s of the optimal and the even allocation (the same run as
    `simulate --layer-budgets ... --hardware/--calibration`, through the one cell runner)."""
    from moesim.commands.simulate import cell_spec
    from moesim.simulator.cell import run_cell

    if args.timeline:
        raise UsageError("budgets runs the timing simulator twice: --timeline is for simulate")
    for key, budgets in (("tokens_per_s", out["layer_budgets"]), ("uniform_tokens_per_s", out["uniform_budgets"])):
        args.cache_size, args.layer_budgets = None, budgets
        out[key] = run_cell(trace, cell_spec(args, trace)).to_json()["tokens_per_s"]
    if out["tokens_per_s"] and out["uniform_tokens_per_s"]:
        out["tokens_per_s_gain"] = round(out["tokens_per_s"] / out["uniform_tokens_per_s"] - 1, 6)


def _priced_cell(args: argparse.Namespace, trace):
    """The timed cell whose layer budgets are searched: simulate's own spec for these flags."""
    from moesim.commands.simulate import cell_spec

    if args.timeline:
        raise UsageError("budgets runs the timing simulator many times: --timeline is for simulate")
    args.cache_size, args.vs_bound = trace.meta.num_experts, False
    return cell_spec(args, trace)


def run(args: argparse.Namespace) -> int:
    from moesim.simulator.budgets import budgets_report

    if args.scope != "layer":
        raise UsageError("budgets allocates per-layer caches: --scope global has no layers to budget")
    trace = load(args)
    notes: list[str] = []
    priced = None
    if args.objective == "tokens-per-s":
        if not timing_requested(args):
            raise SettingError("hardware", "optimising tokens/s needs a cost model", fix="NAME or --calibration FILE")
        priced = _priced_cell(args, trace)
    out = budgets_report(trace, args.policy, args.total_slots, semantics=args.semantics,
                         params=policy_params(args), notes=notes, priced=priced)
    if timing_requested(args):
        _with_timing(args, trace, out)
    for note in notes:
        print(f"moesim budgets: note: {note}", file=sys.stderr)
    if args.json:
        emit_json(out)
        return 0
    print(f"policy {out['policy']}, {out['total_slots']} slots, objective {out['objective']}; {out['method']}")
    print_table(["allocation", "hits", "hit_rate", "layer budgets"],
                [["optimal", out["hits"], out["hit_rate"], ",".join(map(str, out["layer_budgets"]))],
                 ["uniform", out["uniform_hits"], out["uniform_hit_rate"], ",".join(map(str, out["uniform_budgets"]))]])
    if "tokens_per_s" in out:
        print(f"tokens/s: optimal {out['tokens_per_s']}, uniform {out['uniform_tokens_per_s']}")
    return 0
