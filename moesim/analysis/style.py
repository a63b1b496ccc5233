"""One look for every figure: policy and prefetcher styles, readable metric labels, byte units, and
the output format taken from the file name.

Colours: Okabe-Ito (safe for the common colour-vision deficiencies) extended with Paul Tol's muted
colours, so each of the built-in policies has a colour of its own; the line style says the family
(solid = recency/FIFO-like, dashed = frequency-like, dotted = random) and the marker tells apart
lines whose colours are close. OPT, the bound, is the only black line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moesim.errors import SettingError, UsageError
from moesim.traces.describe import human_bytes  # noqa: F401  (re-exported: figures show bytes in MB/GB)

OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000"]
# categorical colours for anything without a fixed style (no pale yellow: thin lines on white)
CATEGORY_COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#882255", "#44AA99",
                   "#332288", "#999933", "#AA4499", "#777777"]

RECENCY, FREQUENCY, OTHER, BOUND = "recency", "frequency", "other", "bound"
FAMILY_LINESTYLE = {RECENCY: "-", FREQUENCY: "--", OTHER: ":", BOUND: "-"}


@dataclass(frozen=True)
class LineStyle:
    color: str
    marker: str
    family: str

    def kwargs(self, **extra: Any) -> dict[str, Any]:
        bound = self.family == BOUND
        kw: dict[str, Any] = dict(color=self.color, marker=self.marker, linestyle=FAMILY_LINESTYLE[self.family],
                                  linewidth=2.6 if bound else 1.6, markersize=6 if bound else 4.5,
                                  zorder=4 if bound else 3)
        kw.update(extra)
        return kw


POLICY_STYLES: dict[str, LineStyle] = {
    "lru": LineStyle("#0072B2", "o", RECENCY),
    "fifo": LineStyle("#56B4E9", "s", RECENCY),
    "sieve": LineStyle("#44AA99", "^", RECENCY),
    "s3fifo": LineStyle("#332288", "D", RECENCY),
    "arc": LineStyle("#AA4499", "v", RECENCY),
    "lfu": LineStyle("#D55E00", "o", FREQUENCY),
    "lfu-cache": LineStyle("#E69F00", "s", FREQUENCY),
    "lfu-decay": LineStyle("#999933", "^", FREQUENCY),
    "gate-weighted": LineStyle("#882255", "D", FREQUENCY),
    "lrfu": LineStyle("#CC79A7", "v", FREQUENCY),
    "hobbit": LineStyle("#009E73", "P", FREQUENCY),
    "least-stale": LineStyle("#88CCEE", "<", RECENCY),
    "lfru": LineStyle("#117733", "<", FREQUENCY),
    "mrs": LineStyle("#661100", ">", FREQUENCY),
    "random": LineStyle("#777777", "x", OTHER),
    "opt": LineStyle("#000000", "*", BOUND),
}
FAMILY_NAMES = {RECENCY: "recency / FIFO", FREQUENCY: "frequency", OTHER: "other", BOUND: "bound"}
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]

PREFETCH_STYLES: dict[str, LineStyle] = {
    "none": LineStyle("#777777", "x", OTHER),
    "previous-token": LineStyle("#0072B2", "o", RECENCY),
    "transition": LineStyle("#D55E00", "s", RECENCY),
    "speculative": LineStyle("#009E73", "^", RECENCY),
    "oracle": LineStyle("#000000", "*", BOUND),
}


def policy_style(name: str, index: int = 0) -> LineStyle:
    """The fixed style of a built-in policy; others (a user's) cycle through colours and markers."""
    if name in POLICY_STYLES:
        return POLICY_STYLES[name]
    return LineStyle(CATEGORY_COLORS[index % len(CATEGORY_COLORS)], _MARKERS[index % len(_MARKERS)], OTHER)


def prefetcher_style(name: str, index: int = 0) -> LineStyle:
    if name in PREFETCH_STYLES:
        return PREFETCH_STYLES[name]
    return LineStyle(CATEGORY_COLORS[index % len(CATEGORY_COLORS)], _MARKERS[index % len(_MARKERS)], RECENCY)


def policy_label(name: str) -> str:
    return "opt (Belady bound)" if name == "opt" else name


# ---- metrics: readable labels and display scale ----------------------------------------------------

@dataclass(frozen=True)
class Metric:
    label: str
    scale: float = 1.0  # multiply stored values by this for display


METRICS: dict[str, Metric] = {
    "hit_rate": Metric("hit rate, exact replay (%)", 100.0),
    "timing_hit_rate": Metric("hit rate in the timing run, prefetches included (%)", 100.0),
    "tokens_per_s": Metric("decode throughput (tokens/s)"),
    "decode_tokens_per_s": Metric("decode throughput (tokens/s)"),
    "prefill_tokens_per_s": Metric("prefill throughput (tokens/s)"),
    "ms_per_token": Metric("time per token (ms)"),
    "tpot_ms": Metric("time per output token (ms)"),
    "p50_token_ms": Metric("median token time (ms)"),
    "p99_token_ms": Metric("99th-percentile token time (ms)"),
    "stall_ms": Metric("time stalled on copies (ms)"),
    "bytes_h2d": Metric("host-to-device traffic (GB)", 1e-9),
    "wasted_prefetch_bytes": Metric("prefetched but unused (GB)", 1e-9),
    "prefetch_precision": Metric("prefetch precision (%)", 100.0),
    "prefetch_recall": Metric("prefetch recall (%)", 100.0),
    "expert_recall": Metric("expert recall (%)", 100.0),
    "cache_recall": Metric("cache recall (%)", 100.0),
    "cache_precision": Metric("cache precision (%)", 100.0),
    "hits": Metric("hits"),
    "misses": Metric("misses"),
}


def metric(name: str) -> Metric:
    """Label and scale of a results column; an unknown one gets its name with spaces (and % when
    it is a rate or ratio stored as a fraction)."""
    if name in METRICS:
        return METRICS[name]
    if name.endswith(("_rate", "_precision", "_recall")):
        return Metric(name.replace("_", " ") + " (%)", 100.0)
    if name.endswith("bytes") or "_bytes" in name:
        return Metric(name.replace("_", " ") + " (GB)", 1e-9)
    return Metric(name.replace("_", " "))


# ---- output format -----------------------------------------------------------------------------------

FORMATS = ("png", "svg", "pdf")
_ALIASES = {"svgz": "svgz", "jpg": "jpg", "jpeg": "jpeg", "eps": "eps", "ps": "ps", "tif": "tif", "tiff": "tiff",
            "webp": "webp"}


def figure_format(path: str | os.PathLike, svg: bool = False) -> str:
    """The format the file name asks for: ``x.svg`` -> "svg", ``x.pdf`` -> "pdf", ``x.png`` (or no
    suffix) -> "png". ``svg`` (the old ``--svg`` flag) must agree with the name."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if not suffix:
        return "svg" if svg else "png"
    fmt = suffix if suffix in FORMATS else _ALIASES.get(suffix)
    if fmt is None:
        raise UsageError(f"{path}: cannot tell the figure format from '.{suffix}' (use .png, .svg or .pdf)")
    if svg and fmt != "svg":
        raise SettingError("svg", f"{path}: SVG was asked for but the file name ends in .{suffix}")
    return fmt
