"""`moesim report`: one self-contained HTML file whose tables hold the replay's numbers."""

from __future__ import annotations

import base64
import re

import pytest

from moesim.analysis.report import build_report
from moesim.cli import main
from moesim.simulator.replay import simulate
from moesim.traces.format import read_trace

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_report_cli_writes_self_contained_html(real_trace_path, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(real_trace_path), "-o", str(out), "--sizes", "2,4,6", "--no-timing"]) == 0
    assert f"wrote {out / 'report.html'}" in capsys.readouterr().out
    text = (out / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "src='http" not in text and 'src="http' not in text  # nothing external
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    assert len(images) >= 6
    assert all(base64.b64decode(i).startswith(PNG_MAGIC) for i in images)
    for heading in ("Metadata", "Statistics", "Hit rate by policy and cache size", "Residency raster",
                    "Segment-cache bound", "Prefill vs decode"):
        assert heading in text
    assert "Mixtral-8x7B-Instruct-v0.1" in text and "10779" in text
    # the policy x slots table carries the exact replay numbers, in percent
    row = re.search(r"<tr><td class=l>lfu</td>(.*?)</tr>", text).group(1)
    cells = [float(c) for c in re.findall(r"<td>([0-9.]+)%</td>", row)]
    expect = [simulate(read_trace(real_trace_path),
                       "lfu", k).hit_rate for k in (2, 4, 6)]
    assert cells == [round(100 * x, 1) for x in expect]


def test_report_includes_tokens_per_s_with_a_timing_runner(real_trace):
    def runner(trace, policy, k, hardware, prefetch=None, **kw):
        return {"tokens_per_s": 100.0 + k}

    text = build_report(real_trace, policies=["lru"], sizes=[2, 3], timing=runner)
    assert "Simulated decode throughput on a6000 (tokens/s)" in text
    assert "<tr><td class=l>lru</td><td>102.0000</td><td>103.0000</td></tr>" in text


def test_report_errors(real_trace_path, tmp_path, capsys):
    assert main(["report", str(real_trace_path), "-o", str(tmp_path / "a" / "b")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(real_trace_path), "-o", str(tmp_path / "r"), "--policies", "zzz"]) == 2
    assert main(["report", str(real_trace_path), "-o", str(tmp_path / "r"), "--sizes", "9"]) == 2
    assert main(["report", str(tmp_path / "none.parquet"), "-o", str(tmp_path / "r")]) == 1
    assert not (tmp_path / "r").exists()


def test_report_uses_the_timing_simulator_when_present(real_trace):
    pytest.importorskip("moesim.simulator.timing")
    from moesim.analysis.plots import timing_runner

    text = build_report(real_trace, policies=["lru"], sizes=[2, 4])
    run = timing_runner()
    expect = [run(real_trace, "lru", k, "a6000")["tokens_per_s"] for k in (2, 4)]
    assert f"<tr><td class=l>lru</td><td>{expect[0]:.4f}</td><td>{expect[1]:.4f}</td></tr>" in text
    assert "alt='speed'" in text
