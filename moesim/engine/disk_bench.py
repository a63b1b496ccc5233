"""The disk half of calibration (issue 25 item 5): how long reading an expert-sized region of a file
takes, from the disk (page cache bypassed) and from the page cache, per block size and queue depth.

A region of R bytes is read as R / block requests of ``block`` bytes spread over ``queue_depth``
threads (``os.preadv`` releases the GIL, so the requests are in flight together); the same routine
(:func:`read_region`) serves the benchmark and the stand-alone reader that validates the simulated tier
(:mod:`moesim.engine.disk_reader`). Reads bypass the page cache with ``O_DIRECT`` into page-aligned
``mmap`` buffers where the file system takes it; elsewhere the file's cached pages are dropped with
``posix_fadvise(DONTNEED)`` before every read (the file is written and fsynced first, so none are dirty).

The points of a mode take turns in rounds (the disk of a shared machine drifts while it is measured); per
point the mean time of reads of a few sizes is fitted as ``latency + bytes / bandwidth`` (least
squares), the curve the timing simulator prices a disk read with (:mod:`moesim.simulator.disk_tier`).
"""

from __future__ import annotations

import mmap
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Any

import numpy as np

from moesim.errors import SettingError

ALIGN = 4096
SCRATCH_NAME = "moesim-disk-bench.bin"
MODES = ("direct", "page_cache")
POOL_BYTES = 256 << 20   # the host buffers a calibration point reads into, in turn
POOL_MAX = 256   # ... at most this many (small reads: a mapping each)
ROUNDS = 6   # the points of a mode take turns this many times


class Reader:
    """An open file and ``queue_depth`` threads with one aligned buffer each, reading regions in blocks.

    ``direct``: the page cache is bypassed (``O_DIRECT`` when the file system takes it, else the file's
    pages dropped before each read, ``method`` says which); otherwise plain buffered reads."""

    def __init__(self, path: str | os.PathLike, block: int, queue_depth: int, direct: bool) -> None:
        if block < ALIGN or block % ALIGN:
            raise SettingError("disk_block", f"block size {block} is not a positive multiple of {ALIGN} bytes")
        if queue_depth < 1:
            raise SettingError("disk_queue_depth", f"queue depth {queue_depth} is below 1")
        self.block, self.queue_depth, self.direct = block, queue_depth, direct
        self.method = "buffered"
        self.fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                self.method = "o_direct"
            except OSError:
                self.fd = -1
        if self.fd < 0:
            self.fd = os.open(path, os.O_RDONLY)
            if direct:
                self.method = "fadvise_dontneed"
        self.bufs = [mmap.mmap(-1, block) for _ in range(queue_depth)]   # page-aligned, as O_DIRECT needs
        self.pool = ThreadPoolExecutor(queue_depth) if queue_depth > 1 else None
        if self.method == "o_direct":   # some file systems accept the flag and refuse the read
            try:
                os.preadv(self.fd, [self.bufs[0]], 0)
            except OSError:
                os.close(self.fd)
                self.fd, self.method = os.open(path, os.O_RDONLY), "fadvise_dontneed"

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        os.close(self.fd)
        for b in self.bufs:
            b.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _lane(self, lane: int, offsets: Sequence[int], sizes: Sequence[int], dest: memoryview | None,
              base: int) -> int:
        got = 0
        for off, n in zip(offsets, sizes, strict=True):
            view = memoryview(self.bufs[lane])[:n] if dest is None else dest[off - base: off - base + n]
            got += os.preadv(self.fd, [view], off)
        return got

    def read_region(self, offset: int, nbytes: int, into: memoryview | None = None) -> float:
        """Read ``nbytes`` at ``offset`` (both multiples of 4096) in blocks over the queue, into ``into``
        (a page-aligned buffer of at least ``nbytes``, e.g. an ``mmap``; else each lane's own buffer);
        returns the seconds it took (the page-cache drop, when that is the method, is not timed)."""
        if self.method == "fadvise_dontneed":
            os.posix_fadvise(self.fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        starts = list(range(offset, offset + nbytes, self.block))
        lens = [min(self.block, offset + nbytes - s) for s in starts]
        q = self.queue_depth
        t0 = time.perf_counter()
        if self.pool is None:
            got = self._lane(0, starts, lens, into, offset)
        else:
            got = sum(self.pool.map(self._lane, range(q), [starts[j::q] for j in range(q)],
                                    [lens[j::q] for j in range(q)], [into] * q, [offset] * q))
        dt = time.perf_counter() - t0
        if got != nbytes:
            raise OSError(f"short read: {got} of {nbytes} bytes at offset {offset}")
        return dt


def allocate(nbytes: int) -> mmap.mmap:
    """A page-aligned host buffer with every page already touched: host RAM set aside up front, so that
    no read pays the kernel's first-touch page faults."""
    buf = mmap.mmap(-1, nbytes)
    buf.write(bytes(nbytes))
    buf.seek(0)
    return buf


def read_pool(reader: Reader, count: int, nbytes: int) -> tuple[list[mmap.mmap], list[int]]:
    """``count`` host buffers of ``nbytes`` (a multiple of 4096) for ``reader`` to read into, each
    already filled once by an untimed read of the file, as an engine fills its host RAM once, at load: the
    timed reads land in memory that has been read into before, as a long-running reader's do (the study's
    host-buffer probe measures a first read into a fresh buffer against later ones: studies/nvme).
    Returns the buffers and the region (of ``nbytes``) of the file each holds."""
    regions = os.fstat(reader.fd).st_size // nbytes
    pool = [allocate(nbytes) for _ in range(count)]
    held = [i % regions if regions else -1 for i in range(count)]
    for buf, region in zip(pool, held, strict=True):
        if region >= 0:
            reader.read_region(region * nbytes, nbytes, memoryview(buf))
    return pool, held


def write_scratch(path: str | os.PathLike, nbytes: int, progress: Callable[[int], None] | None = None) -> None:
    """A file of ``nbytes`` random bytes, every MiB different (incompressible and with nothing to
    deduplicate, so no layer below can shortcut the reads, as none can for real weights), fsynced so that
    none of its pages are dirty."""
    rng = np.random.default_rng(0)
    with open(path, "wb") as fh:
        for done in range(0, nbytes, 1 << 20):
            n = min(1 << 20, nbytes - done)
            fh.write(rng.bytes(n))
            if progress:
                progress(n)
        fh.flush()
        os.fsync(fh.fileno())


def warm(path: str | os.PathLike) -> None:
    """Read the whole file through the page cache (so that buffered reads of it hit)."""
    with open(path, "rb", buffering=0) as fh:
        while fh.read(1 << 24):
            pass


def fit_line(sizes: Sequence[int], seconds: Sequence[float]) -> tuple[float, float]:
    """``seconds ~ latency + bytes / bandwidth`` by least squares; a negative intercept is refitted
    through the origin. Returns (latency_s, bytes_per_s)."""
    x, y = np.asarray(sizes, float), np.asarray(seconds, float)
    if len(set(x.tolist())) > 1:
        slope, icpt = np.polyfit(x, y, 1)
        if icpt >= 0 and slope > 0:
            return float(icpt), float(1.0 / slope)
    return 0.0, float((x * x).sum() / (x * y).sum())


def read_experts(reader: Reader, expert_bytes: int, slots: int, count: int, rng: random.Random,
                 dests: Sequence[mmap.mmap]) -> list[float]:
    """``count`` reads of a whole expert of ``expert_bytes`` from a file laid out as ``slots`` experts
    (expert ``i`` at ``i x expert_bytes``, as :mod:`moesim.engine.disk_reader` reads it), at uniformly
    random slots, into ``dests`` in turn; the seconds of each read. The one micro-benchmark read: the
    calibration's points and the validation's samples taken during a reader's run both come from here."""
    return [reader.read_region(rng.randrange(slots) * expert_bytes, expert_bytes,
                               memoryview(dests[i % len(dests)])[:expert_bytes]) for i in range(count)]


def point_summary(block: int, queue_depth: int, times_by_size: dict[int, Sequence[float]]) -> dict[str, Any]:
    """A curve point from read times per size: the mean and median read per size and the line fitted to
    the means. The mean, not the median: the simulator adds reads up, a sum of n reads is n x their mean,
    and the slow tail (a read several times the median) is disk time a reader pays too."""
    sizes = sorted(times_by_size)
    means = [[int(n), statistics.fmean(times_by_size[n])] for n in sizes]
    medians = [[int(n), statistics.median(times_by_size[n])] for n in sizes]
    latency, bw = fit_line(sizes, [t for _, t in means])
    return {"block_bytes": block, "queue_depth": queue_depth, "latency_s": latency, "bytes_per_s": bw,
            "mean_s": means, "median_s": medians}


def pool_count(nbytes: int) -> int:
    """How many host buffers of ``nbytes`` a calibration point reads into, in turn."""
    return min(POOL_MAX, max(4, POOL_BYTES // nbytes))


def measure_mode(path: str | os.PathLike, file_bytes: int, blocks: Sequence[int], depths: Sequence[int],
                 sizes: Sequence[int], repeats: int, rng: random.Random, direct: bool,
                 progress: Callable[[str, int], None] | None = None) -> tuple[list[dict[str, Any]], set[str]]:
    """Every (block, depth) point of one mode: ``repeats`` reads of each size per point, each a whole
    region of the file taken as experts of that size (region-aligned offsets, as an expert file is read),
    into a pool of host buffers in turn (``POOL_BYTES``, each filled once first: a read's time can depend
    on the buffer it lands in, and a reader reads into many; studies/nvme). The points take turns in
    ``ROUNDS`` rounds, so that a disk whose speed drifts while it is measured slows every point alike
    rather than the ones measured last. Returns the points and the readers' methods."""
    with ExitStack() as stack:
        readers = [stack.enter_context(Reader(path, block, q, direct)) for block in blocks for q in depths]
        pool, _ = read_pool(readers[0], pool_count(max(sizes)), max(sizes))
        stack.callback(lambda: [buf.close() for buf in pool])
        times: list[dict[int, list[float]]] = [{n: [] for n in sizes} for _ in readers]
        rounds = min(repeats, ROUNDS)
        for r in range(rounds):
            share = repeats // rounds + (r < repeats % rounds)
            for reader, got in zip(readers, times, strict=True):
                for n in sizes:
                    got[n] += read_experts(reader, n, file_bytes // n, share, rng, pool)
                if progress and r == rounds - 1:
                    progress(f"{'direct' if direct else 'page cache'} {reader.block // 1024} KiB x{reader.queue_depth}", 0)
        return ([point_summary(rd.block, rd.queue_depth, got) for rd, got in zip(readers, times, strict=True)],
                {rd.method for rd in readers})


def measure(directory: str | os.PathLike, file_bytes: int, blocks: Sequence[int], depths: Sequence[int],
            sizes: Sequence[int], repeats: int, progress: Callable[[str, int], None] | None = None,
            seed: int = 0) -> dict[str, Any]:
    """The ``disk`` calibration block: every (block, depth) point from the disk and from the page cache,
    on a scratch file of ``file_bytes`` under ``directory`` (removed afterwards, whatever happens)."""
    sizes = sorted({int(n) for n in sizes})
    if not sizes or sizes[0] < ALIGN or any(n % ALIGN for n in sizes) or sizes[-1] > file_bytes:
        raise SettingError("disk_sizes", f"read sizes must be multiples of {ALIGN} bytes no larger than the "
                                         f"scratch file ({file_bytes} bytes)")
    path = os.path.join(directory, f"{SCRATCH_NAME}.{os.getpid()}")
    rng = random.Random(seed)
    out: dict[str, Any] = {"direct": [], "page_cache": []}
    try:
        write_scratch(path, file_bytes, (lambda n: progress("write", n)) if progress else None)
        methods: set[str] = set()
        for mode in MODES:
            if mode == "page_cache":
                warm(path)
            out[mode], used = measure_mode(path, file_bytes, blocks, depths, sizes, repeats, rng, mode == "direct",
                                           progress)
            if mode == "direct":
                methods = used
    finally:
        if os.path.exists(path):
            os.unlink(path)
    out |= {"direct_method": ",".join(sorted(methods)), "file_bytes": int(file_bytes), "read_sizes": sizes,
            "pool_bytes": pool_count(sizes[-1]) * sizes[-1], "rounds": min(repeats, ROUNDS),
            "repeats": repeats, "default": {"mode": "direct", "block_bytes": int(blocks[-1]),
                                            "queue_depth": int(max(depths))},
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
    return out
