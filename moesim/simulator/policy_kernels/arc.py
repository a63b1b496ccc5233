"""arc (Megiddo and Modha, 2003): lists T1, T2 of residents and ghost lists B1, B2 in arrays, the target
size of T1 adapted on ghost hits, as the class in ``moesim.policies.eviction``."""

from __future__ import annotations

import numpy as np
from numba import njit

from moesim.simulator.policy_kernels.state import (
    DEST,
    FLAG,
    HEAD,
    LAST,
    LENGTH,
    LIST,
    LIST_TAG,
    OCCUPANCY,
    RESIDENT,
    evict,
    first_allowed,
    list_append,
    list_unlink,
    new_replay,
    open_row,
)

ARC = 9
T1, T2, B1, B2 = 0, 1, 2, 3  # list ids


def layout_for(policy: int, largest: int, requests: int, fparams: np.ndarray) -> int:
    return LIST


@njit(cache=True, nogil=True, _nrt=False)
def _replace(c, t0, ghost_hit, p, nodes, caches):
    u1 = first_allowed(caches[c, HEAD + T1], t0, nodes)
    u2 = first_allowed(caches[c, HEAD + T2], t0, nodes)
    if u1 >= 0 and (caches[c, LENGTH + T1] > p or (caches[c, LENGTH + T1] == p and ghost_hit == 2) or u2 < 0):
        caches[c, DEST] = B1 + 1
        return u1
    caches[c, DEST] = B2 + 1
    return u2


@njit(cache=True, nogil=True, _nrt=False)
def _victim(c, t0, u_in, size, p, nodes, caches):
    ghost_hit = nodes[FLAG, u_in]
    if ghost_hit:
        return _replace(c, t0, ghost_hit, p, nodes, caches)
    if caches[c, LENGTH + T1] + caches[c, LENGTH + B1] + 1 > size:
        if caches[c, LENGTH + B1] > 0:
            list_unlink(caches[c, HEAD + B1], c, nodes, caches)
            return _replace(c, t0, 0, p, nodes, caches)
        oldest = first_allowed(caches[c, HEAD + T1], t0, nodes)
        if oldest < 0:
            return _replace(c, t0, 0, p, nodes, caches)
        caches[c, DEST] = 0
        return oldest
    total = caches[c, LENGTH + T1] + caches[c, LENGTH + B1] + caches[c, LENGTH + T2] + caches[c, LENGTH + B2]
    if total >= 2 * size and caches[c, LENGTH + B2] > 0:
        list_unlink(caches[c, HEAD + B2], c, nodes, caches)
    return _replace(c, t0, 0, p, nodes, caches)


@njit(cache=True, nogil=True)
def replay_arc(layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state):
    n, w = keys.shape
    n_caches = sizes.shape[0]
    req, hit, nodes, caches = new_replay(n_caches, n_keys, n_groups)
    target = np.zeros(n_caches, np.float64)  # the target size of T1
    tick = 0
    for r in range(n):
        c, g, size = open_row(r, cache, group, sizes, req, w)
        if size == 0:
            continue
        base = c * n_keys
        t0 = tick  # the row's keys are exactly the nodes with LAST > t0 from here on
        missing = 0
        for j in range(w):  # look up + access, router order
            u = base + keys[r, j]
            if nodes[RESIDENT, u]:
                hit[g] += 1
            else:
                missing += 1
            tick += 1
            nodes[LAST, u] = tick
            # a resident moves to T2's tail; a ghost adapts the target and is marked (FLAG: 1 from B1, 2
            # from B2). Written out: as an inlined helper its branches kept numba from pruning the array
            # reference counts (measured: 20% slower per layer)
            t = nodes[LIST_TAG, u] - 1
            if t == T1 or t == T2:
                list_unlink(u, c, nodes, caches)
                list_append(u, c, T2, nodes, caches)
            elif t == B1:
                target[c] = min(target[c] + max(caches[c, LENGTH + B2] / caches[c, LENGTH + B1], 1.0), float(size))
                list_unlink(u, c, nodes, caches)
                nodes[FLAG, u] = 1
            elif t == B2:
                target[c] = max(target[c] - max(caches[c, LENGTH + B1] / caches[c, LENGTH + B2], 1.0), 0.0)
                list_unlink(u, c, nodes, caches)
                nodes[FLAG, u] = 2
            else:
                nodes[FLAG, u] = 0
        # insert the missing keys, router order, evicting keys outside the row (a row that all hit skips
        # the pass: with a cache that holds every key, most rows do; benchmarks/bench_replay_paired.py)
        for j in range(w if missing else 0):
            u = base + keys[r, j]
            if nodes[RESIDENT, u]:
                continue
            if caches[c, OCCUPANCY] >= size:
                v = _victim(c, t0, u, size, target[c], nodes, caches)
                evict(v, c, nodes, caches)
                list_unlink(v, c, nodes, caches)
                if caches[c, DEST] > 0:
                    list_append(v, c, caches[c, DEST] - 1, nodes, caches)
            nodes[RESIDENT, u] = 1
            list_append(u, c, T2 if nodes[FLAG, u] else T1, nodes, caches)
            caches[c, OCCUPANCY] += 1
    return req, hit
