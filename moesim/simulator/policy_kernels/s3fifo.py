"""s3fifo (Yang et al., SOSP 2023): a small and a main FIFO queue and a ghost queue in arrays, as the class
in ``moesim.policies.eviction``."""

from __future__ import annotations

import numpy as np
from numba import njit

from moesim.simulator.policy_kernels.loop import no_row_step, request_loop
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
    ON_GHOST,
    SMALL_SIZE,
    TAIL,
    first_allowed,
    list_append,
    list_unlink,
)

S3FIFO = 10
SMALL, MAIN, GHOST = 0, 1, 2  # list ids
SMALL_RATIO, GHOST_RATIO, MOVE_THRESHOLD = 0, 1, 2  # fparams


def layout_for(policy: int, largest: int, requests: int, fparams: np.ndarray) -> int:
    return LIST


@njit(cache=True, nogil=True, _nrt=False)
def _choose(c, t0, threshold, nodes, caches):
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


@njit(cache=True, nogil=True, inline="always")
def _setup(policy, layout, n, w, sizes, n_keys, fparams, rng_state, caches):
    """The queues' sizes per cache; the frequency a small-queue key needs to move to the main queue."""
    for c in range(sizes.shape[0]):
        caches[c, SMALL_SIZE] = max(1, int(sizes[c] * fparams[SMALL_RATIO]))
        caches[c, MAIN_SIZE] = sizes[c] - caches[c, SMALL_SIZE]
        caches[c, GHOST_SIZE] = int(sizes[c] * fparams[GHOST_RATIO])
    return int(fparams[MOVE_THRESHOLD])


@njit(cache=True, nogil=True, _nrt=False)
def _on_request(policy, layout, u, resident, last_before, r, j, c, t0, now, size, weights, next_use, fparams, nodes,
                caches, slots, threshold):
    t = nodes[LIST_TAG, u] - 1
    if t == SMALL or t == MAIN:
        nodes[COUNT, u] += 1
    elif t == GHOST:
        list_unlink(u, c, nodes, caches)
        caches[c, ON_GHOST] = 1


@njit(cache=True, nogil=True, _nrt=False)
def _victim(policy, layout, u, r, c, t0, now, size, base, keys, fparams, nodes, caches, slots, threshold):
    caches[c, EVICTED] = 1
    return _choose(c, t0, threshold, nodes, caches)


@njit(cache=True, nogil=True, _nrt=False)
def _on_evict(policy, layout, v, c, t0, nodes, caches, slots, threshold):
    list_unlink(v, c, nodes, caches)
    if caches[c, DEST] > 0:
        if caches[c, LENGTH + GHOST] >= caches[c, GHOST_SIZE]:
            list_unlink(caches[c, HEAD + GHOST], c, nodes, caches)
        list_append(v, c, caches[c, DEST] - 1, nodes, caches)
    return -1


@njit(cache=True, nogil=True, _nrt=False)
def _on_insert(policy, layout, u, hole, r, c, now, base, keys, nodes, caches, slots, threshold):
    to_main = caches[c, ON_GHOST] or (not caches[c, EVICTED] and caches[c, LENGTH + SMALL] >= caches[c, SMALL_SIZE])
    list_append(u, c, MAIN if to_main else SMALL, nodes, caches)
    nodes[COUNT, u] = 0
    caches[c, ON_GHOST] = 0


@njit(cache=True, nogil=True)
def replay_s3fifo(layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state):
    return request_loop(_setup, no_row_step, _on_request, _victim, _on_evict, _on_insert, no_row_step, S3FIFO, LIST,
                        cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state)
