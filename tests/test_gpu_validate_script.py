"""benchmarks/gpu_validate.py end to end on CPU (--cpu-check: tiny model, same orchestration): the new
flags and outputs, and that `moesim validate` reads what it writes (skip_tokens honoured)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
from moesim.traces.format import read_trace  # noqa: E402
from tests.helpers import random_trace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_check_run_writes_every_output_and_validate_reads_it(tmp_path):
    rng = np.random.default_rng(3)
    a = random_trace(tmp_path / "a.parquet", rng, tokens=12, num_layers=2, num_experts=8, top_k=2, skew=1.0)
    b = random_trace(tmp_path / "b.parquet", rng, tokens=8, num_layers=2, num_experts=8, top_k=2, skew=1.0)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_validate.py"), "--cpu-check", "--trace", str(a.path),
                        "--skip-tokens", "3", "--extra-trace", str(b.path), "--out", str(out), "--tokens", "4",
                        "--layers", "2", "--policies", "lru", "--sizes", "2", "--prefetch", "none", "--repeats", "2",
                        "--late-quants", "", "--batch", "1,2", "--batch-steps", "2", "--prefill-chunk", "2",
                        "--prefill-tokens", "4", "--prompt-len", "2"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    main, extra = json.loads((out / "validate.json").read_text()), json.loads((out / "validate.b.json").read_text())
    assert main["skip_tokens"] == 3 and extra["skip_tokens"] == 0 and main["tokens"] == extra["tokens"] == 4
    # each cells file names its trace by content (moesim validate refuses another trace)
    assert main["trace_digest"] == read_trace(a.path).routing_digest()
    assert extra["trace_digest"] == read_trace(b.path).routing_digest() != main["trace_digest"]
    kinds = [(c["batch"], c["phase"], c["variant"]) for c in main["cells"]]
    assert kinds == [(1, "decode", None), (2, "decode", None), (1, "prefill", None), (1, "decode", "repeat"),
                     (2, "decode", "repeat"), (1, "prefill", "repeat")] and len(extra["cells"]) == 6
    batched = [c for c in main["cells"] if c["batch"] > 1 or c["phase"] == "prefill"]
    assert all(c["violations"] == 0 and c["device_copies"] == c["misses"] for c in batched)
    assert [c["steps"] for c in batched[:2]] == [2, 2]   # 2 decode steps of 2 sequences; 2 chunks of 2 prompt tokens
    assert main["in_situ_copies"]["n"] > 0 and extra["in_situ_copies"]["n"] > 0
    raw = json.loads((out / "calibration_raw.json").read_text())
    assert {"engine_terms", "copy_repeats", "all_miss", "all_resident"} <= set(raw)
    assert raw["all_miss"]["misses"] == raw["all_miss"]["requests"]   # the synthetic routing misses every time
    # the engine replayed tokens 3..6 of a: validate must simulate the same ones (identical hit counts)
    rep = tmp_path / "rep"
    v = subprocess.run([sys.executable, "-m", "moesim", "validate", str(a.path), "--engine", str(out / "validate.json"),
                        "-o", str(rep)], env=env, capture_output=True, text=True, timeout=300)
    assert v.returncode == 0 and "trace digest" not in v.stderr, v.stderr
    report = json.loads(rep.with_suffix(".json").read_text())
    assert report["trace_digest"] == main["trace_digest"]
    wrong = subprocess.run([sys.executable, "-m", "moesim", "validate", str(b.path), "--engine",
                            str(out / "validate.json"), "-o", str(tmp_path / "wrong")], env=env, capture_output=True,
                           text=True, timeout=300)
    assert wrong.returncode == 1 and len(wrong.stderr.splitlines()) == 1, wrong.stderr
    assert "was measured on another trace" in wrong.stderr and not (tmp_path / "wrong.json").exists()
    # a cells file from before the digest (the committed reports' files) still validates, with a warning
    old_file = tmp_path / "legacy_cells.json"
    old_file.write_text(json.dumps({k: x for k, x in main.items() if k != "trace_digest"}))
    old = subprocess.run([sys.executable, "-m", "moesim", "validate", str(a.path), "--engine", str(old_file),
                          "-o", str(tmp_path / "legacy_report")], env=env, capture_output=True, text=True, timeout=300)
    assert old.returncode == 0 and "names no trace digest" in old.stderr, old.stderr
    assert report["hit_rates_identical"]   # batch and prefill cells too: same tokens, same steps, same unions
    assert set(report["per_phase"]) == {"decode batch 1", "decode batch 2", "prefill batch 1"}
