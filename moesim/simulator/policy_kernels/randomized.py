"""random: a uniform rank among the candidates in slot order, drawn with the class's SplitMix64
(``moesim.policies.seeded``); the row's slots before it are skipped: O(row) per eviction."""

from __future__ import annotations

import numpy as np
from numba import njit

from moesim.policies.seeded import GOLDEN, MIX1, MIX2
from moesim.simulator.policy_kernels.loop import (
    leave_slot,
    no_request_step,
    no_row_step,
    request_loop,
    take_slot,
)
from moesim.simulator.policy_kernels.state import (
    OCCUPANCY,
    RESIDENT,
    SCAN,
    SLOT,
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


@njit(cache=True, nogil=True, inline="always")
def _setup(policy, layout, n, w, sizes, n_keys, fparams, rng_state, caches):
    """(per cache the SplitMix64 state, every cache starting from the seed's ``rng_state[0]`` (the int64 of
    the same bits); scratch for the row's slots)."""
    state = np.zeros(sizes.shape[0], np.uint64)
    state[:] = np.uint64(rng_state[0])
    return state, np.empty(w + 1, np.int64)


@njit(cache=True, nogil=True, _nrt=False)
def _victim(policy, layout, u, r, c, t0, now, size, base, keys, fparams, nodes, caches, slots, extra):
    """The draw-th candidate in slot order: the row's resident slots (sorted) before it are skipped."""
    state, row_slots = extra
    n_row = 0
    for j2 in range(keys.shape[1]):
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
    return slots[c, i]


@njit(cache=True, nogil=True)
def replay_random(layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state):
    return request_loop(_setup, no_row_step, no_request_step, _victim, leave_slot, take_slot, no_row_step, RANDOM, SCAN,
                        cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state)
