"""``moesim hardware``: list the hardware presets and their key numbers."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hardware", help="list hardware presets (cost models)",
                       description="List the hardware presets the timing model knows (--hardware NAME): each "
                                   "one's host-to-device bandwidth and latency, expert size and copy time, and "
                                   "per-expert, per-layer and per-token compute times. A measured machine comes from "
                                   "`moesim calibrate` instead.")
    p.add_argument("--json", action="store_true", help="print one JSON array")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moesim.commands._common import print_table
    from moesim.simulator.cost_model import CostModel

    rows = [CostModel.preset(n).summary() for n in CostModel.presets()]
    if args.json:
        print(json.dumps(rows))
        return 0
    print_table(list(rows[0]), [list(r.values()) for r in rows])
    return 0
