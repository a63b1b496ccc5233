"""Importer for batched vLLM MoE-logger JSON lines (``moesim import --from vllm-batched``).

Shape (as written by loggers hooked into vLLM's ``FusedMoE.select_experts``): a header
``{"type": "meta", "model_id": ..., "top_k": ..., "layers_logged": [...], ...}`` and one
``{"type": "route", "req_id", "token_idx", "layer", "topk_ids", "topk_weights"}`` line per row of
the batch the layer just routed. ``token_idx`` is the row's position inside that forward pass's
batch (it restarts at 0 with every call), not a position in a sequence, and ``req_id`` is whatever
the hook was given (often one constant), so rows cannot be attributed to requests.

How rows become a trace (docs/trace-format.md, "Batched logs"):

- a *call* is a run of rows of one layer with ``token_idx`` 0, 1, 2, ...; a call at a layer not
  above the previous call's layer (or a new header) starts a new *forward pass*; every call of a
  pass must have the same number of rows;
- forward pass p becomes sequence ``seq = p`` and its row i becomes ``token = i``: the replay order
  (sequence, token, layer) is then the order the GPU ran the passes in, and each layer's cache sees
  the passes' rows in batch order;
- a pass with more rows than the decode pass before it and the pass after it is a prompt pass
  (phase prefill; :func:`prompt_passes`), every other pass is decode;
- the layers the log holds (often one) are recorded in the trace's ``logged_layers``;
- the warm-up: vLLM's start-up profiling runs dummy batches of thousands of identical rows before
  serving. Leading passes whose every call has at least two rows, all identical, are dropped, and
  the importer says so in one line.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

Row = tuple[int, int, tuple[int, ...], tuple[float, ...]]  # line, token_idx, ids, weights


@dataclass
class _Pass:
    calls: list[tuple[int, list[Row]]] = field(default_factory=list)  # (layer, rows)

    def width(self) -> int:
        return len(self.calls[0][1])

    def lines(self) -> tuple[int, int]:
        return self.calls[0][1][0][0], self.calls[-1][1][-1][0]

    def is_dummy(self) -> bool:
        """Every call has >= 2 rows and they are all the same (ids and weights): a profiling batch."""
        return all(len(rows) >= 2 and all(r[2:] == rows[0][2:] for r in rows) for _, rows in self.calls)


@dataclass
class BatchedLog:
    header: dict[str, Any]
    passes: list[_Pass]
    req_ids: list[Any]


def _header_value(header: dict[str, Any], *names: str) -> Any:
    for n in names:
        v = header.get(n)
        if v not in (None, ""):
            return v
    return None


_DTYPE_WORDS = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "half": "fp16", "fp16": "fp16",
                "float32": "fp32", "fp8": "fp8"}


def _log_quantization(header: dict[str, Any]) -> str | None:
    """The header's ``quantization`` (e.g. "fp8", "gptq"), else its ``dtype`` when that names a
    format ("auto" says nothing)."""
    q = _header_value(header, "quantization")
    if isinstance(q, str) and q.lower() not in ("none", "auto"):
        return q.lower()
    d = _header_value(header, "dtype")
    return _DTYPE_WORDS.get(str(d).lower().removeprefix("torch.")) if d is not None else None


def parse_batched(path: Path) -> BatchedLog:
    header: dict[str, Any] = {}
    header_line = 0
    passes: list[_Pass] = []
    req_ids: dict[Any, None] = {}
    call: list[Row] | None = None
    call_layer = -1

    def close_call(lineno: int) -> None:
        nonlocal call
        if call is None:
            return
        cur = passes[-1]
        if cur.calls and len(call) != cur.width():
            raise bad_line(path, lineno, f"layer {call_layer} has {len(call)} rows in this forward pass but layer "
                                         f"{cur.calls[0][0]} had {cur.width()} (line {cur.calls[0][1][0][0]})")
        cur.calls.append((call_layer, call))
        call = None

    last_line = 0
    for lineno, obj in json_lines(path):
        last_line = lineno
        kind = obj.get("type")
        if kind == "meta":
            close_call(lineno)
            if header and _header_value(obj, "model_id", "model") != _header_value(header, "model_id", "model"):
                raise bad_line(path, lineno, f"a second header for another model (line {header_line} logged "
                                             f"{_header_value(header, 'model_id', 'model')!r})")
            header, header_line = header or obj, header_line or lineno
            passes.append(_Pass())  # a restarted logger starts a new forward pass
            continue
        if kind != "route":
            raise bad_line(path, lineno, "missing field 'type'" if kind is None else
                           f"unknown record type {kind!r} (expected 'meta' or 'route')")
        try:
            tok, layer, ids, ws = obj["token_idx"], obj["layer"], obj["topk_ids"], obj["topk_weights"]
        except KeyError as exc:
            raise bad_line(path, lineno, f"missing field {exc.args[0]!r}") from None
        non_negative_int(path, lineno, "token_idx", tok)
        non_negative_int(path, lineno, "layer", layer)
        ids = expert_ids(path, lineno, "topk_ids", ids)
        ws = routing_weights(path, lineno, "topk_weights", ws, len(ids))
        top_k = header.get("top_k")
        if isinstance(top_k, int) and len(ids) != top_k:
            raise bad_line(path, lineno, f"{len(ids)} experts but the header (line {header_line}) says top_k={top_k}")
        logged = header.get("layers_logged")
        if isinstance(logged, list) and logged and layer not in logged:
            raise bad_line(path, lineno, f"layer {layer} is not in the header's layers_logged {logged}")
        req_ids.setdefault(obj.get("req_id"), None)
        if tok == 0:
            close_call(lineno)
            if not passes or (passes[-1].calls and layer <= passes[-1].calls[-1][0]):
                passes.append(_Pass())
            call, call_layer = [], layer
        elif call is None or layer != call_layer or tok != call[-1][1] + 1:
            prev = "nothing" if call is None else f"token_idx {call[-1][1]} at layer {call_layer}"
            raise bad_line(path, lineno, f"token_idx {tok} at layer {layer} follows {prev} (the rows of one "
                                         "batch come in order 0, 1, 2, ...)")
        call.append((lineno, tok, ids, ws))
    close_call(last_line)
    return BatchedLog(header, [p for p in passes if p.calls], list(req_ids))


def prompt_passes(passes: list[_Pass]) -> list[int]:
    """The phase of each forward pass. A decode pass routes one row per running request, so between
    admissions its row count only falls (requests finish); a prompt pass routes every prompt token of
    the requests it admits: more rows than the decode pass before it and than the pass after it, which
    decodes the requests just admitted (so it always counts as decode). The logs carry no phase field:
    a pass mixing a prompt chunk with decode rows counts as prefill, and of back-to-back prompt passes
    the second counts as decode."""
    phases: list[int] = []
    decode_width: int | None = None  # rows of the last decode pass
    for i, fp in enumerate(passes):
        width = fp.width()
        after = passes[i + 1].width() if i + 1 < len(passes) else None
        spike = (after is not None or decode_width is not None) and \
            (after is None or width > after) and (decode_width is None or width > decode_width) and \
            not (phases and phases[-1] == PREFILL)
        phases.append(PREFILL if spike else DECODE)
        if not spike:
            decode_width = width
    return phases


def _span(lines: Iterable[tuple[int, int]]) -> str:
    return ", ".join(f"lines {a}-{b}" for a, b in lines)


def import_vllm_batched(src: str | os.PathLike, dst: str | os.PathLike, opts: ImportOptions | None = None,
                        notes: list[str] | None = None) -> TraceMeta:
    """Convert a batched vLLM MoE-logger file into a trace (see the module docstring)."""
    p = Path(src)
    notes = notes if notes is not None else []
    log = parse_batched(p)
    warm = 0
    while warm < len(log.passes) and log.passes[warm].is_dummy():
        warm += 1
    dropped, kept = log.passes[:warm], log.passes[warm:]
    if dropped:
        rows_each = ", ".join(str(x.width()) for x in dropped)
        notes.append(f"dropped {'the warm-up pass' if warm == 1 else f'{warm} warm-up passes'} "
                     f"({rows_each} identical rows per layer, {_span(x.lines() for x in dropped)}): vLLM's dummy "
                     "start-up batch, not routing of real tokens")
    if not kept:
        raise bad_line(p, dropped[-1].lines()[1] if dropped else 1, "no forward pass besides the warm-up")
    phases = prompt_passes(kept)
    rows = RoutingRows(p, describe_key=("forward pass", "token_idx", "layer"))
    for seq, (fp, phase) in enumerate(zip(kept, phases, strict=True)):
        for layer, call in fp.calls:
            for lineno, tok, ids, ws in call:
                rows.add(lineno, seq, tok, layer, ids, ws, phase)
    n_prompt = phases.count(PREFILL)
    if n_prompt:
        notes.append(f"{n_prompt} prompt pass{'es' if n_prompt != 1 else ''} (more rows than the decode passes "
                     f"around {'them' if n_prompt != 1 else 'it'}: {', '.join(str(fp.width()) for fp, ph in zip(kept, phases, strict=True) if ph == PREFILL)} "
                     "rows) labelled prefill")
    widths = sorted(fp.width() for fp in kept)
    header = log.header
    prov = {"forward_passes": len(kept), "rows_per_pass": {"min": widths[0], "median": widths[len(widths) // 2],
                                                          "max": widths[-1]},
            "warmup_passes_dropped": warm, "warmup_rows_dropped": sum(x.width() * len(x.calls) for x in dropped),
            "req_ids": len(log.req_ids), "mapping": "seq = forward pass, token = row in the batch"}
    for key in ("vllm_version", "torch_version", "device", "seed", "layers_logged"):
        if header.get(key) not in (None, ""):
            prov[key] = header[key]
    return write_imported(rows, dst, opts or ImportOptions(), fmt="vllm-batched",
                          model_in_log=_header_value(header, "model_id", "model"),
                          quantization_in_log=_log_quantization(header),
                          provenance=prov, notes=notes)
