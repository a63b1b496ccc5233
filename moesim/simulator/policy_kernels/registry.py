"""Every compiled built-in policy: its name, its number, its kernel and how its parameters are packed.

A kernel is ``replay(layout, cache, keys, clock, weights, group, sizes, n_keys, n_groups, next_use,
fparams, rng_state) -> (requests, hits) per group``; ``layout_for(policy, largest cache, requests,
fparams)`` picks its layout (``state.LIST``, ``SCAN``, ``HEAP``, ``VECTOR``) for a replay. The number is
the one the timing simulator uses too (``timing_kernel``).

Adding a compiled built-in policy: one module beside this one (its kernel, its ``layout_for`` and its
number) and one line below (docs/policies.md, "Add a built-in policy").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from moesim.policies.seeded import MASK64
from moesim.simulator.policy_kernels import (
    arc,
    hobbit,
    least_stale,
    lfru,
    lists,
    mrs,
    randomized,
    s3fifo,
    scores,
)


@dataclass(frozen=True)
class Kernel:
    """A compiled built-in policy. ``floats``: the attributes of a configured policy object packed, in
    order, into the kernel's ``fparams`` (the class validates them); ``seeded``: the object's ``state``
    (SplitMix64) goes to ``rng_state``; ``needs_future``: the kernel reads each request's next use;
    ``reads_weights``: it reads the routing weights; ``stack_depths``: its priority does not depend on
    the cache size, and this gives every size in one pass (``scores._stack_depths``)."""

    code: int
    replay: Callable[..., tuple[np.ndarray, np.ndarray]]
    layout_for: Callable[[int, int, int, np.ndarray], int]
    floats: tuple[str, ...] = ()
    seeded: bool = False
    needs_future: bool = False
    reads_weights: bool = False
    stack_depths: Callable[..., np.ndarray] | None = None

    def params(self, policy: Any) -> tuple[np.ndarray, np.ndarray]:
        """(fparams, rng_state) read off a configured policy object."""
        fparams = np.zeros(max(4, len(self.floats)), np.float64)
        for i, attr in enumerate(self.floats):
            fparams[i] = getattr(policy, attr)
        rng_state = np.zeros(1, np.int64)
        if self.seeded:
            state = policy.state & MASK64
            rng_state[0] = state - (1 << 64) if state >= 1 << 63 else state  # the int64 of the same bits
        return fparams, rng_state

    def layout(self, sizes: np.ndarray, requests: int, fparams: np.ndarray) -> int:
        return self.layout_for(self.code, int(sizes.max(initial=0)), requests, fparams)


KERNELS: dict[str, Kernel] = {
    "lru": Kernel(lists.LRU, lists.replay_lru, lists.layout_for),
    "fifo": Kernel(lists.FIFO, lists.replay_fifo, lists.layout_for),
    "sieve": Kernel(lists.SIEVE, lists.replay_sieve, lists.layout_for),
    "lfu": Kernel(scores.LFU, scores.replay_lfu, scores.layout_for, stack_depths=scores.stack_depths_lfu),
    "lfu-cache": Kernel(scores.LFU_CACHE, scores.replay_lfu_cache, scores.layout_for),
    "opt": Kernel(scores.OPT, scores.replay_opt, scores.layout_for, needs_future=True,
                  stack_depths=scores.stack_depths_opt),
    "lfu-decay": Kernel(scores.LFU_DECAY, scores.replay_lfu_decay, scores.layout_for, ("rate",),
                        stack_depths=scores.stack_depths_lfu_decay),
    "gate-weighted": Kernel(scores.GATE_WEIGHTED, scores.replay_gate_weighted, scores.layout_for, ("rate",),
                            reads_weights=True, stack_depths=scores.stack_depths_gate_weighted),
    "lrfu": Kernel(scores.LRFU, scores.replay_lrfu, scores.layout_for, ("lam",), stack_depths=scores.stack_depths_lrfu),
    "arc": Kernel(arc.ARC, arc.replay_arc, arc.layout_for),
    "s3fifo": Kernel(s3fifo.S3FIFO, s3fifo.replay_s3fifo, s3fifo.layout_for, ("small_ratio", "ghost_ratio", "threshold")),
    "hobbit": Kernel(hobbit.HOBBIT, hobbit.replay_hobbit, hobbit.layout_for, ("w",)),
    "random": Kernel(randomized.RANDOM, randomized.replay_random, randomized.layout_for, seeded=True),
    "least-stale": Kernel(least_stale.LEAST_STALE, least_stale.replay_least_stale, least_stale.layout_for),
    "lfru": Kernel(lfru.LFRU, lfru.replay_lfru, lfru.layout_for),
    "mrs": Kernel(mrs.MRS, mrs.replay_mrs, mrs.layout_for, ("alpha",), reads_weights=True),
}
assert len({k.code for k in KERNELS.values()}) == len(KERNELS), "two compiled policies share a number"


def register_kernel(name: str, kernel: Kernel) -> None:
    """Add a compiled built-in (a policy class of the same name must be registered too)."""
    if name in KERNELS or any(k.code == kernel.code for k in KERNELS.values()):
        raise ValueError(f"compiled policy {name!r} or number {kernel.code} already registered")
    KERNELS[name] = kernel


def kernel_of(name: object) -> Kernel | None:
    return KERNELS.get(name) if isinstance(name, str) else None
