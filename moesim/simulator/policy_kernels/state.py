"""The array state every compiled policy shares, and the helpers that act on it.

A replay keeps its per-key state in one int64 array ``nodes[field, node]``, node ``u = cache * n_keys +
key``, and its per-cache state in ``caches[cache, column]``. A helper call costs per array argument
(measured: list operations taking 6 arrays ran at 1/4 the speed of the same operations on 2), so helpers
take these two arrays rather than one array per field.

Helpers that take the kernel's arrays and allocate nothing are compiled without numba's reference
counting (``_nrt=False``): with it, every call of a helper with loops increfs and decrefs each array
argument, an atomic instruction apiece, which was 40-65% of a global cache's replay time on a 2-core AMD
EPYC. Small helpers called per request are inlined instead (``inline="always"``), but only straight-line
ones: an inlined helper with loops over its array arguments keeps their increfs and decrefs too (numba's
pruning gave up on random's victim, 4-5 atomic instructions per eviction, and on hobbit's, 6 pairs), and
a call with many array arguments costs more than a small cache's work (hobbit's rank vectors as calls:
0.65x), so such code is written out in its kernel's loop.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.extending import intrinsic

# ---- layouts: how a policy finds its victim (each family's ``layout_for`` picks one per replay) -------
LIST = 0    # linked lists in arrays: the victim is found from a list's head
SCAN = 1    # a scan of the resident slots (small caches)
HEAP = 2    # an indexed binary heap (score policies) or hobbit's staircase (large caches)
VECTOR = 3  # one int64 key (or two ranks) per slot, found by branch-free passes (mid-sized caches)

SCAN_MAX_SLOTS = 16     # lru and fifo scan their slots up to here
HEAP_MIN_SLOTS = 9      # the score policies and hobbit scan below here
VECTOR_MAX_SLOTS = 512  # ... and use the vector layout up to here (VECTOR_MAX_SLOTS <= 2^SLOT_BITS)

# ---- per-key fields: nodes[field, node] ----------------------------------------------------------
PREV, NEXT, LIST_TAG, RESIDENT, LAST, COUNT, STAMP, NEXT_USE, FLAG, SLOT = range(10)
N_FIELDS = 10
# LAST: the tick of the key's last request (unique; a row's keys are exactly those with LAST > the tick
#   before the row); COUNT: a per-key integer (a request count, sieve's visited bit, s3fifo's frequency);
# STAMP: the clock of the last request (decaying scores) or the insertion tick (fifo's scan layout);
# FLAG: a per-policy mark (arc: which ghost list the key came back from; hobbit: on the staircase);
# SLOT: the key's index in ``slots`` (scan, heap, vector layouts); LIST_TAG: list id + 1, 0 = on none.

# ---- per-cache columns: caches[cache, column] ------------------------------------------------------
HEAD, TAIL, LENGTH = 0, 4, 8  # + list id (up to 4 lists per cache)
OCCUPANCY, HAND, DEST, SMALL_SIZE, MAIN_SIZE, GHOST_SIZE, ON_GHOST, EVICTED, CLOCK = range(12, 21)
N_COLUMNS = 21
# DEST: the list (+ 1) a victim moves to (a ghost list), 0 = dropped; CLOCK: a policy's own clock per cache


@njit(cache=True, nogil=True, inline="always")
def new_state(n_caches: int, n_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """Empty caches: every key on no list, in no slot. (Inlined, like every allocation a kernel's loop
    reads: arrays returned by a compiled call are opaque to LLVM, which must then assume that a store to
    one may change the others and reload them; allocated in the kernel, they are known apart. Measured,
    one global cache of 256 slots, a 2-core EPYC: lru 0.85x and lrfu 0.74x the speed of bd85472's
    hand-written loop as a call, 1.01x and 0.93x inlined.)"""
    nodes = np.zeros((N_FIELDS, n_caches * n_keys), np.int64)
    nodes[PREV, :] = -1
    nodes[NEXT, :] = -1
    nodes[SLOT, :] = -1
    caches = np.zeros((n_caches, N_COLUMNS), np.int64)
    caches[:, HEAD:LENGTH] = -1
    caches[:, HAND] = -1
    return nodes, caches


# ---- linked lists in arrays ----------------------------------------------------------------------

@njit(cache=True, nogil=True, _nrt=False)
def list_append(u, c, lst, nodes, caches):
    t = caches[c, TAIL + lst]
    nodes[PREV, u] = t
    nodes[NEXT, u] = -1
    if t >= 0:
        nodes[NEXT, t] = u
    else:
        caches[c, HEAD + lst] = u
    caches[c, TAIL + lst] = u
    nodes[LIST_TAG, u] = lst + 1
    caches[c, LENGTH + lst] += 1


@njit(cache=True, nogil=True, _nrt=False)
def list_unlink(u, c, nodes, caches):
    lst = nodes[LIST_TAG, u] - 1
    p = nodes[PREV, u]
    q = nodes[NEXT, u]
    if p >= 0:
        nodes[NEXT, p] = q
    else:
        caches[c, HEAD + lst] = q
    if q >= 0:
        nodes[PREV, q] = p
    else:
        caches[c, TAIL + lst] = p
    nodes[LIST_TAG, u] = 0
    caches[c, LENGTH + lst] -= 1


@njit(cache=True, nogil=True, _nrt=False)
def first_allowed(u, t0, nodes):
    """The first node from ``u`` on (towards the tail) that is not a key of the current row, or -1.
    A node is in the current row iff it was requested after the row began (``LAST > t0``): every key
    of the row is accessed before any victim is chosen, and only they carry those ticks."""
    while u >= 0 and nodes[LAST, u] > t0:
        u = nodes[NEXT, u]
    return u


@njit(cache=True, nogil=True, inline="always")
def move_to_tail(u, c, lst, nodes, caches):
    """``u`` becomes the last of list ``lst`` (the most recent)."""
    if caches[c, TAIL + lst] != u:
        list_unlink(u, c, nodes, caches)
        list_append(u, c, lst, nodes, caches)


# ---- the resident slots (scan, heap and vector layouts) -----------------------------------------

@njit(cache=True, nogil=True, inline="always")
def slot_remove(v, c, nodes, caches, slots):
    """Victim ``v`` leaves its slot; the last resident takes it. Returns (the slot, the slot vacated)."""
    i = nodes[SLOT, v]
    last = caches[c, OCCUPANCY]  # already decremented: the index of the last resident
    moved = slots[c, last]
    slots[c, i] = moved
    nodes[SLOT, moved] = i
    return i, last


@njit(cache=True, nogil=True, inline="always")
def slot_append(u, c, nodes, caches, slots):
    """``u`` takes the next free slot."""
    i = caches[c, OCCUPANCY]
    slots[c, i] = u
    nodes[SLOT, u] = i
    return i


# ---- floats as orderable integers (vector layouts) ------------------------------------------------
SLOT_BITS = 9  # slot index bits of a vector key: VECTOR_MAX_SLOTS <= 2^SLOT_BITS
SLOT_MASK = (1 << SLOT_BITS) - 1
KEY_MAX = (1 << 63) - 1  # above every key: a masked slot


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
def orderable(x):
    """The bits of float ``x`` as an int64 in the order of the floats (negative floats: the magnitude bits
    flipped); the inverse is :func:`from_orderable`."""
    b = _float_bits(x)
    return b if b >= 0 else b ^ KEY_MAX


@njit(cache=True, nogil=True, inline="always")
def from_orderable(b):
    return _bits_float(b if b >= 0 else b ^ KEY_MAX)


# ---- the mechanism's common steps (docs/semantics.md), inlined into every kernel ------------------------

@njit(cache=True, nogil=True, inline="always")
def new_replay(n_caches, n_keys, n_groups):
    """(requests, hits) per group, zero, and the state of empty caches."""
    nodes, caches = new_state(n_caches, n_keys)
    return np.zeros(n_groups, np.int64), np.zeros(n_groups, np.int64), nodes, caches


@njit(cache=True, nogil=True, inline="always")
def open_row(r, cache, group, sizes, req, width):
    """Row ``r``'s cache, group and cache size (0: the row is only counted), its requests counted."""
    c = cache[r]
    g = group[r]
    req[g] += width
    return c, g, sizes[c]


@njit(cache=True, nogil=True, inline="always")
def evict(v, c, nodes, caches):
    nodes[RESIDENT, v] = 0
    caches[c, OCCUPANCY] -= 1
