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


# The terminal table: the numbers that decide tokens/s, in words and units, fitting 100 columns. The
# host-side costs and the engine profile are in --json (every key of CostModel.summary()).
SCREEN_COLUMNS = (("name", "name", "{}"), ("pcie_gbps", "PCIe GB/s", "{:.1f}"), ("latency_us", "latency us", "{:.1f}"),
                  ("quantization", "quant", "{}"), ("expert_mb", "expert MB", "{:.1f}"),
                  ("expert_copy_ms", "copy ms", "{:.3f}"), ("expert_ms", "expert ms", "{:.3f}"),
                  ("layer_ms", "layer ms", "{:.3f}"), ("token_ms", "token ms", "{:.3f}"))


def run(args: argparse.Namespace) -> int:
    from moesim.commands._common import print_table
    from moesim.simulator.cost_model import CostModel

    rows = [CostModel.preset(n).summary() for n in CostModel.presets()]
    if args.json:
        print(json.dumps(rows))
        return 0
    print_table([head for _, head, _ in SCREEN_COLUMNS],
                [[fmt.format(r[key]) for key, _, fmt in SCREEN_COLUMNS] for r in rows])
    hidden = len([k for k in rows[0] if k not in {key for key, _, _ in SCREEN_COLUMNS}])
    print(f"{hidden} more columns (host-side costs, copy engines, engine profile): moesim hardware --json")
    return 0
