"""``moesim budgets``: the dynamic programme over per-layer curves against brute force over every
allocation, each allocation's hits measured by an ordinary replay with ``--layer-budgets`` (the
oracle shares nothing with the per-layer table the programme reads); the CLI's contract keys, the
uniform split, and the errors."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.cli import main
from moesim.simulator.budgets import layer_curves, optimal_budgets, uniform_budgets
from moesim.simulator.replay import simulate
from tests.helpers import random_trace


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), policy=st.sampled_from(["lru", "fifo"]), top_k=st.integers(1, 2),
       extra=st.integers(0, 5), skew=st.floats(0.0, 2.0))
def test_dp_equals_brute_force_over_all_allocations(tmp_path, seed, policy, top_k, extra, skew):
    rng = np.random.default_rng(seed)
    layers, experts = 3, 4
    trace = random_trace(tmp_path / f"t{seed}.parquet", rng, tokens=10, num_layers=layers, num_experts=experts,
                         top_k=top_k, skew=skew)
    total = layers * top_k + min(extra, layers * (experts - top_k))
    best = max(simulate(trace, policy, list(alloc)).hits
               for alloc in itertools.product(range(top_k, experts + 1), repeat=layers) if sum(alloc) == total)
    budgets, hits = optimal_budgets(layer_curves(trace, policy), total)
    assert hits == best
    assert sum(budgets) == total and min(budgets) >= top_k
    assert simulate(trace, policy, budgets).hits == hits


def test_a_nonconcave_curve_defeats_greedy_but_not_the_dp(tmp_path):
    # layer 0 cycles over 3 experts (LRU: 0 hits at 2 slots, all at 3: a step); layer 1 gains one hit per slot
    # early on. With 1 slot to spare beyond 2 each, greedy's first marginal gain is layer 1's; DP sees the step.
    from tests.helpers import write_trace

    sets = []
    for t in range(30):
        sets.append([t % 3])            # layer 0: 0,1,2,0,1,2,...  (needs 3 slots, then every request hits)
        sets.append([[0, 1][t % 2] if t % 5 else 2])  # layer 1
    trace = write_trace(tmp_path / "t.parquet", sets, num_layers=2, num_experts=3)
    curves = layer_curves(trace, "lru")
    budgets, hits = optimal_budgets(curves, 4)
    assert budgets == [3, 1] and hits == simulate(trace, "lru", budgets).hits
    assert hits > simulate(trace, "lru", [2, 2]).hits


def test_uniform_spreads_the_remainder_over_the_first_layers():
    assert uniform_budgets(4, 11) == [3, 3, 3, 2]
    assert uniform_budgets(3, 9) == [3, 3, 3]


def test_cli_json_contract_and_simulate_reproduces_hits(tmp_path, capsys):
    rng = np.random.default_rng(3)
    path = tmp_path / "t.parquet"
    random_trace(path, rng, tokens=200, num_layers=4, num_experts=8, top_k=2, skew=1.2)
    code, out, err = _run(["budgets", str(path), "--policy", "lru", "--total-slots", "17", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert sum(res["layer_budgets"]) == 17 and min(res["layer_budgets"]) >= 2 and len(res["layer_budgets"]) == 4
    assert res["uniform_budgets"] == [5, 4, 4, 4] and res["hits"] >= res["uniform_hits"]
    code, out, _ = _run(["simulate", str(path), "--policy", "lru", "--json",
                         "--layer-budgets", ",".join(map(str, res["layer_budgets"]))], capsys)
    sim = json.loads(out)
    assert code == 0 and sim["hits"] == res["hits"] and sim["requests"] == res["requests"]
    assert res["hit_rate"] == round(res["hits"] / res["requests"], 6)
    code, out, _ = _run(["simulate", str(path), "--policy", "lru", "--json", "--layer-budgets", "5,4,4,4"], capsys)
    assert json.loads(out)["hit_rate"] == res["uniform_hit_rate"]


@pytest.mark.parametrize("argv,needle", [
    (["--policy", "lru", "--total-slots", "7"], "a total of 7 slots is below layers x top-k = 4 x 2 = 8 (--total-slots)"),
    (["--policy", "nope", "--total-slots", "9"], "unknown policy 'nope'"),
    (["--policy", "lru", "--total-slots", "9", "--scope", "global"], "--scope global has no layers"),
])
def test_cli_usage_errors(tmp_path, capsys, argv, needle):
    rng = np.random.default_rng(0)
    path = tmp_path / "t.parquet"
    random_trace(path, rng, tokens=20, num_layers=4, num_experts=8, top_k=2)
    code, out, err = _run(["budgets", str(path), *argv], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1 and out == "", err


def test_cli_clamps_a_total_above_every_expert(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "t.parquet"
    random_trace(path, rng, tokens=20, num_layers=2, num_experts=4, top_k=2)
    code, out, err = _run(["budgets", str(path), "--policy", "fifo", "--total-slots", "50", "--json"], capsys)
    res = json.loads(out)
    assert code == 0 and res["layer_budgets"] == [4, 4] and res["total_slots_asked"] == 50
    assert "above layers x experts = 8" in err


def test_cli_with_a_cost_model_reports_tokens_per_s_of_both_allocations(tmp_path, capsys):
    rng = np.random.default_rng(5)
    path = tmp_path / "t.parquet"
    random_trace(path, rng, tokens=30, num_layers=3, num_experts=6, top_k=2, skew=1.5)
    code, out, err = _run(["budgets", str(path), "--policy", "lru", "--total-slots", "10", "--hardware", "h200",
                           "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    for key, budgets in (("tokens_per_s", res["layer_budgets"]), ("uniform_tokens_per_s", res["uniform_budgets"])):
        code, out, _ = _run(["simulate", str(path), "--policy", "lru", "--hardware", "h200", "--json",
                             "--layer-budgets", ",".join(map(str, budgets))], capsys)
        assert code == 0 and json.loads(out)["tokens_per_s"] == res[key]


# seed 0 at skew 0.5: the allocation with the most hits is priced slower than the fastest one
@pytest.mark.parametrize("seed,skew", [(0, 0.5), (11, 1.0)])
def test_tokens_per_s_objective_equals_brute_force_through_the_cell_runner(tmp_path, capsys, seed, skew):
    """``--objective tokens-per-s``: the allocation it returns is priced (through the one cell runner, as
    ``simulate --layer-budgets``) no slower than every other allocation of the same total, each priced
    here on its own; and without a prefetcher an allocation's time is the all-resident time plus each
    layer's own term, the separability the programme relies on."""
    from moesim.simulator.budgets import time_curves
    from moesim.simulator.cell import CellSpec, run_cell
    from moesim.simulator.cost_model import CostModel

    layers, experts, top_k = 3, 4, 2
    path = tmp_path / "t.parquet"
    trace = random_trace(path, np.random.default_rng(seed), tokens=24, num_layers=layers, num_experts=experts,
                         top_k=top_k, skew=skew)
    total = 8
    cost = CostModel.preset("h200")

    def ms(alloc) -> float:
        return run_cell(trace, CellSpec("lru", list(alloc), cost=cost, interval=False)).timing.ms_per_token

    allocs = [a for a in itertools.product(range(top_k, experts + 1), repeat=layers) if sum(a) == total]
    times = {a: ms(a) for a in allocs}
    code, out, _ = _run(["budgets", str(path), "--policy", "lru", "--total-slots", str(total), "--objective",
                         "tokens-per-s", "--hardware", "h200", "--json"], capsys)
    assert code == 0
    got = json.loads(out)
    assert got["objective"] == "tokens-per-s" and "exact" in got["method"]
    assert times[tuple(got["layer_budgets"])] == pytest.approx(min(times.values()), rel=1e-12)
    assert got["hits"] == simulate(trace, "lru", got["layer_budgets"]).hits
    sizes, extra = time_curves(trace, CellSpec("lru", experts, cost=cost))
    base = ms([experts] * layers)
    for alloc, t in times.items():
        assert t == pytest.approx(base + sum(extra[layer, k - top_k] for layer, k in enumerate(alloc)), rel=1e-9)


def test_tokens_per_s_objective_needs_a_cost_model(tmp_path, capsys):
    path = tmp_path / "t.parquet"
    random_trace(path, np.random.default_rng(0), tokens=10, num_layers=2, num_experts=4, top_k=2)
    code, _, err = _run(["budgets", str(path), "--policy", "lru", "--total-slots", "6", "--objective",
                         "tokens-per-s"], capsys)
    assert code == 2 and "cost model" in err and "--hardware" in err and len(err.strip().splitlines()) == 1
