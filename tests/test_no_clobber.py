"""No command replaces an existing output file unless told to: without ``--force`` it exits 2 with one
line naming the file and leaves the file's bytes alone; with ``--force`` it overwrites."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moesim.cli import main
from moesim.errors import UsageError
from moesim.safe_write import refuse_overwrite

REPO = Path(__file__).resolve().parents[1]
SENTINEL = b"not the command's output\n"


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trace") / "t.parquet"
    assert main(["synth", "--tokens", "12", "--seed", "3", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def vllm_log(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("log") / "log.jsonl"
    rows = [{"problem_id": 0, "token_idx": t, "layer": layer, "experts": [t % 8, (t + layer + 1) % 8],
             "gating_probs": [0.6, 0.4]} for t in range(3) for layer in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sweep_table(trace, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sweep") / "r.parquet"
    assert main(["sweep", "--trace", str(trace), "--policy", "lru", "--cache-size", "2,3", "-o", str(path),
                 "--executor", "inprocess", "--no-progress"]) == 0
    return path


# (name, argv with OUT standing for the output under test, the file that must be protected); OUT is a
# file name in a fresh temporary folder.
CASES = {
    "synth": lambda t, log, sw: (["synth", "--tokens", "5", "--seed", "1", "OUT"], "OUT"),
    "fit-synth": lambda t, log, sw: (["fit-synth", t, "-o", "OUT"], "OUT"),
    "import": lambda t, log, sw: (["import", "--from", "vllm-jsonl", log, "OUT", "--num-layers", "2",
                                   "--num-experts", "8"], "OUT"),
    "export": lambda t, log, sw: (["export", t, "--format", "csv", "-o", "OUT"], "OUT"),
    "simulate --timeline": lambda t, log, sw: (["simulate", t, "--policy", "lru", "--cache-size", "2",
                                                "--hardware", "h200", "--timeline", "OUT"], "OUT"),
    "plot": lambda t, log, sw: (["plot", "heatmap", t, "-o", "OUT"], "OUT"),
    "report": lambda t, log, sw: (["report", t, "-o", "OUT", "--policies", "lru", "--sizes", "2",
                                   "--no-timing"], "OUT/report.html"),
    "sweep-plot": lambda t, log, sw: (["sweep-plot", sw, "-o", "OUT.png"], "OUT.png"),
    "calibrate --from-raw": lambda t, log, sw: (["calibrate", "--from-raw", str(REPO / "studies" / "calibration" / "raw" / "calibration_h200.json"),
                                                 "-o", "OUT"], "OUT"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_refuses_existing_output_then_force_overwrites(name, trace, vllm_log, sweep_table, tmp_path, capsys):
    argv, protected = CASES[name](str(trace), str(vllm_log), str(sweep_table))
    out = tmp_path / "OUT"
    argv = [a.replace("OUT", str(out)) for a in argv]
    target = Path(protected.replace("OUT", str(out)))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(SENTINEL)
    capsys.readouterr()

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(target) in err[0] and "--force" in err[0], err
    assert target.read_bytes() == SENTINEL

    assert main([*argv, "--force"]) == 0
    assert target.read_bytes() != SENTINEL
    assert not list(target.parent.glob(".*.partial"))


def test_validate_refuses_each_file_of_its_report(trace, tmp_path, capsys):
    """validate writes PREFIX.json/.md/.png; any one of them existing stops it before any work (the
    engine file does not even exist here)."""
    for suffix in (".json", ".md", ".png"):
        prefix = tmp_path / suffix.lstrip(".") / "rep"
        prefix.parent.mkdir()
        existing = prefix.with_suffix(suffix)
        existing.write_bytes(SENTINEL)
        capsys.readouterr()
        assert main(["validate", str(trace), "--engine", str(tmp_path / "none.json"), "-o", str(prefix)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(existing) in err[0]
        assert existing.read_bytes() == SENTINEL
        # with --force it goes on to the engine file (missing: bad data, exit 1), not stopped at the report
        assert main(["validate", str(trace), "--engine", str(tmp_path / "none.json"), "-o", str(prefix),
                     "--force"]) == 1
        assert "none.json" in capsys.readouterr().err


def test_record_refuses_existing_output_before_loading_a_model(tmp_path, capsys):
    out = tmp_path / "rec.parquet"
    out.write_bytes(SENTINEL)
    assert main(["record", "--model", "tiny-mixtral", "-o", str(out)]) == 2
    assert str(out) in capsys.readouterr().err
    assert out.read_bytes() == SENTINEL


def test_demo_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "notes.txt").write_bytes(SENTINEL)
    assert main(["demo", "-o", str(tmp_path), "--tokens", "20"]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_refuse_overwrite_helper(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    refuse_overwrite([a, None, b], force=False)        # nothing exists: fine
    b.write_text("x")
    with pytest.raises(UsageError, match=str(b)):
        refuse_overwrite([a, None, b], force=False)
    refuse_overwrite([a, b], force=True)
    (tmp_path / "link").symlink_to(tmp_path / "gone")  # a dangling link is still something to replace
    with pytest.raises(UsageError, match="link"):
        refuse_overwrite([tmp_path / "link"], force=False)


@pytest.mark.parametrize("existing", ["run.parquet", "run.parquet.times.json"])
def test_generate_record_refuses_existing_files_before_loading_a_model(tmp_path, capsys, existing):
    pytest.importorskip("torch")
    out = tmp_path / "run.parquet"
    (tmp_path / existing).write_bytes(SENTINEL)
    argv = ["generate", "--model", str(tmp_path / "no-such-checkpoint"), "--prompt-ids", "1,2,3", "--max-new-tokens",
            "2", "--cache-size", "2", "--policy", "lru", "--record", str(out)]
    assert main(argv) == 2   # the checkpoint is never looked at: the existing file stops it first
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / existing) in err[0]
    assert (tmp_path / existing).read_bytes() == SENTINEL
    assert main([*argv, "--force"]) == 1   # with --force it goes on, to the missing checkpoint
    assert "no-such-checkpoint" in capsys.readouterr().err
