"""Argument consistency across subcommands (issue 26 items 9 and 11): ``-o OUT`` as well as the
positional output, errors that name the subcommand the user typed, ``--debug`` on either side of the
subcommand, descriptions in every ``--help``, and a missing trace that points at ``record --recover``."""

from __future__ import annotations

import json

import pytest

from moesim.cli import build_parser, main
from moesim.traces.format import read_trace
from tests.helpers import run_main as _run
from tests.helpers import write_trace


def _log(path):
    rows = [{"problem_id": 0, "token_idx": t, "layer": layer, "experts": [t % 4, (t + 1) % 4],
             "gating_probs": [0.6, 0.4]} for t in range(3) for layer in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("spelling", ["positional", "-o", "--output"])
def test_import_takes_the_output_either_way(tmp_path, capsys, spelling):
    src, out = _log(tmp_path / "log.jsonl"), tmp_path / "t.parquet"
    tail = [out] if spelling == "positional" else [spelling, out]
    code, _, err = _run(["import", "--from", "vllm-jsonl", src, *tail], capsys)
    assert code == 0, err
    assert len(read_trace(out)) == 6


@pytest.mark.parametrize("spelling", ["positional", "-o"])
def test_synth_takes_the_output_either_way(tmp_path, capsys, spelling):
    out = tmp_path / "s.parquet"
    tail = [out] if spelling == "positional" else ["-o", out]
    code, _, err = _run(["synth", "--preset", "mixtral-8x7b", "--tokens", "3", "--seed", "1", *tail], capsys)
    assert code == 0, err
    assert read_trace(out).meta.num_layers == 32


@pytest.mark.parametrize("command", ["import", "synth"])
def test_output_given_twice_or_not_at_all_is_a_usage_error(tmp_path, capsys, command):
    src = _log(tmp_path / "log.jsonl")
    head = (["import", "--from", "vllm-jsonl", src] if command == "import"
            else ["synth", "--tokens", "3"])
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    code, _, err = _run([*head, a, "-o", b], capsys)
    assert code == 2 and len(err) == 1 and "output given twice" in err[0], err
    assert err[0].startswith(f"moesim {command}: error:")
    assert not a.exists() and not b.exists()
    code, _, err = _run(head, capsys)
    assert code == 2 and len(err) == 1 and "no output file given" in err[0], err


@pytest.mark.parametrize("argv, prog", [
    (["import", "--from", "vllm-jsonl", "in.jsonl", "out.parquet", "--bogus"], "moesim import"),
    (["info", "t.parquet", "--bogus", "x"], "moesim info"),
    (["plot", "mrc", "t.parquet", "--bogus"], "moesim plot mrc"),
])
def test_an_unknown_argument_names_the_subcommand(capsys, argv, prog):
    code, _, err = _run(argv, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"{prog}: error: unrecognized arguments: --bogus"), err
    assert err[0].endswith(f"(see '{prog} --help')"), err


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_works_on_either_side_of_the_subcommand(tmp_path, capsys, where):
    missing = tmp_path / "nope.parquet"
    argv = ["--debug", "info", missing] if where == "before" else ["info", missing, "--debug"]
    with pytest.raises(Exception, match="no such file"):  # --debug: the exception itself, not one line
        main([str(a) for a in argv])
    code, _, err = _run(["info", missing], capsys)  # and without it: one line
    assert code == 1 and len(err) == 1 and "no such file" in err[0]


def test_every_subcommand_has_a_description():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    bare = sorted(name for name, p in sub.choices.items() if not p.description)
    assert bare == []


@pytest.mark.parametrize("command", ["info", "simulate", "mrc"])
def test_a_killed_recording_points_at_recover(tmp_path, capsys, command):
    out = tmp_path / "rec.parquet"
    parts = tmp_path / "rec.parquet.parts"
    parts.mkdir()
    write_trace(parts / "part-000000.parquet", [[0, 1]], num_experts=4)
    tail = {"info": [], "simulate": ["--policy", "lru", "--cache-size", "2"], "mrc": ["--policy", "lru"]}[command]
    code, _, err = _run([command, out, *tail], capsys)
    assert code == 1 and len(err) == 1, err
    assert "no such file" in err[0] and f"moesim record --recover {out}" in err[0], err
    # without the parts directory: the plain message
    code, _, err = _run([command, tmp_path / "other.parquet", *tail], capsys)
    assert code == 1 and "record --recover" not in err[0], err
