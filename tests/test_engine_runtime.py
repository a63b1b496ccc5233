"""The offloaded runtime on CPU with a tiny geometry: same code path as on the GPU (no streams)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from moesim.engine.plan import CachePlan, Routing
from moesim.engine.quant import quant_spec
from moesim.engine.runtime import Geometry, OffloadedEngine, Weights, expert_forward
from tests.helpers import grid_routing
from tests.oracle import replay_grid

LAYERS = 4


@pytest.fixture(scope="module")
def routing(real_trace) -> Routing:
    full = Routing.from_trace(real_trace)
    r = full.head(6)
    keep = r.row[:, :LAYERS]
    rows = keep[keep >= 0]
    renum = keep.copy()
    renum[keep >= 0] = np.argsort(np.argsort(rows))
    return Routing(r.experts[:, :LAYERS].copy(), r.weights[:, :LAYERS].copy(), renum, r.seq, r.position,
                   r.num_experts)


@pytest.fixture(scope="module")
def weights() -> Weights:
    return Weights(Geometry.tiny(LAYERS), quant_spec("hqq2"), "cpu", seed=3)


def plan_only(routing: Routing, k: int, policy: str, prefetch: str) -> CachePlan:
    plan = CachePlan(routing, k, policy, prefetch)
    for t in range(routing.num_tokens):
        for layer in range(routing.num_layers):
            plan.step(t, layer)
    return plan


def _skewed_sets(tokens: int, seed: int) -> list[list[list[int]]]:
    """sets[token][layer]: top-2 of 8 with skewed popularity (some hits at every size); one missing row."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(8, 0.6))
    sets = [[[int(e) for e in rng.choice(8, 2, replace=False, p=p)] for _ in range(LAYERS)] for _ in range(tokens)]
    sets[3][2] = []
    return sets


def _event_kinds(res) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for ev in res.events:
        kinds[ev["kind"]] = kinds.get(ev["kind"], 0) + 1
        assert ev["end_ms"] >= ev["start_ms"]
    return kinds


@pytest.mark.parametrize("policy,k", [("lru", 2), ("fifo", 3), ("lfu", 3), ("opt", 3), ("lru", 5)])
def test_engine_hits_equal_a_brute_force_replay(weights, policy, k):
    """The engine's counts against tests/oracle.py (plain-set caches written from the contract), per
    layer; what it did, from its own events and the device's residency proof."""
    sets = _skewed_sets(10, seed=4)
    res = OffloadedEngine(weights, k, policy, "none").run(grid_routing(sets), instrument=True)
    assert (res.hits, res.requests) == replay_grid(sets, k, policy)
    per_layer = [replay_grid([[row[layer]] for row in sets], k, policy)[0] for layer in range(LAYERS)]
    assert res.layer_hits == per_layer and 0 < res.hits < res.requests
    kinds = _event_kinds(res)
    assert kinds["expert"] == kinds["stall"] == res.requests == 2 * (10 * LAYERS - 1)
    assert kinds.get("miss", 0) == res.misses and "prefetch" not in kinds
    assert kinds["attention+gate"] == 10 * LAYERS   # a layer runs attention even where no expert is routed
    assert len(res.token_ms) == len(res.token_cpu_ms) == 10
    assert res.bytes_h2d == res.misses * weights.expert_bytes
    assert res.violations == 0 and res.device_copies == res.misses


@pytest.mark.parametrize("policy,k,prefetch", [("opt", 3, "oracle"), ("fifo", 3, "transition")])
def test_engine_with_a_prefetcher_accounts_every_copy(weights, policy, k, prefetch):
    """With a prefetcher: every copy the engine counts is an event and landed in its slot with the
    identity the trace routes to (the device proof, independent of the plan's bookkeeping)."""
    sets = _skewed_sets(10, seed=5)
    res = OffloadedEngine(weights, k, policy, prefetch).run(grid_routing(sets), instrument=True)
    assert res.prefetches > 0
    kinds = _event_kinds(res)
    assert kinds["expert"] == kinds["stall"] == res.requests == 2 * (10 * LAYERS - 1)
    assert kinds.get("miss", 0) == res.misses and kinds["prefetch"] == res.prefetches
    assert res.bytes_h2d == (res.misses + res.prefetches) * weights.expert_bytes
    assert res.violations == 0 and res.device_copies == res.misses + res.prefetches


def test_slots_hold_the_planned_experts(weights, routing):
    """After a run, every layer's slot buffer holds the bytes of the expert the plan put there."""
    eng = OffloadedEngine(weights, 3, "lfu", "transition")
    eng.run(routing)
    plan = plan_only(routing, 3, "lfu", "transition")
    for layer in range(LAYERS):
        for expert, slot in plan.slot_of[layer].items():
            assert np.array_equal(eng.slots[layer][slot].numpy(), weights.host[layer][expert].numpy())


def test_expert_forward_matches_dense_reference():
    import torch

    from moesim.engine.quant import dequantize, fill_random_blob, split_blob

    spec, hidden, ffn = quant_spec("hqq4"), 64, 256
    n = hidden * ffn
    blob = torch.zeros(spec.expert_bytes(hidden, ffn), dtype=torch.uint8)
    fill_random_blob(blob, spec, n, torch.Generator().manual_seed(0))
    x = torch.randn(3, hidden).to(torch.bfloat16)
    w1, w3, w2 = (dequantize(p, spec, n).float().numpy() for p in split_blob(blob, spec, n))
    xf = x.float().numpy()
    a = xf @ w1.reshape(ffn, hidden).T
    want = ((a / (1 + np.exp(-a))) * (xf @ w3.reshape(ffn, hidden).T)) @ w2.reshape(hidden, ffn).T
    got = expert_forward(blob, x, spec, hidden, ffn).float().numpy()
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05 * np.abs(want).max())


def test_bf16_experts_run(routing):
    w = Weights(Geometry.tiny(LAYERS), quant_spec("bf16"), "cpu")
    res = OffloadedEngine(w, 4, "lru", "none").run(routing.head(2))
    assert res.expert_bytes == 3 * 128 * 256 * 2 and res.requests == 2 * LAYERS * 2


def test_cache_smaller_than_top_k_is_refused(weights, routing):
    with pytest.raises(ValueError, match="smaller than top-k"):
        OffloadedEngine(weights, 1, "lru", "none").run(routing)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_engine_on_cuda_matches_plan(routing):
    w = Weights(Geometry.tiny(LAYERS), quant_spec("hqq2"), "cuda")
    res = OffloadedEngine(w, 3, "lru", "oracle").run(routing, instrument=True)
    plan = plan_only(routing, 3, "lru", "oracle")
    assert (res.hits, res.prefetches) == (plan.hits, plan.prefetches)


# ---- commands ------------------------------------------------------------------------------------

def moesim(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moesim", *args], capture_output=True, text=True, timeout=300)


RAW = {"h2d": [{"bytes": 1 << 20, "ms": 0.05}, {"bytes": 4 << 20, "ms": 0.1}, {"bytes": 64 << 20, "ms": 1.2}],
       "expert": {"hqq2": {"expert_bytes": 66748416, "curve": [{"tokens": 1, "ms": 2.6}]},
                  "hqq2+compile": {"expert_bytes": 66748416, "curve": [{"tokens": 1, "ms": 0.26},
                                                                        {"tokens": 8, "ms": 0.27}]}},
       "attention": [{"context": 128, "compiled": True, "ms": 0.15}, {"context": 4096, "compiled": True, "ms": 0.15}],
       "lm_head_ms": 0.065, "compile_ok": True}


def test_calibrate_from_raw_gives_a_loadable_cost_model(tmp_path):
    from moesim.simulator.cost_model import CostModel

    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps(RAW))
    out = tmp_path / "cal.json"
    r = moesim("calibrate", "--from-raw", str(raw), "-o", str(out))
    assert r.returncode == 0, r.stderr
    cost = CostModel.from_json(out)
    assert cost.expert_seconds(1) == pytest.approx(0.26e-3)          # the compiled kernels are what runs
    assert cost.copy_seconds(4 << 20) == pytest.approx(0.1e-3)       # the measured curve
    assert 1 / (cost.bandwidth_Bps) == pytest.approx((1.2e-3 - 0.1e-3) / ((64 << 20) - (4 << 20)))
    assert cost.layer_seconds(1000) == pytest.approx(0.15e-3) and cost.token_seconds() == pytest.approx(0.065e-3)


def test_calibration_prefers_the_engines_captured_pieces_and_prices_the_residual():
    from moesim.engine.calibration import to_cost_model
    from moesim.simulator.cost_model import CostModel

    raw = json.loads(json.dumps(RAW))
    raw["graph"] = {"first_ms": 0.16, "layer_ms": 0.15, "expert_ms": 0.25, "final_ms": 0.07}
    # 10 tokens x 4 layers, 80 expert calls: pieces sum to 10 * (0.16 + 3 * 0.15 + 0.07) + 80 * 0.25 = 26.8 ms
    raw["all_resident"] = {"layers": 4, "tokens": 10, "requests": 80, "gpu_ms_total": 28.8}
    cost = CostModel.from_dict(to_cost_model(raw))
    assert cost.expert_seconds(1) == pytest.approx(0.25e-3)     # batch 1: the captured piece
    assert cost.expert_seconds(8) == pytest.approx(0.27e-3)     # larger batches: the compiled curve
    assert cost.layer_seconds(0) == pytest.approx(0.15e-3) == cost.layer_seconds(4000)
    # final + first's extra + (28.8 - 26.8) / 10 ms of measured per-token overhead
    assert cost.token_seconds() == pytest.approx((0.07 + 0.01 + 0.2) * 1e-3)


def test_calibrate_bad_raw_is_one_line_exit_1(tmp_path):
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps({"h2d": []}))
    r = moesim("calibrate", "--from-raw", str(raw), "-o", str(tmp_path / "cal.json"))
    assert r.returncode == 1 and "raw.json" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "cal.json").exists()


def test_validate_missing_engine_file(real_trace_path, tmp_path):
    r = moesim("validate", str(real_trace_path), "--engine", str(tmp_path / "nope.json"), "-o", str(tmp_path / "x"))
    assert r.returncode == 1 and "nope.json" in r.stderr and "Traceback" not in r.stderr


def test_validate_report_on_engine_cells(weights, real_trace_path, tmp_path):
    """End to end on CPU: engine cells (tiny model, real routing head) -> report with identical hit rates."""
    from moesim.traces.format import read_trace

    routing = Routing.from_trace(read_trace(real_trace_path), 4)
    w = Weights(Geometry.tiny(32), quant_spec("hqq2"), "cpu")
    cells = [OffloadedEngine(w, k, "lru", pf).run(routing).to_dict() for k, pf in [(2, "none"), (3, "oracle")]]
    engine = {"device": "cpu", "date": "now", "layers": 32, "expert_bytes": 66748416, "quantization": "hqq2",
              "tokens": 4, "cells": cells}
    path = tmp_path / "engine.json"
    path.write_text(json.dumps(engine))
    r = moesim("validate", str(real_trace_path), "--engine", str(path), "-o", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["hit_rates_identical"] and len(rep["cells"]) == 2
    assert {"policy", "cache_size", "prefetch", "real_tokens_per_s", "sim_tokens_per_s", "rel_error",
            "real_hit_rate", "sim_hit_rate"} <= set(rep["cells"][0])
    assert (tmp_path / "rep.md").exists() and (tmp_path / "rep.png").stat().st_size > 1000


# ---- the decode program: output independent of the cache configuration ------------------------------

def reference_logits(w: Weights, routing: Routing):
    """The last token's logits, computed directly from the host experts (no slots, no program)."""
    import torch

    from moesim.engine.runtime import attention_forward

    g = w.geometry
    k_cache, v_cache = torch.zeros_like(w.k_cache), torch.zeros_like(w.v_cache)
    out = None
    for t in range(routing.num_tokens):
        pos = torch.tensor([int(routing.position[t]) % g.max_context])
        x = w.x0
        for layer in range(g.num_layers):
            x, _ = attention_forward(x, w.wq[layer], w.wk[layer], w.wv[layer], w.wo[layer], w.wg[layer],
                                     k_cache[layer], v_cache[layer], pos, w.positions, g, w.attn_quant)
            acc = torch.zeros(1, g.hidden)
            if routing.row[t, layer] >= 0:
                for e, wt in zip(routing.experts[t, layer], routing.weights[t, layer], strict=True):
                    y = expert_forward(w.host[layer][int(e)], x, w.quant, g.hidden, g.ffn)
                    acc += float(wt) * y.float()
            x = x + acc.to(x.dtype)
            x = x * torch.rsqrt(x.float().pow(2).mean() + 1e-6).to(x.dtype)
        out = (x @ w.lm_head.T).float()
    return out


@pytest.fixture(scope="module")
def gappy_routing(routing) -> Routing:
    """The routing with one (token, layer) row removed, as real traces have."""
    r = Routing(routing.experts.copy(), routing.weights.copy(), routing.row.copy(), routing.seq, routing.position,
                routing.num_experts)
    r.row[2, 1] = -1
    r.experts[2, 1] = -1
    rows = r.row[r.row >= 0]
    r.row[r.row >= 0] = np.argsort(np.argsort(rows))
    return r


@pytest.mark.parametrize("policy,k,prefetch", [("lru", 2, "none"), ("opt", 3, "oracle"), ("lfu", 4, "transition")])
def test_program_output_equals_direct_computation_for_any_cache(weights, gappy_routing, policy, k, prefetch):
    """Slots, router ranks, device-side routing weights and the token counter all plumbed right: the
    logits do not depend on which policy/K/prefetcher placed the experts, and equal a direct computation."""
    want = reference_logits(weights, gappy_routing)
    eng = OffloadedEngine(weights, k, policy, prefetch)
    eng.run(gappy_routing)
    got = eng.program.logits.float()
    assert int(eng.program.tok) == gappy_routing.num_tokens - 1
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=2e-3 * float(want.abs().max()))


def test_one_program_serves_several_configurations(weights, routing):
    from moesim.engine.runtime import Program

    prog = Program(weights, 4, routing.num_tokens)
    outs = []
    for k, policy in [(4, "lru"), (2, "fifo"), (3, "opt")]:
        res = OffloadedEngine(weights, k, policy, "none", program=prog).run(routing)
        assert res.requests == routing.num_tokens * LAYERS * 2
        outs.append(prog.logits.float().clone())
    for o in outs[1:]:
        assert np.array_equal(o.numpy(), outs[0].numpy())
    with pytest.raises(ValueError, match="exceeds"):
        OffloadedEngine(weights, 5, "lru", "none", program=prog)
    with pytest.raises(ValueError, match="tokens"):
        prog.load_routing(Routing(routing.experts.repeat(2, 0), routing.weights.repeat(2, 0),
                                     np.arange(routing.row.size * 2).reshape(-1, LAYERS),
                                     routing.seq.repeat(2), routing.position.repeat(2),
                                     routing.num_experts))


def test_attention_weights_are_packed_4bit(weights):
    g = weights.geometry
    kv = g.n_kv_heads * g.head_dim
    assert weights.attn_quant.name == "hqq4"
    assert weights.wq[0].numel() == quant_spec("hqq4").matrix_bytes(g.hidden * g.hidden)
    assert weights.attn_bytes == 2 * quant_spec("hqq4").matrix_bytes(g.hidden * g.hidden) + \
        2 * quant_spec("hqq4").matrix_bytes(kv * g.hidden)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_program_equals_eager(routing):
    w = Weights(Geometry.tiny(LAYERS), quant_spec("hqq2"), "cuda")
    outs = []
    for graphs in (False, True):
        eng = OffloadedEngine(w, 3, "lru", "transition", graphs=graphs)
        res = eng.run(routing)
        plan = plan_only(routing, 3, "lru", "transition")
        assert (res.hits, res.prefetches) == (plan.hits, plan.prefetches)
        outs.append(eng.program.logits.float().cpu())
    np.testing.assert_allclose(outs[1].numpy(), outs[0].numpy(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("fmt", ["hqq2-v02", "hqq4-v02"])
def test_hqq02_formats_run_and_dequantise_to_centred_weights(routing, fmt):
    """hqq 0.2's layout (bf16 scale/zero per group) through the engine; random fill keeps weights
    centred and small, as for the other formats."""
    import torch

    from moesim.engine.quant import dequantize, split_blob

    w = Weights(Geometry.tiny(LAYERS), quant_spec(fmt), "cpu", seed=1)
    res = OffloadedEngine(w, 3, "lru", "transition").run(routing)
    plan = plan_only(routing, 3, "lru", "transition")
    assert (res.hits, res.prefetches) == (plan.hits, plan.prefetches)
    g, spec = w.geometry, quant_spec(fmt)
    n = g.hidden * g.ffn
    wts = torch.cat([dequantize(p, spec, n).float() for p in split_blob(w.host[0][0], spec, n)])
    assert wts.abs().max() <= ((1 << spec.bits) - 1) * 0.0255 and abs(float(wts.mean())) < 0.01 and float(wts.std()) > 1e-3
