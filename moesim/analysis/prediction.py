"""How well does a predictor name layer l's experts before layer l's gate runs?

Three predictors on the same (token, layer) rows of one trace:

- ``speculative`` (distance d): the trace's recorded ``pred{d}_experts`` -- layer l's norm and gate
  applied to the hidden state leaving layer l - d, ordered by predicted score;
- ``previous-token``: the experts layer l used at the previous token of the same sequence (router
  order);
- ``transition`` (distance d): an online count of "expert a at layer l - d was followed by expert b
  at layer l" (same token), learned in replay order from the rows seen so far, scored from layer
  l - d's actual experts -- ``moesim.policies.prefetch.Transition``'s rule, no future knowledge.

Metrics per row with a prediction, P = the predictor's list (most wanted first), A = the actual top-k set:

- ``top1``: P[0] is the actual top-1 expert (highest routing weight);
- ``recall_at_k``: |P[:k] ∩ A| / k (with k predicted of k actual this is also the precision; the
  seed paper's "precision and recall", 84.6% on Mixtral);
- ``exact``: set(P[:k]) == A (arXiv 2511.10676's exact match);
- ``precision_at[b]``: |P[:b] ∩ A| / b for a prefetch budget of b = 1..k experts, and
  ``recall_at[b]`` = |P[:b] ∩ A| / k. A predictor that names fewer than b experts is charged for
  the missing ones (they count as wrong).

:func:`threshold_curve` is FATE-style confidence thresholding: prefetch every expert whose predicted
probability (softmax of the recorded prediction logits) reaches tau; precision, recall and how many
experts that fetches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moesim.traces.format import DECODE, Trace

PREDICTORS = ("speculative", "previous-token", "transition")

# published figures this study is set beside (prediction of the next layer's experts)
PUBLISHED = [
    {"source": "seed paper (arXiv 2511.05814), Mixtral-8x7B", "metric": "precision = recall (top-2 of 8)",
     "value": 0.846},
    {"source": "FATE, confidence-thresholded cross-layer gate prediction", "metric": "prediction accuracy",
     "value": 0.97},
    {"source": "arXiv 2511.10676, DeepSeek-V2-Lite / Qwen3-30B-A3B", "metric": "exact-set match",
     "value": (0.93, 0.98)},
]


@dataclass
class PredictionAccuracy:
    """Per-layer sums and counts of one predictor at one distance (layers without rows count 0)."""

    predictor: str
    distance: int
    top_k: int
    rows: np.ndarray                       # (L,) rows with a prediction
    top1: np.ndarray                       # (L,) rows whose P[0] is the actual top-1
    overlap: np.ndarray                    # (L,) sum of |P[:k] ∩ A|
    exact: np.ndarray                      # (L,) rows with set(P[:k]) == A
    hits_at: np.ndarray                    # (L, k) sum of |P[:b] ∩ A| for b = 1..k
    per_layer: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = np.maximum(self.rows, 1)
        k = self.top_k
        self.per_layer = {
            "top1": self.top1 / n, "recall_at_k": self.overlap / (n * k), "exact": self.exact / n,
            **{f"precision_at_{b}": self.hits_at[:, b - 1] / (n * b) for b in range(1, k + 1)},
            **{f"recall_at_{b}": self.hits_at[:, b - 1] / (n * k) for b in range(1, k + 1)},
        }

    def summary(self) -> dict[str, float | int | str]:
        """Pooled over every row with a prediction (layers weighted by their rows)."""
        n, k = int(self.rows.sum()), self.top_k
        out: dict[str, float | int | str] = {"predictor": self.predictor, "distance": self.distance, "rows": n}
        if n == 0:
            return out
        out["top1"] = float(self.top1.sum() / n)
        out["recall_at_k"] = float(self.overlap.sum() / (n * k))
        out["exact"] = float(self.exact.sum() / n)
        for b in range(1, k + 1):
            out[f"precision_at_{b}"] = float(self.hits_at[:, b - 1].sum() / (n * b))
        return out


def _grid(trace: Trace, phase: int | None):
    """(tokens, L, k) actual experts and (tokens,) sequence ids of the chosen rows, -1 where missing;
    the row index grid maps each (token, layer) back to its trace row."""
    t = trace.execution_order()
    if phase is not None:
        t = t.filter_phase(phase)
    L, k = t.meta.num_layers, t.meta.top_k
    seq, tok = t.seq.astype(np.int64), t.token.astype(np.int64)
    pair = (seq << 32) + tok
    uniq, tidx = np.unique(pair, return_inverse=True)
    actual = np.full((len(uniq), L, k), -1, np.int64)
    rows = np.full((len(uniq), L), -1, np.int64)
    actual[tidx, t.layer] = t.experts
    rows[tidx, t.layer] = np.arange(len(t))
    return t, actual, rows, uniq >> 32


def _score(pred: np.ndarray, actual: np.ndarray, valid: np.ndarray, k: int):
    """Per-layer sums for predictions ``pred`` (T, L, m>=1, -1 = none) against ``actual`` (T, L, k)."""
    m = pred.shape[2]
    width = max(m, k)
    if m < width:
        pred = np.concatenate([pred, np.full(pred.shape[:2] + (width - m,), -1, np.int64)], axis=2)
    inset = (pred[..., :, None] == actual[..., None, :]).any(-1) & (pred >= 0)   # (T, L, width)
    inset &= valid[..., None]
    cum = np.cumsum(inset[..., :k], axis=2)                                    # hits within P[:b]
    hits_at = cum.sum(0)                                                       # (L, k)
    top1 = ((pred[..., 0] == actual[..., 0]) & valid).sum(0)
    overlap = cum[..., k - 1] * valid
    return valid.sum(0), top1, overlap.sum(0), ((overlap == k) & valid).sum(0), hits_at


def prediction_accuracy(trace: Trace, predictor: str = "speculative", distance: int = 1,
                        phase: int | None = DECODE) -> PredictionAccuracy:
    """Accuracy of ``predictor`` on ``trace``'s rows of ``phase`` (None = all), per layer."""
    from moesim.errors import SettingError, UsageError

    if predictor not in PREDICTORS:
        raise UsageError(f"unknown predictor {predictor!r} (known: {', '.join(PREDICTORS)})")
    if distance < 1:
        raise UsageError(f"prediction distance must be >= 1, got {distance}")
    t, actual, rows, seqs = _grid(trace, phase)
    T, L, k = actual.shape
    present = rows >= 0
    if predictor == "speculative":
        if distance not in t.pred_distances:
            from moesim.traces.predictions import missing_predictions

            raise SettingError("recorded_predictions", missing_predictions(trace.path, t.pred_distances, distance),
                               str(distance))
        recorded = t.pred_experts(distance).astype(np.int64)
        pred = np.full((T, L, k), -1, np.int64)
        pred[present] = recorded[rows[present]]
        valid = present & (pred[..., 0] >= 0)
    elif predictor == "previous-token":
        pred = np.full((T, L, k), -1, np.int64)
        same = np.r_[False, seqs[1:] == seqs[:-1]]   # the previous token belongs to the same sequence
        pred[1:][same[1:]] = actual[:-1][same[1:]]
        valid = present & (pred[..., 0] >= 0)
    else:
        pred = _transition_predictions(actual, present, distance, trace.meta.num_experts)
        valid = present & np.r_[np.zeros(distance, bool), np.ones(max(L - distance, 0), bool)][None, :L]
    n, top1, overlap, exact, hits_at = _score(pred, actual, valid, k)
    return PredictionAccuracy(predictor, distance, k, n, top1, overlap, exact, hits_at)


def _transition_predictions(actual: np.ndarray, present: np.ndarray, d: int, E: int) -> np.ndarray:
    """(T, L, E) transition predictions in replay order: the prediction for (token t, layer l) scores
    experts by the counts of (layer l - d, layer l) pairs of tokens before t, summed over layer l - d's
    actual experts at t, highest first, zero scores dropped (``Transition``'s rule: it counts a token's
    pair when layer l runs, after predicting it)."""
    T, L, k = actual.shape
    pred = np.full((T, L, E), -1, np.int64)
    tix = np.arange(T)[:, None]
    for layer in range(d, L):
        src = layer - d
        ok = present[:, layer] & present[:, src]
        a_src = np.zeros((T, E))
        a_dst = np.zeros((T, E))
        a_src[tix, np.where(ok[:, None], actual[:, src], 0)] = ok[:, None]
        a_dst[tix, np.where(ok[:, None], actual[:, layer], 0)] = ok[:, None]
        pairs = a_src[:, :, None] * a_dst[:, None, :]                 # (T, E, E) this token's pairs
        before = np.cumsum(pairs, axis=0) - pairs                     # pairs of earlier tokens only
        score = np.einsum("te,tef->tf", a_src, before)
        order = np.argsort(-score, axis=1, kind="stable")
        picks = np.where(np.take_along_axis(score, order, 1) > 0, order, -1)
        picks[~ok] = -1
        pred[:, layer] = picks
    return pred


def accuracy_table(trace: Trace, distances=(1, 2, 3), phase: int | None = DECODE) -> list[dict]:
    """Pooled summaries: speculative and transition at each distance, previous-token once."""
    rows = []
    for d in distances:
        if d in trace.pred_distances:
            rows.append(prediction_accuracy(trace, "speculative", d, phase).summary())
        rows.append(prediction_accuracy(trace, "transition", d, phase).summary())
    rows.append(prediction_accuracy(trace, "previous-token", 1, phase).summary())
    return rows


def threshold_curve(trace: Trace, distance: int = 1, thresholds=(0.05, 0.1, 0.2, 0.3, 0.5, 0.7),
                    phase: int | None = DECODE) -> list[dict]:
    """Prefetch every expert with predicted probability >= tau (softmax of ``pred{d}_logits``):
    precision (fetched that were used), recall (used that were fetched), experts fetched per row."""
    from moesim.errors import SettingError

    col = f"pred{distance}_logits"
    if col not in trace.table.column_names:
        raise SettingError("recorded_pred_logits", f"{trace.path}: no {col} column; record the trace with the "
                           "predictions' logits at that distance", str(distance))
    t = trace.execution_order()
    if phase is not None:
        t = t.filter_phase(phase)
    lg = t.logits_matrix(col).astype(np.float64)
    # rows without a prediction (layer < d) hold -1 ids (their logits may be NaN or zeros)
    keep = ~np.isnan(lg).any(1) & (t.pred_experts(distance)[:, 0] >= 0)
    lg, actual = lg[keep], t.experts[keep].astype(np.int64)
    probs = np.exp(lg - lg.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    used = np.zeros_like(probs, bool)
    np.put_along_axis(used, actual, True, axis=1)
    out = []
    for tau in thresholds:
        fetched = probs >= tau
        tp = (fetched & used).sum()
        out.append({"threshold": float(tau), "precision": float(tp / max(fetched.sum(), 1)),
                    "recall": float(tp / used.sum()), "experts_per_row": float(fetched.sum(1).mean()),
                    "rows": int(len(probs))})
    return out
