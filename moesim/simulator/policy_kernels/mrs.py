"""mrs (HybriMoE's "Minus Recent Score", arXiv 2504.05897; the class in ``moesim.policies.eviction``): per
key a score and the token it was last updated in (``STAMP``), decayed lazily by (1 - alpha) per token; the
victim is the lowest decayed score outside the row (a scan of the slots), ties to the least recently
requested. The decay factors of the first DECAY_TABLE ages are computed once per replay, with the class's
expression."""

from __future__ import annotations

import numpy as np
from numba import njit

from moesim.simulator.policy_kernels.loop import leave_slot, no_row_step, request_loop, take_slot
from moesim.simulator.policy_kernels.state import (
    LAST,
    OCCUPANCY,
    SCAN,
    STAMP,
)

MRS = 15
ALPHA = 0  # fparams[ALPHA]
DECAY_TABLE = 2048


def layout_for(policy: int, largest: int, requests: int, fparams: np.ndarray) -> int:
    return SCAN


@njit(cache=True, nogil=True, inline="always")
def _keep(d, keep, table):
    """(1 - alpha) ** d, the class's float: from the table for the ages it holds."""
    if d < table.shape[0]:
        return table[d]
    return keep ** float(d)


@njit(cache=True, nogil=True, inline="always")
def _setup(policy, layout, n, w, sizes, n_keys, fparams, rng_state, caches):
    """(per key its score, the decay factors of the first DECAY_TABLE ages)."""
    keep = 1.0 - fparams[ALPHA]
    table = np.empty(DECAY_TABLE, np.float64)
    for d in range(DECAY_TABLE):
        table[d] = keep ** float(d)
    return np.zeros(sizes.shape[0] * n_keys, np.float64), table


@njit(cache=True, nogil=True, _nrt=False)
def _on_request(policy, layout, u, resident, last_before, r, j, c, t0, now, size, weights, next_use, fparams, nodes,
                caches, slots, extra):
    """The routing weight enters the average."""
    score, table = extra
    alpha = fparams[ALPHA]
    score[u] = score[u] * _keep(now - nodes[STAMP, u], 1.0 - alpha, table) + alpha * float(weights[r, j])
    nodes[STAMP, u] = now


@njit(cache=True, nogil=True, _nrt=False)
def _victim(policy, layout, u, r, c, t0, now, size, base, keys, fparams, nodes, caches, slots, extra):
    """The lowest decayed score outside the row, ties to the least recently requested."""
    score, table = extra
    keep = 1.0 - fparams[ALPHA]
    v = -1
    best = 0.0
    for i in range(caches[c, OCCUPANCY]):
        x = slots[c, i]
        if nodes[LAST, x] > t0:
            continue
        s = score[x] * _keep(now - nodes[STAMP, x], keep, table)
        if v < 0 or s < best or (s == best and nodes[LAST, x] < nodes[LAST, v]):
            v = x
            best = s
    return v


@njit(cache=True, nogil=True)
def replay_mrs(layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state):
    return request_loop(_setup, no_row_step, _on_request, _victim, leave_slot, take_slot, no_row_step, MRS, SCAN,
                        cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state)
