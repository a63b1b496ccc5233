"""``moesim mrc TRACE --policy NAME [--json]``: hit rate at every cache size (hit-rate curve)."""

from __future__ import annotations

import argparse

from moesim.commands._common import emit_json, int_list, print_table
from moesim.commands._replay_args import (
    add_policy_args,
    load,
    note_clamped_sizes,
    note_logged_layers,
    policy_params,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mrc", help="hit rate for every cache size, in one pass where the policy allows",
                       description="Hit rate for every cache size from top-k to the experts per layer.")
    add_policy_args(p)
    p.add_argument("--sizes", type=int_list, metavar="K1,K2,...", help="only these cache sizes")
    p.add_argument("--workers", type=int, help="processes for policies that need one run per size")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moesim.simulator.replay import mrc

    trace = load(args)
    result = mrc(trace, args.policy, args.sizes, scope=args.scope, semantics=args.semantics,
                 params=policy_params(args), workers=args.workers)
    note_clamped_sizes("mrc", trace.meta, args.sizes or [], args.scope)
    note_logged_layers(args, trace.meta)
    if args.json:
        emit_json(result.to_dict())
        return 0
    print(f"policy {result.policy}; method: {result.method}")
    print_table(["cache_size", "requests", "hits", "hit_rate"],
                [[c["cache_size"], c["requests"], c["hits"], c["hit_rate"]] for c in result.curve])
    return 0
