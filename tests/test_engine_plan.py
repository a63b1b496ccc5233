"""The engine's residency plan: same mechanism and classes as the simulator, proven hit for hit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.engine.plan import CachePlan, Routing
from moesim.engine.quant import META_GROUP, QuantSpec, quant_spec
from moesim.policies.base import make_policy
from moesim.simulator.replay import replay_reference
from tests.helpers import grid_routing
from tests.oracle import replay_grid


def run_plan(routing: Routing, k: int, policy: str, prefetch: str = "none") -> CachePlan:
    """Run the plan over the routing while a model of the device -- slot contents, changed only by the
    copies and prefetches the steps hand out -- checks that every step reads its experts from slots
    that really hold them."""
    plan = CachePlan(routing, k, policy, prefetch)
    device = [[None] * k for _ in range(routing.num_layers)]
    for t in range(routing.num_tokens):
        for layer in range(routing.num_layers):
            step = plan.step(t, layer)
            if step is not None:
                for slot, expert in step.copies:
                    device[layer][slot] = expert
                assert [device[layer][s] for s in step.slots] == step.experts, (t, layer)
                for target, slot, expert in step.prefetches:
                    device[target][slot] = expert
                check_slots(plan, layer, k)
                if prefetch != "none" and layer + 1 < routing.num_layers:
                    check_slots(plan, layer + 1, k)
    return plan


def check_slots(plan: CachePlan, layer: int, k: int) -> None:
    slot_of = plan.slot_of[layer]
    assert set(slot_of) == plan.caches[layer].resident
    assert len(set(slot_of.values())) == len(slot_of)                       # one expert per slot
    assert set(slot_of.values()) | set(plan.free_slots[layer]) <= set(range(k))
    assert not set(slot_of.values()) & set(plan.free_slots[layer])


def test_contract_worked_example_lru():
    # docs/semantics.md: K = 3, top-2, LRU; [a,b] [c,a] [d,b] [a,c] -> 3 hits of 8
    a, b, c, d = 0, 1, 2, 3
    routing = grid_routing([[[a, b]], [[c, a]], [[d, b]], [[a, c]]])
    plan = CachePlan(routing, 3, "lru")
    copies = [plan.step(t, 0).copies for t in range(4)]
    assert (plan.hits, plan.requests) == (3, 8)
    assert copies[0] == [(0, a), (1, b)] and copies[1] == [(2, c)]
    assert copies[2] == [(2, d)]                     # d replaces c (least recent outside {d, b})
    assert copies[3] == [(2, c)]                     # c replaces d


def test_missing_rows_are_not_requested():
    routing = grid_routing([[[0, 1], []], [[0, 1], [2, 3]]])
    plan = run_plan(routing, 2, "lru")
    assert plan.requests == 6 and plan.hits == 2
    assert plan.step(0, 1) is None


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "opt"])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_plan_equals_reference_replay_on_real_trace(real_trace, policy, k):
    routing = Routing.from_trace(real_trace)
    plan = run_plan(routing, k, policy)
    ref = replay_reference(real_trace, lambda: make_policy(policy), k)
    assert (plan.hits, plan.requests) == (ref.hits, ref.requests)
    assert plan.layer_hits.tolist() == ref.layer_hits.tolist()


@pytest.mark.parametrize("policy,k,prefetch", [("lru", 3, "oracle"), ("fifo", 4, "transition"),
                                               ("opt", 2, "transition"), ("lfu", 6, "oracle")])
def test_plan_equals_timing_simulator_with_prefetch(real_trace, policy, k, prefetch):
    from moesim.simulator.cost_model import CostModel
    from moesim.simulator.timing import simulate_timing

    routing = Routing.from_trace(real_trace)
    plan = run_plan(routing, k, policy, prefetch)
    sim = simulate_timing(real_trace, policy, k, CostModel.preset("h200"), prefetch=prefetch)
    assert (plan.hits, plan.prefetches) == (sim.hits, sim.prefetches)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.permutations(range(6)).map(lambda p: list(p[:2])), min_size=3, max_size=3),
                min_size=1, max_size=30),
       st.integers(2, 6), st.sampled_from(["lru", "lfu", "fifo", "opt"]),
       st.sampled_from(["none", "oracle", "transition"]))
def test_plan_hits_equal_a_brute_force_replay_and_slots_hold_the_experts(sets, k, policy, prefetch):
    routing = grid_routing(sets, num_experts=6)
    plan = run_plan(routing, k, policy, prefetch)   # checks each step's slots against the device model
    assert plan.requests == 2 * 3 * len(sets)
    if prefetch == "none":
        assert (plan.hits, plan.requests) == replay_grid(sets, k, policy)   # tests/oracle.py, plain sets


def test_routing_head_renumbers_rows(real_trace):
    r = Routing.from_trace(real_trace)
    h = r.head(10)
    rows = h.row[h.row >= 0]
    assert sorted(rows.tolist()) == list(range(len(rows)))
    assert np.array_equal(h.experts, r.experts[:10])


# ---- the packed format ---------------------------------------------------------------------------

def test_expert_bytes_match_hqq_layout():
    n = 4096 * 14336
    # 2-bit codes + 8-bit scale and zero per 16 weights + 4 fp16 meta values per 128 groups, x3 matrices
    assert quant_spec("hqq2").expert_bytes(4096, 14336) == 3 * (n // 4 + 2 * (n // 16) + (n // 16 // 128) * 8)
    assert quant_spec("hqq2").expert_bytes(4096, 14336) == 66_748_416
    assert quant_spec("bf16").expert_bytes(4096, 14336) == 3 * n * 2
    with pytest.raises(ValueError):
        QuantSpec("x", 2, 16).matrix_parts(16 * META_GROUP + 16)


@pytest.mark.parametrize("name", ["hqq2", "hqq4"])
def test_dequantize_matches_numpy_oracle(name):
    import torch

    from moesim.engine.quant import dequantize, fill_random_blob, split_blob

    spec = quant_spec(name)
    n = spec.group_size * META_GROUP * 2
    blob = torch.zeros(spec.matrix_bytes(n) * 3, dtype=torch.uint8)
    fill_random_blob(blob, spec, n, torch.Generator().manual_seed(1))
    parts = split_blob(blob, spec, n)[0]
    meta = parts["meta"].view(-1, 4)
    meta[0] = torch.tensor([0.5, 3.0, 0.25, 1.0])     # distinct meta per block, exercised by the oracle
    meta[1] = torch.tensor([0.125, 0.0, 2.0, 4.0])
    got = dequantize(parts, spec, n).float().numpy()
    # oracle: unpack bits MSB-first in plain numpy
    packed = parts["packed"].numpy()
    per = 8 // spec.bits
    codes = np.stack([(packed >> (8 - spec.bits * (j + 1))) & ((1 << spec.bits) - 1) for j in range(per)], 1).reshape(-1)
    m = meta.float().numpy()
    blocks = np.repeat(np.arange(n // spec.group_size) // META_GROUP, spec.group_size)
    scale = (np.repeat(parts["scale_q"].numpy().astype(np.float64), spec.group_size) - m[blocks, 1]) * m[blocks, 0]
    zero = (np.repeat(parts["zero_q"].numpy().astype(np.float64), spec.group_size) - m[blocks, 3]) * m[blocks, 2]
    want = (codes - zero) * scale
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
