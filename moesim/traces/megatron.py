"""Importer for Megatron-LM's router trace (``moesim import --from megatron``).

Megatron-LM writes it with ``--moe-routing-trace-path DIR`` (training and inference): one JSON-lines
file per rank, ``router_trace_rank{R}.jsonl``, one record per (step, block, layer)
(``megatron/core/transformer/moe/router_trace.py``, ``RouterTracer``)::

    {"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 3, "rank": 0,
     "num_tokens": 128, "topk": 2, "top_indices": [[12, 45], ...]}

``top_indices`` holds one row of top-k ids per token of that forward pass's batch; MTP heads' records
carry ``"block": "mtp"`` and an ``mtp_idx``. Layer numbers are the router's position in the decoder
(forward hooks) or its ``layer_number`` (the in-pipeline recorder), so they may start at 0 or 1 and
skip dense layers. How records become a trace (docs/trace-format.md):

- a *forward pass* is a run of records of one ``step`` in which no decoder layer repeats (a repeat
  starts the next pass: training micro-batches, or inference steps the tracer numbered alike); every
  layer of a pass must route the same number of tokens;
- pass p becomes sequence ``seq = p`` and its row i ``token = i`` (decode), as for ``vllm-batched``;
- the decoder's distinct layer numbers, in order, become MoE layers 0, 1, ... (the mapping is kept in
  the provenance); MTP records are skipped (counted in a note);
- the trace has no routing weights: equal weights 1/k (noted).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moesim.traces.format import DECODE, TraceMeta
from moesim.traces.importing import (
    ImportOptions,
    RoutingRows,
    bad_line,
    expert_ids,
    json_lines,
    non_negative_int,
    write_imported,
)

Call = tuple[int, int, list[Any]]  # line, layer number, top_indices


def _record(path: Path, lineno: int, obj: dict[str, Any]) -> tuple[int, int, list[Any]]:
    try:
        step, layer, rows = obj["step"], obj["layer"], obj["top_indices"]
    except KeyError as exc:
        raise bad_line(path, lineno, f"missing field {exc.args[0]!r}") from None
    non_negative_int(path, lineno, "step", step)
    non_negative_int(path, lineno, "layer", layer)
    if not isinstance(rows, list) or not rows:
        raise bad_line(path, lineno, f"top_indices must be a non-empty list of rows, got {rows!r}"[:200])
    n = obj.get("num_tokens")
    if n is not None and n != len(rows):
        raise bad_line(path, lineno, f"num_tokens is {n!r} but top_indices has {len(rows)} rows")
    k = obj.get("topk")
    odd = [i for i, r in enumerate(rows) if isinstance(k, int) and (not isinstance(r, list) or len(r) != k)]
    if odd:
        raise bad_line(path, lineno, f"top_indices[{odd[0]}] is {rows[odd[0]]!r}, not topk={k} expert ids")
    return step, layer, rows


def parse_megatron(path: Path) -> tuple[list[list[Call]], int]:
    """The decoder's forward passes (lists of calls) and the number of MTP records skipped."""
    passes: list[list[Call]] = []
    seen: set[int] = set()
    step_now: int | None = None
    mtp = 0
    rank: tuple[int, Any] | None = None
    for lineno, obj in json_lines(path):
        if rank is None:
            rank = (lineno, obj.get("rank"))
        elif obj.get("rank") != rank[1]:
            raise bad_line(path, lineno, f"a record of rank {obj.get('rank')!r} after rank {rank[1]!r} (line {rank[0]}):"
                                         " import one rank's router_trace_rank{R}.jsonl at a time")
        block = obj.get("block", "decoder")
        if block == "mtp":
            mtp += 1
            continue
        if block != "decoder":
            raise bad_line(path, lineno, f"unknown block {block!r} (expected 'decoder' or 'mtp')")
        step, layer, rows = _record(path, lineno, obj)
        if step != step_now or layer in seen:
            passes.append([])
            seen.clear()
            step_now = step
        first = passes[-1][0] if passes[-1] else None
        if first is not None and len(rows) != len(first[2]):
            raise bad_line(path, lineno, f"layer {layer} routes {len(rows)} tokens in this forward pass but layer "
                                         f"{first[1]} routed {len(first[2])} (line {first[0]})")
        seen.add(layer)
        passes[-1].append((lineno, layer, rows))
    return passes, mtp


def import_megatron(src: str | os.PathLike, dst: str | os.PathLike, opts: ImportOptions | None = None,
                    notes: list[str] | None = None) -> TraceMeta:
    """Convert a Megatron-LM router trace into a trace (see the module docstring)."""
    p = Path(src)
    notes = notes if notes is not None else []
    passes, mtp = parse_megatron(p)
    numbers = sorted({layer for fp in passes for _, layer, _ in fp})
    moe_layer = {n: i for i, n in enumerate(numbers)}
    rows = RoutingRows(p, describe_key=("forward pass", "row", "layer"))
    for seq, fp in enumerate(passes):
        for lineno, layer, top in fp:
            for tok, ids in enumerate(top):
                ids = expert_ids(p, lineno, f"top_indices[{tok}]", ids)
                rows.add(lineno, seq, tok, moe_layer[layer], ids, (1.0 / len(ids),) * len(ids), DECODE)
    if mtp:
        notes.append(f"skipped {mtp} MTP record(s) (block 'mtp'): not the decoder's layers")
    if numbers and numbers != list(range(len(numbers))):
        notes.append(f"layer numbers {numbers[0]}..{numbers[-1]} ({len(numbers)} routed layers) stored as MoE "
                     f"layers 0..{len(numbers) - 1}")
    notes.append("Megatron router traces carry no routing weights: equal weights 1/k stored")
    widths = sorted(len(fp[0][2]) for fp in passes) or [0]
    prov = {"forward_passes": len(passes), "mtp_records_skipped": mtp, "layer_numbers": numbers,
            "rows_per_pass": {"min": widths[0], "median": widths[len(widths) // 2], "max": widths[-1]},
            "mapping": "seq = forward pass, token = row in the batch, layer = rank of the layer number",
            "weights": "equal (the trace carries none)"}
    return write_imported(rows, dst, opts or ImportOptions(), fmt="megatron", provenance=prov, notes=notes)
