"""The ``random`` policy: its SplitMix64 against the reference outputs, the compiled draws against the
plain-Python ones, the class's victim against a brute-force reading of its rule, and the compiled
replay against the class in every scope, semantics and per-size mrc run."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.policies.eviction import Random
from moesim.policies.seeded import MASK64, draw_below, splitmix64
from moesim.simulator.policy_kernels import randomized
from moesim.simulator.replay import build_stream, mrc, replay_stream, simulate
from tests.helpers import skewed_trace, write_trace


def _outputs(state: int, n: int) -> list[int]:
    out = []
    for _ in range(n):
        state, z = splitmix64(state)
        out.append(z)
    return out


def test_splitmix64_gives_the_reference_outputs():
    # the outputs of the reference C code (Vigna, splitmix64.c) for seeds 0 and 1234567
    assert _outputs(0, 3) == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert _outputs(1234567, 3) == [6457827717110365317, 3203168211198807973, 9817491932198370423]


@settings(max_examples=60, deadline=None)
@given(state=st.integers(0, MASK64), n=st.integers(1, 10_000), k=st.integers(1, 6))
def test_compiled_draws_equal_the_python_draws_property(state, n, k):
    rs = np.array([state], np.uint64)
    ours = []
    for _ in range(k):
        ours.append(int(randomized._draw_below(rs, 0, n)))
    ref = []
    s = state
    for _ in range(k):
        s, r = draw_below(s, n)
        ref.append(r)
    assert ours == ref and int(rs[0]) == s
    assert all(0 <= r < n for r in ref)


def test_draws_below_n_are_uniform():
    # 60000 draws below 6 (rejection of 6, 7 from 3 bits): every value within 4 sigma of 10000
    s, counts = 42, [0] * 6
    for _ in range(60_000):
        s, r = draw_below(s, 6)
        counts[r] += 1
    assert all(abs(c - 10_000) < 4 * (60_000 * (1 / 6) * (5 / 6)) ** 0.5 for c in counts), counts
    assert draw_below(7, 1) == (7, 0)  # nothing to choose: no draw


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 15), st.sets(st.integers(0, 15), max_size=4)),
                    min_size=1, max_size=60), seed=st.integers(0, 2**70))
def test_victim_is_the_drawn_rank_among_the_candidates_in_slot_order_property(ops, seed):
    # a brute-force model of the rule: a list of residents (a newcomer appended, a leaver's place taken
    # by the last), the victim = the candidates in that order, at the rank drawn below their number
    p = Random(seed)
    slots: list[int] = []
    state = seed & MASK64
    for op, key, protect in ops:
        if op == 0 and key not in slots:
            slots.append(key)
            p.on_insert(key, 0)
        elif op == 1 and key in slots:
            i = slots.index(key)
            last = slots.pop()
            if last != key:
                slots[i] = last
            p.on_evict(key)
        elif op == 2:
            candidates = [k for k in slots if k not in protect]
            if candidates:
                offered = sorted(candidates, key=lambda k: (k * 7) % 5)  # the order offered does not matter
                state, r = draw_below(state, len(candidates))
                assert p.victim(offered) == candidates[r]
        assert p.slots == slots


def test_hand_traced_victims(tmp_path):
    # K=3, one layer, top-2 rows: [0, 1] [2, 3]: 2 fills the last slot (slots 0 1 2); 3 misses with 2
    # protected: candidates 0, 1 (slots 0, 1) at the rank drawn below 2 from the seed
    _, r = draw_below(9, 2)
    t = write_trace(tmp_path / "t.parquet", [[0, 1], [2, 3], [1 - r, 2]], num_experts=4)
    # the victim is key r: the third row, the other one and 2, hits twice (once had 1 - r gone)
    res = simulate(t, "random", 3, params={"seed": 9})
    ref = simulate(t, "random", 3, params={"seed": 9}, force_generic=True)
    assert res.hits == ref.hits == 2


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.tuples(st.integers(3, 14), st.integers(1, 5), st.integers(0, 2**32 - 1), st.integers(5, 60),
                      st.sampled_from(["atomic", "sequential"]), st.sampled_from(["layer", "global"]),
                      st.integers(0, 12), st.integers(0, 2**64 - 1)))
def test_compiled_equals_class_property(tmp_path_factory, data):
    e, k, seed, n, semantics, scope, extra, policy_seed = data
    t, size = skewed_trace(tmp_path_factory.mktemp("r") / "t.parquet", e, k, seed, n, scope, extra, 0.4)
    s = build_stream(t, size, scope, semantics)
    params = {"seed": policy_seed}
    fast, ref = replay_stream(s, "random", params), replay_stream(s, "random", params, force_generic=True)
    assert fast[2] == "numba" and fast[1].tolist() == ref[1].tolist()


def test_mrc_per_size_runs_equal_the_class(tmp_path):
    rng = np.random.default_rng(4)
    sets = [list(rng.choice(10, 2, replace=False, p=rng.dirichlet(np.ones(10)))) for _ in range(400)]
    t = write_trace(tmp_path / "t.parquet", sets, num_layers=3, num_experts=10)
    for scope in ("layer", "global"):
        curve = mrc(t, "random", [2, 3, 5, 9], scope=scope, params={"seed": 3})
        assert [c["hits"] for c in curve.curve] == [
            simulate(t, "random", k, scope=scope, params={"seed": 3}, force_generic=True).hits for k in (2, 3, 5, 9)]


def test_seeds_reproduce_and_differ(tmp_path):
    rng = np.random.default_rng(8)
    sets = [list(rng.choice(12, 2, replace=False)) for _ in range(600)]
    t = write_trace(tmp_path / "t.parquet", sets, num_layers=2, num_experts=12)
    runs = {s: simulate(t, "random", 10, scope="global", params={"seed": s}).hits for s in (0, 1, 2, 3)}
    assert simulate(t, "random", 10, scope="global", params={"seed": 1}).hits == runs[1]
    assert len(set(runs.values())) > 1
