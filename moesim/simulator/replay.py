"""Hit-rate replay of a trace against an eviction policy (docs/semantics.md).

Two paths, one semantics:
- the **compiled path**: every built-in policy (``moesim.simulator.policy_kernels``) and a user's
  :class:`~moesim.policies.compiled.ScorePolicy` (``moesim.simulator.user_kernels``), chosen
  automatically;
- the **generic path**: the one cache mechanism :class:`~moesim.policies.base.ExpertCache` driven
  with any policy object, built-in or user-written. It is also the oracle the compiled path is tested
  against (``force_generic=True``).

Scopes: ``layer`` (one cache of K slots per MoE layer, the default), ``global`` (one cache of K slots
shared by all layers, keys ``layer * E + expert``), or per-layer budgets (``cache_size`` a list, one
entry per layer; 0 disables caching at that layer). Semantics: ``atomic`` (a (token, layer) set is
requested at once) or ``sequential`` (one expert at a time, as a generic cache simulator would).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from moesim import parallel
from moesim.errors import SettingError, UsageError
from moesim.policies.base import NEVER, EvictionPolicy, ExpertCache
from moesim.policies.compiled import ScorePolicy
from moesim.policies.resolve import PolicySpec, eviction_factory, policy_name
from moesim.simulator import kernels, stream_cache, user_kernels
from moesim.simulator.policy_kernels import lists
from moesim.simulator.policy_kernels.registry import Kernel, kernel_of
from moesim.simulator.results import HitCounts
from moesim.traces.format import Trace, TraceMeta

SCOPES = ("layer", "global")
_NO_WEIGHTS = np.zeros((1, 1), np.float32)  # for kernels of policies that never read routing weights
SEMANTICS = ("atomic", "sequential")


@dataclass
class ReplayResult(HitCounts):
    policy: str
    cache_size: int | list[int]
    requests: int
    hits: int
    layer_requests: np.ndarray = field(repr=False)
    layer_hits: np.ndarray = field(repr=False)
    method: str = "python"
    scope: str = "layer"
    semantics: str = "atomic"

    def to_dict(self, per_layer: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "policy": self.policy, "cache_size": self.cache_size, "requests": self.requests,
            "hits": self.hits, "misses": self.misses, "hit_rate": round(self.hit_rate, 6),
            "scope": self.scope, "semantics": self.semantics, "method": self.method,
        }
        if per_layer:
            out["per_layer"] = [
                {"layer": i, "requests": int(q), "hits": int(h), "hit_rate": round(h / q, 6) if q else 0.0}
                for i, (q, h) in enumerate(zip(self.layer_requests, self.layer_hits, strict=True))
            ]
        return out


@dataclass
class RequestStream:
    """A trace flattened into what a cache sees: per row a cache id, keys in router order, a layer."""

    cache: np.ndarray    # (n,) int64
    keys: np.ndarray     # (n, w) int64
    clock: np.ndarray    # (n,) int64: the token ordinal (policies' ``now``: ages are in tokens)
    group: np.ndarray    # (n,) int64: the MoE layer, for per-layer statistics
    weights_of: Callable[[], np.ndarray] = field(repr=False)  # (n, w) float32, built on first use
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (n_caches,) int64
    n_keys: int = 0
    n_groups: int = 0

    @property
    def weights(self) -> np.ndarray:
        """Routing weights, decoded from float16 only when a policy reads them (most do not)."""
        return self.weights_of()

    @property
    def n_caches(self) -> int:
        return int(self.sizes.shape[0])

    def next_use(self) -> np.ndarray:
        return kernels.next_use_kernel(self.cache, self.keys, self.n_keys, self.n_caches)


def keys_per_cache(meta: TraceMeta, scope: str) -> int:
    """How many distinct experts one cache can ever hold: the experts per layer, or per model when one
    cache is shared by all layers."""
    return meta.num_experts if scope == "layer" else meta.num_experts * meta.num_layers


def clamp_cache_size(size: int, meta: TraceMeta, scope: str = "layer") -> int:
    """A cache with a slot for every key it can see keeps everything resident once loaded: any larger
    size replays the same, so it is replayed as that size (memory never depends on the number typed)."""
    return min(int(size), keys_per_cache(meta, scope))


def resolve_sizes(trace: Trace, cache_size: int | Sequence[int], scope: str) -> np.ndarray:
    meta = trace.meta
    if scope not in SCOPES:
        raise UsageError(f"unknown scope {scope!r} (known: {', '.join(SCOPES)})")
    if isinstance(cache_size, int | np.integer):
        if cache_size < meta.top_k:
            raise UsageError(f"cache size {cache_size} is smaller than top-k ({meta.top_k})")
        sizes = [clamp_cache_size(cache_size, meta, scope)] * (meta.num_layers if scope == "layer" else 1)
    else:
        if scope != "layer":
            raise SettingError("scope", "per-layer budgets need a per-layer cache", fix="layer")
        sizes = [clamp_cache_size(s, meta, scope) for s in cache_size]
        if len(sizes) != meta.num_layers:
            raise UsageError(f"{len(sizes)} layer budgets given but the trace has {meta.num_layers} layers")
        bad = [s for s in sizes if s != 0 and s < meta.top_k]
        if bad:
            raise UsageError(f"layer budget {bad[0]} is smaller than top-k ({meta.top_k}); use 0 to disable a layer")
    return np.asarray(sizes, dtype=np.int64)


def build_stream(trace: Trace, cache_size: int | Sequence[int], scope: str = "layer",
                 semantics: str = "atomic") -> RequestStream:
    if semantics not in SEMANTICS:
        raise UsageError(f"unknown semantics {semantics!r} (known: {', '.join(SEMANTICS)})")
    sizes = resolve_sizes(trace, cache_size, scope)
    cache, keys, clock, group, weights_from, ordered, n_keys = _stream_arrays(trace, scope, semantics)
    src = trace if ordered is None else ordered

    def weights_of() -> np.ndarray:
        return weights_from(src)

    return RequestStream(cache, keys, clock, group, weights_of, sizes, n_keys, trace.meta.num_layers)


def _stream_arrays(trace: Trace, scope: str, semantics: str) -> tuple:
    """The size-independent part of a request stream, built once per (trace, scope, semantics) and kept
    on the trace object: a sweep or an mrc over sizes and policies reads the columns once."""
    memo = trace.memo("request_streams")  # emptied when the trace's table is replaced
    # keyed by what else the arrays depend on, so a trace whose geometry is replaced is rebuilt
    key = (scope, semantics, trace.meta.num_layers, trace.meta.num_experts)
    if key in memo:
        return memo[key]
    entry = None
    if trace.source is not None and trace.path is not None and stream_cache.enabled():
        stream_cache.max_bytes()  # a bad $MOESIM_CACHE_MAX_GB is reported before any work
        entry = stream_cache.entry_path(trace.path, trace.source, trace.meta.to_json(), scope, semantics)
        found = stream_cache.load(entry)
        if found is not None:
            memo[key] = out = _from_entry(*found, semantics)
            return out
    ordered = trace.execution_order()
    meta = ordered.meta
    n_keys = meta.num_experts if scope == "layer" else meta.num_layers * meta.num_experts
    cache, keys, clock, group = _stream_rows(ordered, scope == "global")
    width = keys.shape[1]
    decoded: list[np.ndarray] = []

    # takes the trace rather than closing over it: the memo lives on the trace, and a cycle through it
    # would keep every replayed trace's arrays alive until the cyclic GC runs
    def weights_from(src: Trace) -> np.ndarray:
        if not decoded:
            w = src.weights
            decoded.append(np.ascontiguousarray(w.reshape(-1, 1) if semantics == "sequential" else w))
        return decoded[0]

    if semantics == "sequential":
        group, clock = np.repeat(group, width), np.repeat(clock, width)
        cache = np.repeat(cache, width) if scope == "global" else group
        keys = keys.reshape(-1, 1)
    out = (cache, np.ascontiguousarray(keys), clock, group, weights_from, None if ordered is trace else ordered, n_keys)
    memo[key] = out
    if entry is not None:
        arrays = {"cache": cache, "keys": out[1], "clock": clock} | ({} if group is cache else {"group": group})
        stream_cache.store(entry, arrays, {"n_keys": n_keys, "ordered": ordered is trace})
    return out


def _from_entry(arrays: dict[str, np.ndarray], info: dict[str, Any], semantics: str) -> tuple:
    """:func:`_stream_arrays`' tuple from a stream_cache entry. The rows were never read: routing
    weights, when a policy reads them, come from the file (sorted like the stream if the file is not
    in execution order)."""
    decoded: list[np.ndarray] = []
    ordered = bool(info["ordered"])

    def weights_from(src: Trace) -> np.ndarray:
        if not decoded:
            w = (src if ordered else src.execution_order()).weights
            decoded.append(np.ascontiguousarray(w.reshape(-1, 1) if semantics == "sequential" else w))
        return decoded[0]

    cache = arrays["cache"]
    return (cache, arrays["keys"], arrays["clock"], arrays.get("group", cache), weights_from, None,
            int(info["n_keys"]))


def _stream_rows(trace: Trace, global_scope: bool) -> tuple[np.ndarray, ...]:
    """(cache, keys, clock, group) of rows in execution order: compiled passes over the narrow Arrow
    columns (numpy's astype + cumsum passes cost more than the replay itself on large traces), over
    disjoint row ranges in threads. With the per-layer scope the cache ids are the layers: one array
    serves as both ``cache`` and ``group``."""
    seq, token, layer, experts = trace.seq, trace.token, trace.layer, trace.experts
    n, width = experts.shape
    group = np.empty(n, np.int64)
    cache = np.empty(n, np.int64) if global_scope else group
    keys = np.empty((n, width), np.int64)
    clock = np.empty(n, np.int64)
    bounds = parallel.row_ranges(n)

    def fill(i: int) -> int:
        return kernels.stream_fill(seq, token, layer, experts, trace.meta.num_experts, global_scope,
                                   bounds[i], bounds[i + 1], cache, keys, clock, group)

    last = parallel.map_threads(fill, range(len(bounds) - 1))
    # each range counted its clock from 0: shift it by the tokens before it
    shifts, start = [], 0
    for i in range(1, len(bounds) - 1):
        lo = bounds[i]
        start += last[i - 1] + int(seq[lo] != seq[lo - 1] or token[lo] != token[lo - 1])
        shifts.append((lo, bounds[i + 1], start))
    parallel.map_threads(lambda s: kernels.shift(clock, *s), shifts)
    return cache, keys, clock, group


def compiled_kernel(policy: PolicySpec, params: dict[str, Any] | None) -> tuple[Kernel, np.ndarray, np.ndarray] | None:
    """(kernel, float parameters, rng state) of a built-in policy named by string, else None.
    The parameters are read off a configured instance, so the class stays their one definition."""
    kernel = kernel_of(policy)
    if kernel is None:
        return None
    fparams, rng_state = kernel.params(eviction_factory(policy, params)())
    return kernel, fparams, rng_state


def kernel_inputs(stream: RequestStream, kernel: Kernel) -> tuple[np.ndarray, np.ndarray]:
    """(next uses, routing weights) if the kernel reads them, else small placeholders."""
    nxt = stream.next_use() if kernel.needs_future else np.zeros((1, 1), np.int64)
    return nxt, stream.weights if kernel.reads_weights else _NO_WEIGHTS


def run_generic(stream: RequestStream, make: Callable[[], EvictionPolicy]) -> tuple[np.ndarray, np.ndarray]:
    """The generic path: ExpertCache + policy objects. Returns (requests, hits) per layer.

    Caches are independent, so each cache replays its own rows in one call
    (:meth:`ExpertCache.request_columns`), in trace order."""
    caches = [ExpertCache(int(s), make()) if s > 0 else None for s in stream.sizes]
    needs_future = any(c is not None and c.policy.needs_future for c in caches)
    nxt = stream.next_use() if needs_future else None
    req = np.bincount(stream.group, minlength=stream.n_groups).astype(np.int64) * stream.keys.shape[1]
    hit = np.zeros(stream.n_groups, np.int64)
    # The loop allocates a few small lists per row and keeps long lists of rows alive: the cyclic GC
    # would rescan them again and again (measured: a third of the time). Nothing here makes cycles.
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        return _run_caches(stream, caches, nxt, req, hit)
    finally:
        if gc_was_on:
            gc.enable()


def _run_caches(stream: RequestStream, caches: list[ExpertCache | None], nxt: np.ndarray | None, req: np.ndarray,
                hit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # the rows grouped by cache, in trace order within each: gathered once (one array per key column),
    # so that each chunk below converts contiguous slices (measured: gathering per chunk and writing
    # the hits back by row index cost a fifth of a plain-Python LRU replay)
    if stream.n_caches > 1:
        # stable: a radix sort on 16-bit cache ids
        narrow = stream.cache.astype(np.uint16) if stream.n_caches <= 1 << 16 else stream.cache
        order = np.argsort(narrow, kind="stable")
        bounds = np.searchsorted(narrow[order], np.arange(stream.n_caches + 1))
        cols = [stream.keys[order, j] for j in range(stream.keys.shape[1])]
        clock, group = stream.clock[order], stream.group[order]
    else:
        order = None
        bounds = np.array([0, len(stream.cache)])
        cols = [np.ascontiguousarray(stream.keys[:, j]) for j in range(stream.keys.shape[1])]
        clock, group = stream.clock, stream.group
    weighted = any(c is not None and c.reads_weights for c in caches)
    weights = None if not weighted else stream.weights if order is None else stream.weights[order]
    if nxt is not None and order is not None:
        nxt = nxt[order]
    hits = np.zeros(len(stream.cache), np.int64)
    chunk = 1 << 16
    # a progress bar for long Python replays (tqdm hides itself when stderr is not a terminal)
    with tqdm(total=len(stream.cache), unit="row", desc="replay", disable=len(stream.cache) < 4 * chunk or None,
              leave=False) as bar:
        for c, cache in enumerate(caches):
            first, last = int(bounds[c]), int(bounds[c + 1])
            if cache is None:
                bar.update(last - first)
                continue
            for lo in range(first, last, chunk):
                hi = min(lo + chunk, last)
                # one flat list per column (no list per set): the mechanism's loops for top-1 / top-2
                # sets read them directly
                hits[lo:hi] = cache.request_columns(
                    [col[lo:hi].tolist() for col in cols], clock[lo:hi].tolist(),
                    weights[lo:hi].T.tolist() if weights is not None and cache.reads_weights else None,
                    None if nxt is None else nxt[lo:hi].T.tolist())
                bar.update(hi - lo)
    np.add.at(hit, group, hits)
    return req, hit


def _over_caches(run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], stream: RequestStream,
                 threads: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``run(sizes) -> (requests, hits) per group`` over disjoint sets of the caches at once, in threads.

    Caches are independent (each sees only its own rows; every kernel's state is per cache and its
    clock only orders the rows of one cache), and a kernel skips the rows of a cache of size 0 after
    counting their requests: so each thread runs the kernel with the other threads' caches sized 0,
    and the hits add up. The kernels release the GIL."""
    active = np.flatnonzero(stream.sizes > 0)
    n = min(parallel.threads() if threads is None else threads, active.size)
    if n <= 1 or len(stream.cache) < parallel.MIN_ROWS:
        return run(stream.sizes)
    masked = []
    for part in np.array_split(active, n):  # contiguous layers; a trace has about as many rows per layer
        sizes = np.zeros_like(stream.sizes)
        sizes[part] = stream.sizes[part]
        masked.append(sizes)
    results = parallel.map_threads(run, masked)
    return results[0][0], np.sum([hit for _, hit in results], axis=0)


def replay_stream(stream: RequestStream, policy: PolicySpec, params: dict[str, Any] | None = None, *,
                  force_generic: bool = False, threads: int | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Replay a prebuilt request stream; returns (requests, hits) per layer and the method used.
    Compiled replays of several caches (per-layer scope) run in ``threads`` threads (default
    :func:`moesim.parallel.threads`)."""
    if isinstance(policy, ScorePolicy) and params:
        raise UsageError(f"ScorePolicy {policy.name!r} takes no params (its njit functions read module constants)")
    if isinstance(policy, ScorePolicy) and not force_generic:
        def scored(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return user_kernels.replay_scored(
                policy.on_access, policy.on_insert, policy.on_evict, policy.score, policy.n_fields, stream.cache,
                stream.keys, stream.clock, stream.weights, stream.group, sizes, stream.n_keys, stream.n_groups)

        req, hit = _over_caches(scored, stream, threads)
        return req, hit, "numba"
    make = eviction_factory(policy, params)
    compiled = None if force_generic else compiled_kernel(policy, params)
    if compiled is None:
        req, hit = run_generic(stream, make)
        return req, hit, "python"
    kernel, fparams, rng_state = compiled
    nxt, weights = kernel_inputs(stream, kernel)
    layout = kernel.layout(stream.sizes, stream.keys.size, fparams)

    def builtin(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return kernel.replay(layout, stream.cache, stream.keys, stream.clock, weights, stream.group, sizes,
                             stream.n_keys, stream.n_groups, nxt, fparams, rng_state)

    req, hit = _over_caches(builtin, stream, threads)
    return req, hit, "numba"


def simulate(trace: Trace, policy: PolicySpec, cache_size: int | Sequence[int], *, scope: str = "layer",
             semantics: str = "atomic", params: dict[str, Any] | None = None,
             force_generic: bool = False, threads: int | None = None) -> ReplayResult:
    """Replay ``trace`` against ``policy`` (a registered name or a zero-argument factory)."""
    stream = build_stream(trace, cache_size, scope, semantics)
    req, hit, method = replay_stream(stream, policy, params, force_generic=force_generic, threads=threads)
    size_out = int(stream.sizes[0]) if isinstance(cache_size, int | np.integer) else stream.sizes.tolist()
    return ReplayResult(policy_name(policy), size_out, int(req.sum()), int(hit.sum()), req, hit, method,
                        scope, semantics)


# ---- all cache sizes ----------------------------------------------------------------------------

@dataclass
class MRCResult:
    policy: str
    method: str
    curve: list[dict[str, Any]]
    scope: str = "layer"

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "method": self.method, "scope": self.scope, "curve": self.curve}


_MRC_TRACE: list[Trace] = []  # the trace of a worker process of mrc (sent once per worker, not per size)


def _hold_trace(trace: Trace) -> None:
    _MRC_TRACE[:] = [trace]


def _one_size(args: tuple) -> tuple[int, int]:
    policy, k, scope, semantics, params = args
    r = simulate(_MRC_TRACE[0], policy, k, scope=scope, semantics=semantics, params=params, threads=1)
    return r.requests, r.hits


def _picklable(obj: object) -> bool:
    import pickle

    try:
        pickle.dumps(obj)
    except Exception:  # noqa: BLE001 - lambdas, local classes, closures: whatever pickle refuses
        return False
    return True


def mrc(trace: Trace, policy: PolicySpec, sizes: Sequence[int] | None = None, *, scope: str = "layer",
        semantics: str = "atomic", params: dict[str, Any] | None = None,
        workers: int | None = None) -> MRCResult:
    """Hit rate for every cache size (default: top-k .. experts per layer, or .. all keys if global).

    LRU, lfu, opt, lrfu, lfu-decay and gate-weighted use one pass over the trace (stack depths: they
    have the inclusion property, tests/test_inclusion.py). The other built-ins and a user's
    ScorePolicy run one compiled replay per size in parallel threads (``workers``; 1 = all sizes inside
    one compiled call for the built-ins): the kernels release the GIL, and threads beat processes,
    which would each read the trace and build the stream again (measured: arc over 7 sizes, 2 threads
    6.7 s, 2 processes 14.4 s, one call 8.0 s, on a loaded 2-core machine). Python policies run one
    replay per size in worker processes (when the policy pickles; else one after another).
    """
    meta = trace.meta
    n_keys = meta.num_experts if scope == "layer" else meta.num_experts * meta.num_layers
    if sizes is None:
        sizes = list(range(meta.top_k, n_keys + 1))  # smaller caches are a usage error in every semantics
    for s in sizes:
        resolve_sizes(trace, s, scope)
    # sizes past the keys a cache can hold replay as that size: one curve point for all of them
    sizes = list(dict.fromkeys(clamp_cache_size(s, meta, scope) for s in sizes))
    eviction_factory(policy, params)  # validates name and parameters
    stream = build_stream(trace, sizes[0], scope, semantics)
    requests = int(stream.keys.size)
    compiled = compiled_kernel(policy, params)
    width = stream.keys.shape[1]
    if compiled is not None and compiled[0].code == lists.LRU:
        hist = kernels.lru_stack_depths(stream.cache, stream.keys, stream.n_keys, stream.n_caches)
        cum = np.cumsum(hist)
        hits = [int(cum[s - 1]) if s >= 1 else 0 for s in sizes]
        method = "one-pass stack distance"
    elif compiled is not None and compiled[0].stack_depths is not None and min(sizes) >= width:
        kernel, fparams, _ = compiled
        nxt, weights = kernel_inputs(stream, kernel)
        hist = kernel.stack_depths(stream.cache, stream.keys, stream.clock, weights, stream.n_caches, stream.n_keys,
                                   nxt, fparams)
        cum = np.cumsum(hist)
        hits = [int(cum[s - 1]) for s in sizes]
        method = "one-pass stack (priority)"
    elif compiled is not None:
        kernel, fparams, rng_state = compiled
        nxt, weights = kernel_inputs(stream, kernel)
        layout = kernel.layout(np.asarray([max(sizes)]), stream.keys.size, fparams)
        args = (stream.cache, stream.keys, stream.clock, weights, stream.group)

        def one(k: int) -> int:
            sized = np.full(stream.n_caches, k, np.int64)
            return int(kernel.replay(layout, *args, sized, stream.n_keys, stream.n_groups, nxt, fparams,
                                     rng_state)[1].sum())

        n_workers = workers or min(len(sizes), os.cpu_count() or 1)
        if n_workers > 1:  # the kernels release the GIL: one thread per size, no pickling
            with ThreadPoolExecutor(n_workers) as pool:
                hits = list(pool.map(one, sizes))
            method = f"per-size runs (compiled, {n_workers} threads)"
        else:
            hits = [one(k) for k in sizes]
            method = "per-size runs (compiled)"
    else:
        n_workers = workers or min(len(sizes), os.cpu_count() or 1)
        if n_workers > 1 and isinstance(policy, ScorePolicy):  # compiled, releases the GIL: threads

            def scored(k: int) -> int:
                return simulate(trace, policy, k, scope=scope, semantics=semantics, threads=1).hits

            with ThreadPoolExecutor(n_workers) as pool:
                hits = list(pool.map(scored, sizes))
            method = f"per-size runs (compiled, {n_workers} threads)"
        else:
            jobs = [(policy, s, scope, semantics, params) for s in sizes]
            # Python policies hold the GIL: processes (measured: a user LRU class over 7 sizes, 5000 tokens:
            # 2 processes 4.6 s, one after another 7.2 s, loaded 2-core machine), when
            # the policy can be sent to them (a class defined at module level; not a lambda)
            if n_workers > 1 and _picklable((policy, params)):
                with ProcessPoolExecutor(n_workers, initializer=_hold_trace, initargs=(trace,)) as pool:
                    results = list(pool.map(_one_size, jobs))
                method = f"per-size runs ({n_workers} processes)"
            else:
                results = [(r.requests, r.hits) for r in
                           (simulate(trace, policy, k, scope=scope, semantics=semantics, params=params) for k in sizes)]
                method = "per-size runs"
            hits = [h for _, h in results]
    curve = [{"cache_size": s, "requests": requests, "hits": h, "hit_rate": round(h / requests, 6) if requests else 0.0}
             for s, h in zip(sizes, hits, strict=True)]
    return MRCResult(policy_name(policy), method, curve, scope)


# ---- reference replay (kept for tests and as documentation of the semantics) ----------------------

def next_use_times(layer: np.ndarray, experts: np.ndarray, num_experts: int) -> np.ndarray:
    """For each (row, slot) request, the row index of the next row at the same layer that requests
    the same expert, or :data:`NEVER`. Rows must be in execution order. (Plain numpy; the kernels'
    ``next_use_kernel`` computes the same in one pass.)"""
    n, k = experts.shape
    keys = (layer.astype(np.int64)[:, None] * num_experts + experts.astype(np.int64)).reshape(-1)
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    order = np.lexsort((rows, keys))
    nxt = np.full(n * k, NEVER, dtype=np.int64)
    same = keys[order[1:]] == keys[order[:-1]]
    nxt[order[:-1][same]] = rows[order[1:][same]]
    return nxt.reshape(n, k)


def replay_reference(trace: Trace, make: Callable[[], EvictionPolicy], cache_size: int | list[int]) -> ReplayResult:
    """Replay with one cache per MoE layer through the generic mechanism (any policy class)."""
    stream = build_stream(trace, cache_size, "layer", "atomic")
    req, hit = run_generic(stream, make)
    size_out = cache_size if isinstance(cache_size, int) else list(cache_size)
    return ReplayResult(make().name, size_out, int(req.sum()), int(hit.sum()), req, hit, "python")
