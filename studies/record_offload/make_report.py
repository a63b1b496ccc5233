"""studies/record_offload/report.md from the driver's runs (raw/*.json, each a ``record_offload.json``).

    python studies/record_offload/make_report.py [-o studies/record_offload/report.md]

Every number in the report comes from the raw files; the prose states only what the tables show.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from studies._common import md_table, write_text  # noqa: E402

HERE = Path(__file__).resolve().parent
GB = 1e9


def _gb(x: float | None) -> str:
    """Bytes as GB, or MB below 0.1 GB (the CPU check's tiny model)."""
    if x is None:
        return "n/a"
    return f"{x / GB:.2f} GB" if x >= 0.1 * GB else f"{x / 1e6:.2f} MB"


def _ms(run: dict) -> str:
    return f"{run['seconds_per_generated_token'] * 1e3:.1f}"


def runs() -> list[tuple[str, dict]]:
    return [(p.name, json.loads(p.read_text())) for p in sorted((HERE / "raw").glob("*.json"))]


def _setting_rows(data: list[tuple[str, dict]]) -> list[list[str]]:
    rows = []
    for name, r in data:
        g, w = r["geometry"], r["weight_bytes"]
        rows.append([f"`raw/{name}`", r["device"], f"{g['num_hidden_layers']} x hidden {g['hidden_size']}, FFN "
                     f"{g['intermediate_size']}, {g['num_local_experts']} experts top-{g['num_experts_per_tok']}",
                     _gb(w["total"]), _gb(w["experts"]), _gb(r["cap_bytes"]),
                     r.get("resident_under_cap", "not tried (no GPU)"), r.get("auto_choice", "n/a (CPU: --max-gpu-gb)"),
                     r["offloaded"]["mode"]])
    return rows


def _result_rows(data: list[tuple[str, dict]]) -> list[list[str]]:
    rows = []
    for name, r in data:
        p, o, c = r["plain"], r["offloaded"], r["comparison"]
        differing = sum(v["rows_differing"] or 0 for v in c["columns"].values())
        rows.append([f"`raw/{name}`", f"{p['tokens_generated']}", _ms(p), _ms(o), f"{r['slowdown']:.1f}",
                     _gb(p["peak_gpu_bytes"]), _gb(o["peak_gpu_bytes"]), _gb(o["bytes_host_to_device"]),
                     ", ".join(c["columns"]), "yes" if c["identical"] else f"NO ({differing} rows differ)",
                     "yes" if c["generated_equal"] else "NO"])
    return rows


def build() -> str:
    data = runs()
    lines = ["# `moesim record` on a model bigger than the GPU (issue 27 item 5)", "",
             "Each run is one `gpu_record_offload.py` (`--out DIR`, its `record_offload.json` copied to `raw/`): a "
             "random bf16 Mixtral is recorded twice on the same weights: plain (whole model on the device, no cap), "
             "then with the device memory capped below the model's weight bytes (on a GPU, "
             "`torch.cuda.set_per_process_memory_fraction`; on the CPU check, `--max-gpu-gb`) and `--offload auto`, "
             "which must keep the routed experts in host memory. The two traces are read back with the recorder's "
             "reader and compared column by column.", "", "## Settings", ""]
    lines += md_table(["run", "device", "model", "weights", "routed experts", "cap",
                       "whole model under the cap", "auto's choice under the cap", "mode recorded"],
                      _setting_rows(data))
    lines += ["", "## Results", "",
              "Time per generated token counts the prompt's prefill too (the run's seconds over its generated "
              "tokens); peak GPU is `torch.cuda.max_memory_allocated`; H2D is what the offload copied.", ""]
    lines += md_table(["run", "tokens generated", "plain ms/token", "offloaded ms/token", "offloaded / plain",
                       "peak GPU plain", "peak GPU offloaded", "H2D", "columns compared",
                       "traces identical", "generated tokens equal"], _result_rows(data))
    same = [name for name, r in data if r["comparison"]["identical"] and r["comparison"]["generated_equal"]]
    lines += ["", f"{len(same)} of {len(data)} runs wrote the same trace offloaded as plain."]
    under = [(name, r) for name, r in data if r["offloaded"]["peak_gpu_bytes"] is not None]
    if under:
        lines.append("Peak GPU memory of the offloaded run against its cap: " + "; ".join(
            f"`{name}` {_gb(r['offloaded']['peak_gpu_bytes'])} of {_gb(r['cap_bytes'])}" for name, r in under) + ".")
    if any(r["device"] == "cpu" for _, r in data):
        lines.append("A CPU run checks the steps and the trace equality on a tiny model; its times and memory "
                     "say nothing about a GPU.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", default=str(HERE / "report.md"))
    args = ap.parse_args()
    write_text(Path(args.out), build())


if __name__ == "__main__":
    main()
