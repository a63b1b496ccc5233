"""Routing returned by inference servers and Megatron-LM's router trace: ``import --from sglang``,
``--from vllm-routed``, ``--from megatron``. Fixtures are written here by hand in each format's shape
(docs/trace-format.md cites the upstream source of each layout) and the expected rows are spelled
out; every bad line is one error naming its line number, and nothing is written."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.traces.format import DECODE, PREFILL, read_trace
from tests.test_import_formats import _import

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"

# 3 routed tokens (2 prompt + 2 generated - 1) x 2 layers x top-2, router order kept
IDS = [[[1, 3], [0, 2]],
       [[2, 1], [3, 0]],
       [[0, 1], [2, 3]]]
EXPECTED = [  # (seq, token, phase, layer, experts)
    (0, 0, PREFILL, 0, [1, 3]), (0, 0, PREFILL, 1, [0, 2]),
    (0, 1, PREFILL, 0, [2, 1]), (0, 1, PREFILL, 1, [3, 0]),
    (0, 2, DECODE, 0, [0, 1]), (0, 2, DECODE, 1, [2, 3]),
]


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _rows(path):
    df = read_trace(path).to_polars().sort(["seq", "token", "layer"])
    return [(r["seq"], r["token"], r["phase"], r["layer"], list(r["experts"])) for r in df.iter_rows(named=True)]


def _sglang(ids, prompt=2, completion=2, **extra):
    flat = np.asarray(ids, dtype="<i4").tobytes()
    return {"text": "x", "meta_info": {"id": "r", "prompt_tokens": prompt, "completion_tokens": completion,
                                       "routed_experts": base64.b64encode(flat).decode(), **extra}}


def _npy(ids, dtype=np.uint16):
    buf = io.BytesIO()
    np.save(buf, np.asarray(ids, dtype=dtype))
    return base64.b64encode(buf.getvalue()).decode()


def test_sglang_responses_become_prefill_and_decode_rows(tmp_path, capsys):
    # second response: layer 1 of token 0 is a dense-layer placeholder (zeros), skipped
    second = [[[3, 2], [0, 0]], [[1, 0], [1, 2]]]
    src = _write(tmp_path / "responses.jsonl", [_sglang(IDS), _sglang(second, prompt=1, completion=2)])
    out = tmp_path / "t.parquet"
    code, _, err = _import(["sglang", src, out, "--num-layers", "2", "--num-experts", "4"], capsys)
    assert code == 0, err
    assert _rows(out) == EXPECTED + [(1, 0, PREFILL, 0, [3, 2]), (1, 1, DECODE, 0, [1, 0]), (1, 1, DECODE, 1, [1, 2])]
    t = read_trace(out)
    assert (t.meta.num_layers, t.meta.num_experts, t.meta.top_k) == (2, 4, 2)
    assert t.meta.provenance["format"] == "sglang" and t.meta.provenance["placeholder_rows_skipped"] == 1
    assert np.allclose(t.to_polars()["weights"].to_list(), 0.5)
    assert any("equal weights 1/k" in e for e in err) and any("1 placeholder row" in e for e in err), err


def test_sglang_geometry_from_the_model_name(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(32)]) for _ in range(3)])
    src = _write(tmp_path / "mixtral-8x7b-out.jsonl", [_sglang(ids)])
    out = tmp_path / "t.parquet"
    code, _, err = _import(["sglang", src, out], capsys)
    assert code == 0, err
    t = read_trace(out)
    assert (t.meta.model, t.meta.num_layers, t.meta.top_k, len(t)) == ("mistralai/Mixtral-8x7B-Instruct-v0.1", 32, 2, 96)
    assert _rows(out)[33] == (0, 1, PREFILL, 1, ids[1, 1].tolist())


@pytest.mark.parametrize("records,argv,needle", [
    (["{\"text\": 1}"], ["--num-layers", "2"], "line 1: missing field 'meta_info'"),
    ([{"meta_info": {"id": "r"}}], ["--num-layers", "2"], "line 1: missing field 'meta_info.routed_experts'"),
    ([{"meta_info": {"routed_experts": "@@@", "prompt_tokens": 1, "completion_tokens": 1}}], ["--num-layers", "2"],
     "line 1: meta_info.routed_experts is not valid base64"),
    ([_sglang(IDS), _sglang(IDS, completion=4)], ["--num-layers", "2"],
     "line 2: meta_info.routed_experts holds 12 ids, not a multiple of the 5 routed tokens"),
    ([_sglang(IDS)], [], "line 1: the response does not say the layer count or top-k: give the layer count (or the "
                         "name of a known model) (--num-layers N)"),
    ([{"meta_info": {"routed_experts": _sglang(IDS)["meta_info"]["routed_experts"]}}], ["--num-layers", "2"],
     "to tell tokens from layers: name a known model (its layer count and top-k do) (--model NAME)"),
    ([_sglang(IDS)], ["--num-layers", "5"], "line 1: meta_info.routed_experts holds 4 ids per token, not layers x top-k"
                                            " = 5 x ?: check the layer count and the model named (check --num-layers / "
                                            "--model)"),
    ([_sglang([[[1, 1], [0, 2]], [[2, 1], [3, 0]], [[0, 1], [2, 3]]])], ["--num-layers", "2"],
     "line 1: meta_info.routed_experts lists an expert twice at token 0 layer 0"),
    ([_sglang(IDS, prompt=-1)], ["--num-layers", "2"], "line 1: prompt_tokens must be a non-negative integer"),
    ([_sglang(IDS), "not json"], ["--num-layers", "2"], "line 2: not valid JSON"),
])
def test_bad_sglang_lines_name_the_line(tmp_path, capsys, records, argv, needle):
    src = _write(tmp_path / "bad.jsonl", records)
    out = tmp_path / "o.parquet"
    code, _, err = _import(["sglang", src, out, *argv], capsys)
    assert code == 1 and len(err) == 1 and needle in err[0] and str(src) in err[0], err
    assert not out.exists()


def test_vllm_routed_npy_choices_and_nested_lists(tmp_path, capsys):
    other = [[[3, 0], [1, 2]], [[0, 2], [1, 3]]]  # choice 1: 2 prompt tokens + 1 generated - 1
    chat = {"model": "my-moe", "usage": {"prompt_tokens": 2, "completion_tokens": 3},
            "choices": [{"index": 0, "routed_experts": _npy(IDS)}, {"index": 1, "routed_experts": _npy(other, np.uint8)}]}
    legacy = {"model": "my-moe", "prompt_routed_experts": [IDS[0]], "usage": {"prompt_tokens": 1},
              "choices": [{"index": 0, "routed_experts": IDS[1:]}]}
    src = _write(tmp_path / "resp.jsonl", [chat, legacy])
    out = tmp_path / "t.parquet"
    code, _, err = _import(["vllm-routed", src, out, "--num-experts", "4"], capsys)
    assert code == 0, err
    rows = _rows(out)
    assert rows[:6] == EXPECTED
    assert rows[6:10] == [(1, 0, PREFILL, 0, [3, 0]), (1, 0, PREFILL, 1, [1, 2]),
                          (1, 1, PREFILL, 0, [0, 2]), (1, 1, PREFILL, 1, [1, 3])]
    assert rows[10:] == [(2, 0, PREFILL, 0, [1, 3]), (2, 0, PREFILL, 1, [0, 2]), (2, 1, DECODE, 0, [2, 1]),
                         (2, 1, DECODE, 1, [3, 0]), (2, 2, DECODE, 0, [0, 1]), (2, 2, DECODE, 1, [2, 3])]
    m = read_trace(out).meta
    assert (m.model, m.num_layers, m.num_experts, m.top_k, m.provenance["sequences"]) == ("my-moe", 2, 4, 2, 3)


@pytest.mark.parametrize("records,needle", [
    ([{"model": "m"}], "line 1: missing field 'choices'"),
    ([{"choices": [{"index": 0}]}], "line 1: missing field 'choices[0].routed_experts'"),
    ([{"choices": [{"routed_experts": [[[1, 2]], [[1]]]}]}], "line 1: choices[0].routed_experts is a ragged list"),
    ([{"choices": [{"routed_experts": base64.b64encode(b"nonsense").decode()}]}],
     "line 1: choices[0].routed_experts is base64 but not of a .npy array"),
    ([{"choices": [{"routed_experts": _npy([[1, 2]])}]}], "line 1: choices[0].routed_experts must be shaped"),
    ([{"choices": [{"routed_experts": IDS}]}, {"choices": [{"routed_experts": [[[1, 2, 3]]]}]}],
     "line 2: 3 experts where earlier lines have 2"),
    ([{"choices": [{"routed_experts": [[[1.5, 2.0]]]}]}], "line 1: choices[0].routed_experts must hold integers"),
])
def test_bad_vllm_routed_lines_name_the_line(tmp_path, capsys, records, needle):
    src = _write(tmp_path / "bad.jsonl", records)
    out = tmp_path / "o.parquet"
    code, _, err = _import(["vllm-routed", src, out], capsys)
    assert code == 1 and len(err) == 1 and needle in err[0] and str(src) in err[0], err
    assert not out.exists()


def _rec(step, layer, rows, **extra):
    return {"step": step, "stage": "pre_dispatch", "block": "decoder", "layer": layer, "rank": 0,
            "num_tokens": len(rows), "topk": len(rows[0]), "top_indices": rows, **extra}


def test_megatron_trace_becomes_forward_passes(tmp_path, capsys):
    records = [_rec(0, 1, [[1, 3], [2, 0]]), _rec(0, 3, [[0, 2], [3, 1]]),
               {**_rec(0, 0, [[5, 6], [6, 7]]), "block": "mtp", "mtp_idx": 0},
               _rec(1, 1, [[2, 1]]), _rec(1, 3, [[3, 0]]),
               _rec(1, 1, [[0, 1]]), _rec(1, 3, [[2, 3]])]  # layer 1 repeats within step 1: a new pass
    src = _write(tmp_path / "router_trace_rank0.jsonl", records)
    out = tmp_path / "t.parquet"
    code, _, err = _import(["megatron", src, out, "--num-experts", "4"], capsys)
    assert code == 0, err
    assert _rows(out) == [(0, 0, DECODE, 0, [1, 3]), (0, 0, DECODE, 1, [0, 2]), (0, 1, DECODE, 0, [2, 0]),
                          (0, 1, DECODE, 1, [3, 1]), (1, 0, DECODE, 0, [2, 1]), (1, 0, DECODE, 1, [3, 0]),
                          (2, 0, DECODE, 0, [0, 1]), (2, 0, DECODE, 1, [2, 3])]
    prov = read_trace(out).meta.provenance
    assert prov["layer_numbers"] == [1, 3] and prov["forward_passes"] == 3 and prov["mtp_records_skipped"] == 1
    assert any("layer numbers 1..3 (2 routed layers) stored as MoE layers 0..1" in e for e in err), err


@pytest.mark.parametrize("records,needle", [
    ([_rec(0, 0, [[1, 2], [3, 0]]), _rec(0, 1, [[1, 2]])], "line 2: layer 1 routes 1 tokens in this forward pass"),
    ([_rec(0, 0, [[1, 2]]), {**_rec(0, 1, [[1, 2]]), "rank": 1}], "line 2: a record of rank 1 after rank 0 (line 1)"),
    ([{**_rec(0, 0, [[1, 2]]), "topk": 3}], "line 1: top_indices[0] is [1, 2], not topk=3 expert ids"),
    ([{**_rec(0, 0, [[1, 2]]), "num_tokens": 4}], "line 1: num_tokens is 4 but top_indices has 1 rows"),
    ([{"step": 0, "layer": 0}], "line 1: missing field 'top_indices'"),
    ([{**_rec(0, 0, [[1, 2]]), "block": "encoder"}], "line 1: unknown block 'encoder'"),
    ([_rec(0, 0, [[1, -2]])], "line 1: top_indices[0] must be a non-empty list of non-negative integers"),
])
def test_bad_megatron_lines_name_the_line(tmp_path, capsys, records, needle):
    src = _write(tmp_path / "bad.jsonl", records)
    out = tmp_path / "o.parquet"
    code, _, err = _import(["megatron", src, out], capsys)
    assert code == 1 and len(err) == 1 and needle in err[0] and str(src) in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("fmt,name,argv,rows", [
    ("sglang", "sglang-mixtral-8x7b-responses.jsonl", [], (6 + 6) * 32),
    ("vllm-routed", "vllm-routed-responses.jsonl", [], (7 + 6 + 4) * 24),
    ("megatron", "router_trace_rank0.jsonl", ["--num-experts", "8"], 5 * 4 + 6 * 2 * 4),
])
def test_shipped_examples_import(tmp_path, capsys, fmt, name, argv, rows):
    out = tmp_path / "t.parquet"
    code, _, err = _import([fmt, EXAMPLES / name, out, *argv], capsys)
    assert code == 0, err
    assert len(read_trace(out)) == rows
    assert name in (EXAMPLES / "README.md").read_text()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), layers=st.integers(1, 3), top_k=st.integers(1, 3), fmt=st.sampled_from(["sglang", "vllm-routed"]))
def test_any_routed_array_round_trips(tmp_path_factory, capsys, data, layers, top_k, fmt):
    """Random responses: every (token, layer) of every sequence comes back in router order, prefill below
    the prompt's token count."""
    tmp = tmp_path_factory.mktemp("rt")
    experts = top_k + 3
    responses, expected = [], []
    for seq in range(data.draw(st.integers(1, 3))):
        prompt, completion = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
        ids = [[data.draw(st.permutations(range(experts)))[:top_k] for _ in range(layers)]
               for _ in range(prompt + completion - 1)]
        expected += [(seq, t, PREFILL if t < prompt else DECODE, layer, list(ids[t][layer]))
                     for t in range(len(ids)) for layer in range(layers)]
        if fmt == "sglang":
            responses.append(_sglang(ids, prompt, completion))
        else:
            responses.append({"choices": [{"routed_experts": _npy(ids)}],
                              "usage": {"prompt_tokens": prompt, "completion_tokens": completion}})
    src = _write(tmp / "r.jsonl", responses)
    out = tmp / "t.parquet"
    argv = ["--num-layers", str(layers)] if fmt == "sglang" else []
    code, _, err = _import([fmt, src, out, "--num-experts", str(experts), *argv], capsys)
    assert code == 0, err
    assert _rows(out) == expected
