"""studies/roofline/report.md from the committed raw JSON of run_roofline.py (CPU only; no number here
is typed by hand: every figure comes from the raw file).

    python studies/roofline/make_report.py [studies/roofline/raw/roofline_h100.json] [-o studies/roofline/report.md]

Without a raw path: the full run ``raw/roofline_h100.json`` if committed, else the first
``raw/roofline_*.json``, else the first ``raw/pieces_*.json`` (a ``--pieces-only`` run: the pieces'
sections only, no decode or copy cells).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from studies._common import md_table  # noqa: E402

PCIE5_X16_GB_S = 63.0   # PCIe 5.0 x16, one direction, after 128b/130b encoding (the link's nominal rate)
GOALS = {"expert_b1": 0.07, "expert_b16": 0.15, "layer_b1": 0.05, "all_resident_ms_per_token": 4.0,
         "copy_bound_ratio": 1 / 1.1}


ENGINE_KEYS = ("copy", "all_resident", "engine", "cells", "all_resident_ms_per_token", "copy_bound_ratio")


def _md(headers: list[str], rows: list[list[Any]]) -> str:
    """A markdown table with floats at 4 significant digits."""
    return "\n".join(md_table(headers, [[f"{v:.4g}" if isinstance(v, float) else v for v in r] for r in rows]))


def piece_ms(row: dict) -> float:
    """An expert row's piece as the engine runs it: its chosen path (runs before the path choice: fused)."""
    return row.get("engine_ms", row["fused_ms"])


def has_paths(r: dict) -> bool:
    return any("path" in row for e in r["expert"].values() for row in e["rows"])


def roofline_rows(r: dict) -> list[list[Any]]:
    """Per piece: bytes it must read, fused time, achieved GB/s, % of the measured HBM peak, the old
    engine's time and the fp16 dense FFN's, same call."""
    peak = r["hbm_peak"]["gb_per_s"]
    rows = []
    for name, e in r["expert"].items():
        for row in e["rows"]:
            b = e["weight_bytes"]
            ms = piece_ms(row)
            gbs = b / ms / 1e6
            old = row["old_compiled_ms"]
            rows.append([f"expert {name}", row["batch"], b, ms, gbs, 100 * gbs / peak,
                         old if old is not None else "-", old / ms if old is not None else "-",
                         row["fp16_dense_ms"]])
    lay = r["layer"]
    b = lay["attn_weight_bytes"] + lay["kv_cache_bytes_read"] + lay["gate_bytes"]
    gbs = b / lay["fused_ms"] / 1e6
    rows.append(["layer (4-bit q/k/v/o, SDPA, gate)", 1, b, lay["fused_ms"], gbs, 100 * gbs / peak,
                 lay["old_compiled_ms"], lay["old_compiled_ms"] / lay["fused_ms"], "-"])
    return rows


def copy_rows(r: dict) -> tuple[list[list[Any]], float]:
    link = max(c["gb_per_s"] for c in r["h2d_curve"])
    c = r["copy"]
    gbs = c["bytes"] / c["median_ms"] / 1e6
    return [["one expert (pinned H2D)", c["bytes"], c["median_ms"], gbs, 100 * gbs / link,
             100 * gbs / PCIE5_X16_GB_S]], link


def goal_rows(r: dict) -> list[list[Any]]:
    p = {f"expert_b{row['batch']}": piece_ms(row) for row in r["expert"]["hqq2"]["rows"]}
    p["layer_b1"] = r["layer"]["fused_ms"]
    rows = [[f"{k} (ms)", f"<= {GOALS[k]}", p[k], "yes" if p[k] <= GOALS[k] else "no"]
            for k in ("expert_b1", "expert_b16", "layer_b1")]
    if "all_resident_ms_per_token" not in r:   # a pieces-only run
        return rows
    a = r["all_resident_ms_per_token"]
    rows.append(["all-resident ms/token, batch 1", f"<= {GOALS['all_resident_ms_per_token']}", a,
                 "yes" if a <= GOALS["all_resident_ms_per_token"] else "no"])
    for cell, ratio in r["copy_bound_ratio"].items():
        rows.append([f"copy_bound_ratio {cell}", ">= 0.909 (ms/token <= 1.1 x copies)", ratio,
                     "yes" if ratio >= GOALS["copy_bound_ratio"] else "no"])
    return rows


def variant_rows(r: dict) -> list[list[Any]]:
    """Per expert format and batch (and the layer): the piece with only the old kernel (variant 1) and
    only the new one (variant 2), each at its fastest tuned tile, same run."""
    rows = []
    for name, e in r["expert"].items():
        for row in e["rows"]:
            v = row.get("kernel_variant_ms")
            if v:
                rows.append([f"expert {name}", row["batch"], *_variant_cells(v)])
    v = r["layer"].get("kernel_variant_eager_ms")
    if v:
        rows.append(["layer (eager)", 1, *_variant_cells(v)])
    return rows


def _variant_cells(v: dict) -> list[Any]:
    """v1 ms, v2 ms, v1 / v2 (a variant with no working tile: "failed"), each variant's max relative error
    against the reference path (recorded since the variant runs; "-" before)."""
    a, b = v.get("v1"), v.get("v2")
    return [a if a is not None else "failed", b if b is not None else "failed",
            a / b if a is not None and b is not None else "-",
            *(f"{v[k]:.2e}" if v.get(k) is not None else "-" for k in ("v1_max_rel_err", "v2_max_rel_err"))]


def path_rows(r: dict) -> list[list[Any]]:
    """Per expert format and batch: the path the engine chose, each candidate's graph time (forced, same
    run) and its time at the decision (``do_bench``), and whether the choice is the faster graph."""
    rows = []
    for name, e in r["expert"].items():
        for row in e["rows"]:
            if "path" not in row:
                continue
            graph, tuner = row["path_graph_ms"], row["path_tuner_ms"]
            f, d = graph.get("fused"), graph.get("dequant")
            rows.append([f"expert {name}", row["batch"], row["path"], row["engine_ms"],
                         *(v if v is not None else "-" for v in (f, d)), f / d if f and d else "-",
                         *(tuner.get(p) if tuner.get(p) is not None else "-" for p in ("fused", "dequant")),
                         {True: "yes", False: "no", None: "-"}[row["path_is_fastest_graph"]]])
    return rows


def tuning_rows(r: dict) -> list[list[Any]]:
    """Per tuned kernel shape: the fastest tile of each variant and the tile the autotuner kept."""
    rows = []
    for t in r.get("tuning", []):
        best = {}
        ran = [c for c in t["candidates"] if c["ms"] is not None]
        for c in ran:
            if c["variant"] not in best or c["ms"] < best[c["variant"]]["ms"]:
                best[c["variant"]] = c
        shape = f"{t['format']} {t['rows']}x{t['cols']}{' w1+w3' if t['dual'] else ''}"
        tile = "v{variant} BN {bn} BW {bw} w{warps} s{stages}"
        kept = tile.format(**min(ran, key=lambda c: c["ms"])) if ran else "none ran"
        rows.append([shape, t["batch_bucket"], *(best[v]["ms"] if v in best else "-" for v in (1, 2)), kept,
                     f"{len(ran)} of {len(t['candidates'])}"])
    return rows


def pieces_sections(r: dict) -> list[str]:
    peak = r["hbm_peak"]["gb_per_s"]
    lay = r["layer"]
    out = [
        "## Goals", _md(["goal", "target", "measured", "met"], goal_rows(r)),
        f"## Roofline of the pieces\n\nHBM peak measured in the same run: a {r['hbm_peak']['bytes_moved'] >> 30} "
        f"GiB device-to-device copy moved {peak:.0f} GB/s (bytes read + written). `old` is the previous "
        "engine's piece (torch.compile'd dequantise-then-matmul, the layer likewise); `fp16 dense` is cuBLAS "
        "on an unquantised FFN of the same shape.",
        _md(["piece", "batch", "bytes read", "engine ms" if has_paths(r) else "fused ms", "GB/s", "% of HBM peak",
             "old ms", "speed-up", "fp16 dense ms"], roofline_rows(r)),
        f"Layer bytes: {lay['attn_weight_bytes']} B of 4-bit weights, {lay['kv_cache_bytes_read']} B of KV cache "
        + (f"(the fused decode attention reads the {lay['positions_read']} positions written of the "
           f"{lay['context']}-position cache)" if "positions_read" in lay else
           f"(SDPA reads the static {lay['context']}-position cache under a mask)") + " and the gate."]
    if has_paths(r):
        out += ["## Expert path per batch\n\nThe engine times the fused kernels and dequantise-then-cuBLAS "
                "(the dequantisation torch.compile'd) once per format, shape and batch at warm-up (`tuner` "
                "columns: `do_bench` ms, cold L2) and serves the faster of those that agree with the reference "
                "(`moesim/engine/kernels/expert_path.py`); `graph` columns: each path forced and replayed as a "
                "CUDA graph in the same run. `engine ms` is the piece as the engine runs it (the roofline table "
                "above uses it).",
                _md(["piece", "batch", "chosen", "engine ms", "fused graph ms", "dequant graph ms", "fused / dequant",
                     "fused tuner ms", "dequant tuner ms", "chosen is the faster graph"], path_rows(r))]
    variants = variant_rows(r)
    if variants:
        out += ["## Fused kernel variants\n\nThe same pieces with only one variant of the fused kernel "
                "(`moesim/engine/kernels/lowbit.py`: v1 walks the code positions of a word tile one by one, v2 "
                "dequantises a whole K-major tile at once), each at its fastest tile; ms per piece.",
                _md(["piece", "batch", "v1 ms", "v2 ms", "v1 / v2", "v1 max rel. error", "v2 max rel. error"],
                    variants)]
    if r.get("tuning"):
        out += ["Every tuned kernel shape (batch bucket 1: GEMV; 16/32: tensor-core tiles): the fastest tile "
                "of each variant (kernel ms, `triton.testing.do_bench`) and the one kept.",
                _md(["matrix", "batch bucket", "best v1 ms", "best v2 ms", "kept", "candidates that ran"], tuning_rows(r))]
    return out


def engine_sections(r: dict) -> list[str]:
    peak = r["hbm_peak"]["gb_per_s"]
    copies, link = copy_rows(r)
    a = r["all_resident"]
    e2 = r["expert"]["hqq2"]["weight_bytes"]
    lay = r["layer"]
    layer_b = lay["attn_weight_bytes"] + lay["kv_cache_bytes_read"] + lay["gate_bytes"]
    L, k = a["layers"], a["requests"] // max(a["tokens"] * a["layers"], 1)
    floor_ms = L * (k * e2 + layer_b) / peak / 1e6
    cells = [[c, v["tokens"], v["misses"], v["ms_per_token"], v["copy_ms_total"] / v["tokens"], v["copy_bound_ratio"],
              v["violations"], v["device_copies"]] for c, v in r["cells"].items()]
    return [
        f"## Copies\n\nLargest pinned host-to-device copy of the curve: {link:.1f} GB/s (the link as measured); "
        f"nominal PCIe 5.0 x16: {PCIE5_X16_GB_S} GB/s.",
        _md(["copy", "bytes", "median ms", "GB/s", "% of measured link", "% of nominal PCIe"], copies),
        f"## Decode\n\nAll experts resident, batch 1, {a['layers']} layers, {a['tokens']} tokens of "
        f"`{r['engine']['trace']}`: **{a['median_ms_per_token']:.3f} ms/token** (median); its HBM floor "
        f"({k} experts + one layer per layer at the measured peak) is {floor_ms:.3f} ms.",
        "With copies (LRU, no prefetch, batch 1; cold start). `copy ms/token` = misses x the median expert "
        "copy above / tokens; copy_bound_ratio = that / measured ms per token (1.0: the token is its copies).",
        _md(["cell", "tokens", "misses", "ms/token", "copy ms/token", "copy_bound_ratio", "violations",
             "device copies"], cells),
    ]


def markdown(r: dict, raw_name: str) -> str:
    present = [k for k in ENGINE_KEYS if k in r]
    if present and len(present) < len(ENGINE_KEYS):
        raise KeyError(f"engine stage incomplete: has {present}, misses "
                       f"{[k for k in ENGINE_KEYS if k not in r]}")
    full = bool(present)
    scope = "" if full else (" A pieces-only run (`--pieces-only`): no all-resident decode and no copy cells.")
    return "\n\n".join([
        "# The offloaded engine at its roofline (issue 23)",
        f"GPU: **{r['device']}**, measured {r['date']} at commit `{r['commit']}` (torch {r['torch']}, triton "
        f"{r['triton']}); raw data: `raw/{raw_name}`, built by `make_report.py`. Every time is GPU time of a "
        "CUDA-graph replay (the engine replays its pieces as graphs); old and new pieces were measured in the "
        f"same run.{scope}",
        *pieces_sections(r),
        *(engine_sections(r) if full else []),
    ]) + "\n"


def default_raw() -> Path | None:
    """The most complete committed raw file (deterministic: never by modification time)."""
    raw = HERE / "raw"
    full = raw / "roofline_h100.json"
    if full.is_file():
        return full
    found = sorted(raw.glob("roofline_*.json")) or sorted(raw.glob("pieces_*.json"))
    return found[0] if found else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw", nargs="?", type=Path, help="raw JSON (default: see above)")
    ap.add_argument("-o", "--out", type=Path, default=HERE / "report.md")
    args = ap.parse_args(argv)
    raw = args.raw or default_raw()
    if raw is None or not raw.is_file():
        print(f"error: {raw or HERE / 'raw'}: no roofline raw JSON", file=sys.stderr)
        return 2
    try:
        r = json.loads(raw.read_text())
        text = markdown(r, raw.name)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        print(f"error: {raw}: not a complete roofline run ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
