"""``moesim report TRACE -o DIR``: one self-contained HTML report of a trace."""

from __future__ import annotations

import argparse
import sys

from moesim.commands._common import add_force_arg, int_list


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write a self-contained HTML report of a trace",
                       description="Write DIR/report.html: metadata, statistics, plots (embedded) and a "
                                   "policy x slots table of hit rates (and tokens/s with the timing simulator).")
    p.add_argument("trace", help="trace file (.parquet)")
    p.add_argument("-o", "--output", default="moesim-report", help="output directory (default ./moesim-report)")
    p.add_argument("--policies", default="lru,lfu,fifo,opt", help="comma-separated policies for the tables")
    p.add_argument("--sizes", type=int_list, help="cache sizes (default top-k .. experts per layer)")
    p.add_argument("--hardware", default="a6000", help="hardware preset for tokens/s (default a6000)")
    p.add_argument("--layer", type=int, default=0, help="layer shown in the residency raster (default 0)")
    p.add_argument("--no-timing", action="store_true", help="skip the tokens/s table even if available")
    p.add_argument("--image-format", choices=("png", "svg"), default="png",
                   help="how the figures are embedded (default png; svg stays sharp when zoomed or printed)")
    add_force_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from moesim.analysis.report import write_report
    from moesim.errors import UsageError
    from moesim.policies.resolve import eviction_factory
    from moesim.safe_write import refuse_overwrite
    from moesim.traces.format import read_trace

    refuse_overwrite([Path(args.output) / "report.html"], args.force)
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    for name in policies:
        eviction_factory(name, None)
    trace = read_trace(args.trace)
    meta = trace.meta
    if not 0 <= args.layer < meta.num_layers:
        raise UsageError(f"--layer {args.layer} out of range [0, {meta.num_layers})")
    for k in args.sizes or []:
        if not meta.top_k <= k <= meta.num_experts:
            raise UsageError(f"cache size {k} outside [top-k={meta.top_k}, {meta.num_experts}]")
    steps = ["statistics", "heatmap", "hit rates", "tokens/s", "raster", "locality"]
    with tqdm(total=len(steps), desc="report", unit="step", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
        def progress(msg: str) -> None:
            bar.set_postfix_str(msg)
            bar.update(1)

        path = write_report(trace, args.output, policies=policies, sizes=args.sizes, hardware=args.hardware,
                            raster_layer=args.layer, timing=False if args.no_timing else None, progress=progress,
                            image_format=args.image_format)
    print(f"wrote {path}")
    return 0
