"""What the importers of server-returned routing share (``--from sglang``, ``--from vllm-routed``):
a response carries one array of top-k expert ids shaped (tokens, layers, top-k) for one sequence,
covering the prompt's tokens and every generated token but the last (that one was never fed
forward, so it has no routing). The rows become (seq, token, layer) rows of a trace; the responses
carry no routing weights, so every row gets equal weights 1/k (said in a note).

Placeholders: SGL-JAX writes ``-1`` for layers without routed experts (dense layers), and SGLang's
and vLLM's capture buffers are zero-initialised, so a dense layer of a model that mixes dense and
MoE layers comes back as all zeros. A row whose ids are all ``-1``, or all ``0`` with top-k > 1 (no
router picks one expert twice), is such a placeholder: it is not a request, and the importer counts
them in a note.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.traces.format import DECODE, PREFILL
from moesim.traces.importing import RoutingRows, bad_line


@dataclass
class ServerRows:
    """Rows collected from responses plus what the note and the provenance report."""

    rows: RoutingRows
    sequences: int = 0
    placeholders: int = 0
    without_prompt_count: int = 0

    def notes(self, what: str) -> list[str]:
        out = [f"{what} carry no routing weights: equal weights 1/k stored"]
        if self.placeholders:
            out.append(f"skipped {self.placeholders} placeholder row(s) (all -1, or all 0: a layer without "
                       "routed experts)")
        if self.without_prompt_count:
            out.append(f"{self.without_prompt_count} sequence(s) without a prompt token count: every row "
                       "stored as decode")
        return out


def add_routed_array(out: ServerRows, lineno: int, ids: np.ndarray, prompt_tokens: int | None,
                     field: str) -> None:
    """Add one sequence's (tokens, layers, top-k) ids as sequence number ``out.sequences``.

    Token t is phase prefill when t < ``prompt_tokens`` (None: every token is decode)."""
    path = out.rows.path
    if ids.ndim != 3 or 0 in ids.shape:
        raise bad_line(path, lineno, f"{field} must be shaped (tokens, layers, top-k), got {tuple(ids.shape)}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise bad_line(path, lineno, f"{field} must hold integers, got {ids.dtype}")
    ids = ids.astype(np.int64)
    k = ids.shape[2]
    placeholder = (ids == -1).all(axis=2) | ((ids == 0).all(axis=2) if k > 1 else False)
    bad = (ids < 0) & ~placeholder[:, :, None]
    if bad.any():
        t, layer, _ = np.argwhere(bad)[0]
        raise bad_line(path, lineno, f"{field}: negative expert id {ids[t, layer].tolist()} at token {t} layer {layer}")
    ordered = np.sort(ids, axis=2)
    twice = (ordered[:, :, 1:] == ordered[:, :, :-1]).any(axis=2) & ~placeholder
    if twice.any():
        t, layer = np.argwhere(twice)[0]
        raise bad_line(path, lineno, f"{field} lists an expert twice at token {t} layer {layer}: "
                                     f"{ids[t, layer].tolist()}")
    if prompt_tokens is None:
        out.without_prompt_count += 1
    seq = out.sequences
    weights = (1.0 / k,) * k
    for t, layer in np.argwhere(~placeholder):
        phase = PREFILL if prompt_tokens is not None and t < prompt_tokens else DECODE
        out.rows.add(lineno, seq, int(t), int(layer), tuple(int(x) for x in ids[t, layer]), weights, phase)
    out.placeholders += int(placeholder.sum())
    out.sequences += 1


def count_field(path, lineno: int, obj: dict, *names: str) -> int | None:
    """The first of ``names`` present in ``obj`` as a non-negative integer (None if none is)."""
    for name in names:
        v = obj.get(name)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise bad_line(path, lineno, f"{name} must be a non-negative integer, got {v!r}")
        return v
    return None
