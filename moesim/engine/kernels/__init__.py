"""Fused GPU kernels of the offloaded engine, and the one switch between them and the reference path.

The reference path (``moesim.engine.quant.dequantize`` then a matmul) runs on CPU and wherever Triton
is missing; on a CUDA device with Triton the packed matrices go through ``kernels.lowbit`` (one read of
each packed byte). ``MOESIM_KERNELS=reference`` (or :func:`reference_kernels`) forces the reference
path everywhere, e.g. to time the previous engine beside the new one.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

from moesim.engine.quant import QuantSpec, matrix

_STATE = {"enabled": os.environ.get("MOESIM_KERNELS", "fused") != "reference"}


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Inside: every packed matmul takes the reference path (for programs built and captured here)."""
    old = _STATE["enabled"]
    _STATE["enabled"] = False
    try:
        yield
    finally:
        _STATE["enabled"] = old


def active(device) -> bool:
    """Will packed matmuls on ``device`` use the fused kernels?"""
    import torch

    return _STATE["enabled"] and torch.device(device).type == "cuda" and triton_available()


def fused_for(t, spec: QuantSpec, rows: int, cols: int) -> bool:
    if not active(t.device):
        return False
    from moesim.engine.kernels.lowbit import supported

    return supported(spec, rows, cols)


def packed_linear(x, view, spec: QuantSpec, rows: int, cols: int):
    """``x @ W.T`` for W (rows, cols) packed in ``view``, in ``x``'s dtype (fused where it can be)."""
    if fused_for(x, spec, rows, cols):
        from moesim.engine.kernels.lowbit import lowbit_linear

        return lowbit_linear(x.reshape(-1, cols).contiguous(), view, spec, rows, cols).view(*x.shape[:-1], rows)
    return x @ matrix(view, spec, rows, cols).to(x.dtype).T


def packed_expert(blob, x, spec: QuantSpec, hidden: int, ffn: int):
    """An expert's SwiGLU FFN on ``x`` (tokens, hidden) from its packed blob (w1, w3: ffn x hidden;
    w2: hidden x ffn), in ``x``'s dtype: two fused kernels, or dequantise then matmul."""
    import torch

    if fused_for(x, spec, ffn, hidden) and fused_for(x, spec, hidden, ffn):
        from moesim.engine.kernels.lowbit import expert_ffn

        return expert_ffn(blob, x.contiguous(), spec, hidden, ffn)
    size = spec.matrix_bytes(hidden * ffn)
    h = torch.nn.functional.silu(packed_linear(x, blob[:size], spec, ffn, hidden)) \
        * packed_linear(x, blob[size:2 * size], spec, ffn, hidden)
    return packed_linear(h, blob[2 * size:3 * size], spec, hidden, ffn)
