"""hobbit: the lowest w * recency rank + (1 - w) * frequency rank among the candidates, ties to the least
recent (``moesim.policies.eviction`` has the class).

- SCAN (small caches): every candidate ranked against every other;
- VECTOR (mid-sized caches, up to VECTOR_MAX_SLOTS): every resident's two ranks kept per slot, updated by
  one branch-free pass per request ("rank vectors"). Measured (19.2M requests, one global cache of 128
  slots, sequential, 2-core AMD EPYC): the staircase 7.2-7.8M/s, the rank vectors 25-31M/s. Their counts
  are int32: exact while no key can count more, i.e. up to RANKS_MAX_REQUESTS requests; a longer stream
  takes the staircase;
- HEAP (larger caches): only the "staircase" is ranked (the keys counting less than every less recent
  key), where the victim must be. A weight outside [0, 1] breaks the staircase argument: the scan then.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from moesim.simulator.policy_kernels.state import (
    COUNT,
    DEST,
    FLAG,
    HEAP,
    HEAP_MIN_SLOTS,
    LAST,
    NEXT,
    OCCUPANCY,
    RESIDENT,
    SCAN,
    SLOT,
    SLOT_BITS,
    SLOT_MASK,
    VECTOR,
    VECTOR_MAX_SLOTS,
    evict,
    list_append,
    list_unlink,
    move_to_tail,
    new_replay,
    open_row,
    orderable,
    slot_append,
    slot_remove,
)

HOBBIT = 11
W_RECENCY = 0  # fparams[W_RECENCY]: the weight of the recency rank
RANKS_MAX_REQUESTS = (1 << 31) - 1


def layout_for(policy: int, largest: int, requests: int, fparams: np.ndarray) -> int:
    if largest < HEAP_MIN_SLOTS:
        return SCAN
    if largest <= VECTOR_MAX_SLOTS and requests <= RANKS_MAX_REQUESTS:
        return VECTOR
    return HEAP if 0.0 <= fparams[W_RECENCY] <= 1.0 else SCAN


@njit(cache=True, nogil=True, _nrt=False)
def _scan_victim(c, t0, w, nodes, caches, slots):
    """Every candidate ranked against every other: O(K^2) per victim (small caches)."""
    best = -1
    b_s = 0.0
    occ = caches[c, OCCUPANCY]
    for i in range(occ):
        u = slots[c, i]
        if nodes[LAST, u] > t0:
            continue
        rec = 0
        cnt = 0
        for i2 in range(occ):
            v = slots[c, i2]
            if v == u or nodes[LAST, v] > t0:
                continue
            if nodes[LAST, v] < nodes[LAST, u]:
                rec += 1
            if nodes[COUNT, v] < nodes[COUNT, u] or (nodes[COUNT, v] == nodes[COUNT, u] and nodes[LAST, v] < nodes[LAST, u]):
                cnt += 1
        s = w * rec + (1 - w) * cnt
        if best < 0 or s < b_s or (s == b_s and nodes[LAST, u] < nodes[LAST, best]):
            best = u
            b_s = s
    return best


# ---- the staircase (HEAP layout) ---------------------------------------------------------------------
# A candidate u with an older candidate v that counts no more than u loses to v: v has the lower
# recency rank and the lower (count, LAST) rank, so v's score is at most u's (in floats too: rounding is
# monotone) and v wins ties as the less recent. The victim is therefore on the *staircase*: in recency
# order (least recent first), the keys counting less than every older key. Along it counts fall, so
# for a key on it every older key counts more, and its frequency rank is simply the number of keys
# counting less. The staircase is short (measured: ~16 of 128 residents of one global cache on a
# Mixtral trace); it is kept per cache in stairs[:, c, :caches[c, STAIRS]], least recent first, with each
# key's recency rank (ST_RECENCY) and frequency rank (ST_FREQ) among the residents, which each event shifts
# for a contiguous run of it (found by binary search: LAST grows and counts fall along it); the victim is
# the lowest w * ST_RECENCY + (1 - w) * ST_FREQ (less the row's keys counting less) on it. It holds no key
# of the current row (those are the most recent): a row key leaves it when accessed, and the row's keys
# join it, if they count little enough, when the row ends. nodes[FLAG, u]: u is on it. The residents are
# also kept on an LRU list (list 0).
ST_NODE, ST_COUNT, ST_LAST, ST_RECENCY, ST_FREQ, SLOT_COUNT, TMP_NODE, TMP_RECENCY = range(8)
# SLOT_COUNT: the residents' counts in slot order; TMP_*: scratch for _stairs_expose
STAIRS = DEST  # caches column: the staircase's length (hobbit has no destination list)
NO_COUNT = 1 << 62  # above every count


@njit(cache=True, nogil=True, inline="always")
def _count_below(stairs, c, occ, x):
    """Residents counting less than ``x`` (a plain loop the compiler vectorises: cheaper than a tree at
    these sizes)."""
    cn = stairs[SLOT_COUNT, c]
    k = 0
    for i in range(occ):
        k += 1 if cn[i] < x else 0
    return k


@njit(cache=True, nogil=True, _nrt=False)
def _stairs_expose(c, k, start, t0, nodes, caches, stairs):
    """The staircase key at index ``k`` leaves it (the recency ranks after it already lowered; its
    own still its rank): in its place come the keys it hid, i.e. walking the LRU list from ``start``
    (the node after it) to the next staircase key, those counting less than the staircase key before
    it and than every key passed. Row keys (LAST > t0) are skipped: they are the most recent, wherever
    the list still has them."""
    ms = caches[c, STAIRS]
    thr = stairs[ST_COUNT, c, k - 1] if k > 0 else NO_COUNT
    r1 = stairs[ST_RECENCY, c, k]  # the recency rank of the first candidate after it, once it is gone
    stop = stairs[ST_NODE, c, k + 1] if k + 1 < ms else -1
    n_new = 0
    u = start
    while u != stop:
        if nodes[LAST, u] <= t0:
            if nodes[COUNT, u] < thr:
                thr = nodes[COUNT, u]
                stairs[TMP_NODE, c, n_new] = u
                stairs[TMP_RECENCY, c, n_new] = r1
                n_new += 1
            r1 += 1
        u = nodes[NEXT, u]
    shift = n_new - 1
    if shift > 0:
        for i in range(ms - 1, k, -1):
            for f in range(ST_FREQ + 1):
                stairs[f, c, i + shift] = stairs[f, c, i]
    elif shift < 0:
        for i in range(k + 1, ms):
            for f in range(ST_FREQ + 1):
                stairs[f, c, i - 1] = stairs[f, c, i]
    occ = caches[c, OCCUPANCY]
    for t in range(n_new):
        y = stairs[TMP_NODE, c, t]
        nodes[FLAG, y] = 1
        stairs[ST_NODE, c, k + t] = y
        stairs[ST_COUNT, c, k + t] = nodes[COUNT, y]
        stairs[ST_LAST, c, k + t] = nodes[LAST, y]
        stairs[ST_RECENCY, c, k + t] = stairs[TMP_RECENCY, c, t]
        stairs[ST_FREQ, c, k + t] = _count_below(stairs, c, occ, nodes[COUNT, y])
    caches[c, STAIRS] = ms + shift


@njit(cache=True, nogil=True, inline="always")
def _stairs_access(c, u, t0, last_before, nodes, caches, stairs):
    """Resident ``u`` becomes the most recent and counts one more."""
    stairs[SLOT_COUNT, c, nodes[SLOT, u]] += 1
    ms = caches[c, STAIRS]
    lo = 0  # those requested after u: one older key less
    hi = ms
    while lo < hi:
        mid = (lo + hi) >> 1
        if stairs[ST_LAST, c, mid] <= last_before:
            lo = mid + 1
        else:
            hi = mid
    for i in range(lo, ms):
        stairs[ST_RECENCY, c, i] -= 1
    cnt = nodes[COUNT, u]
    q = 0  # the one counting what u counts now: one key counting less, less
    hi = ms
    while q < hi:
        mid = (q + hi) >> 1
        if stairs[ST_COUNT, c, mid] > cnt:
            q = mid + 1
        else:
            hi = mid
    if q < ms and stairs[ST_COUNT, c, q] == cnt:
        stairs[ST_FREQ, c, q] -= 1
    if nodes[FLAG, u]:  # u itself was on it, at lo - 1
        nodes[FLAG, u] = 0
        _stairs_expose(c, lo - 1, nodes[NEXT, u], t0, nodes, caches, stairs)


@njit(cache=True, nogil=True, inline="always")
def _stairs_victim(c, w, row_counts, n_row, caches, stairs):
    """The staircase index of the lowest w * recency rank + (1 - w) * frequency rank (ranks among the
    candidates: less the resident row keys counting less), ties to the least recent; a later key scores
    at least w * its recency rank."""
    k_v = -1
    best_s = 0.0
    for i in range(caches[c, STAIRS]):
        d = stairs[ST_RECENCY, c, i]
        if k_v >= 0 and w * d >= best_s:
            break
        r2 = stairs[ST_FREQ, c, i]
        for j2 in range(n_row):
            r2 -= 1 if row_counts[j2] < stairs[ST_COUNT, c, i] else 0
        s_i = w * d + (1 - w) * r2
        if k_v < 0 or s_i < best_s:
            k_v = i
            best_s = s_i
    return k_v


@njit(cache=True, nogil=True, inline="always")
def _stairs_evict(c, v, k_v, i, last, t0, nodes, caches, stairs):
    """Victim ``v`` (staircase index ``k_v``) left slot ``i`` to the resident of slot ``last``."""
    stairs[SLOT_COUNT, c, i] = stairs[SLOT_COUNT, c, last]
    nodes[FLAG, v] = 0
    for i2 in range(k_v):  # the older ones count more than v
        stairs[ST_FREQ, c, i2] -= 1
    for i2 in range(k_v + 1, caches[c, STAIRS]):
        stairs[ST_RECENCY, c, i2] -= 1
    _stairs_expose(c, k_v, nodes[NEXT, v], t0, nodes, caches, stairs)
    list_unlink(v, c, nodes, caches)


@njit(cache=True, nogil=True, inline="always")
def _stairs_insert(c, u, i, nodes, caches, stairs):
    """``u`` took slot ``i``: it joins the staircase when the row ends; one more key counting less than
    those counting more."""
    cnt = nodes[COUNT, u]
    stairs[SLOT_COUNT, c, i] = cnt
    for i2 in range(caches[c, STAIRS]):
        if stairs[ST_COUNT, c, i2] <= cnt:
            break
        stairs[ST_FREQ, c, i2] += 1
    list_append(u, c, 0, nodes, caches)


@njit(cache=True, nogil=True, inline="always")
def _stairs_row_end(c, r, base, keys, nodes, caches, stairs):
    """The row's keys become the most recent (router order) and join the staircase where they count less
    than every older key."""
    w = keys.shape[1]
    for j in range(w):
        move_to_tail(base + keys[r, j], c, 0, nodes, caches)
    occ = caches[c, OCCUPANCY]
    for j in range(w):
        u = base + keys[r, j]
        ms = caches[c, STAIRS]
        if ms == 0 or nodes[COUNT, u] < stairs[ST_COUNT, c, ms - 1]:
            nodes[FLAG, u] = 1
            stairs[ST_NODE, c, ms] = u
            stairs[ST_COUNT, c, ms] = nodes[COUNT, u]
            stairs[ST_LAST, c, ms] = nodes[LAST, u]
            stairs[ST_RECENCY, c, ms] = occ - w + j
            stairs[ST_FREQ, c, ms] = _count_below(stairs, c, occ, nodes[COUNT, u])
            caches[c, STAIRS] = ms + 1


# ---- rank vectors (VECTOR layout) --------------------------------------------------------------------
# Per cache and slot, every resident's recency rank (recency: residents requested before it), frequency
# rank (freq: residents before it in (count, LAST) order) and count (counts), kept exact by one branch-free
# (vectorised) pass per event: a request shifts the ranks between its old and new place; an insertion,
# into the victim's slot, closes the victim's gap and opens the newcomer's in the same pass. The victim is
# the lowest w * recency + (1 - w) * freq over the candidates, ties to the least recent, in one more pass.
# Why these are the ranks among the candidates: the resident row keys were requested after every
# candidate (LAST > t0), so they hold the top recency ranks (a candidate is a slot with recency <
# occupancy - resident row keys), and a row key x precedes candidate v in (count, LAST) order iff
# count(x) < count(v): freq is lowered for those while the victim is chosen. The score is compared exactly
# as the class's float: as an integer where the weight allows (_weight_bits), else as the float itself
# (``orderable`` keeps the order of negative floats too: any weight works). Ranks are int16 (a cache of at
# most VECTOR_MAX_SLOTS slots) and counts int32 (see RANKS_MAX_REQUESTS): narrow vector lanes.
NO_RANK = (1 << 15) - 1  # above every rank
WEIGHT_BITS = 20
KEY_MAX = (1 << 63) - 1


@njit(cache=True, nogil=True)
def _weight_bits(w):
    """``m`` if the weight is m / 2^WEIGHT_BITS exactly for an integer 0 <= m <= 2^WEIGHT_BITS (0, 1/4,
    1/2, ...), else -1. Then w * r and (1 - w) * f are exact for ranks below 2^SLOT_BITS, and so is their
    sum (at most WEIGHT_BITS + SLOT_BITS + 1 bits): the class's float score is (m * r + (2^WEIGHT_BITS - m)
    * f) / 2^WEIGHT_BITS, and the victim is found comparing those integers, ties and all."""
    if not 0.0 <= w <= 1.0:
        return -1
    m = w * (1 << WEIGHT_BITS)
    return int(m) if m == math.floor(m) else -1


@njit(cache=True, nogil=True, inline="always")
def _ranks_access(c, u, nodes, caches, recency, freq, counts):
    """Resident ``u`` becomes the most recent and, counting one more with the newest LAST, passes every
    resident after it that counts at most what u counts now."""
    occ = caches[c, OCCUPANCY]
    s_u = nodes[SLOT, u]
    cnt = np.int32(nodes[COUNT, u])  # int32 like counts (the compiler compares 16 per vector)
    r0 = recency[c, s_u]
    f0 = freq[c, s_u]
    moved = 0
    for i in range(occ):
        recency[c, i] -= recency[c, i] > r0
        d = (freq[c, i] > f0) & (counts[c, i] <= cnt)
        freq[c, i] -= d
        moved += d
    recency[c, s_u] = occ - 1
    freq[c, s_u] = f0 + moved
    counts[c, s_u] = cnt


@njit(cache=True, nogil=True, inline="always")
def _ranks_insert(c, u, hole, r, base, keys, nodes, caches, slots, recency, freq, counts):
    """``u`` goes into the victim's slot (its gap closes) or a free one; every resident after u in (count,
    LAST) order moves up one (u taken as requested after every resident: the row keys requested after it
    are put right below)."""
    occ = caches[c, OCCUPANCY]
    cnt = np.int32(nodes[COUNT, u])
    i = occ
    r0 = np.int16(NO_RANK)  # int16 like the ranks (and cnt int32 like counts): narrow vector lanes
    f0 = np.int16(NO_RANK)
    nf = 0
    if hole >= 0:
        i = hole
        r0 = recency[c, i]
        f0 = freq[c, i]
        nf -= counts[c, i] <= cnt
        occ += 1
    for t in range(occ):
        recency[c, t] -= recency[c, t] > r0
        up = counts[c, t] > cnt
        freq[c, t] += up - (freq[c, t] > f0)
        nf += 1 - up
    recency[c, i] = caches[c, OCCUPANCY]
    freq[c, i] = nf
    counts[c, i] = cnt
    slots[c, i] = u
    nodes[SLOT, u] = i
    for j2 in range(keys.shape[1]):  # row keys requested after u: u is before them in both orders
        x = base + keys[r, j2]
        if nodes[RESIDENT, x] and nodes[LAST, x] > nodes[LAST, u]:
            ix = nodes[SLOT, x]
            recency[c, ix] += 1
            recency[c, i] -= 1
            if counts[c, ix] == cnt:
                freq[c, ix] += 1
                freq[c, i] -= 1


# ---- the replay ------------------------------------------------------------------------------------

@njit(cache=True, nogil=True, inline="always")
def _replay(layout, cache, keys, group, sizes, n_keys, n_groups, fparams):
    n, w = keys.shape
    if layout == VECTOR and n * w > RANKS_MAX_REQUESTS:
        raise ValueError("hobbit's rank vectors count in int32: a longer stream takes the staircase (layout_for)")
    n_caches = sizes.shape[0]
    req, hit, nodes, caches = new_replay(n_caches, n_keys, n_groups)
    kmax = max(1, sizes.max())
    slots = np.full((n_caches, kmax), -1, np.int64)
    row_counts = np.empty(w + 1, np.int64)  # the resident row keys' counts
    wr = fparams[W_RECENCY]
    stairs = np.zeros((TMP_RECENCY + 1, n_caches, kmax + 1) if layout == HEAP else (1, 1, 1), np.int64)
    shape = (n_caches, kmax) if layout == VECTOR else (1, 1)
    recency = np.zeros(shape, np.int16)
    freq = np.zeros(shape, np.int16)
    counts = np.zeros(shape, np.int32)
    scores = np.zeros(shape[1], np.int64)  # the victim's scratch: the scores (as orderable int64)
    w_num = _weight_bits(wr) if layout == VECTOR else -1
    per_r = (w_num << 2 * SLOT_BITS) + (1 << SLOT_BITS)  # exact scores' key: per recency rank, per frequency rank
    per_f = ((1 << WEIGHT_BITS) - w_num) << 2 * SLOT_BITS
    tick = 0
    for r in range(n):
        c, g, size = open_row(r, cache, group, sizes, req, w)
        if size == 0:
            continue
        base = c * n_keys
        t0 = tick  # the row's keys are exactly the nodes with LAST > t0 from here on
        for j in range(w):  # look up + access, router order
            u = base + keys[r, j]
            last_before = nodes[LAST, u]
            tick += 1
            nodes[LAST, u] = tick
            nodes[COUNT, u] += 1
            if nodes[RESIDENT, u]:
                hit[g] += 1
                if layout == HEAP:
                    _stairs_access(c, u, t0, last_before, nodes, caches, stairs)
                elif layout == VECTOR:
                    _ranks_access(c, u, nodes, caches, recency, freq, counts)
        for j in range(w):  # insert the missing keys, router order, evicting keys outside the row
            u = base + keys[r, j]
            if nodes[RESIDENT, u]:
                continue
            hole = -1  # rank vectors: the victim's slot, which the newcomer takes
            if caches[c, OCCUPANCY] >= size:
                n_row = 0
                if layout != SCAN:
                    for j2 in range(w):
                        x = base + keys[r, j2]
                        if nodes[RESIDENT, x]:
                            row_counts[n_row] = nodes[COUNT, x]
                            n_row += 1
                k_v = -1
                if layout == HEAP:
                    k_v = _stairs_victim(c, wr, row_counts, n_row, caches, stairs)
                    v = stairs[ST_NODE, c, k_v]
                elif layout == VECTOR:  # the lowest score among the candidates, ties to the lowest recency rank.
                    # Written out: as an inlined helper its loops kept numba from pruning six reference count
                    # pairs of its arrays per eviction
                    occ = caches[c, OCCUPANCY]
                    for j2 in range(n_row):  # each resident row key lowers freq where it counts less
                        cx = np.int32(row_counts[j2])
                        for i in range(occ):
                            freq[c, i] -= cx < counts[c, i]
                    n_cand = occ - n_row
                    pick = KEY_MAX
                    if w_num >= 0:  # exact scores: the key (m r + (2^WEIGHT_BITS - m) f, r, slot)
                        for i in range(occ):
                            x = np.int64(recency[c, i])
                            pick = min(pick, x * per_r + np.int64(freq[c, i]) * per_f + i if x < n_cand else KEY_MAX)
                    else:
                        best = KEY_MAX
                        for i in range(occ):
                            k = orderable(wr * float(recency[c, i]) + (1 - wr) * float(freq[c, i]))
                            k = k if recency[c, i] < n_cand else KEY_MAX
                            scores[i] = k
                            best = min(best, k)
                        for i in range(occ):
                            pick = min(pick, (np.int64(recency[c, i]) << SLOT_BITS) | i if scores[i] == best else KEY_MAX)
                    for j2 in range(n_row):
                        cx = np.int32(row_counts[j2])
                        for i in range(occ):
                            freq[c, i] += cx < counts[c, i]
                    v = slots[c, pick & SLOT_MASK]
                else:
                    v = _scan_victim(c, t0, wr, nodes, caches, slots)
                evict(v, c, nodes, caches)
                if layout == VECTOR:
                    hole = nodes[SLOT, v]
                else:
                    i, last = slot_remove(v, c, nodes, caches, slots)
                    if layout == HEAP:
                        _stairs_evict(c, v, k_v, i, last, t0, nodes, caches, stairs)
            nodes[RESIDENT, u] = 1
            if layout == VECTOR:
                _ranks_insert(c, u, hole, r, base, keys, nodes, caches, slots, recency, freq, counts)
            else:
                i = slot_append(u, c, nodes, caches, slots)
                if layout == HEAP:
                    _stairs_insert(c, u, i, nodes, caches, stairs)
            caches[c, OCCUPANCY] += 1
        if layout == HEAP:
            _stairs_row_end(c, r, base, keys, nodes, caches, stairs)
    return req, hit


@njit(cache=True, nogil=True)
def replay_hobbit(layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state):
    if layout == VECTOR:
        return _replay(VECTOR, cache, keys, group, sizes, n_keys, n_groups, fparams)
    if layout == HEAP and 0.0 <= fparams[W_RECENCY] <= 1.0:  # else the staircase argument fails: the scan
        return _replay(HEAP, cache, keys, group, sizes, n_keys, n_groups, fparams)
    return _replay(SCAN, cache, keys, group, sizes, n_keys, n_groups, fparams)
