"""lfru (vLLM PR 37190's expert cache; the class in ``moesim.policies.eviction``): per key its uses since
insertion (``COUNT``), its last use and its insertion on the cache's own clock (``STAMP``, ``FLAG``; the
clock ticks at every hit and insertion); the victim is the lowest uses / age, found by a scan of the slots
comparing ``uses * age`` cross products (exact integers), ties to the earliest inserted."""

from __future__ import annotations

import numpy as np
from numba import njit

from moesim.simulator.policy_kernels.loop import leave_slot, no_row_step, no_state, request_loop
from moesim.simulator.policy_kernels.state import (
    CLOCK,
    COUNT,
    FLAG,
    LAST,
    OCCUPANCY,
    SCAN,
    STAMP,
    slot_append,
)

LFRU = 14
INSERTED = FLAG  # the insertion's clock


def layout_for(policy: int, largest: int, requests: int, fparams: np.ndarray) -> int:
    return SCAN


@njit(cache=True, nogil=True, _nrt=False)
def _victim(policy, layout, u, r, c, t0, now, size, base, keys, fparams, nodes, caches, slots, extra):
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


@njit(cache=True, nogil=True, _nrt=False)
def _on_request(policy, layout, u, resident, last_before, r, j, c, t0, now, size, weights, next_use, fparams, nodes,
                caches, slots, extra):
    """A hit uses the key once more."""
    if resident:
        caches[c, CLOCK] += 1
        nodes[COUNT, u] += 1
        nodes[STAMP, u] = caches[c, CLOCK]


@njit(cache=True, nogil=True, _nrt=False)
def _on_insert(policy, layout, u, hole, r, c, now, base, keys, nodes, caches, slots, extra):
    slot_append(u, c, nodes, caches, slots)
    caches[c, CLOCK] += 1
    nodes[COUNT, u] = 1
    nodes[STAMP, u] = caches[c, CLOCK]
    nodes[INSERTED, u] = caches[c, CLOCK]


@njit(cache=True, nogil=True)
def replay_lfru(layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state):
    return request_loop(no_state, no_row_step, _on_request, _victim, leave_slot, _on_insert, no_row_step, LFRU, SCAN,
                        cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state)
