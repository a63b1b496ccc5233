"""Threads for compiled passes over many rows (trace validation, request streams, per-layer replays).

The numba kernels release the GIL, so plain threads run them on several cores without copying any
array; the row or cache ranges they take are disjoint."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from moesim.errors import UsageError

T = TypeVar("T")
R = TypeVar("R")
# below this many rows per thread a thread costs more than it saves
MIN_ROWS = 1 << 15


def threads() -> int:
    """``$MOESIM_THREADS`` if set, else the cores this process may run on."""
    env = os.environ.get("MOESIM_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise UsageError(f"MOESIM_THREADS must be a positive integer, got {env!r}")
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def row_ranges(n: int) -> np.ndarray:
    """Bounds of at most :func:`threads` contiguous, non-empty ranges of ``n`` rows, each of at least
    :data:`MIN_ROWS` rows (one range for small inputs)."""
    parts = max(1, min(threads(), n // MIN_ROWS))
    return np.linspace(0, n, parts + 1).astype(np.int64)


def map_threads(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(x) for x in items]``, in threads when there is more than one item."""
    items = list(items)
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))
