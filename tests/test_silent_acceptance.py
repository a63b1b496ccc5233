"""Inputs that used to be accepted without a word (issue 26 item 2): each is now one line on stderr
(an error, or a note where the run still makes sense) and writes nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from moesim.traces.format import DECODE, PREFILL, TraceMeta, TraceWriter
from tests.helpers import run_main as _run
from tests.helpers import write_trace


@pytest.fixture()
def decode_only(tmp_path):
    """3 decode tokens x 2 layers, 4 experts, top-2."""
    sets = [[0, 1], [2, 3], [1, 2], [0, 3], [3, 1], [0, 2]]
    return Path(write_trace(tmp_path / "d.parquet", sets, num_layers=2, num_experts=4).path)


@pytest.fixture()
def one_layer(tmp_path):
    """A log of layer 0 only of a 4-layer model (no logged_layers metadata: the rows tell)."""
    return Path(write_trace(tmp_path / "one.parquet", [[0, 1], [2, 3], [1, 2]], num_layers=4, num_experts=4,
                            layers=[0, 0, 0]).path)


@pytest.mark.parametrize("policy, param, needle", [
    ("lfu-decay", "half_life=nan", "half_life='nan' is not a number (NaN)"),
    ("lfu-decay", "half_life=NaN", "is not a number (NaN)"),          # JSON's NaN literal
    ("lrfu", "lam=nan", "lam='nan' is not a number (NaN)"),
    ("gate-weighted", "half_life=-5", "half_life must be > 0"),
    ("gate-weighted", "half_life=0", "half_life must be > 0"),
    ("s3fifo", "small_ratio=inf", "small_ratio must be in (0, 1)"),
    ("s3fifo", "ghost_ratio=-1", "ghost_ratio must be >= 0"),
    ("s3fifo", "move_to_main=0", "move_to_main must be >= 1"),
    ("hobbit", "w_recency=inf", "w_recency must be finite"),
])
def test_meaningless_policy_parameters_are_refused(decode_only, capsys, policy, param, needle):
    code, out, err = _run(["simulate", decode_only, "--policy", policy, "--param", param, "--cache-size", "2"],
                          capsys)
    assert code == 2 and out == "" and len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize("policy, param", [("lfu-decay", "half_life=inf"), ("gate-weighted", "half_life=inf"),
                                           ("hobbit", "w_recency=1.5")])
def test_meaningful_limits_still_run(decode_only, capsys, policy, param):
    # inf half-life = no aging; hobbit's rank weights outside [0, 1] are a documented choice
    code, out, err = _run(["simulate", decode_only, "--policy", policy, "--param", param, "--cache-size", "2",
                           "--json"], capsys)
    assert code == 0 and json.loads(out)["requests"] == 12, err


def test_sweep_refuses_a_nan_axis_value(decode_only, tmp_path, capsys):
    out = tmp_path / "r.parquet"
    code, _, err = _run(["sweep", "--trace", decode_only, "--policy", "lfu-decay", "--param",
                         "lfu-decay.half_life=10,nan", "--cache-size", "2", "-o", out, "--executor", "inprocess"],
                        capsys)
    assert code == 2 and len(err) == 1 and "(NaN)" in err[0] and not out.exists(), err


@pytest.mark.parametrize("threshold, needle", [(1.5, "threshold must be in [0, 1]"), (-0.1, "threshold must be in"),
                                               ("nan", "threshold='nan' is not a number (NaN)")])
def test_a_speculative_threshold_outside_a_probability_is_refused(threshold, needle):
    from moesim.policies.prefetch import make_prefetcher

    with pytest.raises(ValueError, match=re.escape(needle)):
        make_prefetcher("speculative", num_layers=4, num_experts=8, top_k=2, threshold=threshold)
    assert make_prefetcher("speculative", num_layers=4, num_experts=8, top_k=2, threshold=0.2).threshold == 0.2


@pytest.mark.parametrize("phase, other", [("prefill", "decode")])
def test_a_phase_the_trace_lacks_is_an_error_not_zero_requests(decode_only, capsys, phase, other):
    for command in (["simulate", "--cache-size", "2"], ["mrc"]):
        code, out, err = _run([command[0], decode_only, "--policy", "lru", *command[1:], "--phase", phase], capsys)
        assert code == 1 and out == "" and len(err) == 1, err
        assert f"has no {phase} rows (all 6 rows are {other})" in err[0] and str(decode_only) in err[0]


def test_a_phase_the_trace_has_runs(tmp_path, capsys):
    meta = TraceMeta(model="m", family="mixtral", num_layers=1, num_experts=4, top_k=2)
    path = tmp_path / "mixed.parquet"
    with TraceWriter(path, meta) as w:
        w.write(0, [0, 1, 2], [PREFILL, PREFILL, DECODE], [0, 0, 0], [[0, 1], [2, 3], [1, 2]], [[0.6, 0.4]] * 3)
    code, out, err = _run(["simulate", path, "--policy", "lru", "--cache-size", "2", "--phase", "prefill", "--json"],
                          capsys)
    assert code == 0 and err == [] and json.loads(out)["requests"] == 4


def _sweep_table(trace, tmp_path, capsys, policies="lru,fifo"):
    out = tmp_path / "r.parquet"
    code, _, err = _run(["sweep", "--trace", trace, "--policy", policies, "--cache-size", "2,3", "-o", out,
                         "--executor", "inprocess", "--no-progress"], capsys)
    assert code == 0, err
    return out


def test_sweep_summary_refuses_an_unknown_baseline(decode_only, tmp_path, capsys):
    table = _sweep_table(decode_only, tmp_path, capsys)
    code, out, err = _run(["sweep-summary", table, "--baseline", "nope"], capsys)
    assert code == 2 and out == "" and len(err) == 1, err
    assert "--baseline 'nope' is not a policy of" in err[0] and "(its policies: fifo, lru)" in err[0]
    code, out, err = _run(["sweep-summary", table, "--baseline", "fifo", "--json"], capsys)
    assert code == 0 and json.loads(out)["baseline"] == "fifo" and json.loads(out)["versus_baseline"]


def test_sweep_summary_says_when_the_default_baseline_is_missing(decode_only, tmp_path, capsys):
    table = _sweep_table(decode_only, tmp_path, capsys, policies="fifo,lfu")
    code, out, err = _run(["sweep-summary", table], capsys)
    assert code == 0 and "best policy" in out
    assert len(err) == 1 and "has no lru cells, so no ratios" in err[0] and "fifo, lfu" in err[0], err


@pytest.mark.parametrize("kind, flag", [("mrc", "--policies"), ("speed", "--policies"), ("prefetch", "--prefetchers")])
def test_plot_with_an_empty_name_list_is_a_usage_error(decode_only, tmp_path, capsys, kind, flag):
    out = tmp_path / "f.png"
    code, _, err = _run(["plot", kind, decode_only, flag, "", "-o", out], capsys)
    assert code == 2 and len(err) == 1 and "names nothing" in err[0] and not out.exists(), err
    assert err[0].startswith(f"moesim plot {kind}: error:")


@pytest.mark.parametrize("kind", ["raster", "affinity"])
def test_plot_at_a_layer_the_trace_did_not_log(one_layer, tmp_path, capsys, recwarn, kind):
    out = tmp_path / "f.png"
    code, _, err = _run(["plot", kind, one_layer, "--layer", "2", "-o", out], capsys)
    assert code == 2 and len(err) == 1 and not out.exists(), err
    assert "holds no rows at layer 2 (its layers: 0)" in err[0]
    assert not [w for w in recwarn.list if "matplotlib" in str(w.filename) or "Warning" in type(w.message).__name__]
    code, _, err = _run(["plot", kind, one_layer, "--layer", "0", "-o", out], capsys)
    assert code == 0 and out.exists(), err


def test_record_predict_distance_past_the_model_is_refused(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "rec.parquet"
    code, _, err = _run(["record", "--model", "tiny-mixtral", "--num-prompts", "1", "--max-new-tokens", "2",
                         "--predict-distance", "99", "-o", out], capsys)
    assert code == 2 and len(err) == 1, err
    assert "the prediction distance 99 reaches past the model's 4 MoE layers (at most 3) (--predict-distance 3)" in err[0]
    assert not out.exists() and not (tmp_path / "rec.parquet.parts").exists()


@pytest.mark.parametrize("kind", ["raster", "affinity"])
def test_plot_default_layer_is_the_first_the_trace_holds(tmp_path, capsys, kind):
    path = tmp_path / "l3.parquet"
    write_trace(path, [[0, 1], [2, 3], [1, 2]], num_layers=6, num_experts=4, layers=[3, 3, 3], logged_layers=[3])
    out = tmp_path / "f.png"
    code, _, err = _run(["plot", kind, path, "-o", out], capsys)
    assert code == 0 and out.exists(), err
