"""What every JSON-lines importer shares: reading lines (a bad line is one error naming its number),
collecting (seq, token, layer) rows (exact duplicates collapse, conflicting ones are errors), and
turning them into a trace with the model's geometry and weight format resolved (given > the log's
own words > a known model > the data), every choice written into the provenance."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import DataError
from moesim.traces.describe import value_text
from moesim.traces.format import DECODE, TraceMeta, TraceWriter
from moesim.traces.models import ModelGeometry, known_model, quantization_in_name

# the first line of a file that Git LFS left in place of the data
LFS_POINTER = "version https://git-lfs.github.com/spec/"


def bad_line(path: Path, lineno: int, what: str) -> DataError:
    return DataError(path, f"line {lineno}: {what}")


def json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; invalid JSON or a non-object is an error."""
    if not path.exists():
        raise DataError(path, "no such file")
    try:
        fh = open(path, encoding="utf-8")
    except OSError as exc:
        raise DataError(path, f"cannot open ({exc.strerror})") from None
    with fh:
        try:
            for lineno, line in enumerate(fh, 1):
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
        except UnicodeDecodeError:
            raise DataError(path, "not a UTF-8 text file") from None


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
class RoutingRows:
    """Rows keyed by (seq, token, layer), each remembering the line it came from."""

    path: Path
    rows: dict[tuple[int, int, int], tuple[tuple[int, ...], tuple[float, ...], int]] = field(default_factory=dict)
    lines: dict[tuple[int, int, int], int] = field(default_factory=dict)
    width: int | None = None
    describe_key: tuple[str, str, str] = ("seq", "token", "layer")  # the log's own field names, for messages

    def add(self, lineno: int, seq: int, token: int, layer: int, experts: tuple[int, ...],
            weights: tuple[float, ...], phase: int = DECODE) -> None:
        if self.width is None:
            self.width = len(experts)
        elif len(experts) != self.width:
            raise bad_line(self.path, lineno, f"{len(experts)} experts where earlier lines have {self.width}")
        key = (seq, token, layer)
        value = (experts, weights, phase)
        old = self.rows.get(key)
        if old is None:
            self.rows[key] = value
            self.lines[key] = lineno
        elif old != value:
            a, b, c = self.describe_key
            raise bad_line(self.path, lineno, f"conflicts with line {self.lines[key]} for {a}={seq} {b}={token} {c}={layer}")

    def __len__(self) -> int:
        return len(self.rows)


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
    if not rows.rows:
        raise DataError(src, "no rows")
    notes = notes if notes is not None else []
    keys = sorted(rows.rows)
    k = rows.width or 0
    max_layer = max(key[2] for key in keys)
    named = opts.model or model_in_log
    how = "--model" if opts.model else "the log header" if model_in_log else "the file name"
    geo = known_model(named) if named else known_model(src.name)
    if geo is None and not named and assumed is not None and k == assumed.top_k and max_layer < assumed.num_layers:
        geo, how = assumed, "assumed"
    if geo is not None and k != geo.top_k and opts.num_experts is None:
        first = rows.lines[keys[0]]
        raise bad_line(src, first, f"{k} experts per row, but {geo.model} routes top-{geo.top_k} "
                                   "(pass --model NAME --num-experts N for another model)")
    n_layers = opts.num_layers or (geo.num_layers if geo else max_layer + 1)
    max_expert = max(max(v[0]) for v in rows.rows.values())
    if opts.num_experts:
        n_experts = opts.num_experts
    elif geo is not None:
        n_experts = geo.num_experts
    else:
        n_experts = max_expert + 1
        notes.append(f"the log does not name a known model: {n_experts} experts per layer inferred from the largest "
                     "expert id (pass --num-experts N if the model has more)")
    bad_rows = [q for q in keys if q[2] >= n_layers]
    if bad_rows:
        q = min(bad_rows, key=rows.lines.__getitem__)  # the first in the file
        raise bad_line(src, rows.lines[q], f"layer {q[2]} out of range [0, {n_layers})"
                                           + (f" for {geo.model}" if geo and not opts.num_layers else ""))
    bad_rows = [q for q in keys if max(rows.rows[q][0]) >= n_experts]
    if bad_rows:
        q = min(bad_rows, key=rows.lines.__getitem__)
        if opts.num_experts:
            whose = f"--num-experts is {n_experts}"
        elif how == "assumed":
            whose = f"a top-{k} log with at most {geo.num_layers} layers is taken for {geo.model}, which has {n_experts}"
        else:
            whose = f"{geo.model} has {n_experts}"
        raise bad_line(src, rows.lines[q], f"expert id {max(rows.rows[q][0])} out of range [0, {n_experts}) ({whose}); "
                                           "pass --num-experts N (and --model NAME) if the log is from another model")
    quant, quant_from = opts.quantization, "--quantization"
    if not quant:
        for value, where in ((quantization_in_log, "the log header"), (quantization_in_name(named), "the model name"),
                             (quantization_in_name(src.name), "the file name")):
            if value:
                quant, quant_from = value, where
                break
        else:
            quant, quant_from = "unknown", "nothing in the log"
    model = opts.model or model_in_log or (geo.model if geo else "unknown")
    prov: dict[str, Any] = {"kind": "imported", "format": fmt, "source": src.name, "rows_in_source": len(rows),
                            "quantization_from": quant_from,
                            "geometry_from": ("the command line" if opts.num_experts and opts.num_layers
                                              else f"{geo.model}, named by {how}" if geo and how != "assumed"
                                              else f"{geo.model}, assumed for a top-{k} log" if geo
                                              else "the data")}
    prov.update(provenance or {})
    held = sorted({key[2] for key in keys})
    if len(held) < n_layers:  # a logger hooked into a few layers: say which, so nothing reads the others as idle
        shown = value_text(held)
        notes.append(f"the log holds {len(held)} of the model's {n_layers} MoE layers ({shown}); the trace records "
                     "them (logged_layers) and plots and the simulator use only those")
    meta = TraceMeta(model=model, family=geo.family if geo else "unknown", num_layers=n_layers, num_experts=n_experts,
                     top_k=k, hidden_size=geo.hidden_size if geo else 0, expert_bytes=opts.expert_bytes,
                     quantization=quant, provenance=prov, logged_layers=held if len(held) < n_layers else None)
    arr = np.array(keys, dtype=np.int64)
    experts = np.array([rows.rows[key][0] for key in keys], dtype=np.int16)
    weights = np.array([rows.rows[key][1] for key in keys], dtype=np.float32)
    phase = np.array([rows.rows[key][2] for key in keys], dtype=np.int8)
    with TraceWriter(dst, meta) as w:
        w.write(arr[:, 0], arr[:, 1], phase, arr[:, 2], experts, weights)
    return meta
