"""Questions asked of a sweep table (polars): which policy is best at each slot count, and by how much
each policy beats a baseline policy under otherwise identical conditions."""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from moesim.errors import UsageError

# Everything that makes two rows comparable, except the policy (and its parameters) being compared.
CONDITION_COLUMNS = ("trace", "trace_sha256", "hardware", "prefetch", "prefetch_budget", "batch_size",
                     "execution", "scope", "semantics", "cache_size")
LOWER_IS_BETTER = {"misses", "timing_misses", "ms_per_token", "bytes_h2d", "miss_rate", "stall_ms",
                   "p50_token_ms", "p99_token_ms", "wasted_prefetch_bytes"}


def as_frame(results: pa.Table | pl.DataFrame) -> pl.DataFrame:
    df = results if isinstance(results, pl.DataFrame) else pl.from_arrow(results)
    return df.filter(pl.col("status") == "ok") if "status" in df.columns else df


def default_metric(df: pl.DataFrame) -> str:
    """tokens/s when any cell ran a timing model, else the hit rate."""
    if "tokens_per_s" in df.columns and df["tokens_per_s"].drop_nulls().len():
        return "tokens_per_s"
    return "hit_rate"


def _check(df: pl.DataFrame, metric: str) -> None:
    if metric not in df.columns:
        raise UsageError(f"metric {metric!r} is not a column of the results (columns: {', '.join(df.columns)})")


def _conditions(df: pl.DataFrame) -> list[str]:
    return [c for c in CONDITION_COLUMNS if c in df.columns]


def best_per_size(results: pa.Table | pl.DataFrame, metric: str | None = None) -> pl.DataFrame:
    """One row per condition (trace, hardware, prefetcher, budget, scope, ..., cache size): the best
    policy (with its parameters) by ``metric``, its value, and the runner-up's."""
    df = as_frame(results)
    metric = metric or default_metric(df)
    _check(df, metric)
    df = df.filter(pl.col(metric).is_not_null())
    conds = _conditions(df)
    ranked = df.sort(metric, descending=metric not in LOWER_IS_BETTER, maintain_order=True)
    best = ranked.group_by(conds, maintain_order=True).agg(
        pl.col("policy").first().alias("best_policy"),
        pl.col("params").first().alias("best_params"),
        pl.col(metric).first().alias(metric),
        pl.col(metric).slice(1, 1).first().alias(f"runner_up_{metric}"),
        pl.len().alias("policies"),
    )
    return best.sort(conds)


def versus_baseline(results: pa.Table | pl.DataFrame, baseline: str = "lru", metric: str | None = None) -> pl.DataFrame:
    """Every row with ``<metric>_<baseline>`` (the baseline policy's value under the same conditions;
    default parameters) and ``ratio`` = metric / baseline's (a speed-up for tokens/s; for lower-is-better
    metrics the inverse, so > 1 always means better than the baseline)."""
    df = as_frame(results)
    metric = metric or default_metric(df)
    _check(df, metric)
    df = df.filter(pl.col(metric).is_not_null())
    conds = _conditions(df)
    base = df.filter((pl.col("policy") == baseline) & (pl.col("params") == "{}"))
    if base.is_empty():
        raise UsageError(f"baseline policy {baseline!r} (default parameters) is not in the results")
    base_col = f"{metric}_{baseline}"
    base = base.select([*conds, pl.col(metric).alias(base_col)])
    joined = df.join(base, on=conds, how="left")
    ratio = (pl.col(base_col) / pl.col(metric)) if metric in LOWER_IS_BETTER else (pl.col(metric) / pl.col(base_col))
    return joined.with_columns(ratio.alias("ratio")).select(
        [*conds, "policy", "params", metric, base_col, "ratio"]).sort([*conds, "policy", "params"])
