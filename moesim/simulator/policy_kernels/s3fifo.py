"""s3fifo (Yang et al., SOSP 2023): a small and a main FIFO queue and a ghost queue in arrays, as the class
in ``moesim.policies.eviction``."""

from __future__ import annotations

import numpy as np
from numba import njit

from moesim.simulator.policy_kernels.state import (
    COUNT,
    DEST,
    EVICTED,
    GHOST_SIZE,
    HEAD,
    LAST,
    LENGTH,
    LIST,
    LIST_TAG,
    MAIN_SIZE,
    NEXT,
    OCCUPANCY,
    ON_GHOST,
    RESIDENT,
    SMALL_SIZE,
    TAIL,
    evict,
    first_allowed,
    list_append,
    list_unlink,
    new_replay,
    open_row,
)

S3FIFO = 10
SMALL, MAIN, GHOST = 0, 1, 2  # list ids
SMALL_RATIO, GHOST_RATIO, MOVE_THRESHOLD = 0, 1, 2  # fparams


def layout_for(policy: int, largest: int, requests: int, fparams: np.ndarray) -> int:
    return LIST


@njit(cache=True, nogil=True, _nrt=False)
def _victim(c, t0, threshold, nodes, caches):
    while True:
        small = first_allowed(caches[c, HEAD + SMALL], t0, nodes)
        if caches[c, LENGTH + MAIN] > caches[c, MAIN_SIZE] or small < 0:
            u = caches[c, HEAD + MAIN]
            end = caches[c, TAIL + MAIN]
            while u >= 0:  # one pass over the main queue as it was (re-inserted keys are not revisited)
                q = nodes[NEXT, u]
                if not nodes[LAST, u] > t0:
                    if nodes[COUNT, u] == 0:
                        caches[c, DEST] = 0
                        return u
                    list_unlink(u, c, nodes, caches)
                    list_append(u, c, MAIN, nodes, caches)
                    nodes[COUNT, u] = min(nodes[COUNT, u], 3) - 1
                if u == end:
                    break
                u = q
            continue
        u = small
        end = caches[c, TAIL + SMALL]
        while u >= 0:
            q = nodes[NEXT, u]
            if not nodes[LAST, u] > t0:
                if nodes[COUNT, u] >= threshold:
                    list_unlink(u, c, nodes, caches)
                    list_append(u, c, MAIN, nodes, caches)
                    nodes[COUNT, u] = 0
                else:
                    caches[c, DEST] = GHOST + 1 if caches[c, GHOST_SIZE] > 0 else 0
                    return u
            if u == end:
                break
            u = q


@njit(cache=True, nogil=True)
def replay_s3fifo(layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state):
    n, w = keys.shape
    n_caches = sizes.shape[0]
    req, hit, nodes, caches = new_replay(n_caches, n_keys, n_groups)
    for c in range(n_caches):
        caches[c, SMALL_SIZE] = max(1, int(sizes[c] * fparams[SMALL_RATIO]))
        caches[c, MAIN_SIZE] = sizes[c] - caches[c, SMALL_SIZE]
        caches[c, GHOST_SIZE] = int(sizes[c] * fparams[GHOST_RATIO])
    threshold = int(fparams[MOVE_THRESHOLD])
    tick = 0
    for r in range(n):
        c, g, size = open_row(r, cache, group, sizes, req, w)
        if size == 0:
            continue
        base = c * n_keys
        t0 = tick  # the row's keys are exactly the nodes with LAST > t0 from here on
        for j in range(w):  # look up + access, router order
            u = base + keys[r, j]
            if nodes[RESIDENT, u]:
                hit[g] += 1
            tick += 1
            nodes[LAST, u] = tick
            t = nodes[LIST_TAG, u] - 1
            if t == SMALL or t == MAIN:
                nodes[COUNT, u] += 1
            elif t == GHOST:
                list_unlink(u, c, nodes, caches)
                caches[c, ON_GHOST] = 1
        for j in range(w):  # insert the missing keys, router order, evicting keys outside the row
            u = base + keys[r, j]
            if nodes[RESIDENT, u]:
                continue
            if caches[c, OCCUPANCY] >= size:
                caches[c, EVICTED] = 1
                v = _victim(c, t0, threshold, nodes, caches)
                evict(v, c, nodes, caches)
                list_unlink(v, c, nodes, caches)
                if caches[c, DEST] > 0:
                    if caches[c, LENGTH + GHOST] >= caches[c, GHOST_SIZE]:
                        list_unlink(caches[c, HEAD + GHOST], c, nodes, caches)
                    list_append(v, c, caches[c, DEST] - 1, nodes, caches)
            nodes[RESIDENT, u] = 1
            to_main = caches[c, ON_GHOST] or (not caches[c, EVICTED] and caches[c, LENGTH + SMALL] >= caches[c, SMALL_SIZE])
            list_append(u, c, MAIN if to_main else SMALL, nodes, caches)
            nodes[COUNT, u] = 0
            caches[c, ON_GHOST] = 0
            caches[c, OCCUPANCY] += 1
    return req, hit
