"""Recording the offloaded decoder's own run as a trace v1, through the recorder's crash-safe writer.

Each token of a forward step (a prefill chunk's tokens, or one decode token) becomes L rows: the routing the engine actually used
(top-k ids in router order = by weight, highest first, and their weights), optionally the router logits,
and the speculative predictions ``pred{d}_experts`` (layer l+d's norm and router on layer l's output,
stored on the row of layer l+d, as the recorder does). Rows stream into ``OUT.parquet.parts/`` and are
flushed every ``flush_steps`` steps, so a killed run leaves a readable trace.

Measured times go to a side file ``OUT.parquet.times.json`` (written atomically after the trace):
``{"steps": [{"seq", "token", "phase", "gpu_ms", "wall_ms"}, ...], "summary": {...}}`` -- ``gpu_ms`` is
CUDA-event time from the step's first launch to its logits, ``wall_ms`` the host's time for the step
including the wait for the logits. The trace thus carries its own ground truth for the simulator.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from moesim.engine.decode import StepRecord
from moesim.recorder.parts import PartsTraceWriter
from moesim.safe_write import atomic_path
from moesim.simulator.cost_model import TRACE_EXPERT_FORMAT_KEY
from moesim.traces.format import DECODE, TRACE_PREFILL_CHUNK_KEY, Trace, TraceMeta


def times_path(out: str | os.PathLike) -> Path:
    p = Path(out)
    return p.with_name(p.name + ".times.json")


class DecodeRecorder:
    def __init__(self, out: str | os.PathLike, spec, *, model_name: str, expert_format: str, expert_bytes: int,
                 prefill_chunk: int = 1, pred_distances: tuple[int, ...] = (), logits: bool = False,
                 flush_steps: int = 64,
                 provenance: dict[str, Any] | None = None) -> None:
        self.out = Path(out)
        self.spec, self.distances, self.logits = spec, tuple(pred_distances), logits
        prov = {"kind": "recorded", "recorder": "moesim.engine (offloaded decoder, gate-driven)",
                "predict_from": "output of MoE layer l, through layer l+d's post_attention_layernorm and router",
                "times": times_path(self.out).name, **(provenance or {})}
        meta = TraceMeta(model=model_name, family=spec.family, num_layers=spec.num_layers,
                         num_experts=spec.num_experts, top_k=spec.top_k, expert_bytes=expert_bytes,
                         quantization=expert_format, hidden_size=spec.hidden, provenance=prov,
                         extra={"shared_experts": 1 if spec.shared_ffn else 0, TRACE_EXPERT_FORMAT_KEY: expert_format,
                                TRACE_PREFILL_CHUNK_KEY: int(prefill_chunk)})
        self.writer = PartsTraceWriter(self.out, meta, pred_distances=self.distances, logits=logits)
        self.flush_steps = flush_steps
        self.times: list[dict[str, Any]] = []
        self._since_flush = 0

    def on_step(self, step: StepRecord) -> None:
        L = self.spec.num_layers
        self.writer.write(step.seq, np.full(L, step.token, np.int32), step.phase, np.arange(L, dtype=np.int16),
                          step.experts, step.weights, logits=step.router_logits if self.logits else None,
                          preds={d: step.preds[d] for d in self.distances if d in step.preds} or None)
        self.times.append({"seq": step.seq, "token": step.token, "phase": step.phase,
                           "gpu_ms": step.gpu_ms, "wall_ms": step.wall_ms})
        self._since_flush += 1
        if self._since_flush >= self.flush_steps:
            self.writer.flush()
            self._since_flush = 0

    def close(self, summary: dict[str, Any] | None = None) -> Path:
        path = self.writer.close()
        with atomic_path(times_path(self.out)) as tmp:
            Path(tmp).write_text(json.dumps({"steps": self.times, "summary": summary or {}}, indent=0))
        return path

    def abort(self) -> None:
        self.writer.abort()


def as_single_token_steps(trace: Trace) -> Trace:
    """The trace with every prefill row relabelled decode: for traces recorded before prompts ran as
    prefill chunks (no ``prefill_chunk`` in their metadata), whose engine prefilled token by token, so
    the simulator must replay those rows as single-token steps too."""
    import pyarrow as pa

    t = trace.table
    i = t.schema.get_field_index("phase")
    t = t.set_column(i, t.schema.field(i), pa.array(np.full(len(t), DECODE, np.int8)))
    return Trace(trace.meta, t, trace.path)
