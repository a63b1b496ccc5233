"""The compiled replay of every built-in policy equals the reference classes (the generic path), hits per
layer, in every scope and semantics, on hand-made, random (hypothesis) and real traces."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.errors import UsageError
from moesim.policies import policy_names
from moesim.simulator.policy_kernels import state
from moesim.simulator.policy_kernels.registry import KERNELS
from moesim.simulator.replay import build_stream, mrc, replay_stream, simulate
from tests.helpers import kernel_hits, random_trace, skewed_sets, write_trace

ALL = policy_names()
SCOPES = [("layer", "atomic"), ("layer", "sequential"), ("global", "atomic"), ("global", "sequential")]
# non-default parameters, so the kernels' reading of them is checked too
PARAMS = {"lrfu": {"lam": 0.7}, "lfu-decay": {"half_life": 3.0}, "gate-weighted": {"half_life": 5.0},
          "s3fifo": {"small_ratio": 0.3, "ghost_ratio": 0.5, "move_to_main": 1}, "random": {"seed": 5},
          "hobbit": {"w_recency": 0.8}, "mrs": {"alpha": 0.3}}


def _same(trace, name, size, scope, semantics, params=None):
    fast = simulate(trace, name, size, scope=scope, semantics=semantics, params=params)
    ref = simulate(trace, name, size, scope=scope, semantics=semantics, params=params, force_generic=True)
    assert fast.method == "numba" and ref.method == "python"
    assert list(fast.layer_hits) == list(ref.layer_hits), (name, size, scope, semantics, params)
    return fast


def test_every_builtin_has_a_compiled_path():
    assert set(KERNELS) == set(ALL)


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    rng = np.random.default_rng(11)
    return random_trace(tmp_path_factory.mktemp("c") / "t.parquet", rng, tokens=250, num_layers=3,
                        num_experts=12, top_k=2, skew=1.1)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("scope,semantics", SCOPES)
def test_compiled_equals_class_every_scope(skewed, name, scope, semantics):
    # layer sizes stay on the scanned small-cache paths; global 20 / 30 slots take the linked lists
    for size in ((2, 3, 7) if scope == "layer" else (2, 20, 30)):
        _same(skewed, name, size, scope, semantics)
    if name in PARAMS:
        _same(skewed, name, 5 if scope == "layer" else 24, scope, semantics, PARAMS[name])


@pytest.mark.parametrize("name", ALL)
def test_compiled_equals_class_per_layer_budgets(skewed, name):
    _same(skewed, name, [2, 0, 5], "layer", "atomic")


sets_strategy = st.integers(3, 24).flatmap(lambda e: st.tuples(
    st.just(e), st.integers(1, min(4, e)), st.integers(0, 2**32 - 1), st.integers(1, 120),
    st.sampled_from(ALL), st.sampled_from(SCOPES), st.integers(0, 40)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=sets_strategy)
def test_compiled_equals_class_on_random_traces_property(tmp_path_factory, data):
    e, k, seed, n, name, (scope, semantics), extra = data
    rng = np.random.default_rng(seed)
    layers = 2
    sets = skewed_sets(rng, e, k, n * layers, 0.4)
    t = write_trace(tmp_path_factory.mktemp("h") / "t.parquet", sets, num_layers=layers, num_experts=e)
    n_keys = e if scope == "layer" else e * layers
    size = min(n_keys, k + extra)
    _same(t, name, size, scope, semantics)


@pytest.mark.parametrize("name", ALL)
def test_compiled_equals_class_on_real_trace(real_trace, name):
    for k in (2, 4):
        _same(real_trace, name, k, "layer", "atomic")
    _same(real_trace, name, 96, "global", "sequential")


def test_lru_lists_and_stamp_scan_agree(skewed):
    # the two lru/fifo layouts (stamp scan <= 16 slots, linked lists above) must give the same hits
    s = build_stream(skewed, 18, "global", "sequential")
    for name in ("lru", "fifo"):
        lists = kernel_hits(s, name, layout=state.LIST)
        scan = kernel_hits(s, name, layout=state.SCAN)
        assert KERNELS[name].layout(s.sizes, s.keys.size, np.zeros(4)) == state.LIST  # 18 slots: the lists
        assert lists == scan == list(replay_stream(s, name, force_generic=True)[1])


def test_random_draws_like_the_class(tmp_path):
    # a full cache of 5 with 3 candidates every time: the victims come from the class's SplitMix64 draws
    t = write_trace(tmp_path / "t.parquet", [[i % 9] for i in range(400)], num_experts=9)
    for seed in (0, 1, 12345):
        _same(t, "random", 5, "layer", "atomic", {"seed": seed})
    a = simulate(t, "random", 5, params={"seed": 1}).hits
    assert any(simulate(t, "random", 5, params={"seed": s}).hits != a for s in (2, 3, 4))


def test_bad_parameters_are_usage_errors(skewed):
    with pytest.raises(UsageError, match="lrfu"):
        simulate(skewed, "lrfu", 4, params={"lam": 2.0})
    with pytest.raises(UsageError, match="lrfu"):
        simulate(skewed, "lrfu", 4, params={"nope": 1})


@pytest.mark.parametrize("name", ["fifo", "arc", "s3fifo", "hobbit"])
def test_mrc_threads_equal_per_size_runs(skewed, name):
    threaded = mrc(skewed, name, [2, 3, 5, 8], workers=2)
    serial = mrc(skewed, name, [2, 3, 5, 8], workers=1)
    assert threaded.method == "per-size runs (compiled, 2 threads)"
    assert threaded.curve == serial.curve
    assert [c["hits"] for c in serial.curve] == [simulate(skewed, name, k, force_generic=True).hits
                                                for k in (2, 3, 5, 8)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.tuples(st.integers(3, 10), st.integers(1, 3), st.integers(0, 2**32 - 1), st.integers(1, 40),
                      st.sampled_from(["lfu", "opt", "lrfu", "lfu-decay", "gate-weighted"]), st.sampled_from(SCOPES)))
def test_one_pass_mrc_of_stack_policies_equals_per_size_runs_property(tmp_path_factory, data):
    e, k, seed, n, name, (scope, semantics) = data
    k = min(k, e)
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(e) * 0.5)
    sets = [list(rng.choice(e, k, replace=False, p=p)) for _ in range(n * 2)]
    t = write_trace(tmp_path_factory.mktemp("m") / "t.parquet", sets, num_layers=2, num_experts=e,
                    weights=rng.dirichlet(np.ones(k), size=len(sets)))
    curve = mrc(t, name, scope=scope, semantics=semantics, params=PARAMS.get(name))
    assert curve.method == "one-pass stack (priority)"
    assert [c["hits"] for c in curve.curve] == [
        simulate(t, name, c["cache_size"], scope=scope, semantics=semantics, params=PARAMS.get(name),
                 force_generic=True).hits for c in curve.curve]
