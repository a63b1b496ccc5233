"""The common views of a sweep table: a metric against slot count, one line per policy (and parameter
setting), one panel per trace x hardware x prefetcher x budget. Panels share their y-axis, titles
name the trace and the hardware, labels are words (not column names), and the policies keep the
styles of every other moesim figure (:mod:`moesim.analysis.style`)."""

from __future__ import annotations

import os
from typing import Any

import polars as pl
import pyarrow as pa

from moesim.sweep.analysis import as_frame, default_metric
from moesim.sweep.spec import NO_EXECUTION, NO_HARDWARE, NO_PREFETCH

PANEL_COLUMNS = ("trace", "hardware", "prefetch", "prefetch_budget", "scope", "semantics", "batch_size",
                 "execution")
_PARAM_LINESTYLES = ["-", "--", ":", "-."]


def _label(policy: str, params: str) -> str:
    if params in ("{}", "", None):
        return policy
    import json

    try:
        values = json.loads(params)
    except ValueError:
        return f"{policy} {params}"
    return f"{policy} " + ", ".join(f"{k}={v}" for k, v in values.items())


def panel_title(row: dict[str, Any]) -> str:
    """"real.parquet on a6000, transition prefetch (budget 2)" / "real.parquet, hit-rate replay"."""
    trace = os.path.basename(str(row.get("trace", "")))
    hw = row.get("hardware")
    parts = [f"{trace} on {hw}" if hw and hw != NO_HARDWARE else f"{trace}, hit-rate replay (no hardware)"]
    pf = row.get("prefetch")
    if hw and hw != NO_HARDWARE and pf and pf != NO_PREFETCH:
        parts.append(f"{pf} prefetch (budget {row.get('prefetch_budget')})")
    if row.get("execution") not in (None, NO_EXECUTION):
        parts.append(f"{row['execution']} execution")
    if (row.get("batch_size") or 1) > 1:
        parts.append(f"batch {row['batch_size']}")
    if row.get("scope") not in (None, "layer"):
        parts.append(f"{row['scope']} cache")
    if row.get("semantics") not in (None, "atomic"):
        parts.append(f"{row['semantics']} requests")
    return ", ".join(parts)


def plot_sweep(results: pa.Table | pl.DataFrame, out: str | os.PathLike, metric: str | None = None) -> int:
    """Write a figure (format from the suffix: .png, .svg, .pdf) to ``out``; returns the number of panels."""
    import matplotlib.pyplot as plt

    from moesim.analysis.style import figure_format
    from moesim.safe_write import atomic_path

    fmt = figure_format(out)  # a bad suffix fails before any drawing
    fig, n = sweep_figure(results, metric)
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format=fmt, dpi=120)
    finally:
        plt.close(fig)
    return n


def sweep_figure(results: pa.Table | pl.DataFrame, metric: str | None = None):
    """(Figure, number of panels): ``metric`` (default tokens/s, else hit rate) against slot count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moesim.analysis.style import metric as metric_info
    from moesim.analysis.style import policy_label, policy_style

    df = as_frame(results)
    metric = metric or default_metric(df)
    if metric not in df.columns:
        from moesim.errors import UsageError

        raise UsageError(f"metric {metric!r} is not a column of the results (columns: {', '.join(df.columns)})")
    df = df.filter(pl.col(metric).is_not_null())
    info = metric_info(metric)
    panels_by = [c for c in PANEL_COLUMNS if c in df.columns and df[c].n_unique() > 1]
    panels = df.partition_by(panels_by, as_dict=True, maintain_order=True) if panels_by else {(): df}
    n = len(panels)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows + 0.9), squeeze=False, sharey=True)
    policies = list(dict.fromkeys(df["policy"].to_list()))
    handles: dict[str, Any] = {}
    for ax, part in zip(axes.flat, panels.values(), strict=False):
        for (policy, params), line in part.sort("cache_size").group_by(["policy", "params"], maintain_order=True):
            style = policy_style(policy, policies.index(policy))
            variants = part.filter(pl.col("policy") == policy)["params"].unique(maintain_order=True).to_list()
            kw = style.kwargs()
            if len(variants) > 1:  # parameter settings of one policy: same colour, own dash
                kw["linestyle"] = _PARAM_LINESTYLES[variants.index(params) % len(_PARAM_LINESTYLES)]
            label = _label(policy_label(policy), params)
            (h,) = ax.plot(line["cache_size"], line[metric] * info.scale, label=label, **kw)
            handles.setdefault(label, h)
        ax.set_title(panel_title(part.row(0, named=True)), fontsize=9.5)
        ax.set_xlabel("expert slots per layer cache")
        _slot_ticks(ax, part["cache_size"].unique().sort().to_list())
        ax.grid(alpha=0.3)
        ax.tick_params(labelleft=True)  # shared y keeps its numbers on every panel
    for ax in axes[:, 0]:
        ax.set_ylabel(info.label)
    spare = list(axes.flat)[n:]
    for ax in spare:
        ax.set_visible(False)
    if info.scale == 100.0:
        axes[0, 0].set_ylim(0, 100)
    else:
        axes[0, 0].set_ylim(bottom=0)
    fig.suptitle(f"{info.label[0].upper()}{info.label[1:]} vs expert slots", fontsize=12)
    if spare:  # an empty panel slot holds the legend
        fig.tight_layout()
        box = spare[0].get_position()
        fig.legend(list(handles.values()), list(handles), title="policy", loc="center",
                   bbox_to_anchor=(box.x0 + box.width / 2, box.y0 + box.height / 2), frameon=False,
                   ncol=1 + len(handles) // 8)
    else:  # below the panels, never over a curve
        legend = _legend_below(fig, handles)
        height = legend.get_window_extent(fig.canvas.get_renderer()).height / fig.bbox.height
        fig.tight_layout(rect=(0, min(0.6, height + 0.02), 1, 1))
    return fig, n


def _slot_ticks(ax, sizes: list[int]) -> None:
    """Slot counts are whole: tick the sizes swept (a few), else integer ticks (never 2.5 slots)."""
    from matplotlib.ticker import MaxNLocator

    if 0 < len(sizes) <= 12:
        ax.set_xticks(sizes)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend_below(fig, handles: dict[str, Any]):
    """A figure legend at the bottom with as many columns (at most 6) as fit the figure's width: long
    labels (parameter settings) go onto more rows instead of past the right edge."""
    renderer = fig.canvas.get_renderer()
    ncol = min(len(handles), 6)
    while True:
        legend = fig.legend(list(handles.values()), list(handles), title="policy", loc="lower center",
                            ncol=ncol, frameon=False, bbox_to_anchor=(0.5, 0.0))
        if ncol == 1 or legend.get_window_extent(renderer).width <= 0.98 * fig.bbox.width:
            return legend
        legend.remove()
        ncol -= 1
