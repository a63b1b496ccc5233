"""Analysis functions against hand-computed tiny traces, brute-force oracles and the replay."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.analysis import stats
from moesim.analysis.residency import HIT, MISS, RESIDENT, residency_log
from moesim.simulator.replay import mrc, simulate
from moesim.traces.format import DECODE, PREFILL, TraceMeta, TraceWriter, read_trace


def build(path: Path, rows: list[tuple[int, int, int, int, list[int]]], *, layers: int, experts: int,
          top_k: int):
    """rows: (seq, token, phase, layer, experts in router order) -> a read-back Trace."""
    meta = TraceMeta(model="test/tiny", family="test", num_layers=layers, num_experts=experts, top_k=top_k)
    with TraceWriter(path, meta) as w:
        for seq, tok, phase, layer, ex in rows:
            wts = np.linspace(1.0, 0.5, top_k) / np.linspace(1.0, 0.5, top_k).sum()
            w.write(seq, [tok], phase, [layer], np.array([ex]), wts[None, :])
    return read_trace(path)


def sets_trace(path: Path, sets: list[list[int]], *, experts: int, top_k: int, layer: int = 0, layers: int = 1,
               seq: int = 0, phase: int = DECODE):
    return build(path, [(seq, t, phase, layer, s) for t, s in enumerate(sets)], layers=layers, experts=experts,
                 top_k=top_k)


def random_trace(path: Path, seed: int, *, tokens: int = 60, layers: int = 3, experts: int = 6, top_k: int = 2,
                 seqs: int = 2):
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(seqs):
        for t in range(tokens):
            for layer in range(layers):
                rows.append((s, t, DECODE, layer, rng.choice(experts, top_k, replace=False).tolist()))
    return build(path, rows, layers=layers, experts=experts, top_k=top_k)


# ---- popularity / entropy ------------------------------------------------------------------------

def test_counts_share_and_entropy_by_hand(tmp_path):
    rows = [(0, 0, DECODE, 0, [0, 1]), (0, 1, DECODE, 0, [0, 2]), (0, 2, DECODE, 0, [0, 1]),
            (0, 0, DECODE, 1, [3, 2]), (0, 1, DECODE, 1, [3, 2]), (0, 2, DECODE, 1, [1, 0])]
    tr = build(tmp_path / "t.parquet", rows, layers=3, experts=4, top_k=2)
    counts = stats.activation_counts(tr)
    assert counts.tolist() == [[3, 2, 1, 0], [1, 1, 2, 2], [0, 0, 0, 0]]
    share = stats.activation_share(tr)
    np.testing.assert_allclose(share[0], [0.5, 1 / 3, 1 / 6, 0])
    np.testing.assert_allclose(share.sum(axis=1), [1, 1, 0])
    ent = stats.layer_entropy(tr)
    assert ent["layer"].to_list() == [0, 1]  # layer 2 has no rows
    h0 = -(0.5 * math.log2(0.5) + (1 / 3) * math.log2(1 / 3) + (1 / 6) * math.log2(1 / 6))
    assert ent["entropy_bits"][0] == pytest.approx(h0)
    assert ent["normalized_entropy"][0] == pytest.approx(h0 / 2)
    assert ent["imbalance"][0] == pytest.approx(0.5 * 4)
    pop = stats.popularity(tr)
    assert pop.height == 12
    assert pop.filter((pop["layer"] == 0) & (pop["expert"] == 0))["count"].item() == 3
    assert pop.filter(pop["layer"] == 1)["share"].sum() == pytest.approx(1.0)
    assert pop.filter(pop["layer"] == 2)["count"].sum() == 0


# ---- reuse distances -----------------------------------------------------------------------------

def test_reuse_distances_contract_example(tmp_path):
    # docs/semantics.md worked example: a=0 b=1 c=2 d=3, tokens [a,b] [c,a] [d,b] [a,c]; LRU K=3 -> 3 hits.
    tr = sets_trace(tmp_path / "t.parquet", [[0, 1], [2, 0], [3, 1], [0, 2]], experts=4, top_k=2)
    d = stats.reuse_distances(tr, "distinct")["distance"].to_list()
    assert d == [None, None, None, 2, None, 3, 3, 4]
    assert sum(1 for x in d if x is not None and x <= 3) == 3
    tok = stats.reuse_distances(tr, "tokens")["distance"].to_list()
    assert tok == [None, None, None, 1, None, 2, 2, 2]
    hist = stats.reuse_histogram(tr, "distinct")
    assert dict(zip(hist["distance"].to_list(), hist["count"].to_list(), strict=True)) == {2: 1, 3: 2, 4: 1, None: 4}
    with pytest.raises(ValueError):
        stats.reuse_distances(tr, "bogus")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stack_depths_reproduce_lru_curve(tmp_path, seed):
    tr = random_trace(tmp_path / "t.parquet", seed)
    d = stats.reuse_distances(tr, "distinct")["distance"].fill_null(0).to_numpy()
    curve = mrc(tr, "lru").curve
    assert [int(((d > 0) & (d <= c["cache_size"])).sum()) for c in curve] == [c["hits"] for c in curve]


def test_stack_depths_match_lru_on_real_trace(real_trace):
    d = stats.reuse_distances(real_trace, "distinct")["distance"].fill_null(0).to_numpy()
    for k in (2, 4, 6):
        assert int(((d > 0) & (d <= k)).sum()) == simulate(real_trace, "lru", k).hits


# ---- persistence / cross-layer / co-activation ------------------------------------------------------

def test_persistence_by_hand_skips_gaps_and_sequence_breaks(tmp_path):
    rows = [(0, 0, DECODE, 0, [0, 1]), (0, 1, DECODE, 0, [1, 2]), (0, 2, DECODE, 0, [3, 0]),
            (0, 4, DECODE, 0, [3, 0]),  # token 3 missing: not adjacent to token 2
            (1, 0, DECODE, 0, [3, 0]), (1, 1, DECODE, 0, [3, 1])]
    tr = build(tmp_path / "t.parquet", rows, layers=1, experts=4, top_k=2)
    per = stats.persistence(tr)
    assert per["pairs"].to_list() == [3]
    assert per["overlap"][0] == pytest.approx((1 / 2 + 0 + 1 / 2) / 3)
    assert per["top1_same"][0] == pytest.approx(1 / 3)


def test_transition_matrix_by_hand(tmp_path):
    rows = [(0, 0, DECODE, 0, [0, 1]), (0, 0, DECODE, 1, [2, 3]),
            (0, 1, DECODE, 0, [0, 2]), (0, 1, DECODE, 1, [2, 1]),
            (0, 2, DECODE, 0, [3, 1])]  # no layer-1 row: not aligned
    tr = build(tmp_path / "t.parquet", rows, layers=2, experts=4, top_k=2)
    counts = stats.transition_matrix(tr, 0, normalize=False)
    expect = np.zeros((4, 4), int)
    for i, j in [(0, 2), (0, 3), (1, 2), (1, 3), (0, 2), (0, 1), (2, 2), (2, 1)]:
        expect[i, j] += 1
    assert counts.tolist() == expect.tolist()
    norm = stats.transition_matrix(tr, 0)
    np.testing.assert_allclose(norm[0], [0, 0.25, 0.5, 0.25])
    np.testing.assert_allclose(norm.sum(axis=1), [1, 1, 1, 0])
    assert stats.transition_matrix(tr, 0, top1=True, normalize=False)[0, 2] == 2


def test_cross_layer_affinity_deterministic_chain(tmp_path):
    # layer 1's top-1 is a function of layer 0's (two values, equally likely): MI = 1 bit, argmax always hits
    rows = []
    for t in range(40):
        a = t % 2
        rows += [(0, t, DECODE, 0, [a, 2]), (0, t, DECODE, 1, [3 - a, 0])]
    tr = build(tmp_path / "t.parquet", rows, layers=2, experts=4, top_k=2)
    aff = stats.cross_layer_affinity(tr)
    assert aff["tokens"].to_list() == [40]
    assert aff["mutual_info_bits"][0] == pytest.approx(1.0)
    assert aff["argmax_hit"][0] == pytest.approx(1.0)


def test_coactivation_by_hand(tmp_path):
    tr = sets_trace(tmp_path / "t.parquet", [[0, 1], [0, 2], [1, 0]], experts=4, top_k=2)
    co = stats.coactivation(tr, 0)
    assert co.tolist() == [[3, 2, 1, 0], [2, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    cond = stats.coactivation(tr, normalize="conditional")
    assert cond[0, 1] == pytest.approx(2 / 3) and cond[1, 0] == pytest.approx(1.0) and cond[3].sum() == 0


# ---- segment cache bound -------------------------------------------------------------------------

def test_segment_cache_bound_by_hand(tmp_path):
    tr = sets_trace(tmp_path / "t.parquet", [[0], [0], [1], [1]], experts=3, top_k=1)
    df = stats.segment_cache_bound(tr, 2)
    # windows [0,0] [0,1] [1,1]: one slot covers 2 + 1 + 2 of 6 requests
    assert df["windows"].to_list() == [3, 3, 3]
    assert df["hit_rate"].to_list() == pytest.approx([5 / 6, 1.0, 1.0])
    strided = stats.segment_cache_bound(tr, 2, [1], stride=2)
    assert strided["windows"].item() == 2 and strided["hit_rate"].item() == pytest.approx(1.0)
    short = stats.segment_cache_bound(tr, 5)  # no window fits
    assert short["windows"].to_list() == [0, 0, 0]
    assert stats.segment_cache_bound(tr, 1, [1])["hit_rate"].item() == pytest.approx(1.0)


def _brute_sch(sets_by_seq: list[list[list[int]]], experts: int, k: int, m: int, c: int) -> float:
    hits = total = 0
    for sets in sets_by_seq:
        for s in range(len(sets) - m + 1):
            win = sets[s:s + m]
            hits += max(sum(len(set(x) & set(cache)) for x in win) for cache in itertools.combinations(range(experts), c))
            total += k * m
    return hits / total


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_segment_cache_bound_matches_brute_force(tmp_path_factory, data):
    experts, k = 5, 2
    seqs = data.draw(st.lists(st.lists(st.lists(st.integers(0, experts - 1), min_size=k, max_size=k, unique=True),
                                       min_size=1, max_size=9), min_size=1, max_size=2))
    m = data.draw(st.integers(1, 4))
    rows = [(s, t, DECODE, 0, x) for s, sets in enumerate(seqs) for t, x in enumerate(sets)]
    tr = build(tmp_path_factory.mktemp("sch") / "t.parquet", rows, layers=1, experts=experts, top_k=k)
    df = stats.segment_cache_bound(tr, m)
    if df["windows"][0] == 0:
        assert all(len(s) < m for s in seqs)
        return
    for c in range(1, experts + 1):
        assert df["hit_rate"][c - 1] == pytest.approx(_brute_sch(seqs, experts, k, m, c))


def test_segment_cache_bound_per_layer_pools_to_total(real_trace):
    per = stats.segment_cache_bound(real_trace, 16, [2, 4], per_layer=True)
    total = stats.segment_cache_bound(real_trace, 16, [2, 4])
    for c in (2, 4):
        sub = per.filter(per["cache_size"] == c)
        assert sub["hits"].sum() == total.filter(total["cache_size"] == c)["hits"].item()
    rates = total["hit_rate"].to_list()
    assert 0 < rates[0] < rates[1] <= 1


# ---- residency log (raster data) ---------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "opt"])
def test_residency_log_matches_replay(tmp_path, policy):
    tr = random_trace(tmp_path / "t.parquet", 7)
    for layer in range(3):
        log = residency_log(tr, layer, policy, 3)
        res = simulate(tr, policy, 3)
        assert log.hits == res.layer_hits[layer]
        assert log.hits + log.misses == res.layer_requests[layer]
        occupied = np.isin(log.states, (HIT, MISS, RESIDENT)).sum(axis=1)
        assert occupied.max() <= 3
        assert ((log.states == HIT) | (log.states == MISS)).sum(axis=1).tolist() == [2] * log.states.shape[0]


def test_residency_log_contract_example(tmp_path):
    tr = sets_trace(tmp_path / "t.parquet", [[0, 1], [2, 0], [3, 1], [0, 2]], experts=4, top_k=2)
    log = residency_log(tr, 0, "lru", 3)
    assert log.states.tolist() == [[MISS, MISS, 0, 0], [HIT, RESIDENT, MISS, 0], [RESIDENT, HIT, 0, MISS],
                                   [HIT, RESIDENT, MISS, 0]]
    with pytest.raises(ValueError):
        residency_log(tr, 0, "lru", 1)
    with pytest.raises(KeyError):
        residency_log(tr, 0, "nope", 3)


# ---- prefill vs decode, summary ----------------------------------------------------------------------

def test_phase_comparison(tmp_path):
    rows = [(0, t, PREFILL, 0, [t % 4, (t + 1) % 4]) for t in range(6)]
    rows += [(0, t, DECODE, 0, [0, 1]) for t in range(6, 12)]
    tr = build(tmp_path / "t.parquet", rows, layers=1, experts=4, top_k=2)
    df = stats.phase_comparison(tr, 2)
    assert df["phase"].to_list() == ["prefill", "decode"]
    assert df["rows"].to_list() == [6, 6]
    dec = df.row(1, named=True)
    assert dec["overlap"] == pytest.approx(1.0) and dec["normalized_entropy"] == pytest.approx(0.5)
    assert dec["lru_hit_rate"] == pytest.approx(10 / 12)  # 2 compulsory misses, then all hits
    assert df.row(0, named=True)["lru_hit_rate"] == pytest.approx(simulate(tr.filter_phase(PREFILL), "lru", 2).hit_rate)
    s = stats.summary(tr)
    assert (s["prefill_rows"], s["decode_rows"], s["tokens"], s["sequences"]) == (6, 6, 12, 1)


# ---- speculative prefetch quality -------------------------------------------------------------------

def test_prefetch_quality_prev_token_by_hand(tmp_path):
    tr = sets_trace(tmp_path / "t.parquet", [[0, 1], [1, 2], [1, 2]], experts=4, top_k=2)
    df = stats.prefetch_quality(tr, [1, 2], "prev-token")
    assert df["rows"].to_list() == [2, 2]
    assert df["precision"].to_list() == pytest.approx([1 / 2, 3 / 4])
    assert df["recall"].to_list() == pytest.approx([1 / 4, 3 / 4])


def test_prefetch_quality_cross_layer_by_hand(tmp_path):
    rows = [(0, t, DECODE, layer, s) for t in range(2) for layer, s in ((0, [0, 1]), (1, [2, 3]))]
    tr = build(tmp_path / "t.parquet", rows, layers=2, experts=4, top_k=2)
    df = stats.prefetch_quality(tr, [1, 2, 4], "cross-layer")
    assert df["rows"].to_list() == [2, 2, 2]  # layer 0 has nothing to predict from
    assert df["precision"].to_list() == pytest.approx([1 / 2, 1 / 2, 1 / 2])
    assert df["recall"].to_list() == pytest.approx([1 / 4, 1 / 2, 1.0])
    with pytest.raises(ValueError):
        stats.prefetch_quality(tr, [5])
    with pytest.raises(ValueError):
        stats.prefetch_quality(tr, [1], "psychic")


@pytest.mark.parametrize("policy", ["opt", "lru"])
def test_residency_log_prefix_is_exact(tmp_path, policy):
    for seed in range(4):
        tr = random_trace(tmp_path / f"t{seed}.parquet", seed)
        full = residency_log(tr, 1, policy, 3)
        for n in (1, 10, 25):
            part = residency_log(tr, 1, policy, 3, max_rows=n)
            assert part.states.shape[0] == n
            np.testing.assert_array_equal(part.states, full.states[:n])


def test_residency_log_prefix_sees_the_whole_future(tmp_path):
    # a b c a, K=2, OPT: at c it must evict b (never used again), keeping a -- even if only 3 rows are logged
    tr = sets_trace(tmp_path / "t.parquet", [[0], [1], [2], [0]], experts=3, top_k=1)
    part = residency_log(tr, 0, "opt", 2, max_rows=3)
    assert part.states[2].tolist() == [RESIDENT, 0, MISS]


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_matrix_invariants(tmp_path_factory, data):
    experts, k, layers = 5, 2, 2
    n = data.draw(st.integers(1, 12))
    sets = data.draw(st.lists(st.lists(st.integers(0, experts - 1), min_size=k, max_size=k, unique=True),
                              min_size=n * layers, max_size=n * layers))
    rows = [(0, t, DECODE, layer, sets[t * layers + layer]) for t in range(n) for layer in range(layers)]
    tr = build(tmp_path_factory.mktemp("inv") / "t.parquet", rows, layers=layers, experts=experts, top_k=k)
    np.testing.assert_allclose(stats.activation_share(tr).sum(axis=1), 1.0)
    co = stats.coactivation(tr)
    assert (co == co.T).all() and (np.diag(co) == stats.activation_counts(tr).sum(axis=0)).all()
    assert co.sum() == len(tr) * k * k  # each set adds k x k (i, j) pairs, diagonal included
    trans = stats.transition_matrix(tr, 0, normalize=False)
    assert trans.sum() == n * k * k
    assert (trans.sum(axis=1) == k * stats.activation_counts(tr)[0]).all()
    d = stats.reuse_distances(tr, "distinct")["distance"]
    assert d.null_count() == len({(layer, e) for _, _, _, layer, s in rows for e in s})
    assert d.drop_nulls().max() is None or d.drop_nulls().max() <= experts


@pytest.mark.parametrize("predictor", stats.PREDICTORS)
def test_prefetch_quality_kernel_matches_reference(tmp_path, predictor):
    for seed in range(3):
        tr = random_trace(tmp_path / f"t{seed}.parquet", seed, tokens=40, layers=4)
        fast = stats.prefetch_quality(tr, [1, 2, 3, 6], predictor)
        ref = stats.prefetch_quality_reference(tr, [1, 2, 3, 6], predictor)
        assert fast.equals(ref)


def test_prefetch_quality_kernel_matches_reference_on_real_trace(real_trace):
    for predictor in stats.PREDICTORS:
        assert stats.prefetch_quality(real_trace, [1, 2, 4], predictor).equals(
            stats.prefetch_quality_reference(real_trace, [1, 2, 4], predictor))
