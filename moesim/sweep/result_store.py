"""Where results live, so that a sweep can die at any moment and lose only the cells in flight.

- ``OUT.parquet`` — the consolidated table, one row per cell. Only ever replaced whole, through a
  temp file + rename, so it is never half-written.
- ``OUT.parquet.journal/`` — one JSON-lines file per run; a row is appended (and flushed to the OS)
  the moment its cell finishes. A process killed mid-write leaves at most a torn last line, which
  is ignored. Consolidation folds the journal into the table and then deletes the files it folded.
- ``OUT.parquet.journal/lock`` — the pid of the sweep writing this output (two writers refused).

A cell's row is identified by ``cell_id``; when a cell has several rows (an error then a retry, or a
journal not yet deleted), an ``ok`` row wins over an ``error`` row and a later one over an earlier.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from moesim.errors import DataError, UsageError
from moesim.sweep.spec import INPUT_COLUMNS, SWEEP_VERSION

META_KEY = b"moesim_sweep"
TRAILING_COLUMNS = ("status", "error", "elapsed_s", "worker", "run_id")


def journal_dir(out: Path) -> Path:
    return out.with_name(out.name + ".journal")


def read_results(path: str | os.PathLike) -> pa.Table:
    """Read a consolidated sweep table (validating that it is one)."""
    p = Path(path)
    if not p.exists():
        raise DataError(p, "no such file")
    try:
        table = pq.read_table(p)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(p, f"not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None or "cell_id" not in table.column_names:
        raise DataError(p, "not a moesim sweep results table (no 'moesim_sweep' metadata)")
    version = json.loads(raw).get("sweep_version")
    if version != SWEEP_VERSION:
        raise DataError(p, f"sweep table version {version!r} is not supported (this moesim writes {SWEEP_VERSION})")
    return table


def read_journal(path: Path) -> list[dict[str, Any]]:
    rows = []
    data = path.read_bytes()
    lines = data.split(b"\n")
    # The last element is b"" after a clean final newline, or a torn line from a killed writer.
    for lineno, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise DataError(path, f"line {lineno}: not valid JSON (a damaged journal; delete the file to redo its cells)") from None
    return rows


class ResultStore:
    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        if not self.out.parent.is_dir():
            raise DataError(self.out, f"output directory {str(self.out.parent)!r} does not exist")
        self.journal_dir = journal_dir(self.out)
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._journal = None
        self._locked = False

    # -- locking ---------------------------------------------------------------------------------
    def lock(self) -> None:
        self.journal_dir.mkdir(exist_ok=True)
        lock = self.journal_dir / "lock"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    raise UsageError(f"{self.out}: another sweep (pid {pid}) is writing this output") from None
                lock.unlink(missing_ok=True)  # stale: its writer died
                continue
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            self._locked = True
            return

    def unlock(self) -> None:
        if self._locked:
            (self.journal_dir / "lock").unlink(missing_ok=True)
            self._locked = False

    # -- reading ---------------------------------------------------------------------------------
    def journal_files(self) -> list[Path]:
        return sorted(self.journal_dir.glob("*.jsonl")) if self.journal_dir.is_dir() else []

    def _rows(self) -> tuple[pa.Table | None, list[dict[str, Any]], list[Path]]:
        table = read_results(self.out) if self.out.exists() else None
        files = self.journal_files()
        rows = [r for f in files for r in read_journal(f)]
        return table, rows, files

    def finished_keys(self) -> set[str]:
        """Cells with an ``ok`` row in the table or the journal (errors are retried)."""
        table, rows, _ = self._rows()
        done = {r["cell_id"] for r in rows if r.get("status") == "ok"}
        if table is not None:
            ids = table.column("cell_id").to_pylist()
            status = table.column("status").to_pylist()
            done.update(i for i, s in zip(ids, status, strict=True) if s == "ok")
        return done

    # -- writing ---------------------------------------------------------------------------------
    def append(self, row: dict[str, Any]) -> None:
        if self._journal is None:
            self.journal_dir.mkdir(exist_ok=True)
            self._journal = open(self.journal_dir / f"{self.run_id}.jsonl", "ab", buffering=0)
        row = {**row, "run_id": self.run_id}
        # One write() per row: a kill leaves whole rows plus at most one torn last line.
        self._journal.write(json.dumps(row).encode() + b"\n")

    def close_journal(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def consolidate(self, delete_journal: bool = False) -> int:
        """Fold the journal into the table (atomic replace). Returns the table's row count."""
        import polars as pl

        from moesim.traces.format import write_table_atomic

        table, rows, files = self._rows()
        if table is None and not rows:
            return 0
        frames = []
        if table is not None:
            frames.append(pl.from_arrow(table))
        if rows:
            frames.append(pl.DataFrame(rows, infer_schema_length=None))
        df = pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]
        df = (df.with_row_index("_order")
                .with_columns((pl.col("status") == "ok").alias("_ok"))
                .sort(["_ok", "_order"])
                .unique(subset="cell_id", keep="last")
                .sort("_order")
                .drop(["_order", "_ok"]))
        first = [c for c in INPUT_COLUMNS if c in df.columns]
        last = [c for c in TRAILING_COLUMNS if c in df.columns]
        df = df.select([*first, *[c for c in df.columns if c not in first and c not in last], *last])
        out = df.to_arrow()
        meta = {META_KEY: json.dumps({"sweep_version": SWEEP_VERSION}).encode()}
        write_table_atomic(out.replace_schema_metadata(meta), self.out)
        if delete_journal:
            self.close_journal()
            for f in files:
                f.unlink(missing_ok=True)
        return out.num_rows

    def cleanup(self) -> None:
        """Remove the journal folder once it holds nothing but our lock."""
        self.unlock()
        try:
            self.journal_dir.rmdir()
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
