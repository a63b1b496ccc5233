"""Exact differential tests against libCacheSim (an independent implementation) on >= 1M requests.

moesim replays with ``--semantics sequential`` and one global cache (ids layer*E + expert), which is
what a generic cache simulator does with the exported oracleGeneral stream. Notes on names:
libCacheSim's ``LFU`` is in-cache LFU (counts restart on eviction) = moesim ``lfu-cache``; moesim's
``lfu`` is *perfect* LFU (docs/semantics.md) and has no libCacheSim twin. S3FIFO is only called with >= 10
slots (fewer kills libCacheSim's process).
"""

from __future__ import annotations

import pytest

lcs = pytest.importorskip("libcachesim")

from moesim.simulator.replay import simulate  # noqa: E402
from moesim.traces.export import export_oracle_general  # noqa: E402
from moesim.traces.format import read_trace  # noqa: E402
from moesim.traces.synth import load_preset, synthesize  # noqa: E402

PAIRS = [("lru", "LRU"), ("fifo", "FIFO"), ("lfu-cache", "LFU"), ("opt", "Belady"), ("arc", "ARC"),
         ("s3fifo", "S3FIFO"), ("sieve", "Sieve")]


@pytest.fixture(scope="module")
def big_stream(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")
    path = d / "synth.parquet"
    synthesize(load_preset("mixtral-8x7b"), 16000, 123, path, progress=False)  # 16000 x 32 x 2 = 1,024,000
    trace = read_trace(path)
    og = d / "synth.oracleGeneral"
    n = export_oracle_general(trace, og)
    assert n >= 1_000_000
    return trace, og, n


def _lcs_misses(cls_name, size, og, n):
    reader = lcs.TraceReader(trace=str(og), trace_type=lcs.TraceType.ORACLE_GENERAL_TRACE)
    miss_ratio, _ = getattr(lcs, cls_name)(cache_size=size).process_trace(reader)
    return round(miss_ratio * n)


@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_exact_parity_with_libcachesim(big_stream, ours, theirs):
    # 8 and 16 slots run lru/fifo on the compiled stamp-scan layout, 64..256 on the linked lists
    trace, og, n = big_stream
    for size in (8, 16, 64, 160, 256):
        if theirs == "S3FIFO" and size < 64:  # libCacheSim's S3FIFO: < 10 slots crash, 16 slots miss everything
            continue
        r = simulate(trace, ours, size, scope="global", semantics="sequential")
        assert r.requests == n and r.method == "numba"
        assert r.misses == _lcs_misses(theirs, size, og, n), (ours, size)
