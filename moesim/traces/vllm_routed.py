"""Importer for vLLM's returned routing (``moesim import --from vllm-routed``).

A vLLM server started with ``--enable-return-routed-experts`` (the RL routing-replay feature) puts
each choice's routing in ``choices[i].routed_experts`` of its OpenAI-compatible responses
(``/v1/chat/completions``, ``/v1/completions``, and the token-in ``generate`` endpoint): base64 of
``.npy`` bytes that ``np.load`` turns into an integer array shaped (num_tokens - 1, num_layers,
num_experts_per_tok) -- the prompt's tokens and every generated token but the last, which was never
fed forward (vllm ``vllm/entrypoints/openai/chat_completion/protocol.py``,
``ChatCompletionResponseChoice.routed_experts``; capture in
``vllm/model_executor/layers/fused_moe/routed_experts_capturer.py``). Earlier releases returned the
same array as nested JSON lists, with the prompt's part in a response-level ``prompt_routed_experts``;
both forms are read.

Input: one response per line, as a client saves them. Choice i of response j becomes one sequence
(in file order); token t < the prompt's token count (``usage.prompt_tokens``, else the length of
``prompt_token_ids`` or of ``prompt_routed_experts``) is prefill, the rest decode. The array's shape
gives the layer count and top-k; the model name comes from the response's ``model`` field.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from moesim.traces.format import TraceMeta
from moesim.traces.importing import ImportOptions, RoutingRows, bad_line, json_lines, write_imported
from moesim.traces.server_routing import ServerRows, add_routed_array, count_field


def routed_array(path: Path, lineno: int, field: str, value: Any) -> np.ndarray:
    """A ``routed_experts`` value (base64 ``.npy`` string or nested lists) -> an integer array."""
    if isinstance(value, str):
        try:
            arr = np.load(io.BytesIO(base64.b64decode(value.encode("ascii"), validate=True)), allow_pickle=False)
        except (binascii.Error, UnicodeEncodeError):
            raise bad_line(path, lineno, f"{field} is not valid base64") from None
        except (ValueError, OSError, EOFError):
            raise bad_line(path, lineno, f"{field} is base64 but not of a .npy array") from None
    elif isinstance(value, list):
        try:
            arr = np.asarray(value)
        except ValueError:
            raise bad_line(path, lineno, f"{field} is a ragged list, not (tokens, layers, top-k)") from None
        if arr.size == 0 or arr.dtype == object or arr.dtype == bool:
            raise bad_line(path, lineno, f"{field} must be a non-empty (tokens, layers, top-k) list of integers")
    else:
        raise bad_line(path, lineno, f"{field} must be a base64 .npy string or nested lists, got {type(value).__name__}")
    return arr


def _prompt_count(path: Path, lineno: int, obj: dict[str, Any], choice: dict[str, Any]) -> int | None:
    usage = obj.get("usage")
    if isinstance(usage, dict):
        n = count_field(path, lineno, usage, "prompt_tokens")
        if n is not None:
            return n
    for holder in (choice, obj):
        ids = holder.get("prompt_token_ids")
        if isinstance(ids, list):
            return len(ids)
    return None


def parse_vllm_routed(path: str | os.PathLike) -> tuple[ServerRows, str | None]:
    p = Path(path)
    out = ServerRows(RoutingRows(p, describe_key=("sequence", "token", "layer")))
    model: str | None = None
    for lineno, obj in json_lines(p):
        choices = obj.get("choices")
        if not isinstance(choices, list) or not choices:
            raise bad_line(p, lineno, "missing field 'choices' (one OpenAI-compatible response per line)")
        if isinstance(obj.get("model"), str):
            model = model or obj["model"]
        prompt_part = None
        if obj.get("prompt_routed_experts") is not None:
            prompt_part = routed_array(p, lineno, "prompt_routed_experts", obj["prompt_routed_experts"])
        for i, choice in enumerate(choices):
            field = f"choices[{i}].routed_experts"
            if not isinstance(choice, dict) or choice.get("routed_experts") is None:
                raise bad_line(p, lineno, f"missing field {field!r} (start the server with --enable-return-routed-"
                                          "experts)")
            ids = routed_array(p, lineno, field, choice["routed_experts"])
            prompt = _prompt_count(p, lineno, obj, choice)
            if prompt_part is not None:
                if prompt_part.ndim != 3 or ids.ndim != 3 or prompt_part.shape[1:] != ids.shape[1:]:
                    raise bad_line(p, lineno, f"prompt_routed_experts {prompt_part.shape} and {field} {ids.shape} "
                                              "differ in layers or top-k")
                ids, prompt = np.concatenate([prompt_part, ids]), prompt_part.shape[0]
            add_routed_array(out, lineno, ids, prompt, field)
    return out, model


def import_vllm_routed(src: str | os.PathLike, dst: str | os.PathLike, opts: ImportOptions | None = None,
                       notes: list[str] | None = None) -> TraceMeta:
    """Convert a file of vLLM responses with routed experts into a trace (see the module docstring)."""
    notes = notes if notes is not None else []
    parsed, model = parse_vllm_routed(src)
    notes.extend(parsed.notes("vLLM responses"))
    prov = {"sequences": parsed.sequences, "placeholder_rows_skipped": parsed.placeholders,
            "weights": "equal (the responses carry none)"}
    return write_imported(parsed.rows, dst, opts or ImportOptions(), fmt="vllm-routed", model_in_log=model,
                          provenance=prov, notes=notes)
