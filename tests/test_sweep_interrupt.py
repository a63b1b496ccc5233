"""Stopping a process-pool sweep, as a user does: Ctrl-C (SIGINT to the whole process group, as a terminal
sends it) or SIGTERM (to the main process, as ``kill`` sends it). The first signal says how many running
cells it waits for and starts no more; a second Ctrl-C abandons them; the exit status is 128 + the signal;
the table holds every finished cell and the rerun resumes; no process of the sweep outlives it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moesim.sweep.result_store import read_journal, read_results
from tests.helpers import random_trace

STOPPING = re.compile(r"^stopping: (?:finishing (\d+) running cells? \(Ctrl-C again to abandon them\)"
                      r"|no cell was running)$")  # the latter: the signal came between two cells
CELLS = 56  # arc x 2..15 x layer,global x atomic,sequential: a sweep far longer than the tests wait


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("sweep-stop") / "big.parquet"
    # arc runs on the generic (Python) path: a cell takes a second or more, so signals land mid-sweep
    random_trace(p, np.random.default_rng(5), tokens=6000, num_layers=4, num_experts=16, top_k=2)
    return p


def _session_pids(sid: int) -> set[int]:
    """Every live process of session ``sid`` (the sweep, its forkserver and workers; /proc, no psutil)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session ...
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.add(int(entry))
    return pids


def _start(big: Path, out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moesim", "sweep", "--trace", str(big), "--policy", "arc",
                             "--cache-size", "2..15", "--scope", "layer,global", "--semantics", "atomic,sequential", "--workers", "2", "-o", str(out),
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    journal = Path(f"{out}.journal")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # wait for workers busy on cells
        if journal.is_dir() and sum(len(read_journal(f)) for f in journal.glob("*.jsonl")) >= 1:
            return proc
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the sweep finished (or stalled) before it could be interrupted")


def _finish(proc: subprocess.Popen, timeout: float) -> list[str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the sweep did not exit within {timeout} s of the signal")
    return err.strip().splitlines()


def _assert_no_survivors(sid: int) -> None:
    deadline = time.monotonic() + 10
    while _session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _session_pids(sid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes outlived the sweep: {left}"


def _assert_resumable(big: Path, out: Path) -> int:
    rows = read_results(out).num_rows
    assert 1 <= rows < CELLS
    dry = subprocess.run([sys.executable, "-m", "moesim", "sweep", "--trace", str(big), "--policy", "arc",
                          "--cache-size", "2..15", "--scope", "layer,global", "--semantics", "atomic,sequential", "-o", str(out), "--dry-run", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout) == {"cells": CELLS, "finished": rows, "pending": CELLS - rows}
    return rows


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_first_signal_finishes_running_cells_and_starts_no_more(big, tmp_path, signum):
    out = tmp_path / "r.parquet"
    proc = _start(big, out)
    journal = Path(f"{out}.journal")
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)  # a terminal's Ctrl-C reaches every process of the group
    else:
        os.kill(proc.pid, signum)
    at_signal = sum(len(read_journal(f)) for f in journal.glob("*.jsonl"))
    err = _finish(proc, timeout=60)
    assert proc.returncode == 128 + signum, err
    stopping = [m for line in err if (m := STOPPING.match(line))]
    assert len(stopping) == 1, err
    running = int(stopping[0].group(1) or 0)
    assert running <= 3  # two workers, and the one cell the pool had already queued for them
    assert err[-1] == "moesim sweep: interrupted" and "Traceback" not in "\n".join(err)
    _assert_no_survivors(proc.pid)
    rows = _assert_resumable(big, out)
    # the cells in flight when the signal came (at most 2 x 2 workers, some already done but not yet
    # journaled) finished; none started after it
    assert at_signal <= rows <= at_signal + 4


def test_second_ctrl_c_abandons_running_cells(big, tmp_path):
    out = tmp_path / "r.parquet"
    proc = _start(big, out)
    os.killpg(proc.pid, signal.SIGINT)
    first = proc.stderr.readline().strip()
    assert STOPPING.match(first), (first, proc.wait(), proc.stderr.read())
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    err = _finish(proc, timeout=30)
    assert proc.returncode == 130 and err[-1] == "moesim sweep: interrupted", err
    assert time.monotonic() - t0 < 15
    assert "Traceback" not in "\n".join(err)
    _assert_no_survivors(proc.pid)
    _assert_resumable(big, out)


def test_workers_exit_when_the_sweep_is_killed(big, tmp_path):
    """SIGKILL cannot be caught: the workers notice their sweep is gone and exit (no orphan computes on)."""
    out = tmp_path / "r.parquet"
    proc = _start(big, out)
    assert len(_session_pids(proc.pid)) >= 3  # the sweep, the forkserver, the workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)  # not communicate(): the orphans, if any, still hold the stderr pipe open
    proc.stderr.close()
    deadline = time.monotonic() + 20  # a worker finishes the cell it is in, then sees the sweep gone
    while _session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    _assert_no_survivors(proc.pid)
