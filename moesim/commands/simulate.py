"""``moesim simulate TRACE --policy NAME --cache-size K [--json]``: hit rates (and, with a cost model,
tokens/s) of one policy at one cache size."""

from __future__ import annotations

import argparse

from moesim.commands._common import add_force_arg, emit_json, int_list, print_table
from moesim.commands._replay_args import (
    add_policy_args,
    load,
    note_clamped_sizes,
    note_logged_layers,
    policy_params,
)
from moesim.commands._timing_args import (
    add_host_tier_args,
    add_timing_args,
    cost_model,
    default_hardware_note,
    host_tier_spec,
    prefetch_params,
    prefill_chunk,
    say_timeline_written,
    timing_requested,
)
from moesim.errors import UsageError

TIER_KEYS = ("tier_requests", "tier_bytes", "host_tier")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="replay a trace against an eviction policy",
                       description="Replay a trace against an eviction policy (docs/semantics.md).")
    add_policy_args(p)
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--cache-size", type=int, metavar="K", help="expert slots per cache")
    size.add_argument("--layer-budgets", type=int_list, metavar="K0,K1,...",
                      help="per-layer slot budgets (non-uniform allocation; 0 disables a layer's cache)")
    p.add_argument("--per-layer", action="store_true", help="also report each layer's hit rate")
    p.add_argument("--vs-bound", action="store_true",
                   help="also the offline bound on demand misses at the prefetcher's lookahead (moesim bound; "
                        "docs/bound.md) and bound_fraction = bound / this run's demand misses")
    add_timing_args(p)
    add_host_tier_args(p)
    add_force_arg(p)  # the only file simulate writes is --timeline's
    p.set_defaults(func=run)


def cell_spec(args: argparse.Namespace, trace):
    """The command line as one :class:`~moesim.simulator.cell.CellSpec`."""
    from moesim.simulator.cell import CellSpec

    if args.cache_size is not None and args.cache_size < 1:
        raise UsageError(f"--cache-size must be >= 1, got {args.cache_size}")
    timed = timing_requested(args)
    return CellSpec(args.policy, args.cache_size if args.cache_size is not None else args.layer_budgets,
                    params=policy_params(args), scope=args.scope, semantics=args.semantics, phase=args.phase,
                    cost=cost_model(args) if timed else None, prefetch=args.prefetch or "none",
                    prefetch_params=prefetch_params(args) if timed else None, batch_size=args.batch_size,
                    prefill_chunk=prefill_chunk(args, trace), speculative_ready=args.speculative_ready,
                    timeline=args.timeline, execution=args.execution, vs_bound=getattr(args, "vs_bound", False),
                    host_tier=host_tier_spec(args))


def run(args: argparse.Namespace) -> int:
    from moesim.safe_write import refuse_overwrite
    from moesim.simulator.cell import run_cell

    refuse_overwrite([args.timeline], args.force)
    trace = load(args, phase=False)
    out = run_cell(trace, cell_spec(args, trace)).to_json(per_layer=args.per_layer)
    if args.per_layer and trace.meta.logged_layers is not None:  # the layers a log holds, not the model's others
        out["per_layer"] = [d for d in out["per_layer"] if d["layer"] in trace.meta.logged_layers]
    default_hardware_note(args)
    if args.timeline:
        say_timeline_written(args.timeline)
    # notes once the run succeeded: an error stays the only line
    sizes = [args.cache_size] if args.cache_size is not None else args.layer_budgets
    note_clamped_sizes("simulate", trace.meta, sizes, args.scope)
    note_logged_layers(args, trace.meta)
    if args.json:
        emit_json(out)
        return 0
    # the tier blocks one row per entry: a dict in one cell would widen the whole column
    rows = [[f"{k}.{kk}", vv] if k in TIER_KEYS else [k, v] for k, v in out.items() if k != "per_layer"
            for kk, vv in (v.items() if k in TIER_KEYS else [(None, None)])]
    print_table(["metric", "value"], rows)
    if args.per_layer:
        print()
        print_table(["layer", "requests", "hits", "hit_rate"],
                    [[d["layer"], d["requests"], d["hits"], d["hit_rate"]] for d in out["per_layer"]])
    return 0
