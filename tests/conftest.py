"""Shared fixtures: the real Mixtral trace from $MOESIM_REAL_DIR, default ../shared/traces/real (never
copied into the repo; docs/trace-format.md says where to get it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DIR = Path(os.environ.get("MOESIM_REAL_DIR") or REPO.parent / "shared" / "traces" / "real")
# the shared copy's name, else the upstream file's own (Mario928/speculative-moe)
REAL_NAMES = ("mixtral-8x7b-instruct-fp8_humaneval-2_vllm.jsonl", "humaneval_2_routing.jsonl")
REAL_JSONL = next((REAL_DIR / n for n in REAL_NAMES if (REAL_DIR / n).exists()), REAL_DIR / REAL_NAMES[0])


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
        pytest.skip(f"real trace not found at {REAL_JSONL} (set MOESIM_REAL_DIR; see docs/trace-format.md)")
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
