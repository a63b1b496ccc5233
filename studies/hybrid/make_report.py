"""Builds studies/hybrid/report.md from raw/ (written by run.py): every number below comes from the raw
files.

    PYTHONPATH=. python studies/hybrid/make_report.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moesim.simulator.cost_model import DEFAULT_CPU  # noqa: E402
from studies._common import md_table as table  # noqa: E402
from studies._common import write_text  # noqa: E402

HERE = Path(__file__).resolve().parent
RAW = HERE / "raw"


def cpu_section(raw: dict, cal: dict) -> list[str]:
    host = raw["host"]
    ref = {(f, t): s for f, pts in DEFAULT_CPU["expert_s"].items() for t, s in pts}
    rows = [[r["format"], r["tokens"], r["threads"], f"{r['median_s'] * 1e3:.2f}", f"{r['min_s'] * 1e3:.2f}",
             f"{r['max_s'] * 1e3:.2f}",
             f"{ref[(r['format'], r['tokens'])] * 1e3:.2f}" if (r["format"], r["tokens"]) in ref else "-"]
            for r in raw["rows"]]
    geo = raw["geometry"]
    return [f"## The CPU expert FFN on this machine ({host['processor']}, {host['logical_cpus']} logical CPUs, "
            f"torch {host['torch']}, {raw['date']})", "",
            f"One expert FFN, {geo['hidden']} -> {geo['ffn']} -> {geo['hidden']} (Mixtral-8x7B), median of "
            f"{raw['repeats']} (`moesim calibrate --cpu-only`). The last column is the preset default, measured on "
            "the H100 box's host (16 Xeon cores, AMX) at 16 threads (issue 24).", "",
            *table(["format", "tokens", "threads", "median ms", "min ms", "max ms", "H100-box host, 16 thr, ms"], rows),
            "", f"Written as the `cpu` block of `raw/calibration_cpu_host.json` (threads {cal['cpu']['threads']}, "
            f"format {cal['cpu']['format']}). This build machine's 2 cores are shared by several sessions, so "
            "these times include their load: they price this machine as it was, not an idle one.", ""]


def execution_section(doc: dict) -> list[str]:
    out = [f"## Execution policies ({doc['trace']}, first {doc['sequences']} sequences: {doc['tokens']} tokens; "
           f"{doc['policy']}, batch 1, no prefetch)", "",
           "Decode tokens/s by the timing simulator, and the ratio to copy-only at the same K (slots per layer).", ""]
    for machine in dict.fromkeys(c["machine"] for c in doc["cells"]):
        cells = [c for c in doc["cells"] if c["machine"] == machine]
        execs = list(dict.fromkeys(c["execution"] for c in cells))
        rows = []
        for k in sorted({c["cache_size"] for c in cells}):
            at = {c["execution"]: c["result"] for c in cells if c["cache_size"] == k}
            base = at["copy"]["tokens_per_s"]
            best = max(execs, key=lambda e: at[e]["tokens_per_s"])
            rows.append([k, *[f"{at[e]['tokens_per_s']:.2f} ({at[e]['tokens_per_s'] / base:.2f}x)" for e in execs],
                         f"{best} ({at[best]['tokens_per_s'] / base:.2f}x)"])
        out += [f"### {machine}", "", *table(["K", *execs, "fastest"], rows), ""]
        shares = []
        for c in cells:
            ex, n = c["result"]["executed"], sum(c["result"]["executed"].values())
            shares.append([c["cache_size"], c["execution"], *[f"{ex[k] / n:.3f}" for k in ex]])
        keys = list(cells[0]["result"]["executed"])
        out += ["Share of requests by executor:", "", *table(["K", "execution", *keys], shares), ""]
    return out


def placement_section(doc: dict) -> list[str]:
    out = ["## Static placement vs copy-only at the same VRAM", "",
           "`moesim placement` at the memory of K slots per layer (K x layers x expert bytes): every expert not "
           "placed runs on the CPU, nothing is copied. Beside it, copy-only LRU with K slots per layer. The frequency "
           "set is profiled on the same trace (in sample: an upper bound for a profile taken on other text).", ""]
    rows = []
    for p in doc["placements"]:
        r = p["result"]
        copy = next(c["result"]["tokens_per_s"] for c in doc["cells"] if c["machine"] == p["machine"]
                    and c["cache_size"] == p["cache_size"] and c["execution"] == "copy")
        cands = {c["name"]: c for c in r["candidates"]}
        ncpu = next(c for n, c in cands.items() if n.startswith("n-cpu-moe"))
        rows.append([p["machine"], p["cache_size"], f"{p['vram_gb']:.2f}", r["gpu_slots"],
                     f"{ncpu['name']}: {ncpu['tokens_per_s']:.2f} (hit {ncpu['hit_rate']:.3f})",
                     f"{cands['frequency']['tokens_per_s']:.2f} (hit {cands['frequency']['hit_rate']:.3f})",
                     f"{copy:.2f}", f"{r['tokens_per_s'] / copy:.2f}x"])
    return out + table(["machine", "K", "VRAM GB", "GPU experts", "llama.cpp whole layers tok/s",
                        "frequency set tok/s", "copy-only LRU tok/s", "best static / copy"], rows) + [""]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=HERE / "report.md")
    args = ap.parse_args(argv)
    raw = json.loads((RAW / "cpu_expert_raw.json").read_text())
    cal = json.loads((RAW / "calibration_cpu_host.json").read_text())
    doc = json.loads((RAW / "cells.json").read_text())
    lines = ["# Hybrid execution: the CPU as a third resource (issue 24, simulator half)", "",
             "Built by `studies/hybrid/make_report.py` from `studies/hybrid/raw/` (driver: `studies/hybrid/run.py`). "
             "Simulated only: the real engine's CPU path and the sim-vs-real validation are not part of this study.", "",
             *cpu_section(raw, cal), *execution_section(doc), *placement_section(doc)]
    write_text(args.output, "\n".join(lines))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
