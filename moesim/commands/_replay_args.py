"""Arguments shared by ``simulate`` and ``mrc``: the trace, the policy and its parameters, the scope."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
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


def note_clamped_sizes(command: str, meta, sizes: Iterable[int], scope: str = "layer") -> None:
    """One line on stderr when cache sizes go past every expert a cache can see: the replay treats them
    as that size (everything resident once loaded; ``moesim.simulator.replay.clamp_cache_size``)."""
    from moesim.simulator.replay import keys_per_cache
    from moesim.traces.describe import value_text

    limit = keys_per_cache(meta, scope)
    over = sorted({int(s) for s in sizes if s > limit})
    if over:
        what = "experts per layer" if scope == "layer" else "experts of the model (one cache for all layers)"
        shown = value_text(over)
        sizes_are = f"cache sizes {shown} are" if len(over) > 1 else f"cache size {shown} is"
        print(f"moesim {command}: note: {sizes_are} more than the {limit} {what}; everything stays resident, "
              f"so {'they are' if len(over) > 1 else 'it is'} replayed as {limit}", file=sys.stderr)


def note_logged_layers(args: argparse.Namespace, meta) -> None:
    """One line on stderr when the trace holds only some of the model's layers (a log hooked into a few)."""
    from moesim.traces.describe import value_text

    held = meta.logged_layers
    if held is not None:
        shown = value_text(held)
        print(f"moesim {args.command}: note: {args.trace} holds {len(held)} of the model's {meta.num_layers} "
              f"MoE layers ({shown}); results cover those layers only", file=sys.stderr)


def load(args: argparse.Namespace, phase: bool = True):
    """The trace of ``args.trace``; with ``phase``, only the rows of ``--phase`` (``simulate`` leaves that
    to its cell)."""
    from moesim.simulator import stream_cache
    from moesim.traces.format import DECODE, PREFILL, read_trace

    # the replay reads seq/token/phase/layer/experts; weights (gate-weighted, timing) load on first use;
    # with the stream cache on, the rows are read only if the cache has no stream of this file
    trace = read_trace(args.trace, lazy=True, replay_cache=stream_cache.enabled() and not args.no_cache)
    if args.phase != "all":
        rows = len(trace)
        chosen = trace.filter_phase(PREFILL if args.phase == "prefill" else DECODE)
        if rows and not len(chosen):  # a replay of nothing would look like a result (0 requests)
            from moesim.errors import DataError

            other = "decode" if args.phase == "prefill" else "prefill"
            raise DataError(args.trace, f"has no {args.phase} rows (all {rows} rows are {other}); "
                                        f"--phase {args.phase} would replay nothing")
        if phase:
            trace = chosen
    return trace


__all__ = ["add_policy_args", "policy_params", "load", "int_list", "note_clamped_sizes", "note_logged_layers"]
