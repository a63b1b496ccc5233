"""Record -> replay closure (issue 27 item 3): ``moesim simulate`` on a ``moesim generate --record`` trace,
with the same policy, cache size and prefetcher, reproduces the live run's hits, prefetches, copies and
bytes exactly -- for every live prefetcher, with a one-token prompt and with prompts run as prefill
chunks (the union of a chunk's experts per layer, streamed through the cache in chunks of K).

The live side's copies are counted twice: by the plan and on the device (each landed identity); the
replay side is the timing simulator reading nothing but the trace."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moesim.cli import main  # noqa: E402
from moesim.traces.format import PREFILL, read_trace  # noqa: E402
from tests.helpers import save_tiny_mixtral  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral8")
    return path, save_tiny_mixtral(path, 5, num_hidden_layers=3, num_local_experts=8, max_position_embeddings=64)


def _run(capsys, *argv) -> dict:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


PROMPTS = {"one-token": ([7], None), "prompt": ([3, 17, 42, 9, 28, 61, 5, 80, 33, 12], None),
           "chunked": ([3, 17, 42, 9, 28, 61, 5, 80, 33, 12], 4)}


@pytest.mark.parametrize("prefetch", ["none", "transition", "previous-token", "speculative"])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_simulate_reproduces_the_recorded_run(ckpt, tmp_path, capsys, prefetch, prompt):
    path, model = ckpt
    ids, chunk = PROMPTS[prompt]
    rec = tmp_path / "run.parquet"
    extra = ["--prefill-chunk", str(chunk)] if chunk else []
    live = _run(capsys, "generate", "--model", str(path), "--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens",
                "12", "--cache-size", "3", "--policy", "lru", "--prefetch", prefetch, "--record", str(rec), "--json",
                "--no-quant-cache", *extra)
    assert live["violations"] == 0 and live["device_copies"] == live["copies"] == live["misses"] + live["prefetches"]
    sim = _run(capsys, "simulate", str(rec), "--policy", "lru", "--cache-size", "3", "--prefetch", prefetch,
               "--hardware", "h200", "--expert-ms", "0.2", "--json")   # fp32 experts: no preset times them
    got = {k: sim[f"timing_{k}"] for k in ("requests", "hits", "misses")}
    got.update({k: sim[k] for k in ("prefetches", "copies", "bytes_h2d")})
    assert got == {k: live[k] for k in got}
    assert prefetch not in ("transition", "speculative") or live["prefetches"] > 0
    # prompts ran as prefill steps: a chunk requests the union of its tokens' experts (fewer requests
    # than the per-token demand replay), one row per prompt token in the trace
    trace = read_trace(rec)
    assert int((trace.phase == PREFILL).sum()) == len(ids) * 3
    assert trace.meta.extra["prefill_chunk"] == (chunk or len(ids))
    if len(ids) > 1:
        assert live["requests"] < sim["requests"]
    ref = torch.tensor([ids])
    want = model.generate(ref, attention_mask=torch.ones_like(ref), max_new_tokens=12, do_sample=False,
                          pad_token_id=0)[0, len(ids):].tolist()
    assert live["token_ids"] == want


def test_token_by_token_prefill_equals_the_per_token_replay(ckpt, tmp_path, capsys):
    """--prefill-chunk 1: every prompt token is its own step, so the exact per-(token, layer) replay and
    the live run agree, hits included."""
    path, _ = ckpt
    rec = tmp_path / "run.parquet"
    live = _run(capsys, "generate", "--model", str(path), "--prompt-ids", "3,17,42,9,28,61", "--max-new-tokens", "6",
                "--cache-size", "3", "--policy", "lfu", "--record", str(rec), "--json", "--no-quant-cache",
                "--prefill-chunk", "1")
    sim = _run(capsys, "simulate", str(rec), "--policy", "lfu", "--cache-size", "3", "--json")
    assert (sim["requests"], sim["hits"]) == (live["requests"], live["hits"])
