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
from tqdm import tqdm

from moesim.errors import SettingError, UsageError
from moesim.simulator.cell import CellSpec, run_cell
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
    budgets, best = best_allocation(curves.hits, curves.sizes, total)
    return budgets, int(best)


def best_allocation(values: np.ndarray, sizes: np.ndarray, total: int) -> tuple[list[int], float]:
    """The knapsack over layers: per-layer sizes (each one of ``sizes``, summing to ``total``) that
    maximise the sum of ``values[layer, size index]``; ties go to the smaller size at the later layer."""
    n_layers, _ = values.shape
    lo, hi = int(sizes[0]), int(sizes[-1])
    if not n_layers * lo <= total <= n_layers * hi:
        raise UsageError(f"total slots {total} outside [{n_layers * lo}, {n_layers * hi}]")
    floating = values.dtype.kind == "f"
    neg = -np.inf if floating else np.iinfo(np.int64).min // 4
    best = np.full(total + 1, neg, values.dtype)  # best[n]: the layers so far with n slots
    best[0] = 0
    choice = np.zeros((n_layers, total + 1), np.int64)
    for layer in range(n_layers):
        new = np.full(total + 1, neg, values.dtype)
        for i, k in enumerate(sizes):
            if k > total:
                break
            cand = np.full(total + 1, neg, values.dtype)
            cand[k:] = best[:total + 1 - k] + values[layer, i]
            better = cand > new
            new[better] = cand[better]
            choice[layer, better] = k
        best = new
    budgets = [0] * n_layers
    n = total
    for layer in range(n_layers - 1, -1, -1):
        budgets[layer] = int(choice[layer, n])
        n -= budgets[layer]
    return budgets, best[total].item()


def time_curves(trace: Trace, spec: CellSpec) -> tuple[np.ndarray, np.ndarray]:
    """Each layer's priced time as a function of its own cache size, through the cell runner: the run
    with every layer holding all its experts, and per (layer, size) the run with only that layer at that
    size. Returns (sizes, extra[l, i]) = the ms per token that layer l at ``sizes[i]`` adds to the
    all-resident run. Without a prefetcher a layer's copies are issued at its gate and waited for before
    its combine, so each layer's stall depends on its own hits alone and the time of any allocation is
    the all-resident time plus the sum of these terms (exact); a prefetcher's copies for later layers
    overlap other layers, where the sum is an estimate."""
    meta = trace.meta
    L, E = meta.num_layers, meta.num_experts
    sizes = np.arange(meta.top_k, E + 1, dtype=np.int64)

    def ms(budgets: list[int]) -> float:
        one = replace(spec, cache_size=budgets, exact_replay=False, interval=False, vs_bound=False)
        return run_cell(trace, one).timing.ms_per_token

    base = ms([E] * L)
    extra = np.zeros((L, sizes.size))
    # tqdm hides itself when stderr is not a terminal
    with tqdm(total=L * (sizes.size - 1), unit="run", desc="price layer budgets", disable=None) as bar:
        for layer in range(L):
            for i, k in enumerate(sizes[:-1]):
                extra[layer, i] = ms([E] * layer + [int(k)] + [E] * (L - layer - 1)) - base
                bar.update(1)
    return sizes, extra


def uniform_budgets(n_layers: int, total: int) -> list[int]:
    """``total`` spread evenly: every layer gets total // L, and the first total % L layers one more."""
    base, extra = divmod(total, n_layers)
    return [base + (1 if layer < extra else 0) for layer in range(n_layers)]


def budgets_report(trace: Trace, policy: PolicySpec, total: int, *, semantics: str = "atomic",
                   params: dict[str, Any] | None = None, notes: list[str] | None = None,
                   priced: CellSpec | None = None) -> dict[str, Any]:
    """The JSON of ``moesim budgets`` (contract: layer_budgets, hits, hit_rate, uniform_hit_rate). With
    ``priced`` (a timed cell; its cache size is replaced) the budgets minimise its priced time per token
    instead of maximising hits (:func:`time_curves`); ``hits`` are then those budgets' exact hits."""
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
    method = f"dynamic programming over exact per-layer curves ({curves.method} replays)"
    if priced is not None:   # the objective is tokens/s: the fewest priced ms per token
        sizes, extra = time_curves(trace, priced)
        budgets, _ = best_allocation(-extra, sizes, total)
        hits = curves.hits_of(budgets)
        exact = priced.prefetch == "none"
        method = ("dynamic programming over per-layer priced time (the timing simulator, one layer's size at a "
                  "time); " + ("exact: without a prefetcher each layer's stalls are its own" if exact else
                               "an estimate: a prefetcher's copies overlap other layers"))
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
            "objective": "hits" if priced is None else "tokens-per-s", "method": method}
