"""hobbit on larger caches -- the rank vectors (policy_kernels.hobbit, mid-sized caches) and the
staircase (the largest ones) -- against the slot scan of every candidate's two ranks and the reference
class (itself a brute-force ranking): hand-traced ties, weights at and beyond the ends of [0, 1], and
random streams with sets up to 6 wide (several resident row keys among the candidates' frequency ranks)
in both scopes and semantics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.simulator.policy_kernels import hobbit, state
from moesim.simulator.policy_kernels.registry import KERNELS
from moesim.simulator.replay import build_stream, replay_stream
from tests.helpers import kernel_hits, skewed_trace, write_trace

A, B, C, D = range(4)


def _kernel_hits(stream, params, *, path: str) -> list[int]:
    layout = {"scan": state.SCAN, "staircase": state.HEAP, "ranks": state.VECTOR}[path]
    return kernel_hits(stream, "hobbit", params, layout=layout)


def _hits_every_path(trace, size, params=None, scope="layer", semantics="atomic") -> int:
    s = build_stream(trace, size, scope, semantics)
    ref = replay_stream(s, "hobbit", params, force_generic=True)[1].tolist()
    for path in ("scan", "staircase", "ranks"):
        assert _kernel_hits(s, params, path=path) == ref, path
    return sum(ref)


def test_mid_sized_caches_take_the_rank_vectors_and_the_largest_the_staircase():
    kernel, half = KERNELS["hobbit"], np.array([0.5, 0, 0, 0])
    assert kernel.layout(np.array([state.HEAP_MIN_SLOTS - 1]), 0, half) == state.SCAN
    for k in (state.HEAP_MIN_SLOTS, 128, state.VECTOR_MAX_SLOTS):
        assert kernel.layout(np.array([k]), 0, half) == state.VECTOR
    assert kernel.layout(np.array([state.VECTOR_MAX_SLOTS + 1]), 0, half) == state.HEAP
    # a weight outside [0, 1] breaks the staircase argument: the scan
    assert kernel.layout(np.array([state.VECTOR_MAX_SLOTS + 1]), 0, np.array([1.5, 0, 0, 0])) == state.SCAN
    # the rank vectors count in int32: a stream of more requests than that takes the staircase
    for requests, band in ((hobbit.RANKS_MAX_REQUESTS, state.VECTOR), (hobbit.RANKS_MAX_REQUESTS + 1, state.HEAP)):
        assert kernel.layout(np.array([128]), requests, half) == band
    assert KERNELS["opt"].layout(np.array([128]), hobbit.RANKS_MAX_REQUESTS + 1, half) == state.VECTOR


def test_a_score_tie_goes_to_the_least_recent(tmp_path):
    # K=2, one key a set: a a b | c. Candidates a (recency 0, count 2 -> frequency rank 1) and b (1, 0):
    # both score 0.5 at w=0.5; a is older and goes, so the last b hits (evicting b would miss it)
    t = write_trace(tmp_path / "t.parquet", [[k] for k in (A, A, B, C, B)])
    assert _hits_every_path(t, 2) == 2
    # w=0.4 favours frequency: a scores 0.6, b 0.4 -> b goes, the last b misses
    assert _hits_every_path(t, 2, {"w_recency": 0.4}) == 1


def test_keys_hidden_behind_a_leaving_staircase_key_join_it(tmp_path):
    # K=3, one key a set: b is requested often, then d, e, c, a come and go: each eviction of a staircase
    # key exposes the keys it hid (counting less than the key before it); at every weight the class agrees
    rows = [[k] for k in (A, B, C, B, B, D, 4, C, A, D, B, 4, C)]
    t = write_trace(tmp_path / "t.parquet", rows, num_experts=5)
    for w in (0.0, 0.3, 0.5, 1.0):
        _hits_every_path(t, 3, {"w_recency": w})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.tuples(st.integers(4, 20), st.integers(1, 6), st.integers(0, 2**32 - 1), st.integers(5, 80),
                      st.sampled_from(["atomic", "sequential"]), st.sampled_from(["layer", "global"]),
                      st.integers(0, 30), st.sampled_from([0.0, 0.2, 0.5, 0.5, 0.8, 1.0, 1.5, -0.5])))
def test_every_path_equals_the_class_property(tmp_path_factory, data):
    # the staircase takes the slot scan for weights outside [0, 1] (its argument needs 0 <= w <= 1); the rank
    # vectors take any weight
    e, k, seed, n, semantics, scope, extra, w = data
    t, size = skewed_trace(tmp_path_factory.mktemp("h") / "t.parquet", e, k, seed, n, scope, extra, 0.3)
    _hits_every_path(t, size, {"w_recency": w}, scope, semantics)


@pytest.mark.parametrize("semantics", ["atomic", "sequential"])
def test_a_long_global_stream_equals_the_class(tmp_path, semantics):
    # 64 keys, 24 slots, skewed counts that drift (the staircase keeps changing), 1500 sets of 2
    rng = np.random.default_rng(21)
    sets = []
    for _ in range(5):
        p = rng.dirichlet(np.ones(16) * 0.5)
        sets += [list(rng.choice(16, 2, replace=False, p=p)) for _ in range(300)]
    t = write_trace(tmp_path / "t.parquet", sets, num_layers=4, num_experts=16)
    assert _hits_every_path(t, 24, None, "global", semantics) > 0
