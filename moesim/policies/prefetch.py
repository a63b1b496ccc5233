"""Prefetch policies: which experts of layer ``l + d`` to start copying once layer ``l``'s gate has run.

Same spirit as the eviction policies: small classes behind one protocol, used by the timing
simulator and the GPU engine alike. A driver calls, per step (one token, or one batch step):

- ``predict(layer, target, ctx)`` right after ``layer``'s gate, for ``target = layer + distance``:
  the experts to fetch (most wanted first; the driver truncates to ``budget``);
- ``observe(layer, experts)`` with the experts ``layer`` actually used (router order).

``ctx`` is a :class:`PrefetchContext` the driver fills: the experts ``layer`` just chose, the
trace's recorded predictions (``speculative``) and, only for the ``oracle``, the true future.
This module imports nothing outside ``moesim.policies``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from moesim.policies.params import DRIVER_ARGS, check_params


@dataclass
class PrefetchContext:
    current: Sequence[int] = ()                      # experts the current layer just selected
    predicted: Callable[[int], Sequence[int]] | None = None  # target layer -> recorded prediction (top-k)
    predicted_probs: Callable[[int], np.ndarray | None] | None = None  # target layer -> probabilities
    actual: Callable[[int], Sequence[int]] | None = None     # target layer -> true experts (oracle only)
    extra: dict[str, Any] = field(default_factory=dict)


class Prefetcher:
    name: ClassVar[str] = "base"
    summary: ClassVar[str] = ""  # one sentence for `moesim policies` (else the docstring's first)
    needs_predictions: ClassVar[bool] = False  # needs the trace's pred{d}_experts columns
    needs_future: ClassVar[bool] = False       # reads the true routing of the target layer

    def __init__(self, num_layers: int, num_experts: int, top_k: int, distance: int = 1,
                 budget: int | None = None) -> None:
        if distance < 1:
            raise ValueError("prefetch distance must be >= 1")
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.distance = distance
        self.budget = top_k if budget is None else budget
        if self.budget < 0:
            raise ValueError("prefetch budget must be >= 0")

    def predict(self, layer: int, target: int, ctx: PrefetchContext) -> list[int]:
        return []

    def observe(self, layer: int, experts: Sequence[int]) -> None:
        """The experts ``layer`` actually used this step."""


_PREFETCHERS: dict[str, type[Prefetcher]] = {}


def register_prefetcher(cls: type[Prefetcher]) -> type[Prefetcher]:
    _PREFETCHERS[cls.name] = cls
    return cls


def prefetcher_names() -> list[str]:
    return sorted(_PREFETCHERS)


def make_prefetcher(name: str, **kwargs: Any) -> Prefetcher:
    try:
        cls = _PREFETCHERS[name]
    except KeyError:
        raise KeyError(f"unknown prefetcher {name!r} (known: {', '.join(prefetcher_names())})") from None
    driver = {k: v for k, v in kwargs.items() if k in DRIVER_ARGS}
    user = {k: v for k, v in kwargs.items() if k not in DRIVER_ARGS}
    return cls(**driver, **check_params(cls, user, f"prefetcher {name!r}"))


@register_prefetcher
class NoPrefetch(Prefetcher):
    name = "none"
    summary = 'No prefetching: experts are copied only when a layer asks for them.'


@register_prefetcher
class PreviousToken(Prefetcher):
    """The target layer's experts of the previous step (temporal locality)."""

    name = "previous-token"
    summary = "Fetches the target layer's experts of the previous token (temporal locality)."

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last: dict[int, list[int]] = {}

    def predict(self, layer: int, target: int, ctx: PrefetchContext) -> list[int]:
        return list(self.last.get(target, []))

    def observe(self, layer: int, experts: Sequence[int]) -> None:
        self.last[layer] = list(experts)


@register_prefetcher
class Transition(Prefetcher):
    """Online transition model: counts how often expert ``a`` at layer ``l`` is followed by expert
    ``b`` at layer ``l + d`` (same step); predicts the highest-scoring ``b`` given layer ``l``'s
    experts. Learns as it goes (no future knowledge)."""

    name = "transition"
    summary = 'Learns which experts follow which across layers and fetches the likeliest.'

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counts = np.zeros((self.num_layers, self.num_experts, self.num_experts))
        self.step_experts: dict[int, list[int]] = {}

    def predict(self, layer: int, target: int, ctx: PrefetchContext) -> list[int]:
        score = self.counts[layer, list(ctx.current)].sum(0)
        if not score.any():
            return []
        order = np.argsort(-score, kind="stable")
        return [int(e) for e in order if score[e] > 0]

    def observe(self, layer: int, experts: Sequence[int]) -> None:
        src = layer - self.distance
        if src >= 0 and src in self.step_experts:
            for a in self.step_experts[src]:
                self.counts[src, a, list(experts)] += 1.0
        self.step_experts[layer] = list(experts)
        if layer == self.num_layers - 1:
            self.step_experts = {}


@register_prefetcher
class Speculative(Prefetcher):
    """The trace's recorded speculative prediction for the target layer (layer ``l+d``'s gate
    applied to layer ``l``'s hidden state): its top-k, or with ``threshold`` every expert whose
    predicted probability reaches it (needs recorded prediction logits)."""

    name = "speculative"
    summary = "Fetches the trace's recorded prediction (layer l+d's gate on layer l's state)."
    needs_predictions = True

    def __init__(self, *args: Any, threshold: float | None = None, **kwargs: Any) -> None:
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError("threshold must be in [0, 1] (a routing probability)")
        super().__init__(*args, **kwargs)
        self.threshold = threshold

    def predict(self, layer: int, target: int, ctx: PrefetchContext) -> list[int]:
        if self.threshold is not None and ctx.predicted_probs is not None:
            probs = ctx.predicted_probs(target)
            if probs is not None:
                order = np.argsort(-probs, kind="stable")
                return [int(e) for e in order if probs[e] >= self.threshold]
        return [int(e) for e in ctx.predicted(target) if e >= 0] if ctx.predicted else []


@register_prefetcher
class Oracle(Prefetcher):
    """Perfect prediction: the target layer's true experts (an upper bound, not a real policy)."""

    name = "oracle"
    summary = "Fetches the target layer's true experts: an upper bound, not a real policy."
    needs_future = True

    def predict(self, layer: int, target: int, ctx: PrefetchContext) -> list[int]:
        return list(ctx.actual(target)) if ctx.actual else []
