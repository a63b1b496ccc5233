"""What every JSON-lines importer shares: reading lines (a bad line is one error naming its number),
collecting (seq, token, layer) rows (exact duplicates collapse, conflicting ones are errors), and
turning them into a trace with the model's geometry and weight format resolved (given > the log's
own words > a known model > the data), every choice written into the provenance."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from moesim.errors import DataError, SettingNote
from moesim.traces.describe import value_text
from moesim.traces.format import DECODE, TraceMeta, TraceWriter
from moesim.traces.models import ModelGeometry, known_model, quantization_in_name

# the first line of a file that Git LFS left in place of the data
LFS_POINTER = "version https://git-lfs.github.com/spec/"
PROGRESS_MIN_BYTES = 16 << 20  # smaller logs import in about a second: no bar


def bad_line(path: Path, lineno: int, what: str, setting: str | None = None, fix: str | None = None) -> DataError:
    """``setting`` and ``fix``: the import option that would read the line right (DataError's)."""
    return DataError(path, f"line {lineno}: {what}", setting, fix)


def json_lines(path: Path, progress: bool | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; invalid JSON or a non-object is an error.

    Streams the file (one line in memory at a time). ``progress``: a bar of bytes read on stderr
    (default: when stderr is a terminal and the file is over 16 MB)."""
    if not path.exists():
        raise DataError(path, "no such file")
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise DataError(path, f"cannot open ({exc.strerror})") from None
    size = os.fstat(fh.fileno()).st_size
    show = sys.stderr.isatty() and size > PROGRESS_MIN_BYTES if progress is None else progress
    with fh, tqdm(total=size, unit="B", unit_scale=True, desc=f"import {path.name}", file=sys.stderr,
                  disable=not show, leave=False) as bar:
        done = 0
        for lineno, raw in enumerate(fh, 1):
            done += len(raw)
            if lineno % 8192 == 0:  # the bar costs nothing per line
                bar.update(done - bar.n)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(path, "not a UTF-8 text file") from None
            if not line.strip():
                continue
            if lineno == 1 and line.startswith(LFS_POINTER):
                raise DataError(path, "this is a Git LFS pointer, not the data: fetch the file itself "
                                      "(`git lfs pull`, or see docs/trace-format.md for the real trace)")
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise bad_line(path, lineno, f"not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise bad_line(path, lineno, "not a JSON object")
            yield lineno, obj
        bar.update(done - bar.n)


def non_negative_int(path: Path, lineno: int, name: str, v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise bad_line(path, lineno, f"{name} must be a non-negative integer, got {v!r}")
    return v


def expert_ids(path: Path, lineno: int, name: str, v: Any) -> tuple[int, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        raise bad_line(path, lineno, f"{name} must be a non-empty list of non-negative integers, got {v!r}")
    if len(set(v)) != len(v):
        raise bad_line(path, lineno, f"{name} lists an expert twice: {v!r}")
    return tuple(v)


def routing_weights(path: Path, lineno: int, name: str, v: Any, k: int) -> tuple[float, ...]:
    if not isinstance(v, list) or len(v) != k or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in v):
        raise bad_line(path, lineno, f"{name} must be {k} numbers, got {v!r}")
    return tuple(float(x) for x in v)


@dataclass
class Rows:
    """Collected rows, sorted by (seq, token, layer), one per key; ``lines`` = where each came from."""

    seq: np.ndarray
    token: np.ndarray
    layer: np.ndarray
    experts: np.ndarray  # (n, k)
    weights: np.ndarray  # (n, k) float64, as the log wrote them
    phase: np.ndarray
    lines: np.ndarray


class RoutingRows:
    """Rows keyed by (seq, token, layer), each remembering the line it came from.

    Held in numpy chunks (tens of bytes a row, not a Python object per value), so a log of millions of
    lines fits in a fraction of its size; duplicates are resolved in :meth:`finish`: exact ones collapse,
    a row that differs from its key's first row is an error naming both lines."""

    CHUNK = 1 << 13  # rows held as Python tuples before they become arrays

    def __init__(self, path: Path, describe_key: tuple[str, str, str] = ("seq", "token", "layer")) -> None:
        self.path = path
        self.describe_key = describe_key  # the log's own field names, for messages
        self.width: int | None = None
        self._ints: list[tuple[int, int, int, int, int]] = []  # (seq, token, layer, phase, line) of the open chunk
        self._experts: list[tuple[int, ...]] = []
        self._weights: list[tuple[float, ...]] = []
        self._chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._done: Rows | None = None

    def add(self, lineno: int, seq: int, token: int, layer: int, experts: tuple[int, ...],
            weights: tuple[float, ...], phase: int = DECODE) -> None:
        if self.width is None:
            self.width = len(experts)
        elif len(experts) != self.width:
            raise bad_line(self.path, lineno, f"{len(experts)} experts where earlier lines have {self.width}")
        self._ints.append((seq, token, layer, phase, lineno))
        self._experts.append(experts)
        self._weights.append(weights)
        if len(self._ints) >= self.CHUNK:
            self._seal()

    def _seal(self) -> None:
        if self._ints:
            try:
                chunk = (np.array(self._ints, dtype=np.int64), np.array(self._experts, dtype=np.int64),
                         np.array(self._weights, dtype=np.float64))
            except OverflowError:
                raise DataError(self.path, "a seq, token, layer or expert number is too large (over 2^63)") from None
            self._chunks.append(chunk)
            self._ints, self._experts, self._weights = [], [], []

    def finish(self) -> Rows:
        """Every row once, in (seq, token, layer) order; a conflicting duplicate is a DataError."""
        if self._done is None:
            self._seal()
            k = self.width or 0
            ints = np.concatenate([c[0] for c in self._chunks]) if self._chunks else np.zeros((0, 5), np.int64)
            experts = np.concatenate([c[1] for c in self._chunks]) if self._chunks else np.zeros((0, k), np.int64)
            weights = np.concatenate([c[2] for c in self._chunks]) if self._chunks else np.zeros((0, k))
            self._chunks = []
            order = np.lexsort((ints[:, 4], ints[:, 2], ints[:, 1], ints[:, 0]))  # by key, then by line
            ints, experts, weights = ints[order], experts[order], weights[order]
            first = np.ones(len(ints), dtype=bool)
            first[1:] = np.any(ints[1:, :3] != ints[:-1, :3], axis=1)
            self._check_duplicates(ints, experts, weights, first)
            self._done = Rows(ints[first, 0], ints[first, 1], ints[first, 2], experts[first], weights[first],
                              ints[first, 3].astype(np.int8), ints[first, 4])
        return self._done

    def _check_duplicates(self, ints: np.ndarray, experts: np.ndarray, weights: np.ndarray, first: np.ndarray) -> None:
        """A later row of a key that differs from the key's first row: error at the earliest such line."""
        head = np.maximum.accumulate(np.where(first, np.arange(len(ints)), 0))  # each row's key's first row
        differs = ~first & (np.any(experts != experts[head], axis=1) | np.any(weights != weights[head], axis=1)
                            | (ints[:, 3] != ints[head, 3]))
        if differs.any():
            at = np.flatnonzero(differs)[np.argmin(ints[differs, 4])]
            seq, token, layer = (int(x) for x in ints[at, :3])
            a, b, c = self.describe_key
            raise bad_line(self.path, int(ints[at, 4]),
                           f"conflicts with line {int(ints[head[at], 4])} for {a}={seq} {b}={token} {c}={layer}")

    def __len__(self) -> int:
        return len(self.finish().seq)


@dataclass
class ImportOptions:
    """What the user said on the command line (None = not said)."""

    model: str | None = None
    num_layers: int | None = None
    num_experts: int | None = None
    expert_bytes: int = 0
    quantization: str | None = None


def write_imported(rows: RoutingRows, dst: str | os.PathLike, opts: ImportOptions, *, fmt: str,
                   model_in_log: str | None = None, quantization_in_log: str | None = None,
                   assumed: ModelGeometry | None = None, provenance: dict[str, Any] | None = None,
                   notes: list[str] | None = None) -> TraceMeta:
    """Resolve the geometry and weight format, check every row against them, write the trace.

    ``assumed``: the geometry a format implies when nothing names the model (the public vLLM
    collector's logs are Mixtral-8x7B); used only when the rows fit its top-k and layer count.
    ``notes`` receives one-line remarks for the user (what was inferred rather than read)."""
    src = rows.path
    r = rows.finish()
    if not len(r.seq):
        raise DataError(src, "no rows")
    notes = notes if notes is not None else []
    k = rows.width or 0
    max_layer = int(r.layer.max())
    named = opts.model or model_in_log
    how = "the import options" if opts.model else "the log header" if model_in_log else "the file name"
    geo = known_model(named) if named else known_model(src.name)
    if geo is None and not named and assumed is not None and k == assumed.top_k and max_layer < assumed.num_layers:
        geo, how = assumed, "assumed"
    if geo is not None and k != geo.top_k and opts.num_experts is None:
        raise bad_line(src, int(r.lines.min()), f"{k} experts per row, but {geo.model} routes top-{geo.top_k}; if "
                                                "the log is from another model, give its expert count (and its name)",
                       "num_experts", "N")
    n_layers = opts.num_layers or (geo.num_layers if geo else max_layer + 1)
    row_max = r.experts.max(axis=1)
    max_expert = int(row_max.max())
    if opts.num_experts:
        n_experts = opts.num_experts
    elif geo is not None:
        n_experts = geo.num_experts
    else:
        n_experts = max_expert + 1
        notes.append(SettingNote(f"the log does not name a known model: {n_experts} experts per layer inferred from "
                                 "the largest expert id; give the expert count if the model has more", "num_experts",
                                 "N"))
    if (bad := _first_in_file(r.layer >= n_layers, r.lines)) is not None:
        raise bad_line(src, int(r.lines[bad]), f"layer {int(r.layer[bad])} out of range [0, {n_layers})"
                                               + (f" for {geo.model}" if geo and not opts.num_layers else ""))
    if (bad := _first_in_file(row_max >= n_experts, r.lines)) is not None:
        if opts.num_experts:
            whose = f"the expert count given is {n_experts}"
        elif how == "assumed":
            whose = f"a top-{k} log with at most {geo.num_layers} layers is taken for {geo.model}, which has {n_experts}"
        else:
            whose = f"{geo.model} has {n_experts}"
        raise DataError(src, f"line {int(r.lines[bad])}: expert id {int(row_max[bad])} out of range [0, {n_experts}) "
                             f"({whose}); if the log is from another model, give its expert count (and its name)",
                        "num_experts", "N")
    quant, quant_from = opts.quantization, "the import options"
    if not quant:
        for value, where in ((quantization_in_log, "the log header"), (quantization_in_name(named), "the model name"),
                             (quantization_in_name(src.name), "the file name")):
            if value:
                quant, quant_from = value, where
                break
        else:
            quant, quant_from = "unknown", "nothing in the log"
    model = opts.model or model_in_log or (geo.model if geo else "unknown")
    prov: dict[str, Any] = {"kind": "imported", "format": fmt, "source": src.name, "rows_in_source": len(r.seq),
                            "quantization_from": quant_from,
                            "geometry_from": ("the command line" if opts.num_experts and opts.num_layers
                                              else f"{geo.model}, named by {how}" if geo and how != "assumed"
                                              else f"{geo.model}, assumed for a top-{k} log" if geo
                                              else "the data")}
    prov.update(provenance or {})
    held = sorted(int(x) for x in np.unique(r.layer))
    if len(held) < n_layers:  # a logger hooked into a few layers: say which, so nothing reads the others as idle
        shown = value_text(held)
        notes.append(f"the log holds {len(held)} of the model's {n_layers} MoE layers ({shown}); the trace records "
                     "them (logged_layers) and plots and the simulator use only those")
    meta = TraceMeta(model=model, family=geo.family if geo else "unknown", num_layers=n_layers, num_experts=n_experts,
                     top_k=k, hidden_size=geo.hidden_size if geo else 0, expert_bytes=opts.expert_bytes,
                     quantization=quant, provenance=prov, logged_layers=held if len(held) < n_layers else None)
    with TraceWriter(dst, meta) as w:
        w.write(r.seq, r.token, r.phase, r.layer, r.experts.astype(np.int16), r.weights.astype(np.float32))
    return meta


def _first_in_file(bad: np.ndarray, lines: np.ndarray) -> int | None:
    """Index of the row, among ``bad`` ones, that came first in the file (None: no bad row)."""
    if not bad.any():
        return None
    at = np.flatnonzero(bad)
    return int(at[np.argmin(lines[at])])
