"""Importer for the vLLM routing JSON-lines format (``../shared/traces/real/*.jsonl``).

One object per line: ``problem_id`` (-> seq), ``token_idx`` (decode token), ``layer``, ``experts``
(top-k ids, router order), ``gating_probs`` (weights), optional ``dataset``. Rows may come in any
order and with gaps; exact duplicates collapse; a conflicting duplicate or a malformed line is a
data error naming its line number.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import DataError
from moesim.traces.format import DECODE, TraceMeta, TraceWriter

MIXTRAL_8X7B = dict(model="mistralai/Mixtral-8x7B-Instruct-v0.1", family="mixtral", num_layers=32,
                    num_experts=8, top_k=2, hidden_size=4096)


def _bad(path: Path, lineno: int, what: str) -> DataError:
    return DataError(path, f"line {lineno}: {what}")


def parse_vllm_jsonl(path: str | os.PathLike) -> tuple[dict[tuple[int, int, int], tuple[tuple[int, ...], tuple[float, ...]]], set[str]]:
    p = Path(path)
    if not p.exists():
        raise DataError(p, "no such file")
    rows: dict[tuple[int, int, int], tuple[tuple[int, ...], tuple[float, ...]]] = {}
    first_line: dict[tuple[int, int, int], int] = {}
    datasets: set[str] = set()
    width = None
    try:
        fh = open(p, encoding="utf-8")
    except OSError as exc:
        raise DataError(p, f"cannot open ({exc.strerror})") from None
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj: Any = json.loads(line)
            except ValueError as exc:
                raise _bad(p, lineno, f"not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise _bad(p, lineno, "not a JSON object")
            try:
                seq, tok, layer = (obj["problem_id"], obj["token_idx"], obj["layer"])
                experts, probs = obj["experts"], obj["gating_probs"]
            except KeyError as exc:
                raise _bad(p, lineno, f"missing field {exc.args[0]!r}") from None
            for name, v in (("problem_id", seq), ("token_idx", tok), ("layer", layer)):
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise _bad(p, lineno, f"{name} must be a non-negative integer, got {v!r}")
            if (not isinstance(experts, list) or not experts
                    or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in experts)):
                raise _bad(p, lineno, f"experts must be a non-empty list of non-negative integers, got {experts!r}")
            if len(set(experts)) != len(experts):
                raise _bad(p, lineno, f"experts lists an expert twice: {experts!r}")
            if (not isinstance(probs, list) or len(probs) != len(experts)
                    or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in probs)):
                raise _bad(p, lineno, f"gating_probs must be {len(experts)} numbers, got {probs!r}")
            if width is None:
                width = len(experts)
            elif len(experts) != width:
                raise _bad(p, lineno, f"{len(experts)} experts where earlier lines have {width}")
            if isinstance(obj.get("dataset"), str):
                datasets.add(obj["dataset"])
            key = (seq, tok, layer)
            value = (tuple(experts), tuple(float(x) for x in probs))
            old = rows.get(key)
            if old is None:
                rows[key] = value
                first_line[key] = lineno
            elif old != value:
                raise _bad(p, lineno, f"conflicts with line {first_line[key]} for problem_id={seq} "
                                      f"token_idx={tok} layer={layer}")
    if not rows:
        raise DataError(p, "no rows")
    return rows, datasets


def import_vllm_jsonl(src: str | os.PathLike, dst: str | os.PathLike, *, model: str | None = None,
                      num_layers: int | None = None, num_experts: int | None = None,
                      expert_bytes: int = 0, quantization: str = "bf16") -> TraceMeta:
    """Convert a vLLM routing JSONL file into a moesim trace (execution order, decode phase)."""
    src = Path(src)
    rows, datasets = parse_vllm_jsonl(src)
    keys = sorted(rows)
    k = len(rows[keys[0]][0])
    max_layer = max(key[2] for key in keys)
    max_expert = max(max(v[0]) for v in rows.values())
    geometry = dict(MIXTRAL_8X7B) if (max_layer < 32 and max_expert < 8 and k == 2) else {}
    n_layers = num_layers or geometry.get("num_layers") or max_layer + 1
    n_experts = num_experts or geometry.get("num_experts") or max_expert + 1
    if max_layer >= n_layers:
        raise DataError(src, f"layer {max_layer} out of range [0, {n_layers})")
    if max_expert >= n_experts:
        raise DataError(src, f"expert id {max_expert} out of range [0, {n_experts})")
    meta = TraceMeta(
        model=model or geometry.get("model", "unknown"), family=geometry.get("family", "unknown"),
        num_layers=n_layers, num_experts=n_experts, top_k=k, hidden_size=geometry.get("hidden_size", 0),
        expert_bytes=expert_bytes, quantization=quantization,
        provenance={"kind": "imported", "format": "vllm-jsonl", "source": src.name,
                    "datasets": sorted(datasets), "rows_in_source": len(rows)},
    )
    arr = np.array(keys, dtype=np.int64)
    experts = np.array([rows[key][0] for key in keys], dtype=np.int16)
    weights = np.array([rows[key][1] for key in keys], dtype=np.float32)
    with TraceWriter(dst, meta) as w:
        w.write(arr[:, 0], arr[:, 1], DECODE, arr[:, 2], experts, weights)
    return meta
