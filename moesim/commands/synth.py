"""``moesim synth --preset NAME|FILE --tokens N --seed S OUT.parquet`` and ``moesim fit-synth``."""

from __future__ import annotations

import argparse
import json

from moesim.commands._common import add_force_arg, add_output_arg, output_path, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="generate a synthetic routing trace from a fitted preset",
                       description="Generate a synthetic routing trace (same preset + seed -> identical file).")
    p.add_argument("--preset", default="mixtral-8x7b", help="built-in preset name or a preset .json file")
    p.add_argument("--tokens", type=positive_int, required=True, help="decode tokens to generate")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--sequences", type=positive_int,
                   help="split into this many equal sequences (default: lengths drawn around the fitted mean)")
    add_output_arg(p, "output .parquet file")
    add_force_arg(p)
    p.set_defaults(func=run_synth)

    f = sub.add_parser("fit-synth", help="fit the synthetic routing model to a trace",
                       description="Fit the synthetic routing model to a trace and write a preset JSON.")
    f.add_argument("trace", help="trace to fit")
    f.add_argument("-o", "--output", required=True, help="preset .json to write")
    f.add_argument("--name", help="preset name (default: the output file's stem)")
    add_force_arg(f)
    f.set_defaults(func=run_fit)


def run_synth(args: argparse.Namespace) -> int:
    from moesim.safe_write import refuse_overwrite
    from moesim.traces.synth import load_preset, synthesize

    args.output = output_path(args)
    refuse_overwrite([args.output], args.force)
    preset = load_preset(args.preset)
    meta = synthesize(preset, args.tokens, args.seed, args.output, sequences=args.sequences)
    print(f"wrote {args.output}: {args.tokens} tokens x {meta.num_layers} layers "
          f"({meta.provenance['sequences']} sequences), preset {preset.name}, seed {args.seed}")
    return 0


def run_fit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moesim.safe_write import atomic_open, refuse_overwrite
    from moesim.traces.format import read_trace
    from moesim.traces.synth import fit_preset

    refuse_overwrite([args.output], args.force)
    trace = read_trace(args.trace)
    preset = fit_preset(trace, args.name or Path(args.output).stem)
    with atomic_open(args.output) as fh:
        json.dump(preset.to_json(), fh, indent=1)
        fh.write("\n")
    print(f"wrote {args.output}: preset {preset.name} fitted to {preset.source['tokens']} tokens")
    return 0
