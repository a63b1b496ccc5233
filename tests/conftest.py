"""Shared fixtures: the real Mixtral trace from ../shared (never copied into the repo)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_JSONL = REPO.parent / "shared" / "traces" / "real" / "mixtral-8x7b-instruct-fp8_humaneval-2_vllm.jsonl"


@pytest.fixture(scope="session")
def real_jsonl() -> Path:
    if not REAL_JSONL.exists():
        pytest.skip(f"real trace not found at {REAL_JSONL}")
    return REAL_JSONL


@pytest.fixture(scope="session")
def real_trace_path(real_jsonl, tmp_path_factory) -> Path:
    from moesim.traces.vllm import import_vllm_jsonl

    out = tmp_path_factory.mktemp("real") / "real.parquet"
    import_vllm_jsonl(real_jsonl, out)
    return out


@pytest.fixture(scope="session")
def real_trace(real_trace_path):
    from moesim.traces.format import read_trace

    return read_trace(real_trace_path)
