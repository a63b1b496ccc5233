"""Result types shared by the replay, the timing simulator and the GPU engine (which imports them from
here, not from inside a simulator module)."""

from __future__ import annotations


class HitCounts:
    """Mixin for results that count ``requests`` and ``hits`` (replay, timing run, GPU engine)."""

    requests: int
    hits: int

    @property
    def misses(self) -> int:
        return self.requests - self.hits

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0
