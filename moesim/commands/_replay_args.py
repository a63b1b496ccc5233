"""Arguments shared by ``simulate`` and ``mrc``: the trace, the policy and its parameters, the scope."""

from __future__ import annotations

import argparse
from typing import Any

from moesim.commands._common import int_list, parse_params


def add_policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", help="trace file (.parquet) or directory of part files")
    p.add_argument("--policy", required=True, help="eviction policy (see `moesim policies`)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="policy parameter, repeatable (e.g. --param half_life=200, --param lam=0.5)")
    p.add_argument("--seed", type=int, help="seed for randomised policies (same as --param seed=N)")
    p.add_argument("--scope", choices=("layer", "global"), default="layer",
                   help="one cache per MoE layer (default) or one cache shared by all layers")
    p.add_argument("--semantics", choices=("atomic", "sequential"), default="atomic",
                   help="request a (token, layer) set at once (default) or one expert at a time (docs/semantics.md)")
    p.add_argument("--phase", choices=("all", "prefill", "decode"), default="all",
                   help="replay only the rows of one phase")
    p.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the on-disk cache of request streams (also: MOESIM_NO_CACHE=1; "
                        "see docs/semantics.md)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def policy_params(args: argparse.Namespace) -> dict[str, Any]:
    params = parse_params(args.param)
    if args.seed is not None:
        params["seed"] = args.seed
    return params


def load(args: argparse.Namespace, phase: bool = True):
    """The trace of ``args.trace``; with ``phase``, only the rows of ``--phase`` (``simulate`` leaves that
    to its cell)."""
    from moesim.simulator import stream_cache
    from moesim.traces.format import DECODE, PREFILL, read_trace

    # the replay reads seq/token/phase/layer/experts; weights (gate-weighted, timing) load on first use;
    # with the stream cache on, the rows are read only if the cache has no stream of this file
    trace = read_trace(args.trace, lazy=True, replay_cache=stream_cache.enabled() and not args.no_cache)
    if phase and args.phase != "all":
        trace = trace.filter_phase(PREFILL if args.phase == "prefill" else DECODE)
    return trace


__all__ = ["add_policy_args", "policy_params", "load", "int_list"]
