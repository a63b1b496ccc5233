"""Timing simulator invariants, cost model, prefetchers and the CLI glue."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesim.cli import main
from moesim.errors import DataError, UsageError
from moesim.simulator.cost_model import CostModel
from moesim.simulator.replay import simulate
from moesim.simulator.timing import build_steps, simulate_timing
from tests.helpers import random_trace, write_trace

FAST = ["lru", "lfu", "fifo", "opt"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    rng = np.random.default_rng(5)
    return random_trace(tmp_path_factory.mktemp("t") / "t.parquet", rng, tokens=60, num_layers=4, num_experts=8,
                        top_k=2, skew=1.1)


def zero_cost(**kw):
    base = CostModel.preset("a6000").with_overrides(expert_ms=0, layer_ms=0, token_ms=0, pcie_latency_us=0,
                                                    pcie_gbps=10.0, expert_bytes=10**7, miss_issue_us=0,
                                                    routing_handoff_us=0, host_copy_issue_us=0, predict_us=0,
                                                    copy_hop_us=0, ready_hop_us=0)
    return base.with_overrides(**kw) if kw else base


@pytest.mark.parametrize("policy", FAST + ["arc", "lfu-decay"])
def test_hits_equal_the_hit_rate_replay_without_prefetch(real_trace, policy):
    r = simulate_timing(real_trace, policy, 4, CostModel.preset("h200"))
    assert r.hits == simulate(real_trace, policy, 4, force_generic=True).hits
    assert r.requests == simulate(real_trace, policy, 4).requests


def test_pure_transfer_time_is_exact(small):
    cost = zero_cost()
    r = simulate_timing(small, "lru", 3, cost)
    expected_ms = r.misses * 1e7 / 10e9 * 1e3 / r.tokens
    assert r.ms_per_token == pytest.approx(expected_ms, rel=1e-12)
    assert r.to_dict()["bytes_h2d"] == r.misses * 10**7


def test_all_resident_runs_at_the_compute_bound(small):
    cost = CostModel.preset("a6000")
    r = simulate_timing(small, "lru", 8, cost)  # K = E: only compulsory misses
    steps = build_steps(small)
    bound = sum(cost.token_seconds(1) + sum(cost.layer_seconds(s.context, 1) + cost.expert_seconds(1) * len(S)
                                            for S in s.layers.values()) for s in steps)
    compulsory = r.misses * cost.copy_seconds(cost.expert_bytes())
    assert bound <= r.total_s <= bound + compulsory + 1e-12
    # copies free and no per-miss issue cost (the preset carries the H200's measured 1.3 us)
    warm = simulate_timing(small, "lru", 8, cost.with_overrides(pcie_gbps=1e9, pcie_latency_us=0, miss_issue_us=0))
    assert warm.total_s == pytest.approx(bound, rel=1e-6)


def test_perfect_prefetch_with_slack_hides_every_transfer(small):
    # copies take 1 ms, each layer's attention 5 ms: an oracle one layer ahead hides all but layer 0.
    cost = zero_cost(layer_ms=5.0, pcie_gbps=10.0)
    r = simulate_timing(small, "lru", 4, cost, prefetch="oracle", prefetch_params={"budget": 2})
    none = simulate_timing(small, "lru", 4, cost)
    d = r.to_dict()
    assert d["prefetch_precision"] == 1.0  # the oracle never fetches an expert that is not used
    # every expert needed at layers >= 1 was resident or prefetched: only layer 0 can still miss
    layer0 = simulate(small.filter_phase(1), "lru", 4)
    assert r.misses <= layer0.layer_requests[0]
    assert d["expert_recall"] >= 1 - layer0.layer_requests[0] / r.requests
    assert r.stall_s < none.stall_s and r.stall_s <= r.misses * 1e-3 + 1e-9
    # bytes = (misses + prefetches) x bytes per expert
    assert d["bytes_h2d"] == (r.misses + r.prefetches) * cost.expert_bytes()


def test_time_never_goes_backwards_and_timeline(small, tmp_path):
    tl = tmp_path / "tl.json"
    simulate_timing(small, "lfu", 3, CostModel.preset("h200"), prefetch="transition", timeline=tl)
    ev = json.loads(tl.read_text())["traceEvents"]
    assert {e["tid"] for e in ev} >= {"compute", "copy0"}
    for tid in ("compute", "copy0"):
        spans = [(e["ts"], e["ts"] + e["dur"]) for e in ev if e["tid"] == tid]
        assert all(a[1] <= b[0] + 0.01 for a, b in zip(spans, spans[1:], strict=False))  # a stream never overlaps itself
        assert all(e["dur"] >= 0 for e in ev)
    assert [e["ts"] for e in ev] == sorted(e["ts"] for e in ev)


def test_seeded_runs_repeat_and_the_seed_matters(small):
    """The random policy's victims come from its own seeded generator: the same seed repeats its run
    exactly even with another seed's run in between (no shared or global state), a different seed gives
    a different run (so the equality is not trivial), and without prefetching its hits are the hit-rate
    replay's for that seed (a separate implementation: the compiled replay kernel)."""
    def run(seed: int) -> dict:
        return simulate_timing(small, "random", 3, CostModel.preset("h200"), prefetch="transition",
                               policy_params={"seed": seed}).to_dict()

    a = run(0)
    other = run(1)
    assert run(0) == a and other != a and other["hits"] != a["hits"]
    for seed in (0, 1, 2):
        timed = simulate_timing(small, "random", 3, CostModel.preset("h200"), policy_params={"seed": seed})
        assert timed.hits == simulate(small, "random", 3, params={"seed": seed}).hits


def test_hand_computed_timeline(tmp_path):
    # one layer, K=2, top-1: tokens [0] [1] [0]; copy 2 ms, layer 1 ms, expert 0.5 ms, token 0
    t = write_trace(tmp_path / "t.parquet", [[0], [1], [0]], num_experts=4)
    cost = CostModel.preset("a6000").with_overrides(expert_ms=0.5, layer_ms=1.0, token_ms=0, pcie_latency_us=0,
                                                    pcie_gbps=1.0, expert_bytes=2_000_000, miss_issue_us=0)
    r = simulate_timing(t, "lru", 2, cost)
    # t0: attn 0-1, copy 1-3, expert 3-3.5 | t1: attn 3.5-4.5, copy 4.5-6.5, expert 6.5-7 | t2: attn 7-8, hit, 8-8.5
    assert r.total_s == pytest.approx(8.5e-3)
    assert list(np.round(r.per_token_ms, 6)) == [3.5, 3.5, 1.5]
    assert r.stall_s == pytest.approx(4e-3)


def test_batched_steps_request_the_union(tmp_path):
    t = write_trace(tmp_path / "t.parquet", [[0, 1], [1, 2], [3, 1], [0, 2]], seq=[0, 0, 1, 1], layers=[0] * 4,
                    num_experts=4)
    steps = build_steps(t, batch_size=2)
    assert len(steps) == 2 and steps[0].layers[0] == [0, 1, 3] and steps[0].counts[0] == {0: 1, 1: 2, 3: 1}
    r = simulate_timing(t, "lru", 3, CostModel.preset("h200"), batch_size=2)
    assert r.tokens == 4 and r.requests == 3 + 3


def test_prefetchers_and_speculative_needs_predictions(real_trace):
    cost = CostModel.preset("h200")
    for name in ("previous-token", "transition", "oracle"):
        d = simulate_timing(real_trace, "lru", 4, cost, prefetch=name).to_dict()
        assert 0 <= d["prefetch_precision"] <= 1 and 0 <= d["prefetch_recall"] <= 1
        assert d["bytes_h2d"] == (d["misses"] + d["prefetches"]) * d["expert_bytes"]
    with pytest.raises(UsageError, match="needs speculative predictions recorded at distance 1"):
        simulate_timing(real_trace, "lru", 4, cost, prefetch="speculative")


def test_speculative_uses_recorded_predictions(tmp_path):
    from moesim.traces.format import DECODE, TraceMeta, TraceWriter, read_trace

    rng = np.random.default_rng(1)
    n_tok, L = 40, 3
    ex = np.array([rng.choice(8, 2, replace=False) for _ in range(n_tok * L)])
    pred = ex.copy()
    pred[np.arange(len(pred)) % L == 0] = -1
    meta = TraceMeta(model="m", family="t", num_layers=L, num_experts=8, top_k=2)
    with TraceWriter(tmp_path / "p.parquet", meta, pred_distances=[1]) as w:
        w.write(0, np.arange(n_tok * L) // L, DECODE, np.arange(n_tok * L) % L, ex, np.full((n_tok * L, 2), 0.5),
                preds={1: pred})
    t = read_trace(tmp_path / "p.parquet")
    spec = simulate_timing(t, "lru", 2, CostModel.preset("h200"), prefetch="speculative",
                           speculative_ready="gate").to_dict()
    orac = simulate_timing(t, "lru", 2, CostModel.preset("h200"), prefetch="oracle").to_dict()
    assert spec["prefetch_precision"] == orac["prefetch_precision"] == 1.0  # perfect recorded predictions
    assert spec["tokens_per_s"] == pytest.approx(orac["tokens_per_s"])   # both issued at the gate
    # issued only once layer l's output exists (the default): the same picks, later copies, slower
    late = simulate_timing(t, "lru", 2, CostModel.preset("h200"), prefetch="speculative").to_dict()
    assert late["prefetches"] == spec["prefetches"] and late["hits"] == spec["hits"]
    assert late["tokens_per_s"] < spec["tokens_per_s"]


def test_cost_model_curve_and_overrides(tmp_path):
    c = CostModel.preset("h200")
    c.curve = [(65536, 25e-6), (33554432, 0.62e-3), (536870912, 9.8e-3)]
    assert c.copy_seconds(65536) == pytest.approx(25e-6)
    mid = c.copy_seconds(4 << 20)
    assert 25e-6 < mid < 0.62e-3
    assert c.copy_seconds(1 << 31) == pytest.approx(c.latency_s + (1 << 31) / c.bandwidth_Bps)
    o = c.with_overrides(pcie_gbps=10, expert_ms=1.0, layer_ms=2, token_ms=3, expert_bytes=5)
    assert o.curve == [] and o.copy_seconds(1e9) == pytest.approx(c.latency_s + 0.1)
    assert (o.expert_seconds(7), o.layer_seconds(100, 4), o.token_seconds(2), o.expert_bytes(123)) == (1e-3, 2e-3, 3e-3, 5)
    p = tmp_path / "c.json"
    c.to_json(p)
    assert CostModel.from_json(p).copy_seconds(4 << 20) == pytest.approx(mid)
    bad = tmp_path / "bad.json"
    bad.write_text('{"pcie": {}}')
    with pytest.raises(DataError, match="not a valid calibration"):
        CostModel.from_json(bad)
    with pytest.raises(UsageError):
        CostModel.preset("nosuch")


def test_copy_curve_interpolates_in_log_log_space():
    """Between two measured points a copy's time follows the power law through them (a straight line in
    log-log space), hand-computed here; a linear interpolation is 2x off in the middle of this curve."""
    c = CostModel.preset("h200")
    c.curve = [(65536, 25e-6), (33554432, 0.62e-3), (536870912, 9.8e-3)]
    # 4 MiB sits at 2/3 of the way from 64 KiB to 32 MiB in log2 (16 -> 22 of 16 -> 25)
    assert c.copy_seconds(4 << 20) == pytest.approx(25e-6 * (0.62e-3 / 25e-6) ** (2 / 3), rel=1e-12)
    # on a pure power law t = a * b^p the interpolation is exact at any size between the points
    a, p = 3e-9, 0.8
    c.curve = [(b, a * b ** p) for b in (1e4, 1e6, 1e8)]
    for b in (2e4, 3.3e5, 7.7e6, 9e7):
        assert c.copy_seconds(b) == pytest.approx(a * b ** p, rel=1e-12)


def test_simulate_cli_timing_keys(real_trace_path, capsys, tmp_path):
    assert main(["simulate", str(real_trace_path), "--policy", "lfu", "--cache-size", "4", "--hardware", "a6000",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    for key in ("policy", "cache_size", "requests", "hits", "misses", "hit_rate", "tokens_per_s", "ms_per_token",
                "bytes_h2d"):
        assert key in d
    assert (d["hits"], d["requests"]) == (d["timing_hits"], d["timing_requests"]) == (13827, 21558)
    assert main(["simulate", str(real_trace_path), "--policy", "lru", "--cache-size", "4", "--prefetch", "transition",
                 "--json", "--timeline", str(tmp_path / "tl.json")]) == 0
    d = json.loads(capsys.readouterr().out)
    assert "prefetch_precision" in d and "prefetch_recall" in d and (tmp_path / "tl.json").exists()
    assert d["hits"] == 13457 and d["timing_hits"] != d["hits"]  # top level = the exact demand replay
    slow = main(["simulate", str(real_trace_path), "--policy", "lru", "--cache-size", "4", "--pcie-gbps", "5", "--json"])
    assert slow == 0 and json.loads(capsys.readouterr().out)["tokens_per_s"] < d["tokens_per_s"]
    assert main(["simulate", str(real_trace_path), "--policy", "lru", "--cache-size", "4", "--hardware", "nosuch"]) == 2
    assert main(["simulate", str(real_trace_path), "--policy", "lru", "--cache-size", "4",
                 "--calibration", str(tmp_path / "missing.json")]) == 1


def test_steps_wanting_more_experts_than_slots_stream_through_in_chunks(tmp_path):
    # batch of 4 sequences, top-2: a step may want up to 8 experts with only 3 slots
    rng = np.random.default_rng(2)
    sets = [rng.choice(8, 2, replace=False) for _ in range(40)]
    t = write_trace(tmp_path / "t.parquet", sets, seq=[i % 4 for i in range(40)], layers=[0] * 40, num_experts=8)
    r = simulate_timing(t, "lru", 3, CostModel.preset("h200"), batch_size=4)
    assert r.tokens == 40 and r.hits + r.misses == r.requests
    assert r.requests == sum(len(s.layers[0]) for s in build_steps(t, batch_size=4))


@pytest.mark.parametrize("policy", FAST)
@pytest.mark.parametrize("batch,k", [(1, 2), (3, 2), (4, 3), (2, 5)])
def test_batched_hits_equal_a_brute_force_union_replay(tmp_path, policy, batch, k):
    """A batched decode requests, per step and layer, the union of its tokens' experts, cut into sets of
    K when it does not fit: checked against tests/oracle.py, which rebuilds the steps from the raw rows
    and replays them through a plain-set cache. K = 2 with batch 3 streams 6-expert unions through."""
    from tests.oracle import replay_unions

    rng = np.random.default_rng(11)
    tokens, layers = 48, 2
    seq_of_token = np.sort(rng.integers(0, 6, tokens))   # 6 sequences of ragged lengths
    sets = [rng.choice(8, 2, replace=False) for _ in range(tokens * layers)]
    t = write_trace(tmp_path / "u.parquet", sets, num_layers=layers, seq=np.repeat(seq_of_token, layers).tolist())
    r = simulate_timing(t, policy, k, CostModel.preset("h200"), batch_size=batch)
    assert (r.hits, r.requests) == replay_unions(t.seq, t.token, t.layer, t.experts, k, policy, batch)


def _prefill_then_decode(path, prompt=(10, 6), generated=(4, 3), layers=2):
    """Two sequences: `prompt[s]` prefill tokens then `generated[s]` decode tokens, every layer."""
    from moesim.traces.format import DECODE, PREFILL, TraceMeta, TraceWriter, read_trace

    rng = np.random.default_rng(11)
    seq, tok, phase, layer, sets = [], [], [], [], []
    for s, (p, g) in enumerate(zip(prompt, generated, strict=True)):
        for t in range(p + g):
            for l_ in range(layers):
                seq.append(s), tok.append(t), phase.append(PREFILL if t < p else DECODE), layer.append(l_)
                sets.append(rng.choice(8, 2, replace=False))
    meta = TraceMeta(model="test", family="test", num_layers=layers, num_experts=8, top_k=2)
    with TraceWriter(path, meta) as wr:
        wr.write(np.array(seq), np.array(tok), np.array(phase), np.array(layer), np.array(sets),
                 np.full((len(sets), 2), 0.5))
    return read_trace(path)


@pytest.mark.parametrize("batch,chunk,prefill_steps,decode_steps", [(1, 512, 2, 7), (2, 512, 2, 4), (1, 4, 5, 7)])
def test_decode_and_prefill_throughput_are_separate(tmp_path, batch, chunk, prefill_steps, decode_steps):
    """Only a 2 ms per-step cost: every step, prefill chunk or decode, takes 2 ms, so the split is
    countable by hand. tokens_per_s is the decode throughput; prompt tokens do not inflate it."""
    t = _prefill_then_decode(tmp_path / "t.parquet")
    cost = zero_cost(token_ms=2.0, pcie_gbps=1e9)
    r = simulate_timing(t, "lru", 8, cost, batch_size=batch, prefill_chunk=chunk)
    assert (r.prefill_tokens, r.decode_tokens, r.tokens) == (16, 7, 23)
    assert r.prefill_s == pytest.approx(0.002 * prefill_steps, rel=1e-6)   # copies cost ~1e-11 s each
    assert r.decode_s == pytest.approx(0.002 * decode_steps, rel=1e-6)
    assert r.tokens_per_s == pytest.approx(7 / (0.002 * decode_steps), rel=1e-6)
    assert r.ms_per_token == pytest.approx(2.0 * decode_steps / 7, rel=1e-6)
    assert r.tpot_ms == pytest.approx(2.0, rel=1e-6)  # one step per generated token of a sequence
    assert r.prefill_tokens_per_s == pytest.approx(16 / (0.002 * prefill_steps), rel=1e-6)
    d = r.to_dict()
    for key in ("tokens_per_s", "ms_per_token", "tpot_ms", "prefill_tokens_per_s"):
        assert d[key] == pytest.approx(getattr(r, key), abs=1e-4)
    assert (d["decode_ms"], d["prefill_ms"]) == (round(2.0 * decode_steps, 3), round(2.0 * prefill_steps, 3))
    # decode steps of a batch of 2: three steps of 2 tokens (1 ms per token), one of 1 token (2 ms)
    assert d["p50_token_ms"] == (2.0 if batch == 1 else 1.0)


def test_decode_and_prefill_times_partition_the_run(tmp_path, capsys):
    t = _prefill_then_decode(tmp_path / "t.parquet", prompt=(40, 25), generated=(12, 9), layers=3)
    r = simulate_timing(t, "lru", 3, CostModel.preset("a6000"), prefetch="transition")
    assert r.prefill_s > 0 and r.decode_s > 0
    assert r.prefill_s + r.decode_s == pytest.approx(r.total_s, rel=1e-12)
    assert r.tokens_per_s == pytest.approx(21 / r.decode_s) and r.tokens_per_s != pytest.approx(r.tokens / r.total_s)
    # a decode-only trace has no prefill figures; a prefill-only one no decode figures (null, not 0)
    assert main(["simulate", str(t.path), "--policy", "lru", "--cache-size", "3", "--hardware", "a6000",
                 "--phase", "prefill", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["tokens_per_s"] is None and d["ms_per_token"] is None and d["prefill_tokens"] == 65
    assert d["prefill_tokens_per_s"] > 0 and "bytes_h2d" in d
    assert main(["simulate", str(t.path), "--policy", "lru", "--cache-size", "3", "--hardware", "a6000",
                 "--phase", "decode"]) == 0
    text = capsys.readouterr().out
    for key in ("tokens_per_s", "tpot_ms", "decode_tokens", "prefill_tokens_per_s"):
        assert key in text


def _all_miss_trace(tmp_path, tokens=3, layers=2):
    """Every request misses at K = 2: token t uses experts {2t, 2t+1} (mod 8) at every layer."""
    from moesim.traces.format import DECODE, TraceMeta, TraceWriter, read_trace

    meta = TraceMeta(model="m", family="t", num_layers=layers, num_experts=8, top_k=2)
    tok = np.repeat(np.arange(tokens), layers)
    ex = np.stack([(2 * tok) % 8, (2 * tok + 1) % 8], 1)
    path = tmp_path / "miss.parquet"
    with TraceWriter(path, meta) as w:
        w.write(np.zeros(len(tok), np.int32), tok, DECODE, np.tile(np.arange(layers), tokens), ex,
                np.full((len(tok), 2), 0.5))
    return read_trace(path)


@pytest.mark.parametrize("engine", ["python", "numba"])
def test_engine_terms_hand_computed(tmp_path, engine):
    """Copy 1 ms, expert 0.2 ms, layer 0.1 ms, token 0.05 ms, miss issue 30 us, hand-off 70 us.
    Per layer (two misses, copy-bound): layer [+ hand-off] + 2 x (copy + miss issue) + one expert (the
    first overlaps the second copy)."""
    trace = _all_miss_trace(tmp_path)
    base = zero_cost(pcie_gbps=10.0, expert_bytes=10**7, expert_ms=0.2, layer_ms=0.1, token_ms=0.05)
    replay = base.with_overrides(miss_issue_us=30.0, routing_handoff_us=70.0)   # replay: no hand-off charged
    gate = replay.with_overrides(engine_mode="gate")
    per_layer = 0.1 + 2 * (1.0 + 0.03) + 0.2
    for cost, extra in ((base.with_overrides(), -0.06), (replay, 0.0), (gate, 0.07)):
        r = simulate_timing(trace, "lru", 2, cost, engine=engine)
        assert r.misses == 12
        assert r.ms_per_token == pytest.approx(0.05 + 2 * (per_layer + extra), rel=1e-12)
    assert simulate_timing(trace, "lru", 2, gate, engine=engine).engine_mode == "gate"


@pytest.mark.parametrize("engine", ["python", "numba"])
def test_stream_hops_hand_computed(tmp_path, engine):
    """The cross-stream hops (docs/timing.md): copy 1 ms, expert 0.2 ms, layer 0.1 ms, token 0.05 ms,
    copy hop 40 us, ready hop 60 us. Per layer (two misses, copy-bound): layer + 2 x (hop + copy) +
    ready hop + one expert (the first expert waits for its copy too, but overlaps the second copy). With a
    warm cache (every request a hit) no copy and no wait: no hop at all."""
    trace = _all_miss_trace(tmp_path)
    base = zero_cost(pcie_gbps=10.0, expert_bytes=10**7, expert_ms=0.2, layer_ms=0.1, token_ms=0.05)
    hops = base.with_overrides(copy_hop_us=40.0, ready_hop_us=60.0)
    per_layer = 0.1 + 2 * (0.04 + 1.0) + 0.06 + 0.2
    r = simulate_timing(trace, "lru", 2, hops, engine=engine)
    assert r.misses == 12
    assert r.ms_per_token == pytest.approx(0.05 + 2 * per_layer, rel=1e-12)
    # the stall includes the ready hops: per layer compute idles from the gate (0.1) to the first expert
    # (copy lands at 1.14, + hop = 1.20) and from its end (1.40) to the second (lands 2.18, + hop = 2.24)
    assert r.stall_s * 1e3 == pytest.approx(6 * ((1.20 - 0.1) + (2.24 - 1.40)), rel=1e-9)
    # without the fields, the calibration behaves as before; the mixtral-offloading profile swaps on compute
    assert simulate_timing(trace, "lru", 2, base, engine=engine).ms_per_token == pytest.approx(
        0.05 + 2 * (0.1 + 2 * 1.0 + 0.2), rel=1e-12)
    mo = simulate_timing(trace, "lru", 2, hops.with_overrides(engine_profile="mixtral-offloading"), engine="python")
    assert mo.ms_per_token == pytest.approx(simulate_timing(
        trace, "lru", 2, base.with_overrides(engine_profile="mixtral-offloading"), engine="python").ms_per_token)


def _spec_trace(tmp_path):
    """One token, 2 layers: layer 0 uses {0, 1}, layer 1 {2, 3}, predicted (d = 1) perfectly."""
    from moesim.traces.format import DECODE, TraceMeta, TraceWriter, read_trace

    meta = TraceMeta(model="m", family="t", num_layers=2, num_experts=8, top_k=2)
    path = tmp_path / "spec.parquet"
    with TraceWriter(path, meta, pred_distances=[1]) as w:
        w.write(np.zeros(2, np.int32), np.zeros(2, np.int64), DECODE, np.arange(2), np.array([[0, 1], [2, 3]]),
                np.full((2, 2), 0.5), preds={1: np.array([[-1, -1], [2, 3]])})
    return read_trace(path)


@pytest.mark.parametrize("engine", ["python", "numba"])
def test_speculative_ready_hand_computed(tmp_path, engine):
    """One token, 2 layers, K = 2, cold cache: layer 0 uses {0, 1}, layer 1 {2, 3}, perfectly predicted
    from layer 0. Copy 1 ms, expert 0.2, layer 0.1, token 0.05, predict 0.04, hand-off 0.07, host issue
    0.045 ms. The timelines, by hand (ms):

    - ready "gate", replay: gate 0.15; copies E0 .15-1.15, E1 -2.15, E2 -3.15, E3 -4.15; experts of layer 0
      end 2.35, layer 1's attention 2.45, its experts wait for E2, E3: end 4.35;
    - ready "hidden", replay: layer 0's experts end 2.35, predict -2.39, then E2 2.39-3.39, E3 -4.39;
      experts of layer 1 end 4.59 (no predict after the last layer: nothing to prefetch);
    - ready "hidden", gate mode: hand-off .15-.22, issue E0 -.265 (copy -1.265), issue E1 -.31 (copy
      -2.265), experts of layer 0 1.265-1.465, 2.265-2.465, predict -2.505; the host reads the prediction
      back (-2.575) and issues E2 (-2.62, copy 2.62-3.62), E3 (-2.665, copy -4.62) while layer 1's
      attention runs (2.505-2.605); layer 1's hand-off waits for the host: 2.665-2.735; experts end 4.82;
    - ready "gate", gate mode: all four issues on compute after the hand-off (.22-.4), copies end 1.265,
      2.265, 3.265, 4.265; layer 0's experts end 2.465, layer 1: attention -2.565, hand-off -2.635,
      experts end 4.465."""
    trace = _spec_trace(tmp_path)
    replay = zero_cost(pcie_gbps=10.0, expert_bytes=10**7, expert_ms=0.2, layer_ms=0.1, token_ms=0.05,
                       predict_us=40.0, routing_handoff_us=70.0, host_copy_issue_us=45.0)
    gate = replay.with_overrides(engine_mode="gate")
    for cost, ready, total_ms in ((replay, "gate", 4.35), (replay, "hidden", 4.59), (gate, "hidden", 4.82),
                                  (gate, "gate", 4.465)):
        r = simulate_timing(trace, "lru", 2, cost, prefetch="speculative", speculative_ready=ready, engine=engine)
        assert (r.misses, r.prefetches, r.hits) == (2, 2, 2)
        assert r.ms_per_token == pytest.approx(total_ms, rel=1e-9), (cost.engine_mode, ready)
    with pytest.raises(UsageError, match="speculative ready"):
        simulate_timing(trace, "lru", 2, replay, prefetch="speculative", speculative_ready="later")


def test_host_copy_issue_is_charged_only_in_gate_mode(tmp_path):
    """Gate mode: each issued copy costs the host 45 us between the hand-off and the experts; every layer
    of the all-miss trace issues two, so the step grows by exactly 2 x layers x 45 us over the same run
    without it. Replay mode hides it (the host issues ahead)."""
    trace = _all_miss_trace(tmp_path)
    base = zero_cost(pcie_gbps=10.0, expert_bytes=10**7, expert_ms=0.2, layer_ms=0.1, token_ms=0.05,
                     routing_handoff_us=70.0, engine_mode="gate")
    with_issue = base.with_overrides(host_copy_issue_us=45.0)
    # the first copy starts 45 us later; the second one queues behind it regardless: +45 us per layer...
    # ...and the experts cannot start before the second issue (copy-bound here, so only the first shift shows)
    a = simulate_timing(trace, "lru", 2, base)
    b = simulate_timing(trace, "lru", 2, with_issue)
    assert b.ms_per_token == pytest.approx(a.ms_per_token + 2 * 0.045, rel=1e-12)
    replay = with_issue.with_overrides(engine_mode="replay")
    assert simulate_timing(trace, "lru", 2, replay).total_s == simulate_timing(
        trace, "lru", 2, base.with_overrides(engine_mode="replay")).total_s


def test_handoff_delays_the_demand_copies_and_prefetches(small):
    """In gate mode the hand-off sits on compute between the gate and everything that depends on it:
    with free copies and kernels the run takes exactly layers x hand-off (+ the layer/token costs)."""
    cost = zero_cost(pcie_gbps=1e12, routing_handoff_us=500.0, engine_mode="gate")
    r = simulate_timing(small, "lru", 3, cost, prefetch="transition")
    sets = sum(len(s.layers) for s in build_steps(small))
    assert r.total_s == pytest.approx(sets * 500e-6 + r.misses * 0 + r.copies * 1e7 / 1e21, rel=1e-9)
    assert simulate_timing(small, "lru", 3, cost.with_overrides(engine_mode="replay")).total_s < 1e-6


def test_engine_block_round_trips_and_rejects_negative(tmp_path):
    cost = CostModel.preset("h200").with_overrides(miss_issue_us=12.5, routing_handoff_us=80.0)
    path = tmp_path / "c.json"
    cost.to_json(path)
    back = CostModel.from_json(path)
    assert back.miss_issue_s == pytest.approx(12.5e-6) and back.routing_handoff_s == pytest.approx(80e-6)
    raw = json.loads(path.read_text())
    raw["engine"]["miss_issue_s"] = -1
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="miss_issue_s"):
        CostModel.from_json(path)
    with pytest.raises(UsageError, match="engine mode"):
        cost.with_overrides(engine_mode="bogus")


def test_simulate_cli_engine_mode(small, capsys):
    args = ["simulate", str(small.path), "--policy", "lru", "--cache-size", "4", "--json", "--hardware", "h200",
            "--routing-handoff-us", "100", "--miss-issue-us", "20"]
    assert main(args) == 0
    replay = json.loads(capsys.readouterr().out)
    assert main(args + ["--engine-mode", "gate"]) == 0
    gate = json.loads(capsys.readouterr().out)
    assert replay["engine_mode"] == "replay" and gate["engine_mode"] == "gate"
    assert gate["ms_per_token"] > replay["ms_per_token"]
    with pytest.raises(SystemExit) as exc:   # argparse's usage error
        main(args[:-4] + ["--engine-mode", "nope"])
    assert exc.value.code == 2


def test_simulate_cli_speculative_ready(tmp_path, capsys):
    t = _spec_trace(tmp_path)
    args = ["simulate", str(t.path), "--policy", "lru", "--cache-size", "2", "--json", "--hardware", "h200",
            "--prefetch", "speculative", "--predict-us", "40"]
    assert main(args) == 0
    hidden = json.loads(capsys.readouterr().out)
    assert main(args + ["--speculative-ready", "gate"]) == 0
    gate = json.loads(capsys.readouterr().out)
    assert hidden["speculative_ready"] == "hidden" and gate["speculative_ready"] == "gate"
    assert hidden["prefetches"] == gate["prefetches"] == 2
    assert hidden["ms_per_token"] > gate["ms_per_token"]


def test_mixtral_offloading_profile_hand_computed(tmp_path):
    """Swap on compute, nothing overlapping: per layer gate, routing read-back, each miss = copy in +
    (once the cache is full) copy out, each expert + two syncs. Copy 1 ms, expert 0.2, layer 0.1,
    token 0.05, hand-off/sync 0.07 ms; 3 tokens x 2 layers, every request a miss at K = 2 (token 0
    fills empty slots: no copy out)."""
    trace = _all_miss_trace(tmp_path)
    cost = zero_cost(pcie_gbps=10.0, expert_bytes=10**7, expert_ms=0.2, layer_ms=0.1, token_ms=0.05,
                     routing_handoff_us=70.0, miss_issue_us=500.0, engine_profile="mixtral-offloading")
    r = simulate_timing(trace, "lru", 2, cost)
    experts = 2 * (0.2 + 2 * 0.07)
    first = 2 * (0.1 + 0.07 + 2 * 1.0 + experts)          # token 0: copies in only
    later = 2 * (0.1 + 0.07 + 2 * 2.0 + experts)          # tokens 1, 2: in and out
    assert r.total_s * 1e3 == pytest.approx(3 * 0.05 + first + 2 * later, rel=1e-12)
    assert r.engine_profile == "mixtral-offloading"
    # this project's engine on the same costs overlaps the second copy with the first expert
    assert simulate_timing(trace, "lru", 2, cost.with_overrides(engine_profile="moesim")).total_s < r.total_s
    with pytest.raises(UsageError, match="no prefetcher"):
        simulate_timing(trace, "lru", 2, cost, prefetch="transition")
