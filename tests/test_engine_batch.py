"""Batch > 1 decode, chunked prefill and real-context attention in the replay engine (CPU, tiny geometry).

Oracles: each sequence run alone at batch 1; token-by-token decode of a prefill chunk's tokens; the
full masked cache; a brute-force union replay written in tests/oracle.py for the hit counts."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest

from moesim.engine import batch as batch_mod
from moesim.engine.batch import BatchEngine, BatchProgram, Lanes, context_bucket
from moesim.engine.plan import Routing
from moesim.engine.quant import quant_spec
from moesim.engine.runtime import Geometry, Weights
from moesim.simulator.cost_model import CostModel
from moesim.simulator.timing import simulate_timing
from moesim.traces.format import DECODE, PREFILL, Trace, TraceMeta, TraceWriter, read_trace
from moesim.traces.steps import build_steps

LAYERS, E, K_TOP = 3, 8, 2


def make_trace(path, seqs: int, tokens: int, phase: int, seed: int = 0, start: int = 0):
    """``seqs`` sequences of ``tokens`` tokens (positions start..), random distinct top-2 per layer."""
    rng = np.random.default_rng(seed)
    n = seqs * tokens * LAYERS
    ex = np.array([rng.choice(E, size=K_TOP, replace=False) for _ in range(n)])
    w = rng.uniform(0.2, 1.0, size=(n, K_TOP))
    meta = TraceMeta(model="t", family="mixtral", num_layers=LAYERS, num_experts=E, top_k=K_TOP)
    s = np.repeat(np.arange(seqs), tokens * LAYERS)
    t = np.tile(np.repeat(np.arange(start, start + tokens), LAYERS), seqs)
    with TraceWriter(path, meta) as wr:
        wr.write(s, t, phase, np.tile(np.arange(LAYERS), seqs * tokens), ex, w)
    return read_trace(path)


@pytest.fixture(scope="module")
def weights() -> Weights:
    return Weights(Geometry.tiny(LAYERS), quant_spec("hqq2"), "cpu", seed=5)


def run(weights, trace, rows: int, prefill: bool, k: int = E, policy: str = "lru", batch: int = 1, chunk: int = 512,
        steps=None, **kw):
    steps = steps if steps is not None else build_steps(trace, batch, chunk)
    prog = BatchProgram(weights, rows, prefill, len(steps), Lanes(weights, max(rows, 4)), **kw)
    return BatchEngine(prog, k, policy).run(steps, Routing.from_trace(trace), keep_logits=True), steps


def test_batch_logits_equal_each_sequence_alone(weights, tmp_path):
    tr = make_trace(tmp_path / "b.parquet", seqs=3, tokens=4, phase=DECODE, seed=1)
    res, steps = run(weights, tr, rows=4, prefill=False, batch=3)   # 3 sequences in a batch of 4 rows
    assert res.violations == 0 and res.batch == 3 and res.steps == 4
    for s in range(3):
        alone_trace = Trace(tr.meta, tr.table.filter(pc.equal(tr.table["seq"], s)), tr.path)
        alone, _ = run(weights, alone_trace, rows=1, prefill=False)
        for j in range(4):
            got = res.logits[j][s]   # decode row = lane = the sequence's place in its group
            want = alone.logits[j][0]
            np.testing.assert_allclose(got, want, rtol=0.02, atol=0.02 * np.abs(want).max())
    # the sequences really differ (the comparison above is not trivially true)
    assert np.abs(res.logits[0][0] - res.logits[0][1]).max() > 0.1


def test_prefill_chunks_equal_token_by_token_decode(weights, tmp_path):
    pre = make_trace(tmp_path / "p.parquet", seqs=1, tokens=7, phase=PREFILL, seed=2)
    dec = make_trace(tmp_path / "d.parquet", seqs=1, tokens=7, phase=DECODE, seed=2)
    chunked, steps = run(weights, pre, rows=4, prefill=True, chunk=4)
    assert [s.tokens for s in steps] == [4, 3] and chunked.phase == "prefill" and chunked.violations == 0
    one, _ = run(weights, dec, rows=1, prefill=False)
    got = np.concatenate([chunked.logits[0], chunked.logits[1][:3]])
    want = np.concatenate(one.logits)
    np.testing.assert_allclose(got, want, rtol=0.02, atol=0.02 * np.abs(want).max())


def test_real_context_attention_equals_full_masked_cache(weights, tmp_path, monkeypatch):
    tr = make_trace(tmp_path / "c.parquet", seqs=2, tokens=3, phase=DECODE, seed=3, start=70)
    real, _ = run(weights, tr, rows=2, prefill=False, batch=2)
    assert real.buckets == [128, 128, 128]   # positions 70..72: the 128 first cache entries, not 1024
    monkeypatch.setattr(batch_mod, "context_bucket", lambda p, m: m)
    full, _ = run(weights, tr, rows=2, prefill=False, batch=2)
    assert full.buckets == [1024] * 3
    for a, b in zip(real.logits, full.logits, strict=True):
        np.testing.assert_allclose(a, b, rtol=0.01, atol=0.01 * np.abs(b).max())


def test_context_bucket():
    assert [context_bucket(p, 4096) for p in (0, 63, 64, 200, 4095, 9000)] == [64, 64, 128, 256, 4096, 4096]


@pytest.mark.parametrize("policy,phase,batch,chunk,k", [
    ("lru", DECODE, 4, 512, 2), ("opt", DECODE, 4, 512, 2), ("lfu", DECODE, 3, 512, 5), ("fifo", DECODE, 3, 512, 3),
    ("fifo", PREFILL, 1, 3, 2), ("lfu", PREFILL, 1, 3, 2), ("opt", PREFILL, 1, 4, 3)])
def test_batch_hits_equal_a_brute_force_union_replay(weights, tmp_path, policy, phase, batch, chunk, k):
    """The batch engine's and the timing simulator's hit counts against tests/oracle.py, which rebuilds
    each step's union from the raw rows (no moesim.traces.steps) and replays it through a plain-set cache:
    the two share the step code, so only an outside oracle can catch a wrong union or chunking."""
    from tests.oracle import replay_unions

    tr = make_trace(tmp_path / "s.parquet", seqs=4, tokens=5, phase=phase, seed=7)
    rows = chunk if phase == PREFILL else batch
    res, steps = run(weights, tr, rows=rows, prefill=phase == PREFILL, k=k, policy=policy, batch=batch, chunk=chunk)
    want = replay_unions(tr.seq, tr.token, tr.layer, tr.experts, k, policy, batch,
                         chunk if phase == PREFILL else None)
    assert (res.hits, res.requests) == want
    sim = simulate_timing(tr, policy, k, CostModel.preset("h200"), batch_size=batch, prefill_chunk=chunk,
                          engine="python")
    assert (sim.hits, sim.requests) == want
    assert res.violations == 0 and res.device_copies == res.misses   # every copy landed where planned
    if k == 2:
        assert any(len(v) > k for s in steps for v in s.layers.values())   # unions larger than the cache


def test_dropping_one_sequences_experts_is_caught(weights, tmp_path):
    tr = make_trace(tmp_path / "m.parquet", seqs=4, tokens=2, phase=DECODE, seed=9)
    steps = build_steps(tr, 4)
    ok, _ = run(weights, tr, rows=4, prefill=False, k=3, batch=4, steps=steps)
    assert ok.violations == 0
    # mutation: the union at layer 1 of step 0 loses the experts only the last sequence routes to
    st = steps[0]
    others = set()
    r = Routing.from_trace(tr)
    for s, p in st.parts[:-1]:
        t = int(np.flatnonzero((r.seq == s) & (r.position == p))[0])
        others |= {int(e) for e in r.experts[t, 1]}
    dropped = [e for e in st.layers[1] if e not in others]
    assert dropped, "the last sequence must route to an expert of its own at layer 1 (pick another seed)"
    st.layers[1] = [e for e in st.layers[1] if e in others]
    bad, _ = run(weights, tr, rows=4, prefill=False, k=3, batch=4, steps=steps)
    assert bad.violations >= len(dropped)
    assert np.abs(bad.logits[0][3] - ok.logits[0][3]).max() > 0   # and the dropped sequence's output changes


def test_cell_trace_segments_and_old_cells_stay_batch_one_decode(tmp_path):
    from moesim.engine.validation import cell_inputs, cell_trace, head_tokens

    tr = make_trace(tmp_path / "seg.parquet", seqs=2, tokens=5, phase=DECODE, seed=4)
    sub = cell_trace(tr, batch=2, tokens=4, skip=1)   # pairs from (0, 1): segments (0,1..2), (0,3..4)
    pairs = sorted({(int(s), int(t)) for s, t in zip(sub.seq, sub.token, strict=True)})
    assert pairs == [(0, 1), (0, 2), (1, 3), (1, 4)]   # positions kept, sequences renumbered
    assert [s.tokens for s in build_steps(sub, 2)] == [2, 2]
    with pytest.raises(ValueError, match="segments"):
        cell_trace(tr, batch=4, tokens=16, skip=1)
    pre = cell_trace(tr, phase="prefill", tokens=4, seq_len=2)   # decode rows offered as prompts
    assert set(np.asarray(pre.phase).tolist()) == {PREFILL}
    # a cell of an older engine file (no batch / phase keys): batch-1 decode over the file's tokens
    engine = {"tokens": 3, "expert_bytes": 0, "skip_tokens": 2, "cells": []}
    old, batch, chunk, phase, shape = cell_inputs(engine, {"policy": "lru"}, tr)
    assert (batch, phase, shape) == (1, "decode", "")
    assert old.table.equals(head_tokens(tr, 3, skip=2).table)


def test_batch_programs_terms_from_raw_pieces():
    """Hand-computed: 2 steps at buckets 128 and 256, 3 layers, 10 expert calls at token bucket 2."""
    from moesim.engine.calibration import batch_cost, batch_programs

    raw = {"all_resident": {"layers": 3}, "batch_pieces": {"decode4": {
        "rows": 4, "phase": "decode", "steps": 2, "step_buckets": [128, 256],
        "layer_ms": {"128": 0.2, "256": 0.3}, "layer0_ms": {"128": 0.25, "256": 0.35},
        "expert_ms": {"1": 0.5, "2": 0.6, "4": 0.7}, "final_ms": 0.1, "expert_calls": {"1": 0, "2": 10, "4": 0},
        # pieces: (0.25 + 2 * 0.2 + 0.1) + (0.35 + 2 * 0.3 + 0.1) + 10 * 0.6 = 7.8 ms; the run took 8.8
        "all_resident_gpu_ms_total": 8.8}}}
    t = batch_programs(raw)["decode4"]
    assert t["layer"]["base_s"] == pytest.approx(0.1e-3) and t["layer"]["per_context_s"] == pytest.approx(
        (0.1 / 128) * 1e-3 / 4)   # slope 0.1 ms per 128 positions, per row
    assert t["engine_overhead_per_expert_s"] == pytest.approx(0.1e-3)   # 1.0 ms over 10 calls
    assert t["expert_curve"][1] == pytest.approx([2.0, 0.7e-3])
    assert t["token"]["base_s"] == pytest.approx(0.15e-3)   # final + layer 0's extra 0.05
    cost = batch_cost(CostModel.preset("h200"), t)
    assert cost.layer_seconds(100, 4) == pytest.approx(0.1e-3 + 0.1 / 128 * 100 * 1e-3)
    assert cost.expert_seconds(2) == pytest.approx(0.7e-3)
    assert batch_cost(CostModel.preset("h200"), t, overhead=False).expert_seconds(2) == pytest.approx(0.6e-3)
    assert batch_programs({"batch_pieces": {"decode4": {"rows": 4, "phase": "decode"}}}) == {}   # a CPU check


def test_instrumented_batch_run_logs_every_copy_once(weights, tmp_path):
    # the copy log shared with the batch-1 engine (runtime.issue_copy): one "miss" event per device copy,
    # tagged with its step and layer, and the run's results unchanged by instrumenting it
    tr = make_trace(tmp_path / "i.parquet", seqs=2, tokens=3, phase=DECODE, seed=4)
    steps = build_steps(tr, 2, 512)
    prog = BatchProgram(weights, 2, False, len(steps), Lanes(weights, 4))
    plain = BatchEngine(prog, 3, "lru").run(steps, Routing.from_trace(tr))
    inst = BatchEngine(prog, 3, "lru").run(steps, Routing.from_trace(tr), instrument=True)
    misses = [e for e in inst.events if e["kind"] == "miss"]
    assert inst.misses == plain.misses > 0 and inst.violations == 0
    assert len(misses) == inst.misses == inst.device_copies
    assert {e["step"] for e in misses} <= set(range(len(steps))) and {e["layer"] for e in misses} == set(range(LAYERS))
    assert all(e["end_ms"] >= e["start_ms"] for e in misses)
