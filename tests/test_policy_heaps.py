"""The victim paths of the compiled replay for larger caches (heaps for lfu, lfu-cache, opt, lfu-decay,
gate-weighted, lrfu; the staircase for hobbit, tests/test_hobbit_staircase.py for more; the vector scan of
packed int64 keys for opt, lfu-decay, gate-weighted, lrfu) against the slot scan and the reference classes:
hand-traced ties, protected row keys at the top of the heap, the float-underflow fallback of the decaying
scores, and random streams in both semantics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.simulator.policy_kernels import state
from moesim.simulator.policy_kernels.registry import KERNELS
from moesim.simulator.replay import build_stream, replay_stream, simulate
from tests.helpers import kernel_hits, skewed_trace, write_trace

HEAPED_NAMES = ["lfu", "opt", "lfu-cache", "lfu-decay", "gate-weighted", "lrfu", "hobbit"]
VSCAN_NAMES = ["opt", "lfu-decay", "gate-weighted", "lrfu", "hobbit"]
NO_PARAMS = np.zeros(4)
A, B, C, D, E, X, Y = range(7)


def _kernel_hits(stream, name, params=None, *, path: str) -> list[int]:
    """Hits per layer of the compiled kernel on its slot scan, heap/staircase or vector-scan path, whatever the
    cache size."""
    layout = {"scan": state.SCAN, "heap": state.HEAP, "vscan": state.VECTOR}[path]
    return kernel_hits(stream, name, params, layout=layout)


def _hits_every_path(trace, name, size, params=None, scope="layer", semantics="atomic") -> int:
    """Total hits, asserted equal on the scan, the heap, the vector scan (where the policy has one) and the
    class path."""
    s = build_stream(trace, size, scope, semantics)
    ref = replay_stream(s, name, params, force_generic=True)[1].tolist()
    assert _kernel_hits(s, name, params, path="scan") == ref, (name, "scan")
    assert _kernel_hits(s, name, params, path="heap") == ref, (name, "heap")
    if name in VSCAN_NAMES:
        assert _kernel_hits(s, name, params, path="vscan") == ref, (name, "vscan")
    return sum(ref)


def test_layout_for_picks_the_heap_above_the_scan_limit():
    small, mid, top = state.HEAP_MIN_SLOTS - 1, state.HEAP_MIN_SLOTS, state.VECTOR_MAX_SLOTS
    large = state.VECTOR_MAX_SLOTS + 1
    assert state.VECTOR_MAX_SLOTS <= 1 << state.SLOT_BITS  # a slot index fits in a key's low bits
    for name in HEAPED_NAMES:
        kernel = KERNELS[name]
        assert kernel.layout(np.array([small]), 0, NO_PARAMS) == state.SCAN
        for k in (mid, top):
            want = state.VECTOR if name in VSCAN_NAMES else state.HEAP
            assert kernel.layout(np.array([k]), 0, NO_PARAMS) == want
        assert kernel.layout(np.array([large]), 0, NO_PARAMS) == state.HEAP
    for name in ("arc", "s3fifo", "sieve"):
        assert KERNELS[name].layout(np.array([large]), 0, NO_PARAMS) == state.LIST


def test_lfu_count_ties_go_to_the_least_recent(tmp_path):
    # K=2, one key per request: a b a b | c: a and b both counted twice, a is older -> a goes.
    # lfu (perfect): a (3 requests) returns and evicts c (1); c (2) returns and evicts b (2, older than a's 3);
    # b (3) evicts c (2): hits = the 2nd a and b only. lfu-cache: c (1) and returning a (1) tie -> the older
    # c goes; c (1) returns and evicts a (1, older); b (still 2, resident) hits: 3 hits.
    t = write_trace(tmp_path / "t.parquet", [[k] for k in (A, B, A, B, C, A, C, B)])
    assert _hits_every_path(t, "lfu", 2) == 2
    assert _hits_every_path(t, "lfu-cache", 2) == 3


def test_lfu_victim_when_the_heap_minimum_is_in_the_row(tmp_path):
    # K=3, top-2. After t3 counts are a1 b4 c3. t4 [a, d]: a (now 2) is the lowest count resident, but it is
    # in the row: the victim is c (3 < b's 4), not b. t5 [c, b]: c misses (4), victim d (1) over a (2).
    rows = [[B, C], [B, C], [B, C], [A, B], [A, D], [C, B], [D, A]]
    t = write_trace(tmp_path / "t.parquet", rows)
    # hits: t1 2, t2 2, t3 b, t4 a, t5 b, t6 a (d was evicted at t5) = 8 of 14
    assert _hits_every_path(t, "lfu", 3) == 8
    telling = write_trace(tmp_path / "w.parquet", rows[:5] + [[B, A]])  # b hits only if c, not b, left at t4
    assert _hits_every_path(telling, "lfu", 3) == 2 + 2 + 1 + 1 + 2


def test_opt_keeps_the_sooner_reused(tmp_path):
    # K=2: a b c -> c evicts b (never again) rather than a (next use 3); then a, c, a all hit
    t = write_trace(tmp_path / "t.parquet", [[k] for k in (A, B, C, A, C, A)])
    assert _hits_every_path(t, "opt", 2) == 3


def test_decayed_score_ties_go_to_the_least_recent(tmp_path):
    # K=3, top-2. t0 [a, b]: equal scores, a older. t1 [c, d]: d evicts a (not b). t2 [a, e]: a misses and
    # evicts b (oldest score); e evicts c (c, d tie at t1, c older). 0 hits; evicting b at t1 gives a hit.
    t = write_trace(tmp_path / "t.parquet", [[A, B], [C, D], [A, E], [D, A]])
    for name in ("lfu-decay", "lrfu", "gate-weighted"):
        assert _hits_every_path(t, name, 3) == 2  # t3: d and a resident
    assert simulate(t, "lru", 3).hits == 2


def test_underflowed_scores_tie_at_zero_like_the_class(tmp_path):
    # gate-weighted, half-life 1 token: a (weight 0.9) at t0, b (0.1) at t1, then 1200 tokens of x. Both
    # scores underflow to 0.0, so the class evicts the older, a; in exact arithmetic b's score is lower
    # (0.1 * 2 < 0.9). The heap (log scores) must fall back to the class's float comparison.
    keys = [A, B] + [X] * 1200 + [Y, A]
    w = [[0.9], [0.1]] + [[1.0]] * 1201 + [[1.0]]
    t = write_trace(tmp_path / "t.parquet", [[k] for k in keys], weights=w)
    hits = _hits_every_path(t, "gate-weighted", 3, {"half_life": 1.0})
    assert hits == 1199  # the repeated x only: a was evicted by y


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.tuples(st.integers(4, 20), st.integers(1, 6), st.integers(0, 2**32 - 1), st.integers(5, 80),
                      st.sampled_from(HEAPED_NAMES), st.sampled_from(["atomic", "sequential"]),
                      st.sampled_from(["layer", "global"]), st.integers(0, 30), st.sampled_from([0.3, 4.0, 1e9])))
def test_heap_equals_scan_and_class_property(tmp_path_factory, data):
    # widths up to 6 put several row keys at the top of the heap (atomic); sizes from top-k to all keys
    e, k, seed, n, name, semantics, scope, extra, half_life = data
    t, size = skewed_trace(tmp_path_factory.mktemp("p") / "t.parquet", e, k, seed, n, scope, extra, 0.3, weighted=True)
    params = {"lfu-decay": {"half_life": half_life}, "gate-weighted": {"half_life": half_life},
              "lrfu": {"lam": min(1.0, 1.0 / half_life)}}.get(name)
    _hits_every_path(t, name, size, params, scope, semantics)


@pytest.mark.parametrize("name", HEAPED_NAMES)
def test_large_global_cache_takes_the_heap_and_equals_the_class(tmp_path, name):
    rng = np.random.default_rng(3)
    sets = [list(rng.choice(16, 4, replace=False, p=rng.dirichlet(np.ones(16)))) for _ in range(600)]
    t = write_trace(tmp_path / "t.parquet", sets, num_layers=4, num_experts=16)
    for semantics in ("atomic", "sequential"):
        s = build_stream(t, 40, "global", semantics)
        band = state.VECTOR if name in VSCAN_NAMES else state.HEAP
        assert KERNELS[name].layout(s.sizes, s.keys.size, NO_PARAMS) == band
        fast = simulate(t, name, 40, scope="global", semantics=semantics)
        ref = simulate(t, name, 40, scope="global", semantics=semantics, force_generic=True)
        assert fast.method == "numba" and list(fast.layer_hits) == list(ref.layer_hits)


@pytest.mark.parametrize("name,params", [("lfu-decay", {"half_life": 0.5}), ("lrfu", {"lam": 1.0}),
                                         ("gate-weighted", {"half_life": 0.7})])
def test_decaying_priorities_survive_rebasing(tmp_path, name, params):
    # half-lives of about a token: the heap priorities are re-based every few hundred tokens (and
    # long-idle keys underflow), over 1500 tokens; scan, heap and class must still agree
    rng = np.random.default_rng(5)
    sets = [list(rng.choice(12, 2, replace=False, p=rng.dirichlet(np.ones(12) * 0.3))) for _ in range(3000)]
    weights = np.round(rng.dirichlet(np.ones(2), size=len(sets)), 1)
    t = write_trace(tmp_path / "t.parquet", sets, num_layers=2, num_experts=12, weights=weights)
    for semantics in ("atomic", "sequential"):
        _hits_every_path(t, name, 20, params, "global", semantics)


@pytest.mark.parametrize("name", VSCAN_NAMES)
def test_cache_above_the_vector_scan_limit_takes_the_heap_and_equals_the_class(tmp_path, name):
    # 3 layers x 200 experts: a global cache of VSCAN_MAX_SLOTS + 40 slots runs on the heap, one of 300 on the
    # vector scan (whose keys hold slot indices up to 299); both equal the class
    rng = np.random.default_rng(11)
    p = rng.dirichlet(np.ones(200) * 0.2)
    sets = [list(rng.choice(200, 2, replace=False, p=p)) for _ in range(1500)]
    t = write_trace(tmp_path / "t.parquet", sets, num_layers=3, num_experts=200)
    for size, band in ((state.VECTOR_MAX_SLOTS + 40, state.HEAP), (300, state.VECTOR)):
        s = build_stream(t, size, "global", "sequential")
        assert KERNELS[name].layout(s.sizes, s.keys.size, NO_PARAMS) == band
        fast = simulate(t, name, size, scope="global", semantics="sequential")
        ref = simulate(t, name, size, scope="global", semantics="sequential", force_generic=True)
        assert fast.method == "numba" and list(fast.layer_hits) == list(ref.layer_hits)


@settings(deadline=None)
@given(st.lists(st.floats(allow_nan=False, width=64), min_size=2, max_size=2))
def test_orderable_float_keys_sort_like_the_floats_property(xs):
    # the vector scan compares float priorities as int64 keys: their order must be the floats' order
    # (negative ones included: a user's gate weights may be anything), and the mapping must invert
    a, b = xs
    ka, kb = state.orderable(a), state.orderable(b)
    if a < b:
        assert ka < kb
    elif a > b:
        assert ka > kb
    assert state.from_orderable(ka) == a and state.from_orderable(kb) == b


def test_vector_scan_ties_and_near_ties_go_to_the_least_recent(tmp_path):
    # global cache of 10 slots (the vector scan), sequential, one key per token so every key decays from its
    # own tick: keys 0..9 once each (scores 1 * decay(age)), then 10 and 11 once more... each miss evicts the
    # oldest score; with half-life 1e9 the decays round to 1.0 for a while and every key ties: the least
    # recent goes (as LRU), which the truncated keys must not reorder
    keys = list(range(12)) * 3
    t = write_trace(tmp_path / "t.parquet", [[k] for k in keys], num_layers=1, num_experts=12)
    for name, params in (("lfu-decay", {"half_life": 1e9}), ("gate-weighted", None), ("lrfu", {"lam": 1e-12})):
        s = build_stream(t, 10, "global", "sequential")
        assert _kernel_hits(s, name, params, path="vscan") == replay_stream(s, name, params, force_generic=True)[1].tolist()
        assert _hits_every_path(t, name, 10, params, "global", "sequential") == 0  # cyclic over 12 keys in 10: LRU-like
