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


# the run's clocks (seconds) and counters, one array each so the per-layer pieces below can advance them
COMPUTE_FREE, HOST_BUSY, STALL, COMPUTE = 0, 1, 2, 3
HITS, LANDED, PREFETCHES, USED, REC_HITS, REC_NEEDED, COPIES, TICK = 0, 1, 2, 3, 4, 5, 6, 7
N_STATS = 7   # the counters returned (TICK is the recency clock, not a result)


def why_not_compiled(policy: object, policy_params: object, prefetch: str, prefetch_params: dict,
                     execution: str, batch_size: int, timeline: bool, sizes: list[int], has_prefill: bool,
                     engine_profile: str) -> str | None:
    """Why :func:`des_kernel` cannot price this run (the general event path must), or None when it can.
    The one place that routes a timing run: ``simulate_timing`` and so the cell runner ask it."""
    if execution != "copy":
        return f"execution {execution} (the compiled path only copies; the CPU and low-bit executors are events)"
    if not isinstance(policy, str) or policy not in POLICY_CODES or policy_params:
        return f"policy {policy if isinstance(policy, str) else 'object'} (it runs {', '.join(POLICY_CODES)} " \
               "with default parameters)"
    if prefetch not in PREFETCH_CODES or prefetch_params.get("threshold") is not None:
        return f"prefetcher {prefetch} (it runs the built-ins without a threshold)"
    if batch_size != 1 or has_prefill:
        return "batch or prefill steps (it runs batch-1 decode)"
    if timeline:
        return "a timeline (it records none)"
    if not all(s > 0 for s in sizes):
        return "a layer without cache slots"
    if engine_profile != "moesim":
        return f"the {engine_profile} engine profile"
    return None


@njit(cache=True, nogil=True, inline="always")
def _demand(policy, lay, r, gate, distance, demand_s, issue_h, keys, nxt, sizes, cache, engines, protect, ready,
            clock, stats):
    """The layer's atomic demand request: hits (``ready`` = when each landed), recency and counts for the
    whole set in router order, the misses inserted (victims outside the set) and their copies queued
    (``ready`` = when they land)."""
    slots, occ, resident, last, count, inserted, next_use, inflight, pending = cache
    k = keys.shape[1]
    for j in range(k):
        e = keys[r, j]
        if resident[lay, e]:
            stats[HITS] += 1
            ready[j] = inflight[lay, e]
            if inflight[lay, e] <= gate:
                stats[LANDED] += 1
            if pending[lay, e]:
                pending[lay, e] = False
                stats[USED] += 1
                if lay >= distance:
                    stats[REC_HITS] += 1
        else:
            ready[j] = -1.0  # marks a miss
    for j in range(k):
        e = keys[r, j]
        stats[TICK] += 1
        last[lay, e] = stats[TICK]
        count[lay, e] += 1
        if policy == OPT:   # nxt is a (1, 1) placeholder for the other policies
            next_use[lay, e] = nxt[r, j]
    for j in range(k):
        if ready[j] >= 0.0:
            continue
        e = keys[r, j]
        if occ[lay] < sizes[lay]:
            s = occ[lay]
            occ[lay] += 1
        else:
            protect[:] = False
            for jj in range(k):
                protect[keys[r, jj]] = True
            s = _victim(policy, lay, sizes[lay], slots, protect, last, count, inserted, next_use)
            resident[lay, slots[lay, s]] = False
        slots[lay, s] = e
        resident[lay, e] = True
        stats[TICK] += 1
        inserted[lay, e] = stats[TICK]
    if lay >= distance:
        stats[REC_NEEDED] += k
    for j in range(k):
        if ready[j] >= 0.0:
            continue
        e = keys[r, j]
        pending[lay, e] = False
        if issue_h > 0.0:
            clock[COMPUTE_FREE] += issue_h
        ready[j] = _issue_copy(engines, clock[COMPUTE_FREE] if issue_h > 0.0 else gate, demand_s)
        inflight[lay, e] = ready[j]
        stats[COPIES] += 1


@njit(cache=True, nogil=True, inline="always")
def _picks(pf, i, lay, target, r, keys, pred, row_at, prev, trans, score, picks):
    """The prefetcher's candidates for layer ``target`` into ``picks``, best first; returns how many."""
    k = keys.shape[1]
    n_picks = 0
    if pf == PF_PREVIOUS:
        for j in range(k):
            if prev[target, j] >= 0:
                picks[n_picks] = prev[target, j]
                n_picks += 1
    elif pf == PF_TRANSITION:
        for e in range(score.shape[0]):
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
    return n_picks


@njit(cache=True, nogil=True, inline="always")
def _admit(policy, target, n_picks, t_issue, host_at, copy_s, issue_h, sizes, cache, engines, protect, picks,
           clock, stats):
    """Insert the first ``n_picks`` picks missing from layer ``target`` (victims outside the picks and the
    copies still pending) and queue their copies; returns the host's clock after issuing late ones."""
    slots, occ, resident, last, count, inserted, next_use, inflight, pending = cache
    protect[:] = False
    for e in range(protect.shape[0]):
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
        stats[TICK] += 1
        inserted[target, e] = stats[TICK]
        at = t_issue
        if issue_h > 0.0:
            if host_at < 0.0:
                clock[COMPUTE_FREE] += issue_h
                at = clock[COMPUTE_FREE]
            else:
                host_at = max(host_at, t_issue) + issue_h
                at = host_at
        inflight[target, e] = _issue_copy(engines, at, copy_s)
        pending[target, e] = True
        stats[PREFETCHES] += 1
        stats[COPIES] += 1
    return host_at


@njit(cache=True, nogil=True, inline="always")
def _run_experts(ready, order, expert_s, ready_hop, clock):
    """The layer's experts on compute in order of readiness (router order breaks ties); a wait for a copy
    is a stall, and compute resumes ``ready_hop`` after the copy lands."""
    k = ready.shape[0]
    for j in range(k):
        order[j] = j
    for a in range(1, k):  # insertion sort on (ready, j): k is tiny
        b = a
        while b > 0 and ready[order[b - 1]] > ready[order[b]]:
            order[b - 1], order[b] = order[b], order[b - 1]
            b -= 1
    for a in range(k):
        rd = ready[order[a]]
        before = clock[COMPUTE_FREE]
        if rd > before:
            rd += ready_hop
        clock[COMPUTE_FREE] = max(clock[COMPUTE_FREE], rd) + expert_s
        if rd > before:
            clock[STALL] += rd - before
        clock[COMPUTE] += expert_s


@njit(cache=True, nogil=True, inline="always")
def _observe(pf, distance, lay, r, keys, prev, trans, se, se_valid):
    """What the history-based prefetchers learn from the layer's routing."""
    k = keys.shape[1]
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
        if lay == se_valid.shape[0] - 1:
            se_valid[:] = False


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
    cache = (np.full((L, kmax), -1, np.int64),   # slots: the resident expert of each slot
             np.zeros(L, np.int64),             # occupied slots
             np.zeros((L, E), np.bool_),         # resident
             np.zeros((L, E), np.int64),         # last request (recency clock)
             np.zeros((L, E), np.int64),         # requests so far
             np.zeros((L, E), np.int64),         # insertion time
             np.full((L, E), NEVER, np.int64),   # next request (opt)
             np.zeros((L, E)),                  # when the expert's copy lands
             np.zeros((L, E), np.bool_))         # prefetched and not yet used
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
    clock = np.zeros(4)   # COMPUTE_FREE, HOST_BUSY (gate mode: the host issues late copies until then), ...
    stats = np.zeros(N_STATS + 1, np.int64)
    r = 0
    for i in range(n_steps):
        t0 = clock[COMPUTE_FREE]
        clock[COMPUTE_FREE] += token_s
        clock[COMPUTE] += token_s
        while r < n and step[r] == i:
            lay = layer[r]
            clock[COMPUTE_FREE] += layer_s[r]
            clock[COMPUTE] += layer_s[r]
            if handoff_s > 0.0 or clock[HOST_BUSY] > clock[COMPUTE_FREE]:
                clock[COMPUTE_FREE] = max(clock[COMPUTE_FREE], clock[HOST_BUSY]) + handoff_s
            gate = clock[COMPUTE_FREE]
            _demand(policy, lay, r, gate, distance, demand_s, issue_h, keys, nxt, sizes, cache, engines, protect,
                    ready, clock, stats)
            for part in range(2):   # 0: prefetch then experts; a late prefetch comes after the experts
                if (part == 0) == late:
                    _run_experts(ready, order, expert_s, ready_hop, clock)
                    continue
                target = lay + distance
                t_issue, host_at = gate, -1.0
                if late and target < L:
                    clock[COMPUTE_FREE] += predict_s
                    clock[COMPUTE] += predict_s
                    t_issue = clock[COMPUTE_FREE]
                    host_at = clock[COMPUTE_FREE] + handoff_s
                if pf != PF_NONE and target < L and sizes[target] > 0:
                    n_picks = _picks(pf, i, lay, target, r, keys, pred, row_at, prev, trans, score, picks)
                    host_at = _admit(policy, target, min(n_picks, budget), t_issue, host_at, copy_s, issue_h, sizes, cache,
                                     engines, protect, picks, clock, stats)
                if late and target < L:
                    clock[HOST_BUSY] = host_at
            _observe(pf, distance, lay, r, keys, prev, trans, se, se_valid)
            r += 1
        per_token[i] = (clock[COMPUTE_FREE] - t0) * 1e3
    return clock[COMPUTE_FREE], clock[STALL], clock[COMPUTE], stats[:N_STATS].copy(), per_token
