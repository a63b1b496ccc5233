"""Reference hit-rate replay: drives :class:`ExpertCache` + any policy object over a trace.

This is the generic (pure Python) path: it runs any policy class, built-in or user-written, and is
the oracle that the compiled fast paths are tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from moesim.policies.base import NEVER, EvictionPolicy, ExpertCache
from moesim.traces.format import Trace


@dataclass
class ReplayResult:
    policy: str
    cache_size: int
    requests: int
    hits: int
    layer_requests: np.ndarray = field(repr=False)
    layer_hits: np.ndarray = field(repr=False)

    @property
    def misses(self) -> int:
        return self.requests - self.hits

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0


def next_use_times(layer: np.ndarray, experts: np.ndarray, num_experts: int) -> np.ndarray:
    """For each (row, slot) request, the row index of the next row at the same layer that requests
    the same expert, or :data:`NEVER`. Rows must be in execution order."""
    n, k = experts.shape
    keys = (layer.astype(np.int64)[:, None] * num_experts + experts.astype(np.int64)).reshape(-1)
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    order = np.lexsort((rows, keys))
    nxt = np.full(n * k, NEVER, dtype=np.int64)
    same = keys[order[1:]] == keys[order[:-1]]
    nxt[order[:-1][same]] = rows[order[1:][same]]
    return nxt.reshape(n, k)


def replay_reference(trace: Trace, make: Callable[[], EvictionPolicy], cache_size: int | list[int]) -> ReplayResult:
    """Replay ``trace`` with one cache per MoE layer (CONTRACTS.md semantics), any policy class."""
    trace = trace.execution_order()
    meta = trace.meta
    sizes = [cache_size] * meta.num_layers if isinstance(cache_size, int) else list(cache_size)
    caches = [ExpertCache(s, make()) if s > 0 else None for s in sizes]
    layer = trace.layer
    experts = trace.experts.tolist()
    weights = trace.weights.tolist()
    policy0 = make()
    future = policy0.needs_future
    nxt = next_use_times(layer, trace.experts, meta.num_experts).tolist() if future else None
    lreq = np.zeros(meta.num_layers, np.int64)
    lhit = np.zeros(meta.num_layers, np.int64)
    for r, (lay, keys) in enumerate(zip(layer.tolist(), experts, strict=True)):
        cache = caches[lay]
        lreq[lay] += len(keys)
        if cache is None:
            continue
        missing = cache.request(keys, r, weights[r], nxt[r] if nxt is not None else None)
        lhit[lay] += len(keys) - len(missing)
    return ReplayResult(policy0.name, sizes[0], int(lreq.sum()), int(lhit.sum()), lreq, lhit)
