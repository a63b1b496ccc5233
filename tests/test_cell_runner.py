"""The one cell runner (moesim.simulator.cell): its replay against a brute-force LRU written here, the
copy interval around the point estimate, one result's keys for ``simulate --json`` and a sweep row, and
library errors in domain words that the command line maps to its flags."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest

from moesim.cli import main
from moesim.errors import SettingError
from moesim.simulator.cell import CellSpec, run_cell
from moesim.simulator.cost_model import CostModel
from moesim.sweep.result_store import read_results
from moesim.traces.format import read_trace
from tests.helpers import random_trace

LAYERS, EXPERTS, TOP_K = 3, 8, 2
# a sweep row's own columns beside simulate --json's keys: its bookkeeping and the inputs simulate echoes
# under other names (or not at all)
SWEEP_ONLY = {"cell_id", "run_id", "trace", "trace_sha256", "params", "hardware", "prefetch", "prefetch_budget",
              "batch_size", "execution", "vs_bound", "status", "error", "elapsed_s",
              "worker"}


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory) -> Path:
    rng = np.random.default_rng(22)
    path = tmp_path_factory.mktemp("cell") / "t.parquet"
    random_trace(path, rng, tokens=50, num_layers=LAYERS, num_experts=EXPERTS, top_k=TOP_K, skew=1.2)
    return path


def brute_force_lru(trace, cache_size: int, scope: str) -> int:
    """Hits of docs/semantics.md's atomic LRU, one (token, layer) set at a time: hits are S & cache; all
    of S becomes most recent in router order; each missing expert goes in, evicting the least recent
    resident outside S."""
    ordered = trace.execution_order()
    caches: dict[int, list[int]] = {}   # cache id -> keys, least recent first
    hits = 0
    for layer, experts in zip(ordered.layer.tolist(), ordered.experts.tolist(), strict=True):
        cid = layer if scope == "layer" else 0
        keys = [e if scope == "layer" else layer * EXPERTS + e for e in experts]
        cache = caches.setdefault(cid, [])
        hits += sum(k in cache for k in keys)
        others = [k for k in cache if k not in keys]   # residents outside S, least recent first
        held = len(cache) - len(others)
        for k in keys:
            if k not in cache:
                if len(others) + held >= cache_size:
                    others.pop(0)
                held += 1
        cache[:] = others + keys   # all of S most recent, in router order
    return hits


@pytest.mark.parametrize("scope,size", [("layer", 2), ("layer", 4), ("global", 5)])
def test_a_cell_replays_exactly_as_a_brute_force_lru(trace_path, scope, size):
    trace = read_trace(trace_path)
    result = run_cell(trace, CellSpec("lru", size, scope=scope))
    assert result.timing is None
    assert result.replay.requests == len(trace) * TOP_K
    assert result.replay.hits == brute_force_lru(trace, size, scope)
    out = result.to_json()
    assert (out["hits"], out["misses"], out["scope"]) == (result.replay.hits, out["requests"] - out["hits"], scope)


def test_brute_force_lru_matches_the_hand_traced_example(tmp_path):
    # CONTRACTS.md's worked example: one layer, K = 3, top-2; hits 3 of 8
    from tests.helpers import write_trace

    t = write_trace(tmp_path / "w.parquet", [[0, 1], [2, 0], [3, 1], [0, 2]], num_layers=1, num_experts=EXPERTS)
    assert brute_force_lru(t, 3, "layer") == 3
    assert run_cell(t, CellSpec("lru", 3)).replay.hits == 3


def test_a_timed_cell_brackets_its_point_with_the_copy_interval(trace_path):
    trace = read_trace(trace_path)
    cost = CostModel.preset("h200")   # its calibration holds a measured copy interval
    fast, slow = cost.copy_interval_scales()
    assert fast < 1.0 < slow
    result = run_cell(trace, CellSpec("lru", 3, cost=cost))
    out = result.to_json()
    lo, hi = out["sim_interval"]
    assert lo <= out["tokens_per_s"] <= hi and lo < hi
    assert out["ms_per_token_interval"][0] <= out["ms_per_token"] <= out["ms_per_token_interval"][1]
    assert out["copy_interval_scales"] == [round(fast, 5), round(slow, 5)]
    # the exact replay's counts, and the timing run's beside them (no prefetcher: the same here)
    assert out["hits"] == brute_force_lru(trace, 3, "layer")
    assert out["timing_hits"] == out["hits"] and "prefetch_precision" not in out
    # without an interval (a preset that measured none, or interval=False): no sim_interval
    assert "sim_interval" not in run_cell(trace, CellSpec("lru", 3, cost=cost, interval=False)).to_json()
    assert "sim_interval" not in run_cell(trace, CellSpec("lru", 3, cost=CostModel.preset("a6000"))).to_json()


def _simulate_json(capsys, trace_path: Path, *extra: str) -> dict:
    capsys.readouterr()
    assert main(["simulate", str(trace_path), "--policy", "lfu", "--cache-size", "3", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _sweep_row(capsys, tmp_path: Path, trace_path: Path, *extra: str) -> dict:
    out = tmp_path / "r.parquet"
    assert main(["sweep", "-o", str(out), "--trace", str(trace_path), "--policy", "lfu", "--cache-size", "3",
                 "--executor", "inprocess", "--no-progress", *extra]) == 0
    rows = read_results(out).to_pylist()
    assert len(rows) == 1
    return rows[0]


@pytest.mark.parametrize("extra", [(), ("--hardware", "h200"),
                                   ("--hardware", "h200", "--prefetch", "transition", "--prefetch-budget", "1"),
                                   ("--hardware", "h200", "--execution", "copy"),
                                   ("--hardware", "h200", "--execution", "fiddler"), ("--vs-bound",),
                                   ("--hardware", "h200", "--prefetch", "transition", "--prefetch-budget", "1",
                                    "--vs-bound")])
def test_sweep_columns_are_simulate_json_keys(capsys, tmp_path, trace_path, extra):
    sim = _simulate_json(capsys, trace_path, *extra)
    row = _sweep_row(capsys, tmp_path, trace_path, *extra)
    assert set(sim) <= set(row)
    assert set(row) - set(sim) <= SWEEP_ONLY
    for key, value in sim.items():
        want = json.dumps(value, sort_keys=True) if isinstance(value, list | dict) else value
        assert row[key] == want, key
    if "--hardware" in extra:
        assert "sim_interval" in sim and "timing_hit_rate" in sim


def test_setting_errors_speak_domain_words_and_the_cli_adds_the_flag(trace_path, capsys):
    trace = read_trace(trace_path)
    with pytest.raises(SettingError) as err:
        run_cell(trace, CellSpec("lru", 3, scope="global", cost=CostModel.preset("h200")))
    assert (err.value.setting, err.value.fix) == ("scope", "layer") and "--" not in str(err.value)
    with pytest.raises(SettingError) as err:
        run_cell(trace, CellSpec("lru", [2] * LAYERS, scope="global"))
    assert err.value.setting == "scope" and "--" not in str(err.value)
    with pytest.raises(SettingError) as err:
        run_cell(trace, CellSpec("lru", 3, params={"nope": 1}))
    assert err.value.setting == "params" and "'nope'" in str(err.value)
    capsys.readouterr()
    assert main(["simulate", str(trace_path), "--policy", "lru", "--cache-size", "3", "--scope", "global",
                 "--hardware", "h200"]) == 2
    err_line = capsys.readouterr().err.strip()
    assert err_line.endswith("(--scope layer)") and len(err_line.splitlines()) == 1
    assert main(["simulate", str(trace_path), "--policy", "lru", "--cache-size", "3", "--pcie-gbps", "0"]) == 2
    assert capsys.readouterr().err.strip().endswith("(--pcie-gbps)")


def _raised_messages(path: Path) -> list[str]:
    """The literal text of every ``raise X(...)`` message in a source file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            for arg in node.exc.args:
                for sub in ast.walk(arg):
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                        out.append(sub.value)
    return out


@pytest.mark.parametrize("package", ["simulator", "policies", "sweep"])
def test_library_errors_name_no_command_line_flag(package):
    root = Path(__file__).resolve().parents[1] / "moesim" / package
    flagged = [(p.name, m) for p in sorted(root.glob("*.py")) for m in _raised_messages(p)
               if re.search(r"(^|\s)--[a-z]", m) and "`moesim " not in m]
    assert flagged == []


def test_an_error_is_one_stderr_line_even_where_timing_notes_its_default_preset(trace_path, capsys):
    capsys.readouterr()
    assert main(["simulate", str(trace_path), "--policy", "lru", "--cache-size", "3", "--prefetch", "speculative"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs speculative predictions recorded at distance 1" in err[0]
    assert main(["simulate", str(trace_path), "--policy", "lru", "--cache-size", "3", "--prefetch", "transition"]) == 0
    assert "timing uses the h200 preset" in capsys.readouterr().err


@pytest.mark.parametrize("policy,params,setting", [("nope", {}, "policy"), ("lrfu", {"lam": "abc"}, "params"),
                                                    ("lru", {"bogus": 1}, "params")])
def test_replay_timing_and_sweep_refuse_a_policy_with_the_same_words(trace_path, policy, params, setting):
    from moesim.simulator.replay import simulate
    from moesim.simulator.timing import simulate_timing
    from moesim.sweep.spec import SweepSpec, expand

    trace = read_trace(trace_path)
    messages = []
    for attempt in (lambda: simulate(trace, policy, 3, params=params),
                    lambda: simulate_timing(trace, policy, 3, CostModel.preset("a6000"), policy_params=params),
                    lambda: expand(SweepSpec([str(trace_path)], [policy], [3],
                                             params={policy: {k: [v] for k, v in params.items()}}))):
        with pytest.raises(SettingError) as err:
            attempt()
        assert err.value.setting == setting
        messages.append(str(err.value))
    assert len(set(messages)) == 1, messages


def test_one_decision_routes_a_timing_run_to_the_compiled_or_the_event_path(trace_path, monkeypatch):
    """``timing_kernel.why_not_compiled`` is the one place that decides: a copy-only cell runs the
    compiled kernel, an execution policy it cannot price (the CPU and low-bit executors) runs the event
    path, with the same copy results where both apply; forcing the compiled path names the reason."""
    from moesim.errors import UsageError
    from moesim.simulator import timing_kernel
    from moesim.simulator.timing import simulate_timing

    trace = read_trace(trace_path)
    assert timing_kernel.why_not_compiled("lru", None, "none", {}, "copy", 1, False, [3] * LAYERS, False,
                                          "moesim") is None
    assert "execution fiddler" in timing_kernel.why_not_compiled("lru", None, "none", {}, "fiddler", 1, False,
                                                                  [3] * LAYERS, False, "moesim")
    calls = []
    real = timing_kernel.des_kernel
    monkeypatch.setattr(timing_kernel, "des_kernel", lambda *a: calls.append(1) or real(*a))
    cost = CostModel.preset("h200")
    copy = run_cell(trace, CellSpec("lru", 3, cost=cost, execution="copy", interval=False))
    assert calls == [1]
    fiddler = run_cell(trace, CellSpec("lru", 3, cost=cost, execution="fiddler", interval=False))
    assert calls == [1]     # not called again: the event path priced it
    assert fiddler.timing.executed["cpu"] > 0 and sum(fiddler.timing.executed.values()) == fiddler.timing.requests
    event = simulate_timing(trace, "lru", 3, cost, engine="python", execution="copy")
    assert copy.timing.to_dict() == event.to_dict()
    with pytest.raises(UsageError, match="execution fiddler"):
        simulate_timing(trace, "lru", 3, cost, engine="numba", execution="fiddler")


def test_sweep_execution_axis(capsys, tmp_path, trace_path):
    """The execution axis multiplies the timed cells only (a hit-rate cell collapses to "none"), each row
    counts its requests by executor, and n-cpu-moe puts every request of its layers on the CPU."""
    out = tmp_path / "r.parquet"
    assert main(["sweep", "-o", str(out), "--trace", str(trace_path), "--policy", "lru", "--cache-size", "3",
                 "--hardware", "none,h200", "--execution", "none,copy,n-cpu-moe=1,fiddler", "--executor",
                 "inprocess", "--no-progress"]) == 0
    rows = {(r["hardware"], r["execution"]): r for r in read_results(out).to_pylist()}
    assert sorted(rows) == [("h200", "copy"), ("h200", "fiddler"), ("h200", "n-cpu-moe=1"), ("h200", "none"),
                            ("none", "none")]
    assert rows[("h200", "none")]["executed"] is None and rows[("none", "none")]["executed"] is None
    per_layer = read_trace(trace_path).execution_order()
    layer0 = int((per_layer.layer == 0).sum()) * TOP_K
    for ex in ("copy", "fiddler", "n-cpu-moe=1"):
        counts = json.loads(rows[("h200", ex)]["executed"])
        assert sum(counts.values()) == rows[("h200", ex)]["timing_requests"]
    assert json.loads(rows[("h200", "n-cpu-moe=1")]["executed"])["cpu"] == layer0
    assert json.loads(rows[("h200", "copy")]["executed"])["cpu"] == 0
    assert rows[("h200", "copy")]["tokens_per_s"] == rows[("h200", "none")]["tokens_per_s"]
    rc = main(["sweep", "-o", str(tmp_path / "x.parquet"), "--trace", str(trace_path), "--policy", "lru",
               "--cache-size", "3", "--execution", "fiddler", "--executor", "inprocess"])
    assert rc == 2 and "timing model" in capsys.readouterr().err
    rc = main(["sweep", "-o", str(tmp_path / "x.parquet"), "--trace", str(trace_path), "--policy", "lru",
               "--cache-size", "3", "--hardware", "h200", "--execution", "cpu-only", "--executor", "inprocess"])
    assert rc == 2 and "unknown execution" in capsys.readouterr().err
    assert not (tmp_path / "x.parquet").exists()


def test_vs_bound_measures_a_cell_against_the_offline_bound(capsys, trace_path):
    """``simulate --vs-bound``: without a prefetcher the bound is Belady's misses (OPT meets it, LRU reaches
    a fraction); with one it is the bound at the prefetcher's distance and budget, which no run beats
    (a bound taken at lookahead 0 would sit above a prefetching run's misses)."""
    opt = _simulate_json(capsys, trace_path, "--policy", "opt", "--vs-bound")
    assert opt["bound_misses"] == opt["misses"] and opt["bound_fraction"] == 1.0 and opt["bound_lookahead"] == 0
    lfu = _simulate_json(capsys, trace_path, "--vs-bound")
    assert lfu["bound_misses"] == opt["misses"]
    assert lfu["bound_fraction"] == round(opt["misses"] / lfu["misses"], 6) < 1.0
    for distance in ("1", "2"):
        pf = _simulate_json(capsys, trace_path, "--hardware", "h200", "--prefetch", "transition", "--prefetch-budget",
                            "1", "--prefetch-distance", distance, "--vs-bound")
        assert pf["bound_lookahead"] == int(distance) and pf["bound_prefetch_budget"] == 1
        assert pf["bound_misses"] <= pf["timing_misses"] and pf["bound_fraction"] <= 1.0
        assert pf["bound_misses"] < opt["misses"]
    assert main(["simulate", str(trace_path), "--policy", "lru", "--layer-budgets", "3,4,3", "--vs-bound"]) == 2
    assert "--vs-bound" in capsys.readouterr().err
    assert main(["sweep", "-o", str(trace_path.parent / "x.parquet"), "--trace", str(trace_path), "--policy", "lru",
                 "--cache-size", "3", "--scope", "layer,global", "--vs-bound", "--executor", "inprocess"]) == 2
    assert "--vs-bound" in capsys.readouterr().err and not (trace_path.parent / "x.parquet").exists()
