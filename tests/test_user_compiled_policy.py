"""A user's ScorePolicy (numba functions over per-key state) runs compiled and equals the same policy
written as a plain EvictionPolicy class, hits per layer."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from moesim.errors import UsageError
from moesim.policies import EvictionPolicy
from moesim.policies.compiled import ScorePolicy
from moesim.simulator.replay import mrc, simulate
from tests.helpers import random_trace, write_trace

HALF_LIFE = 8.0


@njit
def _aged_access(state, key, now, weight):
    state[key, 0] = state[key, 0] * 0.5 ** ((now - state[key, 1]) / HALF_LIFE) + weight
    state[key, 1] = now


@njit
def _aged_score(state, key, now):
    return state[key, 0] * 0.5 ** ((now - state[key, 1]) / HALF_LIFE)


@njit
def _count_insert(state, key, now):
    state[key, 2] += 1.0  # insertions so far: a key that keeps coming back is kept longer


@njit
def _aged_score_churn(state, key, now):
    return _aged_score(state, key, now) + 0.25 * state[key, 2]


AGED = ScorePolicy("aged-gate", _aged_score, _aged_access, n_fields=2)
AGED_CHURN = ScorePolicy("aged-churn", _aged_score_churn, _aged_access, on_insert=_count_insert, n_fields=3)


class AgedGate(EvictionPolicy):
    """The same policy written as a plain class (independently: dicts, no numba)."""

    name = "aged-gate-class"
    churn = False

    def __init__(self) -> None:
        self.value: dict[int, float] = {}
        self.stamp: dict[int, int] = {}
        self.inserts: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.tick = 0
        self.now = 0

    def _aged(self, key: int) -> float:
        return self.value.get(key, 0.0) * 0.5 ** ((self.now - self.stamp.get(key, 0)) / HALF_LIFE)

    def on_access(self, key, now, weight=1.0, next_use=0):
        self.now = now
        self.value[key] = self._aged(key) + weight
        self.stamp[key] = now
        self.tick += 1
        self.last[key] = self.tick

    def on_insert(self, key, now):
        self.inserts[key] = self.inserts.get(key, 0) + 1

    def victim(self, candidates):
        bonus = 0.25 if self.churn else 0.0
        return min(candidates, key=lambda k: (self._aged(k) + bonus * self.inserts.get(k, 0), self.last[k]))


class AgedChurn(AgedGate):
    name = "aged-churn-class"
    churn = True


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    rng = np.random.default_rng(5)
    t = random_trace(tmp_path_factory.mktemp("u") / "t.parquet", rng, tokens=200, num_layers=3, num_experts=10,
                     top_k=2, skew=1.0)
    w = rng.dirichlet(np.ones(2), size=len(t))  # distinct routing weights, so the weight argument matters
    return write_trace(tmp_path_factory.mktemp("w") / "t.parquet", t.experts, num_layers=3, num_experts=10,
                       weights=w)


@pytest.mark.parametrize("spec,cls", [(AGED, AgedGate), (AGED_CHURN, AgedChurn)])
@pytest.mark.parametrize("scope,semantics,size", [("layer", "atomic", 3), ("layer", "atomic", 6),
                                                  ("layer", "sequential", 4), ("global", "atomic", 12),
                                                  ("global", "sequential", 17)])
def test_compiled_user_policy_equals_plain_class(trace, spec, cls, scope, semantics, size):
    fast = simulate(trace, spec, size, scope=scope, semantics=semantics)
    plain = simulate(trace, cls, size, scope=scope, semantics=semantics)
    adapter = simulate(trace, spec, size, scope=scope, semantics=semantics, force_generic=True)
    assert (fast.method, plain.method, adapter.method) == ("numba", "python", "python")
    assert fast.policy == spec.name
    assert list(fast.layer_hits) == list(plain.layer_hits) == list(adapter.layer_hits)


def test_the_two_example_policies_differ(trace):
    # guards the comparison above against both sides ignoring the policy
    assert simulate(trace, AGED, 3).hits != simulate(trace, AGED_CHURN, 3).hits


@njit
def _mru_access(state, key, now, weight):
    state[0, 0] += 1.0  # a per-cache request counter (field 0 is unused by the keys)
    state[key, 1] = state[0, 0]


@njit
def _mru_score(state, key, now):
    return -state[key, 1]


def test_hand_traced_mru(tmp_path):
    # a b | c evicts b (most recent) -> {a,c} | a hit | b evicts a (most recent) -> {c,b}: 1 hit
    t = write_trace(tmp_path / "t.parquet", [[0], [1], [2], [0], [1]])
    r = simulate(t, ScorePolicy("mru", _mru_score, _mru_access, n_fields=2), 2)
    assert (r.hits, r.method) == (1, "numba")


@njit
def _no_access(state, key, now, weight):
    pass


@njit
def _equal_score(state, key, now):
    return 0.0


@pytest.mark.parametrize("scope,semantics,size", [("layer", "atomic", 3), ("global", "sequential", 12)])
def test_equal_scores_go_to_the_least_recently_requested(trace, scope, semantics, size):
    # every score ties, so the tie rule alone picks the victims: the compiled loop must be LRU (the class)
    tied = simulate(trace, ScorePolicy("tied", _equal_score, _no_access, n_fields=1), size, scope=scope,
                    semantics=semantics)
    lru = simulate(trace, "lru", size, scope=scope, semantics=semantics, force_generic=True)
    assert (tied.method, lru.method) == ("numba", "python")
    assert list(tied.layer_hits) == list(lru.layer_hits)


def test_mrc_takes_a_score_policy(trace):
    curve = mrc(trace, AGED, [2, 4])
    assert [c["hits"] for c in curve.curve] == [simulate(trace, AgedGate, s).hits for s in (2, 4)]


def test_hooks_must_be_numba_functions():
    with pytest.raises(TypeError, match="njit"):
        ScorePolicy("bad", lambda state, key, now: 0.0)


def test_score_policy_takes_no_params(trace):
    with pytest.raises(UsageError, match="no params"):
        simulate(trace, AGED, 2, params={"x": 1})
