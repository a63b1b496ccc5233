"""Crash-safe streaming: every flush is a complete Parquet part file in ``OUT.parquet.parts/``.

Parquet keeps its footer at the end, so one growing file is unreadable after a SIGKILL. Instead each
flush writes a whole small file (itself via temp + rename, so a part is either complete or absent);
a killed recording leaves a directory that :func:`moesim.traces.format.read_trace` opens as one trace.
On a clean close the parts are merged, row group by row group, into ``OUT.parquet`` (temp + rename)
and the directory is removed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from moesim.errors import DataError
from moesim.safe_write import atomic_path
from moesim.traces.format import TraceMeta, TraceWriter, dictionary_columns, now_iso, parts_dir_for


class PartsTraceWriter:
    """Same ``write`` signature as :class:`TraceWriter`; ``flush`` makes one durable part file."""

    def __init__(self, path: str | os.PathLike, meta: TraceMeta, *, pred_distances: Sequence[int] = (),
                 logits: bool = False, pred_logits: bool = False) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise DataError(self.path, f"output directory {str(self.path.parent)!r} does not exist")
        self.parts_dir = parts_dir_for(self.path)
        if self.parts_dir.exists():
            raise DataError(self.parts_dir, "holds parts of an unfinished recording; recover them into one trace "
                            "or remove the directory", "recover", str(self.path))
        self.parts_dir.mkdir()
        if not meta.created:
            meta.created = now_iso()  # fixed once so every part carries identical metadata
        self.meta = meta
        self._options: dict[str, Any] = dict(pred_distances=pred_distances, logits=logits, pred_logits=pred_logits)
        self._pending: list[tuple[tuple, dict]] = []
        self.buffered_rows = 0
        self.rows_written = 0
        self.parts = 0
        self._closed = False

    def write(self, *args: Any, **kwargs: Any) -> None:
        self._pending.append((args, kwargs))
        self.buffered_rows += len(args[1]) if len(args) > 1 else len(kwargs["token"])

    def flush(self) -> None:
        if not self._pending:
            return
        part = self.parts_dir / f"part-{self.parts:06d}.parquet"
        with TraceWriter(part, self.meta, **self._options) as w:
            for args, kwargs in self._pending:
                w.write(*args, **kwargs)
        self.parts += 1
        self.rows_written += self.buffered_rows
        self._pending, self.buffered_rows = [], 0

    def close(self) -> Path:
        if self._closed:
            return self.path
        self.flush()
        if self.parts == 0:  # nothing recorded: still leave a valid, empty trace
            with TraceWriter(self.parts_dir / "part-000000.parquet", self.meta, **self._options):
                pass
        merge_parts(self.parts_dir, self.path)
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Drop everything (used on errors; a SIGKILL never gets here and leaves the parts)."""
        self._closed = True
        shutil.rmtree(self.parts_dir, ignore_errors=True)

    def __enter__(self) -> PartsTraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def merge_parts(parts_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Concatenate part files (name order) into one trace file, atomically; then remove the parts."""
    parts_dir = Path(parts_dir)
    parts = sorted(p for p in parts_dir.glob("part-*.parquet"))
    if not parts:
        raise DataError(parts_dir, "holds no part files to merge")
    first = pq.ParquetFile(parts[0]).schema_arrow
    with atomic_path(out) as tmp:
        with pq.ParquetWriter(tmp, first, compression="zstd", use_dictionary=dictionary_columns(first.names)) as w:
            for part in parts:
                pf = pq.ParquetFile(part)
                if not pf.schema_arrow.equals(first, check_metadata=True):
                    raise DataError(part, "schema or metadata differs from the first part")
                for i in range(pf.num_row_groups):
                    w.write_table(pf.read_row_group(i))
    shutil.rmtree(parts_dir)
    return Path(out)
