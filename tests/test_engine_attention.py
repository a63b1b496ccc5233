"""Decode attention (moesim/engine/kernels/attention.py and the ``kernels.decode_attention`` dispatcher)
against a softmax written here in float64 over exactly the positions a token may see.

The cache beyond the token's position (and before its window) is filled with NaN: a kernel that reads a
position it must not see fails. The Triton kernel runs on a GPU, or through Triton's interpreter on CPU;
it is skipped where Triton is not installed (CI's CPU image); the dispatcher's SDPA path runs everywhere.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

torch = pytest.importorskip("torch")
CUDA = torch.cuda.is_available()
if not CUDA:   # read when Triton is imported: before it is
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON = importlib.util.find_spec("triton") is not None
DEV = "cuda" if CUDA else "cpu"

from moesim.engine import kernels  # noqa: E402


def _case(hkv, g, d, t, pos, window, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hkv, g, d, generator=gen)
    k = torch.randn(1, hkv, t, d, generator=gen)
    v = torch.randn(1, hkv, t, d, generator=gen)
    first = max(0, pos - window + 1) if window else 0
    scores = torch.einsum("hgd,htd->hgt", q[0].double(), k[0, :, first:pos + 1].double()) / d ** 0.5
    want = torch.einsum("hgt,htd->hgd", torch.softmax(scores, dim=-1), v[0, :, first:pos + 1].double())[None]
    for c in (k, v):   # positions the token may not see
        c[:, :, pos + 1:] = float("nan")
        c[:, :, :first] = float("nan")
    return [a.to(dtype).to(DEV) for a in (q, k, v)] + [torch.tensor([pos], device=DEV)], want


def _check(got, want, dtype, what):
    assert got.shape == want.shape and got.dtype == dtype, what
    err = (got.double().cpu() - want).abs().max().item()
    assert err <= (2e-5 if dtype == torch.float32 else 3e-2), f"{what}: max error {err:.2e}"


@pytest.mark.skipif(not TRITON, reason="needs Triton (GPU, or its CPU interpreter)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("t", "pos", "window"), [(200, 0, 0), (200, 37, 0), (200, 199, 0), (64, 50, 16),
                                                  (1100, 1099, 0), (1100, 900, 300)])
def test_kernel_equals_softmax_over_the_visible_positions(dtype, t, pos, window):
    """Cache lengths that are not a multiple of the step or the split; one, some and all positions
    written; a sliding window; 1100 positions: the default 32 splits, each of two steps."""
    from moesim.engine.kernels.attention import decode_attention

    (q, k, v, p), want = _case(2, 4, 32, t, pos, window, dtype, pos + t)
    _check(decode_attention(q, k, v, p, window), want, dtype, f"t={t} pos={pos} window={window} {dtype}")


@pytest.mark.skipif(not TRITON, reason="needs Triton (GPU, or its CPU interpreter)")
def test_kernel_refuses_shapes_it_cannot_take():
    from moesim.engine.kernels.attention import decode_attention, supported

    (q, k, v, p), _ = _case(2, 4, 32, 64, 3, 0, torch.float32, 0)
    assert supported(q, k) and not supported(q[..., :24].contiguous(), k[..., :24].contiguous())
    assert not supported(torch.zeros(1, 2, 17, 32), k)     # a query group over 16 heads
    with pytest.raises(ValueError, match="unsupported shapes"):
        decode_attention(q[..., :24].contiguous(), k[..., :24].contiguous(), v[..., :24].contiguous(), p)


@pytest.mark.parametrize("window", [0, 8])
def test_dispatcher_equals_softmax_over_the_visible_positions(window):
    """``kernels.decode_attention``: SDPA under a position mask on CPU (the fused kernel on a GPU)."""
    (q, k, v, p), want = _case(2, 3, 16, 40, 20, window, torch.float32, 5)
    got = kernels.decode_attention(q, k.nan_to_num(), v.nan_to_num(), p, torch.arange(40, device=DEV), window)
    _check(got, want, torch.float32, f"dispatcher window={window}")


def test_fused_attention_status_says_whether_the_kernel_serves():
    """On a GPU the one-time probe (fused kernel against SDPA) must pass; elsewhere the status says the
    fused path is off, and the dispatcher's SDPA path serves."""
    status = kernels.fused_attention_status()
    if CUDA and TRITON:
        assert status == "ok", status
    else:
        assert status.startswith("not active"), status
