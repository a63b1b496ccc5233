"""``moesim bound``: the lower bound and the achievable schedule against an exhaustive search over every
eviction and prefetch decision on tiny traces (written here from the model in docs/bound.md, sharing
no code with moesim/simulator/bound.py); lookahead 0 against OPT's replay; the CLI's contract keys."""

from __future__ import annotations

import itertools
import json
from functools import cache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.cli import main
from moesim.simulator.bound import prefetch_bound
from moesim.simulator.replay import simulate
from tests.helpers import write_trace


def brute_force(sets, layers, cache_size, lookahead, budget):
    """Fewest demand misses over all schedules. Row r = token r // layers, layer r % layers. At row r:
    the request is served from the layer's cache or by prefetches pending for r, the rest are misses;
    then any cache content between the set and (old cache + set) within K; then up to ``budget``
    prefetches issued for (row t, expert of t's set) with r < t, t - lookahead <= r, and r after t's
    layer's previous row."""
    n = len(sets)
    layer = [r % layers for r in range(n)]
    prev = [max([q for q in range(r) if layer[q] == layer[r]], default=-1) for r in range(n)]

    @cache
    def best(r, caches, pending):
        if r == n:
            return 0
        want = frozenset(sets[r])
        cache = caches[layer[r]]
        served = cache | {e for (t, e) in pending if t == r}
        misses = len(want - served)
        others = sorted(cache - want)
        pending_left = frozenset(p for p in pending if p[0] != r)
        candidates = [(t, e) for t in range(r + 1, min(n, r + lookahead + 1)) if prev[t] < r
                      for e in sets[t] if (t, e) not in pending_left]
        result = None
        for keep in range(0, min(len(others), cache_size - len(want)) + 1):
            for kept in itertools.combinations(others, keep):
                new = list(caches)
                new[layer[r]] = want | frozenset(kept)
                for m in range(0, min(budget, len(candidates)) + 1):
                    for issue in itertools.combinations(candidates, m):
                        v = best(r + 1, tuple(new), pending_left | frozenset(issue))
                        result = v if result is None else min(result, v)
        return misses + result

    return best(0, tuple(frozenset() for _ in range(layers)), frozenset())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), layers=st.integers(1, 2), experts=st.integers(2, 4), top_k=st.integers(1, 2),
       lookahead=st.integers(0, 3), budget=st.integers(0, 2))
def test_bounds_bracket_the_exhaustive_optimum(tmp_path, data, layers, experts, top_k, lookahead, budget):
    top_k = min(top_k, experts - 1)
    tokens = data.draw(st.integers(2, 6 // layers + 1))
    sets = [data.draw(st.lists(st.integers(0, experts - 1), min_size=top_k, max_size=top_k, unique=True))
            for _ in range(tokens * layers)]
    cache_size = data.draw(st.integers(top_k, experts))
    trace = write_trace(tmp_path / f"t{abs(hash(str(sets)))}.parquet", sets, num_layers=layers, num_experts=experts)
    r = prefetch_bound(trace, cache_size, lookahead, budget)
    exact = brute_force(sets, layers, cache_size, lookahead, budget)
    assert r.misses <= exact <= r.achievable_misses
    assert r.requests == len(sets) * top_k
    if lookahead == 0 or budget == 0:
        assert r.misses == r.achievable_misses == exact == simulate(trace, "opt", cache_size).misses
    if lookahead == 1 or budget >= top_k:  # windows of one row, or a budget that covers a row: exact
        assert r.exact and r.misses == exact


def test_hand_traced_prefetch_saves_what_the_copy_engine_allows(tmp_path):
    # one layer, 2 slots, top-1: a b c a b c. OPT: misses a b c (cold) + 1 more (c evicts a or b) = 4.
    # Lookahead 1, budget 1: every row but the first can be prefetched from the row before: 1 miss.
    sets = [[0], [1], [2], [0], [1], [2]]
    trace = write_trace(tmp_path / "t.parquet", sets, num_layers=1, num_experts=3)
    assert prefetch_bound(trace, 2, 0).misses == 4 == simulate(trace, "opt", 2).misses
    # one layer: the previous row is the same layer's, so no row lies in a window
    assert prefetch_bound(trace, 2, 1, 1).misses == 4
    two = write_trace(tmp_path / "two.parquet", [[0], [5], [1], [6], [2], [7], [0], [5], [1], [6], [2], [7]],
                      num_layers=2, num_experts=8)
    r = prefetch_bound(two, 2, 1, 1)
    assert (r.misses, r.achievable_misses, r.opt_misses) == (1, 1, 8)  # only row 0 has no window
    assert brute_force([[0], [5], [1], [6], [2], [7], [0], [5], [1], [6], [2], [7]], 2, 2, 1, 1) == 1


def test_cli_contract_keys_and_usage_errors(tmp_path, capsys):
    path = tmp_path / "t.parquet"
    write_trace(path, [[0, 1], [2, 3], [1, 2], [0, 3]] * 5, num_layers=2, num_experts=4)
    assert main(["bound", str(path), "--cache-size", "3", "--lookahead", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"cache_size", "lookahead", "requests", "misses"} <= set(out)
    assert (out["cache_size"], out["lookahead"], out["requests"]) == (3, 0, 40)
    assert out["misses"] == simulate(write_trace(tmp_path / "u.parquet", [[0, 1], [2, 3], [1, 2], [0, 3]] * 5,
                                                 num_layers=2, num_experts=4), "opt", 3).misses
    for argv, needle in ((["--cache-size", "1", "--lookahead", "1"], "cache size 1 is smaller than top-k (2)"),
                         (["--cache-size", "3", "--lookahead", "-1"], "--lookahead")):
        try:
            code = main(["bound", str(path), *argv])
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2 and needle in err, err


def test_lookahead_zero_is_opt_on_the_shipped_trace():
    from pathlib import Path

    from moesim.traces.format import read_trace

    trace = read_trace(Path(__file__).resolve().parents[1] / "traces" / "synth-mixtral-8x7b.parquet")
    r = prefetch_bound(trace, 3, 0)
    assert r.misses == r.achievable_misses == simulate(trace, "opt", 3).misses
