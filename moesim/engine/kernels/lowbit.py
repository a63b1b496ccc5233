"""Fused dequantise-matmul for the engine's packed low-bit formats (``moesim.engine.quant``), in Triton.

``y = x @ W.T`` with W (rows, cols) read straight from its packed blob: every byte of the blob is read
once, weights are dequantised in registers and never written back. This replaces "dequantise the whole
matrix to bf16 in HBM, then matmul", which moves the weights three times (read packed, write bf16, read
bf16) and made the 2-bit expert slower than an fp16 one.

Tiling (modelled on gemlite's GEMV, our own code). The packed codes of a row are read as int32 words
of ``CPW = 32 / bits`` codes; code ``j`` of a word sits at bit ``8 * (j // PB) + (PB - 1 - j % PB) * bits``
(little-endian words; inside a byte the first code is in the high bits, ``PB = 8 / bits`` codes per
byte). A program owns ``BN`` output rows and walks the row's words ``BW`` at a time; for each of the
``CPW`` code positions it shifts the word tile, dequantises it and multiplies it with the matching
strided slice of ``x`` (``x[k]`` for ``k = word * CPW + j``). Every format has ``group % CPW == 0``,
so a word's codes share one scale and zero: they are loaded once per word tile.

- batch 1: a multiply-and-reduce over the tile (CUDA cores; the GEMV is bound by the weight bytes);
- batch > 1: ``tl.dot`` on tensor cores, x padded to ``BM`` rows (masked), a grid axis over row blocks;
- ``dual``: two matrices of the same shape (an expert's w1 and w3) in one pass, writing
  ``silu(x @ W1.T) * (x @ W3.T)``: the SwiGLU's up projection in one kernel.

Numerics equal :func:`moesim.engine.quant.dequantize` then a matmul: the weight is computed in fp32 (hqq
0.2 formats: in bf16 steps, as hqq does) and rounded to bf16 exactly as the reference rounds it, then
multiplied in fp32 (batch 1) or in ``x``'s dtype on tensor cores with fp32 accumulation (batch > 1).
Only the summation order differs. ``supported`` says which shapes the kernel takes (a group may not
straddle two rows); callers fall back to the reference elsewhere.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any

import triton
import triton.language as tl

from moesim.engine.kernels.expert_path import AGREEMENT_TOL, max_rel_diff, time_ms
from moesim.engine.quant import META_GROUP, QuantSpec, split_matrix


@triton.jit
def _word_tile_weights(p_ptr, s_ptr, z_ptr, m_ptr, rows, row_ok, w0, words, mask, WORDS: tl.constexpr,
                       groups_per_row: tl.constexpr, GROUP_WORDS: tl.constexpr, QUANT_META: tl.constexpr,
                       META_ROW: tl.constexpr):
    """(packed words, scale, zero) of a [BN, BW] tile of words from word ``w0``; scale/zero in fp32. With
    ``META_ROW`` the tile lies inside one 128-group meta span per row: the four meta values are loaded
    once per row instead of once per word."""
    pw = tl.load(p_ptr + rows[:, None] * WORDS + words[None, :], mask=mask, other=0)
    g = rows[:, None] * groups_per_row + words[None, :] // GROUP_WORDS
    if QUANT_META:
        if META_ROW:
            mg = ((rows * groups_per_row + w0 // GROUP_WORDS) // 128 * 4)[:, None]
            mmask = row_ok[:, None]
        else:
            mg = (g // 128) * 4
            mmask = mask
        m0 = tl.load(m_ptr + mg, mask=mmask, other=0.0).to(tl.float32)
        m1 = tl.load(m_ptr + mg + 1, mask=mmask, other=0.0).to(tl.float32)
        m2 = tl.load(m_ptr + mg + 2, mask=mmask, other=0.0).to(tl.float32)
        m3 = tl.load(m_ptr + mg + 3, mask=mmask, other=0.0).to(tl.float32)
        scale = (tl.load(s_ptr + g, mask=mask, other=0).to(tl.float32) - m1) * m0
        zero = (tl.load(z_ptr + g, mask=mask, other=0).to(tl.float32) - m3) * m2
    else:
        scale = tl.load(s_ptr + g, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + g, mask=mask, other=0.0).to(tl.float32)
    return pw, scale, zero


@triton.jit
def _codes_to_weights(codes, scale, zero, QUANT_META: tl.constexpr):
    """Weights from integer codes, rounded to bf16 exactly as ``quant.dequantize`` rounds them (kept in
    fp32). Shared by both kernel variants, so their numerics cannot drift apart."""
    # code -> float without a conversion instruction: the bits of 2^23 + code, minus 2^23 (exact)
    c = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    if QUANT_META:
        w = (c - zero) * scale
    else:   # hqq 0.2: (code - zero) rounded to bf16, times scale
        w = (c - zero).to(tl.bfloat16).to(tl.float32) * scale
    return w.to(tl.bfloat16).to(tl.float32)


@triton.jit
def _dequant(pw, scale, zero, J: tl.constexpr, BITS: tl.constexpr, QUANT_META: tl.constexpr):
    """Code position ``J`` of every word in the tile, dequantised and rounded to bf16 (kept in fp32)."""
    PB: tl.constexpr = 8 // BITS
    SHIFT: tl.constexpr = 8 * (J // PB) + (PB - 1 - J % PB) * BITS
    return _codes_to_weights((pw >> SHIFT) & ((1 << BITS) - 1), scale, zero, QUANT_META)


@triton.jit
def _epilogue(out_ptr, acc_a, acc_b, rows, row_ok, pid_m, M, stride_om, DUAL: tl.constexpr, BM: tl.constexpr,
              ROWS_FIRST: tl.constexpr):
    """The gating of the dual pass (silu(a) * b), then the store: one output row at batch 1, else a
    [BM, BN] tile (``ROWS_FIRST``: [BN, BM], rows on the dot's wide side) of batch rows ``pid_m * BM ..``."""
    if DUAL:
        acc_a = acc_a * tl.sigmoid(acc_a) * acc_b
    if BM == 1:
        tl.store(out_ptr + rows, acc_a.to(out_ptr.dtype.element_ty), mask=row_ok)
    else:
        ms = pid_m * BM + tl.arange(0, BM)
        m_ok = ms < M
        if ROWS_FIRST:
            tl.store(out_ptr + ms[None, :] * stride_om + rows[:, None], acc_a.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & m_ok[None, :])
        else:
            tl.store(out_ptr + ms[:, None] * stride_om + rows[None, :], acc_a.to(out_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & row_ok[None, :])


@triton.jit
def _lowbit_kernel(x_ptr, out_ptr, M, N, stride_xm, stride_om,
                   pa, sa, za, ma, pb, sb, zb, mb,
                   WORDS: tl.constexpr, BITS: tl.constexpr, GROUP_WORDS: tl.constexpr, QUANT_META: tl.constexpr,
                   DUAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr,
                   DOT_F32: tl.constexpr):
    """Variant 1: one pass per code position over a [BN, BW] word tile (K = BW per tensor-core dot)."""
    CPW: tl.constexpr = 32 // BITS
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    row_ok = rows < N
    groups_per_row: tl.constexpr = WORDS // GROUP_WORDS
    if BM == 1:   # products summed over the row at the end: one cross-thread reduction per program
        acc_a = tl.zeros([BN, BW], dtype=tl.float32)
        acc_b = tl.zeros([BN, BW], dtype=tl.float32)
    else:
        ms = pid_m * BM + tl.arange(0, BM)
        m_ok = ms < M
        acc_a = tl.zeros([BM, BN], dtype=tl.float32)
        acc_b = tl.zeros([BM, BN], dtype=tl.float32)
    for w0 in range(0, WORDS, BW):
        words = w0 + tl.arange(0, BW)
        w_ok = words < WORDS
        mask = row_ok[:, None] & w_ok[None, :]
        pwa, sca, zea = _word_tile_weights(pa, sa, za, ma, rows, row_ok, w0, words, mask, WORDS, groups_per_row,
                                           GROUP_WORDS, QUANT_META, False)
        if DUAL:
            pwb, scb, zeb = _word_tile_weights(pb, sb, zb, mb, rows, row_ok, w0, words, mask, WORDS, groups_per_row,
                                               GROUP_WORDS, QUANT_META, False)
        for j in tl.static_range(CPW):
            k = words * CPW + j
            wa = _dequant(pwa, sca, zea, j, BITS, QUANT_META)
            if DUAL:
                wb = _dequant(pwb, scb, zeb, j, BITS, QUANT_META)
            if BM == 1:
                xk = tl.load(x_ptr + k, mask=w_ok, other=0.0).to(tl.float32)
                acc_a += wa * xk[None, :]
                if DUAL:
                    acc_b += wb * xk[None, :]
            else:
                xk = tl.load(x_ptr + ms[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & w_ok[None, :],
                             other=0.0)
                if DOT_F32:   # fp32 x, or Triton's interpreter (it mis-computes bf16 dots): exact products
                    xk = xk.to(tl.float32)
                    acc_a += tl.dot(xk, tl.trans(wa), input_precision="ieee")
                    if DUAL:
                        acc_b += tl.dot(xk, tl.trans(wb), input_precision="ieee")
                else:
                    acc_a += tl.dot(xk, tl.trans(wa.to(xk.dtype)))
                    if DUAL:
                        acc_b += tl.dot(xk, tl.trans(wb.to(xk.dtype)))
    if BM == 1:
        acc_a = tl.sum(acc_a, axis=1)
        acc_b = tl.sum(acc_b, axis=1)
    _epilogue(out_ptr, acc_a, acc_b, rows, row_ok, pid_m, M, stride_om, DUAL, BM, False)


@triton.jit
def _weight_tile(p_ptr, s_ptr, z_ptr, m_ptr, rows, row_ok, w0, WORDS: tl.constexpr, BITS: tl.constexpr,
                 GROUP_WORDS: tl.constexpr, QUANT_META: tl.constexpr, META_ROW: tl.constexpr,
                 BN: tl.constexpr, BW: tl.constexpr):
    """Dequantised [BN, BW * CPW] tile (bf16 values in fp32) of words ``w0 ..`` of ``rows``, K-major:
    column ``c`` is input ``w0 * CPW + c``. Each word is loaded once and unpacked into its CPW codes
    along a third axis."""
    CPW: tl.constexpr = 32 // BITS
    PB: tl.constexpr = 8 // BITS
    words = w0 + tl.arange(0, BW)
    mask = row_ok[:, None] & (words < WORDS)[None, :]
    pw, scale, zero = _word_tile_weights(p_ptr, s_ptr, z_ptr, m_ptr, rows, row_ok, w0, words, mask, WORDS,
                                         WORDS // GROUP_WORDS, GROUP_WORDS, QUANT_META, META_ROW)
    j = tl.arange(0, CPW)
    shift = 8 * (j // PB) + (PB - 1 - j % PB) * BITS
    codes = (pw[:, :, None] >> shift[None, None, :]) & ((1 << BITS) - 1)
    w = _codes_to_weights(codes, scale[:, :, None], zero[:, :, None], QUANT_META)
    return tl.reshape(w, [BN, BW * CPW])


@triton.jit
def _lowbit_kernel_v2(x_ptr, out_ptr, M, N, stride_xm, stride_om,
                      pa, sa, za, ma, pb, sb, zb, mb,
                      WORDS: tl.constexpr, BITS: tl.constexpr, GROUP_WORDS: tl.constexpr,
                      QUANT_META: tl.constexpr, META_ROW: tl.constexpr, DUAL: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, BW: tl.constexpr, ACC_2D: tl.constexpr, DOT_F32: tl.constexpr):
    """Variant 2: the whole [BN, BW * CPW] weight tile dequantised at once, K-major, so batch 1 reads a
    contiguous x slice once per tile and batch > 1 issues ONE tensor-core dot with K = BW * CPW, weights
    as the dot's first operand (rows on the MMA's wide side, the batch on its narrow side)."""
    CPW: tl.constexpr = 32 // BITS
    BK: tl.constexpr = BW * CPW
    K: tl.constexpr = WORDS * CPW
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    row_ok = rows < N
    if BM == 1:
        if ACC_2D:   # partial products kept per column; one cross-thread reduction at the end
            acc_a = tl.zeros([BN, BK], dtype=tl.float32)
            acc_b = tl.zeros([BN, BK], dtype=tl.float32)
        else:        # tiles too large to keep: reduced per tile
            acc_a = tl.zeros([BN], dtype=tl.float32)
            acc_b = tl.zeros([BN], dtype=tl.float32)
    else:
        ms = pid_m * BM + tl.arange(0, BM)
        m_ok = ms < M
        acc_a = tl.zeros([BN, BM], dtype=tl.float32)
        acc_b = tl.zeros([BN, BM], dtype=tl.float32)
    for w0 in range(0, WORDS, BW):
        ks = w0 * CPW + tl.arange(0, BK)
        k_ok = ks < K
        wa = _weight_tile(pa, sa, za, ma, rows, row_ok, w0, WORDS, BITS, GROUP_WORDS, QUANT_META, META_ROW, BN, BW)
        if DUAL:
            wb = _weight_tile(pb, sb, zb, mb, rows, row_ok, w0, WORDS, BITS, GROUP_WORDS, QUANT_META, META_ROW,
                              BN, BW)
        if BM == 1:
            xk = tl.load(x_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            if ACC_2D:
                acc_a += wa * xk
                if DUAL:
                    acc_b += wb * xk
            else:
                acc_a += tl.sum(wa * xk, axis=1)
                if DUAL:
                    acc_b += tl.sum(wb * xk, axis=1)
        else:
            xk = tl.load(x_ptr + ms[None, :] * stride_xm + ks[:, None], mask=k_ok[:, None] & m_ok[None, :],
                         other=0.0)   # [BK, BM]
            if DOT_F32:
                xk = xk.to(tl.float32)
                acc_a += tl.dot(wa, xk, input_precision="ieee")
                if DUAL:
                    acc_b += tl.dot(wb, xk, input_precision="ieee")
            else:
                acc_a += tl.dot(wa.to(xk.dtype), xk)
                if DUAL:
                    acc_b += tl.dot(wb.to(xk.dtype), xk)
    if BM == 1:
        if ACC_2D:
            acc_a = tl.sum(acc_a, axis=1)
            acc_b = tl.sum(acc_b, axis=1)
    _epilogue(out_ptr, acc_a, acc_b, rows, row_ok, pid_m, M, stride_om, DUAL, BM, True)


def supported(spec: QuantSpec, rows: int, cols: int) -> bool:
    """Can the fused kernel take this (rows, cols) matrix of ``spec``? (groups inside one row, whole
    words per row, 4-byte aligned parts)."""
    if spec.is_plain or spec.bits not in (2, 4):
        return False
    cpw = 32 // spec.bits
    n = rows * cols
    if spec.quant_meta and n % (spec.group_size * META_GROUP):
        return False
    return cols % spec.group_size == 0 and spec.group_size % cpw == 0 and (n * spec.bits // 8) % 4 == 0


def _operands(view, spec: QuantSpec, n: int) -> tuple:
    """(packed int32 words, scale, zero, meta) of one packed matrix; unused operands repeat the words."""
    import torch

    p = split_matrix(view, spec, n)
    words = p["packed"].view(torch.int32)
    if spec.quant_meta:
        return words, p["scale_q"], p["zero_q"], p["meta"]
    return words, p["scale"], p["zero"], words


# (variant, BN, BW, warps, stages): variant 1 is the previous kernel (_lowbit_kernel), kept as a
# candidate so the autotuner can only gain and a device run times old and new side by side; variant 2
# is _lowbit_kernel_v2. Batch 1 walks long rows with few of them per program; batch > 1 tiles for
# tensor cores. Chosen per (shape, batch bucket) by timing every candidate on a GPU (a run's first call).
Config = tuple[int, int, int, int, int]
GEMV_CONFIGS: list[Config] = [
    (1, 16, 64, 4, 3), (1, 8, 128, 4, 3), (1, 32, 64, 4, 3),
    (2, 16, 8, 4, 3), (2, 32, 8, 4, 3), (2, 16, 16, 4, 3), (2, 8, 32, 4, 3), (2, 64, 4, 4, 3),
    (2, 32, 16, 8, 3), (2, 128, 4, 8, 3), (2, 8, 16, 4, 3), (2, 16, 8, 2, 4)]
GEMM_CONFIGS: list[Config] = [
    (1, 64, 32, 4, 3), (1, 32, 32, 4, 3),
    (2, 64, 4, 4, 3), (2, 128, 4, 8, 3), (2, 64, 8, 4, 3), (2, 32, 8, 4, 3)]
VARIANTS = (1, 2)
# per tuning key: every candidate's time in ms (on CPU: none timed, the first allowed candidate is used)
TUNING: dict[tuple, list[tuple[Config, float]]] = {}
TUNING_ERRORS: dict[tuple, str] = {}   # (tuning key, candidate) -> why it did not run
_ALLOWED = {"variants": VARIANTS}
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def only_variant(variant: int) -> Iterator[None]:
    """Inside: tuned calls use the fastest candidate of this kernel variant (the old-vs-new switch of
    studies/roofline/run_roofline.py; candidates already timed are not re-timed)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown kernel variant {variant} (known: {VARIANTS})")
    old = _ALLOWED["variants"]
    _ALLOWED["variants"] = (variant,)
    try:
        yield
    finally:
        _ALLOWED["variants"] = old


def meta_per_row(spec: QuantSpec, cols: int, bw: int) -> bool:
    """Does every [rows, bw words] tile of a (?, cols) matrix lie inside one 128-group meta span per row?
    (then the kernel loads the four meta values once per row)."""
    cpw = 32 // spec.bits
    gw = spec.group_size // cpw
    gpr = cols // spec.group_size
    return spec.quant_meta and ((gpr % META_GROUP == 0 and (META_GROUP * gw) % bw == 0)
                                or META_GROUP % gpr == 0)


def _launch(x, out, a: tuple, b: tuple, spec: QuantSpec, rows: int, cols: int, cfg: Config) -> None:
    import torch

    M = x.shape[0]
    cpw = 32 // spec.bits
    variant, bn, bw, warps, stages = cfg
    bm = 1 if M == 1 else (16 if M <= 16 else 32)
    grid = (triton.cdiv(rows, bn), triton.cdiv(M, bm))
    common = dict(WORDS=cols // cpw, BITS=spec.bits, GROUP_WORDS=spec.group_size // cpw,
                  QUANT_META=spec.quant_meta, DUAL=b is not a, BM=bm, BN=bn, BW=bw,
                  DOT_F32=x.dtype == torch.float32 or _INTERPRET, num_warps=warps, num_stages=stages)
    if variant == 1:
        _lowbit_kernel[grid](x, out, M, rows, x.stride(0), out.stride(0), *a, *b, **common)
    else:
        _lowbit_kernel_v2[grid](x, out, M, rows, x.stride(0), out.stride(0), *a, *b,
                                META_ROW=meta_per_row(spec, cols, bw),
                                ACC_2D=bn * bw * cpw <= 16 * 32 * warps, **common)


def _tuned_config(x, out, a, b, spec: QuantSpec, rows: int, cols: int) -> Config:
    """The fastest candidate (of the allowed variants) for this shape and batch bucket; every candidate
    is timed once per process on a GPU and the times are kept in ``TUNING``."""
    M = x.shape[0]
    key = (spec.name, rows, cols, 1 if M == 1 else (16 if M <= 16 else 32), b is not a, str(x.dtype))
    configs = GEMV_CONFIGS if M == 1 else GEMM_CONFIGS
    if key not in TUNING:
        if x.device.type != "cuda":
            TUNING[key] = [(c, float("nan")) for c in configs]
        else:
            TUNING[key] = [(c, _time_candidate(key, c, lambda c=c: _launch(x, out, a, b, spec, rows, cols, c)))
                           for c in configs]
            _drop_disagreeing(key, lambda c: _launch(x, out, a, b, spec, rows, cols, c) or out.float().clone())
    timed = [(c, t) for c, t in TUNING[key] if c[0] in _ALLOWED["variants"]]
    best, t = min(timed, key=lambda ct: 0.0 if math.isnan(ct[1]) else ct[1])
    if t == math.inf:
        raise RuntimeError(f"no candidate tile of kernel variants {_ALLOWED['variants']} ran for {key}: "
                           f"{[TUNING_ERRORS.get((key, c)) for c, _ in timed][:1]}")
    return best


def _drop_disagreeing(key: tuple, output) -> None:
    """Keep out of ``TUNING[key]`` every candidate whose output differs from the first v1 candidate's
    (v1: the variant checked against the reference on the device) by more than ``AGREEMENT_TOL``: the
    tuner picks the fastest tile, so a tile a compiler gets wrong must not be able to win."""
    ran = [c for c, t in TUNING[key] if math.isfinite(t)]
    ref_cfg = next((c for c in ran if c[0] == 1), None)
    if ref_cfg is None:
        return
    ref = output(ref_cfg)
    for i, (c, _t) in enumerate(TUNING[key]):
        if c in ran and c != ref_cfg:
            err = max_rel_diff(output(c), ref)
            if not err <= AGREEMENT_TOL:
                TUNING[key][i] = (c, math.inf)
                TUNING_ERRORS[(key, c)] = f"disagrees with v1 {ref_cfg}: max relative difference {err:.3g}"


def _time_candidate(key: tuple, cfg: Config, fn) -> float:
    """One candidate's time in ms; a candidate that fails to compile or launch is kept out (infinite time,
    its error in ``TUNING_ERRORS``) rather than failing the caller: the other candidates still serve."""
    try:
        return time_ms(fn)
    except Exception as exc:   # noqa: BLE001 - a compiler error in one tile must not stop the engine
        TUNING_ERRORS[(key, cfg)] = f"{type(exc).__name__}: {str(exc)[:400]}"
        return math.inf


def lowbit_linear(x, view, spec: QuantSpec, rows: int, cols: int, *, view_b: Any = None, out=None,
                  config: Config | None = None):
    """``x @ W.T`` for W (rows, cols) packed in ``view`` (uint8, one matrix of ``spec``); with ``view_b``
    (a second matrix of the same shape), ``silu(x @ W.T) * (x @ W_b.T)``. ``x``: (M, cols), contiguous
    rows. Output (M, rows) in ``x``'s dtype (into ``out`` when given)."""
    import torch

    if not supported(spec, rows, cols):
        raise ValueError(f"{spec.name} matrix {rows}x{cols} is not supported by the fused kernel")
    if x.dim() != 2 or x.shape[1] != cols or x.stride(1) != 1:
        raise ValueError(f"x must be (M, {cols}) with contiguous rows, got {tuple(x.shape)}")
    n = rows * cols
    a = _operands(view, spec, n)
    b = _operands(view_b, spec, n) if view_b is not None else a
    if out is None:
        out = torch.empty(x.shape[0], rows, dtype=x.dtype, device=x.device)
    _launch(x, out, a, b, spec, rows, cols, config or _tuned_config(x, out, a, b, spec, rows, cols))
    return out


def expert_ffn(blob, x, spec: QuantSpec, hidden: int, ffn: int, config_up: tuple | None = None,
               config_down: tuple | None = None):
    """An expert's SwiGLU FFN from its packed blob (w1, w3: ffn x hidden; w2: hidden x ffn), in two
    kernels: the fused w1/w3 up projection with the gating, then w2."""
    size = spec.matrix_bytes(hidden * ffn)
    h = lowbit_linear(x, blob[:size], spec, ffn, hidden, view_b=blob[size:2 * size], config=config_up)
    return lowbit_linear(h, blob[2 * size:3 * size], spec, hidden, ffn, config=config_down)
