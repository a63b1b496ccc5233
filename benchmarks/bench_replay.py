"""Replay speed: every built-in policy compiled, user policies (compiled and plain Python), end to end
from Parquet, and libCacheSim's own implementations measured on the same stream in the same run.

    python benchmarks/bench_replay.py [--tokens 300000] [--repeat 3]

A Mixtral-like synthetic trace (32 layers x top-2 = 64 expert requests per token) is replayed

- per layer (docs/semantics.md, --cache-size slots per layer) with every built-in policy; ratio vs
  libCacheSim's LRU on the same requests;
- as one global cache (``--scope global``) at 128 and 256 slots, every built-in, in the sequential
  semantics (the stream a generic cache simulator sees, exported to oracleGeneral) and, at 128 slots,
  the atomic one; each next to libCacheSim's own implementation of it where it has one (LRU, FIFO,
  LFU = our lfu-cache, ARC, S3FIFO, Sieve, Belady = opt, Random, Clock), else next to its LRU;
- with a user's ScorePolicy (compiled) and a user's plain-Python LRU class (generic path, on a
  --python-tokens slice);
- end to end: ``simulate`` on a freshly read trace (stream building included) and from the Parquet
  file (read + validate + build + replay): every column, the replay's columns only (what
  ``moesim simulate`` reads), on one thread, taking turns; through the on-disk stream cache
  (``moesim simulate``'s default, docs/semantics.md): a miss (read, build, write the entry) and hits;
  and the first call of a fresh process (imports not counted; numba's start-up and cached-kernel
  loads counted), with and without the cache, on every core and on one. Their peer is libCacheSim's
  LRU measured again just before them. The cache lives in a temp directory for the run.

``--only SUBSTRING`` measures only the rows whose label contains it, or one of several separated by commas
(and their peers).

Times are wall clock, best of --repeat. One kernel call runs on one core; a per-layer replay runs its
caches, and the end-to-end rows their validation and stream building, in $MOESIM_THREADS threads
(default: every core; MOESIM_THREADS=1 for one core).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from numba import njit

from moesim.policies import EvictionPolicy, policy_names
from moesim.policies.compiled import ScorePolicy
from moesim.simulator.replay import build_stream, mrc, replay_stream, simulate
from moesim.traces.export import export_oracle_general
from moesim.traces.format import read_trace
from moesim.traces.synth import load_preset, synthesize

LCS_TWIN = {"lru": "LRU", "fifo": "FIFO", "lfu-cache": "LFU", "arc": "ARC", "s3fifo": "S3FIFO", "sieve": "Sieve",
            "opt": "Belady", "random": "Random", "clock": "Clock"}
SLOW = 5e6  # requests/s: a row slower than this on its first timed run is not repeated


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


@njit
def _aged_access(state, key, now, weight):
    state[key, 0] = state[key, 0] * 0.5 ** ((now - state[key, 1]) / 32.0) + weight
    state[key, 1] = now


@njit
def _aged_score(state, key, now):
    return state[key, 0] * 0.5 ** ((now - state[key, 1]) / 32.0)


USER_COMPILED = ScorePolicy("user aged-gate", _aged_score, _aged_access, n_fields=2)


def best_of(repeat: int, fn: Callable[[], object]) -> tuple[object, float]:
    out, best = None, float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=300_000)
    ap.add_argument("--python-tokens", type=int, default=20_000, help="tokens for the plain-Python policy rows")
    ap.add_argument("--cache-size", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", metavar="SUBSTRING[,SUBSTRING...]",
                    help="measure only the rows whose label contains SUBSTRING, or one of several separated by"
                         " commas (and the peers they are compared with)")
    args = ap.parse_args()
    import libcachesim as lcs

    def want(label: str) -> bool:
        return args.only is None or any(part in label for part in args.only.split(","))

    rows: list[tuple[str, str, int, float, float, str]] = []  # name, method, requests, seconds, hit rate, peer

    def row(name, method, requests, dt, hr, peer=""):
        rows.append((name, method, requests, dt, hr, peer))

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bench.parquet"
        _, t_syn = best_of(1, lambda: synthesize(load_preset("mixtral-8x7b"), args.tokens, 0, path, progress=False))
        trace = read_trace(path)
        L = trace.meta.num_layers
        n_req = len(trace) * trace.meta.top_k
        small_path = Path(d) / "small.parquet"
        synthesize(load_preset("mixtral-8x7b"), args.python_tokens, 0, small_path, progress=False)
        small = read_trace(small_path)
        print(f"trace: {args.tokens} tokens, {n_req / 1e6:.1f}M expert requests (synthesised in {t_syn:.1f} s)")
        og = Path(d) / "bench.oracleGeneral"
        export_oracle_general(trace, og)

        def lcs_run(cls: str, size: int) -> tuple[float, float]:
            def go():
                reader = lcs.TraceReader(trace=str(og), trace_type=lcs.TraceType.ORACLE_GENERAL_TRACE)
                return getattr(lcs, cls)(cache_size=size).process_trace(reader)[0]
            miss, dt = best_of(args.repeat, go)
            return dt, 1.0 - float(miss)

        # per layer, every built-in, compiled
        stream = build_stream(trace, args.cache_size)
        per_layer = [f"{name} (layer, K={args.cache_size})" for name in policy_names()] + \
            ["user ScorePolicy (layer)", "user plain-Python LRU (layer)", "arc class path (layer)"]
        if any(map(want, per_layer)):
            lcs_lru_dt, lcs_lru_hr = lcs_run("LRU", args.cache_size * L)
        for name in policy_names():
            if not want(f"{name} (layer, K={args.cache_size})"):
                continue
            replay_stream(stream, name)  # compile / load from the numba cache
            (req, hit, method), dt = best_of(args.repeat, lambda name=name: replay_stream(stream, name))
            row(f"{name} (layer, K={args.cache_size})", method, int(req.sum()), dt, hit.sum() / req.sum(),
                "LRU")
        if want("user ScorePolicy (layer)"):
            replay_stream(stream, USER_COMPILED)
            (req, hit, method), dt = best_of(args.repeat, lambda: replay_stream(stream, USER_COMPILED))
            row("user ScorePolicy (layer)", method, int(req.sum()), dt, hit.sum() / req.sum(), "LRU")
        small_stream = build_stream(small, args.cache_size)
        if want("user plain-Python LRU (layer)"):
            (req, hit, method), dt = best_of(args.repeat, lambda: replay_stream(small_stream, UserLRU))
            row("user plain-Python LRU (layer)", method, int(req.sum()), dt, hit.sum() / req.sum(), "LRU")
        if want("arc class path (layer)"):
            (req, hit, method), dt = best_of(args.repeat,
                                             lambda: replay_stream(small_stream, "arc", force_generic=True))
            row("arc class path (layer)", method, int(req.sum()), dt, hit.sum() / req.sum(), "LRU")
        peers = {}
        if any(map(want, per_layer)):
            row(f"libCacheSim LRU ({args.cache_size * L} slots)", "C", n_req, lcs_lru_dt, lcs_lru_hr, "LRU")
            peers["LRU"] = n_req / lcs_lru_dt

        # one global cache, every built-in: each next to libCacheSim's own implementation (its LRU if none)
        for slots, semantics in ((128, "sequential"), (128, "atomic"), (256, "sequential")):
            tag = "global" if semantics == "sequential" else "global atomic"
            if not any(want(f"{name} ({tag}, {slots} slots)") for name in policy_names()):
                continue
            g = build_stream(trace, slots, "global", semantics)
            warm = build_stream(small, slots, "global", semantics)
            for name in policy_names():
                if not want(f"{name} ({tag}, {slots} slots)"):
                    continue
                replay_stream(warm, name)  # compile / load from the numba cache, on the small trace
                (req, hit, method), dt = best_of(1, lambda name=name, g=g: replay_stream(g, name))
                if req.sum() / dt >= SLOW and args.repeat > 1:
                    (req, hit, method), dt2 = best_of(args.repeat - 1, lambda name=name, g=g: replay_stream(g, name))
                    dt = min(dt, dt2)
                twin = LCS_TWIN.get(name, "LRU")
                peer = f"{twin}@{slots}"
                row(f"{name} ({tag}, {slots} slots)", method, int(req.sum()), dt, hit.sum() / req.sum(), peer)
                if peer not in peers:
                    ldt, lhr = lcs_run(twin, slots)
                    peers[peer] = n_req / ldt
                    row(f"libCacheSim {twin} ({slots} slots)", "C", n_req, ldt, lhr, peer)

        # end to end; the peer measured again right here (the machine's load drifts over a run)
        e2e_peer = "LRU, again"
        variants = {"every column": (lambda: read_trace(path), None),
                    "replay columns": (lambda: read_trace(path, lazy=True), None),
                    "replay cols, 1 thread": (lambda: read_trace(path, lazy=True), "1"),
                    "stream cache hit": (lambda: read_trace(path, lazy=True, replay_cache=True), None),
                    "stream cache hit, 1 thread": (lambda: read_trace(path, lazy=True, replay_cache=True), "1")}
        fresh = {"  replay columns, fresh process": (False, None),
                 "lru from Parquet, fresh process, 1 thread": (False, "1"),
                 "lru from Parquet, cache hit, fresh process": (True, None),
                 "lru from Parquet, cache hit, fresh, 1 thread": (True, "1")}
        variants = {k: v for k, v in variants.items() if want(f"lru from Parquet, {k}")}
        fresh = {k: v for k, v in fresh.items() if want(k)}
        e2e = ["lru end to end (stream build + replay)", "lru from Parquet, stream cache miss (+ write)"]
        if variants or fresh or any(map(want, e2e)):
            ldt, lhr = lcs_run("LRU", args.cache_size * L)
            peers[e2e_peer] = n_req / ldt
            row(f"libCacheSim LRU ({args.cache_size * L} slots), again", "C", n_req, ldt, lhr, e2e_peer)
        if want(e2e[0]):
            r, dt = best_of(args.repeat, lambda: simulate(_fresh(trace), "lru", args.cache_size))
            row(e2e[0], r.method, r.requests, dt, r.hit_rate, e2e_peer)
        # the stream cache (a private one): a miss builds the stream and writes the entry, later runs hit it
        os.environ["MOESIM_CACHE_DIR"] = str(Path(d) / "cache")
        os.environ.pop("MOESIM_NO_CACHE", None)
        if want(e2e[1]):
            best_miss = float("inf")
            for _ in range(args.repeat):
                shutil.rmtree(Path(d) / "cache", ignore_errors=True)
                gc.collect()
                t0 = time.perf_counter()
                r = simulate(read_trace(path, lazy=True, replay_cache=True), "lru", args.cache_size)
                best_miss = min(best_miss, time.perf_counter() - t0)
            row(e2e[1], r.method, r.requests, best_miss, r.hit_rate, e2e_peer)
        if any(cached for cached, _ in fresh.values()) or any("cache" in label for label in variants):
            simulate(read_trace(path, lazy=True, replay_cache=True), "lru", args.cache_size)  # the entry
        # from Parquet: the variants take turns (the machine's load drifts; each gets the same chances)
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(max(args.repeat, 5) if variants else 0):
            for label, (read, n_threads) in variants.items():
                if n_threads:
                    os.environ["MOESIM_THREADS"] = n_threads  # row checks, stream and replay on one core
                gc.collect()
                t0 = time.perf_counter()
                r = simulate(read(), "lru", args.cache_size)
                best[label] = min(best[label], time.perf_counter() - t0)
                os.environ.pop("MOESIM_THREADS", None)
        for label, dt in best.items():
            row(f"lru from Parquet, {label}", r.method, r.requests, dt, r.hit_rate, e2e_peer)
        # what `moesim simulate` pays once per process on top: numba's start-up and cache loads
        for label, (cached, n_threads) in fresh.items():
            dt, hits = min(_fresh_process_run(path, args.cache_size, cached, n_threads) for _ in range(args.repeat))
            row(label, "numba", n_req, dt, hits / n_req, e2e_peer)

        print(f"\n{'replay':46s} {'method':7s} {'requests':>10s} {'seconds':>8s} {'M req/s':>8s} {'vs peer':>16s}"
              f" {'hit rate':>8s}")
        for name, method, req, dt, hr, peer in rows:
            rate = req / dt
            ratio = f"{rate / peers[peer]:.2f}x {peer}" if peer in peers else "-"
            print(f"{name:46s} {method:7s} {req:10d} {dt:8.3f} {rate / 1e6:8.2f} {ratio:>16s} {hr:8.4f}")
        one = next((dt for name, _, _, dt, _, _ in rows if name.startswith("lru end to end (stream")), None)
        print()
        for name in ("lru", "opt", "arc"):
            if not want(f"mrc {name}"):
                continue
            c, dt = best_of(1, lambda name=name: mrc(trace, name))
            ratio = "" if one is None else f" = {dt / one:.2f}x one end-to-end lru replay"
            print(f"mrc {name} over {len(c.curve)} sizes ({c.method}): {dt:.2f} s{ratio}")


def _fresh_process_run(path: Path, cache_size: int, cached: bool = False,
                       n_threads: str | None = None) -> tuple[float, int]:
    """(seconds, hits) of read_trace + simulate, the first call in a new interpreter: imports not counted,
    numba's start-up and cached-kernel loads counted. ``cached``: through the stream cache (as
    ``moesim simulate`` does)."""
    code = ("import sys, time; from moesim.simulator.replay import simulate; from moesim.traces.format import read_trace;"
            "t0 = time.perf_counter();"
            "r = simulate(read_trace(sys.argv[1], lazy=True, replay_cache=sys.argv[3] == '1'), 'lru', int(sys.argv[2]));"
            "print(time.perf_counter() - t0, r.hits)")
    env = {**os.environ, **({"MOESIM_THREADS": n_threads} if n_threads else {})}
    out = subprocess.run([sys.executable, "-c", code, str(path), str(cache_size), "1" if cached else "0"], check=True,
                         capture_output=True, text=True, env=env)
    dt, hits = out.stdout.strip().splitlines()[-1].split()
    return float(dt), int(hits)


def _fresh(trace):
    """The same trace as a new object (the request stream is memoised per Trace object)."""
    from moesim.traces.format import Trace

    return Trace(trace.meta, trace.table, trace.path)


if __name__ == "__main__":
    main()
