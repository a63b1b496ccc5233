"""Our packed formats against hqq itself (skipped where hqq is not installed; the `gpu` extra has it):
byte counts, and dequantised weights equal to hqq's own ``dequantize`` on the same codes, scales and zeros."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.engine.quant import dequantize, quant_spec, split_matrix

hqq_quantize = pytest.importorskip("hqq.core.quantize", reason="hqq not installed (pip install '.[torch]')")
torch = pytest.importorskip("torch")


def hqq_linear(rows: int, cols: int, nbits: int, group: int, quant_meta: bool):
    cfg = hqq_quantize.BaseQuantizeConfig(nbits=nbits, group_size=group, quant_zero=quant_meta,
                                          quant_scale=quant_meta)
    if quant_meta and cfg.get("scale_quant_params"):
        cfg["scale_quant_params"]["group_size"] = 128   # mixtral-offloading's setting
        cfg["zero_quant_params"]["group_size"] = 128
    torch.manual_seed(0)
    lin = torch.nn.Linear(cols, rows, bias=False).to(torch.bfloat16)
    return hqq_quantize.HQQLinear(lin, cfg, compute_dtype=torch.bfloat16, device="cpu", initialize=True)


def stored_bytes(q) -> int:
    total = q.W_q.numel() * q.W_q.element_size()
    for v in q.meta.values():
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, dict):
            total += sum(t.numel() * t.element_size() for t in v.values() if isinstance(t, torch.Tensor))
    return total


@pytest.mark.parametrize("name,nbits,group", [("hqq2-v02", 2, 16), ("hqq4-v02", 4, 64), ("hqq2-g64", 2, 64)])
def test_byte_count_equals_what_hqq_stores(name, nbits, group):
    rows, cols = 256, 1024
    for quant_meta in (False, True):   # hqq 0.2 ignores quant_scale / quant_zero: same bytes either way
        q = hqq_linear(rows, cols, nbits, group, quant_meta)
        assert stored_bytes(q) == quant_spec(name).matrix_bytes(rows * cols)
    assert quant_spec("hqq2-v02").expert_bytes(4096, 14336) == 88_080_384
    assert quant_spec("hqq2").expert_bytes(4096, 14336) == 66_748_416
    assert quant_spec("hqq2-g64").expert_bytes(4096, 14336) == 55_050_240


@pytest.mark.parametrize("name,nbits,group", [("hqq2-v02", 2, 16), ("hqq4-v02", 4, 64), ("hqq2-g64", 2, 64)])
def test_dequantisation_equals_hqq(name, nbits, group):
    """hqq's codes (unpacked with hqq's BitPack), scales and zeros, repacked into our blob layout,
    dequantise to hqq's own weights."""
    from hqq.core.bitpack import BitPack

    rows, cols = 256, 1024
    n = rows * cols
    q = hqq_linear(rows, cols, nbits, group, False)
    unpack = {2: BitPack.unpack_2bit_u8, 4: BitPack.unpack_4bit_u8}[nbits]
    codes = unpack(q.W_q, dtype=torch.uint8).reshape(-1)          # group-major, as hqq groups them
    per_byte = 8 // nbits
    shifts = torch.arange(8 - nbits, -1, -nbits, dtype=torch.uint8)
    packed = (codes.view(-1, per_byte) << shifts).sum(dim=1, dtype=torch.uint8)
    spec = quant_spec(name)
    blob = torch.empty(spec.matrix_bytes(n), dtype=torch.uint8)
    parts = split_matrix(blob, spec, n)
    parts["packed"].copy_(packed)
    parts["scale"].copy_(q.meta["scale"].reshape(-1).to(torch.bfloat16))
    parts["zero"].copy_(q.meta["zero"].reshape(-1).to(torch.bfloat16))
    ours = dequantize(split_matrix(blob, spec, n), spec, n).view(rows, cols).float().numpy()
    theirs = q.dequantize().float().numpy()
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-2 * scale)   # bf16 vs fp32 arithmetic
    assert np.mean(np.abs(ours - theirs)) < 1e-3 * scale


@pytest.mark.parametrize("name", ["hqq2-v02", "hqq4-v02", "hqq2-g64"])
def test_decoder_blobs_from_hqqs_quantizer_dequantise_bit_identically(name):
    """The decoder's packer (engine/pack.py) stores hqq's own quantizer output; our dequantisation of
    that blob equals hqq's ``Quantizer.dequantize`` bit for bit (bf16 arithmetic in the same order)."""
    from moesim.engine.pack import hqq_reference, pack_matrix

    torch.manual_seed(3)
    w = torch.randn(96, 256) * 0.05
    spec = quant_spec(name)
    blob = pack_matrix(w, spec)
    ours = dequantize(split_matrix(blob, spec, w.numel()), spec, w.numel()).view(w.shape)
    assert torch.equal(ours, hqq_reference(w, spec))
    assert blob.numel() == spec.matrix_bytes(w.numel())


@pytest.mark.parametrize("name,nbits,group", [("hqq2", 2, 16), ("hqq4", 4, 64)])
def test_seed_layout_blobs_are_hqqs_codes_with_8bit_scale_and_zero(name, nbits, group):
    """``--quant hqq2`` / ``hqq4`` (mixtral-offloading's layout): hqq's own codes, its per-group scale and
    zero re-quantised min-max to 8 bits per 128 groups. Oracle: the same steps written here in numpy from
    hqq's quantizer output; the blob has the seed's byte count (66,748,416 B per Mixtral 2-bit expert)."""
    from hqq.core.bitpack import BitPack

    from moesim.engine.pack import hqq_reference, pack_matrix

    torch.manual_seed(4)
    rows, cols = 128, 256
    w = torch.randn(rows, cols) * 0.05
    spec = quant_spec(name)
    blob = pack_matrix(w, spec)
    assert blob.numel() == spec.matrix_bytes(w.numel())
    w_q, meta = hqq_quantize.Quantizer.quantize(w, nbits=nbits, group_size=group, optimize=True, axis=1,
                                                compute_dtype=torch.bfloat16, device="cpu")
    unpack = {2: BitPack.unpack_2bit_u8, 4: BitPack.unpack_4bit_u8}[nbits]
    codes = unpack(w_q, dtype=torch.uint8).reshape(-1, group).numpy().astype(np.float64)

    def requantised(v: np.ndarray) -> np.ndarray:
        v = v.reshape(-1, 128).astype(np.float64)
        out = np.empty_like(v)
        for i, row in enumerate(v):
            lo, hi = row.min(), row.max()
            step = np.float64(np.float16((hi - lo) / 255)) if hi > lo else 1.0
            off = np.float64(np.float16(-lo / step))
            out[i] = (np.clip(np.round(row / step + off), 0, 255) - off) * step
        return out.reshape(-1, 1)

    scale = requantised(meta["scale"].float().numpy())
    zero = requantised(meta["zero"].float().numpy())
    want = ((codes - zero) * scale).reshape(rows, cols)
    ours = dequantize(split_matrix(blob, spec, w.numel()), spec, w.numel()).view(rows, cols).float().numpy()
    np.testing.assert_allclose(ours, want, rtol=1e-2, atol=1e-4)
    hqq02 = hqq_reference(w, quant_spec(f"{name}-v02")).float().numpy()
    assert 0 < np.abs(ours - hqq02).max() < 0.1 * np.abs(hqq02).max()   # a different, close rounding


def test_expert_format_names_are_distinct_byte_counts():
    """One name per format: the packer's ``--quant`` choice is the expert format's own name."""
    from moesim.engine.pack import formats
    from moesim.simulator.cost_model import DEFAULT_EXPERT_BYTES

    sizes = {q: formats(q, torch.float32)[0].expert_bytes(4096, 14336) for q in ("hqq2", "hqq2-v02", "hqq4", "hqq4-v02")}
    assert sizes == {"hqq2": 66_748_416, "hqq2-v02": 88_080_384, "hqq4": 93_757_440, "hqq4-v02": 99_090_432}
    assert {q: formats(q, torch.float32)[0].name for q in sizes} == {q: q for q in sizes}
    assert {q: DEFAULT_EXPERT_BYTES[q] for q in sizes} == sizes   # the timing model's table, the same names
