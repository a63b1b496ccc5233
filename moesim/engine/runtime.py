"""The offloaded MoE runtime: experts in pinned host memory, K GPU slots per layer, policy-driven.

One decode step per token (batch 1), Mixtral geometry by default. Per layer: attention (q/k/v/o packed
hqq 4-bit, dequantised in the layer's kernels, GQA SDPA over a KV cache), the gate (computed for its
cost; the routing itself is *forced* from a trace), then the top-k experts (dequantise + SwiGLU FFN),
summed with the trace's weights. The step is a :class:`Program` of pieces captured once as CUDA graphs.

Residency is decided by :class:`~moesim.engine.plan.CachePlan` -- :class:`ExpertCache` plus a policy
object from ``moesim.policies``, the same mechanism and classes the simulator runs. The plan only says
*which* expert goes into *which* slot; this module turns that into real copies:

- misses and prefetches are copied host->device with ``non_blocking`` copies on a dedicated copy
  stream; the compute stream waits on the slot's "ready" event before using it, and the copy stream
  waits on the slot's "free" event (last compute that read the old contents) before overwriting it;
- within a token the CPU never waits for the GPU (routing comes from the trace), so copies for later
  layers overlap compute of earlier ones; between tokens it waits for the logits, as a decoder must.

**Residency proof on the device.** Every pinned expert blob ends with an 8-byte identity
(:func:`expert_tag` of its layer and expert), written last in the blob so that it lands last in the
copy. Each expert piece compares the identity in its slot with the expert the *trace* routes to that
(token, layer, rank) -- an oracle independent of the plan -- and adds any mismatch to a device counter
(``violations``); after each copy the copy stream checks the identity that landed and bumps a device
counter (``device_copies``). A swapped slot, a dropped copy or a compute that does not wait for its copy
therefore shows up on the GPU, not in the host's bookkeeping.

On CPU the same pieces run eagerly with no streams; events fall back to ``time.perf_counter``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moesim.engine import kernels
from moesim.engine.identity import TAG_BASE, ResidencyProof, blob_bytes, slot_tags, tagged_blob
from moesim.engine.kernels import compiled
from moesim.engine.plan import CachePlan, Routing
from moesim.engine.quant import QuantSpec, fill_random_blob
from moesim.engine.sync import COMPUTE, COPY, DEFAULT_SYNC, Mark, SlotEvents, StreamOrder, SyncMode
from moesim.simulator.results import HitCounts


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
        # hidden 128 / 2 KV heads of 32: the smallest shapes whose matrices split into hqq4 groups
        return cls(hidden=128, ffn=256, num_layers=num_layers, num_experts=8, top_k=2, n_heads=4,
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

    def synchronize(self) -> None:
        """Work on CPU is done when it returns."""


class Device:
    """Streams and events for CUDA, or no-op stand-ins on CPU."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.dev = torch.device(device)
        self.cuda = self.dev.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.dev) if self.cuda else None

    def event(self, timing: bool = True):
        """A CUDA event (timing ones cost more to record), or a perf_counter stamp on CPU."""
        return self.torch.cuda.Event(enable_timing=timing) if self.cuda else _CpuEvent()

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

    Attention q/k/v/o are packed in ``attn_quant`` (hqq 4-bit by default, as mixtral-offloading runs
    Mixtral) and dequantised inside the layer's kernels; the gate and LM head stay bf16. Built once
    and shared by every engine configuration (cell) of a run.
    """

    def __init__(self, geometry: Geometry, quant: QuantSpec, device: str = "cpu", seed: int = 0,
                 pin: bool = True, progress: bool = False, attn_quant: str = "hqq4") -> None:
        import torch

        from moesim.engine.quant import fill_random_matrix, quant_spec

        self.geometry, self.quant, self.d = geometry, quant, Device(device)
        self.attn_quant = quant_spec(attn_quant)
        g, dev = geometry, self.d.dev
        self.n_weights = g.hidden * g.ffn
        self.expert_bytes = quant.expert_bytes(g.hidden, g.ffn)
        self.blob_bytes = blob_bytes(self.expert_bytes)   # what one copy moves: weights + identity
        gen = torch.Generator(device=dev).manual_seed(seed)
        pin = pin and self.d.cuda
        staging = torch.empty(self.expert_bytes, dtype=torch.uint8, device=dev)
        self.host: list[list[Any]] = []
        it = range(g.num_layers)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc="pinning experts", unit="layer")
        for layer in it:
            row = []
            for e in range(g.num_experts):
                fill_random_blob(staging, quant, self.n_weights, gen)   # random on the device, then down
                row.append(tagged_blob(staging, layer, e, g.num_experts, pin))   # + its identity
            self.host.append(row)
        del staging
        kv = g.n_kv_heads * g.head_dim
        aq = self.attn_quant

        def rand(*shape):
            return torch.randn(*shape, dtype=torch.bfloat16, device=dev, generator=gen) * 0.02

        def packed(rows: int, cols: int):
            blob = torch.empty(aq.matrix_bytes(rows * cols), dtype=torch.uint8, device=dev)
            fill_random_matrix(blob, aq, rows * cols, gen)
            return blob

        self.attn_bytes = 2 * aq.matrix_bytes(g.hidden * g.hidden) + 2 * aq.matrix_bytes(kv * g.hidden)
        self.wq = [packed(g.hidden, g.hidden) for _ in range(g.num_layers)]
        self.wk = [packed(kv, g.hidden) for _ in range(g.num_layers)]
        self.wv = [packed(kv, g.hidden) for _ in range(g.num_layers)]
        self.wo = [packed(g.hidden, g.hidden) for _ in range(g.num_layers)]
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
    token_cpu_ms: list[float] = field(default_factory=list)   # CPU time between token starts
    token_issue_ms: list[float] = field(default_factory=list)  # CPU time issuing each token's work
    # the residency proof, counted on the device (None: the program was built without the check)
    violations: int | None = None      # expert pieces whose slot did not hold the routed expert
    device_copies: int | None = None   # copies whose identity landed in the slot they were issued to
    batch: int = 1                     # sequences per decode step (moesim.engine.batch)
    phase: str = "decode"              # "decode" or "prefill" (chunks of one sequence's prompt)
    steps: int | None = None           # forward passes (None: one per token)
    # hybrid execution (moesim.engine.hybrid): "executed" by executor (the simulator's keys) and the host
    # half of the proof; None for the copy-only engine
    hybrid: dict[str, Any] | None = None

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
            "token_issue_ms": self.token_issue_ms, "violations": self.violations,
            "device_copies": self.device_copies, "plan_copies": self.misses + self.prefetches,
            "batch": self.batch, "phase": self.phase, "steps": self.steps if self.steps is not None else self.tokens,
        }
        if self.hybrid is not None:
            out.update(self.hybrid)
        if events:
            out["events"] = self.events
        return out


def attention_forward(x, wq, wk, wv, wo, wg, k_cache, v_cache, pos, positions, g: Geometry, aq: QuantSpec):
    """One decode token through a layer's attention (GQA; q/k/v/o dequantised from ``aq`` blobs; SDPA
    over the whole KV cache with a position mask, so shapes never change) and its gate.
    ``pos`` is a 1-element device tensor. Returns (x, gate probs)."""
    import torch

    packed_linear = kernels.packed_linear
    group = g.n_heads // g.n_kv_heads
    kv = g.n_kv_heads * g.head_dim
    q = packed_linear(x, wq, aq, g.hidden, g.hidden).view(1, g.n_kv_heads, group, g.head_dim)  # a KV head's
    k = packed_linear(x, wk, aq, kv, g.hidden).view(1, g.n_kv_heads, 1, g.head_dim)   # query group as "length"
    v = packed_linear(x, wv, aq, kv, g.hidden).view(1, g.n_kv_heads, 1, g.head_dim)
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    a = kernels.decode_attention(q, k_cache, v_cache, pos, positions)   # fused: only positions <= pos
    x = x + packed_linear(a.reshape(1, g.hidden), wo, aq, g.hidden, g.hidden)
    return x, torch.softmax((x @ wg.T).float(), dim=-1)


def combine(x, ybuf, wrank, tok):
    """x + sum_j w[tok, j] * y_j, then an RMS normalisation (random weights: keeps values finite).

    ``ybuf`` (k, 1, hidden) holds the layer's expert outputs by router rank; ``wrank`` (tokens, k) the
    trace's routing weights (zero where the trace has no row, so a missing row adds nothing)."""
    import torch

    w = wrank.index_select(0, tok.view(1)).view(-1, 1, 1)
    x = x + (ybuf.float() * w).sum(0).to(x.dtype)
    return x * torch.rsqrt(x.float().pow(2).mean() + 1e-6).to(x.dtype)


def first_layer_step(x0, pos_table, tok, wq, wk, wv, wo, wg, k_cache, v_cache, positions, g, aq):
    """Layer 0: the token's embedding through attention + gate."""
    pos = pos_table.index_select(0, tok.view(1))
    return attention_forward(x0, wq, wk, wv, wo, wg, k_cache, v_cache, pos, positions, g, aq)


def layer_step(x, ybuf_prev, wrank_prev, pos_table, tok, wq, wk, wv, wo, wg, k_cache, v_cache, positions, g, aq):
    """Layer l > 0: combine layer l-1's experts into the residual stream, then attention + gate."""
    x = combine(x, ybuf_prev, wrank_prev, tok)
    pos = pos_table.index_select(0, tok.view(1))
    return attention_forward(x, wq, wk, wv, wo, wg, k_cache, v_cache, pos, positions, g, aq)


def final_step(x, ybuf_last, wrank_last, tok, lm_head):
    """After the last layer: combine its experts, then the LM head."""
    return combine(x, ybuf_last, wrank_last, tok) @ lm_head.T


def expert_forward(blob, x, spec: QuantSpec, hidden: int, ffn: int):
    """An expert blob's SwiGLU FFN on ``x`` (tokens, hidden): on a GPU with Triton the fused low-bit
    kernels or dequantise-then-cuBLAS, whichever measured faster for this shape and batch
    (``kernels.expert_path``); else dequantise then matmul (``moesim.engine.kernels``)."""
    return kernels.packed_expert(blob, x, spec, hidden, ffn)


def capture_graphs(torch, dev, pieces: list[tuple[Any, Any]], progress: bool = False,
                   after_warmup=None) -> list:
    """Run every piece once on a side stream (compiles and loads kernels before capture), then capture
    each as a CUDA graph in one shared memory pool and hand its ``replay`` to the piece's installer.
    Returns the graph objects (the caller keeps them alive)."""
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.inference_mode(), torch.cuda.stream(side):
        for fn, _ in pieces:
            fn()
    torch.cuda.synchronize(dev)
    if after_warmup is not None:
        after_warmup()
    pool = torch.cuda.graph_pool_handle()
    it = pieces
    if progress:
        from tqdm import tqdm
        it = tqdm(pieces, desc="capturing CUDA graphs", unit="graph", leave=False)
    graphs = []
    with torch.inference_mode(), torch.cuda.stream(side):
        for fn, install in it:
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=pool)
            try:
                fn()
            finally:
                graph.capture_end()
            graphs.append(graph)
            install(graph.replay)
    torch.cuda.synchronize(dev)
    return graphs


def issue_copy(weights: Weights, program: Any, order: StreamOrder, slots: SlotEvents, layer: int, slot: int,
               expert: int, after: Mark | None = None, log: list | None = None, tag: tuple = (),
               parts: list[tuple[Any, Any]] | None = None) -> None:
    """Copy ``expert``'s pinned blob into GPU ``slot`` of ``layer`` on the copy stream, as every engine does:
    the copy waits for ``after`` (the gate that routed it) and the slot's ``free`` mark (the last compute
    that read its old contents), then the slot's ``ready`` mark is recorded for the compute that reads
    it (``order`` leaves out waits stream order implies). With ``log``, appends ``(*tag, expert, start,
    end)`` (events around the copy alone). ``parts``: (slot view, host tensor) copies in that order
    instead of the whole blob (a low-bit substitute, then its identity)."""
    d = weights.d
    with d.copy_context():
        order.wait(COPY, after)
        order.wait(COPY, slots.free[layer][slot])
        if log is not None:
            start = d.event()
            start.record(d.copy_stream)
        for dst, src in parts or [(program.slots[layer][slot], weights.host[layer][expert])]:
            dst.copy_(src, non_blocking=True)
        slots.ready[layer][slot] = order.record(COPY)
        if log is not None:
            end = d.event()
            end.record(d.copy_stream)
            log.append((*tag, expert, start, end))
        program.count_copy(layer, slot, expert)   # after "ready": compute never waits for it


class Program(ResidencyProof):
    """The decode step as a fixed set of launchable pieces over static buffers.

    Pieces: ``first`` (token counter + layer 0's attention and gate), ``layer[l]`` (combine layer
    l-1's experts, then layer l's attention and gate), ``expert[l][s][j]`` (the expert in GPU slot s of
    layer l, router rank j: output into ``ybuf[l, j]``) and ``final`` (combine the last layer, LM
    head). Every per-token input lives on the device (a token counter indexes the routing weights and
    positions, as a real engine's gate output would), so on a GPU each piece is captured once as a
    CUDA graph and replayed: one launch per piece instead of tens of kernel launches and
    torch.compile guard checks, which made the first engine host-bound (34.9 ms/token of CPU issue
    for 21.7 ms of GPU work). On CPU the same pieces run eagerly, in the same order.

    The program owns the expert slots (``max_slots`` per layer), so engine configurations with
    K <= max_slots share one program and one set of captured graphs.
    """

    def __init__(self, weights: Weights, max_slots: int, max_tokens: int, *, compile_kernels: bool = False,
                 graphs: bool | None = None, progress: bool = False, check_residency: bool = True) -> None:
        import torch

        self.w, self.torch = weights, torch
        g, d = weights.geometry, weights.d
        self.max_slots, self.max_tokens = max_slots, max_tokens
        k = g.top_k
        dev = d.dev
        # zeroed: a slot never written carries no valid identity
        self.slots = [torch.zeros(max_slots, weights.blob_bytes, dtype=torch.uint8, device=dev)
                      for _ in range(g.num_layers)]
        self.check_residency = check_residency
        self.num_experts = weights.geometry.num_experts
        # each slot's identity word (a view: it changes when a copy lands), the identity the trace routes
        # to each (layer, rank, token), and the two device counters of the residency proof
        self.slot_tags = [slot_tags(s) for s in self.slots]
        self.x = torch.zeros(1, g.hidden, dtype=torch.bfloat16, device=dev)
        self.probs = torch.zeros(1, g.num_experts, dtype=torch.float32, device=dev)
        self.ybuf = torch.zeros(g.num_layers, k, 1, g.hidden, dtype=torch.bfloat16, device=dev)
        self.logits = torch.zeros(1, g.vocab, dtype=torch.bfloat16, device=dev)
        # (L, tokens, k) so that one layer's table is contiguous; tokens rounded up for alignment
        self.cap = -(-max_tokens // 4) * 4
        self.wrank = torch.zeros(g.num_layers, self.cap, k, dtype=torch.float32, device=dev)
        self.pos_table = torch.zeros(self.cap, dtype=torch.int64, device=dev)
        self.tok = torch.zeros((), dtype=torch.int64, device=dev)
        self.expect = torch.zeros(g.num_layers, k, self.cap, dtype=torch.int64, device=dev)
        self.violations = torch.zeros((), dtype=torch.int64, device=dev)
        self.device_copies = torch.zeros((), dtype=torch.int64, device=dev)
        # with the fused kernels (opaque custom ops to torch.compile) an expert is two launches already;
        # compiling still fuses the layer's elementwise work around its kernels
        self.fused = kernels.active(dev)
        use = compile_kernels and d.cuda
        self._first = compiled(first_layer_step) if use else first_layer_step
        self._layer = compiled(layer_step) if use else layer_step
        self._final = compiled(final_step) if use else final_step
        self._expert = compiled(expert_forward) if use and not self.fused else expert_forward
        self.graphs = d.cuda if graphs is None else (graphs and d.cuda)
        self.first: Any = self._run_first
        self.layer: list[Any] = [None] + [lambda layer=layer: self._run_layer(layer) for layer in range(1, g.num_layers)]
        self.expert: list[list[list[Any]]] = [
            [[lambda layer=layer, s=s, j=j: self._run_expert(layer, s, j) for j in range(k)] for s in range(max_slots)]
            for layer in range(g.num_layers)]
        self.final: Any = self._run_final
        if self.graphs:
            self._capture(progress)

    # -- the pieces (eager or compiled; captured once on a GPU) ---------------------------------------
    def _attn_args(self, layer: int) -> tuple:
        w = self.w
        return (w.wq[layer], w.wk[layer], w.wv[layer], w.wo[layer], w.wg[layer], w.k_cache[layer],
                w.v_cache[layer], w.positions, w.geometry, w.attn_quant)

    def _run_first(self) -> None:
        self.tok.add_(1).remainder_(self.cap)   # wraps only in calibration loops that replay it alone
        x, p = self._first(self.w.x0, self.pos_table, self.tok, *self._attn_args(0))
        self.x.copy_(x)
        self.probs.copy_(p)

    def _run_layer(self, layer: int) -> None:
        x, p = self._layer(self.x, self.ybuf[layer - 1], self.wrank[layer - 1], self.pos_table, self.tok,
                           *self._attn_args(layer))
        self.x.copy_(x)
        self.probs.copy_(p)

    def _run_expert(self, layer: int, slot: int, rank: int) -> None:
        g = self.w.geometry
        if self.check_residency:
            # before the weights are read: the identity lands last in its copy, so the trace's expert's
            # identity here means its whole blob is in the slot (a compute that did not wait for its copy
            # still sees the old one)
            want = self.expect[layer, rank].index_select(0, self.tok.view(1))
            self.violations.add_(self.slot_tags[layer][slot:slot + 1].ne(want).sum())
        self.ybuf[layer, rank].copy_(self._expert(self.slots[layer][slot], self.x, self.w.quant, g.hidden, g.ffn))

    def _run_final(self) -> None:
        L = self.w.geometry.num_layers
        self.logits.copy_(self._final(self.x, self.ybuf[L - 1], self.wrank[L - 1], self.tok, self.w.lm_head))

    def _capture(self, progress: bool) -> None:
        """Warm every piece up (compilation, autotuning, lazy module loads), then capture each as a
        CUDA graph. All graphs share one memory pool: their temporaries are dead once a piece ends
        (outputs go to the static buffers) and pieces run one after another on one stream."""
        torch = self.torch
        g = self.w.geometry
        pieces: list[tuple[Any, Any]] = [(self.first, lambda gr: setattr(self, "first", gr))]
        for layer in range(1, g.num_layers):
            pieces.append((self.layer[layer], lambda gr, layer=layer: self.layer.__setitem__(layer, gr)))
        for layer in range(g.num_layers):
            for s in range(self.max_slots):
                for j in range(g.top_k):
                    pieces.append((self.expert[layer][s][j],
                                   lambda gr, layer=layer, s=s, j=j: self.expert[layer][s].__setitem__(j, gr)))
        pieces.append((self.final, lambda gr: setattr(self, "final", gr)))
        self._graph_objects = capture_graphs(torch, self.w.d.dev, pieces, progress,
                                             after_warmup=lambda: self.tok.fill_(-1))

    def load_routing(self, routing: Routing) -> None:
        """Routing weights (by router rank) and positions of every token onto the device (untimed)."""
        torch = self.torch
        T = routing.num_tokens
        if T > self.max_tokens:
            raise ValueError(f"routing has {T} tokens; this program was built for {self.max_tokens}")
        g = self.w.geometry
        w = np.where(routing.row[:, :, None] >= 0, routing.weights, 0.0).astype(np.float32)   # (T, L, k)
        table = np.zeros((g.num_layers, self.cap, g.top_k), np.float32)
        table[:, :T] = w.transpose(1, 0, 2)
        self.wrank.copy_(torch.from_numpy(table))
        pos = np.zeros(self.cap, np.int64)
        pos[:T] = np.asarray(routing.position, np.int64) % g.max_context
        self.pos_table.copy_(torch.from_numpy(pos))
        tags = np.zeros((g.num_layers, g.top_k, self.cap), np.int64)   # 0 = no row: never a valid identity
        e = routing.experts.transpose(1, 2, 0)   # (L, k, T)
        ids = np.arange(g.num_layers, dtype=np.int64)[:, None, None] * g.num_experts + e
        tags[:, :, :T] = np.where(e >= 0, TAG_BASE + ids, 0)
        self.expect.copy_(torch.from_numpy(tags))
        self.tok.fill_(-1)


class OffloadedEngine:
    """One configuration (policy, K slots per layer, prefetcher) over shared :class:`Weights`.

    ``program`` (shared across configurations) holds the slots and the captured pieces; without one,
    the engine builds its own with ``max_slots = cache_size``."""

    def __init__(self, weights: Weights, cache_size: int, policy: str = "lru", prefetch: str = "none",
                 policy_params: dict[str, Any] | None = None, compile_dequant: bool = False,
                 program: Program | None = None, max_tokens: int = 256, graphs: bool | None = None,
                 prefetch_params: dict[str, Any] | None = None, sync: SyncMode = DEFAULT_SYNC) -> None:
        import torch

        self.w, self.torch = weights, torch
        g, d = weights.geometry, weights.d
        if program is None:
            program = Program(weights, cache_size, max_tokens, compile_kernels=compile_dequant, graphs=graphs)
        if cache_size > program.max_slots:
            raise ValueError(f"cache size {cache_size} exceeds the program's {program.max_slots} slots")
        self.program = program
        self.cache_size, self.policy_name, self.prefetch_name = cache_size, policy, prefetch
        self.policy_params, self.prefetch_params = policy_params, prefetch_params
        self.slots = program.slots
        self.sync = sync
        self.marks = SlotEvents(g.num_layers, cache_size)
        self.order = StreamOrder(d, sync)

    # -- the decode loop -----------------------------------------------------------------------------

    def _copy(self, layer: int, slot: int, expert: int, log: list | None, token: int, kind: str,
              after=None) -> None:
        issue_copy(self.w, self.program, self.order, self.marks, layer, slot, expert, after, log, (token, layer, kind))

    def _plan(self, routing: Routing) -> CachePlan:
        """The residency plan of one run (a hook: the hybrid engine shapes its caches)."""
        return CachePlan(routing, self.cache_size, self.policy_name, self.prefetch_name, self.policy_params,
                         self.prefetch_params)

    def _merge(self, layer: int) -> None:
        """Before ``layer``'s combine (a hook: the hybrid engine adds its CPU experts' outputs here)."""

    def _executed(self) -> dict[str, Any] | None:
        """Counts by executor after a run (a hook: None for the copy-only engine)."""
        return None

    def _serve(self, plan: CachePlan, t: int, layer: int, log: list | None, gate_done) -> None:
        """(token t, layer)'s experts after its gate: the plan's copies and prefetches, then the expert
        pieces, resident ones first."""
        step = plan.step(t, layer)
        if step is None:
            return   # no row in the trace: its routing weights are 0, nothing to add
        # copies may start only once this layer's gate has run (a real engine learns the
        # routing there), even though the trace lets the CPU know it earlier
        for slot, expert in step.copies:
            self._copy(layer, slot, expert, log, t, "miss", gate_done)
        for tgt_layer, slot, expert in step.prefetches:
            self._copy(tgt_layer, slot, expert, log, t, "prefetch", gate_done)
        missed = {e for _, e in step.copies}
        order = sorted(range(len(step.experts)), key=lambda j: step.experts[j] in missed)
        for j in order:   # resident experts first, then misses (as they land), router order
            expert, slot = step.experts[j], step.slots[j]
            if log is not None:
                s0 = self.w.d.event()
                s0.record()
            self.order.wait(COMPUTE, self.marks.ready[layer][slot])
            if log is not None:
                s1 = self.w.d.event()
                s1.record()
            self.program.expert[layer][slot][j]()
            self.marks.free[layer][slot] = self.order.record(COMPUTE)
            if log is not None:
                e1 = self.w.d.event()
                e1.record()
                log.append((t, layer, "stall", expert, s0, s1))
                log.append((t, layer, "expert", expert, s1, e1))

    def run(self, routing: Routing, instrument: bool = False, progress: bool = False,
            warm: bool = False, sync_tokens: bool = True) -> EngineResult:
        """Replay ``routing``; caches start cold unless ``warm`` (pre-load experts 0..K-1, untimed).

        ``sync_tokens``: the CPU waits for token t's logits before issuing token t+1, as a real
        decoder must (the next input is sampled from them). Without it the CPU may queue many tokens
        ahead, which no real decoder can, and fills the GPU's launch queue."""
        torch, w, d, prog = self.torch, self.w, self.w.d, self.program
        g = w.geometry
        if routing.num_layers != g.num_layers:
            raise ValueError(f"routing has {routing.num_layers} layers, the model {g.num_layers}")
        plan = self._plan(routing)
        prog.load_routing(routing)
        log: list | None = [] if instrument else None
        token_events = []
        cpu_marks: list[float] = []   # when the CPU began issuing each token
        issue_ms: list[float] = []     # CPU time spent issuing each token's work (is the CPU a bottleneck?)
        self.order = streams = StreamOrder(d, self.sync)   # a fresh cell starts cold, with no pending slot users
        self.marks.reset()
        for s in range(g.num_layers):
            if warm:
                for e in range(min(self.cache_size, g.num_experts)):
                    self._copy(s, plan._admit(s, e, -1, ()), e, None, -1, "warm")
        it = range(routing.num_tokens)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc=f"{self.policy_name} K={self.cache_size} {self.prefetch_name}", unit="tok",
                      leave=False)
        d.synchronize()
        prog.reset_proof()   # warm-up copies are not the plan's
        t0 = time.perf_counter()
        with torch.inference_mode():
            done = None
            for t in it:
                if sync_tokens and done is not None:
                    done.synchronize()   # token t-1's logits are ready: the next input is known
                    streams.new_step()
                ev = d.event()
                ev.record()
                token_events.append(ev)
                cpu_marks.append(time.perf_counter())
                for layer in range(g.num_layers):
                    if log is not None:
                        a0 = d.event()
                        a0.record()
                    if layer == 0:
                        prog.first()
                    else:
                        self._merge(layer - 1)
                        prog.layer[layer]()   # gate logits: routing is forced from the trace
                    gate_done = streams.gate()
                    if log is not None:
                        g1 = d.event()
                        g1.record()
                        log.append((t, layer, "attention+gate", -1, a0, g1))
                    self._serve(plan, t, layer, log, gate_done)
                self._merge(g.num_layers - 1)
                prog.final()
                done = d.event(timing=False)
                done.record()
                issue_ms.append((time.perf_counter() - cpu_marks[-1]) * 1e3)
            end = d.event()
            end.record()
            token_events.append(end)
            cpu_marks.append(time.perf_counter())
            d.synchronize()
        wall = time.perf_counter() - t0
        violations, device_copies = prog.proof()
        hybrid = self._executed()
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
                            [(b - a) * 1e3 for a, b in zip(cpu_marks[:-1], cpu_marks[1:], strict=True)], issue_ms,
                            violations, device_copies, hybrid=hybrid)
