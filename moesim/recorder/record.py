"""Record router decisions and speculative next-layer predictions from a running transformers model.

Hooks only (no source edits, no patched ``forward``):

* a forward pre-hook on the decoder stack (``model.model``) opens a step and reads how many tokens
  it carries (prefill: the prompt; decode: one);
* a forward hook on every router keeps its ``(logits, weights, ids)`` output — what the experts
  were actually called with;
* with predictions on, a forward hook on the decoder layer of MoE layer l takes its output h_l
  (the residual stream leaving layer l = entering layer l+1); the prediction for layer l+d is
  MoE layer l+d's ``post_attention_layernorm`` and router applied to h_l, for d = 1..D; the
  predicted top-k is stored on the row of layer l+d as ``pred{d}_experts`` (the format's
  convention), ordered by predicted score, highest first;
* a forward hook on the decoder stack closes the step: rows appended in execution order (token,
  then layer), with one device->host copy for everything of the step.

Predictions run on one of two paths (``Recorder.predict_path``):

* ``"batched"`` (mixtral, qwen2_moe, qwen3_moe, olmoe; see ``MoEAdapter.stacked_router``): the
  decoder hook only keeps a reference to h_l, no kernels. At step close the kept states are stacked
  and every prediction of the step is computed at once — the RMSNorm with the target layers' norm
  weights (stacked once at ``__enter__``), one batched matmul with their router weights, then
  ``adapter.route`` on the batched logits. It is the same arithmetic as the per-layer path, but
  different kernels (bmm vs linear, a longer reduction batch) may round differently in the last bit,
  so logits agree to float tolerance and ids are identical except on exact near-ties. A numerical
  self-check at ``__enter__`` (batched vs per-layer on a fixed input) falls back to the per-layer
  path if the two disagree (e.g. a norm variant that adds 1 to its weight). Steps whose kept states
  would exceed ``Recorder.stash_bytes`` (long prefills) are predicted layer by layer instead.
* ``"per-layer"`` (deepseek_v3, gpt_oss, phimoe, unknown families, or ``batch_predictions=False``):
  the decoder hook calls ``adapter.predict`` for each target layer right away (a few small tensor
  ops per layer).

Everything stays on the device until the step ends. Sequences are recorded one at a time (batch
size 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from moesim.errors import SettingError, UsageError
from moesim.recorder.adapters import MoEAdapter, adapter_for
from moesim.recorder.parts import PartsTraceWriter
from moesim.traces.format import DECODE, PREFILL, TraceMeta, TraceWriter

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class _Step:
    start: int
    tokens: int
    phase: int
    batched: bool = False  # predictions from ``hidden`` at close (else ``preds``, computed in the hooks)
    routed: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    preds: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Batched:
    """Stacked weights of the batched prediction path: row j predicts layer ``target[j]`` from the
    output of layer ``source[j]``; distance d owns rows ``rows[d]``."""

    norm: torch.Tensor      # (M, 1, hidden)
    router: torch.Tensor    # (M, E, hidden)
    eps: float
    sources: int            # kept decoder outputs: layers 0 .. sources-1
    source_index: torch.Tensor | None  # (M,) rows of the stacked outputs; None = all of them, in order
    rows: dict[int, slice]


class Recorder:
    """Context manager that records every forward pass of ``model`` into ``writer_or_path``.

    ``writer_or_path``: a trace path (written crash-safe through ``PATH.parts/``) or an open
    :class:`TraceWriter` / :class:`PartsTraceWriter` the caller closes. Call :meth:`begin_sequence`
    before each ``model.generate``; tokens are numbered from 0 (prompt first, then generated).

    ``batch_predictions=False`` forces the per-layer prediction path; ``predict_path`` says which path
    runs once entered (``"batched"``, ``"per-layer"`` or None without predictions).
    """

    stash_bytes = 64 << 20  # kept decoder outputs per step on the batched path; longer steps go per layer

    def __init__(self, model: torch.nn.Module, adapter: MoEAdapter | None = None,
                 writer_or_path: TraceWriter | PartsTraceWriter | str | os.PathLike | None = None, *,
                 predict_distance: int = 1, logits: bool = False, pred_logits: bool = False,
                 flush_tokens: int = 64, model_name: str | None = None,
                 provenance: dict[str, Any] | None = None, batch_predictions: bool = True) -> None:
        if predict_distance < 0:
            raise SettingError("predict_distance", f"the prediction distance must be >= 0, got {predict_distance}")
        self.model = model
        self.adapter = adapter or adapter_for(model)
        self.num_layers = len(self.adapter.layers)
        if predict_distance >= self.num_layers:  # layer l + d must exist for some l
            raise SettingError("predict_distance", f"the prediction distance {predict_distance} reaches past the "
                               f"model's {self.num_layers} MoE layers (at most {self.num_layers - 1})",
                               fix=str(self.num_layers - 1))
        self.distances = tuple(range(1, predict_distance + 1))
        self.logits = logits
        self.pred_logits = pred_logits and bool(self.distances)
        self.flush_tokens = flush_tokens
        self.batch_predictions = batch_predictions
        self._batched: _Batched | None = None
        self.predict_path: str | None = None
        self.meta = self._meta(model_name, provenance or {})
        if writer_or_path is None:
            raise UsageError("Recorder needs an output path or writer")
        self._owns_writer = not isinstance(writer_or_path, TraceWriter | PartsTraceWriter)
        self.writer = (PartsTraceWriter(writer_or_path, self.meta, pred_distances=self.distances, logits=logits,
                                        pred_logits=self.pred_logits)
                       if self._owns_writer else writer_or_path)
        self._handles: list[Any] = []
        self.seq = -1
        self._position = 0
        self._steps_in_seq = 0
        self._step: _Step | None = None
        self._tokens_since_flush = 0
        self.tokens_recorded = 0

    def _meta(self, name: str | None, provenance: dict[str, Any]) -> TraceMeta:
        a = self.adapter
        dtype = next(self.model.parameters()).dtype
        import transformers

        prov = {"kind": "recorded", "recorder": "moesim.recorder (forward hooks)",
                "transformers": transformers.__version__, "torch": torch.__version__,
                "predict_from": "output of the decoder layer of MoE layer l, through layer l+d's "
                                "post_attention_layernorm and router", **provenance}
        return TraceMeta(model=name or getattr(self.model.config, "_name_or_path", "") or a.family,
                         family=a.family, num_layers=self.num_layers, num_experts=a.num_experts, top_k=a.top_k,
                         expert_bytes=a.expert_bytes(), quantization=DTYPE_NAMES.get(dtype, str(dtype)),
                         hidden_size=a.hidden_size, provenance=prov, extra=a.describe())

    # -- hooks ----------------------------------------------------------------------------------
    def __enter__(self) -> Recorder:
        base = self.adapter.base
        self._batched = self._setup_batched() if self.distances and self.batch_predictions else None
        self.predict_path = None if not self.distances else "batched" if self._batched else "per-layer"
        self._handles.append(base.register_forward_pre_hook(self._open_step, with_kwargs=True))
        self._handles.append(base.register_forward_hook(self._close_step))
        for layer in self.adapter.layers:
            self._handles.append(layer.gate.register_forward_hook(self._gate_hook(layer.index)))
            if any(layer.index + d < self.num_layers for d in self.distances):
                self._handles.append(layer.decoder.register_forward_hook(self._decoder_hook(layer.index)))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._batched = None  # drop the stacked weights
        if not self._owns_writer:
            return
        if exc_type is None or exc_type is KeyboardInterrupt:
            self.writer.close()  # keep what was recorded: Ctrl-C closes the trace cleanly
        else:
            self.writer.abort()

    def begin_sequence(self, seq: int | None = None) -> None:
        self.seq = self.seq + 1 if seq is None else seq
        self._position = 0
        self._steps_in_seq = 0

    # -- batched predictions ----------------------------------------------------------------------
    def _setup_batched(self) -> _Batched | None:
        stacked = self.adapter.stacked_router()
        if stacked is None:
            return None
        norm, router, eps = stacked
        L = self.num_layers
        sources = [src for d in self.distances for src in range(L - d)]
        targets = [src + d for d in self.distances for src in range(L - d)]
        rows, at = {}, 0
        for d in self.distances:
            rows[d] = slice(at, at + L - d)
            at += L - d
        n_src = L - min(self.distances)
        plain = sources == list(range(n_src))
        tgt = torch.tensor(targets, device=norm.device)
        b = _Batched(norm=norm[tgt].unsqueeze(1), router=router[tgt], eps=eps, sources=n_src,
                     source_index=None if plain else torch.tensor(sources, device=norm.device), rows=rows)
        return b if self._batched_agrees(b) else None

    def _batched_logits(self, b: _Batched, hidden: torch.Tensor) -> torch.Tensor:
        """(M, n, E) router logits of every target layer; ``hidden`` (sources, n, hidden) = kept outputs.

        The target layers' RMSNorm written out (as in transformers: float32 statistics, cast back to
        the input dtype, times the weight), then one batched matmul with the stacked router weights.
        """
        h = hidden if b.source_index is None else hidden.index_select(0, b.source_index)
        x = h.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + b.eps)
        x = b.norm * x.to(h.dtype)
        return torch.bmm(x, b.router.transpose(1, 2))

    def _batched_agrees(self, b: _Batched) -> bool:
        """Batched and per-layer logits agree on a fixed input (catches norm variants the shape checks miss)."""
        layers = self.adapter.layers
        gen = torch.Generator().manual_seed(0)  # a private generator: the global RNG stream stays untouched
        hidden = torch.randn(b.sources, 3, self.adapter.hidden_size, generator=gen)
        hidden = hidden.to(device=b.norm.device, dtype=b.norm.dtype)
        rel = 1e-4 if hidden.dtype == torch.float32 else 5e-2
        with torch.no_grad():
            got = self._batched_logits(b, hidden).float()
            for d, rows in b.rows.items():
                for src in range(rows.stop - rows.start):
                    want = self.adapter.predict(layers[src + d], hidden[src].unsqueeze(0))[0].float()
                    have = got[rows.start + src]
                    if want.shape != have.shape or ((want - have).abs().max().item()
                                                     > rel * max(1.0, want.abs().max().item())):
                        return False
        return True

    # -- hooks ----------------------------------------------------------------------------------
    def _open_step(self, module, args, kwargs) -> None:
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        if x.shape[0] != 1:
            raise UsageError(f"the recorder handles batch size 1 (got {x.shape[0]}); record prompts in turn")
        if self.seq < 0:
            self.begin_sequence(0)
        phase = PREFILL if self._steps_in_seq == 0 else DECODE
        n = int(x.shape[1])
        b = self._batched
        batched = (b is not None
                   and n * b.sources * self.adapter.hidden_size * b.norm.element_size() <= self.stash_bytes)
        self._step = _Step(self._position, n, phase, batched)

    def _gate_hook(self, index: int):
        def hook(module, args, out) -> None:
            if self._step is not None:
                self._step.routed[index] = self.adapter.split(out, module)
        return hook

    def _decoder_hook(self, index: int):
        def hook(module, args, out) -> None:
            step = self._step
            if step is None:
                return
            hidden = out[0] if isinstance(out, tuple) else out
            if step.batched:  # keep a reference; the predictions run at step close
                step.hidden[index] = hidden
                return
            with torch.no_grad():
                for d in self.distances:
                    if index + d < self.num_layers:
                        step.preds[(index + d, d)] = self.adapter.predict(self.adapter.layers[index + d], hidden)
        return hook

    def _predictions(self, step: _Step) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per distance d: (ids (n, L-d, k) ordered by predicted score, float logits (n, L-d, E))."""
        n, L = step.tokens, self.num_layers
        out = {}
        if step.batched:
            b = self._batched
            hidden = torch.stack([step.hidden[i].reshape(n, -1) for i in range(b.sources)])  # (sources, n, H)
            logits = self._batched_logits(b, hidden)                                           # (M, n, E)
            ids = self.adapter.route(logits, self.adapter.layers[0].gate)[1]                  # (M, n, k)
            lg = logits.float()
            ids = ids.gather(-1, torch.sort(lg.gather(-1, ids), dim=-1, descending=True, stable=True)[1])
            for d, rows in b.rows.items():
                out[d] = ids[rows].transpose(0, 1), lg[rows].transpose(0, 1)
            return out
        for d in self.distances:  # one stack, one sort per distance
            lg = torch.stack([step.preds[(layer, d)][0] for layer in range(d, L)], 1).float()  # (n, L-d, E)
            pid = torch.stack([step.preds[(layer, d)][1] for layer in range(d, L)], 1)        # (n, L-d, k)
            # same ordering rule as the routed ids: by predicted score, highest first
            out[d] = pid.gather(-1, torch.sort(lg.gather(-1, pid), dim=-1, descending=True, stable=True)[1]), lg
        return out

    @staticmethod
    def _to_host(tensors: list[torch.Tensor], pack: bool | None = None) -> list[np.ndarray]:
        """Each tensor as a numpy array (ids as int64, the rest float32): one device->host copy in all.

        ``pack`` (default: when any tensor is off the CPU) copies through one packed float32 buffer.
        """
        if pack is None:
            pack = any(t.device.type != "cpu" for t in tensors)
        if not pack:
            return [t.numpy() if t.is_floating_point() else t.numpy().astype(np.int64, copy=False) for t in tensors]
        # ids are < 2^24, exact in float32: pack everything into one buffer, copy once, unpack
        flat = torch.cat([t.reshape(-1).float() for t in tensors]).cpu().numpy()
        out, at = [], 0
        for t in tensors:
            a = flat[at:at + t.numel()].reshape(t.shape)
            at += t.numel()
            out.append(a if t.is_floating_point() else a.astype(np.int64))
        return out

    def _close_step(self, module, args, out) -> None:
        step, self._step = self._step, None
        if step is None:
            return
        n, L, k = step.tokens, self.num_layers, self.adapter.top_k
        missing = [i for i in range(L) if i not in step.routed]
        if missing:
            raise RuntimeError(f"router of MoE layer {missing[0]} did not run in this forward pass")
        with torch.no_grad():
            weights = torch.stack([step.routed[i][1] for i in range(L)], 1).float()   # (n, L, k)
            ids = torch.stack([step.routed[i][2] for i in range(L)], 1)
            # router order = highest weight first (stable: keeps the model's order on ties)
            order = torch.sort(weights, dim=-1, descending=True, stable=True)[1]
            host = [ids.gather(-1, order), weights.gather(-1, order)]
            if self.logits:
                host.append(torch.stack([step.routed[i][0] for i in range(L)], 1).float())
            predicted = self._predictions(step) if self.distances else {}
            for d in self.distances:
                host.append(predicted[d][0])
                if self.pred_logits:
                    host.append(predicted[d][1])
        arrays = self._to_host(host)
        ids, weights = arrays[0], arrays[1]
        logits = arrays[2] if self.logits else None
        rest = iter(arrays[3 if self.logits else 2:])
        preds, pred_logits = {}, {}
        for d in self.distances:
            p = np.full((n, L, k), -1, np.int64)
            p[:, d:] = next(rest)
            preds[d] = p.reshape(n * L, k)
            if self.pred_logits:
                pl = np.zeros((n, L, self.adapter.num_experts), np.float32)
                pl[:, d:] = next(rest)
                pred_logits[d] = pl.reshape(n * L, -1)
        tokens = np.repeat(np.arange(step.start, step.start + n, dtype=np.int32), L)
        layers = np.tile(np.arange(L, dtype=np.int16), n)
        self.writer.write(self.seq, tokens, step.phase, layers, ids.reshape(n * L, k), weights.reshape(n * L, k),
                          logits=None if logits is None else logits.reshape(n * L, -1),
                          preds=preds or None, pred_logits=pred_logits if self.pred_logits else None)
        self._position += n
        self._steps_in_seq += 1
        self.tokens_recorded += n
        self._tokens_since_flush += n
        if self._tokens_since_flush >= self.flush_tokens:
            self.flush()

    def flush(self) -> None:
        self.writer.flush()
        self._tokens_since_flush = 0

