"""lru, fifo and sieve: one queue per cache.

On small caches (up to SCAN_MAX_SLOTS) lru and fifo keep a stamp per key and scan the slots (measured:
per-layer caches of 4 slots, lru 63 vs 16M requests/s against moving list nodes on every request); on
larger ones, and sieve always, a doubly linked list in arrays: a victim is found from the head, skipping
at most the row's own keys, so a global cache of 256 slots is never scanned.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from moesim.simulator.policy_kernels.state import (
    COUNT,
    HAND,
    HEAD,
    LAST,
    LIST,
    NEXT,
    OCCUPANCY,
    RESIDENT,
    SCAN,
    SCAN_MAX_SLOTS,
    STAMP,
    evict,
    first_allowed,
    list_append,
    list_unlink,
    move_to_tail,
    new_replay,
    open_row,
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


@njit(cache=True, nogil=True, inline="always")
def _replay(policy, layout, cache, keys, group, sizes, n_keys, n_groups):
    n, w = keys.shape
    n_caches = sizes.shape[0]
    req, hit, nodes, caches = new_replay(n_caches, n_keys, n_groups)
    slots = np.full((n_caches, max(1, sizes.max()) if layout == SCAN else 1), -1, np.int64)
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
                if policy == SIEVE:
                    nodes[COUNT, u] = 1
            tick += 1
            nodes[LAST, u] = tick
        for j in range(w):  # insert the missing keys, router order, evicting keys outside the row
            u = base + keys[r, j]
            if nodes[RESIDENT, u]:
                continue
            if caches[c, OCCUPANCY] >= size:
                # the victim, written out: as an inlined helper its branches kept numba from pruning the
                # array reference counts (measured: lru per layer 9% slower)
                if layout == SCAN:
                    v = -1
                    for i in range(caches[c, OCCUPANCY]):
                        x = slots[c, i]
                        if nodes[LAST, x] <= t0 and (v < 0 or evicts_first(
                                policy, nodes[LAST, x], nodes[STAMP, x], x, nodes[LAST, v], nodes[STAMP, v], v)):
                            v = x
                elif policy == SIEVE:
                    v = _sieve_victim(c, t0, nodes, caches)
                else:
                    v = first_allowed(caches[c, HEAD], t0, nodes)
                evict(v, c, nodes, caches)
                if layout == SCAN:
                    slot_remove(v, c, nodes, caches, slots)
                else:
                    if policy == SIEVE:
                        caches[c, HAND] = nodes[NEXT, v]
                    list_unlink(v, c, nodes, caches)
            nodes[RESIDENT, u] = 1
            if layout == SCAN:
                slot_append(u, c, nodes, caches, slots)
                if policy == FIFO:
                    tick += 1
                    nodes[STAMP, u] = tick
            else:  # the tail
                list_append(u, c, 0, nodes, caches)
                nodes[COUNT, u] = 0
            caches[c, OCCUPANCY] += 1
        if policy == LRU and layout == LIST:  # the row's keys become the most recent, router order
            for j in range(w):
                move_to_tail(base + keys[r, j], c, 0, nodes, caches)
    return req, hit


# One entry per policy, the policy and the layout constants in each branch: numba compiles each layout
# as its own code, the other policies' and layouts' branches gone.

@njit(cache=True, nogil=True)
def replay_lru(layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state):
    if layout == SCAN:
        return _replay(LRU, SCAN, cache, keys, group, sizes, n_keys, n_groups)
    return _replay(LRU, LIST, cache, keys, group, sizes, n_keys, n_groups)


@njit(cache=True, nogil=True)
def replay_fifo(layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state):
    if layout == SCAN:
        return _replay(FIFO, SCAN, cache, keys, group, sizes, n_keys, n_groups)
    return _replay(FIFO, LIST, cache, keys, group, sizes, n_keys, n_groups)


@njit(cache=True, nogil=True)
def replay_sieve(layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state):
    return _replay(SIEVE, LIST, cache, keys, group, sizes, n_keys, n_groups)
