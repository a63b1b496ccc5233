"""Plot the learned model's training: loss curve (with the held-out loss) and per-layer expert load.

    python benchmarks/plot_learned_training.py     # reports/learned_moe_train_metrics.json -> reports/learned_moe_training.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moesim.safe_write import atomic_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--metrics", default=str(ROOT / "reports/learned_moe_train_metrics.json"))
    ap.add_argument("-o", "--output", default=str(ROOT / "reports/learned_moe_training.png"))
    args = ap.parse_args()
    m = json.loads(Path(args.metrics).read_text())
    curve = m["train"]["curve"]
    tokens = np.array([c["tokens"] for c in curve]) / 1e6
    loss = np.array([c["loss"] for c in curve])
    aux = np.array([c["aux_loss"] for c in curve])
    held = m["held_out"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1.2, 1]})
    ax1.plot(tokens, loss, color="#0072B2", lw=1.2, label="training cross-entropy (batch)")
    ax1.axhline(held["loss"], color="#D55E00", ls="--", lw=1,
                label=f"held-out loss {held['loss']:.3f} (perplexity {held['perplexity']:.1f})")
    ax1.set(xlabel="training tokens (millions)", ylabel="cross-entropy (nats/token)", ylim=(0, max(loss[0], 8) + 0.5))
    ax1b = ax1.twinx()
    ax1b.plot(tokens, aux, color="#009E73", lw=0.8, alpha=0.7, label="router aux loss (right)")
    ax1b.set(ylabel="aux loss (balanced top-2 of 8 = 2.0)", ylim=(1.9, max(2.2, aux.max() + 0.05)))
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax1b.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper right")
    t = m["train"]
    ax1.set_title(f"{m['params'] / 1e6:.0f}M params, {t['steps']} steps, {t['tokens'] / 1e6:.1f}M tokens in "
                  f"{t['seconds'] / 60:.1f} min ({t['tokens_per_s'] / 1e3:.0f}k tokens/s)", fontsize=9)
    share = np.array(held["expert_share"])
    im = ax2.imshow(share.T, aspect="auto", cmap="viridis", vmin=0, vmax=max(0.25, share.max()))
    ax2.set(xlabel="MoE layer", ylabel="expert", title="held-out top-2 share per layer (uniform = 0.125)")
    fig.colorbar(im, ax=ax2, fraction=0.046)
    fig.suptitle(f"Learned Mixtral-architecture MoE ({m['config']['layers']} layers, hidden {m['config']['hidden']}, "
                 f"8 experts top-2) trained on {m['device']}")
    fig.tight_layout()
    with atomic_path(Path(args.output)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    entropy = -(share * np.log(np.where(share > 0, share, 1))).sum(1) / math.log(8)
    print(f"wrote {args.output}; per-layer load entropy (1 = uniform): min {entropy.min():.3f}, "
          f"mean {entropy.mean():.3f}; max share {share.max():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
