"""The prediction study: metrics on hand-traced traces, the transition predictor against the prefetcher
class it mirrors, confidence thresholding, the engine's plan fed recorded predictions against the timing
simulator on the shipped learned trace, and the one-line error for a trace without predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moesim.analysis.prediction import _transition_predictions, prediction_accuracy, threshold_curve
from moesim.policies.prefetch import PrefetchContext, Transition
from moesim.traces.format import DECODE, TraceMeta, TraceWriter, read_trace

ROOT = Path(__file__).resolve().parents[1]
LEARNED = ROOT / "traces" / "learned-mixtral-32l.parquet"

# two tokens x three layers, E = 4, top-2 (router order); pred1 = the prediction made from layer l-1
ACTUAL = [[[0, 1], [2, 3], [1, 0]],
          [[0, 2], [3, 2], [0, 3]]]
PRED1 = [[[-1, -1], [2, 0], [0, 1]],
         [[-1, -1], [1, 0], [0, 3]]]


def hand_trace(path: Path, *, seqs=(0, 0), tokens=(0, 1), actual=ACTUAL, pred1=PRED1, logits=None):
    meta = TraceMeta(model="hand", family="mixtral", num_layers=3, num_experts=4, top_k=2)
    with TraceWriter(path, meta, pred_distances=[1], pred_logits=logits is not None) as w:
        for i, (s, t) in enumerate(zip(seqs, tokens, strict=True)):
            w.write(s, [t] * 3, DECODE, [0, 1, 2], actual[i], [[0.6, 0.4]] * 3, preds={1: np.asarray(pred1[i])},
                    pred_logits=None if logits is None else {1: np.asarray(logits[i])})
    return read_trace(path)


def test_speculative_metrics_hand_traced(tmp_path):
    acc = prediction_accuracy(hand_trace(tmp_path / "t.parquet"), "speculative", 1)
    assert acc.rows.tolist() == [0, 2, 2]
    # layer 1: [2,0] vs [2,3] (top-1 right, 1 of 2, budget-1 pick right); [1,0] vs [3,2] (all wrong)
    # layer 2: [0,1] vs [1,0] (top-1 wrong, exact set); [0,3] vs [0,3] (all right)
    assert acc.per_layer["top1"][1:].tolist() == [0.5, 0.5]
    assert acc.per_layer["recall_at_k"][1:].tolist() == [0.25, 1.0]
    assert acc.per_layer["exact"][1:].tolist() == [0.0, 1.0]
    assert acc.per_layer["precision_at_1"][1:].tolist() == [0.5, 1.0]
    assert acc.per_layer["precision_at_2"][1:].tolist() == [0.25, 1.0]
    assert acc.per_layer["recall_at_1"][1:].tolist() == [0.25, 0.5]
    s = acc.summary()
    assert (s["rows"], s["top1"], s["recall_at_k"], s["exact"], s["precision_at_1"], s["precision_at_2"]) == (
        4, 0.5, 5 / 8, 0.5, 3 / 4, 5 / 8)


def test_previous_token_stops_at_sequence_boundaries(tmp_path):
    # seq 0 tokens 0, 1 and seq 1 token 0 (a copy of token 0): only seq 0's token 1 has a previous token
    trace = hand_trace(tmp_path / "t.parquet", seqs=(0, 0, 1), tokens=(0, 1, 0), actual=ACTUAL + ACTUAL[:1],
                       pred1=PRED1 + PRED1[:1])
    s = prediction_accuracy(trace, "previous-token").summary()
    # [0,1]->[0,2]: top-1 right, 1 of 2; [2,3]->[3,2]: top-1 wrong, exact set; [1,0]->[0,3]: top-1 wrong, 1 of 2
    assert s["rows"] == 3
    assert (s["top1"], s["recall_at_k"], s["exact"], s["precision_at_1"]) == (1 / 3, 4 / 6, 1 / 3, 2 / 3)


def test_budget_metrics_charge_short_predictions(tmp_path):
    # a prediction that names one expert: budget 2 counts the missing one as wrong
    pred = [[[-1, -1], [2, -1], [0, -1]], [[-1, -1], [3, -1], [0, -1]]]
    # the writer keeps -1 only as "no prediction": build the grid directly through the scorer instead
    from moesim.analysis.prediction import _score

    actual = np.asarray(ACTUAL)
    p = np.asarray(pred)
    valid = np.array([[False, True, True]] * 2)
    n, top1, overlap, exact, hits_at = _score(p, actual, valid, 2)
    assert hits_at[1].tolist() == [2, 2] and hits_at[2].tolist() == [2, 2]
    assert exact.sum() == 0 and overlap.tolist() == [0, 2, 2]


def test_transition_equals_the_prefetcher_class(tmp_path):
    rng = np.random.default_rng(3)
    T, L, E, k, d = 60, 5, 6, 2, 2
    actual = np.array([[rng.choice(E, k, replace=False, p=[0.4, 0.2, 0.15, 0.1, 0.1, 0.05]) for _ in range(L)]
                       for _ in range(T)])
    mine = _transition_predictions(actual, np.ones((T, L), bool), d, E)
    pf = Transition(num_layers=L, num_experts=E, top_k=k, distance=d)
    for t in range(T):
        for layer in range(L):
            if layer + d < L:   # the driver: predict right after the gate of `layer`, then observe it
                want = pf.predict(layer, layer + d, PrefetchContext(current=list(actual[t, layer])))
                got = [int(e) for e in mine[t, layer + d] if e >= 0]
                assert got == want, (t, layer)
            pf.observe(layer, list(actual[t, layer]))
    assert (mine[:, :d] == -1).all()


def test_threshold_curve_hand_traced(tmp_path):
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    lg = np.log(probs)
    zeros = np.zeros(4)   # what the recorder stores where there is no prediction (layer < d)
    trace = hand_trace(tmp_path / "t.parquet", logits=[[zeros, lg, lg], [zeros, lg, lg]],
                       pred1=[[[-1, -1], [0, 1], [0, 1]], [[-1, -1], [0, 1], [0, 1]]])
    (r,) = threshold_curve(trace, 1, thresholds=[0.2])
    # fetched {0, 1} on 4 rows; used: {2,3}, {1,0}, {3,2}, {0,3} -> 0 + 2 + 0 + 1 true positives
    assert r["rows"] == 4 and r["experts_per_row"] == 2.0
    assert r["precision"] == pytest.approx(3 / 8) and r["recall"] == pytest.approx(3 / 8)


def test_missing_distance_is_a_usage_error(tmp_path):
    from moesim.commands._common import error_line
    from moesim.errors import SettingError

    with pytest.raises(SettingError, match="pred2_experts") as caught:
        prediction_accuracy(hand_trace(tmp_path / "t.parquet"), "speculative", 2)
    # the library says what is missing; the command line adds how to record it
    assert "--" not in caught.value.problem and (caught.value.setting, caught.value.fix) == ("recorded_predictions", "2")
    assert error_line(caught.value).endswith("--predict-distance 2)")


# ---- the shipped learned trace ------------------------------------------------------------------

@pytest.fixture(scope="module")
def learned():
    if not LEARNED.is_file():
        pytest.skip("traces/learned-mixtral-32l.parquet not present")
    return read_trace(LEARNED)


def test_shipped_trace_holds_what_the_readme_says(learned):
    m = learned.meta
    assert (m.family, m.num_layers, m.num_experts, m.top_k) == ("mixtral", 32, 8, 2)
    assert learned.pred_distances == (1, 2, 3)
    decode = learned.phase == DECODE
    assert decode.sum() // 32 >= 10_000 and (~decode).sum() > 0
    assert len(np.unique(learned.seq)) >= 64


@pytest.mark.parametrize("policy,k,d", [("lru", 2, 1), ("lfu", 3, 2), ("opt", 3, 1), ("lru", 4, 3)])
def test_engine_plan_replays_recorded_predictions_like_the_simulator(learned, policy, k, d):
    from moesim.engine.plan import CachePlan, Routing
    from moesim.engine.validation import head_tokens
    from moesim.simulator.cost_model import CostModel
    from moesim.simulator.timing import simulate_timing

    sub = head_tokens(learned.filter_phase(DECODE), 48)
    routing = Routing.from_trace(sub)
    assert np.array_equal(routing.predicted[d][routing.row >= 0], sub.pred_experts(d)[routing.row[routing.row >= 0]])
    plan = CachePlan(routing, k, policy, "speculative", prefetch_params={"distance": d})
    for t in range(routing.num_tokens):
        for layer in range(routing.num_layers):
            plan.step(t, layer)
    sim = simulate_timing(sub, policy, k, CostModel.preset("h200"), prefetch="speculative",
                          prefetch_params={"distance": d})
    assert plan.prefetches > 0
    assert (plan.hits, plan.prefetches) == (sim.hits, sim.prefetches)


def test_plan_refuses_speculative_without_predictions(learned):
    from moesim.engine.plan import CachePlan, Routing
    from moesim.engine.validation import head_tokens
    from moesim.errors import SettingError

    routing = Routing.from_trace(head_tokens(learned.filter_phase(DECODE), 4))
    routing.predicted = {}
    with pytest.raises(SettingError, match="needs recorded predictions at distance 1") as caught:
        CachePlan(routing, 2, "lru", "speculative")
    assert (caught.value.setting, caught.value.fix) == ("recorded_predictions", "1")


# ---- the command line -----------------------------------------------------------------------------

def run_cli(capsys, *args):
    """In-process (the subprocess form costs seconds of imports per call); output captured."""
    from moesim.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def no_predictions(tmp_path):
    meta = TraceMeta(model="m", family="mixtral", num_layers=2, num_experts=4, top_k=2)
    path = tmp_path / "plain.parquet"
    with TraceWriter(path, meta) as w:
        w.write(0, [0, 0, 1, 1], DECODE, [0, 1, 0, 1], [[0, 1], [2, 3], [1, 2], [3, 0]], [[0.5, 0.5]] * 4)
    return path


@pytest.mark.parametrize("args", [
    ["simulate", "{t}", "--policy", "lru", "--cache-size", "2", "--prefetch", "speculative"],
    ["simulate", "{t}", "--policy", "lru", "--cache-size", "2", "--hardware", "a6000", "--prefetch", "speculative"],
    ["sweep", "--trace", "{t}", "--policy", "lru", "--cache-size", "2", "--hardware", "h200",
     "--prefetch", "none,speculative", "-o", "{o}"],
    ["plot", "prefetch", "{t}", "--prefetchers", "transition,speculative", "-o", "{o}.png"],
    ["plot", "predictions", "{t}", "-o", "{o}.png"],
], ids=["simulate", "simulate-timing", "sweep", "plot-prefetch", "plot-predictions"])
def test_speculative_without_predictions_is_one_line_exit_2(no_predictions, tmp_path, capsys, args):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, *[a.format(t=no_predictions, o=out) for a in args])
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr
    assert str(no_predictions) in lines[0] and "pred1_experts" in lines[0]
    assert "moesim record" in lines[0] and "--predict-distance 1" in lines[0]
    assert not list(tmp_path.glob("out*"))   # nothing written


def test_plot_predictions_writes_a_figure(tmp_path, capsys):
    logits_trace = ROOT / "traces" / "learned-mixtral-32l-logits.parquet"
    if not logits_trace.is_file():
        pytest.skip("shipped trace not present")
    out = tmp_path / "pred.png"
    code, stdout, stderr = run_cli(capsys, "plot", "predictions", logits_trace, "--distances", "1,2", "-o", out)
    assert code == 0, stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
