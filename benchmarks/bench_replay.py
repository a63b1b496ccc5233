"""Replay speed: every built-in policy, a plain-Python user policy and libCacheSim on the same stream.

    python benchmarks/bench_replay.py [--tokens 1000000]

Generates a Mixtral-like synthetic trace (32 layers x top-2: tokens x 64 expert requests), replays it
per layer (docs/semantics.md) with every policy, then exports the same request stream to
oracleGeneral and times libCacheSim's LRU on it in the same run (one global cache, sequential).
Prints requests/s and ratios; also `mrc` over all sizes vs one single-size replay. One core: the
compiled kernels run single-threaded.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from moesim.policies import EvictionPolicy, policy_names
from moesim.simulator.replay import build_stream, mrc, replay_stream, simulate
from moesim.traces.export import export_oracle_general
from moesim.traces.format import read_trace
from moesim.traces.synth import load_preset, synthesize


class UserLRU(EvictionPolicy):
    """What a user writes: a dict of last-use ticks."""

    name = "user-lru"

    def __init__(self) -> None:
        self.t = 0
        self.last: dict[int, int] = {}

    def on_access(self, key, now, weight=1.0, next_use=0):
        self.t += 1
        self.last[key] = self.t

    def victim(self, candidates):
        return min(candidates, key=self.last.__getitem__)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--python-tokens", type=int, default=20_000, help="tokens for the pure-Python policies")
    ap.add_argument("--cache-size", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bench.parquet"
        _, t_syn = timed(lambda: synthesize(load_preset("mixtral-8x7b"), args.tokens, 0, path, progress=False))
        trace = read_trace(path)
        small_path = Path(d) / "small.parquet"
        synthesize(load_preset("mixtral-8x7b"), args.python_tokens, 0, small_path, progress=False)
        small = read_trace(small_path)
        n_req = len(trace) * trace.meta.top_k
        print(f"trace: {args.tokens} tokens, {n_req / 1e6:.1f}M expert requests (synthesised in {t_syn:.1f} s)")
        stream, t_stream = timed(lambda: build_stream(trace, args.cache_size))
        small_stream = build_stream(small, args.cache_size)
        print(f"building the request stream (once, shared by the runs below): {t_stream:.2f} s")
        for name in ("lru", "opt"):
            replay_stream(small_stream, name)  # JIT warm-up (cached on disk after the first run)
        rows = []
        for name in policy_names():
            fast = name in ("lru", "fifo", "lfu", "opt")
            st = stream if fast else small_stream
            runs = [timed(lambda st=st, name=name: replay_stream(st, name)) for _ in range(3 if fast else 1)]
            (req, hit, method), dt = min(runs, key=lambda x: x[1])  # best of 3 for the compiled kernels
            rows.append((name, method, int(req.sum()), dt, hit.sum() / req.sum()))
        (req, hit, method), dt = timed(lambda: replay_stream(small_stream, UserLRU))
        rows.append(("user-lru (plain Python)", method, int(req.sum()), dt, hit.sum() / req.sum()))
        r, dt = timed(lambda: simulate(trace, "lru", args.cache_size))
        rows.append(("lru end-to-end (incl. stream build)", r.method, r.requests, dt, r.hit_rate))
        og = Path(d) / "bench.oracleGeneral"
        export_oracle_general(trace, og)
        lcs_rate = None
        try:
            import libcachesim as lcs

            dt = min(timed(lambda: lcs.LRU(cache_size=args.cache_size * trace.meta.num_layers).process_trace(
                lcs.TraceReader(trace=str(og), trace_type=lcs.TraceType.ORACLE_GENERAL_TRACE)))[1] for _ in range(3))
            lcs_rate = n_req / dt
            ours, dt2 = timed(lambda: simulate(trace, "lru", args.cache_size * trace.meta.num_layers,
                                               scope="global", semantics="sequential"))
            rows.append(("lru global sequential", ours.method, ours.requests, dt2, ours.hit_rate))
            rows.append(("libCacheSim LRU (same stream)", "C", n_req, dt, float("nan")))
        except ImportError:
            print("libcachesim not installed: no peer row")
        print(f"\n{'policy':32s} {'method':8s} {'requests':>11s} {'seconds':>8s} {'M req/s':>8s} {'vs libCacheSim':>14s}"
              f" {'hit rate':>8s}")
        for name, method, req, dt, hr in rows:
            rate = req / dt
            ratio = f"{rate / lcs_rate:.2f}x" if lcs_rate else "-"
            print(f"{name:32s} {method:8s} {req:11d} {dt:8.2f} {rate / 1e6:8.2f} {ratio:>14s} {hr:8.4f}")
        one = next(dt for name, _, _, dt, _ in rows if name == "lru end-to-end (incl. stream build)")
        for name in ("lru", "opt"):
            c, dt = timed(lambda name=name: mrc(trace, name))
            print(f"mrc {name} over {len(c.curve)} sizes ({c.method}): {dt:.2f} s = {dt / one:.2f}x one end-to-end lru replay")


if __name__ == "__main__":
    main()
