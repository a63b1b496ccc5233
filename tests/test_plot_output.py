"""Figures as a reader gets them: the file extension decides the format (checked by magic bytes) in
every plot command, sweep-plot, the demo and the report; 13 policies stay distinguishable with the
legend off the curves; sweep panels name trace and hardware, share y and use words; timelines get a
real title; bytes read as MB/GB."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
from matplotlib.colors import to_hex

from moesim.analysis import plots
from moesim.analysis.report import build_report
from moesim.analysis.style import POLICY_STYLES, figure_format, human_bytes, metric
from moesim.cli import main
from moesim.errors import UsageError
from moesim.policies import policy_names
from moesim.traces.format import read_trace
from tests.helpers import random_trace

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF-"}


def _is(fmt: str, raw: bytes) -> bool:
    if fmt == "svg":
        return raw.lstrip().startswith(b"<?xml") and b"<svg" in raw[:3000]
    return raw.startswith(MAGIC[fmt])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("t") / "small.parquet"
    random_trace(path, np.random.default_rng(0), tokens=40, num_layers=2, num_experts=6, top_k=2)
    return path


def test_figure_format_follows_the_name():
    assert figure_format("a/x.svg") == "svg" and figure_format("x.PDF") == "pdf" and figure_format("x.png") == "png"
    assert figure_format("x") == "png" and figure_format("x", svg=True) == "svg" and figure_format("x.svg", svg=True) == "svg"
    with pytest.raises(UsageError, match="SVG was asked for but the file name ends in .png"):
        figure_format("x.png", svg=True)
    with pytest.raises(UsageError, match=r"cannot tell the figure format from '\.txt'"):
        figure_format("x.txt")


@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
@pytest.mark.parametrize("kind, extra", [("heatmap", []), ("mrc", ["--policies", "lru,opt"]), ("reuse", [])])
def test_plot_extension_decides_the_format(small, tmp_path, capsys, kind, extra, fmt):
    out = tmp_path / f"fig.{fmt}"
    assert main(["plot", kind, str(small), "-o", str(out), *extra]) == 0
    assert _is(fmt, out.read_bytes())
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_svg_flag_still_works_and_conflicts_are_usage_errors(small, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["plot", "heatmap", str(small), "--svg"]) == 0
    assert _is("svg", (tmp_path / "heatmap.svg").read_bytes())
    capsys.readouterr()
    for argv in (["-o", "h.png", "--svg"], ["-o", "h.txt"]):
        assert main(["plot", "heatmap", str(small), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("SVG was asked for" in err[0] and err[0].endswith("(name it .svg, or drop --svg)") or "cannot tell the figure format" in err[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heatmap.svg"]


def test_timeline_has_a_real_title_and_keeps_the_format(small, tmp_path, capsys):
    tl = tmp_path / "tl.json"
    assert main(["simulate", str(small), "--policy", "lfu", "--cache-size", "3", "--hardware", "a6000",
                 "--prefetch", "transition", "--timeline", str(tl), "--json"]) == 0
    title = plots.timeline_title(tl)
    expert_mb = human_bytes(json.loads(capsys.readouterr().out)["expert_bytes"])
    assert title == (f"Simulated decode timeline: lfu, 3 slots per layer, transition prefetch, a6000 "
                     f"({expert_mb} per expert copy) - small.parquet")
    out = tmp_path / "tl.pdf"
    assert main(["plot", "timeline", str(tl), "-o", str(out)]) == 0 and _is("pdf", out.read_bytes())
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps([{"name": "c", "ph": "X", "ts": 0, "dur": 5}]))
    assert plots.timeline_title(bare) == "Timeline of bare.json"


def test_bytes_and_metric_labels_are_words():
    assert human_bytes(66_748_416) == "66.7 MB" and human_bytes(1.5e9) == "1.5 GB" and human_bytes(512) == "512 B"
    assert human_bytes(352_321_536) == "352 MB"
    assert metric("bytes_h2d").label == "host-to-device traffic (GB)" and metric("bytes_h2d").scale == 1e-9
    assert metric("hit_rate").scale == 100 and "(%)" in metric("timing_hit_rate").label
    assert metric("some_new_rate").label == "some new rate (%)"


# ---- the demo's hit-rate figure (plots.policy_comparison) --------------------------------------------------------------------

def test_demo_figure_keeps_13_policies_apart_with_the_legend_off_the_curves():
    names = policy_names()
    assert len(names) >= 13
    sizes = list(range(2, 9))
    rng = np.random.default_rng(1)
    curves = {n: sorted(rng.uniform(0.4, 1.0, len(sizes)).tolist()) for n in names}
    curves["opt"] = [1.0] * len(sizes)
    fig = plots.policy_comparison(curves, sizes, "100 tokens")
    left, right = fig.axes
    # hit rate in percent on the left, every drawn value within 0..100
    assert "(%)" in left.get_ylabel() and left.get_ylim() == (0, 100)
    assert max(max(ln.get_ydata(), default=0) for ln in left.lines) == pytest.approx(100)
    # right panel: one line per online policy, each (colour, marker, dash) unique
    lines = [ln for ln in right.lines if not ln.get_label().startswith("_")]  # not the zero line
    styles = [(to_hex(ln.get_color()), ln.get_marker(), ln.get_linestyle()) for ln in lines]
    assert len(lines) == len(names) - 1 and len(set(styles)) == len(styles)
    assert len({c for c, _, _ in styles}) == len(styles)  # even the colours alone differ
    # the figure legend sits below both panels: it overlaps neither axes
    fig.canvas.draw()
    leg = fig.legends[0].get_window_extent()
    for ax in fig.axes:
        box = ax.get_window_extent()
        assert leg.y1 <= box.y0, (leg, box)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(labels) == len(names) - 1 and labels[0].startswith(max(
        (n for n in names if n != "opt"), key=lambda n: sum(curves[n])))
    plots.plt.close(fig)


def test_demo_writes_the_format_asked(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--tokens", "60", "--format", "svg"]) == 0
    figs = sorted(p.name for p in out.iterdir() if p.suffix == ".svg")
    assert "hit_rate_vs_slots.svg" in figs and "activation_heatmap.svg" in figs
    assert all(_is("svg", (out / f).read_bytes()) for f in figs)
    assert not list(out.glob("*.png"))


# ---- sweep-plot ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sweep_table(small, tmp_path_factory):
    out = tmp_path_factory.mktemp("s") / "r.parquet"
    assert main(["sweep", "--trace", str(small), "--policy", "lru,lfu,opt", "--cache-size", "2..4", "--hardware",
                 "none,a6000", "-o", str(out), "--executor", "inprocess", "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_sweep_plot_extension_decides_the_format(sweep_table, tmp_path, capsys, fmt):
    out = tmp_path / f"s.{fmt}"
    assert main(["sweep-plot", str(sweep_table), "-o", str(out)]) == 0
    assert _is(fmt, out.read_bytes())


def test_sweep_plot_bad_suffix_is_a_usage_error(sweep_table, tmp_path, capsys):
    assert main(["sweep-plot", str(sweep_table), "-o", str(tmp_path / "s.txt")]) == 2
    assert "cannot tell the figure format" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_sweep_figure_titles_labels_palette_and_shared_y(sweep_table):
    from moesim.sweep.plots import sweep_figure
    from moesim.sweep.result_store import read_results

    fig, n = sweep_figure(read_results(sweep_table), "hit_rate")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert n == 2 and len(axes) == 2
    titles = sorted(ax.get_title() for ax in axes)
    assert titles == ["small.parquet on a6000", "small.parquet, hit-rate replay (no hardware)"]
    assert axes[0].get_ylabel() == "hit rate, exact replay (%)" and "_" not in axes[0].get_ylabel()
    assert axes[0].get_shared_y_axes().joined(axes[0], axes[1])
    for ax in axes:
        for line in ax.lines:
            assert max(line.get_ydata()) <= 100 and max(line.get_ydata()) > 1  # percent
    colours = {line.get_label(): to_hex(line.get_color()) for line in axes[0].lines}
    assert colours == {"lru": to_hex(POLICY_STYLES["lru"].color), "lfu": to_hex(POLICY_STYLES["lfu"].color),
                       "opt (Belady bound)": to_hex(POLICY_STYLES["opt"].color)}
    assert "vs expert slots" in fig._suptitle.get_text()
    plots.plt.close(fig)


# ---- the report --------------------------------------------------------------------------------------

def test_report_embeds_svg_on_request_and_shows_bytes_in_mb(small):
    import dataclasses

    trace = read_trace(small)
    trace.meta = dataclasses.replace(trace.meta, expert_bytes=66_748_416)
    html = build_report(trace, policies=["lru", "opt"], sizes=[2, 3], timing=False, image_format="svg")
    svgs = re.findall(r"data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)", html)
    assert len(svgs) >= 5 and "data:image/png" not in html
    assert all(_is("svg", base64.b64decode(s)) for s in svgs)
    assert "<td class=l>66.7 MB (66,748,416 B)</td>" in html
    with pytest.raises(UsageError):
        build_report(trace, policies=["lru"], sizes=[2], timing=False, image_format="gif")


def _sweep_rows(policies: dict[str, list[str]], sizes: list[int], panels: int = 1):
    import polars as pl

    rows = [{"trace": "t.parquet", "hardware": f"hw{h}", "policy": policy, "params": params, "cache_size": k,
             "hit_rate": k / (max(sizes) + 1), "status": "ok"}
            for h in range(panels) for policy, settings in policies.items() for params in settings for k in sizes]
    return pl.DataFrame(rows)


@pytest.mark.parametrize("panels", [1, 3])
def test_sweep_legend_stays_inside_the_figure(panels):
    """Long labels (parameter settings) wrap onto more legend rows rather than run off the right edge."""
    from moesim.sweep.plots import sweep_figure

    policies = {"lru": ["{}"], "lfu": ["{}"], "opt": ["{}"],
                "lfu-decay": ['{"half_life": 100}', '{"half_life": 1000}', '{"half_life": 100000}']}
    fig, _ = sweep_figure(_sweep_rows(policies, [2, 3, 4], panels), "hit_rate")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    assert "lfu-decay half_life=100000" in labels and len(labels) == 6
    for text in [*legend.get_texts(), legend.get_title()]:
        box = text.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y0 >= 0, text.get_text()
    for ax in fig.axes:  # and the legend sits below every panel's tick labels
        if ax.get_visible():
            assert ax.get_tightbbox(renderer).y0 >= legend.get_window_extent(renderer).y1 - 1
    plots.plt.close(fig)


@pytest.mark.parametrize("sizes", [[2, 4, 6], list(range(2, 40))])
def test_sweep_slot_ticks_are_whole_numbers(sizes):
    from moesim.sweep.plots import sweep_figure

    fig, _ = sweep_figure(_sweep_rows({"lru": ["{}"], "opt": ["{}"]}, sizes), "hit_rate")
    fig.canvas.draw()
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks), ticks
    if len(sizes) <= 12:
        assert ticks == sizes
    plots.plt.close(fig)
