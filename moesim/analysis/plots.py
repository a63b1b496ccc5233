"""Matplotlib figures of traces and replays. Every function returns the Figure (so tests can inspect
titles, labels and data) and never shows it; :func:`save` writes it atomically in the format the
file name asks for (.png, .svg, .pdf).

Colours and line styles come from :mod:`moesim.analysis.style` (one look for every figure);
viridis for magnitudes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

if "IPython" not in sys.modules:
    matplotlib.use("Agg")  # files only, no display needed; notebooks keep their inline backend

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import BoundaryNorm, ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from moesim.analysis import stats  # noqa: E402
from moesim.analysis.residency import HIT, IDLE, MISS, RESIDENT, residency_log  # noqa: E402
from moesim.analysis.style import (  # noqa: E402
    CATEGORY_COLORS,
    FAMILY_NAMES,
    OKABE_ITO,  # noqa: F401  (re-exported: the notebooks colour their own lines with it)
    figure_format,
    human_bytes,
    policy_label,
    policy_style,
    prefetcher_style,
)
from moesim.errors import DataError  # noqa: E402
from moesim.safe_write import atomic_path  # noqa: E402
from moesim.simulator.timeline_file import read_timeline  # noqa: E402
from moesim.traces.format import Trace  # noqa: E402

LANE_COLORS = CATEGORY_COLORS
RASTER_COLORS = {IDLE: "#FFFFFF", RESIDENT: "#D9D9D9", HIT: "#0072B2", MISS: "#D55E00"}


def policy_color(name: str, index: int) -> str:
    return policy_style(name, index).color


def _title(trace: Trace) -> str:
    name = trace.meta.model.split("/")[-1]
    return f"{name} (SYNTHETIC trace)" if trace.meta.provenance.get("kind") == "synthetic" else name


def save(fig: Figure, path: str | os.PathLike, *, svg: bool = False, dpi: int = 130) -> Path:
    """Write ``fig`` in the format its name asks for (``x.svg`` SVG, ``x.pdf`` PDF, ``x.png`` or no
    suffix PNG; ``svg`` = the old ``--svg`` flag, which must agree) through a temp file + rename;
    closes the figure."""
    p = Path(path)
    try:
        fmt = figure_format(p, svg)
    except BaseException:
        plt.close(fig)
        raise
    try:
        with atomic_path(p) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return p


# ---- trace views --------------------------------------------------------------------------------

def heatmap(trace: Trace) -> Figure:
    """Layer x expert activation share (each layer's row sums to 1)."""
    held = trace.held_layers()
    share = stats.activation_share(trace)[held]  # a log of a few layers: only those rows, labelled
    layers, experts = share.shape
    # grow with the grid for readable cells, but cap so 64+ experts still give a normal page width
    fig, ax = plt.subplots(figsize=(min(13.0, max(5.0, 0.45 * experts + 2.5)), min(10.0, max(4.0, 0.22 * layers + 1.5))))
    im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
    ax.set_xlabel("expert id")
    ax.set_ylabel("MoE layer")
    logged = "" if layers == trace.meta.num_layers else f"; {layers} of {trace.meta.num_layers} layers logged"
    ax.set_title(f"Expert activation share per layer - {_title(trace)}\n"
                 f"(uniform = {1 / experts:.3f}; {len(trace)} token-layer rows, top-{trace.meta.top_k}{logged})")
    if layers < trace.meta.num_layers and layers <= 64:
        ax.set_yticks(range(layers), [str(x) for x in held])
    if experts <= 32:
        ax.set_xticks(range(experts))
    if experts <= 16 and layers <= 64:  # small grids: print the shares so imbalance can be read off
        top = share.max() or 1.0
        for (r, c), v in np.ndenumerate(share):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6.5,
                    color="black" if v > 0.6 * top else "white")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("share of the layer's activations")
    fig.tight_layout()
    return fig


def raster(trace: Trace, layer: int, policy: str = "lru", cache_size: int | None = None, *,
           max_tokens: int = 200, start: int = 0, **params: Any) -> Figure:
    """Tokens x experts of one layer coloured hit / miss / resident-unused under ``policy``."""
    from moesim.simulator.replay import simulate

    k = cache_size or min(2 * trace.meta.top_k, trace.meta.num_experts)
    # replay only up to the last step shown (a prefix replay is exact); the layer's overall hit rate
    # comes from the (compiled, for built-ins) full replay
    log = residency_log(trace, layer, policy, k, max_rows=start + max_tokens, **params)
    full = simulate(trace, policy, k, params=params or None)
    overall = full.layer_hits[layer] / full.layer_requests[layer] if full.layer_requests[layer] else 0.0
    window = log.states[start:start + max_tokens]
    fig, ax = plt.subplots(figsize=(min(16.0, 3.0 + 0.06 * len(window)),
                                    min(9.0, max(3.0, 0.3 * trace.meta.num_experts + 1.6))))
    cmap = ListedColormap([RASTER_COLORS[s] for s in (IDLE, RESIDENT, HIT, MISS)])
    ax.imshow(window.T, aspect="auto", interpolation="nearest", cmap=cmap,
              norm=BoundaryNorm([-0.5, 0.5, 1.5, 2.5, 3.5], cmap.N), origin="lower",
              extent=(start - 0.5, start + len(window) - 0.5, -0.5, trace.meta.num_experts - 0.5))
    seq = log.seq[start:start + max_tokens]
    for b in np.flatnonzero(seq[1:] != seq[:-1]) + 1:  # where a new sequence (prompt) starts
        ax.axvline(start + b - 0.5, color="black", linestyle=":", linewidth=1.2)
    ax.set_xlabel(f"token step at layer {layer} (execution order; dotted line = next sequence)")
    ax.set_ylabel("expert id")
    shown_hits = int((window == HIT).sum())
    shown = shown_hits + int((window == MISS).sum())
    ax.set_title(f"Layer {layer} under {policy}, {k} slots: hit rate {overall:.1%} overall, "
                 f"{shown_hits / shown if shown else 0:.1%} in the {len(window)} steps shown")
    ax.legend(handles=[Patch(facecolor=RASTER_COLORS[s], edgecolor="#777777", label=n) for s, n in
                       ((HIT, "hit"), (MISS, "miss"), (RESIDENT, "resident, unused"), (IDLE, "not resident"))],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.moesim_log = log  # type: ignore[attr-defined]  # the data shown, for tests and callers
    fig.moesim_layer_hit_rate = overall  # type: ignore[attr-defined]
    return fig


def mrc(trace: Trace, policies: Sequence[str] = ("lru", "lfu", "fifo", "opt")) -> Figure:
    """Hit rate vs cache slots per layer for several policies; OPT (Belady) dashed as the bound."""
    from moesim.simulator.replay import mrc as mrc_curve

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    curves = {}
    for i, name in enumerate(policies):
        curve = mrc_curve(trace, name).curve
        curves[name] = curve
        x = [c["cache_size"] for c in curve]
        y = [100 * c["hit_rate"] for c in curve]
        ax.plot(x, y, label=policy_label(name), **policy_style(name, i).kwargs())
    ax.set_xlabel("cache slots per layer (experts)")
    ax.set_ylabel("hit rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Hit rate vs cache size - {_title(trace)} (top-{trace.meta.top_k} of {trace.meta.num_experts})")
    ax.grid(alpha=0.3)
    ax.legend(title="policy", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.moesim_curves = curves  # type: ignore[attr-defined]
    return fig


def policy_comparison(curves: dict[str, list[float]], sizes: list[int], title: str) -> Figure:
    """Hit rate per policy vs slots (``curves``: policy -> hit rate at each of ``sizes``; ``title`` says
    what was replayed). Left: hit rate (%) of every policy, the best online policy, LRU and the OPT bound
    drawn out and the rest as a grey field; right: every online policy's gain over LRU in its own colour,
    marker and family line style. One legend below both, best first."""
    order = sorted(curves, key=lambda n: (n != "opt", -sum(curves[n])))  # OPT, then best mean hit rate first
    online = [n for n in order if n != "opt"]
    best = online[0] if online else None
    base = curves.get("lru")
    fig, (ax, gain) = plt.subplots(1, 2, figsize=(13, 6.4))
    handles, shown = [], []  # right-panel lines; left-panel highlighted lines
    for i, name in enumerate(order):
        style = policy_style(name, i)
        vals = [100 * v for v in curves[name]]
        if name in ("opt", "lru", best):
            tag = " (best online)" if name == best else " (baseline)" if name == "lru" else ""
            (h,) = ax.plot(sizes, vals, label=policy_label(name) + tag,
                           **style.kwargs(linewidth=2.6 if name != "lru" else 2.0))
            shown.append(h)
        else:
            ax.plot(sizes, vals, color="#BBBBBB", linewidth=1.0, zorder=1)
        if base is not None and name != "opt":  # OPT's headroom is on the left; here the online policies spread out
            label = policy_label(name) + (" (baseline)" if name == "lru" else "") + \
                (f" - {FAMILY_NAMES[style.family]}" if name != "random" else "")
            (h,) = gain.plot(sizes, [100 * (v - b) for v, b in zip(curves[name], base, strict=True)], label=label,
                             **style.kwargs())
            handles.append(h)
    (grey,) = ax.plot([], [], color="#BBBBBB", linewidth=1.0, label="other policies (right panel)")
    ax.legend(handles=[*shown, grey], loc="lower right", frameon=True, framealpha=0.9, fontsize=9)
    ax.set_xlabel("expert slots per layer (K)")
    ax.set_ylabel("hit rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Hit rate vs slots ({title})")
    gain.set_xlabel("expert slots per layer (K)")
    gain.set_ylabel("hit rate minus LRU's (percentage points)")
    gain.set_title("Gain over LRU, every online policy")
    gain.axhline(0, color="grey", lw=0.8)
    for a in (ax, gain):
        a.grid(alpha=0.3)
        a.set_xticks(sizes)
    fig.legend(handles, [h.get_label() for h in handles], loc="lower center", ncol=4, frameon=False, fontsize=9,
               title="policy (best mean hit rate first; solid = recency/FIFO family, dashed = frequency family)",
               title_fontsize=9)
    fig.tight_layout(rect=(0, (0.45 + 0.2 * ((len(handles) + 3) // 4)) / fig.get_figheight(), 1, 1))
    return fig


# ---- timing-simulator views ------------------------------------------------------------------------

def timing_runner() -> Callable[..., dict[str, Any]]:
    """``run(trace, policy, k, hardware, prefetch=None, prefetch_budget=None, **kw) -> dict``: the timing
    run of one cell (:func:`moesim.simulator.cell.run_cell`, its ``TimingResult.to_dict()`` keys) on a
    hardware preset; ``kw`` are :class:`~moesim.simulator.cell.CellSpec` fields."""
    from moesim.simulator.cell import CellSpec, run_cell
    from moesim.simulator.cost_model import CostModel

    costs: dict[str, Any] = {}

    def run(trace: Trace, policy: str, k: int, hardware: str, prefetch: str | None = None,
            prefetch_budget: int | None = None, **kw: Any) -> dict:
        if hardware not in costs:
            costs[hardware] = CostModel.preset(hardware)
        pparams = dict(kw.pop("prefetch_params", None) or {})
        if prefetch_budget is not None:
            pparams["budget"] = prefetch_budget
        spec = CellSpec(policy, k, cost=costs[hardware], prefetch=prefetch or "none", prefetch_params=pparams or None,
                        exact_replay=False, interval=False, **kw)
        return run_cell(trace, spec).to_json()

    return run


def speed(trace: Trace, policies: Sequence[str] = ("lru", "lfu", "opt"), sizes: Sequence[int] | None = None,
          hardware: str = "a6000", runner: Callable[..., dict[str, Any]] | None = None) -> Figure:
    """Decode throughput (tokens/s) vs cache slots per layer, one line per policy."""
    run = runner or timing_runner()
    meta = trace.meta
    sizes = list(sizes or range(meta.top_k, meta.num_experts + 1))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    data: dict[str, list[float]] = {}
    for i, name in enumerate(policies):
        tps = [float(run(trace, name, k, hardware)["tokens_per_s"]) for k in sizes]
        data[name] = tps
        ax.plot(sizes, tps, label=policy_label(name), **policy_style(name, i).kwargs())
    ax.set_xlabel("cache slots per layer (experts)")
    ax.set_ylabel("decode throughput (tokens/s)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Simulated decode tokens/s on {hardware} - {_title(trace)}")
    ax.grid(alpha=0.3)
    ax.legend(title="policy", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.moesim_data = {"sizes": sizes, "tokens_per_s": data}  # type: ignore[attr-defined]
    return fig


def prefetch(trace: Trace, prefetchers: Sequence[str], budgets: Sequence[int], *, policy: str = "lru",
             cache_size: int | None = None, hardware: str = "a6000",
             runner: Callable[..., dict[str, Any]] | None = None) -> Figure:
    """Prefetch precision and recall vs prefetch budget (experts fetched ahead per layer)."""
    run = runner or timing_runner()
    k = cache_size or min(2 * trace.meta.top_k, trace.meta.num_experts)
    fig, (ax_p, ax_r) = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True)
    data: dict[str, dict[str, list[float]]] = {}
    for i, name in enumerate(prefetchers):
        res = [run(trace, policy, k, hardware, prefetch=name, prefetch_budget=b) for b in budgets]
        # no prefetch issued (every pick already resident): precision is undefined, not 0 -- leave a gap
        issued = [r.get("prefetches", 1) > 0 for r in res]
        prec = [100 * float(r["prefetch_precision"]) if ok else float("nan") for r, ok in zip(res, issued, strict=True)]
        rec = [100 * float(r["prefetch_recall"]) if ok else float("nan") for r, ok in zip(res, issued, strict=True)]
        data[name] = {"precision": prec, "recall": rec}
        label = name if any(issued) else f"{name} (issued no prefetches: picks already resident)"
        style = prefetcher_style(name, i)
        ax_p.plot(budgets, prec, label=label, **style.kwargs())
        ax_r.plot(budgets, rec, label=label, **style.kwargs())
    for ax, what in ((ax_p, "precision"), (ax_r, "recall")):
        ax.set_xticks(list(budgets))
        ax.set_xlabel("prefetch budget (experts per layer)")
        ax.set_ylabel(f"prefetch {what} (%)")
        ax.set_ylim(-2, 102)  # a 100 % line stays visible above the frame
        ax.grid(alpha=0.3)
        ax.set_title(f"Prefetch {what}")
    fig.legend(*ax_p.get_legend_handles_labels(), title="prefetcher", loc="lower center",
               ncol=min(len(prefetchers), 3), bbox_to_anchor=(0.5, -0.02), frameon=False)
    fig.suptitle(f"Prefetching under {policy}, {k} slots, {hardware} - {_title(trace)}")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.moesim_data = data  # type: ignore[attr-defined]
    return fig


# ---- timeline (Chrome / Perfetto trace-event JSON) -----------------------------------------------

def load_timeline(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Complete ('X') events of a Chrome/Perfetto trace-event file (object with ``traceEvents`` or a
    bare list), or of ``simulate --timeline X.parquet``'s table."""
    p = Path(path)
    raw = read_timeline(p)
    events = raw.get("traceEvents") if isinstance(raw, dict) else raw
    if not isinstance(events, list):
        raise DataError(p, "timeline has no 'traceEvents' list")
    out = [e for e in events if isinstance(e, dict) and e.get("ph") == "X"
           and isinstance(e.get("ts"), int | float) and isinstance(e.get("dur"), int | float)]
    if not out:
        raise DataError(p, "timeline holds no complete ('X') events with ts and dur")
    return out


def timeline_title(path: str | os.PathLike) -> str:
    """A title from the run the timeline file describes (``simulate --timeline`` stores it under
    ``otherData``): "Simulated decode timeline: lru, 4 slots per layer, transition prefetch, a6000
    (66.7 MB per expert copy) - real.parquet"; other files: "Timeline of NAME"."""
    p = Path(path)
    raw = read_timeline(p)
    info = raw.get("otherData") if isinstance(raw, dict) else None
    if not isinstance(info, dict) or "policy" not in info:
        return f"Timeline of {p.name}"
    size = info.get("cache_size")
    slots = f"{size} slots per layer" if isinstance(size, int) else "per-layer slot budgets"
    pf = info.get("prefetch") or "none"
    parts = [str(info["policy"]), slots, "no prefetch" if pf == "none" else f"{pf} prefetch"]
    if info.get("hardware"):
        copy = f" ({human_bytes(info['expert_bytes'])} per expert copy)" if info.get("expert_bytes") else ""
        parts.append(f"{info['hardware']}{copy}")
    trace = f" - {info['trace']}" if info.get("trace") else ""
    return f"Simulated decode timeline: {', '.join(parts)}{trace}"


def event_category(event: dict[str, Any]) -> str:
    """``cat`` when the event has one, else the first word of its name ("load L3 E5" -> "load")."""
    cat = event.get("cat")
    if cat:
        return str(cat)
    name = str(event.get("name", "")).strip()
    return name.split()[0] if name else "event"


def timeline(events: list[dict[str, Any]], *, max_ms: float | None = None, title: str = "Simulated timeline") -> Figure:
    """One horizontal lane per track (``tid``, else ``pid``), bars coloured by event category; one
    ``broken_barh`` per (lane, category) so tens of thousands of events draw quickly."""
    t0 = min(float(e["ts"]) for e in events)
    spans: dict[tuple[str, str], list[tuple[float, float]]] = {}
    lanes: dict[str, int] = {}
    cats: dict[str, str] = {}
    for e in events:
        start = (float(e["ts"]) - t0) / 1000.0  # trace-event times are microseconds
        if max_ms is not None and start > max_ms:
            continue
        lane = str(e.get("tid", e.get("pid", "0")))
        lanes.setdefault(lane, len(lanes))
        cat = event_category(e)
        cats.setdefault(cat, LANE_COLORS[len(cats) % len(LANE_COLORS)])
        spans.setdefault((lane, cat), []).append((start, float(e["dur"]) / 1000.0))
    fig, ax = plt.subplots(figsize=(12, 1.4 + 0.5 * max(len(lanes), 1)))
    for (lane, cat), bars in spans.items():
        ax.broken_barh(bars, (lanes[lane] - 0.35, 0.7), facecolors=cats[cat], edgecolor="none")
    ax.set_yticks(range(len(lanes)), list(lanes))
    ax.set_ylim(len(lanes) - 0.5, -0.5)  # first lane on top
    ax.set_xlabel("time (ms)")
    ax.set_ylabel("track")
    ax.set_title(title if max_ms is None else f"{title} (first {max_ms:g} ms)")
    ax.legend(handles=[Patch(color=c, label=n) for n, c in cats.items()], loc="upper left",
              bbox_to_anchor=(1.01, 1.0), frameon=False, title="event")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.moesim_spans = spans  # type: ignore[attr-defined]
    return fig


# ---- analysis views used by the report -------------------------------------------------------------

def reuse(trace: Trace) -> Figure:
    """Distribution of LRU stack (reuse) distances; its running sum is LRU's hit-rate curve."""
    hist = stats.reuse_histogram(trace, "distinct")
    known = hist.filter(hist["distance"].is_not_null())
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.bar(known["distance"].to_numpy(), 100 * known["fraction"].to_numpy(), color=CATEGORY_COLORS[0])
    cold = hist.filter(hist["distance"].is_null())["fraction"].sum()
    ax.set_xlabel("reuse distance (distinct experts of the layer since last use)")
    ax.set_ylabel("share of requests (%)")
    ax.set_title(f"Reuse-distance distribution - {_title(trace)} (first uses: {cold:.1%})")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def affinity(trace: Trace, layer: int = 0) -> Figure:
    """Two (E x E) matrices at ``layer``: co-activation within a token (P(j in set | i in set)) and
    the transition to the next layer (distribution of layer+1's experts given expert i here)."""
    meta = trace.meta
    if not 0 <= layer < meta.num_layers:
        raise ValueError(f"layer {layer} out of range [0, {meta.num_layers})")
    nxt = layer + 1 if layer + 1 < meta.num_layers else None
    co = stats.coactivation(trace, layer, normalize="conditional")
    np.fill_diagonal(co, np.nan)  # P(i | i) = 1 says nothing; leave it blank
    panels = [(co, f"co-activation at layer {layer}\nP(j also chosen | i chosen; diagonal blank)", "expert j (same token)")]
    if nxt is not None:
        panels.append((stats.transition_matrix(trace, layer, nxt),
                       f"transition layer {layer} -> {nxt}\nshare of layer-{nxt} picks given i at layer {layer}",
                       f"expert j at layer {nxt}"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    for ax, (mat, title, xlabel) in zip(axes[0], panels, strict=True):
        im = ax.imshow(mat, cmap="viridis", vmin=0, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"expert i at layer {layer}")
        if meta.num_experts <= 32:
            ax.set_xticks(range(meta.num_experts))
            ax.set_yticks(range(meta.num_experts))
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label("probability")
    fig.suptitle(f"Expert affinity - {_title(trace)}")
    fig.tight_layout()
    fig.moesim_matrices = [m for m, _, _ in panels]  # type: ignore[attr-defined]
    return fig


def segment_bound(trace: Trace, segment_lens: Sequence[int] = (4, 16, 64)) -> Figure:
    """SCH (arXiv 2505.16056) vs cache size for a few segment lengths, next to OPT."""
    from moesim.simulator.replay import mrc as mrc_curve

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, m in enumerate(segment_lens):
        df = stats.segment_cache_bound(trace, m)
        ax.plot(df["cache_size"], 100 * df["hit_rate"], marker="o", markersize=4,
                color=CATEGORY_COLORS[i % len(CATEGORY_COLORS)], label=f"segment cache, {m} tokens")
    opt = mrc_curve(trace, "opt").curve
    ax.plot([c["cache_size"] for c in opt], [100 * c["hit_rate"] for c in opt], "k--", linewidth=2,
            label="opt (Belady, pays its loads)")
    ax.set_xlabel("cache slots per layer (experts)")
    ax.set_ylabel("hit rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Segment-cache best hit rate (SCH) - {_title(trace)}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig
