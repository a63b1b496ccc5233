"""Report maker of the budgets study: raw/budgets_synth_mixtral.json -> budgets.md (CPU only).

    python studies/budgets/make_report.py [-o studies/budgets/budgets.md]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from studies._common import md_table, pct, write_text  # noqa: E402

HERE = Path(__file__).parent
RAW = HERE / "raw" / "budgets_synth_mixtral.json"


def points(x: float) -> str:
    """A difference of two hit rates in percentage points: ``points(0.0152) == "+1.52"``."""
    return f"{100 * x:+.2f}"


def render(data: dict) -> str:
    cells = data["cells"]
    rows = [[c["policy"], c["total_slots"], f"{c['total_slots'] / data['num_layers']:g}", pct(c["uniform_hit_rate"], 2),
             pct(c["hit_rate"], 2), points(c["gain_hit_rate"]),
             f"{min(c['layer_budgets'])}..{max(c['layer_budgets'])}"] for c in cells]
    best = max(cells, key=lambda c: c["gain_hit_rate"])
    worst = min(cells, key=lambda c: c["gain_hit_rate"])
    lines = [
        "# Optimal per-layer budgets vs. an even split",
        "",
        f"Trace: `{data['trace']}` ({data['rows']} rows, {data['num_layers']} layers, {data['num_experts']} experts, "
        f"top-{data['top_k']}). For each policy and total, `moesim budgets` picks per-layer cache sizes by dynamic "
        "programming over every layer's exact hit curve (docs/budgets.md); the even split gives every layer "
        "total / layers slots (the remainder to the first layers). Hit rates are exact replays; "
        "`simulate --layer-budgets` with the chosen list reproduces them.",
        "",
        *md_table(["policy", "total slots", "per layer", "even split", "optimal", "gain (points)", "budgets (min..max)"], rows),
        "",
        f"The largest gain is {points(best['gain_hit_rate'])} percentage points ({best['policy']}, {best['total_slots']} "
        f"slots); the smallest {points(worst['gain_hit_rate'])} ({worst['policy']}, "
        f"{worst['total_slots']} slots). Raw data: `studies/budgets/raw/budgets_synth_mixtral.json` "
        "(`studies/budgets/run_budgets.py`).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=HERE / "budgets.md")
    args = ap.parse_args(argv)
    write_text(args.output, render(json.loads(RAW.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
