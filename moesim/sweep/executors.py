"""Where cells run, behind one small interface: ``run(cells, trace_paths)`` yields one result row per
cell as cells finish (any order). At most ``max_in_flight`` cells are submitted at a time, so an
interrupted sweep loses only those."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from moesim.errors import MoesimError, UsageError
from moesim.sweep import runner
from moesim.sweep.spec import Cell

EXECUTORS = ("process", "inprocess", "ray")
Row = dict[str, Any]


class Executor(Protocol):
    name: str
    workers: int

    def run(self, cells: Sequence[Cell], trace_paths: dict[str, str]) -> Iterator[Row]: ...

    def close(self) -> None: ...


class InProcessExecutor:
    """Cells one after another in this process (debugging: breakpoints and tracebacks work)."""

    name = "inprocess"
    workers = 1

    def __init__(self, raise_errors: bool = False) -> None:
        self.raise_errors = raise_errors  # a failing cell stops the sweep with its traceback

    def run(self, cells: Sequence[Cell], trace_paths: dict[str, str]) -> Iterator[Row]:
        runner.init_worker(trace_paths)
        for cell in cells:
            yield runner.run_cell(cell, raise_errors=self.raise_errors)

    def close(self) -> None:
        pass


class ProcessPoolExecutorBackend:
    """A local pool of worker processes; each reads a trace once, on first use (initializer cache).

    Workers come from a forkserver that has the simulator imported already: cheap to start, and no
    fork of a parent that holds threads (tqdm's monitor, Arrow's pools)."""

    name = "process"

    def __init__(self, workers: int | None = None, max_in_flight: int | None = None) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.max_in_flight = max_in_flight or 2 * self.workers
        self._pool: ProcessPoolExecutor | None = None

    def _context(self):
        if "forkserver" not in multiprocessing.get_all_start_methods():
            return multiprocessing.get_context("spawn")
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["moesim.sweep.runner", "moesim.simulator.replay"])
        return ctx

    def run(self, cells: Sequence[Cell], trace_paths: dict[str, str]) -> Iterator[Row]:
        self._pool = ProcessPoolExecutor(self.workers, mp_context=self._context(),
                                         initializer=_pool_worker_init, initargs=(trace_paths,))
        todo = iter(cells)
        in_flight: set = set()
        try:
            while True:
                while len(in_flight) < self.max_in_flight and (cell := next(todo, None)) is not None:
                    in_flight.add(self._pool.submit(runner.run_cell, cell))
                if not in_flight:
                    return
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
        except BrokenProcessPool:
            raise MoesimError("a worker process died (killed, or out of memory?); finished cells are kept "
                              "-- run the same command again to resume") from None
        finally:
            for fut in in_flight:
                fut.cancel()
            self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _pool_worker_init(trace_paths: dict[str, str]) -> None:
    # Ctrl-C reaches the whole process group; let the parent alone handle it (it stops the pool and
    # keeps every finished row), instead of each worker dying mid-cell with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    runner.init_worker(trace_paths)


def _ray_run_cell(cell: Cell, trace) -> Row:
    # ``trace`` arrives resolved from the object store (put once per trace, shared by all tasks).
    return runner.run_cell(cell, trace)


class RayExecutor:
    """Cells as Ray tasks, locally (``address=None``: starts a private Ray with ``workers`` CPUs) or
    on a cluster (``address="auto"`` or ``ray://head:10001``; moesim must be installed on every node).
    Each trace is read once by the driver and ``ray.put`` once; tasks get the ObjectRef."""

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None,
                 max_in_flight: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise UsageError("the Ray executor needs Ray: pip install 'moesim[ray]'") from None
        self._ray = ray
        self.address = address
        self._owns_ray = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "configure_logging": False}
            if address is None:
                kwargs["num_cpus"] = workers or os.cpu_count() or 1
            ray.init(address=address, **kwargs)
            self._owns_ray = True
        self.workers = workers or int(ray.cluster_resources().get("CPU", 1))
        self.max_in_flight = max_in_flight or 4 * self.workers
        self._remote = ray.remote(num_cpus=1)(_ray_run_cell)

    def run(self, cells: Sequence[Cell], trace_paths: dict[str, str]) -> Iterator[Row]:
        ray = self._ray
        refs = {}
        for sha in {c.trace_sha256 for c in cells}:
            refs[sha] = ray.put(runner.get_trace(sha, trace_paths[sha]))
        todo = iter(cells)
        in_flight: list = []
        try:
            while True:
                while len(in_flight) < self.max_in_flight and (cell := next(todo, None)) is not None:
                    in_flight.append(self._remote.remote(cell, refs[cell.trace_sha256]))
                if not in_flight:
                    return
                done, in_flight = ray.wait(in_flight, num_returns=1)
                for ref in done:
                    yield ray.get(ref)
        finally:
            for ref in in_flight:
                ray.cancel(ref, force=True)

    def close(self) -> None:
        if self._owns_ray:
            self._ray.shutdown()
            self._owns_ray = False


def make_executor(name: str, workers: int | None = None, address: str | None = None,
                  debug: bool = False) -> Executor:
    if name == "inprocess":
        return InProcessExecutor(raise_errors=debug)
    if name == "process":
        return ProcessPoolExecutorBackend(workers)
    if name == "ray":
        return RayExecutor(workers, address)
    raise UsageError(f"unknown executor {name!r} (known: {', '.join(EXECUTORS)})")
