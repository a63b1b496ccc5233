"""least-stale (SpecMD, arXiv 2602.03921; the class in ``moesim.policies.eviction``): one queue per cache, a
key moved to its end at its first request in a token (``STAMP``: the token it last moved in), a victim
taken from its head. O(1) per request."""

from __future__ import annotations

import numpy as np
from numba import njit

from moesim.simulator.policy_kernels.state import (
    HEAD,
    LAST,
    LIST,
    OCCUPANCY,
    RESIDENT,
    STAMP,
    evict,
    first_allowed,
    list_append,
    list_unlink,
    move_to_tail,
    new_replay,
    open_row,
)

LEAST_STALE = 13


def layout_for(policy: int, largest: int, requests: int, fparams: np.ndarray) -> int:
    return LIST


@njit(cache=True, nogil=True)
def replay_least_stale(layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams,
                       rng_state):
    n, w = keys.shape
    n_caches = sizes.shape[0]
    req, hit, nodes, caches = new_replay(n_caches, n_keys, n_groups)
    tick = 0
    for r in range(n):
        c, g, size = open_row(r, cache, group, sizes, req, w)
        if size == 0:
            continue
        base = c * n_keys
        now = clock[r]
        t0 = tick  # the row's keys are exactly the nodes with LAST > t0 from here on
        for j in range(w):  # look up + access, router order: a stale hit becomes fresh
            u = base + keys[r, j]
            if nodes[RESIDENT, u]:
                hit[g] += 1
                if nodes[STAMP, u] != now:
                    move_to_tail(u, c, 0, nodes, caches)
                    nodes[STAMP, u] = now
            tick += 1
            nodes[LAST, u] = tick
        for j in range(w):  # insert the missing keys, router order, evicting keys outside the row
            u = base + keys[r, j]
            if nodes[RESIDENT, u]:
                continue
            if caches[c, OCCUPANCY] >= size:
                v = first_allowed(caches[c, HEAD], t0, nodes)
                evict(v, c, nodes, caches)
                list_unlink(v, c, nodes, caches)
            nodes[RESIDENT, u] = 1
            list_append(u, c, 0, nodes, caches)
            nodes[STAMP, u] = now
            caches[c, OCCUPANCY] += 1
    return req, hit
