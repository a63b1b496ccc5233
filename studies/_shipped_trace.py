"""What the CPU studies on the shipped synthetic trace share (studies/budgets, studies/bound): the trace,
and writing a driver's raw JSON with the trace's description beside its cells."""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from studies._common import ROOT, write_json

SHIPPED_TRACE = ROOT / "traces" / "synth-mixtral-8x7b.parquet"


def write_raw(path: Path, trace, cells: list[dict[str, Any]], **extra: Any) -> None:
    """``{"trace", geometry, "rows", "python", **extra, "cells"}`` to ``path`` (parents made), and a line."""
    meta = trace.meta
    out = {"trace": str(SHIPPED_TRACE.relative_to(ROOT)), "num_layers": meta.num_layers,
           "num_experts": meta.num_experts, "top_k": meta.top_k, "rows": len(trace),
           "python": platform.python_version(), **extra, "cells": cells}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, out)
    print(f"wrote {path} ({len(cells)} cells)")
