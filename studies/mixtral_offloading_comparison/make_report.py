"""mixtral-offloading's published tokens/s vs this simulator's engine profile of it (CPU only).

    python benchmarks/make_mixtral_offloading_comparison.py \
        --real ../shared/traces/real/mixtral-8x7b-instruct-fp8_humaneval-2_vllm.jsonl

Published (Eliseev & Mazur, arXiv 2312.17238, Table 2, "full algorithm", 2-bit experts): A100 3.061,
RTX 3080 Mobile 2.655, RTX 3060 2.278, T4 (Colab) 2.092 tokens/s. Their public engine
(github.com/dvmazur/mixtral-offloading, src/expert_cache.py, src/custom_layers.py) keeps an LRU cache of
experts per layer (the demo's ``offload_per_layer = 4``: 4 of 8 experts per layer on the GPU), reads each
layer's routing back to the host (``selected_experts.flatten().unique().tolist()``), swaps a missing
expert in on the compute stream and the evicted one back out (``_swap``: two ``copy_`` on the current
stream) and reads each expert's token indices back twice (``top_x.tolist()``, ``idx.tolist()``).

The simulator's ``mixtral-offloading`` profile charges exactly that schedule on each GPU's preset (the
H200's measured kernels scaled by bandwidth and compute: benchmarks/make_hardware_presets.py), with
every read-back costing the H200's measured eager routing hand-off (reports/fidelity_h200_cells). The
routing is the shared real Mixtral trace (LRU, 4 and 2 slots per layer). Writes
reports/mixtral_offloading_comparison.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moesim.cli import main as moesim_main  # noqa: E402
from moesim.simulator.cost_model import CostModel  # noqa: E402
from moesim.simulator.timing import simulate_timing  # noqa: E402
from moesim.traces.format import read_trace  # noqa: E402

REAL = ROOT.parent / "shared" / "traces" / "real" / "mixtral-8x7b-instruct-fp8_humaneval-2_vllm.jsonl"
PUBLISHED = {"a100-pcie": ("A100", 3.061), "rtx3080-mobile": ("RTX 3080 Mobile", 2.655),
             "rtx3060": ("RTX 3060", 2.278), "t4": ("T4 (Colab)", 2.092)}
# our own first engine (eager launches, no CUDA graphs) on the H200 box: 34.9 ms of CPU issue per token
# for 21.7 ms of GPU work, 32 layers (reports/sim_vs_real_h200.md, docs/engine.md)
EAGER_HOST_MS_PER_LAYER = 34.9 / 32
MEMORY_GBPS = {"a100-pcie": 1555.0, "rtx3080-mobile": 448.0, "rtx3060": 360.0, "t4": 320.0}   # datasheets


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", default=str(REAL))
    ap.add_argument("-o", "--out", default=str(ROOT / "reports/mixtral_offloading_comparison"))
    args = ap.parse_args()
    sync_us = CostModel.preset("h200").sync_seconds() * 1e6   # the H200's measured eager read-back
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "real.parquet"
        if moesim_main(["import", "--from", "vllm-jsonl", args.real, str(path)]) != 0:
            raise SystemExit(f"{args.real}: import failed")
        trace = read_trace(path)
        rows = []
        for preset, (gpu, published) in PUBLISHED.items():
            base = CostModel.preset(preset)
            prof = base.with_overrides(engine_profile="mixtral-offloading")
            row = {"preset": preset, "gpu": gpu, "published_tokens_per_s": published,
                   "pcie_gbps": base.bandwidth_Bps / 1e9, "expert_ms": round(base.expert_seconds(1) * 1e3, 4),
                   "layer_ms": round(base.layer_seconds() * 1e3, 4), "sync_us": round(sync_us, 2)}
            for k in (4, 2):
                sim = simulate_timing(trace, "lru", k, prof)
                own = simulate_timing(trace, "lru", k, base)
                # what-if: every layer also exposes the host issue time of an eager engine (its syncs
                # drain the GPU's queue every layer, so the CPU's launch time is not hidden)
                host = prof.with_overrides(layer_ms=base.layer_seconds() * 1e3 + EAGER_HOST_MS_PER_LAYER)
                hsim = simulate_timing(trace, "lru", k, host)
                # what-if: their experts run a fused Triton 2-bit matmul (src/triton_kernels.py) that reads
                # only the packed expert; its memory floor = packed bytes / memory bandwidth
                floor_ms = base.expert_bytes() / (MEMORY_GBPS[preset] * 1e9) * 1e3
                fsim = simulate_timing(trace, "lru", k, host.with_overrides(expert_ms=floor_ms))
                row[f"k{k}"] = {"hit_rate": round(sim.hit_rate, 4), "sim_tokens_per_s": round(sim.tokens_per_s, 3),
                                "rel_error": round(sim.tokens_per_s / published - 1, 4),
                                "with_eager_host_tokens_per_s": round(hsim.tokens_per_s, 3),
                                "with_eager_host_rel_error": round(hsim.tokens_per_s / published - 1, 4),
                                "moesim_engine_tokens_per_s": round(own.tokens_per_s, 3),
                                "packed_floor_expert_ms": round(floor_ms, 4),
                                "with_eager_host_and_packed_floor_tokens_per_s": round(fsim.tokens_per_s, 3),
                                "with_eager_host_and_packed_floor_rel_error": round(fsim.tokens_per_s / published - 1, 4)}
            rows.append(row)
    within = sum(abs(r["k4"]["rel_error"]) <= 0.15 for r in rows)
    within_host = sum(abs(r["k4"]["with_eager_host_rel_error"]) <= 0.15 for r in rows)
    report = {"published_source": "arXiv 2312.17238 Table 2, full algorithm, 2-bit experts", "trace": Path(args.real).name,
              "policy": "lru", "sync_us": sync_us, "eager_host_ms_per_layer": EAGER_HOST_MS_PER_LAYER,
              "rows": rows, "within_15pct_k4": within, "within_15pct_k4_with_eager_host": within_host}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {out}.md/.json: {within} of 4 within 15% (profile), {within_host} with the eager host term")
    return 0


EXPLANATION = """## Cache size

The repository's demo notebook sets `offload_per_layer = 4` (4 of 8 experts per layer offloaded, so 4 on
the GPU: `main_size = num_hidden_layers * (num_experts - offload_per_layer)`) and says Colab's T4 runs
with it; the per-GPU cache sizes of the paper's Table 2 could not be retrieved here (the paper's text is
not in the stored sources), so K = 4 is the comparison and K = 2 is shown beside it.

## What the model still lacks (evidence)

The profile reproduces their *schedule* (src/custom_layers.py, src/expert_cache.py): per layer one
routing read-back (`selected_experts.flatten().unique().tolist()`), each miss swapped on the compute
stream (`_swap`: `device_expert_buffer.storage.copy_(...)` then `offloaded_storage_buffer.copy_(...)`,
both `non_blocking` on the current stream), two read-backs per expert (`top_x.tolist()`, `idx.tolist()`).
It prices that schedule with *this project's* kernels scaled to each GPU. Two things it does not have:

1. **Their expert kernel.** Their experts run `HQQLinearTritonSavable.forward_triton`: a fused Triton
   2-bit matmul (src/triton_kernels.py) that reads only the packed expert, after dequantising the
   quantised scale and zero (`Quantizer.dequantize(meta['scale_q'], ...)`) on every call. The presets
   scale this project's kernel, which writes and re-reads the bf16 weights (0.259 ms on the H200 ->
   3.9 ms on a T4). Their kernel's memory floor is the packed bytes over the memory bandwidth (0.21 ms on
   a T4, 0.04 ms on an A100). With that floor the T4 lands within 15% while the A100, 3080 Mobile and 3060
   go 34-46% optimistic: their real kernel sits between the two, and its time on each GPU is a
   measurement this project does not have (no such GPU, and their code is not run here).
2. **Host launch time of an eager engine.** Their model runs eagerly (Hugging Face Mixtral attention,
   HQQ linears, per-expert Python), and the read-backs drain the GPU's queue every layer, so the CPU's
   launch time is exposed. The only measured number for that here is this project's own first engine
   (eager launches: 34.9 ms of CPU issue per token, 1.09 ms per layer on the H200 host); adding it per
   layer moves the A100 from +37% to +20% and the slower GPUs further pessimistic. Its true value for
   their code and their hosts (a laptop, a desktop, a Colab VM) is unknown.

3. **Speculative expert loading.** Table 2's "full algorithm" also prefetches experts guessed from the
   next layer's gate applied early; the public code has no prefetcher (its README lists "Speculative
   expert prefetching" as upcoming), and neither does the profile. It can only make their engine faster
   than the profile predicts.

The errors' pattern fits the first two: optimistic where GPU work is short (A100: host-bound), pessimistic where
the scaled bf16-materialising expert kernel dominates (T4)."""


def markdown(r: dict) -> str:
    lines = ["# mixtral-offloading: published tokens/s vs the simulator's engine profile", "",
             "Rebuilt by `python benchmarks/make_mixtral_offloading_comparison.py` (CPU only).", "",
             f"Published: {r['published_source']}. Simulated: the shared real Mixtral trace ({r['trace']}, 338 decode "
             f"tokens), LRU, `--engine-profile mixtral-offloading` on each GPU's preset, every routing/index read-back "
             f"= {r['sync_us']:.1f} us (the H200's measured eager routing hand-off).", "",
             "| GPU | preset (PCIe GB/s, expert ms, layer ms) | published tok/s | sim K=4 (hit rate) | error | "
             "sim K=2 | + eager host term, K=4 | error | + packed-read experts, K=4 | error | this project's engine, K=4 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for x in r["rows"]:
        k4, k2 = x["k4"], x["k2"]
        lines.append(f"| {x['gpu']} | {x['preset']} ({x['pcie_gbps']:g}, {x['expert_ms']}, {x['layer_ms']}) | "
                     f"{x['published_tokens_per_s']} | {k4['sim_tokens_per_s']} ({k4['hit_rate']:.3f}) | "
                     f"{k4['rel_error']:+.1%} | {k2['sim_tokens_per_s']} | {k4['with_eager_host_tokens_per_s']} | "
                     f"{k4['with_eager_host_rel_error']:+.1%} | {k4['with_eager_host_and_packed_floor_tokens_per_s']} | "
                     f"{k4['with_eager_host_and_packed_floor_rel_error']:+.1%} | {k4['moesim_engine_tokens_per_s']} |")
    lines += ["", f"Within 15% at K = 4: {r['within_15pct_k4']} of 4 (profile alone); {r['within_15pct_k4_with_eager_host']} "
              f"of 4 with the eager host term ({r['eager_host_ms_per_layer']:.2f} ms per layer).", "", EXPLANATION]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
