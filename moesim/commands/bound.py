"""``moesim bound TRACE --cache-size K --lookahead D [--json]``: the fewest demand misses any eviction
policy plus prefetcher could have when the routing is known D layers ahead (docs/bound.md)."""

from __future__ import annotations

import argparse

from moesim.commands._common import emit_json, non_negative_int, positive_int, print_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bound", help="offline bound on demand misses for caching plus prefetching",
                       description="The fewest demand misses any eviction policy together with any prefetcher "
                                   "could have, per-layer caches of K slots, prefetches issued at most D layers "
                                   "ahead, at most B prefetch copies per layer (docs/bound.md). Lookahead 0 is "
                                   "Belady's OPT. Where the bound is not proven tight, the JSON says the gap to an "
                                   "achievable schedule.")
    p.add_argument("trace", help="trace file (.parquet) or directory of part files")
    p.add_argument("--cache-size", type=positive_int, required=True, metavar="K", help="expert slots per layer")
    p.add_argument("--lookahead", type=non_negative_int, required=True, metavar="D",
                   help="layers of future routing a prefetch may use (0: no prefetch)")
    p.add_argument("--prefetch-budget", type=non_negative_int, metavar="B",
                   help="prefetch copies the copy engine issues per layer (default: top-k, as --prefetch-budget "
                        "of simulate)")
    p.add_argument("--phase", choices=("all", "prefill", "decode"), default="all",
                   help="only the rows of one phase")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moesim.simulator.bound import prefetch_bound
    from moesim.traces.format import DECODE, PREFILL, read_trace

    trace = read_trace(args.trace, lazy=True)
    if args.phase != "all":
        trace = trace.filter_phase(PREFILL if args.phase == "prefill" else DECODE)
    budget = trace.meta.top_k if args.prefetch_budget is None else args.prefetch_budget
    r = prefetch_bound(trace, args.cache_size, args.lookahead, budget)
    out = {"cache_size": args.cache_size, "lookahead": args.lookahead, "prefetch_budget": budget,
           "requests": r.requests, "misses": r.misses, "hit_rate": round(1 - r.misses / r.requests, 6) if r.requests else 0.0,
           "exact": r.exact, "achievable_misses": r.achievable_misses, "gap": r.achievable_misses - r.misses,
           "achievable_prefetches": r.prefetches, "opt_misses": r.opt_misses, "model": "docs/bound.md"}
    if args.json:
        emit_json(out)
        return 0
    print_table(["metric", "value"], [[k, v] for k, v in out.items()])
    return 0
