"""No function in moesim/ is longer than 120 lines (issue 22: a reader can hold one function in mind)."""

from __future__ import annotations

import ast
from pathlib import Path

MAX_LINES = 120
PACKAGE = Path(__file__).resolve().parents[1] / "moesim"


def long_functions(root: Path, limit: int = MAX_LINES) -> list[str]:
    """``path:line name (n lines)`` of every function or method in ``root`` longer than ``limit`` lines
    (decorators excluded, the docstring included)."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_in_moesim_is_over_120_lines():
    assert long_functions(PACKAGE) == []


def test_the_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "m.py").write_text(f"def short():\n    pass\n\n\nclass C:\n    def long(self):\n{body}\n")
    assert long_functions(tmp_path) == [f"{tmp_path.name}/m.py:6 long ({MAX_LINES + 1} lines)"]
