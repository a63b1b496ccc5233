"""Compiled (numba) replay kernels for the built-in policies whose state is a few stamps per key.

State is array-based: caches are tiny (2..256 slots), so a victim is found by a linear scan over the
resident slots. The kernels implement exactly the semantics of the reference classes in
``moesim.policies.eviction`` (tested event for event in tests/test_replay_fast.py).

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

LRU, FIFO, LFU, OPT = 0, 1, 2, 3
POLICY_CODES = {"lru": LRU, "fifo": FIFO, "lfu": LFU, "opt": OPT}


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
def replay_kernel(policy: int, cache: np.ndarray, keys: np.ndarray, group: np.ndarray, sizes: np.ndarray,
                  n_keys: int, n_groups: int, nxt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Atomic per-row replay; returns (requests, hits) per group."""
    n, k = keys.shape
    n_caches = sizes.shape[0]
    kmax = max(1, sizes.max())
    slots = np.full((n_caches, kmax), -1, np.int64)
    occ = np.zeros(n_caches, np.int64)
    resident = np.zeros((n_caches, n_keys), np.bool_)
    last = np.zeros((n_caches, n_keys), np.int64)
    count = np.zeros((n_caches, n_keys), np.int64)
    inserted = np.zeros((n_caches, n_keys), np.int64)
    next_use = np.zeros((n_caches, n_keys), np.int64)
    req = np.zeros(n_groups, np.int64)
    hit = np.zeros(n_groups, np.int64)
    tick = 0
    for r in range(n):
        c = cache[r]
        g = group[r]
        size = sizes[c]
        req[g] += k
        for j in range(k):
            key = keys[r, j]
            if resident[c, key]:
                hit[g] += 1
            tick += 1
            last[c, key] = tick
            count[c, key] += 1
            if policy == OPT:
                next_use[c, key] = nxt[r, j]
        if size == 0:
            continue
        for j in range(k):
            key = keys[r, j]
            if resident[c, key]:
                continue
            if occ[c] < size:
                s = occ[c]
                occ[c] += 1
            else:
                s = -1
                best0 = 0
                best1 = 0
                for t in range(size):
                    v = slots[c, t]
                    in_set = False
                    for jj in range(k):
                        if keys[r, jj] == v:
                            in_set = True
                    if in_set:
                        continue
                    if policy == LRU:
                        p0 = last[c, v]
                        p1 = 0
                    elif policy == FIFO:
                        p0 = inserted[c, v]
                        p1 = 0
                    elif policy == LFU:
                        p0 = count[c, v]
                        p1 = last[c, v]
                    else:  # OPT: farthest next use is the lowest priority
                        p0 = -next_use[c, v]
                        p1 = 0
                    if s < 0 or p0 < best0 or (p0 == best0 and p1 < best1):
                        s = t
                        best0 = p0
                        best1 = p1
                if s < 0:  # cannot happen when size >= k (checked by the caller)
                    continue
                resident[c, slots[c, s]] = False
            slots[c, s] = key
            resident[c, key] = True
            tick += 1
            inserted[c, key] = tick
    return req, hit


@njit(cache=True, nogil=True)
def replay_sizes_kernel(policy: int, cache: np.ndarray, keys: np.ndarray, group: np.ndarray,
                        size_list: np.ndarray, n_caches: int, n_keys: int, n_groups: int,
                        nxt: np.ndarray) -> np.ndarray:
    """Hits for each uniform cache size in ``size_list`` (one replay per size, one compiled call)."""
    out = np.zeros(size_list.shape[0], np.int64)
    for i in range(size_list.shape[0]):
        sizes = np.full(n_caches, size_list[i], np.int64)
        _, hit = replay_kernel(policy, cache, keys, group, sizes, n_keys, n_groups, nxt)
        out[i] = hit.sum()
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
