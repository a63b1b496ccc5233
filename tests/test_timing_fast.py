"""The compiled timing path performs exactly the operations of the general event path."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.simulator.cost_model import CostModel
from moesim.simulator.timing import simulate_timing
from moesim.traces.format import DECODE, TraceMeta, TraceWriter, read_trace


@pytest.fixture(scope="module")
def gappy(tmp_path_factory):
    """Random routing with recorded (noisy) predictions and a few missing rows, 2 sequences."""
    rng = np.random.default_rng(17)
    n_tok, L, E, k = 80, 6, 8, 2
    p = rng.dirichlet(np.ones(E) * 0.6, size=L)
    ex = np.array([rng.choice(E, k, replace=False, p=p[i % L]) for i in range(n_tok * L)])
    pred = ex.copy()
    noise = rng.random(len(ex)) < 0.3
    pred[noise] = np.array([rng.choice(E, k, replace=False) for _ in range(noise.sum())])
    pred[np.arange(len(ex)) % L == 0] = -1
    keep = rng.random(len(ex)) > 0.03
    meta = TraceMeta(model="m", family="t", num_layers=L, num_experts=E, top_k=k)
    path = tmp_path_factory.mktemp("g") / "g.parquet"
    tok = np.arange(n_tok * L) // L
    with TraceWriter(path, meta, pred_distances=[1]) as w:
        w.write((tok >= 50).astype(np.int32)[keep], (tok - 50 * (tok >= 50))[keep], DECODE,
                (np.arange(n_tok * L) % L)[keep], ex[keep], np.full((keep.sum(), k), 0.5), preds={1: pred[keep]})
    return read_trace(path)


ENGINE_TERMS = [{}, {"miss_issue_us": 49.0}, {"miss_issue_us": 49.0, "routing_handoff_us": 120.0, "engine_mode": "gate"},
                {"predict_us": 40.0, "host_copy_issue_us": 45.0, "routing_handoff_us": 120.0},
                {"miss_issue_us": 20.0, "routing_handoff_us": 30.0, "host_copy_issue_us": 450.0, "predict_us": 40.0,
                 "engine_mode": "gate"},
                # the cross-stream hops (studies/miss_cost/miss_cost_h200.md), alone and with the gate-mode terms
                {"copy_hop_us": 41.5, "ready_hop_us": 43.4},
                {"copy_hop_us": 300.0, "ready_hop_us": 700.0, "miss_issue_us": 20.0, "routing_handoff_us": 30.0,
                 "host_copy_issue_us": 45.0, "predict_us": 40.0, "engine_mode": "gate"}]


@pytest.mark.parametrize("policy", ["lru", "fifo", "lfu", "opt"])
@pytest.mark.parametrize("prefetch", ["none", "previous-token", "transition", "oracle", "speculative"])
@pytest.mark.parametrize("terms", range(len(ENGINE_TERMS)))
def test_fast_path_equals_event_path(gappy, policy, prefetch, terms):
    for engines, budget, size in ((1, 2, 3), (2, 3, 4)):
        cost = CostModel.preset("h200").with_overrides(copy_engines=engines, **ENGINE_TERMS[terms])
        for ready in (("hidden", "gate") if prefetch == "speculative" else ("hidden",)):
            kw = dict(prefetch=prefetch, prefetch_params={"budget": budget}, speculative_ready=ready)
            a = simulate_timing(gappy, policy, size, cost, engine="python", **kw)
            b = simulate_timing(gappy, policy, size, cost, engine="numba", **kw)
            assert a.to_dict() == b.to_dict()
            assert np.allclose(a.per_token_ms, b.per_token_ms, rtol=1e-12, atol=1e-12)


def test_auto_uses_the_fast_path_only_when_it_applies(gappy):
    cost = CostModel.preset("h200")
    with pytest.raises(Exception, match="compiled timing path"):
        simulate_timing(gappy, "arc", 3, cost, engine="numba")
    # a policy without a kernel falls back to the event path transparently
    assert simulate_timing(gappy, "arc", 3, cost).requests == simulate_timing(gappy, "lru", 3, cost).requests
