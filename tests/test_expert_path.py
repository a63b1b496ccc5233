"""The expert path decision (moesim/engine/kernels/expert_path.py): fused kernels or dequantise-then-cuBLAS,
chosen per key by measured time among the paths that agree with the reference. Timings are injected (a
fake timer), so this runs on any CPU; the engine-level checks (each path's output against a float64
oracle) are in test_engine_lowbit.py."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from moesim.engine.kernels import expert_path  # noqa: E402
from moesim.engine.kernels.expert_path import DEQUANT, FUSED, REFERENCE, choose, path_key  # noqa: E402

REF = torch.linspace(-2.0, 2.0, 64)


@pytest.fixture(autouse=True)
def fresh_tables(monkeypatch):
    monkeypatch.setattr(expert_path, "EXPERT_PATHS", {})
    monkeypatch.setattr(expert_path, "PATH_ERRORS", {})


class FakeTimer:
    """ms per candidate from a table, keyed by the candidate callable; counts what it timed."""

    def __init__(self, ms: dict) -> None:
        self.ms, self.timed = ms, []

    def __call__(self, fn) -> float:
        self.timed.append(fn)
        return self.ms[fn]


def _candidates(fused_out=REF, dequant_out=REF, calls=None):
    calls = [] if calls is None else calls

    def fused():
        calls.append(FUSED)
        return fused_out

    def dequant():
        calls.append(DEQUANT)
        return dequant_out
    return {FUSED: fused, DEQUANT: dequant}, calls


def _reference(calls):
    return lambda: calls.append(REFERENCE) or REF


@pytest.mark.parametrize("fused_ms,dequant_ms,want", [(0.108, 0.316, FUSED), (0.352, 0.316, DEQUANT)])
def test_the_faster_path_is_chosen_and_its_times_kept(fused_ms, dequant_ms, want):
    cands, calls = _candidates()
    timer = FakeTimer({cands[FUSED]: fused_ms, cands[DEQUANT]: dequant_ms})
    key = ("hqq2", 4096, 14336, 16, "torch.bfloat16", "cuda:0")
    assert choose(key, cands, _reference(calls), timer=timer) == want
    assert expert_path.EXPERT_PATHS[key] == {FUSED: fused_ms, DEQUANT: dequant_ms}
    # each candidate ran once against the reference before it was timed
    assert calls == [REFERENCE, FUSED, DEQUANT] and len(timer.timed) == 2
    (row,) = expert_path.decisions()
    assert row["batch"] == 16 and row["chosen"] == want and row["ms"] == {FUSED: fused_ms, DEQUANT: dequant_ms}


def test_a_path_that_disagrees_with_the_reference_is_never_chosen():
    """However fast it timed: outputs 10% off, NaN, or a path that raises are out (and say why)."""
    key = ("hqq2", 64, 128, 4, "torch.float32", "cpu")
    cands, calls = _candidates(fused_out=REF * 1.1)
    assert choose(key, cands, _reference(calls), timer=FakeTimer({cands[FUSED]: 0.01, cands[DEQUANT]: 1.0})) == DEQUANT
    assert expert_path.EXPERT_PATHS[key][FUSED] == math.inf
    assert "disagrees with the reference" in expert_path.PATH_ERRORS[(key, FUSED)]
    assert expert_path.decisions()[0]["ms"][FUSED] is None

    key_nan = key[:3] + (8,) + key[4:]
    cands, calls = _candidates(dequant_out=torch.full((64,), float("nan")))
    assert choose(key_nan, cands, _reference(calls), timer=FakeTimer({cands[FUSED]: 1.0, cands[DEQUANT]: 0.01})) == FUSED

    def broken():
        raise RuntimeError("no kernel image")
    key_err = key[:3] + (16,) + key[4:]
    cands, calls = _candidates()
    cands[FUSED] = broken
    assert choose(key_err, cands, _reference(calls), timer=FakeTimer({cands[DEQUANT]: 2.0})) == DEQUANT
    assert expert_path.PATH_ERRORS[(key_err, FUSED)] == "RuntimeError: no kernel image"


def test_agreement_at_the_tolerance_is_kept_and_just_beyond_it_is_not():
    # max |REF| = 2: an offset of 2 * tol is exactly the tolerance
    tol = expert_path.AGREEMENT_TOL
    for offset, kept in ((2 * tol * 0.999, True), (2 * tol * 1.01, False)):
        key = ("hqq4", 64, 128, 1, "torch.float32", f"offset {offset}")
        cands, calls = _candidates(fused_out=REF + offset)
        choose(key, cands, _reference(calls), timer=FakeTimer({cands[FUSED]: 0.1, cands[DEQUANT]: 0.2}))
        assert math.isfinite(expert_path.EXPERT_PATHS[key][FUSED]) == kept


def test_no_path_agrees_then_the_reference_serves():
    key = ("hqq2", 64, 128, 1, "torch.float32", "cpu")
    cands, calls = _candidates(fused_out=REF * 2, dequant_out=-REF)
    timer = FakeTimer({})
    assert choose(key, cands, _reference(calls), timer=timer) == REFERENCE
    assert timer.timed == []   # nothing that disagrees is even timed


def test_decided_once_per_key_then_replayed_without_running_anything():
    key1 = ("hqq2", 4096, 14336, 1, "torch.bfloat16", "cuda:0")
    key16 = key1[:3] + (16,) + key1[4:]
    cands, calls = _candidates()
    timer = FakeTimer({cands[FUSED]: 0.108, cands[DEQUANT]: 0.316})
    assert choose(key1, cands, _reference(calls), timer=timer) == FUSED
    n_calls, n_timed = len(calls), len(timer.timed)
    for _ in range(3):
        assert choose(key1, cands, _reference(calls), timer=timer) == FUSED
    assert (len(calls), len(timer.timed)) == (n_calls, n_timed)
    # another batch is another key: timed on its own, and may choose otherwise
    timer.ms = {cands[FUSED]: 0.352, cands[DEQUANT]: 0.316}
    assert choose(key16, cands, _reference(calls), timer=timer) == DEQUANT
    assert choose(key1, cands, _reference(calls), timer=timer) == FUSED
    assert set(expert_path.EXPERT_PATHS) == {key1, key16}


def test_inside_capture_nothing_is_timed_and_a_decision_is_only_replayed():
    key = ("hqq2", 64, 128, 16, "torch.bfloat16", "cuda:0")
    cands, calls = _candidates()
    timer = FakeTimer({cands[FUSED]: 0.4, cands[DEQUANT]: 0.3})
    # undecided key met during capture: the fused path, and no decision recorded
    assert choose(key, cands, _reference(calls), can_time=False, timer=timer) == FUSED
    assert calls == [] and timer.timed == [] and key not in expert_path.EXPERT_PATHS
    # decided at warm-up, replayed in capture
    assert choose(key, cands, _reference(calls), timer=timer) == DEQUANT
    calls.clear()
    assert choose(key, cands, _reference(calls), can_time=False, timer=timer) == DEQUANT and calls == []


def test_only_path_forces_a_path_without_deciding():
    key = ("hqq2", 64, 128, 1, "torch.float32", "cpu")
    cands, calls = _candidates()
    timer = FakeTimer({cands[FUSED]: 0.1, cands[DEQUANT]: 0.2})
    with expert_path.only_path(DEQUANT):
        assert choose(key, cands, _reference(calls), timer=timer) == DEQUANT
    assert key not in expert_path.EXPERT_PATHS and calls == []
    assert choose(key, cands, _reference(calls), timer=timer) == FUSED
    with expert_path.only_path(REFERENCE):
        assert choose(key, cands, _reference(calls), timer=timer) == REFERENCE
    with pytest.raises(ValueError, match="unknown expert path"), expert_path.only_path("cublas"):
        pass


def test_path_key_names_format_shape_batch_dtype_and_device():
    x = torch.zeros(5, 64, dtype=torch.bfloat16)
    assert path_key("hqq2-g64", 64, 128, x) == ("hqq2-g64", 64, 128, 5, "torch.bfloat16", "cpu")
    assert path_key("hqq2", 64, 128, x[:1]) != path_key("hqq2", 64, 128, x)
