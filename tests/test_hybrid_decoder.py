"""``moesim generate --execution``: the checkpoint decoder under a static execution policy. Logits against
transformers' own forward pass (an oracle independent of the engine): exact for a pinned set (same format,
other slots), within int8 weight-only tolerance with the first layer's experts on the CPU worker; the
executor counts add up; unsupported specs are one-line usage errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moesim.cli import main  # noqa: E402
from moesim.commands._common import error_line  # noqa: E402
from moesim.engine.checkpoint import load_checkpoint  # noqa: E402
from moesim.engine.decode import Decoder  # noqa: E402
from moesim.engine.decoder_program import DecoderProgram  # noqa: E402
from moesim.engine.expert_store import ExpertStore  # noqa: E402
from moesim.engine.pack import pack_checkpoint  # noqa: E402
from moesim.errors import SettingError  # noqa: E402
from moesim.policies.execution import Pinned  # noqa: E402
from tests.test_generate_cli import ckpt  # noqa: E402, F401 - the tiny Mixtral checkpoint fixture

PROMPT, NEW, K = [3, 17, 42, 9, 28], 5, 3


@pytest.fixture(scope="module")
def tiny(ckpt):  # noqa: F811 - the imported fixture
    path, model = ckpt
    ids = torch.tensor([PROMPT])
    greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                            pad_token_id=0)[0, len(PROMPT):].tolist()
    with torch.no_grad():
        want = model(torch.tensor([PROMPT + greedy[:-1]])).logits[0].float().numpy()
    packed = pack_checkpoint(load_checkpoint(path), "none")
    program = DecoderProgram(packed, "cpu", K, predict_distance=0)
    return path, greedy, want, program, ExpertStore.from_packed(packed, pin=False)


def run(tiny, execution):
    _, greedy, _, program, store = tiny
    dec = Decoder(program, store, K, "lru", "none", execution=execution, cpu_threads=1)
    return dec.generate([PROMPT], NEW, keep_logits=True, forced_tokens=[greedy])


def test_pinned_set_is_exact_and_counted(tiny):
    _, _, want, *_ = tiny
    base = run(tiny, None)
    # pin each layer's most requested expert of the copy run
    pins = []
    for layer in range(2):
        ids, counts = np.unique(np.stack([s.experts[layer] for s in base.steps]), return_counts=True)
        pins.append((layer, int(ids[np.argmax(counts)])))
    res = run(tiny, Pinned(pins))
    np.testing.assert_allclose(np.stack(res.logits), want, atol=2e-4, rtol=0)
    ex = res.executed
    assert ex["pinned"] > 0 and ex["cpu"] == 0 and sum(ex.values()) == res.requests == len(res.steps) * 2 * 2
    assert res.hits == ex["gpu_hit"] + ex["pinned"] and res.violations == 0 and res.device_copies == ex["copy"]
    assert res.bytes_h2d == ex["copy"] * res.expert_bytes


def test_first_layer_on_the_cpu_worker(tiny):
    _, _, want, *_ = tiny
    res = run(tiny, "n-cpu-moe=1")
    got = np.stack(res.logits)
    assert res.executed["cpu"] == len(res.steps) * 2 and res.violations == 0
    assert sum(res.executed.values()) == res.requests
    # int8 per-row weights on the CPU against the fp32 reference: a small fraction of the logits' range
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


def test_static_specs_only(tiny, tmp_path, capsys):
    path, *_ = tiny
    _, _, _, program, store = tiny
    for bad in ("fiddler", "hybrid", "hobbit"):
        with pytest.raises(SettingError, match="the engine runs copy, n-cpu-moe=N and pinned=FILE"):
            Decoder(program, store, K, "lru", "none", execution=bad)
    with pytest.raises(SettingError, match="without a prefetcher") as caught:
        Decoder(program, store, K, "lru", "transition", execution="n-cpu-moe=1")
    assert error_line(caught.value).endswith("runs without a prefetcher (--prefetch none)")
    base = ["generate", "--model", str(path), "--prompt-ids", "3,17", "--max-new-tokens", "2", "--cache-size", "3",
            "--policy", "lru", "--no-quant-cache", "--json"]
    for spec, code in (("nope", 2), ("fiddler", 2), (f"pinned={tmp_path / 'none.json'}", 1)):
        assert main([*base, "--execution", spec]) == code
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
    assert main([*base, "--execution", "n-cpu-moe=2", "--cpu-threads", "1"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["executed"]["cpu"] == 3 * 2 * 2 and got["prefill_chunk"] == 1 and got["execution"] == "n-cpu-moe=2"
