"""The engine-term micro-benchmarks (moesim/engine/gpu_bench.py) run on CPU with tiny sizes, and what
calibration.to_cost_model makes of their raw output."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from moesim.engine import gpu_bench  # noqa: E402
from moesim.engine.calibration import to_cost_model  # noqa: E402
from moesim.simulator.cost_model import CostModel  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)   # a shared 2-core box: threads oversubscribed make tiny ops 1000x slower
    yield
    torch.set_num_threads(n)


def test_demand_chain_by_hand():
    # one layer, two misses: gate 1; copies land at 1+5=6 and 11; experts 6..8 and 11..13
    assert gpu_bench.demand_chain_seconds(1, 2, 1.0, 5.0, 2.0) == 13.0
    # a second layer's gate waits for the last expert (13 -> 14); its copies queue behind: 19, 24; end 26
    assert gpu_bench.demand_chain_seconds(2, 2, 1.0, 5.0, 2.0) == 26.0
    # experts longer than copies: the second expert waits for the first, not its copy
    assert gpu_bench.demand_chain_seconds(1, 2, 0.0, 1.0, 10.0) == 21.0


def test_copy_repeats_statistics():
    r = gpu_bench.copy_repeats("cpu", nbytes=4096, repeats=12, buffers=3)
    assert r["n"] == len(r["ms"]) == 12 and r["buffers"] == 3
    assert r["min_ms"] <= r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["max_ms"]
    assert r["min_ms"] == pytest.approx(min(r["ms"]), abs=1e-5)


def test_miss_issue_detects_a_per_miss_cost(monkeypatch):
    """The benchmark prices its own chain with the simulator's rules: with free kernels a per-miss cost
    is what it reports. Injected: 4 ms in every event wait (>= 2 waits per miss)."""
    base = gpu_bench.miss_issue("cpu", nbytes=4096, layers=3, misses=2, gate_s=0.0, expert_s=0.0, buffers=2, reps=1)
    assert base["ideal_s"] == gpu_bench.demand_chain_seconds(3, 2, base["gate_s"], base["copy_s"], base["expert_s"])
    from moesim.engine import runtime

    real_wait = runtime.Device.wait

    def slow_wait(self, event, stream=None):
        import time
        time.sleep(4e-3)
        real_wait(self, event, stream)

    monkeypatch.setattr(runtime.Device, "wait", slow_wait)
    slow = gpu_bench.miss_issue("cpu", nbytes=4096, layers=3, misses=2, gate_s=0.0, expert_s=0.0, buffers=2, reps=1)
    assert slow["miss_issue_s"] >= 7e-3 > base["miss_issue_s"]


def test_routing_handoff_measures_the_read_back_not_the_gate(monkeypatch):
    """At Mixtral geometry on CPU: the hand-off is the wall time per layer minus the gate's own time.
    Injected: 3 ms in the read-back (the host's ``tolist`` of the ids) shows up in full in the hand-off;
    5 ms in the gate (its softmax) is subtracted out and does not."""
    import time

    import torch

    def delayed(fn, seconds):
        def slow(*args, **kwargs):
            time.sleep(seconds)
            return fn(*args, **kwargs)
        return slow

    base = gpu_bench.routing_handoff("cpu", layers=4, reps=2)
    assert base["hidden"] == 4096 and base["experts"] == 8 and base["top_k"] == 2
    assert base["routing_handoff_s"] == base["eager_handoff_s"]
    assert base["eager_handoff_s"] == pytest.approx(max(base["eager_wall_s"] - base["gate_gpu_s"], 0.0))
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "tolist", delayed(torch.Tensor.tolist, 3e-3))
        slow_read = gpu_bench.routing_handoff("cpu", layers=4, reps=2)
    assert slow_read["routing_handoff_s"] >= base["routing_handoff_s"] + 2.5e-3
    with monkeypatch.context() as m:
        m.setattr(torch, "softmax", delayed(torch.softmax, 5e-3))
        slow_gate = gpu_bench.routing_handoff("cpu", layers=4, reps=2)
    assert slow_gate["gate_gpu_s"] >= 5e-3 and slow_gate["eager_wall_s"] >= 5e-3
    assert slow_gate["routing_handoff_s"] < 4e-3   # not the 5 ms gate (a loaded machine adds some noise)


RAW = {
    "h2d": [{"bytes": 1 << 22, "ms": 0.1}, {"bytes": 1 << 24, "ms": 0.35}, {"bytes": 66748416, "ms": 1.21}],
    "expert": {"hqq2": {"expert_bytes": 66748416, "curve": [{"tokens": 1, "ms": 0.26}, {"tokens": 8, "ms": 0.27}]}},
    "attention": [{"context": 512, "ms": 0.2}],
    "lm_head_ms": 0.06,
    "copy_repeats": {"bytes": 66748416, "n": 5, "buffers": 2, "ms": [1.2, 1.21, 1.22, 1.3, 1.19],
                     "median_ms": 1.21, "p10_ms": 1.194, "p90_ms": 1.268, "min_ms": 1.19, "max_ms": 1.3},
    "engine_terms": {"miss_issue": {"miss_issue_s": 21e-6, "layers": 32, "misses_per_layer": 2},
                     "routing_handoff": {"routing_handoff_s": 95e-6, "eager_handoff_s": 150e-6},
                     "date": "2026-12-02T03:00:00Z"},
}


def test_to_cost_model_names_the_engine_terms_and_the_copy_spread():
    cal = to_cost_model(json.loads(json.dumps(RAW)))
    assert cal["engine"]["miss_issue_s"] == 21e-6 and cal["engine"]["routing_handoff_s"] == 95e-6
    assert "miss_issue_s" in cal["engine"]["sources"] and "routing_handoff_s" in cal["engine"]["sources"]
    spread = cal["pcie"]["expert_copy"]
    assert spread["median_s"] == pytest.approx(1.21e-3) and spread["low_s"] == pytest.approx(1.194e-3)
    assert spread["high_s"] == pytest.approx(1.268e-3) and len(spread["sessions"]) == 1
    cost = CostModel.from_dict(cal)
    assert cost.miss_issue_s == 21e-6 and cost.routing_handoff_s == 95e-6
    assert cost.sync_seconds() == 150e-6   # the mixtral-offloading profile's syncs: the eager read-back
    assert cost.with_overrides(routing_handoff_us=30).sync_seconds() == pytest.approx(30e-6)
    lo, hi = cost.copy_interval_scales()
    assert lo < 1.0 < hi


def test_to_cost_model_without_the_new_measurements_charges_nothing():
    raw = {k: v for k, v in RAW.items() if k not in ("copy_repeats", "engine_terms")}
    cost = CostModel.from_dict(to_cost_model(raw))
    assert cost.miss_issue_s == 0.0 and cost.routing_handoff_s == 0.0
    assert cost.copy_interval_scales() == (1.0, 1.0)


def test_add_session_keeps_the_measured_calibration_and_widens_the_interval():
    from moesim.engine.calibration import add_session

    base = CostModel.preset("h200").to_dict()
    base["pcie"].pop("expert_copy", None)   # a calibration from before copy sessions existed
    out = add_session(base, json.loads(json.dumps(RAW)))
    assert out["pcie"]["curve"] == base["pcie"]["curve"] and out["expert_compute"] == base["expert_compute"]
    assert out["engine"]["miss_issue_s"] == 21e-6
    # terms the raw file did not measure (the committed stream hops) stay as the calibration had them
    assert out["engine"]["copy_hop_s"] == base["engine"]["copy_hop_s"] > 0
    assert out["engine"]["sources"]["copy_hop_s"] == base["engine"]["sources"]["copy_hop_s"]
    ec = out["pcie"]["expert_copy"]
    old = CostModel.from_dict(base).copy_seconds(66748416)
    assert len(ec["sessions"]) == 2 and ec["sessions"][0]["median_s"] == pytest.approx(old)
    assert ec["low_s"] == pytest.approx(min(old, 1.194e-3)) and ec["high_s"] == pytest.approx(1.268e-3)
    lo, hi = CostModel.from_dict(out).copy_interval_scales()
    assert lo == pytest.approx(min(1.0, 1.194e-3 / old)) and hi == pytest.approx(1.268e-3 / old)
    again = add_session(out, json.loads(json.dumps(RAW)))   # a third session appends
    assert len(again["pcie"]["expert_copy"]["sessions"]) == 3


def test_h2d_curve_on_cpu_times_every_size():
    """The copy curve's CPU mode (the roofline driver's smoke run): one row per size, GB/s from its time."""
    sizes = (4096, 1 << 16)
    rows = gpu_bench.h2d_curve("cpu", sizes)
    assert [r["bytes"] for r in rows] == list(sizes)
    for r in rows:
        assert r["ms"] > 0 and r["gb_per_s"] == r["bytes"] / r["ms"] / 1e6
