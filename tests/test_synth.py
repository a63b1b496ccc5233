"""Synthetic traces: fidelity to the real Mixtral trace, determinism, fitting round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesim.cli import main
from moesim.simulator.replay import simulate
from moesim.traces.format import read_trace
from moesim.traces.synth import fit_preset, load_preset, synthesize

POLICIES = ("lru", "lfu", "fifo", "opt")


@pytest.fixture(scope="module")
def preset_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "s.parquet"
    synthesize(load_preset("mixtral-8x7b"), 20000, 2024, path, progress=False)
    return read_trace(path)


def test_preset_hit_rates_within_3_points_of_the_real_trace(real_trace, preset_trace, capsys):
    rows = []
    for k in (3, 4, 5, 6):
        for p in POLICIES:
            real, syn = simulate(real_trace, p, k).hit_rate, simulate(preset_trace, p, k).hit_rate
            rows.append((k, p, real, syn))
    with capsys.disabled():
        print("\nK policy   real   synth  diff(points)")
        for k, p, r, s in rows:
            print(f"{k} {p:6s} {r:.4f} {s:.4f} {100 * (s - r):+.2f}")
    for k, p, r, s in rows:
        assert abs(s - r) <= 0.03, (k, p, r, s)


def test_same_seed_gives_byte_identical_files(tmp_path):
    for name in ("a", "b"):
        assert main(["synth", "--tokens", "500", "--seed", "9", str(tmp_path / f"{name}.parquet")]) == 0
    assert main(["synth", "--tokens", "500", "--seed", "10", str(tmp_path / "c.parquet")]) == 0
    a, b, c = ((tmp_path / f"{n}.parquet").read_bytes() for n in "abc")
    assert a == b and a != c


def test_synth_shape_and_metadata(tmp_path):
    path = tmp_path / "s.parquet"
    assert main(["synth", "--tokens", "300", "--seed", "1", "--sequences", "3", str(path)]) == 0
    t = read_trace(path)
    assert len(t) == 300 * 32 and sorted(set(t.seq.tolist())) == [0, 1, 2]
    assert t.meta.provenance["kind"] == "synthetic" and t.meta.provenance["seed"] == 1
    assert t.is_execution_ordered()
    w = t.weights
    assert (np.diff(w, axis=1) <= 1e-3).all() and np.allclose(w.sum(1), 1.0, atol=3e-3)
    assert (t.experts[:, 0] != t.experts[:, 1]).all()


def test_fit_synth_round_trip(real_trace_path, tmp_path):
    out = tmp_path / "p.json"
    assert main(["fit-synth", str(real_trace_path), "-o", str(out)]) == 0
    raw = json.loads(out.read_text())
    assert raw["num_layers"] == 32 and len(raw["retain"]) == 32
    preset = load_preset(out)
    assert np.allclose(preset.popularity.sum(1), 1.0, atol=1e-4)
    # a preset fitted to its own synthetic output keeps the statistics it was fitted to
    s = tmp_path / "s.parquet"
    synthesize(preset, 4000, 0, s, progress=False)
    refit = fit_preset(read_trace(s))
    assert np.abs(refit.retain - preset.retain).mean() < 0.08


def test_bad_preset_file(tmp_path, capsys):
    p = tmp_path / "bad.json"
    p.write_text('{"preset_version": 1, "name": "x"}')
    assert main(["synth", "--preset", str(p), "--tokens", "5", str(tmp_path / "o.parquet")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(p) in err[0]
