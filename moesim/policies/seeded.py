"""The seeded generator of the ``random`` policy: SplitMix64 (Steele, Lea and Flood, "Fast splittable
pseudorandom number generators", OOPSLA 2014), one 64-bit word of state, written out in plain Python
here and in numba in ``moesim.simulator.policy_kernels.randomized`` so that the class and the compiled replay draw
the same numbers (tests/test_random_policy.py checks both against the reference outputs).

A draw below ``n`` takes the top ``(n - 1).bit_length()`` bits of the next output and draws again while
they reach ``n`` (exactly uniform; no draw at all for n = 1)."""

from __future__ import annotations

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15  # the state's increment
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def splitmix64(state: int) -> tuple[int, int]:
    """(next state, output) of SplitMix64."""
    state = (state + GOLDEN) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return state, z ^ (z >> 31)


def draw_below(state: int, n: int) -> tuple[int, int]:
    """(next state, a uniform integer in [0, n)) for n >= 1."""
    if n <= 1:
        return state, 0
    shift = 64 - (n - 1).bit_length()
    while True:
        state, z = splitmix64(state)
        r = z >> shift
        if r < n:
            return state, r
