"""Routing logs of other shapes: the batched vLLM-logger format (forward passes, warm-up dropped) and
the generic JSON-lines importer with a field mapping. Fixtures are written here by hand in those
shapes; every bad line is one error naming its line number."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesim.cli import main
from moesim.simulator.replay import simulate
from moesim.traces.format import PREFILL, read_trace

QWEN = "Qwen/Qwen1.5-MoE-A2.7B-Chat-GPTQ-Int4"
HEADER = {"type": "meta", "model_id": QWEN, "vllm_version": "0.0-test", "device": "cuda", "seed": 1234,
          "layers_logged": [0, 5], "top_k": 4}


def _route(tok, layer, ids, req="r0"):
    w = [0.4, 0.3, 0.2, 0.1][:len(ids)]
    return {"type": "route", "req_id": req, "token_idx": tok, "layer": layer, "topk_ids": list(ids), "topk_weights": w}


def _pass(rows_per_layer):
    """rows_per_layer: {layer: [ids of row 0, ids of row 1, ...]} -> the lines of one forward pass."""
    return [_route(i, layer, ids) for layer, rows in rows_per_layer.items() for i, ids in enumerate(rows)]


WARMUP = _pass({0: [[7, 3, 59, 1]] * 50, 5: [[2, 8, 9, 4]] * 50})
PREFILL_PASS = _pass({0: [[0, 1, 2, 3], [4, 5, 6, 7], [1, 2, 3, 4]], 5: [[10, 11, 12, 13], [14, 15, 16, 17], [0, 1, 2, 3]]})
DECODE_1 = _pass({0: [[0, 1, 2, 5], [4, 5, 6, 8]], 5: [[10, 11, 12, 14], [14, 15, 16, 18]]})
DECODE_2 = _pass({0: [[0, 1, 3, 5]], 5: [[10, 11, 13, 14]]})


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _import(argv, capsys):
    try:
        code = main(["import", "--from", *map(str, argv)])
    except SystemExit as exc:
        code = exc.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err.strip().splitlines()


def test_batched_log_becomes_passes_in_execution_order(tmp_path, capsys):
    records = [HEADER, *WARMUP, *PREFILL_PASS, *DECODE_1, *DECODE_2]
    src = _write(tmp_path / "moe_routes.jsonl", records)
    out = tmp_path / "t.parquet"
    code, stdout, err = _import(["vllm-batched", src, out], capsys)
    assert code == 0, err
    assert len(err) == 3 and "dropped the warm-up pass (50 identical rows per layer, lines 2-101)" in err[0], err
    assert "1 prompt pass" in err[1] and "holds 2 of the model's 24 MoE layers (0, 5)" in err[2], err
    t = read_trace(out)
    assert t.meta.logged_layers == [0, 5]
    assert t.phase.tolist() == [PREFILL] * len(PREFILL_PASS) + [1] * (len(DECODE_1) + len(DECODE_2))
    m = t.meta
    assert (m.model, m.family, m.num_layers, m.num_experts, m.top_k) == (QWEN, "qwen2_moe", 24, 60, 4)
    assert m.quantization == "gptq-int4" and m.provenance["quantization_from"] == "the model name"
    prov = m.provenance
    assert prov["forward_passes"] == 3 and prov["warmup_rows_dropped"] == 100 and prov["layers_logged"] == [0, 5]
    assert prov["rows_per_pass"] == {"min": 1, "median": 2, "max": 3}
    # seq = pass, token = row in the batch; every kept route line is one row
    assert len(t) == len(PREFILL_PASS) + len(DECODE_1) + len(DECODE_2)
    t = t.execution_order()
    assert list(zip(t.seq.tolist(), t.token.tolist(), t.layer.tolist(), strict=True))[:4] == [
        (0, 0, 0), (0, 0, 5), (0, 1, 0), (0, 1, 5)]
    # each layer's requests come in the order the GPU routed them: pass by pass, row by row
    kept = [*PREFILL_PASS, *DECODE_1, *DECODE_2]
    for layer in (0, 5):
        want = [r["topk_ids"] for r in kept if r["layer"] == layer]
        assert t.experts[t.layer == layer].tolist() == want
        w = [r["topk_weights"] for r in kept if r["layer"] == layer]
        assert np.allclose(t.weights[t.layer == layer], w, atol=1e-3)
    # and the replay is the same as on a hand-made trace of those rows (a one-layer LRU by hand)
    res = simulate(t, "lru", 4)
    cache: list[int] = []
    hits = 0
    for ids in (r["topk_ids"] for r in kept if r["layer"] == 0):
        hits += sum(e in cache for e in ids)
        for e in ids:  # atomic set of 4 in 4 slots: the set itself becomes the cache, router order = recency
            if e in cache:
                cache.remove(e)
            cache.append(e)
        cache = cache[-4:]
    assert res.layer_hits[0] == hits


def test_restarted_logger_and_no_warmup(tmp_path, capsys):
    """A second header (the logger appends) starts a new pass; without a dummy batch nothing is dropped."""
    records = [HEADER, *DECODE_1, HEADER, *DECODE_1, *DECODE_2]
    src = _write(tmp_path / "routes.jsonl", records)
    code, _, err = _import(["vllm-batched", src, tmp_path / "t.parquet"], capsys)
    assert code == 0 and len(err) == 1 and "holds 2 of the model's 24 MoE layers" in err[0], err
    t = read_trace(tmp_path / "t.parquet")
    assert (t.phase == 1).all()  # 2, 2, 1 rows: requests finishing, no prompt pass
    assert t.meta.provenance["forward_passes"] == 3 and sorted(set(t.seq.tolist())) == [0, 1, 2]


@pytest.mark.parametrize("records, needle", [
    ([HEADER, _route(0, 0, [1, 2, 3, 4]), _route(2, 0, [1, 2, 3, 5])],
     "line 3: token_idx 2 at layer 0 follows token_idx 0 at layer 0"),
    ([HEADER, _route(0, 0, [1, 2, 3, 4]), _route(1, 0, [1, 2, 3, 5]), _route(0, 5, [1, 2, 3, 4]), HEADER],
     "line 5: layer 5 has 1 rows in this forward pass but layer 0 had 2 (line 2)"),
    ([HEADER, _route(0, 0, [1, 2, 3])], "line 2: 3 experts but the header (line 1) says top_k=4"),
    ([HEADER, _route(0, 3, [1, 2, 3, 4])], "line 2: layer 3 is not in the header's layers_logged [0, 5]"),
    ([HEADER, {"type": "step", "n": 1}], "line 2: unknown record type 'step'"),
    ([HEADER, {"req_id": "r0", "token_idx": 0}], "line 2: missing field 'type'"),
    ([HEADER, _route(0, 0, [1, 2, 3, 4]), {**_route(1, 0, [1, 2, 3, 4]), "topk_weights": [1, 2]}],
     "line 3: topk_weights must be 4 numbers"),
    ([HEADER, _route(0, 0, [1, 2, 3, 60])], "line 2: expert id 60 out of range [0, 60)"),
    ([HEADER, *WARMUP], "no forward pass besides the warm-up"),
    ([HEADER, _route(0, 0, [1, 2, 3, 4]), {**HEADER, "model_id": "other/model"}],
     "line 3: a second header for another model"),
])
def test_bad_batched_lines_name_the_line(tmp_path, capsys, records, needle):
    src = _write(tmp_path / "bad.jsonl", records)
    out = tmp_path / "o.parquet"
    code, _, err = _import(["vllm-batched", src, out], capsys)
    assert code == 1 and len(err) == 1 and needle in err[0] and str(src) in err[0], err
    assert not out.exists()


def test_bad_json_line_is_named(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps(HEADER) + "\n{broken\n")
    for argv in (["vllm-batched"], ["jsonl", "--where", "type=route"]):
        code, _, err = _import([*argv, src, tmp_path / "o.parquet"], capsys)
        assert code == 1 and len(err) == 1 and "line 2: not valid JSON" in err[0], err


# ---- generic JSON lines with a field mapping -------------------------------------------------------

OTHER_LOGGER = [
    {"kind": "header", "tool": "my-logger"},
    {"kind": "r", "req": "req-b", "pos": 0, "l": 1, "ids": [3, 1], "w": [0.7, 0.3], "stage": "prefill"},
    {"kind": "r", "req": "req-b", "pos": 0, "l": 0, "ids": [2, 0], "w": [0.6, 0.4], "stage": "prefill"},
    {"kind": "r", "req": "req-a", "pos": 0, "l": 0, "ids": [5, 4], "w": [0.5, 0.5], "stage": "decode"},
    {"kind": "r", "req": "req-b", "pos": 1, "l": 0, "ids": [0, 2], "w": [0.9, 0.1], "stage": "decode"},
]
MAP = "seq=req,token=pos,layer=l,experts=ids,weights=w,phase=stage"


def test_mapped_jsonl_import(tmp_path, capsys):
    src = _write(tmp_path / "mine.jsonl", OTHER_LOGGER)
    out = tmp_path / "t.parquet"
    code, _, err = _import(["jsonl", src, out, "--map", MAP, "--where", "kind=r", "--num-experts", "6"], capsys)
    assert code == 0 and err == ["moesim import: note: skipped 1 line(s) whose kind is not 'r'"], err
    t = read_trace(out).execution_order()
    # req-b first seen -> seq 0, req-a -> seq 1
    got = list(zip(t.seq.tolist(), t.token.tolist(), t.layer.tolist(), t.experts.tolist(), strict=True))
    assert got == [(0, 0, 0, [2, 0]), (0, 0, 1, [3, 1]), (0, 1, 0, [0, 2]), (1, 0, 0, [5, 4])]
    assert t.phase.tolist() == [PREFILL, PREFILL, 1, 1]
    assert np.allclose(t.weights[0], [0.6, 0.4], atol=1e-3)
    m = t.meta
    assert (m.num_layers, m.num_experts, m.top_k, m.model, m.quantization) == (2, 6, 2, "unknown", "unknown")
    assert m.provenance["mapping"]["seq"] == "req" and m.provenance["where"] == "kind=r"


def test_mapped_jsonl_defaults_and_nested_fields(tmp_path, capsys):
    rows = [{"seq": 3, "token": t, "route": {"layer": 0, "ids": [t % 4, (t + 1) % 4]}} for t in range(5)]
    src = _write(tmp_path / "n.jsonl", rows)
    out = tmp_path / "t.parquet"
    code, _, err = _import(["jsonl", src, out, "--map", "layer=route.layer,experts=route.ids"], capsys)
    assert code == 0
    assert any("5 row(s) without a 'weights' field: equal weights 1/k stored" in e for e in err), err
    t = read_trace(out)
    assert set(t.seq.tolist()) == {3} and t.meta.num_experts == 4
    assert np.allclose(t.weights, 0.5)


@pytest.mark.parametrize("records, argv, needle", [
    ([{"pos": 0, "l": 0, "ids": [1, 2]}], ["--map", "layer=l,experts=ids"],
     "line 1: missing field 'token'; say which field holds the token (--map token=FIELD)"),
    ([{"t": 0, "l": 0, "ids": [1, 2]}, {"t": -1, "l": 0, "ids": [1, 2]}], ["--map", "token=t,layer=l,experts=ids"],
     "line 2: t must be a non-negative integer, got -1"),
    ([{"t": 0, "l": 0, "ids": [1, 2], "ph": "warm"}], ["--map", "token=t,layer=l,experts=ids,phase=ph"],
     "line 1: ph must be 'prefill', 'decode', 0 or 1"),
    ([{"s": 1, "t": 0, "l": 0, "ids": [1, 2]}, {"s": "x", "t": 0, "l": 0, "ids": [1, 2]}],
     ["--map", "seq=s,token=t,layer=l,experts=ids"], "line 2: s 'x' is a string where earlier lines have numbers"),
    ([{"t": 0, "l": 0, "ids": [1, 2]}, {"t": 0, "l": 0, "ids": [3, 2]}], ["--map", "token=t,layer=l,experts=ids"],
     "line 2: conflicts with line 1 for seq=0 t=0 l=0"),
])
def test_bad_mapped_lines_name_the_line(tmp_path, capsys, records, argv, needle):
    src = _write(tmp_path / "bad.jsonl", records)
    out = tmp_path / "o.parquet"
    code, _, err = _import(["jsonl", src, out, *argv], capsys)
    assert code == 1 and len(err) == 1 and needle in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("argv, needle", [
    (["jsonl", "{src}", "{out}", "--map", "expert=ids"],
     "unknown mapping target 'expert' (known: seq, token, layer, experts, weights, phase) (--map)"),
    (["jsonl", "{src}", "{out}", "--map", "token"], "a field mapping is TARGET=FIELD pairs, got 'token' (--map)"),
    (["jsonl", "{src}", "{out}", "--where", "kind"], "a line filter is FIELD=VALUE, got 'kind' (--where)"),
    (["vllm-jsonl", "{src}", "{out}", "--map", "token=t"], "--map and --where apply to --from jsonl"),
    (["vllm-batched", "{src}", "{out}", "--num-experts", "0"], "--num-experts must be >= 1"),
    (["parquet", "{src}", "{out}"], "invalid choice: 'parquet'"),
])
def test_import_usage_errors(tmp_path, capsys, argv, needle):
    src = _write(tmp_path / "x.jsonl", [{"token": 0, "layer": 0, "experts": [1, 2]}])
    out = tmp_path / "o.parquet"
    code, _, err = _import([a.format(src=src, out=out) for a in argv], capsys)
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()
