"""Importer for the vLLM routing JSON-lines format (``moesim import --from vllm-jsonl``).

One object per line: ``problem_id`` (-> seq), ``token_idx`` (decode token), ``layer``, ``experts``
(top-k ids, router order), ``gating_probs`` (weights), optional ``dataset``. Rows may come in any
order and with gaps; exact duplicates collapse; a conflicting duplicate or a malformed line is a
data error naming its line number. The lines do not name the model: a top-2 log of at most 32 layers
is taken for Mixtral-8x7B (the public collector's model) unless ``--model``/``--num-experts`` say
otherwise, and an expert id the model does not have is an error naming its line. The weight format
comes from ``--quantization``, else the model or file name ("...-fp8_..."), else "unknown".
"""

from __future__ import annotations

import os
from pathlib import Path

from moesim.traces.format import DECODE, TraceMeta
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
from moesim.traces.models import MIXTRAL_8X7B


def parse_vllm_jsonl(path: str | os.PathLike) -> tuple[RoutingRows, set[str]]:
    p = Path(path)
    rows = RoutingRows(p, describe_key=("problem_id", "token_idx", "layer"))
    datasets: set[str] = set()
    for lineno, obj in json_lines(p):
        try:
            seq, tok, layer = (obj["problem_id"], obj["token_idx"], obj["layer"])
            experts, probs = obj["experts"], obj["gating_probs"]
        except KeyError as exc:
            raise bad_line(p, lineno, f"missing field {exc.args[0]!r}") from None
        for name, v in (("problem_id", seq), ("token_idx", tok), ("layer", layer)):
            non_negative_int(p, lineno, name, v)
        ids = expert_ids(p, lineno, "experts", experts)
        weights = routing_weights(p, lineno, "gating_probs", probs, len(ids))
        if isinstance(obj.get("dataset"), str):
            datasets.add(obj["dataset"])
        rows.add(lineno, seq, tok, layer, ids, weights, DECODE)
    return rows, datasets


def import_vllm_jsonl(src: str | os.PathLike, dst: str | os.PathLike, *, model: str | None = None,
                      num_layers: int | None = None, num_experts: int | None = None,
                      expert_bytes: int = 0, quantization: str | None = None,
                      notes: list[str] | None = None) -> TraceMeta:
    """Convert a vLLM routing JSONL file into a moesim trace (execution order, decode phase)."""
    rows, datasets = parse_vllm_jsonl(src)
    opts = ImportOptions(model, num_layers, num_experts, expert_bytes, quantization)
    return write_imported(rows, dst, opts, fmt="vllm-jsonl", assumed=MIXTRAL_8X7B,
                          provenance={"datasets": sorted(datasets)}, notes=notes)
