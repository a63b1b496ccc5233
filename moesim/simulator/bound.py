"""An offline bound for caching plus prefetching (``moesim bound``): the fewest demand misses any
eviction policy together with any prefetcher could have, when the routing is known ``D`` layers
ahead and the copy engine can move ``B`` prefetched experts per layer. The model, the proof of the
bound and what it leaves out are in docs/bound.md; in short:

- per-layer caches of K slots, atomic (token, layer) sets, rows r = 0..R-1 in replay order;
- an expert of row r's set may be prefetched by a copy issued at a row s with
  max(r - D, p + 1) <= s <= r - 1 (p: the previous row of the same layer); every row issues at most B
  prefetch copies; a prefetched expert holds a slot of its layer's cache from its issue, and a
  request it serves is not a demand miss; demand copies take no prefetch capacity.

Each request ends an *interval* (from the same layer's previous request of that expert; the first
request's interval is cold). A request is served by keeping its interval's expert resident (a
*kept* interval: at every request of the layer strictly inside it, the set plus the kept intervals
spanning that request fit in K), by a prefetch, or it is a demand miss. With no prefetch (D = 0)
the most kept intervals is Belady's count (a sweep that, where a request's capacity is exceeded,
drops the spanning interval that ends last). With prefetch:

- lower bound: relax the copy engine's capacity, shared by the rows of overlapping windows, to a cap
  per requesting row, c_r = min(k, B x (rows in r's window)). Then a row serves at most
  min(k, kept_r + c_r) requests, so only k - c_r kept intervals ending at r count, and among the
  intervals ending at r those starting last are the best to keep (each covers a subset of the
  requests an earlier-starting one covers). The greedy packing of those eligible intervals is
  therefore optimal for the relaxation: misses >= requests - packed - sum of c_r.
- achievable schedule (upper bound): that packing (and Belady's), then the earliest-deadline
  assignment of every other request to an issue row in its window, B per row (optimal for unit jobs
  with windows). When it prefetches every c_r the relaxation asked for, both bounds meet and the
  answer is exact: always for D = 0 and D = 1 (windows of one row do not overlap) and for B >= top-k;
  otherwise the JSON says the gap.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from moesim.errors import SettingError, UsageError
from moesim.simulator.replay import build_stream
from moesim.traces.format import Trace

REPAIRS = 8  # rounds of lowering the planned prefetches of rows the assignment fell short at


@dataclass
class Requests:
    """The flat requests of a trace in replay order (request i = row i // k, slot i % k)."""

    cache: np.ndarray      # (R,) the layer of each row
    width: int             # k: requests per row
    next_req: np.ndarray   # (R*k,) the flat index of the same layer's next request of the expert, or -1
    prev_req: np.ndarray   # (R*k,) the flat index of its previous request, or -1 (cold)
    window_lo: np.ndarray  # (R,) first row that may issue a prefetch for the row (window [lo, row - 1])

    @property
    def rows(self) -> int:
        return int(self.cache.shape[0])


def requests_of(trace: Trace, cache_size: int, lookahead: int) -> Requests:
    stream = build_stream(trace, cache_size, "layer", "atomic")
    cache, keys = stream.cache, stream.keys
    n_rows, width = keys.shape
    flat = (cache[:, None] * stream.n_keys + keys).reshape(-1)
    order = np.lexsort((np.arange(flat.size), flat))
    same = flat[order[1:]] == flat[order[:-1]]
    next_req = np.full(flat.size, -1, np.int64)
    next_req[order[:-1][same]] = order[1:][same]
    prev_req = np.full(flat.size, -1, np.int64)
    prev_req[order[1:][same]] = order[:-1][same]
    rows = np.arange(n_rows, dtype=np.int64)
    prev_row = np.full(n_rows, -1, np.int64)  # the same layer's previous row
    by_layer = np.lexsort((rows, cache))
    same_layer = cache[by_layer[1:]] == cache[by_layer[:-1]]
    prev_row[by_layer[1:][same_layer]] = by_layer[:-1][same_layer]
    window_lo = np.maximum(rows - lookahead, prev_row + 1) if lookahead > 0 else rows  # empty when lo > row - 1
    return Requests(cache, width, next_req, prev_req, window_lo)


def kept_intervals(req: Requests, cache_size: int, eligible: np.ndarray) -> np.ndarray:
    """The most intervals that can be kept among ``eligible`` ones (flat bool by the interval's end):
    sweep the rows in order; at each row of a layer, drop the spanning intervals that end last until
    the row's set plus them fit in K (Belady's choice). Returns a flat bool: kept, by end."""
    kept = np.zeros(req.next_req.size, bool)
    held: dict[int, list[tuple[int, int]]] = {}      # layer -> heap of (-end, end) of held intervals
    count: dict[int, int] = {}
    live = np.zeros(req.next_req.size, bool)        # held and not yet ended or dropped
    k = req.width
    room = cache_size - k
    for row in range(req.rows):
        layer = int(req.cache[row])
        heap = held.setdefault(layer, [])
        n = count.get(layer, 0)
        for i in range(row * k, row * k + k):
            if live[i]:
                kept[i], live[i] = True, False
                n -= 1
        while n > room:
            _, end = heapq.heappop(heap)
            if live[end]:
                live[end] = False
                n -= 1
        for i in range(row * k, row * k + k):
            j = int(req.next_req[i])
            if j >= 0 and eligible[j]:
                heapq.heappush(heap, (-j, j))
                live[j] = True
                n += 1
        count[layer] = n
    return kept


def assign_prefetches(req: Requests, budget: int, wanted: np.ndarray) -> tuple[int, np.ndarray]:
    """Earliest-deadline assignment of the ``wanted`` requests (flat bool) to issue rows in their
    windows, ``budget`` per row: the most that can be prefetched. Returns (count, prefetches served
    per requesting row)."""
    served = np.zeros(req.rows, np.int64)
    if budget == 0:
        return 0, served
    ends = np.flatnonzero(wanted)
    rows_of = ends // req.width
    lo = req.window_lo[rows_of]
    ok = lo <= rows_of - 1
    ends, rows_of, lo = ends[ok], rows_of[ok], lo[ok]
    release = np.argsort(lo, kind="stable")
    pending: list[int] = []  # deadlines (row - 1) of released jobs
    nxt, total = 0, 0
    for s in range(req.rows):
        while nxt < release.size and lo[release[nxt]] <= s:
            heapq.heappush(pending, int(rows_of[release[nxt]]) - 1)
            nxt += 1
        while pending and pending[0] < s:
            heapq.heappop(pending)
        take = min(budget, len(pending))
        for _ in range(take):
            served[heapq.heappop(pending) + 1] += 1
        total += take
    return total, served


def row_caps(req: Requests, budget: int) -> np.ndarray:
    """c_r = min(k, B x rows in r's window): the most prefetches any schedule can serve at row r."""
    rows = np.arange(req.rows)
    return np.minimum(req.width, budget * np.maximum(0, rows - req.window_lo))


def latest_starting(req: Requests, credit: np.ndarray) -> np.ndarray:
    """Flat bool: of the intervals ending at row r, the ``credit[r]`` that start last (cold ones never)."""
    k = req.width
    start = np.where(req.prev_req >= 0, req.prev_req // k, -1).reshape(-1, k)
    order = np.argsort(-start, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(k)[None, :].repeat(req.rows, 0), axis=1)
    return ((rank < credit[:, None]) & (start >= 0)).reshape(-1)


@dataclass
class BoundResult:
    requests: int
    misses: int             # the lower bound: no policy plus prefetcher has fewer demand misses
    achievable_misses: int  # an offline schedule's demand misses (>= the optimum)
    opt_misses: int         # Belady with no prefetch (the bound at lookahead 0)
    prefetches: int         # prefetch copies of the achievable schedule

    @property
    def exact(self) -> bool:
        return self.misses == self.achievable_misses


def prefetch_bound(trace: Trace, cache_size: int, lookahead: int, budget: int | None = None) -> BoundResult:
    meta = trace.meta
    if cache_size < meta.top_k:
        raise UsageError(f"cache size {cache_size} is smaller than top-k ({meta.top_k})")
    if lookahead < 0:
        raise SettingError("lookahead", f"the lookahead must be >= 0, got {lookahead}")
    budget = meta.top_k if budget is None else budget
    if budget < 0:
        raise SettingError("prefetch_budget", f"the prefetch budget must be >= 0, got {budget}")
    req = requests_of(trace, cache_size, lookahead)
    n_req = req.next_req.size
    belady = kept_intervals(req, cache_size, np.ones(n_req, bool))
    caps = row_caps(req, budget)
    packed = kept_intervals(req, cache_size, latest_starting(req, req.width - caps))
    lower = n_req - int(packed.sum()) - int(caps.sum())
    best = None
    for kept in (belady, packed):
        pf, _ = assign_prefetches(req, budget, ~kept)
        best = min(best or (n_req, 0), (n_req - int(kept.sum()) - pf, pf))
    plan = caps.copy()
    for _ in range(REPAIRS):  # rows the assignment could not serve as planned may keep more intervals
        if best[0] == lower:
            break
        pf, served = assign_prefetches(req, budget, ~packed)
        best = min(best, (n_req - int(packed.sum()) - pf, pf))
        short = plan > served
        if not short.any():
            break
        plan = np.where(short, served, plan)
        packed = kept_intervals(req, cache_size, latest_starting(req, req.width - plan))
    return BoundResult(n_req, lower, best[0], n_req - int(belady.sum()), best[1])
