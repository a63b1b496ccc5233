"""The gate-driven offloaded decoder against transformers itself, on tiny checkpoints the tests write with
``save_pretrained`` (mixtral, qwen3_moe, qwen2_moe: different expert counts, top-k, shared expert,
routing-weight normalisation, q/k norms, q/k/v bias).

Oracles: transformers' forward pass (logits) and greedy ``generate`` (ids); the moesim Recorder's hooks
on the transformers model (the router's own top-k, and the speculative predictions); hqq's own
dequantisation swapped into the transformers model; the simulator's reference replay (hit counts).
A swapped pair of expert slots (a mutation) makes the logits comparison fail.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moesim.engine.checkpoint import load_checkpoint  # noqa: E402
from moesim.engine.decode import Decoder  # noqa: E402
from moesim.engine.decoder_program import DecoderProgram  # noqa: E402
from moesim.engine.expert_store import ExpertStore  # noqa: E402
from moesim.engine.pack import pack_checkpoint  # noqa: E402
from moesim.engine.plan import Routing  # noqa: E402

PROMPT = [3, 17, 42, 9, 28]
NEW = 5
ATOL = 2e-4


def _configs():
    c = transformers
    common = dict(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, eos_token_id=None)
    return {
        "mixtral": (c.MixtralForCausalLM, c.MixtralConfig(intermediate_size=128, num_local_experts=6,
                                                          num_experts_per_tok=2, **common)),
        "qwen3_moe": (c.Qwen3MoeForCausalLM, c.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=64,
                                                              num_experts=8, num_experts_per_tok=3, head_dim=16,
                                                              norm_topk_prob=True, **common)),
        "qwen2_moe": (c.Qwen2MoeForCausalLM, c.Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=64,
                                                              shared_expert_intermediate_size=96, num_experts=8,
                                                              num_experts_per_tok=3, norm_topk_prob=False, **common)),
    }


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe", "qwen2_moe"])
def tiny(request, tmp_path_factory):
    """(family, checkpoint dir, transformers model) with weights large enough for varied routing."""
    cls, cfg = _configs()[request.param]
    torch.manual_seed(1)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, path, model


def _engine(path, quant="none", max_slots=None, distance=2, device="cpu"):
    ckpt = load_checkpoint(path)
    packed = pack_checkpoint(ckpt, quant)
    program = DecoderProgram(packed, device, max_slots or ckpt.spec.num_experts, predict_distance=distance)
    return ckpt, packed, program, ExpertStore.from_packed(packed, pin=device != "cpu")


def _reference_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _greedy(model, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _cells(k: int, experts: int):
    """Every live policy family member we ship the engine with x several K x every live prefetcher."""
    return [("lru", k, "none"), ("lfu", k + 1, "transition"), ("fifo", k + 1, "previous-token"),
            ("lru", k + 1, "speculative"), ("s3fifo", experts - 1, "none"), ("lfu", experts, "speculative"),
            ("sieve", k, "transition")]


def test_logits_and_greedy_ids_equal_transformers(tiny):
    family, path, model = tiny
    ckpt, _, program, store = _engine(path)
    s = ckpt.spec
    want_ids = _greedy(model, PROMPT, NEW)
    want = _reference_logits(model, PROMPT + want_ids[:-1])
    for policy, k, prefetch in _cells(s.top_k, s.num_experts):
        res = Decoder(program, store, k, policy, prefetch).generate([PROMPT], NEW, keep_logits=True)
        assert res.token_ids == [want_ids], (family, policy, k, prefetch)
        np.testing.assert_allclose(np.stack(res.logits), want, atol=ATOL, rtol=0,
                                   err_msg=f"{family} {policy} K={k} {prefetch}")
        assert res.requests == len(res.steps) * s.num_layers * s.top_k
        # the residency proof counted by the program: every expert piece's slot held the gate's expert
        assert res.violations == 0 and res.device_copies == res.misses + res.prefetches
        if k < s.num_experts:
            assert res.misses > s.num_experts  # evictions happened: slots were reused


def test_prefill_chunks_equal_transformers_and_replay(tiny, tmp_path):
    """Prompts run as prefill chunks (the whole prompt, or chunks of 2): every prompt token's logits and
    the greedy ids equal transformers'; each chunk's request per layer is the union of its tokens'
    routing (which equals the token-by-token run's, itself checked against transformers' router); the
    device counted no residency violation; replaying the recorded run with routing forced gives the same
    hits, prefetches and logits."""
    from moesim.engine.recording import DecodeRecorder
    from moesim.traces.format import PREFILL, read_trace

    family, path, model = tiny
    ckpt, packed, program, store = _engine(path, distance=1)
    s = ckpt.spec
    want_ids = _greedy(model, PROMPT, NEW)
    want = _reference_logits(model, PROMPT + want_ids[:-1])
    by_token: list = []
    Decoder(program, store, s.top_k + 1, "lru").generate([PROMPT], NEW, prefill_chunk=1, on_step=by_token.append)
    for chunk in (None, 2):
        rows: list = []
        out = tmp_path / f"chunk{chunk}.parquet"
        rec = DecodeRecorder(out, s, model_name=family, expert_format=packed.expert_format.name,
                             expert_bytes=packed.expert_bytes, prefill_chunk=chunk or len(PROMPT), pred_distances=(1,))

        def on_step(r, rows=rows, rec=rec):
            rows.append(r)
            rec.on_step(r)
        live = Decoder(program, store, s.top_k + 1, "lru", "speculative").generate(
            [PROMPT], NEW, keep_logits=True, prefill_chunk=chunk, on_step=on_step)
        rec.close()
        assert live.token_ids == [want_ids], (family, chunk)
        np.testing.assert_allclose(np.stack(live.logits), want, atol=ATOL, rtol=0, err_msg=f"{family} chunk {chunk}")
        assert live.violations == 0 and live.device_copies == live.misses + live.prefetches > 0
        for a, b in zip(rows, by_token, strict=True):
            np.testing.assert_array_equal(a.experts, b.experts)
        size = chunk or len(PROMPT)
        trace = read_trace(out)
        unions = 0
        for c in range(0, len(PROMPT), size):
            for layer in range(s.num_layers):
                sel = (trace.phase == PREFILL) & (trace.layer == layer) & (trace.token >= c) & (trace.token < c + size)
                unions += len(set(trace.experts[sel].ravel().tolist()))
        assert live.requests == unions + (NEW - 1) * s.num_layers * s.top_k
        assert int((trace.phase == PREFILL).sum()) == len(PROMPT) * s.num_layers
        replay = Decoder(program, store, s.top_k + 1, "lru", "speculative").generate(
            [PROMPT], NEW, keep_logits=True, prefill_chunk=chunk, forced=Routing.from_trace(trace),
            forced_tokens=live.token_ids)
        assert (replay.hits, replay.requests, replay.prefetches) == (live.hits, live.requests, live.prefetches)
        np.testing.assert_allclose(np.stack(replay.logits), np.stack(live.logits), atol=1e-5, rtol=0)


def test_swapped_expert_slots_fail_the_comparison(tiny, monkeypatch):
    """Mutation: the copy for expert e lands the blob of expert e ^ 1 -> logits diverge from transformers."""
    _, path, model = tiny
    ckpt, _, program, store = _engine(path)
    want_ids = _greedy(model, PROMPT, NEW)
    want = _reference_logits(model, PROMPT + want_ids[:-1])

    def swapped(dst, layer, expert):
        dst.copy_(store.blobs[layer][expert ^ 1])
    monkeypatch.setattr(store, "copy_to", swapped)
    res = Decoder(program, store, ckpt.spec.top_k + 1, "lru").generate([PROMPT], NEW, keep_logits=True,
                                                                       forced_tokens=[want_ids])
    assert np.abs(np.stack(res.logits) - want).max() > 100 * ATOL
    # and the device-side proof sees it: no copy landed the identity it was issued for, pieces mismatched
    assert res.device_copies == 0 and res.violations > 0


def test_slot_map_mutation_is_caught_by_the_device_check(tiny, monkeypatch):
    """Mutation of the plan's slot map (ranks 0 and 1 read each other's slots): the logits need not
    move much on a tiny model, but every swapped expert piece is counted by the program."""
    from moesim.engine.plan import CachePlan

    _, path, _ = tiny
    ckpt, _, program, store = _engine(path)
    orig = CachePlan.slots
    swaps = []

    def slots(self, layer, keys):
        out = list(orig(self, layer, keys))
        if len(swaps) < 3 and out[0] != out[1]:
            swaps.append(layer)
            out[0], out[1] = out[1], out[0]
        return out
    monkeypatch.setattr(CachePlan, "slots", slots)
    res = Decoder(program, store, ckpt.spec.top_k + 1, "lru").generate([PROMPT], NEW)
    assert len(swaps) == 3 and res.violations == 2 * len(swaps)
    assert res.device_copies == res.misses + res.prefetches


def test_recorded_routing_equals_transformers_router(tiny, tmp_path):
    """The engine's trace (prefill + decode rows, predictions d = 1, 2) equals what the moesim Recorder's
    hooks see on transformers' own run -- the router's top-k -- token by token; its hits equal the
    simulator's replay of that trace."""
    from moesim.engine.recording import DecodeRecorder, times_path
    from moesim.policies.base import make_policy
    from moesim.recorder.record import Recorder
    from moesim.simulator.replay import replay_reference
    from moesim.traces.format import read_trace

    family, path, model = tiny
    ckpt, packed, program, store = _engine(path)
    s = ckpt.spec
    out = tmp_path / "engine.parquet"
    rec = DecodeRecorder(out, s, model_name=family, expert_format=packed.expert_format.name, expert_bytes=packed.expert_bytes,
                         pred_distances=program.distances, logits=True)
    res = Decoder(program, store, s.top_k + 1, "lru").generate([PROMPT], NEW, on_step=rec.on_step)
    rec.close(res.summary())
    ours = read_trace(out)
    theirs_path = tmp_path / "hf.parquet"
    with Recorder(model, writer_or_path=theirs_path, predict_distance=2, logits=True) as hooks:
        hooks.begin_sequence(0)
        ids = torch.tensor([PROMPT])
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    theirs = read_trace(theirs_path)
    assert len(ours) == len(theirs) == (len(PROMPT) + NEW - 1) * s.num_layers
    for col in ("seq", "token", "phase", "layer"):
        np.testing.assert_array_equal(getattr(ours, col), getattr(theirs, col))
    np.testing.assert_array_equal(ours.experts, theirs.experts)
    np.testing.assert_allclose(ours.weights, theirs.weights, atol=2e-3)
    np.testing.assert_allclose(ours.logits_matrix(), theirs.logits_matrix(), atol=2e-2)
    for d in (1, 2):
        np.testing.assert_array_equal(ours.pred_experts(d), theirs.pred_experts(d))
    ref = replay_reference(ours, lambda: make_policy("lru"), s.top_k + 1)
    assert (ref.hits, ref.requests) == (res.hits, res.requests)
    import json
    times = json.loads(times_path(out).read_text())
    assert len(times["steps"]) == len(res.steps) and all(t["wall_ms"] > 0 for t in times["steps"])


def test_replay_mode_reproduces_the_gate_driven_run(tiny, tmp_path):
    """Record a gate-driven run, replay its trace with routing forced (the validation mode): same logits,
    same hits and prefetches -- demand only, the transition prefetcher, and the live speculative one
    replayed from the recorded pred1 column (the plan sees the same call sequence in both modes)."""
    from moesim.engine.recording import DecodeRecorder
    from moesim.traces.format import read_trace

    family, path, _ = tiny
    ckpt, packed, program, store = _engine(path, distance=1)
    s = ckpt.spec
    for policy, prefetch in (("lru", "none"), ("lfu", "transition"), ("lru", "speculative")):
        out = tmp_path / f"{policy}-{prefetch}.parquet"
        rec = DecodeRecorder(out, s, model_name=family, expert_format=packed.expert_format.name, expert_bytes=packed.expert_bytes,
                             pred_distances=(1,) if prefetch == "speculative" else ())
        live = Decoder(program, store, s.top_k + 1, policy, prefetch).generate(
            [PROMPT, PROMPT[::-1]], NEW, keep_logits=True, on_step=rec.on_step)
        rec.close()
        routing = Routing.from_trace(read_trace(out))
        replay = Decoder(program, store, s.top_k + 1, policy, prefetch).generate(
            [PROMPT, PROMPT[::-1]], NEW, keep_logits=True, forced=routing, forced_tokens=live.token_ids)
        assert replay.token_ids == live.token_ids
        assert (replay.hits, replay.requests, replay.prefetches) == (live.hits, live.requests, live.prefetches)
        for r in (live, replay):
            assert r.violations == 0 and r.device_copies == r.misses + r.prefetches
        assert prefetch == "none" or live.prefetches > 0
        np.testing.assert_allclose(np.stack(replay.logits), np.stack(live.logits), atol=1e-5, rtol=0)


@pytest.mark.parametrize("quant", ["hqq2-v02", "hqq2"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_hqq_logits_equal_transformers_with_hqq_weights(tiny, quant, device):
    """--quant hqq2-v02: experts 2-bit g16 and attention 4-bit g64 from hqq's quantizer; transformers with
    hqq's own dequantized weights swapped in gives the same logits. --quant hqq2 (mixtral-offloading's
    layout, whose dequantisation tests/test_engine_hqq.py checks against a numpy oracle): transformers with
    the packed experts' dequantised weights swapped in gives the decoder's logits. On CUDA the packed
    matrices go through the fused kernels (moesim.engine.kernels), on CPU through dequantise-then-matmul."""
    pytest.importorskip("hqq")
    from moesim.engine import kernels
    from moesim.engine.pack import hqq_reference
    from moesim.engine.quant import matrix

    family, path, model = tiny
    ckpt, packed, program, store = _engine(path, quant=quant, max_slots=4, device=device)
    assert kernels.active(device) == (device == "cuda" and kernels.triton_available())
    s = ckpt.spec
    assert packed.expert_format.name == quant
    n = s.hidden * s.ffn
    size = packed.expert_format.matrix_bytes(n)

    def expert_weights(layer: int, e: int) -> list:
        if quant.endswith("-v02"):
            return [hqq_reference(w, packed.expert_format).float() for w in ckpt.expert(layer, e)]
        blob = packed.experts[layer][e]
        shapes = [(s.ffn, s.hidden), (s.ffn, s.hidden), (s.hidden, s.ffn)]
        return [matrix(blob[i * size:(i + 1) * size], packed.expert_format, *shapes[i]).float() for i in range(3)]

    ref = type(model)(model.config).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer, dec in enumerate(ref.model.layers):
            for name in ("q", "k", "v", "o"):
                lin = getattr(dec.self_attn, f"{name}_proj")
                lin.weight.copy_(hqq_reference(lin.weight, packed.attn_format).float())
            experts = dec.mlp.experts
            for e in range(s.num_experts):
                w1, w3, w2 = expert_weights(layer, e)
                experts.gate_up_proj[e, : s.ffn].copy_(w1)
                experts.gate_up_proj[e, s.ffn:].copy_(w3)
                experts.down_proj[e].copy_(w2)
    res = Decoder(program, store, 4, "lru", "transition").generate([PROMPT], NEW, keep_logits=True)
    want = _reference_logits(ref, PROMPT + res.token_ids[0][:-1])
    np.testing.assert_allclose(np.stack(res.logits), want, atol=ATOL, rtol=0, err_msg=family)
    assert res.token_ids[0] == _greedy(ref, PROMPT, NEW)
    plain = _reference_logits(model, PROMPT + res.token_ids[0][:-1])
    assert np.abs(plain - want).max() > 10 * ATOL   # quantisation really changed the weights


def test_sampling_is_seeded_and_eos_stops(tiny):
    _, path, model = tiny
    ckpt, _, program, store = _engine(path, distance=0)
    dec = Decoder(program, store, ckpt.spec.top_k, "lru")
    a = dec.generate([PROMPT], NEW, temperature=1.0, seed=7).token_ids
    b = dec.generate([PROMPT], NEW, temperature=1.0, seed=7).token_ids
    assert a == b and len(a[0]) == NEW
    greedy = _greedy(model, PROMPT, NEW)
    object.__setattr__(ckpt.spec, "eos_token_ids", (greedy[1],))   # the second greedy token ends the text
    stopped = Decoder(program, store, ckpt.spec.top_k, "lru").generate([PROMPT], NEW).token_ids
    assert stopped == [greedy[:2]]


def test_timing_simulator_replays_the_live_speculative_run(tiny, tmp_path):
    """The live speculative prefetcher (layer l+1's gate on layer l's output, computed on the device) and
    the simulator's replay of the recorded pred1 column make the same residency decisions: equal hits
    and prefetches, with the prompt run as one prefill chunk (the union of its tokens' experts) and read
    back as one step from the trace's recorded chunk size."""
    from moesim.engine.recording import DecodeRecorder
    from moesim.simulator.cost_model import CostModel
    from moesim.simulator.timing import simulate_timing
    from moesim.traces.format import read_trace

    family, path, _ = tiny
    ckpt, packed, program, store = _engine(path, distance=1)
    s = ckpt.spec
    out = tmp_path / "spec.parquet"
    rec = DecodeRecorder(out, s, model_name=family, expert_format=packed.expert_format.name,
                         expert_bytes=packed.expert_bytes, prefill_chunk=len(PROMPT), pred_distances=(1,))
    live = Decoder(program, store, s.top_k + 1, "lru", "speculative").generate([PROMPT], NEW, on_step=rec.on_step,
                                                                              prefill_chunk=None)
    rec.close()
    assert live.prefetches > 0
    trace = read_trace(out)
    cost = CostModel.preset("h200").with_overrides(expert_ms=0.2)   # fp32 experts: no preset times them
    sim = simulate_timing(trace, "lru", s.top_k + 1, cost, prefetch="speculative",
                          prefill_chunk=trace.meta.extra["prefill_chunk"])
    assert (sim.requests, sim.hits, sim.prefetches) == (live.requests, live.hits, live.prefetches)
