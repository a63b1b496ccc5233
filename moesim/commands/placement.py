"""``moesim placement TRACE --vram-gb X (--hardware H | --calibration C) [--json]``: the best static
placement of expert weights for a VRAM budget, with a llama.cpp ``-ot`` rule and kTransformers rules
(docs/timing.md, "Placement advice")."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("placement", help="best static GPU/CPU placement of experts for a VRAM budget",
                       description="Which experts' weights go to the GPU for a VRAM budget (the rest computed "
                                   "on the CPU), priced by the timing simulator; prints llama.cpp's -ot rule and "
                                   "kTransformers' rules for it.")
    p.add_argument("trace", help="trace file (.parquet) or directory of part files")
    p.add_argument("--vram-gb", type=float, required=True, help="GPU memory for expert weights (GB, 1e9 bytes)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hardware", metavar="NAME", help="hardware preset (see `moesim hardware`)")
    src.add_argument("--calibration", metavar="FILE", help="calibration JSON (from `moesim calibrate`)")
    p.add_argument("--quantization", choices=("bf16", "hqq4", "hqq2"), help="GPU expert format (default: the preset's)")
    p.add_argument("--cpu-threads", type=int, metavar="N", help="what-if: threads of the CPU experts")
    p.add_argument("--cpu-speed", type=float, metavar="X", help="what-if: CPU expert time divided by X")
    p.add_argument("--profile", metavar="TRACE", help="trace whose routing frequencies pick the hot set (default: TRACE)")
    p.add_argument("--batch-size", type=int, default=1, help="decode batch (sequences per step)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moesim.analysis.placement import best_placement, rules_yaml
    from moesim.commands._common import emit_json, print_table
    from moesim.errors import UsageError
    from moesim.simulator.cost_model import CostModel
    from moesim.traces.format import read_trace

    if not args.vram_gb >= 0:
        raise UsageError(f"--vram-gb must be >= 0, got {args.vram_gb}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    cost = CostModel.from_json(args.calibration) if args.calibration else CostModel.preset(args.hardware)
    cost = cost.with_overrides(quantization=args.quantization, cpu_threads=args.cpu_threads, cpu_speed=args.cpu_speed)
    trace = read_trace(args.trace)
    profile = read_trace(args.profile) if args.profile else None
    if profile is not None and (profile.meta.num_layers, profile.meta.num_experts) != (
            trace.meta.num_layers, trace.meta.num_experts):
        raise UsageError(f"{args.profile}: the profile has {profile.meta.num_layers} layers x "
                         f"{profile.meta.num_experts} experts, the trace {trace.meta.num_layers} x {trace.meta.num_experts}")
    out = best_placement(trace, cost, args.vram_gb, profile, args.batch_size)
    if args.json:
        emit_json(out)
        return 0
    print(f"{args.vram_gb:g} GB holds {out['gpu_slots']} experts of {out['expert_bytes'] / 1e6:.1f} MB "
          f"({cost.name}, {cost.quantization}); the rest run on the CPU")
    print_table(["placement", "gpu_experts", "tokens_per_s", "hit_rate"],
                [[c["name"], c["gpu_experts"], c["tokens_per_s"], c["hit_rate"]] for c in out["candidates"]])
    print(f"\nbest: {out['placement']} ({out['tokens_per_s']} tok/s, hit rate {out['hit_rate']})")
    print(f"\nllama.cpp: --n-cpu-moe {out['llama_cpp_n_cpu_moe']}"
          + (f'  or  -ot "{out["llama_cpp_ot"]}"' if out["llama_cpp_ot"] else "  (nothing on the CPU)"))
    print(f"  note: {out['llama_cpp_note']}")
    print("\nkTransformers rules (optimize_rules YAML):")
    print(rules_yaml(out["ktransformers_rules"]))
    return 0
