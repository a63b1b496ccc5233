"""User policies the replay compiles: a few numba functions over per-key state, no class needed.

A :class:`ScorePolicy` is the score-policy half of the protocol in compiled form. Its state is one
float64 array per cache, ``state[key, field]`` (``n_fields`` columns; all zeros at the start). The
hooks are ``@numba.njit`` functions:

- ``on_access(state, key, now, weight)``: ``key`` was requested at ``now`` (hit or miss, router order);
- ``on_insert(state, key, now)`` / ``on_evict(state, key)``: optional;
- ``score(state, key, now) -> float``: the victim is the resident key outside the current set with the
  **lowest** score, ties to the least recently requested.

The replay runs it inside one compiled loop (``moesim.simulator.user_kernels``); :meth:`as_policy`
gives the same policy as an ordinary :class:`~moesim.policies.base.EvictionPolicy` (the hooks called
from Python), so the timing simulator and the engine take it too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit

from moesim.policies.base import NEVER, EvictionPolicy


@njit(cache=True, nogil=True)
def no_access(state, key, now, weight):  # noqa: ARG001
    pass


@njit(cache=True, nogil=True)
def no_insert(state, key, now):  # noqa: ARG001
    pass


@njit(cache=True, nogil=True)
def no_evict(state, key):  # noqa: ARG001
    pass


@dataclass(frozen=True)
class ScorePolicy:
    """A compiled eviction policy: ``score`` (+ optional hooks) over ``state[key, :n_fields]``."""

    name: str
    score: Callable[..., float]
    on_access: Callable[..., None] = no_access
    on_insert: Callable[..., None] = no_insert
    on_evict: Callable[..., None] = no_evict
    n_fields: int = 1

    def __post_init__(self) -> None:
        for hook in ("score", "on_access", "on_insert", "on_evict"):
            if not hasattr(getattr(self, hook), "py_func"):
                raise TypeError(f"ScorePolicy {self.name!r}: {hook} must be a numba @njit function")
        if self.n_fields < 1:
            raise ValueError("n_fields must be >= 1")

    def as_policy(self) -> EvictionPolicy:
        """The same policy behind the class protocol (the njit hooks called from Python)."""
        return _ScoreAdapter(self)

    def __call__(self) -> EvictionPolicy:  # a zero-argument factory, like a policy class
        return self.as_policy()


class _ScoreAdapter(EvictionPolicy):
    def __init__(self, spec: ScorePolicy) -> None:
        self.spec = spec
        self.name = spec.name  # type: ignore[misc]
        self.state = np.zeros((64, spec.n_fields))
        self.last: dict[int, int] = {}
        self.tick = 0
        self.now = 0

    def _fit(self, key: int) -> None:
        if key >= len(self.state):  # keys are small ints (expert ids, or layer * E + expert)
            grown = np.zeros((max(key + 1, 2 * len(self.state)), self.spec.n_fields))
            grown[: len(self.state)] = self.state
            self.state = grown

    def on_access(self, key: int, now: int, weight: float = 1.0, next_use: int = NEVER) -> None:
        self._fit(key)
        self.tick += 1
        self.last[key] = self.tick
        self.now = now
        self.spec.on_access(self.state, key, now, weight)

    def on_insert(self, key: int, now: int) -> None:
        self._fit(key)
        self.spec.on_insert(self.state, key, now)

    def on_evict(self, key: int) -> None:
        self.spec.on_evict(self.state, key)

    def victim(self, candidates: Sequence[int]) -> int:
        score, state, now = self.spec.score, self.state, self.now
        return min(candidates, key=lambda k: (score(state, k, now), self.last.get(k, 0)))


def is_score_policy(policy: Any) -> bool:
    return isinstance(policy, ScorePolicy)
