"""Built-in eviction policies as small classes over :class:`~moesim.policies.base.EvictionPolicy`.

These classes are the reference semantics. The fast replay (``moesim.simulator``) runs compiled
kernels for the built-ins and is tested to give the same hits as these classes, event for event.
"""

from __future__ import annotations

from collections.abc import Sequence

from moesim.policies.base import NEVER, EvictionPolicy, register


@register
class LRU(EvictionPolicy):
    """Evict the least recently used; every request (hit or miss) refreshes recency."""

    name = "lru"

    def __init__(self) -> None:
        self.tick = 0
        self.last: dict[int, int] = {}

    def on_access(self, key: int, now: int, weight: float = 1.0, next_use: int = NEVER) -> None:
        self.tick += 1
        self.last[key] = self.tick

    def victim(self, candidates: Sequence[int]) -> int:
        return min(candidates, key=self.last.__getitem__)


@register
class FIFO(EvictionPolicy):
    """Evict the earliest inserted; hits do not refresh."""

    name = "fifo"

    def __init__(self) -> None:
        self.tick = 0
        self.inserted: dict[int, int] = {}

    def on_insert(self, key: int, now: int) -> None:
        self.tick += 1
        self.inserted[key] = self.tick

    def victim(self, candidates: Sequence[int]) -> int:
        return min(candidates, key=self.inserted.__getitem__)


@register
class LFU(EvictionPolicy):
    """Perfect LFU: counts every request since the start, resident or not; ties to the LRU."""

    name = "lfu"

    def __init__(self) -> None:
        self.tick = 0
        self.count: dict[int, int] = {}
        self.last: dict[int, int] = {}

    def on_access(self, key: int, now: int, weight: float = 1.0, next_use: int = NEVER) -> None:
        self.tick += 1
        self.count[key] = self.count.get(key, 0) + 1
        self.last[key] = self.tick

    def victim(self, candidates: Sequence[int]) -> int:
        return min(candidates, key=lambda k: (self.count[k], self.last[k]))


@register
class OPT(EvictionPolicy):
    """Belady: evict the key whose next request is farthest in the future (needs the future)."""

    name = "opt"
    needs_future = True

    def __init__(self) -> None:
        self.next_use: dict[int, int] = {}

    def on_access(self, key: int, now: int, weight: float = 1.0, next_use: int = NEVER) -> None:
        self.next_use[key] = next_use

    def victim(self, candidates: Sequence[int]) -> int:
        return max(candidates, key=self.next_use.__getitem__)
