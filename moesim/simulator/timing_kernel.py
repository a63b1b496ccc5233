"""Compiled fast path of the timing simulator for the common case: batch-1 decode, one cache per
layer, a compiled policy (lru, fifo, lfu, opt) and a built-in prefetcher.

It performs exactly the operations of :func:`moesim.simulator.timing.simulate_timing` in the same
order (tests/test_timing_fast.py compares every metric), with array state instead of objects.
Victim ties break by the smallest expert id, as the reference classes do.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from moesim.policies.base import NEVER
from moesim.simulator.policy_kernels import lists, scores
from moesim.simulator.policy_kernels.lists import FIFO, LRU
from moesim.simulator.policy_kernels.scores import LFU, OPT

PF_NONE, PF_PREVIOUS, PF_TRANSITION, PF_ORACLE, PF_SPECULATIVE = 0, 1, 2, 3, 4
PREFETCH_CODES = {"none": PF_NONE, "previous-token": PF_PREVIOUS, "transition": PF_TRANSITION,
                  "oracle": PF_ORACLE, "speculative": PF_SPECULATIVE}
# the policies this kernel runs, by the replay's numbers (policy_kernels.registry)
POLICY_CODES = {"lru": LRU, "fifo": FIFO, "lfu": LFU, "opt": OPT}


@njit(cache=True, nogil=True)
def _victim(policy, layer, size, slots, protect_mask, last, count, inserted, next_use):
    """The slot of the first resident outside ``protect_mask`` by the policy's victim rule, the replay's
    (``lists.evicts_first``, ``scores.evicts_first``)."""
    best = -1
    for t in range(size):
        v = slots[layer, t]
        if protect_mask[v]:
            continue
        if best < 0:
            best = t
            continue
        b = slots[layer, best]
        if policy == LRU or policy == FIFO:
            first = lists.evicts_first(policy, last[layer, v], inserted[layer, v], v, last[layer, b],
                                       inserted[layer, b], b)
        else:
            s_v = float(count[layer, v]) if policy == LFU else -float(next_use[layer, v])
            s_b = float(count[layer, b]) if policy == LFU else -float(next_use[layer, b])
            first = scores.evicts_first(policy, s_v, last[layer, v], v, s_b, last[layer, b], b)
        if first:
            best = t
    return best


@njit(cache=True, nogil=True)
def _issue_copy(engines, ready, duration):
    """Queue a copy on the earliest-free copy engine (ties: lowest index); returns when it lands."""
    c = 0
    for q in range(1, engines.shape[0]):
        if engines[q] < engines[c]:
            c = q
    engines[c] = max(engines[c], ready) + duration
    return engines[c]


@njit(cache=True, nogil=True)
def des_kernel(policy, pf, distance, budget, step, layer, keys, nxt, row_at, pred, sizes, n_experts,
               token_s, layer_s, copy_s, expert_s, n_engines, demand_s, handoff_s, late, predict_s, issue_h,
               ready_hop):
    """``copy_s``: a prefetch copy (the copy stream's hop + the transfer); ``demand_s``: a demand copy (the
    hop + the transfer + the engine's per-miss issue cost); ``ready_hop``: compute resumes that long after
    a copy it waited for lands; ``handoff_s``: the per-layer routing hand-off on compute (0 in replay mode); ``late``:
    the prefetch (speculative, ready "hidden") is issued after the layer's experts and ``predict_s`` on
    compute, the host reading the prediction back (``handoff_s``) first; ``issue_h``: host time per
    issued copy (gate mode): on compute for copies issued between the hand-off and the experts, on the
    host's own clock for late ones (the next hand-off waits for it)."""
    n, k = keys.shape
    L = sizes.shape[0]
    E = n_experts
    n_steps = row_at.shape[0]
    kmax = max(1, sizes.max())
    slots = np.full((L, kmax), -1, np.int64)
    occ = np.zeros(L, np.int64)
    resident = np.zeros((L, E), np.bool_)
    last = np.zeros((L, E), np.int64)
    count = np.zeros((L, E), np.int64)
    inserted = np.zeros((L, E), np.int64)
    next_use = np.full((L, E), NEVER, np.int64)
    inflight = np.zeros((L, E))
    pending = np.zeros((L, E), np.bool_)
    trans = np.zeros((L, E, E))
    se = np.full((L, k), -1, np.int64)      # transition: experts observed at each layer this step
    se_valid = np.zeros(L, np.bool_)
    prev = np.full((L, k), -1, np.int64)    # previous-token: last experts observed per layer
    engines = np.zeros(n_engines)
    per_token = np.zeros(n_steps)
    protect = np.zeros(E, np.bool_)
    ready = np.zeros(k)
    order = np.zeros(k, np.int64)
    score = np.zeros(E)
    picks = np.zeros(E, np.int64)
    compute_free = 0.0
    host_busy = 0.0     # gate mode: the host issues late speculative copies until then
    tick = 0
    hits = landed = prefetches = used = rec_hits = rec_needed = copies = 0
    stall = 0.0
    compute = 0.0
    r = 0
    for i in range(n_steps):
        t0 = compute_free
        compute_free += token_s
        compute += token_s
        while r < n and step[r] == i:
            lay = layer[r]
            compute_free += layer_s[r]
            compute += layer_s[r]
            if handoff_s > 0.0 or host_busy > compute_free:
                compute_free = max(compute_free, host_busy) + handoff_s
            gate = compute_free
            size = sizes[lay]
            # ---- demand request (atomic set) ----
            for j in range(k):
                e = keys[r, j]
                if resident[lay, e]:
                    hits += 1
                    ready[j] = inflight[lay, e]
                    if inflight[lay, e] <= gate:
                        landed += 1
                    if pending[lay, e]:
                        pending[lay, e] = False
                        used += 1
                        if lay >= distance:
                            rec_hits += 1
                else:
                    ready[j] = -1.0  # marks a miss
            for j in range(k):
                e = keys[r, j]
                tick += 1
                last[lay, e] = tick
                count[lay, e] += 1
                if policy == OPT:   # nxt is a (1, 1) placeholder for the other policies
                    next_use[lay, e] = nxt[r, j]
            for j in range(k):
                if ready[j] >= 0.0:
                    continue
                e = keys[r, j]
                if occ[lay] < size:
                    s = occ[lay]
                    occ[lay] += 1
                else:
                    protect[:] = False
                    for jj in range(k):
                        protect[keys[r, jj]] = True
                    s = _victim(policy, lay, size, slots, protect, last, count, inserted, next_use)
                    resident[lay, slots[lay, s]] = False
                slots[lay, s] = e
                resident[lay, e] = True
                tick += 1
                inserted[lay, e] = tick
            if lay >= distance:
                rec_needed += k
            for j in range(k):
                if ready[j] >= 0.0:
                    continue
                e = keys[r, j]
                pending[lay, e] = False
                if issue_h > 0.0:
                    compute_free += issue_h
                ready[j] = _issue_copy(engines, compute_free if issue_h > 0.0 else gate, demand_s)
                inflight[lay, e] = ready[j]
                copies += 1
            for part in range(2):   # 0: prefetch then experts; a late prefetch comes after the experts
                if (part == 0) != late:
                    # ---- prefetch for layer + distance ----
                    target = lay + distance
                    if late and target < L:
                        compute_free += predict_s
                        compute += predict_s
                        t_issue = compute_free
                        host_at = compute_free + handoff_s
                    else:
                        t_issue = gate
                        host_at = -1.0
                    if pf != PF_NONE and target < L and sizes[target] > 0:
                        n_picks = 0
                        if pf == PF_PREVIOUS:
                            for j in range(k):
                                if prev[target, j] >= 0:
                                    picks[n_picks] = prev[target, j]
                                    n_picks += 1
                        elif pf == PF_TRANSITION:
                            for e in range(E):
                                acc = 0.0
                                for j in range(k):
                                    acc += trans[lay, keys[r, j], e]
                                score[e] = acc
                                if acc > 0.0:  # stable insertion by descending score (ties: smaller id first)
                                    q = n_picks
                                    while q > 0 and score[picks[q - 1]] < acc:
                                        picks[q] = picks[q - 1]
                                        q -= 1
                                    picks[q] = e
                                    n_picks += 1
                        else:
                            rt = row_at[i, target]
                            if rt >= 0:
                                for j in range(k):
                                    e = keys[rt, j] if pf == PF_ORACLE else pred[rt, j]
                                    if e >= 0:
                                        picks[n_picks] = e
                                        n_picks += 1
                        n_picks = min(n_picks, budget)
                        protect[:] = False
                        for e in range(E):
                            if (inflight[target, e] > t_issue) or pending[target, e]:
                                protect[e] = True
                        for q in range(n_picks):
                            protect[picks[q]] = True
                        for q in range(n_picks):
                            e = picks[q]
                            if resident[target, e]:
                                continue
                            tsize = sizes[target]
                            if occ[target] < tsize:
                                s = occ[target]
                                occ[target] += 1
                            else:
                                s = _victim(policy, target, tsize, slots, protect, last, count, inserted, next_use)
                                if s < 0:
                                    break
                                v = slots[target, s]
                                resident[target, v] = False
                                pending[target, v] = False
                                inflight[target, v] = 0.0
                            slots[target, s] = e
                            resident[target, e] = True
                            tick += 1
                            inserted[target, e] = tick
                            at = t_issue
                            if issue_h > 0.0:
                                if host_at < 0.0:
                                    compute_free += issue_h
                                    at = compute_free
                                else:
                                    host_at = max(host_at, t_issue) + issue_h
                                    at = host_at
                            inflight[target, e] = _issue_copy(engines, at, copy_s)
                            pending[target, e] = True
                            prefetches += 1
                            copies += 1
                    if late and target < L:
                        host_busy = host_at
                else:
                    # ---- expert compute in order of readiness (router order breaks ties) ----
                    for j in range(k):
                        order[j] = j
                    for a in range(1, k):  # insertion sort on (ready, j): k is tiny
                        b = a
                        while b > 0 and ready[order[b - 1]] > ready[order[b]]:
                            order[b - 1], order[b] = order[b], order[b - 1]
                            b -= 1
                    for a in range(k):
                        rd = ready[order[a]]
                        before = compute_free
                        if rd > before:
                            rd += ready_hop
                        compute_free = max(compute_free, rd) + expert_s
                        if rd > before:
                            stall += rd - before
                        compute += expert_s
            # ---- observe ----
            if pf == PF_PREVIOUS:
                for j in range(k):
                    prev[lay, j] = keys[r, j]
            elif pf == PF_TRANSITION:
                src = lay - distance
                if src >= 0 and se_valid[src]:
                    for a in range(k):
                        for b in range(k):
                            trans[src, se[src, a], keys[r, b]] += 1.0
                for j in range(k):
                    se[lay, j] = keys[r, j]
                se_valid[lay] = True
                if lay == L - 1:
                    se_valid[:] = False
            r += 1
        per_token[i] = (compute_free - t0) * 1e3
    stats = np.array([hits, landed, prefetches, used, rec_hits, rec_needed, copies], np.int64)
    return compute_free, stall, compute, stats, per_token
