"""``simulate --timeline``: says where it wrote and how big; a ``.parquet`` name writes the same events
compactly, and ``plot timeline`` reads either form (the JSON, written by json.dump, is the oracle)."""

from __future__ import annotations

import json
import os

import pytest

from moesim.cli import main
from moesim.simulator.timeline_file import read_timeline
from moesim.traces.describe import human_bytes
from tests.helpers import random_trace


@pytest.fixture()
def trace(tmp_path):
    import numpy as np

    path = tmp_path / "t.parquet"
    random_trace(path, np.random.default_rng(1), tokens=60, num_layers=4, num_experts=8, top_k=2)
    return path


def _simulate(trace, out, capsys) -> str:
    argv = ["simulate", str(trace), "--policy", "lru", "--cache-size", "3", "--hardware", "a6000",
            "--prefetch", "transition", "--timeline", str(out), "--json"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    json.loads(cap.out)  # stdout stays one JSON object
    return cap.err


def test_parquet_timeline_holds_the_json_events_and_both_are_announced(trace, tmp_path, capsys):
    as_json, as_parquet = tmp_path / "tl.json", tmp_path / "tl.parquet"
    err_json = _simulate(trace, as_json, capsys)
    err_parquet = _simulate(trace, as_parquet, capsys)
    assert f"wrote timeline {as_json}: {human_bytes(os.path.getsize(as_json))}" in err_json
    assert ".parquet name writes the same events" in err_json
    assert f"wrote timeline {as_parquet}: {human_bytes(os.path.getsize(as_parquet))}" in err_parquet
    want = json.loads(as_json.read_text())
    got = read_timeline(as_parquet)
    assert len(want["traceEvents"]) > 100
    assert got["traceEvents"] == want["traceEvents"] and got["otherData"] == want["otherData"]
    assert os.path.getsize(as_parquet) < os.path.getsize(as_json) / 3


def test_plot_timeline_reads_the_parquet_form(trace, tmp_path, capsys):
    from moesim.analysis.plots import load_timeline, timeline_title

    as_json, as_parquet = tmp_path / "tl.json", tmp_path / "tl.parquet"
    _simulate(trace, as_json, capsys)
    _simulate(trace, as_parquet, capsys)
    assert load_timeline(as_parquet) == load_timeline(as_json)
    assert timeline_title(as_parquet) == timeline_title(as_json)
    assert "lru, 3 slots per layer, transition prefetch, a6000" in timeline_title(as_parquet)
    assert main(["plot", "timeline", str(as_parquet), "-o", str(tmp_path / "tl.png")]) == 0
    assert (tmp_path / "tl.png").read_bytes()[:4] == b"\x89PNG"


def test_a_parquet_file_that_is_not_a_timeline_is_one_error(trace, tmp_path, capsys):
    assert main(["plot", "timeline", str(trace), "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a timeline table" in err[0] and str(trace) in err[0]
