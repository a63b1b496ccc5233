"""``moesim sweep`` / ``sweep-summary`` / ``sweep-plot`` from the command line: numbers equal to
``moesim simulate --json``, resume after SIGKILL, one-line errors with exit 1 (bad data) / 2 (usage)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from moesim.cli import main
from moesim.sweep.executors import InProcessExecutor
from moesim.sweep.result_store import read_journal, read_results
from moesim.sweep.spec import SweepSpec, expand
from moesim.sweep.sweep import run_sweep
from tests.helpers import random_trace


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("sweep-cli") / "t.parquet"
    random_trace(p, np.random.default_rng(3), tokens=80, num_layers=4, num_experts=8, top_k=2)
    return p


def _moesim(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moesim", *args], capture_output=True, text=True, timeout=120)


def test_cli_sweep_matches_simulate_json(trace, tmp_path, capsys):
    out = tmp_path / "r.parquet"
    rc = main(["sweep", "--trace", str(trace), "--policy", "lru,lfu,opt", "--cache-size", "2..4",
               "-o", str(out), "--executor", "inprocess", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cells"] == 9 and report["ran"] == 9
    rows = pl.from_arrow(read_results(out)).to_dicts()
    for r in rows:  # every cell through the `simulate` command, as a user would run it
        assert main(["simulate", str(trace), "--policy", r["policy"], "--cache-size", str(r["cache_size"]), "--json"]) == 0
        want = json.loads(capsys.readouterr().out)
        assert (r["requests"], r["hits"], r["misses"], r["hit_rate"]) == \
            (want["requests"], want["hits"], want["misses"], want["hit_rate"])


def test_cli_param_axes_and_config_overlay(trace, tmp_path, capsys):
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'traces = ["{trace}"]\npolicies = ["lru"]\ncache_sizes = [2, 3]\n')
    out = tmp_path / "r.parquet"
    rc = main(["sweep", "--config", str(cfg), "--policy", "lru,lfu-decay", "--param", "lfu-decay.half_life=10,100",
               "-o", str(out), "--executor", "inprocess", "--dry-run"])
    assert rc == 0
    assert capsys.readouterr().out.strip() == "6 cells: 0 finished, 6 to run"
    assert main(["sweep", "--config", str(cfg), "-o", str(out), "--executor", "inprocess"]) == 0
    capsys.readouterr()
    assert main(["sweep", "--config", str(cfg), "--cache-size", "2..4", "-o", str(out), "--dry-run"]) == 0
    assert capsys.readouterr().out.strip() == "3 cells: 2 finished, 1 to run"


def test_summary_and_plot(trace, tmp_path, capsys):
    out = tmp_path / "r.parquet"
    assert main(["sweep", "--trace", str(trace), "--policy", "lru,opt,fifo", "--cache-size", "2,3,4", "-o", str(out),
                 "--executor", "inprocess"]) == 0
    capsys.readouterr()
    assert main(["sweep-summary", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["metric"] == "hit_rate" and summary["baseline"] == "lru"
    assert [b["cache_size"] for b in summary["best"]] == [2, 3, 4]
    # Belady is optimal, so it is (one of) the best at every size
    table = pl.from_arrow(read_results(out))
    for b in summary["best"]:
        opt = table.filter((pl.col("policy") == "opt") & (pl.col("cache_size") == b["cache_size"]))["hit_rate"][0]
        assert b["hit_rate"] == opt
    for v in summary["versus_baseline"]:
        assert v["ratio"] == pytest.approx(v["hit_rate"] / v["hit_rate_lru"])
    assert main(["sweep-summary", str(out)]) == 0
    assert "best policy by hit_rate" in capsys.readouterr().out
    fig = tmp_path / "f.png"
    assert main(["sweep-plot", str(out), "-o", str(fig)]) == 0
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _main_status(argv: list[str], capsys) -> tuple[int, str]:
    """Run the CLI in-process (no interpreter start-up per case); argparse errors exit via SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, code, needle", [
    (["--policy", "nope", "--cache-size", "2"], 2, "unknown policy"),
    (["--policy", "lru", "--cache-size", "1"], 2, "smaller than top-k"),
    (["--policy", "lru", "--cache-size", "two"], 2, "not a list of integers"),
    (["--policy", "lru", "--cache-size", "2", "--param", "lru"], 2, "POLICY.KEY="),
    (["--policy", "lru", "--cache-size", "2", "--prefetch", "transition"], 2, "timing model"),
    (["--policy", "lru", "--cache-size", "2", "--hardware", "tpu9"], 2, "unknown hardware preset"),
    (["--policy", "lru"], 2, "no cache sizes given"),
    (["--policy", "lru", "--cache-size", "2", "--address", "auto"], 2, "--address is for --executor ray"),
])
def test_usage_errors_are_one_line(trace, tmp_path, capsys, args, code, needle):
    got, err = _main_status(["sweep", "--trace", str(trace), "-o", str(tmp_path / "r.parquet"), *args], capsys)
    assert got == code, err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.parquet").exists()


def test_data_errors_are_one_line(trace, tmp_path, capsys):
    code, err = _main_status(["sweep", "--trace", str(tmp_path / "missing.parquet"), "--policy", "lru",
                              "--cache-size", "2", "-o", str(tmp_path / "r.parquet")], capsys)
    assert code == 1 and "missing.parquet: no such file" in err
    code, err = _main_status(["sweep", "--trace", str(trace), "--policy", "lru", "--cache-size", "2",
                              "-o", str(tmp_path / "nodir" / "r.parquet")], capsys)
    assert code == 1 and "does not exist" in err and len(err.strip().splitlines()) == 1
    code, err = _main_status(["sweep-summary", str(trace)], capsys)
    assert code == 1 and "not a moesim sweep results table" in err
    cfg = tmp_path / "bad.toml"
    cfg.write_text("traces = [")
    code, err = _main_status(["sweep", "--config", str(cfg), "-o", str(tmp_path / "r.parquet")], capsys)
    assert code == 1 and "bad.toml" in err and "not a valid TOML" in err
    # -o pointing at something that is not a sweep table: refused, and left untouched
    before = trace.read_bytes()
    code, err = _main_status(["sweep", "--trace", str(trace), "--policy", "lru", "--cache-size", "2", "-o", str(trace),
                              "--executor", "inprocess"], capsys)
    assert code == 1 and "not a moesim sweep results table" in err and trace.read_bytes() == before
    # and once through a real process: one line, no traceback
    r = _moesim("sweep", "--trace", str(trace), "--policy", "nope", "--cache-size", "2", "-o", str(tmp_path / "r.parquet"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_resume_after_sigkill(tmp_path):
    """Kill a running sweep with SIGKILL; the rerun runs exactly the cells that had not finished."""
    big = tmp_path / "big.parquet"
    random_trace(big, np.random.default_rng(5), tokens=400, num_layers=4, num_experts=8, top_k=2)
    # arc runs on the generic (Python) path: slow enough per cell to be caught mid-sweep
    spec = SweepSpec(traces=[str(big)], policies=["arc", "lru"], cache_sizes=list(range(2, 9)),
                     scopes=["layer", "global"])
    out = tmp_path / "r.parquet"
    proc = subprocess.Popen([sys.executable, "-m", "moesim", "sweep", "--trace", str(big), "--policy", "arc,lru",
                             "--cache-size", "2..8", "--scope", "layer,global", "-o", str(out),
                             "--executor", "inprocess", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = tmp_path / "r.parquet.journal"
    deadline = time.monotonic() + 60
    finished: list[str] = []
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            files = list(journal.glob("*.jsonl")) if journal.is_dir() else []
            finished = [r["cell_id"] for f in files for r in read_journal(f)]
            if len(finished) >= 3:
                break
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
    finished = [r["cell_id"] for f in journal.glob("*.jsonl") for r in read_journal(f)]
    assert len(finished) >= 3
    assert not out.exists() or read_results(out).num_rows <= len(finished)  # never corrupt

    from tests.test_sweep_core import CountingExecutor

    total = {c.key for c in expand(spec)}
    assert len(total) == 28
    again = CountingExecutor()
    report = run_sweep(spec, out, again, progress=False)  # the stale lock of the killed run is taken over
    assert report.skipped == len(finished) and report.ran == len(total) - len(finished)
    assert not set(again.ran) & set(finished)
    table = pl.from_arrow(read_results(out))
    assert set(table["cell_id"]) == total and table.height == len(total)
    assert not journal.exists()
    # rows finished before the kill keep the killed run's id: they were not recomputed
    kept = table.filter(pl.col("cell_id").is_in(finished))["run_id"].unique().to_list()
    assert len(kept) == 1 and kept[0] != table.filter(pl.col("cell_id").is_in(again.ran))["run_id"][0]


def test_run_sweep_with_process_pool_from_cli(trace, tmp_path, capsys):
    out = tmp_path / "r.parquet"
    assert main(["sweep", "--trace", str(trace), "--policy", "lru,lfu", "--cache-size", "2..5", "-o", str(out),
                 "--workers", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["executor"] == "process" and report["workers"] == 2 and report["ran"] == 8
    ref = tmp_path / "ref.parquet"
    spec = SweepSpec(traces=[str(trace)], policies=["lru", "lfu"], cache_sizes=[2, 3, 4, 5])
    run_sweep(spec, ref, InProcessExecutor(), progress=False)
    cols = ["cell_id", "requests", "hits", "hit_rate"]
    assert pl.from_arrow(read_results(out)).select(cols).sort("cell_id").equals(
        pl.from_arrow(read_results(ref)).select(cols).sort("cell_id"))


def test_sweep_columns_are_simulate_json_keys(trace, tmp_path, capsys):
    """A timed cell's row carries every key `simulate --json` prints, with the same values: `hit_rate` the
    exact replay's, `timing_hit_rate` the timing run's (they differ once a prefetcher fills the cache)."""
    out = tmp_path / "r.parquet"
    assert main(["sweep", "--trace", str(trace), "--policy", "lru", "--cache-size", "3", "--hardware", "a6000",
                 "--prefetch", "transition", "--prefetch-budget", "2", "-o", str(out), "--executor", "inprocess",
                 "--no-progress"]) == 0
    capsys.readouterr()
    (row,) = pl.from_arrow(read_results(out)).to_dicts()
    assert main(["simulate", str(trace), "--policy", "lru", "--cache-size", "3", "--hardware", "a6000",
                 "--prefetch", "transition", "--prefetch-budget", "2", "--json"]) == 0
    want = json.loads(capsys.readouterr().out)
    assert set(want) <= set(row)
    for key, value in want.items():
        assert row[key] == value, key
    assert row["hit_rate"] != row["timing_hit_rate"]


def test_timed_sweep_refuses_scopes_the_timing_model_ignores(trace, tmp_path, capsys):
    rc = main(["sweep", "--trace", str(trace), "--policy", "lru", "--cache-size", "3", "--hardware", "a6000",
               "--scope", "layer,global", "-o", str(tmp_path / "r.parquet"), "--executor", "inprocess"])
    assert rc == 2 and "one cache per layer" in capsys.readouterr().err
    assert not (tmp_path / "r.parquet").exists()


@pytest.mark.parametrize("metric,label", [(None, "hit rate, exact replay (%)"),
                                          ("timing_hit_rate", "hit rate in the timing run, prefetches included (%)")])
def test_sweep_plot_says_which_hit_rate_it_plots(trace, tmp_path, capsys, monkeypatch, metric, label):
    import matplotlib.figure

    out = tmp_path / "r.parquet"
    hardware = "none" if metric is None else "a6000"
    assert main(["sweep", "--trace", str(trace), "--policy", "lru,opt", "--cache-size", "2,3", "--hardware", hardware,
                 "-o", str(out), "--executor", "inprocess", "--no-progress"]) == 0
    saved = []
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (saved.append(fig), real_savefig(fig, *a, **k))[1])
    capsys.readouterr()
    argv = ["sweep-plot", str(out), "-o", str(tmp_path / "f.png")] + (["--metric", metric] if metric else [])
    assert main(argv) == 0
    assert label in capsys.readouterr().out
    (fig,) = saved
    assert {ax.get_ylabel() for ax in fig.axes if ax.get_visible()} - {""} == {label}
