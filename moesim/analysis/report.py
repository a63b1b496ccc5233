"""One self-contained HTML report of a trace: metadata, statistics, plots (PNG embedded as base64)
and a policy x slots table of hit rates (and tokens/s when the timing simulator is present)."""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from moesim.analysis import plots, stats
from moesim.analysis.style import human_bytes
from moesim.errors import DataError, UsageError
from moesim.safe_write import atomic_open
from moesim.traces.describe import nested_lines
from moesim.traces.format import Trace

DEFAULT_POLICIES = ("lru", "lfu", "fifo", "opt")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f2f2f2}
td.l,th.l{text-align:left}img{max-width:100%;border:1px solid #eee;margin:.4em 0}
.note{color:#555;font-size:.9em}
"""


IMAGE_FORMATS = {"png": "image/png", "svg": "image/svg+xml"}


def _img(fig, alt: str, fmt: str = "png") -> str:
    """The figure embedded as a data URI (PNG, or SVG for sharp zooming and printing)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=110, bbox_inches="tight")
    plots.plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<img alt='{alt}' src='data:{IMAGE_FORMATS[fmt]};base64,{data}'>"


class _Right(str):
    """A pre-formatted number: text, but right-aligned like the numbers around it."""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return html.escape(str(v))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    # text columns read better left-aligned; numbers stay right-aligned
    body = "".join("<tr>" + "".join(f"<td class=l>{_fmt(c)}</td>" if isinstance(c, str) and not isinstance(c, _Right)
                                    else f"<td>{_fmt(c)}</td>"
                                    for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _df_table(df: pl.DataFrame) -> str:
    return _table(df.columns, df.rows())


def _bytes_text(n: int) -> str:
    if not n:
        return "not recorded (the cost model uses its table for the simulated format)"
    return f"{human_bytes(n)} ({n:,} B)"


def hit_rate_table(trace: Trace, policies: Sequence[str], sizes: Sequence[int]) -> dict[str, dict[int, float]]:
    """policy -> {slots: hit rate}, from one all-sizes pass per policy."""
    from moesim.simulator.replay import mrc

    out: dict[str, dict[int, float]] = {}
    for name in policies:
        curve = mrc(trace, name, list(sizes)).curve
        out[name] = {c["cache_size"]: c["hit_rate"] for c in curve}
    return out


def _memoized(run: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    seen: dict[tuple, dict[str, Any]] = {}

    def wrapped(trace: Trace, policy: str, k: int, hardware: str, **kw: Any) -> dict[str, Any]:
        key = (policy, k, hardware, tuple(sorted(kw.items())))
        if key not in seen:
            seen[key] = run(trace, policy, k, hardware, **kw)
        return seen[key]

    return wrapped


def build_report(trace: Trace, *, policies: Sequence[str] = DEFAULT_POLICIES, sizes: Sequence[int] | None = None,
                 hardware: str = "a6000", raster_layer: int = 0, raster_policy: str = "lru",
                 timing: Callable[..., dict[str, Any]] | None | bool = None,
                 progress: Callable[[str], None] | None = None, image_format: str = "png") -> str:
    """The report as one HTML string. ``timing``: a runner like :func:`plots.timing_runner` returns,
    ``None`` for :func:`plots.timing_runner`, ``False`` to skip tokens/s. ``image_format``:
    how figures are embedded, "png" or "svg"."""
    if image_format not in IMAGE_FORMATS:
        raise UsageError(f"image format {image_format!r} is not one of {', '.join(IMAGE_FORMATS)}")

    def img(fig, alt: str) -> str:
        return _img(fig, alt, image_format)

    step = progress or (lambda _msg: None)
    meta = trace.meta
    sizes = list(sizes or range(meta.top_k, meta.num_experts + 1))
    if timing is None:
        timing = plots.timing_runner()
    parts = [f"<h1>moesim trace report: {html.escape(meta.model)}</h1>"]

    step("statistics")
    summ = stats.summary(trace)
    meta_rows = [("model", meta.model), ("family", meta.family), ("layers", meta.num_layers),
                 ("experts per layer", meta.num_experts), ("top-k", meta.top_k),
                 ("bytes per expert", _bytes_text(meta.expert_bytes)), ("quantization", meta.quantization),
                 ("hidden size", meta.hidden_size), ("created", meta.created), ("source file", trace.path or "")]
    parts.append("<h2>Metadata</h2>" + _table(["key", "value"], meta_rows))
    # one row per provenance entry; nested entries indented under their heading
    prov_rows = [("\u2003" * depth + label, text) for depth, label, text in nested_lines(meta.provenance)]
    parts.append("<h3>Provenance</h3>" + (_table(["what", "value"], prov_rows) if prov_rows
                                          else "<p class=note>none recorded</p>"))
    parts.append("<h2>Statistics</h2>" + _table(["statistic", "value"], list(summ.items())))
    parts.append("<p class=note>normalized entropy: 1 = every expert of a layer equally used. overlap: mean "
                 "fraction of a layer's top-k set kept from one token to the next.</p>")

    step("heatmap")
    parts.append("<h2>Expert activation share</h2>" + img(plots.heatmap(trace), "heatmap"))
    ent = stats.layer_entropy(trace)
    parts.append("<details><summary>per-layer entropy and imbalance</summary>" + _df_table(ent) + "</details>")

    step("hit rates")
    table = hit_rate_table(trace, policies, sizes)
    parts.append("<h2>Hit rate by policy and cache size</h2>"
                 "<p class=note>One cache per MoE layer, cold start, atomic per (token, layer) requests "
                 "(docs/semantics.md). OPT is Belady's bound for demand caching.</p>")
    parts.append(_table(["policy \\ slots", *map(str, sizes)],
                        [[p, *(_Right(f"{100 * table[p][k]:.1f}%") for k in sizes)] for p in policies]))
    parts.append(img(plots.mrc(trace, policies), "mrc"))

    step("tokens/s")
    if timing:
        timing = _memoized(timing)  # the table and the plot share the runs
        tps = {p: {k: float(timing(trace, p, k, hardware)["tokens_per_s"]) for k in sizes} for p in policies}
        parts.append(f"<h2>Simulated decode throughput on {html.escape(hardware)} (tokens/s)</h2>")
        parts.append(_table(["policy \\ slots", *map(str, sizes)], [[p, *(tps[p][k] for k in sizes)] for p in policies]))
        parts.append(img(plots.speed(trace, policies, sizes, hardware, runner=timing), "speed"))
    else:
        parts.append("<p class=note>tokens/s: the timing simulator is not available in this build.</p>")

    step("raster")
    k_r = min(2 * meta.top_k, meta.num_experts)
    parts.append(f"<h2>Residency raster (layer {raster_layer}, {raster_policy}, {k_r} slots)</h2>"
                 + img(plots.raster(trace, raster_layer, raster_policy, k_r), "raster"))

    step("locality")
    parts.append("<h2>Locality</h2>" + img(plots.reuse(trace), "reuse"))
    parts.append("<details><summary>token-to-token persistence per layer</summary>"
                 + _df_table(stats.persistence(trace)) + "</details>")
    parts.append(img(plots.affinity(trace, raster_layer), "affinity"))
    if meta.num_layers > 1:
        parts.append("<details><summary>cross-layer affinity (adjacent layers)</summary>"
                     + _df_table(stats.cross_layer_affinity(trace)) + "</details>")
    parts.append("<h2>Segment-cache bound (arXiv 2505.16056)</h2><p class=note>Best hit rate of a cache "
                 "that knows each window of m tokens in advance and holds its C most used experts "
                 "(loads free). See docs/analysis.md.</p>")
    parts.append(img(plots.segment_bound(trace), "sch"))

    phases = stats.phase_comparison(trace)
    if phases.height:
        parts.append("<h2>Prefill vs decode</h2>" + _df_table(phases))
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>moesim report: "
            f"{html.escape(meta.model)}</title><style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")


def write_report(trace: Trace, out_dir: str | os.PathLike, **kwargs: Any) -> Path:
    """Write ``out_dir/report.html`` (the directory is created if its parent exists)."""
    d = Path(out_dir)
    if not d.is_dir():
        if not d.parent.is_dir():
            raise DataError(d, f"parent directory {str(d.parent)!r} does not exist")
        d.mkdir()
    text = build_report(trace, **kwargs)
    path = d / "report.html"
    with atomic_open(path) as fh:
        fh.write(text)
    return path
