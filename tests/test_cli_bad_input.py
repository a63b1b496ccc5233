"""The bad-input corpus: each case exits 1 (data) or 2 (usage) with ONE line naming the file, no
traceback, and leaves no partial output (a pre-existing output is untouched)."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moesim.cli import main
from moesim.traces.format import DECODE, TraceMeta, TraceWriter


def run_cli(args):
    proc = subprocess.run([sys.executable, "-m", "moesim", *map(str, args)], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def _good(path, **meta_kw):
    meta = TraceMeta(model="m", family="mixtral", num_layers=2, num_experts=4, top_k=2, **meta_kw)
    with TraceWriter(path, meta) as w:
        w.write(0, [0, 0], DECODE, [0, 1], [[0, 1], [2, 3]], [[0.5, 0.5]] * 2)
    return path


def _rewrite(path, table, meta_json=None):
    md = dict(table.schema.metadata or {})
    if meta_json is not None:
        md[b"moesim"] = json.dumps(meta_json).encode()
    pq.write_table(table.replace_schema_metadata(md), path)


def _bad_traces(tmp_path):
    good = _good(tmp_path / "good.parquet")
    table = pq.read_table(good)
    meta = json.loads(table.schema.metadata[b"moesim"])
    cases = {}
    cases["missing file"] = (tmp_path / "nope.parquet", "no such file")
    p = tmp_path / "text.parquet"
    p.write_text("hello, not parquet\n" * 10)
    cases["not parquet"] = (p, "not a Parquet file")
    p = tmp_path / "trunc.parquet"
    p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases["truncated"] = (p, "Parquet")
    p = tmp_path / "version.parquet"
    _rewrite(p, table, {**meta, "schema_version": 99})
    cases["schema version"] = (p, "schema version 99")
    p = tmp_path / "nocol.parquet"
    _rewrite(p, table.drop_columns(["experts"]))
    cases["missing column"] = (p, "missing required column 'experts'")
    p = tmp_path / "expert.parquet"
    bad = table.set_column(4, "experts", pa.array([[0, 1], [2, 7]], type=table.schema.field("experts").type))
    _rewrite(p, bad)
    cases["expert id"] = (p, "expert id 7 out of range")
    p = tmp_path / "layer.parquet"
    _rewrite(p, table.set_column(3, "layer", pa.array([0, -1], pa.int16())))
    cases["negative layer"] = (p, "layer -1 out of range")
    p = tmp_path / "nometa.parquet"
    pq.write_table(table.replace_schema_metadata({}), p)
    cases["not a moesim trace"] = (p, "not a moesim trace")
    return cases


@pytest.mark.parametrize("case", ["missing file", "not parquet", "truncated", "schema version", "missing column",
                                  "expert id", "negative layer", "not a moesim trace"])
@pytest.mark.parametrize("command", ["simulate", "mrc", "export", "info"])
def test_bad_trace_one_line_exit_1(tmp_path, case, command, capsys):
    path, needle = _bad_traces(tmp_path)[case]
    out = tmp_path / "out.bin"
    argv = {"simulate": ["simulate", path, "--policy", "lru", "--cache-size", "2"],
            "mrc": ["mrc", path, "--policy", "lru", "--json"],
            "export": ["export", path, "--format", "csv", "-o", out],
            "info": ["info", path]}[command]
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and needle in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()


def test_subprocess_bad_input_has_no_traceback(tmp_path):
    path, _ = _bad_traces(tmp_path)["truncated"]
    code, out, err = run_cli(["simulate", path, "--policy", "lru", "--cache-size", "2", "--json"])
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def _jsonl(tmp_path, lines):
    p = tmp_path / "in.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


ROW = '{"problem_id": 0, "token_idx": %d, "layer": 0, "experts": [1, 2], "gating_probs": [0.6, 0.4]}'


@pytest.mark.parametrize("lines,needle", [
    ([ROW % 0, "{not json", ROW % 1], "line 2"),
    ([ROW % 0, ROW % 1, '{"problem_id": 0, "token_idx": 1, "layer": 0, "experts": [3, 2], "gating_probs": [0.6, 0.4]}'],
     "line 3: conflicts with line 2"),
    ([ROW % 0, '{"problem_id": 0, "token_idx": 1, "layer": 0, "experts": [1, 2]}'], "line 2: missing field 'gating_probs'"),
    ([ROW % 0, '{"problem_id": -1, "token_idx": 1, "layer": 0, "experts": [1, 2], "gating_probs": [1, 0]}'], "line 2"),
])
def test_bad_jsonl_import(tmp_path, capsys, lines, needle):
    src = _jsonl(tmp_path, lines)
    out = tmp_path / "out.parquet"
    out.write_bytes(b"previous")
    code = main(["import", "--from", "vllm-jsonl", str(src), str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and str(src) in err[0] and needle in err[0]
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.parquet"]


def test_output_in_missing_directory(tmp_path, capsys):
    src = _jsonl(tmp_path, [ROW % 0])
    out = tmp_path / "no" / "such" / "dir" / "o.parquet"
    code = main(["import", "--from", "vllm-jsonl", str(src), str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "does not exist" in err[0] and str(out) in err[0]
    good = _good(tmp_path / "g.parquet")
    for argv in (["export", good, "--format", "csv", "-o", out], ["synth", "--tokens", "5", out]):
        assert main([str(a) for a in argv]) == 1
        assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("argv,needle", [
    (["simulate", "{good}", "--policy", "lru", "--cache-size", "1"], "smaller than top-k"),
    (["simulate", "{good}", "--policy", "nosuch", "--cache-size", "2"], "unknown policy"),
    (["simulate", "{good}", "--policy", "lfu-decay", "--cache-size", "2", "--param", "bogus=1"], "has no parameter 'bogus' (its parameters: half_life=64.0)"),
    (["simulate", "{good}", "--policy", "lru", "--cache-size", "two"], "invalid int value"),
    (["simulate", "{good}", "--policy", "lru", "--layer-budgets", "2,2,2"], "3 layer budgets"),
    (["mrc", "{good}", "--policy", "nosuch"], "unknown policy"),
    (["synth", "--preset", "nosuch", "--tokens", "5", "{out}"], "unknown preset"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_exit_2(tmp_path, capsys, argv, needle):
    good = _good(tmp_path / "g.parquet")
    argv = [a.format(good=good, out=tmp_path / "o.parquet") for a in argv]
    with pytest.raises(SystemExit) if argv[0] == "frobnicate" or "two" in argv else _nothing() as exc:
        code = main(argv)
    if exc is not None and hasattr(exc, "value"):
        code = exc.value.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o.parquet").exists()


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def test_unexpected_errors_are_one_line_without_debug(tmp_path, capsys, monkeypatch):
    import moesim.simulator.replay as replay

    def boom(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(replay, "simulate", boom)
    good = _good(tmp_path / "g.parquet")
    assert main(["simulate", str(good), "--policy", "lru", "--cache-size", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error: RuntimeError: kaboom" in err[0]
    with pytest.raises(RuntimeError):
        main(["--debug", "simulate", str(good), "--policy", "lru", "--cache-size", "2"])
