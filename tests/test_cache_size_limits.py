"""Cache sizes past everything resident (issue 26 item 1): a cache with a slot for every key it can see
replays the same at any larger size, so such a size is replayed as that size and the command says so
in one line; memory never depends on the number typed (before: MemoryError / OverflowError)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from moesim.cli import main
from moesim.simulator.replay import simulate
from moesim.traces.format import DECODE, TraceMeta, TraceWriter, read_trace

HUGE = ["10000000", "1000000000000", "99999999999999999999999"]


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    """3 layers x 6 experts, top-2, 40 tokens of random routing."""
    rng = np.random.default_rng(5)
    meta = TraceMeta(model="m", family="mixtral", num_layers=3, num_experts=6, top_k=2)
    path = tmp_path_factory.mktemp("limits") / "t.parquet"
    tokens = 40
    sets = np.array([rng.choice(6, 2, replace=False) for _ in range(tokens * 3)])
    with TraceWriter(path, meta) as w:
        w.write(0, np.repeat(np.arange(tokens), 3), DECODE, np.tile(np.arange(3), tokens), sets,
                np.full((tokens * 3, 2), 0.5))
    return path


def _compulsory_misses(path) -> tuple[int, int]:
    """Requests and misses of a cache that never evicts: one miss per distinct (layer, expert) key
    (and per distinct expert of the model under one global cache: the same keys)."""
    t = read_trace(path)
    keys = {(int(layer), int(e)) for layer, row in zip(t.layer, t.experts, strict=True) for e in row}
    return int(t.experts.size), len(keys)


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err.strip().splitlines()


@pytest.mark.parametrize("policy", ["lru", "opt"])
@pytest.mark.parametrize("size", HUGE)
def test_simulate_replays_a_huge_size_as_everything_resident(trace_path, capsys, size, policy):
    code, out, err = _run(["simulate", trace_path, "--policy", policy, "--cache-size", size, "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    requests, misses = _compulsory_misses(trace_path)
    assert (result["cache_size"], result["requests"], result["misses"]) == (6, requests, misses)
    assert len(err) == 1 and f"cache size {size} is more than the 6 experts per layer" in err[0], err
    assert "replayed as 6" in err[0]


def test_a_size_at_the_limit_says_nothing(trace_path, capsys):
    code, out, err = _run(["simulate", trace_path, "--policy", "lru", "--cache-size", "6", "--json"], capsys)
    assert code == 0 and err == [] and json.loads(out)["cache_size"] == 6


def test_global_scope_limit_is_the_experts_of_the_model(trace_path, capsys):
    code, out, err = _run(["simulate", trace_path, "--policy", "lfu", "--cache-size", HUGE[2], "--scope", "global",
                           "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["cache_size"] == 18 and result["misses"] == _compulsory_misses(trace_path)[1]
    assert len(err) == 1 and "more than the 18 experts of the model" in err[0]
    # 7..18 slots are NOT everything resident globally: no note, no clamp
    code, out, err = _run(["simulate", trace_path, "--policy", "lru", "--cache-size", "12", "--scope", "global",
                           "--json"], capsys)
    assert code == 0 and err == [] and json.loads(out)["cache_size"] == 12


def test_layer_budget_entries_are_clamped_one_by_one(trace_path, capsys):
    code, out, err = _run(["simulate", trace_path, "--policy", "lru", "--layer-budgets", f"2,{HUGE[2]},0",
                           "--json", "--per-layer"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["cache_size"] == [2, 6, 0]
    t = read_trace(trace_path)
    layer1 = {int(e) for row in t.experts[t.layer == 1] for e in row}
    per_layer = {d["layer"]: d for d in result["per_layer"]}
    assert per_layer[1]["requests"] - per_layer[1]["hits"] == len(layer1)   # everything resident
    assert per_layer[2]["hits"] == 0                                        # disabled layer
    assert len(err) == 1 and "replayed as 6" in err[0]


def test_mrc_sizes_past_the_limit_are_one_point(trace_path, capsys):
    code, out, err = _run(["mrc", trace_path, "--policy", "opt", "--sizes", f"2,6,100,{HUGE[1]}", "--json"], capsys)
    assert code == 0, err
    curve = json.loads(out)["curve"]
    assert [c["cache_size"] for c in curve] == [2, 6]
    assert curve[1]["requests"] - curve[1]["hits"] == _compulsory_misses(trace_path)[1]
    assert len(err) == 1 and f"cache sizes 100, {HUGE[1]} are more than the 6 experts per layer" in err[0], err


def test_timing_model_takes_a_huge_size(trace_path, capsys):
    base = ["simulate", trace_path, "--policy", "lru", "--hardware", "a6000", "--expert-bytes", "1000000", "--json"]
    code, out, err = _run([*base, "--cache-size", HUGE[1]], capsys)
    assert code == 0, err
    huge = json.loads(out)
    code, out, _ = _run([*base, "--cache-size", "6"], capsys)
    exact = json.loads(out)
    assert huge["cache_size"] == 6
    assert huge["tokens_per_s"] == exact["tokens_per_s"] and huge["bytes_h2d"] == exact["bytes_h2d"]


def test_library_replay_reports_the_size_it_replayed(trace_path):
    result = simulate(read_trace(trace_path), "fifo", 10**30)
    assert result.cache_size == 6 and result.misses == _compulsory_misses(trace_path)[1]


def test_sweep_sizes_past_the_limit_are_one_cell(trace_path, tmp_path, capsys):
    out = tmp_path / "r.parquet"
    code, _, err = _run(["sweep", "--trace", trace_path, "--policy", "lru", "--cache-size", f"2,6,7,{HUGE[2]}",
                         "-o", out, "--executor", "inprocess", "--no-progress"], capsys)
    assert code == 0, err
    assert sorted(pl.read_parquet(out)["cache_size"].to_list()) == [2, 6]
    notes = [line for line in err if "note:" in line]
    assert len(notes) == 1 and f"cache sizes 7, {HUGE[2]} are more than the 6 experts" in notes[0], err
