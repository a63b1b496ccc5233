"""`moesim plot KIND` from the command line: files, exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import json

import pytest

from moesim.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kind, extra", [("heatmap", []), ("raster", ["--layer", "2", "--policy", "lfu", "--tokens", "60"]),
                                         ("mrc", ["--policies", "lru,fifo,opt"]), ("reuse", []),
                                         ("segment", ["--segments", "8,32"]), ("affinity", ["--layer", "4"])])
def test_plot_kinds_write_png(real_trace_path, tmp_path, capsys, kind, extra):
    out = tmp_path / f"{kind}.png"
    assert main(["plot", kind, str(real_trace_path), "-o", str(out), *extra]) == 0
    raw = out.read_bytes()
    assert raw.startswith(PNG_MAGIC) and len(raw) > 5_000
    assert f"wrote {out}" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp file left behind


def test_plot_svg(real_trace_path, tmp_path):
    out = tmp_path / "h.svg"
    assert main(["plot", "heatmap", str(real_trace_path), "-o", str(out), "--svg"]) == 0
    assert "<svg" in out.read_text()[:2000]


def test_plot_timeline_cli(tmp_path):
    tl = tmp_path / "tl.json"
    tl.write_text(json.dumps([{"name": "c", "ph": "X", "ts": 0, "dur": 5, "tid": 1}]))
    out = tmp_path / "t.png"
    assert main(["plot", "timeline", str(tl), "-o", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("argv, code, message", [
    (["plot"], 2, "plot needs a KIND"),
    (["plot", "raster", "{trace}", "--layer", "99"], 2, "--layer 99 out of range"),
    (["plot", "affinity", "{trace}", "--layer", "-1"], 2, "--layer -1 out of range"),
    (["plot", "raster", "{trace}", "--cache-size", "1"], 2, "--cache-size 1 outside"),
    (["plot", "mrc", "{trace}", "--policies", "lru,nope"], 2, "unknown policy 'nope'"),
    (["plot", "heatmap", "{missing}"], 1, "no such file"),
    (["plot", "heatmap", "{trace}", "-o", "{nodir}"], 1, "does not exist"),
    (["plot", "timeline", "{trace}"], 1, "not a timeline table"),
    (["plot", "segment", "{trace}", "--segments", "0"], 2, "positive segment lengths"),
    (["plot", "speed", "{trace}", "--policies", "bogus"], 2, "unknown policy 'bogus'"),
    (["plot", "speed", "{trace}", "--hardware", "abacus"], 2, "abacus"),
])
def test_plot_errors_are_one_line(real_trace_path, tmp_path, capsys, argv, code, message):
    subs = {"{trace}": str(real_trace_path), "{missing}": str(tmp_path / "missing.parquet"),
            "{nodir}": str(tmp_path / "no" / "x.png")}
    before = set(tmp_path.iterdir())
    assert main([subs.get(a, a) for a in argv]) == code
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert set(tmp_path.iterdir()) == before
