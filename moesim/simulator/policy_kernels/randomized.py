"""random: a uniform rank among the candidates in slot order, drawn with the class's SplitMix64
(``moesim.policies.seeded``); the row's slots before it are skipped: O(row) per eviction."""

from __future__ import annotations

import numpy as np
from numba import njit

from moesim.policies.seeded import GOLDEN, MIX1, MIX2
from moesim.simulator.policy_kernels.state import (
    LAST,
    OCCUPANCY,
    RESIDENT,
    SCAN,
    SLOT,
    evict,
    new_replay,
    open_row,
    slot_append,
    slot_remove,
)

RANDOM = 12
# SplitMix64 as uint64 constants so numba's arithmetic stays unsigned
SM_GOLDEN, SM_MIX1, SM_MIX2 = np.uint64(GOLDEN), np.uint64(MIX1), np.uint64(MIX2)


def layout_for(policy: int, largest: int, requests: int, fparams: np.ndarray) -> int:
    return SCAN


@njit(cache=True, nogil=True, inline="always")
def _splitmix64(state, c):
    st = state[c] + SM_GOLDEN
    state[c] = st
    z = (st ^ (st >> np.uint64(30))) * SM_MIX1
    z = (z ^ (z >> np.uint64(27))) * SM_MIX2
    return z ^ (z >> np.uint64(31))


@njit(cache=True, nogil=True, inline="always")
def _draw_below(state, c, n):
    """A uniform integer in [0, n): the top bits of the next output, drawn again while >= n."""
    if n <= 1:
        return 0
    k = 0
    while ((n - 1) >> k) > 0:
        k += 1
    sh = np.uint64(64 - k)
    while True:
        x = np.int64(_splitmix64(state, c) >> sh)
        if x < n:
            return x


@njit(cache=True, nogil=True)
def replay_random(layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state):
    """``rng_state[0]``: the seed's SplitMix64 state (the int64 of the same bits); every cache starts from it."""
    n, w = keys.shape
    n_caches = sizes.shape[0]
    req, hit, nodes, caches = new_replay(n_caches, n_keys, n_groups)
    slots = np.full((n_caches, max(1, sizes.max())), -1, np.int64)
    state = np.zeros(n_caches, np.uint64)
    state[:] = np.uint64(rng_state[0])
    row_slots = np.empty(w + 1, np.int64)
    tick = 0
    for r in range(n):
        c, g, size = open_row(r, cache, group, sizes, req, w)
        if size == 0:
            continue
        base = c * n_keys
        for j in range(w):  # look up + access, router order
            u = base + keys[r, j]
            if nodes[RESIDENT, u]:
                hit[g] += 1
            tick += 1
            nodes[LAST, u] = tick
        for j in range(w):  # insert the missing keys, router order, evicting keys outside the row
            u = base + keys[r, j]
            if nodes[RESIDENT, u]:
                continue
            if caches[c, OCCUPANCY] >= size:
                # the draw-th candidate in slot order: the row's resident slots (sorted) before it are
                # skipped. Written out: as an inlined helper its loops kept numba from pruning the
                # reference counts of its array arguments (4-5 atomic instructions per eviction)
                n_row = 0
                for j2 in range(w):
                    x = base + keys[r, j2]
                    if nodes[RESIDENT, x]:
                        i = nodes[SLOT, x]
                        t = n_row  # insertion sort: a handful of slots
                        while t > 0 and row_slots[t - 1] > i:
                            row_slots[t] = row_slots[t - 1]
                            t -= 1
                        row_slots[t] = i
                        n_row += 1
                i = _draw_below(state, c, caches[c, OCCUPANCY] - n_row)
                for t in range(n_row):
                    if row_slots[t] > i:
                        break
                    i += 1
                v = slots[c, i]
                evict(v, c, nodes, caches)
                slot_remove(v, c, nodes, caches, slots)
            nodes[RESIDENT, u] = 1
            slot_append(u, c, nodes, caches, slots)
            caches[c, OCCUPANCY] += 1
    return req, hit
