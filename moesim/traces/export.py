"""Exporters: libCacheSim's oracleGeneral binary and CSV, one record per expert request.

Requests are emitted in execution order (seq, token, layer) and router order within a set -- the
stream ``--semantics sequential`` replays. Object ids are ``layer * E + expert``.

oracleGeneral record (24 bytes, little-endian, packed): u32 clock time, u64 object id, u32 object
size, i64 next-access virtual time (-1 = never). moesim writes time = the (token, layer) step index
(0-based), size = 1 (so a libCacheSim cache of N bytes holds N experts), and next-access vtime =
the 0-based request index of the same id's next request.
"""

from __future__ import annotations

import os

import numpy as np

from moesim.safe_write import atomic_open
from moesim.traces.format import Trace

ORACLE_DTYPE = np.dtype([("time", "<u4"), ("id", "<u8"), ("size", "<u4"), ("next", "<i8")])
assert ORACLE_DTYPE.itemsize == 24


def request_stream(trace: Trace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(step, object id, next-access index) per request, in replay order."""
    trace = trace.execution_order()
    k = trace.meta.top_k
    ids = (trace.layer.astype(np.int64)[:, None] * trace.meta.num_experts + trace.experts.astype(np.int64)).reshape(-1)
    step = np.repeat(np.arange(len(trace), dtype=np.int64), k)
    n = ids.shape[0]
    order = np.lexsort((np.arange(n), ids))
    nxt = np.full(n, -1, np.int64)
    same = ids[order[1:]] == ids[order[:-1]]
    nxt[order[:-1][same]] = order[1:][same]
    return step, ids, nxt


def export_oracle_general(trace: Trace, out: str | os.PathLike) -> int:
    step, ids, nxt = request_stream(trace)
    rec = np.empty(ids.shape[0], ORACLE_DTYPE)
    rec["time"], rec["id"], rec["size"], rec["next"] = step, ids, 1, nxt
    with atomic_open(out, "wb") as fh:
        rec.tofile(fh)
    return int(rec.shape[0])


def export_csv(trace: Trace, out: str | os.PathLike) -> int:
    """Columns: seq,token,phase,layer,rank,expert,weight,object_id (rank = position in router order)."""
    trace = trace.execution_order()
    k, e = trace.meta.top_k, trace.meta.num_experts
    n = len(trace)
    cols = {
        "seq": np.repeat(trace.seq, k), "token": np.repeat(trace.token, k), "phase": np.repeat(trace.phase, k),
        "layer": np.repeat(trace.layer, k), "rank": np.tile(np.arange(k), n),
        "expert": trace.experts.reshape(-1), "weight": trace.weights.reshape(-1),
    }
    cols["object_id"] = cols["layer"].astype(np.int64) * e + cols["expert"]
    with atomic_open(out, "w", newline="") as fh:
        fh.write(",".join(cols) + "\n")
        fmt = ["%d"] * 6 + ["%.6g", "%d"]
        np.savetxt(fh, np.column_stack([c.astype(np.float64) for c in cols.values()]), fmt=fmt, delimiter=",")
    return n * k
