"""Streaming and crash safety of ``moesim record``: SIGKILL keeps every flushed part; Ctrl-C closes cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from moesim.recorder import ByteTokenizer, PartsTraceWriter, build_preset, merge_parts, record
from moesim.traces.format import TraceMeta, read_trace

LONG_RUN = ["--model", "tiny-mixtral", "--num-prompts", "50", "--max-new-tokens", "400", "--flush-tokens", "4"]


def _start(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moesim", "record", *LONG_RUN, "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_parts(proc: subprocess.Popen, parts: Path, at_least: int, timeout: float = 60.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(parts.glob("part-*.parquet")) if parts.is_dir() else []
        if len(found) >= at_least:
            return found
        if proc.poll() is not None:
            pytest.fail(f"recorder exited early: {proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("recorder wrote no parts in time")


def test_sigkill_leaves_a_readable_trace_with_every_flushed_part(tmp_path):
    out = tmp_path / "killed.parquet"
    parts = tmp_path / "killed.parquet.parts"
    proc = _start(out)
    _wait_for_parts(proc, parts, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # never a half-written file under the final name
    flushed = sorted(parts.glob("part-*.parquet"))
    expected_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in flushed)
    trace = read_trace(parts)
    assert len(trace) == expected_rows > 0
    assert trace.is_execution_ordered()
    # and the documented recovery merges them into the final file
    rc = subprocess.run([sys.executable, "-m", "moesim", "record", "--recover", str(out)],
                        capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    assert not parts.exists()
    merged = read_trace(out)
    assert merged.table.equals(trace.table)


def test_sigint_finishes_and_closes_the_file_cleanly(tmp_path):
    out = tmp_path / "interrupted.parquet"
    parts = tmp_path / "interrupted.parquet.parts"
    proc = _start(out)
    before = _wait_for_parts(proc, parts, 2)
    rows_before = sum(pq.ParquetFile(p).metadata.num_rows for p in before)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted" in stderr
    assert out.exists() and not parts.exists()
    trace = read_trace(out)
    assert len(trace) >= rows_before
    # the last token is complete: every recorded token has all its layers
    L = trace.meta.num_layers
    _, counts = np.unique(trace.seq.astype(np.int64) << 32 | trace.token, return_counts=True)
    assert (counts == L).all()


def test_parts_writer_merges_in_order_and_removes_the_directory(tmp_path):
    meta = TraceMeta(model="m", family="f", num_layers=2, num_experts=4, top_k=2)
    out = tmp_path / "t.parquet"
    w = PartsTraceWriter(out, meta, pred_distances=(1,))
    for tok in range(5):
        w.write(0, np.array([tok, tok]), 1, np.array([0, 1]), np.array([[0, 1], [2, 3]]),
                np.full((2, 2), 0.5), preds={1: np.array([[-1, -1], [3, 2]])})
        w.flush()
    assert len(list(w.parts_dir.glob("part-*.parquet"))) == 5
    w.close()
    assert not w.parts_dir.exists()
    t = read_trace(out)
    assert np.array_equal(t.token, np.repeat(np.arange(5), 2))
    assert np.array_equal(t.pred_experts(1)[1], [3, 2]) and (t.pred_experts(1)[0] == -1).all()


def test_existing_parts_directory_is_refused(tmp_path):
    out = tmp_path / "t.parquet"
    (tmp_path / "t.parquet.parts").mkdir()
    meta = TraceMeta(model="m", family="f", num_layers=2, num_experts=4, top_k=2)
    from moesim.errors import DataError

    with pytest.raises(DataError, match="unfinished recording"):
        PartsTraceWriter(out, meta)


def test_error_during_recording_leaves_no_output(tmp_path):
    model = build_preset("tiny-mixtral")
    calls = []

    def fail_on_third_step(module, args, out):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device fell over")

    handle = model.model.layers[1].mlp.gate.register_forward_hook(fail_on_third_step)
    out = tmp_path / "x.parquet"
    with pytest.raises(RuntimeError, match="device fell over"):
        record(model, ["a", "b"], out, tokenizer=ByteTokenizer(), max_new_tokens=4, flush_tokens=1)
    handle.remove()
    assert not out.exists() and not (tmp_path / "x.parquet.parts").exists()
    assert not model.model._forward_hooks and not model.model.layers[0].mlp.gate._forward_hooks


def test_merge_of_empty_directory_is_a_data_error(tmp_path):
    from moesim.errors import DataError

    (tmp_path / "p").mkdir()
    with pytest.raises(DataError):
        merge_parts(tmp_path / "p", tmp_path / "o.parquet")
    assert not os.path.exists(tmp_path / "o.parquet")
