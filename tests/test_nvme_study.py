"""The NVMe study's driver on tiny settings: every run of every cell replays the simulator's disk reads
exactly and is priced by the micro-benchmark reads sampled during it (never by its own reads), and the
report maker renders the result."""

from __future__ import annotations

import json

import pytest

from studies.nvme import make_report, run_nvme


def test_driver_prices_each_run_by_its_own_samples(tmp_path):
    point = {"block_bytes": 65536, "queue_depth": 2, "latency_s": 0.0, "bytes_per_s": 1e9}
    cal = {"name": "tiny", "disk": {"direct": [point], "page_cache": [point], "read_sizes": [65536],
                                    "default": {"mode": "direct", "block_bytes": 65536, "queue_depth": 2}}}
    (tmp_path / "cal.json").write_text(json.dumps(cal))
    out = tmp_path / "validate.json"
    assert run_nvme.main(["--calibration", str(tmp_path / "cal.json"), "--scratch", str(tmp_path), "-o", str(out),
                          "--expert-kb", "64", "--tokens", "2", "--repeats", "2", "--budgets", "0.5",
                          "--block-kb", "64", "--queue-depth", "2", "--sample-every", "3"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.json", "validate.json"]   # the expert file is gone
    val = json.loads(out.read_text())
    assert val["format"] == 2 and len(val["cells"]) == 4
    assert {c["mode"] for c in val["cells"]} == {"direct", "page_cache"}
    for c in val["cells"]:
        assert c["reads_equal_every_run"] and c["sim_disk_reads"] == c["real_disk_reads"] > 0
        assert len(c["runs"]) == 2 and len(c["run_errors"]) == 2
        for r in c["runs"]:
            assert r["samples"] == r["reads"] // 3
            # the simulator's disk time is its reads at the samples' mean read, not at the run's own
            assert r["sim_disk_ms"] == pytest.approx(r["sim_disk_reads"] * r["sample_read_ms_mean"], rel=1e-3)
            assert r["sim_disk_ms"] / (r["read_s"] * 1e3) - 1 in c["run_errors"]
    lines = make_report.sampled_section(val, cal)
    assert any("disk reads (sim / real)" in line for line in lines)
    assert any(line.startswith("Disk reads: equal in every run of every cell.") for line in lines)
