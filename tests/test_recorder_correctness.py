"""The recorder captures exactly what each family routes, predicts as documented, and changes nothing.

For every supported family (tiny random-weight presets) the test records two prompts with the
recorder attached, then recomputes everything independently: it runs the whole sequence (prompt +
generated tokens) through the model once without a KV cache, captures each router's *input*,
computes the logits itself and routes them with its own implementation of the family's rule.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moesim.recorder import PRESETS, ByteTokenizer, adapter_for, build_preset, record
from moesim.traces.format import DECODE, PREFILL, read_trace

PROMPTS = ["def add(a, b):", "Hello there"]
NEW_TOKENS = 5
DISTANCE = 2


# -- independent routing rules, written from the papers / model cards, not from moesim ----------
def softmax_topk(logits, k, renorm):
    p = torch.softmax(logits.double(), -1)
    w, i = p.topk(k, -1)
    return (w / w.sum(-1, keepdim=True) if renorm else w), i


@torch.no_grad()
def route_reference(family: str, config, logits: torch.Tensor, gate) -> tuple[torch.Tensor, torch.Tensor]:
    k = config.num_experts_per_tok
    if family == "mixtral":
        return softmax_topk(logits, k, True)
    if family in ("qwen2_moe", "qwen3_moe", "olmoe"):
        return softmax_topk(logits, k, bool(config.norm_topk_prob))
    if family == "gpt_oss":
        top, i = logits.double().topk(k, -1)
        return torch.softmax(top, -1), i
    if family == "deepseek_v3":
        s = torch.sigmoid(logits.double())
        biased = s + gate.e_score_correction_bias.double()
        n_group, per = config.n_group, s.shape[-1] // config.n_group
        out_w, out_i = [], []
        for row_s, row_b in zip(s, biased, strict=True):
            group_score = [sorted(row_b[g * per:(g + 1) * per].tolist())[-2:] for g in range(n_group)]
            keep = sorted(range(n_group), key=lambda g: -sum(group_score[g]))[:config.topk_group]
            cand = [e for g in keep for e in range(g * per, (g + 1) * per)]
            chosen = sorted(cand, key=lambda e: -row_b[e].item())[:k]
            w = row_s[chosen]
            w = w / w.sum() if config.norm_topk_prob else w
            out_w.append(w * config.routed_scaling_factor)
            out_i.append(torch.tensor(chosen))
        return torch.stack(out_w), torch.stack(out_i)
    if family == "phimoe":  # sparsemixer, eval mode: two rounds of argmax within a jitter window
        eps, x = config.router_jitter_noise, logits.double()
        ws, ids, remaining = [], [], x.clone()
        for _ in range(2):
            top, idx = remaining.max(-1, keepdim=True)
            window = (top - x) / x.abs().clamp(min=top) > 2 * eps
            ws.append(torch.softmax(remaining.masked_fill(window, float("-inf")), -1).gather(-1, idx))
            ids.append(idx)
            remaining = remaining.scatter(-1, idx, float("-inf"))
        return torch.cat(ws, -1), torch.cat(ids, -1)
    raise AssertionError(family)


@torch.no_grad()
def gate_logits(gate, x: torch.Tensor) -> torch.Tensor:
    w = gate.weight.double()
    b = getattr(gate, "bias", None)
    return x.double() @ w.T + (0 if b is None else b.double())


def by_weight(ids, weights):
    order = np.argsort(-np.asarray(weights), axis=-1, kind="stable")
    return np.take_along_axis(np.asarray(ids), order, -1), np.take_along_axis(np.asarray(weights), order, -1)


@pytest.fixture(scope="module", params=sorted(PRESETS))
def recording(request, tmp_path_factory):
    name = request.param
    model = build_preset(name, seed=3)
    tok = ByteTokenizer()
    baseline = []
    for p in PROMPTS:
        ids = torch.tensor([tok.encode(p)])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
        baseline.append(out[0, ids.shape[1]:].tolist())
    path = tmp_path_factory.mktemp(name) / "rec.parquet"
    result = record(model, PROMPTS, path, tokenizer=tok, max_new_tokens=NEW_TOKENS, predict_distance=DISTANCE,
                    logits=True, pred_logits=True, flush_tokens=3)
    return name, model, tok, baseline, result, read_trace(path)


def reference(model, tok, prompt: str, generated: list[int]):
    """Per MoE layer: (logits, weights, ids) for every position, and the decoder outputs."""
    adapter = adapter_for(model)
    full = torch.tensor([tok.encode(prompt) + generated[:-1]])  # the last token never enters the model
    captured: dict[int, torch.Tensor] = {}
    hooks = [m.gate.register_forward_pre_hook(lambda mod, args, i=m.index: captured.__setitem__(i, args[0]))
             for m in adapter.layers]
    try:
        with torch.no_grad():
            out = model(full, use_cache=False, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return adapter, captured, out.hidden_states


def test_generation_unchanged_by_recorder(recording):
    name, _, _, baseline, result, _ = recording
    assert result.generated == baseline, name


def test_rows_cover_every_token_and_layer_in_order(recording):
    name, model, tok, _, result, trace = recording
    L = trace.meta.num_layers
    for seq, prompt in enumerate(PROMPTS):
        n_prompt = len(tok.encode(prompt))
        n_total = n_prompt + len(result.generated[seq]) - 1
        mask = trace.seq == seq
        assert mask.sum() == n_total * L
        assert np.array_equal(trace.token[mask], np.repeat(np.arange(n_total), L))
        assert np.array_equal(trace.layer[mask], np.tile(np.arange(L), n_total))
        expected_phase = np.where(np.repeat(np.arange(n_total), L) < n_prompt, PREFILL, DECODE)
        assert np.array_equal(trace.phase[mask], expected_phase)
    assert trace.is_execution_ordered()
    assert trace.meta.provenance["kind"] == "recorded"


def test_routed_experts_and_weights_match_independent_recomputation(recording):
    name, model, tok, _, result, trace = recording
    family = trace.meta.family
    ids_all, w_all, logits_all = trace.experts, trace.weights, trace.logits_matrix()
    checked = 0
    for seq, prompt in enumerate(PROMPTS):
        adapter, inputs, _ = reference(model, tok, prompt, result.generated[seq])
        for m in adapter.layers:
            logits = gate_logits(m.gate, inputs[m.index].reshape(-1, adapter.hidden_size))
            w_ref, i_ref = route_reference(family, model.config, logits, m.gate)
            i_ref, w_ref = by_weight(i_ref.numpy(), w_ref.numpy())
            rows = np.flatnonzero((trace.seq == seq) & (trace.layer == m.index))
            assert np.array_equal(ids_all[rows], i_ref), f"{name} layer {m.index}"
            np.testing.assert_allclose(w_all[rows], w_ref, rtol=2e-3, atol=2e-3)
            np.testing.assert_allclose(logits_all[rows], logits.numpy(), rtol=2e-3, atol=2e-3)
            checked += len(rows)
    assert checked == len(trace)
    # both phases took part in the check
    assert (trace.phase == PREFILL).any() and (trace.phase == DECODE).any()


def test_speculative_predictions_match_gate_of_later_layer_on_earlier_hidden_state(recording):
    name, model, tok, _, result, trace = recording
    family = trace.meta.family
    assert trace.pred_distances == (1, 2)
    compared = 0
    for d in (1, 2):
        pred = trace.pred_experts(d)
        pred_logits = trace.logits_matrix(f"pred{d}_logits")
        for seq, prompt in enumerate(PROMPTS):
            adapter, _, hidden = reference(model, tok, prompt, result.generated[seq])
            for m in adapter.layers:
                rows = np.flatnonzero((trace.seq == seq) & (trace.layer == m.index))
                if m.index < d:
                    assert (pred[rows] == -1).all() and np.isnan(pred_logits[rows]).all()
                    continue
                source = adapter.layers[m.index - d]
                h = hidden[source.decoder_index + 1][0]  # output of the source layer's decoder block
                with torch.no_grad():
                    logits = gate_logits(m.gate, m.norm(h))
                _, i_ref = route_reference(family, model.config, logits, m.gate)
                assert np.array_equal(np.sort(pred[rows], 1), np.sort(i_ref.numpy(), 1)), f"{name} d={d} {m.index}"
                np.testing.assert_allclose(pred_logits[rows], logits.numpy(), rtol=2e-3, atol=2e-3)
                compared += len(rows)
    assert compared > 0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_adapter_fallback_routing_equals_model_router(name):
    """Adapter.route (used when a router returns bare logits) reproduces the model's router."""
    model = build_preset(name, seed=5)
    adapter = adapter_for(model)
    x = torch.randn(64, adapter.hidden_size, generator=torch.Generator().manual_seed(0))
    for m in adapter.layers:
        with torch.no_grad():
            logits, w_model, i_model = m.gate.forward(x)
            w_ad, i_ad = adapter.route(logits, m.gate)
        i1, w1 = by_weight(i_model.numpy(), w_model.float().numpy())
        i2, w2 = by_weight(i_ad.numpy(), w_ad.float().numpy())
        assert np.array_equal(i1, i2)
        np.testing.assert_allclose(w1, w2, rtol=1e-5, atol=1e-6)


def test_every_family_is_covered_by_a_preset():
    families = {adapter_for(build_preset(n)).family for n in PRESETS}
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "phimoe"} <= families
