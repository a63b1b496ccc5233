"""``moesim demo [-o OUTDIR]``: the main job on the embedded default.

Synthesises a Mixtral-8x7B-like trace from the fitted preset, replays every registered eviction
policy at every slot count, prints the table and writes it (CSV + JSON) with plots to OUTDIR.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from moesim.commands._common import add_force_arg, positive_int, print_table

OKABE_ITO = ["#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#999999"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="synthesise a Mixtral-like trace, compare every policy, plot",
                       description="Synthesise a Mixtral-like trace, compare every policy, write plots.")
    p.add_argument("-o", "--output", default="moesim-demo", help="output folder (default ./moesim-demo)")
    p.add_argument("--tokens", type=positive_int, default=3000, help="synthetic decode tokens (default 3000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--hardware", default="a6000", help="hardware preset for tokens/s (if the timing model is present)")
    add_force_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from tqdm import tqdm

    from moesim.atomic import atomic_open
    from moesim.policies import policy_names
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
    for name in tqdm(policy_names(), desc="policies", unit="policy"):
        result = mrc(trace, name, sizes)
        curves[name] = [c["hit_rate"] for c in result.curve]
        methods[name] = result.method
    rows = [[name, *[f"{h:.3f}" for h in curves[name]]] for name in sorted(curves, key=lambda n: -curves[n][2])]
    print(f"\nhit rate per slot count ({args.tokens} synthetic tokens, preset {preset.name}, "
          f"{meta.num_layers} layers x {meta.num_experts} experts, top-{meta.top_k}; one cache per layer)")
    print_table(["policy", *[f"K={k}" for k in sizes]], rows)

    speed = _tokens_per_s(trace, sizes, args.hardware)
    results = {"tokens": args.tokens, "seed": args.seed, "preset": preset.name, "sizes": sizes,
               "hit_rate": curves, "method": methods}
    if speed:
        results["tokens_per_s"] = speed
        print(f"\ntokens/s on the {args.hardware} preset (timing simulator, no prefetch)")
        print_table(["policy", *[f"K={k}" for k in sizes]],
                    [[n, *[f"{v:.2f}" for v in speed[n]]] for n in speed])
    with atomic_open(out / "results.json") as fh:
        json.dump(results, fh, indent=1)
    with atomic_open(out / "hit_rates.csv") as fh:
        fh.write("policy," + ",".join(f"K={k}" for k in sizes) + "\n")
        for name, vals in curves.items():
            fh.write(name + "," + ",".join(f"{v:.6f}" for v in vals) + "\n")
    _plot_curves(curves, sizes, out / "hit_rate_vs_slots.png", args.tokens)
    _plot_heatmap(trace, out / "activation_heatmap.png")
    if speed:
        _plot_speed(speed, sizes, out / "tokens_per_s_vs_slots.png", args.hardware)
    print(f"\nwrote {out}/: trace.parquet, results.json, hit_rates.csv, plots (*.png) "
          f"in {time.perf_counter() - t0:.1f} s")
    _ = np
    return 0


def _tokens_per_s(trace, sizes, hardware) -> dict[str, list[float]]:
    try:
        from moesim.simulator.cost_model import CostModel
        from moesim.simulator.timing import simulate_timing
    except ImportError:
        return {}
    cost = CostModel.preset(hardware)
    return {name: [simulate_timing(trace, name, k, cost).tokens_per_s for k in sizes]
            for name in ("lru", "lfu", "fifo", "opt")}


def _plot_curves(curves, sizes, path, tokens) -> None:
    import matplotlib.pyplot as plt

    fig, (ax, gain) = plt.subplots(1, 2, figsize=(13, 5))
    colours = OKABE_ITO[1:]  # black is reserved for the OPT bound
    styles = ["-", "--", ":"]
    base = curves.get("lru")
    others = [n for n in sorted(curves) if n != "opt"]
    for i, name in enumerate([*others, "opt"] if "opt" in curves else others):
        vals = curves[name]
        opt = name == "opt"
        kw = dict(color="black" if opt else colours[i % len(colours)],
                  ls="-" if opt else styles[(i // len(colours)) % len(styles)], lw=2.5 if opt else 1.5,
                  marker="o", ms=3, label=name + (" (Belady bound)" if opt else ""))
        ax.plot(sizes, vals, **kw)
        if base is not None:
            gain.plot(sizes, [100 * (v - b) for v, b in zip(vals, base, strict=True)], **kw)
    ax.set_xlabel("expert slots per layer (K)")
    ax.set_ylabel("hit rate")
    ax.set_title(f"Hit rate vs slots (synthetic Mixtral-8x7B, {tokens} tokens)")
    gain.set_xlabel("expert slots per layer (K)")
    gain.set_ylabel("hit rate minus LRU's (percentage points)")
    gain.set_title("Gain over LRU")
    gain.axhline(0, color="grey", lw=0.8)
    for a in (ax, gain):
        a.grid(alpha=0.3)
    gain.legend(ncol=2, fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_heatmap(trace, path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    m = trace.meta
    counts = np.zeros((m.num_layers, m.num_experts))
    np.add.at(counts, (np.repeat(trace.layer, m.top_k), trace.experts.reshape(-1)), 1)
    share = counts / counts.sum(1, keepdims=True)
    fig, ax = plt.subplots(figsize=(6, 8))
    im = ax.imshow(share, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert id")
    ax.set_ylabel("MoE layer")
    ax.set_title("Activation share per layer (synthetic Mixtral-8x7B)")
    fig.colorbar(im, ax=ax, label="share of the layer's expert requests")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_speed(speed, sizes, path, hardware) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, vals) in enumerate(speed.items()):
        ax.plot(sizes, vals, marker="o", color=OKABE_ITO[i + 1], label=name)
    ax.set_xlabel("expert slots per layer (K)")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"Simulated decode speed on {hardware} (batch 1, no prefetch)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
