"""Issue 22's replay guard, paired in one process: this tree's compiled kernels against the pre-redesign
kernels (bd85472's one-file ``replay_builtin``), call by call, taking turns on the same stream.

    git worktree add --detach /tmp/base_g bd85472
    MOESIM_THREADS=1 python benchmarks/bench_replay_paired.py --before /tmp/base_g [--tokens 300000] [--pairs 8]

Separate processes, even alternated, swing by 10-20% per row on a shared VM (the same tree against itself);
here each pair runs back to back on one thread and the ratio is taken per pair (``time.thread_time``), so a
slow spell slows both sides. Rows: bench_replay.py's compiled ones (every built-in that bd85472 has, per
layer at --cache-size slots, one global cache at 128 and 256 slots sequential and at 128 atomic). Each row
first checks that both kernels return the same requests and hits.

The old file is loaded from a temporary copy, so numba's cache of the checkout is never touched.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from moesim.policies.resolve import eviction_factory
from moesim.simulator.replay import build_stream, compiled_kernel, kernel_inputs
from moesim.traces.format import read_trace
from moesim.traces.synth import load_preset, synthesize

CONFIGS = (("layer", None, "atomic"), ("global", 128, "sequential"), ("global", 128, "atomic"),
           ("global", 256, "sequential"))


def load_before(tree: Path, tmp: Path):
    """bd85472's ``moesim/simulator/policy_kernels.py`` as a module of its own (it imports only numpy/numba)."""
    src = tree / "moesim" / "simulator" / "policy_kernels.py"
    if not src.is_file():
        raise SystemExit(f"bench_replay_paired: {src} not found (--before must be a checkout of bd85472)")
    copy = tmp / "before_policy_kernels.py"
    shutil.copy(src, copy)
    spec = importlib.util.spec_from_file_location("before_policy_kernels", copy)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def calls(old, stream, policy: str):
    """(before, after) zero-argument calls of one row's kernels."""
    kernel, fparams, rng_state = compiled_kernel(policy, None)
    nxt, weights = kernel_inputs(stream, kernel)
    layout = kernel.layout(stream.sizes, stream.keys.size, fparams)
    s = stream

    def after():
        return kernel.replay(layout, s.cache, s.keys, s.clock, weights, s.group, s.sizes, s.n_keys, s.n_groups,
                             nxt, fparams, rng_state)
    code = old.CODES[policy]
    fp, mt = old.params_of(policy, eviction_factory(policy, None)())
    spec = old.kernel_spec(code, s.sizes, s.keys.size)
    onxt = nxt if code == old.OPT else np.zeros((1, 1), np.int64)
    ow = s.weights if code == old.GATE_WEIGHTED else weights

    def before():
        return old.replay_builtin(spec, s.cache, s.keys, s.clock, ow, s.group, s.sizes, s.n_keys, s.n_groups,
                                  onxt, fp, mt)
    return before, after


def paired(before, after, pairs: int) -> tuple[list[float], list[float]]:
    """Thread-CPU seconds per call, the pair's order alternating."""
    tb, ta = [], []
    for i in range(pairs):
        order = ((before, tb), (after, ta)) if i % 2 == 0 else ((after, ta), (before, tb))
        for fn, acc in order:
            t0 = time.thread_time()
            fn()
            acc.append(time.thread_time() - t0)
    return tb, ta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="a checkout of bd85472")
    ap.add_argument("--tokens", type=int, default=300_000)
    ap.add_argument("--cache-size", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--only", help="policies, comma-separated (default: every one bd85472 has)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = load_before(Path(args.before), Path(tmp))
        path = Path(tmp) / "bench.parquet"
        synthesize(load_preset("mixtral-8x7b"), args.tokens, 0, path, progress=False)
        trace = read_trace(path)
        names = args.only.split(",") if args.only else list(old.CODES)
        print(f"{'row':40s} {'before M/s':>10s} {'after M/s':>10s} {'after/before (median of pairs)':>31s}")
        worst = []
        for scope, slots, semantics in CONFIGS:
            stream = build_stream(trace, slots or args.cache_size, scope, semantics)
            tag = f"layer, K={args.cache_size}" if scope == "layer" else \
                f"global{' atomic' if semantics == 'atomic' else ''}, {slots} slots"
            for name in names:
                before, after = calls(old, stream, name)
                (rb, hb), (ra, ha) = before(), after()   # compiles; both must count the same
                if not (np.array_equal(rb, ra) and np.array_equal(hb, ha)):
                    raise SystemExit(f"bench_replay_paired: {name} ({tag}): before and after disagree")
                tb, ta = paired(before, after, args.pairs)
                n = int(ra.sum())
                ratio = statistics.median(b / a for b, a in zip(tb, ta, strict=True))
                worst.append((ratio, f"{name} ({tag})"))
                flag = "  <-- >5% slower" if ratio < 0.95 else ""
                print(f"{name + ' (' + tag + ')':40s} {n / statistics.median(tb) / 1e6:10.2f} "
                      f"{n / statistics.median(ta) / 1e6:10.2f} {ratio:31.3f}{flag}", flush=True)
        slow = [w for w in worst if w[0] < 0.95]
        print(f"rows >5% slower: {len(slow)} of {len(worst)}; slowest: "
              + ", ".join(f"{label} {r:.3f}" for r, label in sorted(worst)[:3]))


if __name__ == "__main__":
    sys.exit(main())
