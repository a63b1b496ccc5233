"""The real model's decode step (batch 1) as launchable pieces over static buffers: the GPU program of
the gate-driven decoder. On a GPU every piece is captured once as a CUDA graph; on CPU they run eagerly.

Pieces, per token (``pos`` and ``input_id`` live on the device):

- ``embed``: the input token's embedding into the residual stream ``x``;
- ``attn[l]``: input RMSNorm, q/k/v (dequantised from their blobs; bias, per-head q/k RMSNorm where the
  family has them), RoPE, the KV cache write at ``pos``, GQA attention over the static cache with a
  position mask, o-projection, residual; then the post-attention RMSNorm into ``xn`` and the gate:
  router logits, softmax, top-k (weights renormalised where the family does), the shared expert where
  the family has one. The routing (ids, weights, logits) is packed into one small buffer and copied to
  pinned host memory inside the piece: the **routing hand-off** the decode loop waits for;
- ``expert[l][slot][rank]``: the expert in GPU slot ``slot`` of layer ``l`` on ``xn``, into ``ybuf[l, rank]``;
- ``combine[l]``: ``x += sum_rank w[l, rank] * ybuf[l, rank]`` (+ the shared expert): h_l, layer l's output;
- ``predict[l]``: speculative routing from h_l: layer l+d's post-attention RMSNorm and router applied to
  h_l for d = 1..D (the recorder's definition), top-k ids copied to pinned host memory;
- ``final``: final RMSNorm, LM head, logits (float32) copied to pinned host memory.

The program owns ``max_slots`` expert slots per layer, so decoders with K <= max_slots share it.
"""

from __future__ import annotations

from typing import Any

from moesim.engine.identity import TAG_BASE, ResidencyProof, blob_bytes, slot_tags
from moesim.engine.kernels import active, decode_attention, packed_expert, packed_linear
from moesim.engine.pack import PackedModel
from moesim.engine.quant import QuantSpec
from moesim.engine.runtime import Device, capture_graphs, compiled


def rms_norm(x, weight, eps: float):
    """transformers' RMSNorm: float32 statistics, cast back, times the weight."""
    import torch

    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x):
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def decoder_attention(x, pos, positions, cos_t, sin_t, k_cache, v_cache, w: dict, s, afmt: QuantSpec, window: int):
    """One token through a layer's attention; returns the new residual stream (1, hidden)."""
    hd, nkv, nh = s.head_dim, s.n_kv_heads, s.n_heads
    group = nh // nkv
    h = rms_norm(x, w["in_norm"], s.rms_eps)

    def proj(name: str, rows: int):
        y = packed_linear(h, w[name], afmt, rows, s.hidden)
        return y + w[f"{name}_bias"] if f"{name}_bias" in w else y

    q = proj("q", nh * hd).view(1, nh, hd)
    k = proj("k", nkv * hd).view(1, nkv, hd)
    v = proj("v", nkv * hd).view(1, nkv, hd)
    if "q_norm" in w:
        q = rms_norm(q, w["q_norm"], s.rms_eps)
        k = rms_norm(k, w["k_norm"], s.rms_eps)
    cos = cos_t.index_select(0, pos).view(1, 1, hd)
    sin = sin_t.index_select(0, pos).view(1, 1, hd)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k_cache.index_copy_(2, pos, k.view(1, nkv, 1, hd))
    v_cache.index_copy_(2, pos, v.view(1, nkv, 1, hd))
    # a KV head's query group as the "length" axis: GQA without repeating the cache
    a = decode_attention(q.view(1, nkv, group, hd), k_cache, v_cache, pos, positions, window)
    o = packed_linear(a.reshape(1, nh * hd), w["o"], afmt, s.hidden, nh * hd)
    return x + o


def chunk_attention(x, pos, positions, cos_t, sin_t, k_cache, v_cache, w: dict, s, afmt: QuantSpec, window: int):
    """A prefill chunk of T tokens (``x`` (T, hidden), positions ``pos`` (T,)) through a layer's attention:
    causal within the chunk and over the cache before it, as :func:`decoder_attention` is for one token."""
    import torch

    F = torch.nn.functional
    hd, nkv, nh = s.head_dim, s.n_kv_heads, s.n_heads
    group, T = nh // nkv, x.shape[0]
    h = rms_norm(x, w["in_norm"], s.rms_eps)
    dt = x.dtype

    def proj(name: str, rows: int):
        y = packed_linear(h, w[name], afmt, rows, s.hidden).to(dt)
        return y + w[f"{name}_bias"] if f"{name}_bias" in w else y

    q = proj("q", nh * hd).view(T, nh, hd)
    k = proj("k", nkv * hd).view(T, nkv, hd)
    v = proj("v", nkv * hd).view(T, nkv, hd)
    if "q_norm" in w:
        q = rms_norm(q, w["q_norm"], s.rms_eps)
        k = rms_norm(k, w["k_norm"], s.rms_eps)
    cos = cos_t.index_select(0, pos).view(T, 1, hd)
    sin = sin_t.index_select(0, pos).view(T, 1, hd)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k_cache.index_copy_(2, pos, k.transpose(0, 1).unsqueeze(0))
    v_cache.index_copy_(2, pos, v.transpose(0, 1).unsqueeze(0))
    mask = positions.view(1, -1) <= pos.view(-1, 1)                       # (T, ctx)
    if window:
        mask = mask & (positions.view(1, -1) > pos.view(-1, 1) - window)
    # each KV head's query group x the chunk's tokens as the "length" axis (GQA without repeating the cache)
    qg = q.view(T, nkv, group, hd).permute(1, 2, 0, 3).reshape(1, nkv, group * T, hd)
    a = F.scaled_dot_product_attention(qg, k_cache, v_cache, attn_mask=mask.repeat(group, 1).view(1, 1, group * T, -1))
    a = a.view(nkv, group, T, hd).permute(2, 0, 1, 3).reshape(T, nh * hd)
    return x + packed_linear(a, w["o"], afmt, s.hidden, nh * hd).to(dt)


def decoder_gate(x, w: dict, s):
    """Post-attention norm, router, top-k: (xn, ids (k,), weights (k,) float32, logits (E,) float32)."""
    import torch

    xn = rms_norm(x, w["post_norm"], s.rms_eps)
    logits = xn @ w["router"].T
    probs = torch.softmax(logits.float(), dim=-1)
    top, ids = torch.topk(probs, s.top_k, dim=-1)
    if s.norm_topk:
        top = top / top.sum(dim=-1, keepdim=True)
    if s.weights_in_dtype:
        top = top.to(x.dtype).float()
    return xn, ids.view(-1), top.view(-1), logits.float().view(-1)


def shared_expert(xn, w: dict):
    import torch

    F = torch.nn.functional
    y = (F.silu(xn @ w["shared_gate_proj"].T) * (xn @ w["shared_up_proj"].T)) @ w["shared_down_proj"].T
    return torch.sigmoid(xn @ w["shared_expert_gate"].T) * y


def decoder_expert(blob, x, spec: QuantSpec, hidden: int, ffn: int):
    """An expert blob's SwiGLU FFN on ``x`` (1, hidden), in ``x``'s dtype (``kernels.packed_expert``)."""
    return packed_expert(blob, x, spec, hidden, ffn)


class DecoderProgram(ResidencyProof):
    """Static buffers + pieces of one model (see the module docstring)."""

    def __init__(self, packed: PackedModel, device: str, max_slots: int, *, predict_distance: int = 0,
                 graphs: bool | None = None, compile_kernels: bool = False, max_context: int | None = None,
                 progress: bool = False, check_residency: bool = True) -> None:
        import torch

        self.torch, self.packed = torch, packed
        s = self.spec = packed.spec
        self.d = Device(device)
        dev, dt = self.d.dev, packed.dtype
        self.dtype = dt
        self.max_slots = max_slots
        self.ctx = min(max_context or s.max_context, s.max_context)
        self.distances = tuple(d for d in range(1, predict_distance + 1) if d < s.num_layers)
        L, k, E = s.num_layers, s.top_k, s.num_experts
        pin = self.d.cuda

        def to_dev(t):
            return t.to(dev)
        self.layer_w: list[dict[str, Any]] = []
        for layer in range(L):
            w = {name: to_dev(t) for name, t in packed.attn[layer].items()}
            w.update({name: to_dev(t) for name, t in packed.dense[layer].items()})
            self.layer_w.append(w)
        self.glob = {name: to_dev(t) for name, t in packed.globals.items()}
        inv = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, dtype=torch.float32) / s.head_dim))
        freqs = torch.arange(self.ctx, dtype=torch.float32)[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos().to(dt).to(dev), emb.sin().to(dt).to(dev)
        self.positions = torch.arange(self.ctx, device=dev)
        self.k_cache = torch.zeros(L, 1, s.n_kv_heads, self.ctx, s.head_dim, dtype=dt, device=dev)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.expert_bytes = packed.expert_bytes
        # slots hold whole blobs (weights + identity), zeroed: a slot never written has no valid identity
        self.slots = [torch.zeros(max_slots, blob_bytes(self.expert_bytes), dtype=torch.uint8, device=dev)
                      for _ in range(L)]
        self.check_residency = check_residency
        self.num_experts = s.num_experts
        self.slot_tags = [slot_tags(x) for x in self.slots]
        self.violations = torch.zeros((), dtype=torch.int64, device=dev)
        self.device_copies = torch.zeros((), dtype=torch.int64, device=dev)
        self.input_id = torch.zeros(1, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(1, dtype=torch.int64, device=dev)
        self.x = torch.zeros(1, s.hidden, dtype=dt, device=dev)
        self.xn = torch.zeros(1, s.hidden, dtype=dt, device=dev)
        self.ybuf = torch.zeros(L, k, 1, s.hidden, dtype=dt, device=dev)
        self.shared_y = torch.zeros(L, 1, s.hidden, dtype=dt, device=dev)
        self.route_w = torch.zeros(L, k, dtype=torch.float32, device=dev)
        self.hand_width = 2 * k + E   # ids, weights, router logits
        self.hand = torch.zeros(L, self.hand_width, dtype=torch.float32, device=dev)
        self.host_hand = torch.zeros(L, self.hand_width, dtype=torch.float32, pin_memory=pin)
        D = max(len(self.distances), 1)
        self.pred = torch.full((L, D, k), -1.0, dtype=torch.float32, device=dev)   # by SOURCE layer
        self.host_pred = torch.full((L, D, k), -1.0, dtype=torch.float32, pin_memory=pin)
        self.logits = torch.zeros(1, s.vocab, dtype=torch.float32, device=dev)
        self.host_logits = torch.zeros(1, s.vocab, dtype=torch.float32, pin_memory=pin)
        use = compile_kernels and self.d.cuda and not active(self.d.dev)   # fused kernels: not traced
        self._attn = compiled(decoder_attention) if use else decoder_attention
        self._gate = compiled(decoder_gate) if use else decoder_gate
        self._expert = compiled(decoder_expert) if use else decoder_expert
        self.graphs = self.d.cuda if graphs is None else (graphs and self.d.cuda)
        self.embed: Any = self._run_embed
        self.attn: list[Any] = [lambda layer=layer: self._run_attn(layer) for layer in range(L)]
        self.combine: list[Any] = [lambda layer=layer: self._run_combine(layer) for layer in range(L)]
        self.predict: list[Any] = [lambda layer=layer: self._run_predict(layer) for layer in range(L)]
        self.expert: list[list[list[Any]]] = [
            [[lambda layer=layer, s_=s_, j=j: self._run_expert(layer, s_, j) for j in range(k)]
             for s_ in range(max_slots)] for layer in range(L)]
        self.final: Any = self._run_final
        if self.graphs:
            self._capture(progress)

    # -- pieces -----------------------------------------------------------------------------------------
    def _run_embed(self) -> None:
        self.x.copy_(self.glob["embed"].index_select(0, self.input_id))

    def _run_attn(self, layer: int) -> None:
        s = self.spec
        w = self.layer_w[layer]
        x = self._attn(self.x, self.pos, self.positions, self.cos, self.sin, self.k_cache[layer], self.v_cache[layer],
                       w, s, self.packed.attn_format, s.sliding_window or 0)
        xn, ids, top, logits = self._gate(x, w, s)
        self.x.copy_(x)
        self.xn.copy_(xn)
        self.route_w[layer].copy_(top)
        if s.shared_ffn:
            self.shared_y[layer].copy_(shared_expert(xn, w))
        k = s.top_k
        self.hand[layer, :k].copy_(ids.float())
        self.hand[layer, k:2 * k].copy_(top)
        self.hand[layer, 2 * k:].copy_(logits)
        self.host_hand[layer].copy_(self.hand[layer], non_blocking=True)   # the routing hand-off

    def _run_expert(self, layer: int, slot: int, rank: int) -> None:
        s = self.spec
        if self.check_residency:
            # before the weights are read: the slot must hold the expert this layer's gate routed to this
            # rank (its id in the hand-off buffer, on the device); in replay mode the gate computes the
            # recorded routing, so a gate that strays from the trace is counted too
            want = self.hand[layer, rank:rank + 1].long() + (TAG_BASE + layer * s.num_experts)
            self.violations.add_(self.slot_tags[layer][slot:slot + 1].ne(want).sum())
        self.ybuf[layer, rank].copy_(self._expert(self.slots[layer][slot], self.xn, self.packed.expert_format,
                                                  s.hidden, s.ffn))

    def _run_combine(self, layer: int) -> None:
        w = self.route_w[layer].view(-1, 1, 1)
        y = (self.ybuf[layer].float() * w).to(self.dtype).sum(0)
        if self.spec.shared_ffn:
            y = y + self.shared_y[layer]
        self.x.add_(y)

    def _run_predict(self, layer: int) -> None:
        import torch

        s = self.spec
        for i, d in enumerate(self.distances):
            t = layer + d
            if t >= s.num_layers:
                self.pred[layer, i].fill_(-1.0)
                continue
            w = self.layer_w[t]
            logits = rms_norm(self.x, w["post_norm"], s.rms_eps) @ w["router"].T
            ids = torch.topk(torch.softmax(logits.float(), dim=-1), s.top_k, dim=-1)[1]
            self.pred[layer, i].copy_(ids.view(-1).float())
        self.host_pred[layer].copy_(self.pred[layer], non_blocking=True)

    def _run_final(self) -> None:
        h = rms_norm(self.x, self.glob["final_norm"], self.spec.rms_eps)
        self.logits.copy_((h @ self.glob["lm_head"].T).float())
        self.host_logits.copy_(self.logits, non_blocking=True)

    # -- prefill chunks: eager (one shape per chunk), the routing read back per layer --------------------
    def chunk_begin(self, token_ids: list[int], start: int) -> None:
        """A prefill chunk of ``token_ids`` at positions ``start``.. into the residual stream."""
        torch, dev = self.torch, self.d.dev
        self.cx = self.glob["embed"].index_select(0, torch.tensor(token_ids, dtype=torch.int64, device=dev))
        self.cpos = torch.arange(start, start + len(token_ids), dtype=torch.int64, device=dev)

    def chunk_attn(self, layer: int):
        """Attention + gate of every chunk token: (ids (T, k), weights (T, k), router logits (T, E)) on the host."""
        s, w, T = self.spec, self.layer_w[layer], self.cx.shape[0]
        self.cx = chunk_attention(self.cx, self.cpos, self.positions, self.cos, self.sin, self.k_cache[layer],
                                  self.v_cache[layer], w, s, self.packed.attn_format, s.sliding_window or 0)
        self.cxn, ids, top, logits = decoder_gate(self.cx, w, s)
        self.cids, self.cw = ids.view(T, s.top_k), top.view(T, s.top_k)
        self.cshared = shared_expert(self.cxn, w) if s.shared_ffn else None
        self.cy = self.torch.zeros(T, s.top_k, s.hidden, dtype=self.dtype, device=self.d.dev)
        return self.cids.cpu().numpy(), self.cw.cpu().numpy(), logits.view(T, -1).cpu().numpy()

    def chunk_expert(self, layer: int, slot: int, expert: int) -> None:
        """Expert ``expert`` (in ``slot``) on the chunk tokens the gate routed to it."""
        s = self.spec
        if self.check_residency:
            want = TAG_BASE + layer * s.num_experts + expert
            self.violations.add_(self.slot_tags[layer][slot:slot + 1].ne(want).sum())
        rows, ranks = (self.cids == expert).nonzero(as_tuple=True)
        self.cy[rows, ranks] = decoder_expert(self.slots[layer][slot], self.cxn[rows], self.packed.expert_format,
                                              s.hidden, s.ffn)

    def chunk_combine(self, layer: int) -> None:
        """As ``combine[l]`` per token: the rank-weighted expert outputs (+ the shared expert)."""
        y = (self.cy.float() * self.cw.unsqueeze(-1)).to(self.dtype).sum(1)
        if self.cshared is not None:
            y = y + self.cshared
        self.cx = self.cx + y

    def chunk_predict(self, layer: int):
        """``predict[l]`` for every chunk token: (T, D, k) predicted ids on the host (-1 past the last layer)."""
        torch, s = self.torch, self.spec
        out = torch.full((self.cx.shape[0], max(len(self.distances), 1), s.top_k), -1, dtype=torch.int64)
        for i, d in enumerate(self.distances):
            if layer + d < s.num_layers:
                w = self.layer_w[layer + d]
                logits = rms_norm(self.cx, w["post_norm"], s.rms_eps) @ w["router"].T
                out[:, i] = torch.topk(torch.softmax(logits.float(), dim=-1), s.top_k, dim=-1)[1].cpu()
        return out.numpy()

    def chunk_final(self):
        """Every chunk token's logits (T, vocab) float32 on the host (the last one picks the next token)."""
        h = rms_norm(self.cx, self.glob["final_norm"], self.spec.rms_eps)
        return (h @ self.glob["lm_head"].T).float().cpu().numpy()

    # -- the residency proof (as in moesim.engine.runtime.Program) ---------------------------------------
    # -- inputs -----------------------------------------------------------------------------------------
    def set_input(self, token_id: int, pos: int) -> None:
        self.input_id.fill_(int(token_id))
        self.pos.fill_(int(pos))

    def _capture(self, progress: bool) -> None:
        """Warm every piece up, then capture each as a CUDA graph (one shared memory pool)."""
        torch = self.torch
        s = self.spec
        pieces: list[tuple[Any, Any]] = [(self.embed, lambda gr: setattr(self, "embed", gr)),
                                         (self.final, lambda gr: setattr(self, "final", gr))]
        for layer in range(s.num_layers):
            pieces.append((self.attn[layer], lambda gr, layer=layer: self.attn.__setitem__(layer, gr)))
            pieces.append((self.combine[layer], lambda gr, layer=layer: self.combine.__setitem__(layer, gr)))
            if self.distances:
                pieces.append((self.predict[layer], lambda gr, layer=layer: self.predict.__setitem__(layer, gr)))
            for s_ in range(self.max_slots):
                for j in range(s.top_k):
                    pieces.append((self.expert[layer][s_][j],
                                   lambda gr, layer=layer, s_=s_, j=j: self.expert[layer][s_].__setitem__(j, gr)))
        self._graph_objects = capture_graphs(torch, self.d.dev, pieces, progress)
