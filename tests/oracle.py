"""Brute-force oracles written from the contract's words (../shared/CONTRACTS.md section 2), sharing no
code with moesim: a cache is a plain set, every victim is a ``min``/``max`` over it, and a batch step's
union is rebuilt from the raw rows. Slow and obvious on purpose; tests compare moesim's engine, plan and
simulators with these."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NEVER_AGAIN = 1 << 62


class BruteCache:
    """One cache of ``capacity`` slots under lru / fifo / lfu (perfect) / opt, atomic per request set."""

    def __init__(self, capacity: int, policy: str) -> None:
        assert policy in ("lru", "fifo", "lfu", "opt"), policy
        self.capacity, self.policy = capacity, policy
        self.resident: set[int] = set()
        self.clock = 0                        # one tick per expert used, in router order
        self.last_use: dict[int, int] = {}
        self.inserted: dict[int, int] = {}
        self.count: dict[int, int] = {}       # perfect LFU: every request, resident or not

    def request(self, keys: Sequence[int], next_use: dict[int, int] | None = None) -> int:
        """Request the distinct ``keys`` at once; returns their hits. ``next_use[e]``: when expert ``e``
        is requested next after this request (opt only; absent = never again)."""
        keys = [int(k) for k in keys]
        assert len(set(keys)) == len(keys) <= self.capacity
        hits = sum(k in self.resident for k in keys)
        for k in keys:
            self.clock += 1
            self.last_use[k] = self.clock
            self.count[k] = self.count.get(k, 0) + 1
        for k in keys:
            if k in self.resident:
                continue
            if len(self.resident) == self.capacity:
                self.resident.remove(self._victim(set(keys), next_use or {}))
            self.resident.add(k)
            self.clock += 1
            self.inserted[k] = self.clock
        return hits

    def _victim(self, protected: set[int], next_use: dict[int, int]) -> int:
        candidates = self.resident - protected
        if self.policy == "lru":
            return min(candidates, key=self.last_use.__getitem__)
        if self.policy == "fifo":
            return min(candidates, key=self.inserted.__getitem__)
        if self.policy == "lfu":
            return min(candidates, key=lambda e: (self.count[e], self.last_use[e]))
        return max(candidates, key=lambda e: next_use.get(e, NEVER_AGAIN))


def replay_sets(requests: Sequence[Sequence[int]], capacity: int, policy: str,
                times: Sequence[int] | None = None) -> tuple[int, int]:
    """(hits, requests) of one cache fed ``requests`` (each a distinct set in router order) in turn;
    opt's next use of an expert is the time of the next set holding it: ``times[i]`` (non-decreasing),
    by default the set's index."""
    next_use = _next_uses(requests, times)
    cache = BruteCache(capacity, policy)
    hits = sum(cache.request(keys, next_use[i]) for i, keys in enumerate(requests))
    return hits, sum(len(k) for k in requests)


def _next_uses(requests: Sequence[Sequence[int]], times: Sequence[int] | None) -> list[dict[int, int]]:
    """For each request i: the time of every expert's next request after i (all experts known)."""
    times = range(len(requests)) if times is None else times
    out: list[dict[int, int]] = [{} for _ in requests]
    upcoming: dict[int, int] = {}
    for i in range(len(requests) - 1, -1, -1):
        out[i] = dict(upcoming)
        for e in requests[i]:
            upcoming[int(e)] = times[i]
    return out


def replay_grid(sets_by_token: Sequence[Sequence[Sequence[int]]], capacity: int, policy: str) -> tuple[int, int]:
    """(hits, requests) of the default replay (one cache per layer) of ``sets[token][layer]``; an empty
    set is a missing row."""
    layers = len(sets_by_token[0]) if sets_by_token else 0
    hits = total = 0
    for layer in range(layers):
        h, r = replay_sets([row[layer] for row in sets_by_token if len(row[layer])], capacity, policy)
        hits, total = hits + h, total + r
    return hits, total


def _rows_by_token(seq, token, layer, experts) -> dict[tuple[int, int], dict[int, list[int]]]:
    rows: dict[tuple[int, int], dict[int, list[int]]] = {}
    for s, t, lay, ex in zip(np.asarray(seq).tolist(), np.asarray(token).tolist(), np.asarray(layer).tolist(),
                             np.asarray(experts).tolist(), strict=True):
        rows.setdefault((s, t), {})[lay] = ex
    return rows


def union_requests(seq, token, layer, experts, capacity: int, batch: int = 1,
                   prefill_chunk: int | None = None) -> dict[int, list[tuple[int, list[int]]]]:
    """Per layer, the request sets a serving engine makes for a trace of ONE phase. Decode
    (``prefill_chunk`` None): sequences grouped ``batch`` at a time in id order, step j of a group takes
    token j (in position order) of each of its sequences. Prefill: each sequence's tokens in chunks of
    ``prefill_chunk``, one chunk per step. At each layer a step requests the union of its tokens'
    experts in first-seen router order, cut into sets of ``capacity`` when it does not fit. Returns
    layer -> [(step, set)]: the sets of one step share its time (a chunk's next use is its step's)."""
    rows = _rows_by_token(seq, token, layer, experts)
    positions: dict[int, list[int]] = {}
    for s, t in sorted(rows):
        positions.setdefault(s, []).append(t)
    seq_ids = sorted(positions)
    steps: list[list[tuple[int, int]]] = []
    if prefill_chunk is None:
        for g in range(0, len(seq_ids), batch):
            group = seq_ids[g:g + batch]
            for j in range(max(len(positions[s]) for s in group)):
                steps.append([(s, positions[s][j]) for s in group if j < len(positions[s])])
    else:
        for s in seq_ids:
            ts = positions[s]
            steps += [[(s, t) for t in ts[i:i + prefill_chunk]] for i in range(0, len(ts), prefill_chunk)]
    out: dict[int, list[tuple[int, list[int]]]] = {}
    for step, tokens in enumerate(steps):
        for lay in sorted({lay for key in tokens for lay in rows[key]}):
            union: list[int] = []
            for key in tokens:
                union += [e for e in rows[key].get(lay, []) if e not in union]
            out.setdefault(lay, []).extend((step, union[i:i + capacity]) for i in range(0, len(union), capacity))
    return out


def replay_unions(seq, token, layer, experts, capacity: int, policy: str, batch: int = 1,
                  prefill_chunk: int | None = None) -> tuple[int, int]:
    """(hits, requests) of a batched or chunked-prefill replay: :func:`union_requests` through one
    :class:`BruteCache` per layer."""
    hits = total = 0
    for timed in union_requests(seq, token, layer, experts, capacity, batch, prefill_chunk).values():
        h, r = replay_sets([keys for _, keys in timed], capacity, policy, [step for step, _ in timed])
        hits, total = hits + h, total + r
    return hits, total
