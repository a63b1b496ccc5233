"""mrs (HybriMoE's "Minus Recent Score", arXiv 2504.05897; the class in ``moesim.policies.eviction``): per
key a score and the token it was last updated in (``STAMP``), decayed lazily by (1 - alpha) per token; the
victim is the lowest decayed score outside the row (a scan of the slots), ties to the least recently
requested. The decay factors of the first DECAY_TABLE ages are computed once per replay, with the class's
expression."""

from __future__ import annotations

import numpy as np
from numba import njit

from moesim.simulator.policy_kernels.state import (
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

MRS = 15
ALPHA = 0  # fparams[ALPHA]
DECAY_TABLE = 2048


def layout_for(policy: int, largest: int, requests: int, fparams: np.ndarray) -> int:
    return SCAN


@njit(cache=True, nogil=True, inline="always")
def _keep(d, keep, table):
    """(1 - alpha) ** d, the class's float: from the table for the ages it holds."""
    if d < table.shape[0]:
        return table[d]
    return keep ** float(d)


@njit(cache=True, nogil=True, inline="always")
def _victim(c, t0, now, keep, nodes, score, slots, caches, table):
    v = -1
    best = 0.0
    for i in range(caches[c, OCCUPANCY]):
        x = slots[c, i]
        if nodes[LAST, x] > t0:
            continue
        s = score[x] * _keep(now - nodes[STAMP, x], keep, table)
        if v < 0 or s < best or (s == best and nodes[LAST, x] < nodes[LAST, v]):
            v = x
            best = s
    return v


@njit(cache=True, nogil=True)
def replay_mrs(layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state):
    n, w = keys.shape
    n_caches = sizes.shape[0]
    req, hit, nodes, caches = new_replay(n_caches, n_keys, n_groups)
    score = np.zeros(n_caches * n_keys, np.float64)
    slots = np.full((n_caches, max(1, sizes.max())), -1, np.int64)
    alpha = fparams[ALPHA]
    keep = 1.0 - alpha
    table = np.empty(DECAY_TABLE, np.float64)
    for d in range(DECAY_TABLE):
        table[d] = keep ** float(d)
    tick = 0
    for r in range(n):
        c, g, size = open_row(r, cache, group, sizes, req, w)
        if size == 0:
            continue
        base = c * n_keys
        now = clock[r]
        t0 = tick  # the row's keys are exactly the nodes with LAST > t0 from here on
        for j in range(w):  # look up + access, router order: the routing weight enters the average
            u = base + keys[r, j]
            if nodes[RESIDENT, u]:
                hit[g] += 1
            score[u] = score[u] * _keep(now - nodes[STAMP, u], keep, table) + alpha * float(weights[r, j])
            nodes[STAMP, u] = now
            tick += 1
            nodes[LAST, u] = tick
        for j in range(w):  # insert the missing keys, router order, evicting keys outside the row
            u = base + keys[r, j]
            if nodes[RESIDENT, u]:
                continue
            if caches[c, OCCUPANCY] >= size:
                v = _victim(c, t0, now, keep, nodes, score, slots, caches, table)
                evict(v, c, nodes, caches)
                slot_remove(v, c, nodes, caches, slots)
            nodes[RESIDENT, u] = 1
            slot_append(u, c, nodes, caches, slots)
            caches[c, OCCUPANCY] += 1
    return req, hit
