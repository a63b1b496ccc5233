"""Helpers shared by subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from moesim.errors import UsageError


def add_force_arg(p: argparse.ArgumentParser) -> None:
    """``--force``: the only way a command replaces an existing output file (see ``refuse_overwrite``)."""
    p.add_argument("--force", action="store_true", help="overwrite output files that already exist")


def add_output_arg(p: argparse.ArgumentParser, help_text: str) -> None:
    """The output file, positional (``moesim import ... OUT``) or as ``-o OUT`` like every other command;
    :func:`output_path` reads it."""
    p.add_argument("output", nargs="?", help=f"{help_text} (or give it as -o OUT)")
    p.add_argument("-o", "--output", dest="output_option", metavar="OUT", help=help_text)


def output_path(args: argparse.Namespace) -> str:
    """The output of :func:`add_output_arg`: exactly one of the two spellings."""
    if args.output and args.output_option:
        raise UsageError(f"output given twice ({args.output!r} and -o {args.output_option!r}); give one")
    if not (args.output or args.output_option):
        raise UsageError("no output file given (OUT.parquet or -o OUT.parquet)")
    return args.output or args.output_option


def _int_at_least(text: str, minimum: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= {minimum}")
    return v


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return v


def positive_float(text: str) -> float:
    v = non_negative_float(text)
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return v


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def parse_params(pairs: list[str] | None) -> dict[str, Any]:
    """``--param key=value`` pairs; values parsed as JSON when they can be (numbers, true/false)."""
    out: dict[str, Any] = {}
    for item in pairs or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--param expects KEY=VALUE, got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except ValueError:
            out[key.replace("-", "_")] = value
    return out


def require_torch_device(device: str) -> None:
    """``--device``: a usage error (one line, exit 2) for a device this torch cannot use -- CUDA on a
    CPU-only build or machine, a GPU index past the last one, a name torch does not know."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device}: not a torch device (cpu, cuda or cuda:N)") from None
    if dev.type != "cuda":
        return
    from moesim.engine.cuda import cuda_missing

    if why := cuda_missing():
        raise UsageError(f"--device {device}: CUDA is not available here ({why}); use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: CUDA is available but has only {torch.cuda.device_count()} device(s)")


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, separators=(", ", ": "))
    sys.stdout.write("\n")


def print_table(headers: list[str], rows: list[list[Any]], out=None) -> None:
    out = out or sys.stdout
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    out.write("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for r in cells:
        out.write("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + "\n")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


# what the command line says to change a library setting (moesim.errors.SettingError.setting): its flag,
# followed by the value that works when the error names one. Settings whose errors already say what to
# change (an unknown policy's message lists the known ones) are not here: a flag would add nothing.
SETTING_HINTS = {"scope": "--scope", "semantics": "--semantics", "phase": "--phase", "hardware": "--hardware",
                 "traces": "--trace", "policies": "--policy", "cache_sizes": "--cache-size",
                 "pcie_gbps": "--pcie-gbps", "pcie_latency_us": "--pcie-latency-us", "svg": "name it .svg, or drop --svg",
                 "quant": "--quant", "predict_distance": "--predict-distance", "dtype": "--dtype",
                 "model": "--model", "tokens": "--tokens", "sequences": "--sequences",
                 "force": "pass --force to overwrite it", "execution": "--execution", "cpu_threads": "--cpu-threads",
                 "cpu_speed": "--cpu-speed", "lowbit_format": "--lowbit-format",
                 "geometry": "--geometry", "lookahead": "--lookahead", "prefetch_budget": "--prefetch-budget",
                 "total_slots": "--total-slots", "expert_bytes": "--expert-bytes N",
                 "expert_ms": "--expert-ms MS", "vs_bound": "--vs-bound", "objective": "--objective",
                 "offload": "--offload", "max_gpu_gb": "--max-gpu-gb",
                 "host_ram": "--host-ram-gb", "host_policy": "--host-policy",
                 "disk_mode": "--disk-mode", "disk_block": "--disk-block", "disk_queue_depth": "--disk-queue-depth",
                 "disk_sizes": "--disk-sizes-kb", "disk_file": "--disk-file-mb",
                 "map": "--map", "where": "--where", "num_experts": "--num-experts", "num_layers": "--num-layers",
                 "layers_and_model": "check --num-layers / --model", "prefetch": "--prefetch",
                 "recover": "moesim record --recover",
                 "recorded_predictions": "moesim record --model MODEL -o OUT.parquet --predict-distance",
                 "recorded_pred_logits": "moesim record --model MODEL -o OUT.parquet --pred-logits --predict-distance"}


def error_line(exc: Exception) -> str:
    """The message of a library error as the command line says it: a :class:`SettingError` (or a
    :class:`DataError` that names a setting) gains what to change on the command line, with the value
    that works when there is one ("... (--scope layer)")."""
    from moesim.errors import DataError, SettingError

    if isinstance(exc, SettingError | DataError):
        return _with_flag(exc.problem if isinstance(exc, SettingError) else str(exc), exc.setting, exc.fix)
    return str(exc)


def note_line(note: str) -> str:
    """A library's remark (a :class:`~moesim.errors.SettingNote` names its setting) as the command line
    says it: with the flag that changes it, as :func:`error_line` does for errors."""
    return _with_flag(str(note), getattr(note, "setting", None), getattr(note, "fix", None))


def _with_flag(text: str, setting: str | None, fix: str | None) -> str:
    if setting not in SETTING_HINTS:
        return text
    return f"{text} ({' '.join(x for x in (SETTING_HINTS[setting], fix) if x)})"
