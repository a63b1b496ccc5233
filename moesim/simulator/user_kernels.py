"""The compiled replay of a user's :class:`~moesim.policies.compiled.ScorePolicy`.

The same mechanism as ``policy_kernels.scores``' scan layout (look up, access in router
order, evict the lowest score outside the row until room, insert), with the user's njit hooks passed
in as arguments: numba specialises this function for each set of hooks (compiled once per process;
functions taking functions cannot be cached on disk).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True)
def replay_scored(on_access, on_insert, on_evict, score, n_fields, cache, keys, clock, weights, group, sizes, n_keys,
                  n_groups):
    """Returns (requests, hits) per group."""
    n, w = keys.shape
    n_caches = sizes.shape[0]
    req = np.zeros(n_groups, np.int64)
    hit = np.zeros(n_groups, np.int64)
    state = np.zeros((n_caches, n_keys, n_fields), np.float64)
    resident = np.zeros((n_caches, n_keys), np.bool_)
    last = np.zeros((n_caches, n_keys), np.int64)
    kmax = max(1, sizes.max())
    slots = np.full((n_caches, kmax), -1, np.int64)
    slot_of = np.zeros((n_caches, n_keys), np.int64)
    occ = np.zeros(n_caches, np.int64)
    tick = 0
    for r in range(n):
        c = cache[r]
        g = group[r]
        req[g] += w
        size = sizes[c]
        if size == 0:
            continue
        st = state[c]
        now = clock[r]
        t0 = tick  # keys of this row are exactly those requested after t0
        for j in range(w):
            key = keys[r, j]
            if resident[c, key]:
                hit[g] += 1
            tick += 1
            last[c, key] = tick
            on_access(st, key, now, float(weights[r, j]))
        for j in range(w):
            key = keys[r, j]
            if resident[c, key]:
                continue
            if occ[c] >= size:
                v = -1
                b_s = 0.0
                for i in range(occ[c]):
                    x = slots[c, i]
                    if last[c, x] > t0:
                        continue
                    s = score(st, x, now)
                    if v < 0 or s < b_s or (s == b_s and last[c, x] < last[c, v]):
                        v = x
                        b_s = s
                resident[c, v] = False
                occ[c] -= 1
                i = slot_of[c, v]
                moved = slots[c, occ[c]]
                slots[c, i] = moved
                slot_of[c, moved] = i
                on_evict(st, v)
            resident[c, key] = True
            slots[c, occ[c]] = key
            slot_of[c, key] = occ[c]
            occ[c] += 1
            on_insert(st, key, now)
    return req, hit
