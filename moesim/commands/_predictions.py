"""One check shared by every command that takes a prefetcher: the ``speculative`` prefetcher reads the
predictions a recording stored (``pred{d}_experts``); a trace without them gets one line saying what is
missing and how to record it (a usage error, exit 2), before any work starts."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from moesim.errors import UsageError

EXAMPLE_TRACE = "traces/learned-mixtral-32l.parquet"


def missing_predictions(path: object, have: Sequence[int], distance: int, prefetcher: str = "speculative") -> str:
    has = "none" if not have else "d = " + ",".join(str(d) for d in sorted(have))
    return (f"{path}: prefetcher {prefetcher!r} needs speculative predictions recorded at distance {distance} "
            f"(column pred{distance}_experts; this trace has {has}); record them with `moesim record --model MODEL "
            f"--predict-distance {distance} -o OUT.parquet`" + ("" if have else f", or try {EXAMPLE_TRACE} (d = 1..3)"))


def needs_predictions(prefetcher: str) -> bool:
    from moesim.policies.prefetch import _PREFETCHERS

    cls = _PREFETCHERS.get(prefetcher)
    return bool(cls is not None and cls.needs_predictions)


def pred_distances_of(path: str | os.PathLike) -> tuple[int, ...]:
    """Prediction distances stored in a trace file (or part directory), from its schema alone."""
    from moesim.traces.format import _PRED_RE, _open_parquet, _part_files, missing_trace

    p = Path(path)
    if not p.exists():
        raise missing_trace(p)
    f = _part_files(p)[0] if p.is_dir() else p
    names = _open_parquet(f).schema_arrow.names
    return tuple(sorted(int(m.group(1)) for n in names if (m := _PRED_RE.match(n)) and m.group(2) == "experts"))


def require_predictions(path: object, have: Sequence[int], prefetchers: Iterable[str], distance: int = 1) -> None:
    for name in prefetchers:
        if needs_predictions(name) and distance not in have:
            raise UsageError(missing_predictions(path, have, distance, name))
