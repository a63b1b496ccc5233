"""Every study's report rebuilds from its committed raw data, byte for byte (studies/make_reports.py).

Reports whose simulated side needs the shared real trace are re-rendered from their committed .json (the
trace is never in the repository); the others are rebuilt in full from raw/. A figure is compared by
its pixel size (PNG bytes depend on the matplotlib and libpng builds), every other file byte for byte.
The package data the tools generate (tools/make_hardware_presets.py) is checked the same way.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studies.make_reports import REPORTS  # noqa: E402

NO_TRACE = ROOT / "no-such-trace.jsonl"   # forces the render-from-json path, as on CI


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (and proof the file is a PNG)."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


@pytest.mark.parametrize("report", REPORTS, ids=[r.name for r in REPORTS])
def test_report_rebuilds_byte_for_byte(report, tmp_path):
    proc = subprocess.run([sys.executable, "studies/make_reports.py", "--only", report.name, "--out-dir",
                           str(tmp_path), "--real", str(NO_TRACE)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = sorted(p.name for p in (tmp_path / report.study).iterdir())
    assert written and set(written) <= set(report.outputs), written
    assert any(n.endswith(".md") or n.endswith(".png") for n in written)
    for name in written:
        new, committed = tmp_path / report.study / name, ROOT / "studies" / report.study / name
        if name.endswith(".png"):
            assert png_size(new) == png_size(committed), f"{name}: figure size differs from the committed one"
        else:
            assert new.read_bytes() == committed.read_bytes(), (
                f"studies/{report.study}/{name} is not what its maker writes from the committed data: "
                "run `make reports` and commit the result")


def test_every_report_file_is_registered():
    """Every .md / .json / .png beside a study's maker is one a registered maker writes, or named in the
    study index as written by its device run (so no report is left that nothing rebuilds unnoticed)."""
    made = {f"studies/{r.study}/{o}" for r in REPORTS for o in r.outputs}
    index = (ROOT / "studies" / "README.md").read_text()
    for path in sorted((ROOT / "studies").glob("*/*")):
        rel = str(path.relative_to(ROOT))
        if path.suffix in (".md", ".json", ".png", ".txt") and path.name != "README.md":
            assert rel in made or f"`{rel}`" in index, f"{rel}: no maker writes it and the index does not name it"


def test_make_reports_names_unknown_reports_in_one_line():
    proc = subprocess.run([sys.executable, "studies/make_reports.py", "--only", "nope", "--out-dir", "/nonexistent"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nope" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_hardware_presets_regenerate_byte_for_byte(tmp_path):
    proc = subprocess.run([sys.executable, "tools/make_hardware_presets.py", "-o", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    written = sorted(tmp_path.glob("*.json"))
    assert written
    for path in written:
        shipped = ROOT / "moesim" / "data" / "hardware" / path.name
        assert path.read_bytes() == shipped.read_bytes(), f"{shipped} differs from what tools/make_hardware_presets.py writes"
