"""Discrete-event timing simulator of offloaded MoE decoding (and prefill chunks).

Model (what a CUDA runtime with one compute stream and N copy streams does):

- Every operation runs on a *stream* (``compute``, ``copy0`` ... ``copyN-1``); a stream runs its
  operations one after another in issue order, and an operation may also wait for an event (a
  copy landing). So each operation starts at ``max(stream free, dependency ready)``.
- Per step (one decode token, or a batch step / prefill chunk): token overhead; then per layer:
  attention + gate on ``compute``; the gate's set S goes through the one cache mechanism
  (:class:`~moesim.policies.base.ExpertCache`, same policy classes as the hit-rate replay); misses
  are copied on a copy stream; the prefetcher's picks for layer ``l + d`` are admitted (evicting by
  the policy, never an expert in flight or wanted now) and copied after the demand copies; then the
  experts of S compute in order of readiness -- resident ones overlap in-flight copies, a missing
  one stalls compute until its copy lands.

All state lives in one :class:`SimEnv`; operations are logged in a heap keyed by
``(time, priority, sequence)`` so equal times order deterministically (the Perfetto timeline).
"""

from __future__ import annotations

import heapq
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moesim.atomic import atomic_open
from moesim.errors import UsageError
from moesim.policies.base import EvictionPolicy, ExpertCache, policy_class
from moesim.policies.params import ParamError, check_params
from moesim.policies.prefetch import PrefetchContext, make_prefetcher
from moesim.simulator import kernels, timing_kernel
from moesim.simulator.cost_model import CostModel
from moesim.simulator.replay import HitCounts
from moesim.traces.format import PREFILL, Trace
from moesim.traces.steps import Step as Step  # re-exported: the shared step definition
from moesim.traces.steps import build_steps, union_chunks
from moesim.traces.steps import next_uses as _next_uses

PRIORITY = {"copy": 0, "compute": 1}
SPECULATIVE_READY = ("hidden", "gate")


class SimEnv:
    """Streams and the event log of one simulation run (no globals)."""

    def __init__(self, copy_engines: int, record: bool) -> None:
        self.free = {"compute": 0.0, **{f"copy{i}": 0.0 for i in range(copy_engines)}}
        self.copy_streams = [f"copy{i}" for i in range(copy_engines)]
        self.record = record
        self.log: list[tuple[float, int, int, str, float, str, dict]] = []
        self._seq = 0

    def run(self, stream: str, ready: float, duration: float, name: str, args: dict | None = None) -> tuple[float, float]:
        start = max(self.free[stream], ready)
        end = start + duration
        if end < start:
            raise AssertionError("time went backwards")
        self.free[stream] = end
        if self.record:
            kind = "copy" if stream.startswith("copy") else "compute"
            heapq.heappush(self.log, (start, PRIORITY[kind], self._seq, stream, duration, name, args or {}))
            self._seq += 1
        return start, end

    def copy(self, ready: float, duration: float, name: str, args: dict | None = None) -> tuple[float, float]:
        stream = min(self.copy_streams, key=lambda s: (self.free[s], s))
        return self.run(stream, ready, duration, name, args)

    def timeline(self) -> dict[str, Any]:
        events = []
        log = list(self.log)
        while log:
            start, _, _, stream, dur, name, args = heapq.heappop(log)
            events.append({"name": name, "ph": "X", "ts": round(start * 1e6, 3), "dur": round(dur * 1e6, 3),
                           "pid": 0, "tid": stream, "args": args})
        return {"traceEvents": events, "displayTimeUnit": "ms"}


@dataclass
class TimingResult(HitCounts):
    policy: str
    cache_size: int | list[int]
    prefetch: str
    hardware: str
    tokens: int
    requests: int
    hits: int
    total_s: float
    stall_s: float
    copies: int
    prefetches: int
    prefetch_used: int
    prefetch_recall_hits: int
    prefetch_recall_needed: int
    landed_hits: int
    sets: int
    slots: int
    expert_bytes: int
    per_token_ms: np.ndarray = field(repr=False)    # per step: its span on the compute stream / its tokens
    compute_s: float = 0.0
    copy_busy_s: float = 0.0
    engine_mode: str = "replay"
    engine_profile: str = "moesim"
    step_tokens: np.ndarray | None = field(default=None, repr=False)   # None: one token per step
    step_prefill: np.ndarray | None = field(default=None, repr=False)  # None: every step decodes

    # Steps run one after another on the compute stream, so their spans partition ``total_s`` exactly:
    # the decode and prefill times below add up to it.
    def _steps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = len(self.per_token_ms)
        tokens = np.ones(n, np.int64) if self.step_tokens is None else np.asarray(self.step_tokens)
        prefill = np.zeros(n, bool) if self.step_prefill is None else np.asarray(self.step_prefill, bool)
        return tokens, prefill, np.asarray(self.per_token_ms) * tokens / 1e3

    @property
    def decode_tokens(self) -> int:
        tokens, prefill, _ = self._steps()
        return int(tokens[~prefill].sum())

    @property
    def decode_steps(self) -> int:
        return int((~self._steps()[1]).sum())

    @property
    def decode_s(self) -> float:
        _, prefill, span = self._steps()
        return float(span[~prefill].sum())

    @property
    def prefill_tokens(self) -> int:
        tokens, prefill, _ = self._steps()
        return int(tokens[prefill].sum())

    @property
    def prefill_s(self) -> float:
        _, prefill, span = self._steps()
        return float(span[prefill].sum())

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: generated tokens per second of decode steps (prefill time excluded);
        NaN when the trace has no decode rows."""
        n, s = self.decode_tokens, self.decode_s
        return n / s if s > 0 else (float("inf") if n else float("nan"))

    @property
    def ms_per_token(self) -> float:
        """Milliseconds of decode time per generated token (= 1000 / tokens_per_s); NaN without decode."""
        n = self.decode_tokens
        return 1e3 * self.decode_s / n if n else float("nan")

    @property
    def tpot_ms(self) -> float:
        """Time per output token of one sequence: the mean decode step (a step of a batch of B
        sequences yields one token for each of them); NaN without decode."""
        n = self.decode_steps
        return 1e3 * self.decode_s / n if n else float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens per second of prefill steps; NaN when the trace has no prefill rows."""
        n, s = self.prefill_tokens, self.prefill_s
        return n / s if s > 0 else (float("inf") if n else float("nan"))

    def to_dict(self) -> dict[str, Any]:
        def r(x: float, n: int = 6) -> float | None:
            return round(float(x), n) if np.isfinite(x) else None   # JSON has no NaN: null = not applicable

        tokens, prefill, _ = self._steps()
        decode_token_ms = np.asarray(self.per_token_ms)[~prefill]
        out = {
            "policy": self.policy, "cache_size": self.cache_size, "prefetch": self.prefetch, "hardware": self.hardware,
            "tokens": self.tokens, "requests": self.requests, "hits": self.hits, "misses": self.misses,
            "hit_rate": r(self.hit_rate), "tokens_per_s": r(self.tokens_per_s, 4), "ms_per_token": r(self.ms_per_token, 4),
            "tpot_ms": r(self.tpot_ms, 4), "decode_tokens": self.decode_tokens, "decode_ms": r(self.decode_s * 1e3, 3),
            "prefill_tokens": self.prefill_tokens, "prefill_ms": r(self.prefill_s * 1e3, 3),
            "prefill_tokens_per_s": r(self.prefill_tokens_per_s, 4), "total_ms": r(self.total_s * 1e3, 3),
            "stall_ms": r(self.stall_s * 1e3, 3), "compute_ms": r(self.compute_s * 1e3, 3),
            "copy_busy_ms": r(self.copy_busy_s * 1e3, 3),
            "bytes_h2d": (self.misses + self.prefetches) * self.expert_bytes, "expert_bytes": self.expert_bytes,
            "copies": self.copies,
            "prefetches": self.prefetches, "wasted_prefetch_bytes": (self.prefetches - self.prefetch_used) * self.expert_bytes,
            "prefetch_precision": r(self.prefetch_used / self.prefetches) if self.prefetches else 0.0,
            "prefetch_recall": r(self.prefetch_recall_hits / self.prefetch_recall_needed) if self.prefetch_recall_needed else 0.0,
            "expert_recall": r(self.landed_hits / self.requests) if self.requests else 0.0,
            "cache_recall": r(self.hit_rate),
            "cache_precision": r(self.hits / self.slots) if self.slots else 0.0,
            # per decode step, its time per token (prefill chunks would drag the percentiles down)
            "p50_token_ms": r(float(np.median(decode_token_ms)), 4) if len(decode_token_ms) else None,
            "p99_token_ms": r(float(np.percentile(decode_token_ms, 99)), 4) if len(decode_token_ms) else None,
            "engine_mode": self.engine_mode, "engine_profile": self.engine_profile,
        }
        return out


def simulate_timing(trace: Trace, policy: str | Callable[[], EvictionPolicy], cache_size: int | Sequence[int],
                    cost: CostModel, *, prefetch: str = "none", prefetch_params: dict[str, Any] | None = None,
                    policy_params: dict[str, Any] | None = None, batch_size: int = 1, prefill_chunk: int = 512,
                    timeline: str | os.PathLike | None = None, engine: str = "auto",
                    speculative_ready: str = "hidden") -> TimingResult:
    """Simulate decoding ``trace``; ``engine`` "auto" takes the compiled path when it applies
    (batch-1 decode, lru/fifo/lfu/opt, built-in prefetcher, no timeline), "python" forces the
    general event path, "numba" insists on the compiled one.

    ``speculative_ready`` (prefetcher ``speculative`` only): "hidden" (default, what a live decoder can
    do) -- the prediction for layer l+d is layer l+d's router applied to layer l's output, so its
    copies are issued only after layer l's experts and the predict piece (``cost.predict_s``, on
    compute); "gate" -- recorded predictions issued right after layer l's gate, as the replay engine
    does with a trace's ``pred{d}_experts``."""
    if speculative_ready not in SPECULATIVE_READY:
        raise UsageError(f"unknown speculative ready point {speculative_ready!r} (known: {', '.join(SPECULATIVE_READY)})")
    meta = trace.meta
    cost = cost.for_trace_format(meta.extra, trace.path)
    L, E, k = meta.num_layers, meta.num_experts, meta.top_k
    sizes = [int(cache_size)] * L if isinstance(cache_size, int | np.integer) else [int(s) for s in cache_size]
    if len(sizes) != L:
        raise UsageError(f"{len(sizes)} layer budgets given but the trace has {L} layers")
    if any(0 < s < k for s in sizes) or (isinstance(cache_size, int | np.integer) and cache_size < k):
        raise UsageError(f"cache size is smaller than top-k ({k})")
    if isinstance(policy, str):
        try:
            cls = policy_class(policy)
            checked = check_params(cls, policy_params, f"policy {policy!r}")
            cls(**checked)
        except KeyError as exc:
            raise UsageError(str(exc.args[0])) from None
        except ParamError as exc:
            raise UsageError(str(exc)) from None
        except (TypeError, ValueError) as exc:
            raise UsageError(f"policy {policy!r}: {exc}") from None

        def make() -> EvictionPolicy:
            return cls(**checked)
        policy_name = policy
    else:
        make, policy_name = policy, getattr(policy, "name", "custom")
    pparams = dict(prefetch_params or {})
    try:
        prefetcher = make_prefetcher(prefetch, num_layers=L, num_experts=E, top_k=k, **pparams)
    except KeyError as exc:
        raise UsageError(str(exc.args[0])) from None
    except ParamError as exc:
        raise UsageError(str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise UsageError(f"prefetcher {prefetch!r}: {exc}") from None
    d = prefetcher.distance
    pred_cols = trace.pred_distances
    if prefetcher.needs_predictions and d not in pred_cols:
        raise UsageError(f"prefetcher {prefetch!r} needs recorded predictions at distance {d} "
                         f"(trace {trace.path} has {list(pred_cols) or 'none'}; record with --predict-distance)")
    trace = trace.execution_order()
    fast_ok = (batch_size == 1 and timeline is None and isinstance(policy, str) and not policy_params
               and policy in kernels.POLICY_CODES and prefetch in timing_kernel.PREFETCH_CODES
               and all(s > 0 for s in sizes) and not (trace.phase == PREFILL).any()
               and pparams.get("threshold") is None and cost.engine_profile == "moesim")
    if engine == "numba" and not fast_ok:
        raise UsageError("the compiled timing path needs batch 1 decode, lru/fifo/lfu/opt, a built-in prefetcher "
                         "and no timeline")
    swap = cost.engine_profile == "mixtral-offloading"
    if swap and prefetch != "none":
        raise UsageError("the mixtral-offloading engine profile has no prefetcher (its public engine has none)")
    late = prefetch == "speculative" and speculative_ready == "hidden"
    if fast_ok and engine != "python":
        res = _simulate_fast(trace, policy, sizes, cache_size, cost, prefetch, prefetcher, late)
        res.engine_mode, res.engine_profile = cost.engine_mode, cost.engine_profile
        return res
    steps = build_steps(trace, batch_size, prefill_chunk)
    caches = [ExpertCache(s, make()) if s > 0 else None for s in sizes]
    future = any(c is not None and c.policy.needs_future for c in caches)
    nxt = _next_uses(steps, L) if future else {}
    preds = trace.pred_experts(d).tolist() if prefetcher.needs_predictions else None
    probs = None
    if prefetcher.needs_predictions and f"pred{d}_logits" in trace.table.column_names:
        lg = trace.logits_matrix(f"pred{d}_logits")
        with warnings.catch_warnings(), np.errstate(invalid="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # rows without a prediction are all NaN
            probs = np.exp(lg - np.nanmax(lg, axis=1, keepdims=True))
            probs /= np.nansum(probs, axis=1, keepdims=True)

    xb = cost.expert_bytes(meta.expert_bytes)
    copy_s = cost.copy_seconds(xb)
    # every copy occupies its copy stream for the hop (the waits before it resolving) and the transfer;
    # a demand copy also pays the engine's per-miss issue cost
    copy_hop = cost.copy_hop_seconds()
    ready_hop = cost.ready_hop_seconds()
    prefetch_s = copy_s + copy_hop
    demand_s = copy_s + copy_hop + cost.miss_issue_s
    handoff_s = cost.handoff_seconds()
    issue_h = cost.host_issue_seconds()      # gate mode: host time per issued copy, on the critical path
    predict_s = cost.predict_s if late else 0.0
    if swap:   # mixtral-offloading: reads every layer's routing back; swaps on compute (its own timing)
        demand_s, prefetch_s, handoff_s, ready_hop = copy_s, copy_s, cost.sync_seconds(), 0.0
    env = SimEnv(cost.copy_engines, timeline is not None)
    inflight: dict[tuple[int, int], float] = {}      # (layer, expert) -> copy end
    pending: dict[tuple[int, int], bool] = {}        # prefetched for that layer, not used yet
    hits = requests = landed = prefetches = used = rec_hits = rec_needed = copies = sets = slots = 0
    stall = compute = 0.0
    host_busy = 0.0     # gate mode: the host issues late speculative copies until then
    per_token = np.zeros(len(steps))

    def issue(ready_at: float, host_at: float, layer: int, e: int, dur: float, what: str, i: int) -> tuple[float, float]:
        """One copy. With a host issue cost (gate mode) the host spends ``issue_h`` first: on compute when
        it sits between the hand-off and the experts (``host_at`` < 0: the GPU idles meanwhile), else on
        the host's own clock ``host_at`` (late speculative copies, issued while compute runs on).
        Returns (copy end, host clock after the issue)."""
        if issue_h > 0:
            if host_at < 0:
                _, ready_at = env.run("compute", ready_at, issue_h, f"issue L{layer} E{e}", {"step": i})
            else:
                host_at = max(host_at, ready_at) + issue_h
                ready_at = host_at
        _, end = env.copy(ready_at, dur, f"{what} L{layer} E{e}", {"step": i, "demand": what == "load"})
        return end, host_at
    for i, step in enumerate(steps):
        t0 = env.free["compute"]
        _, _ = env.run("compute", 0.0, cost.token_seconds(step.tokens), "token", {"step": i})
        compute += cost.token_seconds(step.tokens)

        for layer, S in step.layers.items():
            now = i  # policies' clock: the step (token) ordinal
            dur = cost.layer_seconds(step.context, step.tokens)
            _, gate = env.run("compute", 0.0, dur, f"attn L{layer}", {"step": i})
            compute += dur
            if handoff_s > 0 or host_busy > gate:   # gate-driven engine: the CPU reads the routing back
                # before issuing more (and only once it has issued the previous layer's late prefetches)
                _, gate = env.run("compute", host_busy, handoff_s, f"routing handoff L{layer}", {"step": i})
            cache = caches[layer]
            sets += 1
            requests += len(S)
            ready: dict[int, float] = {}
            if cache is None:
                for e in S:
                    ready[e], _ = issue(gate, -1.0, layer, e, demand_s, "load", i)
                    copies += 1
            else:
                slots += cache.capacity
                nu = nxt.get((i, layer))
                w = step.weights[layer]
                resident_before: list[int] = []
                missing: list[int] = []
                size_before = len(cache.resident)
                # a batch or prefill step may want more experts than there are slots: they stream
                # through the cache in chunks of `capacity`, each requested atomically
                for chunk in union_chunks(S, cache.capacity):
                    resident_before += [e for e in chunk if e in cache]
                    missing += cache.request(chunk, now, [w[e] for e in chunk], [nu[e] for e in chunk] if nu else None)
                hits += len(S) - len(missing)
                for e in resident_before:
                    end = inflight.get((layer, e), 0.0)
                    ready[e] = end
                    if end <= gate:
                        landed += 1
                    if pending.pop((layer, e), False):
                        used += 1
                        if layer >= d:
                            rec_hits += 1
                if layer >= d:
                    rec_needed += len(S)
                # mixtral-offloading swaps on the compute stream: the expert in (host->device), then the
                # evicted one back to the host (device->host), nothing overlapping
                evictions = len(missing) - (len(cache.resident) - size_before)
                for n_miss, e in enumerate(missing):
                    pending.pop((layer, e), None)
                    if swap:
                        dur = copy_s + (copy_s if n_miss >= len(missing) - evictions else 0.0)
                        _, ready[e] = env.run("compute", gate, dur, f"swap L{layer} E{e}", {"step": i})
                        stall += dur
                    else:
                        ready[e], _ = issue(gate, -1.0, layer, e, demand_s, "load", i)
                    inflight[(layer, e)] = ready[e]
                    copies += 1
            # a late (hidden-state) speculative prefetch needs this layer's output: after its experts
            for part in (("experts", "prefetch") if late else ("prefetch", "experts")):
                if part == "prefetch":
                    # prefetch for layer + d: issued after this layer's gate, behind the demand copies; a
                    # speculative one with speculative_ready "hidden" only once its prediction exists (after
                    # this layer's experts and the predict piece), behind them
                    target = layer + d
                    if late and target < L:
                        if predict_s > 0:
                            env.run("compute", 0.0, predict_s, f"predict L{layer}", {"step": i})
                            compute += predict_s
                        # the host waits for the prediction and reads it back (a hand-off like the
                        # routing's, gate mode only) before it issues the copies, while compute runs on
                        t_issue = env.free["compute"]
                        host_at = t_issue + handoff_s
                    else:
                        t_issue, host_at = gate, -1.0
                    if prefetch != "none" and target < L and caches[target] is not None:
                        tcache = caches[target]
                        row_t = step.rows.get(target)
                        ctx = PrefetchContext(
                            current=S,
                            predicted=(lambda t, r=row_t: preds[r] if (preds is not None and r is not None) else []),
                            predicted_probs=(lambda t, r=row_t: probs[r] if (probs is not None and r is not None) else None),
                            actual=(lambda t, st=step: st.layers.get(t, [])) if prefetcher.needs_future else None,
                        )
                        picks = [e for e in prefetcher.predict(layer, target, ctx) if 0 <= e < E][: prefetcher.budget]
                        protect = {e for (lt, e), end in inflight.items() if lt == target and end > t_issue}
                        protect |= {e for (lt, e) in pending if lt == target}
                        for e in picks:
                            if e in tcache:
                                continue
                            evicted = tcache.admit(e, now, protect=protect | set(picks))
                            if evicted is False:
                                break
                            if evicted is not None:
                                if pending.pop((target, evicted), False):
                                    pass  # an unused prefetch evicted: wasted
                                inflight.pop((target, evicted), None)
                            end, host_at = issue(t_issue, host_at, target, e, prefetch_s, "prefetch", i)
                            inflight[(target, e)] = end
                            pending[(target, e)] = True
                            prefetches += 1
                            copies += 1
                    if late and target < L:
                        host_busy = host_at
                    continue
                # expert compute: in order of readiness (router order breaks ties)
                counts = step.counts[layer]
                for e in sorted(S, key=lambda x: (ready.get(x, 0.0), S.index(x))):
                    before = env.free["compute"]
                    es = cost.expert_seconds(counts[e])
                    rd = ready.get(e, 0.0)
                    if rd > before:   # compute waits for the copy: it resumes a hop after the landing
                        rd += ready_hop
                    env.run("compute", rd, es, f"expert L{layer} E{e}", {"step": i, "tokens": counts[e]})
                    stall += max(0.0, rd - before)
                    compute += es
                    if swap:   # it reads each expert's token indices back (two .tolist() calls): two syncs
                        for _ in range(2):
                            env.run("compute", 0.0, handoff_s, f"sync L{layer} E{e}", {"step": i})
            prefetcher.observe(layer, S)
        per_token[i] = (env.free["compute"] - t0) * 1e3 / max(step.tokens, 1)
    total = env.free["compute"]
    if timeline is not None:
        doc = env.timeline()
        # what was simulated, for the plot's title (Chrome/Perfetto keep "otherData" as run metadata)
        doc["otherData"] = {"policy": policy_name, "cache_size": int(cache_size) if isinstance(cache_size, int | np.integer)
                            else None, "prefetch": prefetch, "hardware": cost.name, "expert_bytes": int(xb),
                            "batch_size": batch_size, "model": meta.model,
                            "trace": os.path.basename(str(trace.path)) if trace.path else None}
        with atomic_open(timeline) as fh:
            json.dump(doc, fh)
    tokens = sum(s.tokens for s in steps)
    size_out: int | list[int] = int(cache_size) if isinstance(cache_size, int | np.integer) else sizes
    return TimingResult(policy_name, size_out, prefetch, cost.name, tokens, requests, hits, total, stall, copies,
                        prefetches, used, rec_hits, rec_needed, landed, sets, slots, xb, per_token, compute,
                        copies * copy_s, cost.engine_mode, cost.engine_profile,
                        np.array([s.tokens for s in steps], np.int64), np.array([s.phase == PREFILL for s in steps], bool))


def _simulate_fast(trace: Trace, policy: str, sizes: list[int], cache_size, cost: CostModel, prefetch: str,
                   prefetcher, late: bool) -> TimingResult:
    meta = trace.meta
    L, E = meta.num_layers, meta.num_experts
    layer = trace.layer.astype(np.int64)
    keys = trace.experts.astype(np.int64)
    pair = np.stack([trace.seq, trace.token], 1)
    step = np.cumsum(np.r_[False, (pair[1:] != pair[:-1]).any(1)]).astype(np.int64)
    n_steps = int(step[-1]) + 1 if len(step) else 0
    row_at = np.full((n_steps, L), -1, np.int64)
    row_at[step, layer] = np.arange(len(step))
    nxt = kernels.next_use_kernel(layer, keys, E, L) if policy == "opt" else np.zeros((1, 1), np.int64)
    pred = (trace.pred_experts(prefetcher.distance).astype(np.int64) if prefetch == "speculative"
            else np.zeros((1, 1), np.int64))
    context = trace.token.astype(np.int64)
    uniq, inv = np.unique(context, return_inverse=True)
    layer_s = np.array([cost.layer_seconds(int(c), 1) for c in uniq])[inv.reshape(-1)]
    xb = cost.expert_bytes(meta.expert_bytes)
    copy_s = cost.copy_seconds(xb)
    total, stall, compute, stats, per_token = timing_kernel.des_kernel(
        kernels.POLICY_CODES[policy], timing_kernel.PREFETCH_CODES[prefetch], prefetcher.distance,
        prefetcher.budget, step, layer, keys, nxt, row_at, pred, np.asarray(sizes, np.int64), E,
        cost.token_seconds(1), layer_s, copy_s + cost.copy_hop_seconds(), cost.expert_seconds(1), cost.copy_engines,
        copy_s + cost.copy_hop_seconds() + cost.miss_issue_s, cost.handoff_seconds(), late,
        cost.predict_s if late else 0.0, cost.host_issue_seconds(), cost.ready_hop_seconds())
    hits, landed, prefetches, used, rec_hits, rec_needed, copies = (int(x) for x in stats)
    size_out = int(cache_size) if isinstance(cache_size, int | np.integer) else list(sizes)
    slots = int(np.asarray(sizes)[layer].sum())
    return TimingResult(policy, size_out, prefetch, cost.name, n_steps, int(keys.size), hits, float(total),
                        float(stall), copies, prefetches, used, rec_hits, rec_needed, landed, len(layer), slots, xb,
                        per_token, float(compute), copies * copy_s)
