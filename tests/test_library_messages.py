"""Library messages speak in domain words; only the command line names its flags (issue 22).

Every string in ``moesim/`` outside the command line (``moesim/commands/``, ``moesim/cli.py``) is scanned,
docstrings aside: an error, a note or a provenance line that names a flag (``--scope``) or a command
(```moesim record```) would be wrong as soon as the library is called from Python, and the command line
already adds the flag (``SETTING_HINTS``, ``error_line``, ``note_line``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moesim"
COMMAND_LINE = (PACKAGE / "commands", PACKAGE / "cli.py")

# a flag (--scope) not inside a word or a longer dash run, a backticked command, or "moesim CMD --"
NAMES_A_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*|`moesim [a-z]|\bmoesim [a-z]+ --")

# (file, what it names, why it is not moesim's command line)
ALLOWED = {
    ("moesim/traces/sglang.py", "--enable-return-routed-experts"): "the SGLang server's own flag",
    ("moesim/traces/vllm_routed.py", "--enable-return-routed-experts"): "the vLLM server's own flag",
    ("moesim/engine/validation.py", "--porcelain"): "an argument of git, not a message",
    ("moesim/engine/cuda.py", "--cpu-check"): "the GPU study scripts' own flag; no moesim command calls it",
    ("moesim/engine/cuda.py", "--device"): "the GPU study scripts' own flag; no moesim command calls it",
    ("moesim/engine/cuda.py", "--tiny"): "the GPU study scripts' own flag; no moesim command calls it",
}


def flag_mentions(source: str) -> list[tuple[int, str]]:
    """(line, what) for every string constant of ``source`` that names a flag or a command, docstrings
    (and other bare string statements) excepted; f-strings are scanned piece by piece."""
    tree = ast.parse(source)
    bare = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    return sorted((n.lineno, m.group(0)) for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in bare
                  for m in NAMES_A_FLAG.finditer(n.value))


def library_mentions() -> list[tuple[str, int, str]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if any(path == c or c in path.parents for c in COMMAND_LINE):
            continue
        rel = path.relative_to(ROOT).as_posix()
        out += [(rel, line, what) for line, what in flag_mentions(path.read_text())]
    return out


def test_no_library_message_names_a_flag():
    found = [m for m in library_mentions() if (m[0], m[2]) not in ALLOWED]
    assert not found, ("library strings that name a command-line flag or command; say it in domain words "
                       "(SettingError / DataError with a setting, SettingNote) and map the setting to its flag in "
                       f"SETTING_HINTS: {found}")


def test_every_allowed_mention_is_still_there():
    """An allow-list entry whose string went away goes too, so the list never hides a new message."""
    present = {(m[0], m[2]) for m in library_mentions()}
    assert set(ALLOWED) <= present, sorted(set(ALLOWED) - present)


def test_the_scan_finds_flags_in_messages_and_skips_docstrings():
    source = '''
"""Module docstring: ``moesim record --recover`` is fine here."""
def f(path, k):
    """So is --scope layer in a docstring."""
    if k:
        raise DataError(path, f"no rows for {k} (pass --model NAME)")
    print("merge them with `moesim record", file=sys.stderr)
    note = "see moesim simulate --json"
    return "a -- b", "x--y", "---", "moesim report: title"
'''
    assert [what for _, what in flag_mentions(source)] == ["--model", "`moesim r", "moesim simulate --"]


@pytest.mark.parametrize("setting,fix,tail", [
    ("recover", "out.parquet", "(moesim record --recover out.parquet)"),
    ("recorded_predictions", "2", "(moesim record --model MODEL -o OUT.parquet --predict-distance 2)"),
    ("num_experts", "N", "(--num-experts N)"),
    ("layers_and_model", None, "(check --num-layers / --model)"),
])
def test_the_command_line_adds_the_flag_to_errors_and_notes(setting, fix, tail):
    from moesim.commands._common import SETTING_HINTS, error_line, note_line
    from moesim.errors import DataError, SettingError, SettingNote

    assert setting in SETTING_HINTS
    assert error_line(SettingError(setting, "the problem", fix)) == f"the problem {tail}"
    assert error_line(DataError("t.parquet", "the problem", setting, fix)) == f"t.parquet: the problem {tail}"
    assert note_line(SettingNote("a remark", setting, fix)) == f"a remark {tail}"
    assert note_line("a plain remark") == "a plain remark"
