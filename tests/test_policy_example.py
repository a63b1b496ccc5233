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
