"""``moesim plot KIND ...``: heatmap, raster, mrc, speed, prefetch, timeline -> PNG (or SVG)."""

from __future__ import annotations

import argparse
from pathlib import Path

from moesim.commands._common import add_force_arg, int_list, positive_int
from moesim.errors import UsageError

KINDS = ("heatmap", "raster", "mrc", "speed", "prefetch", "predictions", "timeline", "reuse", "segment", "affinity")


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:  # an empty figure is no answer
        raise argparse.ArgumentTypeError(f"{text!r} names nothing (give comma-separated names)")
    return names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw a figure of a trace or a simulation (.png, .svg or .pdf)",
                       description="Draw a figure of a trace or a simulation; the output's extension picks the "
                                   "format (-o x.png, x.svg, x.pdf).")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", parser_class=type(p))

    def add(kind: str, help_text: str, trace: bool = True) -> argparse.ArgumentParser:
        k = kinds.add_parser(kind, help=help_text, description=help_text)
        if trace:
            k.add_argument("trace", help="trace file (.parquet)")
        k.add_argument("-o", "--output", help=f"output file; .png, .svg or .pdf picks the format (default: {kind}.png)")
        k.add_argument("--svg", action="store_true", help=f"SVG (the same as -o {kind}.svg)")
        add_force_arg(k)
        k.set_defaults(func=run)
        return k

    add("heatmap", "layer x expert activation share (each layer's row sums to 1)")
    r = add("raster", "one layer's token x expert activations coloured hit / miss / resident under a policy")
    r.add_argument("--layer", type=int, help="MoE layer (default: the first the trace holds)")
    r.add_argument("--policy", default="lru", help="eviction policy (default lru)")
    r.add_argument("--cache-size", type=positive_int, help="slots (default 2 x top-k)")
    r.add_argument("--start", type=int, default=0, help="first token step shown")
    r.add_argument("--tokens", type=positive_int, default=200, help="token steps shown (default 200)")
    m = add("mrc", "hit rate vs cache slots for several policies, OPT as the bound")
    m.add_argument("--policies", type=_names, default=["lru", "lfu", "fifo", "opt"], help="comma-separated")
    s = add("speed", "simulated tokens/s vs cache slots per policy for a hardware preset")
    s.add_argument("--policies", type=_names, default=["lru", "lfu", "opt"], help="comma-separated")
    s.add_argument("--hardware", default="a6000", help="hardware preset (default a6000)")
    s.add_argument("--sizes", type=int_list, help="cache sizes (default top-k .. experts)")
    f = add("prefetch", "prefetch precision / recall vs prefetch budget")
    f.add_argument("--prefetchers", type=_names, default=["previous-token", "transition", "oracle"],
                   help="comma-separated prefetcher names (default previous-token,transition,oracle)")
    f.add_argument("--budgets", type=int_list, default=[1, 2, 3, 4], help="prefetch budgets (default 1,2,3,4)")
    f.add_argument("--policy", default="lru", help="eviction policy (default lru)")
    f.add_argument("--cache-size", type=positive_int, help="slots (default 2 x top-k)")
    f.add_argument("--hardware", default="a6000", help="hardware preset (default a6000)")
    q = add("predictions", "accuracy of the recorded speculative predictions per layer and distance, beside the "
                           "transition and previous-token predictors (needs a trace from `moesim record "
                           "--predict-distance`)")
    q.add_argument("--distances", type=int_list, help="prediction distances (default: every recorded one)")
    q.add_argument("--phase", choices=["decode", "prefill", "all"], default="decode", help="rows scored (default decode)")
    t = add("timeline", "simulator timeline (Chrome/Perfetto trace-event JSON from `simulate --timeline`)", trace=False)
    t.add_argument("timeline", help="timeline .json file")
    t.add_argument("--max-ms", type=float, default=250.0,
                   help="only events starting in the first MAX_MS milliseconds (default 250; 0 = all)")
    add("reuse", "distribution of reuse (LRU stack) distances")
    g = add("segment", "segment-cache best hit rate (arXiv 2505.16056) vs cache size, next to OPT")
    g.add_argument("--segments", type=int_list, default=[4, 16, 64], help="segment lengths in tokens (default 4,16,64)")
    a = add("affinity", "co-activation within a token and transition to the next layer, at one layer")
    a.add_argument("--layer", type=int, help="MoE layer (default: the first the trace holds)")
    p.set_defaults(func=_need_kind)


def _need_kind(args: argparse.Namespace) -> int:
    raise UsageError(f"plot needs a KIND: {', '.join(KINDS)}")


def _load(path: str):
    from moesim.traces.format import read_trace

    return read_trace(path)


def _check_policy(name: str) -> None:
    from moesim.policies.resolve import eviction_factory

    eviction_factory(name, None)


def _check_layer(trace, layer: int | None) -> int:
    """A layer the trace holds rows for (a log may hold only some of the model's layers); None: the first."""
    from moesim.traces.describe import value_text

    held = trace.held_layers()
    if not held:
        raise UsageError(f"{trace.path} holds no rows")
    if layer is None:
        return held[0]
    if not 0 <= layer < trace.meta.num_layers:
        raise UsageError(f"--layer {layer} out of range [0, {trace.meta.num_layers})")
    if layer not in held:
        shown = value_text(held)
        raise UsageError(f"--layer {layer}: {trace.path} holds no rows at layer {layer} (its layers: {shown})")
    return layer


def run(args: argparse.Namespace) -> int:
    from moesim.analysis import plots
    from moesim.analysis.style import figure_format
    from moesim.safe_write import refuse_overwrite

    out = Path(args.output or f"{args.kind}.{'svg' if args.svg else 'png'}")
    figure_format(out, args.svg)  # a usage error (unknown suffix, --svg with .png) before any work
    refuse_overwrite([out], args.force)
    if args.kind == "timeline":
        fig = plots.timeline(plots.load_timeline(args.timeline), max_ms=args.max_ms or None,
                             title=plots.timeline_title(args.timeline))
    else:
        trace = _load(args.trace)
        meta = trace.meta
        if args.kind == "heatmap":
            fig = plots.heatmap(trace)
        elif args.kind == "raster":
            _check_policy(args.policy)
            args.layer = _check_layer(trace, args.layer)
            if args.cache_size is not None and not meta.top_k <= args.cache_size <= meta.num_experts:
                raise UsageError(f"--cache-size {args.cache_size} outside [top-k={meta.top_k}, {meta.num_experts}]")
            fig = plots.raster(trace, args.layer, args.policy, args.cache_size, max_tokens=args.tokens,
                               start=args.start)
        elif args.kind == "mrc":
            for name in args.policies:
                _check_policy(name)
            fig = plots.mrc(trace, args.policies)
        elif args.kind == "affinity":
            args.layer = _check_layer(trace, args.layer)
            fig = plots.affinity(trace, args.layer)
        elif args.kind == "reuse":
            fig = plots.reuse(trace)
        elif args.kind == "segment":
            if not args.segments or min(args.segments) < 1:
                raise UsageError("--segments needs positive segment lengths")
            fig = plots.segment_bound(trace, args.segments)
        elif args.kind == "speed":
            for name in args.policies:
                _check_policy(name)
            fig = plots.speed(trace, args.policies, args.sizes, args.hardware)
        elif args.kind == "predictions":
            from moesim.analysis.prediction_plots import predictions
            from moesim.simulator.cell import require_predictions
            from moesim.traces.format import DECODE, PREFILL

            distances = args.distances or list(trace.pred_distances)
            for d in distances or [1]:
                require_predictions(args.trace, trace.pred_distances, ["speculative"], d)
            phase = {"decode": DECODE, "prefill": PREFILL, "all": None}[args.phase]
            fig = predictions(trace, distances, phase)
        else:
            from moesim.simulator.cell import require_predictions

            require_predictions(args.trace, trace.pred_distances, args.prefetchers)
            _check_policy(args.policy)
            fig = plots.prefetch(trace, args.prefetchers, args.budgets, policy=args.policy,
                                 cache_size=args.cache_size, hardware=args.hardware)
    plots.save(fig, out, svg=args.svg)
    print(f"wrote {out}")
    return 0
