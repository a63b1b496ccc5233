"""studies/recorder_overhead/gpu_record.py runs end to end on CPU with the tiny geometry (the GPU run uses full Mixtral-8x7B)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from moesim.traces.format import read_trace

SCRIPT = Path(__file__).resolve().parents[1] / "studies" / "recorder_overhead" / "gpu_record.py"


def test_gpu_record_script_tiny_on_cpu(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--out", str(out),
                           "--tokens", "4", "--prompts", "2", "--repeats", "1", "--trace-tokens", "3",
                           "--trace-prompts", "2", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "gpu_record.json").read_text())
    expected = {"plain (no hooks)", "recorder, no predictions", "recorder, d=1", "recorder, d=1 + logits",
                "recorder, d=1 per-layer path"}
    assert set(result["variants"]) == expected
    for name, v in result["variants"].items():
        assert v["tokens_per_s"] > 0 and len(v["rates"]) == 1, name
        assert isinstance(v["overhead_pct"], float)
    assert result["variants"]["recorder, d=1"]["predict_path"] == "batched"
    assert result["variants"]["recorder, d=1 per-layer path"]["predict_path"] == "per-layer"
    for key in ("device_name", "torch", "transformers", "params", "date"):
        assert result[key]
    assert "plain (no hooks)" in (out / "gpu_record.txt").read_text()
    assert "round 1/1" in proc.stdout  # timestamped progress lines

    trace = read_trace(out / "trace.parquet")
    assert trace.pred_distances == (1, 2)
    assert "pred1_experts" in trace.table.column_names
    assert (trace.pred_experts(1)[trace.layer >= 1] >= 0).all()
    assert result["trace"]["predict_path"] == "batched" and result["trace"]["tokens"] > 0
    assert not list(out.glob("*.partial")) and not list(out.glob("tmp*"))  # temp files gone
