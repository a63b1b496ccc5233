"""A stand-alone reader that replays a trace's misses against a real file (issue 25 item 5): the check
of the simulated disk tier (:mod:`moesim.simulator.disk_tier`) on this machine's own disk.

The file holds every (layer, expert) of the model, ``expert_bytes`` each, at offset
``(layer x experts + expert) x expert_bytes``. Per (token, layer) in execution order, the GPU tier's
misses (one cache per layer under the GPU policy, as the replay keeps it) go to host RAM: a pool of
``host_experts`` page-aligned buffers, which experts stay decided by the host policy (through the one
resolver); an expert not in the pool is read from the file into the buffer of the one it evicts, in
blocks over ``queue_depth`` threads, with the page cache bypassed (O_DIRECT, else dropped per read) or
through it. Every read is timed; nothing else is (there is no GPU here).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

import numpy as np

from moesim.engine.disk_bench import ALIGN, Reader, read_pool
from moesim.errors import SettingError
from moesim.policies.base import ExpertCache
from moesim.policies.resolve import eviction_factory
from moesim.traces.format import Trace
from moesim.traces.steps import union_chunks


def write_expert_file(path: str | os.PathLike, num_slots: int, expert_bytes: int,
                      progress: Callable[[int], None] | None = None) -> None:
    """The model's experts as one file of random bytes (see :func:`disk_bench.write_scratch`)."""
    from moesim.engine.disk_bench import write_scratch

    write_scratch(path, num_slots * expert_bytes, progress)


def gpu_misses(trace: Trace, policy: str, cache_size: int) -> list[tuple[int, list[int]]]:
    """Each (token, layer)'s GPU misses in router order (empty ones dropped), in execution order: one
    cache per layer, atomic sets, as the replay and the timing simulator keep them."""
    trace = trace.execution_order()
    make = eviction_factory(policy, None)
    caches: dict[int, ExpertCache] = {}
    out = []
    for i, (layer, S) in enumerate(zip(trace.layer.tolist(), trace.experts.tolist(), strict=True)):
        cache = caches.get(layer) or caches.setdefault(layer, ExpertCache(cache_size, make()))
        missing = cache.request(S, i)
        if missing:
            out.append((layer, missing))
    return out


def replay_reads(reader: Reader, misses: list[tuple[int, list[int]]], num_experts: int, expert_bytes: int,
                 host_experts: int, host_policy: str, sample_every: int = 0, seed: int = 0,
                 progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Replay ``misses`` (from :func:`gpu_misses`) through a host RAM of ``host_experts`` buffers, reading
    with ``reader`` (an open :class:`disk_bench.Reader` on the expert file: its block size, queue depth and
    mode); returns the reads, the host hits and the seconds the reads took.

    ``sample_every`` N > 0: after every N reads, one micro-benchmark read, timed apart (``sample_s``): a
    buffer of the host RAM drawn at random (``seed``), resident or free, read again from the file with
    the expert it holds, which leaves every buffer as it was. It samples the disk as it is during this
    run, into the memory this run reads into: on a virtual machine the read time can depend on which
    host buffer receives it (studies/nvme), so a sample read into a buffer of its own would price another
    memory's reads."""
    if expert_bytes % ALIGN:
        raise SettingError("expert_bytes", f"expert size {expert_bytes} is not a multiple of {ALIGN} bytes")
    policy = eviction_factory(host_policy, None)()
    if policy.needs_future:
        raise SettingError("host_policy", f"host RAM policy {host_policy!r} needs the future", fix="lru")
    cache = ExpertCache(host_experts, policy)
    pool, held = read_pool(reader, host_experts, expert_bytes)   # held: the expert each buffer holds
    slot_of: dict[int, int] = {}
    free = list(range(host_experts))
    times: list[float] = []
    samples: list[float] = []
    rng = random.Random(seed)
    host_hits = 0
    try:
        for clock, (layer, experts) in enumerate(misses):
            keys = [layer * num_experts + e for e in experts]
            for chunk in union_chunks(keys, host_experts):
                before = set(cache.resident)
                read = cache.request(chunk, clock)
                host_hits += len(chunk) - len(read)
                for gone in before - cache.resident:     # evicted: its buffer takes a read
                    free.append(slot_of.pop(gone))
                for key in read:
                    slot_of[key] = slot = free.pop()
                    held[slot] = key
                    times.append(reader.read_region(key * expert_bytes, expert_bytes, memoryview(pool[slot])))
                    if sample_every and len(times) % sample_every == 0:
                        b = rng.randrange(host_experts)
                        samples.append(reader.read_region(held[b] * expert_bytes, expert_bytes, memoryview(pool[b])))
            if progress:
                progress(1)
    finally:
        for buf in pool:
            buf.close()
    return {"reads": len(times), "host_hits": host_hits, "method": reader.method, "sample_s": samples} | read_stats(times)


def read_stats(times: list[float]) -> dict[str, Any]:
    """The sum, mean, median and 90th percentile of some read times (seconds in, ms out but the sum)."""
    t = np.asarray(times)
    if not len(t):
        return {"read_s": 0.0, "read_ms_mean": None, "read_ms_p50": None, "read_ms_p90": None}
    return {"read_s": float(t.sum()), "read_ms_mean": float(t.mean() * 1e3), "read_ms_p50": float(np.median(t) * 1e3),
            "read_ms_p90": float(np.percentile(t, 90) * 1e3)}
