"""``moesim generate``: the CONTRACTS.md spelling and JSON keys, greedy ids equal to transformers' own
``generate``, ``--record`` (a trace ``simulate`` reads, with times side file), the quantization cache, and
bad input -- one line each, the right exit status, nothing half-written."""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moesim.cli import main  # noqa: E402

PROMPT = [3, 17, 42, 9]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = transformers.MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=32, eos_token_id=None)
    torch.manual_seed(2)
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    path = tmp_path_factory.mktemp("mixtral")
    model.save_pretrained(path)
    return path, model


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_record_and_simulate(ckpt, tmp_path, capsys):
    path, model = ckpt
    rec = tmp_path / "run.parquet"
    code, out, err = _run(capsys, "generate", "--model", str(path), "--prompt-ids", ",".join(map(str, PROMPT)),
                          "--max-new-tokens", "4", "--cache-size", "3", "--policy", "lru", "--prefetch", "transition",
                          "--record", str(rec), "--json", "--predict-distance", "2", "--no-quant-cache")
    assert code == 0, err
    got = json.loads(out)
    for key in ("token_ids", "text", "tokens_per_s", "ms_per_token", "hits", "requests", "hit_rate", "prefetches",
                "bytes_h2d"):
        assert key in got, key
    ids = torch.tensor([PROMPT])
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                          pad_token_id=0)[0, len(PROMPT):].tolist()
    assert got["token_ids"] == want
    # the prompt ran as one prefill step: per layer it requested the union of the prompt tokens' experts;
    # each of the 3 decode steps its top-2 per layer
    from moesim.traces.format import PREFILL, read_trace

    trace = read_trace(rec)
    prompt_rows = trace.phase == PREFILL
    union = sum(len(set(trace.experts[prompt_rows & (trace.layer == layer)].ravel())) for layer in range(2))
    assert got["requests"] == union + 3 * 2 * 2 < (len(PROMPT) + 3) * 2 * 2
    code, out, err = _run(capsys, "simulate", str(rec), "--policy", "lru", "--cache-size", "3", "--json")
    assert code == 0, err
    assert json.loads(out)["requests"] == (len(PROMPT) + 3) * 2 * 2   # the exact replay: every (token, layer)
    assert (tmp_path / "run.parquet.times.json").is_file()
    assert not (tmp_path / "run.parquet.parts").exists()


def test_quantization_cache_is_reused(ckpt, tmp_path, capsys):
    pytest.importorskip("hqq")
    from moesim.engine.checkpoint import load_checkpoint
    from moesim.engine.pack import pack_checkpoint

    path, _ = ckpt
    first = pack_checkpoint(load_checkpoint(path), "hqq2", cache_root=tmp_path)
    second = pack_checkpoint(load_checkpoint(path), "hqq2", cache_root=tmp_path)
    assert "quantize_s" in first.timings and "cache_load_s" in second.timings
    assert all(torch.equal(a, b) for ra, rb in zip(first.experts, second.experts, strict=True)
               for a, b in zip(ra, rb, strict=True))
    assert torch.equal(first.attn[1]["q"], second.attn[1]["q"])


def test_json_says_the_load_and_first_token_time_cold_and_from_the_cache(ckpt, tmp_path, capsys):
    """``load_s``, ``first_token_s``, ``quant_cache``: a cold hqq2 start quantizes and writes the cache, the
    next start reads it back (same tokens); the first token comes after the load and before the run ends."""
    pytest.importorskip("hqq")
    path, _ = ckpt
    argv = ["generate", "--model", str(path), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "4",
            "--cache-size", "3", "--policy", "lru", "--json"]
    runs = {}
    for name, extra in (("cold", ["--quant", "hqq2", "--quant-cache", str(tmp_path)]),
                        ("hit", ["--quant", "hqq2", "--quant-cache", str(tmp_path)]),
                        ("none", ["--quant", "hqq2", "--no-quant-cache"]), ("cast", ["--quant", "bf16"])):
        code, out, err = _run(capsys, *argv, *extra)
        assert code == 0, err
        runs[name] = json.loads(out)
    assert [r["quant_cache"] for r in runs.values()] == ["cold", "hit", "none", "none"]
    assert set(runs["cold"]["load_parts_s"]) == {"quantize_s", "cache_write_s"}
    assert set(runs["hit"]["load_parts_s"]) == {"cache_load_s"} and set(runs["none"]["load_parts_s"]) == {"quantize_s"}
    assert runs["hit"]["token_ids"] == runs["cold"]["token_ids"] == runs["none"]["token_ids"]
    for r in runs.values():
        decode_wall_s = len(r["token_ids"]) / r["tokens_per_s"]
        assert 0 < r["load_s"] < r["first_token_s"] < r["load_s"] + decode_wall_s


def test_trace_records_its_expert_format_and_the_timing_model_prices_it(ckpt, tmp_path, capsys):
    """One name per format: a recorded trace says which layout its experts were (and their bytes); a
    preset prices that format's compute, or refuses in one line when it has no table for it."""
    pytest.importorskip("hqq")
    from moesim.engine.quant import quant_spec
    from moesim.simulator.cost_model import CostModel
    from moesim.traces.format import read_trace

    path, _ = ckpt
    want = {"hqq2": quant_spec("hqq2").expert_bytes(64, 128), "hqq2-v02": quant_spec("hqq2-v02").expert_bytes(64, 128)}
    assert want["hqq2"] < want["hqq2-v02"]
    for quant, nbytes in want.items():
        rec = tmp_path / f"{quant}.parquet"
        code, out, err = _run(capsys, *_args(path, "--quant", quant, "--record", str(rec), "--json"))
        assert code == 0, err
        live = json.loads(out)
        meta = read_trace(rec).meta
        assert (meta.quantization, meta.extra["expert_format"], meta.expert_bytes) == (quant, quant, nbytes)
        assert live["bytes_h2d"] == live["misses"] * nbytes
        sim = ["simulate", str(rec), "--policy", "lru", "--cache-size", "2", "--hardware", "h200", "--json"]
        if quant == "hqq2":
            code, out, err = _run(capsys, *sim)
            assert code == 0, err
            got = json.loads(out)
            assert got["bytes_h2d"] == live["bytes_h2d"]
            h200 = CostModel.preset("h200")
            assert h200.quantization == "hqq2"
        else:
            # a usage error (exit 2) naming --expert-ms: the trace is sound, the preset lacks its format
            _bad(capsys, 2, "--expert-ms", *sim)
            code, out, err = _run(capsys, *sim, "--expert-ms", "0.3")   # a what-if compute time prices it
            assert code == 0, err
            assert json.loads(out)["bytes_h2d"] == live["bytes_h2d"]


def test_timing_prices_the_recorded_format_compute():
    """A trace whose experts were bf16 is priced with the preset's bf16 expert time, not its default hqq2."""
    from moesim.simulator.cost_model import CostModel

    h200 = CostModel.preset("h200")
    bf16 = h200.for_trace_format({"expert_format": "bf16"})
    assert bf16.quantization == "bf16" and h200.quantization == "hqq2"
    assert bf16.expert_seconds(1) == h200.expert_seconds(1, "bf16") != h200.expert_seconds(1)
    assert h200.for_trace_format({}) is h200   # synth / imported traces: the preset's own format


def _bad(capsys, code_want, needle, *argv):
    code, out, err = _run(capsys, *argv)
    assert code == code_want, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def _args(model, *extra):
    return ["generate", "--model", str(model), "--prompt-ids", "1,2,3", "--max-new-tokens", "2",
            "--cache-size", "2", "--policy", "lru", "--no-quant-cache", *extra]


def test_bad_input_one_line_each(ckpt, tmp_path, capsys):
    path, _ = ckpt
    empty = tmp_path / "empty"
    empty.mkdir()
    _bad(capsys, 1, "no config.json", *_args(empty))
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    shutil.copy(path / "config.json", noweights / "config.json")
    _bad(capsys, 1, "no *.safetensors", *_args(noweights))
    llama = tmp_path / "llama"
    llama.mkdir()
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (llama / "config.json").write_text(json.dumps(cfg))
    _bad(capsys, 1, "supported: mixtral, qwen2_moe, qwen3_moe", *_args(llama))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(path, corrupt)
    blob = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(blob[: len(blob) // 3])
    _bad(capsys, 1, "model.safetensors", *_args(corrupt))
    _bad(capsys, 2, "exceeds the model's context of 32", *_args(path)[:-1], "--no-quant-cache",
         "--max-new-tokens", "40")
    _bad(capsys, 2, "smaller than the model's top-k (2)", *_args(path), "--cache-size", "1")
    out = tmp_path / "missing" / "x.parquet"
    _bad(capsys, 1, "does not exist", *_args(path), "--record", str(out))
    assert not out.parent.exists()
    _bad(capsys, 2, "needs the future", *_args(path), "--policy", "opt")
    _bad(capsys, 2, "reads the true future", *_args(path), "--prefetch", "oracle")
    _bad(capsys, 2, "--quant must be one of", *_args(path), "--quant", "int3")
    _bad(capsys, 2, "has no tokenizer", "generate", "--model", str(path), "--prompt", "hi", "--max-new-tokens", "2",
         "--cache-size", "2", "--policy", "lru")
    _bad(capsys, 2, "outside the vocabulary", *_args(path), "--prompt-ids", "1,999")
