"""Placement advice and the CPU half of calibration (issue 24): llama.cpp's -ot naming and kTransformers'
rule names on made-up name lists in their formats, the frequency hot set against every subset, the
placement's counts recounted from the trace, the CPU kernels' numerics, and the commands."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest

from moesim.analysis.placement import (
    best_placement,
    frequency_set,
    ktransformers_rules,
    llama_cpp_ot,
    n_cpu_moe_set,
)
from moesim.cli import main
from moesim.simulator.cost_model import MIXTRAL_EXPERT_PARAMS, CostModel
from tests.helpers import random_trace


def gguf_names(layers: int) -> list[str]:
    """Tensor names as llama.cpp's GGUF files spell them for an MoE model (stacked experts, router,
    attention, a shared expert as in Qwen-MoE, embeddings)."""
    out = ["token_embd.weight", "output_norm.weight", "output.weight"]
    for n in range(layers):
        out += [f"blk.{n}.attn_q.weight", f"blk.{n}.attn_norm.weight", f"blk.{n}.ffn_gate_inp.weight",
                f"blk.{n}.ffn_up_exps.weight", f"blk.{n}.ffn_gate_exps.weight", f"blk.{n}.ffn_down_exps.weight",
                f"blk.{n}.ffn_up_shexp.weight", f"blk.{n}.ffn_norm.weight"]
    return out


@pytest.mark.parametrize("cpu_layers", [[0], [0, 1, 2], [1, 3, 12], list(range(13))])
def test_ot_rule_matches_exactly_those_layers_stacked_experts(cpu_layers):
    ot = llama_cpp_ot(cpu_layers)
    pattern, device = ot.rsplit("=", 1)
    assert device == "CPU"
    matched = [n for n in gguf_names(14) if re.search(pattern, n)]     # llama.cpp: std::regex_search
    assert matched == [f"blk.{n}.ffn_{p}_exps.weight" for n in sorted(cpu_layers) for p in ("up", "gate", "down")]
    assert llama_cpp_ot([]) == ""


def test_ktransformers_rules_match_exactly_the_experts_modules():
    names = []
    for n in range(12):
        names += [f"model.layers.{n}.block_sparse_moe.experts", f"model.layers.{n}.block_sparse_moe.experts.0.w1",
                  f"model.layers.{n}.block_sparse_moe.gate", f"model.layers.{n}.self_attn.q_proj"]
    rules = ktransformers_rules([2, 10, 11], [0, 1])
    devices = {}
    for rule in rules:          # kTransformers: re.match of the module name
        for n in names:
            if re.match(rule["match"]["name"], n):
                devices[n] = rule["replace"]["kwargs"]["generate_device"]
    assert devices == {**{f"model.layers.{n}.block_sparse_moe.experts": "cuda" for n in (2, 10, 11)},
                       **{f"model.layers.{n}.block_sparse_moe.experts": "cpu" for n in (0, 1)}}


def test_frequency_set_serves_the_most_requests_of_any_subset(tmp_path):
    t = random_trace(tmp_path / "t.parquet", np.random.default_rng(2), tokens=40, num_layers=2, num_experts=4,
                     top_k=2, skew=1.3)
    pairs = list(zip(np.repeat(t.layer, 2).tolist(), t.experts.reshape(-1).tolist(), strict=True))

    def served(subset) -> int:
        chosen = set(subset)
        return sum(p in chosen for p in pairs)

    for slots in range(0, 9):
        best = max(served(c) for c in itertools.combinations([(ly, e) for ly in range(2) for e in range(4)], slots))
        assert served(frequency_set(t, slots)) == best
        assert len(frequency_set(t, slots)) == slots


def test_best_placement_counts_recounted_from_the_trace(tmp_path):
    t = random_trace(tmp_path / "t.parquet", np.random.default_rng(4), tokens=30, num_layers=4, num_experts=8,
                     top_k=2, skew=1.2)
    cost = CostModel.preset("h200")
    xb = cost.expert_bytes()
    out = best_placement(t, cost, vram_gb=13 * xb / 1e9 + 1e-6)      # 13 experts: 1 whole layer + 5 spare
    assert out["gpu_slots"] == 13
    assert out["llama_cpp_n_cpu_moe"] == 3 and out["llama_cpp_ot"] == llama_cpp_ot([0, 1, 2])
    by_name = {c["name"]: c for c in out["candidates"]}
    assert set(by_name) == {"n-cpu-moe=3", "frequency"}
    # n-cpu-moe=3: layer 3 on the GPU, every request of layers 0..2 on the CPU
    layer = t.layer.tolist()
    assert by_name["n-cpu-moe=3"]["executed"]["cpu"] == 2 * sum(ly < 3 for ly in layer)
    assert by_name["n-cpu-moe=3"]["hit_rate"] == pytest.approx(sum(ly == 3 for ly in layer) / len(layer))
    best = by_name[out["placement"]]
    assert out["tokens_per_s"] == max(c["tokens_per_s"] for c in out["candidates"]) == best["tokens_per_s"]
    gpu = {tuple(p) for p in out["gpu_experts"]}
    pairs = list(zip(np.repeat(t.layer, 2).tolist(), t.experts.reshape(-1).tolist(), strict=True))
    assert out["hit_rate"] == pytest.approx(sum(p in gpu for p in pairs) / len(pairs), abs=1e-6)
    assert len(gpu) <= 13 and n_cpu_moe_set(4, 8, 13)[0] == 3


def test_placement_cli(tmp_path, capsys):
    t = random_trace(tmp_path / "t.parquet", np.random.default_rng(5), tokens=10, num_layers=2, num_experts=8,
                     top_k=2, skew=1.0)
    assert main(["placement", str(t.path), "--vram-gb", "0.6", "--hardware", "h200", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"gpu_experts", "tokens_per_s", "hit_rate", "llama_cpp_ot", "ktransformers_rules"} <= set(out)
    assert main(["placement", str(t.path), "--vram-gb", "0.6", "--hardware", "h200"]) == 0
    text = capsys.readouterr().out
    assert "-ot" in text and "block_sparse_moe" in text
    assert main(["placement", str(t.path), "--vram-gb", "-1", "--hardware", "h200"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("fmt, tol", [("bf16", 0.01), ("int8", 0.02), ("int4", 0.12)])
def test_cpu_kernels_compute_the_weights_they_hold(fmt, tol):
    """The timed kernels multiply by the weight they were given (int4: torch's packed layout)."""
    torch = pytest.importorskip("torch")
    from moesim.engine.cpu_bench import quantized_linear

    torch.manual_seed(0)
    w = torch.randn(128, 256)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    ref = x.float() @ w.T
    err = (quantized_linear(fmt, w)(x).float() - ref).norm() / ref.norm()
    assert err < tol
    assert (quantized_linear(fmt, w.flip(0))(x).float() - ref).norm() / ref.norm() > 0.5   # not just any output


def test_calibrate_cpu_only_writes_a_calibration_simulate_accepts(tmp_path, capsys):
    pytest.importorskip("torch")
    cal, raw = tmp_path / "cal.json", tmp_path / "raw.json"
    args = ["calibrate", "--cpu-only", "--geometry", "64x128", "--cpu-threads", "1", "--cpu-tokens", "1,2",
            "--repeats", "1", "--base", "a6000", "-o", str(cal), "--raw-out", str(raw)]
    assert main(args) == 0
    block = json.loads(cal.read_text())["cpu"]
    rows = json.loads(raw.read_text())["rows"]
    assert set(block["expert_s"]) == {"int8", "int4", "bf16"} and block["threads"] == 1
    scale = MIXTRAL_EXPERT_PARAMS / (3 * 64 * 128)
    for r in rows:
        assert [r["tokens"], pytest.approx(r["median_s"] * scale)] in block["expert_s"][r["format"]]
    model = CostModel.from_json(cal)
    assert model.cpu_expert_seconds(1) == pytest.approx(block["expert_s"]["int8"][0][1])
    idle = json.loads(raw.read_text())["after_idle"]   # measured without a GPU, on the most threads asked for
    assert idle["threads"] == 1 and len(block["after_idle"]) == len(idle["gaps_s"]) == 5
    assert model.cpu["after_idle"] == block["after_idle"] and "after idle" in capsys.readouterr().out
    t = random_trace(tmp_path / "t.parquet", np.random.default_rng(1), tokens=5, num_layers=2, num_experts=8,
                     top_k=2, skew=1.0)
    capsys.readouterr()
    assert main(["simulate", str(t.path), "--policy", "lru", "--cache-size", "2", "--calibration", str(cal),
                 "--execution", "fiddler", "--json"]) == 0
    assert sum(json.loads(capsys.readouterr().out)["executed"].values()) == 20
    assert main(args) == 2                     # refuses to overwrite without --force
    assert main([*args[:3], "10x3", *args[4:-4], "-o", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--geometry" in err[-1] and not (tmp_path / "x.json").exists()


def test_calibrate_cpu_only_without_torch_is_one_clear_line(tmp_path):
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; from moesim.cli import main; "
            f"sys.exit(main(['calibrate', '--cpu-only', '-o', r'{tmp_path}/c.json']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "needs torch" in p.stderr
    assert not (tmp_path / "c.json").exists()


def test_cpu_calls_beside_copies_run_at_once_and_alternate_with_alone_rounds():
    """Copies keep running on this thread for as long as the worker's CPU calls run, and no longer; the
    rounds alternate alone / beside; a failing worker is an error, not a hang."""
    import threading
    import time

    from moesim.engine.cpu_bench import alone_and_beside, beside_copies

    log: list[str] = []
    worker_busy = threading.Event()

    def cpu_calls() -> list[float]:
        worker_busy.set()
        time.sleep(0.05)
        log.append("cpu")
        worker_busy.clear()
        return [0.01, 0.02]

    def copy_once() -> None:
        log.append("copy" if worker_busy.is_set() else "copy-after")
        time.sleep(0.002)
    cpu, copies = beside_copies(cpu_calls, copy_once)
    assert cpu == [0.01, 0.02] and len(copies) == log.count("copy") + log.count("copy-after") >= 5
    # copies stop once the worker is done: the few after its last call are those started before it signalled
    assert log.count("copy-after") <= 3 < log.count("copy")
    log.clear()
    m = alone_and_beside(cpu_calls, copy_once, rounds=3)
    assert len(m["alone_s"]) == len(m["beside_copies_s"]) == 6 and len(m["copies_beside_cpu_s"]) >= 3
    assert log[0] == "cpu"   # alone first, no copy before it
    # each round ends with as many copies alone (at least 8) as ran beside the CPU calls
    assert len(m["copies_alone_s"]) >= max(len(m["copies_beside_cpu_s"]), 24)
    assert log.count("copy-after") >= len(m["copies_alone_s"]) and log[-1] == "copy-after"

    def broken() -> list[float]:
        raise ValueError("boom")
    with pytest.raises(RuntimeError, match="CPU benchmark thread failed"):
        beside_copies(broken, lambda: time.sleep(0.001))


def test_after_idle_times_calls_back_to_back_and_after_each_gap_in_alternating_rounds():
    """A fake expert that takes 1 ms more when the previous call ended over 3 ms ago (a pool gone to sleep):
    the curve shows the extra at the long gaps only, measured on a worker thread, gaps in alternating order."""
    import threading
    import time

    from moesim.engine.cpu_bench import after_idle, after_idle_curve

    state = {"last": 0.0, "threads": set()}
    order: list[float] = []

    def call() -> None:
        t0 = time.perf_counter()
        order.append(t0 - state["last"])
        state["threads"].add(threading.get_ident())
        end = t0 + (0.0015 if t0 - state["last"] > 0.003 else 0.0005)
        while time.perf_counter() < end:
            pass
        state["last"] = time.perf_counter()
    m = after_idle(call, gaps_s=(0.0002, 0.001, 0.008, 0.02), calls=5, rounds=2)
    assert len(m["back_to_back_s"]) == 10 and [len(x) for x in m["after_gap_s"]] == [10] * 4
    assert state["threads"] and threading.get_ident() not in state["threads"]
    assert all(min(s) >= g for s, g in zip(m["slept_s"], m["gaps_s"], strict=True))
    # round 1 runs the gaps shortest first, round 2 longest first: the gaps measured before each call say so
    # (after the pool's first call: per round 5 back to back, then 5 after each gap)
    gap_before = order[1:]
    assert len(gap_before) == 2 * (5 + 4 * 5)
    # a sleep lasts at least its gap (a loaded box only stretches the short ones): lower bounds say the order
    assert gap_before[15] >= 0.008 and gap_before[20] >= 0.02      # round 1: 0.2, 1, 8, 20 ms
    assert gap_before[30] >= 0.02 and gap_before[35] >= 0.008      # round 2: 20, 8, 1, 0.2 ms
    curve = after_idle_curve(m)
    assert [g for g, _ in curve] == [pytest.approx(s, rel=0.5) for s in (0.0002, 0.001, 0.008, 0.02)]
    assert curve[0][1] < 0.0004 and curve[1][1] < 0.0004
    assert curve[2][1] == pytest.approx(0.001, abs=0.0004) and curve[3][1] == pytest.approx(0.001, abs=0.0004)
    fixed = {"back_to_back_s": [1.0, 2.0, 9.0], "slept_s": [[0.1, 0.3, 0.2]], "after_gap_s": [[1.0, 1.5, 0.5]]}
    assert after_idle_curve(fixed) == [[0.2, 0.0]]   # median 1.0 - median 2.0: clamped at 0
    fixed["after_gap_s"] = [[3.0, 4.5, 0.5]]
    assert after_idle_curve(fixed) == [[0.2, 1.0]]


def test_cpu_block_takes_the_beside_copies_factor_as_median_over_median(tmp_path):
    from moesim.engine.cpu_bench import cpu_block

    raw = {"geometry": {"hidden": 4096, "ffn": 14336}, "repeats": 3, "date": "2026-12-07T00:00:00+00:00",
           "host": {"processor": "x", "logical_cpus": 16, "torch": "2"},
           "rows": [{"format": "int8", "tokens": 1, "threads": 8, "median_s": 0.002}],
           "beside_copies": {"format": "int8", "threads": 8, "copy_bytes": 66748416, "alone_s": [1.0, 2.0, 9.0],
                             "beside_copies_s": [3.0, 3.0, 0.5, 4.0, 3.5], "copies_beside_cpu_s": [1.0]}}
    block = cpu_block(raw)
    assert block["beside_copies"] == pytest.approx(3.0 / 2.0)
    assert "66748416 B" in block["sources"]["beside_copies"]
    assert "copies_beside_cpu" not in block and "after_idle" not in block   # an older raw file: no such terms
    assert "beside_copies" not in cpu_block({k: v for k, v in raw.items() if k != "beside_copies"})
    raw["beside_copies"] |= {"copies_beside_cpu_s": [2.0, 2.4, 1.0], "copies_alone_s": [1.0, 5.0, 1.6, 1.5]}
    raw["after_idle"] = {"format": "int8", "threads": 8, "gaps_s": [0.001, 0.01], "back_to_back_s": [0.002] * 3,
                         "slept_s": [[0.0011] * 3, [0.0102] * 3], "after_gap_s": [[0.002] * 3, [0.0025] * 3]}
    block = cpu_block(raw)
    assert block["copies_beside_cpu"] == pytest.approx(2.0 / 1.55)
    assert block["after_idle"] == [[0.0011, 0.0], [0.0102, pytest.approx(0.0005)]]
    assert "1, 10 ms" in block["sources"]["after_idle"] and "4 alone" in block["sources"]["copies_beside_cpu"]
    read = CostModel.from_dict(CostModel.preset("h200").to_dict() | {"cpu": block})
    assert read.copy_beside_cpu_factor() == pytest.approx(2.0 / 1.55)
    assert read.cpu_after_idle_seconds(0.05) == pytest.approx(0.0005)
    cal = CostModel.preset("h200").to_dict() | {"cpu": block}
    cost = CostModel.from_dict(cal)
    assert cost.cpu_expert_seconds(1, beside_copies=True) == pytest.approx(0.003)
    assert cost.cpu_expert_seconds(1) == pytest.approx(0.002)
