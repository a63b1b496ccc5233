"""The sweep loop: expand the grid, skip finished cells, run the rest on an executor, journal each
row as it lands, consolidate the table now and then and at the end."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moesim.sweep.executors import Executor, InProcessExecutor
from moesim.sweep.result_store import ResultStore
from moesim.sweep.spec import SweepSpec, expand, trace_sha256


@dataclass
class SweepReport:
    output: str
    cells: int  # in the grid
    skipped: int  # already finished before this run
    ran: int  # executed by this run
    failed: int  # of those, rows with status "error"
    rows: int  # rows in the consolidated table
    elapsed_s: float
    executor: str
    workers: int

    @property
    def cells_per_s(self) -> float:
        return self.ran / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {**self.__dict__, "cells_per_s": round(self.cells_per_s, 3)}


def run_sweep(spec: SweepSpec, out: str | os.PathLike, executor: Executor | Callable[[], Executor] | None = None, *,
              progress: bool | None = None, consolidate_every_s: float = 30.0,
              max_cells: int | None = None) -> SweepReport:
    """Run every unfinished cell of ``spec`` and write ``out``. Safe to interrupt and re-run.

    ``executor``: an executor, or a zero-argument factory called once the grid is validated (so a bad
    spec never starts a pool or a Ray instance). ``max_cells`` stops after that many cells (a sweep in slices). ``progress``: a tqdm bar on
    stderr (default: when stderr is a terminal).
    """
    from tqdm import tqdm

    store = ResultStore(out)
    hashes = {t: trace_sha256(t) for t in dict.fromkeys(spec.traces)}  # each trace's bytes hashed once
    cells = expand(spec, hashes)  # all validation before any worker (or Ray) starts
    if executor is None:
        executor = InProcessExecutor()
    elif not hasattr(executor, "run"):
        executor = executor()
    store.lock()
    t0 = time.perf_counter()
    ran = failed = 0
    try:
        done = store.finished_keys()
        pending = [c for c in cells if c.key not in done]
        skipped = len(cells) - len(pending)
        if max_cells is not None:
            pending = pending[:max_cells]
        paths = {sha: str(Path(t)) for t, sha in hashes.items()}
        show = sys.stderr.isatty() if progress is None else progress
        last = time.monotonic()
        with tqdm(total=skipped + len(pending), initial=skipped, desc="sweep", unit="cell",
                  disable=not show, file=sys.stderr, dynamic_ncols=True) as bar:
            if pending:
                for row in executor.run(pending, paths):
                    store.append(row)
                    ran += 1
                    failed += row.get("status") != "ok"
                    bar.update(1)
                    if failed:
                        bar.set_postfix(failed=failed, refresh=False)
                    if time.monotonic() - last > consolidate_every_s:
                        store.consolidate()
                        last = time.monotonic()
        rows = store.consolidate(delete_journal=True)
    except BaseException:
        try:  # the table shows what finished; the journal stays for the next run
            store.consolidate()
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
        raise
    finally:
        store.close_journal()
        executor.close()
        store.cleanup()
    return SweepReport(str(out), len(cells), skipped, ran, failed, rows, time.perf_counter() - t0, executor.name, executor.workers)
