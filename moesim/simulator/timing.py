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
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moesim.errors import SettingError, UsageError
from moesim.policies.base import NEVER, EvictionPolicy, ExpertCache
from moesim.policies.execution import EXECUTORS, ExecutionPolicy, Miss, parse_execution
from moesim.policies.prefetch import PrefetchContext
from moesim.policies.resolve import eviction_factory
from moesim.policies.resolve import policy_name as resolved_name
from moesim.policies.resolve import prefetcher as make_prefetcher
from moesim.simulator import kernels, timing_kernel
from moesim.simulator.cost_model import CostModel
from moesim.simulator.disk_tier import HostTier, HostTierSpec
from moesim.simulator.replay import resolve_sizes
from moesim.simulator.results import HitCounts
from moesim.simulator.timeline_file import write_timeline as write_timeline_file
from moesim.traces.format import PREFILL, Trace, TraceMeta
from moesim.traces.models import MIXTRAL_8X7B, MOE_FAMILIES, known_model
from moesim.traces.predictions import missing_predictions
from moesim.traces.steps import Step as Step  # re-exported: the shared step definition
from moesim.traces.steps import build_steps, union_chunks
from moesim.traces.steps import next_uses as _next_uses

PRIORITY = {"copy": 0, "compute": 1}
SPECULATIVE_READY = ("hidden", "gate")


class SimEnv:
    """Streams and the event log of one simulation run (no globals)."""

    def __init__(self, copy_engines: int, record: bool) -> None:
        # "cpu": the host's expert workers (hybrid execution), one expert at a time on all their threads
        self.free = {"compute": 0.0, "cpu": 0.0, **{f"copy{i}": 0.0 for i in range(copy_engines)}}
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
        return self.run(self.next_copy_stream(), ready, duration, name, args)

    def next_copy_stream(self) -> str:
        """The copy stream the next copy goes to: the one free first (the lowest-numbered on a tie)."""
        return min(self.copy_streams, key=lambda s: (self.free[s], s))

    def copy_start(self, ready: float) -> float:
        """When a copy ready at ``ready`` would start (:meth:`copy` would put it there)."""
        return max(self.free[self.next_copy_stream()], ready)

    def scratch(self) -> SimEnv:
        """A copy of the streams' clocks that records nothing (to price a plan without running it)."""
        env = SimEnv(len(self.copy_streams), False)
        env.free = dict(self.free)
        return env

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
    executed: dict[str, int] | None = None   # requests by executor (EXECUTORS); None: not asked for
    h2d_bytes: int | None = None             # bytes copied host to device; None: (misses + prefetches) x expert
    cpu_busy_s: float = 0.0
    tiers: dict[str, Any] | None = None      # host RAM and disk accounting (disk_tier); None: two tiers

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
            "bytes_h2d": ((self.misses + self.prefetches) * self.expert_bytes if self.h2d_bytes is None
                          else self.h2d_bytes), "expert_bytes": self.expert_bytes,
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
        if self.executed is not None:
            out["executed"] = dict(self.executed)
            out["cpu_busy_ms"] = r(self.cpu_busy_s * 1e3, 3)
        if self.tiers is not None:
            out.update(self.tiers)
        return out


def _another_model(meta: TraceMeta) -> str | None:
    """The model a trace is known to be of when that is not Mixtral-8x7B (None: a Mixtral-family trace
    -- real, synthetic, or a small stand-in priced at Mixtral's size on purpose -- or a test trace
    that names no real family)."""
    geo = known_model(meta.model)
    if geo is not None and geo != MIXTRAL_8X7B:
        return geo.model
    if meta.family == "unknown" or (meta.family != "mixtral" and meta.family in MOE_FAMILIES):
        return meta.model
    return None


def expert_bytes_of(cost: CostModel, trace: Trace) -> int:
    """Bytes one expert copy moves: --expert-bytes > the trace's own > the cost model's table, which
    prices Mixtral-8x7B experts and is refused for a trace of another model (never borrowed silently)."""
    meta = trace.meta
    if cost.expert_bytes_override is None and not meta.expert_bytes:
        other = _another_model(meta)
        if other is not None:
            raise SettingError("expert_bytes", f"{trace.path}: the expert size of {other} is not known (the "
                               "hardware tables price Mixtral-8x7B experts): give it in bytes")
    return cost.expert_bytes(meta.expert_bytes)


def simulate_timing(trace: Trace, policy: str | Callable[[], EvictionPolicy], cache_size: int | Sequence[int],
                    cost: CostModel, *, prefetch: str = "none", prefetch_params: dict[str, Any] | None = None,
                    policy_params: dict[str, Any] | None = None, batch_size: int = 1, prefill_chunk: int = 512,
                    timeline: str | os.PathLike | None = None, engine: str = "auto",
                    speculative_ready: str = "hidden",
                    execution: str | ExecutionPolicy | None = None,
                    host_tier: HostTierSpec | None = None) -> TimingResult:
    """Simulate decoding ``trace``; ``engine`` "auto" takes the compiled path when it applies
    (batch-1 decode, lru/fifo/lfu/opt, built-in prefetcher, no timeline), "python" forces the
    general event path, "numba" insists on the compiled one.

    ``speculative_ready`` (prefetcher ``speculative`` only): "hidden" (default, what a live decoder can
    do) -- the prediction for layer l+d is layer l+d's router applied to layer l's output, so its
    copies are issued only after layer l's experts and the predict piece (``cost.predict_s``, on
    compute); "gate" -- recorded predictions issued right after layer l's gate, as the replay engine
    does with a trace's ``pred{d}_experts``.

    ``execution`` (docs/timing.md, "Hybrid execution"): who serves each miss -- a spelling of
    :func:`~moesim.policies.execution.parse_execution` or a policy object; None and "copy" copy every
    miss, as before. Given at all, the result counts the requests by executor (``executed``); any
    policy but copy runs the event path.

    ``host_tier`` (docs/timing.md, "Host RAM and disk"): a host-RAM budget and the disk below it; None:
    every expert is in host RAM, as before. Given, the event path runs and the result has the tier keys."""
    if speculative_ready not in SPECULATIVE_READY:
        raise UsageError(f"unknown speculative ready point {speculative_ready!r} (known: {', '.join(SPECULATIVE_READY)})")
    meta = trace.meta
    cost = cost.for_trace_format(meta.extra, trace.path)
    L, E, k = meta.num_layers, meta.num_experts, meta.top_k
    sizes = resolve_sizes(trace, cache_size, "layer").tolist()   # the replay's checks: one home
    if isinstance(cache_size, int | np.integer):
        cache_size = sizes[0]   # past the experts per layer: replayed (and reported) as that many
    make, policy_name = eviction_factory(policy, policy_params), resolved_name(policy)
    pparams = dict(prefetch_params or {})
    prefetcher = make_prefetcher(prefetch, num_layers=L, num_experts=E, top_k=k, params=pparams)
    d = prefetcher.distance
    pred_cols = trace.pred_distances
    if prefetcher.needs_predictions and d not in pred_cols:
        raise SettingError("prefetch", missing_predictions(trace.path, pred_cols, d, prefetch))
    trace = trace.execution_order()
    exe = parse_execution(execution)
    not_compiled = "a host-RAM budget (the disk tier runs in the event path)" if host_tier is not None else \
        timing_kernel.why_not_compiled(policy, policy_params, prefetch, pparams, exe.name, batch_size,
                                       timeline is not None, sizes, bool((trace.phase == PREFILL).any()),
                                       cost.engine_profile)
    fast_ok = not_compiled is None
    if engine == "numba" and not_compiled is not None:
        raise UsageError(f"the compiled timing path cannot run this: {not_compiled}")
    swap = cost.engine_profile == "mixtral-offloading"
    if swap and prefetch != "none":
        raise UsageError("the mixtral-offloading engine profile has no prefetcher (its public engine has none)")
    if swap and exe.name != "copy":
        raise SettingError("execution", "the mixtral-offloading engine profile only copies (its public engine "
                                        "has no CPU experts)", fix="copy")
    if host_tier is not None and (swap or exe.name != "copy"):
        raise SettingError("execution" if exe.name != "copy" else "host_ram", "the disk tier is simulated for "
                           "copy execution with the moesim engine profile", fix="copy" if exe.name != "copy" else None)
    late = prefetch == "speculative" and speculative_ready == "hidden"
    if fast_ok and engine != "python":
        res = _simulate_fast(trace, policy, sizes, cache_size, cost, prefetch, prefetcher, late)
        res.engine_mode, res.engine_profile = cost.engine_mode, cost.engine_profile
        if execution is not None:
            res.executed = dict.fromkeys(EXECUTORS, 0) | {"gpu_hit": res.hits, "copy": res.misses}
        return res
    res = _EventRun(trace, sizes, make, cost, prefetch, prefetcher, late, swap, batch_size, prefill_chunk,
                    timeline is not None, exe, host_tier).run(policy_name, cache_size, timeline)
    if execution is None:
        res.executed = None
    return res


class _EventRun:
    """The general event path of :func:`simulate_timing`: one run's caches, streams, copies in flight
    and counters, stepped token by token (or batch / prefill step) and layer by layer."""

    def __init__(self, trace: Trace, sizes: list[int], make: Callable[[], EvictionPolicy], cost: CostModel,
                 prefetch: str, prefetcher, late: bool, swap: bool, batch_size: int, prefill_chunk: int,
                 record: bool, exe: ExecutionPolicy | None = None, host_tier: HostTierSpec | None = None) -> None:
        meta = trace.meta
        self.trace, self.cost, self.prefetch, self.prefetcher, self.late, self.swap = (
            trace, cost, prefetch, prefetcher, late, swap)
        self.batch_size, self.sizes = batch_size, sizes
        self.L, self.E, self.d = meta.num_layers, meta.num_experts, prefetcher.distance
        self.steps = build_steps(trace, batch_size, prefill_chunk)
        self.exe = exe = exe or ExecutionPolicy()
        self.pinned = _pinned_sets(exe, sizes, self.E)
        # a CPU layer has no GPU slots; pinned experts take theirs out of the layer's cache
        self.caches = [ExpertCache(s - len(p), make()) if s > len(p) and not exe.cpu_layer(layer) else None
                       for layer, (s, p) in enumerate(zip(sizes, self.pinned, strict=True))]
        future = any(c is not None and c.policy.needs_future for c in self.caches)
        self.nxt = _next_uses(self.steps, self.L, NEVER) if future else {}
        self.preds, self.probs = _predictions(trace, prefetcher)
        self.xb = expert_bytes_of(cost, trace)
        self.copy_s = copy_s = cost.copy_seconds(self.xb)
        # every copy occupies its copy stream for the hop (the waits before it resolving) and the transfer;
        # a demand copy also pays the engine's per-miss issue cost
        copy_hop = cost.copy_hop_seconds()
        self.ready_hop = cost.ready_hop_seconds()
        self.prefetch_s = copy_s + copy_hop
        self.demand_s = copy_s + copy_hop + cost.miss_issue_s
        self.handoff_s = cost.handoff_seconds()
        self.issue_h = cost.host_issue_seconds()      # gate mode: host time per issued copy, on the critical path
        self.predict_s = cost.predict_s if late else 0.0
        if swap:   # mixtral-offloading: reads every layer's routing back; swaps on compute (its own timing)
            self.demand_s, self.prefetch_s, self.handoff_s, self.ready_hop = copy_s, copy_s, cost.sync_seconds(), 0.0
        self.env = SimEnv(cost.copy_engines, record)
        self.host = None if host_tier is None else HostTier(host_tier, self.L, self.E, meta.top_k, self.xb)
        if self.host is not None:
            self.env.free["disk"] = 0.0
        self.inflight: dict[tuple[int, int], float] = {}      # (layer, expert) -> copy end
        # experts whose slot holds HOBBIT's low-bit substitute: later hits compute in that format too, as the
        # engine's slot does, until a full copy replaces it
        self.substitutes: set[tuple[int, int]] = set()
        self.pending: dict[tuple[int, int], bool] = {}        # prefetched for that layer, not used yet
        self.hits = self.requests = self.landed = self.prefetches = self.used = 0
        self.rec_hits = self.rec_needed = self.copies = self.sets = self.slots = 0
        self.stall = self.compute = 0.0
        self.host_busy = 0.0     # gate mode: the host issues late speculative copies until then
        self.executed = dict.fromkeys(EXECUTORS, 0)
        self.h2d = 0             # bytes copied host to device (full-size and low-bit experts)
        self.copy_busy = self.cpu_busy = 0.0
        self.pricing = False     # inside estimate(): the streams are a scratch copy, the counters stay
        # CPU work a copy may overlap (docs/timing.md, "Hybrid execution"): the CPU experts placed so far that
        # end after the current gate, and the current layer's CPU experts as they will run alone, known before
        # its copies are placed (their start does not depend on the copies)
        self.cpu_spans: list[tuple[float, float]] = []
        self.cpu_window: tuple[float, float] | None = None
        self.copy_cpu_factor = cost.copy_beside_cpu_factor()

    def issue(self, ready_at: float, host_at: float, layer: int, e: int, dur: float, what: str,
              i: int, transfer: float = 0.0) -> tuple[float, float]:
        """One copy. With a host issue cost (gate mode) the host spends ``issue_h`` first: on compute when
        it sits between the hand-off and the experts (``host_at`` < 0: the GPU idles meanwhile), else on
        the host's own clock ``host_at`` (late speculative copies, issued while compute runs on).
        ``transfer`` (part of ``dur``) runs ``copies_beside_cpu`` times longer when the copy would overlap
        CPU work (:meth:`beside_cpu`). Returns (copy end, host clock after the issue)."""
        env = self.env
        if self.issue_h > 0:
            if host_at < 0:
                _, ready_at = env.run("compute", ready_at, self.issue_h, f"issue L{layer} E{e}", {"step": i})
            else:
                host_at = max(host_at, ready_at) + self.issue_h
                ready_at = host_at
        if transfer and self.copy_cpu_factor != 1.0 and self.beside_cpu(env.copy_start(ready_at), dur):
            dur += transfer * (self.copy_cpu_factor - 1.0)
        _, end = env.copy(ready_at, dur, f"{what} L{layer} E{e}", {"step": i, "demand": what == "load"})
        return end, host_at

    def beside_cpu(self, start: float, dur: float) -> bool:
        """Whether a copy from ``start`` for ``dur`` (unslowed) overlaps CPU work: an expert placed on the CPU,
        or the current layer's CPU experts as they will run alone (they start a hop after the gate)."""
        spans = self.cpu_spans if self.cpu_window is None else [*self.cpu_spans, self.cpu_window]
        return any(s < start + dur and start < e for s, e in spans)

    def cpu_alone_window(self, step: Step, layer: int, experts: list[int], gate: float) -> tuple[float, float] | None:
        """The layer's CPU experts' span as :meth:`run_cpu` will place them with no copy beside them (None
        without any): their start depends only on the CPU stream and the gate, never on the copies."""
        if not experts:
            return None
        free, cost = self.env.free["cpu"], self.cost
        start = max(free, gate + cost.hop_seconds(step.tokens))
        counts = step.counts[layer]
        return start, start + cost.cpu_after_idle_seconds(start - free) + sum(
            cost.cpu_expert_seconds(counts[e]) for e in experts)

    def run(self, policy_name: str, cache_size, timeline: str | os.PathLike | None) -> TimingResult:
        env, cost = self.env, self.cost
        per_token = np.zeros(len(self.steps))
        for i, step in enumerate(self.steps):
            t0 = env.free["compute"]
            env.run("compute", 0.0, cost.token_seconds(step.tokens), "token", {"step": i})
            self.compute += cost.token_seconds(step.tokens)
            for layer, S in step.layers.items():
                self.layer(i, step, layer, S)
            per_token[i] = (env.free["compute"] - t0) * 1e3 / max(step.tokens, 1)
        if timeline is not None:
            self.write_timeline(timeline, policy_name, cache_size)
        steps = self.steps
        size_out: int | list[int] = int(cache_size) if isinstance(cache_size, int | np.integer) else self.sizes
        return TimingResult(policy_name, size_out, self.prefetch, cost.name, sum(s.tokens for s in steps),
                            self.requests, self.hits, env.free["compute"], self.stall, self.copies, self.prefetches,
                            self.used, self.rec_hits, self.rec_needed, self.landed, self.sets, self.slots, self.xb,
                            per_token, self.compute, self.copy_busy, cost.engine_mode,
                            cost.engine_profile, np.array([s.tokens for s in steps], np.int64),
                            np.array([s.phase == PREFILL for s in steps], bool), dict(self.executed), self.h2d,
                            self.cpu_busy, None if self.host is None else self.host.summary(self.hits, self.h2d))

    def layer(self, i: int, step: Step, layer: int, S: list[int]) -> None:
        """One layer of step ``i``: attention and gate, the demand copies, the prefetches for layer
        ``layer + d`` and the experts (a late speculative prefetch after the experts: it needs their output)."""
        env, cost = self.env, self.cost
        dur = cost.layer_seconds(step.context, step.tokens)
        _, gate = env.run("compute", 0.0, dur, f"attn L{layer}", {"step": i})
        self.compute += dur
        if self.handoff_s > 0 or self.host_busy > gate:   # gate-driven engine: the CPU reads the routing back
            # before issuing more (and only once it has issued the previous layer's late prefetches)
            _, gate = env.run("compute", self.host_busy, self.handoff_s, f"routing handoff L{layer}", {"step": i})
        self.sets += 1
        self.requests += len(S)
        self.cpu_spans = [(s, e) for s, e in self.cpu_spans if e > gate]   # every copy from here starts later
        ready, plan = self.demand(i, step, layer, S, gate)
        on_cpu = [e for e in S if plan.get(e) == "cpu"]
        back = self.run_cpu(i, step, layer, on_cpu, gate) if on_cpu else None
        self.cpu_window = None   # placed now: in cpu_spans
        for part in (("experts", "prefetch") if self.late else ("prefetch", "experts")):
            if part == "prefetch":
                self.prefetch_for(i, step, layer, S, gate)
            else:
                stall, compute = self.experts(i, step, layer, [e for e in S if e not in on_cpu], ready, plan)
                stall += self.merge(i, layer, back)
                self.stall, self.compute = self.stall + stall, self.compute + compute
        self.prefetcher.observe(layer, S)

    def demand(self, i: int, step: Step, layer: int, S: list[int], gate: float) -> tuple[dict[int, float], dict[int, str]]:
        """The gate's set S: pinned experts served as they are, the execution policy's choice for the rest
        (all of them on the CPU in a CPU layer), the ones kept on the GPU through the layer's cache; each
        miss copied (or swapped, or its low-bit substitute copied) after the gate. Returns each GPU
        expert's ready time and the executor of each expert the policy did not leave to copy."""
        if self.exe.cpu_layer(layer):
            self.executed["cpu"] += len(S)
            return {}, dict.fromkeys(S, "cpu")
        cache, pinned = self.caches[layer], self.pinned[layer]
        ready = {e: 0.0 for e in S if e in pinned}
        wanted = [e for e in S if e not in pinned]
        plan = self.plan(i, step, layer, wanted, gate) if self.exe.name != "copy" else {}
        to_gpu = [e for e in wanted if plan.get(e) != "cpu"]
        self.cpu_window = self.cpu_alone_window(step, layer, [e for e in wanted if e not in to_gpu], gate)
        self.executed["pinned"] += len(ready)
        self.executed["cpu"] += len(wanted) - len(to_gpu)
        if cache is None:
            missing, evictions = to_gpu, 0
        else:
            missing, evictions = self.request(i, step, layer, to_gpu, gate, ready)
        self.hits += len(to_gpu) - len(missing) + len(S) - len(wanted)
        self.executed["gpu_hit"] += len(to_gpu) - len(missing)
        staged = {} if self.host is None else self.host.stage(self.env, i, layer, missing, gate, True)
        if staged:   # copies of experts already in host RAM go first, the others as their reads land
            missing = sorted(missing, key=lambda x: staged[x])
        for n_miss, e in enumerate(missing):
            self.pending.pop((layer, e), None)
            kind = plan.get(e, "copy")
            copy_s = self.copy_s if kind == "copy" else self.lowbit_copy_s()
            if self.swap and cache is not None:
                # mixtral-offloading swaps on the compute stream: the expert in (host->device), then the
                # evicted one back to the host (device->host), nothing overlapping
                dur = copy_s + (copy_s if n_miss >= len(missing) - evictions else 0.0)
                _, ready[e] = self.env.run("compute", gate, dur, f"swap L{layer} E{e}", {"step": i})
                self.stall += dur
            else:
                dur = self.demand_s - self.copy_s + copy_s
                ready[e], _ = self.issue(staged.get(e, gate), -1.0, layer, e, dur, "load" if kind == "copy" else "lowbit",
                                         i, copy_s)
            self.inflight[(layer, e)] = ready[e]
            (self.substitutes.add if kind == "lowbit" else self.substitutes.discard)((layer, e))
            self.copies += 1
            self.copy_busy += copy_s
            self.h2d += self.xb if kind == "copy" else self.cost.lowbit_bytes(self.xb)
            self.executed[kind] += 1
        return ready, plan

    def request(self, i: int, step: Step, layer: int, S: list[int], gate: float,
                ready: dict[int, float]) -> tuple[list[int], int]:
        """S through the layer's cache (its hits' ready times into ``ready``); returns the misses (router
        order) and how many of them evicted an expert."""
        cache = self.caches[layer]
        self.slots += cache.capacity
        nu = self.nxt.get((i, layer))
        w = step.weights[layer]
        resident_before: list[int] = []
        missing: list[int] = []
        size_before = len(cache.resident)
        # a batch or prefill step may want more experts than there are slots: they stream through the
        # cache in chunks of `capacity`, each requested atomically
        for chunk in union_chunks(S, cache.capacity):
            resident_before += [e for e in chunk if e in cache]
            missing += cache.request(chunk, i, [w[e] for e in chunk], [nu[e] for e in chunk] if nu else None)
        for e in resident_before:
            end = self.inflight.get((layer, e), 0.0)
            ready[e] = end
            if end <= gate:
                self.landed += 1
            if self.pending.pop((layer, e), False):
                self.used += 1
                if layer >= self.d:
                    self.rec_hits += 1
        if layer >= self.d:
            self.rec_needed += len(S)
        return missing, len(missing) - (len(cache.resident) - size_before)

    def prefetch_for(self, i: int, step: Step, layer: int, S: list[int], gate: float) -> None:
        """Prefetch for layer + d: issued after this layer's gate, behind the demand copies; a speculative
        one with speculative_ready "hidden" only once its prediction exists (after this layer's experts
        and the predict piece), behind them."""
        env, target, late = self.env, layer + self.d, self.late
        if late and target < self.L:
            if self.predict_s > 0:
                env.run("compute", 0.0, self.predict_s, f"predict L{layer}", {"step": i})
                self.compute += self.predict_s
            # the host waits for the prediction and reads it back (a hand-off like the routing's, gate
            # mode only) before it issues the copies, while compute runs on
            t_issue = env.free["compute"]
            host_at = t_issue + self.handoff_s
        else:
            t_issue, host_at = gate, -1.0
        if self.prefetch != "none" and target < self.L and self.caches[target] is not None:
            host_at = self.admit_prefetches(i, step, layer, target, S, t_issue, host_at)
        if late and target < self.L:
            self.host_busy = host_at

    def admit_prefetches(self, i: int, step: Step, layer: int, target: int, S: list[int], t_issue: float,
                         host_at: float) -> float:
        """The prefetcher's picks for ``target`` admitted (evicting by the policy, never an expert in flight
        or wanted now) and copied; returns the host clock after issuing them."""
        tcache = self.caches[target]
        preds, probs, prefetcher = self.preds, self.probs, self.prefetcher
        row_t = step.rows.get(target)
        ctx = PrefetchContext(
            current=S,
            predicted=(lambda t, r=row_t: preds[r] if (preds is not None and r is not None) else []),
            predicted_probs=(lambda t, r=row_t: probs[r] if (probs is not None and r is not None) else None),
            actual=(lambda t, st=step: st.layers.get(t, [])) if prefetcher.needs_future else None,
        )
        picks = [e for e in prefetcher.predict(layer, target, ctx)
                 if 0 <= e < self.E and e not in self.pinned[target]][: prefetcher.budget]
        protect = {e for (lt, e), end in self.inflight.items() if lt == target and end > t_issue}
        protect |= {e for (lt, e) in self.pending if lt == target}
        for e in picks:
            if e in tcache:
                continue
            evicted = tcache.admit(e, i, protect=protect | set(picks))
            if evicted is False:
                break
            if evicted is not None:
                self.pending.pop((target, evicted), False)   # an unused prefetch evicted: wasted
                self.inflight.pop((target, evicted), None)
            at = t_issue if self.host is None else self.host.stage(self.env, i, target, [e], t_issue, False)[e]
            end, host_at = self.issue(at, host_at, target, e, self.prefetch_s, "prefetch", i, self.copy_s)
            self.inflight[(target, e)] = end
            self.substitutes.discard((target, e))   # a prefetch copies the full expert
            self.pending[(target, e)] = True
            self.prefetches += 1
            self.copies += 1
            self.copy_busy += self.copy_s
            self.h2d += self.xb
        return host_at

    def experts(self, i: int, step: Step, layer: int, S: list[int], ready: dict[int, float],
                plan: dict[int, str]) -> tuple[float, float]:
        """Expert compute on the GPU, in order of readiness (router order breaks ties): a resident expert
        overlaps the copies in flight, a missing one stalls compute until its copy lands. Returns the
        stall and the compute time it added."""
        env, cost = self.env, self.cost
        counts = step.counts[layer]
        stall = compute = 0.0
        for e in sorted(S, key=lambda x: (ready.get(x, 0.0), S.index(x))):
            before = env.free["compute"]
            low = plan.get(e) == "lowbit" or (layer, e) in self.substitutes
            es = cost.lowbit_expert_seconds(counts[e]) if low else cost.expert_seconds(counts[e])
            rd = ready.get(e, 0.0)
            if rd > before:   # compute waits for the copy: it resumes a hop after the landing
                rd += self.ready_hop
            env.run("compute", rd, es, f"expert L{layer} E{e}", {"step": i, "tokens": counts[e]})
            stall += max(0.0, rd - before)
            compute += es
            if self.swap:   # it reads each expert's token indices back (two .tolist() calls): two syncs
                for _ in range(2):
                    env.run("compute", 0.0, self.handoff_s, f"sync L{layer} E{e}", {"step": i})
        return stall, compute

    def run_cpu(self, i: int, step: Step, layer: int, experts: list[int], gate: float) -> float:
        """The CPU's experts of this layer: the step's hidden states hop to the host after the gate, the
        experts run one after another on the CPU workers (each on all their threads), their summed
        output hops back. An expert that starts while a host-to-device copy is still running is priced
        beside copies (both read host memory); one that starts after the workers sat idle pays the
        wake-up (``cpu_after_idle_seconds`` of the idle time). Returns when it is on the GPU."""
        env, cost = self.env, self.cost
        hop = cost.hop_seconds(step.tokens)
        counts = step.counts[layer]
        end = gate + hop
        for e in experts:
            free = env.free["cpu"]
            start = max(free, gate + hop)
            copying = any(env.free[s] > start for s in env.copy_streams)
            dur = cost.cpu_expert_seconds(counts[e], beside_copies=copying) + cost.cpu_after_idle_seconds(start - free)
            _, end = env.run("cpu", gate + hop, dur, f"cpu expert L{layer} E{e}", {"step": i, "tokens": counts[e]})
            self.cpu_spans.append((start, end))
            self.cpu_busy += 0.0 if self.pricing else dur
        return end + hop

    def merge(self, i: int, layer: int, back: float | None) -> float:
        """The CPU's output added on the GPU before the layer's combine: compute waits for it. Returns
        the stall."""
        if back is None:
            return 0.0
        before = self.env.free["compute"]
        self.env.run("compute", back, 0.0, f"merge cpu L{layer}", {"step": i})
        return max(0.0, back - before)

    def plan(self, i: int, step: Step, layer: int, wanted: list[int], gate: float) -> dict[int, str]:
        """The execution policy's executor for each of ``wanted`` not in the layer's cache, priced on a
        scratch copy of the streams (:meth:`estimate`)."""
        cache = self.caches[layer]
        counts, w = step.counts[layer], step.weights[layer]
        cand = [e for e in wanted if cache is None or e not in cache]
        if not cand:
            return {}
        hits = {e: self.inflight.get((layer, e), 0.0) for e in wanted if e not in cand}
        hits |= dict.fromkeys(self.pinned[layer] & set(step.layers[layer]), 0.0)
        misses = [Miss(e, counts[e], w[e] / max(counts[e], 1)) for e in cand]
        kinds = self.exe.choose(layer, misses, lambda p: self.estimate(i, step, layer, gate, hits, cand, p))
        if len(kinds) != len(cand) or not set(kinds) <= {"copy", "cpu", "lowbit"}:
            raise SettingError("execution", f"{self.exe.name} chose {list(kinds)} for {len(cand)} misses "
                                            "(one of copy, cpu, lowbit each)")
        return {e: k for e, k in zip(cand, kinds, strict=True) if k != "copy"}

    def estimate(self, i: int, step: Step, layer: int, gate: float, hits: dict[int, float], cand: list[int],
                 kinds) -> tuple[list[float], float]:
        """Price a plan for the layer's misses without running it: the same copies, CPU work, experts and
        merge on a scratch copy of the streams. Returns each planned miss's ready time on the GPU and the
        layer's finish on compute."""
        main, self.env, self.pricing = self.env, self.env.scratch(), True
        spans, window = self.cpu_spans, self.cpu_window
        try:
            ready, plan = dict(hits), {}
            on_cpu = [e for e, kind in zip(cand, kinds, strict=True) if kind == "cpu"]
            self.cpu_spans, self.cpu_window = list(spans), self.cpu_alone_window(step, layer, on_cpu, gate)
            for e, kind in zip(cand, kinds, strict=True):
                if kind in ("copy", "lowbit"):
                    transfer = self.copy_s if kind == "copy" else self.lowbit_copy_s()
                    ready[e], _ = self.issue(gate, -1.0, layer, e, self.demand_s - self.copy_s + transfer, kind, i,
                                             transfer)
                plan[e] = kind
            back = self.run_cpu(i, step, layer, on_cpu, gate) if on_cpu else None
            self.experts(i, step, layer, [e for e in ready], ready, plan)
            self.merge(i, layer, back)
            at = [ready.get(e, back if plan.get(e) == "cpu" else None) for e, k in zip(cand, kinds, strict=True)]
            return [float("nan") if t is None else float(t) for t in at], self.env.free["compute"]
        finally:
            self.env, self.pricing, self.cpu_spans, self.cpu_window = main, False, spans, window

    def lowbit_copy_s(self) -> float:
        """One low-bit substitute's transfer (HOBBIT)."""
        return self.cost.copy_seconds(self.cost.lowbit_bytes(self.xb))

    def write_timeline(self, path: str | os.PathLike, policy_name: str, cache_size) -> None:
        doc = self.env.timeline()
        meta = self.trace.meta
        # what was simulated, for the plot's title (Chrome/Perfetto keep "otherData" as run metadata)
        doc["otherData"] = {"policy": policy_name, "cache_size": int(cache_size) if isinstance(cache_size, int | np.integer)
                            else None, "prefetch": self.prefetch, "hardware": self.cost.name, "expert_bytes": int(self.xb),
                            "batch_size": self.batch_size, "model": meta.model,
                            "trace": os.path.basename(str(self.trace.path)) if self.trace.path else None}
        write_timeline_file(doc, path)


def _pinned_sets(exe: ExecutionPolicy, sizes: list[int], num_experts: int) -> list[frozenset[int]]:
    """Each layer's pinned experts, checked: real experts, no more than the layer's GPU slots."""
    out = []
    beyond = [layer for layer in getattr(exe, "by_layer", {}) if layer >= len(sizes)]
    if beyond:
        raise SettingError("execution", f"{exe.name} pins experts of layer {beyond[0]}; the trace has {len(sizes)}")
    for layer, size in enumerate(sizes):
        pinned = exe.pinned(layer)
        if any(not 0 <= e < num_experts for e in pinned):
            raise SettingError("execution", f"{exe.name} pins an expert outside 0..{num_experts - 1} in layer {layer}")
        if len(pinned) > size:
            raise SettingError("execution", f"{exe.name} pins {len(pinned)} experts in layer {layer}, which has "
                                            f"{size} GPU slots")
        out.append(pinned)
    return out


def _predictions(trace: Trace, prefetcher) -> tuple[list | None, np.ndarray | None]:
    """The recorded predictions at the prefetcher's distance (per row, for a prefetcher that reads them)
    and their softmaxed logits when the trace kept them."""
    if not prefetcher.needs_predictions:
        return None, None
    d = prefetcher.distance
    preds = trace.pred_experts(d).tolist()
    probs = None
    if f"pred{d}_logits" in trace.table.column_names:
        lg = trace.logits_matrix(f"pred{d}_logits")
        with warnings.catch_warnings(), np.errstate(invalid="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # rows without a prediction are all NaN
            probs = np.exp(lg - np.nanmax(lg, axis=1, keepdims=True))
            probs /= np.nansum(probs, axis=1, keepdims=True)
    return preds, probs


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
    xb = expert_bytes_of(cost, trace)
    copy_s = cost.copy_seconds(xb)
    total, stall, compute, stats, per_token = timing_kernel.des_kernel(
        timing_kernel.POLICY_CODES[policy], timing_kernel.PREFETCH_CODES[prefetch], prefetcher.distance,
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
