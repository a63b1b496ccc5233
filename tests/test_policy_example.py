"""Runs the 'Write your own policy' example from docs/policies.md verbatim."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "policies.md"


def test_docs_example_runs_and_ranks_sensibly(real_trace_path, capsys):
    text = DOC.read_text()
    block = re.search(r"## Write your own policy.*?```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) < 30
    exec(compile(block, str(DOC), "exec"), {"TRACE": str(real_trace_path), "__name__": "example"})
    lines = dict(line.split() for line in capsys.readouterr().out.strip().splitlines())
    assert set(lines) == {"lru", "lfu", "window-lfu"}
    rates = {k: float(v) for k, v in lines.items()}
    assert 0.4 < rates["window-lfu"] < 0.9 and rates["lfu"] > rates["lru"]
    from moesim.policies import policy_names

    assert "window-lfu" in policy_names()


def test_docs_compiled_example_runs(real_trace_path, capsys):
    text = DOC.read_text()
    block = re.search(r"## A policy at compiled speed.*?```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) < 30
    exec(compile(block, str(DOC), "exec"), {"TRACE": str(real_trace_path), "__name__": "example"})
    rows = [line.split() for line in capsys.readouterr().out.strip().splitlines()]
    assert [(r[0], r[2]) for r in rows] == [("lru", "numba"), ("gate-weighted", "numba"), ("aged-gate", "numba")]
    rates = {r[0]: float(r[1]) for r in rows}
    assert 0.4 < rates["aged-gate"] < 0.95 and rates["aged-gate"] != rates["gate-weighted"]
