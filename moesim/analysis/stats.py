"""Routing statistics of a trace: popularity, entropy, reuse, persistence, cross-layer and
co-activation structure, the segment-cache bound of arXiv 2505.16056, and prefill vs decode.

All functions take a :class:`~moesim.traces.format.Trace` and work on its rows in execution order
(sequence, token, layer) -- the order the replay visits them in (docs/semantics.md). Results are numpy arrays for
matrices and polars DataFrames for tables.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
from numba import njit

from moesim.traces.format import PHASE_NAMES, Trace


def _ordered(trace: Trace) -> Trace:
    return trace.execution_order()


def _layer_rows(trace: Trace, layer: int) -> np.ndarray:
    return np.flatnonzero(trace.layer == layer)


def one_hot(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """(n, k) expert ids -> (n, E) bool membership matrix."""
    mask = np.zeros((experts.shape[0], num_experts), dtype=bool)
    if experts.size:
        mask[np.arange(experts.shape[0])[:, None], experts.astype(np.int64)] = True
    return mask


# ---- popularity and entropy ----------------------------------------------------------------------

def activation_counts(trace: Trace) -> np.ndarray:
    """(layers, experts) int64: how many (token, layer) sets selected each expert."""
    meta = trace.meta
    counts = np.zeros((meta.num_layers, meta.num_experts), dtype=np.int64)
    k = meta.top_k
    np.add.at(counts, (np.repeat(trace.layer.astype(np.int64), k), trace.experts.reshape(-1).astype(np.int64)), 1)
    return counts


def activation_share(trace: Trace) -> np.ndarray:
    """(layers, experts) float: each layer's activations split over its experts; every row that has
    data sums to 1 (layers without rows are all zero)."""
    counts = activation_counts(trace).astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def popularity(trace: Trace) -> pl.DataFrame:
    """One row per (layer, expert): activation count, share of the layer, summed routing weight."""
    df = trace.to_polars().select("layer", "experts", "weights")
    long = (df.with_columns(pl.col("experts").arr.to_list(), pl.col("weights").arr.to_list())
              .explode("experts", "weights")
              .rename({"experts": "expert", "weights": "weight"}))
    grid = pl.DataFrame({"layer": np.repeat(np.arange(trace.meta.num_layers), trace.meta.num_experts),
                         "expert": np.tile(np.arange(trace.meta.num_experts), trace.meta.num_layers)},
                        schema={"layer": pl.Int16, "expert": pl.Int16})
    agg = long.group_by("layer", "expert").agg(pl.len().alias("count"), pl.col("weight").sum().alias("weight_sum"))
    out = (grid.join(agg, on=["layer", "expert"], how="left")
               .with_columns(pl.col("count").fill_null(0).cast(pl.Int64), pl.col("weight_sum").fill_null(0.0))
               .with_columns((pl.col("count") / pl.col("count").sum().over("layer")).fill_nan(0.0).alias("share"))
               .sort("layer", "expert"))
    return out


def layer_entropy(trace: Trace) -> pl.DataFrame:
    """Per layer: Shannon entropy of the activation share (bits), the same normalised by log2(E)
    (1 = perfectly balanced), the largest share, and max/mean imbalance."""
    share = activation_share(trace)
    e = trace.meta.num_experts
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(share > 0, share * np.log2(share), 0.0).sum(axis=1)
    has = share.sum(axis=1) > 0
    return pl.DataFrame({
        "layer": np.arange(share.shape[0]),
        "entropy_bits": np.where(has, ent, np.nan),
        "normalized_entropy": np.where(has, ent / math.log2(e), np.nan) if e > 1 else np.ones(share.shape[0]),
        "max_share": np.where(has, share.max(axis=1), np.nan),
        "imbalance": np.where(has, share.max(axis=1) * e, np.nan),  # max / mean (mean share = 1/E)
    }).filter(pl.Series(has))


# ---- reuse distances ----------------------------------------------------------------------------

@njit(cache=True)
def _stack_depths(keys: np.ndarray, num_keys: int) -> np.ndarray:
    """LRU stack depth of every request under the atomic semantics; 0 = first use (cold)."""
    n, k = keys.shape
    stamp = np.full(num_keys, -1, np.int64)
    out = np.zeros((n, k), np.int64)
    for r in range(n):
        for j in range(k):
            s = stamp[keys[r, j]]
            if s >= 0:
                depth = 0
                for x in range(num_keys):
                    if stamp[x] >= s:
                        depth += 1
                out[r, j] = depth
        for j in range(k):  # the whole set is used now, in router order
            stamp[keys[r, j]] = r * k + j
    return out


def reuse_distances(trace: Trace, kind: str = "distinct") -> pl.DataFrame:
    """One row per request (layer, expert) with the distance to the previous request of the same
    expert at the same layer (caches persist across sequences, so distances do too):

    - ``kind="tokens"``: how many of this layer's (token) rows ago it was last requested;
    - ``kind="distinct"``: the LRU stack depth -- the number of distinct experts of this layer used
      since, itself included, under the atomic semantics. An LRU cache of K slots hits exactly the
      requests with depth <= K.

    ``distance`` is null for the first request (a compulsory miss at any size).
    """
    if kind not in ("tokens", "distinct"):
        raise ValueError(f"unknown reuse-distance kind {kind!r} (tokens or distinct)")
    trace = _ordered(trace)
    meta = trace.meta
    parts = []
    for layer in np.unique(trace.layer):
        rows = _layer_rows(trace, int(layer))
        ex = trace.experts[rows].astype(np.int64)
        n, k = ex.shape
        if kind == "distinct":
            dist = _stack_depths(np.ascontiguousarray(ex), meta.num_experts).reshape(-1)
        else:
            step = np.repeat(np.arange(n, dtype=np.int64), k)
            flat = ex.reshape(-1)
            order = np.lexsort((step, flat))
            dist = np.zeros(n * k, np.int64)
            same = flat[order[1:]] == flat[order[:-1]]
            dist[order[1:][same]] = step[order[1:][same]] - step[order[:-1][same]]
        parts.append(pl.DataFrame({"layer": np.full(n * k, layer, np.int64), "expert": ex.reshape(-1),
                                   "distance": dist}))
    if not parts:
        return pl.DataFrame(schema={"layer": pl.Int64, "expert": pl.Int64, "distance": pl.Int64})
    out = pl.concat(parts)
    return out.with_columns(pl.when(pl.col("distance") > 0).then(pl.col("distance")).alias("distance"))


def reuse_histogram(trace: Trace, kind: str = "distinct") -> pl.DataFrame:
    """Distribution of reuse distances over all layers: distance -> count and fraction (null distance
    = first use)."""
    d = reuse_distances(trace, kind)
    total = d.height
    return (d.group_by("distance").agg(pl.len().alias("count")).sort("distance", nulls_last=True)
             .with_columns((pl.col("count") / total).alias("fraction")))


# ---- persistence, cross-layer, co-activation ------------------------------------------------------

def persistence(trace: Trace) -> pl.DataFrame:
    """Token-to-token persistence per layer: over consecutive tokens (token index differs by 1) of
    one sequence, the mean fraction of the top-k set kept (``overlap``) and how often the top-1
    expert stays the same (``top1_same``)."""
    trace = _ordered(trace)
    meta = trace.meta
    layers, overlaps, top1s, pairs = [], [], [], []
    for layer in np.unique(trace.layer):
        rows = _layer_rows(trace, int(layer))
        seq, tok, ex = trace.seq[rows], trace.token[rows], trace.experts[rows]
        adjacent = (seq[1:] == seq[:-1]) & (tok[1:] == tok[:-1] + 1)
        if not adjacent.any():
            continue
        mask = one_hot(ex, meta.num_experts)
        kept = (mask[1:] & mask[:-1]).sum(axis=1)[adjacent]
        layers.append(int(layer))
        overlaps.append(float(kept.mean() / meta.top_k))
        top1s.append(float((ex[1:, 0] == ex[:-1, 0])[adjacent].mean()))
        pairs.append(int(adjacent.sum()))
    return pl.DataFrame({"layer": layers, "pairs": pairs, "overlap": overlaps, "top1_same": top1s},
                        schema={"layer": pl.Int64, "pairs": pl.Int64, "overlap": pl.Float64, "top1_same": pl.Float64})


def _aligned(trace: Trace, src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """Expert sets of layers ``src`` and ``dst`` for the tokens that have both rows."""
    key = (trace.seq.astype(np.int64) << 32) | trace.token.astype(np.int64)
    a, b = _layer_rows(trace, src), _layer_rows(trace, dst)
    _, ia, ib = np.intersect1d(key[a], key[b], return_indices=True)
    ex = trace.experts
    return ex[a[ia]], ex[b[ib]]


def transition_matrix(trace: Trace, src: int, dst: int | None = None, *, top1: bool = False,
                      normalize: bool = True) -> np.ndarray:
    """(E, E) cross-layer transitions for the same token: entry [i, j] counts tokens with expert i
    at layer ``src`` and expert j at layer ``dst`` (default ``src + 1``); ``top1`` uses only the
    top-1 expert on both sides. With ``normalize`` every row with data sums to 1 (the distribution of
    the ``dst`` experts given expert i at ``src``)."""
    dst = src + 1 if dst is None else dst
    e = trace.meta.num_experts
    a, b = _aligned(trace, src, dst)
    if top1:
        a, b = a[:, :1], b[:, :1]
    counts = np.zeros((e, e), dtype=np.float64 if normalize else np.int64)
    ka, kb = a.shape[1], b.shape[1]
    np.add.at(counts, (np.repeat(a, kb, axis=1).reshape(-1).astype(np.int64),
                       np.tile(b, (1, ka)).reshape(-1).astype(np.int64)), 1)
    if normalize:
        tot = counts.sum(axis=1, keepdims=True)
        counts = np.divide(counts, tot, out=np.zeros_like(counts), where=tot > 0)
    return counts


def cross_layer_affinity(trace: Trace) -> pl.DataFrame:
    """Per adjacent layer pair (l, l+1): mutual information (bits) between the top-1 experts, and
    how often the most likely next-layer expert given this layer's top-1 is in the next set
    (in-sample: the transition table is estimated on the same trace)."""
    trace = _ordered(trace)
    out = {"layer": [], "next_layer": [], "tokens": [], "mutual_info_bits": [], "argmax_hit": []}
    for layer in range(trace.meta.num_layers - 1):
        a, b = _aligned(trace, layer, layer + 1)
        if not len(a):
            continue
        joint = transition_matrix(trace, layer, top1=True, normalize=False).astype(np.float64)
        p = joint / joint.sum()
        pa, pb = p.sum(axis=1, keepdims=True), p.sum(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            mi = np.where(p > 0, p * np.log2(p / (pa * pb)), 0.0).sum()
        full = transition_matrix(trace, layer, normalize=False)
        guess = full.argmax(axis=1)[a[:, 0].astype(np.int64)]
        hit = (b == guess[:, None]).any(axis=1).mean()
        for key, v in zip(out, (layer, layer + 1, len(a), float(mi), float(hit)), strict=True):
            out[key].append(v)
    return pl.DataFrame(out, schema={"layer": pl.Int64, "next_layer": pl.Int64, "tokens": pl.Int64,
                                     "mutual_info_bits": pl.Float64, "argmax_hit": pl.Float64})


def coactivation(trace: Trace, layer: int | None = None, *, normalize: str | None = None) -> np.ndarray:
    """(E, E) co-activation within one (token, layer) set: [i, j] = number of sets holding both i and
    j (i != j); the diagonal holds each expert's set count. ``layer=None`` pools all layers.
    ``normalize="conditional"`` gives P(j in set | i in set) (diagonal 1 where i occurs)."""
    ex = trace.experts if layer is None else trace.experts[trace.layer == layer]
    mask = one_hot(ex, trace.meta.num_experts).astype(np.int64)
    co = mask.T @ mask
    if normalize is None:
        return co
    if normalize != "conditional":
        raise ValueError(f"unknown normalisation {normalize!r}")
    diag = np.diag(co).astype(np.float64)[:, None]
    return np.divide(co.astype(np.float64), diag, out=np.zeros(co.shape), where=diag > 0)


# ---- segment cache bound (arXiv 2505.16056) ----------------------------------------------------------

def segment_cache_bound(trace: Trace, segment_len: int, cache_sizes: list[int] | None = None, *,
                        stride: int = 1, per_layer: bool = False) -> pl.DataFrame:
    """Segment Cache Best Hit Rate (SCH) of Liang et al., arXiv 2505.16056 (v1 definition, as in the
    authors' ``40_sch_calc.py``): cut each sequence's rows at one layer into windows of
    ``segment_len`` consecutive tokens (every ``stride`` tokens; the paper slides by 1). Knowing the
    window in advance, the best cache of C slots holds the C experts activated most often in it; its
    hit rate is (sum of the top-C activation counts) / (k * segment_len). SCH(C) pools all windows
    of all layers. Loading the window's set is free -- so this bounds policies that only change the
    cache at segment boundaries; it is not a bound on Belady/OPT (which pays its loads but may change
    contents every token). Sequences with fewer rows than ``segment_len`` at a layer add no window.
    """
    if segment_len < 1 or stride < 1:
        raise ValueError("segment_len and stride must be >= 1")
    trace = _ordered(trace)
    meta = trace.meta
    e, k = meta.num_experts, meta.top_k
    sizes = list(range(1, e + 1)) if cache_sizes is None else [int(c) for c in cache_sizes]
    bad = [c for c in sizes if not 1 <= c <= e]
    if bad:
        raise ValueError(f"cache size {bad[0]} outside [1, {e}]")
    per: dict[int, tuple[int, np.ndarray]] = {}
    for layer in np.unique(trace.layer):
        rows = _layer_rows(trace, int(layer))
        seq = trace.seq[rows]
        mask = one_hot(trace.experts[rows], e).astype(np.int64)
        covered = np.zeros(e, np.int64)  # covered[c-1]: hits of the best c-slot set, summed over windows
        windows = 0
        bounds = np.flatnonzero(np.diff(seq)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(seq)], strict=True):
            if hi - lo < segment_len:
                continue
            csum = np.vstack([np.zeros((1, e), np.int64), np.cumsum(mask[lo:hi], axis=0)])
            starts = np.arange(0, hi - lo - segment_len + 1, stride)
            win = csum[starts + segment_len] - csum[starts]
            covered += np.cumsum(-np.sort(-win, axis=1), axis=1).sum(axis=0)
            windows += len(starts)
        per[int(layer)] = (windows, covered)
    rows_out = []
    if per_layer:
        for layer, (w, cov) in per.items():
            req = w * k * segment_len
            for c in sizes:
                rows_out.append((layer, c, w, req, int(cov[c - 1]), cov[c - 1] / req if req else float("nan")))
    else:
        w = sum(v[0] for v in per.values())
        cov = sum((v[1] for v in per.values()), np.zeros(e, np.int64))
        req = w * k * segment_len
        for c in sizes:
            rows_out.append((-1, c, w, req, int(cov[c - 1]), cov[c - 1] / req if req else float("nan")))
    df = pl.DataFrame(rows_out, schema={"layer": pl.Int64, "cache_size": pl.Int64, "windows": pl.Int64,
                                        "requests": pl.Int64, "hits": pl.Int64, "hit_rate": pl.Float64},
                      orient="row")
    return df if per_layer else df.drop("layer")


# ---- prefill vs decode ----------------------------------------------------------------------------------

def phase_comparison(trace: Trace, cache_size: int | None = None) -> pl.DataFrame:
    """Per phase present in the trace: rows, tokens, mean normalised entropy over layers, mean
    token-to-token overlap, and the LRU and OPT hit rates at ``cache_size`` slots per layer
    (default 2 * top-k, capped at E) when that phase is replayed alone."""
    from moesim.simulator.replay import simulate

    meta = trace.meta
    k = cache_size or min(2 * meta.top_k, meta.num_experts)
    out = []
    for code, name in PHASE_NAMES.items():
        sub = trace.filter_phase(code)
        if not len(sub):
            continue
        ent = layer_entropy(sub)["normalized_entropy"].mean()
        per = persistence(sub)
        tokens = sub.to_polars().select("seq", "token").unique().height
        out.append({
            "phase": name, "rows": len(sub), "tokens": tokens,
            "normalized_entropy": float(ent) if ent is not None else float("nan"),
            "overlap": float(per["overlap"].mean()) if per.height else float("nan"),
            "cache_size": k,
            "lru_hit_rate": simulate(sub, "lru", k).hit_rate,
            "opt_hit_rate": simulate(sub, "opt", k).hit_rate,
        })
    return pl.DataFrame(out)


def summary(trace: Trace) -> dict[str, object]:
    """A few headline numbers of a trace (for reports)."""
    meta = trace.meta
    df = trace.to_polars().select("seq", "token", "phase")
    ent = layer_entropy(trace)
    per = persistence(trace)
    return {
        "rows": len(trace),
        "sequences": df["seq"].n_unique(),
        "tokens": df.unique(["seq", "token"]).height,
        "prefill_rows": int((trace.phase == 0).sum()),
        "decode_rows": int((trace.phase == 1).sum()),
        "layers": meta.num_layers, "experts": meta.num_experts, "top_k": meta.top_k,
        "mean_normalized_entropy": float(ent["normalized_entropy"].mean()) if ent.height else float("nan"),
        "max_share": float(ent["max_share"].max()) if ent.height else float("nan"),
        "mean_overlap": float(per["overlap"].mean()) if per.height else float("nan"),
        "mean_top1_same": float(per["top1_same"].mean()) if per.height else float("nan"),
    }


# ---- speculative prefetch quality (trace-only predictors) ------------------------------------------

PREDICTORS = ("prev-token", "cross-layer")


@njit(cache=True)
def _prefetch_kernel(seq: np.ndarray, tok: np.ndarray, lay: np.ndarray, ex: np.ndarray, num_experts: int,
                     num_layers: int, budgets: np.ndarray, mode: int) -> tuple[np.ndarray, int]:
    """Compiled :func:`prefetch_quality`; mode 0 = prev-token, 1 = cross-layer. Returns (correct
    picks per budget, rows with a prediction)."""
    n, k = ex.shape
    e = num_experts
    freq = np.zeros((num_layers, e))
    trans = np.zeros((num_layers, e, e))
    prev_seq = np.full(num_layers, -1, np.int64)
    prev_tok = np.full(num_layers, -2, np.int64)
    prev_set = np.zeros((num_layers, k), np.int64)
    correct = np.zeros(budgets.shape[0], np.int64)
    rows = 0
    last_seq, last_tok, last_layer = -1, -2, -2
    last_set = np.zeros(k, np.int64)
    tiebreak = (e - 1 - np.arange(e)) * 1e-9  # deterministic: lower id wins ties
    in_set = np.zeros(e, np.bool_)
    for r in range(n):
        layer = lay[r]
        follows = last_seq == seq[r] and last_tok == tok[r] and last_layer == layer - 1
        have = False
        score = np.zeros(e)
        if mode == 0:
            if prev_seq[layer] == seq[r] and prev_tok[layer] == tok[r] - 1:
                score = freq[layer] / (freq[layer].sum() + 1.0)  # < 1: only breaks ties after the set
                for j in range(k):
                    score[prev_set[layer, j]] += 2.0 + (k - 1 - j)  # previous set first, router order
                have = True
        elif follows:
            for j in range(k):
                score += trans[layer, last_set[j]]
            score += freq[layer] / (freq[layer].sum() + 1.0)
            have = True
        if have:
            order = np.argsort(-(score + tiebreak), kind="mergesort")
            in_set[:] = False
            for j in range(k):
                in_set[ex[r, j]] = True
            hits = np.cumsum(in_set[order].astype(np.int64))
            for b in range(budgets.shape[0]):
                correct[b] += hits[budgets[b] - 1]
            rows += 1
        if follows:
            for a in range(k):
                for j in range(k):
                    trans[layer, last_set[a], ex[r, j]] += 1.0
        for j in range(k):
            freq[layer, ex[r, j]] += 1.0
            prev_set[layer, j] = ex[r, j]
            last_set[j] = ex[r, j]
        prev_seq[layer], prev_tok[layer] = seq[r], tok[r]
        last_seq, last_tok, last_layer = seq[r], tok[r], layer
    return correct, rows


def prefetch_quality(trace: Trace, budgets: list[int], predictor: str = "cross-layer") -> pl.DataFrame:
    """Precision and recall of a simple, causal expert predictor that names ``budget`` experts for
    each (token, layer) before it runs:

    - ``prev-token``: the same layer's set at the previous token of the sequence, then the layer's
      most frequent experts so far;
    - ``cross-layer``: rank this layer's experts by how often they followed the previous layer's set
      of the same token (counts learnt online from the rows already seen), then by frequency so far.

    precision = correct / budget, recall = correct / top-k, pooled over every row that has a
    prediction (layer 0 has none for ``cross-layer``; a sequence's first token none for ``prev-token``).
    Compiled (numba); :func:`prefetch_quality_reference` is the plain-Python statement of the same.
    """
    trace, budgets = _check_prefetch_args(trace, budgets, predictor)
    correct, rows = _prefetch_kernel(trace.seq.astype(np.int64), trace.token.astype(np.int64),
                                     trace.layer.astype(np.int64), np.ascontiguousarray(trace.experts.astype(np.int64)),
                                     trace.meta.num_experts, trace.meta.num_layers, np.asarray(budgets, np.int64),
                                     PREDICTORS.index(predictor))
    return _prefetch_table(predictor, budgets, correct, int(rows), trace.meta.top_k)


def _check_prefetch_args(trace: Trace, budgets: list[int], predictor: str) -> tuple[Trace, list[int]]:
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r} (known: {', '.join(PREDICTORS)})")
    e = trace.meta.num_experts
    bad = [b for b in budgets if not 1 <= b <= e]
    if bad:
        raise ValueError(f"budget {bad[0]} outside [1, {e}]")
    return _ordered(trace), [int(b) for b in budgets]


def _prefetch_table(predictor: str, budgets: list[int], correct: np.ndarray, rows: int, k: int) -> pl.DataFrame:
    b = np.asarray(budgets, np.float64)
    return pl.DataFrame({
        "predictor": [predictor] * len(budgets), "budget": list(budgets), "rows": [rows] * len(budgets),
        "precision": (correct / (b * rows)) if rows else np.full(len(b), np.nan),
        "recall": (correct / (k * rows)) if rows else np.full(len(b), np.nan),
    })


def prefetch_quality_reference(trace: Trace, budgets: list[int], predictor: str = "cross-layer") -> pl.DataFrame:
    """Plain-Python :func:`prefetch_quality` (the oracle its compiled kernel is tested against)."""
    trace, budgets = _check_prefetch_args(trace, budgets, predictor)
    meta = trace.meta
    e, k, n_layers = meta.num_experts, meta.top_k, meta.num_layers
    freq = np.zeros((n_layers, e), np.float64)
    trans = np.zeros((n_layers, e, e), np.float64)  # trans[l, i, j]: i at layer l-1 then j at layer l
    prev_same_layer: dict[int, tuple[int, int, np.ndarray]] = {}  # layer -> (seq, token, set)
    correct = np.zeros(len(budgets), np.int64)
    predicted_rows = 0
    seq, tok, lay, ex = trace.seq, trace.token, trace.layer.astype(np.int64), trace.experts.astype(np.int64)
    last_row: tuple[int, int, int, np.ndarray] | None = None  # (seq, token, layer, set) of the row before
    tiebreak = (e - 1 - np.arange(e)) * 1e-9  # deterministic: lower id wins ties
    for r in range(len(lay)):
        layer, actual = int(lay[r]), ex[r]
        follows = last_row is not None and last_row[0] == seq[r] and last_row[1] == tok[r] and last_row[2] == layer - 1
        score = None
        if predictor == "prev-token":
            p = prev_same_layer.get(layer)
            if p is not None and p[0] == seq[r] and p[1] == tok[r] - 1:
                score = freq[layer] / (freq[layer].sum() + 1.0)
                score[p[2]] += 2.0 + np.arange(k)[::-1]
        elif follows:
            score = np.zeros(e)
            for j in range(k):
                score = score + trans[layer][last_row[3][j]]
            score = score + freq[layer] / (freq[layer].sum() + 1.0)
        if score is not None:
            order = np.argsort(-(score + tiebreak), kind="stable")
            hit = np.isin(order, actual)
            correct += np.cumsum(hit)[np.asarray(budgets) - 1]
            predicted_rows += 1
        if follows:
            for a in last_row[3]:
                for b in actual:
                    trans[layer, a, b] += 1
        freq[layer, actual] += 1
        prev_same_layer[layer] = (int(seq[r]), int(tok[r]), actual)
        last_row = (int(seq[r]), int(tok[r]), layer, actual)
    return _prefetch_table(predictor, budgets, correct, predicted_rows, k)
