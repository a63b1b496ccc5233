"""One cell: a trace replayed under one setting (policy, cache, scope, semantics) and, with a cost model,
priced by the timing simulator. ``simulate``, ``sweep``, the plots and the engine validation all run
their cells through :func:`run_cell`, so a cell means the same everywhere and ``simulate --json``'s keys
are a sweep table's columns.

``requests``, ``hits``, ``misses`` and ``hit_rate`` of :meth:`CellResult.to_json` always mean the exact
demand replay (docs/semantics.md). The timing run's own cache counts differ when a prefetcher puts
experts in the cache ahead of demand or when batch / prefill steps request the union of several tokens'
experts; they sit beside the replay's as ``timing_requests``, ``timing_hits``, ``timing_misses``,
``timing_hit_rate``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from moesim.errors import SettingError
from moesim.policies.execution import parse_execution
from moesim.policies.resolve import PolicySpec, needs_predictions
from moesim.simulator import replay as exact
from moesim.simulator.cost_model import CostModel
from moesim.simulator.disk_tier import HostTierSpec
from moesim.simulator.replay import ReplayResult
from moesim.simulator.timing import TimingResult, simulate_timing
from moesim.traces.format import DECODE, PREFILL, Trace
from moesim.traces.predictions import missing_predictions

PHASES = ("all", "prefill", "decode")
CACHE_KEYS = ("requests", "hits", "misses", "hit_rate")
TIMING_PREFIX = "timing_"


@dataclass(frozen=True)
class CellSpec:
    """Everything that decides one cell's result. ``cost`` None: the exact hit-rate replay only;
    otherwise the timing simulator runs too (one cache per layer, atomic sets)."""

    policy: PolicySpec
    cache_size: int | Sequence[int]              # slots per cache, or one budget per layer (0 = no cache)
    params: Mapping[str, Any] | None = None      # the policy's parameters
    scope: str = "layer"                         # "layer": one cache per MoE layer; "global": one shared
    semantics: str = "atomic"                    # "atomic" (token, layer) sets or "sequential" experts
    phase: str = "all"                           # replay only the rows of this phase
    cost: CostModel | None = None                # the timing model (a preset or a calibration)
    prefetch: str = "none"
    prefetch_params: Mapping[str, Any] | None = None   # budget, distance and the prefetcher's own
    batch_size: int = 1
    prefill_chunk: int = 512
    speculative_ready: str = "hidden"
    timeline: str | os.PathLike | None = None    # write the timing run's Chrome/Perfetto trace here
    execution: str | None = None   # who serves each miss (policies.execution); None: copy, no "executed" key
    exact_replay: bool = True    # off where only the timing run's own counts matter (engine validation)
    interval: bool = True        # also price every copy at both ends of the calibration's copy interval
    vs_bound: bool = False       # also the prefetch-aware offline bound on demand misses (simulator.bound)
    host_tier: HostTierSpec | None = None   # a host-RAM budget with a disk below it; None: all in host RAM


@dataclass
class CellResult:
    spec: CellSpec
    replay: ReplayResult | None           # the exact demand replay (None when spec.exact_replay is off)
    timing: TimingResult | None           # the timing run (None without a cost model)
    timing_slow: TimingResult | None = None   # every copy at the slow end of the copy interval
    timing_fast: TimingResult | None = None   # ... and at the fast end
    copy_scales: tuple[float, float] | None = None   # (fast, slow) factors of those two runs
    bound: dict[str, Any] | None = None   # spec.vs_bound: the bound's keys (:func:`bound_keys`)

    def interval(self, metric: Callable[[TimingResult], float] = lambda t: t.tokens_per_s) -> list[float] | None:
        """``metric`` of the slow-copy and of the fast-copy run, rounded as ``sim_interval``; None when
        the cost model has no measured copy interval."""
        if self.timing_slow is None or self.timing_fast is None:
            return None
        return [round(float(metric(self.timing_slow)), 4), round(float(metric(self.timing_fast)), 4)]

    def timing_dict(self) -> dict[str, Any]:
        """The timing run's keys (``TimingResult.to_dict()``), with the speculative ready point and the
        copy interval's keys when they apply."""
        if self.timing is None:
            return {}
        out = self.timing.to_dict()
        if self.spec.prefetch == "speculative":
            out["speculative_ready"] = self.spec.speculative_ready
        if self.timing_slow is not None and self.timing_fast is not None and self.copy_scales is not None:
            fast, slow = self.copy_scales
            out["sim_interval"] = out["tokens_per_s_interval"] = self.interval()
            out["ms_per_token_interval"] = [round(self.timing_fast.ms_per_token, 4),
                                            round(self.timing_slow.ms_per_token, 4)]
            out["copy_interval_scales"] = [round(fast, 5), round(slow, 5)]
        return out

    def to_json(self, per_layer: bool = False) -> dict[str, Any]:
        """The keys of ``simulate --json`` (and a sweep row's outputs): the exact replay's, the policy's
        parameters when it has any, and with a cost model the timing run's beside them -- its cache
        counts renamed ``timing_*``, its echo of policy and cache size dropped, and the prefetch metrics
        dropped when no prefetcher ran (they would read 0.0, not "not applicable"). Without the exact
        replay, the timing run's keys as they are."""
        if self.replay is None:
            return self.timing_dict() | (self.bound or {})
        out = self.replay.to_dict(per_layer=per_layer)
        if self.spec.params:
            out["params"] = dict(self.spec.params)
        if self.timing is None:
            return out | (self.bound or {})
        timing = self.timing_dict()
        for key in ("policy", "cache_size"):
            timing.pop(key, None)
        if timing.get("prefetch", "none") == "none":
            timing.pop("prefetch_precision", None)
            timing.pop("prefetch_recall", None)
        for key in CACHE_KEYS:
            timing[TIMING_PREFIX + key] = timing.pop(key)
        out.update(timing)
        return out | (self.bound or {})


def require_predictions(path: object, have: Sequence[int], prefetchers: Iterable[str], distance: int = 1) -> None:
    """A prefetcher that reads recorded predictions, on a trace without them at ``distance``: one
    :class:`SettingError` naming the file and how to record them, before any work starts."""
    for name in prefetchers:
        if needs_predictions(name) and distance not in have:
            raise SettingError("recorded_predictions", missing_predictions(path, have, distance, name), str(distance))


def check_spec(spec: CellSpec) -> None:
    """What can be refused before reading a row: the timing model's scope and semantics, the phase, the
    execution spec, a setting the bound does not model."""
    if spec.execution is not None:
        parse_execution(spec.execution)
    if spec.vs_bound and (not isinstance(spec.cache_size, int) or (spec.scope, spec.semantics) != ("layer", "atomic")
                          or spec.batch_size != 1):
        raise SettingError("vs_bound", "the bound is for one uniform cache size per layer, atomic sets and batch 1")
    if spec.phase not in PHASES:
        raise SettingError("phase", f"unknown phase {spec.phase!r} (known: {', '.join(PHASES)})")
    if spec.cost is not None and (spec.scope, spec.semantics) != ("layer", "atomic"):
        wrong = "scope" if spec.scope != "layer" else "semantics"
        raise SettingError(wrong, "the timing model simulates one cache per layer with atomic sets",
                           fix="layer" if wrong == "scope" else "atomic")


def bound_keys(trace: Trace, spec: CellSpec, demand_misses: int) -> dict[str, Any]:
    """The offline bound this cell is measured against (docs/bound.md): the fewest demand misses any
    policy plus prefetcher could have with the cell's cache, its prefetcher's lookahead (its distance;
    0 without one) and per-layer prefetch budget, and ``bound_fraction`` = that bound / the cell's own
    demand misses (1.0: the cell meets the bound)."""
    from moesim.simulator.bound import prefetch_bound

    pparams = dict(spec.prefetch_params or {})
    lookahead = 0 if spec.prefetch == "none" else int(pparams.get("distance", 1))
    budget = int(pparams.get("budget", trace.meta.top_k))
    b = prefetch_bound(trace, spec.cache_size, lookahead, budget)
    return {"bound_lookahead": lookahead, "bound_prefetch_budget": budget, "bound_misses": b.misses,
            "bound_exact": b.exact, "bound_fraction": round(b.misses / demand_misses, 6) if demand_misses else 1.0}


def _demand_misses(spec: CellSpec, replay: ReplayResult | None, timing: TimingResult | None) -> int:
    """The cell's own demand misses on the bound's request stream: the replay's, or with a cost model the
    timing run's (prefetched experts are hits there), which must request what the replay does."""
    if timing is None:
        return replay.misses if replay is not None else 0
    if replay is not None and timing.requests != replay.requests:
        raise SettingError("vs_bound", "the bound counts one request per token and layer: the timing run here "
                                       "requests batch or prefill unions (use batch size 1 on decode rows)")
    return timing.misses


def run_cell(trace: Trace, spec: CellSpec) -> CellResult:
    """The exact replay of ``spec`` on ``trace`` and, with a cost model, its timing run (three runs
    when the model has a measured copy interval: the point and both ends, for ``sim_interval``); with
    ``spec.vs_bound`` also the offline bound's keys."""
    result = _run(trace, spec)
    if spec.vs_bound:
        if spec.phase != "all":
            trace = trace.filter_phase(PREFILL if spec.phase == "prefill" else DECODE)
        result.bound = bound_keys(trace, spec, _demand_misses(spec, result.replay, result.timing))
    return result


def _run(trace: Trace, spec: CellSpec) -> CellResult:
    check_spec(spec)
    if spec.phase != "all":
        trace = trace.filter_phase(PREFILL if spec.phase == "prefill" else DECODE)
    pparams = dict(spec.prefetch_params or {})
    if spec.cost is not None:   # before any replay: a missing prediction column is refused at once
        require_predictions(trace.path, trace.pred_distances, [spec.prefetch], int(pparams.get("distance", 1)))
    replay = None
    if spec.exact_replay:
        replay = exact.simulate(trace, spec.policy, spec.cache_size, scope=spec.scope, semantics=spec.semantics,
                                params=dict(spec.params) if spec.params else None)
    if spec.cost is None:
        return CellResult(spec, replay, None)
    cost = spec.cost
    kw: dict[str, Any] = dict(prefetch=spec.prefetch, prefetch_params=pparams or None,
                              policy_params=dict(spec.params) if spec.params else None, batch_size=spec.batch_size,
                              prefill_chunk=spec.prefill_chunk, speculative_ready=spec.speculative_ready,
                              execution=spec.execution, host_tier=spec.host_tier)
    timing = simulate_timing(trace, spec.policy, spec.cache_size, cost, timeline=spec.timeline, **kw)
    fast, slow = cost.copy_interval_scales()
    if not spec.interval or (fast, slow) == (1.0, 1.0):
        return CellResult(spec, replay, timing)
    # the calibration's measured copy spread (p10..p90 over its sessions): the same run with every copy
    # at the slow and at the fast end
    at_slow = simulate_timing(trace, spec.policy, spec.cache_size,
                              cost.with_overrides(copy_scale=cost.copy_scale * slow), **kw)
    at_fast = simulate_timing(trace, spec.policy, spec.cache_size,
                              cost.with_overrides(copy_scale=cost.copy_scale * fast), **kw)
    return CellResult(spec, replay, timing, at_slow, at_fast, (fast, slow))
