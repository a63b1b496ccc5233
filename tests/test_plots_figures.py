"""Plot functions: the data drawn, the labels, and the files written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.colors import to_hex

from moesim.analysis import plots, stats
from moesim.analysis.residency import HIT, MISS, residency_log
from moesim.errors import DataError
from moesim.simulator.replay import mrc, simulate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _labels(ax) -> tuple[str, str, str]:
    return ax.get_title(), ax.get_xlabel(), ax.get_ylabel()


def test_heatmap_rows_sum_to_one_and_labels(real_trace, tmp_path):
    fig = plots.heatmap(real_trace)
    ax = fig.axes[0]
    data = np.asarray(ax.images[0].get_array())
    assert data.shape == (32, 8)
    np.testing.assert_allclose(data.sum(axis=1), 1.0)
    np.testing.assert_allclose(data, stats.activation_share(real_trace))
    title, xl, yl = _labels(ax)
    assert "Mixtral-8x7B" in title and xl == "expert id" and yl == "MoE layer"
    assert "share" in fig.axes[1].get_ylabel()  # colorbar
    assert len(ax.texts) == 32 * 8  # small grid: values printed
    out = plots.save(fig, tmp_path / "h.png")
    raw = out.read_bytes()
    assert raw.startswith(PNG_MAGIC) and len(raw) > 10_000


def test_raster_shows_the_replay(real_trace):
    fig = plots.raster(real_trace, 3, "lru", 4, max_tokens=50)
    ax = fig.axes[0]
    shown = np.asarray(ax.images[0].get_array())
    log = fig.moesim_log
    assert shown.shape == (8, 50)
    full = residency_log(real_trace, 3, "lru", 4)
    np.testing.assert_array_equal(shown, full.states[:50].T)
    assert log.states.shape[0] == 50  # only the steps shown were replayed
    res = simulate(real_trace, "lru", 4)
    assert fig.moesim_layer_hit_rate == pytest.approx(res.layer_hits[3] / res.layer_requests[3])
    assert full.hit_rate == pytest.approx(fig.moesim_layer_hit_rate)
    assert ((shown == HIT) | (shown == MISS)).sum(axis=0).tolist() == [2] * 50
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["hit", "miss", "resident, unused", "not resident"]
    title, xl, yl = _labels(ax)
    assert "Layer 3" in title and "lru" in title and f"{fig.moesim_layer_hit_rate:.1%} overall" in title
    assert f"{log.hits / (log.hits + log.misses):.1%} in the 50 steps" in title
    assert "token" in xl and yl == "expert id"


def test_raster_marks_sequence_boundary(real_trace):
    fig = plots.raster(real_trace, 0, "lru", 4, max_tokens=200)
    seq = fig.moesim_log.seq[:200]
    boundaries = int((seq[1:] != seq[:-1]).sum())
    assert boundaries == 1
    assert len(fig.axes[0].lines) == boundaries


def test_mrc_lines_are_the_curves(real_trace, tmp_path):
    policies = ["lru", "lfu", "opt"]
    fig = plots.mrc(real_trace, policies)
    ax = fig.axes[0]
    assert len(ax.lines) == 3
    for line, name in zip(ax.lines, policies, strict=True):
        curve = mrc(real_trace, name).curve
        assert list(line.get_xdata()) == [c["cache_size"] for c in curve]
        np.testing.assert_allclose(line.get_ydata(), [100 * c["hit_rate"] for c in curve])
    # OPT, the bound, is the one black, thickest line; lfu (frequency family) is dashed, lru solid
    assert to_hex(ax.lines[2].get_color()) == "#000000"
    assert ax.lines[2].get_linewidth() > max(line.get_linewidth() for line in ax.lines[:2])
    assert [ln.get_linestyle() for ln in ax.lines[:2]] == ["-", "--"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["lru", "lfu", "opt (Belady bound)"]
    title, xl, yl = _labels(ax)
    assert "(%)" in yl and "slots" in xl and title
    # OPT is the bound at every size
    opt = ax.lines[2].get_ydata()
    assert all((np.asarray(line.get_ydata()) <= opt + 1e-9).all() for line in ax.lines[:2])
    colors = {to_hex(line.get_color()) for line in ax.lines}
    assert len(colors) == 3
    out = plots.save(fig, tmp_path / "m.svg", svg=True)
    assert out.read_text().lstrip().startswith("<?xml")


def _fake_runner(calls):
    def run(trace, policy, k, hardware, prefetch=None, **kw):
        calls.append((policy, k, hardware, prefetch, kw.get("prefetch_budget")))
        budget = kw.get("prefetch_budget") or 0
        return {"tokens_per_s": 10.0 * k + (5 if policy == "opt" else 0),
                "prefetch_precision": 1.0 / (1 + budget), "prefetch_recall": budget / (1 + budget)}
    return run


def test_speed_plot_with_injected_runner(real_trace):
    calls: list = []
    fig = plots.speed(real_trace, ["lru", "opt"], [2, 4, 8], "a6000", runner=_fake_runner(calls))
    ax = fig.axes[0]
    assert [list(line.get_ydata()) for line in ax.lines] == [[20.0, 40.0, 80.0], [25.0, 45.0, 85.0]]
    assert len(calls) == 6 and all(c[2] == "a6000" for c in calls)
    assert "tokens/s" in ax.get_ylabel() and "a6000" in ax.get_title()


def test_prefetch_plot_with_injected_runner(real_trace):
    calls: list = []
    fig = plots.prefetch(real_trace, ["next-layer"], [1, 3], runner=_fake_runner(calls))
    ax_p, ax_r = fig.axes
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["next-layer"]
    np.testing.assert_allclose(ax_p.lines[0].get_ydata(), [50.0, 25.0])
    np.testing.assert_allclose(ax_r.lines[0].get_ydata(), [50.0, 75.0])
    assert [c[3:] for c in calls] == [("next-layer", 1), ("next-layer", 3)]
    assert "precision" in ax_p.get_ylabel() and "recall" in ax_r.get_ylabel()
    assert "budget" in ax_p.get_xlabel()


def test_prefetch_plot_leaves_a_gap_where_nothing_was_prefetched(real_trace):
    def run(trace, policy, k, hardware, prefetch=None, prefetch_budget=None, **kw):
        return {"prefetches": 0, "prefetch_precision": 0.0, "prefetch_recall": 0.0}

    fig = plots.prefetch(real_trace, ["previous-token"], [1, 2], runner=run)
    assert np.isnan(fig.axes[0].lines[0].get_ydata()).all()
    assert "issued no prefetches" in fig.legends[0].get_texts()[0].get_text()


def test_timeline_from_trace_events(tmp_path):
    events = [{"name": "compute L0", "cat": "compute", "ph": "X", "ts": 1000, "dur": 300, "pid": 0, "tid": "gpu"},
              {"name": "load e3", "cat": "h2d", "ph": "X", "ts": 1000, "dur": 900, "pid": 0, "tid": "pcie"},
              {"name": "meta", "ph": "M", "pid": 0},
              {"name": "compute L1", "cat": "compute", "ph": "X", "ts": 1900, "dur": 300, "pid": 0, "tid": "gpu"}]
    path = tmp_path / "tl.json"
    path.write_text(json.dumps({"traceEvents": events}))
    loaded = plots.load_timeline(path)
    assert len(loaded) == 3
    fig = plots.timeline(loaded)
    ax = fig.axes[0]
    spans = {k: [(round(a, 6), round(b, 6)) for a, b in v] for k, v in fig.moesim_spans.items()}
    assert spans == {("gpu", "compute"): [(0.0, 0.3), (0.9, 0.3)], ("pcie", "h2d"): [(0.0, 0.9)]}
    assert len(ax.collections) == 2  # one broken_barh per (lane, category)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["gpu", "pcie"]
    assert ax.get_xlabel() == "time (ms)"
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"compute", "h2d"}


def test_timeline_categories_from_names_and_window():
    events = [{"name": f"load L{i} E{i % 8}", "ph": "X", "ts": 1000.0 * i, "dur": 500.0, "tid": "copy0"}
              for i in range(50)]
    events += [{"name": f"expert L{i} E1", "ph": "X", "ts": 1000.0 * i + 100, "dur": 300.0, "tid": "compute"}
               for i in range(50)]
    fig = plots.timeline(events, max_ms=9.5)
    ax = fig.axes[0]
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"load", "expert"}
    assert len(fig.moesim_spans[("copy0", "load")]) == 10  # starts 0..9 ms
    assert "first 9.5 ms" in ax.get_title()


@pytest.mark.parametrize("content, problem", [("not json", "not a JSON timeline"), ('{"x": 1}', "traceEvents"),
                                               ('{"traceEvents": [{"ph": "M"}]}', "no complete")])
def test_timeline_bad_input(tmp_path, content, problem):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(DataError, match=problem):
        plots.load_timeline(p)


def test_reuse_and_segment_plots(real_trace):
    fig = plots.reuse(real_trace)
    heights = [b.get_height() for b in fig.axes[0].patches]
    hist = stats.reuse_histogram(real_trace)
    assert sum(heights) == pytest.approx(100 * hist.filter(hist["distance"].is_not_null())["fraction"].sum())
    fig = plots.segment_bound(real_trace, (4, 16))
    ax = fig.axes[0]
    assert len(ax.lines) == 3 and "Belady" in ax.lines[2].get_label()
    np.testing.assert_allclose(ax.lines[1].get_ydata(), 100 * stats.segment_cache_bound(real_trace, 16)["hit_rate"].to_numpy())


def test_affinity_plot_matrices(real_trace):
    fig = plots.affinity(real_trace, 8)
    co, trans = fig.moesim_matrices
    expect = stats.coactivation(real_trace, 8, normalize="conditional")
    off = ~np.eye(8, dtype=bool)
    np.testing.assert_allclose(co[off], expect[off])
    assert np.isnan(np.diag(co)).all()
    np.testing.assert_allclose(trans, stats.transition_matrix(real_trace, 8, 9))
    np.testing.assert_allclose(np.asarray(fig.axes[1].images[0].get_array()).sum(axis=1), 1.0)
    assert "layer 8 -> 9" in fig.axes[1].get_title() and fig.axes[0].get_ylabel() == "expert i at layer 8"
    last = plots.affinity(real_trace, 31)  # no next layer: one panel
    assert len(last.moesim_matrices) == 1
    with pytest.raises(ValueError):
        plots.affinity(real_trace, 32)


def test_save_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(DataError):
        plots.save(plots.plt.figure(), tmp_path / "missing" / "x.png")


def test_speed_plot_with_the_timing_simulator(real_trace):
    pytest.importorskip("moesim.simulator.timing")
    run = plots.timing_runner()
    fig = plots.speed(real_trace, ["lru", "opt"], [2, 4], "a6000", runner=run)
    data = fig.moesim_data["tokens_per_s"]
    assert all(v > 0 for vals in data.values() for v in vals)
    # more slots never make the same policy slower; OPT (fewest misses) is at least as fast as LRU
    assert data["lru"][1] >= data["lru"][0] * 0.999
    assert data["opt"][1] >= data["lru"][1] * 0.999
