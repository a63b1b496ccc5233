"""Decode attention (one query token, grouped-query heads) over the cache positions actually written, in
Triton: a split-K "flash-decode" in two kernels.

The engine keeps a static KV cache of ``max_context`` positions (shapes never change, so every piece is
captured once as a CUDA graph) and used to run ``scaled_dot_product_attention`` over all of it under a
position mask: every token read the whole cache (16.7 MB a Mixtral layer), and with one query token the
attention kernel got one program per KV head, 8 on a 132-SM GPU. Here the current position is read on
the device (so a captured graph stays valid for every token) and only positions ``<= pos`` (inside the
sliding window, if any) are read, by ``SPLITS`` programs per KV head:

1. program (head, split) walks its slice of positions ``BT`` at a time: scores of the head's query group
   (padded to 16 rows for the tensor-core dot) against the keys, an online softmax, and the weighted sum
   of the values; it writes its partial output, running maximum and running sum;
2. one program per query head merges the splits (log-sum-exp rescaling) and writes the output.

Numerics: scores and softmax in fp32, probabilities rounded to the cache's dtype for the value product
(as flash attention does), accumulation in fp32; equal to ``scaled_dot_product_attention`` up to that
rounding and the summation order (tests/test_engine_attention.py).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

SPLITS = 32    # programs per KV head: 8 Mixtral KV heads x 32 = 256 programs, ~2 per SM on an H100
BT = 32        # cache positions per step
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit(do_not_specialize=["window"])   # 0 and 1 are ordinary values, not constants
def _decode_partial(q_ptr, k_ptr, v_ptr, pos_ptr, part_ptr, ml_ptr, window, sm_scale,
                    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, T: tl.constexpr,
                    SPLITS: tl.constexpr, BT: tl.constexpr, DOT_F32: tl.constexpr):
    h = tl.program_id(0)
    s = tl.program_id(1)
    pos = tl.load(pos_ptr).to(tl.int32)
    first = tl.where(window > 0, tl.maximum(pos - window + 1, 0), 0)
    chunk: tl.constexpr = (T + SPLITS - 1) // SPLITS
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    g_ok = g < G
    q = tl.load(q_ptr + (h * G + g[:, None]) * D + d[None, :], mask=g_ok[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m = tl.full([GP], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    base = h * T * D
    # a fixed trip count over the split's slice; positions the token may not see are masked, so their
    # bytes are never loaded (a step wholly outside costs a few instructions, no memory traffic)
    for t0 in range(0, chunk, BT):
        t = s * chunk + t0 + tl.arange(0, BT)
        t_ok = (t < (s + 1) * chunk) & (t >= first) & (t <= pos)
        kt = tl.load(k_ptr + base + t[:, None] * D + d[None, :], mask=t_ok[:, None], other=0.0)
        vt = tl.load(v_ptr + base + t[:, None] * D + d[None, :], mask=t_ok[:, None], other=0.0)
        if DOT_F32:
            scores = tl.dot(q, tl.trans(kt.to(tl.float32)), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(kt))
        scores = tl.where(t_ok[None, :], scores * sm_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # nothing seen yet: no NaN from -inf - -inf
        alpha = tl.exp(m - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype).to(tl.float32), vt.to(tl.float32),
                                                input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m = m_new
    row = (h * SPLITS + s) * GP + g
    tl.store(part_ptr + row[:, None] * D + d[None, :], acc)
    tl.store(ml_ptr + row * 2, m)
    tl.store(ml_ptr + row * 2 + 1, l_sum)


@triton.jit
def _decode_merge(part_ptr, ml_ptr, out_ptr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                  SPLITS: tl.constexpr):
    qh = tl.program_id(0)          # query head = KV head * G + g
    h = qh // G
    g = qh % G
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, D)
    row = (h * SPLITS + s) * GP + g
    m = tl.load(ml_ptr + row * 2)
    l_sum = tl.load(ml_ptr + row * 2 + 1)
    m_max = tl.max(m, axis=0)      # finite: the split holding position pos saw it
    w = tl.where(l_sum > 0, tl.exp(m - m_max), 0.0)
    part = tl.load(part_ptr + row[:, None] * D + d[None, :])
    out = tl.sum(part * w[:, None], axis=0) / tl.sum(l_sum * w, axis=0)
    tl.store(out_ptr + qh * D + d, out.to(out_ptr.dtype.element_ty))


def supported(q, k_cache) -> bool:
    """Shapes the kernel takes: one token, q (1, H_kv, G, D), cache (1, H_kv, T, D), contiguous, D a
    power of two >= 16, G <= 16."""
    if q.dim() != 4 or k_cache.dim() != 4 or q.shape[0] != 1 or k_cache.shape[0] != 1:
        return False
    _, hkv, g, d = q.shape
    return (k_cache.shape[1] == hkv and k_cache.shape[3] == d and d >= 16 and d & (d - 1) == 0 and g <= 16
            and q.is_contiguous() and k_cache.is_contiguous())


def decode_attention(q, k_cache, v_cache, pos, window: int = 0):
    """softmax(q K^T / sqrt(D)) V over cache positions ``max(0, pos - window + 1) .. pos`` (all up to
    ``pos`` when ``window`` is 0). ``q`` (1, H_kv, G, D): a KV head's query group; caches (1, H_kv, T, D);
    ``pos`` a one-element device tensor. Returns (1, H_kv, G, D) in ``q``'s dtype."""
    import torch

    if not supported(q, k_cache) or v_cache.shape != k_cache.shape or not v_cache.is_contiguous():
        raise ValueError(f"decode attention: unsupported shapes q {tuple(q.shape)}, cache {tuple(k_cache.shape)}")
    _, hkv, g, d = q.shape
    t = k_cache.shape[2]
    gp = 16
    splits = min(SPLITS, triton.next_power_of_2(triton.cdiv(t, BT)))
    part = torch.empty(hkv * splits * gp, d, dtype=torch.float32, device=q.device)
    ml = torch.empty(hkv * splits * gp, 2, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    dot_f32 = q.dtype == torch.float32 or _INTERPRET
    _decode_partial[(hkv, splits)](q, k_cache, v_cache, pos, part, ml, int(window), 1.0 / d ** 0.5, G=g, GP=gp,
                                   D=d, T=t, SPLITS=splits, BT=BT, DOT_F32=dot_f32, num_warps=4)
    _decode_merge[(hkv * g,)](part, ml, out, G=g, GP=gp, D=d, SPLITS=splits, num_warps=4)
    return out
