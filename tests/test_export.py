"""Exporters: libCacheSim oracleGeneral (read back by libCacheSim itself) and CSV."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from moesim.cli import main
from moesim.simulator.replay import simulate
from moesim.traces.export import ORACLE_DTYPE
from moesim.traces.format import read_trace


def test_oracle_general_records(real_trace_path, tmp_path):
    out = tmp_path / "t.bin"
    assert main(["export", str(real_trace_path), "--format", "oracle-general", "-o", str(out)]) == 0
    rec = np.fromfile(out, ORACLE_DTYPE)
    t = read_trace(real_trace_path)
    assert out.stat().st_size == 24 * len(rec) == 24 * len(t) * 2
    ids = (t.layer.astype(np.int64)[:, None] * 8 + t.experts).reshape(-1)
    assert (rec["id"] == ids).all() and (rec["size"] == 1).all()
    # next-access index points at the next request of the same id, -1 when none
    for i in (0, 1, 100, len(rec) - 1):
        later = np.flatnonzero(rec["id"][i + 1:] == rec["id"][i])
        assert rec["next"][i] == (i + 1 + later[0] if later.size else -1)


def test_libcachesim_reads_the_export(real_trace_path, tmp_path):
    lcs = pytest.importorskip("libcachesim")
    out = tmp_path / "t.bin"
    main(["export", str(real_trace_path), "--format", "oracle-general", "-o", str(out)])
    t = read_trace(real_trace_path)
    reader = lcs.TraceReader(trace=str(out), trace_type=lcs.TraceType.ORACLE_GENERAL_TRACE)
    mr, _ = lcs.LRU(cache_size=64).process_trace(reader)
    ours = simulate(t, "lru", 64, scope="global", semantics="sequential")
    assert round(mr * ours.requests) == ours.misses


def test_csv_export(real_trace_path, tmp_path):
    out = tmp_path / "t.csv"
    assert main(["export", str(real_trace_path), "--format", "csv", "-o", str(out)]) == 0
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    t = read_trace(real_trace_path)
    assert len(rows) == 2 * len(t)
    assert rows[0].keys() == {"seq", "token", "phase", "layer", "rank", "expert", "weight", "object_id"}
    assert int(rows[3]["layer"]) == int(t.layer[1]) and int(rows[3]["expert"]) == int(t.experts[1][1])
    assert int(rows[3]["object_id"]) == int(t.layer[1]) * 8 + int(t.experts[1][1])
