"""Hybrid execution in the real engine (moesim/engine/hybrid.py), on the engine's CPU device path with a tiny
checkpoint: every execution policy's logits equal the all-GPU (copy) engine's within the formats' tolerance,
the executor counts equal the simulator's on the same tokens (the closure: what the simulator priced is
what the engine ran), and the host half of the residency proof catches a CPU copy made from the wrong
expert and an expert computed twice. Also the substitute quantiser against a brute-force bound, the
device driver's cell path and the report's validation section on a synthetic JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from moesim.engine.hybrid import CpuExperts, HybridEngine, HybridProgram, LowbitCopies, priced_schedule
from moesim.engine.plan import Routing
from moesim.engine.quant import dequantize, quant_spec, quantize_matrix, split_matrix
from moesim.engine.runtime import Geometry, Weights
from moesim.errors import SettingError
from moesim.policies.execution import Pinned, parse_execution
from moesim.simulator.cost_model import CostModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studies.hybrid import make_report, run_validation  # noqa: E402
from tests.helpers import swapped_cpu_copies  # noqa: E402

LAYERS, TOKENS, K = 3, 8, 4


@pytest.fixture(scope="module")
def setup():
    g = Geometry.tiny(LAYERS)
    w = Weights(g, quant_spec("hqq4"), "cpu", seed=3)
    lowbit = LowbitCopies(w)
    cpu = CpuExperts.of(w, [(layer, e) for layer in range(LAYERS) for e in range(g.num_experts)])
    program = HybridProgram(w, K, TOKENS, lowbit=lowbit)
    # priced as full-size Mixtral hqq2 experts (a copy ~1.2 ms): the tiny ones would cost nothing to copy
    trace = run_validation.decode_trace(ROOT / "traces" / "synth-mixtral-8x7b.parquet", TOKENS, LAYERS,
                                        66_748_416, "hqq2")
    routing = Routing.from_trace(trace, TOKENS)
    # the preset's CPU made 4x faster: at these prices Fiddler and the split put some misses on the CPU
    cost = CostModel.preset("h200").with_overrides(cpu_speed=4.0)
    return w, program, cpu, trace, routing, cost


def run(setup, execution, routing=None, engine_cls=HybridEngine):
    """(per-token logits, the run's dict, the simulator's executed counts)."""
    w, program, cpu, trace, default_routing, cost = setup
    exe = parse_execution(execution)
    schedule, sim = priced_schedule(trace, "lru", K, cost, exe)
    eng = engine_cls(w, K, "lru", schedule if exe.prices else exe, program=program, cpu_experts=cpu, cpu_threads=2)
    kept = []
    final = program._run_final
    program.final = lambda: (final(), kept.append(program.logits.float().clone()))
    try:
        res = eng.run(routing or default_routing).to_dict()
    finally:
        program.final = program._run_final
    return np.stack([k.numpy()[0] for k in kept]), res, sim.timing.executed


PINS = Pinned([(0, 1), (1, 3), (2, 0), (2, 5)])


@pytest.fixture(scope="module")
def reference(setup):
    """The all-GPU (copy) engine's logits, and the same run's with every routing weight 0 (no experts)."""
    ref, base, base_sim = run(setup, "copy")
    assert base["executed"] == base_sim and base["executed"]["copy"] > 0
    routing = setup[4]
    silent = Routing(routing.experts, np.zeros_like(routing.weights), routing.row, routing.seq, routing.position,
                     routing.num_experts)
    return ref, run(setup, "copy", silent)[0]


@pytest.mark.parametrize("execution", ["n-cpu-moe=1", "n-cpu-moe=3", "fiddler", "hybrid", "hobbit", PINS])
def test_logits_equal_the_copy_engine_and_executors_equal_the_simulator(setup, reference, execution):
    ref, none = reference
    logits, res, sim = run(setup, execution)
    assert res["executed"] == sim, execution
    assert sum(res["executed"].values()) == res["requests"] == TOKENS * LAYERS * 2
    assert res["violations"] == res["once_violations"] == res["cpu_violations"] == 0
    assert res["device_copies"] == res["executed"]["copy"] + res["executed"]["lowbit"]
    name = parse_execution(execution).name
    kind = {"hobbit": "lowbit", "pinned": "pinned"}.get(name.split("=")[0], "cpu")
    assert res["executed"][kind] > 0, (name, res["executed"])
    share = np.abs(ref - none).max()
    err = np.abs(logits - ref).max()
    # int8 CPU copies of 4-bit experts: a few percent of the experts' share; HOBBIT's 2-bit substitute more
    assert err <= (0.35 if kind == "lowbit" else 0.05) * share, (name, err, share)
    if kind == "cpu":
        assert res["cpu_threads_used"] == 1   # one dedicated worker thread, not the caller's
        timing = res["cpu_timing"]   # every CPU expert timed; a layer's job of two has a first and a later one
        assert timing["n"] == res["executed"]["cpu"] and timing["expert_ms"] > 0 and timing["first_ms"] > 0
        if name.startswith("n-cpu-moe"):
            assert timing["later_ms"] > 0 and timing["idle_before_first_ms"] > 0
        assert timing["ready_wait_ms"] >= 0 and timing["merge_lag_ms"] >= 0


def test_a_cpu_copy_of_the_wrong_expert_is_caught(setup):
    with swapped_cpu_copies(setup[2], (0, 2), (0, 6)):
        _, res, _ = run(setup, "n-cpu-moe=1")
    assert res["cpu_violations"] > 0


def test_an_expert_computed_twice_is_caught(setup):
    class Twice(HybridEngine):
        def _to_cpu(self, t, layer, keys, ranks):   # every CPU expert also counted by a second executor
            super()._to_cpu(t, layer, keys, ranks)
            for j in ranks:
                self.computed[t, layer, j] += 1
    _, res, _ = run(setup, "n-cpu-moe=1", engine_cls=Twice)
    assert res["once_violations"] == TOKENS * 2


def test_engine_refuses_what_it_cannot_run(setup):
    w, program, cpu, *_ = setup
    with pytest.raises(SettingError, match="prices its choices"):
        HybridEngine(w, K, "lru", "fiddler", program=program, cpu_experts=cpu)
    with pytest.raises(SettingError, match="leaves none"):
        HybridEngine(w, 2, "lru", Pinned([(0, 1), (0, 2)]), program=program, cpu_experts=cpu)
    eng = HybridEngine(w, K, "lru", "n-cpu-moe=1", program=program)
    with pytest.raises(SettingError, match="cpu_experts"):
        eng.run(setup[4])
    with pytest.raises(SettingError, match="starts cold"):
        eng.run(setup[4], warm=True)


@pytest.mark.parametrize("name", ["hqq2-g64", "hqq1-g64"])
def test_substitute_quantiser_is_within_half_a_step(name):
    import torch

    spec = quant_spec(name)
    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(1)) * 0.02
    blob = quantize_matrix(w.reshape(-1), spec)
    assert blob.numel() == spec.matrix_bytes(w.numel())
    back = dequantize(split_matrix(blob, spec, w.numel()), spec, w.numel()).float()
    groups = w.reshape(-1, spec.group_size)
    step = (groups.amax(1) - groups.amin(1)) / ((1 << spec.bits) - 1)
    err = (back.reshape(-1, spec.group_size) - groups).abs().amax(1)
    # half a step, plus bf16 rounding of scale and zero (relative 2^-8 of the group's range)
    assert bool((err <= step / 2 + groups.abs().amax(1) * 2 ** -6 + 1e-6).all())


def test_driver_cell_and_report_section(setup, tmp_path):
    w, program, cpu, trace, routing, cost = setup
    row = run_validation.run_cell(w, program, cpu, routing, trace, cost, K, "hobbit", 1)
    assert row["executed_equal"] and row["tokens"] == TOKENS and row["violations"] == 0
    assert run_validation.executions(32) == ["copy", "n-cpu-moe=4", "n-cpu-moe=8", "fiddler", "hybrid", "hobbit"]
    cells = []
    for k, times in ((2, {"copy": (10.0, 10.5), "fiddler": (8.0, 7.0), "hobbit": (9.0, 9.9)}),
                     (4, {"copy": (6.0, 6.0), "fiddler": (6.6, 6.3), "hobbit": (5.0, 5.2)})):
        for ex, (real, sim) in times.items():
            cells.append({"trace": "t.parquet", "cache_size": k, "execution": ex, "real_ms_per_token": real,
                          "sim_ms_per_token": sim, "error": (sim - real) / real, "executed_real": {"copy": 1},
                          "executed_equal": True, "violations": 0, "once_violations": 0, "cpu_violations": 0})
    doc = {"device": "H100", "commit": "abc", "date": "d", "batch": 1, "tokens_per_cell": 20, "cpu_threads": 14,
           "host_cpus": 16, "cells": cells,
           "engine": {"geometry": {"num_layers": 32}, "quantization": "hqq4", "lowbit": "hqq2-g64", "cpu_format": "int8"},
           "calibration": {"cpu": {"format": "int8", "expert_s": {"int8": [[1, 0.0015]]}, "hop_s": 2e-5}}}
    text = "\n".join(make_report.validation_section(json.loads(json.dumps(doc)), "raw/v.json"))
    assert "| 2 | fiddler (1.25x) | fiddler (1.50x) |" in text
    assert "| 4 | hobbit (1.20x) | hobbit (1.15x) |" in text
    assert "| 2 | hobbit | 9.00 | 9.90 | +10.0% | yes |" in text
    assert "|error| median 4.8%, max 12.5%; 4 within 5%" in text
    assert "CPU expert 1.500 ms, the hidden state's hop 20.0 us" in text
    assert "did not measure CPU experts after idle gaps" in text and "CPU experts in the engine's run" not in text
    # a run with the copies' own factor, the after-idle curve and the CPU experts timed in the cells
    measured = {"alone_s": [0.0015] * 2, "beside_copies_s": [0.0018] * 2, "copies_beside_cpu_s": [0.002] * 2,
                "copies_alone_s": [0.0016] * 2,
                "after_idle": {"back_to_back_s": [0.002] * 3, "after_gap_s": [[0.0025] * 3], "slept_s": [[0.001] * 3]}}
    doc["calibration"]["cpu"] |= {"beside_copies": 1.2, "copies_beside_cpu": 1.25, "after_idle": [[0.001, 0.0005]],
                                  "measured": measured, "sources": {"after_idle": "fake"}}
    cells[1] |= {"cpu_timing": {"n": 4, "expert_ms": 3.0, "first_ms": 3.5, "later_ms": 2.5, "idle_before_first_ms": 1.0,
                                "ready_wait_ms": 0.2, "merge_lag_ms": 0.05},
                 "sim_cpu_busy_ms": 12.0, "executed_sim": {"cpu": 4}}
    text = "\n".join(make_report.validation_section(json.loads(json.dumps(doc)), "raw/v.json"))
    assert "2.000 ms each (median of 2) against 1.600 ms alone (median of 2 in the same rounds): x1.25" in text
    assert "CPU expert after the worker sat idle (fake): back to back 2.000 ms" in text
    assert "| 1.00 | 2.500 | +0.500 | 0.500 |" in text
    assert "| 2 | fiddler | 4 | 3.000 | 3.500 | 2.500 | 1.000 | 3.000 | 0.200 | 0.050 |" in text
    assert "a hop of 0.020 ms each way" in text and "never sleeps" not in text
    doc["wait_policy"] = {"default": {"back_to_back_ms": 2.0, "after_idle": [[0.001, 0.0004], [0.02, 0.001]]},
                          "active": {"back_to_back_ms": 2.1, "after_idle": [[0.001, 0.0], [0.02, 0.0002]]}}
    text = "\n".join(make_report.validation_section(json.loads(json.dumps(doc)), "raw/v.json"))
    assert "| 1.00 | 0.400 | 0.000 |" in text and "| 20.00 | 1.000 | 0.200 |" in text
    runs = "\n".join(make_report.error_by_execution([("v.json", doc)]))
    assert "beside-copies factor 1.20, copies-beside-CPU factor 1.25, after-idle term up to 0.500 ms" in runs


def test_driver_probes_the_wait_policies_in_fresh_processes(monkeypatch):
    """The real probe at a tiny geometry (the curve's five gaps, each process's own numbers); then the
    environment each process got, and a failing probe is an error that says which."""
    out = run_validation.wait_policies(1, (64, 128), calls=1)
    assert [len(out[k]["after_idle"]) for k in ("default", "active")] == [5, 5]
    assert out["default"]["back_to_back_ms"] > 0 and out["default"] != out["active"]
    monkeypatch.setenv("GOMP_SPINCOUNT", "7")
    monkeypatch.setattr(run_validation, "POLICY_PROBE", "import json, os; print(json.dumps({'after_idle': [], "
                        "'back_to_back_ms': 1, 'env': [os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')]}))")
    got = run_validation.wait_policies(1, (64, 128))
    assert got["default"]["env"] == [None, None] and got["active"]["env"] == ["ACTIVE", None]
    monkeypatch.setattr(run_validation, "POLICY_PROBE", "import sys; sys.exit('no torch here')")
    with pytest.raises(RuntimeError, match="default wait-policy probe failed.*no torch here"):
        run_validation.wait_policies(1, (64, 128))


def test_driver_calibrates_from_its_own_micro_benchmarks(setup, monkeypatch):
    w, small, cpu, trace, routing, _ = setup
    # the copy curve, timed on a loaded CI box, can come out flat or falling at these sizes (one CI run fit a
    # non-positive bandwidth); this test is about the wiring, so the curve is a straight line
    monkeypatch.setattr(run_validation, "h2d_curve",
                        lambda device, sizes: [{"bytes": n, "ms": 0.01 + n / 1e7} for n in sizes])
    program = HybridProgram(w, w.geometry.num_experts, TOKENS, lowbit=small.lowbit)   # the all-resident run's slots
    out: dict = {}
    program.load_routing(routing)
    cost = run_validation.calibrate(w, program, routing, cpu, program.lowbit, 1, out)
    block = out["calibration"]["cpu"]
    assert cost.cpu["hop_s"] == block["hop_s"] > 0 and cost.cpu_expert_seconds(1) == block["expert_s"]["int8"][0][1] > 0
    assert cost.lowbit() == "hqq2-g64" and cost.quantization == "hqq4"
    assert cost.expert_bytes_by_quant["hqq4"] == w.expert_bytes
    assert cost.expert_bytes_by_quant["hqq2-g64"] == program.lowbit.nbytes
    graph = out["calibration_raw"]["graph"]
    assert cost.expert_seconds(1) == pytest.approx(graph["expert_ms"] * 1e-3)
    assert cost.lowbit_expert_seconds(1) == pytest.approx(graph["lowbit_expert_ms"] * 1e-3)


def test_driver_cpu_terms_measure_alone_and_beside_copies(setup):
    """The driver's CPU block: the factor is median beside / median alone of what it measured, and the
    block is one the cost model accepts."""
    import statistics

    w, program, cpu, *_ = setup
    block = run_validation.cpu_terms(w, cpu, 1, run_validation.timer("cpu"))
    m = block["measured"]
    assert len(m["alone_s"]) == len(m["beside_copies_s"]) >= 24 and m["copies_beside_cpu_s"]
    assert block["beside_copies"] == pytest.approx(statistics.median(m["beside_copies_s"])
                                                   / statistics.median(m["alone_s"]))
    assert block["expert_s"]["int8"][0][1] == pytest.approx(statistics.median(m["alone_s"]))
    cost = CostModel.from_dict(CostModel.preset("h200").to_dict() | {"cpu": block})
    assert cost.cpu_expert_seconds(1, beside_copies=True) == pytest.approx(
        statistics.median(m["beside_copies_s"]), rel=1e-9)
    assert len(m["copies_alone_s"]) >= len(m["copies_beside_cpu_s"])
    assert cost.copy_beside_cpu_factor() == pytest.approx(statistics.median(m["copies_beside_cpu_s"])
                                                          / statistics.median(m["copies_alone_s"]))
    idle = m["after_idle"]
    assert [len(x) for x in idle["after_gap_s"]] == [8] * len(idle["gaps_s"]) and len(idle["back_to_back_s"]) == 8
    for (gap, extra), slept, after in zip(block["after_idle"], idle["slept_s"], idle["after_gap_s"], strict=True):
        assert gap == statistics.median(slept) and extra == pytest.approx(
            max(0.0, statistics.median(after) - statistics.median(idle["back_to_back_s"])))
