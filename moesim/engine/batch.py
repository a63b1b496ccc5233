"""Batch > 1 decode and chunked prefill in the replay engine, over real context lengths.

The steps come from :func:`moesim.traces.steps.build_steps` -- the definition the timing simulator
uses: a decode step is token j of each of B sequences, a prefill step a chunk of one sequence's prompt.
Per layer the step requests the UNION of its tokens' experts through :meth:`CachePlan.request_union`
(chunks of K when the union is larger than the cache, as the simulator does), copies the misses and
runs each expert once on the step's tokens.

Static shapes (CUDA graphs). A :class:`BatchProgram` serves one step shape: ``rows`` tokens (B for
decode, the chunk for prefill) and a phase. Its pieces:

- ``layer[l][bucket]``: combine layer l-1's expert outputs into the residual stream (layer 0: the step
  counter and the token embeddings instead), then attention + gate over the first ``bucket`` cache
  positions. **Real context**: ``bucket`` is the smallest power of two (>= 64) holding the step's
  largest position + 1, so attention reads ``bucket`` cached keys, not the whole static cache. The
  simulator's matching term is ``layer.per_context_s`` (linear in the step's mean context); the
  batch calibration fits it over the buckets (``moesim.engine.calibration.batch_cost``).
- ``expert[l][s][n]``: the expert in GPU slot s of layer l on the rows routed to it, gathered into
  ``n`` rows (``n`` = the smallest power of two, or ``rows``, >= the routed count; padding rows carry
  weight 0) and added back into the layer's output with their routing weights from a per-step device
  table indexed by expert. The piece learns *which* expert it holds from the identity word that lands
  last in the slot's copy, so one piece per (layer, slot, n) serves every step: 32 x K x log2(rows)
  graphs, not one per expert and rank. Its cost is the expert curve at ``n`` tokens, the simulator's
  at the routed count (``CostModel.expert_seconds(count)``); on the H200 the curve is flat to 64.
- The layer's q/k/v/o dequantisation is one compiled function (its shapes never change); the
  step-shaped rest (projections, SDPA, KV writes) runs as eager kernels inside the captured graph.
- ``final``: combine the last layer, LM head; the residency check for the step.

**Residency proof.** The oracle is the trace, not the plan: a device table holds, per step and layer,
which experts the step's tokens are routed to. Every expert piece counts the identity it found in its
slot (``seen[layer, expert]``; a slot without a valid identity is a violation); ``final`` adds every
(layer, expert) whose count is not exactly 1 for a routed expert (0 otherwise) to ``violations``. A
dropped copy, a compute that did not wait for its copy (it sees the old identity), a duplicated or a
missing expert therefore all count. Copies are counted on the copy stream as in the batch-1 engine.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np

from moesim.engine import kernels
from moesim.engine.identity import TAG_BASE, ResidencyProof, slot_tags
from moesim.engine.plan import CachePlan, Routing
from moesim.engine.runtime import EngineResult, Weights, capture_graphs, compiled, expert_forward, issue_copy
from moesim.engine.sync import COMPUTE, DEFAULT_SYNC, SlotEvents, StreamOrder, SyncMode
from moesim.policies.base import NEVER
from moesim.traces.format import PREFILL
from moesim.traces.steps import Step, next_uses

MIN_BUCKET = 64


def context_bucket(max_position: int, max_context: int) -> int:
    """Cache positions a step's attention reads: the smallest power of two >= ``max_position`` + 1
    (at least 64, at most ``max_context``)."""
    b = MIN_BUCKET
    while b < max_position + 1 and b < max_context:
        b *= 2
    return min(b, max_context)


def batch_attention(x, wq, wk, wv, wo, wg, k_cache, v_cache, lanes, pos, positions, bucket: int, prefill: bool,
                    g, aq, dequant=None):
    """Attention + gate for a step of ``rows`` tokens (x: rows x hidden). Each row writes its K/V at
    (lane, position) of its sequence's cache, then attends over the first ``bucket`` positions of that
    cache up to its own position (causal within a prefill chunk: the chunk's keys are in the cache).
    Decode rows are their lanes (row i = lane i); a prefill step is one lane."""
    import torch

    F = torch.nn.functional
    n = x.shape[0]
    group = g.n_heads // g.n_kv_heads
    kv = g.n_kv_heads * g.head_dim
    if kernels.fused_for(x, aq, g.hidden, g.hidden) and kernels.fused_for(x, aq, kv, g.hidden):
        # straight from the packed blobs (each read once per step, whatever the step's rows)
        q, k, v = (kernels.packed_linear(x, w, aq, rows, g.hidden) for w, rows in ((wq, g.hidden), (wk, kv), (wv, kv)))
        out_proj = functools.partial(kernels.packed_linear, view=wo, spec=aq, rows=g.hidden, cols=g.hidden)
    else:
        mq, mk, mv, mo = (dequant or attention_weights)(wq, wk, wv, wo, g, aq)
        q, k, v = x @ mq.T, x @ mk.T, x @ mv.T

        def out_proj(a):
            return a @ mo.T
    k, v = k.view(n, g.n_kv_heads, g.head_dim), v.view(n, g.n_kv_heads, g.head_dim)
    k_cache[lanes, :, pos] = k
    v_cache[lanes, :, pos] = v
    visible = positions[:bucket].view(1, -1) <= pos.view(n, 1)   # (rows, bucket)
    if prefill:
        kc = k_cache[:, :, :bucket].index_select(0, lanes[:1])   # (1, kv heads, bucket, head dim)
        vc = v_cache[:, :, :bucket].index_select(0, lanes[:1])
        qh = q.view(n, g.n_kv_heads, group, g.head_dim).permute(1, 0, 2, 3).reshape(1, g.n_kv_heads, n * group,
                                                                                      g.head_dim)
        mask = visible[:, None, :].expand(n, group, bucket).reshape(1, 1, n * group, bucket)
        a = F.scaled_dot_product_attention(qh, kc, vc, attn_mask=mask)
        a = a.view(g.n_kv_heads, n, group, g.head_dim).permute(1, 0, 2, 3).reshape(n, g.hidden)
    else:
        qh = q.view(n, g.n_kv_heads, group, g.head_dim)
        a = F.scaled_dot_product_attention(qh, k_cache[:n, :, :bucket], v_cache[:n, :, :bucket],
                                           attn_mask=visible.view(n, 1, 1, bucket)).reshape(n, g.hidden)
    x = x + out_proj(a)
    return x, torch.softmax((x @ wg.T).float(), dim=-1)


def attention_weights(wq, wk, wv, wo, g, aq):
    """A layer's q/k/v/o dequantised (bf16): one fused kernel set when compiled, whatever the step's
    shape (the weights' shapes never change), so the step-shaped rest of the layer runs eagerly."""
    from moesim.engine.quant import matrix

    kv = g.n_kv_heads * g.head_dim
    return (matrix(wq, aq, g.hidden, g.hidden), matrix(wk, aq, kv, g.hidden), matrix(wv, aq, kv, g.hidden),
            matrix(wo, aq, g.hidden, g.hidden))


def combine_rows(x, yacc):
    """x + the layer's accumulated expert outputs, then the per-row RMS normalisation of the batch-1
    engine's ``combine``."""
    import torch

    x = x + yacc.to(x.dtype)
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)


def token_buckets(rows: int) -> list[int]:
    """Token counts an expert piece is captured for: powers of two below ``rows``, and ``rows``."""
    out, b = [], 1
    while b < rows:
        out.append(b)
        b *= 2
    return out + [rows]


def token_bucket(count: int, rows: int) -> int:
    """The smallest captured token count >= ``count`` routed tokens."""
    return next(b for b in token_buckets(rows) if b >= count)


class Lanes:
    """Per-sequence KV caches (one lane per sequence of a batch), shared by every batch program."""

    def __init__(self, weights: Weights, lanes: int) -> None:
        import torch

        g = weights.geometry
        self.lanes = lanes
        self.k = torch.zeros(g.num_layers, lanes, g.n_kv_heads, g.max_context, g.head_dim, dtype=torch.bfloat16,
                             device=weights.d.dev)
        self.v = torch.zeros_like(self.k)


class BatchProgram(ResidencyProof):
    """One step shape (``rows`` tokens, decode or prefill) as captured pieces over static buffers;
    shares the expert slots (``slots``) and KV lanes with the other programs of a run."""

    def __init__(self, weights: Weights, rows: int, prefill: bool, max_steps: int, lanes: Lanes,
                 slots: list | None = None, max_slots: int | None = None, *, compile_kernels: bool = False,
                 graphs: bool | None = None, check_residency: bool = True, distinct_inputs: bool = True) -> None:
        import torch

        self.w, self.torch = weights, torch
        g, d = weights.geometry, weights.d
        dev = d.dev
        if not prefill and rows > lanes.lanes:
            raise ValueError(f"a decode batch of {rows} needs {rows} KV lanes; {lanes.lanes} given")
        self.rows, self.prefill, self.max_steps, self.lanes = rows, prefill, max_steps, lanes
        self.slots = slots if slots is not None else [
            torch.zeros(max_slots or g.num_experts, weights.blob_bytes, dtype=torch.uint8, device=dev)
            for _ in range(g.num_layers)]
        self.max_slots = int(self.slots[0].shape[0])
        self.slot_tags = [slot_tags(s) for s in self.slots]
        self.check_residency, self.num_experts = check_residency, g.num_experts
        self.distinct_inputs = distinct_inputs
        L, E = g.num_layers, g.num_experts
        self.x = torch.zeros(rows, g.hidden, dtype=torch.bfloat16, device=dev)
        self.yacc = torch.zeros(L, rows, g.hidden, dtype=torch.float32, device=dev)
        self.logits = torch.zeros(rows, g.vocab, dtype=torch.bfloat16, device=dev)
        # per-step tables (filled by load), and the current step's slice of them (copied by layer 0)
        self.ids = torch.zeros(max_steps, rows, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(max_steps, rows, dtype=torch.int64, device=dev)
        self.lane = torch.zeros(max_steps, rows, dtype=torch.int64, device=dev)
        # per (step, layer, expert): the rows routed to it (gathered first, padded with row 0) and their weights
        self.gidx = torch.zeros(max_steps, L, E, rows, dtype=torch.int64, device=dev)
        self.gw = torch.zeros(max_steps, L, E, rows, dtype=torch.float32, device=dev)
        self.routed = torch.zeros(max_steps, L, E, dtype=torch.int64, device=dev)
        self.cur_pos = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.cur_lane = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.cur_gidx = torch.zeros(L, E, rows, dtype=torch.int64, device=dev)
        self.cur_gw = torch.zeros(L, E, rows, dtype=torch.float32, device=dev)
        self.cur_routed = torch.zeros(L, E, dtype=torch.int64, device=dev)
        self.seen = torch.zeros(L, E, dtype=torch.int64, device=dev)
        self.step = torch.zeros((), dtype=torch.int64, device=dev)
        self.violations = torch.zeros((), dtype=torch.int64, device=dev)
        self.device_copies = torch.zeros((), dtype=torch.int64, device=dev)
        self.embed = (weights.lm_head.float() * 50.0).to(torch.bfloat16) if distinct_inputs else None
        use = compile_kernels and d.cuda
        # the fused expert kernels are not traced by torch.compile
        self._expert = compiled(expert_forward) if use and not kernels.active(dev) else expert_forward
        self._dequant = compiled(attention_weights) if use else attention_weights
        self.token_buckets = token_buckets(rows)
        self.graphs = d.cuda if graphs is None else (graphs and d.cuda)
        self.layer: list[dict[int, Any]] = [{} for _ in range(L)]
        self.expert = [[{nb: functools.partial(self._run_expert, layer, s, nb) for nb in self.token_buckets}
                        for s in range(self.max_slots)] for layer in range(L)]
        self.final: Any = self._run_final
        self._graph_objects: list = []
        self._expert_captured = False

    # -- pieces ------------------------------------------------------------------------------------------
    def _run_layer(self, layer: int, bucket: int) -> None:
        w, g = self.w, self.w.geometry
        if layer == 0:
            self.step.add_(1).remainder_(self.max_steps)   # wraps only in calibration loops
            self.cur_pos.copy_(self.pos.index_select(0, self.step.view(1)).view(-1))
            self.cur_lane.copy_(self.lane.index_select(0, self.step.view(1)).view(-1))
            self.cur_gidx.copy_(self.gidx.index_select(0, self.step.view(1))[0])
            self.cur_gw.copy_(self.gw.index_select(0, self.step.view(1))[0])
            self.cur_routed.copy_(self.routed.index_select(0, self.step.view(1))[0])
            if self.embed is not None:
                x = self.embed.index_select(0, self.ids.index_select(0, self.step.view(1)).view(-1))
            else:
                x = w.x0.expand(self.rows, -1)
        else:
            x = combine_rows(self.x, self.yacc[layer - 1])
            self.yacc[layer - 1].zero_()
        x, _ = batch_attention(x, w.wq[layer], w.wk[layer], w.wv[layer], w.wo[layer], w.wg[layer],
                               self.lanes.k[layer], self.lanes.v[layer], self.cur_lane, self.cur_pos,
                               w.positions, bucket, self.prefill, g, w.attn_quant, self._dequant)
        self.x.copy_(x)

    def _run_expert(self, layer: int, slot: int, nb: int, spec=None, nbytes: int | None = None) -> None:
        """The expert in ``slot`` on the (at most ``nb``) rows routed to it: gathered, computed, and
        added back with their routing weights (padding rows carry weight 0). ``spec``/``nbytes``: read
        the slot's first ``nbytes`` in that format instead (a low-bit substitute; its identity is still
        the slot's last word)."""
        g = self.w.geometry
        E = g.num_experts
        rel = self.slot_tags[layer][slot:slot + 1] - (TAG_BASE + layer * E)   # which expert the slot holds
        valid = (rel >= 0) & (rel < E)
        e = rel.clamp(0, E - 1)
        idx = self.cur_gidx[layer].index_select(0, e)[0, :nb]
        wts = self.cur_gw[layer].index_select(0, e)[0, :nb] * valid
        if self.check_residency:
            self.seen[layer].index_add_(0, e, valid.long())
            self.violations.add_((~valid).sum())
        blob = self.slots[layer][slot] if nbytes is None else self.slots[layer][slot][:nbytes]
        y = self._expert(blob, self.x.index_select(0, idx), spec or self.w.quant, g.hidden, g.ffn)
        self.yacc[layer].index_add_(0, idx, y.float() * wts.view(-1, 1))

    def _run_final(self) -> None:
        L = self.w.geometry.num_layers
        x = combine_rows(self.x, self.yacc[L - 1])
        self.yacc[L - 1].zero_()
        self.logits.copy_(x @ self.w.lm_head.T)
        if self.check_residency:   # the trace's routed experts, each computed exactly once
            self.violations.add_(self.seen.ne(self.cur_routed).sum())
            self.seen.zero_()

    def _expert_tables(self) -> list[list[list[dict[int, Any]]]]:
        """The expert piece tables to capture (``expert[l][s][n]``; a hybrid program adds its substitutes')."""
        return [self.expert]

    # -- tables and capture -------------------------------------------------------------------------------
    def load(self, steps: list[Step], routing: Routing) -> list[int]:
        """The steps' positions, lanes, token ids, weight and routed tables onto the device (untimed).
        Returns each step's context bucket."""
        torch, g = self.torch, self.w.geometry
        if len(steps) > self.max_steps:
            raise ValueError(f"{len(steps)} steps; this program was built for {self.max_steps}")
        L, E, n = g.num_layers, g.num_experts, self.rows
        index = {(int(s), int(p)): t for t, (s, p) in enumerate(zip(routing.seq, routing.position, strict=True))}
        S = self.max_steps
        pos = np.full((S, n), g.max_context - 1, np.int64)   # padding rows: a position no step reads
        lane = np.zeros((S, n), np.int64)
        ids = np.zeros((S, n), np.int64)
        gidx = np.zeros((S, L, E, n), np.int64)
        gw = np.zeros((S, L, E, n), np.float32)
        fill = np.zeros((S, L, E), np.int64)
        routed = np.zeros((S, L, E), np.int64)
        buckets = []
        for i, st in enumerate(steps):
            if (st.phase == PREFILL) != self.prefill or st.tokens > n:
                raise ValueError(f"step {i} ({st.tokens} tokens, phase {st.phase}) does not fit this program "
                                 f"({n} rows, {'prefill' if self.prefill else 'decode'})")
            for j, ((s, p), ln) in enumerate(zip(st.parts, st.lanes, strict=True)):
                r = j if self.prefill else ln   # decode: row = lane
                if not self.prefill and ln >= n:
                    raise ValueError(f"step {i}: lane {ln} outside a batch of {n}")
                t = index[(s, p)]
                pos[i, r] = p % g.max_context
                lane[i, r] = ln
                ids[i, r] = (s * 7919 + p) % g.vocab
                for layer in range(L):
                    if routing.row[t, layer] < 0:
                        continue
                    for e, wt in zip(routing.experts[t, layer], routing.weights[t, layer], strict=True):
                        c = fill[i, layer, e]
                        gidx[i, layer, e, c], gw[i, layer, e, c] = r, wt
                        fill[i, layer, e] += 1
                        routed[i, layer, e] = 1
            for layer, cnt in st.counts.items():   # the tables and the shared step definition agree
                if any(fill[i, layer, e] != c for e, c in cnt.items()) or fill[i, layer].sum() != sum(cnt.values()):
                    raise ValueError(f"step {i} layer {layer}: routing and step counts disagree")
            if self.prefill:
                lane[i, :] = st.lanes[0]
            buckets.append(context_bucket(int(max(p for _, p in st.parts) % g.max_context), g.max_context))
        # the host's copy of the gather tables: a CPU expert (moesim.engine.hybrid_batch) takes its rows here
        self.gather_host = (gidx, gw, fill)
        for dst, src in ((self.pos, pos), (self.lane, lane), (self.ids, ids), (self.gidx, gidx), (self.gw, gw),
                         (self.routed, routed)):
            dst.copy_(torch.from_numpy(src))
        self.step.fill_(-1)
        return buckets

    def prepare(self, buckets) -> None:
        """Pieces for these context buckets (captured as CUDA graphs on a GPU; eager on CPU)."""
        g = self.w.geometry
        new = sorted({int(b) for b in buckets} - set(self.layer[0]))
        pieces: list[tuple[Any, Any]] = []
        for b in new:
            for layer in range(g.num_layers):
                fn = functools.partial(self._run_layer, layer, b)
                self.layer[layer][b] = fn
                pieces.append((fn, lambda gr, layer=layer, b=b: self.layer[layer].__setitem__(b, gr)))
        if not self.graphs:
            return
        if not self._expert_captured:
            for table in self._expert_tables():
                for layer in range(g.num_layers):
                    for s in range(self.max_slots):
                        for nb in self.token_buckets:
                            pieces.append((table[layer][s][nb],
                                           lambda gr, t=table[layer][s], nb=nb: t.__setitem__(nb, gr)))
            pieces.append((self.final, lambda gr: setattr(self, "final", gr)))
            self._expert_captured = True
        if pieces:
            step0 = int(self.step.item())

            def reset() -> None:
                self.step.fill_(step0)
                self.yacc.zero_()
                self.seen.zero_()
            self._graph_objects += capture_graphs(self.torch, self.w.d.dev, pieces, after_warmup=reset)
            reset()


class BatchEngine:
    """One configuration (policy, K slots per layer; no prefetcher) replaying batch or prefill steps."""

    def __init__(self, program: BatchProgram, cache_size: int, policy: str = "lru",
                 policy_params: dict[str, Any] | None = None, *, sync: SyncMode = DEFAULT_SYNC) -> None:
        """``sync``: how the two streams are ordered (moesim.engine.sync; studies/engine_sync/gpu_engine_sync.py)."""
        self.sync = sync
        if cache_size > program.max_slots:
            raise ValueError(f"cache size {cache_size} exceeds the program's {program.max_slots} slots")
        self.program, self.w = program, program.w
        self.cache_size, self.policy_name, self.policy_params = cache_size, policy, policy_params
        g = self.w.geometry
        self.marks = SlotEvents(g.num_layers, cache_size)
        self.order = StreamOrder(self.w.d, sync)

    def _copy(self, layer: int, slot: int, expert: int, after, log: list | None = None, step: int = -1) -> None:
        issue_copy(self.w, self.program, self.order, self.marks, layer, slot, expert, after, log, (step, layer, "miss"))

    # -- hooks (the hybrid batch engine, moesim.engine.hybrid_batch, serves misses by other executors) ------
    def _plan(self, routing: Routing, steps: list[Step]) -> CachePlan:
        """The residency plan of one run."""
        return CachePlan(routing, self.cache_size, self.policy_name, "none", self.policy_params)

    def _merge(self, layer: int) -> None:
        """Before ``layer``'s combine (the next layer piece or ``final``): nothing to add here."""

    def _executed(self) -> dict[str, Any] | None:
        """Counts by executor after a run (None for the copy-only engine)."""
        return None

    def _serve(self, plan: CachePlan, i: int, st: Step, layer: int, gate_done, log: list | None,
               nxt: dict[int, int] | None) -> None:
        """Step ``i``'s union at ``layer`` after its gate: through the cache in chunks, each chunk's copies,
        then its experts (resident ones first, then the misses as they land; router order within each)."""
        S = st.layers.get(layer)
        if S:
            self._gpu_experts(plan, i, st, layer, S, gate_done, log, nxt)

    def _gpu_experts(self, plan: CachePlan, i: int, st: Step, layer: int, S: list[int], gate_done,
                     log: list | None, nxt: dict[int, int] | None, on_copy=None) -> None:
        """``S`` through the layer's cache and onto the GPU pieces. ``on_copy(slot, expert)`` issues a
        miss's copy (default: the full blob) and ``self._piece(layer, slot, expert)`` picks the piece table."""
        d, prog, order = self.w.d, self.program, self.order
        for chunk, copies, slots in plan.request_union(layer, S, i, st.weights[layer], nxt):
            for slot, e in copies:
                if on_copy is None:
                    self._copy(layer, slot, e, gate_done, log, i)
                else:
                    on_copy(slot, e)
            missed = {e for _, e in copies}
            for j in sorted(range(len(chunk)), key=lambda j: chunk[j] in missed):
                slot = slots[j]
                if log is not None:
                    s0 = d.event()
                    s0.record()
                order.wait(COMPUTE, self.marks.ready[layer][slot])
                if log is not None:
                    s1 = d.event()
                    s1.record()
                self._piece(layer, slot, chunk[j])[token_bucket(st.counts[layer][chunk[j]], prog.rows)]()
                self.marks.free[layer][slot] = order.record(COMPUTE)
                if log is not None:
                    e1 = d.event()
                    e1.record()
                    log.append((i, layer, "stall", chunk[j], s0, s1))
                    log.append((i, layer, "expert", chunk[j], s1, e1))

    def _piece(self, layer: int, slot: int, expert: int) -> dict[int, Any]:
        """The expert pieces (by token bucket) that compute ``slot``'s expert."""
        return self.program.expert[layer][slot]

    def run(self, steps: list[Step], routing: Routing, warm: bool = False, progress: bool = False,
            keep_logits: bool = False, instrument: bool = False) -> EngineResult:
        """Replay ``steps`` (all of one phase, at most ``rows`` tokens each); caches start cold unless
        ``warm``. The CPU waits for each step's logits before the next (the next input depends on them).
        ``instrument``: CUDA events around every layer piece, copy and expert (``EngineResult.events``)."""
        torch, w, d, prog = self.program.torch, self.w, self.w.d, self.program
        g = w.geometry
        plan = self._plan(routing, steps)
        future = plan.caches[0].policy.needs_future
        nxt = next_uses(steps, g.num_layers, NEVER) if future else {}
        buckets = prog.load(steps, routing)
        prog.prepare(buckets)
        self.order = order = StreamOrder(d, self.sync)
        self.marks.reset()
        for layer in range(g.num_layers):
            if warm:
                for e in range(min(self.cache_size, g.num_experts)):
                    self._copy(layer, plan._admit(layer, e, -1, ()), e, None)
        d.synchronize()
        prog.reset_proof()
        prog.step.fill_(-1)
        logits = []
        step_events, step_ms = [], []
        log: list | None = [] if instrument else None
        it = range(len(steps))
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc=f"{self.policy_name} K={self.cache_size} rows={prog.rows}", unit="step", leave=False)
        t0 = time.perf_counter()
        with torch.inference_mode():
            done = None
            for i in it:
                st = steps[i]
                if done is not None:
                    done.synchronize()
                    order.new_step()
                ev = d.event()
                ev.record()
                step_events.append(ev)
                for layer in range(g.num_layers):
                    if log is not None:
                        a0 = d.event()
                        a0.record()
                    if layer > 0:
                        self._merge(layer - 1)
                    prog.layer[layer][buckets[i]]()
                    gate_done = order.gate()
                    if log is not None:
                        g1 = d.event()
                        g1.record()
                        log.append((i, layer, "attention+gate", -1, a0, g1))
                    self._serve(plan, i, st, layer, gate_done, log, nxt.get((i, layer)))
                self._merge(g.num_layers - 1)
                prog.final()
                if keep_logits:
                    logits.append(prog.logits.float().cpu().numpy().copy())
                done = d.event(timing=False)
                done.record()
            end = d.event()
            end.record()
            step_events.append(end)
            d.synchronize()
        wall = time.perf_counter() - t0
        step_ms = [a.elapsed_time(b) for a, b in zip(step_events[:-1], step_events[1:], strict=True)]
        violations, device_copies = prog.proof()
        tokens = sum(s.tokens for s in steps)
        events = [{"step": t, "layer": layer, "kind": kind, "expert": e, "start_ms": step_events[0].elapsed_time(a),
                   "end_ms": step_events[0].elapsed_time(b)} for t, layer, kind, e, a, b in (log or [])]
        res = EngineResult(self.policy_name, self.cache_size, "none", w.quant.name, g.num_layers, tokens, wall,
                           plan.requests, plan.hits, plan.prefetches, w.expert_bytes, step_ms,
                           plan.layer_hits.tolist(), plan.layer_requests.tolist(), events, [], [], violations,
                           device_copies, 1 if prog.prefill else max((len(s.lanes) for s in steps), default=1),
                           "prefill" if prog.prefill else "decode", len(steps))
        res.logits = logits
        res.buckets = buckets
        res.hybrid = self._executed()
        return res
