"""``moesim export TRACE --format oracle-general|csv -o OUT``"""

from __future__ import annotations

import argparse

from moesim.commands._common import add_force_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a trace for libCacheSim (oracleGeneral) or as CSV",
                       description="Export one record per expert request (ids layer*E+expert).")
    p.add_argument("trace", help="trace file")
    p.add_argument("--format", choices=("oracle-general", "csv"), required=True)
    p.add_argument("-o", "--output", required=True, help="output file (written atomically)")
    add_force_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moesim.safe_write import refuse_overwrite
    from moesim.traces.export import export_csv, export_oracle_general
    from moesim.traces.format import read_trace

    refuse_overwrite([args.output], args.force)
    trace = read_trace(args.trace)
    n = (export_oracle_general if args.format == "oracle-general" else export_csv)(trace, args.output)
    print(f"wrote {args.output}: {n} requests ({args.format})")
    return 0
