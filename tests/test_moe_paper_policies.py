"""least-stale (SpecMD), lfru (vLLM's expert cache) and mrs (HybriMoE): the compiled kernels and the classes
against brute-force references written here from the sources' own descriptions (docs/policies.md):
tinyserve's two-tier fresh/stale queues, its freq / age ratio (here in exact fractions), and HybriMoE's
eager per-token score update (exact fractions: alpha 1/2 or 1 and weights in eighths keep every float
exact, ties included)."""

from __future__ import annotations

from collections import OrderedDict
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.simulator.replay import simulate
from tests.helpers import write_trace

NAMES = ("least-stale", "lfru", "mrs")


def _rows_of(rows, weights, layers, scope, semantics):
    """(cache, layer, token, [(key, weight)]) in replay order: docs/semantics.md."""
    out = []
    for i, (row, ws) in enumerate(zip(rows, weights, strict=True)):
        layer, token = i % layers, i // layers
        keyed = [((layer, e) if scope == "global" else e, w) for e, w in zip(row, ws, strict=True)]
        cache = layer if scope == "layer" else 0
        out += [(cache, layer, token, [kw]) for kw in keyed] if semantics == "sequential" else \
            [(cache, layer, token, keyed)]
    return out


def brute(name, rows, weights, layers, size, scope, semantics, alpha=Fraction(1, 2)) -> list[int]:
    """Hits per layer."""
    hits = [0] * layers
    state: dict[int, dict] = {}
    for c, layer, token, keyed in _rows_of(rows, weights, layers, scope, semantics):
        s = state.setdefault(c, {"fresh": OrderedDict(), "stale": OrderedDict(), "pass": None, "clock": 0,
                                 "data": {}, "score": {}, "last": {}, "tick": 0, "resident": set(), "token": token})
        row = [k for k, _ in keyed]
        if name == "least-stale" and s["pass"] != token:  # tinyserve's begin_pass: fresh -> stale
            s["stale"].update(s["fresh"])
            s["fresh"].clear()
            s["pass"] = token
        if name == "mrs":  # every score decays once per token (eagerly, all keys)
            for _ in range(token - s["token"]):
                for k in s["score"]:
                    s["score"][k] *= 1 - alpha
            s["token"] = token
        hits[layer] += sum(k in s["resident"] for k in row)
        for k, w in keyed:  # lookups, router order
            if name == "least-stale" and k in s["stale"]:
                del s["stale"][k]
                s["fresh"][k] = True
            elif name == "lfru" and k in s["data"]:
                s["clock"] += 1
                s["data"][k][0] += 1
                s["data"][k][1] = s["clock"]
            elif name == "mrs":
                s["score"][k] = s["score"].get(k, Fraction(0)) + alpha * Fraction(w).limit_denominator(64)
            s["tick"] += 1
            s["last"][k] = s["tick"]
        for k in row:
            if k in s["resident"]:
                continue
            if len(s["resident"]) >= size:
                out = [x for x in s["resident"] if x not in row]
                if name == "least-stale":
                    v = next((x for x in s["stale"] if x not in row), None)
                    v = v if v is not None else next(x for x in s["fresh"] if x not in row)
                    s["stale"].pop(v, None)
                    s["fresh"].pop(v, None)
                elif name == "lfru":
                    v = min(out, key=lambda x: (Fraction(s["data"][x][0], s["clock"] - s["data"][x][1] + 1),
                                                s["data"][x][2]))
                    del s["data"][v]
                else:
                    v = min(out, key=lambda x: (s["score"][x], s["last"][x]))
                s["resident"].remove(v)
            s["resident"].add(k)
            if name == "least-stale":
                s["fresh"][k] = True
            elif name == "lfru":
                s["clock"] += 1
                s["data"][k] = [1, s["clock"], s["clock"]]  # uses, last use, insertion
    return hits


def test_hand_traced_least_stale(tmp_path):
    # K=3, top-2, per layer: t0 [a b] t1 [c a] t2 [d b] t3 [a c]. t1: a (stale) hits and turns fresh, c
    # fills. t2: b hits and turns fresh; d evicts the oldest stale key: a (fresh in t1, before c).
    # t3: c hits; a evicts the oldest stale key: b (fresh in t2, before d). 3 hits (LRU: 3 too, other victims)
    t = write_trace(tmp_path / "t.parquet", [[0, 1], [2, 0], [3, 1], [0, 2]])
    assert simulate(t, "least-stale", 3).hits == 3
    assert simulate(t, "least-stale", 3).hits == simulate(t, "least-stale", 3, force_generic=True).hits


def test_least_stale_is_lru_in_a_replay_and_differs_after_a_prefetch(tmp_path):
    # a key is requested at most once per token in a replay (its layer is part of it), so its first request
    # in a token is every request, and one key at a time (sequential) least-stale gives LRU's hits (a set at
    # once differs: the set's hits move, then its misses enter, where LRU orders the whole set by router
    # order) ...
    rng = np.random.default_rng(3)
    sets = [list(rng.choice(8, 2, replace=False, p=rng.dirichlet(np.ones(8) * 0.5))) for _ in range(600)]
    t = write_trace(tmp_path / "t.parquet", sets, num_layers=3)
    for scope, size in (("layer", 4), ("global", 9)):
        assert list(simulate(t, "least-stale", size, scope=scope, semantics="sequential").layer_hits) == \
            list(simulate(t, "lru", size, scope=scope, semantics="sequential").layer_hits)
    # ... but a key prefetched in a token and requested in the same token stays where it entered (tinyserve:
    # a fresh hit does not move), where LRU moves it: K=2, a and b prefetched at token 0, then b and a
    # requested at token 0; c at token 1 evicts b under LRU (requested before a) and a under least-stale
    # (it entered the queue first, and neither moved)
    from moesim.policies import make_policy
    from moesim.policies.base import ExpertCache

    victims = {}
    for name in ("lru", "least-stale"):
        cache = ExpertCache(2, make_policy(name))
        cache.admit(0, 0)
        cache.admit(1, 0)
        cache.request([1], 0)
        cache.request([0], 0)
        cache.request([2], 1)
        victims[name] = ({0, 1} - set(cache.resident)).pop()
    assert victims == {"lru": 1, "least-stale": 0}


def test_hand_traced_lfru(tmp_path):
    # K=2, one expert a token: a a a b | c b a. Clock 1 (a in), 2, 3 (a hits: 3 uses), 4 (b in, 1 use).
    # c: a scores 3 / (4 - 3 + 1) = 1.5, b 1 / 1: b goes, c in at 5. b: a 3 / 3 ties c's 1 / 1: the earlier
    # inserted, a, goes; b in at 6. a: c 1 / 2 < b 1 / 1: c goes. Hits: the two repeated a only
    t = write_trace(tmp_path / "t.parquet", [[0], [0], [0], [1], [2], [1], [0]])
    r = simulate(t, "lfru", 2)
    assert r.hits == 2
    assert list(r.layer_hits) == list(simulate(t, "lfru", 2, force_generic=True).layer_hits)


def test_hand_traced_mrs(tmp_path):
    # K=2, alpha 1/2, one expert a token: a (w 1) b (w 1/4) c b c. At c: a = 1/2 * (1/2)^2 = 1/8, b = 1/8 * 1/2:
    # b goes although more recent. At b: a = 1/16 < c = 1/4: a goes. The last c hits
    t = write_trace(tmp_path / "t.parquet", [[0], [1], [2], [1], [2]], weights=[[1.0], [0.25], [1.0], [1.0], [1.0]])
    r = simulate(t, "mrs", 2)
    assert r.hits == 1  # the last c
    assert r.hits == brute("mrs", [[0], [1], [2], [1], [2]], [[1.0], [0.25], [1.0], [1.0], [1.0]], 1, 2, "layer",
                           "atomic")[0]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), name=st.sampled_from(NAMES), scope=st.sampled_from(["layer", "global"]),
       semantics=st.sampled_from(["atomic", "sequential"]), alpha=st.sampled_from([0.5, 1.0]))
def test_kernels_and_classes_equal_the_brute_force_property(tmp_path_factory, data, name, scope, semantics, alpha):
    experts, layers = data.draw(st.integers(3, 8)), data.draw(st.integers(1, 3))
    top_k = data.draw(st.integers(1, min(3, experts)))
    tokens = data.draw(st.integers(1, 30))
    hot = data.draw(st.integers(top_k, experts))  # a skew: most picks among the first `hot` experts
    rows = [data.draw(st.permutations(range(hot) if data.draw(st.booleans()) else range(experts)))[:top_k]
            for _ in range(tokens * layers)]
    weights = [[data.draw(st.integers(1, 8)) / 8 for _ in range(top_k)] for _ in rows]
    size = data.draw(st.integers(top_k, experts * (layers if scope == "global" else 1)))
    t = write_trace(tmp_path_factory.mktemp("p") / "t.parquet", rows, num_layers=layers, num_experts=experts,
                    weights=weights)
    params = {"alpha": alpha} if name == "mrs" else None
    want = brute(name, rows, weights, layers, size, scope, semantics, Fraction(alpha))
    fast = simulate(t, name, size, scope=scope, semantics=semantics, params=params)
    ref = simulate(t, name, size, scope=scope, semantics=semantics, params=params, force_generic=True)
    assert fast.method == "numba"
    assert list(fast.layer_hits) == list(ref.layer_hits) == want


@pytest.mark.parametrize("alpha", [0.1, 0.37, 0.9])
def test_mrs_kernel_equals_the_class_at_any_alpha(tmp_path, alpha):
    # floats that are not exact: the kernel must compute the class's very floats (its decay table included)
    rng = np.random.default_rng(7)
    sets = [list(rng.choice(12, 2, replace=False, p=rng.dirichlet(np.ones(12) * 0.4))) for _ in range(4000)]
    weights = rng.dirichlet(np.ones(2), size=len(sets))
    t = write_trace(tmp_path / "t.parquet", sets, num_layers=2, num_experts=12, weights=weights)
    for scope, size in (("layer", 4), ("global", 10)):
        fast = simulate(t, "mrs", size, scope=scope, params={"alpha": alpha})
        ref = simulate(t, "mrs", size, scope=scope, params={"alpha": alpha}, force_generic=True)
        assert list(fast.layer_hits) == list(ref.layer_hits)


def test_bad_alpha_is_a_usage_error(tmp_path):
    from moesim.errors import UsageError

    t = write_trace(tmp_path / "t.parquet", [[0, 1]])
    with pytest.raises(UsageError, match="alpha"):
        simulate(t, "mrs", 2, params={"alpha": 0.0})
