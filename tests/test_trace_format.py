"""Trace format v1: round trip, streaming row groups, atomic finalize, validation, the real import."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from moesim.errors import DataError
from moesim.traces.format import DECODE, PREFILL, TraceMeta, TraceWriter, read_meta, read_trace
from moesim.traces.vllm import import_vllm_jsonl


def _meta(**kw):
    base = dict(model="m", family="mixtral", num_layers=4, num_experts=8, top_k=2)
    base.update(kw)
    return TraceMeta(**base)


def test_round_trip_with_predictions_and_logits(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    experts = np.array([rng.choice(8, 2, replace=False) for _ in range(n)])
    weights = rng.random((n, 2)).astype(np.float32)
    logits = rng.standard_normal((n, 8)).astype(np.float16)
    pred = experts.copy()
    pred[:4] = -1  # no prediction for layer 0 rows
    path = tmp_path / "t.parquet"
    with TraceWriter(path, _meta(expert_bytes=123, quantization="hqq2"), pred_distances=[1], logits=True,
                     pred_logits=True) as w:
        w.write(0, np.arange(n) // 4, np.where(np.arange(n) < 8, PREFILL, DECODE), np.arange(n) % 4, experts,
                weights, logits=logits, preds={1: pred}, pred_logits={1: logits})
    t = read_trace(path)
    assert len(t) == n and t.meta.expert_bytes == 123 and t.meta.quantization == "hqq2"
    assert (t.experts == experts).all() and np.allclose(t.weights, weights, atol=1e-3)
    assert t.pred_distances == (1,)
    assert (t.pred_experts(1) == pred).all()
    assert np.allclose(t.logits_matrix(), logits.astype(np.float32))
    lm = t.logits_matrix("pred1_logits")
    assert np.isnan(lm[:4]).all() and np.allclose(lm[4:], logits[4:].astype(np.float32))
    assert (t.phase[:8] == PREFILL).all() and t.meta.created
    df = t.to_polars()
    assert df.shape[0] == n and "experts" in df.columns


def test_writer_streams_row_groups(tmp_path):
    path = tmp_path / "t.parquet"
    with TraceWriter(path, _meta(num_layers=1), row_group_size=1000) as w:
        for chunk in range(7):
            w.write(0, np.arange(500) + 500 * chunk, DECODE, 0, np.tile([0, 1], (500, 1)), np.full((500, 2), 0.5))
    assert pq.ParquetFile(path).num_row_groups == 4  # 3 full groups of 1000 + the rest at close
    assert len(read_trace(path)) == 3500


def test_writer_is_atomic(tmp_path):
    path = tmp_path / "t.parquet"
    path.write_bytes(b"keep me")
    with pytest.raises(RuntimeError), TraceWriter(path, _meta()) as w:
        w.write(0, [0], DECODE, [0], [[0, 1]], [[0.5, 0.5]])
        raise RuntimeError("crash mid-write")
    assert path.read_bytes() == b"keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]  # no temp file left behind


def test_bytes_per_row_is_small(tmp_path):
    from moesim.traces.synth import load_preset, synthesize

    path = tmp_path / "s.parquet"
    synthesize(load_preset("mixtral-8x7b"), 20000, 0, path, progress=False)
    rows = 20000 * 32
    assert path.stat().st_size / rows < 5.0  # "a few bytes" per (token, layer) row


def test_reader_accepts_a_directory_of_parts(tmp_path):
    d = tmp_path / "parts"
    d.mkdir()
    for i in range(3):
        with TraceWriter(d / f"part-{i:05d}.parquet", _meta(num_layers=1)) as w:
            w.write(0, [i], DECODE, [0], [[i, i + 1]], [[0.6, 0.4]])
    t = read_trace(d)
    assert len(t) == 3 and list(t.token) == [0, 1, 2]
    assert read_meta(d).num_layers == 1


def test_real_import_preserves_every_row_and_the_gaps(real_jsonl, tmp_path):
    out = tmp_path / "real.parquet"
    import_vllm_jsonl(real_jsonl, out)
    t = read_trace(out)
    expected = {}
    for line in real_jsonl.read_text().splitlines():
        o = json.loads(line)
        expected[(o["problem_id"], o["token_idx"], o["layer"])] = (o["experts"], o["gating_probs"])
    assert len(t) == len(expected) == 10779
    got = {(int(s), int(k), int(lay)): (list(map(int, e)), list(map(float, w)))
           for s, k, lay, e, w in zip(t.seq, t.token, t.layer, t.experts, t.weights, strict=True)}
    assert got.keys() == expected.keys()
    for key, (e, w) in expected.items():
        assert got[key][0] == e
        assert np.allclose(got[key][1], w, atol=5e-4)  # float16 storage
    # the gaps: (token, layer) pairs that the collector dropped are absent, not invented
    tokens = {(s, k) for s, k, _ in expected}
    assert len(tokens) * 32 - len(expected) == 37
    assert t.is_execution_ordered()
    assert t.meta.num_layers == 32 and t.meta.num_experts == 8 and t.meta.top_k == 2
    assert t.meta.provenance["kind"] == "imported"


def test_import_collapses_exact_duplicates_in_any_order(tmp_path):
    rows = [{"problem_id": 0, "token_idx": 1, "layer": 0, "experts": [1, 2], "gating_probs": [0.7, 0.3]},
            {"problem_id": 0, "token_idx": 0, "layer": 0, "experts": [3, 2], "gating_probs": [0.6, 0.4]},
            {"problem_id": 0, "token_idx": 1, "layer": 0, "experts": [1, 2], "gating_probs": [0.7, 0.3]}]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    import_vllm_jsonl(src, tmp_path / "o.parquet")
    t = read_trace(tmp_path / "o.parquet")
    assert list(t.token) == [0, 1] and t.experts.tolist() == [[3, 2], [1, 2]]


def test_validation_errors_name_the_problem(tmp_path):
    path = tmp_path / "t.parquet"
    with TraceWriter(path, _meta(num_experts=4)) as w:
        w.write(0, [0], DECODE, [0], [[0, 1]], [[0.5, 0.5]])
    assert len(read_trace(path)) == 1
    with pytest.raises(DataError, match="duplicate"):
        p2 = tmp_path / "dup.parquet"
        with TraceWriter(p2, _meta()) as w:
            w.write(0, [0, 0], DECODE, [0, 0], [[0, 1], [2, 3]], [[0.5, 0.5]] * 2)
        read_trace(p2)
    p3 = tmp_path / "twice.parquet"
    with TraceWriter(p3, _meta()) as w:
        w.write(0, [0], DECODE, [0], [[1, 1]], [[0.5, 0.5]])
    with pytest.raises(DataError, match="twice"):
        read_trace(p3)


def test_order_and_duplicate_checks_without_64bit_keys(tmp_path):
    # rows out of execution order are fine unless two share (seq, token, layer), adjacent or not
    ok, dup = tmp_path / "ok.parquet", tmp_path / "dup.parquet"
    with TraceWriter(ok, _meta()) as w:
        w.write([1, 0, 0], [0, 1, 0], DECODE, [0, 0, 0], [[0, 1]] * 3, [[0.5, 0.5]] * 3)
    t = read_trace(ok)
    assert not t.is_execution_ordered() and t.execution_order().is_execution_ordered()
    assert list(t.execution_order().token) == [0, 1, 0]
    with TraceWriter(dup, _meta()) as w:
        w.write([0, 1, 0], [2, 0, 2], DECODE, [1, 0, 1], [[0, 1]] * 3, [[0.5, 0.5]] * 3)
    with pytest.raises(DataError, match="duplicate"):
        read_trace(dup)
    three = tmp_path / "three.parquet"
    with TraceWriter(three, _meta(top_k=3)) as w:
        w.write(0, [0, 1], DECODE, [0, 0], [[0, 1, 2], [5, 3, 5]], [[0.3, 0.3, 0.4]] * 2)
    with pytest.raises(DataError, match="row 1 lists expert 5 twice"):
        read_trace(three)
