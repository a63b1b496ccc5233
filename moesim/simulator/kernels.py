"""Compiled (numba) helpers of the replay: next-use times (for opt) and LRU stack depths (one-pass mrc).
The replay itself is ``moesim.simulator.policy_kernels``.

Request stream layout, shared by every kernel:
    cache[r]      which cache row r goes to (its MoE layer, or 0 for one global cache)
    keys[r, :]    the keys requested by row r, router order (expert id, or layer*E + expert)
    group[r]      the statistics bucket of row r (its MoE layer)
Sequential semantics are the same kernels fed rows of width 1.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from moesim.policies.base import NEVER


@njit(cache=True, nogil=True)
def stream_kernel(seq, token, layer, experts, n_experts, global_scope):
    """Rows in execution order -> (cache, keys, clock, group), int64: the cache of a row is its layer
    (0 for one global cache), keys are expert ids (or layer * E + expert), the clock counts tokens."""
    n, k = experts.shape
    cache = np.empty(n, np.int64)
    group = np.empty(n, np.int64)
    keys = np.empty((n, k), np.int64)
    clock = np.empty(n, np.int64)
    t = 0
    for r in range(n):
        if r > 0 and (seq[r] != seq[r - 1] or token[r] != token[r - 1]):
            t += 1
        clock[r] = t
        g = np.int64(layer[r])
        group[r] = g
        cache[r] = 0 if global_scope else g
        off = g * n_experts if global_scope else 0
        for j in range(k):
            keys[r, j] = off + experts[r, j]
    return cache, keys, clock, group


@njit(cache=True, nogil=True)
def next_use_kernel(cache: np.ndarray, keys: np.ndarray, n_keys: int, n_caches: int) -> np.ndarray:
    """For every request, the row index of the next row of the same cache requesting the same key."""
    n, k = keys.shape
    out = np.empty((n, k), np.int64)
    seen = np.full((n_caches, n_keys), NEVER, np.int64)
    for r in range(n - 1, -1, -1):
        c = cache[r]
        for j in range(k):
            key = keys[r, j]
            out[r, j] = seen[c, key]
        for j in range(k):
            seen[c, keys[r, j]] = r
    return out


@njit(cache=True, nogil=True)
def lru_stack_depths(cache: np.ndarray, keys: np.ndarray, n_keys: int, n_caches: int) -> np.ndarray:
    """Histogram of LRU stack depths (0-based) before each row's update; never-seen keys land in the
    last bin. Under the atomic semantics the cache of size K always holds the K most recent keys, so
    hits(K) = sum(hist[:K]) for every K >= top-k at once (the inclusion property)."""
    n, k = keys.shape
    stack = np.full((n_caches, n_keys), -1, np.int64)  # stack[c, 0] is the most recent
    depth_of = np.full((n_caches, n_keys), -1, np.int64)
    used = np.zeros(n_caches, np.int64)
    hist = np.zeros(n_keys + 1, np.int64)
    for r in range(n):
        c = cache[r]
        for j in range(k):
            d = depth_of[c, keys[r, j]]
            hist[d if d >= 0 else n_keys] += 1
        for j in range(k):  # move to front one after another, router order
            key = keys[r, j]
            d = depth_of[c, key]
            if d < 0:
                d = used[c]
                used[c] += 1
            for t in range(d, 0, -1):
                moved = stack[c, t - 1]
                stack[c, t] = moved
                depth_of[c, moved] = t
            stack[c, 0] = key
            depth_of[c, key] = 0
    return hist


@njit(cache=True, nogil=True)
def stream_fill(seq, token, layer, experts, n_experts, global_scope, lo, hi, cache, keys, clock, group):
    """:func:`stream_kernel` for rows ``lo:hi`` into preallocated arrays (threads fill disjoint row
    ranges). The clock starts at 0 at row ``lo``; returns the clock of row ``hi - 1``. With the
    per-layer scope ``cache`` is not written (the caller passes ``group`` as the cache ids)."""
    k = experts.shape[1]
    t = 0
    for r in range(lo, hi):
        if r > lo and (seq[r] != seq[r - 1] or token[r] != token[r - 1]):
            t += 1
        clock[r] = t
        g = np.int64(layer[r])
        group[r] = g
        off = 0
        if global_scope:
            cache[r] = 0
            off = g * n_experts
        for j in range(k):
            keys[r, j] = off + experts[r, j]
    return t


@njit(cache=True, nogil=True)
def shift(a, lo, hi, by):
    """a[lo:hi] += by, in place (the clock of a later row range once the earlier ones are counted)."""
    for r in range(lo, hi):
        a[r] += by
