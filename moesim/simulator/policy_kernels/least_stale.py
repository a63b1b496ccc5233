"""least-stale (SpecMD, arXiv 2602.03921; the class in ``moesim.policies.eviction``): one queue per cache, a
key moved to its end at its first request in a token (``STAMP``: the token it last moved in), a victim
taken from its head. O(1) per request."""

from __future__ import annotations

import numpy as np
from numba import njit

from moesim.simulator.policy_kernels.loop import no_row_step, no_state, request_loop
from moesim.simulator.policy_kernels.state import (
    HEAD,
    LIST,
    STAMP,
    first_allowed,
    list_append,
    list_unlink,
    move_to_tail,
)

LEAST_STALE = 13


def layout_for(policy: int, largest: int, requests: int, fparams: np.ndarray) -> int:
    return LIST


@njit(cache=True, nogil=True, _nrt=False)
def _on_request(policy, layout, u, resident, last_before, r, j, c, t0, now, size, weights, next_use, fparams, nodes,
                caches, slots, extra):
    """A stale hit becomes fresh."""
    if resident and nodes[STAMP, u] != now:
        move_to_tail(u, c, 0, nodes, caches)
        nodes[STAMP, u] = now


@njit(cache=True, nogil=True, _nrt=False)
def _victim(policy, layout, u, r, c, t0, now, size, base, keys, fparams, nodes, caches, slots, extra):
    return first_allowed(caches[c, HEAD], t0, nodes)


@njit(cache=True, nogil=True, _nrt=False)
def _on_evict(policy, layout, v, c, t0, nodes, caches, slots, extra):
    list_unlink(v, c, nodes, caches)
    return -1


@njit(cache=True, nogil=True, _nrt=False)
def _on_insert(policy, layout, u, hole, r, c, now, base, keys, nodes, caches, slots, extra):
    list_append(u, c, 0, nodes, caches)
    nodes[STAMP, u] = now


@njit(cache=True, nogil=True)
def replay_least_stale(layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams,
                       rng_state):
    return request_loop(no_state, no_row_step, _on_request, _victim, _on_evict, _on_insert, no_row_step, LEAST_STALE,
                        LIST, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams,
                        rng_state)
