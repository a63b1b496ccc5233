"""``moesim demo [-o OUTDIR]``: the main job on the embedded default.

Synthesises a Mixtral-8x7B-like trace from the fitted preset, replays every registered eviction
policy at every slot count, prints the table and writes it (CSV + JSON) with plots to OUTDIR.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from moesim.commands._common import add_force_arg, positive_int, print_table

SPEED_POLICIES = ("lru", "lfu", "fifo", "opt")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="synthesise a Mixtral-like trace, compare every policy, plot",
                       description="Synthesise a Mixtral-like trace, compare every policy, write plots.")
    p.add_argument("-o", "--output", default="moesim-demo", help="output folder (default ./moesim-demo)")
    p.add_argument("--tokens", type=positive_int, default=3000, help="synthetic decode tokens (default 3000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--hardware", default="a6000", help="hardware preset for tokens/s (default a6000)")
    add_force_arg(p)
    p.add_argument("--format", choices=("png", "svg", "pdf"), default="png", help="figure format (default png)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from moesim.analysis import plots
    from moesim.policies import policy_names
    from moesim.safe_write import atomic_open
    from moesim.simulator.replay import mrc
    from moesim.traces.format import read_trace
    from moesim.traces.synth import load_preset, synthesize

    out = Path(args.output)
    if out.is_dir() and any(out.iterdir()) and not args.force:
        from moesim.errors import UsageError

        raise UsageError(f"{out}: output folder is not empty (pass --force to overwrite the demo's files in it)")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    preset = load_preset(args.preset)
    trace_path = out / "trace.parquet"
    synthesize(preset, args.tokens, args.seed, trace_path)
    trace = read_trace(trace_path)
    meta = trace.meta
    sizes = list(range(meta.top_k, meta.num_experts + 1))
    curves: dict[str, list[float]] = {}
    methods: dict[str, str] = {}
    # Numba compiles the replay kernels on their first use in a process: the first policy takes ~30 s,
    # the rest about a second each, so the bar's early ETA is far too long without this word.
    print("note: the first policy compiles the replay kernels (about 30 s on 2 cores); the rest take seconds",
          file=sys.stderr, flush=True)
    for name in tqdm(policy_names(), desc="policies", unit="policy"):
        result = mrc(trace, name, sizes)
        curves[name] = [c["hit_rate"] for c in result.curve]
        methods[name] = result.method
    rows = [[name, *[f"{h:.3f}" for h in curves[name]]] for name in sorted(curves, key=lambda n: -curves[n][2])]
    print(f"\nhit rate per slot count ({args.tokens} synthetic tokens, preset {preset.name}, "
          f"{meta.num_layers} layers x {meta.num_experts} experts, top-{meta.top_k}; one cache per layer)")
    print_table(["policy", *[f"K={k}" for k in sizes]], rows)

    speed_fig = plots.speed(trace, SPEED_POLICIES, sizes, args.hardware)   # the `moesim plot speed` figure
    speed = speed_fig.moesim_data["tokens_per_s"]
    results = {"tokens": args.tokens, "seed": args.seed, "preset": preset.name, "sizes": sizes,
               "hit_rate": curves, "method": methods}
    results["tokens_per_s"] = speed
    print(f"\ntokens/s on the {args.hardware} preset (timing simulator, no prefetch)")
    print_table(["policy", *[f"K={k}" for k in sizes]], [[n, *[f"{v:.2f}" for v in speed[n]]] for n in speed])
    with atomic_open(out / "results.json") as fh:
        json.dump(results, fh, indent=1)
    with atomic_open(out / "hit_rates.csv") as fh:
        fh.write("policy," + ",".join(f"K={k}" for k in sizes) + "\n")
        for name, vals in curves.items():
            fh.write(name + "," + ",".join(f"{v:.6f}" for v in vals) + "\n")
    fmt = args.format
    title = f"synthetic {preset.name}, {args.tokens} tokens"
    plots.save(plots.policy_comparison(curves, sizes, title), out / f"hit_rate_vs_slots.{fmt}", dpi=110)
    plots.save(plots.heatmap(trace), out / f"activation_heatmap.{fmt}", dpi=120)
    plots.save(speed_fig, out / f"tokens_per_s_vs_slots.{fmt}", dpi=120)
    print(f"\nwrote {out}/: trace.parquet, results.json, hit_rates.csv, plots (*.{fmt}) "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0
