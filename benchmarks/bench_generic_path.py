"""The generic path (plain-Python policy classes) against libCacheSim's LRU, in CPU seconds and wall clock,
the contenders taking turns so that a shared machine slows them alike.

    python benchmarks/bench_generic_path.py [--tokens 20000] [--rounds 5]

bench_replay.py's python rows measure the same replays in wall clock inside a long run; on a machine
that other jobs share, wall clock of a 1-2 s Python replay mostly measures the other jobs. Here each
round runs every contender once, and the best CPU time of the rounds is kept. Peer: libCacheSim's LRU
(128 slots = 32 layers x 4) on the same requests exported to oracleGeneral.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from moesim.policies import EvictionPolicy
from moesim.simulator.replay import build_stream, replay_stream
from moesim.traces.export import export_oracle_general
from moesim.traces.format import read_trace
from moesim.traces.synth import load_preset, synthesize

sys.path.insert(0, str(Path(__file__).parent))
from bench_replay import UserLRU  # noqa: E402  (the same user class as bench_replay's row)


class UserLRUEveryHook(EvictionPolicy):
    """An LRU that also overrides on_insert / on_evict (keeps its own resident set)."""

    name = "user-lru-every-hook"

    def __init__(self) -> None:
        self.t = 0
        self.last: dict[int, int] = {}
        self.held: set[int] = set()

    def on_access(self, key, now, weight=1.0, next_use=0):
        self.t += 1
        self.last[key] = self.t

    def on_insert(self, key, now):
        self.held.add(key)

    def on_evict(self, key):
        self.held.discard(key)

    def victim(self, candidates):
        return min(candidates, key=self.last.__getitem__)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--cache-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    import libcachesim as lcs

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.parquet"
        synthesize(load_preset("mixtral-8x7b"), args.tokens, 0, path, progress=False)
        trace = read_trace(path)
        og = Path(d) / "t.oracleGeneral"
        export_oracle_general(trace, og)
        stream = build_stream(trace, args.cache_size)
        n = stream.keys.size
        slots = args.cache_size * trace.meta.num_layers

        def lcs_lru() -> float:
            reader = lcs.TraceReader(trace=str(og), trace_type=lcs.TraceType.ORACLE_GENERAL_TRACE)
            return 1.0 - float(lcs.LRU(cache_size=slots).process_trace(reader)[0])

        def ours(policy, **kw) -> Callable[[], float]:
            def go() -> float:
                req, hit, _ = replay_stream(stream, policy, **kw)
                return float(hit.sum() / req.sum())
            return go

        contenders = {f"libCacheSim LRU ({slots} slots, C)": lcs_lru,
                      "user plain-Python LRU (layer)": ours(UserLRU),
                      "user LRU, every hook overridden (layer)": ours(UserLRUEveryHook),
                      "arc class path (layer)": ours("arc", force_generic=True)}
        cpu = dict.fromkeys(contenders, float("inf"))
        wall = dict.fromkeys(contenders, float("inf"))
        hit_rate = {}
        for _ in range(args.rounds):
            for name, fn in contenders.items():
                w0, c0 = time.perf_counter(), time.process_time()
                hit_rate[name] = fn()
                cpu[name] = min(cpu[name], time.process_time() - c0)
                wall[name] = min(wall[name], time.perf_counter() - w0)
        peer = next(iter(contenders))
        print(f"{n / 1e6:.2f}M expert requests ({args.tokens} tokens), best of {args.rounds} rounds\n")
        print(f"{'replay':42s} {'M req/s (cpu)':>13s} {'vs peer':>8s} {'M req/s (wall)':>14s} {'hit rate':>8s}")
        for name in contenders:
            print(f"{name:42s} {n / cpu[name] / 1e6:13.2f} {cpu[peer] / cpu[name]:7.3f}x {n / wall[name] / 1e6:14.2f}"
                  f" {hit_rate[name]:8.4f}")


if __name__ == "__main__":
    main()
