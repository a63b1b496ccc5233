from __future__ import annotations

import json

from moesim.cli import main


def test_demo_writes_table_results_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--tokens", "200"]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "hit rate per slot count" in text and "opt" in text and "lru" in text
    # the compile of the first policy is announced, so the progress bar's first ETA is not a surprise
    assert "note: the first policy compiles the replay kernels" in captured.err
    res = json.loads((out / "results.json").read_text())
    assert res["sizes"] == [2, 3, 4, 5, 6, 7, 8]
    from moesim.policies import policy_names

    assert set(res["hit_rate"]) == set(policy_names())
    for name, curve in res["hit_rate"].items():
        assert curve == sorted(curve) or name not in ("lru", "opt")
        assert curve[-1] >= curve[0]
    assert all(res["hit_rate"]["opt"][i] >= res["hit_rate"]["lru"][i] for i in range(7))
    for png in ("hit_rate_vs_slots.png", "activation_heatmap.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
