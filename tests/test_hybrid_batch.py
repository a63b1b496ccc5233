"""Hybrid execution at batch B > 1 (moesim/engine/hybrid_batch.py), on the engine's CPU device path with a
tiny checkpoint and 4 sequences per decode step: every execution policy's logits equal the copy-only batch
engine's within the formats' tolerance; the executor counts equal the timing simulator's at the same batch
size (and, for n-cpu-moe, a brute-force count from the raw rows' per-step unions, tests/oracle.py); and
the proof catches an expert computed twice, one the plan named that never ran, one computed by another
executor than the plan named, and a CPU copy of the wrong expert."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from moesim.engine.batch import BatchEngine, Lanes
from moesim.engine.hybrid import CpuExperts, LowbitCopies, priced_schedule
from moesim.engine.hybrid_batch import HybridBatchEngine, HybridBatchProgram
from moesim.engine.plan import Routing
from moesim.engine.quant import quant_spec
from moesim.engine.runtime import Geometry, Weights
from moesim.errors import SettingError
from moesim.policies.execution import Pinned, parse_execution
from moesim.simulator.cost_model import CostModel
from moesim.traces.steps import build_steps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studies.hybrid import run_validation  # noqa: E402
from tests.helpers import swapped_cpu_copies  # noqa: E402
from tests.oracle import replay_sets, union_requests  # noqa: E402

LAYERS, B, STEPS, K = 3, 4, 4, 4
PINS = Pinned([(0, 1), (1, 3), (2, 0), (2, 5)])


@pytest.fixture(scope="module")
def setup():
    g = Geometry.tiny(LAYERS)
    w = Weights(g, quant_spec("hqq4"), "cpu", seed=3)
    cpu = CpuExperts.of(w, [(layer, e) for layer in range(LAYERS) for e in range(g.num_experts)])
    # 4 segments of the shipped trace as 4 sequences, priced as full-size Mixtral hqq2 experts
    trace = run_validation.decode_trace(ROOT / "traces" / "synth-mixtral-8x7b.parquet", B * STEPS, LAYERS,
                                        66_748_416, "hqq2", batch=B)
    steps = build_steps(trace, B)
    assert len(steps) == STEPS and all(s.tokens == B for s in steps)
    program = HybridBatchProgram(w, B, False, STEPS, Lanes(w, B), lowbit=LowbitCopies(w))
    # the preset's CPU made 4x faster: at these prices Fiddler and the split put some misses on the CPU
    cost = CostModel.preset("h200").with_overrides(cpu_speed=4.0)
    return w, program, cpu, trace, steps, Routing.from_trace(trace), cost


def run(setup, execution, engine_cls=HybridBatchEngine, routing=None):
    """(per-step logits, the run's dict, the simulator's executed counts at batch B)."""
    w, program, cpu, trace, steps, default_routing, cost = setup
    exe = parse_execution(execution)
    schedule, sim = priced_schedule(trace, "lru", K, cost, exe, batch_size=B)
    eng = engine_cls(program, K, "lru", schedule if exe.prices else exe, cpu_experts=cpu, cpu_threads=2)
    res = eng.run(steps, routing or default_routing, keep_logits=True)
    return np.stack(res.logits), res.to_dict(), sim.timing.executed


@pytest.fixture(scope="module")
def reference(setup):
    """The copy-only batch engine's logits, and its run with every routing weight 0 (no experts' share)."""
    w, program, cpu, trace, steps, routing, cost = setup

    def plain(r):
        res = BatchEngine(program, K, "lru").run(steps, r, keep_logits=True)
        assert res.violations == 0 and res.hybrid is None
        return np.stack(res.logits)
    silent = Routing(routing.experts, np.zeros_like(routing.weights), routing.row, routing.seq, routing.position,
                     routing.num_experts)
    return plain(routing), plain(silent)


@pytest.mark.parametrize("execution", ["copy", "n-cpu-moe=1", "n-cpu-moe=3", "fiddler", "hybrid", "hobbit", "hobbit=0.4", PINS,
                                       Pinned([(0, 2), (1, 4)], rest="cpu")])
def test_logits_equal_the_copy_engine_and_executors_equal_the_simulator(setup, reference, execution):
    ref, none = reference
    steps = setup[4]
    logits, res, sim = run(setup, execution)
    assert res["executed"] == sim, execution
    unions = sum(len(S) for st in steps for S in st.layers.values())
    assert sum(res["executed"].values()) == res["requests"] == unions > STEPS * LAYERS * 2   # unions, not tokens
    assert res["violations"] == res["once_violations"] == res["executor_violations"] == res["cpu_violations"] == 0
    assert res["device_copies"] == res["executed"]["copy"] + res["executed"]["lowbit"]
    assert res["batch"] == B and res["steps"] == STEPS
    name = parse_execution(execution).name
    kind = {"hobbit": "lowbit", "pinned": "pinned", "copy": "copy"}.get(name.split("=")[0], "cpu")
    assert res["executed"][kind] > 0, (name, res["executed"])
    if name.endswith("on the CPU"):
        assert res["executed"]["cpu"] > 0
    share = np.abs(ref - none).max()
    err = np.abs(logits - ref).max()
    # int8 CPU copies of 4-bit experts: a few percent of the experts' share; HOBBIT's 2-bit substitute more
    assert err <= (0.35 if kind == "lowbit" else 0.05) * share, (name, err, share)
    if kind == "cpu":
        assert res["cpu_threads_used"] == 1 and res["cpu_timing"]["n"] == res["executed"]["cpu"]


def test_n_cpu_moe_counts_equal_a_brute_force_union_count(setup):
    """n-cpu-moe=1: layer 0's experts all on the CPU, the rest through an LRU cache of K; each step's union
    per layer rebuilt from the raw rows (tests/oracle.py, no moesim.traces.steps), the cache a plain set."""
    trace = setup[3]
    sets = union_requests(trace.seq, trace.token, trace.layer, trace.experts, K, batch=B)
    cpu = sum(len(keys) for _, keys in sets[0])
    hits = requests = 0
    for layer in range(1, LAYERS):
        h, r = replay_sets([keys for _, keys in sets[layer]], K, "lru", [step for step, _ in sets[layer]])
        hits, requests = hits + h, requests + r
    _, res, _ = run(setup, "n-cpu-moe=1")
    assert res["executed"] == {"gpu_hit": hits, "copy": requests - hits, "cpu": cpu, "lowbit": 0, "pinned": 0}
    assert cpu > STEPS * 2   # the unions of 4 tokens' top-2, not one token's


class CpuAlsoComputes(HybridBatchEngine):
    """Mutant: the CPU worker is also handed the layer's first expert the plan put on the GPU."""

    def _serve(self, plan, i, st, layer, gate_done, log, nxt):
        self._union = st.layers.get(layer) or []
        super()._serve(plan, i, st, layer, gate_done, log, nxt)

    def _to_cpu(self, i, layer, experts):
        extra = [e for e in self._union if e not in experts][:1]
        super()._to_cpu(i, layer, experts + extra)


class CpuDropsOne(HybridBatchEngine):
    """Mutant: the CPU worker never gets the last expert the plan put on it."""

    def _to_cpu(self, i, layer, experts):
        super()._to_cpu(i, layer, experts[:-1])


class FullFormatOnly(HybridBatchEngine):
    """Mutant: a slot holding a substitute is computed with the full format's piece."""

    def _piece(self, layer, slot, expert):
        self.slot_kind[layer] = dict.fromkeys(self.slot_kind[layer], "copy")
        return super()._piece(layer, slot, expert)


@pytest.mark.parametrize("engine_cls,execution", [(CpuAlsoComputes, "n-cpu-moe=1"), (CpuDropsOne, "n-cpu-moe=1"),
                                                  (CpuAlsoComputes, "fiddler")])
def test_an_expert_computed_twice_or_never_is_caught(setup, engine_cls, execution):
    _, res, _ = run(setup, execution, engine_cls)
    assert res["violations"] > 0 and res["once_violations"] > 0 and res["executor_violations"] > 0


def test_an_expert_computed_by_another_executor_is_caught(setup):
    _, res, sim = run(setup, "hobbit", FullFormatOnly)
    assert res["executed"] == sim and res["executed"]["lowbit"] > 0   # the counts cannot see it
    assert res["violations"] == res["once_violations"] == 0           # nor the identities
    assert res["executor_violations"] >= res["executed"]["lowbit"]


def test_a_cpu_copy_of_the_wrong_expert_is_caught(setup):
    with swapped_cpu_copies(setup[2], (0, 2), (0, 6)):
        _, res, _ = run(setup, "n-cpu-moe=1")
    assert res["cpu_violations"] > 0 and res["violations"] > 0 and res["executor_violations"] > 0


def test_batch_engine_refuses_what_it_cannot_run(setup):
    w, program, cpu, trace, steps, routing, _ = setup
    with pytest.raises(SettingError, match="prices its choices"):
        HybridBatchEngine(program, K, "lru", "fiddler", cpu_experts=cpu)
    with pytest.raises(SettingError, match="leaves none"):
        HybridBatchEngine(program, 2, "lru", Pinned([(0, 1), (0, 2)]), cpu_experts=cpu)
    eng = HybridBatchEngine(program, K, "lru", "n-cpu-moe=1")
    with pytest.raises(SettingError, match="cpu_experts"):
        eng.run(steps, routing)
    with pytest.raises(SettingError, match="starts cold"):
        eng.run(steps, routing, warm=True)


def test_driver_batch_cell(setup):
    w, program, cpu, trace, steps, routing, cost = setup
    row = run_validation.run_cell(w, program, cpu, routing, trace, cost, K, "n-cpu-moe=1", 1, steps)
    assert row["batch"] == B and row["tokens"] == B * STEPS and row["executed_equal"]
    assert row["violations"] == row["once_violations"] == row["executor_violations"] == 0
    assert row["executed_real"]["cpu"] > 0 and row["cpu_timing"]["n"] == row["executed_real"]["cpu"]


def test_driver_batch_calibration_scales_the_cpu_curve(setup):
    """On the CPU the batch program has no GPU times: the batch-1 terms stand, and the CPU expert's curve
    over 1..B tokens is the one-token time times each count's measured ratio; the batch-1 cost is untouched."""
    w, program, cpu, trace, steps, routing, cost = setup
    before = cost.to_dict()
    out: dict = {}
    bcost = run_validation.batch_calibration(w, program, steps, routing, cpu, 1, cost, out)
    cal = out["batch_calibration"][str(B)]
    curve = cal["cpu_token_curve"]
    assert [n for n, _ in curve] == list(range(1, B + 1)) and all(t > 0 for _, t in curve)
    assert cal["terms"] is None and bcost.expert_seconds(2) == cost.expert_seconds(2)
    for n, t in curve:
        assert bcost.cpu_expert_seconds(n) == pytest.approx(cost.cpu_expert_seconds(1) * t / curve[0][1])
    assert cost.to_dict() == before


def test_driver_refuses_bad_batch_sizes(tmp_path, capsys):
    for bad in ("x", "0,4"):
        with pytest.raises(SystemExit) as exc:
            run_validation.main(["--out", str(tmp_path), "--tiny", "--batch", bad])
        assert exc.value.code == 2 and "--batch" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_report_shows_batch_cells_apart():
    from studies.hybrid import make_report

    cells = []
    for batch, times in ((1, {"copy": (10.0, 10.5), "n-cpu-moe=4": (9.0, 9.9)}),
                         (4, {"copy": (4.0, 4.2), "n-cpu-moe=4": (5.0, 4.5)})):
        for ex, (real, sim) in times.items():
            cells.append({"trace": "t.parquet", "batch": batch, "cache_size": 2, "execution": ex,
                          "real_ms_per_token": real, "sim_ms_per_token": sim, "error": (sim - real) / real,
                          "executed_real": {"copy": 1}, "executed_sim": {"cpu": 0}, "executed_equal": True,
                          "violations": 0, "once_violations": 0, "cpu_violations": 0,
                          **({"executor_violations": 0} if batch > 1 else {})})
    doc = {"device": "H100", "commit": "abc", "date": "d", "batch": [1, 4], "batch_steps": 8, "tokens_per_cell": 20,
           "cpu_threads": 14, "host_cpus": 16, "cells": cells,
           "engine": {"geometry": {"num_layers": 32}, "quantization": "hqq4", "lowbit": "hqq2-g64", "cpu_format": "int8"},
           "calibration": {"cpu": {"format": "int8", "expert_s": {"int8": [[1, 0.0015]]}, "hop_s": 2e-5}},
           "batch_calibration": {"4": {"terms": None, "cpu_expert_s": [[1, 0.0015], [2, 0.002]]}}}
    text = "\n".join(make_report.validation_section(doc, "raw/v.json"))
    assert "LRU, batch 1 and 4, 20 decode tokens per batch-1 cell; 4 sequences x 8 decode steps per batch-4 cell" in text
    assert "### t.parquet, batch 1" in text and "### t.parquet, batch 4" in text
    assert "| 2 | copy (1.00x) | copy (1.00x) |" in text and "| 2 | n-cpu-moe=4 (1.11x) | n-cpu-moe=4 (1.06x) |" in text
    assert "| 2 | n-cpu-moe=4 | 5.00 | 4.50 | -10.0% | yes |" in text
    assert "executor violations 0." in text and "(tokens: time) 1: 1.500 ms, 2: 2.000 ms" in text
    doc["batch_errors"] = {"4": "Traceback (most recent call last):\n  ...\nRuntimeError: boom\n"}
    text = "\n".join(make_report.validation_section(doc, "raw/v.json"))
    assert "The batch-4 cells stopped on an error: `RuntimeError: boom` (the whole traceback is in `raw/v.json`)" in text
    runs = "\n".join(make_report.error_by_execution([("v.json", doc)]))
    assert "v.json (batch 1 and 4): median / max |error|" in runs
    assert "| copy, batch 4 | 5.0% / 5.0% |" in runs and "| n-cpu-moe, batch 1 | 10.0% / 10.0% |" in runs


def test_driver_runs_batch_cells_and_survives_a_batch_failure(tmp_path, monkeypatch):
    """The driver end to end on the tiny CPU engine (2 executions at one K, so it takes seconds): batch-1 and
    batch-4 cells, each with counts equal to the simulator's; then a batch-4 failure drops only its cells."""
    import json

    monkeypatch.setattr(run_validation, "CACHE_SIZES", (2,))
    monkeypatch.setattr(run_validation, "executions", lambda layers: ["copy", "n-cpu-moe=1"])
    monkeypatch.setattr(run_validation, "wait_policies", lambda *a, **k: {})

    def cells(out):
        assert run_validation.main(["--out", str(out), "--tiny", "--batch", "1,4", "--tokens", "4"]) == 0
        return json.loads((out / "validation_cpu-tiny.json").read_text())
    doc = cells(tmp_path / "ok")
    assert doc["batch"] == [1, 4] and doc["batch_steps"] == 2 and "4" in doc["batch_calibration"]
    assert sorted((c["batch"], c["execution"]) for c in doc["cells"]) == sorted(
        [(b, ex) for b in (1, 4) for ex in ("copy", "n-cpu-moe=1")] * 2)
    assert all(c["executed_equal"] and c["violations"] == 0 for c in doc["cells"])
    assert {c["tokens"] for c in doc["cells"] if c["batch"] == 4} == {8}
    assert all(c["executor_violations"] == 0 for c in doc["cells"] if c["batch"] == 4)

    def boom(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(run_validation, "batch_calibration", boom)
    doc = cells(tmp_path / "failed")
    assert "RuntimeError: boom" in doc["batch_errors"]["4"] and "error" not in doc
    assert {c["batch"] for c in doc["cells"]} == {1} and len(doc["cells"]) == 4
