"""moesim.engine.sync: the engines' cross-stream waits, with the ones stream order implies left out.

Oracle: a brute-force happens-before graph of the issued marks and waits (program order on each
stream, one edge per wait actually issued, one per host wait): a requested wait is left out exactly
when the graph already orders its mark before the waiting stream's next work."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.engine.plan import Routing
from moesim.engine.quant import quant_spec
from moesim.engine.runtime import Geometry, OffloadedEngine, Weights
from moesim.engine.sync import COMPUTE, COPY, DEFAULT_SYNC, StreamOrder, SyncMode


class FakeEvent:
    def __init__(self, log: list, timing: bool) -> None:
        self.log, self.timing = log, timing

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        self.log.append(("sync", self))


class FakeDevice:
    """Records what the engine asks of the streams: waits (event, stream) and host synchronisations."""

    cuda = False
    copy_stream = None

    def __init__(self) -> None:
        self.log: list = []
        self.events: list[FakeEvent] = []

    def event(self, timing: bool = True) -> FakeEvent:
        ev = FakeEvent(self.log, timing)
        self.events.append(ev)
        return ev

    def wait(self, event, stream=None) -> None:
        self.log.append(("wait", event, stream))


def test_parse_and_label():
    assert SyncMode.parse("plain") == SyncMode(elide=False)
    assert SyncMode.parse("elide+timing+lag1") == SyncMode(elide=True, timing=True, host_lag=1)
    for text in ("plain", "elide", "timing", "elide+lag0", "elide+timing+lag2"):
        assert SyncMode.parse(text).label == text
    assert DEFAULT_SYNC.label == "elide+lag1"
    with pytest.raises(ValueError, match="unknown sync mode word 'fast'"):
        SyncMode.parse("elide+fast")


def test_hand_traced_layer():
    """Batch 1, one layer, two misses then the next token's hit: what each stream waits for."""
    d = FakeDevice()
    so = StreamOrder(d, SyncMode(elide=True))
    gate = so.gate()                                   # compute 1
    assert so.wait(COPY, gate)                         # first copy of the layer waits for its gate
    r0 = so.record(COPY)                               # copy 1
    assert not so.wait(COPY, gate)                     # second copy: already behind the gate
    r1 = so.record(COPY)                               # copy 2
    assert so.wait(COMPUTE, r0)
    f0 = so.record(COMPUTE)                            # compute 2 (expert in slot 0 done)
    assert so.wait(COMPUTE, r1)
    f1 = so.record(COMPUTE)                            # compute 3
    gate2 = so.gate()                                  # next token's gate: compute 4
    assert not so.wait(COMPUTE, r0)                    # a hit: its copy was waited for already
    assert so.wait(COPY, gate2)                        # a miss into slot 1: the new gate covers f1
    assert not so.wait(COPY, f1) and not so.wait(COPY, f0)
    assert so.waits == [2, 2]
    plain = StreamOrder(FakeDevice(), SyncMode(elide=False))
    g = plain.gate()
    assert plain.wait(COPY, g) and plain.wait(COPY, g)   # plain issues every wait
    assert not plain.wait(COPY, None) and not plain.wait(COMPUTE, g)   # nothing to wait for / same stream


def test_host_wait_and_new_step_count_as_orderings():
    so = StreamOrder(FakeDevice(), SyncMode(elide=True))
    g = so.gate()
    so.host_wait(g)
    assert not so.wait(COPY, g)                 # the CPU saw the gate pass before issuing the copy
    f = so.record(COMPUTE)
    assert so.wait(COPY, f)
    r = so.record(COPY)
    before = so.record(COMPUTE)
    so.new_step()                               # the CPU waited for the step's end on compute
    assert not so.wait(COPY, before)
    assert so.wait(COPY, so.record(COMPUTE))    # a mark after the step's end still needs a wait
    assert so.wait(COMPUTE, r)                  # the copy stream's work is not covered by a compute wait


def test_host_lag_holds_the_cpu_back():
    d = FakeDevice()
    so = StreamOrder(d, SyncMode(elide=True, host_lag=1))
    gates = [so.gate() for _ in range(4)]
    synced = [e for kind, e, *_ in d.log if kind == "sync"]
    assert synced == [gates[0].event, gates[1].event, gates[2].event]   # after gate l: wait for gate l-1
    so.new_step()
    so.gate()
    assert len([x for x in d.log if x[0] == "sync"]) == 3   # a new step starts with nothing to hold back
    d0 = FakeDevice()
    so0 = StreamOrder(d0, SyncMode(elide=True, host_lag=0))
    g = so0.gate()
    assert d0.log == [("sync", g.event)]
    dn = FakeDevice()
    son = StreamOrder(dn, SyncMode(elide=True))
    for _ in range(5):
        son.gate()
    assert dn.log == []


def test_timing_mode_creates_timing_events():
    d = FakeDevice()
    StreamOrder(d, SyncMode(timing=True)).record(COMPUTE)
    StreamOrder(d, SyncMode(timing=False)).record(COPY)
    assert [e.timing for e in d.events] == [True, False]


# ---- property: elision is exact against a brute-force happens-before graph ---------------------------

def happens_before(edges: list[tuple[tuple[int, int], int, int]], mark: tuple[int, int], stream: int, pos: int) -> bool:
    """Is ``mark`` (stream, seq) ordered before every op of ``stream`` issued after its position ``pos``?
    ``edges``: (source mark, target stream, target position): ops of the target stream after that
    position come after the source mark."""
    s, n = mark
    if s == stream:
        return n <= pos
    seen = set()
    todo = [(stream, pos)]
    while todo:
        t, p = todo.pop()
        if (t, p) in seen:
            continue
        seen.add((t, p))
        for (src_s, src_n), tgt, tp in edges:
            if tgt == t and tp <= p:
                if src_s == s and src_n >= n:
                    return True
                todo.append((src_s, src_n))   # everything before src on its stream is ordered too
    return False


ops = st.lists(st.tuples(st.sampled_from(["rec0", "rec1", "wait0", "wait1", "host", "step"]),
                         st.integers(0, 50)), min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_elided_waits_are_exactly_the_implied_ones(program):
    d = FakeDevice()
    so = StreamOrder(d, SyncMode(elide=True))
    marks: list = []
    edges: list = []
    issued = 0
    for op, pick in program:
        if op.startswith("rec"):
            marks.append(so.record(int(op[3])))
        elif op.startswith("wait") and marks:
            stream = int(op[4])
            m = marks[pick % len(marks)]
            implied = m.stream == stream or happens_before(edges, (m.stream, m.seq), stream, so.seq[stream])
            did = so.wait(stream, m)
            assert did == (not implied)   # a wait is left out iff the graph already orders it
            if did:
                issued += 1
                edges.append(((m.stream, m.seq), stream, so.seq[stream]))
        elif op == "host" and marks:
            m = marks[pick % len(marks)]
            so.host_wait(m)
            other = COPY if m.stream == COMPUTE else COMPUTE
            edges.append(((m.stream, m.seq), other, so.seq[other]))
        elif op == "step":
            so.new_step()
            if so.seq[COMPUTE]:
                edges.append(((COMPUTE, so.seq[COMPUTE]), COPY, so.seq[COPY]))
    assert sum(so.waits) == issued == len([x for x in d.log if x[0] == "wait"])


# ---- the engine: same results, fewer waits ---------------------------------------------------------

@pytest.fixture(scope="module")
def weights() -> Weights:
    return Weights(Geometry.tiny(3), quant_spec("hqq2"), "cpu", seed=11)


def _routing(experts: np.ndarray) -> Routing:
    T, L, k = experts.shape
    return Routing(experts, np.full((T, L, k), 0.5, np.float32), np.arange(T * L).reshape(T, L),
                   np.zeros(T, np.int64), np.arange(T, dtype=np.int64), 8)


def test_engine_waits_per_mode(weights):
    T, L = 5, 3
    hit = _routing(np.broadcast_to(np.array([0, 1]), (T, L, 2)).copy())
    plain = OffloadedEngine(weights, 2, "lru", "none", sync=SyncMode(elide=False))
    elide = OffloadedEngine(weights, 2, "lru", "none")
    a, b = plain.run(hit, warm=True), elide.run(hit, warm=True)
    assert (a.hits, a.requests, a.violations) == (b.hits, b.requests, b.violations) == (T * L * 2, T * L * 2, 0)
    assert plain.order.waits == [T * L * 2, 0]   # every expert call waits on its slot's ready event
    assert elide.order.waits == [L * 2, 0]       # only the first use of each warm-loaded slot
    t = np.arange(T)
    miss = _routing(((2 * t[:, None] + np.arange(2)[None, :]) % 8)[:, None, :].repeat(L, axis=1).astype(np.int64))
    a, b = plain.run(miss), elide.run(miss)
    assert a.misses == b.misses == T * L * 2 and a.violations == b.violations == 0
    assert elide.order.waits == [T * L * 2, T * L]   # each miss waits for its copy; copies once per layer
    assert plain.order.waits[COPY] == T * L * 2 + (T - 1) * L * 2   # gate + slot-free (after the first token)


# ---- the scripts around it ---------------------------------------------------------------------------

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_engine_sync_script_cpu_check(tmp_path):
    """studies/engine_sync/gpu_engine_sync.py end to end on CPU (tiny model): every mode and shape ran, proof clean,
    the elided order issues fewer waits than the plain one."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, str(ROOT / "studies" / "engine_sync" / "gpu_engine_sync.py"), "--cpu-check", "--out", str(tmp_path),
           "--modes", "plain,elide+lag1", "--tokens", "3", "--steps", "2", "--batch", "2", "--repeats", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads((tmp_path / "engine_sync.json").read_text())
    got = {(x["mode"], x["shape"]) for x in r["runs"]}
    for mode in ("plain", "elide+lag1"):
        for shape in ("b1_all_miss", "b1_all_hit", "b1_mixed", "b2_uniform"):
            assert (mode, shape) in got
    assert all(x["violations"] == 0 for x in r["runs"])
    waits = {(x["mode"], x["shape"]): x["waits"] for x in r["runs"] if x["mode"] != "instrumented"}
    assert sum(waits[("elide+lag1", "b2_uniform")]) < sum(waits[("plain", "b2_uniform")])
    assert waits[("elide+lag1", "b1_all_hit")][0] < waits[("plain", "b1_all_hit")][0]


def test_engine_sync_report(tmp_path):
    import subprocess
    import sys

    script = ROOT / "studies" / "engine_sync" / "make_report.py"
    out = tmp_path / "r.md"
    proc = subprocess.run([sys.executable, str(script), str(ROOT / "studies" / "engine_sync" / "raw"), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    md = out.read_text()
    for mode in ("plain", "elide", "timing", "elide+lag1", "instrumented"):
        assert f"| {mode} |" in md
    assert "276 violations in 1024 misses" in md
    bad = subprocess.run([sys.executable, str(script), str(tmp_path / "nothing"), "-o", str(tmp_path / "x.md")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    assert not (tmp_path / "x.md").exists()


def test_add_session_with_pieces_takes_the_engine_terms_of_the_raw_file():
    import json

    from moesim.engine.calibration import add_session

    cal = json.loads((ROOT / "moesim" / "data" / "hardware" / "h200.json").read_text())
    raw = json.loads((ROOT / "studies" / "calibration" / "raw" / "2026-12-02" / "calibration_raw.json").read_text())
    raw["graph"] = {**raw["graph"], "layer_ms": 0.5, "expert_ms": 0.7}
    out = add_session(cal, raw, "raw.json", pieces=True)
    assert out["layer"]["base_s"] == pytest.approx(0.5e-3)
    assert out["expert_compute"]["hqq2"][0][1] == pytest.approx(0.7e-3)
    assert out["expert_compute"]["hqq4"] == cal["expert_compute"]["hqq4"]   # other formats as measured before
    assert out["pcie"]["curve"] == cal["pcie"]["curve"]                      # copies stay the calibration's
    kept = add_session(cal, raw, "raw.json")
    assert kept["layer"] == cal["layer"] and kept["token"] == cal["token"]
    from moesim.errors import DataError
    with pytest.raises(DataError, match="no engine pieces"):
        add_session(cal, {k: v for k, v in raw.items() if k != "graph"}, "raw.json", pieces=True)


def test_with_pieces_needs_add_to(tmp_path):
    from moesim.cli import main

    assert main(["calibrate", "--from-raw", str(ROOT / "studies" / "calibration" / "raw" / "2026-12-02" /
                                                "calibration_raw.json"), "-o", str(tmp_path / "c.json"),
                 "--with-pieces"]) == 2
    assert not (tmp_path / "c.json").exists()
