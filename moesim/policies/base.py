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

import dis
import functools
import inspect
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from types import CodeType
from typing import Any, ClassVar

from moesim.policies.params import check_params

NEVER = 1 << 62  # next_use of a key that is never requested again
# endless defaults for sets given without weights / next uses (zip stops at the keys; stateless, shared)
_ONES, _NEVERS = repeat(1.0), repeat(NEVER)
_ONES_ROWS, _NEVERS_ROWS = repeat(_ONES), repeat(_NEVERS)


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

    __slots__ = ("capacity", "policy", "resident", "evictions", "reads_weights", "_hooks")

    def __init__(self, capacity: int, policy: EvictionPolicy) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.policy = policy
        policy.attach(capacity)
        self.resident: set[int] = set()
        self.evictions = 0
        # whether the routing weights must be passed to on_access (converting them costs as much as a
        # cheap policy's own work); a policy that cannot be inspected gets them
        self.reads_weights = reads_argument(policy.on_access, 2)
        # the policy's bound hooks, None for those it inherits from EvictionPolicy (no-ops): looked up
        # once, as the policy is fixed for the cache's life
        kind = type(policy)
        self._hooks = (policy.on_access if kind.on_access is not EvictionPolicy.on_access else None,
                       policy.on_insert if kind.on_insert is not EvictionPolicy.on_insert else None,
                       policy.on_evict if kind.on_evict is not EvictionPolicy.on_evict else None,
                       policy.victim)

    def __contains__(self, key: int) -> bool:
        return key in self.resident

    def __len__(self) -> int:
        return len(self.resident)

    def request(self, keys: Sequence[int], now: int, weights: Sequence[float] | None = None,
                next_uses: Sequence[int] | None = None) -> list[int]:
        """Request a set of distinct keys at once; returns the keys that missed (router order)."""
        return self._set(keys, now, _ONES if weights is None else weights, _NEVERS if next_uses is None else next_uses)

    def request_rows(self, rows: Sequence[Sequence[int]], clocks: Sequence[int],
                     weights: Sequence[Sequence[float]] | None = None,
                     next_uses: Sequence[Sequence[int]] | None = None) -> list[int]:
        """:meth:`request` for many sets in a row (the replay's loop); returns the hits of each set."""
        width = len(rows[0]) if len(rows) else 0
        if width in (1, 2) and set(map(len, rows)) == {width}:
            return self.request_columns(list(zip(*rows, strict=True)), clocks,
                                        None if weights is None else list(zip(*weights, strict=True)),
                                        None if next_uses is None else list(zip(*next_uses, strict=True)))
        return self._rows_any(rows, clocks, weights if self.reads_weights else None, next_uses)

    def request_columns(self, keys: Sequence[Sequence[int]], clocks: Sequence[int],
                        weights: Sequence[Sequence[float]] | None = None,
                        next_uses: Sequence[Sequence[int]] | None = None) -> list[int]:
        """:meth:`request_rows` with the sets given column-wise, all of one size: ``keys[j][i]`` is the
        j-th key (router order) of set i, and ``weights`` / ``next_uses`` alike. Returns the hits of
        each set.

        The replay's entry point: a (sets, width) array converts to one flat list per column, with no
        list per set. The same three steps as :meth:`request`, with the policy's bound methods looked
        up once, hooks the policy does not override skipped, routing weights not passed to an
        ``on_access`` that never reads them, and sets of one key (sequential semantics) or two (top-2
        routing) in loops unrolled for that width: the per-request cost is then mostly the policy's own
        (benchmarks/bench_replay.py, the python rows)."""
        width = len(keys)
        if width > self.capacity and len(clocks):
            raise ValueError(f"a set of {width} keys cannot fit {self.capacity} slots")
        if not self.reads_weights:
            weights = None
        if width == 1:
            return self._rows_1(keys[0], clocks, _ONES if weights is None else weights[0],
                                _NEVERS if next_uses is None else next_uses[0])
        if width == 2:
            return self._rows_2(keys[0], keys[1], clocks,
                                _ONES if weights is None else weights[0], _ONES if weights is None else weights[1],
                                _NEVERS if next_uses is None else next_uses[0],
                                _NEVERS if next_uses is None else next_uses[1])
        return self._rows_any(list(zip(*keys, strict=True)), clocks,
                              None if weights is None else list(zip(*weights, strict=True)),
                              None if next_uses is None else list(zip(*next_uses, strict=True)))

    def _rows_any(self, rows: Sequence[Sequence[int]], clocks: Sequence[int],
                  weights: Sequence[Sequence[float]] | None, next_uses: Sequence[Sequence[int]] | None) -> list[int]:
        """:meth:`_set` for each set in turn; returns the hits of each."""
        step = self._set
        return [len(keys) - len(step(keys, now, ws, nus)) for keys, now, ws, nus in
                zip(rows, clocks, _ONES_ROWS if weights is None else weights,
                    _NEVERS_ROWS if next_uses is None else next_uses, strict=False)]

    def _set(self, keys: Sequence[int], now: int, weights: Iterable[float], next_uses: Iterable[int]) -> list[int]:
        """The atomic step of docs/semantics.md for one set of any size; returns its missing keys. The
        unrolled loops below do exactly this for sets of one or two keys."""
        resident = self.resident
        on_access, on_insert, on_evict, victim_of = self._hooks
        # 1. count (before anything changes)
        missing = [k for k in keys if k not in resident]
        # 2. touch every key, router order
        if on_access is not None:
            # (zip(strict=True) costs more than the rest of a step: lengths checked when given)
            if (weights is not _ONES and len(weights) < len(keys)) or (  # type: ignore[arg-type]
                    next_uses is not _NEVERS and len(next_uses) < len(keys)):  # type: ignore[arg-type]
                raise ValueError(f"a set of {len(keys)} keys needs as many weights and next uses")
            for k, wt, nu in zip(keys, weights, next_uses, strict=False):
                on_access(k, now, wt, nu)
        if not missing:
            return missing
        capacity = self.capacity
        if len(keys) > capacity:
            raise ValueError(f"a set of {len(keys)} keys cannot fit {capacity} slots")
        # 3. insert the missing keys, router order; victims only among residents outside the set
        for k in missing:
            if len(resident) >= capacity:
                candidates = [*resident]
                for x in keys:
                    if x in resident:
                        candidates.remove(x)  # keeps the residents' order (policies' ties)
                victim = victim_of(candidates)
                if victim in keys:
                    raise _illegal_victim(self.policy, victim)
                try:
                    resident.remove(victim)
                except (KeyError, TypeError):  # not resident, or not even a key
                    raise _illegal_victim(self.policy, victim) from None
                if on_evict is not None:
                    on_evict(victim)
                self.evictions += 1
            resident.add(k)
            if on_insert is not None:
                on_insert(k, now)
        return missing

    def _rows_1(self, ka: Iterable[int], clocks: Iterable[int], wa: Iterable[float],
                na: Iterable[int]) -> list[int]:
        """:meth:`_set` unrolled for one key per set: the candidates are all the residents."""
        resident = self.resident
        on_access, on_insert, on_evict, victim_of = self._hooks
        hits: list[int] = []
        evictions = 0
        free = self.capacity - len(resident)  # counted here: len() per miss costs as much as a set update
        # candidates below are [*resident]: the same list, in the set's order, as list(resident), without
        # the look-up and call of the builtin (measured: 3% of a plain-Python LRU replay)
        try:
            for a, now, w, nu in zip(ka, clocks, wa, na, strict=False):  # wa, na may repeat
                if on_access is not None:
                    on_access(a, now, w, nu)
                if a in resident:
                    hits.append(1)
                    continue
                hits.append(0)
                if free:
                    free -= 1
                else:
                    victim = victim_of([*resident])
                    if victim == a:
                        raise _illegal_victim(self.policy, victim)
                    try:
                        resident.remove(victim)
                    except (KeyError, TypeError):  # not resident, or not even a key
                        raise _illegal_victim(self.policy, victim) from None
                    if on_evict is not None:
                        on_evict(victim)
                    evictions += 1
                resident.add(a)
                if on_insert is not None:
                    on_insert(a, now)
        finally:
            self.evictions += evictions
        return hits

    def _rows_2(self, ka: Iterable[int], kb: Iterable[int], clocks: Iterable[int], wa: Iterable[float],
                wb: Iterable[float], na: Iterable[int], nb: Iterable[int]) -> list[int]:
        """:meth:`_set` unrolled for two keys per set (a, b in router order)."""
        resident = self.resident
        on_access, on_insert, on_evict, victim_of = self._hooks
        hits: list[int] = []
        evictions = 0
        free = self.capacity - len(resident)
        try:
            for a, b, now, w_a, w_b, nu_a, nu_b in zip(ka, kb, clocks, wa, wb, na, nb, strict=False):
                # 1. count and 2. touch (in either order: touching changes no residency)
                if on_access is not None:
                    on_access(a, now, w_a, nu_a)
                    on_access(b, now, w_b, nu_b)
                if a in resident:
                    if b in resident:
                        hits.append(2)
                        continue
                    hits.append(1)
                else:
                    # 3. insert a; b, if resident, is protected
                    if b in resident:
                        hits.append(1)
                        if free:
                            free -= 1
                        else:
                            candidates = [*resident]
                            candidates.remove(b)
                            victim = victim_of(candidates)
                            if victim == b:
                                raise _illegal_victim(self.policy, victim)
                            try:
                                resident.remove(victim)  # a KeyError: not resident (a itself included)
                            except (KeyError, TypeError):
                                raise _illegal_victim(self.policy, victim) from None
                            if on_evict is not None:
                                on_evict(victim)
                            evictions += 1
                        resident.add(a)
                        if on_insert is not None:
                            on_insert(a, now)
                        continue
                    hits.append(0)
                    if free:
                        free -= 1
                    else:
                        victim = victim_of([*resident])
                        try:
                            resident.remove(victim)
                        except (KeyError, TypeError):
                            raise _illegal_victim(self.policy, victim) from None
                        if on_evict is not None:
                            on_evict(victim)
                        evictions += 1
                    resident.add(a)
                    if on_insert is not None:
                        on_insert(a, now)
                # 3. insert b; a is resident now, and protected
                if free:
                    free -= 1
                else:
                    candidates = [*resident]
                    candidates.remove(a)
                    victim = victim_of(candidates)
                    if victim == a:
                        raise _illegal_victim(self.policy, victim)
                    try:
                        resident.remove(victim)
                    except (KeyError, TypeError):
                        raise _illegal_victim(self.policy, victim) from None
                    if on_evict is not None:
                        on_evict(victim)
                    evictions += 1
                resident.add(b)
                if on_insert is not None:
                    on_insert(b, now)
        finally:
            self.evictions += evictions
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
            try:
                legal = victim in resident and victim not in protected
            except TypeError:  # not even a key
                legal = False
            if not legal:
                raise _illegal_victim(self.policy, victim)
            resident.discard(victim)
            self.policy.on_evict(victim)
            self.evictions += 1
        resident.add(key)
        self.policy.on_insert(key, now)
        return victim


def reads_argument(method: Callable[..., Any], position: int) -> bool:
    """Whether a bound method may read its argument at ``position`` (after self): False only when its
    code never loads it -- no ``*args``/``**kwargs``, no closure over it, no ``locals()``-like look-up."""
    code = getattr(getattr(method, "__func__", None), "__code__", None)
    if code is None:
        return True
    return _code_reads_argument(code, position)


@functools.lru_cache(maxsize=256)
def _code_reads_argument(code: CodeType, position: int) -> bool:
    """:func:`reads_argument` of one code object (a replay makes a cache per layer, all of one class:
    disassembled once)."""
    if code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS) or position >= code.co_argcount - 1:
        return True
    name = code.co_varnames[1 + position]
    if name in code.co_cellvars or {"locals", "vars", "eval", "exec", "_getframe"} & set(code.co_names):
        return True
    return any(ins.argval == name or (isinstance(ins.argval, tuple) and name in ins.argval)
               for ins in dis.get_instructions(code) if ins.opcode in dis.haslocal or ins.opcode in dis.hasfree)


def _illegal_victim(policy: EvictionPolicy, victim: object) -> RuntimeError:
    return RuntimeError(f"policy {policy.name!r} chose victim {victim!r} outside the candidates")


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
