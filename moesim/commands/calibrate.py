"""``moesim calibrate``: GPU micro-benchmarks -> the cost model's calibration JSON.

On a CUDA machine it measures (CUDA events, device time): the pinned host-to-device copy curve
(64 KB ... 512 MB), one expert's dequantise + FFN time vs tokens for hqq2 / hqq4 / bf16, attention +
gate vs context, the LM head, the engine's captured pieces (layer, expert, final), an
all-resident engine run (the per-token overhead beyond the pieces), the engine terms (per-miss issue
cost, per-layer routing hand-off) and one expert copy repeated from several buffers (the copy spread); ``--from-raw FILE`` converts a raw measurement file brought back
from the GPU (``benchmarks/gpu_validate.py``) instead, on any machine.
"""

from __future__ import annotations

import argparse
import json

from moesim.commands._common import add_force_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="measure a GPU (or convert raw measurements) into a calibration JSON")
    p.add_argument("-o", "--out", required=True, help="calibration JSON to write (CostModel format)")
    p.add_argument("--raw-out", help="also keep the raw measurements here")
    p.add_argument("--from-raw", help="convert this raw measurement file instead of measuring")
    p.add_argument("--name", default="h200", help="the calibration's name (default h200)")
    p.add_argument("--add-to", metavar="CAL",
                   help="with --from-raw: keep CAL's copies and kernels, add the raw file's engine terms and its "
                        "expert-copy session (the copy interval then spans both sessions)")
    p.add_argument("--with-pieces", action="store_true",
                   help="with --add-to: also take the engine's captured pieces and per-token overhead from the raw "
                        "file (after a change to the engine itself)")
    p.add_argument("--quants", default="hqq2,hqq4,bf16")
    p.add_argument("--layers", type=int, default=32,
                   help="layers of the engine measured for its pieces and per-token overhead (8 slots each, "
                        "~0.53 GB of GPU memory per layer; default 32 = Mixtral-8x7B)")
    add_force_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moesim.atomic import atomic_open, refuse_overwrite
    from moesim.engine.calibration import to_cost_model
    from moesim.errors import UsageError

    if args.with_pieces and not args.add_to:
        raise UsageError("--with-pieces needs --add-to")
    refuse_overwrite([args.out, args.raw_out], args.force)
    if args.from_raw:
        from moesim.atomic import read_json

        path = args.from_raw
        raw = read_json(path)
    else:
        import torch

        if not torch.cuda.is_available():
            raise UsageError("CUDA is not available here, and calibrate measures a CUDA GPU; "
                             "convert measurements taken elsewhere with --from-raw FILE")
        from moesim.engine.gpu_bench import measure

        raw = measure(args.quants.split(","), layers=args.layers)
        path = None
    if args.add_to:
        from moesim.atomic import read_json
        from moesim.engine.calibration import add_session
        from moesim.errors import UsageError

        if not args.from_raw:
            raise UsageError("--add-to needs --from-raw")
        cal = add_session(read_json(args.add_to), raw, path, pieces=args.with_pieces)
        with atomic_open(args.out) as fh:
            json.dump(cal, fh, indent=1)
            fh.write("\n")
        ec = cal["pcie"].get("expert_copy") or {}
        print(f"wrote {args.out}: engine terms miss_issue {cal['engine']['miss_issue_s'] * 1e6:.1f} us, routing "
              f"hand-off {cal['engine']['routing_handoff_s'] * 1e6:.1f} us; copy interval "
              f"{ec.get('low_s', 0) * 1e3:.4f}-{ec.get('high_s', 0) * 1e3:.4f} ms over {len(ec.get('sessions', []))} sessions")
        return 0
    cal = to_cost_model(raw, args.name, path=path)
    if args.raw_out:
        with atomic_open(args.raw_out) as fh:
            json.dump(raw, fh, indent=1)
    with atomic_open(args.out) as fh:
        json.dump(cal, fh, indent=1)
        fh.write("\n")
    print(f"wrote {args.out}: {cal['pcie']['bandwidth_gbps']:.1f} GB/s, expert "
          f"{cal['expert_compute'][cal['quantization']][0][1] * 1e3:.3f} ms ({cal['quantization']}), "
          f"layer {cal['layer']['base_s'] * 1e3:.3f} ms")
    return 0
