"""studies/learned_routing/learned_routing_h200.{json,md,png}: the H200 engine replaying the learned trace (routing and
recorded predictions) vs the timing simulator with the committed ``h200`` preset.

    python studies/learned_routing/make_report.py            # defaults below

Inputs: the engine's raw cells (``studies/learned_routing/gpu_learned_replay.py`` output, committed as
studies/learned_routing/raw/engine_cells_h200.json) and the shipped trace; the simulator replays the same
first decode tokens with the engine's expert size, per cell, with the cell's prefetcher and distance.
Nothing is fitted: the preset comes from micro-benchmarks of an earlier run (moesim/data/hardware/h200.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from moesim.engine.validation import head_tokens  # noqa: E402
from moesim.simulator.cost_model import CostModel  # noqa: E402
from moesim.simulator.timing import simulate_timing  # noqa: E402
from moesim.traces.format import DECODE, read_trace  # noqa: E402
from studies._common import md_table, pct, save_figure, write_json, write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def label(c: dict) -> str:
    return f"speculative d={c['prefetch_distance']}" if c["prefetch"] == "speculative" else c["prefetch"]


def build(engine: dict, trace_path: Path, preset: str) -> dict:
    trace = read_trace(trace_path).filter_phase(DECODE)
    sub = head_tokens(trace, int(engine["tokens"]), int(engine["expert_bytes"]), engine.get("quantization"))
    cost = CostModel.preset(preset)
    cells = []
    for c in engine["cells"]:
        params = {"distance": int(c["prefetch_distance"])} if c["prefetch"] != "none" else None
        # the engine replays the trace: it issues the recorded predictions right after the gate, so the
        # simulator must too (speculative_ready "gate"; a live decoder can only after the layer's experts)
        sim = simulate_timing(sub, c["policy"], int(c["cache_size"]), cost, prefetch=c["prefetch"],
                              prefetch_params=params, speculative_ready="gate")
        real = float(c["tokens_per_s"])
        cells.append({
            "policy": c["policy"], "cache_size": int(c["cache_size"]), "prefetch": c["prefetch"],
            "prefetch_distance": c["prefetch_distance"],
            "real_tokens_per_s": round(real, 4), "sim_tokens_per_s": round(float(sim.tokens_per_s), 4),
            "rel_error": round(float(sim.tokens_per_s) / real - 1.0, 4),
            "real_hit_rate": round(float(c["hit_rate"]), 6), "sim_hit_rate": round(float(sim.hit_rate), 6),
            "real_hits": int(c["hits"]), "sim_hits": int(sim.hits), "requests": int(c["requests"]),
            "real_prefetches": int(c["prefetches"]), "sim_prefetches": int(sim.prefetches),
            "real_ms_per_token": round(1e3 / real, 3), "sim_ms_per_token": round(1e3 / float(sim.tokens_per_s), 3),
        })
    errs = np.abs([c["rel_error"] for c in cells])
    return {
        "device": engine["device"], "date": engine["date"], "trace": str(trace_path.relative_to(ROOT)),
        "layers": engine["layers"], "tokens": engine["tokens"], "phase": "decode",
        "expert_bytes": engine["expert_bytes"], "quantization": engine["quantization"],
        "hardware_preset": preset, "speculative_ready": "gate", "cells": cells,
        "max_rel_error": round(float(errs.max()), 4), "median_rel_error": round(float(np.median(errs)), 4),
        "cells_within_5pct": int((errs <= 0.05).sum()),
        "hit_rates_identical": all(c["real_hits"] == c["sim_hits"] for c in cells),
        "prefetches_identical": all(c["real_prefetches"] == c["sim_prefetches"] for c in cells),
        "source": "studies/learned_routing/gpu_learned_replay.py --trace <the recording> --tokens 128 (lent H200), then "
                  "studies/learned_routing/make_report.py",
    }


def markdown(r: dict) -> str:
    lines = [f"# Learned routing on the real engine: {r['device']}", "",
             f"The offloaded engine (Mixtral-8x7B-size 2-bit experts, {r['expert_bytes']:,} B each, {r['layers']} "
             f"layers, CUDA graphs) replays the first {r['tokens']} decode tokens of `{r['trace']}`: the learned "
             "model's routing, and for `speculative` the predictions recorded with it. The simulator replays "
             f"the same tokens with the committed `{r['hardware_preset']}` preset (calibrated on earlier "
             "micro-benchmarks, not fitted to these cells).", "",
             "The engine read recording A's trace on the GPU box (traces/README.md); its first decode tokens "
             "(sequence 0) are the shipped trace's first, which the identical hit and prefetch counts confirm.", "",
             "Speculative cells are simulated with `--speculative-ready gate`: the engine replays the *recorded* "
             "predictions and issues their copies right after layer l's gate, so the simulator does the same. A "
             "live decoder can issue them only once layer l's output exists (after its experts and the predict "
             "piece: the simulator's default, `hidden`; see studies/decoder/decoder_h200.md), so these speculative "
             "speed-ups are an upper bound on what live decoding gets.", "",
             f"- date: {r['date']}",
             f"- tokens/s error: max {r['max_rel_error']:.1%}, median {r['median_rel_error']:.1%}; "
             f"{r['cells_within_5pct']} of {len(r['cells'])} cells within 5%",
             f"- hit counts identical in every cell: {r['hit_rates_identical']}; prefetch counts identical: "
             f"{r['prefetches_identical']}", "",
             *md_table(["policy", "K", "prefetch", "real tok/s", "sim tok/s", "error", "hit rate", "prefetches"],
                       [[c["policy"], c["cache_size"], label(c), f"{c['real_tokens_per_s']:.2f}",
                         f"{c['sim_tokens_per_s']:.2f}", pct(c["rel_error"], signed=True), f"{c['real_hit_rate']:.4f}",
                         c["real_prefetches"]] for c in r["cells"]])]
    by = {(c["policy"], c["cache_size"], label(c)): c for c in r["cells"]}
    gains = []
    for (pol, k, lab), c in sorted(by.items()):
        base = by.get((pol, k, "none"))
        if base and lab != "none":
            gains.append(f"- {pol} K={k}: {lab} {pct(c['real_tokens_per_s'] / base['real_tokens_per_s'] - 1, signed=True)} "
                         f"real, {pct(c['sim_tokens_per_s'] / base['sim_tokens_per_s'] - 1, signed=True)} simulated")
    lines += ["", "## What prefetching buys over no prefetch (same policy and K)", "", *gains]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    marks = {"none": "o", "speculative d=1": "*", "speculative d=2": "P", "transition": "^", "oracle": "s"}
    for lab, m in marks.items():
        cs = [c for c in r["cells"] if label(c) == lab]
        if cs:
            ax1.scatter([c["real_tokens_per_s"] for c in cs], [c["sim_tokens_per_s"] for c in cs], marker=m, s=50,
                        label=lab)
            ax2.scatter([c["real_hit_rate"] for c in cs], [c["rel_error"] for c in cs], marker=m, s=50, label=lab)
    lim = max(max(c["real_tokens_per_s"], c["sim_tokens_per_s"]) for c in r["cells"]) * 1.05
    ax1.plot([0, lim], [0, lim], "k-", lw=0.8)
    ax1.fill_between([0, lim], [0, lim * 0.95], [0, lim * 1.05], color="grey", alpha=0.2, label="±5%")
    ax1.set(xlabel="real tokens/s (H200 engine)", ylabel="simulated tokens/s (h200 preset)", xlim=(0, lim),
            ylim=(0, lim))
    ax2.axhspan(-0.05, 0.05, color="grey", alpha=0.2)
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set(xlabel="hit rate", ylabel="tokens/s error (sim / real - 1)", ylim=(-0.08, 0.08))
    ax2.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax1.legend(title="prefetch", fontsize=8, loc="upper left")
    ax2.legend(title="prefetch", fontsize=8, loc="lower left")
    fig.suptitle(f"learned routing, sim vs real: {r['device']}, {r['layers']} layers, {r['tokens']} decode tokens per cell")
    fig.tight_layout()
    save_figure(fig, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default=str(ROOT / "studies/learned_routing/raw/engine_cells_h200.json"))
    ap.add_argument("--trace", default=str(ROOT / "traces/learned-mixtral-32l.parquet"))
    ap.add_argument("--preset", default="h200")
    ap.add_argument("-o", "--output", default=str(ROOT / "studies/learned_routing/learned_routing_h200"), help="output prefix")
    args = ap.parse_args()
    report = build(json.loads(Path(args.engine).read_text()), Path(args.trace).resolve(), args.preset)
    prefix = Path(args.output)
    write_json(prefix.with_suffix(".json"), report)
    write_text(prefix.with_suffix(".md"), markdown(report))
    plot(report, prefix.with_suffix(".png"))
    print(f"wrote {prefix}.json/.md/.png: {report['cells_within_5pct']} of {len(report['cells'])} cells within 5%, "
          f"max error {report['max_rel_error']:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
