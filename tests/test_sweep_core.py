"""Sweeps: grid expansion and cell keys, results equal to single simulate runs (against the independent
generic replay too), the journal/table store, and resume after an injected crash."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from moesim.errors import DataError, UsageError
from moesim.policies.base import make_policy
from moesim.simulator.replay import replay_reference, simulate
from moesim.sweep import runner
from moesim.sweep.executors import InProcessExecutor, ProcessPoolExecutorBackend
from moesim.sweep.result_store import ResultStore, read_journal, read_results
from moesim.sweep.spec import Cell, SweepSpec, expand, load_config, trace_sha256
from moesim.sweep.sweep import run_sweep
from moesim.traces.format import read_trace
from tests.helpers import random_trace


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("sweep-traces")
    rng = np.random.default_rng(7)
    a, b = d / "a.parquet", d / "b.parquet"
    random_trace(a, rng, tokens=60, num_layers=3, num_experts=8, top_k=2, skew=1.0)
    random_trace(b, rng, tokens=40, num_layers=2, num_experts=6, top_k=2, skew=0.5)
    return [a, b]


def _spec(traces, **kw) -> SweepSpec:
    base = dict(traces=[str(t) for t in traces], policies=["lru", "fifo", "lfu", "opt"], cache_sizes=[2, 3, 5])
    base.update(kw)
    return SweepSpec(**base)


class CountingExecutor(InProcessExecutor):
    """In-process, but records which cells it ran; optionally crashes after ``crash_after`` cells."""

    def __init__(self, crash_after: int | None = None) -> None:
        super().__init__()
        self.ran: list[str] = []
        self.crash_after = crash_after

    def run(self, cells, trace_paths):
        for row in super().run(cells, trace_paths):
            if self.crash_after is not None and len(self.ran) == self.crash_after:
                raise RuntimeError("injected crash")
            self.ran.append(row["cell_id"])
            yield row


# ---- spec ----------------------------------------------------------------------------------------

def test_expand_is_the_full_product_without_duplicates(traces):
    spec = _spec(traces, params={"lfu-decay": {"half_life": [10, 100]}}, policies=["lru", "lfu-decay"],
                 cache_sizes=[2, 3, 3])
    cells = expand(spec)
    # 2 traces x (lru + 2 lfu-decay settings) x 2 distinct sizes
    assert len(cells) == 2 * 3 * 2
    assert len({c.key for c in cells}) == len(cells)
    assert {c.params for c in cells if c.policy == "lfu-decay"} == {'{"half_life": 10}', '{"half_life": 100}'}


def test_hit_rate_cells_collapse_prefetch_axes(traces):
    spec = _spec(traces[:1], policies=["lru"], cache_sizes=[2], hardware=["none", "a6000"],
                 prefetch=["none", "transition"], prefetch_budgets=[1, 2])
    cells = expand(spec)
    by_hw = {}
    for c in cells:
        by_hw.setdefault(c.hardware, []).append((c.prefetch, c.prefetch_budget))
    assert by_hw["none"] == [("none", 0)]  # no timing model: prefetch axes are meaningless
    assert sorted(by_hw["a6000"]) == [("none", 0), ("transition", 1), ("transition", 2)]


def test_cell_key_follows_content_not_path(traces, tmp_path):
    moved = tmp_path / "renamed.parquet"
    shutil.copy(traces[0], moved)
    k1 = {(c.policy, c.cache_size): c.key for c in expand(_spec([traces[0]]))}
    k2 = {(c.policy, c.cache_size): c.key for c in expand(_spec([moved]))}
    assert k1 == k2
    other = {(c.policy, c.cache_size): c.key for c in expand(_spec([traces[1]]))}
    assert not set(k1.values()) & set(other.values())
    assert trace_sha256(moved) == trace_sha256(traces[0]) != trace_sha256(traces[1])


def test_cell_key_changes_with_every_input():
    base = Cell("t", "sha", "lru", 4)
    variants = [Cell("t", "sha2", "lru", 4), Cell("t", "sha", "lfu", 4), Cell("t", "sha", "lru", 5),
                Cell("t", "sha", "lru", 4, params='{"x": 1}'), Cell("t", "sha", "lru", 4, scope="global"),
                Cell("t", "sha", "lru", 4, semantics="sequential"), Cell("t", "sha", "lru", 4, hardware="h200"),
                Cell("t", "sha", "lru", 4, prefetch="transition", prefetch_budget=1, hardware="h200"),
                Cell("t", "sha", "lru", 4, batch_size=2)]
    keys = {base.key, *(v.key for v in variants)}
    assert len(keys) == len(variants) + 1
    assert Cell("other/path", "sha", "lru", 4).key == base.key


@pytest.mark.parametrize("bad, message", [
    (dict(policies=["nope"]), "unknown policy"),
    (dict(cache_sizes=[1]), "smaller than top-k"),
    (dict(prefetch=["transition"]), "need a timing model"),
    (dict(hardware=["no-such-gpu"]), "unknown hardware"),
    (dict(params={"lfu-decay": {"half_life": [10]}}), "not in the sweep"),
    (dict(params={"lru": {"bogus": [1]}}), "has no parameter .bogus. .it takes no parameters."),
    (dict(policies=["lrfu"], params={"lrfu": {"lam": ["abc"]}}), "lam=.abc. is not a number"),
    (dict(scopes=["planet"]), "unknown scope"),
])
def test_bad_specs_are_usage_errors(traces, bad, message):
    with pytest.raises(UsageError, match=message):
        expand(_spec(traces[:1], **bad))


def test_missing_trace_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        expand(SweepSpec(traces=[str(tmp_path / "nope.parquet")], policies=["lru"], cache_sizes=[2]))


def test_toml_config(traces, tmp_path):
    cfg = tmp_path / "sweep.toml"
    shutil.copy(traces[0], tmp_path / "t.parquet")
    cfg.write_text('traces = ["t.parquet"]\npolicies = ["lru", "lfu-decay"]\ncache_sizes = "2..4"\n'
                   'hardware = ["none"]\n[params.lfu-decay]\nhalf_life = [10, 100]\n')
    spec = load_config(cfg)
    assert spec.traces == [str(tmp_path / "t.parquet")]
    assert spec.cache_sizes == [2, 3, 4]
    assert spec.params == {"lfu-decay": {"half_life": [10, 100]}}
    assert len(expand(spec)) == 3 * 3
    bad = tmp_path / "bad.toml"
    bad.write_text("policies = [\n")
    with pytest.raises(DataError, match="not a valid TOML"):
        load_config(bad)
    bad.write_text('traces = ["t.parquet"]\npolicies = ["lru"]\n')
    with pytest.raises(DataError, match="missing required key 'cache_sizes'"):
        load_config(bad)
    bad.write_text('traces = ["t.parquet"]\npolicies = ["lru"]\ncache_sizes = [2]\nslots = [3]\n')
    with pytest.raises(DataError, match="unknown key 'slots'"):
        load_config(bad)


# ---- results equal single runs -------------------------------------------------------------------

def _expected(cell: Cell) -> dict:
    trace = read_trace(cell.trace)
    return simulate(trace, cell.policy, cell.cache_size, scope=cell.scope, semantics=cell.semantics,
                    params=cell.policy_params or None).to_dict()


@pytest.mark.parametrize("executor", ["inprocess", "process"])
def test_sweep_equals_single_simulate_runs(traces, tmp_path, executor):
    spec = _spec(traces, scopes=["layer", "global"], policies=["lru", "fifo", "lfu", "opt", "lfu-decay"],
                 params={"lfu-decay": {"half_life": [5, 50]}})
    ex = InProcessExecutor() if executor == "inprocess" else ProcessPoolExecutorBackend(workers=2)
    out = tmp_path / "r.parquet"
    report = run_sweep(spec, out, ex, progress=False)
    cells = expand(spec)
    assert report.ran == len(cells) and report.failed == 0 and report.rows == len(cells)
    table = pl.from_arrow(read_results(out))
    assert table.height == len(cells)
    rows = {r["cell_id"]: r for r in table.to_dicts()}
    for cell in cells:
        want = _expected(cell)
        got = rows[cell.key]
        assert (got["requests"], got["hits"], got["misses"], got["hit_rate"]) == \
            (want["requests"], want["hits"], want["misses"], want["hit_rate"]), cell
        assert got["trace_sha256"] == cell.trace_sha256 and got["status"] == "ok"
    assert not (tmp_path / "r.parquet.journal").exists()


def test_sweep_equals_independent_generic_replay(traces, tmp_path):
    """The oracle: the generic ExpertCache + policy-class replay, not the compiled kernels."""
    spec = _spec(traces)
    out = tmp_path / "r.parquet"
    run_sweep(spec, out, InProcessExecutor(), progress=False)
    rows = pl.from_arrow(read_results(out)).to_dicts()
    assert len(rows) == 2 * 4 * 3
    for r in rows:
        ref = replay_reference(read_trace(r["trace"]), lambda p=r["policy"]: make_policy(p), r["cache_size"])
        assert (r["requests"], r["hits"]) == (ref.requests, ref.hits), r


def test_timing_cells_equal_simulate_timing(traces, tmp_path):
    from moesim.simulator.cost_model import CostModel
    from moesim.simulator.timing import simulate_timing

    spec = _spec(traces[:1], policies=["lru", "lfu"], cache_sizes=[2, 4], hardware=["a6000", "none"],
                 prefetch=["none", "transition"], prefetch_budgets=[1, 2])
    out = tmp_path / "r.parquet"
    run_sweep(spec, out, InProcessExecutor(), progress=False)
    table = pl.from_arrow(read_results(out))
    trace = read_trace(traces[0])
    timed = table.filter(pl.col("hardware") == "a6000").to_dicts()
    assert len(timed) == 2 * 2 * 3
    differs = 0
    for r in timed:
        want = simulate_timing(trace, r["policy"], r["cache_size"], CostModel.preset("a6000"), prefetch=r["prefetch"],
                               prefetch_params=None if r["prefetch"] == "none" else {"budget": r["prefetch_budget"]}).to_dict()
        for key in ("tokens_per_s", "ms_per_token", "bytes_h2d"):
            assert r[key] == want[key], (key, r)
        for key in ("prefetch_precision", "prefetch_recall"):  # not applicable without a prefetcher: null
            assert r[key] == (None if r["prefetch"] == "none" else want[key]), (key, r)
        # hit_rate is the exact replay's, as in `simulate --json`; the timing run's own counts beside it
        exact = simulate(trace, r["policy"], r["cache_size"])
        assert (r["requests"], r["hits"], r["hit_rate"]) == (exact.requests, exact.hits, round(exact.hit_rate, 6))
        assert (r["timing_requests"], r["timing_hits"], r["timing_hit_rate"]) == \
            (want["requests"], want["hits"], want["hit_rate"])
        differs += r["timing_hits"] != r["hits"]
    assert differs  # the transition prefetcher makes the two hit rates differ: the test tells them apart
    plain = table.filter(pl.col("hardware") == "none")
    assert plain.height == 4 and plain["tokens_per_s"].null_count() == 4


def test_trace_loaded_once_per_process(traces, tmp_path):
    runner._TRACES.clear()
    before = runner.LOADS["count"]
    run_sweep(_spec(traces), tmp_path / "r.parquet", InProcessExecutor(), progress=False)
    assert runner.LOADS["count"] - before == 2  # 24 cells, two traces


# ---- store and resume ----------------------------------------------------------------------------

def test_resume_after_injected_crash_redoes_nothing(traces, tmp_path):
    spec = _spec(traces)
    out = tmp_path / "r.parquet"
    first = CountingExecutor(crash_after=7)
    with pytest.raises(RuntimeError, match="injected crash"):
        run_sweep(spec, out, first, progress=False)
    assert len(first.ran) == 7
    journal = [r for f in (tmp_path / "r.parquet.journal").glob("*.jsonl") for r in read_journal(f)]
    assert sorted(r["cell_id"] for r in journal) == sorted(first.ran)

    second = CountingExecutor()
    report = run_sweep(spec, out, second, progress=False)
    total = len(expand(spec))
    assert report.skipped == 7 and report.ran == total - 7
    assert not set(first.ran) & set(second.ran)
    assert sorted(first.ran + second.ran) == sorted(c.key for c in expand(spec))
    # the finished table equals a clean, uninterrupted run
    clean = tmp_path / "clean.parquet"
    run_sweep(spec, clean, InProcessExecutor(), progress=False)
    cols = ["cell_id", "requests", "hits", "hit_rate"]
    a = pl.from_arrow(read_results(out)).select(cols).sort("cell_id")
    b = pl.from_arrow(read_results(clean)).select(cols).sort("cell_id")
    assert a.equals(b)

    third = CountingExecutor()
    again = run_sweep(spec, out, third, progress=False)
    assert third.ran == [] and again.skipped == total and again.rows == total


def test_failed_cells_are_recorded_and_retried(traces, tmp_path, monkeypatch):
    spec = _spec(traces[:1], policies=["lru"], cache_sizes=[2, 3])
    real = runner.compute
    target = next(c for c in expand(spec) if c.cache_size == 3).key

    def flaky(cell, trace):
        if cell.key == target:
            raise ValueError("disk on fire")
        return real(cell, trace)

    monkeypatch.setattr(runner, "compute", flaky)
    out = tmp_path / "r.parquet"
    report = run_sweep(spec, out, InProcessExecutor(), progress=False)
    assert report.failed == 1
    row = pl.from_arrow(read_results(out)).filter(pl.col("cell_id") == target).to_dicts()[0]
    assert row["status"] == "error" and row["error"] == "ValueError: disk on fire" and row["hits"] is None

    with pytest.raises(ValueError, match="disk on fire"):  # debugging: the cell's own exception
        run_sweep(spec, tmp_path / "debug.parquet", InProcessExecutor(raise_errors=True), progress=False)

    monkeypatch.setattr(runner, "compute", real)
    retry = CountingExecutor()
    report = run_sweep(spec, out, retry, progress=False)
    assert retry.ran == [target] and report.failed == 0
    table = pl.from_arrow(read_results(out))
    assert table.height == 2 and set(table["status"]) == {"ok"}


def test_torn_journal_line_is_ignored_and_corrupt_line_is_an_error(tmp_path):
    j = tmp_path / "x.jsonl"
    j.write_bytes(b'{"cell_id": "a", "status": "ok"}\n{"cell_id": "b", "sta')
    assert [r["cell_id"] for r in read_journal(j)] == ["a"]
    j.write_bytes(b'{"cell_id": "a"\n{"cell_id": "b"}\n')
    with pytest.raises(DataError, match="line 1"):
        read_journal(j)


def test_consolidate_prefers_ok_then_latest(tmp_path):
    store = ResultStore(tmp_path / "r.parquet")
    store.append({"cell_id": "a", "status": "error", "hits": None})
    store.append({"cell_id": "b", "status": "ok", "hits": 1})
    store.append({"cell_id": "a", "status": "ok", "hits": 5})
    store.append({"cell_id": "b", "status": "ok", "hits": 2})
    store.append({"cell_id": "a", "status": "error", "hits": None})
    assert store.consolidate(delete_journal=True) == 2
    rows = {r["cell_id"]: r["hits"] for r in pl.from_arrow(read_results(tmp_path / "r.parquet")).to_dicts()}
    assert rows == {"a": 5, "b": 2}
    assert store.journal_files() == []


def test_non_sweep_parquet_is_refused(traces, tmp_path):
    with pytest.raises(DataError, match="not a moesim sweep results table"):
        read_results(traces[0])
    bad = tmp_path / "r.parquet"
    bad.write_bytes(b"PAR1 nope")
    with pytest.raises(DataError, match="not a readable Parquet"):
        read_results(bad)


def test_lock_refuses_a_second_live_writer_and_takes_over_a_stale_one(tmp_path):
    a = ResultStore(tmp_path / "r.parquet")
    a.lock()
    with pytest.raises(UsageError, match="another sweep"):
        ResultStore(tmp_path / "r.parquet").lock()
    a.unlock()
    (tmp_path / "r.parquet.journal" / "lock").write_text("999999999")  # no such pid
    b = ResultStore(tmp_path / "r.parquet")
    b.lock()
    assert (tmp_path / "r.parquet.journal" / "lock").read_text() != "999999999"
    b.cleanup()


def test_max_cells_runs_a_slice(traces, tmp_path):
    spec = _spec(traces)
    out = tmp_path / "r.parquet"
    ex = CountingExecutor()
    r1 = run_sweep(spec, out, ex, progress=False, max_cells=5)
    assert r1.ran == 5 and r1.rows == 5
    r2 = run_sweep(spec, out, CountingExecutor(), progress=False)
    assert r2.skipped == 5 and r2.ran == len(expand(spec)) - 5


def test_row_has_every_input_column(traces, tmp_path):
    out = tmp_path / "r.parquet"
    run_sweep(_spec(traces[:1], policies=["lru"], cache_sizes=[2]), out, InProcessExecutor(), progress=False)
    table = read_results(out)
    for col in ("cell_id", "trace", "trace_sha256", "policy", "params", "cache_size", "scope", "semantics",
                "prefetch", "prefetch_budget", "hardware", "batch_size", "requests", "hits", "misses", "hit_rate",
                "status", "elapsed_s", "run_id"):
        assert col in table.column_names, col
    assert json.loads(table.schema.metadata[b"moesim_sweep"])["sweep_version"] >= 1


def test_real_trace_sweep_equals_simulate_and_reference(real_trace_path, tmp_path):
    """The real Mixtral trace, K = 2..8, lru, fifo, lfu and opt, through a 2-worker pool."""
    spec = SweepSpec(traces=[str(real_trace_path)], policies=["lru", "fifo", "lfu", "opt"], cache_sizes=list(range(2, 9)))
    out = tmp_path / "real.parquet"
    report = run_sweep(spec, out, ProcessPoolExecutorBackend(workers=2), progress=False)
    assert report.ran == 28 and report.failed == 0
    trace = read_trace(real_trace_path)
    for r in pl.from_arrow(read_results(out)).to_dicts():
        fast = simulate(trace, r["policy"], r["cache_size"])
        ref = replay_reference(trace, lambda p=r["policy"]: make_policy(p), r["cache_size"])
        assert r["requests"] == fast.requests == ref.requests == 21558
        assert r["hits"] == fast.hits == ref.hits, r


def test_bad_spec_starts_no_executor(traces, tmp_path):
    started = []
    with pytest.raises(UsageError, match="unknown policy"):
        run_sweep(_spec(traces, policies=["nope"]), tmp_path / "r.parquet", lambda: started.append(1), progress=False)
    assert started == [] and not (tmp_path / "r.parquet.journal").exists()
