"""The offloaded MoE runtime: experts in pinned host memory, K GPU slots per layer, policy-driven.

One decode step per token (batch 1), Mixtral geometry by default. Per layer: attention (bf16 q/k/v/o
projections + SDPA over a KV cache), the gate (computed for its cost; the routing itself is *forced*
from a trace), then the top-k experts (dequantise + SwiGLU FFN), summed with the trace's weights.

Residency is decided by :class:`~moesim.engine.plan.CachePlan` -- :class:`ExpertCache` plus a policy
object from ``moesim.policies``, the same mechanism and classes the simulator runs. The plan only says
*which* expert goes into *which* slot; this module turns that into real copies:

- misses and prefetches are copied host->device with ``non_blocking`` copies on a dedicated copy
  stream; the compute stream waits on the slot's "ready" event before using it, and the copy stream
  waits on the slot's "free" event (last compute that read the old contents) before overwriting it;
- the CPU never waits for the GPU inside the loop (routing comes from the trace), so copies for later
  layers overlap compute of earlier ones.

On CPU the same code runs with no streams; events fall back to ``time.perf_counter``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moesim.engine.plan import CachePlan, Routing
from moesim.engine.quant import QuantSpec, dequantize, fill_random_blob, split_blob
from moesim.simulator.replay import HitCounts


@dataclass(frozen=True)
class Geometry:
    hidden: int = 4096
    ffn: int = 14336
    num_layers: int = 32
    num_experts: int = 8
    top_k: int = 2
    n_heads: int = 32
    n_kv_heads: int = 8
    max_context: int = 4096
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @classmethod
    def tiny(cls, num_layers: int = 4) -> Geometry:
        return cls(hidden=64, ffn=256, num_layers=num_layers, num_experts=8, top_k=2, n_heads=4,
                   n_kv_heads=2, max_context=1024, vocab=128)


MIXTRAL_8X7B = Geometry()


class _CpuEvent:
    """Stand-in for torch.cuda.Event on CPU: a perf_counter stamp."""

    __slots__ = ("t",)

    def __init__(self) -> None:
        self.t = 0.0

    def record(self, stream: Any = None) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: _CpuEvent) -> float:
        return (end.t - self.t) * 1e3


class Device:
    """Streams and events for CUDA, or no-op stand-ins on CPU."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.dev = torch.device(device)
        self.cuda = self.dev.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.dev) if self.cuda else None

    def event(self):
        return self.torch.cuda.Event(enable_timing=True) if self.cuda else _CpuEvent()

    def copy_context(self):
        return self.torch.cuda.stream(self.copy_stream) if self.cuda else contextlib.nullcontext()

    def wait(self, event, stream=None) -> None:
        if self.cuda:
            (stream or self.torch.cuda.current_stream(self.dev)).wait_event(event)

    def synchronize(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.dev)


class Weights:
    """Everything but the GPU expert slots: pinned host experts, GPU attention/gate weights, KV cache.

    Built once and shared by every engine configuration (cell) of a run.
    """

    def __init__(self, geometry: Geometry, quant: QuantSpec, device: str = "cpu", seed: int = 0,
                 pin: bool = True, progress: bool = False) -> None:
        import torch

        self.geometry, self.quant, self.d = geometry, quant, Device(device)
        g, dev = geometry, self.d.dev
        self.n_weights = g.hidden * g.ffn
        self.expert_bytes = quant.expert_bytes(g.hidden, g.ffn)
        gen = torch.Generator(device=dev).manual_seed(seed)
        pin = pin and self.d.cuda
        staging = torch.empty(self.expert_bytes, dtype=torch.uint8, device=dev)
        self.host: list[list[Any]] = []
        it = range(g.num_layers)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc="pinning experts", unit="layer")
        for _ in it:
            row = []
            for _ in range(g.num_experts):
                fill_random_blob(staging, quant, self.n_weights, gen)   # random on the device, then down
                blob = torch.empty(self.expert_bytes, dtype=torch.uint8, pin_memory=pin)
                blob.copy_(staging)
                row.append(blob)
            self.host.append(row)
        del staging
        kv = g.n_kv_heads * g.head_dim

        def rand(*shape):
            return torch.randn(*shape, dtype=torch.bfloat16, device=dev, generator=gen) * 0.02

        self.wq = [rand(g.hidden, g.hidden) for _ in range(g.num_layers)]
        self.wk = [rand(kv, g.hidden) for _ in range(g.num_layers)]
        self.wv = [rand(kv, g.hidden) for _ in range(g.num_layers)]
        self.wo = [rand(g.hidden, g.hidden) for _ in range(g.num_layers)]
        self.wg = [rand(g.num_experts, g.hidden) for _ in range(g.num_layers)]
        self.k_cache = torch.zeros(g.num_layers, 1, g.n_kv_heads, g.max_context, g.head_dim,
                                   dtype=torch.bfloat16, device=dev)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.lm_head = rand(g.vocab, g.hidden)
        self.x0 = rand(1, g.hidden) * 50.0
        self.positions = torch.arange(g.max_context, device=dev)


@dataclass
class EngineResult(HitCounts):
    policy: str
    cache_size: int
    prefetch: str
    quantization: str
    layers: int
    tokens: int
    wall_s: float
    requests: int
    hits: int
    prefetches: int
    expert_bytes: int
    token_ms: list[float] = field(default_factory=list)
    layer_hits: list[int] = field(default_factory=list)
    layer_requests: list[int] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    token_cpu_ms: list[float] = field(default_factory=list)   # CPU issue time per token

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def bytes_h2d(self) -> int:
        return (self.misses + self.prefetches) * self.expert_bytes

    def to_dict(self, events: bool = False) -> dict[str, Any]:
        out = {
            "policy": self.policy, "cache_size": self.cache_size, "prefetch": self.prefetch,
            "quantization": self.quantization, "layers": self.layers, "tokens": self.tokens,
            "wall_s": self.wall_s, "tokens_per_s": self.tokens_per_s, "ms_per_token": 1e3 / self.tokens_per_s
            if self.tokens_per_s else None, "requests": self.requests, "hits": self.hits, "misses": self.misses,
            "hit_rate": self.hit_rate, "prefetches": self.prefetches, "bytes_h2d": self.bytes_h2d,
            "expert_bytes": self.expert_bytes, "token_ms": self.token_ms, "layer_hits": self.layer_hits,
            "layer_requests": self.layer_requests, "token_cpu_ms": self.token_cpu_ms,
        }
        if events:
            out["events"] = self.events
        return out


def attention_forward(x, wq, wk, wv, wo, wg, k_cache, v_cache, pos, positions, g: Geometry):
    """One decode token through a layer's attention (GQA, bf16 projections, SDPA over the whole KV
    cache with a position mask, so shapes never change) and its gate. Returns (x, gate probs)."""
    import torch

    F = torch.nn.functional
    group = g.n_heads // g.n_kv_heads
    q = (x @ wq.T).view(1, g.n_kv_heads, group, g.head_dim)   # a KV head's query group as "query length"
    k = (x @ wk.T).view(1, g.n_kv_heads, 1, g.head_dim)
    v = (x @ wv.T).view(1, g.n_kv_heads, 1, g.head_dim)
    idx = pos.view(1)
    k_cache.index_copy_(2, idx, k)
    v_cache.index_copy_(2, idx, v)
    mask = (positions <= pos).view(1, 1, 1, -1)
    a = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
    x = x + a.reshape(1, g.hidden) @ wo.T
    return x, torch.softmax((x @ wg.T).float(), dim=-1)


def expert_forward(blob, x, spec: QuantSpec, hidden: int, ffn: int):
    """Dequantise an expert blob and run its SwiGLU FFN on ``x`` (tokens, hidden)."""
    import torch

    n = hidden * ffn
    p1, p3, p2 = split_blob(blob, spec, n)
    w1 = dequantize(p1, spec, n).view(ffn, hidden)
    w3 = dequantize(p3, spec, n).view(ffn, hidden)
    h = torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)
    return h @ dequantize(p2, spec, n).view(hidden, ffn).T


_COMPILED: tuple | None = None


def compiled_forwards() -> tuple:
    """torch.compile'd attention and expert (one fused dequant kernel per matrix, few launches)."""
    global _COMPILED
    if _COMPILED is None:
        import torch
        import torch._dynamo.config as dcfg

        for knob in ("cache_size_limit", "recompile_limit"):   # one graph per (quantization, batch)
            if hasattr(dcfg, knob):
                setattr(dcfg, knob, 64)
        _COMPILED = (torch.compile(attention_forward, dynamic=False), torch.compile(expert_forward, dynamic=False))
    return _COMPILED


class OffloadedEngine:
    """One configuration (policy, K slots per layer, prefetcher) over shared :class:`Weights`."""

    def __init__(self, weights: Weights, cache_size: int, policy: str = "lru", prefetch: str = "none",
                 policy_params: dict[str, Any] | None = None, compile_dequant: bool = False) -> None:
        import torch

        self.w, self.torch = weights, torch
        g, d = weights.geometry, weights.d
        self.cache_size, self.policy_name, self.prefetch_name = cache_size, policy, prefetch
        self.policy_params = policy_params
        self.slots = [torch.empty(cache_size, weights.expert_bytes, dtype=torch.uint8, device=d.dev)
                      for _ in range(g.num_layers)]
        self.ready = [[d.event() for _ in range(cache_size)] for _ in range(g.num_layers)]
        self.free = [[None] * cache_size for _ in range(g.num_layers)]
        self._attn, self._expert = attention_forward, expert_forward
        if compile_dequant and d.cuda:
            self._attn, self._expert = compiled_forwards()

    # -- compute pieces (also used by calibration) --------------------------------------------------

    def attention(self, layer: int, x, pos: int):
        """Attention + gate of one layer (static shapes: one compiled graph serves every position)."""
        w = self.w
        return self._attn(x, w.wq[layer], w.wk[layer], w.wv[layer], w.wo[layer], w.wg[layer],
                          w.k_cache[layer], w.v_cache[layer], w.positions[pos], w.positions, w.geometry)

    def expert(self, blob, x):
        w = self.w
        return self._expert(blob, x, w.quant, w.geometry.hidden, w.geometry.ffn)

    def lm_head(self, x):
        return x @ self.w.lm_head.T

    # -- the decode loop -----------------------------------------------------------------------------

    def _copy(self, layer: int, slot: int, expert: int, log: list | None, token: int, kind: str,
              after=None) -> None:
        d = self.w.d
        with d.copy_context():
            if after is not None:
                d.wait(after, d.copy_stream)
            if self.free[layer][slot] is not None:
                d.wait(self.free[layer][slot], d.copy_stream)
            if log is not None:
                start = d.event()
                start.record(d.copy_stream)
            self.slots[layer][slot].copy_(self.w.host[layer][expert], non_blocking=True)
            self.ready[layer][slot].record(d.copy_stream)
            if log is not None:
                end = d.event()
                end.record(d.copy_stream)
                log.append((token, layer, kind, expert, start, end))

    def run(self, routing: Routing, instrument: bool = False, progress: bool = False,
            warm: bool = False) -> EngineResult:
        """Replay ``routing``; caches start cold unless ``warm`` (pre-load experts 0..K-1, untimed)."""
        torch, w, d = self.torch, self.w, self.w.d
        g = w.geometry
        if routing.num_layers != g.num_layers:
            raise ValueError(f"routing has {routing.num_layers} layers, the model {g.num_layers}")
        plan = CachePlan(routing, self.cache_size, self.policy_name, self.prefetch_name, self.policy_params)
        log: list | None = [] if instrument else None
        token_events = []
        cpu_marks: list[float] = []   # when the CPU began issuing each token (is the CPU the bottleneck?)
        for s in range(g.num_layers):   # a fresh cell starts cold, with no pending slot users
            self.free[s] = [None] * self.cache_size
            if warm:
                for e in range(min(self.cache_size, g.num_experts)):
                    self._copy(s, plan._admit(s, e, -1, ()), e, None, -1, "warm")
        it = range(routing.num_tokens)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc=f"{self.policy_name} K={self.cache_size} {self.prefetch_name}", unit="tok",
                      leave=False)
        d.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            for t in it:
                x = w.x0   # the token's embedding (weights are random; values do not matter)
                pos = int(routing.position[t]) % g.max_context
                ev = d.event()
                ev.record()
                token_events.append(ev)
                cpu_marks.append(time.perf_counter())
                for layer in range(g.num_layers):
                    if log is not None:
                        a0 = d.event()
                        a0.record()
                    x, _ = self.attention(layer, x, pos)   # gate logits: routing is forced from the trace
                    gate_done = d.event()
                    gate_done.record()
                    if log is not None:
                        log.append((t, layer, "attention+gate", -1, a0, gate_done))
                    step = plan.step(t, layer)
                    if step is None:
                        continue
                    # copies may start only once this layer's gate has run (a real engine learns the
                    # routing there), even though the trace lets the CPU know it earlier
                    for slot, expert in step.copies:
                        self._copy(layer, slot, expert, log, t, "miss", gate_done)
                    for tgt_layer, slot, expert in step.prefetches:
                        self._copy(tgt_layer, slot, expert, log, t, "prefetch", gate_done)
                    out = None
                    missed = {e for _, e in step.copies}
                    order = sorted(range(len(step.experts)), key=lambda j: step.experts[j] in missed)
                    for j in order:   # resident experts first, then misses (as they land), router order
                        expert, weight, slot = step.experts[j], step.weights[j], step.slots[j]
                        if log is not None:
                            s0 = d.event()
                            s0.record()
                        d.wait(self.ready[layer][slot])
                        if log is not None:
                            s1 = d.event()
                            s1.record()
                        y = self.expert(self.slots[layer][slot], x) * weight
                        fr = d.event()
                        fr.record()
                        self.free[layer][slot] = fr
                        if log is not None:
                            log.append((t, layer, "stall", expert, s0, s1))
                            log.append((t, layer, "expert", expert, s1, fr))
                        out = y if out is None else out + y
                    x = x + out
                    x = x * torch.rsqrt(x.float().pow(2).mean() + 1e-6).to(x.dtype)   # keep values finite
                self.lm_head(x)
            end = d.event()
            end.record()
            token_events.append(end)
            cpu_marks.append(time.perf_counter())
            d.synchronize()
        wall = time.perf_counter() - t0
        token_ms = [a.elapsed_time(b) for a, b in zip(token_events[:-1], token_events[1:], strict=True)]
        events = []
        if log is not None:
            base = token_events[0]
            for t, layer, kind, expert, a, b in log:
                events.append({"token": t, "layer": layer, "kind": kind, "expert": expert,
                               "start_ms": base.elapsed_time(a), "end_ms": base.elapsed_time(b)})
        return EngineResult(self.policy_name, self.cache_size, self.prefetch_name, w.quant.name, g.num_layers,
                            routing.num_tokens, wall, plan.requests, plan.hits, plan.prefetches, w.expert_bytes,
                            token_ms, plan.layer_hits.tolist(), plan.layer_requests.tolist(), events,
                            [(b - a) * 1e3 for a, b in zip(cpu_marks[:-1], cpu_marks[1:], strict=True)])


def all_resident_token_ms(weights: Weights, routing: Routing, tokens: int = 16, compile_dequant: bool = False) -> float:
    """ms per token with every expert resident (K = E, warm): the compute-only floor."""
    g = weights.geometry
    eng = OffloadedEngine(weights, g.num_experts, "lru", "none", compile_dequant=compile_dequant)
    head = routing.head(min(tokens, routing.num_tokens))
    eng.run(head, warm=True)   # first pass warms up kernels and the allocator
    res = eng.run(head, warm=True)
    return float(np.median(res.token_ms))
