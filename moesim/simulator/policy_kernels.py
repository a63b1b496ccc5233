"""Compiled replay for every built-in policy: one mechanism, per-policy ordering state.

The mechanism is the one of :class:`moesim.policies.base.ExpertCache` (docs/semantics.md), run
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
  the lowest score, ties to the least recently requested: on small caches (< HEAP_MIN_SLOTS, the
  per-layer default) by a scan of the resident slots; on mid-sized ones (a global cache of up to
  VSCAN_MAX_SLOTS) opt, lfu-decay, gate-weighted and lrfu by a vectorised scan of one packed int64 key
  per slot, O(1) per request and two branch-free passes per victim (see "vector scan" below); otherwise
  from an indexed binary heap over the same slot array, O(log K) per request (see "heaps" below). The
  decaying scores read their decay factors from a table made once per replay (the same floats);
- hobbit ranks the candidates: on small caches all of them; on mid-sized ones (up to VSCAN_MAX_SLOTS) it
  keeps every resident's two ranks per slot, updated by one branch-free pass per request ("rank vectors");
  on larger ones it ranks only the "staircase" (the keys counting less than every less recent key), where
  its victim must be;
- random draws with the class's SplitMix64 (``moesim.policies.seeded``) a rank among the candidates in
  slot order, and skips the row's slots before it: O(row) per eviction.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.extending import intrinsic

from moesim.policies.seeded import GOLDEN, MASK64, MIX1, MIX2

LRU, FIFO, LFU, OPT, LFU_CACHE, LFU_DECAY, GATE_WEIGHTED, LRFU, SIEVE, ARC, S3FIFO, HOBBIT, RANDOM = range(13)
# lru and fifo on small caches: a stamp per key and a scan of the slots beats moving list nodes on every
# request (measured: per-layer caches of 4 slots, lru 63 vs 16M requests/s)
LRU_SCAN, FIFO_SCAN = 13, 14
# stack policies (priority independent of the cache size): every size in one pass, see stack_depths
STACK_CODES = (LFU, OPT, LRFU, LFU_DECAY, GATE_WEIGHTED)
SCAN_MAX_SLOTS = 16
# code + HEAPED: the same policy with its victim found in O(log K) (heap for the score policies, the
# staircase for hobbit) instead of a scan; chosen from HEAP_MIN_SLOTS slots up.
# Measured (CPU time, 6.4M requests of a synthetic Mixtral trace): per layer at 4 slots the scan is
# 1.2-3x faster (lfu 52 vs 39M/s); one global cache of 16 slots, the heap is 1.4-1.8x faster (lfu 57 vs
# 31, opt 38 vs 22), of 64 slots 1.4-6x (lfu-decay 15 vs 3)
HEAPED = 16
HEAP_MIN_SLOTS = 9
HEAP_CODES = (LFU, OPT, LFU_CACHE, LFU_DECAY, GATE_WEIGHTED, LRFU, HOBBIT)
# code + VSCAN: the score policies on a cache of HEAP_MIN_SLOTS .. VSCAN_MAX_SLOTS slots (a global cache of
# 128 or 256) find their victim by a branch-free (vectorised) scan of one int64 priority per slot, kept up to
# date in O(1) per request, instead of a heap sift per request (see "vector scan" below). Measured (CPU time,
# 19.2M requests, one global cache of 128 slots, sequential): lfu-decay 12 -> 30M/s, opt 15 -> 30M/s.
VSCAN = 32
VSCAN_MAX_SLOTS = 512
# hobbit on those sizes keeps every resident's two ranks per slot instead (see "rank vectors" below): a hit
# costs one branch-free pass over the slots, a miss two (the victim, the insertion). Measured (19.2M
# requests, one global cache of 128 slots, sequential, 2-core AMD EPYC): the staircase 7.2-7.8M/s, the
# rank vectors 25-31M/s. Their counts are int32 (measured 18.5 -> 21M/s against int64 before the helpers
# lost their reference counts): exact while no key can count more, i.e. up to RANKS_MAX_REQUESTS
# requests; a longer stream takes the staircase.
RANKS_MAX_REQUESTS = (1 << 31) - 1
VSCAN_CODES = (OPT, LFU_DECAY, GATE_WEIGHTED, LRFU, HOBBIT)  # lfu and lfu-cache: their heap is as fast
# the decay factors of the first DECAY_TABLE ages (clock ticks) are computed once per replay: the access and
# the victim of lfu-decay, gate-weighted and lrfu read them instead of an exp (or a pow) per request
DECAY_TABLE = 2048
CODES = {"lru": LRU, "fifo": FIFO, "lfu": LFU, "opt": OPT, "lfu-cache": LFU_CACHE, "lfu-decay": LFU_DECAY,
         "gate-weighted": GATE_WEIGHTED, "lrfu": LRFU, "sieve": SIEVE, "arc": ARC, "s3fifo": S3FIFO,
         "hobbit": HOBBIT, "random": RANDOM}


def kernel_spec(code: int, sizes: np.ndarray, requests: int = 0) -> tuple[int, ...]:
    """The first argument of :func:`replay_builtin`: a tuple whose *length* is the policy code, so that
    numba compiles (and caches) one specialisation per policy with the other policies' branches gone.
    ``requests``: the stream's (hobbit's rank vectors count in int32, see RANKS_MAX_REQUESTS)."""
    k = int(sizes.max(initial=0))
    if code in (LRU, FIFO) and k <= SCAN_MAX_SLOTS:
        code = LRU_SCAN if code == LRU else FIFO_SCAN
    elif code in VSCAN_CODES and HEAP_MIN_SLOTS <= k <= VSCAN_MAX_SLOTS and \
            not (code == HOBBIT and requests > RANKS_MAX_REQUESTS):
        code += VSCAN
    elif code in HEAP_CODES and k >= HEAP_MIN_SLOTS:
        code += HEAPED
    return (0,) * code

# list ids (per cache)
T1, T2, B1, B2 = 0, 1, 2, 3          # arc
SMALL, MAIN, GHOST = 0, 1, 2         # s3fifo
# Per-node state is packed in one int64 array N[row, node] and per-cache state in H[cache, col]: a
# helper call costs per array argument (measured: list ops taking 6 arrays ran at 1/4 the speed of the
# same ops on 2), so the helpers below take N and H rather than one array per field.
# Helpers that take the kernel's arrays and allocate nothing are compiled without numba's reference
# counting (``_nrt=False``): with it, every call (or IR inlining) of a helper with loops increfs and decrefs
# each array argument, an atomic instruction apiece, which was 40-65% of a global cache's replay time on a
# 2-core AMD EPYC (gate-weighted and lfu-decay 15.7 -> 30.6M requests/s, lrfu 15.5 -> 33.5, opt 36 -> 47,
# arc 40 -> 46, s3fifo 33 -> 42). Small helpers called per request stay inlined (their pairs are pruned;
# as calls, lfu's heap ran 52 -> 33M/s).
PRV, NXT, TAG, RES, LAST, IVAL, STAMP, NUSE, PEND, SLOT = range(10)
HEAD, TAIL, LEN = 0, 4, 8            # + list id
OCC, HAND, DEST, SMALL_SZ, MAIN_SZ, GHOST_SZ, ON_GHOST, EVICTED = range(12, 20)
# float parameters (fp): index meaning depends on the policy
P_RATE = 0       # lfu-decay, gate-weighted: decay rate per token; lrfu: lambda; hobbit: w_recency
P_SMALL, P_GHOST, P_MOVE = 0, 1, 2  # s3fifo ratios and move-to-main threshold
# SplitMix64 (moesim.policies.seeded), as uint64 constants so numba's arithmetic stays unsigned
SM_GOLDEN, SM_MIX1, SM_MIX2 = np.uint64(GOLDEN), np.uint64(MIX1), np.uint64(MIX2)


def params_of(name: str, policy: object) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's parameters read from a configured policy object (the class validates them):
    (float parameters, [SplitMix64 state of ``random``, as the int64 of the same bits])."""
    fp = np.zeros(4, np.float64)
    mt = np.zeros(1, np.int64)
    if name in ("lfu-decay", "gate-weighted"):
        fp[P_RATE] = policy.rate  # type: ignore[attr-defined]
    elif name == "lrfu":
        fp[P_RATE] = policy.lam  # type: ignore[attr-defined]
    elif name == "hobbit":
        fp[P_RATE] = policy.w  # type: ignore[attr-defined]
    elif name == "s3fifo":
        fp[P_SMALL], fp[P_GHOST], fp[P_MOVE] = policy.small_ratio, policy.ghost_ratio, policy.threshold  # type: ignore[attr-defined]
    elif name == "random":
        state = policy.state & MASK64  # type: ignore[attr-defined]
        mt[0] = state - (1 << 64) if state >= 1 << 63 else state
    return fp, mt


# ---- linked lists in arrays ----------------------------------------------------------------------

@njit(cache=True, nogil=True, _nrt=False)
def _append(u, c, lst, N, H):
    t = H[c, TAIL + lst]
    N[PRV, u] = t
    N[NXT, u] = -1
    if t >= 0:
        N[NXT, t] = u
    else:
        H[c, HEAD + lst] = u
    H[c, TAIL + lst] = u
    N[TAG, u] = lst + 1
    H[c, LEN + lst] += 1


@njit(cache=True, nogil=True, _nrt=False)
def _unlink(u, c, N, H):
    lst = N[TAG, u] - 1
    p = N[PRV, u]
    q = N[NXT, u]
    if p >= 0:
        N[NXT, p] = q
    else:
        H[c, HEAD + lst] = q
    if q >= 0:
        N[PRV, q] = p
    else:
        H[c, TAIL + lst] = p
    N[TAG, u] = 0
    H[c, LEN + lst] -= 1


@njit(cache=True, nogil=True, _nrt=False)
def _first_allowed(u, t0, N):
    """The first node from ``u`` on (towards the tail) that is not a key of the current row, or -1.
    A node is in the current row iff it was requested after the row began (``LAST > t0``): every key
    of the row is accessed before any victim is chosen, and only they carry those ticks."""
    while u >= 0 and N[LAST, u] > t0:
        u = N[NXT, u]
    return u


# ---- SplitMix64 (moesim.policies.seeded) ---------------------------------------------------------

@njit(cache=True, nogil=True, inline="always")
def _splitmix64(rs, c):
    st = rs[c] + SM_GOLDEN
    rs[c] = st
    z = (st ^ (st >> np.uint64(30))) * SM_MIX1
    z = (z ^ (z >> np.uint64(27))) * SM_MIX2
    return z ^ (z >> np.uint64(31))


@njit(cache=True, nogil=True, inline="always")
def _draw_below(rs, c, n):
    """A uniform integer in [0, n): the top bits of the next output, drawn again while >= n."""
    if n <= 1:
        return 0
    k = 0
    while ((n - 1) >> k) > 0:
        k += 1
    sh = np.uint64(64 - k)
    while True:
        x = np.int64(_splitmix64(rs, c) >> sh)
        if x < n:
            return x


# ---- per-policy victims --------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def _decay_table(code, fp):
    """The decay factors of the ages 0 .. DECAY_TABLE - 1, each the very float :func:`_decay` computes."""
    tab = np.empty(DECAY_TABLE if code == LFU_DECAY or code == GATE_WEIGHTED or code == LRFU else 1, np.float64)
    for d in range(tab.shape[0]):
        tab[d] = _decay_exact(code, d, fp)
    return tab


@njit(cache=True, nogil=True, inline="always")
def _decay_exact(code, d, fp):
    """The class's decay over ``d`` clock ticks: LRFU's 0.5 ** (lam * d), LFUDecay's e^(-rate * d)."""
    if code == LRFU:
        return 0.5 ** (fp[P_RATE] * float(d))
    return math.exp((-fp[P_RATE]) * float(d))


@njit(cache=True, nogil=True, inline="always")
def _decay(code, d, fp, dtab):
    """:func:`_decay_exact`, read from the table for the ages it holds (the same float: the same expression)."""
    if d < dtab.shape[0]:
        return dtab[d]
    return _decay_exact(code, d, fp)


@njit(cache=True, nogil=True, inline="always")
def _score(code, u, now, fp, N, fval, dtab):
    """Eviction score of a resident node for the score policies (lowest goes first)."""
    if code == LFU or code == LFU_CACHE:
        return float(N[IVAL, u])
    if code == OPT:
        return -float(N[NUSE, u])
    if code == LRU_SCAN:
        return float(N[LAST, u])
    if code == FIFO_SCAN:
        return float(N[STAMP, u])
    return fval[u] * _decay(code, now - N[STAMP, u], fp, dtab)  # lrfu, lfu-decay, gate-weighted


@njit(cache=True, nogil=True, inline="always")
def _scan_victim(code, c, t0, now, fp, N, H, fval, slots, dtab):
    """Lowest score among the resident slots outside the row, ties to the least recently requested.
    (Inlined, like _score: a call with this many array arguments cost more than the scan of a per-layer
    cache; measured 19 vs 60M requests/s for lfu per layer.)"""
    v = -1
    b_s = 0.0
    for i in range(H[c, OCC]):
        x = slots[c, i]
        if N[LAST, x] > t0:
            continue
        s = _score(code, x, now, fp, N, fval, dtab)
        if v < 0 or s < b_s or (s == b_s and N[LAST, x] < N[LAST, v]):
            v = x
            b_s = s
    return v


# ---- heaps: the score policies on large caches ---------------------------------------------------
# The resident slots of cache c, slots[c, :occ], kept as a binary min-heap in the order of
# :func:`_before`, N[SLOT, u] = u's index. The order is the class's victim order (lowest score, ties to
# the least recently requested) for lfu, lfu-cache and opt, whose scores do not change between requests.
# The decaying scores (lfu-decay, gate-weighted, lrfu: value * e^(-rate * (now - stamp))) change with
# ``now`` but all by the same factor, so they are heaped by the time-invariant value * e^(rate * (stamp -
# ref)), with e^(rate * (now - ref)) computed once per clock tick and ``ref`` moved up (every key
# recomputed, the heaps rebuilt) before it overflows; the exact victim (the class's float score at
# ``now``) is then taken among the few residents within rounding distance of the smallest
# (_decay_victim).

@njit(cache=True, nogil=True, inline="always")
def _prio(code, u, e_now, N, fval):
    """A resident's heap priority (lowest is evicted first; ties to the lowest LAST); ``e_now`` =
    e^(rate * (now - ref)) for a decaying score just updated (stamp = now)."""
    if code == OPT:
        return -float(N[NUSE, u])  # exact: row indices < 2^53, NEVER = 2^62
    if code == LFU or code == LFU_CACHE or code == HOBBIT:
        return float(N[IVAL, u])
    return fval[u] * e_now


@njit(cache=True, nogil=True, inline="always")
def _heap_put(c, i, u, p_u, l_u, N, slots, hp, hl):
    """Node ``u`` with priority ``p_u`` and tie ``l_u`` at heap index ``i`` (and its slot index noted)."""
    slots[c, i] = u
    hp[c, i] = p_u
    hl[c, i] = l_u
    N[SLOT, u] = i


@njit(cache=True, nogil=True, inline="always")
def _sift_up(c, i, N, slots, hp, hl):
    u = slots[c, i]
    p_u = hp[c, i]
    l_u = hl[c, i]
    while i > 0:
        p = (i - 1) >> 1
        if hp[c, p] < p_u or (hp[c, p] == p_u and hl[c, p] < l_u):
            break
        _heap_put(c, i, slots[c, p], hp[c, p], hl[c, p], N, slots, hp, hl)
        i = p
    _heap_put(c, i, u, p_u, l_u, N, slots, hp, hl)
    return i


@njit(cache=True, nogil=True, inline="always")
def _sift_down(c, i, occ, N, slots, hp, hl):
    u = slots[c, i]
    p_u = hp[c, i]
    l_u = hl[c, i]
    while True:
        m = 2 * i + 1
        if m >= occ:
            break
        if m + 1 < occ and (hp[c, m + 1] < hp[c, m] or (hp[c, m + 1] == hp[c, m] and hl[c, m + 1] < hl[c, m])):
            m += 1
        if p_u < hp[c, m] or (p_u == hp[c, m] and l_u < hl[c, m]):
            break
        _heap_put(c, i, slots[c, m], hp[c, m], hl[c, m], N, slots, hp, hl)
        i = m
    _heap_put(c, i, u, p_u, l_u, N, slots, hp, hl)


@njit(cache=True, nogil=True, inline="always")
def _heap_set(code, c, i, occ, u, e_now, N, fval, slots, hp, hl):
    """Put node ``u`` (new or with a changed priority) at index ``i`` and restore the heap."""
    slots[c, i] = u
    hp[c, i] = _prio(code, u, e_now, N, fval)
    hl[c, i] = N[LAST, u]
    N[SLOT, u] = i
    _sift_down(c, _sift_up(c, i, N, slots, hp, hl), occ, N, slots, hp, hl)


@njit(cache=True, nogil=True, inline="always")
def _heap_min(c, t0, occ, slots, hp, hl, stk):
    """Index of the first resident in heap order outside the row (``LAST <= t0``). Every ancestor of
    it is in the row (an ancestor outside it would come first), so only the children of row keys
    reachable from the root are looked at: at most (keys of the row) + 1 candidates."""
    best = -1
    top = 1
    stk[0] = 0
    while top > 0:
        top -= 1
        i = stk[top]
        if hl[c, i] > t0:
            if 2 * i + 1 < occ:
                stk[top] = 2 * i + 1
                top += 1
            if 2 * i + 2 < occ:
                stk[top] = 2 * i + 2
                top += 1
        elif best < 0 or hp[c, i] < hp[c, best] or (hp[c, i] == hp[c, best] and hl[c, i] < hl[c, best]):
            best = i
    return best


@njit(cache=True, nogil=True, _nrt=False)
def _rebase(n_caches, H, N, fval, slots, hp, hl, qrate, ref):
    """Recompute every decaying priority against a new ``ref`` and rebuild the heaps (rare: once per
    ~500 / rate clock ticks). Long-idle keys may underflow to 0; _decay_victim scans then."""
    for c in range(n_caches):
        occ = H[c, OCC]
        for i in range(occ):
            u = slots[c, i]
            hp[c, i] = fval[u] * math.exp(qrate * float(N[STAMP, u] - ref))
        for i in range(occ // 2 - 1, -1, -1):
            _sift_down(c, i, occ, N, slots, hp, hl)


@njit(cache=True, nogil=True, _nrt=False)
def _decay_victim(code, c, t0, now, fp, N, H, fval, slots, hp, hl, stk, dtab):
    """The class's victim for the decaying scores: lowest float score at ``now``, ties to the least
    recently requested, exactly as :func:`_scan_victim`, looking only where it can be.

    The heap priority value * e^(rate * (stamp - ref)) is the score at ``now`` times e^(rate * (now -
    ref)), the same factor for all, up to rounding (relative error ~1e-13: exponents below ~750), so
    the victim's priority is within a relative 1e-9 of the smallest outside the row: the scores of
    those residents are computed exactly as the class does and compared. When the smallest priority
    or score is near the bottom of the float range (rounding is no longer relative there, and the
    class's scores may tie at 0.0), the slots are scanned instead."""
    occ = H[c, OCC]
    m = slots[c, _heap_min(c, t0, occ, slots, hp, hl, stk)]
    q = hp[c, N[SLOT, m]]
    best_s = _score(code, m, now, fp, N, fval, dtab)
    if not (best_s >= 1e-200 and q >= 1e-200):
        return _scan_victim(code, c, t0, now, fp, N, H, fval, slots, dtab)
    bound = q * (1.0 + 1e-9)
    best = m
    top = 1
    stk[0] = 0
    while top > 0:
        top -= 1
        i = stk[top]
        if hp[c, i] > bound:  # and so is every key below it
            continue
        u = slots[c, i]
        if u != m and not hl[c, i] > t0:
            s = _score(code, u, now, fp, N, fval, dtab)
            if s < best_s or (s == best_s and N[LAST, u] < N[LAST, best]):
                best = u
                best_s = s
        if 2 * i + 1 < occ:
            stk[top] = 2 * i + 1
            top += 1
        if 2 * i + 2 < occ:
            stk[top] = 2 * i + 2
            top += 1
    return best


# ---- vector scan: the score policies on mid-sized caches ------------------------------------------
# vp[c, i] is the key of slots[c, i]: its priority as an int64 in the priority's order (the heap's priority,
# _prio: opt's next use, counted down from NO_ROW; a decaying score's time-invariant value * e^(rate * (stamp -
# ref)) as float bits, made monotone by _orderable) with its low VBITS bits replaced by the slot index i. The
# smallest key then names its slot, and keys of equal priority (opt) or of priority within rounding distance
# (the decaying scores, whose low bits are a relative 2^-43) are counted in one more pass and told apart
# exactly only when there are several. A row's keys hold VMASK from their request to the end of the row,
# where their key is written: the minimum is always outside the row. A victim costs two branch-free
# (vectorised) passes over the slots, a request O(1): faster than a heap's sift per request up to a few
# hundred slots.
VBITS = 9  # slot index bits: VSCAN_MAX_SLOTS <= 2^VBITS
VLOW = (1 << VBITS) - 1
VMASK = (1 << 63) - 1
NO_ROW = 1 << 53  # above every row index: opt's key is NO_ROW - min(next use, NO_ROW), never requested again -> 0


@intrinsic
def _float_bits(typingctx, x):
    """The bits of a float64 as an int64 (a register move: a scratch array in memory costs ~50 ns here)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))
    return types.int64(types.float64), codegen


@intrinsic
def _bits_float(typingctx, b):
    """The inverse of :func:`_float_bits`."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


@njit(cache=True, nogil=True, inline="always")
def _orderable(x):
    """The bits of float ``x`` as an int64 in the order of the floats (negative floats: the magnitude bits
    flipped); the inverse is :func:`_from_orderable`."""
    b = _float_bits(x)
    return b if b >= 0 else b ^ VMASK


@njit(cache=True, nogil=True, inline="always")
def _from_orderable(b):
    return _bits_float(b if b >= 0 else b ^ VMASK)


@njit(cache=True, nogil=True, inline="always")
def _vkey(code, u, i, e_now, N, fval):
    """The key of node ``u`` at slot ``i``, just requested (a decaying score's stamp is now)."""
    if code == OPT:
        p = (NO_ROW - min(N[NUSE, u], NO_ROW)) << VBITS
    else:
        p = _orderable(fval[u] * e_now)
    return (p & ~VLOW) | i


@njit(cache=True, nogil=True, inline="always")
def _vmin(vp, c, occ):
    """The smallest of vp[c, :occ] (one branch-free pass: vectorised)."""
    m = VMASK
    for i in range(occ):
        m = min(m, vp[c, i])
    return m


@njit(cache=True, nogil=True, inline="always")
def _vcount(vp, c, occ, bound):
    """How many of vp[c, :occ] are <= bound (one branch-free pass: vectorised)."""
    n = 0
    for i in range(occ):
        n += vp[c, i] <= bound
    return n


@njit(cache=True, nogil=True, _nrt=False)
def _vscan_victim(c, occ, N, slots, vp):
    """opt: the farthest next use, ties to the least recently requested (the heap's order)."""
    m = _vmin(vp, c, occ)
    bound = m | VLOW
    if _vcount(vp, c, occ, bound) == 1:
        return slots[c, m & VLOW]
    best = -1
    for i in range(occ):
        if vp[c, i] <= bound:
            u = slots[c, i]
            if best < 0 or N[LAST, u] < N[LAST, best]:
                best = u
    return best


@njit(cache=True, nogil=True, _nrt=False)
def _vscan_decay_victim(code, c, t0, now, fp, N, H, fval, slots, vp, dtab):
    """:func:`_decay_victim` over the vector-scan keys: every resident whose priority is within a relative
    1e-9 of the smallest (its key truncated: a relative 2^-43 lower) is a candidate; the candidates are
    scored exactly as the class does (see _decay_victim for why the class's victim is among them, and when
    the slots are scanned instead) unless there is only one."""
    occ = H[c, OCC]
    m = _vmin(vp, c, occ)
    q = _from_orderable(m & ~VLOW)
    if not q >= 1e-200:
        return _scan_victim(code, c, t0, now, fp, N, H, fval, slots, dtab)
    bound = _orderable(q * (1.0 + 1e-9)) | VLOW
    if _vcount(vp, c, occ, bound) == 1:
        best = slots[c, m & VLOW]
        best_s = _score(code, best, now, fp, N, fval, dtab)
    else:
        best = -1
        best_s = 0.0
        for i in range(occ):
            if vp[c, i] <= bound:
                u = slots[c, i]
                s = _score(code, u, now, fp, N, fval, dtab)
                if best < 0 or s < best_s or (s == best_s and N[LAST, u] < N[LAST, best]):
                    best = u
                    best_s = s
    if not best_s >= 1e-200:
        return _scan_victim(code, c, t0, now, fp, N, H, fval, slots, dtab)
    return best


@njit(cache=True, nogil=True, _nrt=False)
def _vscan_rebase(n_caches, H, N, fval, slots, vp, qrate, ref):
    """:func:`_rebase` for the vector-scan keys (between rows: no key is masked)."""
    for c in range(n_caches):
        for i in range(H[c, OCC]):
            u = slots[c, i]
            p = _orderable(fval[u] * math.exp(qrate * float(N[STAMP, u] - ref)))
            vp[c, i] = (p & ~VLOW) | i


# ---- hobbit on large caches: the staircase ---------------------------------------------------------
# A candidate u with an older candidate v that counts no more than u loses to v: v has the lower
# recency rank and the lower (count, LAST) rank, so v's score is at most u's (in floats too: rounding is
# monotone) and v wins ties as the less recent. The victim is therefore on the *staircase*: in recency
# order (least recent first), the keys counting less than every older key. Along it counts fall, so
# for a key on it every older key counts more, and its frequency rank is simply the number of keys
# counting less. The staircase is short (measured: ~16 of 128 residents of one global cache on a
# Mixtral trace); it is kept per cache in M[:, c, :H[c, STAIRS]], least recent first, with each key's
# recency rank (MR1) and frequency rank (MR2) among the residents, which each event shifts for a
# contiguous run of it (found by binary search: LAST grows and counts fall along it); the victim is
# the lowest w * MR1 + (1 - w) * MR2 (less the row's keys counting less) on it, see replay_builtin.
# It holds no key of the current row (those are the most recent): a row key leaves it when accessed,
# and the row's keys join it, if they count little enough, when the row ends. N[PEND, u]: u is on it.
# The hot steps are written out in replay_builtin: a helper call costs per array argument.
MN, MC, ML, MR1, MR2, MCNT, MTMP, MTMP_R1 = range(8)  # staircase: node, count, LAST, recency and
# frequency rank; MCNT: the residents' counts in slot order; MTMP*: scratch for _stairs_expose
STAIRS = DEST                    # H column: staircase length (hobbit has no destination list)
NO_COUNT = 1 << 62               # above every count


@njit(cache=True, nogil=True, inline="always")
def _count_below(M, c, occ, x):
    """Residents counting less than ``x`` (a plain loop over M[MCNT, c, :occ] the compiler
    vectorises: cheaper than a tree at these sizes)."""
    cn = M[MCNT, c]
    k = 0
    for i in range(occ):
        k += 1 if cn[i] < x else 0
    return k


@njit(cache=True, nogil=True, _nrt=False)
def _stairs_expose(c, k, start, t0, N, H, M):
    """The staircase key at index ``k`` leaves it (the recency ranks after it already lowered; its
    own still its rank): in its place come the keys it hid, i.e. walking the LRU list from ``start``
    (the node after it) to the next staircase key, those counting less than the staircase key before
    it and than every key passed. Row keys (LAST > t0) are skipped: they are the most recent, wherever
    the list still has them."""
    ms = H[c, STAIRS]
    thr = M[MC, c, k - 1] if k > 0 else NO_COUNT
    r1 = M[MR1, c, k]  # the recency rank of the first candidate after it, once it is gone
    stop = M[MN, c, k + 1] if k + 1 < ms else -1
    n_new = 0
    u = start
    while u != stop:
        if N[LAST, u] <= t0:
            if N[IVAL, u] < thr:
                thr = N[IVAL, u]
                M[MTMP, c, n_new] = u
                M[MTMP_R1, c, n_new] = r1
                n_new += 1
            r1 += 1
        u = N[NXT, u]
    shift = n_new - 1
    if shift > 0:
        for i in range(ms - 1, k, -1):
            for f in range(MR2 + 1):
                M[f, c, i + shift] = M[f, c, i]
    elif shift < 0:
        for i in range(k + 1, ms):
            for f in range(MR2 + 1):
                M[f, c, i - 1] = M[f, c, i]
    occ = H[c, OCC]
    for t in range(n_new):
        y = M[MTMP, c, t]
        N[PEND, y] = 1
        M[MN, c, k + t] = y
        M[MC, c, k + t] = N[IVAL, y]
        M[ML, c, k + t] = N[LAST, y]
        M[MR1, c, k + t] = M[MTMP_R1, c, t]
        M[MR2, c, k + t] = _count_below(M, c, occ, N[IVAL, y])
    H[c, STAIRS] = ms + shift


# ---- hobbit on mid-sized caches: rank vectors ------------------------------------------------------
# Per cache and slot, every resident's recency rank (rr: residents requested before it), frequency rank
# (rf: residents before it in (count, LAST) order) and count (rc), kept exact by one branch-free
# (vectorised) pass per event: a request shifts the ranks between its old and new place; an insertion,
# into the victim's slot, closes the victim's gap and opens the newcomer's in the same pass. The victim is
# the lowest w * rr + (1 - w) * rf over the candidates, ties to the least recent, in one more pass.
# Why these are the ranks among the candidates: the resident row keys were requested after every
# candidate (LAST > t0), so they hold the top recency ranks (a candidate is a slot with rr < occupancy -
# resident row keys), and a row key x precedes candidate v in (count, LAST) order iff count(x) < count(v):
# rf is lowered for those while the victim is chosen. The score is compared exactly as the class's float:
# as an integer where the weight allows (_weight_bits), else as the float itself (_orderable keeps the
# order of negative floats too: any weight works). Ranks are int16 (a cache of at most VSCAN_MAX_SLOTS
# slots) and counts int32 (see RANKS_MAX_REQUESTS): narrow vector lanes. The passes are written out in
# replay_builtin, where they vectorise (as reference-counted helpers, two atomic instructions per array
# argument per call were 40% of the run time).
NO_RANK = (1 << 15) - 1  # above every rank
WM_BITS = 20


@njit(cache=True, nogil=True)
def _weight_bits(w):
    """``m`` if hobbit's weight is m / 2^WM_BITS exactly for an integer 0 <= m <= 2^WM_BITS (0, 1/4, 1/2,
    ...), else -1. Then w * r and (1 - w) * f are exact for ranks below 2^VBITS, and so is their sum (at
    most WM_BITS + VBITS + 1 bits): the class's float score is (m * r + (2^WM_BITS - m) * f) / 2^WM_BITS,
    and the victim is found comparing those integers, ties and all."""
    if not 0.0 <= w <= 1.0:
        return -1
    m = w * (1 << WM_BITS)
    return int(m) if m == math.floor(m) else -1


@njit(cache=True, nogil=True, _nrt=False)
def _hobbit_victim(c, t0, w, N, H, slots):
    """Lowest w * rank(recency) + (1 - w) * rank(frequency) among the candidates, ties to the LRU."""
    best = -1
    b_s = 0.0
    occ = H[c, OCC]
    for i in range(occ):
        u = slots[c, i]
        if N[LAST, u] > t0:
            continue
        rec = 0
        cnt = 0
        for i2 in range(occ):
            v = slots[c, i2]
            if v == u or N[LAST, v] > t0:
                continue
            if N[LAST, v] < N[LAST, u]:
                rec += 1
            if N[IVAL, v] < N[IVAL, u] or (N[IVAL, v] == N[IVAL, u] and N[LAST, v] < N[LAST, u]):
                cnt += 1
        s = w * rec + (1 - w) * cnt
        if best < 0 or s < b_s or (s == b_s and N[LAST, u] < N[LAST, best]):
            best = u
            b_s = s
    return best


@njit(cache=True, nogil=True, _nrt=False)
def _sieve_victim(c, t0, N, H):
    v = H[c, HAND] if H[c, HAND] >= 0 else H[c, HEAD]
    while True:
        if not N[LAST, v] > t0:
            if N[IVAL, v] == 0:
                return v
            N[IVAL, v] = 0
        v = N[NXT, v] if N[NXT, v] >= 0 else H[c, HEAD]


@njit(cache=True, nogil=True, _nrt=False)
def _arc_replace(c, t0, ghost_hit, p, N, H):
    u1 = _first_allowed(H[c, HEAD + T1], t0, N)
    u2 = _first_allowed(H[c, HEAD + T2], t0, N)
    if u1 >= 0 and (H[c, LEN + T1] > p or (H[c, LEN + T1] == p and ghost_hit == 2) or u2 < 0):
        H[c, DEST] = B1 + 1
        return u1
    H[c, DEST] = B2 + 1
    return u2


@njit(cache=True, nogil=True, _nrt=False)
def _arc_victim(c, t0, u_in, size, p, N, H):
    ghost_hit = N[PEND, u_in]
    if ghost_hit:
        return _arc_replace(c, t0, ghost_hit, p, N, H)
    if H[c, LEN + T1] + H[c, LEN + B1] + 1 > size:
        if H[c, LEN + B1] > 0:
            _unlink(H[c, HEAD + B1], c, N, H)
            return _arc_replace(c, t0, 0, p, N, H)
        oldest = _first_allowed(H[c, HEAD + T1], t0, N)
        if oldest < 0:
            return _arc_replace(c, t0, 0, p, N, H)
        H[c, DEST] = 0
        return oldest
    total = H[c, LEN + T1] + H[c, LEN + B1] + H[c, LEN + T2] + H[c, LEN + B2]
    if total >= 2 * size and H[c, LEN + B2] > 0:
        _unlink(H[c, HEAD + B2], c, N, H)
    return _arc_replace(c, t0, 0, p, N, H)


@njit(cache=True, nogil=True, _nrt=False)
def _s3fifo_victim(c, t0, threshold, N, H):
    while True:
        small = _first_allowed(H[c, HEAD + SMALL], t0, N)
        if H[c, LEN + MAIN] > H[c, MAIN_SZ] or small < 0:
            u = H[c, HEAD + MAIN]
            end = H[c, TAIL + MAIN]
            while u >= 0:  # one pass over the main queue as it was (re-inserted keys are not revisited)
                q = N[NXT, u]
                if not N[LAST, u] > t0:
                    if N[IVAL, u] == 0:
                        H[c, DEST] = 0
                        return u
                    _unlink(u, c, N, H)
                    _append(u, c, MAIN, N, H)
                    N[IVAL, u] = min(N[IVAL, u], 3) - 1
                if u == end:
                    break
                u = q
            continue
        u = small
        end = H[c, TAIL + SMALL]
        while u >= 0:
            q = N[NXT, u]
            if not N[LAST, u] > t0:
                if N[IVAL, u] >= threshold:
                    _unlink(u, c, N, H)
                    _append(u, c, MAIN, N, H)
                    N[IVAL, u] = 0
                else:
                    H[c, DEST] = GHOST + 1 if H[c, GHOST_SZ] > 0 else 0
                    return u
            if u == end:
                break
            u = q


# ---- the mechanism -------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def replay_builtin(spec, cache, keys, clock, weights, group, sizes, n_keys, n_groups, nxt_use, fp, rng0):
    """Replay rows (atomic per row; sequential = rows of width 1) under the built-in policy whose code
    is ``len(spec)`` (see :func:`kernel_spec`). Returns (requests, hits) per group."""
    code = len(spec)  # a compile-time constant: each policy gets its own specialisation, dead branches gone
    vscan = code >= VSCAN
    if vscan:
        code -= VSCAN
    ranks = vscan and code == HOBBIT  # hobbit's rank vectors
    vscan = vscan and not ranks
    heaped = code >= HEAPED
    if heaped:
        code -= HEAPED
    n, w = keys.shape
    if ranks and n * w > RANKS_MAX_REQUESTS:
        raise ValueError("hobbit's rank vectors count in int32: a longer stream takes the staircase (kernel_spec)")
    n_caches = sizes.shape[0]
    n_nodes = n_caches * n_keys
    req = np.zeros(n_groups, np.int64)
    hit = np.zeros(n_groups, np.int64)
    N = np.zeros((10, n_nodes), np.int64)
    N[PRV, :] = -1
    N[NXT, :] = -1
    N[SLOT, :] = -1
    H = np.zeros((n_caches, 20), np.int64)
    H[:, HEAD:LEN] = -1
    H[:, HAND] = -1
    fval = np.zeros(n_nodes, np.float64)   # lfu-decay, gate-weighted: score; lrfu: CRF
    arc_p = np.zeros(n_caches, np.float64)  # arc's target size of T1
    for c in range(n_caches):
        H[c, SMALL_SZ] = max(1, int(sizes[c] * fp[P_SMALL]))
        H[c, MAIN_SZ] = sizes[c] - H[c, SMALL_SZ]
        H[c, GHOST_SZ] = int(sizes[c] * fp[P_GHOST])
    threshold = int(fp[P_MOVE])
    scanned = code == LFU or code == OPT or code == LFU_CACHE or code == LFU_DECAY or code == GATE_WEIGHTED \
        or code == LRFU or code == HOBBIT or code == RANDOM or code == LRU_SCAN or code == FIFO_SCAN
    kmax = max(1, sizes.max())
    slots = np.full((n_caches, kmax), -1, np.int64)
    rs = np.zeros(n_caches if code == RANDOM else 1, np.uint64)  # random: each cache's SplitMix64 state
    if code == RANDOM:
        rs[:] = np.uint64(rng0[0])
    buf = np.empty(w + 1, np.int64)
    stk = np.empty(kmax + 2, np.int64)
    decaying = code == LFU_DECAY or code == GATE_WEIGHTED or code == LRFU
    dtab = _decay_table(code, fp)
    vp = np.zeros((n_caches, kmax) if vscan else (1, 1), np.int64)  # vector scan: priority by slot index
    qrate = fp[P_RATE] * math.log(2.0) if code == LRFU else fp[P_RATE]  # score = value * e^(-qrate * age)
    ref = 0      # heap priorities of the decaying scores: value * e^(qrate * (stamp - ref)), see _prio
    e_now = 1.0  # e^(qrate * (now - ref))
    e_at = 0
    # hobbit on a large cache: the staircase (_hobbit_victim_stairs) over an LRU list; a weight outside
    # [0, 1] breaks the staircase argument: slot scan then
    hw = fp[P_RATE]
    walk = heaped and code == HOBBIT and 0.0 <= hw <= 1.0
    M = np.zeros((MTMP_R1 + 1, n_caches, kmax + 1) if walk else (1, 1, 1), np.int64)
    rk = (n_caches, kmax) if ranks else (1, 1)
    rr = np.zeros(rk, np.int16)  # hobbit's rank vectors: recency rank, frequency rank, count by slot
    rf = np.zeros(rk, np.int16)
    rc = np.zeros(rk, np.int32)
    sc = np.zeros(rk[1], np.int64)  # the victim's scratch: the scores (as orderable int64)
    wm = _weight_bits(fp[P_RATE]) if ranks else -1
    per_r = (wm << 2 * VBITS) + (1 << VBITS)  # exact scores: the key (wm r + (2^WM_BITS - wm) f, r, slot)
    per_f = ((1 << WM_BITS) - wm) << 2 * VBITS
    heap = heaped and code != RANDOM and code != HOBBIT  # the score policies' heaps
    hp = np.zeros((n_caches, kmax) if heap else (1, 1), np.float64)  # heap priority by index (_prio)
    hl = np.zeros((n_caches, kmax) if heap else (1, 1), np.int64)    # and LAST: the ties
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
        if (heaped or vscan) and decaying and now != e_at:
            if qrate * float(now - ref) > 500.0:  # e_now would near overflow: re-base every priority
                ref = now
                if vscan:
                    _vscan_rebase(n_caches, H, N, fval, slots, vp, qrate, ref)
                else:
                    _rebase(n_caches, H, N, fval, slots, hp, hl, qrate, ref)
            e_now = math.exp(qrate * float(now - ref))
            e_at = now
        # look up + access, router order
        t0 = tick  # the row's keys are exactly the nodes with LAST > t0 from here on
        for j in range(w):
            u = base + keys[r, j]
            if N[RES, u]:
                hit[g] += 1
            last_before = N[LAST, u]
            tick += 1
            N[LAST, u] = tick
            if code == LFU or code == LFU_CACHE or code == HOBBIT:
                N[IVAL, u] += 1
            elif code == OPT:
                N[NUSE, u] = nxt_use[r, j]
            elif code == LRFU:
                fval[u] = 1.0 + fval[u] * _decay(code, now - N[STAMP, u], fp, dtab)
                N[STAMP, u] = now
            elif code == LFU_DECAY or code == GATE_WEIGHTED:
                inc = 1.0 if code == LFU_DECAY else float(weights[r, j])
                fval[u] = fval[u] * _decay(code, now - N[STAMP, u], fp, dtab) + inc
                N[STAMP, u] = now
            if walk and N[RES, u]:  # the staircase: u becomes the most recent and counts one more
                M[MCNT, c, N[SLOT, u]] += 1
                ms = H[c, STAIRS]
                lo = 0  # those requested after u: one older key less
                hi = ms
                while lo < hi:
                    mid = (lo + hi) >> 1
                    if M[ML, c, mid] <= last_before:
                        lo = mid + 1
                    else:
                        hi = mid
                for i in range(lo, ms):
                    M[MR1, c, i] -= 1
                cnt = N[IVAL, u]
                q = 0  # the one counting what u counts now: one key counting less, less
                hi = ms
                while q < hi:
                    mid = (q + hi) >> 1
                    if M[MC, c, mid] > cnt:
                        q = mid + 1
                    else:
                        hi = mid
                if q < ms and M[MC, c, q] == cnt:
                    M[MR2, c, q] -= 1
                if N[PEND, u]:  # u itself was on it, at lo - 1
                    N[PEND, u] = 0
                    _stairs_expose(c, lo - 1, N[NXT, u], t0, N, H, M)
            if ranks and N[RES, u]:  # u becomes the most recent and, counting one more with the newest
                # LAST, passes every resident after it that counts at most what u counts now
                occ = H[c, OCC]
                s_u = N[SLOT, u]
                cnt = np.int32(N[IVAL, u])  # int32 like rc (the compiler compares 16 per vector)
                r0 = rr[c, s_u]
                f0 = rf[c, s_u]
                moved = 0
                for i in range(occ):
                    rr[c, i] -= rr[c, i] > r0
                    d = (rf[c, i] > f0) & (rc[c, i] <= cnt)
                    rf[c, i] -= d
                    moved += d
                rr[c, s_u] = occ - 1
                rf[c, s_u] = f0 + moved
                rc[c, s_u] = cnt
            if vscan and N[RES, u]:
                vp[c, N[SLOT, u]] = VMASK  # in the row: never the minimum until its priority is written
            if heap and N[RES, u]:
                _heap_set(code, c, N[SLOT, u], H[c, OCC], u, e_now, N, fval, slots, hp, hl)
            if code == SIEVE:
                if N[RES, u]:
                    N[IVAL, u] = 1
            elif code == ARC:
                t = N[TAG, u] - 1
                if t == T1 or t == T2:
                    _unlink(u, c, N, H)
                    _append(u, c, T2, N, H)
                elif t == B1:
                    arc_p[c] = min(arc_p[c] + max(H[c, LEN + B2] / H[c, LEN + B1], 1.0), float(size))
                    _unlink(u, c, N, H)
                    N[PEND, u] = 1
                elif t == B2:
                    arc_p[c] = max(arc_p[c] - max(H[c, LEN + B1] / H[c, LEN + B2], 1.0), 0.0)
                    _unlink(u, c, N, H)
                    N[PEND, u] = 2
                else:
                    N[PEND, u] = 0
            elif code == S3FIFO:
                t = N[TAG, u] - 1
                if t == SMALL or t == MAIN:
                    N[IVAL, u] += 1
                elif t == GHOST:
                    _unlink(u, c, N, H)
                    H[c, ON_GHOST] = 1
        # insert the missing keys, router order, evicting keys outside the row
        for j in range(w):
            u = base + keys[r, j]
            if N[RES, u]:
                continue
            hole = -1  # heaps: the victim's index, which the newcomer takes (one sift instead of two)
            if H[c, OCC] >= size:
                n_row = 0  # hobbit (staircase, rank vectors): the resident row keys' counts
                if walk or ranks:
                    for j2 in range(w):
                        x = base + keys[r, j2]
                        if N[RES, x]:
                            buf[n_row] = N[IVAL, x]
                            n_row += 1
                if code == LRU or code == FIFO:
                    v = _first_allowed(H[c, HEAD], t0, N)
                elif code == SIEVE:
                    v = _sieve_victim(c, t0, N, H)
                elif code == ARC:
                    v = _arc_victim(c, t0, u, size, arc_p[c], N, H)
                elif code == S3FIFO:
                    H[c, EVICTED] = 1
                    v = _s3fifo_victim(c, t0, threshold, N, H)
                elif walk:  # the lowest w * recency rank + (1 - w) * frequency rank on the staircase
                    # (ranks among the candidates: less the resident row keys counting less), ties to
                    # the least recent; a later key scores at least w * its recency rank
                    k_v = -1
                    best_s = 0.0
                    for i in range(H[c, STAIRS]):
                        d = M[MR1, c, i]
                        if k_v >= 0 and hw * d >= best_s:
                            break
                        r2 = M[MR2, c, i]
                        for j2 in range(n_row):
                            r2 -= 1 if buf[j2] < M[MC, c, i] else 0
                        s_i = hw * d + (1 - hw) * r2
                        if k_v < 0 or s_i < best_s:
                            k_v = i
                            best_s = s_i
                    v = M[MN, c, k_v]
                elif ranks:  # the lowest score among the candidates, ties to the lowest rr
                    occ = H[c, OCC]
                    for j2 in range(n_row):  # each resident row key lowers rf where it counts less
                        cx = np.int32(buf[j2])
                        for i in range(occ):
                            rf[c, i] -= cx < rc[c, i]
                    n_cand = occ - n_row
                    pick = VMASK
                    if wm >= 0:
                        for i in range(occ):
                            x = np.int64(rr[c, i])
                            k = x * per_r + np.int64(rf[c, i]) * per_f + i
                            pick = min(pick, k if x < n_cand else VMASK)
                    else:
                        best = VMASK
                        for i in range(occ):
                            k = _orderable(hw * float(rr[c, i]) + (1 - hw) * float(rf[c, i]))
                            k = k if rr[c, i] < n_cand else VMASK
                            sc[i] = k
                            best = min(best, k)
                        for i in range(occ):
                            pick = min(pick, (np.int64(rr[c, i]) << VBITS) | i if sc[i] == best else VMASK)
                    v = slots[c, pick & VLOW]
                    for j2 in range(n_row):
                        cx = np.int32(buf[j2])
                        for i in range(occ):
                            rf[c, i] += cx < rc[c, i]
                elif code == HOBBIT:
                    v = _hobbit_victim(c, t0, fp[P_RATE], N, H, slots)
                elif code == RANDOM:  # the draw-th candidate in slot order: skip the row's slots before it
                    n_row = 0
                    for j2 in range(w):
                        x = base + keys[r, j2]
                        if N[RES, x]:
                            i = N[SLOT, x]
                            t = n_row  # insertion sort: a handful of slots
                            while t > 0 and buf[t - 1] > i:
                                buf[t] = buf[t - 1]
                                t -= 1
                            buf[t] = i
                            n_row += 1
                    i = _draw_below(rs, c, H[c, OCC] - n_row)
                    for t in range(n_row):
                        if buf[t] > i:
                            break
                        i += 1
                    v = slots[c, i]
                elif vscan and decaying:
                    v = _vscan_decay_victim(code, c, t0, now, fp, N, H, fval, slots, vp, dtab)
                elif vscan:
                    v = _vscan_victim(c, H[c, OCC], N, slots, vp)
                elif heaped and decaying:
                    v = _decay_victim(code, c, t0, now, fp, N, H, fval, slots, hp, hl, stk, dtab)
                elif heaped:
                    v = slots[c, _heap_min(c, t0, H[c, OCC], slots, hp, hl, stk)]
                else:
                    v = _scan_victim(code, c, t0, now, fp, N, H, fval, slots, dtab)
                # evict
                N[RES, v] = 0
                H[c, OCC] -= 1
                if heap:
                    hole = N[SLOT, v]
                    if code == LFU_CACHE:
                        N[IVAL, v] = 0
                elif ranks:  # the newcomer takes the victim's slot
                    hole = N[SLOT, v]
                elif scanned:
                    i = N[SLOT, v]
                    moved = slots[c, H[c, OCC]]
                    slots[c, i] = moved
                    N[SLOT, moved] = i
                    if walk:
                        M[MCNT, c, i] = M[MCNT, c, H[c, OCC]]
                        N[PEND, v] = 0
                        for i in range(k_v):  # the older ones count more than v
                            M[MR2, c, i] -= 1
                        for i in range(k_v + 1, H[c, STAIRS]):
                            M[MR1, c, i] -= 1
                        _stairs_expose(c, k_v, N[NXT, v], t0, N, H, M)
                        _unlink(v, c, N, H)
                    if vscan:  # the moved key names its new slot (a masked one stays above every key)
                        vp[c, i] = (vp[c, H[c, OCC]] & ~VLOW) | i
                    if code == LFU_CACHE:
                        N[IVAL, v] = 0
                else:
                    if code == SIEVE:
                        H[c, HAND] = N[NXT, v]
                    _unlink(v, c, N, H)
                    if (code == ARC or code == S3FIFO) and H[c, DEST] > 0:
                        if code == S3FIFO and H[c, LEN + GHOST] >= H[c, GHOST_SZ]:
                            _unlink(H[c, HEAD + GHOST], c, N, H)
                        _append(v, c, H[c, DEST] - 1, N, H)
            # insert
            N[RES, u] = 1
            if heap:
                _heap_set(code, c, H[c, OCC] if hole < 0 else hole, H[c, OCC] + 1, u, e_now, N, fval, slots, hp, hl)
            elif ranks:  # into the victim's slot (its gap closes) or a free one; every resident after u
                # in (count, LAST) order moves up one (u taken as requested after every resident: the
                # row keys requested after it are put right below)
                occ = H[c, OCC]
                cnt = np.int32(N[IVAL, u])
                i = occ
                r0 = np.int16(NO_RANK)  # int16 like the ranks (and cnt int32 like rc): narrow vector lanes
                f0 = np.int16(NO_RANK)
                nf = 0
                if hole >= 0:
                    i = hole
                    r0 = rr[c, i]
                    f0 = rf[c, i]
                    nf -= rc[c, i] <= cnt
                    occ += 1
                for t in range(occ):
                    rr[c, t] -= rr[c, t] > r0
                    up = rc[c, t] > cnt
                    rf[c, t] += up - (rf[c, t] > f0)
                    nf += 1 - up
                rr[c, i] = H[c, OCC]
                rf[c, i] = nf
                rc[c, i] = cnt
                slots[c, i] = u
                N[SLOT, u] = i
                for j2 in range(w):  # row keys requested after u: u is before them in both orders
                    x = base + keys[r, j2]
                    if N[RES, x] and N[LAST, x] > N[LAST, u]:
                        ix = N[SLOT, x]
                        rr[c, ix] += 1
                        rr[c, i] -= 1
                        if rc[c, ix] == cnt:
                            rf[c, ix] += 1
                            rf[c, i] -= 1
            elif scanned:
                slots[c, H[c, OCC]] = u
                N[SLOT, u] = H[c, OCC]
                if walk:  # u joins the staircase when the row ends; one more key counting less than
                    # those counting more
                    cnt = N[IVAL, u]
                    M[MCNT, c, H[c, OCC]] = cnt
                    for i in range(H[c, STAIRS]):
                        if M[MC, c, i] <= cnt:
                            break
                        M[MR2, c, i] += 1
                    _append(u, c, 0, N, H)
                if vscan:
                    vp[c, H[c, OCC]] = VMASK
                if code == FIFO_SCAN:
                    tick += 1
                    N[STAMP, u] = tick
            elif code == ARC:
                _append(u, c, T2 if N[PEND, u] else T1, N, H)
            elif code == S3FIFO:
                to_main = H[c, ON_GHOST] or (not H[c, EVICTED] and H[c, LEN + SMALL] >= H[c, SMALL_SZ])
                _append(u, c, MAIN if to_main else SMALL, N, H)
                N[IVAL, u] = 0
                H[c, ON_GHOST] = 0
            else:  # lru, fifo, sieve: the tail
                _append(u, c, 0, N, H)
                N[IVAL, u] = 0
            H[c, OCC] += 1
        if vscan:  # the row's keys, now that no victim is chosen among the others until the next row
            for j in range(w):
                u = base + keys[r, j]
                vp[c, N[SLOT, u]] = _vkey(code, u, N[SLOT, u], e_now, N, fval)
        if code == LRU or walk:  # the row's keys become the most recent, router order
            for j in range(w):
                u = base + keys[r, j]
                if H[c, TAIL] != u:
                    _unlink(u, c, N, H)
                    _append(u, c, 0, N, H)
            if walk:  # the row's keys, now the most recent in router order, join the staircase where
                # they count less than every older key
                occ = H[c, OCC]
                for j in range(w):
                    u = base + keys[r, j]
                    ms = H[c, STAIRS]
                    if ms == 0 or N[IVAL, u] < M[MC, c, ms - 1]:
                        N[PEND, u] = 1
                        M[MN, c, ms] = u
                        M[MC, c, ms] = N[IVAL, u]
                        M[ML, c, ms] = N[LAST, u]
                        M[MR1, c, ms] = occ - w + j
                        M[MR2, c, ms] = _count_below(M, c, occ, N[IVAL, u])
                        H[c, STAIRS] = ms + 1
    return req, hit


@njit(cache=True, nogil=True)
def replay_builtin_sizes(spec, cache, keys, clock, weights, group, size_list, n_caches, n_keys, n_groups,
                         nxt_use, fp, rng0):
    """Hits for each uniform cache size in ``size_list`` (one replay per size, one compiled call)."""
    out = np.zeros(size_list.shape[0], np.int64)
    for i in range(size_list.shape[0]):
        sizes = np.full(n_caches, size_list[i], np.int64)
        _, hit = replay_builtin(spec, cache, keys, clock, weights, group, sizes, n_keys, n_groups, nxt_use, fp,
                                rng0)
        out[i] = hit.sum()
    return out


# ---- one pass over all sizes for the stack policies ----------------------------------------------

@njit(cache=True, nogil=True)
def stack_depths(spec, cache, keys, clock, weights, n_caches, n_keys, nxt_use, fp):
    """Histogram of stack depths (0-based, before each row's update; never-seen keys in the last bin)
    for a priority policy whose priority does not depend on the cache size (lfu, opt, lrfu, lfu-decay,
    gate-weighted): hits(K) = sum(hist[:K]) for every K >= the row width, in one pass.

    Why this is exact: the policy state is the same for every size; under the atomic semantics the
    cache of K slots loses, per row, the lowest-priority keys outside the row, so after the row it holds
    the row and the K - w highest-priority keys among those it held outside the row. Keeping every
    size at once is a stack (inclusion: tests/test_inclusion.py) whose update walks down to the deepest
    key of the row, carrying at most w keys (Mattson et al. 1970, for sets of w keys)."""
    code = len(spec)
    n, w = keys.shape
    n_nodes = n_caches * n_keys
    N = np.zeros((10, n_nodes), np.int64)
    fval = np.zeros(n_nodes, np.float64)
    stack = np.full((n_caches, n_keys), -1, np.int64)
    pos = np.full(n_nodes, -1, np.int64)
    used = np.zeros(n_caches, np.int64)
    hist = np.zeros(n_keys + 1, np.int64)
    pool = np.empty(w + 1, np.int64)
    dtab = _decay_table(code, fp)
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
            N[LAST, u] = tick
            if code == LFU:
                N[IVAL, u] += 1
            elif code == OPT:
                N[NUSE, u] = nxt_use[r, j]
            elif code == LRFU:
                fval[u] = 1.0 + fval[u] * _decay(code, now - N[STAMP, u], fp, dtab)
                N[STAMP, u] = now
            else:  # lfu-decay, gate-weighted
                inc = 1.0 if code == LFU_DECAY else float(weights[r, j])
                fval[u] = fval[u] * _decay(code, now - N[STAMP, u], fp, dtab) + inc
                N[STAMP, u] = now
        # positions 0..w-1: the row; below, after old position i, exactly i + 1 - w of the others
        # (the highest-priority ones seen so far) are placed; the rest stay in the pool
        m = 0
        out = w
        for i in range(deepest + 1):
            x = stack[c, i]
            if N[LAST, x] <= t0:
                pool[m] = x
                m += 1
            while out <= i and m > 0:
                b = 0
                sb = _score(code, pool[0], now, fp, N, fval, dtab)
                for t in range(1, m):
                    s = _score(code, pool[t], now, fp, N, fval, dtab)
                    if s > sb or (s == sb and N[LAST, pool[t]] > N[LAST, pool[b]]):
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
