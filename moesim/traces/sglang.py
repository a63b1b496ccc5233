"""Importer for SGLang's returned routing (``moesim import --from sglang``).

A server started with ``--enable-return-routed-experts`` answers a ``/generate`` request that sets
``"return_routed_experts": true`` with ``meta_info.routed_experts``: the int32 top-k ids of every
token at every layer, flattened in (token, layer, top-k slot) order and base64-encoded
(sglang ``python/sglang/srt/layers/moe/routed_experts_capturer.py``,
``extract_routed_experts_from_meta_info``; the detokenizer encodes ``ids.numpy().tobytes()``; PR 12162).
The tokens are the prompt's and the generated ones but the last: ``prompt_tokens +
completion_tokens - 1`` of them (``get_routed_experts`` reads ``seqlen - 1`` cache slots).

Input: one such response per line, as a client saves them (``{"text": ..., "meta_info": {...}}``).
Response i becomes sequence i; token t < ``prompt_tokens`` is prefill, the rest decode. The flat
array says neither the layer count nor top-k: they come from ``--num-layers`` or the model's geometry
(``--model`` or a known model in the file name), and the other one from the array's length and the
token count. See docs/trace-format.md.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

import numpy as np

from moesim.errors import DataError
from moesim.traces.format import TraceMeta
from moesim.traces.importing import ImportOptions, RoutingRows, bad_line, json_lines, write_imported
from moesim.traces.models import known_model
from moesim.traces.server_routing import ServerRows, add_routed_array, count_field

FIELD = "meta_info.routed_experts"


def decode_flat_ids(path: Path, lineno: int, text: object) -> np.ndarray:
    """The base64 string of int32 ids -> a flat int32 array (a bad string is an error naming the line)."""
    if not isinstance(text, str):
        raise bad_line(path, lineno, f"{FIELD} must be a base64 string, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise bad_line(path, lineno, f"{FIELD} is not valid base64") from None
    if len(raw) % 4:
        raise bad_line(path, lineno, f"{FIELD} holds {len(raw)} bytes, not a whole number of int32 ids")
    return np.frombuffer(raw, dtype="<i4")


def _shape(path: Path, lineno: int, n: int, tokens: int | None, layers: int | None,
           top_k: int | None) -> tuple[int, int, int]:
    """(tokens, layers, top-k) of a flat array of n ids from what is known of each."""
    if layers is None and top_k is None:
        raise DataError(path, f"line {lineno}: the response does not say the layer count or top-k: give the layer "
                              "count (or the name of a known model)", "num_layers", "N")
    if tokens is None:
        if layers is None or top_k is None or n % (layers * top_k):
            raise bad_line(path, lineno, f"{FIELD} holds {n} ids and meta_info has no prompt_tokens/completion_tokens"
                                         " to tell tokens from layers: name a known model (its layer count and "
                                         "top-k do)", "model", "NAME")
        return n // (layers * top_k), layers, top_k
    if tokens == 0 or n % tokens:
        raise bad_line(path, lineno, f"{FIELD} holds {n} ids, not a multiple of the {tokens} routed tokens "
                                     "(prompt_tokens + completion_tokens - 1)")
    per_token = n // tokens
    if layers is None:
        layers = per_token // top_k if per_token % top_k == 0 else 0
    elif top_k is None:
        top_k = per_token // layers if per_token % layers == 0 else 0
    if not layers or not top_k or layers * top_k != per_token:
        raise bad_line(path, lineno, f"{FIELD} holds {per_token} ids per token, not layers x top-k = "
                                     f"{layers or '?'} x {top_k or '?'}: check the layer count and the model named",
                       "layers_and_model")
    return tokens, layers, top_k


def parse_sglang(path: str | os.PathLike, opts: ImportOptions) -> ServerRows:
    p = Path(path)
    geo = known_model(opts.model) or known_model(p.name)
    layers = opts.num_layers or (geo.num_layers if geo else None)
    top_k = geo.top_k if geo else None
    out = ServerRows(RoutingRows(p, describe_key=("response", "token", "layer")))
    for lineno, obj in json_lines(p):
        meta = obj.get("meta_info")
        if not isinstance(meta, dict):
            raise bad_line(p, lineno, "missing field 'meta_info' (one /generate response per line)")
        if meta.get("routed_experts") is None:
            raise bad_line(p, lineno, f"missing field {FIELD!r} (start the server with --enable-return-routed-"
                                      "experts and send \"return_routed_experts\": true)")
        flat = decode_flat_ids(p, lineno, meta["routed_experts"])
        prompt = count_field(p, lineno, meta, "prompt_tokens")
        completion = count_field(p, lineno, meta, "completion_tokens")
        tokens = prompt + completion - 1 if prompt is not None and completion is not None else None
        shape = _shape(p, lineno, flat.size, tokens, layers, top_k)
        layers, top_k = shape[1], shape[2]  # later responses must agree
        add_routed_array(out, lineno, flat.reshape(shape), prompt, FIELD)
    return out


def import_sglang(src: str | os.PathLike, dst: str | os.PathLike, opts: ImportOptions | None = None,
                  notes: list[str] | None = None) -> TraceMeta:
    """Convert a file of SGLang ``/generate`` responses into a trace (see the module docstring)."""
    opts = opts or ImportOptions()
    notes = notes if notes is not None else []
    parsed = parse_sglang(src, opts)
    notes.extend(parsed.notes("SGLang responses"))
    prov = {"sequences": parsed.sequences, "placeholder_rows_skipped": parsed.placeholders,
            "weights": "equal (the responses carry none)"}
    return write_imported(parsed.rows, dst, opts, fmt="sglang", provenance=prov, notes=notes)
