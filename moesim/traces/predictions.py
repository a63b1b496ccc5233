"""A trace's recorded speculative predictions (``pred{d}_experts``): which distances a file holds,
read from its schema alone, and the one message for a trace that lacks the distance a prefetcher needs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from moesim.traces.format import _PRED_RE, _open_parquet, _part_files, missing_trace

EXAMPLE_TRACE = "traces/learned-mixtral-32l.parquet"


def missing_predictions(path: object, have: Sequence[int], distance: int, prefetcher: str = "speculative") -> str:
    has = "none" if not have else "d = " + ",".join(str(d) for d in sorted(have))
    return (f"{path}: prefetcher {prefetcher!r} needs speculative predictions recorded at distance {distance} "
            f"(column pred{distance}_experts; this trace has {has}); record the trace with predictions at that "
            "distance" + ("" if have else f", or try {EXAMPLE_TRACE} (d = 1..3)"))


def pred_distances_of(path: str | os.PathLike) -> tuple[int, ...]:
    """Prediction distances stored in a trace file (or part directory), from its schema alone."""
    p = Path(path)
    if not p.exists():
        raise missing_trace(p)
    f = _part_files(p)[0] if p.is_dir() else p
    names = _open_parquet(f).schema_arrow.names
    return tuple(sorted(int(m.group(1)) for n in names if (m := _PRED_RE.match(n)) and m.group(2) == "experts"))
