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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="synthesise a Mixtral-like trace, compare every policy, plot",
                       description="Synthesise a Mixtral-like trace, compare every policy, write plots.")
    p.add_argument("-o", "--output", default="moesim-demo", help="output folder (default ./moesim-demo)")
    p.add_argument("--tokens", type=positive_int, default=3000, help="synthetic decode tokens (default 3000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--hardware", default="a6000", help="hardware preset for tokens/s (if the timing model is present)")
    add_force_arg(p)
    p.add_argument("--format", choices=("png", "svg", "pdf"), default="png", help="figure format (default png)")
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
    fmt = args.format
    _plot_curves(curves, sizes, out / f"hit_rate_vs_slots.{fmt}", args.tokens, fmt)
    _plot_heatmap(trace, out / f"activation_heatmap.{fmt}", fmt)
    if speed:
        _plot_speed(speed, sizes, out / f"tokens_per_s_vs_slots.{fmt}", args.hardware, fmt)
    print(f"\nwrote {out}/: trace.parquet, results.json, hit_rates.csv, plots (*.{fmt}) "
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


def _plot_curves(curves, sizes, path, tokens, fmt) -> None:
    _save(hit_rate_figure(curves, sizes, tokens), path, fmt, 110)


def _save(fig, path, fmt: str, dpi: int) -> None:
    import matplotlib.pyplot as plt

    from moesim.atomic import atomic_path

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)


def hit_rate_figure(curves: dict[str, list[float]], sizes: list[int], tokens: int):
    """Left: hit rate (%) of every policy, the best online policy, LRU and the OPT bound drawn out and
    the rest as a grey field; right: every online policy's gain over LRU in its own colour, marker
    and family line style. One legend below both, best first."""
    import matplotlib.pyplot as plt

    from moesim.analysis.style import FAMILY_NAMES, policy_label, policy_style

    order = sorted(curves, key=lambda n: (n != "opt", -sum(curves[n])))  # OPT, then best mean hit rate first
    online = [n for n in order if n != "opt"]
    best = online[0] if online else None
    base = curves.get("lru")
    fig, (ax, gain) = plt.subplots(1, 2, figsize=(13, 6.4))
    handles, shown = [], []  # right-panel lines; left-panel highlighted lines
    for i, name in enumerate(order):
        style = policy_style(name, i)
        vals = [100 * v for v in curves[name]]
        if name in ("opt", "lru", best):
            tag = " (best online)" if name == best else " (baseline)" if name == "lru" else ""
            (h,) = ax.plot(sizes, vals, label=policy_label(name) + tag,
                           **style.kwargs(linewidth=2.6 if name != "lru" else 2.0))
            shown.append(h)
        else:
            ax.plot(sizes, vals, color="#BBBBBB", linewidth=1.0, zorder=1)
        if base is not None and name != "opt":  # OPT's headroom is on the left; here the online policies spread out
            label = policy_label(name) + (" (baseline)" if name == "lru" else "") + \
                (f" - {FAMILY_NAMES[style.family]}" if name != "random" else "")
            (h,) = gain.plot(sizes, [100 * (v - b) for v, b in zip(curves[name], base, strict=True)], label=label,
                             **style.kwargs())
            handles.append(h)
    (grey,) = ax.plot([], [], color="#BBBBBB", linewidth=1.0, label="other policies (right panel)")
    ax.legend(handles=[*shown, grey], loc="lower right", frameon=True, framealpha=0.9, fontsize=9)
    ax.set_xlabel("expert slots per layer (K)")
    ax.set_ylabel("hit rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Hit rate vs slots (synthetic Mixtral-8x7B, {tokens} tokens)")
    gain.set_xlabel("expert slots per layer (K)")
    gain.set_ylabel("hit rate minus LRU's (percentage points)")
    gain.set_title("Gain over LRU, every online policy")
    gain.axhline(0, color="grey", lw=0.8)
    for a in (ax, gain):
        a.grid(alpha=0.3)
        a.set_xticks(sizes)
    fig.legend(handles, [h.get_label() for h in handles], loc="lower center", ncol=4, frameon=False, fontsize=9,
               title="policy (best mean hit rate first; solid = recency/FIFO family, dashed = frequency family)",
               title_fontsize=9)
    fig.tight_layout(rect=(0, (0.45 + 0.2 * ((len(handles) + 3) // 4)) / fig.get_figheight(), 1, 1))
    return fig


def _plot_heatmap(trace, path, fmt) -> None:
    from moesim.analysis.plots import heatmap  # the same figure as `moesim plot heatmap`

    _save(heatmap(trace), path, fmt, 120)


def _plot_speed(speed, sizes, path, hardware, fmt) -> None:
    import matplotlib.pyplot as plt

    from moesim.analysis.style import policy_label, policy_style

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, vals) in enumerate(speed.items()):
        ax.plot(sizes, vals, label=policy_label(name), **policy_style(name, i).kwargs())
    ax.set_xlabel("expert slots per layer (K)")
    ax.set_ylabel("decode throughput (tokens/s)")
    ax.set_ylim(bottom=0)
    ax.set_xticks(sizes)
    ax.set_title(f"Simulated decode speed on {hardware} (batch 1, no prefetch)")
    ax.grid(alpha=0.3)
    ax.legend(title="policy", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    _save(fig, path, fmt, 120)
