"""Optimal per-layer cache budgets: the per-layer sizes that maximise total hits for a total number of
expert slots (``moesim budgets``).

Why a DP over the per-layer curves is exact: under the default layer scope every MoE layer has its
own cache, which sees only that layer's rows, and every policy's state (its clock and, for
``random``, its generator) is per cache. So the hits of an allocation (k_0, ..., k_{L-1}) are the sum
over layers of layer l's hits at size k_l, and layer l's hits at size k are read off one uniform
replay at size k (the replay counts hits per layer). Maximising a sum of independent per-layer terms
under a total is a knapsack over layers: ``best[l][n] = max_k best[l-1][n-k] + hits[l][k]``, exact in
O(L * N * E). Greedy marginal allocation is exact only when every per-layer curve is concave, which
a policy without the inclusion property (FIFO, ARC, S3-FIFO, ...) need not give, and even LRU's curve
of one layer can have a step (a reuse distance many requests share) followed by a flat stretch; the
DP needs no such assumption, so it is used for every policy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from moesim.errors import SettingError, UsageError
from moesim.simulator.replay import PolicySpec, build_stream, replay_stream
from moesim.traces.format import Trace


@dataclass
class LayerCurves:
    """hits[l, i]: layer l's hits with a cache of ``sizes[i]`` slots (sizes = top-k .. experts)."""

    sizes: np.ndarray       # (S,) int64
    hits: np.ndarray        # (L, S) int64
    requests: np.ndarray    # (L,) int64
    method: str

    def hits_of(self, budgets: list[int]) -> int:
        lo = int(self.sizes[0])
        return int(sum(self.hits[layer, k - lo] for layer, k in enumerate(budgets)))


def layer_curves(trace: Trace, policy: PolicySpec, *, semantics: str = "atomic",
                 params: dict[str, Any] | None = None) -> LayerCurves:
    """Every layer's hits at every size from top-k to the experts per layer: one replay per size over
    a stream built once (the caches of one replay are independent, so its per-layer hits are exact)."""
    meta = trace.meta
    sizes = np.arange(meta.top_k, meta.num_experts + 1, dtype=np.int64)
    stream = build_stream(trace, int(sizes[0]), "layer", semantics)
    hits = np.zeros((meta.num_layers, sizes.size), np.int64)
    requests = np.zeros(meta.num_layers, np.int64)
    method = ""
    for i, k in enumerate(sizes):
        sized = replace(stream, sizes=np.full(stream.n_caches, k, np.int64))
        req, hit, method = replay_stream(sized, policy, params)
        hits[:, i] = hit
        requests = req
    return LayerCurves(sizes, hits, np.asarray(requests, np.int64), method)


def optimal_budgets(curves: LayerCurves, total: int) -> tuple[list[int], int]:
    """The per-layer sizes (each within the curves' sizes, summing to ``total``) with the most hits,
    by dynamic programming over layers; ties go to the smaller size at the later layer."""
    n_layers, _ = curves.hits.shape
    lo, hi = int(curves.sizes[0]), int(curves.sizes[-1])
    if not n_layers * lo <= total <= n_layers * hi:
        raise UsageError(f"total slots {total} outside [{n_layers * lo}, {n_layers * hi}]")
    neg = np.iinfo(np.int64).min // 4
    best = np.full(total + 1, neg, np.int64)  # best[n]: most hits of the layers so far with n slots
    best[0] = 0
    choice = np.zeros((n_layers, total + 1), np.int64)
    for layer in range(n_layers):
        new = np.full(total + 1, neg, np.int64)
        for i, k in enumerate(curves.sizes):
            if k > total:
                break
            cand = np.full(total + 1, neg, np.int64)
            cand[k:] = best[:total + 1 - k] + curves.hits[layer, i]
            better = cand > new
            new[better] = cand[better]
            choice[layer, better] = k
        best = new
    budgets = [0] * n_layers
    n = total
    for layer in range(n_layers - 1, -1, -1):
        budgets[layer] = int(choice[layer, n])
        n -= budgets[layer]
    return budgets, int(best[total])


def uniform_budgets(n_layers: int, total: int) -> list[int]:
    """``total`` spread evenly: every layer gets total // L, and the first total % L layers one more."""
    base, extra = divmod(total, n_layers)
    return [base + (1 if layer < extra else 0) for layer in range(n_layers)]


def budgets_report(trace: Trace, policy: PolicySpec, total: int, *, semantics: str = "atomic",
                   params: dict[str, Any] | None = None, notes: list[str] | None = None) -> dict[str, Any]:
    """The JSON of ``moesim budgets`` (contract: layer_budgets, hits, hit_rate, uniform_hit_rate)."""
    meta = trace.meta
    lo, hi = meta.num_layers * meta.top_k, meta.num_layers * meta.num_experts
    if total < lo:
        raise SettingError("total_slots", f"a total of {total} slots is below layers x top-k = {meta.num_layers} x {meta.top_k} = {lo}")
    asked = total
    if total > hi:
        total = hi
        if notes is not None:
            notes.append(f"a total of {asked} slots is above layers x experts = {hi}: every layer holds all its "
                         f"experts ({hi} slots)")
    curves = layer_curves(trace, policy, semantics=semantics, params=params)
    budgets, hits = optimal_budgets(curves, total)
    uniform = uniform_budgets(meta.num_layers, total)
    uniform_hits = curves.hits_of(uniform)
    requests = int(curves.requests.sum())

    def rate(h: int) -> float:
        return round(h / requests, 6) if requests else 0.0

    return {"policy": policy if isinstance(policy, str) else getattr(policy, "name", "custom"),
            "total_slots": total, "total_slots_asked": asked, "layer_budgets": budgets, "requests": requests,
            "hits": hits, "hit_rate": rate(hits), "uniform_budgets": uniform, "uniform_hits": uniform_hits,
            "uniform_hit_rate": rate(uniform_hits), "gain_hits": hits - uniform_hits,
            "gain_hit_rate": round(rate(hits) - rate(uniform_hits), 6), "semantics": semantics,
            "method": f"dynamic programming over exact per-layer curves ({curves.method} replays)"}
