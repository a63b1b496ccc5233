"""lru, fifo and sieve: one queue per cache.

On small caches (up to SCAN_MAX_SLOTS) lru and fifo keep a stamp per key and scan the slots (measured:
per-layer caches of 4 slots, lru 63 vs 16M requests/s against moving list nodes on every request); on
larger ones, and sieve always, a doubly linked list in arrays: a victim is found from the head, skipping
at most the row's own keys, so a global cache of 256 slots is never scanned.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from moesim.simulator.policy_kernels.loop import no_row_step, no_state, request_loop
from moesim.simulator.policy_kernels.state import (
    CLOCK,
    COUNT,
    HAND,
    HEAD,
    LAST,
    LIST,
    NEXT,
    OCCUPANCY,
    SCAN,
    SCAN_MAX_SLOTS,
    STAMP,
    first_allowed,
    list_append,
    list_unlink,
    move_to_tail,
    slot_append,
    slot_remove,
)

LRU, FIFO = 0, 1
SIEVE = 8


def layout_for(policy: int, largest: int, requests: int, fparams: np.ndarray) -> int:
    """The scan on small caches (lru, fifo), else the list."""
    return SCAN if policy != SIEVE and largest <= SCAN_MAX_SLOTS else LIST


@njit(cache=True, nogil=True, inline="always")
def evicts_first(policy, last_a, stamp_a, key_a, last_b, stamp_b, key_b):
    """Whether ``a`` goes before ``b``: lru, the least recently requested (ties, only between prefetched
    keys never requested: the smaller key); fifo, the earliest inserted (stamps are unique).
    The timing simulator's victim rule too."""
    if policy == LRU:
        return last_a < last_b or (last_a == last_b and key_a < key_b)
    return stamp_a < stamp_b


@njit(cache=True, nogil=True, _nrt=False)
def _sieve_victim(c, t0, nodes, caches):
    """The first key from the hand on (wrapping) with its visited bit clear, clearing the bits passed."""
    v = caches[c, HAND] if caches[c, HAND] >= 0 else caches[c, HEAD]
    while True:
        if not nodes[LAST, v] > t0:
            if nodes[COUNT, v] == 0:
                return v
            nodes[COUNT, v] = 0
        v = nodes[NEXT, v] if nodes[NEXT, v] >= 0 else caches[c, HEAD]


# ---- the rules (``loop.request_loop``) --------------------------------------------------------------

# inlined, not called (loop.py's rule for rules): one straight-line store, cheaper than a call of 18
# arguments per request (paired with bd85472, sieve one global atomic cache of 128 slots: 0.92-0.95x
# called, 0.97x inlined; lru and fifo no slower)
@njit(cache=True, nogil=True, inline="always")
def _on_request(policy, layout, u, resident, last_before, r, j, c, t0, now, size, weights, next_use, fparams, nodes,
                caches, slots, extra):
    if policy == SIEVE and resident:
        nodes[COUNT, u] = 1


@njit(cache=True, nogil=True, _nrt=False)
def _victim(policy, layout, u, r, c, t0, now, size, base, keys, fparams, nodes, caches, slots, extra):
    if layout == SCAN:  # the best so far kept in registers (reloaded from nodes, each step waited on a load)
        v = -1
        v_last = 0
        v_stamp = 0
        for i in range(caches[c, OCCUPANCY]):
            x = slots[c, i]
            x_last = nodes[LAST, x]
            if x_last <= t0:
                x_stamp = nodes[STAMP, x]
                if v < 0 or evicts_first(policy, x_last, x_stamp, x, v_last, v_stamp, v):
                    v = x
                    v_last = x_last
                    v_stamp = x_stamp
        return v
    if policy == SIEVE:
        return _sieve_victim(c, t0, nodes, caches)
    return first_allowed(caches[c, HEAD], t0, nodes)


@njit(cache=True, nogil=True, _nrt=False)
def _on_evict(policy, layout, v, c, t0, nodes, caches, slots, extra):
    if layout == SCAN:
        slot_remove(v, c, nodes, caches, slots)
    else:
        if policy == SIEVE:
            caches[c, HAND] = nodes[NEXT, v]
        list_unlink(v, c, nodes, caches)
    return -1


@njit(cache=True, nogil=True, _nrt=False)
def _on_insert(policy, layout, u, hole, r, c, now, base, keys, nodes, caches, slots, extra):
    if layout == SCAN:
        slot_append(u, c, nodes, caches, slots)
        if policy == FIFO:  # the insertion order, on the cache's own clock
            caches[c, CLOCK] += 1
            nodes[STAMP, u] = caches[c, CLOCK]
    else:  # the tail
        list_append(u, c, 0, nodes, caches)
        nodes[COUNT, u] = 0


@njit(cache=True, nogil=True, _nrt=False)
def _end_row(policy, layout, r, c, now, base, keys, n_caches, nodes, caches, slots, extra):
    if policy == LRU and layout == LIST:  # the row's keys become the most recent, router order
        for j in range(keys.shape[1]):
            move_to_tail(base + keys[r, j], c, 0, nodes, caches)


@njit(cache=True, nogil=True, inline="always")
def _replay(policy, layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state):
    return request_loop(no_state, no_row_step, _on_request, _victim, _on_evict, _on_insert, _end_row, policy, layout,
                        cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state)


# One entry per policy, the policy and the layout constants in each branch: numba compiles each layout
# as its own code, the other policies' and layouts' branches gone.

@njit(cache=True, nogil=True)
def replay_lru(layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state):
    if layout == SCAN:
        return _replay(LRU, SCAN, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use,
                       fparams, rng_state)
    return _replay(LRU, LIST, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use,
                       fparams, rng_state)


@njit(cache=True, nogil=True)
def replay_fifo(layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state):
    if layout == SCAN:
        return _replay(FIFO, SCAN, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use,
                       fparams, rng_state)
    return _replay(FIFO, LIST, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use,
                       fparams, rng_state)


@njit(cache=True, nogil=True)
def replay_sieve(layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state):
    return _replay(SIEVE, LIST, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use,
                       fparams, rng_state)
