"""The timing simulator's timeline on disk: Chrome/Perfetto trace-event JSON (opens in ui.perfetto.dev),
or -- chosen by a ``.parquet`` suffix -- the same events as a compressed table, a small fraction of the
JSON's size (thousands of tokens make tens of MB of JSON). ``moesim plot timeline`` reads both."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from moesim.errors import DataError
from moesim.safe_write import atomic_open, atomic_path, read_json

_INFO_KEY = b"moesim_timeline"  # Parquet schema metadata: the run's otherData, as JSON


def is_parquet(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".parquet"


def write_timeline(doc: dict[str, Any], path: str | os.PathLike) -> int:
    """Write ``doc`` ({"traceEvents": [...], "otherData": {...}}) to ``path``; returns its size in bytes."""
    if not is_parquet(path):
        with atomic_open(path) as fh:
            json.dump(doc, fh)
        return os.path.getsize(path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    events = doc["traceEvents"]
    table = pa.table({
        "name": pa.array([e["name"] for e in events], pa.string()),
        "stream": pa.array([str(e["tid"]) for e in events], pa.string()),
        "ts_us": pa.array([e["ts"] for e in events], pa.float64()),
        "dur_us": pa.array([e["dur"] for e in events], pa.float64()),
        "args": pa.array([json.dumps(e.get("args") or {}, separators=(",", ":")) for e in events], pa.string()),
    })
    table = table.replace_schema_metadata({_INFO_KEY: json.dumps(doc.get("otherData") or {}).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", use_dictionary=["name", "stream", "args"])
    return os.path.getsize(path)


def read_timeline(path: str | os.PathLike) -> Any:
    """The trace-event document of a timeline file (JSON as written; Parquet turned back into it)."""
    p = Path(path)
    if not is_parquet(p):
        return read_json(p, "a JSON timeline")
    import pyarrow.parquet as pq

    if not p.is_file():
        raise DataError(p, "no such file")
    try:
        table = pq.read_table(p)
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors have no common base worth naming
        raise DataError(p, f"not a Parquet timeline ({str(exc).splitlines()[0]})") from None
    missing = {"name", "stream", "ts_us", "dur_us"} - set(table.column_names)
    if missing:
        raise DataError(p, f"not a timeline table (no column {', '.join(sorted(missing))})")
    cols = {c: table[c].to_pylist() for c in table.column_names}
    args = cols.get("args") or ["{}"] * table.num_rows
    events = [{"name": n, "ph": "X", "ts": ts, "dur": d, "pid": 0, "tid": s, "args": json.loads(a)}
              for n, s, ts, d, a in zip(cols["name"], cols["stream"], cols["ts_us"], cols["dur_us"], args, strict=True)]
    info = (table.schema.metadata or {}).get(_INFO_KEY)
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": json.loads(info) if info else {}}
