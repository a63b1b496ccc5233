"""mixtral-offloading's published tokens/s vs this simulator's engine profile of it (CPU only).

    python studies/mixtral_offloading_comparison/make_report.py \
        --real ../shared/traces/real/mixtral-8x7b-instruct-fp8_humaneval-2_vllm.jsonl

Published (Eliseev & Mazur, arXiv 2312.17238, Table 2, "full algorithm", 2-bit experts): A100 3.061,
RTX 3080 Mobile 2.655, RTX 3060 2.278, T4 (Colab) 2.092 tokens/s. Their public engine
(github.com/dvmazur/mixtral-offloading, src/expert_cache.py, src/custom_layers.py) keeps an LRU cache of
experts per layer (the demo's ``offload_per_layer = 4``: 4 of 8 experts per layer on the GPU), reads each
layer's routing back to the host (``selected_experts.flatten().unique().tolist()``), swaps a missing
expert in on the compute stream and the evicted one back out (``_swap``: two ``copy_`` on the current
stream) and reads each expert's token indices back twice (``top_x.tolist()``, ``idx.tolist()``).

The simulator's ``mixtral-offloading`` profile charges exactly that schedule on each GPU's preset (the
H200's measured kernels scaled by bandwidth and compute: tools/make_hardware_presets.py), with
every read-back costing the H200's measured eager routing hand-off (studies/fidelity/raw/cells). The
routing is the shared real Mixtral trace (LRU, 4 and 2 slots per layer). Writes
studies/mixtral_offloading_comparison/mixtral_offloading_comparison.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from moesim.cli import main as moesim_main  # noqa: E402
from moesim.simulator.cost_model import CostModel  # noqa: E402
from moesim.simulator.timing import simulate_timing  # noqa: E402
from moesim.traces.format import read_trace  # noqa: E402
from studies._common import REAL_TRACE, md_table, pct, pct_range, write_json, write_text  # noqa: E402

PUBLISHED = {"a100-pcie": ("A100", 3.061), "rtx3080-mobile": ("RTX 3080 Mobile", 2.655),
             "rtx3060": ("RTX 3060", 2.278), "t4": ("T4 (Colab)", 2.092)}
MEMORY_GBPS = {"a100-pcie": 1555.0, "rtx3080-mobile": 448.0, "rtx3060": 360.0, "t4": 320.0}   # datasheets
STUDY = ROOT / "studies" / "mixtral_offloading_comparison"
WITHIN = 0.15   # "lands within" in the table's sense: |simulated / published - 1| <= 15%


def eager_host_ms_per_layer(first_engine: dict) -> float:
    """The host issue time per layer of an eager engine: this project's first engine (eager launches, its
    CPU in lock-step with the GPU, so all-resident wall time = CPU issue time) per token over its layers."""
    return first_engine["all_resident_ms_per_token"] / first_engine["layers"]


def gpu_row(trace, preset: str, gpu: str, published: float, sync_us: float, host_ms: float) -> dict:
    """One GPU's published tokens/s beside the profile's, with and without the two what-ifs."""
    base = CostModel.preset(preset)
    prof = base.with_overrides(engine_profile="mixtral-offloading")
    row = {"preset": preset, "gpu": gpu, "published_tokens_per_s": published,
           "pcie_gbps": base.bandwidth_Bps / 1e9, "expert_ms": round(base.expert_seconds(1) * 1e3, 4),
           "layer_ms": round(base.layer_seconds() * 1e3, 4), "sync_us": round(sync_us, 2)}
    for k in (4, 2):
        sim = simulate_timing(trace, "lru", k, prof)
        own = simulate_timing(trace, "lru", k, base)
        # what-if: every layer also exposes the host issue time of an eager engine (its syncs drain the
        # GPU's queue every layer, so the CPU's launch time is not hidden)
        host = prof.with_overrides(layer_ms=base.layer_seconds() * 1e3 + host_ms)
        hsim = simulate_timing(trace, "lru", k, host)
        # what-if: their experts run a fused Triton 2-bit matmul (src/triton_kernels.py) that reads only the
        # packed expert; its memory floor = packed bytes / memory bandwidth
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
    return row


def build(real: Path, first_engine: dict) -> dict:
    sync_us = CostModel.preset("h200").sync_seconds() * 1e6   # the H200's measured eager read-back
    host_ms = eager_host_ms_per_layer(first_engine)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "real.parquet"
        if moesim_main(["import", "--from", "vllm-jsonl", str(real), str(path)]) != 0:
            raise SystemExit(f"{real}: import failed")
        trace = read_trace(path)
        rows = [gpu_row(trace, preset, gpu, published, sync_us, host_ms)
                for preset, (gpu, published) in PUBLISHED.items()]
        tokens = simulate_timing(trace, "lru", 4, CostModel.preset("h200")).tokens
    return {"published_source": "arXiv 2312.17238 Table 2, full algorithm, 2-bit experts", "trace": real.name,
            "tokens": tokens, "policy": "lru", "sync_us": sync_us, "eager_host_ms_per_layer": host_ms,
            "first_engine": {k: first_engine[k] for k in ("date", "device", "layers", "all_resident_ms_per_token")},
            "h200_expert_ms": round(CostModel.preset("h200").expert_seconds(1) * 1e3, 4), "rows": rows,
            "within_15pct_k4": sum(abs(r["k4"]["rel_error"]) <= WITHIN for r in rows),
            "within_15pct_k4_with_eager_host": sum(abs(r["k4"]["with_eager_host_rel_error"]) <= WITHIN for r in rows)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", default=str(REAL_TRACE), help="the shared real trace (vllm-jsonl)")
    ap.add_argument("--first-engine", default=str(STUDY / "raw" / "first_engine_h200.json"))
    ap.add_argument("--from-json", help="re-render the .md from this report json (no real trace needed)")
    ap.add_argument("-o", "--out", default=str(STUDY / "mixtral_offloading_comparison"), help="output prefix")
    args = ap.parse_args()
    out = Path(args.out)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
    else:
        report = build(Path(args.real), json.loads(Path(args.first_engine).read_text()))
        write_json(out.with_suffix(".json"), report)
    write_text(out.with_suffix(".md"), markdown(report))
    print(f"wrote {out}.md: {report['within_15pct_k4']} of {len(report['rows'])} within 15% (profile), "
          f"{report['within_15pct_k4_with_eager_host']} with the eager host term")
    return 0


def explanation(r: dict) -> str:
    """The prose under the table; every number is read from the report's data."""
    rows = {x["preset"]: x for x in r["rows"]}
    floor_err = {x["gpu"]: x["k4"]["with_eager_host_and_packed_floor_rel_error"] for x in r["rows"]}
    inside = [g for g, e in floor_err.items() if abs(e) <= WITHIN]
    outside = {g: e for g, e in floor_err.items() if abs(e) > WITHIN}
    a100, t4 = rows["a100-pcie"], rows["t4"]
    fe = r["first_engine"]
    floor_sentence = (f"With that floor {', '.join(inside) or 'no GPU'} land{'s' if len(inside) == 1 else ''} within "
                      f"{WITHIN:.0%}" + (f" while {', '.join(outside)} go {pct_range(outside.values(), signed=True)}"
                                          if outside else ""))
    return f"""## Cache size

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
   scale this project's kernel, which writes and re-reads the bf16 weights ({r['h200_expert_ms']:.3f} ms on the
   H200 -> {t4['expert_ms']:.1f} ms on a T4). Their kernel's memory floor is the packed bytes over the memory
   bandwidth ({t4['k4']['packed_floor_expert_ms']:.2f} ms on a T4, {a100['k4']['packed_floor_expert_ms']:.2f} ms on an
   A100). {floor_sentence} (the table's "+ packed-read experts" column): their real kernel sits between the
   two, and its time on each GPU is a measurement this project does not have (no such GPU, and their code is
   not run here).
2. **Host launch time of an eager engine.** Their model runs eagerly (Hugging Face Mixtral attention,
   HQQ linears, per-expert Python), and the read-backs drain the GPU's queue every layer, so the CPU's
   launch time is exposed. The only measured number for that here is this project's own first engine
   (eager launches, its CPU in lock-step with the GPU: {fe['all_resident_ms_per_token']:.1f} ms per token all-resident,
   {r['eager_host_ms_per_layer']:.2f} ms per layer, {fe['device']}, {fe['date']}; `raw/first_engine_h200.json`); adding it
   per layer moves the A100 from {pct(a100['k4']['rel_error'], signed=True)} to
   {pct(a100['k4']['with_eager_host_rel_error'], signed=True)} and the T4 from {pct(t4['k4']['rel_error'], signed=True)} to
   {pct(t4['k4']['with_eager_host_rel_error'], signed=True)}. Its true value for their code and their hosts (a laptop,
   a desktop, a Colab VM) is unknown.

3. **Speculative expert loading.** Table 2's "full algorithm" also prefetches experts guessed from the
   next layer's gate applied early; the public code has no prefetcher (its README lists "Speculative
   expert prefetching" as upcoming), and neither does the profile. It can only make their engine faster
   than the profile predicts.
"""


def markdown(r: dict) -> str:
    head = ["GPU", "preset (PCIe GB/s, expert ms, layer ms)", "published tok/s", "sim K=4 (hit rate)", "error",
            "sim K=2", "+ eager host term, K=4", "error", "+ packed-read experts, K=4", "error",
            "this project's engine, K=4"]
    table = md_table(head, ([x["gpu"], f"{x['preset']} ({x['pcie_gbps']:g}, {x['expert_ms']}, {x['layer_ms']})",
                             x["published_tokens_per_s"], f"{x['k4']['sim_tokens_per_s']} ({x['k4']['hit_rate']:.3f})",
                             pct(x["k4"]["rel_error"], signed=True), x["k2"]["sim_tokens_per_s"],
                             x["k4"]["with_eager_host_tokens_per_s"], pct(x["k4"]["with_eager_host_rel_error"], signed=True),
                             x["k4"]["with_eager_host_and_packed_floor_tokens_per_s"],
                             pct(x["k4"]["with_eager_host_and_packed_floor_rel_error"], signed=True),
                             x["k4"]["moesim_engine_tokens_per_s"]] for x in r["rows"]))
    lines = ["# mixtral-offloading: published tokens/s vs the simulator's engine profile", "",
             "Rebuilt by `python studies/mixtral_offloading_comparison/make_report.py` (CPU only).", "",
             f"Published: {r['published_source']}. Simulated: the shared real Mixtral trace ({r['trace']}, "
             f"{r['tokens']} decode tokens), LRU, `--engine-profile mixtral-offloading` on each GPU's preset, every "
             f"routing/index read-back = {r['sync_us']:.1f} us (the H200's measured eager routing hand-off).", "",
             *table, "",
             f"Within {WITHIN:.0%} at K = 4: {r['within_15pct_k4']} of {len(r['rows'])} (profile alone); "
             f"{r['within_15pct_k4_with_eager_host']} of {len(r['rows'])} with the eager host term "
             f"({r['eager_host_ms_per_layer']:.2f} ms per layer).", "", explanation(r)]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
