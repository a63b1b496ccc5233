"""``studies/checkpoint_load/measure.py``'s checkpoints: one written, smaller layer counts derived by links
(the full-width device run writes 47 GB once), loaded by the engine's own loader as checkpoints of their own."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from moesim.engine.checkpoint import load_checkpoint  # noqa: E402
from studies.checkpoint_load.measure import first_layers, sizes_of, write_checkpoint  # noqa: E402

HIDDEN, FFN, LAYERS, EXPERTS, VOCAB = 128, 64, 3, 4, 50


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "full"
    return path, write_checkpoint(path, HIDDEN, FFN, LAYERS, EXPERTS, VOCAB)


def test_fewer_layers_are_the_first_shards_and_write_no_weights(full, tmp_path):
    path, sizes = full
    view = first_layers(path, tmp_path / "L2", 2)
    assert first_layers(path, tmp_path / "L2", 2) == view            # a second quant reuses it
    assert first_layers(path, tmp_path / "L3", LAYERS) == path       # all layers: the checkpoint itself
    written = [f for f in view.iterdir() if not f.is_symlink()]
    assert [f.name for f in written] == ["config.json"]
    small, big = load_checkpoint(view), load_checkpoint(path)
    assert small.spec.num_layers == 2 and big.spec.num_layers == LAYERS
    assert {n for n in small.source.names() if n.startswith("model.layers.2.")} == set()
    for layer in range(2):
        for e in range(EXPERTS):
            assert all(torch.equal(a, b) for a, b in zip(small.expert(layer, e), big.expert(layer, e), strict=True))
    assert torch.equal(small.globals()["embed"], big.globals()["embed"])


def test_byte_counts_are_the_loaded_tensors(full, tmp_path):
    path, sizes = full
    view = first_layers(path, tmp_path / "L2", 2)
    ckpt = load_checkpoint(view)
    experts = sum(w.numel() * w.element_size() for layer in range(2) for e in range(EXPERTS)
                  for w in ckpt.expert(layer, e))
    other = sum(f.stat().st_size for f in view.glob("*.safetensors"))   # shard sizes, headers included
    got = sizes_of(sizes, 2)
    assert got["expert_bytes"] == experts
    assert 0 < other - got["expert_bytes"] - got["other_bytes"] < 3 * 4096   # three safetensors headers
