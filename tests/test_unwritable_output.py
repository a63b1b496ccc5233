"""Writing into a directory that cannot be written (read-only, no permission) is one line naming the
path the user typed -- never the hidden ``.NAME.xxxx.partial`` temp file beside it -- exit 1, and
nothing left behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from moesim.cli import main
from tests.helpers import write_trace


def _unwritable_dir(tmp_path: Path) -> Path:
    """A real directory whose files cannot be created: mode 555 for a normal user; root ignores modes,
    so as root the kernel's read-only /sys (creating a file there fails for root too)."""
    if os.geteuid() != 0:
        d = tmp_path / "readonly"
        d.mkdir()
        d.chmod(0o555)
        return d
    d = Path("/sys")
    try:
        fd, probe = tempfile.mkstemp(dir=d)
    except OSError:
        return d
    os.close(fd)
    os.unlink(probe)
    pytest.skip("no unwritable directory on this machine (root, and /sys is writable)")


@pytest.fixture()
def trace(tmp_path) -> Path:
    path = tmp_path / "t.parquet"
    write_trace(path, [[0, 1], [2, 3], [1, 2], [0, 3]] * 3, num_layers=2, num_experts=4)
    return path


@pytest.fixture()
def log(tmp_path) -> Path:
    path = tmp_path / "log.jsonl"
    rows = [{"problem_id": 0, "token_idx": t, "layer": 0, "experts": [t % 4, (t + 1) % 4],
             "gating_probs": [0.6, 0.4]} for t in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


COMMANDS = {
    "synth": lambda out, trace, log: ["synth", "--preset", "mixtral-8x7b", "--tokens", "2", "--seed", "1", out],
    "import": lambda out, trace, log: ["import", "--from", "vllm-jsonl", log, out],
    "export": lambda out, trace, log: ["export", "--format", "csv", trace, "-o", out],
    "timeline": lambda out, trace, log: ["simulate", trace, "--policy", "lru", "--cache-size", "2",
                                         "--hardware", "a6000", "--timeline", out],
    "plot": lambda out, trace, log: ["plot", "heatmap", trace, "-o", out],
}
SUFFIX = {"export": ".csv", "timeline": ".json", "plot": ".png"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_unwritable_directory_names_the_users_path(command, tmp_path, trace, log, capsys):
    target = _unwritable_dir(tmp_path) / f"out{SUFFIX.get(command, '.parquet')}"
    before = sorted(os.listdir(target.parent))
    argv = [str(a) for a in COMMANDS[command](target, trace, log)]
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    last = err[-1] if err else ""
    assert code == 1, (argv, err)
    assert last.startswith(f"moesim {argv[0]}: error: {target}: cannot write it"), err
    assert ".partial" not in "\n".join(err) and "Traceback" not in "\n".join(err)
    assert sorted(os.listdir(target.parent)) == before
