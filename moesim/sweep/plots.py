"""The common views of a sweep table: a metric against slot count, one line per policy (and parameter
setting), one panel per trace x hardware x prefetcher x budget."""

from __future__ import annotations

import os

import polars as pl
import pyarrow as pa

from moesim.sweep.analysis import as_frame, default_metric

PANEL_COLUMNS = ("trace", "hardware", "prefetch", "prefetch_budget", "scope", "semantics", "batch_size")

# Axis labels that say WHICH hit rate (or speed) a panel shows; other columns are labelled by name.
METRIC_LABELS = {
    "hit_rate": "hit rate (exact demand replay)",
    "timing_hit_rate": "hit rate in the timing run (prefetched experts count)",
    "tokens_per_s": "decode tokens/s (simulated)",
    "ms_per_token": "ms per decode token (simulated)",
    "prefetch_precision": "prefetch precision",
    "prefetch_recall": "prefetch recall",
}


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def _label(policy: str, params: str) -> str:
    return policy if params in ("{}", "", None) else f"{policy} {params}"


def plot_sweep(results: pa.Table | pl.DataFrame, out: str | os.PathLike, metric: str | None = None) -> tuple[int, str]:
    """Write a figure (format from the suffix) to ``out``; returns the number of panels and the
    metric plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moesim.atomic import atomic_path

    df = as_frame(results)
    metric = metric or default_metric(df)
    if metric not in df.columns:
        from moesim.errors import UsageError

        raise UsageError(f"metric {metric!r} is not a column of the results (columns: {', '.join(df.columns)})")
    df = df.filter(pl.col(metric).is_not_null())
    panels_by = [c for c in PANEL_COLUMNS if c in df.columns and df[c].n_unique() > 1]
    panels = df.partition_by(panels_by, as_dict=True, maintain_order=True) if panels_by else {(): df}
    n = len(panels)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (key, part) in zip(axes.flat, panels.items(), strict=False):
        for (policy, params), line in part.sort("cache_size").group_by(["policy", "params"], maintain_order=True):
            ax.plot(line["cache_size"], line[metric], marker="o", label=_label(policy, params))
        title = ", ".join(f"{c}={os.path.basename(str(v)) if c == 'trace' else v}"
                          for c, v in zip(panels_by, key, strict=True))
        ax.set_title(title or metric_label(metric), fontsize=9)
        ax.set_xlabel("expert slots per cache")
        ax.set_ylabel(metric_label(metric))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    suffix = os.path.splitext(str(out))[1] or ".png"
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=suffix.lstrip("."), dpi=120)
    plt.close(fig)
    return n, metric
