"""Contract tests run over EVERY registered policy, plus hypothesis properties of the replay."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.policies import NEVER, ExpertCache, make_policy, policy_class, policy_names
from moesim.simulator.replay import build_stream, mrc, next_use_times, simulate
from tests.helpers import random_trace, write_trace

ALL = policy_names()
FAST = ["lru", "fifo", "lfu", "opt"]


class CheckedCache(ExpertCache):
    """The mechanism with invariants asserted on every step."""

    def admit(self, key, now, protect=()):
        out = super().admit(key, now, protect)
        assert len(self.resident) <= self.capacity
        return out


def _drive(policy_name, sets, capacity, num_experts):
    arr = np.asarray(sets)
    nxt = next_use_times(np.zeros(len(arr), np.int16), arr, num_experts)
    cache = CheckedCache(capacity, make_policy(policy_name))
    hits = 0
    for t, row in enumerate(arr.tolist()):
        before = set(cache.resident)
        missing = cache.request(row, t, [1.0 / len(row)] * len(row), nxt[t].tolist())
        assert missing == [k for k in row if k not in before]  # misses are exactly the non-resident keys
        assert set(row) <= cache.resident  # the whole set is resident afterwards
        hits += len(row) - len(missing)
    return hits


sets_strategy = st.integers(2, 9).flatmap(
    lambda e: st.tuples(st.just(e), st.integers(1, min(3, e)), st.lists(st.integers(0, 10**6), min_size=1, max_size=60)))


def _sets(e, k, seeds):
    rng = np.random.default_rng(seeds[0])
    return [list(rng.choice(e, size=k, replace=False)) for _ in seeds]


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=sets_strategy, extra=st.integers(0, 4))
def test_every_policy_respects_capacity_and_counts(name, data, extra):
    e, k, seeds = data
    sets = _sets(e, k, seeds)
    cap = min(e, k + extra)
    hits = _drive(name, sets, cap, e)
    assert 0 <= hits <= len(sets) * k


@pytest.mark.parametrize("name", ALL)
def test_every_policy_is_deterministic_and_agrees_with_generic_replay(tmp_path, name):
    rng = np.random.default_rng(7)
    t = random_trace(tmp_path / "t.parquet", rng, tokens=200, num_layers=3, num_experts=8, top_k=2)
    a = simulate(t, name, 4)
    b = simulate(t, name, 4)
    g = simulate(t, name, 4, force_generic=True)
    assert a.hits == b.hits == g.hits
    assert a.hits + a.misses == a.requests == 200 * 3 * 2
    assert list(a.layer_requests) == [400, 400, 400]


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("scope,semantics", [("layer", "atomic"), ("layer", "sequential"), ("global", "atomic"),
                                             ("global", "sequential")])
def test_compiled_kernel_equals_reference_classes_per_layer(tmp_path, name, scope, semantics):
    rng = np.random.default_rng(11)
    t = random_trace(tmp_path / "t.parquet", rng, tokens=300, num_layers=4, num_experts=8, top_k=2, skew=1.2)
    size = 3 if scope == "layer" else 10
    fast = simulate(t, name, size, scope=scope, semantics=semantics)
    ref = simulate(t, name, size, scope=scope, semantics=semantics, force_generic=True)
    assert fast.method == "numba" and ref.method == "python"
    assert list(fast.layer_hits) == list(ref.layer_hits)


@pytest.mark.parametrize("name", FAST)
def test_compiled_kernel_equals_reference_on_real_trace(real_trace, name):
    for k in (2, 3, 4, 6):
        assert list(simulate(real_trace, name, k).layer_hits) == \
            list(simulate(real_trace, name, k, force_generic=True).layer_hits)


def test_per_layer_budgets(real_trace):
    budgets = [2, 3, 4, 5] * 8
    r = simulate(real_trace, "lru", budgets)
    g = simulate(real_trace, "lru", budgets, force_generic=True)
    assert list(r.layer_hits) == list(g.layer_hits)
    for layer in (0, 5):
        uniform = simulate(real_trace, "lru", budgets[layer])
        assert r.layer_hits[layer] == uniform.layer_hits[layer]
    off = simulate(real_trace, "lru", [0] + [4] * 31)
    assert off.layer_hits[0] == 0 and off.layer_requests[0] > 0


@settings(max_examples=30, deadline=None)
@given(data=sets_strategy)
def test_opt_is_never_worse_than_any_demand_policy(data):
    e, k, seeds = data
    sets = _sets(e, k, seeds)
    for cap in range(k, e + 1):
        best = _drive("opt", sets, cap, e)
        for name in ALL:
            if not policy_class(name).needs_future:
                assert best >= _drive(name, sets, cap, e), (name, cap)


@settings(max_examples=30, deadline=None)
@given(data=sets_strategy)
def test_lru_and_opt_hits_never_fall_as_the_cache_grows(data):
    e, k, seeds = data
    sets = _sets(e, k, seeds)
    for name in ("lru", "opt", "lfu"):
        hits = [_drive(name, sets, cap, e) for cap in range(k, e + 1)]
        assert hits == sorted(hits), (name, hits)


@pytest.mark.parametrize("name", ["lru", "fifo", "lfu", "opt", "arc", "sieve"])
def test_mrc_equals_per_size_simulate(tmp_path, name):
    rng = np.random.default_rng(3)
    t = random_trace(tmp_path / "t.parquet", rng, tokens=150, num_layers=2, num_experts=6, top_k=2)
    curve = mrc(t, name, workers=1)
    assert [c["cache_size"] for c in curve.curve] == [2, 3, 4, 5, 6]
    for c in curve.curve:
        assert c["hits"] == simulate(t, name, c["cache_size"]).hits
    if name == "lru":
        assert curve.method == "one-pass stack distance"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=sets_strategy)
def test_lru_one_pass_curve_equals_per_size_runs_property(tmp_path_factory, data):
    e, k, seeds = data
    sets = _sets(e, k, seeds)
    path = tmp_path_factory.mktemp("p") / "t.parquet"
    t = write_trace(path, sets, num_experts=e)
    curve = mrc(t, "lru")
    assert [c["hits"] for c in curve.curve] == [simulate(t, "lru", s, force_generic=True).hits
                                               for s in range(k, e + 1)]


def test_next_use_kernel_matches_numpy(real_trace):
    s = build_stream(real_trace, 4)
    ref = next_use_times(real_trace.layer, real_trace.experts, real_trace.meta.num_experts)
    assert (s.next_use() == ref).all()
    assert (ref[ref != NEVER] > np.nonzero(ref != NEVER)[0]).all()


def test_real_trace_table_k2_to_8(real_trace, capsys):
    """The lru/lfu/fifo/opt table on the real Mixtral trace (printed for the record) and its shape."""
    rows = {p: [simulate(real_trace, p, k).hit_rate for k in range(2, 9)] for p in ("lru", "lfu", "fifo", "opt")}
    with capsys.disabled():
        print("\nreal Mixtral-8x7B trace, per-layer caches, hit rate for K = 2..8")
        for p, v in rows.items():
            print(f"  {p:5s} " + " ".join(f"{x:.4f}" for x in v))
    for k in range(7):
        assert rows["opt"][k] >= max(rows[p][k] for p in ("lru", "lfu", "fifo"))
    assert rows["lru"][2] == pytest.approx(0.6242, abs=5e-4) and rows["opt"][2] == pytest.approx(0.7514, abs=5e-4)
    assert len({rows[p][0] for p in rows}) == 1  # K = top-k: every policy holds exactly the current set


@pytest.mark.parametrize("name", ALL)
def test_request_rows_equals_request_one_set_at_a_time(name):
    # the replay's batched loop is the same mechanism as request(): same misses, residents, evictions
    rng = np.random.default_rng(2)
    sets = np.array([rng.choice(9, 3, replace=False) for _ in range(300)])
    nxt = next_use_times(np.zeros(len(sets), np.int16), sets, 9).tolist()
    weights = rng.dirichlet(np.ones(3), size=len(sets)).tolist()
    one, many = ExpertCache(4, make_policy(name)), ExpertCache(4, make_policy(name))
    hits = [3 - len(one.request(row, t, weights[t], nxt[t])) for t, row in enumerate(sets.tolist())]
    assert many.request_rows(sets.tolist(), list(range(len(sets))), weights, nxt) == hits
    assert (many.resident, many.evictions) == (one.resident, one.evictions)
