"""``moesim record`` end to end: the CLI, bad input, and recorded traces driving the simulators."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from moesim.policies.eviction import LRU
from moesim.recorder import load_prompts
from moesim.traces.format import read_trace


def moesim(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moesim", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    out = tmp_path_factory.mktemp("rec") / "tiny.parquet"
    prompts = tmp_path_factory.mktemp("p") / "prompts.txt"
    prompts.write_text("print('hi')\n\nWhat is 2+2?\nOnce upon a time\n")
    r = moesim("record", "--model", "tiny-qwen3-moe", "--prompts", str(prompts), "--max-new-tokens", "6",
               "--temperature", "0.8", "--seed", "7", "--predict-distance", "2", "--pred-logits", "-o", str(out))
    assert r.returncode == 0, r.stderr
    return out, r


def test_record_writes_the_trace_it_reports(recorded):
    out, r = recorded
    t = read_trace(out)
    assert f"{len(t)} rows, 3 sequences" in r.stdout
    assert t.meta.family == "qwen3_moe" and t.meta.num_layers == 4 and t.meta.top_k == 2
    assert t.meta.provenance["decoding"] == {"max_new_tokens": 6, "temperature": 0.8, "seed": 7,
                                             "strategy": "sampled"}
    assert t.pred_distances == (1, 2)
    assert not out.with_name(out.name + ".parts").exists()


def test_sampled_recording_is_reproducible(recorded, tmp_path):
    out, _ = recorded
    again = tmp_path / "again.parquet"
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["print('hi')", "What is 2+2?", "Once upon a time"]))
    r = moesim("record", "--model", "tiny-qwen3-moe", "--prompts", str(prompts), "--max-new-tokens", "6",
               "--temperature", "0.8", "--seed", "7", "--predict-distance", "2", "--pred-logits", "-o", str(again))
    assert r.returncode == 0, r.stderr
    a, b = read_trace(out), read_trace(again)
    assert np.array_equal(a.experts, b.experts) and np.array_equal(a.token, b.token)


def test_recorded_trace_replays_through_reference_and_cli(recorded):
    out, _ = recorded
    t = read_trace(out)
    from moesim.simulator.replay import replay_reference

    ref = replay_reference(t, LRU, 3)
    assert ref.requests == len(t) * t.meta.top_k
    r = moesim("simulate", str(out), "--policy", "lru", "--cache-size", "3", "--json")
    assert r.returncode == 0, r.stderr
    replay_result = json.loads(r.stdout)
    assert (replay_result["requests"], replay_result["hits"]) == (ref.requests, ref.hits)


def test_recorded_trace_drives_every_prefetcher(recorded):
    timing = pytest.importorskip("moesim.simulator.timing")
    from moesim.policies.prefetch import prefetcher_names
    from moesim.simulator.cost_model import CostModel

    t = read_trace(out_path := recorded[0])
    cost = CostModel.preset(CostModel.presets()[0])
    for name in prefetcher_names():
        for d in (1, 2):
            res = timing.simulate_timing(t, "lru", 3, cost, prefetch=name, prefetch_params={"distance": d},
                                         prefill_chunk=1)  # a prefill chunk needs its union resident
            out = res.to_dict()
            assert out["tokens_per_s"] > 0 and out["requests"] == len(t) * t.meta.top_k
            if name == "speculative":
                assert out["prefetches"] > 0, out
    r = moesim("simulate", str(out_path), "--policy", "lru", "--cache-size", "3", "--hardware", "h200",
               "--prefetch", "speculative", "--prefetch-distance", "2", "--prefill-chunk", "1", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["prefetch"] == "speculative" and 0 <= got["prefetch_precision"] <= 1 and got["tokens_per_s"] > 0


def test_builtin_prompt_set():
    prompts = load_prompts()
    assert 45 <= len(prompts) <= 60 and len(set(prompts)) == len(prompts)
    assert all(p.strip() for p in prompts)


@pytest.mark.parametrize("args, code, text", [
    (["--model", "no-such-model", "-o", "x.parquet"], 2, "neither a preset"),
    (["--model", "tiny-mixtral"], 2, "needs --model and -o"),
    (["--model", "tiny-mixtral", "--dtype", "int3", "-o", "x.parquet"], 2, "--dtype"),
    (["--model", "tiny-mixtral", "--predict-distance", "-1", "-o", "x.parquet"], 2, "must be >= 0"),
    (["--model", "tiny-mixtral", "--prompts", "missing.txt", "-o", "x.parquet"], 1, "missing.txt: no such file"),
    (["--model", "tiny-mixtral", "-o", "no/such/dir/x.parquet"], 1, "does not exist"),
    (["--recover", "nothing.parquet"], 1, "nothing to recover"),
])
def test_bad_input_gives_one_line_and_exit_code(tmp_path, args, code, text):
    r = subprocess.run([sys.executable, "-m", "moesim", "record", *args], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == code, r.stderr
    assert text in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.parquet*"))


def test_bad_prompt_files(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text('{"not": "a list"}')
    r = moesim("record", "--model", "tiny-mixtral", "--prompts", str(bad), "-o", str(tmp_path / "x.parquet"))
    assert r.returncode == 1 and "JSON list" in r.stderr
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    r = moesim("record", "--model", "tiny-mixtral", "--prompts", str(empty), "-o", str(tmp_path / "x.parquet"))
    assert r.returncode == 1 and "no prompts" in r.stderr


def test_checkpoint_directory_records_like_its_preset(tmp_path):
    """A local checkpoint directory (model + tokenizer, loaded with AutoTokenizer, no hub) gives the
    same trace as the preset it was saved from."""
    from moesim.recorder.presets import save_preset_checkpoint

    save_preset_checkpoint("tiny-olmoe", str(tmp_path / "ckpt"), seed=2)
    common = ["--num-prompts", "2", "--max-new-tokens", "3", "--seed", "2"]
    a = moesim("record", "--model", str(tmp_path / "ckpt"), *common, "-o", str(tmp_path / "a.parquet"))
    b = moesim("record", "--model", "tiny-olmoe", *common, "-o", str(tmp_path / "b.parquet"))
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ta, tb = read_trace(tmp_path / "a.parquet"), read_trace(tmp_path / "b.parquet")
    assert ta.meta.model == "ckpt" and ta.meta.family == tb.meta.family == "olmoe"
    assert np.array_equal(ta.experts, tb.experts) and np.array_equal(ta.token, tb.token)
    assert np.array_equal(ta.pred_experts(1), tb.pred_experts(1))


def test_checkpoint_directory_without_weights_is_a_data_error(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    r = moesim("record", "--model", str(tmp_path / "ckpt"), "-o", str(tmp_path / "x.parquet"))
    assert r.returncode == 1 and "ckpt" in r.stderr and "Traceback" not in r.stderr


def test_prompt_past_the_models_positions_is_one_moesim_note(tmp_path):
    """transformers' "friendly reminder" about exceeding the maximum length does not leak; moesim says it
    once, naming the prompt and the lengths (the tiny presets have 512 positions)."""
    prompts = tmp_path / "long.json"
    prompts.write_text(json.dumps(["short", "x" * 520, "y" * 530]))
    out = tmp_path / "t.parquet"
    r = moesim("record", "--model", "tiny-mixtral", "--prompts", str(prompts), "--max-new-tokens", "3",
               "--predict-distance", "0", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "friendly reminder" not in r.stderr and "maximum length" not in r.stderr
    notes = [line for line in r.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "prompt 1 (" in notes[0] and "512 positions" in notes[0], r.stderr
