"""The request loop of every compiled built-in policy, written once (libCacheSim's shape: the simulator's
loop calls each policy's own rules).

Per row (docs/semantics.md): count its requests; *look up and access* every key in router order (a hit is
counted, the key's LAST tick set, then the policy's ``on_request``); then for each missing key, in router
order, *evict until room* -- the policy's ``victim`` (never a key of the row: those are the nodes with
``LAST > t0``), marked not resident, then the policy's ``on_evict`` (which returns the slot it left, or -1,
for a policy whose newcomer takes the victim's place) -- and *insert* (marked resident, the policy's
``on_insert``). A policy's module holds only those rules, ``setup`` (its own state, a tuple handed to every
rule) and, where it has them, ``start_row`` and ``end_row``; each module's ``replay_<name>`` calls
:func:`request_loop` with its rules and the constants of its policy and layout.

The loop is inlined (``inline="always"``) into each ``replay_<name>``, so numba compiles one function per
policy and layout. The rules are compiled without reference counting (``_nrt=False``: they allocate
nothing) and called, not inlined by numba: inlined, their branches kept numba from pruning the array
reference counts (measured, 30k Mixtral tokens, one global cache of 128 slots, 2-core EPYC: lfu's heap at
0.4x the speed of its hand-written loop; called, 0.9-1.0x); a rule that is one straight-line store
may be inlined (lists' ``on_request``). ``setup`` allocates and is inlined. The rules
several policies share are here.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from moesim.simulator.policy_kernels.state import (
    LAST,
    OCCUPANCY,
    RESIDENT,
    evict,
    new_state,
    slot_append,
    slot_remove,
)


@njit(cache=True, nogil=True, inline="always")
def no_state(policy, layout, n, w, sizes, n_keys, fparams, rng_state, caches):
    """A ``setup`` for a policy with no state of its own."""
    return None


@njit(cache=True, nogil=True, _nrt=False)
def no_request_step(policy, layout, u, resident, last_before, r, j, c, t0, now, size, weights, next_use, fparams, nodes,
                    caches, slots, extra):
    """An ``on_request`` that does nothing."""
    return None


@njit(cache=True, nogil=True, _nrt=False)
def leave_slot(policy, layout, v, c, t0, nodes, caches, slots, extra):
    """An ``on_evict``: the victim leaves its slot (the last resident takes it)."""
    slot_remove(v, c, nodes, caches, slots)
    return -1


@njit(cache=True, nogil=True, _nrt=False)
def take_slot(policy, layout, u, hole, r, c, now, base, keys, nodes, caches, slots, extra):
    """An ``on_insert``: the newcomer takes the next free slot."""
    slot_append(u, c, nodes, caches, slots)


@njit(cache=True, nogil=True, _nrt=False)
def no_row_step(policy, layout, r, c, now, base, keys, n_caches, nodes, caches, slots, extra):
    """A ``start_row`` or ``end_row`` that does nothing."""
    return None


@njit(cache=True, nogil=True, inline="always")
def request_loop(setup, start_row, on_request, victim, on_evict, on_insert, end_row, policy, layout, cache, keys,
                 clock, weights, group, sizes, n_keys, n_groups, next_use, fparams, rng_state):
    """(requests, hits) per group: the rows of ``keys`` replayed through cache ``cache[r]`` of ``sizes``,
    counted in group ``group[r]``. ``slots[c, :occupancy]`` holds cache c's residents for the policies
    that keep them in slots (``state.slot_append``); the others leave it alone."""
    n, w = keys.shape
    n_caches = sizes.shape[0]
    req = np.zeros(n_groups, np.int64)
    hit = np.zeros(n_groups, np.int64)
    nodes, caches = new_state(n_caches, n_keys)
    slots = np.full((n_caches, max(1, sizes.max())), -1, np.int64)
    extra = setup(policy, layout, n, w, sizes, n_keys, fparams, rng_state, caches)
    tick = 0
    for r in range(n):
        c = cache[r]
        g = group[r]
        req[g] += w
        size = sizes[c]
        if size == 0:  # the row is only counted
            continue
        base = c * n_keys
        now = clock[r]
        start_row(policy, layout, r, c, now, base, keys, n_caches, nodes, caches, slots, extra)
        t0 = tick  # the row's keys are exactly the nodes with LAST > t0 from here on
        missing = 0
        for j in range(w):  # look up + access, router order
            u = base + keys[r, j]
            resident = nodes[RESIDENT, u]
            if resident:
                hit[g] += 1
            else:
                missing += 1
            last_before = nodes[LAST, u]
            tick += 1
            nodes[LAST, u] = tick
            on_request(policy, layout, u, resident, last_before, r, j, c, t0, now, size, weights, next_use, fparams,
                       nodes, caches, slots, extra)
        # insert the missing keys, router order, evicting keys outside the row (a row that all hit skips
        # the pass: with a cache that holds every key, most rows do; benchmarks/bench_replay_paired.py)
        for j in range(w if missing else 0):
            u = base + keys[r, j]
            if nodes[RESIDENT, u]:
                continue
            hole = -1
            if caches[c, OCCUPANCY] >= size:
                v = victim(policy, layout, u, r, c, t0, now, size, base, keys, fparams, nodes, caches, slots, extra)
                evict(v, c, nodes, caches)
                hole = on_evict(policy, layout, v, c, t0, nodes, caches, slots, extra)
            nodes[RESIDENT, u] = 1
            on_insert(policy, layout, u, hole, r, c, now, base, keys, nodes, caches, slots, extra)
            caches[c, OCCUPANCY] += 1
        end_row(policy, layout, r, c, now, base, keys, n_caches, nodes, caches, slots, extra)
    return req, hit
