"""Where a plain-Python policy's replay time goes: the user's own code vs the cache mechanism.

    python benchmarks/profile_generic_path.py [--tokens 20000]

Records every call the mechanism makes into bench_replay's user LRU class during one replay, then
times the same calls made directly on fresh policy objects (a bare loop, its own overhead taken off):
that is the policy's share. The rest of the replay's CPU time is the mechanism's (look-ups, candidate
lists, residency updates, the loop, converting the stream).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

from moesim.simulator.replay import build_stream, replay_stream
from moesim.traces.format import read_trace
from moesim.traces.synth import load_preset, synthesize

sys.path.insert(0, str(Path(__file__).parent))
from bench_replay import UserLRU  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.parquet"
        synthesize(load_preset("mixtral-8x7b"), args.tokens, 0, path, progress=False)
        stream = build_stream(read_trace(path), 4)
    n = stream.keys.size
    log: list[tuple] = []

    class Logged(UserLRU):
        def on_access(self, key, now, weight=1.0, next_use=0):
            log.append((self, key, now, weight, next_use))
            UserLRU.on_access(self, key, now, weight, next_use)

        def victim(self, candidates):
            log.append((self, candidates))
            return UserLRU.victim(self, candidates)

    replay_stream(stream, Logged)
    gc.disable()
    best = {"replay": float("inf"), "on_access": float("inf"), "victim": float("inf")}
    for _ in range(args.rounds):
        fresh = {id(e[0]): UserLRU() for e in log}
        accesses = [(fresh[id(e[0])].on_access, *e[1:]) for e in log if len(e) == 5]
        victims = [(fresh[id(e[0])].victim, e[1]) for e in log if len(e) == 2]
        t0 = time.process_time()
        for f, key, now, weight, next_use in accesses:
            f(key, now, weight, next_use)
        t1 = time.process_time()
        for f, candidates in victims:
            f(candidates)
        t2 = time.process_time()
        for _f, _key, _now, _weight, _next_use in accesses:  # the bare loops' own cost
            pass
        t3 = time.process_time()
        for _f, _candidates in victims:
            pass
        t4 = time.process_time()
        best["on_access"] = min(best["on_access"], (t1 - t0) - (t3 - t2))
        best["victim"] = min(best["victim"], (t2 - t1) - (t4 - t3))
        r0 = time.process_time()
        replay_stream(stream, UserLRU)
        best["replay"] = min(best["replay"], time.process_time() - r0)
    policy = best["on_access"] + best["victim"]
    mechanism = best["replay"] - policy
    print(f"{n / 1e6:.2f}M requests: {len(accesses)} on_access and {len(victims)} victim calls; CPU seconds, "
          f"best of {args.rounds}")
    print(f"replay               {best['replay']:.3f} s  {n / best['replay'] / 1e6:.2f}M requests/s")
    print(f"policy code          {policy:.3f} s  {policy / best['replay']:4.0%}  (on_access {best['on_access']:.3f} s,"
          f" victim {best['victim']:.3f} s)")
    print(f"mechanism (the rest) {mechanism:.3f} s  {mechanism / best['replay']:4.0%}  {mechanism / n * 1e9:.0f} ns/request")


if __name__ == "__main__":
    main()
