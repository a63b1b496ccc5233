"""From raw GPU measurements (benchmarks/gpu_validate.py, ``moesim calibrate``) to the cost model's
calibration JSON (the format of ``moesim.simulator.cost_model.CostModel``; see docs/timing.md).

Raw file keys: ``h2d`` [{bytes, ms, gb_per_s}], ``expert`` {quant[+compile]: {expert_bytes, curve:
[{tokens, ms}]}}, ``attention`` [{context, compiled, ms}] (attention + gate of one layer),
``lm_head_ms``, ``compile_ok``; optionally ``engine`` {all_resident_ms_per_token, layers}.
All GPU times are measured with CUDA events after a GPU sleep, so they are device times, not launch
overhead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moesim.errors import DataError


def _fit_latency(h2d: list[dict]) -> tuple[float, float]:
    """Least-squares ``ms = latency + bytes / bandwidth`` over copies of >= 4 MB (the linear regime)."""
    big = [r for r in h2d if r["bytes"] >= (4 << 20)] or h2d
    x = np.array([r["bytes"] for r in big], float)
    y = np.array([r["ms"] for r in big], float) * 1e-3
    slope, intercept = np.polyfit(x, y, 1)
    return max(float(intercept), 0.0), 1.0 / float(slope)


def to_cost_model(raw: dict[str, Any], name: str = "h200", description: str = "",
                  path: object = None) -> dict[str, Any]:
    """Build a calibration dict (CostModel.from_dict format) from raw measurements."""
    try:
        h2d = raw["h2d"]
        latency_s, bw = _fit_latency(h2d)
        compiled = bool(raw.get("compile_ok"))
        expert_compute: dict[str, list[list[float]]] = {}
        expert_bytes: dict[str, int] = {}
        for key, table in raw["expert"].items():
            quant, _, variant = key.partition("+")
            if compiled and not variant and f"{quant}+compile" in raw["expert"]:
                continue   # the engine runs the compiled kernels when they work
            expert_compute[quant] = [[float(r["tokens"]), float(r["ms"]) * 1e-3] for r in table["curve"]]
            expert_bytes[quant] = int(table["expert_bytes"])
        att = [r for r in raw["attention"] if bool(r.get("compiled", False)) == compiled] or raw["attention"]
        ctx = np.array([r["context"] for r in att], float)
        ms = np.array([r["ms"] for r in att], float) * 1e-3
        per_ctx, base = np.polyfit(ctx, ms, 1) if len(att) > 1 else (0.0, float(ms[0]))
        token_s = float(raw["lm_head_ms"]) * 1e-3
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise DataError(path, f"not a raw calibration file ({type(exc).__name__}: {exc})") from None
    return {
        "name": name,
        "description": description or "calibrated by moesim calibrate on the lent GPU",
        "sources": {
            "pcie": "pinned host-to-device copies on a dedicated stream, CUDA events; latency and bandwidth "
                    "fitted over copies >= 4 MB, curve = every measured size",
            "expert_compute": "dequantise (torch.compile'd hqq-style kernels) + SwiGLU FFN of one expert, GPU time",
            "layer": "attention (bf16 q/k/v/o, GQA SDPA over the KV cache) + gate of one layer, GPU time",
            "token": "LM head (vocab x hidden bf16), GPU time",
        },
        "pcie": {"latency_us": latency_s * 1e6, "bandwidth_gbps": bw / 1e9, "copy_engines": 1,
                 "curve": [[int(r["bytes"]), float(r["ms"]) * 1e-3] for r in h2d]},
        "expert_bytes": expert_bytes,
        "quantization": "hqq2" if "hqq2" in expert_compute else next(iter(expert_compute)),
        "expert_compute": expert_compute,
        "layer": {"base_s": max(float(base), 0.0), "per_token_s": 0.0, "per_context_s": max(float(per_ctx), 0.0)},
        "token": {"base_s": token_s, "per_token_s": 0.0},
    }
