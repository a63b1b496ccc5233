"""Builds studies/hybrid/report.md from raw/ (written by run.py and, on the device, run_validation.py):
every number below comes from the raw files.

    PYTHONPATH=. python studies/hybrid/make_report.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moesim.simulator.cost_model import DEFAULT_CPU  # noqa: E402
from studies._common import md_table as table  # noqa: E402
from studies._common import pct, write_text  # noqa: E402

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


def _winner(cells: list[dict], key: str) -> str:
    """The execution with the lowest ``key`` ms/token, and its speed-up over copy-only."""
    best = min(cells, key=lambda c: c[key])
    copy = next((c for c in cells if c["execution"] == "copy"), None)
    return f"{best['execution']} ({copy[key] / best[key]:.2f}x)" if copy else best["execution"]


def _beside_sentence(cpu: dict, doc: dict) -> str:
    """What the run measured of CPU experts and copies running at once, and what the simulator used."""
    if "beside_copies" not in cpu:
        return ("This run's driver did not measure CPU experts beside copies: the simulator priced every CPU "
                "expert at its time alone.")
    m = cpu["measured"]
    beside_copy = float(np.median(m["copies_beside_cpu_s"])) * 1e3
    said = (f"Beside running host-to-device copies the CPU expert took {pct(cpu['beside_copies'] - 1)} longer "
            f"(median of {len(m['beside_copies_s'])} calls against {len(m['alone_s'])} alone, alternating rounds); "
            "the simulator prices a CPU expert that starts while a copy runs at that factor. ")
    if "copies_beside_cpu" not in cpu:   # runs before the copies' own term: the copy curve's point alone
        alone_copy = [p["ms"] for p in doc["calibration_raw"]["h2d"]][-1]
        return said + (f"The copies meanwhile took {beside_copy:.3f} ms each against {alone_copy:.3f} ms alone "
                       f"({pct(beside_copy / alone_copy - 1)} longer, wall time from issue): the simulator of this "
                       "run did not model that slow-down.")
    alone_copy = float(np.median(m["copies_alone_s"])) * 1e3
    return said + (f"The copies meanwhile took {beside_copy:.3f} ms each (median of {len(m['copies_beside_cpu_s'])}) "
                   f"against {alone_copy:.3f} ms alone (median of {len(m['copies_alone_s'])} in the same rounds): "
                   f"x{cpu['copies_beside_cpu']:.2f}, which the simulator applies to the transfer of a copy that "
                   "overlaps CPU work.")


def _idle_section(cpu: dict) -> list[str]:
    """The CPU expert after idle gaps, as the run measured it (older runs did not)."""
    if not cpu.get("after_idle"):
        return ["This run's driver did not measure CPU experts after idle gaps: the simulator priced every CPU "
                "expert as if its workers were awake.", ""]
    idle = cpu["measured"]["after_idle"]
    base = float(np.median(idle["back_to_back_s"])) * 1e3
    rows = [[f"{g * 1e3:.2f}", f"{float(np.median(a)) * 1e3:.3f}", f"{float(np.median(a)) * 1e3 - base:+.3f}",
             f"{x * 1e3:.3f}"] for (g, x), a in zip(cpu["after_idle"], idle["after_gap_s"], strict=True)]
    return [f"CPU expert after the worker sat idle ({cpu['sources']['after_idle']}): back to back {base:.3f} ms "
            f"(median of {len(idle['back_to_back_s'])}); the simulator adds the last column to a CPU expert that "
            "starts that long after the previous one ended (linear between the points, flat past the last).", "",
            *table(["idle ms (measured sleep)", "expert ms after it", "vs back to back", "term ms"], rows), ""]


def batches(doc: dict) -> list[int]:
    """The decode batch sizes of a validation run's cells (runs before batch-B cells: the one ``batch``)."""
    return doc["batch"] if isinstance(doc["batch"], list) else [doc["batch"]]


def cell_batch(doc: dict, cell: dict) -> int:
    return cell.get("batch", batches(doc)[0])


def _kind(doc: dict, cell: dict) -> str:
    """A cell's execution family, with its batch size when some run has cells of several."""
    kind = cell["execution"].split("=")[0]
    return kind if len(batches(doc)) == 1 else f"{kind}, batch {cell_batch(doc, cell)}"


def error_by_execution(runs: list[tuple[str, dict]]) -> list[str]:
    """Median and max |error| per execution policy (and batch size, for runs of several), one column pair
    per device run."""
    kinds = list(dict.fromkeys(_kind(d, c) for _, d in runs for c in d["cells"]))
    head = ["execution"] + [f"{name} (batch {' and '.join(map(str, batches(d)))}): median / max |error|"
                            for name, d in runs]
    rows = []
    for kind in kinds:
        row = [kind]
        for _, d in runs:
            errs = [abs(c["error"]) for c in d["cells"] if _kind(d, c) == kind]
            row.append(f"{pct(float(np.median(errs)))} / {pct(max(errs))}" if errs else "-")
        rows.append(row)
    return ["## Sim vs real: error by execution policy, every device run", "",
            *table(head, rows), "",
            "Runs: " + "; ".join(f"`{name}`: {d['cpu_threads']} worker threads, " + _terms(d["calibration"]["cpu"])
                                  for name, d in runs) + ".", ""]


def _terms(cpu: dict) -> str:
    """The contention and wake-up terms a run's simulator used, in words."""
    out = [f"beside-copies factor {cpu['beside_copies']:.2f}" if "beside_copies" in cpu else "no beside-copies term"]
    if "copies_beside_cpu" in cpu:
        out.append(f"copies-beside-CPU factor {cpu['copies_beside_cpu']:.2f}")
    if cpu.get("after_idle"):
        out.append(f"after-idle term up to {max(x for _, x in cpu['after_idle']) * 1e3:.3f} ms")
    return ", ".join(out)


def validation_section(doc: dict, source: str) -> list[str]:
    """The device validation (run_validation.py): real vs simulated ms/token per cell, the winner per K."""
    cal, eng = doc["calibration"], doc["engine"]
    cpu = cal["cpu"]
    cells = doc["cells"]
    errs = [abs(c["error"]) for c in cells]
    out = [f"## Sim vs real on the device ({doc['device']}, commit {doc['commit'] or '?'}, {doc['date']})", "",
           f"`{source}`, written by `studies/hybrid/run_validation.py`: one {eng['geometry']['num_layers']}-layer "
           f"Mixtral-geometry engine with random weights ({eng['quantization']} experts, {eng['lowbit']} substitutes, "
           f"{eng['cpu_format']} CPU copies), LRU, batch {' and '.join(map(str, batches(doc)))}, "
           f"{doc['tokens_per_cell']} decode tokens per {'batch-1 ' if max(batches(doc)) > 1 else ''}"
           f"cell{_batch_cells(doc)}, the CPU worker on {doc['cpu_threads']} threads ({doc['host_cpus']} logical CPUs). The simulator's "
           "calibration comes from the same run's micro-benchmarks, not from the cells: one CPU expert "
           f"{cpu['expert_s'][cpu['format']][0][1] * 1e3:.3f} ms, the hidden state's hop {cpu['hop_s'] * 1e6:.1f} us "
           "each way. " + _beside_sentence(cpu, doc), "", *_idle_section(cpu),
           f"{len(cells)} cells: |error| median {pct(float(np.median(errs)))}, max {pct(max(errs))}; "
           f"{sum(e <= 0.05 for e in errs)} within 5%; executor counts equal to the simulator's in "
           f"{sum(c['executed_equal'] for c in cells)}; residency violations "
           f"{sum((c['violations'] or 0) + c['once_violations'] + c['cpu_violations'] for c in cells)}"
           + (f", executor violations {sum(c['executor_violations'] for c in cells if 'executor_violations' in c)}"
              if any("executor_violations" in c for c in cells) else "") + ".", "", *_batch_terms(doc)]
    out += _wait_policy(doc.get("wait_policy"))
    if doc.get("skipped"):
        out += [f"{len(doc['skipped'])} cells were not run (past the driver's time budget).", ""]
    for b, error in (doc.get("batch_errors") or {}).items():
        out += [f"The batch-{b} cells stopped on an error: `{error.strip().splitlines()[-1]}` (the whole traceback "
                f"is in `{source}`).", ""]
    groups = dict.fromkeys((c["trace"], cell_batch(doc, c)) for c in cells)
    for trace, batch in groups:
        mine = [c for c in cells if c["trace"] == trace and cell_batch(doc, c) == batch]
        rows = [[c["cache_size"], c["execution"], f"{c['real_ms_per_token']:.2f}", f"{c['sim_ms_per_token']:.2f}",
                 pct(c["error"], signed=True), "yes" if c["executed_equal"] else "NO",
                 " ".join(f"{k}={v}" for k, v in c["executed_real"].items() if v)] for c in mine]
        wins = [[k, _winner([c for c in mine if c["cache_size"] == k], "real_ms_per_token"),
                 _winner([c for c in mine if c["cache_size"] == k], "sim_ms_per_token")]
                for k in sorted({c["cache_size"] for c in mine})]
        out += [f"### {trace}" + (f", batch {batch}" if len(batches(doc)) > 1 else ""), "", *table(["K", "execution", "real ms/token", "sim ms/token", "error",
                                            "executed equal", "executed (engine)"], rows), "",
                "Fastest executor at each K (speed-up over copy-only at that K):", "",
                *table(["K", "measured", "simulated"], wins), "", *_cpu_in_run(mine, cpu["hop_s"])]
    return out


def _batch_cells(doc: dict) -> str:
    """What a batch-B cell replays (runs with batch-B cells)."""
    big = [b for b in batches(doc) if b > 1]
    if not big:
        return ""
    return "; " + ", ".join(f"{b} sequences x {doc['batch_steps']} decode steps per batch-{b} cell" for b in big)


def _batch_terms(doc: dict) -> list[str]:
    """How the run priced its batch-B cells: the batch program's own pieces and the CPU expert by tokens."""
    out = []
    for b, cal in (doc.get("batch_calibration") or {}).items():
        curve = ", ".join(f"{int(n)}: {t * 1e3:.3f} ms" for n, t in cal["cpu_expert_s"])
        terms = cal["terms"]
        gpu = (f"the batch program's pieces ({terms['source']})" if terms else
               "the batch-1 terms (the run had no GPU times for the batch program)")
        out += [f"Batch-{b} cells are priced with {gpu}; the CPU expert by tokens routed to it (tokens: time) "
                f"{curve} (the one-token time above, times each count's median over the one-token median of the "
                "same rounds).", ""]
    return out


def _wait_policy(probe: dict | None) -> list[str]:
    """The after-idle curve with OpenMP's default wait policy and with spinning threads (runs that probed it)."""
    if not probe:
        return []
    rows = [[f"{g * 1e3:.2f}", *(f"{probe[name]['after_idle'][i][1] * 1e3:.3f}" for name in ("default", "active"))]
            for i, (g, _) in enumerate(probe["default"]["after_idle"])]
    return ["Would a CPU pool that never sleeps remove the wake-up? One int8 expert in two fresh processes after the "
            f"cells: back to back {probe['default']['back_to_back_ms']:.3f} ms with OpenMP's default wait policy, "
            f"{probe['active']['back_to_back_ms']:.3f} ms with `OMP_WAIT_POLICY=ACTIVE` (threads spin); the extra "
            "after each idle gap (the idle column as measured in the default run):",
            "", *table(["idle ms", "default: extra ms", "active: extra ms"], rows), ""]


def _cpu_in_run(cells: list[dict], hop_s: float) -> list[str]:
    """The CPU experts as the engine timed them in each cell against the simulator's mean (runs that kept it)."""
    timed = [c for c in cells if (c.get("cpu_timing") or {}).get("n") and c["executed_sim"]["cpu"]]
    if not timed:
        return []

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"
    rows = [[c["cache_size"], c["execution"], c["cpu_timing"]["n"], ms(c["cpu_timing"]["expert_ms"]),
             ms(c["cpu_timing"]["first_ms"]), ms(c["cpu_timing"]["later_ms"]),
             ms(c["cpu_timing"]["idle_before_first_ms"]), ms(c["sim_cpu_busy_ms"] / c["executed_sim"]["cpu"]),
             ms(c["cpu_timing"].get("ready_wait_ms")), ms(c["cpu_timing"].get("merge_lag_ms"))]
            for c in timed]
    return ["CPU experts in the engine's run (medians; first: the first expert of a layer's job, after the worker "
            "waited; later: back to back after it) against the simulator's mean CPU expert (its CPU stream's busy "
            "time / CPU experts, contention and wake-up terms included); and the hand-offs: the worker's wait "
            "for the hidden state (from the job's start on the worker) and the main thread's lag from the job's "
            f"last expert to having its result (the simulator prices a hop of {hop_s * 1e3:.3f} ms each way):", "",
            *table(["K", "execution", "CPU experts", "run ms", "first ms", "later ms", "idle before first ms",
                    "sim mean ms", "ready wait ms", "merge lag ms"], rows), ""]


def main(argv: list[str] | None = None) -> None:
    global RAW
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=HERE / "report.md")
    ap.add_argument("--raw", type=Path, default=RAW, help="the raw directory (default: raw/ beside this script)")
    args = ap.parse_args(argv)
    RAW = args.raw
    raw = json.loads((RAW / "cpu_expert_raw.json").read_text())
    cal = json.loads((RAW / "calibration_cpu_host.json").read_text())
    doc = json.loads((RAW / "cells.json").read_text())
    validations = sorted(RAW.glob("validation_*.json"))
    if validations:
        title, note = "", ("The simulated sections come from `studies/hybrid/run.py`; the last section compares the "
                           "real engine's hybrid execution with the simulator on the device.")
    else:
        title, note = " (issue 24, simulator half)", ("Simulated only: the real engine's CPU path and the sim-vs-real "
                                                      "validation are not part of this study.")
    lines = [f"# Hybrid execution: the CPU as a third resource{title}", "",
             "Built by `studies/hybrid/make_report.py` from `studies/hybrid/raw/` (driver: `studies/hybrid/run.py`). "
             + note, "", *cpu_section(raw, cal), *execution_section(doc), *placement_section(doc)]
    if validations:
        lines += error_by_execution([(p.name, json.loads(p.read_text())) for p in validations])
    for path in validations:
        lines += validation_section(json.loads(path.read_text()), f"raw/{path.name}")
    write_text(args.output, "\n".join(lines))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
