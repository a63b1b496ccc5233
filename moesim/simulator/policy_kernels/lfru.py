"""lfru (vLLM PR 37190's expert cache; the class in ``moesim.policies.eviction``): per key its uses since
insertion (``COUNT``), its last use and its insertion on the cache's own clock (``STAMP``, ``FLAG``; the
clock ticks at every hit and insertion); the victim is the lowest uses / age, found by a scan of the slots
comparing ``uses * age`` cross products (exact integers), ties to the earliest inserted."""

from __future__ import annotations

import numpy as np
from numba import njit

from moesim.simulator.policy_kernels.state import (
    CLOCK,
    COUNT,
    FLAG,
    LAST,
    OCCUPANCY,
    RESIDENT,
    SCAN,
    STAMP,
    evict,
    new_replay,
    open_row,
    slot_append,
    slot_remove,
)

LFRU = 14
INSERTED = FLAG  # the insertion's clock


def layout_for(policy: int, largest: int, requests: int, fparams: np.ndarray) -> int:
    return SCAN


@njit(cache=True, nogil=True, inline="always")
def _victim(c, t0, nodes, caches, slots):
    """The lowest uses / (clock - last use + 1) outside the row, ties to the earliest inserted."""
    now = caches[c, CLOCK] + 1
    v = -1
    for i in range(caches[c, OCCUPANCY]):
        x = slots[c, i]
        if nodes[LAST, x] > t0:
            continue
        if v < 0:
            v = x
            continue
        lhs = nodes[COUNT, x] * (now - nodes[STAMP, v])
        rhs = nodes[COUNT, v] * (now - nodes[STAMP, x])
        if lhs < rhs or (lhs == rhs and nodes[INSERTED, x] < nodes[INSERTED, v]):
            v = x
    return v


@njit(cache=True, nogil=True)
def replay_lfru(layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state):
    n, w = keys.shape
    n_caches = sizes.shape[0]
    req, hit, nodes, caches = new_replay(n_caches, n_keys, n_groups)
    slots = np.full((n_caches, max(1, sizes.max())), -1, np.int64)
    tick = 0
    for r in range(n):
        c, g, size = open_row(r, cache, group, sizes, req, w)
        if size == 0:
            continue
        base = c * n_keys
        t0 = tick  # the row's keys are exactly the nodes with LAST > t0 from here on
        for j in range(w):  # look up + access, router order: a hit uses the key once more
            u = base + keys[r, j]
            if nodes[RESIDENT, u]:
                hit[g] += 1
                caches[c, CLOCK] += 1
                nodes[COUNT, u] += 1
                nodes[STAMP, u] = caches[c, CLOCK]
            tick += 1
            nodes[LAST, u] = tick
        for j in range(w):  # insert the missing keys, router order, evicting keys outside the row
            u = base + keys[r, j]
            if nodes[RESIDENT, u]:
                continue
            if caches[c, OCCUPANCY] >= size:
                v = _victim(c, t0, nodes, caches, slots)
                evict(v, c, nodes, caches)
                slot_remove(v, c, nodes, caches, slots)
            nodes[RESIDENT, u] = 1
            slot_append(u, c, nodes, caches, slots)
            caches[c, CLOCK] += 1
            nodes[COUNT, u] = 1
            nodes[STAMP, u] = caches[c, CLOCK]
            nodes[INSERTED, u] = caches[c, CLOCK]
            caches[c, OCCUPANCY] += 1
    return req, hit
