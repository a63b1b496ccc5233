"""Importer for any routing log with one JSON object per row (``moesim import --from jsonl``):
``--map seq=req,token=pos,layer=l,experts=ids,weights=w`` says which field holds what, so a log
from another tool needs no script. ``--where type=route`` keeps only the lines whose field has that
value (headers and other records are skipped and counted).

Targets: ``token``, ``layer``, ``experts`` (required); ``seq`` (default: one sequence; a non-negative
integer is the sequence id, strings such as request ids are numbered in order of first appearance), ``weights`` (default: equal weights 1/k, said in a
note), ``phase`` ("prefill"/"decode" or 0/1; default decode). A field may be nested: ``route.ids``.
Unmapped targets look for a field of their own name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moesim.errors import DataError, SettingError
from moesim.traces.format import DECODE, PREFILL, TraceMeta
from moesim.traces.importing import (
    ImportOptions,
    RoutingRows,
    bad_line,
    expert_ids,
    json_lines,
    non_negative_int,
    routing_weights,
    write_imported,
)

TARGETS = ("seq", "token", "layer", "experts", "weights", "phase")
REQUIRED = ("token", "layer", "experts")
_MISSING = object()


def parse_mapping(text: str | None) -> dict[str, str]:
    """``"seq=req,token=pos"`` -> {"seq": "req", "token": "pos", other targets: their own name}."""
    out = {t: t for t in TARGETS}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        target, sep, name = (x.strip() for x in item.partition("="))
        if not sep or not target or not name:
            raise SettingError("map", f"a field mapping is TARGET=FIELD pairs, got {item.strip()!r}")
        if target not in TARGETS:
            raise SettingError("map", f"unknown mapping target {target!r} (known: {', '.join(TARGETS)})")
        out[target] = name
    return out


def parse_where(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SettingError("where", f"a line filter is FIELD=VALUE, got {text!r}")
    return key, value


def _get(obj: dict[str, Any], name: str) -> Any:
    cur: Any = obj
    for part in name.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def _phase(path: Path, lineno: int, field: str, v: Any) -> int:
    if v in ("decode", DECODE) and not isinstance(v, bool):
        return DECODE
    if v in ("prefill", PREFILL) and not isinstance(v, bool):
        return PREFILL
    raise bad_line(path, lineno, f"{field} must be 'prefill', 'decode', 0 or 1, got {v!r}")


def import_jsonl_mapped(src: str | os.PathLike, dst: str | os.PathLike, mapping: dict[str, str],
                        where: tuple[str, str] | None = None, opts: ImportOptions | None = None,
                        notes: list[str] | None = None) -> TraceMeta:
    p = Path(src)
    notes = notes if notes is not None else []
    rows = RoutingRows(p, describe_key=(mapping["seq"], mapping["token"], mapping["layer"]))
    seq_numbers: dict[str, int] = {}
    seq_kind: dict[str, str] = {}
    skipped = equal_weights = 0
    for lineno, obj in json_lines(p):
        if where is not None and str(_get(obj, where[0])) != where[1] and _get(obj, where[0]) != where[1]:
            skipped += 1
            continue
        values = {t: _get(obj, mapping[t]) for t in TARGETS}
        for t in REQUIRED:
            if values[t] is _MISSING:
                if mapping[t] != t:
                    raise bad_line(p, lineno, f"missing field {mapping[t]!r}")
                raise DataError(p, f"line {lineno}: missing field {t!r}; say which field holds the {t}", "map",
                                f"{t}=FIELD")
        tok = non_negative_int(p, lineno, mapping["token"], values["token"])
        layer = non_negative_int(p, lineno, mapping["layer"], values["layer"])
        ids = expert_ids(p, lineno, mapping["experts"], values["experts"])
        if values["weights"] is _MISSING:
            ws = tuple(1.0 / len(ids) for _ in ids)
            equal_weights += 1
        else:
            ws = routing_weights(p, lineno, mapping["weights"], values["weights"], len(ids))
        raw_seq = values["seq"]
        if raw_seq is _MISSING:
            seq = 0
        elif isinstance(raw_seq, str):  # request ids: numbered in order of first appearance
            if seq_kind.setdefault("kind", "str") != "str":
                raise bad_line(p, lineno, f"{mapping['seq']} {raw_seq!r} is a string where earlier lines have numbers")
            seq = seq_numbers.setdefault(raw_seq, len(seq_numbers))
        else:
            seq = non_negative_int(p, lineno, mapping["seq"], raw_seq)
            if seq_kind.setdefault("kind", "int") != "int":
                raise bad_line(p, lineno, f"{mapping['seq']} {raw_seq!r} is a number where earlier lines have strings")
            seq_numbers.setdefault(str(seq), seq)
        phase = DECODE if values["phase"] is _MISSING else _phase(p, lineno, mapping["phase"], values["phase"])
        rows.add(lineno, seq, tok, layer, ids, ws, phase)
    if skipped:
        notes.append(f"skipped {skipped} line(s) whose {where[0]} is not {where[1]!r}")  # type: ignore[index]
    if equal_weights:
        notes.append(f"{equal_weights} row(s) without a {mapping['weights']!r} field: equal weights 1/k stored")
    prov = {"mapping": {t: mapping[t] for t in TARGETS}, "sequences": max(len(seq_numbers), 1),
            "lines_skipped": skipped}
    if where is not None:
        prov["where"] = f"{where[0]}={where[1]}"
    return write_imported(rows, dst, opts or ImportOptions(), fmt="jsonl", provenance=prov, notes=notes)
