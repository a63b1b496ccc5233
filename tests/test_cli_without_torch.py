"""The CLI (demo, replay, timing) must work where the optional torch extra is not installed."""

from __future__ import annotations

import subprocess
import sys

BLOCK = "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=300)


def test_cli_starts_and_replays_without_torch(real_trace_path):
    p = _run(f"from moesim.cli import main; sys.exit(main(['simulate', r'{real_trace_path}', '--policy', 'lru', "
             "'--cache-size', '4', '--hardware', 'a6000', '--json']))")
    assert p.returncode == 0, p.stderr
    assert '"tokens_per_s"' in p.stdout and "Traceback" not in p.stderr


def test_record_without_torch_is_one_clear_line(tmp_path):
    p = _run(f"from moesim.cli import main; sys.exit(main(['record', '--model', 'tiny-mixtral', '-o', r'{tmp_path}/o.parquet']))")
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs torch" in lines[0]
    assert not (tmp_path / "o.parquet").exists()


def test_commands_do_not_import_torch_at_start_up():
    """Building the parser (every command does) must not import torch: it cost seconds per command."""
    p = subprocess.run([sys.executable, "-c", "import sys; from moesim.cli import build_parser; build_parser(); "
                        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


def test_record_help_names_every_preset():
    import pytest

    pytest.importorskip("torch")
    from moesim.commands.record import PRESET_NAMES
    from moesim.recorder.presets import PRESETS

    assert PRESET_NAMES == tuple(PRESETS)
