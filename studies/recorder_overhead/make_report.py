"""studies/recorder_overhead/recorder_overhead_h200_mixtral8x7b.md from one gpu_record.py run (CPU only).

    python studies/recorder_overhead/make_report.py -o studies/recorder_overhead/recorder_overhead_h200_mixtral8x7b.md

Reads the run's raw numbers (raw/recorder_overhead_h200_mixtral8x7b.json: median tokens/s per variant and
every round's rate); the device run's own text output, with the reading written beside it then, is
raw/recorder_overhead_h200_mixtral8x7b.txt.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from studies._common import ROOT, md_table, pct, write_text  # noqa: E402

RAW = ROOT / "studies" / "recorder_overhead" / "raw" / "recorder_overhead_h200_mixtral8x7b.json"
PLAIN, BARE = "plain (no hooks)", "recorder, no predictions"


def reading(r: dict) -> list[str]:
    """What the run can and cannot say, from its medians and the spread of its rounds."""
    v = r["variants"]
    spread = [(name, min(x["rates"]), max(x["rates"])) for name, x in v.items()]
    slower = [name for name, x in v.items() if name != PLAIN and x["tokens_per_s"] < v[PLAIN]["tokens_per_s"]]
    lines = [f"- Rounds spread {min(lo for _, lo, _ in spread):.0f}-{max(hi for _, _, hi in spread):.0f} tok/s "
             "across the variants (" + "; ".join(f"{n}: {lo:.1f}-{hi:.1f}" for n, lo, hi in spread)
             + "), so the medians resolve only differences larger than that spread.",
             "- Recorder variants slower than plain in the medians: " + (", ".join(slower) or "none") + "."]
    if BARE in v:
        base = v[BARE]["ms_per_token"]
        lines.append(f"- Against `{BARE}`, per token: " + "; ".join(
            f"{name} {pct(x['ms_per_token'] / base - 1, signed=True)}" for name, x in v.items()
            if name not in (PLAIN, BARE)) + ".")
    peak = r.get("max_memory_allocated_gib")
    lines.append(f"- Build: {r['params'] / 1e9:.2f}B params in {r['dtype']} in {r['build_seconds']:.1f} s"
                 + (f", {peak:.1f} GiB peak." if peak else "."))
    return lines


def markdown(r: dict) -> str:
    rows = [[name, f"{x['tokens_per_s']:.2f}", f"{x['ms_per_token']:.2f}", f"{x['vs_plain']:.3f}",
             pct(x["overhead_pct"] / 100, signed=True), x["predict_path"] or "-"] for name, x in r["variants"].items()]
    return "\n".join([
        f"# Recorder overhead: {r['model']} on {r['device_name']}", "",
        f"Device run {r['date']} (`python3 {r['command']}`; torch {r['torch']}, transformers {r['transformers']}): "
        f"{r['params'] / 1e9:.2f}B params, {r['dtype']}, {r['prompts']} prompts x {r['tokens_per_prompt']} decode "
        f"tokens, median of {r['repeats']} interleaved rounds. Report: `python studies/recorder_overhead/make_report.py "
        "-o studies/recorder_overhead/recorder_overhead_h200_mixtral8x7b.md`.", "",
        *md_table(["variant", "tokens/s", "ms/token", "vs plain", "overhead", "prediction path"], rows), "",
        "## Reading", "", *reading(r)]) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("raw", nargs="?", default=str(RAW), help="a gpu_record.py result (default: the committed run)")
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    try:
        r = json.loads(Path(args.raw).read_text())
    except (OSError, ValueError) as exc:
        print(f"{args.raw}: cannot read ({exc.__class__.__name__})", file=sys.stderr)
        return 1
    write_text(Path(args.out), markdown(r))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
