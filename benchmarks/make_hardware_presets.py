"""Writes moesim/data/hardware/*.json: public-spec estimates (and the issue's H200 measurements)."""
import json

from moesim.simulator.cost_model import DEFAULT_EXPERT_BYTES, MIXTRAL_EXPERT_PARAMS

FLOPS_PER_TOKEN = 2 * MIXTRAL_EXPERT_PARAMS

def table(mem_gbps, tflops, eff_mem, dequant_s, quant):
    pts = []
    for tok in (1, 8, 32, 128, 512, 2048):
        mem = DEFAULT_EXPERT_BYTES[quant] / (mem_gbps * 1e9 * eff_mem)
        comp = FLOPS_PER_TOKEN * tok / (tflops * 1e12 * 0.6)
        pts.append([tok, round(max(mem, comp) + dequant_s, 7)])
    return pts

def preset(name, desc, pcie_gbps, lat_us, mem_gbps, tflops, layer_ms, token_ms, sources, bf16_1tok_ms=None):
    ec = {
        "bf16": table(mem_gbps, tflops, 0.8, 0.0, "bf16"),
        "hqq4": table(mem_gbps, tflops, 0.5, 60e-6, "hqq4"),
        "hqq2": table(mem_gbps, tflops, 0.5, 60e-6, "hqq2"),
    }
    if bf16_1tok_ms:
        ec["bf16"] = [[t, bf16_1tok_ms * 1e-3 if t <= 128 else s] for t, s in ec["bf16"]]
    return {"name": name, "description": desc, "sources": sources,
            "pcie": {"latency_us": lat_us, "bandwidth_gbps": pcie_gbps, "copy_engines": 1, "curve": []},
            "expert_bytes": DEFAULT_EXPERT_BYTES, "quantization": "hqq2", "expert_compute": ec,
            "layer": {"base_s": layer_ms * 1e-3, "per_token_s": 2e-6, "per_context_s": 2e-9},
            "token": {"base_s": token_ms * 1e-3, "per_token_s": 5e-6}}

GEN4 = "PCIe 4.0 x16: 31.5 GB/s raw; ~24-26 GB/s pinned host-to-device is what cudaMemcpy/bandwidthTest reach in practice"
COMMON = {
    "expert_compute": "max(packed expert bytes / (memory bandwidth x efficiency 0.8 bf16, 0.5 hqq), 2 x params x tokens / (0.6 x dense bf16 peak)) + 60 us dequantisation launch overhead for hqq",
    "layer": "Mixtral attention with 4-bit weights + gate + norms at batch 1: weight bytes / memory bandwidth plus ~20 kernel launches (~10 us each) in eager PyTorch",
    "token": "embedding + LM head (32000 x 4096 bf16 = 262 MB read) + sampling",
    "expert_bytes": "Mixtral-8x7B expert = 3 x 4096 x 14336 params; hqq2 = 2 bits + 8-bit scale/zero per group of 16 (mixtral-offloading's format); hqq4 = 4 bits + fp16 scale/zero per 64",
}
presets = {
    "h200": preset("h200", "NVIDIA H200 SXM (PCIe Gen5 x16 host link) -- issue #4 estimates; replaced by `moesim calibrate` output when available",
                   55.0, 19.0, 4800, 989, 0.15, 0.5,
                   {"pcie": "measured on this project's lent H200: pinned H2D ~55 GB/s at 32 MB+, ~19 us floor per copy (issue #4)",
                    "memory": "H200 datasheet: 4.8 TB/s HBM3e, 989 TFLOP/s dense bf16",
                    "bf16_expert": "measured ~0.10 ms for 1-128 tokens (issue #4)", **COMMON}, bf16_1tok_ms=0.10),
    "a100-pcie": preset("a100-pcie", "NVIDIA A100 40GB PCIe (Gen4 x16) -- public-spec estimate", 24.0, 10.0, 1555, 312, 0.25, 1.0,
                        {"pcie": GEN4, "memory": "A100 PCIe 40GB datasheet: 1,555 GB/s HBM2, 312 TFLOP/s dense bf16", **COMMON}),
    "a6000": preset("a6000", "NVIDIA RTX A6000 (Gen4 x16) -- public-spec estimate", 24.0, 10.0, 768, 155, 0.35, 1.5,
                    {"pcie": GEN4, "memory": "RTX A6000 datasheet: 768 GB/s GDDR6, ~155 TFLOP/s dense bf16 (tensor)", **COMMON}),
    "l40": preset("l40", "NVIDIA L40 (Gen4 x16) -- public-spec estimate", 24.0, 10.0, 864, 181, 0.30, 1.3,
                  {"pcie": GEN4, "memory": "L40 datasheet: 864 GB/s GDDR6, 181 TFLOP/s dense bf16", **COMMON}),
    "rtx3090": preset("rtx3090", "NVIDIA GeForce RTX 3090 (Gen4 x16) -- public-spec estimate", 24.0, 10.0, 936, 71, 0.30, 1.3,
                      {"pcie": GEN4, "memory": "RTX 3090 spec: 936 GB/s GDDR6X, ~71 TFLOP/s dense bf16 (tensor, fp32 accumulate)", **COMMON}),
}
for name, p in presets.items():
    with open(f"moesim/data/hardware/{name}.json", "w") as fh:
        json.dump(p, fh, indent=1)
        fh.write("\n")
