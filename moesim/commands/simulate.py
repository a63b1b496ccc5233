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
from moesim.errors import UsageError

try:
    from moesim.commands._timing_args import add_timing_args, timing_requested, timing_result
except ImportError:  # timing simulator not installed
    add_timing_args = None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="replay a trace against an eviction policy",
                       description="Replay a trace against an eviction policy (docs/semantics.md).")
    add_policy_args(p)
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--cache-size", type=int, metavar="K", help="expert slots per cache")
    size.add_argument("--layer-budgets", type=int_list, metavar="K0,K1,...",
                      help="per-layer slot budgets (non-uniform allocation; 0 disables a layer's cache)")
    p.add_argument("--per-layer", action="store_true", help="also report each layer's hit rate")
    if add_timing_args is not None:
        add_timing_args(p)
        add_force_arg(p)  # the only file simulate writes is --timeline's
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moesim.atomic import refuse_overwrite
    from moesim.simulator.replay import simulate

    refuse_overwrite([getattr(args, "timeline", None)], getattr(args, "force", False))
    trace = load(args)
    size = args.cache_size if args.cache_size is not None else args.layer_budgets
    if args.cache_size is not None and args.cache_size < 1:
        raise UsageError(f"--cache-size must be >= 1, got {args.cache_size}")
    params = policy_params(args)
    result = simulate(trace, args.policy, size, scope=args.scope, semantics=args.semantics, params=params)
    out = result.to_dict(per_layer=args.per_layer)
    if args.per_layer and trace.meta.logged_layers is not None:  # the layers a log holds, not the model's others
        out["per_layer"] = [d for d in out["per_layer"] if d["layer"] in trace.meta.logged_layers]
    if params:
        out["params"] = params
    if add_timing_args is not None and timing_requested(args):
        from moesim.simulator.combined import replay_with_timing

        out = replay_with_timing(out, timing_result(args, trace))
    # notes once the run succeeded: an error stays the only line
    note_clamped_sizes("simulate", trace.meta, [size] if args.cache_size is not None else size, args.scope)
    note_logged_layers(args, trace.meta)
    if args.json:
        emit_json(out)
        return 0
    rows = [[k, v] for k, v in out.items() if k != "per_layer"]
    print_table(["metric", "value"], rows)
    if args.per_layer:
        print()
        print_table(["layer", "requests", "hits", "hit_rate"],
                    [[d["layer"], d["requests"], d["hits"], d["hit_rate"]] for d in out["per_layer"]])
    return 0
