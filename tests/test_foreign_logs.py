"""Other people's logs (issue 26 items 4 and 5): batched vLLM prompt passes labelled prefill, the layers a
log holds recorded and used, expert bytes never borrowed from Mixtral for another model, Git LFS
pointers refused by name, and the real trace found through MOESIM_REAL_DIR."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moesim.errors import DataError
from moesim.traces.format import DECODE, PREFILL, TraceMeta, TraceWriter, read_trace
from moesim.traces.vllm_batched import _Pass, prompt_passes
from tests.helpers import run_main as _run

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "examples" / "vllm-batched-routes.jsonl"
QWEN_EXPERT_BF16 = 3 * 2048 * 1408 * 2   # Qwen1.5-MoE-A2.7B: hidden 2048, moe_intermediate_size 1408, bf16
P, D = PREFILL, DECODE


def _passes(widths):
    return [_Pass([(0, [(1, i, (0,), (1.0,)) for i in range(w)])]) for w in widths]


@pytest.mark.parametrize("widths, phases", [
    ([12, 3, 3, 3, 2, 2], [P, D, D, D, D, D]),            # the example log: one prompt pass, then decode
    ([65, 1, 1, 1406, 2, 2, 1], [P, D, D, P, D, D, D]),   # the public Qwen log's two prompt passes
    ([2, 2, 1], [D, D, D]),                               # decode only: requests finishing
    ([3, 3, 2, 9, 3, 2], [D, D, D, P, D, D]),             # a request admitted mid-run
    ([4, 3, 3, 7, 5, 4], [P, D, D, P, D, D]),             # after a prompt pass: decode, even as rows fall
    ([5], [D]),                                           # one pass: nothing to compare with
])
def test_prompt_passes_hand_traced(widths, phases):
    assert prompt_passes(_passes(widths)) == phases


@pytest.fixture()
def qwen(tmp_path, capsys):
    out = tmp_path / "q.parquet"
    code, _, err = _run(["import", "--from", "vllm-batched", EXAMPLE, "-o", out], capsys)
    assert code == 0, err
    return out, err


def test_example_log_prefill_rows_and_logged_layers(qwen):
    path, notes = qwen
    t = read_trace(path)
    # the example: a 64-row warm-up (dropped), one 12-row prompt pass, 30 decode passes of 3 or 2 rows
    assert int((t.phase == PREFILL).sum()) == 12 and (t.seq[t.phase == PREFILL] == 0).all()
    assert int((t.phase == DECODE).sum()) == 80
    assert t.meta.num_layers == 24 and t.meta.logged_layers == [0] and t.held_layers() == [0]
    assert any("1 prompt pass" in n and "12 rows" in n for n in notes)
    assert any("holds 1 of the model's 24 MoE layers (0)" in n for n in notes)


def test_simulator_and_plots_use_only_the_logged_layers(qwen, tmp_path, capsys):
    from moesim.analysis import plots

    path, _ = qwen
    code, out, err = _run(["simulate", path, "--policy", "lru", "--cache-size", "8", "--per-layer", "--json"], capsys)
    assert code == 0
    per_layer = json.loads(out)["per_layer"]
    assert [d["layer"] for d in per_layer] == [0] and per_layer[0]["requests"] == 92 * 4
    assert len(err) == 1 and "holds 1 of the model's 24 MoE layers (0); results cover those layers only" in err[0]
    fig = plots.heatmap(read_trace(path))
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape == (1, 60)            # one row, not 23 empty ones
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0"] and "1 of 24 layers logged" in ax.get_title()


def test_timing_refuses_to_price_qwen_experts_as_mixtral(qwen, tmp_path, capsys):
    path, _ = qwen
    base = ["simulate", path, "--policy", "lru", "--cache-size", "8", "--hardware", "a6000", "--json"]
    code, out, err = _run(base, capsys)
    assert code == 2 and out == "" and len(err) == 1, err
    assert "expert size of Qwen/Qwen1.5-MoE-A2.7B-Chat is not known" in err[0] and "--expert-bytes" in err[0]
    code, out, _ = _run([*base, "--expert-bytes", str(QWEN_EXPERT_BF16)], capsys)
    assert code == 0 and json.loads(out)["expert_bytes"] == QWEN_EXPERT_BF16
    # or the size stored at import
    stored = tmp_path / "q2.parquet"
    assert _run(["import", "--from", "vllm-batched", EXAMPLE, stored, "--expert-bytes", str(QWEN_EXPERT_BF16)],
                capsys)[0] == 0
    code, out, _ = _run(["simulate", stored, *base[2:]], capsys)
    assert code == 0 and json.loads(out)["expert_bytes"] == QWEN_EXPERT_BF16


def test_timing_still_prices_a_mixtral_trace_from_its_table(tmp_path, capsys):
    out = tmp_path / "s.parquet"
    assert _run(["synth", "--tokens", "4", "-o", out], capsys)[0] == 0
    code, stdout, err = _run(["simulate", out, "--policy", "lru", "--cache-size", "4", "--hardware", "a6000",
                              "--quantization", "bf16", "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["expert_bytes"] == 3 * 4096 * 14336 * 2   # a bf16 Mixtral-8x7B expert


def test_logged_layers_metadata_is_checked(tmp_path):
    meta = TraceMeta(model="m", family="mixtral", num_layers=2, num_experts=4, top_k=2, logged_layers=[0, 5])
    with TraceWriter(tmp_path / "t.parquet", meta) as w:
        w.write(0, [0], DECODE, [0], [[0, 1]], [[0.5, 0.5]])
    with pytest.raises(DataError, match=r"logged_layers=\[0, 5\] must list layers in \[0, 2\)"):
        read_trace(tmp_path / "t.parquet")


LFS = ("version https://git-lfs.github.com/spec/v1\n"
       "oid sha256:761a87b678ffb713c40f0306d1bacc4346e70b78e5b767529495e8093d47609e\nsize 1611090\n")


@pytest.mark.parametrize("fmt", [["vllm-jsonl"], ["vllm-batched"], ["jsonl", "--map", "layer=l,experts=e"]])
def test_a_git_lfs_pointer_is_named(tmp_path, capsys, fmt):
    src = tmp_path / "humaneval_2_routing.jsonl"
    src.write_text(LFS)
    out = tmp_path / "o.parquet"
    code, _, err = _run(["import", "--from", fmt[0], src, out, *fmt[1:]], capsys)
    assert code == 1 and len(err) == 1 and not out.exists(), err
    assert f"{src}: this is a Git LFS pointer, not the data" in err[0]


def test_tests_find_the_real_trace_through_moesim_real_dir(tmp_path):
    (tmp_path / "humaneval_2_routing.jsonl").write_text("{}\n")   # the upstream file's own name
    env = {**os.environ, "MOESIM_REAL_DIR": str(tmp_path)}
    code = "import conftest; print(conftest.REAL_JSONL)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO / "tests", env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "humaneval_2_routing.jsonl")


def test_provenance_doc_names_repository_commit_and_path():
    doc = (REPO / "docs" / "trace-format.md").read_text(encoding="utf-8")
    for needle in ("Mario928/speculative-moe", "216e26eb86ee09fa46bb0e8c000be7e9758e10b6",
                   "routing_data_collected/humaneval_2_routing.jsonl", "MOESIM_REAL_DIR"):
        assert needle in doc
    assert "mixtral-8x7b-instruct-fp8_humaneval-2_vllm.jsonl real.parquet" not in (REPO / "README.md").read_text()


def test_figures_of_a_synthetic_trace_say_so(tmp_path, capsys):
    from moesim.analysis import plots

    out = tmp_path / "s.parquet"
    assert _run(["synth", "--tokens", "20", "-o", out], capsys)[0] == 0
    trace = read_trace(out)
    for fig in (plots.heatmap(trace), plots.reuse(trace), plots.mrc(trace, ["lru"])):
        assert "(SYNTHETIC trace)" in fig.axes[0].get_title()
