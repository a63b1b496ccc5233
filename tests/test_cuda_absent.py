"""Asking for CUDA where there is none is one line and exit 2, before any work: the ``--device`` of
``record`` / ``generate``, ``calibrate``, and every GPU script under benchmarks/ (which point at their
``--cpu-check`` run); gpu_decode / gpu_record never build full Mixtral-8x7B on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from moesim.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA_HERE = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available in this process")


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


@NO_CUDA_HERE
@pytest.mark.parametrize("argv", [
    ["record", "--model", "tiny-mixtral", "--device", "cuda", "--num-prompts", "1", "--max-new-tokens", "2"],
    ["record", "--model", "tiny-mixtral", "--device", "cuda:1", "--num-prompts", "1", "--max-new-tokens", "2"],
    ["generate", "--model", "MODEL", "--prompt-ids", "1,2", "--max-new-tokens", "2", "--cache-size", "2",
     "--policy", "lru", "--device", "cuda"],
    ["calibrate"],
], ids=["record", "record-index", "generate", "calibrate"])
def test_cuda_commands_say_cuda_is_not_available(argv, tmp_path, capsys):
    out = tmp_path / ("x.json" if argv[0] == "calibrate" else "x.parquet")
    argv = [a.replace("MODEL", str(tmp_path)) for a in argv] + ["--record" if argv[0] == "generate" else "-o", str(out)]
    code, err = _run(argv, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"moesim {argv[0]}: error: ") and "CUDA is not available" in err[0], err
    assert "AssertionError" not in err[0] and not out.exists() and not list(tmp_path.glob("x.parquet*"))


def test_unknown_device_is_one_usage_line(tmp_path, capsys):
    code, err = _run(["record", "--model", "tiny-mixtral", "--device", "gpu0", "-o", str(tmp_path / "x.parquet")],
                     capsys)
    assert code == 2 and err == ["moesim record: error: --device gpu0: not a torch device (cpu, cuda or cuda:N)"]


SCRIPTS = {  # each script's required arguments; OUT is where it would write
    "gpu_batch_timeline": ["--trace", "T", "--out", "OUT"],
    "gpu_decode": ["--out", "OUT"],
    "gpu_diagnose": ["T", "OUT"],
    "gpu_engine_sync": ["--out", "OUT"],
    "gpu_learned_replay": ["--trace", "T", "--out", "OUT"],
    "gpu_miss_cost": ["--out", "OUT"],
    "gpu_record": ["--out", "OUT"],
    "gpu_record_offload": ["--out", "OUT"],
    "gpu_residency_proof": ["--trace", "T", "--out", "OUT"],
    "gpu_stream_hops": ["--out", "OUT"],
    "gpu_validate": ["--trace", "T", "--out", "OUT"],
}


def _cap_memory() -> None:
    """A script that regressed into building full Mixtral on the CPU fails fast instead of eating the
    machine's memory (it wants ~190 GB)."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


# every study's GPU driver (studies/<study>/gpu_*.py); benchmarks/gpu_validate.py is the outside entry point
SCRIPT_PATHS = {p.stem: p for p in sorted((ROOT / "studies").glob("*/gpu_*.py"))}


def _script(name: str, args: list[str], tmp_path: Path, path: Path | None = None
            ) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    argv = [str(out) if a == "OUT" else str(tmp_path / "t.parquet") if a == "T" else a for a in args]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}  # no GPU, even on a GPU box
    proc = subprocess.run([sys.executable, str(path or SCRIPT_PATHS[name]), *argv], env=env,
                          capture_output=True, text=True, timeout=120, preexec_fn=_cap_memory)
    return proc, out


def test_every_gpu_script_is_listed():
    assert set(SCRIPT_PATHS) == set(SCRIPTS)


def test_the_outside_entry_point_refuses_too(tmp_path):
    """``python3 benchmarks/gpu_validate.py`` (CONTRACTS.md) runs the study's driver, refusal included."""
    proc, out = _script("gpu_validate", SCRIPTS["gpu_validate"], tmp_path, ROOT / "benchmarks" / "gpu_validate.py")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "needs a CUDA GPU" in err[0], proc.stderr[-2000:]
    assert not out.exists()


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_gpu_script_without_cuda_refuses_in_one_line(name, tmp_path):
    proc, out = _script(name, SCRIPTS[name], tmp_path)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert err[0].startswith(f"{name}.py: needs a CUDA GPU, and CUDA is not available here"), err
    assert ("--cpu-check" in err[0]) == (name != "gpu_diagnose")  # the one script without a CPU run
    assert not out.exists()


@pytest.mark.parametrize("name", ["gpu_decode", "gpu_record"])
def test_full_mixtral_is_never_built_on_the_cpu(name, tmp_path):
    proc, out = _script(name, [*SCRIPTS[name], "--device", "cpu"], tmp_path)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "builds full Mixtral-8x7B" in err[0], proc.stderr[-2000:]
    assert not out.exists()
