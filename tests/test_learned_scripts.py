"""The learned-routing scripts on tiny inputs: the engine replay script (CPU, tiny geometry) writes cells
whose counts are the plan's; the trace builder merges runs with sequence offsets into valid traces; the
training script's corpus split and LR schedule."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from moesim.traces.format import DECODE, PREFILL, TraceMeta, TraceWriter, read_trace

ROOT = Path(__file__).resolve().parents[1]


def load_script(relpath: str):
    name = Path(relpath).stem
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def recorded_like(path: Path, *, seqs=(0, 1), tokens=6, layers=4, logits=False, seed=0) -> Path:
    """A trace with the recorder's columns: prefill token 0, decode after; predictions d = 1, 2."""
    rng = np.random.default_rng(seed)
    meta = TraceMeta(model="m", family="mixtral", num_layers=layers, num_experts=8, top_k=2, provenance={"kind": "recorded"})
    with TraceWriter(path, meta, pred_distances=[1, 2], logits=logits, pred_logits=logits) as w:
        for s in seqs:
            for t in range(tokens):
                ex = np.array([rng.choice(8, 2, replace=False) for _ in range(layers)])
                preds = {d: np.where(np.arange(layers)[:, None] >= d,
                                     np.array([rng.choice(8, 2, replace=False) for _ in range(layers)]), -1)
                         for d in (1, 2)}
                lg = {d: rng.normal(size=(layers, 8)) for d in (1, 2)} if logits else None
                w.write(s, [t] * layers, PREFILL if t == 0 else DECODE, np.arange(layers), ex, [[0.6, 0.4]] * layers,
                        logits=rng.normal(size=(layers, 8)) if logits else None, preds=preds, pred_logits=lg)
    return path


def test_replay_script_cells_match_the_plan(tmp_path, monkeypatch):
    from moesim.engine.plan import CachePlan, Routing

    trace = recorded_like(tmp_path / "t.parquet")
    out = tmp_path / "out"
    mod = load_script("studies/learned_routing/gpu_learned_replay.py")
    monkeypatch.setattr(sys, "argv", ["x", "--trace", str(trace), "--out", str(out), "--tokens", "4", "--tiny",
                                      "--cells", "lru:2:speculative:2,lfu:3:speculative"])
    assert mod.main() == 0
    cells = json.loads((out / "engine_cells.json").read_text())["cells"]
    assert [(c["policy"], c["cache_size"], c["prefetch"], c["prefetch_distance"]) for c in cells] == [
        ("lru", 2, "speculative", 2), ("lfu", 3, "speculative", 1)]
    routing = Routing.from_trace(read_trace(trace).filter_phase(DECODE), 4)
    for c in cells:
        params = {"distance": c["prefetch_distance"]} if c["prefetch"] != "none" else None
        plan = CachePlan(routing, c["cache_size"], c["policy"], c["prefetch"], prefetch_params=params)
        for t in range(routing.num_tokens):
            for layer in range(routing.num_layers):
                plan.step(t, layer)
        assert (c["hits"], c["requests"], c["prefetches"]) == (plan.hits, plan.requests, plan.prefetches)
    assert cells[0]["prefetches"] > 0


def test_trace_builder_offsets_sequences_and_splits_logits(tmp_path, monkeypatch):
    a = recorded_like(tmp_path / "a.parquet", seqs=(0, 1), logits=True, seed=1)
    b = recorded_like(tmp_path / "b.parquet", seqs=(0, 2), logits=True, seed=2)
    mod = load_script("tools/make_learned_traces.py")
    prefix = tmp_path / "learned"
    monkeypatch.setattr(sys, "argv", ["x", "--run", f"A={a}", "--run", f"B={b}", "--offset", "B=100",
                                      "--logits-seqs", "2", "--model", "tiny-learned", "-o", str(prefix)])
    assert mod.main() == 0
    main, logits = read_trace(tmp_path / "learned.parquet"), read_trace(tmp_path / "learned-logits.parquet")
    assert sorted(np.unique(main.seq).tolist()) == [0, 1, 100, 102]
    assert main.meta.model == "tiny-learned" and [r["name"] for r in main.meta.provenance["runs"]] == ["A", "B"]
    assert not main.has_logits() and main.pred_distances == (1, 2)
    src_b = read_trace(b)
    rows_b = main.seq >= 100
    assert np.array_equal(main.experts[rows_b], src_b.experts) and np.array_equal(main.pred_experts(2)[rows_b],
                                                                                   src_b.pred_experts(2))
    assert sorted(np.unique(logits.seq).tolist()) == [0, 1] and (logits.phase == DECODE).all()
    assert logits.has_logits() and "pred1_logits" in logits.table.column_names
    assert main.is_execution_ordered()


def test_corpus_split_and_schedule(tmp_path):
    mod = load_script("tools/train_learned_moe.py")
    for name in ("a.py", "b.md", "c.txt", "skip.bin", "sub/d.rst"):
        p = tmp_path / name
        p.parent.mkdir(exist_ok=True)
        p.write_text("x = 1\n")
    (tmp_path / "big.py").write_text("#" * (mod.MAX_FILE_BYTES + 1))
    files = mod.corpus_files([str(tmp_path), str(tmp_path)])   # a root twice: each file once
    assert [Path(f).name for f in files] == ["a.py", "b.md", "c.txt", "d.rst"]
    held = [f for f in files if mod.held_out(f)]
    assert held == [f for f in files if mod.held_out(f)]       # a pure function of the path
    share = np.mean([mod.held_out(f"/p/{i}.py") for i in range(20000)])
    assert share == pytest.approx(13 / 256, abs=0.005)
    lrs = [mod.lr_at(s, 100, 1e-3, 0.05) for s in range(100)]
    assert lrs[4] == pytest.approx(1e-3) and lrs[0] == pytest.approx(2e-4)
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01) and all(x >= y for x, y in zip(lrs[4:], lrs[5:], strict=False))
    # the tokenizer's sample: texts in order up to and including the one that reaches the size
    assert mod.tokenizer_sample(["a" * 400_000, "b" * 700_000, "c"], 1.0) == (["a" * 400_000, "b" * 700_000], 1_100_000)
    assert mod.tokenizer_sample(["ab", "c"], 1.0) == (["ab", "c"], 3)
