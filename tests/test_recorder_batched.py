"""The batched prediction path records what the per-layer path records, and it is the one that runs.

The batched path (stash the decoder outputs, predict every layer of a step at close in one batched
norm + matmul) applies to families with a plain RMSNorm and a bias-free linear router; the others
keep the per-layer path. Independent recomputation of the predictions is in
test_recorder_correctness.py; this file compares the two paths with each other.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moesim.recorder import PRESETS, ByteTokenizer, Recorder, build_preset
from moesim.traces.format import read_trace

PROMPTS = ["def add(a, b):", "Hello there, general"]
NEW_TOKENS = 6
BATCHED = ["tiny-mixtral", "tiny-olmoe", "tiny-qwen2-moe", "tiny-qwen3-moe"]
PER_LAYER = sorted(set(PRESETS) - set(BATCHED))


def run(model, path, *, distance=2, stash_bytes=None, before_generate=None, **kwargs):
    tok = ByteTokenizer()
    with Recorder(model, None, path, predict_distance=distance, logits=True, pred_logits=True, flush_tokens=4,
                  **kwargs) as rec:
        if stash_bytes is not None:
            rec.stash_bytes = stash_bytes
        if before_generate is not None:
            before_generate(rec)
        for seq, p in enumerate(PROMPTS):
            ids = torch.tensor([tok.encode(p)])
            rec.begin_sequence(seq)
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS, do_sample=False)
    return rec, read_trace(path)


def assert_same(a, b, *, rtol=1e-5, atol=1e-5):
    assert len(a) == len(b)
    for col in ("seq", "token", "phase", "layer", "experts", "weights"):
        assert np.array_equal(getattr(a, col), getattr(b, col)), col
    np.testing.assert_array_equal(a.logits_matrix(), b.logits_matrix())
    assert a.pred_distances == b.pred_distances and a.pred_distances
    for d in a.pred_distances:
        assert np.array_equal(a.pred_experts(d), b.pred_experts(d)), f"pred{d}_experts"
        np.testing.assert_allclose(a.logits_matrix(f"pred{d}_logits"), b.logits_matrix(f"pred{d}_logits"),
                                   rtol=rtol, atol=atol, equal_nan=True)


@pytest.mark.parametrize("name", BATCHED)
@pytest.mark.parametrize("distance", [1, 2])
def test_batched_and_per_layer_paths_record_the_same(name, distance, tmp_path):
    model = build_preset(name, seed=11)
    rec_b, batched = run(model, tmp_path / "b.parquet", distance=distance)
    rec_p, per_layer = run(model, tmp_path / "p.parquet", distance=distance, batch_predictions=False)
    assert (rec_b.predict_path, rec_p.predict_path) == ("batched", "per-layer")
    assert_same(batched, per_layer)
    assert (batched.pred_experts(distance)[batched.layer >= distance] >= 0).all()


def test_batched_path_in_bfloat16_matches_per_layer(tmp_path):
    model = build_preset("tiny-mixtral", seed=4, dtype=torch.bfloat16)
    rec_b, batched = run(model, tmp_path / "b.parquet")
    _, per_layer = run(model, tmp_path / "p.parquet", batch_predictions=False)
    assert rec_b.predict_path == "batched"
    assert_same(batched, per_layer, rtol=2e-2, atol=2e-2)


def test_mixtral_uses_the_batched_path_and_no_per_layer_predict(tmp_path):
    model = build_preset("tiny-mixtral", seed=2)

    def forbid_per_layer(rec):
        def predict(*args, **kwargs):
            raise AssertionError("per-layer predict called on the batched path")
        rec.adapter.predict = predict

    rec, trace = run(model, tmp_path / "b.parquet", before_generate=forbid_per_layer)
    assert rec.predict_path == "batched"
    assert (trace.pred_experts(1)[trace.layer >= 1] >= 0).all()


@pytest.mark.parametrize("name", PER_LAYER)
def test_other_families_keep_the_per_layer_path(name, tmp_path):
    rec, trace = run(build_preset(name, seed=1), tmp_path / "t.parquet", distance=1)
    assert rec.predict_path == "per-layer"
    assert (trace.pred_experts(1)[trace.layer >= 1] >= 0).all()


def test_no_predictions_no_path(tmp_path):
    rec, trace = run(build_preset("tiny-mixtral"), tmp_path / "t.parquet", distance=0)
    assert rec.predict_path is None and trace.pred_distances == ()


def test_long_steps_beyond_the_stash_budget_go_per_layer(tmp_path):
    """Prefill over ``stash_bytes`` is predicted in the hooks, decode steps batched: same trace."""
    model = build_preset("tiny-qwen3-moe", seed=6)
    L, H = len(model.model.layers), model.config.hidden_size
    one_token = (L - 1) * H * 4  # kept outputs of one decode step at distance 1, float32

    calls = []

    def count_per_layer(rec):
        predict = rec.adapter.predict
        rec.adapter.predict = lambda *a: calls.append(1) or predict(*a)

    rec, mixed = run(model, tmp_path / "m.parquet", stash_bytes=one_token, before_generate=count_per_layer)
    _, per_layer = run(model, tmp_path / "p.parquet", batch_predictions=False)
    assert rec.predict_path == "batched"
    assert len(calls) == len(PROMPTS) * sum(L - d for d in (1, 2))  # the prefills only
    assert_same(mixed, per_layer)


class _OffsetRMSNorm(torch.nn.Module):
    """A Gemma-style RMSNorm (scales by 1 + weight): passes the shape checks, not the self-check."""

    def __init__(self, norm) -> None:
        super().__init__()
        self.weight, self.variance_epsilon = norm.weight, norm.variance_epsilon

    def forward(self, x):
        v = x.float().pow(2).mean(-1, keepdim=True)
        return (1.0 + self.weight) * (x.float() * torch.rsqrt(v + self.variance_epsilon)).to(x.dtype)


def test_self_check_falls_back_when_the_norm_is_not_plain_rmsnorm(tmp_path):
    model = build_preset("tiny-mixtral", seed=3)
    layer = model.model.layers[2]
    layer.post_attention_layernorm = _OffsetRMSNorm(layer.post_attention_layernorm)
    rec, trace = run(model, tmp_path / "t.parquet")
    assert rec.predict_path == "per-layer"
    assert (trace.pred_experts(1)[trace.layer >= 1] >= 0).all()


def test_stacked_router_shapes():
    from moesim.recorder import adapter_for

    model = build_preset("tiny-mixtral")
    a = adapter_for(model)
    norm, router, eps = a.stacked_router()
    L = len(a.layers)
    assert norm.shape == (L, a.hidden_size) and router.shape == (L, a.num_experts, a.hidden_size)
    assert eps == model.config.rms_norm_eps
    assert torch.equal(router[1], a.layers[1].gate.weight) and torch.equal(norm[3], a.layers[3].norm.weight)
    for name in PER_LAYER:
        assert adapter_for(build_preset(name)).stacked_router() is None


def test_packed_host_copy_matches_direct():
    ids = torch.randint(0, 200, (5, 3, 2)).transpose(0, 1)  # non-contiguous, like the predicted ids
    vals = torch.randn(3, 5, 7)
    direct = Recorder._to_host([ids, vals], pack=False)
    packed = Recorder._to_host([ids, vals], pack=True)
    for x, y in zip(direct, packed, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
    assert packed[0].dtype == np.int64 and packed[1].dtype == np.float32


def test_recording_through_the_packed_host_copy_is_unchanged(tmp_path, monkeypatch):
    """The one-copy packing that GPU runs take gives the same trace as the plain CPU copies."""
    model = build_preset("tiny-mixtral", seed=8)
    _, direct = run(model, tmp_path / "d.parquet")
    to_host = Recorder._to_host
    monkeypatch.setattr(Recorder, "_to_host", staticmethod(lambda tensors: to_host(tensors, pack=True)))
    _, packed = run(model, tmp_path / "p.parquet")
    assert_same(direct, packed, rtol=0, atol=0)
