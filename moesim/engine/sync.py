"""How the engines order their two CUDA streams: one place for the cross-stream events of every engine.

Each engine runs compute (layer, expert pieces) on the current stream and expert copies on a copy
stream. Two orderings are required and nothing else:

- a copy into a slot starts after the gate that routed it (a real engine learns the routing there)
  and after the last compute that read the slot's old contents (``free``);
- an expert piece starts after the copy that filled its slot (``ready``).

:class:`StreamOrder` issues those waits, with the **waits stream order already implies left out**
(``SyncMode.elide``): work on one stream completes in issue order, so once stream T has waited for
mark n of stream S, a wait on any mark <= n of S adds nothing. A hit's expert then waits on nothing
(its slot was filled by a copy compute already waited for), a layer's copies wait once for its gate,
and a slot-free mark recorded before that gate needs no wait of its own.

``SyncMode.host_lag`` holds the CPU back to at most that many layers ahead of the GPU's gates. That is
what matters on the H200 (studies/engine_sync/engine_sync_h200.md: CUPTI timestamps): with the CPU queueing a whole
step ahead and untimed events, every cross-stream hop took 40-60 us on the GPU and the copies themselves
ran 4% slower than back to back; one layer ahead, the copies ran at their back-to-back time and the hops
took 8-23 us. Leaving implied waits out on its own saved little, but it removes the waits a lagging CPU
would otherwise pay for.

``SyncMode.timing`` creates the cross-stream events with timing enabled. studies/engine_sync/gpu_engine_sync.py
measures each mode; :data:`DEFAULT_SYNC` is the one the engines use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SyncMode:
    elide: bool = True             # skip waits that stream order already implies
    timing: bool = False           # cross-stream events with timing enabled (more costly to record)
    host_lag: int | None = None    # after issuing layer l's gate, the CPU waits for layer l - lag's gate

    @classmethod
    def parse(cls, text: str) -> SyncMode:
        """``plain``, or ``+``-joined words: ``elide``, ``timing``, ``lagN`` (e.g. ``elide+timing+lag1``)."""
        if text == "plain":
            return cls(elide=False)
        kw: dict[str, Any] = {"elide": False}
        for word in text.split("+"):
            if word in ("elide", "timing"):
                kw[word] = True
            elif word.startswith("lag") and word[3:].isdigit():
                kw["host_lag"] = int(word[3:])
            else:
                raise ValueError(f"unknown sync mode word {word!r} (plain, elide, timing, lagN)")
        return cls(**kw)

    @property
    def label(self) -> str:
        words = [w for w, on in (("elide", self.elide), ("timing", self.timing)) if on]
        if self.host_lag is not None:
            words.append(f"lag{self.host_lag}")
        return "+".join(words) or "plain"


# studies/engine_sync/gpu_engine_sync.py, H200, 2026-12-02T07:4xZ (studies/engine_sync/engine_sync_h200.md): every wait issued and
# the CPU queueing a whole step ahead ("plain", the engine before) took 100.4 ms per all-miss token and
# 320 ms per batch-16 step; waits elided and the CPU at most one layer ahead 95.7 ms and 290 ms, with copies
# at their back-to-back speed (1.207 ms in situ vs 1.26) and the stream hops down from 41/43 us to 15/12 us.
DEFAULT_SYNC = SyncMode(elide=True, host_lag=1)

COMPUTE, COPY = 0, 1


@dataclass
class Mark:
    """An event recorded on one stream, with its position in that stream's issue order."""

    event: Any
    stream: int
    seq: int


class StreamOrder:
    """The cross-stream waits of one engine run (see the module docstring). ``d`` is a
    :class:`moesim.engine.runtime.Device`; on CPU its events are stand-ins and waits do nothing.

    ``waits`` counts the waits issued per waiting stream (tests and benchmarks read it)."""

    def __init__(self, d: Any, mode: SyncMode = DEFAULT_SYNC) -> None:
        self.d, self.mode = d, mode
        self.seq = [0, 0]
        self.seen = [[-1, -1], [-1, -1]]   # seen[T][S]: the highest mark of S that T has waited for
        self.waits = [0, 0]
        self.gates: list[Mark] = []

    def record(self, stream: int, timing: bool | None = None) -> Mark:
        """Record an event at the current end of ``stream`` (the caller's stream context must match)."""
        ev = self.d.event(timing=self.mode.timing if timing is None else timing)
        ev.record(self.d.copy_stream if stream == COPY and self.d.cuda else None)
        self.seq[stream] += 1
        self.seen[stream][stream] = self.seq[stream]
        return Mark(ev, stream, self.seq[stream])

    def wait(self, stream: int, mark: Mark | None) -> bool:
        """Make ``stream`` wait for ``mark`` (of the other stream); False when the wait was left out."""
        if mark is None or mark.stream == stream:
            return False
        if self.mode.elide and self.seen[stream][mark.stream] >= mark.seq:
            return False
        self.d.wait(mark.event, self.d.copy_stream if stream == COPY else None)
        self.seen[stream][mark.stream] = max(self.seen[stream][mark.stream], mark.seq)
        self.waits[stream] += 1
        return True

    def gate(self) -> Mark:
        """Mark the end of a layer's gate on compute; with ``host_lag``, hold the CPU back."""
        m = self.record(COMPUTE)
        self.gates.append(m)
        lag = self.mode.host_lag
        if lag is not None and len(self.gates) > lag:
            self.gates[-1 - lag].event.synchronize()
            del self.gates[:-1 - lag]
        return m

    def host_wait(self, mark: Mark) -> None:
        """The CPU waits for ``mark`` (a routing hand-off): work issued after this on the other stream
        starts after everything up to ``mark`` anyway, so it needs no GPU wait for it."""
        mark.event.synchronize()
        other = COPY if mark.stream == COMPUTE else COMPUTE
        self.seen[other][mark.stream] = max(self.seen[other][mark.stream], mark.seq)

    def new_step(self) -> None:
        """The CPU has waited for the end of a step on compute (its logits): every compute mark so far
        has passed, so the copy stream needs no wait for any of them, and the CPU none for old gates."""
        self.seen[COPY][COMPUTE] = self.seq[COMPUTE]
        self.gates.clear()


class SlotEvents:
    """The ``ready`` and ``free`` marks of every (layer, slot) of one engine configuration."""

    def __init__(self, num_layers: int, cache_size: int) -> None:
        self.ready: list[list[Mark | None]] = [[None] * cache_size for _ in range(num_layers)]
        self.free: list[list[Mark | None]] = [[None] * cache_size for _ in range(num_layers)]

    def reset(self) -> None:
        """A fresh run: no slot has a pending copy or reader."""
        for row in self.ready + self.free:
            row[:] = [None] * len(row)
