"""Which trace rows form one step of a serving engine: the one definition the timing simulator and the
replay engine share.

A *step* is one forward pass: in decode, token j of each of ``batch_size`` sequences (sequence groups
in id order); in prefill, a chunk of up to ``prefill_chunk`` prompt tokens of one sequence. Per layer a
step requests the UNION of its tokens' experts (first-seen router order), and each expert computes on
the tokens routed to it (``counts``) with their summed routing weights (``weights``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moesim.errors import UsageError
from moesim.traces.format import PREFILL, Trace


@dataclass
class Step:
    tokens: int
    context: int
    phase: int
    layers: dict[int, list[int]]               # layer -> union of experts, first-seen router order
    counts: dict[int, dict[int, int]]          # layer -> expert -> tokens routed
    weights: dict[int, dict[int, float]]       # layer -> expert -> summed routing weight
    rows: dict[int, int]                       # layer -> one trace row (for recorded predictions)
    parts: list[tuple[int, int]] = field(default_factory=list)   # (sequence, token) of each token, in order
    lanes: list[int] = field(default_factory=list)   # each token's place in its sequence group (0..batch-1)


def build_steps(trace: Trace, batch_size: int = 1, prefill_chunk: int = 512) -> list[Step]:
    """Group trace rows into steps: decode tokens of ``batch_size`` sequences at a time (sequence
    groups in id order, token j of each), prefill tokens in chunks of ``prefill_chunk``."""
    if batch_size < 1 or prefill_chunk < 1:
        raise UsageError("batch size and prefill chunk must be >= 1")
    trace = trace.execution_order()
    seq, tok, lay, phase = trace.seq, trace.token, trace.layer, trace.phase
    experts = trace.experts.tolist()
    weights = trace.weights.tolist()
    # group rows by (seq, token)
    keys = np.stack([seq, tok], 1)
    bounds = np.flatnonzero(np.r_[True, (keys[1:] != keys[:-1]).any(1), True])
    tokens_of_seq: dict[int, list[tuple[int, int, int]]] = {}  # seq -> [(token, row_lo, row_hi)]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        tokens_of_seq.setdefault(int(seq[lo]), []).append((int(tok[lo]), int(lo), int(hi)))
    seq_ids = sorted(tokens_of_seq)
    steps: list[Step] = []

    def make(parts: list[tuple[int, int, int]], ph: int, owners: list[tuple[int, int]]) -> Step:
        layers: dict[int, list[int]] = {}
        counts: dict[int, dict[int, int]] = {}
        wsum: dict[int, dict[int, float]] = {}
        rows: dict[int, int] = {}
        for _, lo, hi in parts:
            for r in range(lo, hi):
                layer = int(lay[r])
                rows.setdefault(layer, r)
                add_to_union(experts[r], weights[r], layers.setdefault(layer, []), counts.setdefault(layer, {}),
                             wsum.setdefault(layer, {}))
        context = int(np.mean([t for t, _, _ in parts])) if parts else 0
        return Step(len(parts), context, ph, dict(sorted(layers.items())), counts, wsum, rows,
                    [(s, t) for (s, _), (t, _, _) in zip(owners, parts, strict=True)], [lane for _, lane in owners])

    for g in range(0, len(seq_ids), batch_size):
        group = seq_ids[g:g + batch_size]
        prefill = {s: [p for p in tokens_of_seq[s] if phase[p[1]] == PREFILL] for s in group}
        decode = {s: [p for p in tokens_of_seq[s] if phase[p[1]] != PREFILL] for s in group}
        for lane, s in enumerate(group):
            for c in range(0, len(prefill[s]), prefill_chunk):
                chunk = prefill[s][c:c + prefill_chunk]
                steps.append(make(chunk, PREFILL, [(s, lane)] * len(chunk)))
        longest = max((len(v) for v in decode.values()), default=0)
        for j in range(longest):
            owners = [(s, lane) for lane, s in enumerate(group) if j < len(decode[s])]
            steps.append(make([decode[s][j] for s, _ in owners], 1, owners))
    return steps


def add_to_union(experts, weights, union: list[int], counts: dict[int, int], wsum: dict[int, float]) -> None:
    """One token's routing (router order) added to a step's union at one layer: first-seen order, tokens
    per expert, summed routing weight -- the one definition of a multi-token step's request."""
    for e, w in zip(experts, weights, strict=True):
        if e not in counts:
            union.append(e)
            counts[e] = 0
            wsum[e] = 0.0
        counts[e] += 1
        wsum[e] += w


def next_uses(steps: list[Step], num_layers: int, never: int) -> dict[tuple[int, int], dict[int, int]]:
    """(step, layer) -> expert -> clock of its next request at that layer (clock = step * L + layer), or
    ``never`` (the cache policies' :data:`~moesim.policies.base.NEVER`) when it has none."""
    out: dict[tuple[int, int], dict[int, int]] = {}
    upcoming: dict[tuple[int, int], int] = {}
    for i in range(len(steps) - 1, -1, -1):
        for layer, s in steps[i].layers.items():
            out[(i, layer)] = {e: upcoming.get((layer, e), never) for e in s}
            for e in s:
                upcoming[(layer, e)] = i * num_layers + layer
    return out


def union_chunks(experts: list[int], capacity: int) -> list[list[int]]:
    """A step may want more experts at a layer than the cache has slots: they stream through the cache
    in chunks of ``capacity`` (first-seen router order), each chunk requested atomically."""
    return [experts[j:j + capacity] for j in range(0, len(experts), capacity)]
