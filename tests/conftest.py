"""Shared fixtures: the real Mixtral trace from ../shared (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_JSONL = REPO.parent / "shared" / "traces" / "real" / "mixtral-8x7b-instruct-fp8_humaneval-2_vllm.jsonl"


@pytest.fixture(scope="session", autouse=True)
def _private_stream_cache(tmp_path_factory):
    """Commands run by the tests (in this process or in subprocesses) keep request streams in a temp
    directory, never in the user's ~/.cache (moesim.simulator.stream_cache)."""
    old = os.environ.get("MOESIM_CACHE_DIR")
    os.environ["MOESIM_CACHE_DIR"] = str(tmp_path_factory.mktemp("stream-cache"))
    yield
    if old is None:
        os.environ.pop("MOESIM_CACHE_DIR", None)
    else:
        os.environ["MOESIM_CACHE_DIR"] = old


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
