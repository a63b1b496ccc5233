"""The generic path's loops (ExpertCache.request_rows / request_columns, unrolled for sets of one and two
keys) make exactly the calls a literal reading of docs/semantics.md makes, and a user's plain policy class
with every hook overridden replays like the compiled kernel of the same policy in every scope and
semantics."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.policies import EvictionPolicy
from moesim.policies.base import NEVER, ExpertCache, reads_argument
from moesim.simulator.replay import simulate
from tests.helpers import write_trace

SCOPES = [("layer", "atomic"), ("layer", "sequential"), ("global", "atomic"), ("global", "sequential")]


def literal_rows(cache_size: int, policy: EvictionPolicy, rows, clocks, weights, next_uses):
    """docs/semantics.md's atomic step, written out plainly (the oracle): count, touch, insert."""
    resident: set[int] = set()
    hits, evictions = [], 0
    policy.attach(cache_size)
    for keys, now, ws, nus in zip(rows, clocks, weights, next_uses, strict=True):
        missing = [k for k in keys if k not in resident]
        hits.append(len(keys) - len(missing))
        for k, w, nu in zip(keys, ws, nus, strict=True):
            policy.on_access(k, now, w, nu)
        for k in missing:
            if len(resident) >= cache_size:
                victim = policy.victim([x for x in resident if x not in keys])
                resident.discard(victim)
                policy.on_evict(victim)
                evictions += 1
            resident.add(k)
            policy.on_insert(k, now)
    return hits, resident, evictions


class Logger(EvictionPolicy):
    """Every hook overridden and logged; the victim depends on the candidates' order, so the log
    also proves the candidates are offered in the same order."""

    name = "logger"

    def __init__(self) -> None:
        self.log: list[tuple] = []

    def attach(self, capacity: int) -> None:
        self.log.append(("attach", capacity))

    def on_access(self, key, now, weight=1.0, next_use=NEVER):
        self.log.append(("access", key, now, weight, next_use))

    def on_insert(self, key, now):
        self.log.append(("insert", key, now))

    def on_evict(self, key):
        self.log.append(("evict", key))

    def victim(self, candidates):
        self.log.append(("victim", list(candidates)))
        return candidates[(len(self.log) * 7 + sum(candidates)) % len(candidates)]


def _sets(rng, n, width, n_keys=9):
    return [rng.choice(n_keys, width, replace=False).tolist() for _ in range(n)]


@pytest.mark.parametrize("width", [1, 2, 3])
@pytest.mark.parametrize("capacity", [3, 5])
def test_loops_make_the_literal_calls(width, capacity):
    rng = np.random.default_rng(width * 10 + capacity)
    rows = _sets(rng, 400, width)
    clocks = list(range(len(rows)))
    weights = rng.random((len(rows), width)).tolist()
    nxt = rng.integers(0, 1000, (len(rows), width)).tolist()
    oracle = Logger()
    hits, resident, evictions = literal_rows(capacity, oracle, rows, clocks, weights, nxt)
    for entry in ("rows", "columns"):
        cache = ExpertCache(capacity, Logger())
        if entry == "rows":
            got = cache.request_rows(rows, clocks, weights, nxt)
        else:
            got = cache.request_columns([list(c) for c in zip(*rows, strict=True)], clocks,
                                        [list(c) for c in zip(*weights, strict=True)],
                                        [list(c) for c in zip(*nxt, strict=True)])
        assert got == hits
        assert (cache.resident, cache.evictions) == (resident, evictions)
        assert cache.policy.log == oracle.log
    assert evictions > 50  # the victims were exercised


def test_rows_of_mixed_sizes_and_one_set_at_a_time_agree():
    rng = np.random.default_rng(4)
    rows = [rng.choice(9, int(rng.integers(1, 4)), replace=False).tolist() for _ in range(300)]
    clocks = list(range(len(rows)))
    oracle = Logger()
    hits, resident, _ = literal_rows(4, oracle, rows, clocks, [[1.0] * len(r) for r in rows],
                                     [[NEVER] * len(r) for r in rows])
    many, one = ExpertCache(4, Logger()), ExpertCache(4, Logger())
    assert many.request_rows(rows, clocks) == hits
    assert [len(r) - len(one.request(r, t)) for t, r in enumerate(rows)] == hits
    assert many.policy.log == one.policy.log == oracle.log and many.resident == one.resident == resident


class Illegal(EvictionPolicy):
    """Returns an illegal victim as soon as it can: a key of the current set (resident, or the one
    being inserted), a key that is not resident, or something that is not a key at all."""

    name = "illegal"

    def __init__(self, kind: str) -> None:
        self.kind, self.current, self.now = kind, [], -1

    def on_access(self, key, now, weight=1.0, next_use=NEVER):
        if now != self.now:
            self.current, self.now = [], now
        self.current.append(key)

    def victim(self, candidates):
        if self.kind == "in set":
            return self.current[len(self.current) // 2]
        return {"absent": 99, "unhashable": [1]}[self.kind]


@pytest.mark.parametrize("width", [1, 2, 3])
@pytest.mark.parametrize("kind", ["in set", "absent", "unhashable"])
def test_an_illegal_victim_is_a_clear_error(width, kind):
    rng = np.random.default_rng(width)
    rows = _sets(rng, 200, width)
    for entry in ("rows", "one at a time"):
        cache = ExpertCache(4, Illegal(kind))
        with pytest.raises(RuntimeError, match=r"policy 'illegal' chose victim .* outside the candidates"):
            if entry == "rows":
                cache.request_rows(rows, list(range(len(rows))))
            else:
                for t, r in enumerate(rows):
                    cache.request(r, t)


def test_every_in_set_victim_position_is_refused():
    # top-2, both orders: the set's resident key and the key being inserted are both refused
    for rows in ([[0, 1], [2, 3], [4, 5], [6, 0]], [[0, 1], [2, 3], [4, 5], [0, 6]]):
        for pick in (0, 1):
            class Pick(Illegal):
                def victim(self, candidates, pick=pick):
                    return self.current[pick] if len(self.current) == 2 and self.now == 3 else candidates[0]

            with pytest.raises(RuntimeError, match="chose victim"):
                ExpertCache(4, Pick("in set")).request_rows(rows, [0, 1, 2, 3])


class UserLRU(EvictionPolicy):
    """LRU written naturally, every hook overridden; on_insert / on_evict check the mechanism's calls."""

    name = "user-lru-all"

    def __init__(self) -> None:
        self.tick = 0
        self.last: dict[int, int] = {}
        self.held: set[int] = set()

    def on_access(self, key, now, weight=1.0, next_use=NEVER):
        self.tick += 1
        self.last[key] = self.tick

    def on_insert(self, key, now):
        assert key not in self.held
        self.held.add(key)

    def on_evict(self, key):
        self.held.remove(key)

    def victim(self, candidates):
        assert set(candidates) <= self.held
        return min(candidates, key=self.last.__getitem__)


class UserFIFO(EvictionPolicy):
    name = "user-fifo"

    def __init__(self) -> None:
        self.order: dict[int, int] = {}
        self.tick = 0

    def on_insert(self, key, now):
        self.tick += 1
        self.order[key] = self.tick

    def on_evict(self, key):
        del self.order[key]

    def victim(self, candidates):
        return min(candidates, key=self.order.__getitem__)


class UserGateWeighted(EvictionPolicy):
    """Reads the routing weight: the generic path must pass it."""

    name = "user-gate"

    def __init__(self) -> None:
        self.score: dict[int, float] = {}
        self.last: dict[int, int] = {}
        self.tick = 0

    def on_access(self, key, now, weight=1.0, next_use=NEVER):
        self.score[key] = self.score.get(key, 0.0) + weight
        self.tick += 1
        self.last[key] = self.tick

    def victim(self, candidates):
        return min(candidates, key=lambda k: (self.score[k], self.last[k], k))


class UserOPT(EvictionPolicy):
    name = "user-opt"
    needs_future = True

    def __init__(self) -> None:
        self.nxt: dict[int, int] = {}

    def on_access(self, key, now, weight=1.0, next_use=NEVER):
        self.nxt[key] = next_use

    def victim(self, candidates):
        return max(candidates, key=lambda k: (self.nxt[k], -k))


@pytest.fixture(scope="module", params=[1, 2, 3], ids=["top1", "top2", "top3"])
def weighted_trace(request, tmp_path_factory):
    k = request.param
    rng = np.random.default_rng(20 + k)
    p = 1.0 / np.arange(1, 9) ** 0.8
    sets = np.array([rng.choice(8, k, replace=False, p=p / p.sum()) for _ in range(3 * 300)])
    weights = rng.dirichlet(np.ones(k) * 0.5, size=len(sets))
    return write_trace(tmp_path_factory.mktemp("g") / "t.parquet", sets, num_layers=3, num_experts=8,
                       weights=weights)


@pytest.mark.parametrize("user, builtin", [(UserLRU, "lru"), (UserFIFO, "fifo"), (UserGateWeighted, "gate-weighted"),
                                           (UserOPT, "opt")])
@pytest.mark.parametrize("scope, semantics", SCOPES)
def test_user_class_equals_compiled_kernel(weighted_trace, user, builtin, scope, semantics):
    k = weighted_trace.meta.top_k
    for size in ([k + 1, 2 * k + 1] if scope == "layer" else [3 * k + 1, 6 * k]):
        mine = simulate(weighted_trace, user, size, scope=scope, semantics=semantics)
        ref = simulate(weighted_trace, builtin, size, scope=scope, semantics=semantics)
        assert (mine.method, ref.method) == ("python", "numba")
        assert list(mine.layer_hits) == list(ref.layer_hits), (builtin, size, scope, semantics)
        assert 0 < mine.hits < mine.requests


def test_routing_weights_change_the_outcome(weighted_trace):
    # so that passing 1.0 instead of the weight would fail the test above
    if weighted_trace.meta.top_k == 1:
        pytest.skip("with top-1 every weight is 1")
    k = weighted_trace.meta.top_k
    assert simulate(weighted_trace, UserGateWeighted, k + 1).hits != simulate(weighted_trace, "lfu", k + 1).hits


def test_reads_argument():
    class P(EvictionPolicy):
        def on_access(self, key, now, weight=1.0, next_use=NEVER):
            self.k = key

        def reads(self, key, now, w, next_use=NEVER):
            self.k = key * w

        def passes_on(self, key, now, weight=1.0, next_use=NEVER):
            super().on_access(key, now, weight)

        def closure(self, key, now, weight=1.0, next_use=NEVER):
            return lambda: weight

        def looks_up_locals(self, key, now, weight=1.0, next_use=NEVER):
            return locals()

        def star(self, *args):
            pass

        def short(self, key):
            pass

    p = P()
    assert not reads_argument(p.on_access, 2)
    assert reads_argument(p.on_access, 0)
    for m in (p.reads, p.passes_on, p.closure, p.looks_up_locals, p.star, p.short):
        assert reads_argument(m, 2), m.__name__
    assert reads_argument(print, 2)  # not a Python function: assume it reads
    assert ExpertCache(2, UserGateWeighted()).reads_weights and not ExpertCache(2, UserLRU()).reads_weights
