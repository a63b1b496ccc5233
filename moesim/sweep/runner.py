"""Running ONE cell, inside whatever process an executor chose. Traces are loaded once per process
(a module-level cache keyed by content hash), never once per cell."""

from __future__ import annotations

import json
import math
import os
import socket
import time
from typing import Any

from moesim.sweep.spec import INPUT_COLUMNS, NO_EXECUTION, NO_HARDWARE, NO_PREFETCH, Cell

_TRACE_PATHS: dict[str, str] = {}  # content hash -> path, set by the executor's worker initializer
_TRACES: dict[str, Any] = {}  # content hash -> loaded Trace (this process)
MAX_CACHED_TRACES = 4  # bounds a worker's memory on sweeps over many large traces
LOADS = {"count": 0}  # how many traces this process has read (tests check "once per worker")


def init_worker(trace_paths: dict[str, str]) -> None:
    """Process-pool initializer: remember where the traces are; each is read on first use."""
    _TRACE_PATHS.update(trace_paths)


def get_trace(sha: str, path: str | None = None):
    trace = _TRACES.get(sha)
    if trace is None:
        from moesim.traces.format import read_trace

        trace = read_trace(path or _TRACE_PATHS[sha]).execution_order()
        while len(_TRACES) >= MAX_CACHED_TRACES:  # cells come trace by trace: drop the oldest
            _TRACES.pop(next(iter(_TRACES)))
        _TRACES[sha] = trace
        LOADS["count"] += 1
    return trace


def compute(cell: Cell, trace) -> dict[str, Any]:
    """This cell's result with the keys of ``simulate --json`` (:meth:`CellResult.to_json`): the exact
    replay's ``hit_rate`` etc., and with hardware the timing model's outputs beside it."""
    from moesim.simulator.cell import CellSpec, run_cell
    from moesim.simulator.cost_model import CostModel

    timed = cell.hardware != NO_HARDWARE
    spec = CellSpec(cell.policy, cell.cache_size, params=cell.policy_params or None, scope=cell.scope,
                    semantics=cell.semantics, cost=CostModel.preset(cell.hardware) if timed else None,
                    prefetch=cell.prefetch,
                    prefetch_params=None if cell.prefetch == NO_PREFETCH else {"budget": cell.prefetch_budget},
                    batch_size=cell.batch_size, execution=None if cell.execution == NO_EXECUTION else cell.execution,
                    vs_bound=cell.vs_bound)
    return run_cell(trace, spec).to_json()


def _scalar(v: Any) -> Any:
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if hasattr(v, "item"):  # numpy scalar
        return _scalar(v.item())
    return json.dumps(v, sort_keys=True, default=str)  # lists / dicts: one JSON string column


def flatten(result: dict[str, Any]) -> dict[str, Any]:
    """Output columns: the simulator's keys that do not echo an input (inputs are authoritative)."""
    return {k: _scalar(v) for k, v in result.items() if k not in INPUT_COLUMNS and k != "per_layer"}


def run_cell(cell: Cell, trace=None, raise_errors: bool = False) -> dict[str, Any]:
    """One result row: every input column, every output column, timing, and status. A failing cell
    becomes a row with ``status == "error"`` (a resumed sweep retries it) instead of killing the sweep,
    unless ``raise_errors`` (in-process debugging)."""
    t0 = time.perf_counter()
    row = cell.to_row()
    try:
        if trace is None:
            trace = get_trace(cell.trace_sha256, cell.trace)
        row.update(flatten(compute(cell, trace)))
        row["status"], row["error"] = "ok", None
    except Exception as exc:  # noqa: BLE001 - recorded in the table, the sweep goes on
        if raise_errors:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        row["status"], row["error"] = "error", f"{type(exc).__name__}: {first}"
    row["elapsed_s"] = time.perf_counter() - t0
    row["worker"] = f"{socket.gethostname()}:{os.getpid()}"
    return row
