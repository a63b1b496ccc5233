"""Every compiled kernel, recompiled with numba's bounds checking on, on a small trace.

numba does not check indices by default, so an out-of-bounds read inside a kernel is silent on small
traces and a random segfault on large ones (the timing kernel once read its next-use placeholder, a
(1, 1) array, for every policy). A fresh process with ``NUMBA_BOUNDSCHECK=1`` turns any such read
into an IndexError.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import numpy as np
    from moesim.policies.base import policy_names
    from moesim.simulator.cost_model import CostModel
    from numba import njit
    from moesim.policies.compiled import ScorePolicy
    from moesim.simulator.replay import mrc, simulate
    from moesim.simulator.timing import simulate_timing
    from moesim.traces.format import DECODE, TraceMeta, TraceWriter, read_trace

    rng = np.random.default_rng(0)
    L, E, k, T = 4, 8, 2, 300
    n = T * L
    experts = np.array([rng.choice(E, k, replace=False) for _ in range(n)])
    pred = np.array([rng.choice(E, k, replace=False) for _ in range(n)])
    pred[::7] = -1
    meta = TraceMeta(model="t", family="mixtral", num_layers=L, num_experts=E, top_k=k)
    path = "{path}"
    with TraceWriter(path, meta, pred_distances=(1, 2)) as w:
        w.write(np.arange(n) // (L * 100), np.arange(n) // L, DECODE, np.arange(n) % L, experts,
                np.full((n, k), 0.5), preds={{1: pred, 2: pred}})
    trace = read_trace(path)
    cost = CostModel.preset("h200")
    for mode in ("replay", "gate"):
        c = cost.with_overrides(engine_mode=mode)
        for policy in ("lru", "fifo", "lfu", "opt"):
            for pf, params in (("none", None), ("previous-token", None), ("transition", None), ("oracle", None),
                               ("speculative", {{"distance": 1}}), ("speculative", {{"distance": 2}})):
                for ready in ("hidden", "gate"):
                    simulate_timing(trace, policy, 3, c, prefetch=pf, prefetch_params=params, engine="numba",
                                    speculative_ready=ready)
    for name in policy_names():
        for scope, size in (("layer", 3), ("global", 12)):
            simulate(trace, name, size, scope=scope)
    for name in policy_names():  # > 16 slots: the heaps (the staircase for hobbit)
        for semantics in ("atomic", "sequential"):
            simulate(trace, name, 24, scope="global", semantics=semantics)
    simulate(trace, "lfu-decay", 24, scope="global", params={{"half_life": 0.2}})  # priorities re-based
    simulate(trace, "lru", 20, scope="global", semantics="sequential")  # the linked-list layouts
    simulate(trace, "fifo", 20, scope="global")
    for name in ("lfu", "opt", "lrfu", "lfu-decay", "gate-weighted"):  # one-pass stack mrc
        mrc(trace, name, [2, 4, 8])

    @njit
    def access(state, key, now, weight):
        state[key, 0] += weight

    @njit
    def score(state, key, now):
        return state[key, 0]

    simulate(trace, ScorePolicy("user", score, access), 3)
    print("ok")
""")


def test_kernels_stay_in_bounds(tmp_path):
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path / "numba"),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = SCRIPT.format(path=tmp_path / "t.parquet")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
