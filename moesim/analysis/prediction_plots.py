"""Figure of the prediction study (``moesim plot predictions``): per-layer recall of each predictor, and
the pooled metrics beside the published figures."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from moesim.analysis import plots  # noqa: F401 - selects the file backend outside notebooks
from moesim.analysis.prediction import PUBLISHED, prediction_accuracy
from moesim.traces.format import DECODE, Trace

SPEC_COLORS = ["#0072B2", "#56B4E9", "#009E73"]
METRICS = (("top1", "top-1"), ("recall_at_k", "recall@k"), ("exact", "exact set"), ("precision_at_1", "precision@1"))


def predictions(trace: Trace, distances: Sequence[int] = (1, 2, 3), phase: int | None = DECODE) -> Figure:
    import matplotlib.pyplot as plt

    results = [prediction_accuracy(trace, "speculative", d, phase) for d in distances]
    results.append(prediction_accuracy(trace, "transition", 1, phase))
    results.append(prediction_accuracy(trace, "previous-token", 1, phase))
    colors = SPEC_COLORS[:len(distances)] + ["#D55E00", "#CC79A7"]
    labels = [f"speculative d={d}" for d in distances] + ["transition d=1", "previous token"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [1.3, 1]})
    layers = np.arange(trace.meta.num_layers)
    for res, color, lab in zip(results, colors, labels, strict=True):
        keep = res.rows > 0
        ax1.plot(layers[keep], res.per_layer["recall_at_k"][keep], marker=".", color=color, label=lab)
    ax1.set(xlabel="MoE layer", ylabel=f"recall@{trace.meta.top_k} (= precision at budget {trace.meta.top_k})",
            ylim=(0, 1.02), title="per layer")
    ax1.legend(fontsize=8, loc="lower right")
    width = 0.8 / len(results)
    x = np.arange(len(METRICS))
    for i, (res, color) in enumerate(zip(results, colors, strict=True)):
        s = res.summary()
        ax2.bar(x + (i - (len(results) - 1) / 2) * width, [s.get(m, 0.0) for m, _ in METRICS], width, color=color)
    ax2.axhline(PUBLISHED[0]["value"], color="k", ls="--", lw=1, label="seed paper, Mixtral recall@2: 84.6%")
    ax2.axhline(PUBLISHED[1]["value"], color="k", ls=":", lw=1, label="FATE (thresholded): ~97%")
    lo, hi = PUBLISHED[2]["value"]
    ax2.axhspan(lo, hi, color="grey", alpha=0.25, label="arXiv 2511.10676 exact set: 93-98%")
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    ax2.set(xticks=x, xticklabels=[name for _, name in METRICS], ylim=(0, 1.08), title="pooled over rows")
    name = trace.meta.model.split("/")[-1]
    fig.suptitle(f"Predicting layer l's experts before its gate: {name}, {trace.meta.num_layers} layers, "
                 f"top-{trace.meta.top_k} of {trace.meta.num_experts}")
    fig.tight_layout()
    return fig
