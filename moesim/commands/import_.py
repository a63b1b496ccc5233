"""``moesim import --from FORMAT IN OUT``: vllm-jsonl (the contract's spelling), vllm-batched (batched
vLLM MoE-logger output), jsonl (any one-row-per-line log, with --map)."""

from __future__ import annotations

import argparse
import sys

from moesim.commands._common import add_force_arg, add_output_arg, note_line, output_path

FORMATS = ("vllm-jsonl", "vllm-batched", "jsonl", "sglang", "vllm-routed", "megatron")
# formats whose importer is called as f(src, dst, opts, notes)
SERVER_IMPORTERS = {"sglang": ("moesim.traces.sglang", "import_sglang"),
                    "vllm-routed": ("moesim.traces.vllm_routed", "import_vllm_routed"),
                    "megatron": ("moesim.traces.megatron", "import_megatron")}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import", help="convert an external routing log into a moesim Parquet trace",
        description="Convert an external routing log into a moesim Parquet trace. Formats: vllm-jsonl "
                    "(problem_id/token_idx/layer/experts/gating_probs lines), vllm-batched (a {\"type\": \"meta\"} "
                    "header and {\"type\": \"route\"} rows per forward-pass batch; the warm-up pass is dropped), "
                    "jsonl (any JSON-lines log; say which field is which with --map), sglang / vllm-routed (server "
                    "responses with routed experts, one per line), megatron (Megatron-LM's router_trace_rank*.jsonl). "
                    "See docs/trace-format.md.")
    p.add_argument("--from", dest="fmt", required=True, choices=FORMATS, help="input format")
    p.add_argument("input", help="input file")
    add_output_arg(p, "output .parquet file (written atomically)")
    p.add_argument("--map", metavar="TARGET=FIELD,...",
                   help="jsonl: which field holds seq, token, layer, experts, weights, phase "
                        "(e.g. seq=req,token=pos,layer=l,experts=ids,weights=w; nested fields as a.b)")
    p.add_argument("--where", metavar="FIELD=VALUE", help="jsonl: import only the lines whose FIELD is VALUE "
                                                         "(e.g. type=route); the others are skipped")
    p.add_argument("--model", help="model name (default: from the log, else from the file name)")
    p.add_argument("--num-layers", type=int, help="layers of the model (default: the known model's, else inferred)")
    p.add_argument("--num-experts", type=int, help="experts per layer (default: the known model's, else inferred)")
    p.add_argument("--expert-bytes", type=int, default=0,
                   help="bytes per expert to store (default 0: the cost model's table for the simulated format)")
    p.add_argument("--quantization", help="weight format of the logged model (default: from the log, the model or "
                                          "file name, e.g. '...-fp8...'; else 'unknown')")
    add_force_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from moesim.errors import UsageError
    from moesim.safe_write import refuse_overwrite
    from moesim.traces.importing import ImportOptions

    args.output = output_path(args)
    refuse_overwrite([args.output], args.force)
    for flag, value in (("--num-layers", args.num_layers), ("--num-experts", args.num_experts)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.fmt != "jsonl" and (args.map or args.where):
        raise UsageError(f"--map and --where apply to --from jsonl, not {args.fmt}")
    opts = ImportOptions(args.model, args.num_layers, args.num_experts, args.expert_bytes, args.quantization)
    notes: list[str] = []
    if args.fmt == "vllm-jsonl":
        from moesim.traces.vllm import import_vllm_jsonl

        meta = import_vllm_jsonl(args.input, args.output, model=args.model, num_layers=args.num_layers,
                                 num_experts=args.num_experts, expert_bytes=args.expert_bytes,
                                 quantization=args.quantization, notes=notes)
    elif args.fmt == "vllm-batched":
        from moesim.traces.vllm_batched import import_vllm_batched

        meta = import_vllm_batched(args.input, args.output, opts, notes)
    elif args.fmt in SERVER_IMPORTERS:
        import importlib

        module, func = SERVER_IMPORTERS[args.fmt]
        meta = getattr(importlib.import_module(module), func)(args.input, args.output, opts, notes)
    else:
        from moesim.traces.jsonl_mapped import import_jsonl_mapped, parse_mapping, parse_where

        meta = import_jsonl_mapped(args.input, args.output, parse_mapping(args.map), parse_where(args.where),
                                   opts, notes)
    for note in notes:
        print(f"moesim import: note: {note_line(note)}", file=sys.stderr)
    n = pq.ParquetFile(args.output).metadata.num_rows  # the footer's count: no second copy of the rows in memory
    print(f"wrote {args.output}: {n} rows, {meta.model}, {meta.num_layers} layers, {meta.num_experts} experts, "
          f"top-{meta.top_k}, quantization {meta.quantization}")
    return 0
