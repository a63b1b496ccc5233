"""Trace metadata from the vLLM importer: the weight format the log's name states (else "unknown"),
expert ids the model does not have are an error naming the line (not a silent 10-expert model), and
provenance shows as readable lines in ``moesim info`` and the HTML report."""

from __future__ import annotations

import json
import re

from moesim.cli import main
from moesim.traces.format import read_trace
from moesim.traces.models import known_model, quantization_in_name


def _log(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _row(p, t, layer, experts, probs=(0.6, 0.4)):
    return {"problem_id": p, "token_idx": t, "layer": layer, "experts": list(experts), "gating_probs": list(probs)}


ROWS = [_row(0, t, layer, ((t + layer) % 8, (t + layer + 3) % 8)) for t in range(3) for layer in range(2)]


def _import(argv, capsys):
    code = main(["import", "--from", *map(str, argv)])
    cap = capsys.readouterr()
    return code, cap.out, cap.err.strip().splitlines()


def test_quantization_from_the_file_name_else_unknown(tmp_path, capsys):
    fp8 = _log(tmp_path / "mixtral-8x7b-instruct-fp8_humaneval-2_vllm.jsonl", ROWS)
    code, out, err = _import(["vllm-jsonl", fp8, tmp_path / "a.parquet"], capsys)
    meta = read_trace(tmp_path / "a.parquet").meta
    # the only note: a 2-layer log of a 32-layer model (logged_layers)
    assert code == 0 and len(err) == 1 and "holds 2 of the model's 32 MoE layers" in err[0] and "quantization fp8" in out
    assert meta.quantization == "fp8" and meta.provenance["quantization_from"] == "the file name"
    assert meta.model == "mistralai/Mixtral-8x7B-Instruct-v0.1" and meta.num_experts == 8
    assert "named by the file name" in meta.provenance["geometry_from"]
    assert meta.expert_bytes == 0  # the log says nothing about copied bytes: the cost model's table decides
    plain = _log(tmp_path / "routing.jsonl", ROWS)
    assert _import(["vllm-jsonl", plain, tmp_path / "b.parquet"], capsys)[0] == 0
    meta = read_trace(tmp_path / "b.parquet").meta
    assert meta.quantization == "unknown" and meta.provenance["quantization_from"] == "nothing in the log"
    assert "assumed for a top-2 log" in meta.provenance["geometry_from"]
    assert _import(["vllm-jsonl", fp8, tmp_path / "c.parquet", "--quantization", "bf16"], capsys)[0] == 0
    meta = read_trace(tmp_path / "c.parquet").meta
    assert meta.quantization == "bf16" and meta.provenance["quantization_from"] == "the import options"


def test_names_say_model_and_format():
    assert quantization_in_name("Qwen/Qwen1.5-MoE-A2.7B-Chat-GPTQ-Int4") == "gptq-int4"
    assert quantization_in_name("mixtral-8x7b-instruct-fp8_humaneval-2_vllm.jsonl") == "fp8"
    assert quantization_in_name("routing_log.jsonl") is None
    assert known_model("Qwen/Qwen1.5-MoE-A2.7B-Chat-GPTQ-Int4").num_experts == 60
    assert known_model("logs/mixtral-8x7b-instruct-fp8.jsonl").num_layers == 32
    assert known_model("notmixtral-8x7bz") is None and known_model("mixtral-8x22b").num_layers == 56


def test_expert_id_beyond_the_model_is_an_error_naming_the_line(tmp_path, capsys):
    rows = [*ROWS[:3], _row(0, 5, 0, (9, 1)), *ROWS[3:]]
    src = _log(tmp_path / "routing.jsonl", rows)
    out = tmp_path / "o.parquet"
    code, _, err = _import(["vllm-jsonl", src, out], capsys)
    assert code == 1 and len(err) == 1 and not out.exists()
    assert "line 4: expert id 9 out of range [0, 8)" in err[0] and "Mixtral-8x7B" in err[0], err
    assert "--num-experts" in err[0]
    code, _, err = _import(["vllm-jsonl", src, out, "--num-experts", "10"], capsys)
    assert code == 0 and read_trace(out).meta.num_experts == 10
    code, _, err = _import(["vllm-jsonl", src, tmp_path / "p.parquet", "--num-experts", "9"], capsys)
    assert code == 1 and "line 4: expert id 9 out of range [0, 9) (the expert count given is 9)" in err[0]
    assert err[0].endswith("give its expert count (and its name) (--num-experts N)"), err


def test_a_log_naming_no_known_model_infers_with_a_note(tmp_path, capsys):
    rows = [_row(0, t, 0, (t, t + 1, t + 2), (0.5, 0.3, 0.2)) for t in range(12)]  # top-3: not Mixtral
    src = _log(tmp_path / "routing.jsonl", rows)
    code, _, err = _import(["vllm-jsonl", src, tmp_path / "o.parquet"], capsys)
    meta = read_trace(tmp_path / "o.parquet").meta
    assert code == 0 and meta.num_experts == 14 and meta.model == "unknown"
    assert len(err) == 1 and "14 experts per layer inferred" in err[0]
    assert err[0].endswith("if the model has more (--num-experts N)"), err   # the library's note, the CLI's flag


def test_provenance_reads_as_lines_in_info_and_report(tmp_path, capsys):
    src = _log(tmp_path / "mixtral-8x7b-instruct-fp8_x.jsonl", ROWS)
    trace = tmp_path / "t.parquet"
    assert _import(["vllm-jsonl", src, trace], capsys)[0] == 0
    assert main(["info", str(trace)]) == 0
    lines = capsys.readouterr().out.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.strip() == "provenance:")
    block = [ln.split(None, 1) if "  " in ln.strip() else [ln.strip()] for ln in lines[i + 1:i + 9]]
    text = "\n".join(lines[i + 1:i + 9])
    assert lines[i + 1].split() == ["kind", "imported"] and "{" not in text and "'" not in text
    assert "quantization from  the file name" in text and "source             mixtral-8x7b-instruct-fp8_x.jsonl" in text
    assert len(block) == 8
    assert "   expert_bytes: 0 (not recorded)" in lines
    assert any(re.fullmatch(r"\s+file bytes\s+[0-9,]+ B \([0-9.]+ kB\)", ln) for ln in lines), lines
    from moesim.analysis.report import build_report

    html = build_report(read_trace(trace), policies=["lru"], sizes=[2, 3], timing=False)
    prov = html.split("<h3>Provenance</h3>")[1].split("</table>")[0]
    assert "<td class=l>quantization from</td><td class=l>the file name</td>" in prov
    assert "{" not in prov and "&#x27;" not in prov


def test_real_trace_is_fp8_mixtral(real_jsonl, tmp_path):
    from moesim.traces.vllm import import_vllm_jsonl

    meta = import_vllm_jsonl(real_jsonl, tmp_path / "r.parquet")
    assert meta.quantization == "fp8" and meta.num_experts == 8 and meta.model.startswith("mistralai/Mixtral-8x7B")
