"""Report maker of the NVMe-tier study: raw/disk_cal_*.json and raw/validate_*.json -> nvme.md (CPU only).

    python studies/nvme/make_report.py [-o studies/nvme/nvme.md]

Every machine with both a calibration (``disk_cal_<machine>.json``) and a validation run
(``validate_<machine>.json``) gets its section; a calibration alone gets its curve.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from moesim.simulator.disk_tier import DiskCurve  # noqa: E402
from studies._common import md_table, pct, write_text  # noqa: E402

HERE = Path(__file__).parent
RAW = HERE / "raw"
TOLERANCE = 0.10
SAMPLING = {"resident": "a resident expert, drawn at random, read again into its own buffer",
            "pool": "a buffer of host RAM drawn at random, resident or free, read again with the expert it holds"}


def curve_section(cal: dict, pooled: bool) -> list[str]:
    """The calibration's read curve; ``pooled``: measured the current way (whole regions at region-aligned
    offsets into a pool of host buffers, each filled once first), else the first way (random 4 KiB-aligned
    offsets into one buffer)."""
    d = cal["disk"]
    rows = [[mode.replace("_", " "), p["block_bytes"] // 1024, p["queue_depth"], f"{p['latency_s'] * 1e3:.3f}",
             f"{p['bytes_per_s'] / 1e9:.2f}", " / ".join(f"{t * 1e3:.2f}" for _, t in p.get("mean_s", p["median_s"]))]
            for mode in ("direct", "page_cache") for p in d[mode]]
    sizes = ", ".join(f"{n // 1024} KiB" for n in d["read_sizes"])
    how = (f"each a whole region at a region-aligned offset (as an expert file is read), into a "
           f"{d.get('pool_bytes', 256 << 20) // 2**20} MiB pool of host buffers in turn, each buffer filled once "
           "before the timed reads" if pooled else "at random 4 KiB-aligned offsets, into one buffer")
    if "rounds" in d:
        how += f", the points taking turns in {d['rounds']} rounds"
    return [f"Calibration `{cal['name']}` ({d['machine']}, {d['date']}): a {d['file_bytes'] // 2**20} MiB scratch file, "
            f"{d['repeats']} reads of each size ({sizes}) per point, {how}; the page cache bypassed by "
            f"`{d['direct_method']}`. Fitted line: read time = latency + bytes / bandwidth (least squares on the mean "
            "read times).", "",
            *md_table(["mode", "block (KiB)", "queue depth", "latency (ms)", "bandwidth (GB/s)",
                       "mean read (ms) per size"], rows), ""]


def validation_section(val: dict) -> tuple[list[str], float, bool]:
    """The first validation runs (one micro-benchmark per round, on its own scratch file)."""
    cells = val["cells"]
    one = [c["sim_disk_ms"] / c["real_disk_ms"] - 1 for c in cells]
    per_round = [c["round_error_median"] for c in cells]
    rows = [[c["trace"], c["mode"].replace("_", " "), c["host_ram_experts"], c["sim_disk_reads"], c["real_disk_reads"],
             f"{c['real_disk_ms']:.1f}", " / ".join(f"{x:.0f}" for x in c["real_disk_ms_runs"]),
             f"{c['sim_disk_ms']:.1f}", pct(e, 1, signed=True),
             " / ".join(f"{x:.0f}" for x in c["round_sim_disk_ms"]), pct(r, 1, signed=True)]
            for c, e, r in zip(cells, one, per_round, strict=True)]
    worst = max(abs(e) for e in per_round)
    reads_equal = all(c["sim_disk_reads"] == c["real_disk_reads"] for c in cells)
    within = sum(abs(e) <= TOLERANCE for e in per_round)
    c0 = cells[0]
    speeds = [p["bytes_per_s"] / 1e9 for r in val["round_calibrations"] for p in r["direct"]]
    lines = [f"Validation run ({val['machine']}, {val['date']}): the first {val['tokens']} decode tokens of each trace, "
             f"{val['policy']} on the GPU ({c0['gpu_cache_size']} slots per layer) and in host RAM, experts scaled down to "
             f"{val['expert_bytes'] // 1024} KiB (one file of every layer's experts), read in "
             f"{c0['block_bytes'] // 1024} KiB blocks at queue depth {c0['queue_depth']}. The reader ran every cell "
             f"{val['repeats']} times, round robin; before each round the micro-benchmark ran again on its own scratch "
             f"file (its fitted bandwidth ranged {min(speeds):.2f} to {max(speeds):.2f} GB/s over the rounds: the box is "
             "shared) and priced that round's cells. \"one calibration\" prices every run with the calibration above; "
             "\"per round\" is the median over rounds of each round's simulated over real time.", "",
             *md_table(["trace", "mode", "host RAM (experts)", "disk reads (sim)", "disk reads (real)",
                        "real disk, median run (ms)", "real runs (ms)", "sim, one calibration (ms)", "error",
                        "sim per round (ms)", "error, per round (median)"], rows), "",
             f"Disk reads: {'equal in every cell' if reads_equal else 'DIFFERENT in some cells'}. Disk time, per-round "
             f"calibration: {within} of {len(cells)} cells within {pct(TOLERANCE, 0)}, the worst {pct(worst, 1)} off; "
             f"with the one calibration the worst is {pct(max(abs(e) for e in one), 1)} off.", ""]
    return lines, worst, reads_equal


def probe_lines(probe: dict) -> list[str]:
    """The host-buffer probe: why the samples read into the reader's own buffers, filled once first."""
    return [f"Host buffers, measured first on the same file (O_DIRECT, whole experts at random slots): the first read "
            f"into each of {probe['buffers']} fresh buffers took {probe['first_read_ms_mean']:.2f} ms on average, later "
            f"reads into the same buffers {probe['later_read_ms_mean']:.2f} ms; over {probe['passes']} passes a buffer's "
            f"mean read in the first half against the second correlates {probe['per_buffer_corr']:+.2f} (per-buffer "
            f"means {probe['per_buffer_ms_min']:.2f} to {probe['per_buffer_ms_max']:.2f} ms); 128 reads into one "
            f"buffer took {probe['one_buffer_ms_mean']:.2f} ms each against {probe['in_turn_ms_mean']:.2f} ms into 16 "
            "buffers in turn. Where a buffer keeps its speed, a read's time depends on the memory it lands in, so the "
            "samples read into the reader's own buffers, and every buffer is filled once before the timed reads.", ""]


def sampled_section(val: dict, cal: dict) -> list[str]:
    """A validation whose every run is priced by micro-benchmark reads sampled during it."""
    cells = val["cells"]
    curve = DiskCurve.from_dict(cal)
    rows, errors = [], []
    for c in cells:
        runs = c["runs"]
        real = [r["read_ms_mean"] for r in runs]
        sampled = [r["sample_read_ms_mean"] for r in runs]
        spread = (max(real) - min(real)) / statistics.median(real)
        segs = [x for r in runs for x in r["sample_ms_segments"]]
        one = curve.read_seconds(val["expert_bytes"], (c["mode"], c["block_bytes"], c["queue_depth"])) * 1e3
        errors.append(c["error_median"])
        rows.append([c["trace"], c["mode"].replace("_", " "), c["host_ram_experts"],
                     f"{c['sim_disk_reads']} / {c['real_disk_reads']}" + ("" if c["reads_equal_every_run"] else " (!)"),
                     " / ".join(f"{x:.2f}" for x in real), " / ".join(f"{x:.2f}" for x in sampled),
                     f"{min(segs):.2f} to {max(segs):.2f}", pct(spread, 0),
                     " / ".join(pct(e, 1, signed=True) for e in c["run_errors"]), pct(c["error_median"], 1, signed=True),
                     pct(one / statistics.median(real) - 1, 1, signed=True)])
    within, worst = sum(abs(e) <= TOLERANCE for e in errors), max(abs(e) for e in errors)
    c0 = cells[0]
    direct = [r for c in cells if c["mode"] == "direct" for r in c["runs"]]
    tail = statistics.median(r["sample_read_ms_mean"] / r["sample_read_ms_p50"] for r in direct) if direct else None
    spreads = [float(x.rstrip("%")) for x in (row[7] for row in rows)]
    return [f"Validation run ({val['machine']}, {val['date']}): the first {val['tokens']} decode tokens of each trace, "
            f"{val['policy']} on the GPU ({c0['gpu_cache_size']} slots per layer) and in host RAM, experts scaled down "
            f"to {val['expert_bytes'] // 1024} KiB (one file of every layer's experts, every MiB different), read in "
            f"{c0['block_bytes'] // 1024} KiB blocks at queue depth {c0['queue_depth']}. Every cell ran "
            f"{val['repeats']} times, round robin. After every {val['sample_every']} of the reader's reads, one "
            f"micro-benchmark read ({SAMPLING[val.get('sampling', 'resident')]}, through the same reader routine) "
            "sampled the disk as it was then; each run is priced by the simulator with its "
            "samples' mean read alone, never with its own reads. The mean, not the median: the simulator adds reads "
            "up, and the slow tail is time the reader pays too"
            + (f" (in direct runs the samples' mean is {tail:.2f}x their median)" if tail else "") + ". "
            "\"one calibration\" prices the median run with the calibration above instead, measured once before the "
            "cells. The simulator's disk stream keeps one read at a time, as the reader does (its queue depth is the "
            "block requests within one read), so their sums compare directly.", "",
            *probe_lines(val["buffer_probe"]),
            *md_table(["trace", "mode", "host RAM (experts)", "disk reads (sim / real)", "real ms/read, per run",
                       "sampled ms/read, per run", "sampled ms/read over the runs (8 spans each)",
                       "real runs' spread", "error per run", "error (median run)", "error, one calibration"], rows), "",
            f"Disk reads: {'equal in every run of every cell' if all(c['reads_equal_every_run'] for c in cells) else 'DIFFERENT in some runs'}. "
            f"Disk time, priced by the samples: {within} of {len(cells)} cells within {pct(TOLERANCE, 0)} (median run), "
            f"the worst {pct(worst, 1)} off. Repeated identical runs of one cell differ by "
            f"{min(spreads):.0f}% to {max(spreads):.0f}% of their median (max minus min): a calibration taken at another "
            "moment can be that far off on this machine (the \"one calibration\" column).", "", *earlier_lines(val)]


def earlier_lines(val: dict) -> list[str]:
    """The earlier runs of this machine's validation with another sampling, summed up (raw/earlier/)."""
    lines = []
    for path in sorted((RAW / "earlier").glob(f"validate_{val['machine_key']}_*.json")) if "machine_key" in val else []:
        old = json.loads(path.read_text())
        errs = [c["error_median"] for c in old["cells"]]
        worst = max(old["cells"], key=lambda c: abs(c["error_median"]))
        lines += [f"An earlier run ({old['date']}, `studies/nvme/raw/earlier/{path.name}`) sampled "
                  f"{SAMPLING[old.get('sampling', 'resident')]}: {sum(abs(e) <= TOLERANCE for e in errs)} of "
                  f"{len(errs)} cells within {pct(TOLERANCE, 0)}, the worst {pct(abs(worst['error_median']), 1)} off "
                  f"({worst['trace']}, {worst['mode'].replace('_', ' ')}, {worst['host_ram_experts']} experts in host "
                  f"RAM, {sum(e < 0 for e in worst['run_errors'])} of {len(worst['run_errors'])} runs slower than "
                  "their samples). There the samples landed in buffers the reader had just "
                  "filled, while its own reads, with host RAM still filling, landed in buffers untouched since the "
                  "pool was set up; sampling every buffer of host RAM alike was the change.", ""]
    return lines


def render() -> str:
    lines = ["# NVMe tier: the simulated disk against a real reader", "",
             "The timing simulator's third tier (docs/timing.md, \"Host RAM and disk\") prices each read of an expert "
             "that is not in host RAM with the read curve `moesim calibrate --disk` measures. Here that price is "
             "checked against a stand-alone reader (`moesim/engine/disk_reader.py`) that replays the same GPU misses "
             "through a real host-RAM pool of page-aligned buffers and reads each missing expert from a file. The "
             "simulator's side is `disk_busy_ms` of `simulate --json`; the reader's is the sum of its timed reads. "
             "The price of a read comes from micro-benchmark reads alone, never from the cells' own reads: the "
             "calibration, and (in the later runs) reads sampled during each run. Driver: "
             "`studies/nvme/run_nvme.py`.", ""]
    for cal_path in sorted(RAW.glob("disk_cal_*.json")):
        machine = cal_path.stem.removeprefix("disk_cal_")
        lines += [f"## {machine.replace('_', ' ')}", ""]
        cal = json.loads(cal_path.read_text())
        val_path = RAW / f"validate_{machine}.json"
        val = json.loads(val_path.read_text()) if val_path.exists() else None
        sampled = val is not None and val.get("format") == 2
        lines += curve_section(cal, "pool_bytes" in cal["disk"] or sampled)
        if sampled:
            lines += sampled_section(val | {"machine_key": machine}, cal)
        elif val is not None:
            lines += validation_section(val)[0]
        else:
            lines += ["No validation run on this machine yet.", ""]
        lines += [f"Raw data: `studies/nvme/raw/{cal_path.name}`"
                  + (f", `studies/nvme/raw/{val_path.name}`." if val_path.exists() else "."), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=HERE / "nvme.md")
    args = ap.parse_args(argv)
    write_text(args.output, render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
