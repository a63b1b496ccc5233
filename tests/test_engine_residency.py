"""The residency proof counted on the device: every expert piece checks the identity in its slot
against the expert the trace routes to it, and every copy's landed identity is counted.

CPU tests: zero violations and device copies == the plan's copies across policies / K / prefetchers;
mutations of the plan (two slots swapped, a copy dropped, the wrong blob copied) are caught. The CUDA test
(skips without CUDA): a compute that skips its wait on the copy is caught."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moesim.engine.identity import TAG_BYTES, expert_tag
from moesim.engine.plan import CachePlan, Routing, Step
from moesim.engine.quant import quant_spec
from moesim.engine.runtime import Geometry, OffloadedEngine, Weights

LAYERS = 3


def random_routing(tokens: int, layers: int, experts: int = 8, k: int = 2, seed: int = 0,
                   sticky: float = 0.5) -> Routing:
    """Top-k routing with some temporal locality (a token reuses an expert of the previous one with
    probability ``sticky``), so runs mix hits, misses and prefetches."""
    rng = np.random.default_rng(seed)
    ex = np.zeros((tokens, layers, k), np.int64)
    for t in range(tokens):
        for layer in range(layers):
            pick: list[int] = []
            if t and rng.random() < sticky:
                pick.append(int(ex[t - 1, layer, rng.integers(k)]))
            while len(pick) < k:
                e = int(rng.integers(experts))
                if e not in pick:
                    pick.append(e)
            ex[t, layer] = pick
    w = rng.dirichlet(np.ones(k), (tokens, layers)).astype(np.float32)
    return Routing(ex, w, np.arange(tokens * layers).reshape(tokens, layers), np.zeros(tokens, np.int64),
                   np.arange(tokens, dtype=np.int64), experts)


@pytest.fixture(scope="module")
def weights() -> Weights:
    return Weights(Geometry.tiny(LAYERS), quant_spec("hqq2"), "cpu", seed=5)


@pytest.fixture(scope="module")
def routing() -> Routing:
    return random_routing(12, LAYERS)


def test_blobs_carry_their_identity(weights):
    g = weights.geometry
    for layer in range(g.num_layers):
        for e in range(g.num_experts):
            blob = weights.host[layer][e]
            assert blob.numel() == weights.blob_bytes >= weights.expert_bytes + TAG_BYTES
            assert int(blob[-TAG_BYTES:].view(__import__("torch").int64)) == expert_tag(layer, e, g.num_experts)


@pytest.mark.parametrize("policy,k,prefetch,params", [
    ("lru", 2, "none", None), ("lfu", 3, "transition", {"budget": 4}), ("opt", 2, "oracle", {"budget": 6}),
    ("fifo", 4, "oracle", {"budget": 8, "distance": 2}), ("lru", 8, "none", None)])
def test_no_violations_and_device_copies_equal_the_plan(weights, routing, policy, k, prefetch, params):
    res = OffloadedEngine(weights, k, policy, prefetch, prefetch_params=params).run(routing)
    assert res.violations == 0
    assert res.device_copies == res.misses + res.prefetches > 0
    assert res.to_dict()["plan_copies"] == res.device_copies


def test_warm_copies_are_not_counted(weights, routing):
    res = OffloadedEngine(weights, 8, "lru", "none").run(routing, warm=True)
    assert (res.violations, res.device_copies, res.misses) == (0, 0, 0)


def _mutated_step(monkeypatch, mutate):
    """Wrap CachePlan.step so that ``mutate(t, layer, step)`` may return a corrupted Step."""
    orig = CachePlan.step

    def step(self, t, layer):
        s = orig(self, t, layer)
        return s if s is None else mutate(t, layer, s)
    monkeypatch.setattr(CachePlan, "step", step)


def test_swapped_slots_are_caught(weights, routing, monkeypatch):
    swapped = []

    def swap(t, layer, s: Step):
        if t % 3 == 1 and s.slots[0] != s.slots[1]:   # rank 0 reads rank 1's slot and vice versa
            swapped.append((t, layer))
            return dataclasses.replace(s, slots=[s.slots[1], s.slots[0]] + s.slots[2:])
        return s
    _mutated_step(monkeypatch, swap)
    res = OffloadedEngine(weights, 3, "lru", "none").run(routing)
    assert swapped and res.violations == 2 * len(swapped)


def test_dropped_copy_is_caught(weights, routing, monkeypatch):
    dropped = []

    def drop(t, layer, s: Step):
        if not dropped and t >= 4 and s.copies:
            dropped.append(s.copies[0])
            return dataclasses.replace(s, copies=s.copies[1:])
        return s
    _mutated_step(monkeypatch, drop)
    res = OffloadedEngine(weights, 2, "lru", "none").run(routing)
    assert dropped and res.violations >= 1
    assert res.device_copies == res.misses + res.prefetches - 1


def test_wrong_blob_copied_is_caught(weights, routing, monkeypatch):
    orig = OffloadedEngine._copy
    g = weights.geometry

    def copy(self, layer, slot, expert, *a, **kw):   # the copy moves the neighbouring expert's blob
        if a and a[1] == 5:   # token 5 (args: log, token, kind, ...)
            expert = (expert + 1) % g.num_experts
        return orig(self, layer, slot, expert, *a, **kw)
    monkeypatch.setattr(OffloadedEngine, "_copy", copy)
    res = OffloadedEngine(weights, 2, "lru", "none").run(routing)
    assert res.violations >= 1


def test_check_can_be_left_out(weights, routing):
    from moesim.engine.runtime import Program

    prog = Program(weights, 3, routing.num_tokens, check_residency=False)
    res = OffloadedEngine(weights, 3, "lru", "none", program=prog).run(routing)
    assert res.violations is None and res.device_copies is None and res.misses > 0


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cuda_compute_that_skips_its_copy_wait_is_caught(monkeypatch):
    """Mixtral-size hqq2 experts (66.7 MB copies) on 2 layers, every request a miss at K = 2: with the
    compute stream's wait on each copy skipped, expert pieces run before their blobs land and the
    device counts it; with the waits kept it counts nothing."""
    g = dataclasses.replace(Geometry(), num_layers=2, max_context=256)
    w = Weights(g, quant_spec("hqq2"), "cuda")
    T = 12
    t = np.arange(T)
    ex = ((2 * t[:, None] + np.arange(2)[None, :]) % 8)[:, None, :].repeat(2, axis=1).astype(np.int64)
    r = Routing(ex, np.full((T, 2, 2), 0.5, np.float32), np.arange(T * 2).reshape(T, 2), np.zeros(T, np.int64),
                t.astype(np.int64), 8)
    eng = OffloadedEngine(w, 2, "lru", "none", max_tokens=T)
    ok = eng.run(r)
    assert ok.violations == 0 and ok.device_copies == ok.misses == T * 2 * 2
    real_wait = w.d.wait

    def wait(event, stream=None):   # the mutation: compute no longer waits for any slot's copy
        if stream is None and any(m is not None and event is m.event for row in eng.marks.ready for m in row):
            return
        real_wait(event, stream)
    monkeypatch.setattr(w.d, "wait", wait)
    bad = eng.run(r)
    assert bad.violations > 0


def test_gpu_proof_script_cpu_check(tmp_path):
    """studies/residency_proof/gpu_residency_proof.py end to end on CPU (tiny model): every cell proven, exit 0."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    learned = root / "traces" / "learned-mixtral-32l.parquet"
    cmd = [sys.executable, str(root / "studies" / "residency_proof" / "gpu_residency_proof.py"), "--cpu-check", "--cells", "1",
           "--trace", str(learned), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / "residency_proof.json").read_text())
    (cell,) = out["cells"]
    assert cell["violations"] == 0 and cell["device_copies"] == cell["plan_copies"] == cell["misses"] > 0
    assert out["all_zero"] and out["all_copies_equal"]
