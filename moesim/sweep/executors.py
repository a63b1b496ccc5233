"""Where cells run, behind one small interface: ``run(cells, trace_paths)`` yields one result row per
cell as cells finish (any order). At most ``max_in_flight`` cells are submitted at a time, so an
interrupted sweep loses only those."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from moesim.errors import Interrupted, MoesimError, UsageError
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
        self._stop: GracefulStop | None = None
        self._in_flight: set[Future] = set()

    def _context(self):
        if "forkserver" not in multiprocessing.get_all_start_methods():
            return multiprocessing.get_context("spawn")
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["moesim.sweep.runner", "moesim.simulator.replay"])
        return ctx

    def run(self, cells: Sequence[Cell], trace_paths: dict[str, str]) -> Iterator[Row]:
        self._pool = ProcessPoolExecutor(self.workers, mp_context=self._context(), initializer=_pool_worker_init,
                                         initargs=(trace_paths, os.getpid()))
        self._stop = stop = GracefulStop().install()
        todo = iter(cells)
        submitted = 0
        left = False  # cells a stop kept from running
        in_flight = self._in_flight
        try:
            while True:
                while (not stop.requested and len(in_flight) < self.max_in_flight
                       and (cell := next(todo, None)) is not None):
                    in_flight.add(self._pool.submit(runner.run_cell, cell))
                    submitted += 1
                if stop.requested and not stop.announced:
                    cancelled = {fut for fut in in_flight if fut.cancel()}  # queued ones never start
                    in_flight -= cancelled
                    left = bool(cancelled) or submitted < len(cells)
                    stop.announce(len(in_flight), left)
                if not in_flight:
                    if stop.requested and left:  # a stop with cells left: exit 128 + signal
                        raise Interrupted(stop.signum)
                    return
                # a timeout, so that a first Ctrl-C is announced within a fraction of a second
                done, _ = wait(in_flight, timeout=0.25, return_when=FIRST_COMPLETED)
                in_flight -= done
                for fut in done:
                    yield fut.result()
        except BrokenProcessPool:
            raise MoesimError("a worker process died (killed, or out of memory?); finished cells are kept "
                              "-- run the same command again to resume") from None
        finally:
            self.close()

    def close(self) -> None:
        """Stop the pool. Cells still running here were abandoned (a second Ctrl-C, an error): their
        workers are killed rather than waited for."""
        if self._stop is not None:
            self._stop.restore()
            self._stop = None
        if self._pool is not None:
            if any(not fut.done() for fut in self._in_flight):
                for fut in self._in_flight:
                    fut.cancel()
                self._kill_workers()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._in_flight.clear()

    def _kill_workers(self) -> None:
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        for proc in processes:
            proc.kill()
        for proc in processes:
            proc.join(5)


class GracefulStop:
    """Once installed (main thread only): a first SIGINT or SIGTERM asks the sweep to stop starting cells
    and finish the running ones; a second one raises KeyboardInterrupt at once (abandon them).
    ``restore`` puts the previous handlers back."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.announced = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum

    def announce(self, running: int, left: bool = True) -> None:
        """``running``: cells that will still finish; ``left``: whether any cell was never started."""
        from tqdm import tqdm

        self.announced = True
        if running:
            text = (f"stopping: finishing {running} running cell{'s' if running != 1 else ''} "
                    "(Ctrl-C again to abandon them)")
        elif left:
            text = "stopping: no cell was running"
        else:
            return  # every cell had finished: the sweep ends as if never stopped
        # tqdm.write: the sweep's progress bar (on a terminal) moves down a line instead of being overwritten
        tqdm.write(text, file=sys.stderr)
        sys.stderr.flush()


def _pool_worker_init(trace_paths: dict[str, str], sweep_pid: int) -> None:
    # Ctrl-C reaches the whole process group; let the parent alone handle it (it stops starting cells
    # and keeps every finished row), instead of each worker dying mid-cell with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(sweep_pid,), daemon=True, name="moesim-orphan-watch").start()
    runner.init_worker(trace_paths)


def _exit_with(sweep_pid: int) -> None:
    """A worker whose sweep is gone (killed with SIGKILL, say) exits instead of computing for nobody."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(sweep_pid, 0)
        except (ProcessLookupError, PermissionError):  # gone (or its pid is another user's now)
            os._exit(1)


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
