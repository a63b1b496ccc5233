"""Fused GPU kernels of the offloaded engine, and the one switch between them and the reference path.

The reference path (``moesim.engine.quant.dequantize`` then a matmul) runs on CPU and wherever Triton
is missing; on a CUDA device with Triton the packed matrices go through ``kernels.lowbit`` (one read of
each packed byte). An expert's FFN there takes the fused kernels or dequantise-then-cuBLAS, whichever
measured faster for its format and batch (``kernels.expert_path``). ``MOESIM_KERNELS=reference`` (or
:func:`reference_kernels`) forces the reference path everywhere, e.g. to time the previous engine beside
the new one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

from moesim.engine.kernels import expert_path
from moesim.engine.quant import QuantSpec, matrix

# plain module state (no cached functions): torch.compile traces these reads as constants
_STATE = {"enabled": os.environ.get("MOESIM_KERNELS", "fused") != "reference", "ops": False, "attention": "unprobed"}
_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON


_COMPILED: dict[str, Any] = {}


def compiled(fn):
    """torch.compile'd ``fn`` (fused dequant kernels, few launches); one compiled object per function."""
    if fn.__name__ not in _COMPILED:
        import torch
        import torch._dynamo.config as dcfg

        for knob in ("cache_size_limit", "recompile_limit"):   # one graph per (quantization, batch)
            if hasattr(dcfg, knob):
                setattr(dcfg, knob, 64)
        _COMPILED[fn.__name__] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn.__name__]


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

    on = _STATE["enabled"] and torch.device(device).type == "cuda" and _TRITON
    if on and not _STATE["ops"]:
        _register_ops()
    return on


def fused_for(t, spec: QuantSpec, rows: int, cols: int) -> bool:
    if not active(t.device):
        return False
    from moesim.engine.kernels.lowbit import supported

    return supported(spec, rows, cols)


def _register_ops() -> None:
    """The fused kernels as torch custom ops: opaque to torch.compile, so a compiled piece (the layer:
    norms, SDPA, gate) keeps its fused elementwise kernels around them instead of breaking its graph."""
    import torch

    from moesim.engine.kernels import attention, lowbit
    from moesim.engine.quant import quant_spec

    # (name, schema, kernel, output rows from the arguments); schemas spelled out because this module's
    # annotations are strings (``from __future__ import annotations``)
    ops = [("lowbit_linear", "(Tensor x, Tensor view, str fmt, int rows, int cols) -> Tensor",
            lambda x, view, fmt, rows, cols: lowbit.lowbit_linear(x, view, quant_spec(fmt), rows, cols),
            lambda x, view, fmt, rows, cols: (x.shape[0], rows)),
           ("lowbit_expert", "(Tensor blob, Tensor x, str fmt, int hidden, int ffn) -> Tensor",
            lambda blob, x, fmt, hidden, ffn: lowbit.expert_ffn(blob, x, quant_spec(fmt), hidden, ffn),
            lambda blob, x, fmt, hidden, ffn: (x.shape[0], hidden)),
           ("decode_attention", "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor pos, int window) -> Tensor",
            attention.decode_attention, lambda q, k_cache, v_cache, pos, window: tuple(q.shape))]
    for name, schema, kernel, out_shape in ops:
        op = torch.library.custom_op(f"moesim::{name}", kernel, mutates_args=(), schema=schema)
        x_arg = 1 if name == "lowbit_expert" else 0
        op.register_fake(lambda *a, out_shape=out_shape, x_arg=x_arg: a[x_arg].new_empty(out_shape(*a)))
    _STATE["ops"] = True
    _STATE["attention"] = _probe_attention(attention.decode_attention)


def _probe_attention(fused) -> str:
    """Run the fused decode attention once on a small cache against SDPA (eagerly, when the ops are
    registered): "ok", or why the engine keeps SDPA instead (a kernel that does not compile or disagrees
    on this device must not take the engine down with it)."""
    import torch

    try:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for s in ((1, 2, 4, 128), (1, 2, 96, 128), (1, 2, 96, 128)))
        pos = torch.tensor([70], device="cuda")
        got = fused(q, k, v, pos).float()
        mask = (torch.arange(96, device="cuda") <= pos).view(1, 1, 1, -1)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).float()
        err = float((got - want).abs().max() / want.abs().max())
        return "ok" if err <= 2e-2 else f"disagrees with SDPA (max relative error {err:.2e})"
    except Exception as exc:   # noqa: BLE001 - any failure means: keep SDPA, and say why
        return f"{type(exc).__name__}: {str(exc)[:400]}"


def fused_attention_status() -> str:
    """"ok" when decode attention runs fused on the GPU; else why not (reference path, no Triton, or the
    probe's failure)."""
    import torch

    if not (torch.cuda.is_available() and active("cuda")):
        return "not active (reference kernels, no CUDA or no Triton)"
    return _STATE["attention"]


def packed_linear(x, view, spec: QuantSpec, rows: int, cols: int):
    """``x @ W.T`` for W (rows, cols) packed in ``view``, in ``x``'s dtype (fused where it can be)."""
    if fused_for(x, spec, rows, cols):
        import torch

        y = torch.ops.moesim.lowbit_linear(x.reshape(-1, cols).contiguous(), view, spec.name, rows, cols)
        return y.view(*x.shape[:-1], rows)
    return x @ matrix(view, spec, rows, cols).to(x.dtype).T


def decode_attention(q, k_cache, v_cache, pos, positions, window: int = 0):
    """One token's attention: ``q`` (1, H_kv, G, D), a KV head's query group as the "length" axis (GQA
    without repeating the cache), over cache positions ``<= pos`` (and ``> pos - window`` with a window).
    Fused on the GPU (reads only those positions, ``kernels.attention``), else SDPA under a mask over the
    whole static cache (``positions``: its position indices)."""
    import torch

    if active(q.device) and _STATE["attention"] == "ok":
        from moesim.engine.kernels.attention import supported

        if supported(q, k_cache):
            return torch.ops.moesim.decode_attention(q, k_cache, v_cache, pos, window)
    mask = positions <= pos
    if window:
        mask = mask & (positions > pos - window)
    return torch.nn.functional.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask.view(1, 1, 1, -1))


def packed_expert(blob, x, spec: QuantSpec, hidden: int, ffn: int):
    """An expert's SwiGLU FFN on ``x`` (tokens, hidden) from its packed blob (w1, w3: ffn x hidden;
    w2: hidden x ffn), in ``x``'s dtype. Where the fused kernels take both shapes: the fused kernels or
    dequantise-then-cuBLAS, whichever measured faster for this key (decided at the first call, outside
    capture; ``expert_path``); elsewhere dequantise then matmul, per matrix."""
    import torch

    if fused_for(x, spec, ffn, hidden) and fused_for(x, spec, hidden, ffn):
        x = x.contiguous()
        if torch.compiler.is_compiling():   # traced code cannot time; the decision is an eager-engine matter
            path = expert_path.FUSED
        else:
            path = expert_path.choose(
                expert_path.path_key(spec.name, hidden, ffn, x),
                {expert_path.FUSED: lambda: torch.ops.moesim.lowbit_expert(blob, x, spec.name, hidden, ffn),
                 expert_path.DEQUANT: lambda: dequant_expert(blob, x, spec, hidden, ffn, compile=True)},
                reference=lambda: dequant_expert(blob, x, spec, hidden, ffn),
                can_time=not (x.is_cuda and torch.cuda.is_current_stream_capturing()))
        if path == expert_path.FUSED:
            return torch.ops.moesim.lowbit_expert(blob, x, spec.name, hidden, ffn)
        return dequant_expert(blob, x, spec, hidden, ffn, compile=path == expert_path.DEQUANT)
    size = spec.matrix_bytes(hidden * ffn)
    h = torch.nn.functional.silu(packed_linear(x, blob[:size], spec, ffn, hidden)) \
        * packed_linear(x, blob[size:2 * size], spec, ffn, hidden)
    return packed_linear(h, blob[2 * size:3 * size], spec, hidden, ffn)


def expert_weights(blob, spec: QuantSpec, hidden: int, ffn: int, dtype) -> tuple:
    """An expert blob's (w1, w3, w2) dequantised to ``dtype``."""
    size = spec.matrix_bytes(hidden * ffn)
    shapes = ((ffn, hidden), (ffn, hidden), (hidden, ffn))
    return tuple(matrix(blob[i * size:(i + 1) * size], spec, *shape).to(dtype) for i, shape in enumerate(shapes))


def dequant_expert(blob, x, spec: QuantSpec, hidden: int, ffn: int, compile: bool = False):
    """An expert's SwiGLU FFN by dequantising its three matrices, then three matmuls (cuBLAS on a GPU):
    the previous engine's expert. ``compile``: the dequantisation torch.compile'd on a GPU (one compiled
    graph per format and shape, whatever the batch; eager elsewhere), as the previous engine ran it."""
    import torch

    weights = compiled(expert_weights) if compile and x.device.type == "cuda" else expert_weights
    w1, w3, w2 = weights(blob, spec, hidden, ffn, x.dtype)
    return (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
