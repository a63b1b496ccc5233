"""The one policy protocol and the one cache mechanism, shared by the simulator and the GPU engine.

Split as in cachetools / libCacheSim: :class:`ExpertCache` owns residency and capacity and runs the
mechanism (look up -> update ordering -> evict until room -> insert); an :class:`EvictionPolicy`
only keeps its own ordering state and picks a victim among the candidates it is offered.

Time: ``now`` is a logical clock the driver advances once per request *set* (one token at one
layer, or one batch step). Within a set, policies see ``on_access`` once per expert in router order,
so "the last listed is the most recently used" falls out of call order.

Future knowledge (Belady and friends) comes through one explicit hook: policies with
``needs_future = True`` receive ``next_use`` in ``on_access`` -- the clock value of the next set that
requests the same key in this cache, or :data:`NEVER`. Drivers that cannot know the future (a live
model) refuse such policies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from typing import Any, ClassVar

from moesim.policies.params import check_params

NEVER = 1 << 62  # next_use of a key that is never requested again


class EvictionPolicy:
    """Ordering state for ONE cache. Subclasses override the hooks they need and :meth:`victim`."""

    name: ClassVar[str] = "base"
    summary: ClassVar[str] = ""  # one sentence for `moesim policies` (else the docstring's first)
    needs_future: ClassVar[bool] = False

    def attach(self, capacity: int) -> None:
        """Called once by the cache with its number of slots (for policies that size queues by it)."""

    def on_access(self, key: int, now: int, weight: float = 1.0, next_use: int = NEVER) -> None:
        """``key`` was requested at ``now`` (hit or miss; called before any insertion of the set)."""

    def on_insert(self, key: int, now: int) -> None:
        """``key`` became resident (after a miss or a prefetch)."""

    def on_evict(self, key: int) -> None:
        """``key`` left the cache."""

    def victim(self, candidates: Sequence[int]) -> int:
        """Pick the key to evict among ``candidates`` (resident, evictable, never empty)."""
        raise NotImplementedError


PolicyFactory = Callable[[], EvictionPolicy]


class ExpertCache:
    """A fixed number of expert slots under an eviction policy: the single cache mechanism.

    ``request`` implements the atomic per-(token, layer) semantics of docs/semantics.md: hits are counted
    against the set as a whole, every key of the set is accessed in router order, then the missing
    keys are inserted in router order, evicting only keys outside the set.
    """

    __slots__ = ("capacity", "policy", "resident", "evictions")

    def __init__(self, capacity: int, policy: EvictionPolicy) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.policy = policy
        policy.attach(capacity)
        self.resident: set[int] = set()
        self.evictions = 0

    def __contains__(self, key: int) -> bool:
        return key in self.resident

    def __len__(self) -> int:
        return len(self.resident)

    def request(self, keys: Sequence[int], now: int, weights: Sequence[float] | None = None,
                next_uses: Sequence[int] | None = None) -> list[int]:
        """Request a set of distinct keys at once; returns the keys that missed (router order)."""
        policy, resident = self.policy, self.resident
        missing = [k for k in keys if k not in resident]
        for i, k in enumerate(keys):
            policy.on_access(k, now, 1.0 if weights is None else weights[i],
                             NEVER if next_uses is None else next_uses[i])
        if missing:
            if len(keys) > self.capacity:
                raise ValueError(f"a set of {len(keys)} keys cannot fit {self.capacity} slots")
            for k in missing:
                self.admit(k, now, protect=keys)
        return missing

    def request_rows(self, rows: Sequence[Sequence[int]], clocks: Sequence[int],
                     weights: Sequence[Sequence[float]] | None = None,
                     next_uses: Sequence[Sequence[int]] | None = None) -> list[int]:
        """:meth:`request` for many sets in a row (the replay's loop); returns the hits of each set.

        The same steps as :meth:`request` + :meth:`admit`, with the policy's bound methods looked up
        once and hooks the policy does not override skipped: the per-request cost is the policy's own.
        """
        policy, resident, capacity = self.policy, self.resident, self.capacity
        kind = type(policy)
        on_access = policy.on_access if kind.on_access is not EvictionPolicy.on_access else None
        on_insert = policy.on_insert if kind.on_insert is not EvictionPolicy.on_insert else None
        on_evict = policy.on_evict if kind.on_evict is not EvictionPolicy.on_evict else None
        victim_of = policy.victim
        width = len(rows[0]) if len(rows) else 0
        wrows = weights if weights is not None else repeat((1.0,) * width)
        nrows = next_uses if next_uses is not None else repeat((NEVER,) * width)
        hits: list[int] = []
        add_hits = hits.append
        for keys, now, ws, nus in zip(rows, clocks, wrows, nrows, strict=False):  # wrows, nrows may repeat
            missing = [k for k in keys if k not in resident]
            add_hits(len(keys) - len(missing))
            if on_access is not None:
                for k, wt, nu in zip(keys, ws, nus, strict=True):
                    on_access(k, now, wt, nu)
            if not missing:
                continue
            if len(keys) > capacity:
                raise ValueError(f"a set of {len(keys)} keys cannot fit {capacity} slots")
            for k in missing:
                if len(resident) >= capacity:
                    victim = victim_of([x for x in resident if x not in keys])
                    if victim not in resident or victim in keys:
                        raise RuntimeError(f"policy {policy.name!r} chose victim {victim!r} outside the candidates")
                    resident.discard(victim)
                    if on_evict is not None:
                        on_evict(victim)
                    self.evictions += 1
                resident.add(k)
                if on_insert is not None:
                    on_insert(k, now)
        return hits

    def admit(self, key: int, now: int, protect: Iterable[int] = ()) -> int | None | bool:
        """Make ``key`` resident, evicting (by the policy) a key not in ``protect`` if full.

        Returns the evicted key, ``None`` if nothing was evicted, or ``False`` if every resident key
        is protected (nothing admitted). Used for demand misses and for prefetches alike.
        """
        resident = self.resident
        if key in resident:
            return None
        victim = None
        if len(resident) >= self.capacity:
            protected = set(protect)
            candidates = [k for k in resident if k not in protected]
            if not candidates:
                return False
            victim = self.policy.victim(candidates)
            if victim not in resident or victim in protected:
                raise RuntimeError(f"policy {self.policy.name!r} chose victim {victim!r} outside the candidates")
            resident.discard(victim)
            self.policy.on_evict(victim)
            self.evictions += 1
        resident.add(key)
        self.policy.on_insert(key, now)
        return victim


# ---- registry -----------------------------------------------------------------------------------

_REGISTRY: dict[str, type[EvictionPolicy]] = {}


def register(cls: type[EvictionPolicy]) -> type[EvictionPolicy]:
    """Class decorator: make a policy available by its ``name`` (CLI ``--policy NAME``)."""
    _REGISTRY[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def policy_class(name: str) -> type[EvictionPolicy]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown policy {name!r} (known: {', '.join(policy_names())})") from None


def make_policy(name: str, **params: Any) -> EvictionPolicy:
    """Build a registered policy; parameters are checked and converted first (:func:`check_params`:
    an unknown name or a non-numeric value raises :class:`ParamError`, a ``ValueError``)."""
    cls = policy_class(name)
    return cls(**check_params(cls, params, f"policy {name!r}"))
