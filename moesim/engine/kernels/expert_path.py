"""Which path an expert's FFN takes on a GPU: the fused low-bit kernels, or dequantise then cuBLAS.

The fused kernels read each packed byte once, which wins where the expert is bound by its weight bytes
(batch 1: 0.108 ms against 0.315 ms on an H100). With more rows the tensor-core tiles of the fused
kernel have to dequantise every tile again per row block, and at batch 16 the old path, one
dequantisation to bf16 and cuBLAS on it, measured faster (0.316 ms against 0.352 ms). So the choice is
a measurement, made like the kernel's tile choice (``lowbit._tuned_config``): at the first call for a
key (format, hidden, ffn, batch rows, dtype, device) -- an engine's warm-up, before any CUDA graph is
captured -- every path's output is compared with the eager reference (a path that differs by more than
:data:`AGREEMENT_TOL` is never chosen), each path that agrees is timed (``triton.testing.do_bench``),
and the faster one serves that key from then on. The times stay in :data:`EXPERT_PATHS` for a driver to
report. A key first met during capture or torch.compile tracing (nothing may be timed there) takes the
fused path without recording a decision. When no path ran or agreed, the eager reference serves.

No Triton here: the decision is testable on a CPU with injected timings.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

FUSED, DEQUANT, REFERENCE = "fused", "dequant", "reference"
PATHS = (FUSED, DEQUANT)   # the candidates, in this order; FUSED also serves keys that cannot be timed
AGREEMENT_TOL = 2e-2   # max |y - y_ref| / max |y_ref|; the fused paths sit within 7e-3 of the reference
# per key: each candidate's time in ms (inf: it failed, or its output disagreed with the reference)
EXPERT_PATHS: dict[tuple, dict[str, float]] = {}
PATH_ERRORS: dict[tuple, str] = {}   # (key, path) -> why that path is out
_FORCED: dict[str, str | None] = {"path": None}


def path_key(spec_name: str, hidden: int, ffn: int, x) -> tuple:
    """The tuning key of an expert call on ``x`` (rows, hidden)."""
    return (spec_name, hidden, ffn, int(x.shape[0]), str(x.dtype), str(x.device))


def max_rel_diff(got, ref) -> float:
    """max |got - ref| / max |ref| in fp32 (NaN where ``got`` has NaNs: never within a tolerance)."""
    ref = ref.float()
    diff = (got.float() - ref).abs().max()
    return float(diff) / (float(ref.abs().max()) or 1.0)


def time_ms(fn: Callable[[], Any]) -> float:
    """GPU time of one call of ``fn`` in ms, as the kernel tile tuner times its candidates."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=5, rep=20))


@contextlib.contextmanager
def only_path(path: str) -> Iterator[None]:
    """Inside: every expert call takes ``path`` ("fused", "dequant" or "reference"), whatever was chosen
    (a driver timing the candidates against each other; decisions are neither made nor changed here)."""
    if path not in (*PATHS, REFERENCE):
        raise ValueError(f"unknown expert path {path!r} (known: {(*PATHS, REFERENCE)})")
    old = _FORCED["path"]
    _FORCED["path"] = path
    try:
        yield
    finally:
        _FORCED["path"] = old


def chosen(key: tuple) -> str:
    """The decided path of ``key``: its fastest candidate that ran and agreed, else the reference."""
    ok = {p: t for p, t in EXPERT_PATHS[key].items() if math.isfinite(t)}
    return min(ok, key=ok.get) if ok else REFERENCE


def choose(key: tuple, candidates: dict[str, Callable[[], Any]], reference: Callable[[], Any],
           can_time: bool = True, timer: Callable[[Callable[[], Any]], float] | None = None) -> str:
    """The path for ``key``: decided once (see the module docstring) and replayed after. ``candidates``:
    path -> a call computing the expert that way; ``reference``: the eager dequantise-then-matmul output
    they must agree with; ``can_time``: False inside CUDA-graph capture or compile tracing; ``timer``:
    ms per call of a candidate (default :func:`time_ms`)."""
    if _FORCED["path"] is not None:
        return _FORCED["path"]
    if key in EXPERT_PATHS:
        return chosen(key)
    if not can_time:
        return FUSED
    want = reference()
    times: dict[str, float] = {}
    for path, fn in candidates.items():
        try:
            err = max_rel_diff(fn(), want)   # the first call also compiles and tunes the path's kernels
            if not err <= AGREEMENT_TOL:
                PATH_ERRORS[(key, path)] = f"disagrees with the reference: max relative difference {err:.3g}"
                times[path] = math.inf
                continue
            times[path] = (timer or time_ms)(fn)
        except Exception as exc:   # noqa: BLE001 - a path that cannot run must not stop the engine
            PATH_ERRORS[(key, path)] = f"{type(exc).__name__}: {str(exc)[:400]}"
            times[path] = math.inf
    EXPERT_PATHS[key] = times
    return chosen(key)


def decision(key: tuple) -> dict[str, Any] | None:
    """``key``'s decision as a JSON row (its shape, each candidate's ms -- None: out --, why a candidate
    is out, the choice), or None while undecided."""
    if key not in EXPERT_PATHS:
        return None
    times = EXPERT_PATHS[key]
    fmt, hidden, ffn, rows, dtype, device = key
    return {"format": fmt, "hidden": hidden, "ffn": ffn, "batch": rows, "dtype": dtype, "device": device,
            "ms": {p: (t if math.isfinite(t) else None) for p, t in times.items()},
            "errors": {p: PATH_ERRORS[(key, p)] for p in times if (key, p) in PATH_ERRORS},
            "chosen": chosen(key)}


def decisions() -> list[dict[str, Any]]:
    """Every decided key as a JSON row (:func:`decision`)."""
    return [decision(key) for key in EXPERT_PATHS]
