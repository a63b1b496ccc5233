"""The notebooks execute from a clean state (nbclient, kernel = this interpreter) and are stored
without outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.fixture()
def kernel_here(tmp_path, monkeypatch) -> str:
    """A kernelspec that runs this very interpreter (the venv's), whatever else is installed."""
    spec = tmp_path / "jupyter" / "kernels" / "moesim-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "moesim test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return "moesim-test"


def test_both_notebooks_present():
    assert {p.name for p in NOTEBOOKS} >= {"seed_paper.ipynb", "tutorial_policy.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has stored outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, kernel_here):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=kernel_here, timeout=300,
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    if path.stem == "seed_paper":  # heatmap, reuse, mrc, prefetch, segment bound, raster (+ speed with timing)
        assert len(images) >= 6
        assert "rows" in text and "mean gap OPT-LRU" in text
        # the synthetic stand-in (no real trace here) is named in every table, not only in one printed line
        tables = [o["data"].get("text/html", o["data"].get("text/plain", "")) for o in outputs
                  if o.output_type in ("execute_result", "display_data") and "image/png" not in o.get("data", {})]
        assert len(tables) >= 4
        kind = "SYNTHETIC" if "SYNTHETIC stand-in" in text else "real"
        assert all(kind in t for t in tables), [t[:200] for t in tables if kind not in t]
        assert f"[{kind} trace] mean gap OPT-LRU" in text
    elif path.stem == "learned_routing":  # the prediction figure; the accuracy, threshold and speed tables
        assert len(images) >= 1
        assert "speculative       1" in text and "tau" in text and "published" in text and "oracle" in text
    else:  # the comparison plot, shown once; the limiting-case check ran
        assert len(images) == 1
        assert "window-lfu with an unbounded window == lfu at every size" in text
        assert "compiled aged-lfu == plain-class aged-lfu at every size" in text


def _imported_modules(path: Path) -> set[str]:
    import re

    nb = nbformat.read(path, as_version=4)
    found = set()
    for cell in nb.cells:
        if cell.cell_type == "code":
            found |= set(re.findall(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", cell.source, flags=re.M))
    return found


def _requirement_names(requirements: list[str]) -> set[str]:
    import re

    return {re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_notebooks_extra_covers_running_them():
    """``pip install 'moesim[notebooks]'`` gives Jupyter and a headless runner, each with a version range,
    and every third-party module a notebook imports comes from the base install or that extra; the README
    says how to install it."""
    import importlib.metadata
    import tomllib

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extra = project["optional-dependencies"]["notebooks"]
    assert {"jupyter", "nbclient", "ipykernel"} <= _requirement_names(extra)
    assert all("<" in r and ">=" in r for r in extra), extra
    provided = _requirement_names(project["dependencies"] + extra)
    dists = importlib.metadata.packages_distributions()
    for path in NOTEBOOKS:
        for module in _imported_modules(path) - set(sys.stdlib_module_names) - {"moesim"}:
            names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
            assert names & provided, f"{path.name} imports {module}, which no install extra provides"
    assert "[notebooks]" in (root / "README.md").read_text()
