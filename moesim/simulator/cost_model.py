"""Per-operator cost model (Vidur-style: profiling -> fitted cost model -> simulator).

A calibration file is JSON (schema documented in docs/timing.md)::

    {
      "name": "h200", "description": "...", "sources": {"pcie": "...", ...},
      "pcie": {"latency_us": 19.0, "bandwidth_gbps": 55.0, "copy_engines": 1,
               "curve": [[bytes, seconds], ...]},          # optional measured H2D curve (pinned)
      "expert_bytes": {"bf16": 352321536, "hqq4": ..., "hqq2": ...},
      "quantization": "hqq2",                             # default expert format
      "expert_compute": {"bf16": [[tokens, seconds], ...], "hqq2": [[...]], ...},
      "layer": {"base_s": ..., "per_token_s": ..., "per_context_s": ...},
      "token": {"base_s": ..., "per_token_s": ...},
      "engine": {"miss_issue_s": ..., "routing_handoff_s": ..., "host_copy_issue_s": ...,
                 "predict_s": ..., "copy_hop_s": ..., "ready_hop_s": ..., "sources": {...}}   # optional
    }

``copy_seconds`` interpolates the measured curve in log-log space (small copies are latency bound,
large ones bandwidth bound) and falls back to ``latency + bytes / bandwidth`` outside it.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from moesim.errors import DataError, SettingError, UsageError
from moesim.safe_write import atomic_open, read_json

# Mixtral-8x7B expert: w1, w3 (14336 x 4096) and w2 (4096 x 14336).
MIXTRAL_EXPERT_PARAMS = 3 * 4096 * 14336
DEFAULT_EXPERT_BYTES = {
    "bf16": MIXTRAL_EXPERT_PARAMS * 2,
    # hqq 4-bit, group 64, 8-bit quantised scale + zero per group (+ fp16 meta per 128 groups), as the
    # presets price it (moesim.engine.quant's "hqq4")
    "hqq4": MIXTRAL_EXPERT_PARAMS // 2 + MIXTRAL_EXPERT_PARAMS // 32 + MIXTRAL_EXPERT_PARAMS // 64 // 128 * 8,
    # hqq 2-bit, group 16, 8-bit quantised scale + zero per group (+ fp16 meta-scales per 128 groups):
    # 2 + 16/16 bits per weight, as mixtral-offloading packs its experts
    "hqq2": MIXTRAL_EXPERT_PARAMS * 3 // 8 + MIXTRAL_EXPERT_PARAMS // 16 // 128 * 8,
    # hqq 0.2 ignores quant_scale/quant_zero: bf16 scale + zero per group of 16 -> 4 bits per weight
    # (checked against hqq itself in tests/test_engine_hqq.py)
    "hqq2-v02": MIXTRAL_EXPERT_PARAMS // 2,
    # hqq 0.2's 4-bit g64: bf16 scale + zero per group of 64 -> 4.5 bits per weight
    "hqq4-v02": MIXTRAL_EXPERT_PARAMS * 9 // 16,
    # hqq 1-bit, group 16, 8-bit scale + zero per group: the smallest substitute of the low-bit ladder
    "hqq1": MIXTRAL_EXPERT_PARAMS // 4 + MIXTRAL_EXPERT_PARAMS // 16 // 128 * 8,
}
# HOBBIT's substitute: a miss may be copied one step down this ladder (docs/timing.md, "Hybrid execution")
LOWBIT_OF = {"bf16": "hqq4", "hqq4": "hqq2", "hqq2": "hqq1", "hqq2-v02": "hqq1"}

HOST_CPU_SOURCE = "measured on the H100 box's host (16 Xeon cores, AMX), issue 24"
# One Mixtral-8x7B expert FFN (4096 -> 14336 -> 4096) with torch's CPU kernels: seconds vs tokens at the
# reference thread count, and the int8 batch-1 time vs threads (the thread scaling of every format).
DEFAULT_CPU: dict[str, Any] = {
    "threads": 16, "format": "int8", "hidden_bytes": 4096 * 2,
    "expert_s": {"int8": [[1, 1.56e-3], [4, 2.86e-3]], "int4": [[1, 1.49e-3], [4, 2.94e-3]],
                 "bf16": [[1, 6.0e-3], [4, 5.3e-3]]},
    "thread_curve": [[1, 17e-3], [8, 2.4e-3], [12, 1.6e-3], [16, 1.56e-3]],
    "sources": {"expert_s": HOST_CPU_SOURCE + ": int8 weight-only (_weight_int8pack_mm), int4 "
                "(_weight_int4pack_mm_for_cpu), bf16 matmul; 16 threads; batch 1 and 4",
                "thread_curve": HOST_CPU_SOURCE + ": int8, batch 1, 1 / 8 / 12 / 16 threads",
                "hop": "the hidden state (4096 bf16 per token) each way, priced by the PCIe copy curve"},
}

# the trace metadata key (``TraceMeta.extra``) naming the packed expert format a recorded engine run copied
# (one of moesim.engine.quant.QUANTS: hqq2, hqq2-v02, bf16, ...); the timing model prices that format
TRACE_EXPERT_FORMAT_KEY = "expert_format"


ENGINE_MODES = ("replay", "gate")
ENGINE_PROFILES = ("moesim", "mixtral-offloading")


@dataclass
class CostModel:
    name: str
    latency_s: float
    bandwidth_Bps: float
    copy_engines: int = 1
    curve: list[tuple[float, float]] = field(default_factory=list)
    expert_bytes_by_quant: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_EXPERT_BYTES))
    quantization: str = "hqq2"
    expert_compute: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    layer: dict[str, float] = field(default_factory=dict)
    token: dict[str, float] = field(default_factory=dict)
    description: str = ""
    sources: dict[str, str] = field(default_factory=dict)
    # what-if overrides (None = use the calibrated value)
    expert_bytes_override: int | None = None
    expert_s_override: float | None = None
    layer_s_override: float | None = None
    token_s_override: float | None = None
    # engine terms (docs/timing.md, "Engine terms"): each measured by a micro-benchmark in
    # moesim/engine/gpu_bench.py, never fitted to validation cells
    miss_issue_s: float = 0.0          # per demand miss, on its copy stream before the transfer
    routing_handoff_s: float = 0.0     # per layer, on compute after the gate: only in engine_mode "gate"
    routing_handoff_eager_s: float | None = None   # the same read-back from eager kernels (profile mixtral-offloading)
    # host time to issue one expert copy (stream switch, event waits, the async copy, its ready event): on
    # the critical path only in engine_mode "gate" (the host learns the routing after the hand-off and
    # issues the copies before it launches the experts); a replay engine issues ahead, hidden
    host_copy_issue_s: float = 0.0
    # GPU time of the speculative predict piece (layer l+d's norm + router applied to layer l's output),
    # on compute after layer l's experts; only with speculative_ready "hidden" (docs/timing.md)
    predict_s: float = 0.0
    # cross-stream hops of the engine's plain replay (docs/timing.md, "Engine terms"; measured from the
    # GPU's own timestamps by studies/miss_cost/gpu_miss_cost.py): a copy starts copy_hop_s after the copy stream
    # could start it (its waits on the gate-done and slot-free events), every copy, demand or prefetch; an
    # expert whose copy lands after compute is free starts ready_hop_s after the landing
    copy_hop_s: float = 0.0
    ready_hop_s: float = 0.0
    engine_mode: str = "replay"        # "replay": routing known ahead; "gate": read back from the gate
    engine_profile: str = "moesim"     # "mixtral-offloading": its swap-on-compute engine (no overlap)
    engine_sources: dict[str, str] = field(default_factory=dict)
    # repeated expert-size copies: {"bytes", "median_s", "low_s", "high_s", "sessions": [...]}
    expert_copy: dict[str, Any] = field(default_factory=dict)
    copy_scale: float = 1.0            # what-if: every copy takes copy_scale x its calibrated time
    # the host CPU as a third resource (docs/timing.md, "Hybrid execution"): the "cpu" block
    cpu: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULT_CPU))
    cpu_threads: int | None = None     # what-if: threads the CPU experts run with (None: the block's)
    cpu_speed: float = 1.0             # what-if: CPU expert time divided by this
    lowbit_format: str | None = None   # HOBBIT's substitute (None: one step down LOWBIT_OF)

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: object = None) -> CostModel:
        try:
            pcie = raw["pcie"]
            model = cls(
                name=str(raw.get("name", Path(str(path)).stem if path else "custom")),
                latency_s=float(pcie["latency_us"]) * 1e-6,
                bandwidth_Bps=float(pcie["bandwidth_gbps"]) * 1e9,
                copy_engines=int(pcie.get("copy_engines", 1)),
                curve=sorted((float(b), float(s)) for b, s in pcie.get("curve", [])),
                expert_bytes_by_quant={**DEFAULT_EXPERT_BYTES, **{k: int(v) for k, v in raw.get("expert_bytes", {}).items()}},
                quantization=str(raw.get("quantization", "hqq2")),
                expert_compute={q: sorted((float(t), float(s)) for t, s in pts)
                                for q, pts in raw["expert_compute"].items()},
                layer={k: float(v) for k, v in raw["layer"].items()},
                token={k: float(v) for k, v in raw["token"].items()},
                description=str(raw.get("description", "")),
                sources={str(k): str(v) for k, v in raw.get("sources", {}).items()},
            )
            model.expert_copy = dict(pcie.get("expert_copy") or {})
            if model.expert_copy:
                float(model.expert_copy["low_s"]), float(model.expert_copy["high_s"]), int(model.expert_copy["bytes"])
            eng = raw.get("engine") or {}
            model.miss_issue_s = float(eng.get("miss_issue_s", 0.0))
            model.routing_handoff_s = float(eng.get("routing_handoff_s", 0.0))
            model.host_copy_issue_s = float(eng.get("host_copy_issue_s", 0.0))
            model.predict_s = float(eng.get("predict_s", 0.0))
            model.copy_hop_s = float(eng.get("copy_hop_s", 0.0))
            model.ready_hop_s = float(eng.get("ready_hop_s", 0.0))
            if eng.get("routing_handoff_eager_s") is not None:
                model.routing_handoff_eager_s = float(eng["routing_handoff_eager_s"])
            model.engine_sources = {str(k): str(v) for k, v in eng.get("sources", {}).items()}
            if raw.get("cpu") is not None:
                model.cpu = _checked_cpu(raw["cpu"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(path, f"not a valid calibration file ({type(exc).__name__}: {exc})") from None
        if model.bandwidth_Bps <= 0 or model.latency_s < 0 or model.copy_engines < 1:
            raise DataError(path, "calibration needs bandwidth_gbps > 0, latency_us >= 0, copy_engines >= 1")
        if min(model.miss_issue_s, model.routing_handoff_s, model.host_copy_issue_s, model.predict_s,
               model.copy_hop_s, model.ready_hop_s) < 0:
            raise DataError(path, "engine.miss_issue_s, routing_handoff_s, host_copy_issue_s, predict_s, copy_hop_s "
                                  "and ready_hop_s must be >= 0")
        if model.quantization not in model.expert_compute:
            raise DataError(path, f"no expert_compute table for the default quantization {model.quantization!r}")
        return model

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> CostModel:
        p = Path(path)
        raw = read_json(p)
        if not isinstance(raw, dict):
            raise DataError(p, "calibration must be a JSON object")
        return cls.from_dict(raw, p)

    @staticmethod
    def presets() -> list[str]:
        folder = resources.files("moesim") / "data" / "hardware"
        return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))

    @classmethod
    def preset(cls, name: str) -> CostModel:
        if name not in cls.presets():
            raise UsageError(f"unknown hardware preset {name!r} (known: {', '.join(cls.presets())})")
        res = resources.files("moesim") / "data" / "hardware" / f"{name}.json"
        return cls.from_dict(json.loads(res.read_text()), name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description, "sources": self.sources,
            "pcie": {"latency_us": self.latency_s * 1e6, "bandwidth_gbps": self.bandwidth_Bps / 1e9,
                     "copy_engines": self.copy_engines, "curve": [list(p) for p in self.curve],
                     **({"expert_copy": self.expert_copy} if self.expert_copy else {})},
            "expert_bytes": self.expert_bytes_by_quant, "quantization": self.quantization,
            "expert_compute": {q: [list(p) for p in pts] for q, pts in self.expert_compute.items()},
            "layer": self.layer, "token": self.token,
            "engine": {"miss_issue_s": self.miss_issue_s, "routing_handoff_s": self.routing_handoff_s,
                       "host_copy_issue_s": self.host_copy_issue_s, "predict_s": self.predict_s,
                       **({"copy_hop_s": self.copy_hop_s} if self.copy_hop_s else {}),
                       **({"ready_hop_s": self.ready_hop_s} if self.ready_hop_s else {}),
                       **({"routing_handoff_eager_s": self.routing_handoff_eager_s}
                          if self.routing_handoff_eager_s is not None else {}),
                       "sources": self.engine_sources},
            "cpu": self.cpu,
        }

    def to_json(self, path: str | os.PathLike) -> None:
        with atomic_open(path) as fh:
            json.dump(self.to_dict(), fh, indent=1)
            fh.write("\n")

    def with_overrides(self, *, pcie_gbps: float | None = None, pcie_latency_us: float | None = None,
                       expert_bytes: int | None = None, expert_ms: float | None = None,
                       layer_ms: float | None = None, token_ms: float | None = None,
                       quantization: str | None = None, copy_engines: int | None = None,
                       engine_mode: str | None = None, engine_profile: str | None = None,
                       miss_issue_us: float | None = None, routing_handoff_us: float | None = None,
                       host_copy_issue_us: float | None = None, predict_us: float | None = None,
                       copy_scale: float | None = None, copy_hop_us: float | None = None,
                       ready_hop_us: float | None = None, cpu_threads: int | None = None,
                       cpu_speed: float | None = None, lowbit_format: str | None = None) -> CostModel:
        """A copy with what-if values; an overridden bandwidth or latency drops the measured curve."""
        m = copy.deepcopy(self)
        if pcie_gbps is not None or pcie_latency_us is not None:
            m.curve = []
        if pcie_gbps is not None:
            if pcie_gbps <= 0:
                raise SettingError("pcie_gbps", f"the host-to-device bandwidth must be > 0 GB/s, got {pcie_gbps}")
            m.bandwidth_Bps = pcie_gbps * 1e9
        if pcie_latency_us is not None:
            if pcie_latency_us < 0:
                raise SettingError("pcie_latency_us", f"the per-copy latency must be >= 0 us, got {pcie_latency_us}")
            m.latency_s = pcie_latency_us * 1e-6
        if quantization is not None:
            if quantization not in m.expert_compute:
                raise UsageError(f"no expert compute table for quantization {quantization!r} in {m.name} "
                                 f"(has: {', '.join(m.expert_compute)})")
            m.quantization = quantization
        if copy_engines is not None:
            m.copy_engines = copy_engines
        if copy_scale is not None:
            if copy_scale <= 0:
                raise UsageError("copy scale must be > 0")
            m.copy_scale = copy_scale
        if engine_mode is not None:
            if engine_mode not in ENGINE_MODES:
                raise UsageError(f"unknown engine mode {engine_mode!r} (known: {', '.join(ENGINE_MODES)})")
            m.engine_mode = engine_mode
        if engine_profile is not None:
            if engine_profile not in ENGINE_PROFILES:
                raise UsageError(f"unknown engine profile {engine_profile!r} (known: {', '.join(ENGINE_PROFILES)})")
            m.engine_profile = engine_profile
        for attr, us in (("miss_issue_s", miss_issue_us), ("routing_handoff_s", routing_handoff_us),
                         ("host_copy_issue_s", host_copy_issue_us), ("predict_s", predict_us),
                         ("copy_hop_s", copy_hop_us), ("ready_hop_s", ready_hop_us)):
            if us is not None:
                if us < 0:
                    raise UsageError(f"{attr[:-2].replace('_', '-')} must be >= 0")
                setattr(m, attr, us * 1e-6)
        m._cpu_overrides(cpu_threads, cpu_speed, lowbit_format)
        if routing_handoff_us is not None:   # a what-if hand-off stands for both flavours
            m.routing_handoff_eager_s = None
        for attr, value in (("expert_bytes_override", expert_bytes), ("expert_s_override", expert_ms),
                            ("layer_s_override", layer_ms), ("token_s_override", token_ms)):
            if value is not None:
                if value < 0:
                    raise UsageError(f"{attr.split('_override')[0]} must be >= 0")
                setattr(m, attr, value if attr == "expert_bytes_override" else value * 1e-3)
        return m

    def for_trace_format(self, extra: dict[str, Any], source: object = None) -> CostModel:
        """This model pricing the expert format a trace recorded (``extra["expert_format"]``, written by
        ``moesim generate --record``): its compute table, or a one-line refusal when there is none (a
        preset calibrated for another format would misprice every expert). Traces without the key (synth,
        imports, ``moesim record``) and a what-if ``--expert-ms`` keep this model as it is."""
        fmt = extra.get(TRACE_EXPERT_FORMAT_KEY)
        if not fmt or self.expert_s_override is not None or fmt == self.quantization:
            return self
        if fmt not in self.expert_compute:
            raise SettingError("expert_ms", f"{source}: the trace's experts are {fmt!r}; {self.name} has expert "
                                            f"compute times only for {', '.join(self.expert_compute)}: calibrate "
                                            "that format, or give its expert time")
        m = copy.copy(self)
        m.quantization = str(fmt)
        return m

    # ---- the operators -------------------------------------------------------------------------
    def expert_bytes(self, trace_expert_bytes: int = 0) -> int:
        """Override > the trace's metadata > the table for the chosen quantization."""
        if self.expert_bytes_override is not None:
            return int(self.expert_bytes_override)
        if trace_expert_bytes:
            return int(trace_expert_bytes)
        return int(self.expert_bytes_by_quant[self.quantization])

    def copy_seconds(self, nbytes: float) -> float:
        if nbytes <= 0:
            return 0.0
        pts = self.curve
        if len(pts) >= 2 and pts[0][0] <= nbytes <= pts[-1][0]:
            xs = np.log([p[0] for p in pts])
            ys = np.log([p[1] for p in pts])
            return self.copy_scale * float(math.exp(np.interp(math.log(nbytes), xs, ys)))
        return self.copy_scale * (self.latency_s + nbytes / self.bandwidth_Bps)

    def copy_interval_scales(self) -> tuple[float, float]:
        """(fast, slow) factors on every copy time: the calibration's measured expert-copy interval
        (p10..p90 over every session it holds) relative to the copy time it uses for that size;
        (1, 1) when it holds no repeated measurements."""
        ec = self.expert_copy
        if not ec:
            return 1.0, 1.0
        point = self.copy_seconds(int(ec["bytes"])) / self.copy_scale
        return min(float(ec["low_s"]) / point, 1.0), max(float(ec["high_s"]) / point, 1.0)

    def expert_seconds(self, tokens: int = 1, quantization: str | None = None) -> float:
        if self.expert_s_override is not None:
            return self.expert_s_override
        pts = self.expert_compute[quantization or self.quantization]
        return float(np.interp(tokens, [p[0] for p in pts], [p[1] for p in pts]))

    def layer_seconds(self, context_len: int = 0, batch: int = 1) -> float:
        """Attention, gate, norms and residuals of one decoder layer for a step of ``batch`` tokens
        whose sequences hold ``context_len`` cached tokens on average."""
        if self.layer_s_override is not None:
            return self.layer_s_override
        lay = self.layer
        return (lay.get("base_s", 0.0) + lay.get("per_token_s", 0.0) * max(batch - 1, 0)
                + lay.get("per_context_s", 0.0) * context_len * batch)

    def token_seconds(self, batch: int = 1) -> float:
        """Per-step work outside the layers: embedding, final norm, LM head, sampling."""
        if self.token_s_override is not None:
            return self.token_s_override
        return self.token.get("base_s", 0.0) + self.token.get("per_token_s", 0.0) * max(batch - 1, 0)

    def sync_seconds(self) -> float:
        """One read-back by an eager engine (the mixtral-offloading profile's routing and index syncs):
        the eager measurement when the calibration has one, else the routing hand-off."""
        return self.routing_handoff_s if self.routing_handoff_eager_s is None else self.routing_handoff_eager_s

    def handoff_seconds(self) -> float:
        """The per-layer routing hand-off charged on compute: only a gate-driven engine pays it."""
        return self.routing_handoff_s if self.engine_mode == "gate" else 0.0

    def host_issue_seconds(self) -> float:
        """Host time per issued copy charged on the critical path: only a gate-driven engine pays it (a
        replay engine knows the routing ahead and issues while the GPU works)."""
        return self.host_copy_issue_s if self.engine_mode == "gate" and self.engine_profile == "moesim" else 0.0

    def copy_hop_seconds(self) -> float:
        """The copy stream's hop before every copy (0 for the mixtral-offloading profile: it swaps on compute)."""
        return self.copy_hop_s if self.engine_profile == "moesim" else 0.0

    def ready_hop_seconds(self) -> float:
        """Compute's hop after a copy it waited for lands (0 for the mixtral-offloading profile)."""
        return self.ready_hop_s if self.engine_profile == "moesim" else 0.0

    def _cpu_overrides(self, threads: int | None, speed: float | None, lowbit: str | None) -> None:
        if threads is not None:
            if threads < 1:
                raise SettingError("cpu_threads", f"the CPU thread count must be >= 1, got {threads}")
            self.cpu_threads = int(threads)
        if speed is not None:
            if not speed > 0:
                raise SettingError("cpu_speed", f"the CPU speed multiplier must be > 0, got {speed}")
            self.cpu_speed = float(speed)
        if lowbit is not None:
            if lowbit not in self.expert_bytes_by_quant:
                raise SettingError("lowbit_format", f"unknown low-bit format {lowbit!r} "
                                   f"(known: {', '.join(self.expert_bytes_by_quant)})")
            self.lowbit_format = lowbit

    # ---- the host CPU and the low-bit substitute (hybrid execution) ----------------------------
    def cpu_expert_seconds(self, tokens: int = 1, fmt: str | None = None, beside_copies: bool = False) -> float:
        """One expert FFN of ``tokens`` tokens on the host CPU: the block's table at its reference thread
        count (linear in tokens, extrapolated past the last point), times the thread curve's ratio
        (log-log, clamped to its ends) for the thread count, divided by the CPU speed multiplier. With
        ``beside_copies`` (host-to-device copies are running as it starts: they read the same host memory),
        times the block's measured ``beside_copies`` factor (1 when it has none)."""
        cpu = self.cpu
        pts = cpu["expert_s"][fmt or cpu["format"]]
        ts, ss = [p[0] for p in pts], [p[1] for p in pts]
        if len(pts) >= 2 and tokens > ts[-1]:
            slope = (ss[-1] - ss[-2]) / (ts[-1] - ts[-2])
            base = ss[-1] + max(slope, 0.0) * (tokens - ts[-1])
        else:
            base = float(np.interp(tokens, ts, ss))
        threads = self.cpu_threads or cpu["threads"]
        contention = float(cpu.get("beside_copies", 1.0)) if beside_copies else 1.0
        return base * self._thread_factor(threads) / self._thread_factor(cpu["threads"]) / self.cpu_speed * contention

    def cpu_after_idle_seconds(self, idle_s: float) -> float:
        """What the first CPU expert after the workers sat idle for ``idle_s`` seconds costs on top of a
        back-to-back one (their threads went to sleep: waking them and their cores takes time): the
        block's ``after_idle`` curve of [idle seconds, extra seconds], linear between its points from
        (0, 0) and flat past its last; 0 when the block has none."""
        curve = self.cpu.get("after_idle") or []
        if not curve or idle_s <= 0:
            return 0.0
        return float(np.interp(idle_s, [0.0] + [p[0] for p in curve], [0.0] + [p[1] for p in curve]))

    def copy_beside_cpu_factor(self) -> float:
        """How many times longer a host-to-device transfer takes while CPU experts run (both read host
        memory): the block's measured ``copies_beside_cpu``, 1 when it has none."""
        return float(self.cpu.get("copies_beside_cpu", 1.0))

    def _thread_factor(self, threads: int) -> float:
        curve = self.cpu.get("thread_curve") or []
        if len(curve) < 2:
            return 1.0
        xs, ys = np.log([p[0] for p in curve]), np.log([p[1] for p in curve])
        return float(math.exp(np.interp(math.log(threads), xs, ys)))

    def hop_seconds(self, tokens: int) -> float:
        """The hidden states of ``tokens`` tokens between GPU and host, one way: the block's fixed
        ``hop_s`` when it has one, else the copy curve at that size."""
        if self.cpu.get("hop_s") is not None:
            return float(self.cpu["hop_s"])
        return self.copy_seconds(int(self.cpu["hidden_bytes"]) * max(tokens, 1)) / self.copy_scale

    def lowbit(self) -> str:
        """HOBBIT's substitute format: the what-if one, else one step down :data:`LOWBIT_OF`."""
        fmt = self.lowbit_format or LOWBIT_OF.get(self.quantization)
        if fmt is None:
            raise SettingError("lowbit_format", f"no low-bit substitute below {self.quantization!r}; name one")
        return fmt

    def lowbit_bytes(self, full_bytes: int) -> int:
        """Bytes of one expert's substitute: ``full_bytes``, the full-size expert's (for a trace,
        ``timing.expert_bytes_of``), scaled by the two formats' sizes in the table."""
        table = self.expert_bytes_by_quant
        return int(round(full_bytes * table[self.lowbit()] / table[self.quantization]))

    def lowbit_expert_seconds(self, tokens: int = 1) -> float:
        """GPU time of the substitute: its own table when the model has one, else the default format's."""
        fmt = self.lowbit()
        return self.expert_seconds(tokens, fmt if fmt in self.expert_compute and self.expert_s_override is None
                                   else None)

    def summary(self) -> dict[str, Any]:
        b = self.expert_bytes()
        return {"name": self.name, "pcie_gbps": round(self.bandwidth_Bps / 1e9, 2),
                "latency_us": round(self.latency_s * 1e6, 2), "copy_engines": self.copy_engines,
                "quantization": self.quantization, "expert_mb": round(b / 1e6, 2),
                "expert_copy_ms": round(self.copy_seconds(b) * 1e3, 3),
                "expert_ms": round(self.expert_seconds(1) * 1e3, 3),
                "layer_ms": round(self.layer_seconds(0, 1) * 1e3, 3), "token_ms": round(self.token_seconds(1) * 1e3, 3),
                "miss_issue_us": round(self.miss_issue_s * 1e6, 3),
                "routing_handoff_us": round(self.routing_handoff_s * 1e6, 3),
                "host_copy_issue_us": round(self.host_copy_issue_s * 1e6, 3), "predict_us": round(self.predict_s * 1e6, 3),
                "copy_hop_us": round(self.copy_hop_s * 1e6, 3), "ready_hop_us": round(self.ready_hop_s * 1e6, 3),
                "engine_mode": self.engine_mode,
                "engine_profile": self.engine_profile,
                "cpu_expert_ms": round(self.cpu_expert_seconds(1) * 1e3, 3),
                "cpu_threads": self.cpu_threads or self.cpu["threads"], "cpu_format": self.cpu["format"]}


def _checked_cpu(raw: Any) -> dict[str, Any]:
    """A calibration's ``cpu`` block, checked (KeyError / TypeError / ValueError name what is wrong)."""
    cpu = {**copy.deepcopy(DEFAULT_CPU), **dict(raw)}
    cpu["threads"], cpu["hidden_bytes"] = int(cpu["threads"]), int(cpu["hidden_bytes"])
    cpu["expert_s"] = {str(f): sorted([float(t), float(s)] for t, s in pts) for f, pts in cpu["expert_s"].items()}
    cpu["thread_curve"] = sorted([float(n), float(s)] for n, s in cpu.get("thread_curve") or [])
    if cpu["format"] not in cpu["expert_s"]:
        raise ValueError(f"cpu.format {cpu['format']!r} has no cpu.expert_s table")
    if cpu["threads"] < 1 or any(s <= 0 for pts in cpu["expert_s"].values() for _, s in pts):
        raise ValueError("cpu.threads must be >= 1 and every cpu.expert_s time > 0")
    for key in ("beside_copies", "copies_beside_cpu"):
        cpu[key] = float(cpu.get(key, 1.0))
        if not cpu[key] > 0:
            raise ValueError(f"cpu.{key} must be > 0, got {cpu[key]}")
    cpu["after_idle"] = sorted([float(g), float(s)] for g, s in cpu.get("after_idle") or [])
    if any(not (g > 0 and s >= 0) for g, s in cpu["after_idle"]):
        raise ValueError("cpu.after_idle must be [idle seconds > 0, extra seconds >= 0] points")
    return cpu
