"""Built-in eviction policies as small classes over :class:`~moesim.policies.base.EvictionPolicy`.

These classes are the reference semantics. The fast replay (``moesim.simulator``) runs compiled
kernels for the built-ins and is tested to give the same hits as these classes, event for event.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from moesim.policies.base import NEVER, EvictionPolicy, register
from moesim.policies.seeded import MASK64, draw_below


@register
class LRU(EvictionPolicy):
    """Evict the least recently used; every request (hit or miss) refreshes recency."""

    name = "lru"
    summary = 'Evicts the least recently used expert; hits and misses refresh recency.'

    def __init__(self) -> None:
        self.tick = 0
        self.last: dict[int, int] = {}

    def on_access(self, key: int, now: int, weight: float = 1.0, next_use: int = NEVER) -> None:
        self.tick += 1
        self.last[key] = self.tick

    def victim(self, candidates: Sequence[int]) -> int:
        # .get: a prefetched expert may be resident without ever having been requested
        return min(candidates, key=lambda k: (self.last.get(k, 0), k))


@register
class FIFO(EvictionPolicy):
    """Evict the earliest inserted; hits do not refresh."""

    name = "fifo"
    summary = 'Evicts the earliest inserted expert; hits do not refresh.'

    def __init__(self) -> None:
        self.tick = 0
        self.inserted: dict[int, int] = {}

    def on_insert(self, key: int, now: int) -> None:
        self.tick += 1
        self.inserted[key] = self.tick

    def victim(self, candidates: Sequence[int]) -> int:
        return min(candidates, key=self.inserted.__getitem__)  # unique stamps: no ties


@register
class LFU(EvictionPolicy):
    """Perfect LFU: counts every request since the start, resident or not; ties to the LRU."""

    name = "lfu"
    summary = 'Perfect LFU: counts every request since the start, resident or not; ties to LRU.'

    def __init__(self) -> None:
        self.tick = 0
        self.count: dict[int, int] = {}
        self.last: dict[int, int] = {}

    def on_access(self, key: int, now: int, weight: float = 1.0, next_use: int = NEVER) -> None:
        self.tick += 1
        self.count[key] = self.count.get(key, 0) + 1
        self.last[key] = self.tick

    def victim(self, candidates: Sequence[int]) -> int:
        return min(candidates, key=lambda k: (self.count.get(k, 0), self.last.get(k, 0), k))


@register
class OPT(EvictionPolicy):
    """Belady: evict the key whose next request is farthest in the future (needs the future)."""

    name = "opt"
    summary = "Belady's bound: evicts the expert needed farthest in the future (needs the trace)."
    needs_future = True

    def __init__(self) -> None:
        self.next_use: dict[int, int] = {}

    def on_access(self, key: int, now: int, weight: float = 1.0, next_use: int = NEVER) -> None:
        self.next_use[key] = next_use

    def victim(self, candidates: Sequence[int]) -> int:
        # ties (e.g. several never requested again) go to the smallest key: deterministic everywhere
        return max(candidates, key=lambda k: (self.next_use.get(k, NEVER), -k))


@register
class LFUInCache(LFU):
    """In-cache LFU (libCacheSim's ``LFU``): a key's count restarts when it is evicted; ties to the LRU."""

    name = "lfu-cache"
    summary = "In-cache LFU (libCacheSim's LFU): an expert's count restarts when it is evicted."

    def on_evict(self, key: int) -> None:
        self.count[key] = 0


@register
class Random(EvictionPolicy):
    """Evict a uniformly random candidate (seeded: same seed, same victims).

    The residents are kept in slot order (a newcomer takes the next slot; a leaver's slot goes to the
    last resident), and the victim is the candidate of a uniform rank drawn with SplitMix64
    (:mod:`moesim.policies.seeded`) among the candidates in that order: one draw per eviction, and the
    compiled replay finds the same key in O(set size) without sorting anything."""

    name = "random"
    summary = 'Evicts a uniformly random expert (seeded: same seed, same victims).'

    def __init__(self, seed: int = 0) -> None:
        self.state = seed & MASK64
        self.slots: list[int] = []
        self.slot_of: dict[int, int] = {}

    def on_insert(self, key: int, now: int) -> None:
        self.slot_of[key] = len(self.slots)
        self.slots.append(key)

    def on_evict(self, key: int) -> None:
        i = self.slot_of.pop(key)
        last = self.slots.pop()
        if last != key:
            self.slots[i] = last
            self.slot_of[last] = i

    def victim(self, candidates: Sequence[int]) -> int:
        self.state, r = draw_below(self.state, len(candidates))
        slots = self.slots
        if len(candidates) == len(slots):
            return slots[r]
        allowed = set(candidates)
        for i in sorted(i for i, k in enumerate(slots) if k not in allowed):  # the protected slots
            if i > r:
                break
            r += 1  # skip a protected slot at or before the r-th allowed one
        return slots[r]


@register
class LFUDecay(EvictionPolicy):
    """Frequency with exponential aging: every request adds 1 to a score that halves every
    ``half_life`` request sets (clock ticks); lowest score is evicted, ties to the LRU."""

    name = "lfu-decay"
    summary = "Frequency with exponential aging: a request's weight halves every half_life steps."

    def __init__(self, half_life: float = 64.0) -> None:
        if half_life <= 0:
            raise ValueError("half_life must be > 0")
        self.rate = math.log(2.0) / half_life
        self.score: dict[int, float] = {}
        self.stamp: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.tick = 0
        self.now = 0

    def _decayed(self, key: int) -> float:
        return self.score.get(key, 0.0) * math.exp(-self.rate * (self.now - self.stamp.get(key, self.now)))

    def on_access(self, key: int, now: int, weight: float = 1.0, next_use: int = NEVER) -> None:
        self.now = now
        self.score[key] = self._decayed(key) + self._increment(weight)
        self.stamp[key] = now
        self.tick += 1
        self.last[key] = self.tick

    def _increment(self, weight: float) -> float:
        return 1.0

    def victim(self, candidates: Sequence[int]) -> int:
        return min(candidates, key=lambda k: (self._decayed(k), self.last.get(k, 0), k))


@register
class GateWeighted(LFUDecay):
    """Frequency weighted by routing weight: each request adds the router's weight for that expert
    (an expert picked with weight 0.9 counts more than one picked with 0.1). ``half_life`` = inf
    keeps every request forever (perfect, weighted LFU)."""

    name = "gate-weighted"
    summary = "Frequency weighted by the router's weight for the expert, optionally aged."

    def __init__(self, half_life: float = math.inf) -> None:
        if not half_life > 0:
            raise ValueError("half_life must be > 0 (inf: no aging)")
        super().__init__(half_life=1.0)
        self.rate = 0.0 if math.isinf(half_life) else math.log(2.0) / half_life

    def _increment(self, weight: float) -> float:
        return float(weight)


@register
class LRFU(EvictionPolicy):
    """LRFU (Lee et al., 2001): combined recency-frequency value CRF = sum over past requests of
    (1/2)^(lam * age). ``lam`` = 0 is LFU (every request counts forever), ``lam`` = 1 is LRU (the
    last request dominates). Age is measured in request sets (clock ticks)."""

    name = "lrfu"
    summary = 'LRFU (Lee et al., 2001): lam=0 is LFU, lam=1 is LRU, in between mixes both.'

    def __init__(self, lam: float = 0.1) -> None:
        if not 0.0 <= lam <= 1.0:
            raise ValueError("lam must be in [0, 1]")
        self.lam = lam
        self.crf: dict[int, float] = {}
        self.stamp: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.tick = 0
        self.now = 0

    def _value(self, key: int) -> float:
        return self.crf.get(key, 0.0) * 0.5 ** (self.lam * (self.now - self.stamp.get(key, self.now)))

    def on_access(self, key: int, now: int, weight: float = 1.0, next_use: int = NEVER) -> None:
        self.now = now
        self.crf[key] = 1.0 + self._value(key)
        self.stamp[key] = now
        self.tick += 1
        self.last[key] = self.tick

    def victim(self, candidates: Sequence[int]) -> int:
        return min(candidates, key=lambda k: (self._value(k), self.last.get(k, 0), k))


@register
class Sieve(EvictionPolicy):
    """SIEVE (Zhang et al., NSDI'24): a FIFO queue with a visited bit and a hand that moves from the
    oldest towards the newest, clearing visited bits, and evicts the first unvisited key."""

    name = "sieve"
    summary = "SIEVE (NSDI'24): a FIFO with a visited bit and a hand that evicts the first unvisited."

    def __init__(self) -> None:
        self.queue: list[int] = []  # oldest first
        self.visited: dict[int, bool] = {}
        self.hand: int | None = None  # key the hand points at (None = start from the oldest)

    def on_access(self, key: int, now: int, weight: float = 1.0, next_use: int = NEVER) -> None:
        if key in self.visited:
            self.visited[key] = True

    def on_insert(self, key: int, now: int) -> None:
        self.queue.append(key)
        self.visited[key] = False

    def on_evict(self, key: int) -> None:
        i = self.queue.index(key)
        self.hand = self.queue[i + 1] if i + 1 < len(self.queue) else None
        del self.queue[i]
        del self.visited[key]

    def victim(self, candidates: Sequence[int]) -> int:
        allowed = set(candidates)
        q = self.queue
        i = q.index(self.hand) if self.hand is not None else 0
        while True:
            key = q[i]
            if key in allowed:
                if not self.visited[key]:
                    return key
                self.visited[key] = False
            i = i + 1 if i + 1 < len(q) else 0


@register
class ARC(EvictionPolicy):
    """ARC (Megiddo & Modha, FAST'03), following libCacheSim's ARC.c step for step: T1/T2 data
    lists, B1/B2 ghost lists, a fractional target ``p`` for T1 adapted on ghost hits."""

    name = "arc"
    summary = "ARC (FAST'03): adapts between recency and frequency lists using ghost hits."

    def __init__(self) -> None:
        self.t1: list[int] = []  # LRU first (index 0 = tail)
        self.t2: list[int] = []
        self.b1: list[int] = []
        self.b2: list[int] = []
        self.p = 0.0
        self.c = 0
        self.pending: list[tuple[int, int]] = []  # missing keys of this request, router order, ghost list 0/1/2

    def attach(self, capacity: int) -> None:
        self.c = capacity

    def on_access(self, key: int, now: int, weight: float = 1.0, next_use: int = NEVER) -> None:
        if key in self.t1:
            self.t1.remove(key)
            self.t2.append(key)
        elif key in self.t2:
            self.t2.remove(key)
            self.t2.append(key)
        elif key in self.b1:
            self.p = min(self.p + max(len(self.b2) / len(self.b1), 1.0), self.c)
            self.b1.remove(key)
            self.pending.append((key, 1))
        elif key in self.b2:
            self.p = max(self.p - max(len(self.b1) / len(self.b2), 1.0), 0.0)
            self.b2.remove(key)
            self.pending.append((key, 2))
        else:
            self.pending.append((key, 0))

    def _replace(self, allowed: set[int], ghost_hit: int) -> int:
        t1 = [k for k in self.t1 if k in allowed]
        t2 = [k for k in self.t2 if k in allowed]
        if t1 and (len(self.t1) > self.p or (len(self.t1) == self.p and ghost_hit == 2) or not t2):
            self.b1.append(t1[0])
            return t1[0]
        self.b2.append(t2[0])
        return t2[0]

    def victim(self, candidates: Sequence[int]) -> int:
        allowed = set(candidates)
        ghost_hit = self.pending[0][1] if self.pending else 0
        if ghost_hit:
            return self._replace(allowed, ghost_hit)
        if len(self.t1) + len(self.b1) + 1 > self.c:
            if self.b1:
                self.b1.pop(0)
                return self._replace(allowed, 0)
            oldest = next((k for k in self.t1 if k in allowed), None)
            return self._replace(allowed, 0) if oldest is None else oldest
        if len(self.t1) + len(self.b1) + len(self.t2) + len(self.b2) >= 2 * self.c and self.b2:
            self.b2.pop(0)
        return self._replace(allowed, 0)

    def on_evict(self, key: int) -> None:
        for lst in (self.t1, self.t2):
            if key in lst:
                lst.remove(key)

    def on_insert(self, key: int, now: int) -> None:
        ghost_hit = 0
        for i, (k, g) in enumerate(self.pending):
            if k == key:
                ghost_hit = g
                del self.pending[i]
                break
        (self.t2 if ghost_hit else self.t1).append(key)


@register
class S3FIFO(EvictionPolicy):
    """S3-FIFO (Yang et al., SOSP'23), following libCacheSim's S3FIFO.c: a small FIFO (10% of the
    slots, at least 1), a main FIFO with a 2-bit clock counter and a ghost FIFO (90% of the slots)
    of keys recently evicted from the small queue."""

    name = "s3fifo"
    summary = "S3-FIFO (SOSP'23): a small probation FIFO, a main FIFO and a ghost queue."

    def __init__(self, small_ratio: float = 0.1, ghost_ratio: float = 0.9, move_to_main: int = 2) -> None:
        if not 0.0 < small_ratio < 1.0:
            raise ValueError("small_ratio must be in (0, 1): the small queue's share of the slots")
        if not 0.0 <= ghost_ratio < math.inf:
            raise ValueError("ghost_ratio must be >= 0 and finite: ghost entries per slot")
        if move_to_main < 1:
            raise ValueError("move_to_main must be >= 1")
        self.small_ratio, self.ghost_ratio, self.threshold = small_ratio, ghost_ratio, move_to_main
        self.small: list[int] = []  # oldest first
        self.main: list[int] = []
        self.ghost: list[int] = []
        self.freq: dict[int, int] = {}
        self.hit_on_ghost = False
        self.has_evicted = False

    def attach(self, capacity: int) -> None:
        self.small_size = max(1, int(capacity * self.small_ratio))
        self.main_size = capacity - self.small_size
        self.ghost_size = int(capacity * self.ghost_ratio)

    def on_access(self, key: int, now: int, weight: float = 1.0, next_use: int = NEVER) -> None:
        if key in self.freq:
            self.freq[key] += 1
        elif key in self.ghost:
            self.ghost.remove(key)
            self.hit_on_ghost = True

    def on_insert(self, key: int, now: int) -> None:
        to_main = self.hit_on_ghost or (not self.has_evicted and len(self.small) >= self.small_size)
        (self.main if to_main else self.small).append(key)
        self.freq[key] = 0
        self.hit_on_ghost = False

    def on_evict(self, key: int) -> None:
        del self.freq[key]
        (self.small if key in self.small else self.main).remove(key)

    def victim(self, candidates: Sequence[int]) -> int:
        self.has_evicted = True
        allowed = set(candidates)
        while True:
            small = [k for k in self.small if k in allowed]
            if len(self.main) > self.main_size or not small:
                for key in [k for k in self.main if k in allowed]:
                    if self.freq[key] == 0:
                        return key
                    self.main.remove(key)  # reinsert at the tail, one clock tick less
                    self.main.append(key)
                    self.freq[key] = min(self.freq[key], 3) - 1
                continue
            for key in small:
                if self.freq[key] >= self.threshold:
                    self.small.remove(key)
                    self.main.append(key)
                    self.freq[key] = 0
                    continue
                if self.ghost_size > 0:
                    if len(self.ghost) >= self.ghost_size:
                        self.ghost.pop(0)
                    self.ghost.append(key)
                return key


@register
class Hobbit(EvictionPolicy):
    """HOBBIT-style multidimensional priority (Tang et al., 2024, "HOBBIT: A Mixed Precision Expert
    Offloading System for Fast MoE Inference", arXiv 2411.01433): each candidate is ranked by
    recency (LRU) and by frequency (LFU) among the candidates; the victim has the lowest weighted sum
    ``w_recency * rank_recency + (1 - w_recency) * rank_frequency``. (HOBBIT's third dimension,
    least-high-precision-used, does not apply to single-precision caches and is omitted.)"""

    name = "hobbit"
    summary = "HOBBIT-style: weighted sum of an expert's recency rank and frequency rank."

    def __init__(self, w_recency: float = 0.5) -> None:
        if not math.isfinite(w_recency):  # inf * rank - inf * rank: no order at all
            raise ValueError("w_recency must be finite")
        self.w = w_recency
        self.tick = 0
        self.last: dict[int, int] = {}
        self.count: dict[int, int] = {}

    def on_access(self, key: int, now: int, weight: float = 1.0, next_use: int = NEVER) -> None:
        self.tick += 1
        self.last[key] = self.tick
        self.count[key] = self.count.get(key, 0) + 1

    def victim(self, candidates: Sequence[int]) -> int:
        last, count = self.last, self.count
        by_recency = {k: i for i, k in enumerate(sorted(candidates, key=lambda k: (last.get(k, 0), k)))}
        by_count = {k: i for i, k in enumerate(sorted(candidates, key=lambda k: (count.get(k, 0), last.get(k, 0), k)))}
        return min(candidates, key=lambda k: (self.w * by_recency[k] + (1 - self.w) * by_count[k], last.get(k, 0), k))


@register
class LeastStale(EvictionPolicy):
    """Least-Stale (SpecMD, Hoang et al., 2026, arXiv 2602.03921, as tinyserve's ``LeastStalePolicy``
    implements it): experts not yet requested in the current token ("stale") are evicted before those
    that were ("fresh"), each tier oldest first. Kept as one queue: a key moves to its end at its first
    request in a token (a miss enters it there), so every stale key is ahead of every fresh one."""

    name = "least-stale"
    summary = "SpecMD's Least-Stale: evicts experts not requested in the current token first, oldest first."

    def __init__(self) -> None:
        self.queue: dict[int, int] = {}  # resident key -> the token it last entered the queue's end in

    def on_access(self, key: int, now: int, weight: float = 1.0, next_use: int = NEVER) -> None:
        token = self.queue.get(key)
        if token is not None and token != now:  # a stale hit becomes fresh
            del self.queue[key]
            self.queue[key] = now

    def on_insert(self, key: int, now: int) -> None:
        self.queue[key] = now

    def on_evict(self, key: int) -> None:
        del self.queue[key]

    def victim(self, candidates: Sequence[int]) -> int:
        allowed = set(candidates)
        return next(k for k in self.queue if k in allowed)


@register
class LFRU(EvictionPolicy):
    """LFRU (the expert cache of vLLM PR 37190, ``--moe-expert-cache-size``; tinyserve's ``LFRUPolicy``):
    evict the lowest ``hits since insertion / age``, age = clock - last use + 1 on a clock that ticks at
    every hit and every insertion; ties to the earliest inserted. An insertion counts 1."""

    name = "lfru"
    summary = "vLLM's expert-cache LFRU: evicts the lowest uses-since-insertion / age."

    def __init__(self) -> None:
        self.clock = 0
        self.uses: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.inserted: dict[int, int] = {}

    def on_access(self, key: int, now: int, weight: float = 1.0, next_use: int = NEVER) -> None:
        if key in self.uses:  # a hit (a miss ticks when it is inserted)
            self.clock += 1
            self.uses[key] += 1
            self.last[key] = self.clock

    def on_insert(self, key: int, now: int) -> None:
        self.clock += 1
        self.uses[key] = 1
        self.last[key] = self.inserted[key] = self.clock

    def on_evict(self, key: int) -> None:
        del self.uses[key], self.last[key], self.inserted[key]

    def victim(self, candidates: Sequence[int]) -> int:
        # uses / age compared exactly: a / x < b / y iff a * y < b * x (ages >= 1)
        best = candidates[0]
        for k in candidates[1:]:
            lhs = self.uses[k] * (self.clock - self.last[best] + 1)
            rhs = self.uses[best] * (self.clock - self.last[k] + 1)
            if lhs < rhs or (lhs == rhs and self.inserted[k] < self.inserted[best]):
                best = k
        return best


@register
class MRS(EvictionPolicy):
    """MRS, "Minus Recent Score" (HybriMoE, Zhong et al., 2025, arXiv 2504.05897; ``KScoreAwareCache``):
    each token, an expert's score becomes ``alpha * routing weight + (1 - alpha) * score`` if it is
    routed, else ``(1 - alpha) * score``; lowest score is evicted, ties to the least recently used."""

    name = "mrs"
    summary = "HybriMoE's MRS: evicts the lowest exponentially averaged routing weight."

    def __init__(self, alpha: float = 0.5) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = alpha
        self.keep = 1.0 - alpha
        self.score: dict[int, float] = {}
        self.stamp: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.tick = 0
        self.now = 0

    def _decayed(self, key: int) -> float:
        return self.score.get(key, 0.0) * self.keep ** float(self.now - self.stamp.get(key, self.now))

    def on_access(self, key: int, now: int, weight: float = 1.0, next_use: int = NEVER) -> None:
        self.now = now
        self.score[key] = self._decayed(key) + self.alpha * weight
        self.stamp[key] = now
        self.tick += 1
        self.last[key] = self.tick

    def victim(self, candidates: Sequence[int]) -> int:
        return min(candidates, key=lambda k: (self._decayed(k), self.last.get(k, 0), k))
