"""lfu, lfu-cache, opt, lfu-decay, gate-weighted, lrfu: a per-key value; the victim is the lowest score,
ties to the least recently requested.

Three layouts, chosen by the largest cache (``layout_for``):

- SCAN (< HEAP_MIN_SLOTS slots, the per-layer default): a scan of the resident slots;
- VECTOR (up to VECTOR_MAX_SLOTS, e.g. a global cache of 128 or 256) for opt and the decaying scores: one
  int64 key per slot, kept up to date in O(1) per request, the victim found by two branch-free passes
  (measured, 19.2M requests, one global cache of 128 slots, sequential: lfu-decay 12 -> 30M/s, opt 15 ->
  30M/s against the heap);
- HEAP (larger caches; lfu and lfu-cache from HEAP_MIN_SLOTS up, their heap is as fast): an indexed binary
  heap over the slots, O(log K) per request (one global cache of 16 slots, 1.4-1.8x faster than the scan:
  lfu 57 vs 31, opt 38 vs 22M/s; of 64 slots 1.4-6x).

The decaying scores read their decay factors from a table made once per replay (the same floats).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from moesim.simulator.policy_kernels.loop import request_loop
from moesim.simulator.policy_kernels.state import (
    COUNT,
    HEAP,
    HEAP_MIN_SLOTS,
    KEY_MAX,
    LAST,
    NEXT_USE,
    OCCUPANCY,
    SCAN,
    SLOT,
    SLOT_BITS,
    SLOT_MASK,
    STAMP,
    VECTOR,
    VECTOR_MAX_SLOTS,
    from_orderable,
    new_replay,
    orderable,
    slot_append,
    slot_remove,
)

LFU, OPT, LFU_CACHE, LFU_DECAY, GATE_WEIGHTED, LRFU = 2, 3, 4, 5, 6, 7
RATE = 0  # fparams[RATE]: lfu-decay's and gate-weighted's decay rate per token, lrfu's lambda
# the decay factors of the first DECAY_TABLE ages (clock ticks) are computed once per replay: the access and
# the victim read them instead of an exp (or a pow) per request
DECAY_TABLE = 2048


def layout_for(policy: int, largest: int, requests: int, fparams: np.ndarray) -> int:
    if largest < HEAP_MIN_SLOTS:
        return SCAN
    if policy in (OPT, LFU_DECAY, GATE_WEIGHTED, LRFU) and largest <= VECTOR_MAX_SLOTS:
        return VECTOR
    return HEAP


# ---- scores --------------------------------------------------------------------------------------

@njit(cache=True, nogil=True, inline="always")
def _decays(policy):
    return policy == LFU_DECAY or policy == GATE_WEIGHTED or policy == LRFU


@njit(cache=True, nogil=True, inline="always")
def _decay_exact(policy, d, fparams):
    """The class's decay over ``d`` clock ticks: LRFU's 0.5 ** (lam * d), LFUDecay's e^(-rate * d)."""
    if policy == LRFU:
        return 0.5 ** (fparams[RATE] * float(d))
    return math.exp((-fparams[RATE]) * float(d))


@njit(cache=True, nogil=True, inline="always")  # an allocation the loop reads: inlined (state.new_state)
def decay_table(policy, fparams):
    """The decay factors of the ages 0 .. DECAY_TABLE - 1, each the very float :func:`_decay_exact` computes."""
    table = np.empty(DECAY_TABLE if _decays(policy) else 1, np.float64)
    for d in range(table.shape[0]):
        table[d] = _decay_exact(policy, d, fparams)
    return table


@njit(cache=True, nogil=True, inline="always")
def _decay(policy, d, fparams, table):
    """:func:`_decay_exact`, read from the table for the ages it holds (the same float: the same expression)."""
    if d < table.shape[0]:
        return table[d]
    return _decay_exact(policy, d, fparams)


@njit(cache=True, nogil=True, inline="always")
def access(policy, u, r, j, now, nodes, value, weights, next_use, fparams, table):
    """Key ``u`` is requested (row ``r``, position ``j``, clock ``now``): its count, next use or score."""
    if policy == LFU or policy == LFU_CACHE:
        nodes[COUNT, u] += 1
    elif policy == OPT:
        nodes[NEXT_USE, u] = next_use[r, j]
    elif policy == LRFU:
        value[u] = 1.0 + value[u] * _decay(policy, now - nodes[STAMP, u], fparams, table)
        nodes[STAMP, u] = now
    else:  # lfu-decay, gate-weighted
        inc = 1.0 if policy == LFU_DECAY else float(weights[r, j])
        value[u] = value[u] * _decay(policy, now - nodes[STAMP, u], fparams, table) + inc
        nodes[STAMP, u] = now


@njit(cache=True, nogil=True, inline="always")
def score(policy, u, now, fparams, nodes, value, table):
    """Eviction score of a resident node (lowest goes first)."""
    if policy == LFU or policy == LFU_CACHE:
        return float(nodes[COUNT, u])
    if policy == OPT:
        return -float(nodes[NEXT_USE, u])
    return value[u] * _decay(policy, now - nodes[STAMP, u], fparams, table)  # lrfu, lfu-decay, gate-weighted


@njit(cache=True, nogil=True, inline="always")
def evicts_first(policy, score_a, last_a, key_a, score_b, last_b, key_b):
    """Whether ``a`` goes before ``b``: the lower score; ties: opt, the smaller key (equally far keys give
    the same hits); the others, the least recently requested, then the smaller key (only prefetched keys
    never requested tie there). The timing simulator's victim rule too."""
    if score_a != score_b:
        return score_a < score_b
    if policy == OPT:
        return key_a < key_b
    return last_a < last_b or (last_a == last_b and key_a < key_b)


@njit(cache=True, nogil=True, inline="always")
def _scan_victim(policy, c, t0, now, fparams, nodes, caches, value, slots, table):
    """The first by :func:`evicts_first` among the resident slots outside the row. (Inlined: a call with
    this many array arguments cost more than the scan of a per-layer cache; measured 19 vs 60M requests/s
    for lfu per layer.)"""
    v = -1
    best = 0.0
    for i in range(caches[c, OCCUPANCY]):
        x = slots[c, i]
        if nodes[LAST, x] > t0:
            continue
        s = score(policy, x, now, fparams, nodes, value, table)
        if v < 0 or evicts_first(policy, s, nodes[LAST, x], x, best, nodes[LAST, v], v):
            v = x
            best = s
    return v


# ---- heaps: large caches ---------------------------------------------------------------------------
# The resident slots of cache c, slots[c, :occupancy], kept as a binary min-heap in the order (priority,
# LAST), nodes[SLOT, u] = u's index. For lfu, lfu-cache and opt the priority is the score, which does not
# change between requests. The decaying scores (value * e^(-rate * (now - stamp))) change with ``now`` but
# all by the same factor, so they are heaped by the time-invariant value * e^(rate * (stamp - ref)), with
# e^(rate * (now - ref)) computed once per clock tick and ``ref`` moved up (every key recomputed, the heaps
# rebuilt) before it overflows; the exact victim (the class's float score at ``now``) is then taken among
# the few residents within rounding distance of the smallest (_decay_victim).

@njit(cache=True, nogil=True, inline="always")
def _priority(policy, u, e_now, nodes, value):
    """A resident's heap priority (lowest is evicted first; ties to the lowest LAST); ``e_now`` =
    e^(rate * (now - ref)) for a decaying score just updated (stamp = now)."""
    if policy == OPT:
        return -float(nodes[NEXT_USE, u])  # exact: row indices < 2^53, NEVER = 2^62
    if policy == LFU or policy == LFU_CACHE:
        return float(nodes[COUNT, u])
    return value[u] * e_now


@njit(cache=True, nogil=True, inline="always")
def _heap_put(c, i, u, p_u, l_u, nodes, slots, heap_prio, heap_last):
    """Node ``u`` with priority ``p_u`` and tie ``l_u`` at heap index ``i`` (and its slot index noted)."""
    slots[c, i] = u
    heap_prio[c, i] = p_u
    heap_last[c, i] = l_u
    nodes[SLOT, u] = i


@njit(cache=True, nogil=True, inline="always")
def _sift_up(c, i, nodes, slots, heap_prio, heap_last):
    u = slots[c, i]
    p_u = heap_prio[c, i]
    l_u = heap_last[c, i]
    while i > 0:
        p = (i - 1) >> 1
        if heap_prio[c, p] < p_u or (heap_prio[c, p] == p_u and heap_last[c, p] < l_u):
            break
        _heap_put(c, i, slots[c, p], heap_prio[c, p], heap_last[c, p], nodes, slots, heap_prio, heap_last)
        i = p
    _heap_put(c, i, u, p_u, l_u, nodes, slots, heap_prio, heap_last)
    return i


@njit(cache=True, nogil=True, inline="always")
def _sift_down(c, i, occ, nodes, slots, heap_prio, heap_last):
    u = slots[c, i]
    p_u = heap_prio[c, i]
    l_u = heap_last[c, i]
    while True:
        m = 2 * i + 1
        if m >= occ:
            break
        if m + 1 < occ and (heap_prio[c, m + 1] < heap_prio[c, m]
                            or (heap_prio[c, m + 1] == heap_prio[c, m] and heap_last[c, m + 1] < heap_last[c, m])):
            m += 1
        if p_u < heap_prio[c, m] or (p_u == heap_prio[c, m] and l_u < heap_last[c, m]):
            break
        _heap_put(c, i, slots[c, m], heap_prio[c, m], heap_last[c, m], nodes, slots, heap_prio, heap_last)
        i = m
    _heap_put(c, i, u, p_u, l_u, nodes, slots, heap_prio, heap_last)


@njit(cache=True, nogil=True, inline="always")
def _heap_set(policy, c, i, occ, u, e_now, nodes, value, slots, heap_prio, heap_last):
    """Put node ``u`` (new or with a changed priority) at index ``i`` and restore the heap."""
    slots[c, i] = u
    heap_prio[c, i] = _priority(policy, u, e_now, nodes, value)
    heap_last[c, i] = nodes[LAST, u]
    nodes[SLOT, u] = i
    _sift_down(c, _sift_up(c, i, nodes, slots, heap_prio, heap_last), occ, nodes, slots, heap_prio, heap_last)


@njit(cache=True, nogil=True, inline="always")
def _heap_min(c, t0, occ, heap_prio, heap_last, stack):
    """Index of the first resident in heap order outside the row (``LAST <= t0``). Every ancestor of
    it is in the row (an ancestor outside it would come first), so only the children of row keys
    reachable from the root are looked at: at most (keys of the row) + 1 candidates."""
    best = -1
    top = 1
    stack[0] = 0
    while top > 0:
        top -= 1
        i = stack[top]
        if heap_last[c, i] > t0:
            if 2 * i + 1 < occ:
                stack[top] = 2 * i + 1
                top += 1
            if 2 * i + 2 < occ:
                stack[top] = 2 * i + 2
                top += 1
        elif best < 0 or heap_prio[c, i] < heap_prio[c, best] or \
                (heap_prio[c, i] == heap_prio[c, best] and heap_last[c, i] < heap_last[c, best]):
            best = i
    return best


@njit(cache=True, nogil=True, _nrt=False)
def _rebase(n_caches, caches, nodes, value, slots, heap_prio, heap_last, qrate, ref):
    """Recompute every decaying priority against a new ``ref`` and rebuild the heaps (rare: once per
    ~500 / rate clock ticks). Long-idle keys may underflow to 0; _decay_victim scans then."""
    for c in range(n_caches):
        occ = caches[c, OCCUPANCY]
        for i in range(occ):
            u = slots[c, i]
            heap_prio[c, i] = value[u] * math.exp(qrate * float(nodes[STAMP, u] - ref))
        for i in range(occ // 2 - 1, -1, -1):
            _sift_down(c, i, occ, nodes, slots, heap_prio, heap_last)


@njit(cache=True, nogil=True, _nrt=False)
def _decay_victim(policy, c, t0, now, fparams, nodes, caches, value, slots, heap_prio, heap_last, stack, table):
    """The class's victim for the decaying scores: lowest float score at ``now``, ties to the least
    recently requested, exactly as :func:`_scan_victim`, looking only where it can be.

    The heap priority value * e^(rate * (stamp - ref)) is the score at ``now`` times e^(rate * (now -
    ref)), the same factor for all, up to rounding (relative error ~1e-13: exponents below ~750), so
    the victim's priority is within a relative 1e-9 of the smallest outside the row: the scores of
    those residents are computed exactly as the class does and compared. When the smallest priority
    or score is near the bottom of the float range (rounding is no longer relative there, and the
    class's scores may tie at 0.0), the slots are scanned instead."""
    occ = caches[c, OCCUPANCY]
    m = slots[c, _heap_min(c, t0, occ, heap_prio, heap_last, stack)]
    q = heap_prio[c, nodes[SLOT, m]]
    best_s = score(policy, m, now, fparams, nodes, value, table)
    if not (best_s >= 1e-200 and q >= 1e-200):
        return _scan_victim(policy, c, t0, now, fparams, nodes, caches, value, slots, table)
    bound = q * (1.0 + 1e-9)
    best = m
    top = 1
    stack[0] = 0
    while top > 0:
        top -= 1
        i = stack[top]
        if heap_prio[c, i] > bound:  # and so is every key below it
            continue
        u = slots[c, i]
        if u != m and not heap_last[c, i] > t0:
            s = score(policy, u, now, fparams, nodes, value, table)
            if s < best_s or (s == best_s and nodes[LAST, u] < nodes[LAST, best]):
                best = u
                best_s = s
        if 2 * i + 1 < occ:
            stack[top] = 2 * i + 1
            top += 1
        if 2 * i + 2 < occ:
            stack[top] = 2 * i + 2
            top += 1
    return best


# ---- vector layout: mid-sized caches ----------------------------------------------------------------
# slot_keys[c, i] is the key of slots[c, i]: its priority as an int64 in the priority's order (opt's next
# use, counted down from NO_ROW; a decaying score's time-invariant value * e^(rate * (stamp - ref)) as float
# bits, made monotone by ``orderable``) with its low SLOT_BITS bits replaced by the slot index i. The
# smallest key then names its slot, and keys of equal priority (opt) or of priority within rounding distance
# (the decaying scores, whose low bits are a relative 2^-43) are counted in one more pass and told apart
# exactly only when there are several. A row's keys hold KEY_MAX from their request to the end of the row,
# where their key is written: the minimum is always outside the row. A victim costs two branch-free
# (vectorised) passes over the slots, a request O(1): faster than a heap's sift per request up to a few
# hundred slots.
NO_ROW = 1 << 53  # above every row index: opt's key is NO_ROW - min(next use, NO_ROW), never requested again -> 0


@njit(cache=True, nogil=True, inline="always")
def _slot_key(policy, u, i, e_now, nodes, value):
    """The key of node ``u`` at slot ``i``, just requested (a decaying score's stamp is now)."""
    if policy == OPT:
        p = (NO_ROW - min(nodes[NEXT_USE, u], NO_ROW)) << SLOT_BITS
    else:
        p = orderable(value[u] * e_now)
    return (p & ~SLOT_MASK) | i


@njit(cache=True, nogil=True, inline="always")
def _smallest_key(slot_keys, c, occ):
    """The smallest of slot_keys[c, :occ] (one branch-free pass: vectorised)."""
    m = KEY_MAX
    for i in range(occ):
        m = min(m, slot_keys[c, i])
    return m


@njit(cache=True, nogil=True, inline="always")
def _count_at_most(slot_keys, c, occ, bound):
    """How many of slot_keys[c, :occ] are <= bound (one branch-free pass: vectorised)."""
    n = 0
    for i in range(occ):
        n += slot_keys[c, i] <= bound
    return n


@njit(cache=True, nogil=True, _nrt=False)
def _vector_victim(c, occ, nodes, slots, slot_keys):
    """opt: the farthest next use, ties to the least recently requested (the heap's order)."""
    m = _smallest_key(slot_keys, c, occ)
    bound = m | SLOT_MASK
    if _count_at_most(slot_keys, c, occ, bound) == 1:
        return slots[c, m & SLOT_MASK]
    best = -1
    for i in range(occ):
        if slot_keys[c, i] <= bound:
            u = slots[c, i]
            if best < 0 or nodes[LAST, u] < nodes[LAST, best]:
                best = u
    return best


@njit(cache=True, nogil=True, _nrt=False)
def _vector_decay_victim(policy, c, t0, now, fparams, nodes, caches, value, slots, slot_keys, table):
    """:func:`_decay_victim` over the vector keys: every resident whose priority is within a relative
    1e-9 of the smallest (its key truncated: a relative 2^-43 lower) is a candidate; the candidates are
    scored exactly as the class does (see _decay_victim for why the class's victim is among them, and when
    the slots are scanned instead) unless there is only one."""
    occ = caches[c, OCCUPANCY]
    m = _smallest_key(slot_keys, c, occ)
    q = from_orderable(m & ~SLOT_MASK)
    if not q >= 1e-200:
        return _scan_victim(policy, c, t0, now, fparams, nodes, caches, value, slots, table)
    bound = orderable(q * (1.0 + 1e-9)) | SLOT_MASK
    if _count_at_most(slot_keys, c, occ, bound) == 1:
        best = slots[c, m & SLOT_MASK]
        best_s = score(policy, best, now, fparams, nodes, value, table)
    else:
        best = -1
        best_s = 0.0
        for i in range(occ):
            if slot_keys[c, i] <= bound:
                u = slots[c, i]
                s = score(policy, u, now, fparams, nodes, value, table)
                if best < 0 or s < best_s or (s == best_s and nodes[LAST, u] < nodes[LAST, best]):
                    best = u
                    best_s = s
    if not best_s >= 1e-200:
        return _scan_victim(policy, c, t0, now, fparams, nodes, caches, value, slots, table)
    return best


@njit(cache=True, nogil=True, _nrt=False)
def _vector_rebase(n_caches, caches, nodes, value, slots, slot_keys, qrate, ref):
    """:func:`_rebase` for the vector keys (between rows: no key is masked)."""
    for c in range(n_caches):
        for i in range(caches[c, OCCUPANCY]):
            u = slots[c, i]
            p = orderable(value[u] * math.exp(qrate * float(nodes[STAMP, u] - ref)))
            slot_keys[c, i] = (p & ~SLOT_MASK) | i


# ---- the replay ------------------------------------------------------------------------------------

E_NOW, QRATE = 0, 1  # rates[...]
REF, E_AT = 0, 1     # clocks[...]: heap and vector priorities are value * e^(qrate * (stamp - ref))


@njit(cache=True, nogil=True, inline="always")
def _setup(policy, layout, n, w, sizes, n_keys, fparams, rng_state, caches):
    """(value: lfu-decay's and gate-weighted's score, lrfu's CRF, per key; the heap walk's stack; the decay
    table; the vector layout's slot keys; the heap's priorities and LAST (its ties) by index; e_now =
    e^(qrate * (now - ref)) and qrate (score = value * e^(-qrate * age)); ref and the clock e_now is for)."""
    n_caches = sizes.shape[0]
    kmax = max(1, sizes.max())
    value = np.zeros(n_caches * n_keys, np.float64)
    stack = np.empty(kmax + 2, np.int64)
    table = decay_table(policy, fparams)
    slot_keys = np.zeros((n_caches, kmax) if layout == VECTOR else (1, 1), np.int64)
    heap_prio = np.zeros((n_caches, kmax) if layout == HEAP else (1, 1), np.float64)
    heap_last = np.zeros((n_caches, kmax) if layout == HEAP else (1, 1), np.int64)
    rates = np.empty(2, np.float64)
    rates[E_NOW] = 1.0
    rates[QRATE] = fparams[RATE] * math.log(2.0) if policy == LRFU else fparams[RATE]
    clocks = np.zeros(2, np.int64)  # REF, E_AT
    return value, stack, table, slot_keys, heap_prio, heap_last, rates, clocks


@njit(cache=True, nogil=True, _nrt=False)
def _start_row(policy, layout, r, c, now, base, keys, n_caches, nodes, caches, slots, extra):
    """The decaying scores' e_now for this row's clock, every priority re-based first if it would near
    overflow."""
    value, stack, table, slot_keys, heap_prio, heap_last, rates, clocks = extra
    if layout != SCAN and _decays(policy) and now != clocks[E_AT]:
        qrate = rates[QRATE]
        if qrate * float(now - clocks[REF]) > 500.0:
            clocks[REF] = now
            if layout == VECTOR:
                _vector_rebase(n_caches, caches, nodes, value, slots, slot_keys, qrate, now)
            else:
                _rebase(n_caches, caches, nodes, value, slots, heap_prio, heap_last, qrate, now)
        rates[E_NOW] = math.exp(qrate * float(now - clocks[REF]))
        clocks[E_AT] = now


@njit(cache=True, nogil=True, _nrt=False)
def _on_request(policy, layout, u, resident, last_before, r, j, c, t0, now, size, weights, next_use, fparams, nodes,
                caches, slots, extra):
    value, stack, table, slot_keys, heap_prio, heap_last, rates, clocks = extra
    access(policy, u, r, j, now, nodes, value, weights, next_use, fparams, table)
    if layout == VECTOR and resident:
        slot_keys[c, nodes[SLOT, u]] = KEY_MAX  # in the row: never the minimum until its key is written
    if layout == HEAP and resident:
        _heap_set(policy, c, nodes[SLOT, u], caches[c, OCCUPANCY], u, rates[E_NOW], nodes, value, slots, heap_prio,
                  heap_last)


@njit(cache=True, nogil=True, _nrt=False)
def _victim(policy, layout, u, r, c, t0, now, size, base, keys, fparams, nodes, caches, slots, extra):
    value, stack, table, slot_keys, heap_prio, heap_last, rates, clocks = extra
    if layout == VECTOR:
        if _decays(policy):
            return _vector_decay_victim(policy, c, t0, now, fparams, nodes, caches, value, slots, slot_keys, table)
        return _vector_victim(c, caches[c, OCCUPANCY], nodes, slots, slot_keys)
    if layout == HEAP:
        if _decays(policy):
            return _decay_victim(policy, c, t0, now, fparams, nodes, caches, value, slots, heap_prio, heap_last, stack,
                                 table)
        return slots[c, _heap_min(c, t0, caches[c, OCCUPANCY], heap_prio, heap_last, stack)]
    return _scan_victim(policy, c, t0, now, fparams, nodes, caches, value, slots, table)


@njit(cache=True, nogil=True, _nrt=False)
def _on_evict(policy, layout, v, c, t0, nodes, caches, slots, extra):
    """Heap: the victim's index, which the newcomer takes (one sift instead of two)."""
    slot_keys = extra[3]
    if policy == LFU_CACHE:
        nodes[COUNT, v] = 0
    if layout == HEAP:
        return nodes[SLOT, v]
    i, last = slot_remove(v, c, nodes, caches, slots)
    if layout == VECTOR:  # the moved key names its new slot (a masked one stays above every key)
        slot_keys[c, i] = (slot_keys[c, last] & ~SLOT_MASK) | i
    return -1


@njit(cache=True, nogil=True, _nrt=False)
def _on_insert(policy, layout, u, hole, r, c, now, base, keys, nodes, caches, slots, extra):
    value, stack, table, slot_keys, heap_prio, heap_last, rates, clocks = extra
    occ = caches[c, OCCUPANCY]
    if layout == HEAP:
        _heap_set(policy, c, occ if hole < 0 else hole, occ + 1, u, rates[E_NOW], nodes, value, slots, heap_prio,
                  heap_last)
    else:
        i = slot_append(u, c, nodes, caches, slots)
        if layout == VECTOR:
            slot_keys[c, i] = KEY_MAX


@njit(cache=True, nogil=True, _nrt=False)
def _end_row(policy, layout, r, c, now, base, keys, n_caches, nodes, caches, slots, extra):
    """Vector: the row's keys, now that no victim is chosen among the others until the next row."""
    value, stack, table, slot_keys, heap_prio, heap_last, rates, clocks = extra
    if layout == VECTOR:
        for j in range(keys.shape[1]):
            u = base + keys[r, j]
            slot_keys[c, nodes[SLOT, u]] = _slot_key(policy, u, nodes[SLOT, u], rates[E_NOW], nodes, value)


@njit(cache=True, nogil=True, inline="always")
def _replay(policy, layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams):
    return request_loop(_setup, _start_row, _on_request, _victim, _on_evict, _on_insert, _end_row, policy, layout,
                        cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, None)


# One entry per policy, the policy and the layout constants in each branch: numba compiles each layout
# as its own code, the other policies' and layouts' branches gone.

@njit(cache=True, nogil=True)
def replay_lfu(layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state):
    if layout == HEAP:
        return _replay(LFU, HEAP, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams)
    return _replay(LFU, SCAN, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams)


@njit(cache=True, nogil=True)
def replay_lfu_cache(layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams,
                     rng_state):
    if layout == HEAP:
        return _replay(LFU_CACHE, HEAP, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use,
                       fparams)
    return _replay(LFU_CACHE, SCAN, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams)


@njit(cache=True, nogil=True, inline="always")
def _three_layouts(policy, layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams):
    if layout == VECTOR:
        return _replay(policy, VECTOR, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams)
    if layout == HEAP:
        return _replay(policy, HEAP, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams)
    return _replay(policy, SCAN, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams)


@njit(cache=True, nogil=True)
def replay_opt(layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state):
    return _three_layouts(OPT, layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams)


@njit(cache=True, nogil=True)
def replay_lfu_decay(layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams,
                     rng_state):
    return _three_layouts(LFU_DECAY, layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use,
                          fparams)


@njit(cache=True, nogil=True)
def replay_gate_weighted(layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams,
                         rng_state):
    return _three_layouts(GATE_WEIGHTED, layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups,
                          next_use, fparams)


@njit(cache=True, nogil=True)
def replay_lrfu(layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state):
    return _three_layouts(LRFU, layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use, fparams)


# ---- one pass over all sizes ----------------------------------------------------------------------

@njit(cache=True, nogil=True, inline="always")
def _stack_depths(policy, cache, keys, clock, weights, n_caches, n_keys, next_use, fparams):
    """Histogram of stack depths (0-based, before each row's update; never-seen keys in the last bin)
    for a policy whose priority does not depend on the cache size: hits(K) = sum(hist[:K]) for every K >=
    the row width, in one pass.

    Why this is exact: the policy state is the same for every size; under the atomic semantics the
    cache of K slots loses, per row, the lowest-priority keys outside the row, so after the row it holds
    the row and the K - w highest-priority keys among those it held outside the row. Keeping every
    size at once is a stack (inclusion: tests/test_inclusion.py) whose update walks down to the deepest
    key of the row, carrying at most w keys (Mattson et al. 1970, for sets of w keys)."""
    n, w = keys.shape
    _, _, nodes, _ = new_replay(n_caches, n_keys, 1)
    value = np.zeros(n_caches * n_keys, np.float64)
    stack = np.full((n_caches, n_keys), -1, np.int64)
    pos = np.full(n_caches * n_keys, -1, np.int64)
    used = np.zeros(n_caches, np.int64)
    hist = np.zeros(n_keys + 1, np.int64)
    pool = np.empty(w + 1, np.int64)
    table = decay_table(policy, fparams)
    tick = 0
    for r in range(n):
        c = cache[r]
        base = c * n_keys
        now = clock[r]
        t0 = tick
        deepest = 0
        for j in range(w):
            u = base + keys[r, j]
            d = pos[u]
            hist[d if d >= 0 else n_keys] += 1
            if d < 0:  # never seen: at the bottom for now (it is lifted to the top below)
                d = used[c]
                used[c] += 1
                stack[c, d] = u
                pos[u] = d
            deepest = max(deepest, d)
            tick += 1
            nodes[LAST, u] = tick
            access(policy, u, r, j, now, nodes, value, weights, next_use, fparams, table)
        # positions 0..w-1: the row; below, after old position i, exactly i + 1 - w of the others
        # (the highest-priority ones seen so far) are placed; the rest stay in the pool
        m = 0
        out = w
        for i in range(deepest + 1):
            x = stack[c, i]
            if nodes[LAST, x] <= t0:
                pool[m] = x
                m += 1
            while out <= i and m > 0:
                b = 0
                sb = score(policy, pool[0], now, fparams, nodes, value, table)
                for t in range(1, m):
                    s = score(policy, pool[t], now, fparams, nodes, value, table)
                    if s > sb or (s == sb and nodes[LAST, pool[t]] > nodes[LAST, pool[b]]):
                        b = t
                        sb = s
                stack[c, out] = pool[b]
                pos[pool[b]] = out
                out += 1
                m -= 1
                pool[b] = pool[m]
        for j in range(w):
            u = base + keys[r, j]
            stack[c, j] = u
            pos[u] = j
    return hist


# one entry per policy (numba compiles only the one an mrc needs)

@njit(cache=True, nogil=True)
def stack_depths_lfu(cache, keys, clock, weights, n_caches, n_keys, next_use, fparams):
    return _stack_depths(LFU, cache, keys, clock, weights, n_caches, n_keys, next_use, fparams)


@njit(cache=True, nogil=True)
def stack_depths_opt(cache, keys, clock, weights, n_caches, n_keys, next_use, fparams):
    return _stack_depths(OPT, cache, keys, clock, weights, n_caches, n_keys, next_use, fparams)


@njit(cache=True, nogil=True)
def stack_depths_lrfu(cache, keys, clock, weights, n_caches, n_keys, next_use, fparams):
    return _stack_depths(LRFU, cache, keys, clock, weights, n_caches, n_keys, next_use, fparams)


@njit(cache=True, nogil=True)
def stack_depths_lfu_decay(cache, keys, clock, weights, n_caches, n_keys, next_use, fparams):
    return _stack_depths(LFU_DECAY, cache, keys, clock, weights, n_caches, n_keys, next_use, fparams)


@njit(cache=True, nogil=True)
def stack_depths_gate_weighted(cache, keys, clock, weights, n_caches, n_keys, next_use, fparams):
    return _stack_depths(GATE_WEIGHTED, cache, keys, clock, weights, n_caches, n_keys, next_use, fparams)
