"""Per-request hit/miss log of one layer: what the raster plot shows.

Caches are per layer and independent (docs/semantics.md), so replaying only the chosen layer's rows
through the one cache mechanism (:class:`~moesim.policies.ExpertCache`) gives exactly the hits the
full replay has at that layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.policies import NEVER, ExpertCache, make_policy, policy_class
from moesim.traces.format import Trace

IDLE, RESIDENT, HIT, MISS = 0, 1, 2, 3
STATE_NAMES = {IDLE: "not resident", RESIDENT: "resident, unused", HIT: "hit", MISS: "miss"}


@dataclass
class ResidencyLog:
    """``states[t, e]``: the state of expert e at this layer's t-th row (after the row's requests):
    :data:`HIT` / :data:`MISS` if requested, else :data:`RESIDENT` or :data:`IDLE`."""

    layer: int
    policy: str
    cache_size: int
    states: np.ndarray   # (rows, E) int8
    seq: np.ndarray      # (rows,) sequence id of each row
    token: np.ndarray    # (rows,) token index of each row

    @property
    def hits(self) -> int:
        return int((self.states == HIT).sum())

    @property
    def misses(self) -> int:
        return int((self.states == MISS).sum())

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def residency_log(trace: Trace, layer: int, policy: str, cache_size: int, *, max_rows: int | None = None,
                  **params) -> ResidencyLog:
    """Replay ``layer`` of ``trace`` under ``policy`` with ``cache_size`` slots and log every state
    (only the layer's first ``max_rows`` rows when given: a prefix replay is exact for that prefix)."""
    meta = trace.meta
    if not 0 <= layer < meta.num_layers:
        raise ValueError(f"layer {layer} out of range [0, {meta.num_layers})")
    if cache_size < meta.top_k:
        raise ValueError(f"cache size {cache_size} is smaller than top-k ({meta.top_k})")
    policy_class(policy)  # unknown names raise KeyError with the known list
    trace = trace.execution_order()
    rows = np.flatnonzero(trace.layer == layer)
    experts = trace.experts[rows].astype(np.int64)
    cache = ExpertCache(cache_size, make_policy(policy, **params))
    # the future a prefix replay sees must be the whole layer's, or OPT's choices would change
    next_use = _next_use(experts) if cache.policy.needs_future else None
    rows, experts = rows[:max_rows], experts[:max_rows]
    weights = trace.weights[rows]
    states = np.zeros((len(rows), meta.num_experts), dtype=np.int8)
    for t, keys in enumerate(experts.tolist()):
        missing = set(cache.request(keys, t, weights[t].tolist(), None if next_use is None else next_use[t]))
        for e in cache.resident:
            states[t, e] = RESIDENT
        for e in keys:
            states[t, e] = MISS if e in missing else HIT
    return ResidencyLog(layer, policy, cache_size, states, trace.seq[rows], trace.token[rows])


def _next_use(experts: np.ndarray) -> list[list[int]]:
    """For each (row, slot), the next row that requests the same expert, or NEVER."""
    n, k = experts.shape
    nxt = np.full((n, k), NEVER, dtype=np.int64)
    last: dict[int, tuple[int, int]] = {}
    for t in range(n - 1, -1, -1):
        for j in range(k):
            e = int(experts[t, j])
            if e in last:
                nxt[t, j] = last[e][0]
        for j in range(k):
            last[int(experts[t, j])] = (t, j)
    return nxt.tolist()
