"""Which policies have the inclusion property (the cache of K slots is always a subset of the cache of
K + 1 slots) under the atomic semantics: proven by property test for the stack policies, and refuted
by a found counterexample for the others."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.policies import ExpertCache, make_policy
from moesim.simulator.replay import next_use_times

STACK = ["lru", "lfu", "opt", "lrfu", "lfu-decay", "gate-weighted"]
NOT_STACK = ["fifo", "lfu-cache", "arc", "sieve", "s3fifo"]


def _first_violation(name, sets, e):
    sets = np.asarray(sets)
    nxt = next_use_times(np.zeros(len(sets), np.int16), sets, e)
    for size in range(sets.shape[1], e):
        small, big = ExpertCache(size, make_policy(name)), ExpertCache(size + 1, make_policy(name))
        for t, row in enumerate(sets.tolist()):
            small.request(row, t, None, nxt[t].tolist())
            big.request(row, t, None, nxt[t].tolist())
            if not small.resident <= big.resident:
                return size, t
    return None


def _random_sets(seed, e, k, n):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(e) * 0.5)
    return [rng.choice(e, k, replace=False, p=p) for _ in range(n)]


@pytest.mark.parametrize("name", STACK)
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), e=st.integers(3, 8), k=st.integers(1, 3), n=st.integers(1, 50))
def test_stack_policies_keep_inclusion(name, seed, e, k, n):
    assert _first_violation(name, _random_sets(seed, e, min(k, e), n), e) is None


@pytest.mark.parametrize("name", NOT_STACK)
def test_other_policies_violate_inclusion(name):
    found = next((v for seed in range(300) if (v := _first_violation(name, _random_sets(seed, 6, 1, 40), 6))), None)
    assert found is not None, f"expected a counterexample to inclusion for {name}"


def test_fifo_beladys_anomaly():
    # the classic sequence: FIFO with 4 frames misses more than with 3
    seq = [[x] for x in (0, 1, 2, 3, 0, 1, 4, 0, 1, 2, 3, 4)]
    misses = {}
    for size in (3, 4):
        cache = ExpertCache(size, make_policy("fifo"))
        misses[size] = sum(len(cache.request(row, t)) for t, row in enumerate(seq))
    assert (misses[3], misses[4]) == (9, 10)
