"""The host-RAM and disk tiers of the timing simulator (issue 25 item 5): hand-traced three-tier
timelines, the per-tier accounting against brute-force caches, the disk benchmark, and bad input."""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.engine import disk_bench
from moesim.errors import DataError, SettingError
from moesim.simulator.cost_model import CostModel
from moesim.simulator.disk_tier import DiskCurve, HostTierSpec
from moesim.simulator.timing import simulate_timing
from tests.helpers import run_main, write_trace
from tests.oracle import BruteCache

XB = 2_000_000
# every disk read of an expert: 1 ms latency + 2e6 B at 1 GB/s = 3 ms
CURVE = DiskCurve({("direct", 4096, 1): (1e-3, 1e9), ("page_cache", 4096, 1): (0.0, 1e10)}, ("direct", 4096, 1), "t")


def cost() -> CostModel:
    # copy 2 ms, attention + gate 1 ms, expert 0.5 ms, nothing else
    return CostModel.preset("a6000").with_overrides(expert_ms=0.5, layer_ms=1.0, token_ms=0, pcie_latency_us=0,
                                                    pcie_gbps=1.0, expert_bytes=XB, miss_issue_us=0,
                                                    routing_handoff_us=0, host_copy_issue_us=0, copy_hop_us=0,
                                                    ready_hop_us=0)


def tiers(trace, k: int, host: int, policy: str = "lru", host_policy: str = "lru", **kw):
    r = simulate_timing(trace, policy, k, cost(), host_tier=HostTierSpec(CURVE, host_ram_experts=host,
                                                                         policy=host_policy), **kw)
    return r, r.to_dict()


def test_hand_traced_reads_before_copies(tmp_path):
    t = write_trace(tmp_path / "t.parquet", [[0], [1], [0]], num_experts=4)
    # GPU K=1, host RAM 1 expert: every request misses both.
    # t0: attn 0-1, read 1-4, copy 4-6, expert 6-6.5 | t1: attn 6.5-7.5, read 7.5-10.5, copy 10.5-12.5,
    # expert 12.5-13 | t2: attn 13-14, read 14-17, copy 17-19, expert 19-19.5
    r, d = tiers(t, 1, 1)
    assert r.total_s == pytest.approx(19.5e-3)
    assert list(np.round(r.per_token_ms, 6)) == [6.5, 6.5, 6.5]
    assert d["tier_requests"] == {"gpu": 0, "host_ram": 0, "disk": 3}
    assert d["tier_bytes"] == {"disk_to_host": 3 * XB, "host_to_gpu": 3 * XB}
    assert d["host_tier"]["disk_busy_ms"] == pytest.approx(9.0)
    # host RAM for 2: t2's expert 0 is still there, copy 14-16, expert 16-16.5
    r, d = tiers(t, 1, 2)
    assert r.total_s == pytest.approx(16.5e-3)
    assert d["tier_requests"] == {"gpu": 0, "host_ram": 1, "disk": 2}


def test_hand_traced_host_hits_copy_first(tmp_path):
    t = write_trace(tmp_path / "t.parquet", [[0, 1], [2, 3], [4, 1]], num_experts=8)
    # GPU K=2, host RAM 4. t0: attn 0-1, reads 1-4 (E0) 4-7 (E1), copies 4-6 7-9, experts 6-6.5 9-9.5.
    # t1: attn 9.5-10.5, reads 10.5-13.5 13.5-16.5, copies 13.5-15.5 16.5-18.5, experts 15.5-16 18.5-19.
    # t2: attn 19-20; GPU misses 4 and 1; host RAM has 1 (evicts 0 for 4): E1's copy 20-22 goes before
    # E4's read 20-23 lands, E4's copy 23-25; experts E1 22-22.5, E4 25-25.5
    r, d = tiers(t, 2, 4)
    assert r.total_s == pytest.approx(25.5e-3)
    assert d["tier_requests"] == {"gpu": 0, "host_ram": 1, "disk": 5}
    assert d["host_tier"]["disk_reads"] == 5 and d["host_tier"]["host_ram_experts"] == 4


def test_timeline_has_the_disk_stream(tmp_path):
    t = write_trace(tmp_path / "t.parquet", [[0], [1], [0]], num_experts=4)
    path = tmp_path / "tl.json"
    tiers(t, 1, 1, timeline=path)
    reads = [e for e in json.loads(path.read_text())["traceEvents"] if e["tid"] == "disk"]
    assert [(e["name"], e["ts"], e["dur"]) for e in reads] == [("read L0 E0", 1000.0, 3000.0),
                                                              ("read L0 E1", 7500.0, 3000.0),
                                                              ("read L0 E0", 14000.0, 3000.0)]


def brute_tiers(sets, layers, num_experts: int, k: int, host: int, policy: str, host_policy: str):
    """(gpu hits, host hits, disk reads): per-layer brute-force GPU caches; host RAM one brute-force
    cache over (layer, expert) fed each (token, layer)'s GPU misses in router order."""
    gpu = {}
    host_cache = BruteCache(host, host_policy)
    g = h = dsk = 0
    for S, layer in zip(sets, layers, strict=True):
        cache = gpu.setdefault(layer, BruteCache(k, policy))
        before = set(cache.resident)
        g += cache.request(S)
        missed = [e for e in S if e not in before]
        if missed:
            keys = [layer * num_experts + e for e in missed]
            hits = host_cache.request(keys)
            h, dsk = h + hits, dsk + len(keys) - hits
    return g, h, dsk


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_tier_accounting_equals_brute_force(data):
    L = data.draw(st.integers(1, 3))
    E = data.draw(st.integers(3, 6))
    top = data.draw(st.integers(1, min(3, E)))
    n = data.draw(st.integers(1, 12)) * L
    sets = [data.draw(st.permutations(range(E)))[:top] for _ in range(n)]
    k = data.draw(st.integers(top, E))
    host = data.draw(st.integers(top, L * E + 1))
    policy, host_policy = data.draw(st.sampled_from(["lru", "fifo", "lfu"])), data.draw(st.sampled_from(["lru", "fifo", "lfu"]))
    with tempfile.TemporaryDirectory() as tmp:
        t = write_trace(Path(tmp) / "t.parquet", sets, num_layers=L, num_experts=E)
        r, d = tiers(t, k, host, policy, host_policy)
    g, h, dsk = brute_tiers(sets, [i % L for i in range(n)], E, k, host, policy, host_policy)
    assert d["tier_requests"] == {"gpu": g, "host_ram": h, "disk": dsk}
    assert g + h + dsk == d["requests"] == n * top
    assert d["tier_bytes"] == {"disk_to_host": dsk * XB, "host_to_gpu": (h + dsk) * XB}
    assert d["host_tier"]["disk_busy_ms"] == pytest.approx(dsk * 3.0)


def test_prefetch_reads_are_counted_apart(tmp_path):
    rng = np.random.default_rng(3)
    sets = [rng.permutation(8)[:2] for _ in range(80)]
    t = write_trace(tmp_path / "t.parquet", sets, num_layers=4, num_experts=8)
    r, d = tiers(t, 3, 10, prefetch="oracle")
    h = d["host_tier"]
    assert h["prefetch_disk_reads"] > 0
    assert sum(d["tier_requests"].values()) == d["requests"]
    assert d["tier_bytes"]["disk_to_host"] == (d["tier_requests"]["disk"] + h["prefetch_disk_reads"]) * XB
    assert h["disk_busy_ms"] == pytest.approx(h["disk_reads"] * 3.0)


def test_page_cache_mode_and_refusals(tmp_path):
    t = write_trace(tmp_path / "t.parquet", [[0], [1], [0]], num_experts=4)
    spec = HostTierSpec(CURVE, host_ram_experts=1, mode="page_cache")
    d = simulate_timing(t, "lru", 1, cost(), host_tier=spec).to_dict()
    assert d["host_tier"]["disk_read_ms"] == pytest.approx(0.2) and d["host_tier"]["disk_mode"] == "page_cache"
    with pytest.raises(SettingError, match="no direct point at block 8192"):
        simulate_timing(t, "lru", 1, cost(), host_tier=HostTierSpec(CURVE, host_ram_experts=1, block=8192))
    with pytest.raises(SettingError, match="needs the future"):
        simulate_timing(t, "lru", 1, cost(), host_tier=HostTierSpec(CURVE, host_ram_experts=1, policy="opt"))
    with pytest.raises(SettingError, match="copy execution"):
        simulate_timing(t, "lru", 1, cost(), execution="fiddler", host_tier=HostTierSpec(CURVE, host_ram_experts=1))


def test_disk_curve_file_checks(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"disk": {"direct": [{"block_bytes": 4096, "queue_depth": 1, "latency_s": 0,
                                                    "bytes_per_s": -1}], "default": {}}}))
    with pytest.raises(DataError, match="bad.json: not a disk calibration"):
        DiskCurve.from_json(bad)


def test_fit_line_recovers_a_line():
    sizes = [1 << 20, 4 << 20, 16 << 20]
    lat, bw = disk_bench.fit_line(sizes, [2e-4 + n / 3e9 for n in sizes])
    assert lat == pytest.approx(2e-4) and bw == pytest.approx(3e9)


@pytest.mark.parametrize("direct", [True, False])
def test_reader_reads_the_bytes_asked_for(tmp_path, direct):
    path = tmp_path / "f.bin"
    disk_bench.write_scratch(path, 1 << 20)
    data = path.read_bytes()
    with disk_bench.Reader(path, 8192, 1, direct) as rd:
        assert rd.read_region(65536, 32768) >= 0
        assert bytes(rd.bufs[0][:8192]) == data[65536 + 24576: 65536 + 32768]
        assert rd.method in (("o_direct", "fadvise_dontneed") if direct else ("buffered",))


def test_calibrate_disk_writes_a_curve_the_simulator_reads(tmp_path, capsys):
    out = tmp_path / "disk.json"
    code, stdout, err = run_main(["calibrate", "--disk", tmp_path, "-o", out, "--disk-file-mb", 4, "--disk-blocks-kb",
                                  "64", "--disk-depths", "1,2", "--disk-sizes-kb", "64,256", "--repeats", 2], capsys)
    assert code == 0, err
    curve = DiskCurve.from_json(out)
    assert curve.default == ("direct", 65536, 2) and len(curve.points) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["disk.json"]   # the scratch file is gone
    trace = tmp_path / "t.parquet"
    write_trace(trace, [[0], [1], [0]], num_experts=4)
    code, stdout, err = run_main(["simulate", trace, "--policy", "lru", "--cache-size", 1, "--hardware", "a6000",
                                  "--expert-bytes", 65536, "--host-ram-experts", 1, "--disk-calibration", out,
                                  "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["tier_requests"] == {"gpu": 0, "host_ram": 0, "disk": 3}
    code, stdout, err = run_main(["simulate", trace, "--policy", "lru", "--cache-size", 1, "--hardware", "a6000",
                                  "--expert-bytes", 65536, "--host-ram-experts", 1, "--disk-calibration", out], capsys)
    table = {line.split()[0]: line.split()[1] for line in stdout.splitlines() if line.strip()}
    assert code == 0 and table["tier_requests.disk"] == "3" and table["host_tier.disk_reads"] == "3"


@pytest.mark.parametrize(("argv", "code", "says"), [
    (["--host-ram-gb", "0"], 2, "host RAM budget must be positive and finite, got 0.0"),
    (["--host-ram-gb", "nan"], 2, "host RAM budget must be positive and finite"),
    (["--host-ram-experts", "1", "--disk-calibration", "CAL"], 2, "smaller than top-k (2): every set must fit (--host-ram-gb)"),
    (["--host-ram-experts", "4"], 2, "needs the disk's read curve: --disk-calibration FILE"),
    (["--disk-mode", "direct"], 2, "the disk flags need a host RAM budget"),
    (["--host-ram-experts", "4", "--disk-calibration", "MISSING"], 1, "missing.json"),
    (["--host-ram-experts", "4", "--disk-calibration", "CAL", "--disk-queue-depth", "3"], 2,
     "no direct point at block 4096 bytes, queue depth 3 (measured BLOCKxDEPTH: 4096x1) (--disk-block)"),
])
def test_simulate_bad_budget_one_line(tmp_path, capsys, argv, code, says):
    trace = tmp_path / "t.parquet"
    write_trace(trace, [[0, 1], [1, 2]], num_experts=4)
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"disk": {"direct": [{"block_bytes": 4096, "queue_depth": 1, "latency_s": 0.001,
                                                    "bytes_per_s": 1e9}],
                                        "default": {"mode": "direct", "block_bytes": 4096, "queue_depth": 1}}}))
    argv = [str(cal) if a == "CAL" else str(tmp_path / "missing.json") if a == "MISSING" else a for a in argv]
    got, _, err = run_main(["simulate", trace, "--policy", "lru", "--cache-size", 2, "--hardware", "a6000",
                            *argv], capsys)
    assert got == code and len(err) == 1 and says in err[0], err


def test_calibrate_disk_on_a_path_it_cannot_write(tmp_path, capsys):
    afile = tmp_path / "plain"
    afile.write_text("x")
    code, _, err = run_main(["calibrate", "--disk", afile / "sub", "-o", tmp_path / "o.json"], capsys)
    assert code == 1 and len(err) == 1 and f"{afile / 'sub'}: cannot write a scratch file there" in err[0], err
    assert not (tmp_path / "o.json").exists()
    if os.geteuid() != 0:   # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        code, _, err = run_main(["calibrate", "--disk", ro, "-o", tmp_path / "o.json"], capsys)
        assert code == 1 and len(err) == 1 and "cannot write a scratch file there" in err[0]


@pytest.mark.parametrize("direct", [True, False])
def test_reader_replays_the_brute_force_miss_stream(tmp_path, direct):
    from moesim.engine import disk_reader

    rng = np.random.default_rng(7)
    L, E, k, host = 2, 5, 3, 4
    sets = [rng.permutation(E)[:2].tolist() for _ in range(40 * L)]
    t = write_trace(tmp_path / "t.parquet", sets, num_layers=L, num_experts=E)
    disk_reader.write_expert_file(tmp_path / "experts.bin", L * E, 8192)
    misses = disk_reader.gpu_misses(t, "lru", k)
    g, h, dsk = brute_tiers(sets, [i % L for i in range(len(sets))], E, k, host, "lru", "fifo")
    for every in (0, 3):   # the micro-benchmark samples taken during a run change nothing it counts
        with disk_bench.Reader(tmp_path / "experts.bin", 4096, 2, direct) as reader:
            got = disk_reader.replay_reads(reader, misses, E, 8192, host, "fifo", sample_every=every)
        assert (got["host_hits"], got["reads"]) == (h, dsk)
        assert len(got["sample_s"]) == (dsk // every if every else 0)
    assert sum(len(m) for _, m in misses) == len(sets) * 2 - g
    _, d = tiers(t, k, host, "lru", "fifo")
    assert d["host_tier"]["disk_reads"] == got["reads"]


def test_scratch_file_has_no_repeated_mib(tmp_path):
    path = tmp_path / "f.bin"
    disk_bench.write_scratch(path, 3 << 20)
    data = path.read_bytes()
    assert len(data) == 3 << 20 and len({data[i:i + (1 << 20)] for i in range(0, 3 << 20, 1 << 20)}) == 3


@pytest.mark.parametrize("direct", [True, False])
def test_read_experts_and_the_pool_read_whole_experts(tmp_path, direct):
    path, xb, slots = tmp_path / "f.bin", 8192, 6
    disk_bench.write_scratch(path, slots * xb)
    data = path.read_bytes()
    experts = [data[i * xb:(i + 1) * xb] for i in range(slots)]
    assert len(set(experts)) == slots
    with disk_bench.Reader(path, 4096, 2, direct) as rd:
        pool, held = disk_bench.read_pool(rd, 8, xb)
        # each buffer filled once, from expert i of the file (round the file)
        assert held == [0, 1, 2, 3, 4, 5, 0, 1] and [bytes(b) for b in pool] == [experts[i] for i in held]
        times = disk_bench.read_experts(rd, xb, slots, 7, random.Random(1), pool)
        assert len(times) == 7 and min(times) > 0
        # every read a whole expert at an expert-aligned offset, into the buffers in turn
        assert all(bytes(b) in experts for b in pool)
        for b in pool:
            b.close()


def test_point_summary_means_medians_and_line():
    p = disk_bench.point_summary(8192, 2, {8192: [3.0, 3.0, 3.0], 4096: [1.0, 1.0, 4.0]})
    assert p["mean_s"] == [[4096, 2.0], [8192, 3.0]] and p["median_s"] == [[4096, 1.0], [8192, 3.0]]
    assert p["block_bytes"] == 8192 and p["queue_depth"] == 2
    # the line through the means (not the medians): 1 s + 4096 bytes/s
    assert p["latency_s"] == pytest.approx(1.0) and p["bytes_per_s"] == pytest.approx(4096)
    one = disk_bench.point_summary(8192, 1, {8192: [0.002, 0.004]})   # one size: through the origin
    assert one["latency_s"] == 0 and one["bytes_per_s"] == pytest.approx(8192 / 0.003)


def test_calibration_points_take_turns(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    disk_bench.write_scratch(path, 1 << 20)
    calls = []
    real = disk_bench.read_experts

    def logged(reader, n, slots, count, rng, dests):
        calls.append((reader.block, reader.queue_depth, n, count))
        return real(reader, n, slots, count, rng, dests)

    monkeypatch.setattr(disk_bench, "read_experts", logged)
    points, methods = disk_bench.measure_mode(path, 1 << 20, [4096, 8192], [1, 2], [8192, 16384], 7, random.Random(0),
                                              True)
    assert [(p["block_bytes"], p["queue_depth"]) for p in points] == [(4096, 1), (4096, 2), (8192, 1), (8192, 2)]
    assert methods <= {"o_direct", "fadvise_dontneed"}
    # 6 rounds (7 reads: 2 + 1 x 5), each round every point once, each size once per point
    order = [(b, q) for b, q, _, _ in calls[::2]]
    assert order == [(4096, 1), (4096, 2), (8192, 1), (8192, 2)] * 6
    assert [c for _, _, _, c in calls[::8]] == [2, 1, 1, 1, 1, 1]
    for b, q in order[:4]:
        for n in (8192, 16384):
            assert sum(c for bb, qq, nn, c in calls if (bb, qq, nn) == (b, q, n)) == 7
