"""cupti_gaps: a hand-built GPU timeline of the engine's all-miss replay, with known gaps, is read back."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.engine.cupti_gaps import engine_gaps, pieces_and_copies
from moesim.engine.plan import Routing

LAYER, EXPERT, COPY = 200.0, 260.0, 1220.0          # us
GATE_TO_COPY, READY_TO_EXPERT, LAUNCH = 6.0, 110.0, 3.0


def all_miss(tokens: int, layers: int) -> Routing:
    t = np.arange(tokens)
    e = ((2 * t[:, None] + np.arange(2)[None, :]) % 8)[:, None, :].repeat(layers, axis=1)
    return Routing(e.astype(np.int64), np.full(e.shape, 0.5, np.float32), np.arange(tokens * layers).reshape(tokens, layers),
                   np.zeros(tokens, np.int64), t.astype(np.int64), 8)


def timeline(tokens: int, layers: int, lead: int = 2) -> list[dict]:
    """The engine's all-miss schedule at K = 2 by hand: per layer the gate piece (2 kernels under one
    correlation id), two copies on stream 9 (the first GATE_TO_COPY after the gate, the second right
    behind it), each expert READY_TO_EXPERT after its copy (the first one's wait overlaps the second copy)."""
    acts: list[dict] = []
    corr = [100]

    def piece(start: float, dur: float) -> float:
        corr[0] += 1
        acts.append({"cat": "kernel", "stream": 7, "ts": start, "dur": dur / 2, "corr": corr[0], "bytes": None})
        acts.append({"cat": "kernel", "stream": 7, "ts": start + dur / 2, "dur": dur / 2, "corr": corr[0], "bytes": None})
        return start + dur

    t = 0.0
    for _ in range(lead):   # routing upload, counters zeroed
        corr[0] += 1
        acts.append({"cat": "kernel", "stream": 7, "ts": t, "dur": 1.0, "corr": corr[0], "bytes": None})
        t += 5.0
    acts.append({"cat": "gpu_memcpy", "stream": 7, "ts": t, "dur": 1.0, "corr": 1, "bytes": 4096})   # small: ignored
    for _ in range(tokens):
        for _ in range(layers):
            gate_end = piece(t + LAUNCH, LAYER)
            c1 = gate_end + GATE_TO_COPY
            c2 = c1 + COPY
            for c in (c1, c2):
                acts.append({"cat": "gpu_memcpy", "stream": 9, "ts": c, "dur": COPY, "corr": 2, "bytes": 66 << 20})
            e1 = piece(c1 + COPY + READY_TO_EXPERT, EXPERT)
            t = piece(max(e1 + LAUNCH, c2 + COPY + READY_TO_EXPERT), EXPERT)
        t = piece(t + LAUNCH, 50.0)   # final
    acts.sort(key=lambda a: a["ts"])
    return acts


def test_gaps_read_back_from_a_hand_built_timeline():
    acts = timeline(tokens=3, layers=4)
    pieces, copies = pieces_and_copies(acts)
    assert len(pieces) == 2 + 3 * (4 * 3 + 1) and len(copies) == 3 * 4 * 2
    g = engine_gaps(acts, all_miss(3, 4), cache_size=2)
    assert g["gate_to_copy"]["median_us"] == pytest.approx(GATE_TO_COPY)
    assert g["gate_to_copy"]["n"] == 12
    assert g["copy_to_copy"]["median_us"] == pytest.approx(0.0)
    # both experts of every layer waited for their copy: 24 stalls of READY_TO_EXPERT
    assert g["ready_to_expert"]["n"] == 24
    assert g["ready_to_expert"]["median_us"] == pytest.approx(READY_TO_EXPERT)
    assert g["copy_ms"]["median"] == pytest.approx(COPY / 1e3)
    assert g["expert_ms"]["median"] == pytest.approx(EXPERT / 1e3)
    assert g["layer_ms"]["median"] == pytest.approx(LAYER / 1e3)
    assert g["gate_after_expert"]["median_us"] == pytest.approx(LAUNCH)
    per_layer = LAYER + LAUNCH + GATE_TO_COPY + 2 * COPY + READY_TO_EXPERT + EXPERT
    assert g["token_ms"]["median"] == pytest.approx((4 * per_layer + 50.0 + LAUNCH) / 1e3)


def test_a_trace_that_does_not_match_the_plan_is_refused():
    acts = timeline(tokens=2, layers=3)
    with pytest.raises(ValueError, match="compute pieces"):
        engine_gaps(acts, all_miss(3, 3), cache_size=2)   # one token more than the trace holds
    drop = [a for a in acts if not (a["cat"] == "gpu_memcpy" and a["bytes"] > 1 << 20)][:-1] + [acts[-1]]
    with pytest.raises(ValueError, match="copies"):
        engine_gaps(drop, all_miss(2, 3), cache_size=2)


def test_every_slot_of_an_engine_program_is_16_byte_aligned():
    """Inductor copies a misaligned input before its kernels: every slot row must start 16-byte aligned
    (8-byte padding put every odd slot 8 bytes off, costing a blob copy per expert on the H200)."""
    from moesim.engine.identity import BLOB_ALIGN, TAG_BYTES, blob_bytes
    from moesim.engine.quant import quant_spec
    from moesim.engine.runtime import Geometry, Program, Weights

    assert BLOB_ALIGN == 16
    for n in (66748416, 88080384, 37256, 37248, 1, 8, 9, 16):
        b = blob_bytes(n)
        assert b % 16 == 0 and b >= n + TAG_BYTES and b - (n + TAG_BYTES) < 16
    w = Weights(Geometry.tiny(2), quant_spec("hqq2"), "cpu", pin=False)
    prog = Program(w, 3, 4)
    for layer in range(2):
        for s in range(3):
            assert prog.slots[layer][s].data_ptr() % 16 == 0


def test_hop_terms_reach_the_calibration_and_bad_ones_are_refused():
    """engine_gaps -> hop_terms -> the raw file's engine_terms.stream_hops -> the calibration's engine block."""
    from moesim.engine.calibration import _engine_block
    from moesim.engine.cupti_gaps import hop_terms
    from moesim.errors import DataError

    g = engine_gaps(timeline(tokens=3, layers=4), all_miss(3, 4), cache_size=2)
    t = hop_terms(g)
    # 12 gate->copy waits of GATE_TO_COPY and 12 copy->copy waits of 0, pooled; 24 expert waits
    assert t["copy_hop_s"] == pytest.approx(GATE_TO_COPY / 2 * 1e-6)
    assert t["ready_hop_s"] == pytest.approx(READY_TO_EXPERT * 1e-6)
    eng = _engine_block({"engine_terms": {"stream_hops": {**t, "source": "test"}}}, "raw.json")
    assert eng["copy_hop_s"] == t["copy_hop_s"] and eng["ready_hop_s"] == t["ready_hop_s"]
    assert "copy_hop_s" in eng["sources"] and "copy_hop_s" not in _engine_block({"engine_terms": {}}, "r")
    with pytest.raises(DataError, match="stream_hops"):
        _engine_block({"engine_terms": {"stream_hops": {"copy_hop_s": "x", "ready_hop_s": 1}}}, "raw.json")
    with pytest.raises(ValueError, match="all-miss"):
        hop_terms({"gate_to_copy": None, "copy_to_copy": None, "ready_to_expert": None})
