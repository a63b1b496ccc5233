"""Routing replay and the residency plan: which expert sits in which GPU slot, step by step.

:class:`CachePlan` is pure Python and device-free: one :class:`ExpertCache` per layer with a policy
object from ``moesim.policies`` (the simulator's mechanism and classes), plus a slot map. The runtime
asks it, per (token, layer), for the copies to issue; tests run it alone and compare its hit counts
with the simulator's reference replay.

Time (``now``) is the row index of the (token, layer) in execution order, as in the simulator's replay,
so policies that need the future get the same ``next_use`` values.

Prefetch follows the timing simulator (``moesim.simulator.timing``) step for step, with the same
prefetcher classes (``moesim.policies.prefetch``): right after the demand request of (token t, layer
l), ``predict(l, l + d, ctx)`` names experts for layer l + d (truncated to the prefetcher's budget);
each one not resident is admitted into that layer's cache (``ExpertCache.admit``), protecting the
picks and the prefetched-but-not-yet-used experts of that layer; the first refused admission stops
the loop. A prefetch is neither a hit nor a miss. ``observe(l, S)`` follows. The simulator also
protects copies still in flight at the gate -- a timing-dependent set; for d = 1 it is contained in
the pending set, so the plan needs no clock (the hit-rate equality in the report checks this).

The ``speculative`` prefetcher reads the trace's recorded predictions (``pred{d}_experts``), which
:meth:`Routing.from_trace` keeps as ``predicted[d]``: the prediction for (token t, layer l + d) made
from layer l, as the simulator's driver passes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moesim.errors import SettingError
from moesim.policies.base import NEVER, ExpertCache, make_policy
from moesim.policies.prefetch import PrefetchContext


@dataclass
class Routing:
    """A trace as (token, layer) grids: experts (T, L, k) with -1 where a row is missing."""

    experts: np.ndarray    # (T, L, k) int64
    weights: np.ndarray    # (T, L, k) float32
    row: np.ndarray        # (T, L) int64 execution-order row index, -1 where missing
    seq: np.ndarray        # (T,) sequence id
    position: np.ndarray   # (T,) token index within its sequence
    num_experts: int
    predicted: dict[int, np.ndarray] = field(default_factory=dict)   # d -> (T, L, k) recorded predictions, -1 = none

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    @classmethod
    def from_trace(cls, trace, max_tokens: int | None = None) -> Routing:
        """Build from a :class:`~moesim.traces.format.Trace` (any row order; replayed in execution order)."""
        trace = trace.execution_order()
        meta = trace.meta
        seq, tok, layer = (np.asarray(a, np.int64) for a in (trace.seq, trace.token, trace.layer))
        pair = seq * (1 << 32) + tok
        uniq, tidx = np.unique(pair, return_inverse=True)   # (seq, token) in execution order
        T, L, k = len(uniq), meta.num_layers, meta.top_k
        experts = np.full((T, L, k), -1, np.int64)
        weights = np.zeros((T, L, k), np.float32)
        row = np.full((T, L), -1, np.int64)
        experts[tidx, layer] = trace.experts
        weights[tidx, layer] = trace.weights
        row[tidx, layer] = np.arange(len(trace), dtype=np.int64)
        predicted = {}
        for d in trace.pred_distances:
            p = np.full((T, L, k), -1, np.int64)
            p[tidx, layer] = trace.pred_experts(d)
            predicted[d] = p
        out = cls(experts, weights, row, uniq >> 32, uniq & 0xFFFFFFFF, meta.num_experts, predicted)
        return out.head(max_tokens) if max_tokens is not None else out

    def head(self, tokens: int) -> Routing:
        """The first ``tokens`` tokens (rows renumbered so that ``row`` stays dense)."""
        e, w, r = self.experts[:tokens], self.weights[:tokens], self.row[:tokens].copy()
        present = r >= 0
        r[present] = np.argsort(np.argsort(r[present]))
        return Routing(e, w, r, self.seq[:tokens], self.position[:tokens], self.num_experts,
                       {d: p[:tokens] for d, p in self.predicted.items()})

    def first_layers(self, layers: int) -> Routing:
        """Only layers 0..``layers``-1 (rows renumbered), for runs of a model cut short."""
        keep = self.row[:, :layers].copy()
        present = keep >= 0
        keep[present] = np.argsort(np.argsort(keep[present]))
        return Routing(self.experts[:, :layers].copy(), self.weights[:, :layers].copy(), keep, self.seq,
                       self.position, self.num_experts,
                       {d: p[:, :layers].copy() for d, p in self.predicted.items() if d < layers})

    def next_use(self) -> np.ndarray:
        """(T, L, k): row index of the next request of the same expert at the same layer, or NEVER."""
        T, L, k = self.experts.shape
        nxt = np.full((T, L, k), NEVER, np.int64)
        for layer in range(L):
            last: dict[int, tuple[int, int]] = {}
            for t in range(T - 1, -1, -1):
                if self.row[t, layer] < 0:
                    continue
                for j in range(k):
                    e = int(self.experts[t, layer, j])
                    if e in last:
                        nxt[t, layer, j] = last[e]
                for j in range(k):
                    last[int(self.experts[t, layer, j])] = int(self.row[t, layer])
        return nxt


@dataclass
class Step:
    experts: list[int]
    weights: list[float]
    slots: list[int]                          # slot of each expert, router order
    copies: list[tuple[int, int]]             # (slot, expert) demand misses at this layer
    prefetches: list[tuple[int, int, int]]    # (layer, slot, expert) issued after the demand


class LiveRefusal(ValueError):
    """A policy or prefetcher that needs the future, asked of a live (gate-driven) decoder."""


def make_prefetcher(name: str, routing: Routing, params: dict[str, Any] | None = None):
    """A prefetcher from ``moesim.policies.prefetch`` (the simulator's classes), or None for "none";
    ``params`` e.g. ``{"distance": 2, "budget": 1}``."""
    pf = _prefetcher(name, routing.num_layers, routing.num_experts, routing.top_k, params)
    if pf is not None and pf.needs_predictions and pf.distance not in routing.predicted:
        raise SettingError("recorded_predictions", f"prefetcher {name!r} needs recorded predictions at distance "
                           f"{pf.distance}; the routing has {sorted(routing.predicted) or 'none'} (record the trace "
                           "with predictions at that distance)", fix=str(pf.distance))
    return pf


def _prefetcher(name: str, num_layers: int, num_experts: int, top_k: int, params: dict[str, Any] | None = None):
    from moesim.policies.prefetch import make_prefetcher as _make

    if name == "none":
        return None
    return _make(name, num_layers=num_layers, num_experts=num_experts, top_k=top_k, **(params or {}))


class CachePlan:
    """Per-layer ExpertCache + policy + slot map: residency is decided here and only here, for the
    replay engine (routing forced from a trace: :meth:`step`) and for the gate-driven decoder (routing
    from the live gate: :meth:`demand`, then :meth:`prefetch_after`; :meth:`live` builds one)."""

    def __init__(self, routing: Routing | None, cache_size: int, policy: str, prefetch: str = "none",
                 params: dict[str, Any] | None = None, prefetch_params: dict[str, Any] | None = None, *,
                 num_layers: int | None = None, num_experts: int | None = None, top_k: int | None = None) -> None:
        L = routing.num_layers if routing is not None else int(num_layers)
        self.num_layers = L
        self.num_experts = routing.num_experts if routing is not None else int(num_experts)
        self.top_k = routing.top_k if routing is not None else int(top_k)
        if cache_size < self.top_k:
            raise ValueError(f"cache size {cache_size} is smaller than top-k ({self.top_k})")
        self.routing, self.cache_size = routing, cache_size
        self.caches = [ExpertCache(cache_size, make_policy(policy, **(params or {}))) for _ in range(L)]
        self.slot_of: list[dict[int, int]] = [{} for _ in range(L)]
        self.free_slots = [list(range(cache_size)) for _ in range(L)]
        needs_future = self.caches[0].policy.needs_future
        self.next_use = routing.next_use() if needs_future and routing is not None else None
        self.prefetcher = (make_prefetcher(prefetch, routing, prefetch_params) if routing is not None
                           else _prefetcher(prefetch, L, self.num_experts, self.top_k, prefetch_params))
        self.pending: set[tuple[int, int]] = set()   # (layer, expert) prefetched, not requested yet
        self.requests = self.hits = self.prefetches = 0
        self.layer_requests = np.zeros(L, np.int64)
        self.layer_hits = np.zeros(L, np.int64)

    @classmethod
    def live(cls, num_layers: int, num_experts: int, top_k: int, cache_size: int, policy: str,
             prefetch: str = "none", params: dict[str, Any] | None = None,
             prefetch_params: dict[str, Any] | None = None) -> CachePlan:
        """A plan for a decoder whose routing comes from its own gates: policies and prefetchers that
        read the future are refused (``LiveRefusal``, one line naming the alternatives)."""
        from moesim.policies.base import policy_class, policy_names
        from moesim.policies.prefetch import _PREFETCHERS, prefetcher_names

        if policy_class(policy).needs_future:
            ok = [p for p in policy_names() if not policy_class(p).needs_future]
            raise LiveRefusal(f"policy {policy!r} needs the future (the whole routing in advance); a live decoder "
                              f"cannot run it (use one of: {', '.join(ok)})")
        if prefetch in _PREFETCHERS and _PREFETCHERS[prefetch].needs_future:
            ok = [p for p in prefetcher_names() if not _PREFETCHERS[p].needs_future]
            raise LiveRefusal(f"prefetcher {prefetch!r} reads the true future routing; a live decoder cannot run "
                              f"it (use one of: {', '.join(ok)})")
        return cls(None, cache_size, policy, prefetch, params, prefetch_params, num_layers=num_layers,
                   num_experts=num_experts, top_k=top_k)

    def _admit(self, layer: int, key: int, now: int, protect) -> int | None:
        cache = self.caches[layer]
        victim = cache.admit(key, now, protect=protect)
        if victim is False:
            return None
        slot = self.slot_of[layer].pop(victim) if victim is not None else self.free_slots[layer].pop(0)
        self.slot_of[layer][key] = slot
        return slot

    def _request(self, layer: int, keys: list[int], now: int, weights: list[float], next_uses) -> list[tuple[int, int]]:
        cache = self.caches[layer]
        before = set(cache.resident)
        missing = cache.request(keys, now, weights, next_uses)
        evicted = sorted(before - cache.resident, key=self.slot_of[layer].__getitem__)
        slots = [self.slot_of[layer].pop(v) for v in evicted]
        copies = []
        for key in missing:
            slot = slots.pop(0) if slots else self.free_slots[layer].pop(0)
            self.slot_of[layer][key] = slot
            copies.append((slot, key))
        return copies

    def _actual(self, t: int):
        r = self.routing

        def actual(target: int) -> list[int]:
            return [int(e) for e in r.experts[t, target]] if r.row[t, target] >= 0 else []
        return actual

    def _predicted(self, t: int, d: int):
        pred = self.routing.predicted[d]

        def predicted(target: int) -> list[int]:
            return [int(e) for e in pred[t, target] if e >= 0]
        return predicted

    def step(self, t: int, layer: int) -> Step | None:
        """Replay: (token t, layer)'s routing from the trace; demand, then the prefetcher."""
        r = self.routing
        now = int(r.row[t, layer])
        if now < 0:
            return None
        keys = [int(e) for e in r.experts[t, layer]]
        weights = [float(w) for w in r.weights[t, layer]]
        nxt = None if self.next_use is None else [int(v) for v in self.next_use[t, layer]]
        copies = self.demand(layer, keys, now, weights, nxt)
        pf = self.prefetcher
        ctx = None
        if pf is not None:
            ctx = PrefetchContext(current=keys, actual=self._actual(t) if pf.needs_future else None,
                                  predicted=self._predicted(t, pf.distance) if pf.needs_predictions else None)
        prefetches = self.prefetch_after(layer, keys, now, ctx)
        slots = [self.slot_of[layer][k] for k in keys]
        return Step(keys, weights, slots, copies, prefetches)

    def demand(self, layer: int, keys: list[int], now: int, weights: list[float] | None = None,
               next_uses: list[int] | None = None) -> list[tuple[int, int]]:
        """Request ``keys`` (router order) at ``layer``: the (slot, expert) copies of the misses."""
        copies = self._request(layer, keys, now, weights or [1.0] * len(keys), next_uses)
        hits = len(keys) - len(copies)
        self.requests += len(keys)
        self.hits += hits
        self.layer_requests[layer] += len(keys)
        self.layer_hits[layer] += hits
        for key in keys:
            self.pending.discard((layer, key))
        return copies

    def request_union(self, layer: int, experts: list[int], now: int, weights: dict[int, float],
                      next_uses: dict[int, int] | None = None):
        """A batch or prefill step's request at ``layer``: the union of its tokens' experts (first-seen
        router order), streamed through the cache in chunks of the layer cache's capacity exactly as the timing
        simulator does (:func:`moesim.traces.steps.union_chunks`). Yields, per chunk, (experts,
        (slot, expert) copies, slots) -- a generator: a chunk's experts must compute before the next
        chunk's request may evict them. ``now`` is the step ordinal and ``next_uses`` the clocks of
        :func:`moesim.traces.steps.next_uses` (the simulator's clock)."""
        from moesim.traces.steps import union_chunks

        # the layer's own capacity: a hybrid run's pinned experts take slots out of it
        for chunk in union_chunks(experts, self.caches[layer].capacity):
            copies = self._request(layer, chunk, now, [weights[e] for e in chunk],
                                   [next_uses[e] for e in chunk] if next_uses else None)
            hits = len(chunk) - len(copies)
            self.requests += len(chunk)
            self.hits += hits
            self.layer_requests[layer] += len(chunk)
            self.layer_hits[layer] += hits
            for key in chunk:   # a prefetched expert requested now is no longer pending (as in demand)
                self.pending.discard((layer, key))
            yield chunk, copies, self.slots(layer, chunk)

    def slots(self, layer: int, keys: list[int]) -> list[int]:
        return [self.slot_of[layer][k] for k in keys]

    @property
    def target_distance(self) -> int | None:
        """How many layers ahead the prefetcher works (None without one)."""
        return self.prefetcher.distance if self.prefetcher is not None else None

    def prefetch_after(self, layer: int, keys: list[int], now: int,
                       ctx: PrefetchContext | None) -> list[tuple[int, int, int]]:
        """After ``layer``'s demand: the prefetcher's picks for layer + d admitted (layer, slot, expert),
        then ``observe(layer, keys)``. The same call sequence for replay and live decoding."""
        pf = self.prefetcher
        if pf is None:
            return []
        prefetches: list[tuple[int, int, int]] = []
        target = layer + pf.distance
        if target < self.num_layers:
            picks = [e for e in pf.predict(layer, target, ctx) if 0 <= e < self.num_experts][: pf.budget]
            protect = {e for (lt, e) in self.pending if lt == target} | set(picks)
            for key in picks:
                if key in self.caches[target]:
                    continue
                before = set(self.caches[target].resident)
                slot = self._admit(target, key, now, protect)
                if slot is None:
                    break
                for gone in before - self.caches[target].resident:
                    self.pending.discard((target, gone))
                self.pending.add((target, key))
                prefetches.append((target, slot, key))
            self.prefetches += len(prefetches)
        pf.observe(layer, keys)
        return prefetches
