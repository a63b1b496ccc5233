"""Hybrid execution in the timing model (issue 24): hand-traced timelines of copy, CPU, low-bit and the
rules that mix them on a 2-layer toy; the dynamic split against every plan tried by brute force; the
accounting invariants (executed counts, bytes, pinned experts) against references written here."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.cli import main
from moesim.errors import DataError, SettingError
from moesim.policies.execution import EXECUTORS, ExecutionPolicy, Pinned, parse_execution
from moesim.simulator.cost_model import DEFAULT_CPU, CostModel
from moesim.simulator.replay import simulate
from moesim.simulator.timing import simulate_timing
from tests.helpers import random_trace, write_trace

MS = 1e-3


def toy_cost(**kw) -> CostModel:
    """Round numbers: attention 0.5 ms, GPU expert 1 ms, copy 2 ms (low-bit 0.5 ms), CPU expert 3 ms at
    one token, hidden-state hop 0.25 ms each way, nothing else."""
    c = CostModel.preset("a6000").with_overrides(
        expert_ms=1, layer_ms=0.5, token_ms=0, pcie_latency_us=0, pcie_gbps=10.0, miss_issue_us=0,
        routing_handoff_us=0, host_copy_issue_us=0, predict_us=0, copy_hop_us=0, ready_hop_us=0, **kw)
    c.expert_bytes_by_quant = {**c.expert_bytes_by_quant, "hqq2": 20_000_000, "hqq1": 5_000_000}
    c.cpu = {**c.cpu, "format": "int8", "expert_s": {"int8": [[1, 3 * MS], [4, 6 * MS]]}, "thread_curve": [],
             "hop_s": 0.25 * MS}
    return c


class Plan(ExecutionPolicy):
    """Every layer's misses by a fixed plan (the brute-force reference's executor)."""

    def __init__(self, plan) -> None:
        self.plan = list(plan) if not isinstance(plan, str) else plan
        self.name = f"plan {plan}"

    def choose(self, layer, misses, estimate):
        return [self.plan] * len(misses) if isinstance(self.plan, str) else self.plan[: len(misses)]


@pytest.fixture
def toy(tmp_path):
    """One token, two layers, experts 0 and 1 in each (weights 0.9 / 0.1); a cold cache of 2: all miss."""
    return write_trace(tmp_path / "toy.parquet", [[0, 1], [0, 1]], num_layers=2, weights=[[0.9, 0.1]] * 2)


# hand-traced (ms): attn 0-0.5; then per executor (see the docstring of each case)
HAND = {
    # copies 0.5-2.5, 2.5-4.5; experts 2.5-3.5, 4.5-5.5 | attn 5.5-6; copies 6-8, 8-10; experts 8-9, 10-11
    "copy": (11.0, {"copy": 4}),
    # hidden on the host 0.75; CPU 0.75-3.75, 3.75-6.75; back 7.0 | attn 7-7.5; CPU 7.75-13.75; back 14
    "cpu": (14.0, {"cpu": 4}),
    # low-bit copies 0.5-1, 1-1.5; experts 1-2, 2-3 | attn 3-3.5; copies 3.5-4, 4-4.5; experts 4-5, 5-6
    "lowbit": (6.0, {"lowbit": 4}),
    # layer 0 on the CPU (back at 7.0) | attn 7-7.5; copies 7.5-9.5, 9.5-11.5; experts 9.5-10.5, 11.5-12.5
    "n-cpu-moe=1": (12.5, {"cpu": 2, "copy": 2}),
    # E0: copy lands 2.5, CPU back 4.0 -> copy; E1: copy 4.5, CPU 4.0 -> CPU; expert E0 2.5-3.5, merge 4.0 |
    # attn 4-4.5; E0: copy 4.5-6.5 vs CPU back 8.0 -> copy; E1: copy 8.5 vs CPU 8.0 -> CPU; merge 8.0
    "fiddler": (8.0, {"copy": 2, "cpu": 2}),
    # per layer the best of 0, 1 or 2 misses on the CPU: layer 0 finishes at 5.5, 4.0, 7.0 -> 1 (E0,
    # the first of the fewest tokens); layer 1 at 9.5, 8.0, 11.0 -> 1
    "hybrid": (8.0, {"copy": 2, "cpu": 2}),
    # E1's weight 0.1 < 0.2: low-bit; E0 copied. Copies 0.5-2.5 (E0), 2.5-3.0 (E1); experts 2.5-3.5,
    # 3.5-4.5 | attn 4.5-5; copies 5-7, 7-7.5; experts 7-8, 8-9
    "hobbit": (9.0, {"copy": 2, "lowbit": 2}),
}


@pytest.mark.parametrize("spec", list(HAND))
def test_hand_traced_two_layer_timelines(toy, spec):
    execution = Plan(spec) if spec in ("copy", "cpu", "lowbit") else spec
    r = simulate_timing(toy, "lru", 2, toy_cost(), execution=execution, engine="python")
    total_ms, counts = HAND[spec]
    assert r.total_s * 1e3 == pytest.approx(total_ms, abs=1e-9)
    assert r.executed == dict.fromkeys(EXECUTORS, 0) | counts
    copies, lowbits = counts.get("copy", 0), counts.get("lowbit", 0)
    assert r.to_dict()["bytes_h2d"] == copies * 20_000_000 + lowbits * 5_000_000


# hand-traced with the CPU twice as slow beside copies (ms). "copy,cpu": attn 0-0.5; E0 copy 0.5-2.5; E1 on
# the host at 0.75, while the copy runs: CPU 0.75-6.75 (6, not 3), back 7.0; expert E0 2.5-3.5, merge 7.0 |
# attn 7-7.5; copy 7.5-9.5; CPU 7.75-13.75, back 14.0 (8.0 without the factor). "cpu" and "n-cpu-moe=1":
# no copy runs while their CPU experts start (layer 1's copies start after layer 0's merge): as in HAND.
BESIDE = {"copy,cpu": (14.0, 8.0), "cpu": (14.0, 14.0), "n-cpu-moe=1": (12.5, 12.5)}


@pytest.mark.parametrize("spec", list(BESIDE))
def test_cpu_experts_beside_copies_are_priced_at_the_measured_factor(toy, spec):
    execution = Plan(spec.split(",")) if "," in spec else Plan(spec) if spec == "cpu" else spec
    for factor, want in zip((2.0, 1.0), BESIDE[spec], strict=True):
        cost = toy_cost()
        cost.cpu = {**cost.cpu, "beside_copies": factor}
        r = simulate_timing(toy, "lru", 2, cost, execution=execution, engine="python")
        assert r.total_s * 1e3 == pytest.approx(want, abs=1e-9), factor


# hand-traced with an after-idle curve of (0.5 ms idle: +0.4 ms), (2 ms: +1.0 ms) (ms). "cpu": the hidden state
# on the host 0.75, the CPU idle since 0: E0 0.75-4.25 (+0.5 for 0.75 idle), E1 4.25-7.25 (back to back: +0),
# back 7.5 | attn 7.5-8; E0 8.25-11.85 (+0.6 for 1.0 idle since 7.25), E1 11.85-14.85, back 15.1.
# "n-cpu-moe=1": layer 0 as above, back 7.5 | attn 7.5-8; copies 8-10, 10-12; experts 10-11, 12-13.
# "copy": no CPU work, as in HAND.
AFTER_IDLE = {"cpu": 15.1, "n-cpu-moe=1": 13.0, "copy": 11.0}


@pytest.mark.parametrize("spec", list(AFTER_IDLE))
def test_cpu_experts_after_an_idle_gap_pay_the_measured_wake_up(toy, spec):
    cost = toy_cost()
    cost.cpu = {**cost.cpu, "after_idle": [[0.5 * MS, 0.4 * MS], [2 * MS, 1.0 * MS]]}
    r = simulate_timing(toy, "lru", 2, cost, execution=Plan(spec) if spec in ("cpu", "copy") else spec,
                        engine="python")
    assert r.total_s * 1e3 == pytest.approx(AFTER_IDLE[spec], abs=1e-9)


def test_after_idle_curve_is_linear_from_zero_and_flat_past_its_last_point():
    cost = toy_cost()
    assert cost.cpu_after_idle_seconds(1.0) == 0.0   # no curve: no term
    cost.cpu = {**cost.cpu, "after_idle": [[0.5 * MS, 0.4 * MS], [2 * MS, 1.0 * MS]]}
    for idle_ms, extra_ms in ((0, 0), (0.25, 0.2), (0.5, 0.4), (1.25, 0.7), (2, 1.0), (50, 1.0), (-1, 0)):
        assert cost.cpu_after_idle_seconds(idle_ms * MS) == pytest.approx(extra_ms * MS, abs=1e-15), idle_ms


# hand-traced with copies 1.5 times as long beside CPU experts (transfer 2 -> 3 ms). "copy,cpu": attn 0-0.5;
# E1's CPU work will run 0.75-3.75, so E0's copy from 0.5 (2.5 unslowed) overlaps it: 0.5-3.5; CPU back 4.0;
# expert E0 3.5-4.5 | attn 4.5-5; CPU 5.25-8.25 (back 8.5); copy 5-8; expert 8-9: 9.0 (8.0 unslowed, BESIDE).
# "n-cpu-moe=1": layer 1's copies start at 7.5, after layer 0's CPU work ended (6.75): as in HAND.
# "copy": no CPU work: as in HAND.
COPIES_BESIDE = {"copy,cpu": 9.0, "n-cpu-moe=1": 12.5, "copy": 11.0}


@pytest.mark.parametrize("spec", list(COPIES_BESIDE))
def test_copies_that_overlap_cpu_experts_are_priced_at_the_measured_factor(toy, spec):
    execution = Plan(spec.split(",")) if "," in spec else Plan(spec) if spec == "copy" else spec
    cost = toy_cost()
    cost.cpu = {**cost.cpu, "copies_beside_cpu": 1.5}
    r = simulate_timing(toy, "lru", 2, cost, execution=execution, engine="python")
    assert r.total_s * 1e3 == pytest.approx(COPIES_BESIDE[spec], abs=1e-9)


def _copy_spans_ms(path) -> list[tuple[float, float]]:
    events = json.loads(path.read_text())["traceEvents"]
    return [(e["ts"] / 1e3, e["dur"] / 1e3) for e in events if e["tid"].startswith("copy")]


def test_only_the_transfer_of_a_copy_that_overlaps_cpu_work_is_slowed(tmp_path):
    """One layer, three cold misses: E0 and E1 copied (0.5 ms issue + 2 ms transfer each), E2 on a 1 ms CPU
    expert (0.75-1.75). E0's copy from 0.5 overlaps it: 0.5 + 2 x 1.5 = 3.5 ms, 0.5-4.0; E1's waits for
    the copy stream until 4.0, after the CPU work: 2.5 ms unslowed, 4.0-6.5."""
    t = write_trace(tmp_path / "three.parquet", [[0, 1, 2]], num_layers=1)
    for factor, want in ((1.5, [(0.5, 3.5), (4.0, 2.5)]), (1.0, [(0.5, 2.5), (3.0, 2.5)])):
        cost = toy_cost().with_overrides(miss_issue_us=500)
        cost.cpu = {**cost.cpu, "expert_s": {"int8": [[1, 1 * MS]]}, "copies_beside_cpu": factor}
        path = tmp_path / f"t{factor}.json"
        simulate_timing(t, "lru", 3, cost, execution=Plan(["copy", "copy", "cpu"]), timeline=path)
        assert _copy_spans_ms(path) == [pytest.approx(x, abs=1e-6) for x in want], factor


def test_a_copy_that_ends_before_the_cpu_work_starts_is_not_slowed(tmp_path):
    """A 3 ms hop: E1's CPU work starts at 3.5, after E0's copy (0.5-2.5) has landed."""
    t = write_trace(tmp_path / "two.parquet", [[0, 1]], num_layers=1)
    cost = toy_cost()
    cost.cpu = {**cost.cpu, "hop_s": 3 * MS, "copies_beside_cpu": 1.5}
    simulate_timing(t, "lru", 2, cost, execution=Plan(["copy", "cpu"]), timeline=tmp_path / "t.json")
    assert _copy_spans_ms(tmp_path / "t.json") == [pytest.approx((0.5, 2.0), abs=1e-6)]


def test_fiddler_and_hybrid_put_different_experts_on_the_cpu(toy, tmp_path):
    """The two rules tie on time above but not on which expert goes to the CPU: the timeline says which."""
    names = {}
    for spec in ("fiddler", "hybrid"):
        path = tmp_path / f"{spec}.json"
        simulate_timing(toy, "lru", 2, toy_cost(), execution=spec, timeline=path)
        names[spec] = sorted(e["name"] for e in json.loads(path.read_text())["traceEvents"]
                             if e["tid"] == "cpu")
    assert names == {"fiddler": ["cpu expert L0 E1", "cpu expert L1 E1"],
                     "hybrid": ["cpu expert L0 E0", "cpu expert L1 E0"]}


def test_hybrid_split_is_the_best_plan_by_brute_force(tmp_path):
    """One layer, four cold misses: the dynamic split's run is as fast as the best of all 16 plans."""
    t = write_trace(tmp_path / "one.parquet", [[0, 1, 2, 3]], num_layers=1)
    cost = toy_cost()
    best = min(simulate_timing(t, "lru", 4, cost, execution=Plan(p)).total_s
               for p in itertools.product(("copy", "cpu"), repeat=4))
    assert simulate_timing(t, "lru", 4, cost, execution="hybrid").total_s == pytest.approx(best, abs=1e-12)
    # and strictly better than either pure plan here (so the test can tell a split from no split)
    assert best < min(simulate_timing(t, "lru", 4, cost, execution=Plan(k)).total_s for k in ("copy", "cpu"))


def _lru_hits(sets_by_layer: dict[int, list[list[int]]], sizes: dict[int, int]) -> int:
    """LRU written out (for sets of one key: no ties of recency inside a set)."""
    hits = 0
    for layer, sets in sets_by_layer.items():
        cache: list[int] = []       # least recent first
        for S in sets:
            if sizes[layer] == 0:
                continue
            hits += sum(e in cache for e in S)
            for e in S:
                if e in cache:
                    cache.remove(e)
                    cache.append(e)
            for e in S:
                if e not in cache:
                    if len(cache) >= sizes[layer]:
                        victim = next(x for x in cache if x not in S)
                        cache.remove(victim)
                    cache.append(e)
    return hits


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), n_cpu=st.integers(0, 3), k=st.integers(2, 4), n_pin=st.integers(0, 2),
       spec=st.sampled_from(["fiddler", "hybrid", "hobbit=0.4", "copy"]))
def test_accounting_invariants(tmp_path_factory, seed, n_cpu, k, n_pin, spec):
    rng = np.random.default_rng(seed)
    path = tmp_path_factory.mktemp("inv") / "t.parquet"
    t = random_trace(path, rng, tokens=12, num_layers=3, num_experts=6, top_k=2, skew=1.2)
    sets = t.execution_order().experts.tolist()
    layers = t.execution_order().layer.tolist()
    cost = CostModel.preset("h200")
    # every spec: the counts partition the requests
    r = simulate_timing(t, "lru", k, cost, execution=spec)
    assert sum(r.executed.values()) == r.requests == len(sets) * 2
    assert r.executed["gpu_hit"] + r.executed["pinned"] == r.hits
    # batch steps (several tokens per expert): the counts partition the step's union of experts
    tb = write_trace(path.with_name("two.parquet"), sets, num_layers=3, num_experts=6,
                     seq=((np.arange(len(sets)) // 3) % 2).tolist())
    rb = simulate_timing(tb, "lru", max(k, 4), cost, execution=spec, batch_size=2)
    assert len(rb.per_token_ms) == 6 and sum(rb.executed.values()) == rb.requests      # 6 steps of 2 tokens
    # n-cpu-moe=N: layers < N on the CPU, moving nothing; the others are exactly the replay's caches
    r = simulate_timing(t, "lru", k, cost, execution=f"n-cpu-moe={n_cpu}")
    on_cpu = 2 * sum(1 for layer in layers if layer < n_cpu)
    per_layer = simulate(t, "lru", k).to_dict(per_layer=True)["per_layer"]
    assert r.executed["cpu"] == on_cpu
    assert r.executed["gpu_hit"] == r.hits == sum(d["hits"] for d in per_layer if d["layer"] >= n_cpu)
    assert r.to_dict()["bytes_h2d"] == r.executed["copy"] * r.expert_bytes
    # a pinned set: every request of a pinned expert served pinned, the rest through the smaller cache
    # (one expert per set: recency then has no ties inside a set, so the reference LRU is exact)
    t1 = random_trace(path.with_name("t1.parquet"), rng, tokens=30, num_layers=3, num_experts=6, top_k=1, skew=1.2)
    n_pin = min(n_pin, k - 1)
    pins = [(layer, e) for layer in range(3) for e in range(n_pin)]
    r = simulate_timing(t1, "lru", k, cost, execution=Pinned(pins))
    by_layer: dict[int, list[list[int]]] = {}
    keys = t1.execution_order().experts[:, 0].tolist()
    for layer, e in zip(t1.execution_order().layer.tolist(), keys, strict=True):
        by_layer.setdefault(layer, []).extend([[e]] if e >= n_pin else [])
    assert r.executed["pinned"] == sum(e < n_pin for e in keys)
    assert r.executed["gpu_hit"] == _lru_hits(by_layer, dict.fromkeys(range(3), k - n_pin))
    assert r.executed["copy"] == r.requests - r.executed["pinned"] - r.executed["gpu_hit"]


def test_all_layers_on_the_cpu_move_no_bytes_and_need_no_cache(tmp_path):
    t = random_trace(tmp_path / "t.parquet", np.random.default_rng(3), tokens=10, num_layers=2, num_experts=8,
                     top_k=2, skew=1.0)
    r = simulate_timing(t, "lru", 2, CostModel.preset("h200"), execution="n-cpu-moe=2")
    assert r.to_dict()["bytes_h2d"] == 0 and r.copies == 0 and r.executed["cpu"] == r.requests
    assert r.cpu_busy_s > 0


def test_bad_execution_settings(tmp_path, toy):
    for bad in ("nope", "n-cpu-moe", "n-cpu-moe=x", "hobbit=2", "fiddler=1"):
        with pytest.raises(SettingError):
            parse_execution(bad)
    for text in ('[[0, 1], [0]]', '["12"]', '{"0": 1}', '[[0, -1]]', '[[0, 1.5]]', 'nope'):
        (tmp_path / "pins.json").write_text(text)
        with pytest.raises(DataError, match="pins.json"):
            parse_execution(f"pinned={tmp_path / 'pins.json'}")
    (tmp_path / "pins.json").write_text('[[0, 1], [1, 0]]')
    assert parse_execution(f"pinned={tmp_path / 'pins.json'}").pinned(1) == {0}
    with pytest.raises(SettingError, match="pins 3 experts"):
        simulate_timing(toy, "lru", 2, toy_cost(), execution=Pinned([(0, 0), (0, 1), (0, 2)]))
    with pytest.raises(SettingError, match="layer 5"):
        simulate_timing(toy, "lru", 2, toy_cost(), execution=Pinned([(5, 0)]))


def test_cpu_cost_terms_and_what_ifs(tmp_path):
    c = CostModel.preset("h200")
    assert c.cpu_expert_seconds(1) == pytest.approx(1.56e-3)
    assert c.cpu_expert_seconds(4) == pytest.approx(2.86e-3)
    assert c.cpu_expert_seconds(8) == pytest.approx(2.86e-3 + 1.3e-3 / 3 * 4)    # extrapolated
    assert c.cpu_expert_seconds(1, "bf16") == pytest.approx(6.0e-3)
    assert c.with_overrides(cpu_threads=8).cpu_expert_seconds(1) == pytest.approx(2.4e-3)
    assert c.with_overrides(cpu_threads=1).cpu_expert_seconds(4) == pytest.approx(2.86e-3 * 17 / 1.56)
    assert c.with_overrides(cpu_speed=2).cpu_expert_seconds(1) == pytest.approx(0.78e-3)
    assert c.hop_seconds(1) == pytest.approx(c.copy_seconds(8192))
    assert "H100 box's host" in c.cpu["sources"]["expert_s"]
    assert c.lowbit() == "hqq1" and c.with_overrides(lowbit_format="hqq4").lowbit() == "hqq4"
    with pytest.raises(SettingError):
        c.with_overrides(cpu_speed=0)
    # a calibration's own cpu block round-trips; a broken one is one DataError naming the file
    raw = c.to_dict() | {"cpu": {**DEFAULT_CPU, "threads": 4, "expert_s": {"int8": [[1, 0.01]]}}}
    (tmp_path / "cal.json").write_text(json.dumps(raw))
    assert CostModel.from_json(tmp_path / "cal.json").cpu_expert_seconds(1) == pytest.approx(0.01)
    assert CostModel.from_json(tmp_path / "cal.json").cpu_expert_seconds(1, beside_copies=True) == pytest.approx(0.01)
    (tmp_path / "beside.json").write_text(json.dumps(raw | {"cpu": {**raw["cpu"], "beside_copies": 1.25}}))
    beside = CostModel.from_json(tmp_path / "beside.json")
    assert beside.cpu_expert_seconds(1, beside_copies=True) == pytest.approx(0.0125)
    assert beside.cpu_expert_seconds(1) == pytest.approx(0.01)
    (tmp_path / "zero.json").write_text(json.dumps(raw | {"cpu": {**raw["cpu"], "beside_copies": 0}}))
    with pytest.raises(DataError, match="beside_copies"):
        CostModel.from_json(tmp_path / "zero.json")
    for key, value in (("copies_beside_cpu", float("nan")), ("after_idle", [[0.001, -0.5]]), ("after_idle", [[0, 1]])):
        (tmp_path / "bad_term.json").write_text(json.dumps(raw | {"cpu": {**raw["cpu"], key: value}}))
        with pytest.raises(DataError, match=key):
            CostModel.from_json(tmp_path / "bad_term.json")
    terms = raw | {"cpu": {**raw["cpu"], "copies_beside_cpu": 1.2, "after_idle": [[0.002, 0.001], [0.0005, 0.0]]}}
    (tmp_path / "terms.json").write_text(json.dumps(terms))
    read = CostModel.from_json(tmp_path / "terms.json")
    assert read.copy_beside_cpu_factor() == 1.2 and read.cpu["after_idle"] == [[0.0005, 0.0], [0.002, 0.001]]
    (tmp_path / "bad.json").write_text(json.dumps(raw | {"cpu": {"format": "int3"}}))
    with pytest.raises(DataError, match="bad.json"):
        CostModel.from_json(tmp_path / "bad.json")


def test_simulate_cli_execution(toy, tmp_path, capsys):
    assert main(["simulate", str(toy.path), "--policy", "lru", "--cache-size", "2", "--hardware", "h200",
                 "--execution", "n-cpu-moe=1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["executed"] == {"gpu_hit": 0, "copy": 2, "cpu": 2, "lowbit": 0, "pinned": 0}
    assert sum(out["executed"].values()) == out["requests"]
    assert main(["simulate", str(toy.path), "--policy", "lru", "--cache-size", "2", "--hardware", "h200",
                 "--execution", "copy", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["executed"]["copy"] == 4
    assert main(["simulate", str(toy.path), "--policy", "lru", "--cache-size", "2", "--execution", "bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--execution" in err[0]


def test_simulate_cli_pinned_file_and_cpu_what_ifs(toy, tmp_path, capsys):
    base = ["simulate", str(toy.path), "--policy", "lru", "--cache-size", "2", "--hardware", "h200", "--json"]
    (tmp_path / "pins.json").write_text("[[0, 0], [1, 0]]")
    assert main([*base, "--execution", f"pinned={tmp_path / 'pins.json'}"]) == 0
    assert json.loads(capsys.readouterr().out)["executed"]["pinned"] == 2
    (tmp_path / "bad.json").write_text("[[0]]")
    assert main([*base, "--execution", f"pinned={tmp_path / 'bad.json'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.json" in err[0]
    speeds = {}
    for extra in ([], ["--cpu-speed", "2"], ["--cpu-threads", "1"]):
        assert main([*base, "--execution", "n-cpu-moe=2", *extra]) == 0
        speeds[" ".join(extra)] = json.loads(capsys.readouterr().out)["tokens_per_s"]
    assert speeds["--cpu-speed 2"] > speeds[""] > speeds["--cpu-threads 1"]


def test_a_hobbit_substitute_hit_computes_in_the_low_bit_format(tmp_path):
    """The engine computes an expert whose slot holds the substitute in the substitute's format, hits
    included. Hand-traced (ms), one layer, two tokens routing E0 (0.9) and E1 (0.1), full expert 1 ms, the
    substitute 0.25 ms: token 1 attn 0-0.5, E0 copied 0.5-2.5, E1's substitute 2.5-3.0, E0 2.5-3.5, E1
    3.5-3.75 | token 2 (both hit) attn 3.75-4.25, E0 4.25-5.25, E1 5.25-5.5 (6.25 if priced full)."""
    trace = write_trace(tmp_path / "two.parquet", [[0, 1], [0, 1]], num_layers=1, weights=[[0.9, 0.1]] * 2)
    cost = toy_cost()
    cost.expert_s_override = None
    cost.expert_compute = {**cost.expert_compute, "hqq2": [[1, 1 * MS]], "hqq1": [[1, 0.25 * MS]]}
    r = simulate_timing(trace, "lru", 2, cost, execution="hobbit", engine="python")
    assert r.executed == dict.fromkeys(EXECUTORS, 0) | {"copy": 1, "lowbit": 1, "gpu_hit": 2}
    assert r.total_s * 1e3 == pytest.approx(5.5, abs=1e-9)
