"""The fused low-bit kernels (moesim/engine/kernels/lowbit.py) against dequantise-then-matmul.

Oracles: ``quant.dequantize`` (itself checked against hqq in test_engine_hqq.py) with a float64 matmul
written here, and hqq's own dequantisation for blobs made by hqq's quantizer. Outputs are poisoned with
NaN first, so an element the kernel never writes fails. Runs on a GPU; without one, through Triton's
interpreter on CPU (there dots run in fp32 on the bf16-exact weights: the interpreter truncates bf16 and
mis-computes bf16 dots). Skipped where Triton is not installed (CI's CPU image).
"""

from __future__ import annotations

import math
import os

import pytest

torch = pytest.importorskip("torch")
CUDA = torch.cuda.is_available()
if not CUDA:   # read when Triton is imported: before it is
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from moesim.engine import kernels  # noqa: E402
from moesim.engine.kernels import lowbit  # noqa: E402
from moesim.engine.kernels.lowbit import expert_ffn, lowbit_linear, supported  # noqa: E402
from moesim.engine.quant import fill_random_matrix, matrix, quant_spec  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
# GPU: summation order only (bf16 output rounding); interpreter: its bf16 casts truncate
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2} if CUDA else \
    dict.fromkeys((torch.float32, torch.float16, torch.bfloat16), 3e-2)
FORMATS = ["hqq2", "hqq4", "hqq2-v02", "hqq4-v02", "hqq2-g64"]


def _packed(spec, rows, cols, gen):
    blob = torch.empty(spec.matrix_bytes(rows * cols), dtype=torch.uint8)
    fill_random_matrix(blob, spec, rows * cols, gen)
    return blob.to(DEV)


def _check(got, want, dtype, what):
    assert got.dtype == dtype and got.shape == want.shape, what
    assert torch.isfinite(got).all(), f"{what}: unwritten (NaN-poisoned) elements"
    err = (got.double().cpu() - want).abs().max().item() / want.abs().max().item()
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e}"


# per kernel variant, (batch 1, batch > 1) tile candidates (variant, BN, BW, warps, stages); variant 2's
# first GEMV tile keeps a 2-D accumulator, its second reduces per tile (lowbit._launch's ACC_2D)
CONFIGS = {1: ([(1, 16, 8, 4, 3), (1, 32, 16, 4, 3)], [(1, 16, 16, 4, 3), (1, 32, 32, 4, 3)]),
           2: ([(2, 16, 4, 4, 3), (2, 32, 16, 4, 3)], [(2, 16, 2, 4, 3), (2, 32, 4, 4, 3)])}


def _check_linear(spec, rows, cols, m, dtype, variant, seed):
    gen = torch.Generator().manual_seed(seed)
    blob = _packed(spec, rows, cols, gen)
    w = matrix(blob.cpu(), spec, rows, cols).double()
    x = torch.randn(m, cols, generator=gen).to(dtype)
    for cfg in CONFIGS[variant][0 if m == 1 else 1]:
        out = torch.full((m, rows), float("nan"), dtype=dtype, device=DEV)
        lowbit_linear(x.to(DEV), blob, spec, rows, cols, out=out, config=cfg)
        _check(out, x.double() @ w.T, dtype, f"{spec.name} {rows}x{cols} m={m} {dtype} {cfg}")


@pytest.mark.parametrize("variant", [1, 2])
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("m", [1, 3, 20])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_linear_equals_dequantise_then_matmul(variant, name, m, dtype):
    # rows not a multiple of the tile: masked edge rows
    _check_linear(quant_spec(name), 80, 512, m, dtype, variant, hash((name, m)) % 1000)


@pytest.mark.parametrize("variant", [1, 2])
@pytest.mark.parametrize("m", [1, 20])
def test_meta_spans_crossing_rows_and_rows_of_many_spans(variant, m):
    """8-bit meta per 128 groups: hqq4 192 columns has 3 groups a row (spans straddle rows: meta per
    word), hqq2 4096 columns has 256 groups a row (two spans a row, one per tile: meta per row), 6 words a
    row for hqq4's 4-bit words (a partial word tile)."""
    assert not lowbit.meta_per_row(quant_spec("hqq4"), 192, 8)
    assert lowbit.meta_per_row(quant_spec("hqq2"), 4096, 16) and not lowbit.meta_per_row(quant_spec("hqq2"), 4096, 256)
    assert lowbit.meta_per_row(quant_spec("hqq4"), 4096, 8) and not lowbit.meta_per_row(quant_spec("hqq2-v02"), 2048, 8)
    _check_linear(quant_spec("hqq4"), 128, 192, m, torch.float32, variant, 11)
    _check_linear(quant_spec("hqq2"), 24, 4096, m, torch.float32, variant, 12)


def _expert_case(name, m, seed=7, hidden=128, ffn=256):
    """A packed expert blob of ``name``, x (m, hidden) and the float64 oracle of its SwiGLU FFN from the
    dequantised weights, written here."""
    spec = quant_spec(name)
    gen = torch.Generator().manual_seed(seed)
    blob = torch.cat([_packed(spec, *shape, gen) for shape in ((ffn, hidden), (ffn, hidden), (hidden, ffn))])
    size = spec.matrix_bytes(hidden * ffn)
    w1, w3, w2 = (matrix(blob[i * size:(i + 1) * size].cpu(), spec, *shape).double()
                  for i, shape in enumerate(((ffn, hidden), (ffn, hidden), (hidden, ffn))))
    dtype = torch.float32 if not CUDA else torch.bfloat16
    x = torch.randn(m, hidden, generator=gen).to(dtype)
    a = x.double() @ w1.T
    return spec, blob, x.to(DEV), (a * torch.sigmoid(a) * (x.double() @ w3.T)) @ w2.T, hidden, ffn


@pytest.mark.parametrize("variant", [1, 2])
@pytest.mark.parametrize("name", ["hqq2", "hqq2-v02"])
@pytest.mark.parametrize("m", [1, 5])
def test_expert_ffn_equals_reference(variant, name, m):
    """Both kernels of the expert (w1/w3 fused with the gating, then w2) on an expert blob."""
    spec, blob, x, want, hidden, ffn = _expert_case(name, m, hidden=256, ffn=512)
    cfg = CONFIGS[variant][0 if m == 1 else 1][0]
    got = expert_ffn(blob, x, spec, hidden, ffn, config_up=cfg, config_down=cfg)
    _check(got, want, x.dtype, f"{name} m={m}")


def test_hqq_quantizer_blobs_against_hqq_dequantize():
    """A weight quantised by hqq itself (pack.pack_matrix), multiplied by the kernel, equals x @ hqq's
    own dequantised weight."""
    pytest.importorskip("hqq")
    from moesim.engine.pack import hqq_reference, pack_matrix

    torch.manual_seed(3)
    for name in ("hqq2-v02", "hqq4-v02", "hqq2-g64"):
        spec = quant_spec(name)
        w = torch.randn(64, 256) * 0.05
        blob = pack_matrix(w, spec, "cpu").to(DEV)
        x = torch.randn(1, 256)
        got = lowbit_linear(x.to(DEV), blob, spec, 64, 256, config=CONFIGS[1][0][0])
        _check(got, x.double() @ hqq_reference(w, spec).double().T, torch.float32, name)


def test_shapes_outside_the_kernel_are_refused_and_fall_back():
    spec = quant_spec("hqq2-v02")
    assert supported(spec, 64, 256) and not supported(spec, 64, 24)   # a group would straddle two rows
    assert not supported(quant_spec("bf16"), 64, 256)
    x = torch.randn(1, 24)
    blob = _packed(spec, 32, 24, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="not supported"):
        lowbit_linear(x.to(DEV), blob, spec, 32, 24)
    # the dispatcher takes the reference path for it instead
    y = kernels.packed_linear(x.to(DEV), blob, spec, 32, 24)
    _check(y, x.double() @ matrix(blob.cpu(), spec, 32, 24).double().T, torch.float32, "fallback")


def test_tuning_keeps_every_candidate_and_only_variant_restricts_the_choice(monkeypatch):
    """The autotuner's table holds every candidate; the choice is the fastest one of the allowed kernel
    variants (on CPU nothing is timed: the first allowed candidate)."""
    launched = []
    monkeypatch.setattr(lowbit, "_launch", lambda *a: launched.append(a[-1]))
    monkeypatch.setattr(lowbit, "TUNING", {})
    spec = quant_spec("hqq2")
    blob = _packed(spec, 32, 512, torch.Generator().manual_seed(0))
    x = torch.randn(1, 512).to(DEV)
    lowbit_linear(x, blob, spec, 32, 512)
    (key, cands), = lowbit.TUNING.items()
    assert key[:5] == ("hqq2", 32, 512, 1, False) and [c for c, _ in cands] == lowbit.GEMV_CONFIGS
    if not CUDA:
        assert launched == [lowbit.GEMV_CONFIGS[0]]
    # times as a GPU run records them: the second v1 candidate and the last v2 candidate are fastest
    v1 = [c for c in lowbit.GEMV_CONFIGS if c[0] == 1]
    v2 = [c for c in lowbit.GEMV_CONFIGS if c[0] == 2]
    times = {v1[1]: 0.3, v2[-1]: 0.2}
    lowbit.TUNING[key] = [(c, times.get(c, 1.0)) for c in lowbit.GEMV_CONFIGS]
    lowbit_linear(x, blob, spec, 32, 512)
    with lowbit.only_variant(1):
        lowbit_linear(x, blob, spec, 32, 512)
    with lowbit.only_variant(2):
        lowbit_linear(x, blob, spec, 32, 512)
    assert launched[-3:] == [v2[-1], v1[1], v2[-1]]
    # a variant none of whose tiles ran (compiler error: infinite time) is never chosen, and alone it is an error
    lowbit.TUNING[key] = [(c, math.inf if c[0] == 2 else times.get(c, 1.0)) for c in lowbit.GEMV_CONFIGS]
    lowbit_linear(x, blob, spec, 32, 512)
    assert launched[-1] == v1[1]
    with pytest.raises(RuntimeError, match="no candidate tile"), lowbit.only_variant(2):
        lowbit_linear(x, blob, spec, 32, 512)
    with pytest.raises(ValueError, match="unknown kernel variant"), lowbit.only_variant(3):
        pass


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_dispatch_uses_the_fused_kernel_on_the_gpu_and_reference_when_asked(monkeypatch):
    calls = []
    import moesim.engine.kernels.lowbit as lowbit

    real = lowbit.lowbit_linear
    monkeypatch.setattr(lowbit, "lowbit_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec = quant_spec("hqq2")
    blob = _packed(spec, 64, 512, torch.Generator().manual_seed(0))
    x = torch.randn(1, 512, device=DEV, dtype=torch.bfloat16)
    fused = kernels.packed_linear(x, blob, spec, 64, 512)
    assert calls == [1]
    with kernels.reference_kernels():
        ref = kernels.packed_linear(x, blob, spec, 64, 512)
    assert calls == [1]
    _check(fused, ref.double().cpu(), torch.bfloat16, "dispatch")


def test_a_tile_whose_output_disagrees_with_v1_is_never_chosen(monkeypatch):
    """The tuner picks the fastest tile; a tile whose output differs from the first v1 tile's by more than
    the tolerance is taken out (infinite time, its error recorded), however fast it timed."""
    monkeypatch.setattr(lowbit, "TUNING_ERRORS", {})
    key = ("hqq2", 32, 512, 1, False, "torch.float32")
    v1 = [c for c in lowbit.GEMV_CONFIGS if c[0] == 1]
    v2 = [c for c in lowbit.GEMV_CONFIGS if c[0] == 2]
    monkeypatch.setattr(lowbit, "TUNING", {key: [(v1[0], 0.5), (v1[1], 0.4), (v2[0], 0.1), (v2[1], 0.2), (v2[2], math.inf)]})
    ref = torch.linspace(-1.0, 1.0, 64)
    outputs = {v1[0]: ref, v1[1]: ref + 1e-3, v2[0]: ref * 1.1, v2[1]: ref - 1.5e-2}
    lowbit._drop_disagreeing(key, lambda c: outputs[c])
    times = dict(lowbit.TUNING[key])
    assert times[v2[0]] == math.inf and "disagrees with v1" in lowbit.TUNING_ERRORS[(key, v2[0])]
    assert times[v1[1]] == 0.4 and times[v2[1]] == 0.2       # within 2e-2 of v1's output: kept
    assert (key, v2[2]) not in lowbit.TUNING_ERRORS           # it never ran: nothing to compare
    # a NaN output is a disagreement too
    monkeypatch.setattr(lowbit, "TUNING", {key: [(v1[0], 0.5), (v2[0], 0.1)]})
    lowbit._drop_disagreeing(key, lambda c: ref if c == v1[0] else torch.full((64,), float("nan")))
    assert dict(lowbit.TUNING[key])[v2[0]] == math.inf


@pytest.fixture
def fused_on_this_device(monkeypatch):
    """The fused dispatch as on a GPU (on CPU: through Triton's interpreter), with empty decision tables
    and a spy on which path computed each expert call."""
    from moesim.engine.kernels import expert_path

    if not CUDA:
        monkeypatch.setattr(kernels, "fused_for", lambda t, spec, rows, cols: supported(spec, rows, cols))
        if not kernels._STATE["ops"]:
            kernels._register_ops()
    monkeypatch.setattr(expert_path, "EXPERT_PATHS", {})
    monkeypatch.setattr(expert_path, "PATH_ERRORS", {})
    ran = []
    real_ffn, real_dequant = lowbit.expert_ffn, kernels.dequant_expert
    monkeypatch.setattr(lowbit, "expert_ffn", lambda *a, **k: ran.append("fused") or real_ffn(*a, **k))
    monkeypatch.setattr(kernels, "dequant_expert",
                        lambda *a, **k: ran.append("dequant" if k.get("compile") else "reference") or real_dequant(*a, **k))
    return ran


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("fused_slower", [False, True])
def test_engine_expert_output_is_the_same_whichever_path_wins(fused_on_this_device, monkeypatch, m, fused_slower):
    """The engine's expert (runtime.expert_forward) decides between the fused kernels and dequantise-then-
    matmul by injected timings, then serves that path: its output equals the oracle either way."""
    from moesim.engine.kernels import expert_path
    from moesim.engine.runtime import expert_forward

    ran = fused_on_this_device
    spec, blob, x, want, hidden, ffn = _expert_case("hqq2", m)

    def fake_timer(fn):   # times a candidate by which path it ran: the fused one 0.35 or 0.10 ms
        n = len(ran)
        fn()
        return (0.35 if fused_slower else 0.10) if "fused" in ran[n:] else 0.32
    monkeypatch.setattr(expert_path, "time_ms", fake_timer)
    got = expert_forward(blob, x, spec, hidden, ffn)   # warm-up: decides
    assert ran[0] == "reference" and {"fused", "dequant"} <= set(ran)
    ran.clear()
    again = expert_forward(blob, x, spec, hidden, ffn)
    winner = "dequant" if fused_slower else "fused"
    assert ran == [winner]
    (row,) = expert_path.decisions()
    assert row["chosen"] == winner and row["batch"] == m
    _check(got, want, x.dtype, f"decision call m={m}")
    _check(again, want, x.dtype, f"{winner} m={m}")


def test_engine_expert_never_takes_a_fused_path_that_disagrees(fused_on_this_device, monkeypatch):
    """A fused kernel that computes 10% off (a miscompiled tile) but times fastest: the dequantise path
    serves, and the engine's output still equals the oracle."""
    from moesim.engine.kernels import expert_path
    from moesim.engine.runtime import expert_forward

    ran = fused_on_this_device
    real = lowbit.expert_ffn
    monkeypatch.setattr(lowbit, "expert_ffn", lambda *a, **k: ran.append("fused") or real(*a, **k) * 1.1)

    def fake_timer(fn):   # the fused path times fastest
        n = len(ran)
        fn()
        return 0.01 if "fused" in ran[n:] else 1.0
    monkeypatch.setattr(expert_path, "time_ms", fake_timer)
    spec, blob, x, want, hidden, ffn = _expert_case("hqq2-v02", 1)
    expert_forward(blob, x, spec, hidden, ffn)
    ran.clear()
    got = expert_forward(blob, x, spec, hidden, ffn)
    assert ran == ["dequant"]
    assert "disagrees" in next(iter(expert_path.PATH_ERRORS.values()))
    _check(got, want, x.dtype, "fused path out")


def test_hqq_blob_through_either_path_equals_hqq_dequantize(fused_on_this_device):
    """An expert quantised by hqq itself: each forced path's FFN equals the FFN on hqq's own dequantised
    weights."""
    pytest.importorskip("hqq")
    from moesim.engine.kernels import expert_path
    from moesim.engine.pack import hqq_reference, pack_matrix
    from moesim.engine.runtime import expert_forward

    torch.manual_seed(5)
    spec, hidden, ffn = quant_spec("hqq2-v02"), 128, 256
    ws = [torch.randn(*s) * 0.05 for s in ((ffn, hidden), (ffn, hidden), (hidden, ffn))]
    blob = torch.cat([pack_matrix(w, spec, "cpu") for w in ws]).to(DEV)
    w1, w3, w2 = (hqq_reference(w, spec).double() for w in ws)
    x = torch.randn(3, hidden)
    a = x.double() @ w1.T
    want = (a * torch.sigmoid(a) * (x.double() @ w3.T)) @ w2.T
    for path in expert_path.PATHS:
        with expert_path.only_path(path):
            got = expert_forward(blob, x.to(DEV), spec, hidden, ffn)
        assert fused_on_this_device[-1] == path
        _check(got, want, torch.float32, f"hqq blob, {path}")
