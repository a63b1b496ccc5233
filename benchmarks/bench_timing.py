"""Speed of the discrete-event timing simulator (batch-1 decode, prefetcher on).

    python benchmarks/bench_timing.py [--tokens 200000]

Prints expert requests/s of the compiled path for each policy x prefetcher, and the general event
path on a smaller slice of the same trace as the peer (ratio = compiled / event path).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from moesim.simulator.cost_model import CostModel
from moesim.simulator.timing import simulate_timing
from moesim.traces.format import read_trace
from moesim.traces.synth import load_preset, synthesize


def rate(trace, policy, prefetch, engine, cost, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = simulate_timing(trace, policy, 4, cost, prefetch=prefetch, engine=engine)
        best = min(best, time.perf_counter() - t0)
    return r.requests / best, r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--event-tokens", type=int, default=3_000)
    args = ap.parse_args()
    cost = CostModel.preset("a6000")
    with tempfile.TemporaryDirectory() as d:
        big, small = Path(d) / "big.parquet", Path(d) / "small.parquet"
        synthesize(load_preset("mixtral-8x7b"), args.tokens, 0, big, progress=False)
        synthesize(load_preset("mixtral-8x7b"), args.event_tokens, 0, small, progress=False)
        big_t, small_t = read_trace(big), read_trace(small)
        simulate_timing(small_t, "lru", 4, cost, prefetch="transition")  # JIT warm-up
        print(f"{args.tokens} tokens x 32 layers x top-2 = {len(big_t) * 2 / 1e6:.1f}M expert requests (compiled); "
              f"event path on {args.event_tokens} tokens\n")
        print(f"{'policy':6s} {'prefetch':15s} {'compiled M req/s':>17s} {'event M req/s':>14s} {'ratio':>7s} {'tokens/s':>9s}")
        for policy in ("lru", "lfu", "opt"):
            for prefetch in ("none", "previous-token", "transition", "oracle"):
                fast, r = rate(big_t, policy, prefetch, "numba", cost, 2)
                slow, _ = rate(small_t, policy, prefetch, "python", cost, 1)
                print(f"{policy:6s} {prefetch:15s} {fast / 1e6:17.2f} {slow / 1e6:14.3f} {fast / slow:6.0f}x "
                      f"{r.tokens_per_s:9.2f}")


if __name__ == "__main__":
    main()
