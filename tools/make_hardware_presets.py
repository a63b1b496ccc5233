"""Writes moesim/data/hardware/*.json (except h200.json, which is measured: `moesim calibrate`).

Every other preset is the H200's *measured* engine (studies/calibration/raw/calibration_h200.json, the engine's captured
pieces and compiled kernels) moved to another GPU by its datasheet numbers:

- expert compute (dequantise + SwiGLU FFN, per tokens routed): at batch 1 these kernels are memory
  bound (they write and re-read the dequantised bf16 weights), so the H200 time is scaled by the memory
  bandwidth ratio; a compute floor keeps large token counts honest:
  ``t(tokens) = max(t_h200(tokens) * BW_h200 / BW, 2 * params * tokens / (0.6 * dense bf16 peak))``
  (the H200's measured curve ends at 64 tokens; beyond it its last point stands for the memory part);
- layer (combine, norm, 4-bit q/k/v/o dequant, SDPA over the static KV cache, gate) and the final piece
  (combine, LM head): memory bound, scaled by the bandwidth ratio;
- the engine's per-token overhead (event waits and launch gaps, 0.403 ms measured) is host-side: kept;
- the engine terms (`engine` block: per-miss issue cost, routing hand-off, host copy issue) are host/driver
  costs: kept; so is the speculative predict piece (`predict_s`): a few tiny kernels (RMSNorm, a 4096 x 8
  router, top-k over 64 KB of weights) bound by launch latency inside the graph, not by bandwidth;
- host->device copies: pinned PCIe bandwidth of the slot (Gen4 x16 ~24 GB/s, Gen3 x16 ~12 GB/s in
  practice), 10 us per copy.

Run: ``python tools/make_hardware_presets.py -o moesim/data/hardware`` (from the repository root).
"""
from __future__ import annotations

import json
from pathlib import Path

from moesim.simulator.cost_model import MIXTRAL_EXPERT_PARAMS

ROOT = Path(__file__).resolve().parents[1]
H200 = {"bw_gbps": 4800.0, "tflops": 989.0, "sheet": "H200 SXM datasheet: 4.8 TB/s HBM3e, 989 TFLOP/s dense bf16"}
GEN4 = (24.0, "PCIe 4.0 x16: 31.5 GB/s raw; ~24 GB/s pinned host-to-device is what cudaMemcpy reaches in practice")
GEN3 = (12.0, "PCIe 3.0 x16: 15.8 GB/s raw; ~12 GB/s pinned host-to-device in practice")
GPUS = {
    # name: (description, memory GB/s, dense bf16/fp16 tensor TFLOP/s, datasheet line, PCIe)
    "a100-pcie": ("NVIDIA A100 40GB PCIe", 1555.0, 312.0, "A100 PCIe 40GB datasheet: 1,555 GB/s HBM2, 312 TFLOP/s dense bf16", GEN4),
    "a6000": ("NVIDIA RTX A6000", 768.0, 154.8, "RTX A6000 datasheet: 768 GB/s GDDR6, 154.8 TFLOP/s dense bf16 tensor", GEN4),
    "l40": ("NVIDIA L40", 864.0, 181.0, "L40 datasheet: 864 GB/s GDDR6, 181 TFLOP/s dense bf16 tensor", GEN4),
    "rtx3090": ("NVIDIA GeForce RTX 3090", 936.0, 71.0, "RTX 3090: 936 GB/s GDDR6X, 71 TFLOP/s dense bf16 tensor (fp32 accumulate)", GEN4),
    # the GPUs of mixtral-offloading's Table 2 (studies/mixtral_offloading_comparison/mixtral_offloading_comparison.md)
    "rtx3080-mobile": ("NVIDIA GeForce RTX 3080 Laptop GPU 16 GB", 448.0, 30.0,
                       "RTX 3080 Laptop 16 GB: 448 GB/s GDDR6 (14 Gbps, 256-bit); ~30 TFLOP/s dense fp16 tensor "
                       "(fp32 accumulate) at a ~1.5 GHz boost (varies with the laptop's power limit)", GEN4),
    "rtx3060": ("NVIDIA GeForce RTX 3060 12 GB", 360.0, 25.6,
                "RTX 3060 12 GB: 360 GB/s GDDR6, 25.6 TFLOP/s dense fp16 tensor (fp32 accumulate)", GEN4),
    "t4": ("NVIDIA T4 (e.g. Google Colab)", 320.0, 65.0, "T4 datasheet: 320 GB/s GDDR6, 65 TFLOP/s fp16 tensor", GEN3),
}
EXTRA_TOKENS = (128, 512, 2048)


def scaled_curve(points: list[list[float]], bw: float, tflops: float) -> list[list[float]]:
    ratio = H200["bw_gbps"] / bw
    pts = [[t, s * ratio] for t, s in points]
    last = pts[-1][1]
    pts += [[t, last] for t in EXTRA_TOKENS if t > points[-1][0]]
    return [[t, round(max(s, 2 * MIXTRAL_EXPERT_PARAMS * t / (0.6 * tflops * 1e12)), 9)] for t, s in pts]


def preset(name: str, h200: dict) -> dict:
    desc, bw, tflops, sheet, (pcie, pcie_src) = GPUS[name]
    ratio = H200["bw_gbps"] / bw
    overhead = h200["token"].get("engine_overhead_s", 0.0)
    token_pieces = h200["token"]["base_s"] - overhead
    return {
        "name": name,
        "description": f"{desc} (PCIe {'3.0' if pcie == GEN3[0] else '4.0'} x16): the H200's measured engine "
                       f"scaled by memory bandwidth ({bw:g} vs {H200['bw_gbps']:g} GB/s) and compute",
        "sources": {
            "pcie": pcie_src,
            "memory": f"{sheet}; reference {H200['sheet']}",
            "expert_compute": f"H200 measured (studies/calibration/raw/calibration_h200.json) x {ratio:.3f} (bandwidth ratio), "
                              "floored at 2 x params x tokens / (0.6 x dense peak)",
            "layer": f"H200 measured layer piece x {ratio:.3f}",
            "token": f"H200 final piece x {ratio:.3f} + the engine's per-token overhead "
                     f"({overhead * 1e3:.3f} ms, host-side, unscaled)",
            "engine": "the H200's measured engine terms (host/driver costs, unscaled)",
            "scaling": "tools/make_hardware_presets.py; docs/timing.md (Presets)",
        },
        "pcie": {"latency_us": 10.0, "bandwidth_gbps": pcie, "copy_engines": 1, "curve": []},
        "expert_bytes": h200["expert_bytes"],
        "quantization": "hqq2",
        "expert_compute": {q: scaled_curve(pts, bw, tflops) for q, pts in h200["expert_compute"].items()},
        "layer": {"base_s": round(h200["layer"]["base_s"] * ratio, 9), "per_token_s": 0.0,
                  "per_context_s": round(h200["layer"].get("per_context_s", 0.0) * ratio, 12)},
        "token": {"base_s": round(token_pieces * ratio + overhead, 9), "per_token_s": 0.0,
                  "engine_overhead_s": overhead},
        # the stream hops are the H200 engine's GPU-side gaps between its streams (CUPTI), measured on no
        # other GPU: left out (0), as before they existed
        "engine": {k: v for k, v in (h200.get("engine") or {}).items()
                   if k not in ("sources", "copy_hop_s", "ready_hop_s")}
                  | {"sources": {"all": "the H200's measured engine terms (studies/fidelity/fidelity_h200.md, "
                                        "studies/decoder/decoder_h200.md), unscaled: host/driver costs, and the predict "
                                        "piece, whose few tiny kernels (64 KB of router weights) are launch-latency "
                                        "bound, not bandwidth bound"}},
    }


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out-dir", required=True, type=Path,
                    help="folder for the preset files (the shipped ones: moesim/data/hardware)")
    out = ap.parse_args().out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    h200 = json.loads((ROOT / "moesim/data/hardware/h200.json").read_text())
    for name in GPUS:
        path = out / f"{name}.json"
        path.write_text(json.dumps(preset(name, h200), indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
