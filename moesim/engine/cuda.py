"""Whether CUDA can be used here, said in one line: the ``--device`` options of the commands and the GPU
scripts under benchmarks/ refuse a missing GPU up front instead of failing deep inside torch."""

from __future__ import annotations

import sys


def cuda_missing() -> str | None:
    """Why CUDA cannot be used in this process (a short phrase), or None when it can."""
    import torch

    if torch.cuda.is_available():
        return None
    return "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"


def exit_unless_cuda(script: str, cpu_run: str | None = "--cpu-check") -> None:
    """A GPU script on a machine without CUDA: one line on stderr naming ``cpu_run`` (the script's tiny
    CPU run, if it has one) and exit 2 -- never a traceback, never a silent fall-back to the CPU."""
    why = cuda_missing()
    if why is None:
        return
    hint = f"; {cpu_run} runs a tiny model on CPU (tests the script, numbers mean nothing)" if cpu_run else ""
    print(f"{script}: needs a CUDA GPU, and CUDA is not available here ({why}){hint}", file=sys.stderr)
    raise SystemExit(2)


def require_device(device: str, tiny: bool, script: str) -> None:
    """The scripts that take ``--device`` and ``--tiny``: a CUDA device needs CUDA; the CPU only ever runs
    the tiny model (full Mixtral-8x7B on the CPU is ~190 GB in fp32: killed, never useful)."""
    if device.startswith("cuda"):
        exit_unless_cuda(script)
    elif not tiny:
        print(f"{script}: --device {device} builds full Mixtral-8x7B, which only a GPU run does; "
              "--cpu-check (= --tiny --device cpu) runs a tiny model on CPU", file=sys.stderr)
        raise SystemExit(2)
