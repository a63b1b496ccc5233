"""The import contracts (pyproject ``[tool.importlinter]``, run by ``make test``): they cover every part of
the package, the package keeps them, and an import that points up breaks them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="import-linter not installed (pip install '.[test]')")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moesim"


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def _layered() -> set[str]:
    names: set[str] = set()
    for contract in _config()["contracts"]:
        for layer in contract.get("layers", []):
            names |= {part.strip() for part in layer.split("|")}
    return names


def _lint(root: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` over the package at ``root`` with this repository's contracts."""
    config = tmp_path / "importlinter.toml"
    shutil.copy(ROOT / "pyproject.toml", config)
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(config)!r}, no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_every_subpackage_and_module_is_in_a_layer():
    parts = {f"moesim.{p.stem}" for p in PACKAGE.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and not p.stem.startswith("__"))}
    assert parts - _layered() == set(), "add the new part of moesim to a layer in pyproject [tool.importlinter]"
    # every directory of Python code is a regular package: import-linter (and setuptools' find) skip the rest
    code_dirs = {p.parent for p in PACKAGE.rglob("*.py")}
    assert {d for d in code_dirs if not (d / "__init__.py").exists()} == set()


def test_the_documented_direction():
    layers = [[p.strip() for p in layer.split("|")] for layer in _config()["contracts"][0]["layers"]]
    rank = {name: i for i, layer in enumerate(layers) for name in layer}
    # the README's direction: recorder -> traces; simulator -> traces, policies; engine -> simulator,
    # policies; analysis -> simulator, traces; commands -> anything (a lower rank is a higher layer)
    for upper, lower in [("recorder", "traces"), ("simulator", "traces"), ("simulator", "policies"),
                         ("engine", "simulator"), ("engine", "policies"), ("analysis", "simulator"),
                         ("analysis", "traces"), ("commands", "engine"), ("commands", "sweep")]:
        assert rank[f"moesim.{upper}"] < rank[f"moesim.{lower}"], (upper, lower)
    assert ["moesim.traces", "moesim.policies"] in layers   # independent: neither imports the other


def test_the_package_keeps_its_contracts_and_an_upward_import_breaks_them(tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(PACKAGE, copy / "moesim", ignore=shutil.ignore_patterns("__pycache__", "data"))
    kept = _lint(copy, tmp_path)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    (copy / "moesim" / "policies" / "upward.py").write_text("from moesim.simulator import replay  # noqa\n")
    broken = _lint(copy, tmp_path)
    assert broken.returncode != 0
    assert "moesim.policies.upward -> moesim.simulator.replay" in broken.stdout
