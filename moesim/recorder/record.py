"""Record router decisions and speculative next-layer predictions from a running transformers model.

Hooks only (no source edits, no patched ``forward``):

* a forward pre-hook on the decoder stack (``model.model``) opens a step and reads how many tokens
  it carries (prefill: the prompt; decode: one);
* a forward hook on every router keeps its ``(logits, weights, ids)`` output — what the experts
  were actually called with;
* with predictions on, a forward hook on the decoder layer of MoE layer l takes its output h_l
  (the residual stream leaving layer l = entering layer l+1) and applies MoE layer l+d's
  ``post_attention_layernorm`` and router to it, for d = 1..D; the predicted top-k is stored on
  the row of layer l+d as ``pred{d}_experts`` (the format's convention);
* a forward hook on the decoder stack closes the step: one device->host copy for all layers,
  rows appended in execution order (token, then layer).

Everything stays on the device until the step ends, so the per-layer cost is a few small
tensor ops. Sequences are recorded one at a time (batch size 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from moesim.errors import UsageError
from moesim.recorder.adapters import MoEAdapter, adapter_for
from moesim.recorder.parts import PartsTraceWriter
from moesim.traces.format import DECODE, PREFILL, TraceMeta, TraceWriter

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class _Step:
    start: int
    tokens: int
    phase: int
    routed: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    preds: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class Recorder:
    """Context manager that records every forward pass of ``model`` into ``writer_or_path``.

    ``writer_or_path``: a trace path (written crash-safe through ``PATH.parts/``) or an open
    :class:`TraceWriter` / :class:`PartsTraceWriter` the caller closes. Call :meth:`begin_sequence`
    before each ``model.generate``; tokens are numbered from 0 (prompt first, then generated).
    """

    def __init__(self, model: torch.nn.Module, adapter: MoEAdapter | None = None,
                 writer_or_path: TraceWriter | PartsTraceWriter | str | os.PathLike | None = None, *,
                 predict_distance: int = 1, logits: bool = False, pred_logits: bool = False,
                 flush_tokens: int = 64, model_name: str | None = None,
                 provenance: dict[str, Any] | None = None) -> None:
        if predict_distance < 0:
            raise UsageError(f"--predict-distance must be >= 0, got {predict_distance}")
        self.model = model
        self.adapter = adapter or adapter_for(model)
        self.num_layers = len(self.adapter.layers)
        self.distances = tuple(d for d in range(1, predict_distance + 1) if d < self.num_layers)
        self.logits = logits
        self.pred_logits = pred_logits and bool(self.distances)
        self.flush_tokens = flush_tokens
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
        self._step = _Step(self._position, int(x.shape[1]), phase)

    def _gate_hook(self, index: int):
        def hook(module, args, out) -> None:
            if self._step is not None:
                self._step.routed[index] = self.adapter.split(out, module)
        return hook

    def _decoder_hook(self, index: int):
        def hook(module, args, out) -> None:
            if self._step is None:
                return
            hidden = out[0] if isinstance(out, tuple) else out
            with torch.no_grad():
                for d in self.distances:
                    if index + d < self.num_layers:
                        self._step.preds[(index + d, d)] = self.adapter.predict(self.adapter.layers[index + d], hidden)
        return hook

    def _close_step(self, module, args, out) -> None:
        step, self._step = self._step, None
        if step is None:
            return
        n, L, k = step.tokens, self.num_layers, self.adapter.top_k
        missing = [i for i in range(L) if i not in step.routed]
        if missing:
            raise RuntimeError(f"router of MoE layer {missing[0]} did not run in this forward pass")
        with torch.no_grad():
            weights = torch.stack([step.routed[i][1].float() for i in range(L)], 1)   # (n, L, k)
            ids = torch.stack([step.routed[i][2] for i in range(L)], 1)
            # router order = highest weight first (stable: keeps the model's order on ties)
            order = torch.sort(weights, dim=-1, descending=True, stable=True)[1]
            weights, ids = weights.gather(-1, order).cpu().numpy(), ids.gather(-1, order).cpu().numpy()
            logits = (torch.stack([step.routed[i][0].float() for i in range(L)], 1).cpu().numpy()
                      if self.logits else None)
            preds, pred_logits = {}, {}
            for d in self.distances:  # one stack, one sort, one host copy per distance
                lg = torch.stack([step.preds[(layer, d)][0].float() for layer in range(d, L)], 1)  # (n, L-d, E)
                pid = torch.stack([step.preds[(layer, d)][1] for layer in range(d, L)], 1)        # (n, L-d, k)
                # same ordering rule as the routed ids: by predicted score, highest first
                pid = pid.gather(-1, torch.sort(lg.gather(-1, pid), dim=-1, descending=True, stable=True)[1])
                p = np.full((n, L, k), -1, np.int64)
                p[:, d:] = pid.cpu().numpy()
                preds[d] = p.reshape(n * L, k)
                if self.pred_logits:
                    pl = np.zeros((n, L, self.adapter.num_experts), np.float32)
                    pl[:, d:] = lg.cpu().numpy()
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

