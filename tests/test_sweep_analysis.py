"""Analysis helpers over a hand-made results table (values chosen so every answer is known)."""

from __future__ import annotations

import polars as pl
import pytest

from moesim.errors import UsageError
from moesim.sweep.analysis import best_per_size, default_metric, versus_baseline


def _table(with_timing: bool = False) -> pl.DataFrame:
    rows = []
    # (policy, params, cache_size, hit_rate, ms_per_token)
    for policy, params, k, hr, ms in [
        ("lru", "{}", 2, 0.40, 10.0), ("lfu", "{}", 2, 0.45, 9.0), ("opt", "{}", 2, 0.50, 8.0),
        ("lru", "{}", 4, 0.70, 5.0), ("lfu", "{}", 4, 0.65, 6.0), ("lfu-decay", '{"half_life": 8}', 4, 0.75, 4.0),
    ]:
        rows.append({"cell_id": f"{policy}{params}{k}", "trace": "t.parquet", "trace_sha256": "s", "policy": policy,
                     "params": params, "cache_size": k, "scope": "layer", "semantics": "atomic", "prefetch": "none",
                     "prefetch_budget": 0, "hardware": "h200" if with_timing else "none", "batch_size": 1,
                     "hit_rate": hr, "ms_per_token": ms if with_timing else None,
                     "tokens_per_s": 1000.0 / ms if with_timing else None, "status": "ok"})
    rows.append({**rows[0], "cell_id": "broken", "policy": "arc", "hit_rate": None, "status": "error"})
    return pl.DataFrame(rows, infer_schema_length=None)


def test_best_per_size_hit_rate():
    best = best_per_size(_table())
    assert best.select(["cache_size", "best_policy", "best_params", "hit_rate", "runner_up_hit_rate", "policies"]).rows() == [
        (2, "opt", "{}", 0.50, 0.45, 3), (4, "lfu-decay", '{"half_life": 8}', 0.75, 0.70, 3)]


def test_lower_is_better_metric_ranks_ascending():
    best = best_per_size(_table(with_timing=True), "ms_per_token")
    assert best["best_policy"].to_list() == ["opt", "lfu-decay"]
    assert best["ms_per_token"].to_list() == [8.0, 4.0]


def test_default_metric_prefers_tokens_per_s():
    assert default_metric(_table()) == "hit_rate"
    assert default_metric(_table(with_timing=True)) == "tokens_per_s"


def test_versus_baseline_ratios():
    v = versus_baseline(_table(with_timing=True), "lru").filter(pl.col("cache_size") == 4)
    ratios = dict(zip(v["policy"], v["ratio"], strict=True))
    assert ratios["lru"] == pytest.approx(1.0)
    assert ratios["lfu"] == pytest.approx(5.0 / 6.0)  # tokens/s: 1000/6 vs 1000/5
    assert ratios["lfu-decay"] == pytest.approx(5.0 / 4.0)
    ms = versus_baseline(_table(with_timing=True), "lru", "ms_per_token").filter(pl.col("cache_size") == 4)
    assert dict(zip(ms["policy"], ms["ratio"], strict=True))["lfu-decay"] == pytest.approx(5.0 / 4.0)  # inverted: >1 is better
    assert "arc" not in v["policy"].to_list()  # error rows are not compared


def test_missing_baseline_or_metric_is_a_usage_error():
    with pytest.raises(UsageError, match="baseline policy 'fifo'"):
        versus_baseline(_table(), "fifo")
    with pytest.raises(UsageError, match="metric 'speed'"):
        best_per_size(_table(), "speed")
