"""Streaming checkpoint load (issue 27 item 1): experts packed one at a time straight into their blobs of
the host store, the quantization cache written layer by layer and read back tensor by tensor.

Oracles: the old path (each expert's matrices packed separately, concatenated, then copied into a tagged
blob) gives byte-identical blobs and identical logits; transformers' own forward pass gives the logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moesim.engine.checkpoint import load_checkpoint  # noqa: E402
from moesim.engine.decode import Decoder  # noqa: E402
from moesim.engine.decoder_program import DecoderProgram  # noqa: E402
from moesim.engine.expert_store import ExpertStore  # noqa: E402
from moesim.engine.identity import TAG_BYTES, expert_tag, tagged_blob  # noqa: E402
from moesim.engine.pack import pack_checkpoint, pack_matrix  # noqa: E402
from tests.helpers import save_tiny_mixtral  # noqa: E402

PROMPT = [5, 11, 2, 40]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral-stream")
    return path, save_tiny_mixtral(path, 7, vocab_size=64)


def _old_store(ckpt, packed) -> ExpertStore:
    """The pre-streaming path: matrices packed one by one, concatenated, copied into a new tagged blob."""
    s = ckpt.spec
    blobs = [[tagged_blob(torch.cat([pack_matrix(w, packed.expert_format) for w in ckpt.expert(layer, e)]),
                          layer, e, s.num_experts, False) for e in range(s.num_experts)] for layer in range(s.num_layers)]
    return ExpertStore(blobs, packed.expert_format, s.hidden, s.ffn)


def _logits(packed, store) -> np.ndarray:
    program = DecoderProgram(packed, "cpu", packed.spec.num_experts, predict_distance=0)
    res = Decoder(program, store, 2, "lru").generate([PROMPT], 3, keep_logits=True)
    return np.stack(res.logits)


@pytest.mark.parametrize("quant", ["none", "hqq2"])
def test_streamed_store_equals_the_old_path(ckpt, tmp_path, quant):
    if quant != "none":
        pytest.importorskip("hqq")
    path, model = ckpt
    ck = load_checkpoint(path)
    s = ck.spec
    packed = pack_checkpoint(ck, quant, cache_root=tmp_path)
    store = ExpertStore.from_packed(packed, pin=False)
    old = _old_store(ck, packed)
    for layer in range(s.num_layers):
        for e in range(s.num_experts):
            assert store.blobs[layer][e] is packed.tagged[layer][e]          # written in place, never copied
            assert torch.equal(store.blobs[layer][e], old.blobs[layer][e])
            assert int(store.blobs[layer][e][-TAG_BYTES:].view(torch.int64)) == expert_tag(layer, e, s.num_experts)
    streamed = _logits(packed, store)
    np.testing.assert_array_equal(streamed, _logits(packed, old))
    if quant == "none":
        with torch.no_grad():
            ids = PROMPT + [int(np.argmax(x)) for x in streamed[len(PROMPT) - 1:-1]]
            want = model(torch.tensor([ids])).logits[0].float().numpy()
        np.testing.assert_allclose(streamed, want, atol=2e-4, rtol=0)
    else:   # the cache was written layer by layer and reads back into identical blobs
        cache = next(p for p in tmp_path.iterdir() if p.is_dir())
        assert (cache / "meta.json").is_file() and not list(tmp_path.glob("*.tmp"))
        again = pack_checkpoint(ck, quant, cache_root=tmp_path)
        assert "cache_load_s" in again.timings
        maps = Path("/proc/self/maps")
        if maps.is_file():   # no layer file stays mapped: a kept view would hold its expert pages resident
            # (globals.safetensors may: its pages are the globals themselves)
            assert not [ln for ln in maps.read_text().splitlines() if str(cache / "layer-") in ln]
        for layer in range(s.num_layers):
            for e in range(s.num_experts):
                assert torch.equal(again.tagged[layer][e], store.blobs[layer][e])
        # same bytes everywhere; dense tensors read back from a file may differ in alignment, so the float
        # sums may round differently in the last place
        np.testing.assert_allclose(_logits(again, ExpertStore.from_packed(again, pin=False)), streamed, atol=1e-5, rtol=0)


def test_fused_expert_tensors_are_read_one_expert_at_a_time(ckpt):
    """A fused (transformers 5) expert tensor is sliced on disk: one expert's rows, not the whole tensor."""
    from moesim.engine.checkpoint import SafetensorsDir

    path, _ = ckpt
    src = SafetensorsDir(path)
    name = next(n for n in src.names() if "experts" in n)
    whole = src.get(name)
    assert torch.equal(src.get(name, 1), whole[1])
