"""Synthetic routing traces from a generative model fitted to real routing statistics.

The model, per MoE layer l and decode token t (k = top-k):

1. **Persistence**: each expert of the same layer's set at token t-1 is kept with probability
   ``retain[l]`` (in its old router order).
2. **Fill**: the remaining slots are drawn without replacement from the mixture
   ``(1 - beta[l]) * popularity[l] + beta[l] * transition[l][top1 of layer l-1 at token t]``
   -- per-layer expert popularity plus cross-layer correlation.
3. **Router order and weights**: the set is put in a random order weighted by popularity (the
   router order), and weights come from the fitted top-1 weight distribution; the rest share
   ``1 - w1`` (Dirichlet), in descending order.

Fitting (:func:`fit_preset`): ``transition`` and ``beta`` by smoothed counts and a likelihood grid;
``retain`` and ``popularity`` by matching, in simulation, each layer's mean token-to-token overlap and
its marginal expert frequencies (moment matching, a few fixed-point rounds).

Generation is compiled (numba) and streamed in chunks through :class:`TraceWriter`; the same preset
and seed give a byte-identical file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

from moesim.errors import DataError, SettingError, UsageError
from moesim.safe_write import read_json
from moesim.traces.format import DECODE, Trace, TraceMeta, TraceWriter

PRESET_VERSION = 1


@dataclass
class SynthPreset:
    name: str
    model: str
    family: str
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    mean_seq_len: float
    popularity: np.ndarray   # (L, E) fill weights
    retain: np.ndarray       # (L,)
    beta: np.ndarray         # (L,)
    transition: np.ndarray   # (L, E, E); row = top-1 expert of layer l-1
    top1_quantiles: np.ndarray  # (Q,) quantiles of the top-1 weight
    source: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "preset_version": PRESET_VERSION, "name": self.name, "model": self.model, "family": self.family,
            "num_layers": self.num_layers, "num_experts": self.num_experts, "top_k": self.top_k,
            "hidden_size": self.hidden_size, "mean_seq_len": round(float(self.mean_seq_len), 3),
            "retain": [round(float(x), 6) for x in self.retain],
            "beta": [round(float(x), 6) for x in self.beta],
            "popularity": [[round(float(x), 6) for x in row] for row in self.popularity],
            "transition": [[[round(float(x), 6) for x in row] for row in m] for m in self.transition],
            "top1_quantiles": [round(float(x), 6) for x in self.top1_quantiles],
            "source": self.source,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any], path: object = None) -> SynthPreset:
        try:
            if raw.get("preset_version") != PRESET_VERSION:
                raise DataError(path, f"preset version {raw.get('preset_version')!r} is not supported")
            p = cls(
                name=str(raw["name"]), model=str(raw["model"]), family=str(raw["family"]),
                num_layers=int(raw["num_layers"]), num_experts=int(raw["num_experts"]), top_k=int(raw["top_k"]),
                hidden_size=int(raw.get("hidden_size", 0)), mean_seq_len=float(raw["mean_seq_len"]),
                popularity=np.asarray(raw["popularity"], np.float64), retain=np.asarray(raw["retain"], np.float64),
                beta=np.asarray(raw["beta"], np.float64), transition=np.asarray(raw["transition"], np.float64),
                top1_quantiles=np.asarray(raw["top1_quantiles"], np.float64), source=dict(raw.get("source", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(path, f"not a valid synth preset ({type(exc).__name__}: {exc})") from None
        L, E = p.num_layers, p.num_experts
        if (p.popularity.shape != (L, E) or p.retain.shape != (L,) or p.beta.shape != (L,)
                or p.transition.shape != (L, E, E) or not 1 <= p.top_k <= E):
            raise DataError(path, "synth preset arrays do not match num_layers/num_experts")
        return p


def builtin_presets() -> list[str]:
    folder = resources.files("moesim") / "data" / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_preset(name_or_path: str | os.PathLike) -> SynthPreset:
    p = Path(name_or_path)
    if p.suffix == ".json" or p.exists():
        raw = read_json(p)
        if not isinstance(raw, dict):
            raise DataError(p, "a synth preset must be a JSON object")
        return SynthPreset.from_json(raw, p)
    name = str(name_or_path)
    if name not in builtin_presets():
        raise UsageError(f"unknown preset {name!r} (built-in: {', '.join(builtin_presets())}; or give a .json file)")
    res = resources.files("moesim") / "data" / "presets" / f"{name}.json"
    return SynthPreset.from_json(json.loads(res.read_text()), name)


# ---- generation ----------------------------------------------------------------------------------

@njit(cache=True)
def _seed(seed: int) -> None:
    np.random.seed(seed)


@njit(cache=True)
def _draw(weights: np.ndarray) -> int:
    total = weights.sum()
    u = np.random.random() * total
    acc = 0.0
    for i in range(weights.shape[0]):
        acc += weights[i]
        if u < acc and weights[i] > 0:
            return i
    for i in range(weights.shape[0] - 1, -1, -1):
        if weights[i] > 0:
            return i
    return 0


@njit(cache=True)
def _generate(n_tokens: int, popularity: np.ndarray, retain: np.ndarray, beta: np.ndarray,
              transition: np.ndarray, k: int, prev: np.ndarray, new_seq: np.ndarray,
              top1_q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``n_tokens`` tokens x L layers; ``prev`` (L, k) carries state across chunks
    (-1 = no previous token). ``new_seq[t]`` restarts persistence at a sequence boundary."""
    L, E = popularity.shape
    out = np.empty((n_tokens * L, k), np.int16)
    wts = np.empty((n_tokens * L, k), np.float32)
    mix = np.empty(E)
    chosen = np.empty(k, np.int64)
    for t in range(n_tokens):
        if new_seq[t]:
            prev[:, :] = -1
        top1_below = -1
        for lay in range(L):
            n = 0
            for j in range(k):
                e = prev[lay, j]
                if e >= 0 and np.random.random() < retain[lay]:
                    chosen[n] = e
                    n += 1
            for e in range(E):
                m = (1.0 - beta[lay]) * popularity[lay, e]
                if top1_below >= 0:
                    m += beta[lay] * transition[lay, top1_below, e]
                else:
                    m += beta[lay] * popularity[lay, e]
                mix[e] = m
            for j in range(n):
                mix[chosen[j]] = 0.0
            while n < k:
                e = _draw(mix)
                chosen[n] = e
                mix[e] = 0.0
                n += 1
            # router order: a popularity-weighted random permutation
            for e in range(E):
                mix[e] = 0.0
            for j in range(k):
                mix[chosen[j]] = popularity[lay, chosen[j]] + 1e-9
            row = t * L + lay
            for j in range(k):
                e = _draw(mix)
                out[row, j] = e
                mix[e] = 0.0
            for j in range(k):
                prev[lay, j] = out[row, j]
            top1_below = out[row, 0]
            # weights: top-1 from the fitted quantiles, the rest share what is left
            q = top1_q.shape[0]
            u = np.random.random() * (q - 1)
            i = int(u)
            w1 = top1_q[i] + (top1_q[min(i + 1, q - 1)] - top1_q[i]) * (u - i)
            wts[row, 0] = w1
            if k > 1:
                rest = np.empty(k - 1)
                for j in range(k - 1):
                    rest[j] = -np.log(1.0 - np.random.random())
                rest = np.sort(rest)[::-1] / rest.sum() * (1.0 - w1)
                for j in range(k - 1):
                    wts[row, j + 1] = min(rest[j], w1)
    return out, wts


def synthesize(preset: SynthPreset, tokens: int, seed: int, out: str | os.PathLike, *,
               sequences: int | None = None, chunk_tokens: int = 16384, progress: bool = True) -> TraceMeta:
    """Write a synthetic decode trace of ``tokens`` tokens (split into sequences) to ``out``."""
    if tokens < 1:
        raise SettingError("tokens", f"a trace needs at least one token, got {tokens}")
    rng = np.random.default_rng(seed)
    if sequences is None:
        # Sequence lengths ~ geometric around the fitted mean; drawn up front (deterministic).
        lengths = []
        left = tokens
        while left > 0:
            n = int(min(left, max(1, rng.geometric(1.0 / max(preset.mean_seq_len, 1.0)))))
            lengths.append(n)
            left -= n
    else:
        if sequences < 1 or sequences > tokens:
            raise SettingError("sequences", f"the number of sequences must be in [1, tokens], got {sequences}")
        base, extra = divmod(tokens, sequences)
        lengths = [base + (i < extra) for i in range(sequences)]
    seq_ids = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    tok_idx = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
    new_seq = np.zeros(tokens, np.bool_)
    new_seq[np.cumsum([0, *lengths[:-1]])] = True
    meta = TraceMeta(
        model=preset.model, family=preset.family, num_layers=preset.num_layers, num_experts=preset.num_experts,
        top_k=preset.top_k, hidden_size=preset.hidden_size,
        provenance={"kind": "synthetic", "preset": preset.name, "seed": seed, "tokens": tokens,
                    "sequences": len(lengths), "fitted_from": preset.source},
        created="1970-01-01T00:00:00+00:00",  # fixed: same preset + seed -> byte-identical file
    )
    L, k = preset.num_layers, preset.top_k
    prev = np.full((L, k), -1, np.int64)
    _seed(int(seed) % (2**32))
    from tqdm import tqdm

    with TraceWriter(out, meta, row_group_size=1 << 20) as writer, \
            tqdm(total=tokens, unit="tok", desc="synth", disable=not progress, leave=False) as bar:
        for start in range(0, tokens, chunk_tokens):
            n = min(chunk_tokens, tokens - start)
            experts, weights = _generate(n, preset.popularity, preset.retain, preset.beta, preset.transition,
                                         k, prev, new_seq[start:start + n], preset.top1_quantiles)
            layer = np.tile(np.arange(L, dtype=np.int16), n)
            writer.write(np.repeat(seq_ids[start:start + n], L), np.repeat(tok_idx[start:start + n], L),
                         DECODE, layer, experts, weights)
            bar.update(n)
    return meta


# ---- fitting -------------------------------------------------------------------------------------

def _dense(trace: Trace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, L, k) experts with -1 for missing rows, the new-sequence flags, and top-1 weights."""
    trace = trace.execution_order()
    meta = trace.meta
    seq, tok, layer = trace.seq.astype(np.int64), trace.token.astype(np.int64), trace.layer.astype(np.int64)
    pairs = np.stack([seq, tok], 1)
    uniq, inv = np.unique(pairs, axis=0, return_inverse=True)
    dense = np.full((len(uniq), meta.num_layers, meta.top_k), -1, np.int64)
    dense[inv.reshape(-1), layer] = trace.experts
    new_seq = np.ones(len(uniq), bool)
    new_seq[1:] = uniq[1:, 0] != uniq[:-1, 0]
    return dense, new_seq, trace.weights[:, 0].astype(np.float64)


def _overlap(dense: np.ndarray, new_seq: np.ndarray) -> np.ndarray:
    """Mean |S_t ∩ S_{t-1}| per layer (pairs of consecutive tokens of one sequence, both present)."""
    T, L, k = dense.shape
    a, b = dense[1:], dense[:-1]
    ok = (~new_seq[1:])[:, None] & (a[..., 0] >= 0) & (b[..., 0] >= 0)
    inter = (a[..., :, None] == b[..., None, :]).any(-1).sum(-1)
    return np.array([inter[ok[:, lay], lay].mean() if ok[:, lay].any() else 0.0 for lay in range(L)])


def _marginals(dense: np.ndarray, E: int) -> np.ndarray:
    T, L, k = dense.shape
    out = np.zeros((L, E))
    for lay in range(L):
        v = dense[:, lay].reshape(-1)
        v = v[v >= 0]
        out[lay] = np.bincount(v, minlength=E) / max(len(v), 1)
    return out


def fit_preset(trace: Trace, name: str = "fitted", *, rounds: int = 6, sim_tokens: int = 20000,
               seed: int = 0) -> SynthPreset:
    """Fit the generative model to a trace (decode rows are used when the trace has any)."""
    if (trace.phase == DECODE).any():
        trace = trace.filter_phase(DECODE)
    meta = trace.meta
    L, E, k = meta.num_layers, meta.num_experts, meta.top_k
    dense, new_seq, w1 = _dense(trace)
    if len(dense) < 2:
        raise DataError(trace.path, "too few tokens to fit a synthetic model")
    target_overlap = _overlap(dense, new_seq)
    target_marg = _marginals(dense, E)
    # cross-layer transition: layer l-1 top-1 -> layer l experts, Laplace-smoothed
    trans = np.ones((L, E, E))
    for lay in range(1, L):
        below, here = dense[:, lay - 1, 0], dense[:, lay]
        ok = (below >= 0) & (here[:, 0] >= 0)
        for j in range(k):
            np.add.at(trans[lay], (below[ok], here[ok, j]), 1.0)
    trans /= trans.sum(-1, keepdims=True)
    # beta: the mixture weight that best explains layer l's experts given layer l-1's top-1
    grid = np.linspace(0.0, 0.9, 10)
    beta = np.zeros(L)
    for lay in range(1, L):
        below, here = dense[:, lay - 1, 0], dense[:, lay]
        ok = (below >= 0) & (here[:, 0] >= 0)
        if not ok.any():
            continue
        pt = trans[lay][below[ok][:, None], here[ok]]
        pp = (target_marg[lay] / k + 1e-6)[here[ok]]
        ll = [np.log((1 - b) * pp + b * pt).sum() for b in grid]
        beta[lay] = grid[int(np.argmax(ll))]
    popularity = target_marg / target_marg.sum(1, keepdims=True)
    retain = np.clip(target_overlap / k, 0.0, 0.99)
    q = np.quantile(w1, np.linspace(0, 1, 65)) if len(w1) else np.full(65, 1.0 / k)
    seq_lens = np.diff(np.flatnonzero(np.r_[new_seq, True]))
    preset = SynthPreset(name, meta.model, meta.family, L, E, k, meta.hidden_size, float(seq_lens.mean()),
                         popularity, retain, beta, trans, q,
                         {"trace": Path(trace.path).name if trace.path else None, "tokens": int(len(dense)),
                          "model": meta.model})
    # moment matching by simulation: overlap -> retain, marginals -> popularity
    for r in range(rounds):
        sim = _simulate_dense(preset, sim_tokens, seed + r)
        sim_overlap = _overlap(sim, np.r_[True, np.zeros(sim_tokens - 1, bool)])
        sim_marg = _marginals(sim, E)
        preset.retain = np.clip(preset.retain + (target_overlap - sim_overlap) / k, 0.0, 0.99)
        ratio = np.where(sim_marg > 0, target_marg / np.maximum(sim_marg, 1e-9), 1.0)
        pop = preset.popularity * ratio ** 0.7
        preset.popularity = pop / pop.sum(1, keepdims=True)
    return preset


def _simulate_dense(preset: SynthPreset, tokens: int, seed: int) -> np.ndarray:
    _seed(seed)
    prev = np.full((preset.num_layers, preset.top_k), -1, np.int64)
    new_seq = np.zeros(tokens, np.bool_)
    new_seq[0] = True
    experts, _ = _generate(tokens, preset.popularity, preset.retain, preset.beta, preset.transition,
                           preset.top_k, prev, new_seq, preset.top1_quantiles)
    return experts.reshape(tokens, preset.num_layers, preset.top_k).astype(np.int64)
