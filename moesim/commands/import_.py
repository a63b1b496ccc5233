"""``moesim import --from vllm-jsonl IN OUT``"""

from __future__ import annotations

import argparse

from moesim.commands._common import add_force_arg

FORMATS = ("vllm-jsonl",)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="convert an external routing trace into a moesim Parquet trace",
                       description="Convert an external routing trace into a moesim Parquet trace.")
    p.add_argument("--from", dest="fmt", required=True, choices=FORMATS, help="input format")
    p.add_argument("input", help="input file")
    p.add_argument("output", help="output .parquet file (written atomically)")
    p.add_argument("--model", help="model name to store in the metadata")
    p.add_argument("--num-layers", type=int, help="override the layer count (default: Mixtral's or inferred)")
    p.add_argument("--num-experts", type=int, help="override the experts per layer")
    p.add_argument("--expert-bytes", type=int, default=0, help="bytes per expert to store in the metadata")
    p.add_argument("--quantization", default="bf16", help="quantization the expert bytes assume")
    add_force_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moesim.atomic import refuse_overwrite
    from moesim.traces.format import read_trace
    from moesim.traces.vllm import import_vllm_jsonl

    refuse_overwrite([args.output], args.force)
    meta = import_vllm_jsonl(args.input, args.output, model=args.model, num_layers=args.num_layers,
                             num_experts=args.num_experts, expert_bytes=args.expert_bytes,
                             quantization=args.quantization)
    n = len(read_trace(args.output))
    print(f"wrote {args.output}: {n} rows, {meta.num_layers} layers, {meta.num_experts} experts, top-{meta.top_k}")
    return 0
