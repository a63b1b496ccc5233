"""What every study's report maker shares: markdown tables, percentages, byte-stable files and figures.

A report maker imports this as ``from studies._common import ...`` after putting the repository root on
``sys.path`` (every maker does, so it runs as ``python studies/<study>/make_report.py`` from anywhere).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REAL_TRACE = ROOT.parent / "shared" / "traces" / "real" / "mixtral-8x7b-instruct-fp8_humaneval-2_vllm.jsonl"


def relative(path: str | Path) -> str:
    """``path`` as the repository-relative text a report prints (so a report does not depend on where the
    checkout lives); a path outside the repository stays as given."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table's lines: header, rule, one line per row (cells already formatted as text, or
    anything ``str`` renders)."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for row in rows:
        cells = [str(c) for c in row]
        if len(cells) != len(headers):
            raise ValueError(f"a row of {len(cells)} cells in a table of {len(headers)} columns: {cells}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def pct(x: float | None, digits: int = 1, signed: bool = False, missing: str = "-") -> str:
    """``x`` (a fraction) as a percentage: ``pct(0.0312) == "3.1%"``, ``pct(0.05, signed=True) == "+5.0%"``;
    ``missing`` for None."""
    if x is None:
        return missing
    return f"{x:+.{digits}%}" if signed else f"{x:.{digits}%}"


def pct_range(values: Iterable[float], digits: int = 1, signed: bool = False) -> str:
    """The span of some fractions as text, smallest first: ``"+10.7% to +55.5%"`` (one value: just it)."""
    vals = sorted(values)
    if not vals:
        raise ValueError("pct_range of no values")
    lo, hi = pct(vals[0], digits, signed), pct(vals[-1], digits, signed)
    return lo if lo == hi else f"{lo} to {hi}"


def write_text(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file and a rename, so a failed run leaves the old file whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """The report's numbers as indented JSON (one trailing newline), written like ``write_text``."""
    write_text(path, json.dumps(obj, indent=1) + "\n")


def render_from_json(json_path: str | Path, prefix: Path, markdown, plot=None) -> dict:
    """Re-render a committed report's .md (and .png, given ``plot``) from its .json: the path a report
    maker takes when the input its full rebuild needs (the shared real trace) is not here."""
    report = json.loads(Path(json_path).read_text())
    write_text(prefix.with_suffix(".md"), markdown(report))
    if plot is not None:
        plot(report, prefix.with_suffix(".png"))
    print(f"wrote {prefix}.md{'/.png' if plot else ''} from {json_path}")
    return report


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Save a matplotlib figure with no timestamp or version in its metadata, so the same data and the
    same matplotlib give the same bytes; closes the figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)
