"""The fast end-to-end path (read only the replay's columns, one compiled validation pass, the request
stream and the per-layer caches in parallel threads) gives exactly what the plain path gives."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moesim import parallel
from moesim.errors import DataError, UsageError
from moesim.policies.compiled import ScorePolicy
from moesim.simulator import kernels, replay
from moesim.simulator.policy_kernels.registry import KERNELS
from moesim.simulator.replay import build_stream, replay_stream, simulate
from moesim.traces.format import DECODE, PREFILL, TraceMeta, TraceWriter, read_trace
from moesim.traces.synth import load_preset, synthesize


@pytest.fixture(scope="module")
def synth_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("fast") / "s.parquet"
    # several sequences, 32 layers; small row groups so the reader concatenates chunks
    synthesize(load_preset("mixtral-8x7b"), 1500, 3, path, progress=False, chunk_tokens=400)
    return path


@pytest.fixture
def tiny_rows(monkeypatch):
    """Every parallel path on for small traces."""
    monkeypatch.setattr(parallel, "MIN_ROWS", 1)


def test_dictionary_encoded_expert_ids(synth_path):
    md = pq.ParquetFile(synth_path).metadata
    enc = {md.row_group(0).column(j).path_in_schema: md.row_group(0).column(j).encodings
           for j in range(md.num_columns)}
    assert "RLE_DICTIONARY" in enc["experts.list.element"]
    assert "RLE_DICTIONARY" not in enc["weights.list.element"]


def test_lazy_read_equals_full_read(synth_path):
    full = read_trace(synth_path)
    lazy = read_trace(synth_path, lazy=True)
    assert "weights" not in lazy._table.column_names  # not decoded yet
    assert lazy.column_names == full.table.column_names and len(lazy) == len(full)
    for name in ("seq", "token", "phase", "layer", "experts"):
        assert np.array_equal(getattr(lazy, name), getattr(full, name)), name
    assert np.array_equal(lazy.weights, full.weights)  # read on first use
    assert lazy.table.equals(full.table) and lazy.table.schema.equals(full.table.schema, check_metadata=True)
    for policy in ("lru", "gate-weighted", "opt"):
        a = simulate(read_trace(synth_path, lazy=True), policy, 3)
        b = simulate(full, policy, 3)
        assert (a.hits, a.requests) == (b.hits, b.requests)
        assert np.array_equal(a.layer_hits, b.layer_hits), policy


def test_lazy_read_of_part_directory(tmp_path):
    d = tmp_path / "parts"
    d.mkdir()
    meta = TraceMeta(model="m", family="f", num_layers=2, num_experts=4, top_k=2)
    for i in range(3):
        with TraceWriter(d / f"part-{i:05d}.parquet", meta) as w:
            w.write(0, [i, i], DECODE, [0, 1], [[i % 4, (i + 1) % 4], [3, 2]], [[0.75, 0.25], [0.5, 0.5]])
    lazy, full = read_trace(d, lazy=True), read_trace(d)
    assert lazy.table.equals(full.table)
    assert np.array_equal(lazy.weights, full.weights) and lazy.weights[0, 0] == np.float32(0.75)


def _with_null_weights(path, statistics: bool):
    meta = TraceMeta(model="m", family="f", num_layers=1, num_experts=4, top_k=2)
    schema = pa.schema([pa.field("seq", pa.int32()), pa.field("token", pa.int32()), pa.field("phase", pa.int8()),
                        pa.field("layer", pa.int16()), pa.field("experts", pa.list_(pa.int16(), 2)),
                        pa.field("weights", pa.list_(pa.float16(), 2))], metadata={b"moesim": meta.to_json().encode()})
    w = pa.array([[0.5, 0.5], None], type=pa.list_(pa.float16(), 2))
    table = pa.Table.from_arrays([pa.array([0, 0], pa.int32()), pa.array([0, 1], pa.int32()),
                                  pa.array([1, 1], pa.int8()), pa.array([0, 0], pa.int16()),
                                  pa.array([[0, 1], [2, 3]], pa.list_(pa.int16(), 2)), w], schema=schema)
    pq.write_table(table, path, write_statistics=statistics)
    return path


@pytest.mark.parametrize("statistics", [True, False])
@pytest.mark.parametrize("lazy", [False, True])
def test_null_weights_found_without_reading_them(tmp_path, statistics, lazy):
    path = _with_null_weights(tmp_path / "n.parquet", statistics)
    with pytest.raises(DataError, match="column 'weights' has null values") as err:
        read_trace(path, lazy=lazy)
    assert str(path) in str(err.value)


def _rows(path, *, seq=(0, 0), token=(0, 0), phase=(DECODE, DECODE), layer=(0, 1), experts=((0, 1), (2, 3)),
          preds=None):
    meta = TraceMeta(model="m", family="f", num_layers=2, num_experts=4, top_k=2)
    with TraceWriter(path, meta, pred_distances=(1,) if preds is not None else ()) as w:
        w.write(np.asarray(seq), np.asarray(token), np.asarray(phase), np.asarray(layer), np.asarray(experts),
                [[0.5, 0.5]] * len(token), preds=None if preds is None else {1: np.asarray(preds)})
    return path


BAD = {
    "layer": (dict(layer=(0, 2)), "layer 2 out of range [0, 2) at row 1"),
    "phase": (dict(phase=(PREFILL, 3)), "phase 3 is neither 0 (prefill) nor 1 (decode) at row 1"),
    "negative token": (dict(token=(0, -1)), "negative sequence id or token index"),
    "negative seq": (dict(seq=(-4, 0)), "negative sequence id or token index"),
    "expert": (dict(experts=((0, 1), (2, 4))), "expert id 4 out of range [0, 4) in column 'experts' at row 1"),
    "negative expert": (dict(experts=((0, -1), (2, 3))), "expert id -1 out of range [0, 4) in column 'experts' at row 0"),
    "twice": (dict(experts=((0, 1), (3, 3))), "row 1 lists expert 3 twice"),
    "pred": (dict(preds=((-1, -1), (1, -2))), "expert id -2 out of range [0, 4) in column 'pred1_experts' at row 1"),
    "duplicate rows": (dict(token=(1, 0, 1), layer=(0, 0, 0), seq=(0, 0, 0), phase=(1, 1, 1),
                            experts=((0, 1),) * 3), "duplicate (seq, token, layer) rows"),
    # the first check in the order of validate_trace wins when a file has several problems
    "layer before expert": (dict(layer=(0, 5), experts=((0, 9), (2, 3))), "layer 5 out of range"),
    "first bad row wins": (dict(token=(0, 1, 2), layer=(0, 7, 9), seq=(0, 0, 0), phase=(1, 1, 1),
                                experts=((0, 1),) * 3), "layer 7 out of range [0, 2) at row 1"),
}


@pytest.fixture(params=["one pass", "row ranges"])
def ranges(request, monkeypatch):
    """Validation in one range, or in threads of one row each (the first bad row is found across them)."""
    if request.param == "row ranges":
        monkeypatch.setattr(parallel, "MIN_ROWS", 1)
        monkeypatch.setenv("MOESIM_THREADS", "3")


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("lazy", [False, True])
def test_every_row_check_names_the_problem(tmp_path, case, lazy, ranges):
    kw, message = BAD[case]
    path = _rows(tmp_path / "bad.parquet", **kw)
    with pytest.raises(DataError) as err:
        read_trace(path, lazy=lazy)
    assert message in str(err.value) and str(path) in str(err.value)


def test_unordered_rows_are_replayed_in_execution_order(tmp_path, ranges):
    path = _rows(tmp_path / "u.parquet", seq=(1, 0, 0), token=(0, 1, 0), layer=(0, 0, 0), phase=(1, 1, 1),
                 experts=((0, 1), (2, 3), (0, 2)))
    t = read_trace(path, lazy=True)
    assert not t.is_execution_ordered()
    # execution order (0,0) [0,2], (0,1) [2,3], (1,0) [0,1]; K=2 LRU: 2 misses; 2 hits, 3 evicts 0; 2 misses
    r = simulate(t, "lru", 2)
    assert (r.requests, r.hits) == (6, 1)


@pytest.mark.parametrize("scope,semantics", [("layer", "atomic"), ("global", "atomic"), ("layer", "sequential"),
                                             ("global", "sequential")])
@pytest.mark.parametrize("threads", ["1", "3", "7"])
def test_stream_built_in_row_ranges_equals_one_pass(synth_path, monkeypatch, tiny_rows, scope, semantics, threads):
    monkeypatch.setenv("MOESIM_THREADS", threads)
    t = read_trace(synth_path, lazy=True)
    s = build_stream(t, 4, scope, semantics)
    cache, keys, clock, group = kernels.stream_kernel(t.seq, t.token, t.layer, t.experts, t.meta.num_experts,
                                                      scope == "global")
    width = keys.shape[1]
    if semantics == "sequential":
        cache, clock, group, keys = (np.repeat(cache, width), np.repeat(clock, width), np.repeat(group, width),
                                     keys.reshape(-1, 1))
    assert np.array_equal(s.cache, cache) and np.array_equal(s.keys, keys)
    assert np.array_equal(s.clock, clock) and np.array_equal(s.group, group)
    assert clock[-1] == 1499  # 1500 tokens, counted across sequence boundaries


def _aged_access(state, key, now, weight):
    state[key, 0] = state[key, 0] * 0.5 ** ((now - state[key, 1]) / 8.0) + weight
    state[key, 1] = now


def _aged_score(state, key, now):
    return state[key, 0] * 0.5 ** ((now - state[key, 1]) / 8.0)


@pytest.mark.parametrize("budgets", [3, [0, 2, 5, 3] * 8])
def test_parallel_per_layer_replay_equals_serial(synth_path, tiny_rows, budgets):
    from numba import njit

    stream = build_stream(read_trace(synth_path, lazy=True), budgets)
    user = ScorePolicy("aged", njit(_aged_score), njit(_aged_access), n_fields=2)
    for policy in [*KERNELS, user]:  # every built-in (other tests may register Python ones)
        req1, hit1, m1 = replay_stream(stream, policy, threads=1)
        assert m1 == "numba"
        for threads in (2, 5, 64):
            req, hit, _ = replay_stream(stream, policy, threads=threads)
            assert np.array_equal(req, req1) and np.array_equal(hit, hit1), (policy, threads)
    if not isinstance(budgets, int):
        assert (hit1[0::4] == 0).all()  # disabled layers stay disabled


def test_moesim_threads_must_be_a_positive_integer(monkeypatch):
    monkeypatch.setenv("MOESIM_THREADS", "0")
    with pytest.raises(UsageError, match="MOESIM_THREADS"):
        parallel.threads()
    monkeypatch.setenv("MOESIM_THREADS", "2")
    assert parallel.threads() == 2


def test_replayed_trace_is_freed_without_the_cycle_collector(synth_path):
    was = gc.isenabled()
    gc.disable()
    try:
        t = read_trace(synth_path, lazy=True)
        simulate(t, "gate-weighted", 2)  # builds the stream and decodes the weights
        ref = weakref.ref(t)
        del t
        assert ref() is None
    finally:
        if was:
            gc.enable()


def test_columns_are_decoded_once_and_read_only(synth_path):
    t = read_trace(synth_path, lazy=True)
    assert t.experts is t.experts and t.seq is t.seq
    with pytest.raises(ValueError):
        t.experts[0, 0] = 1
    t.table = t.table.slice(0, 10)  # replacing the table drops what was derived from it
    assert len(t.seq) == 10 and build_stream(t, 2).keys.shape == (10, 2)


class _ModuleLRU:
    """A plain-Python policy defined at module level: it pickles, so mrc sends it to processes."""

    def __new__(cls):
        from moesim.policies.eviction import LRU

        return LRU()


def test_mrc_per_size_runs_in_parallel_equal_serial(synth_path):
    from numba import njit

    t = read_trace(synth_path, lazy=True)
    sizes = [2, 3, 6]
    user = ScorePolicy("aged", njit(_aged_score), njit(_aged_access), n_fields=2)
    threaded, serial = replay.mrc(t, user, sizes, workers=2), replay.mrc(t, user, sizes, workers=1)
    assert threaded.method == "per-size runs (compiled, 2 threads)" and serial.method == "per-size runs"
    assert threaded.curve == serial.curve
    small = read_trace(synth_path, lazy=True)
    small.table = small.table.slice(0, 32 * 200)
    procs = replay.mrc(small, _ModuleLRU, sizes, workers=2)
    assert procs.method == "per-size runs (2 processes)"
    assert procs.curve == replay.mrc(small, "lru", sizes).curve  # the compiled one-pass LRU curve
    local = replay.mrc(small, lambda: _ModuleLRU(), sizes, workers=2)  # a lambda does not pickle
    assert local.method == "per-size runs" and local.curve == procs.curve
