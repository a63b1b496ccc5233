"""Compiled replay for every built-in policy: one mechanism, per-policy ordering state.

The mechanism is the one of :class:`moesim.policies.base.ExpertCache` (CONTRACTS.md section 2), run
over array state: per row, count hits, *access* every key in router order, then for each missing key
*evict until room* (the policy's victim, never a key of the row) and *insert*. Each policy keeps only
its own ordering state, in arrays indexed by node ``u = cache * n_keys + key``, and implements the
class in ``moesim.policies.eviction`` step for step (tests/test_compiled_policies.py checks every
policy, scope and semantics against the classes, hits per layer).

Structures, chosen so that a request costs O(1) where the policy allows it:

- list policies keep doubly linked lists in arrays (``prv``/``nxt`` per node, ``head``/``tail``/
  ``length`` per (cache, list)): lru (recency order), fifo (insertion order), sieve (queue + hand),
  arc (T1, T2, B1, B2), s3fifo (small, main, ghost). A victim is found from the list head, skipping
  at most the row's own keys, so a global cache of 256 slots is never scanned;
- score policies (lfu, lfu-cache, lfu-decay, lrfu, gate-weighted, opt) keep per-key values and pick
  the lowest score, ties to the least recently requested, by a scan of the resident slots (caches
  are 2..8 slots per layer; the priority changes with time for the decaying ones);
- hobbit ranks the candidates (needs them all), random draws from them with CPython's own
  Mersenne Twister (same seed, same victims as ``random.Random(seed).choice``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

LRU, FIFO, LFU, OPT, LFU_CACHE, LFU_DECAY, GATE_WEIGHTED, LRFU, SIEVE, ARC, S3FIFO, HOBBIT, RANDOM = range(13)
# lru and fifo on small caches: a stamp per key and a scan of the slots beats moving list nodes on every
# request (measured: per-layer caches of 4 slots, lru 63 vs 16M requests/s)
LRU_SCAN, FIFO_SCAN = 13, 14
SCAN_MAX_SLOTS = 16
CODES = {"lru": LRU, "fifo": FIFO, "lfu": LFU, "opt": OPT, "lfu-cache": LFU_CACHE, "lfu-decay": LFU_DECAY,
         "gate-weighted": GATE_WEIGHTED, "lrfu": LRFU, "sieve": SIEVE, "arc": ARC, "s3fifo": S3FIFO,
         "hobbit": HOBBIT, "random": RANDOM}


def kernel_spec(code: int, sizes: np.ndarray) -> tuple[int, ...]:
    """The first argument of :func:`replay_builtin`: a tuple whose *length* is the policy code, so that
    numba compiles (and caches) one specialisation per policy with the other policies' branches gone."""
    if code in (LRU, FIFO) and int(sizes.max(initial=0)) <= SCAN_MAX_SLOTS:
        code = LRU_SCAN if code == LRU else FIFO_SCAN
    return (0,) * code

# list ids (per cache)
T1, T2, B1, B2 = 0, 1, 2, 3          # arc
SMALL, MAIN, GHOST = 0, 1, 2         # s3fifo
# float parameters (fp): index meaning depends on the policy
P_RATE = 0       # lfu-decay, gate-weighted: decay rate per token; lrfu: lambda; hobbit: w_recency
P_SMALL, P_GHOST, P_MOVE = 0, 1, 2  # s3fifo ratios and move-to-main threshold
MT_N, MT_M = 624, 397


def params_of(name: str, policy: object) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's parameters read from a configured policy object (the class validates them):
    (float parameters, CPython Mersenne Twister state for ``random``)."""
    fp = np.zeros(4, np.float64)
    mt = np.zeros(MT_N + 1, np.int64)
    if name in ("lfu-decay", "gate-weighted"):
        fp[P_RATE] = policy.rate  # type: ignore[attr-defined]
    elif name == "lrfu":
        fp[P_RATE] = policy.lam  # type: ignore[attr-defined]
    elif name == "hobbit":
        fp[P_RATE] = policy.w  # type: ignore[attr-defined]
    elif name == "s3fifo":
        fp[P_SMALL], fp[P_GHOST], fp[P_MOVE] = policy.small_ratio, policy.ghost_ratio, policy.threshold  # type: ignore[attr-defined]
    elif name == "random":
        mt[:] = policy.rng.getstate()[1]  # type: ignore[attr-defined]
    return fp, mt


# ---- linked lists in arrays ----------------------------------------------------------------------

@njit(cache=True, nogil=True, inline="always")
def _append(u, c, lst, prv, nxt, tag, head, tail, length):
    t = tail[c, lst]
    prv[u] = t
    nxt[u] = -1
    if t >= 0:
        nxt[t] = u
    else:
        head[c, lst] = u
    tail[c, lst] = u
    tag[u] = lst + 1
    length[c, lst] += 1


@njit(cache=True, nogil=True, inline="always")
def _unlink(u, c, prv, nxt, tag, head, tail, length):
    lst = tag[u] - 1
    p = prv[u]
    q = nxt[u]
    if p >= 0:
        nxt[p] = q
    else:
        head[c, lst] = q
    if q >= 0:
        prv[q] = p
    else:
        tail[c, lst] = p
    tag[u] = 0
    length[c, lst] -= 1


@njit(cache=True, nogil=True, inline="always")
def _in_row(keys, r, u_key):
    for j in range(keys.shape[1]):
        if keys[r, j] == u_key:
            return True
    return False


@njit(cache=True, nogil=True, inline="always")
def _first_allowed(start, keys, r, base, nxt):
    u = start
    while u >= 0 and _in_row(keys, r, u - base):
        u = nxt[u]
    return u


# ---- CPython's Mersenne Twister (random.Random.getrandbits / _randbelow) -------------------------

@njit(cache=True, nogil=True)
def _genrand(mt, mti, c):
    if mti[c] >= MT_N:
        for kk in range(MT_N):
            y = (mt[c, kk] & 0x80000000) | (mt[c, (kk + 1) % MT_N] & 0x7FFFFFFF)
            v = mt[c, (kk + MT_M) % MT_N] ^ (y >> 1)
            if y & 1:
                v ^= 0x9908B0DF
            mt[c, kk] = v
        mti[c] = 0
    y = mt[c, mti[c]]
    mti[c] += 1
    y ^= y >> 11
    y ^= (y << 7) & 0x9D2C5680
    y ^= (y << 15) & 0xEFC60000
    y ^= y >> 18
    return y & 0xFFFFFFFF


@njit(cache=True, nogil=True)
def _randbelow(mt, mti, c, n):
    k = 0
    while (n >> k) > 0:
        k += 1
    r = _genrand(mt, mti, c) >> (32 - k)
    while r >= n:
        r = _genrand(mt, mti, c) >> (32 - k)
    return r


# ---- per-policy pieces ---------------------------------------------------------------------------

@njit(cache=True, nogil=True, inline="always")
def _score(code, u, now, fp, ival, fval, stamp, next_use, last):
    """Eviction score of a resident node for the score policies (lowest goes first)."""
    if code == LFU or code == LFU_CACHE:
        return float(ival[u])
    if code == OPT:
        return -float(next_use[u])
    if code == LRU_SCAN:
        return float(last[u])
    if code == FIFO_SCAN:
        return float(stamp[u])
    if code == LRFU:
        return fval[u] * 0.5 ** (fp[P_RATE] * float(now - stamp[u]))
    return fval[u] * math.exp((-fp[P_RATE]) * float(now - stamp[u]))  # lfu-decay, gate-weighted


@njit(cache=True, nogil=True)
def _hobbit_victim(c, keys, r, base, slots, occ, last, ival, w):
    """Lowest w * rank(recency) + (1 - w) * rank(frequency) among the candidates, ties to the LRU."""
    best = -1
    b_s = 0.0
    for i in range(occ[c]):
        u = slots[c, i]
        if _in_row(keys, r, u - base):
            continue
        rec = 0
        cnt = 0
        for i2 in range(occ[c]):
            v = slots[c, i2]
            if v == u or _in_row(keys, r, v - base):
                continue
            if last[v] < last[u]:
                rec += 1
            if ival[v] < ival[u] or (ival[v] == ival[u] and last[v] < last[u]):
                cnt += 1
        s = w * rec + (1 - w) * cnt
        if best < 0 or s < b_s or (s == b_s and last[u] < last[best]):
            best = u
            b_s = s
    return best


@njit(cache=True, nogil=True)
def _arc_replace(c, keys, r, base, ghost_hit, p, nxt, head, length, dest):
    u1 = _first_allowed(head[c, T1], keys, r, base, nxt)
    u2 = _first_allowed(head[c, T2], keys, r, base, nxt)
    if u1 >= 0 and (length[c, T1] > p or (length[c, T1] == p and ghost_hit == 2) or u2 < 0):
        dest[c] = B1 + 1
        return u1
    dest[c] = B2 + 1
    return u2


@njit(cache=True, nogil=True)
def _arc_victim(c, keys, r, base, u_in, size, pend, arc_p, prv, nxt, tag, head, tail, length, dest):
    ghost_hit = pend[u_in]
    p = arc_p[c]
    if ghost_hit:
        return _arc_replace(c, keys, r, base, ghost_hit, p, nxt, head, length, dest)
    if length[c, T1] + length[c, B1] + 1 > size:
        if length[c, B1] > 0:
            _unlink(head[c, B1], c, prv, nxt, tag, head, tail, length)
            return _arc_replace(c, keys, r, base, 0, p, nxt, head, length, dest)
        oldest = _first_allowed(head[c, T1], keys, r, base, nxt)
        if oldest < 0:
            return _arc_replace(c, keys, r, base, 0, p, nxt, head, length, dest)
        dest[c] = 0
        return oldest
    total = length[c, T1] + length[c, B1] + length[c, T2] + length[c, B2]
    if total >= 2 * size and length[c, B2] > 0:
        _unlink(head[c, B2], c, prv, nxt, tag, head, tail, length)
    return _arc_replace(c, keys, r, base, 0, p, nxt, head, length, dest)


@njit(cache=True, nogil=True)
def _s3fifo_victim(c, keys, r, base, threshold, main_size, ghost_size, ival, prv, nxt, tag, head, tail, length,
                   dest):
    while True:
        small = _first_allowed(head[c, SMALL], keys, r, base, nxt)
        if length[c, MAIN] > main_size or small < 0:
            u = head[c, MAIN]
            end = tail[c, MAIN]
            while u >= 0:  # one pass over the main queue as it was (re-inserted keys are not revisited)
                q = nxt[u]
                if not _in_row(keys, r, u - base):
                    if ival[u] == 0:
                        dest[c] = 0
                        return u
                    _unlink(u, c, prv, nxt, tag, head, tail, length)
                    _append(u, c, MAIN, prv, nxt, tag, head, tail, length)
                    ival[u] = min(ival[u], 3) - 1
                if u == end:
                    break
                u = q
            continue
        u = small
        end = tail[c, SMALL]
        while u >= 0:
            q = nxt[u]
            if not _in_row(keys, r, u - base):
                if ival[u] >= threshold:
                    _unlink(u, c, prv, nxt, tag, head, tail, length)
                    _append(u, c, MAIN, prv, nxt, tag, head, tail, length)
                    ival[u] = 0
                else:
                    dest[c] = GHOST + 1 if ghost_size > 0 else 0
                    return u
            if u == end:
                break
            u = q


# ---- the mechanism -------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def replay_builtin(spec, cache, keys, clock, weights, group, sizes, n_keys, n_groups, nxt_use, fp, mt0):
    """Replay rows (atomic per row; sequential = rows of width 1) under built-in policy ``code``.
    Returns (requests, hits) per group."""
    code = len(spec)  # a compile-time constant: each policy gets its own specialisation, dead branches gone
    n, w = keys.shape
    n_caches = sizes.shape[0]
    n_nodes = n_caches * n_keys
    req = np.zeros(n_groups, np.int64)
    hit = np.zeros(n_groups, np.int64)
    resident = np.zeros(n_nodes, np.bool_)
    last = np.zeros(n_nodes, np.int64)
    occ = np.zeros(n_caches, np.int64)
    # lists
    prv = np.full(n_nodes, -1, np.int64)
    nxt = np.full(n_nodes, -1, np.int64)
    tag = np.zeros(n_nodes, np.int64)
    head = np.full((n_caches, 4), -1, np.int64)
    tail = np.full((n_caches, 4), -1, np.int64)
    length = np.zeros((n_caches, 4), np.int64)
    # per-key policy values
    ival = np.zeros(n_nodes, np.int64)
    fval = np.zeros(n_nodes, np.float64)
    stamp = np.zeros(n_nodes, np.int64)
    next_use = np.zeros(n_nodes, np.int64)
    # resident slots, for the scanned policies
    scanned = code == LFU or code == OPT or code == LFU_CACHE or code == LFU_DECAY or code == GATE_WEIGHTED \
        or code == LRFU or code == HOBBIT or code == RANDOM or code == LRU_SCAN or code == FIFO_SCAN
    kmax = max(1, sizes.max())
    slots = np.full((n_caches, kmax), -1, np.int64)
    slot_of = np.full(n_nodes, -1, np.int64)
    # per-cache policy state
    hand = np.full(n_caches, -1, np.int64)          # sieve
    arc_p = np.zeros(n_caches, np.float64)          # arc's target size of T1
    dest = np.zeros(n_caches, np.int64)             # arc / s3fifo: ghost list (+1) the victim goes to
    pend = np.zeros(n_nodes, np.int64)              # arc: ghost list a missing key was found in
    on_ghost = np.zeros(n_caches, np.bool_)         # s3fifo: hit_on_ghost
    evicted = np.zeros(n_caches, np.bool_)          # s3fifo: has_evicted
    small_size = np.zeros(n_caches, np.int64)
    main_size = np.zeros(n_caches, np.int64)
    ghost_size = np.zeros(n_caches, np.int64)
    for c in range(n_caches):
        small_size[c] = max(1, int(sizes[c] * fp[P_SMALL]))
        main_size[c] = sizes[c] - small_size[c]
        ghost_size[c] = int(sizes[c] * fp[P_GHOST])
    threshold = int(fp[P_MOVE])
    mt = np.zeros((n_caches if code == RANDOM else 1, MT_N), np.int64)
    mti = np.zeros(n_caches, np.int64)
    if code == RANDOM:
        for c in range(n_caches):
            mt[c, :] = mt0[:MT_N]
            mti[c] = mt0[MT_N]
    buf = np.empty(kmax, np.int64)
    tick = 0
    for r in range(n):
        c = cache[r]
        g = group[r]
        req[g] += w
        size = sizes[c]
        if size == 0:
            continue
        base = c * n_keys
        now = clock[r]
        # look up + access, router order
        for j in range(w):
            u = base + keys[r, j]
            if resident[u]:
                hit[g] += 1
            tick += 1
            last[u] = tick
            if code == LFU or code == LFU_CACHE or code == HOBBIT:
                ival[u] += 1
            elif code == OPT:
                next_use[u] = nxt_use[r, j]
            elif code == LFU_DECAY or code == GATE_WEIGHTED or code == LRFU:
                if code == LRFU:
                    fval[u] = 1.0 + fval[u] * 0.5 ** (fp[P_RATE] * float(now - stamp[u]))
                else:
                    inc = 1.0 if code == LFU_DECAY else float(weights[r, j])
                    fval[u] = fval[u] * math.exp((-fp[P_RATE]) * float(now - stamp[u])) + inc
                stamp[u] = now
            elif code == SIEVE:
                if resident[u]:
                    ival[u] = 1
            elif code == ARC:
                t = tag[u] - 1
                if t == T1 or t == T2:
                    _unlink(u, c, prv, nxt, tag, head, tail, length)
                    _append(u, c, T2, prv, nxt, tag, head, tail, length)
                elif t == B1:
                    arc_p[c] = min(arc_p[c] + max(length[c, B2] / length[c, B1], 1.0), float(size))
                    _unlink(u, c, prv, nxt, tag, head, tail, length)
                    pend[u] = 1
                elif t == B2:
                    arc_p[c] = max(arc_p[c] - max(length[c, B1] / length[c, B2], 1.0), 0.0)
                    _unlink(u, c, prv, nxt, tag, head, tail, length)
                    pend[u] = 2
                else:
                    pend[u] = 0
            elif code == S3FIFO:
                t = tag[u] - 1
                if t == SMALL or t == MAIN:
                    ival[u] += 1
                elif t == GHOST:
                    _unlink(u, c, prv, nxt, tag, head, tail, length)
                    on_ghost[c] = True
        # insert the missing keys, router order, evicting keys outside the row
        for j in range(w):
            u = base + keys[r, j]
            if resident[u]:
                continue
            if occ[c] >= size:
                # victim
                if code == LRU or code == FIFO:
                    v = _first_allowed(head[c, 0], keys, r, base, nxt)
                elif code == SIEVE:
                    v = hand[c] if hand[c] >= 0 else head[c, 0]
                    while True:
                        if not _in_row(keys, r, v - base):
                            if ival[v] == 0:
                                break
                            ival[v] = 0
                        v = nxt[v] if nxt[v] >= 0 else head[c, 0]
                elif code == ARC:
                    v = _arc_victim(c, keys, r, base, u, size, pend, arc_p, prv, nxt, tag, head, tail, length, dest)
                elif code == S3FIFO:
                    evicted[c] = True
                    v = _s3fifo_victim(c, keys, r, base, threshold, main_size[c], ghost_size[c], ival, prv, nxt,
                                       tag, head, tail, length, dest)
                elif code == HOBBIT:
                    v = _hobbit_victim(c, keys, r, base, slots, occ, last, ival, fp[P_RATE])
                elif code == RANDOM:
                    m = 0
                    for i in range(occ[c]):
                        x = slots[c, i]
                        if not _in_row(keys, r, x - base):
                            buf[m] = x
                            m += 1
                    buf[:m].sort()
                    v = buf[_randbelow(mt, mti, c, m)]
                else:  # score policies: lowest score, ties to the least recently requested
                    v = -1
                    b_s = 0.0
                    for i in range(occ[c]):
                        x = slots[c, i]
                        if _in_row(keys, r, x - base):
                            continue
                        s = _score(code, x, now, fp, ival, fval, stamp, next_use, last)
                        if v < 0 or s < b_s or (s == b_s and last[x] < last[v]):
                            v = x
                            b_s = s
                # evict
                resident[v] = False
                occ[c] -= 1
                if scanned:
                    i = slot_of[v]
                    moved = slots[c, occ[c]]
                    slots[c, i] = moved
                    slot_of[moved] = i
                    if code == LFU_CACHE:
                        ival[v] = 0
                elif code == SIEVE:
                    hand[c] = nxt[v]
                    _unlink(v, c, prv, nxt, tag, head, tail, length)
                else:
                    _unlink(v, c, prv, nxt, tag, head, tail, length)
                    if (code == ARC or code == S3FIFO) and dest[c] > 0:
                        lst = dest[c] - 1
                        if code == S3FIFO and length[c, GHOST] >= ghost_size[c]:
                            _unlink(head[c, GHOST], c, prv, nxt, tag, head, tail, length)
                        _append(v, c, lst, prv, nxt, tag, head, tail, length)
            # insert
            resident[u] = True
            if scanned:
                slots[c, occ[c]] = u
                slot_of[u] = occ[c]
                if code == FIFO_SCAN:
                    tick += 1
                    stamp[u] = tick
            elif code == ARC:
                _append(u, c, T2 if pend[u] else T1, prv, nxt, tag, head, tail, length)
            elif code == S3FIFO:
                to_main = on_ghost[c] or (not evicted[c] and length[c, SMALL] >= small_size[c])
                _append(u, c, MAIN if to_main else SMALL, prv, nxt, tag, head, tail, length)
                ival[u] = 0
                on_ghost[c] = False
            else:  # lru, fifo, sieve: the tail
                _append(u, c, 0, prv, nxt, tag, head, tail, length)
                ival[u] = 0
            occ[c] += 1
        if code == LRU:  # the row's keys become the most recent, router order
            for j in range(w):
                u = base + keys[r, j]
                if tail[c, 0] != u:
                    _unlink(u, c, prv, nxt, tag, head, tail, length)
                    _append(u, c, 0, prv, nxt, tag, head, tail, length)
    return req, hit


@njit(cache=True, nogil=True)
def replay_builtin_sizes(spec, cache, keys, clock, weights, group, size_list, n_caches, n_keys, n_groups,
                         nxt_use, fp, mt0):
    """Hits for each uniform cache size in ``size_list`` (one replay per size, one compiled call)."""
    out = np.zeros(size_list.shape[0], np.int64)
    for i in range(size_list.shape[0]):
        sizes = np.full(n_caches, size_list[i], np.int64)
        _, hit = replay_builtin(spec, cache, keys, clock, weights, group, sizes, n_keys, n_groups, nxt_use, fp,
                                mt0)
        out[i] = hit.sum()
    return out
