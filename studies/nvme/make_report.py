"""Report maker of the NVMe-tier study: raw/disk_cal_*.json and raw/validate_*.json -> nvme.md (CPU only).

    python studies/nvme/make_report.py [-o studies/nvme/nvme.md]

Every machine with both a calibration (``disk_cal_<machine>.json``) and a validation run
(``validate_<machine>.json``) gets its section; a calibration alone gets its curve.
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
RAW = HERE / "raw"
TOLERANCE = 0.10


def curve_section(cal: dict) -> list[str]:
    d = cal["disk"]
    rows = [[mode.replace("_", " "), p["block_bytes"] // 1024, p["queue_depth"], f"{p['latency_s'] * 1e3:.3f}",
             f"{p['bytes_per_s'] / 1e9:.2f}", " / ".join(f"{t * 1e3:.2f}" for _, t in p.get("mean_s", p["median_s"]))]
            for mode in ("direct", "page_cache") for p in d[mode]]
    sizes = ", ".join(f"{n // 1024} KiB" for n in d["read_sizes"])
    return [f"Calibration `{cal['name']}` ({d['machine']}, {d['date']}): a {d['file_bytes'] // 2**20} MiB scratch file, "
            f"{d['repeats']} reads of each size ({sizes}) at random offsets per point; the page cache bypassed by "
            f"`{d['direct_method']}`. Fitted line: read time = latency + bytes / bandwidth (least squares on the mean "
            "read times).", "",
            *md_table(["mode", "block (KiB)", "queue depth", "latency (ms)", "bandwidth (GB/s)",
                       "mean read (ms) per size"], rows), ""]


def validation_section(val: dict) -> tuple[list[str], float, bool]:
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


def render() -> str:
    lines = ["# NVMe tier: the simulated disk against a real reader", "",
             "The timing simulator's third tier (docs/timing.md, \"Host RAM and disk\") prices each read of an expert "
             "that is not in host RAM with the read curve `moesim calibrate --disk` measures. Here that price is "
             "checked against a stand-alone reader (`moesim/engine/disk_reader.py`) that replays the same GPU misses "
             "through a real host-RAM pool of page-aligned buffers and reads each missing expert from a file. The "
             "simulator's side is `disk_busy_ms` of `simulate --json`; the reader's is the sum of its timed reads. "
             "The calibration comes from the micro-benchmark alone, run just before the cells, never from them. "
             "Driver: `studies/nvme/run_nvme.py`.", ""]
    for cal_path in sorted(RAW.glob("disk_cal_*.json")):
        machine = cal_path.stem.removeprefix("disk_cal_")
        lines += [f"## {machine.replace('_', ' ')}", ""]
        lines += curve_section(json.loads(cal_path.read_text()))
        val_path = RAW / f"validate_{machine}.json"
        if val_path.exists():
            lines += validation_section(json.loads(val_path.read_text()))[0]
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
