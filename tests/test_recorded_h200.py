"""The trace recorded on the H200 from a full-geometry (random-weight) Mixtral-8x7B run stays readable and
keeps the recorder's conventions (studies/recorder_overhead/)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moesim.simulator.replay import simulate
from moesim.traces.format import read_trace

TRACE = Path(__file__).resolve().parents[1] / "studies" / "recorder_overhead" / "raw" / "recorded_h200_mixtral8x7b_random_weights.parquet"


def test_full_geometry_recording_has_every_row_and_prediction():
    t = read_trace(TRACE)
    assert (t.meta.num_layers, t.meta.num_experts, t.meta.top_k, t.meta.hidden_size) == (32, 8, 2, 4096)
    assert len(t) == 162 * 32
    tab = t.table.to_pydict()
    layers = np.asarray(tab["layer"])
    for d in (1, 2):
        pred = tab[f"pred{d}_experts"]
        # layer l's row holds the prediction made from layer l-d's output; the first d layers have none (-1s)
        assert all(pred[i] == [-1, -1] for i in np.flatnonzero(layers < d))
        have = [pred[i] for i in np.flatnonzero(layers >= d)]
        assert all(p is not None and len(set(p)) == 2 and all(0 <= e < 8 for e in p) for p in have)
    experts = np.asarray(tab["experts"])
    assert experts.shape == (len(t), 2) and (experts[:, 0] != experts[:, 1]).all()
    w = np.asarray(tab["weights"], dtype=np.float64)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=2e-3)   # mixtral renormalises the top-2
    assert (w[:, 0] >= w[:, 1]).all()                            # router order: highest weight first
    res = simulate(t, "lru", 4)
    assert res.requests == 2 * len(t) and 0 < res.hits < res.requests
