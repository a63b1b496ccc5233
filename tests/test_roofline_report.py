"""studies/roofline/make_report.py on a hand-made raw file: every figure of the report is derived from
the raw numbers (hand-computed here), goals are judged from them, bad input is one line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("make_roofline_report", ROOT / "studies" / "roofline" / "make_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _raw() -> dict:
    rows = [{"batch": b, "fused_ms": f, "old_compiled_ms": 0.32, "fp16_dense_ms": 0.126,
             "kernel_variant_ms": {"v1": 2 * f, "v2": f, "v1_max_rel_err": 0.004, "v2_max_rel_err": 0.0051}}
            for b, f in ((1, 0.05), (4, 0.09), (16, 0.2))]
    cand = [{"variant": v, "bn": bn, "bw": 8, "warps": 4, "stages": 3, "ms": ms}
            for v, bn, ms in ((1, 16, 0.04), (1, 32, 0.03), (2, 16, 0.02), (2, 64, 0.025), (2, 128, None))]
    return {
        "device": "NVIDIA H100 80GB HBM3", "date": "2026-12-07T11:00:00Z", "commit": "abc1234", "torch": "2.11",
        "triton": "3.6", "hbm_peak": {"bytes_moved": 4 << 30, "ms": 1.0, "gb_per_s": 3000.0},
        "h2d_curve": [{"bytes": 1 << 20, "ms": 0.1, "gb_per_s": 10.0}, {"bytes": 1 << 29, "ms": 10.0, "gb_per_s": 50.0}],
        "expert": {"hqq2": {"weight_bytes": 60_000_000, "rows": rows}},
        "layer": {"attn_weight_bytes": 20_000_000, "kv_cache_bytes_read": 9_000_000, "gate_bytes": 1_000_000,
                  "context": 4096, "fused_ms": 0.06, "old_compiled_ms": 0.2,
                  "kernel_variant_eager_ms": {"v1": 0.09, "v2": 0.06}},
        "tuning": [{"format": "hqq2", "rows": 14336, "cols": 4096, "batch_bucket": 1, "dual": True,
                    "dtype": "torch.bfloat16", "candidates": cand}],
        "copy": {"bytes": 66_000_000, "median_ms": 1.32},
        "all_resident": {"layers": 32, "tokens": 8, "requests": 8 * 32 * 2, "median_ms_per_token": 3.5},
        "engine": {"trace": "t.parquet"},
        "cells": {"lru_k3": {"tokens": 10, "misses": 100, "ms_per_token": 14.0, "copy_ms_total": 132.0,
                             "copy_bound_ratio": 132.0 / 140.0, "violations": 0, "device_copies": 100}},
        "all_resident_ms_per_token": 3.5,
        "pieces_ms": {"expert_b1": 0.05, "expert_b4": 0.09, "expert_b16": 0.2, "layer_b1": 0.06},
        "copy_bound_ratio": {"lru_k3": 132.0 / 140.0},
    }


def test_report_numbers_come_from_the_raw_file(tmp_path):
    mod = _script()
    raw = tmp_path / "roofline_h100.json"
    raw.write_text(json.dumps(_raw()))
    out = tmp_path / "report.md"
    assert mod.main([str(raw), "-o", str(out)]) == 0
    text = out.read_text()
    assert "NVIDIA H100 80GB HBM3" in text and "abc1234" in text and "2026-12-07" in text
    # expert b1: 60 MB in 0.05 ms = 1200 GB/s = 40% of the 3000 GB/s peak; 0.32 / 0.05 = 6.4x
    assert "| expert hqq2 | 1 | 60000000 | 0.05 | 1200 | 40 | 0.32 | 6.4 | 0.126 |" in text
    # layer: 30 MB in 0.06 ms = 500 GB/s = 16.67%
    assert "| 1 | 30000000 | 0.06 | 500 | 16.67 | 0.2 | 3.333 | - |" in text
    # copy: 66 MB in 1.32 ms = 50 GB/s = 100% of the measured link (50), 79.37% of PCIe 5 x16 (63)
    assert "| one expert (pinned H2D) | 66000000 | 1.32 | 50 | 100 | 79.37 |" in text
    goals = {line.split("|")[1].strip(): line.split("|")[4].strip() for line in text.splitlines()
             if line.startswith("| ") and line.count("|") == 5}
    assert goals["expert_b1 (ms)"] == "yes" and goals["expert_b16 (ms)"] == "no"
    assert goals["layer_b1 (ms)"] == "no" and goals["all-resident ms/token, batch 1"] == "yes"
    assert goals["copy_bound_ratio lru_k3"] == "yes"   # 0.943 >= 1 / 1.1
    # HBM floor: 32 layers x (2 x 60 MB + 30 MB) / 3000 GB/s = 1.6 ms
    assert "is 1.600 ms" in text
    # old kernel alone 0.1 ms vs new alone 0.05 ms at batch 1; the layer 0.09 / 0.06 = 1.5
    assert "| expert hqq2 | 1 | 0.1 | 0.05 | 2 | 4.00e-03 | 5.10e-03 |" in text
    assert "| layer (eager) | 1 | 0.09 | 0.06 | 1.5 | - | - |" in text
    # tuning: best v1 is the 0.03 ms tile, best v2 the 0.02 ms one, which is kept
    assert "| hqq2 14336x4096 w1+w3 | 1 | 0.03 | 0.02 | v2 BN 16 BW 8 w4 s3 | 4 of 5 |" in text


def test_pieces_only_run_gets_the_pieces_sections(tmp_path):
    """A --pieces-only raw file (no engine stage): goals of the pieces, no decode or copy sections; a raw
    file with only part of the engine stage is refused."""
    mod = _script()
    raw = _raw()
    for key in mod.ENGINE_KEYS:
        del raw[key]
    path = tmp_path / "pieces_h100.json"
    path.write_text(json.dumps(raw))
    out = tmp_path / "report.md"
    assert mod.main([str(path), "-o", str(out)]) == 0
    text = out.read_text()
    assert "| expert_b1 (ms) | <= 0.07 | 0.05 | yes |" in text and "| layer_b1 (ms) | <= 0.05 | 0.06 | no |" in text
    assert "## Decode" not in text and "## Copies" not in text and "pieces-only" in text
    raw["copy"] = {"bytes": 1, "median_ms": 1.0}
    path.write_text(json.dumps(raw))
    assert mod.main([str(path), "-o", str(tmp_path / "r2.md")]) == 1
    assert not (tmp_path / "r2.md").exists()


def test_committed_pieces_run_builds():
    """The committed H100 pieces run (before the kernel variants existed) still makes a report."""
    mod = _script()
    r = json.loads((ROOT / "studies" / "roofline" / "raw" / "pieces_h100.json").read_text())
    text = mod.markdown(r, "pieces_h100.json")
    assert "| expert hqq2 | 1 | 66748416 | 0.1078 | 619.3 | 20.47 | 0.3203 | 2.972 | 0.1353 |" in text
    assert "## Fused kernel variants" not in text


def test_incomplete_raw_is_one_line_and_writes_nothing(tmp_path, capsys):
    mod = _script()
    raw = _raw()
    del raw["layer"]
    path = tmp_path / "roofline_x.json"
    path.write_text(json.dumps(raw))
    out = tmp_path / "report.md"
    assert mod.main([str(path), "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err
    assert not out.exists()
    assert mod.main([str(tmp_path / "missing.json"), "-o", str(out)]) == 2


def test_path_choice_per_batch_is_shown_and_the_engine_piece_judged(tmp_path):
    """A run with the expert path choice: the roofline table and the goals use the engine's piece (its
    chosen path), and a path table shows the choice, both candidates' graph and tuner times per batch."""
    mod = _script()
    raw = _raw()
    paths = {1: ("fused", 0.05, 0.05, 0.31, {"fused": 0.06, "dequant": 0.33}, True),
             4: ("fused", 0.09, 0.09, 0.3, {"fused": 0.1, "dequant": 0.31}, True),
             16: ("dequant", 0.12, 0.2, 0.12, {"fused": 0.35, "dequant": 0.3}, True)}
    for row in raw["expert"]["hqq2"]["rows"]:
        chosen, engine, fused, dequant, tuner, fastest = paths[row["batch"]]
        row.update(path=chosen, engine_ms=engine, path_graph_ms={"fused": fused, "dequant": dequant},
                   path_tuner_ms=tuner, path_errors={}, path_is_fastest_graph=fastest)
    raw["expert"]["hqq2"]["rows"][0]["path_tuner_ms"]["dequant"] = None   # a candidate that was out
    path = tmp_path / "roofline_h100.json"
    path.write_text(json.dumps(raw))
    out = tmp_path / "report.md"
    assert mod.main([str(path), "-o", str(out)]) == 0
    text = out.read_text()
    assert "| piece | batch | bytes read | engine ms |" in text
    # batch 16 served by dequant: 60 MB in 0.12 ms = 500 GB/s = 16.67% of peak; old 0.32 / 0.12 = 2.667
    assert "| expert hqq2 | 16 | 60000000 | 0.12 | 500 | 16.67 | 0.32 | 2.667 | 0.126 |" in text
    assert "| expert_b16 (ms) | <= 0.15 | 0.12 | yes |" in text
    assert "## Expert path per batch" in text
    # fused / dequant graph: 0.2 / 0.12 = 1.667 at batch 16; 0.05 / 0.31 = 0.1613 at batch 1
    assert "| expert hqq2 | 16 | dequant | 0.12 | 0.2 | 0.12 | 1.667 | 0.35 | 0.3 | yes |" in text
    assert "| expert hqq2 | 1 | fused | 0.05 | 0.05 | 0.31 | 0.1613 | 0.06 | - | yes |" in text


def test_runs_before_the_path_choice_keep_their_report():
    """Raw files without path rows: the fused column and no path section (their reports are committed)."""
    mod = _script()
    text = mod.markdown(_raw(), "roofline_h100.json")
    assert "| piece | batch | bytes read | fused ms |" in text and "## Expert path per batch" not in text


def test_driver_contract_keys_take_the_engine_piece():
    """run_roofline.contract_keys: pieces_ms are the engine's pieces (its chosen path; fused for runs
    before the choice), copy_bound_ratio per cell; a stage that did not finish leaves its keys out."""
    import pytest

    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("run_roofline", ROOT / "studies" / "roofline" / "run_roofline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = {"expert": {"hqq2": {"rows": [{"batch": 1, "fused_ms": 0.1, "engine_ms": 0.1},
                                        {"batch": 16, "fused_ms": 0.35, "engine_ms": 0.31},
                                        {"batch": 4, "fused_ms": 0.25}]}},
           "layer": {"fused_ms": 0.07}, "cells": {"lru_k3": {"copy_bound_ratio": 0.8}}}
    mod.contract_keys(out)
    assert out["pieces_ms"] == {"expert_b1": 0.1, "expert_b16": 0.31, "expert_b4": 0.25, "layer_b1": 0.07}
    assert out["copy_bound_ratio"] == {"lru_k3": 0.8} and "all_resident_ms_per_token" not in out
