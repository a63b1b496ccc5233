"""The Ray executor on a local Ray instance gives exactly the process pool's results."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from moesim.sweep.executors import ProcessPoolExecutorBackend, RayExecutor
from moesim.sweep.result_store import read_results
from moesim.sweep.spec import SweepSpec, expand
from moesim.sweep.sweep import run_sweep
from tests.helpers import random_trace

ray = pytest.importorskip("ray")

# Everything but where and when a cell ran.
COMPARED = ["cell_id", "trace_sha256", "policy", "params", "cache_size", "scope", "hardware", "prefetch",
            "prefetch_budget", "requests", "hits", "misses", "hit_rate", "tokens_per_s", "ms_per_token", "bytes_h2d",
            "prefetch_precision", "prefetch_recall", "status"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_ray_matches_process_pool_exactly(tmp_path, local_ray):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    rng = np.random.default_rng(11)
    random_trace(a, rng, tokens=50, num_layers=3, num_experts=8, top_k=2)
    random_trace(b, rng, tokens=30, num_layers=2, num_experts=8, top_k=2, skew=0.3)
    spec = SweepSpec(traces=[str(a), str(b)], policies=["lru", "lfu", "opt", "lfu-decay"], cache_sizes=[2, 4, 6],
                     params={"lfu-decay": {"half_life": [8]}}, hardware=["none", "h200"],
                     prefetch=["none", "transition"], prefetch_budgets=[2])
    n = len(expand(spec))
    ray_out, pool_out = tmp_path / "ray.parquet", tmp_path / "pool.parquet"
    executor = RayExecutor(workers=2)
    rep = run_sweep(spec, ray_out, executor, progress=False)
    assert rep.ran == n and rep.failed == 0 and rep.executor == "ray"
    assert ray.is_initialized()  # a Ray it did not start is left running
    run_sweep(spec, pool_out, ProcessPoolExecutorBackend(workers=2), progress=False)
    got = pl.from_arrow(read_results(ray_out)).select(COMPARED).sort("cell_id")
    want = pl.from_arrow(read_results(pool_out)).select(COMPARED).sort("cell_id")
    assert got.height == n and got["tokens_per_s"].null_count() == n // 3  # the hit-rate-only third
    assert got.equals(want)
