"""``moesim info TRACE``: metadata and row counts of a trace."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a trace's metadata and statistics",
                       description="Show a trace's metadata (model, layers, experts, top-k, quantization, where it "
                                   "came from) and statistics (rows, sequences, decode and prefill rows, recorded "
                                   "predictions, file size).")
    p.add_argument("trace", help="trace file (.parquet) or directory of part files")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    import numpy as np

    from moesim.traces.format import DECODE, read_trace

    t = read_trace(args.trace)
    info = dataclasses.asdict(t.meta)
    size = os.path.getsize(args.trace) if os.path.isfile(args.trace) else None
    info["stats"] = {
        "rows": len(t), "sequences": int(len(np.unique(t.seq))) if len(t) else 0,
        "decode_rows": int((t.phase == DECODE).sum()), "prefill_rows": int((t.phase != DECODE).sum()),
        "prediction_distances": list(t.pred_distances), "has_logits": t.has_logits(),
        "file_bytes": size, "bytes_per_row": round(size / len(t), 2) if size and len(t) else None,
    }
    if args.json:
        print(json.dumps(info))
    else:
        from moesim.traces.describe import text_block, value_text

        for key, value in info.items():
            if isinstance(value, dict):  # provenance, stats, extra: one readable line per entry
                print(f"{key:>15}:" + ("" if value else " (none)"))
                for line in text_block(value, indent=17):
                    print(line)
            else:
                print(f"{key:>15}: {value_text(value, key)}")
    return 0
