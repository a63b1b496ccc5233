"""The best static placement of expert weights for a VRAM budget (issue 24): which layers' and experts'
weights live on the GPU, every other expert computed on the CPU, nothing copied after loading -- what
llama.cpp's ``--n-cpu-moe`` / ``-ot`` and kTransformers' rule files set up.

Search: two families, each priced by the timing simulator (its event path, execution
:class:`~moesim.policies.execution.Pinned` with the rest on the CPU):

- ``n-cpu-moe``: whole layers' experts on the GPU, the first N layers' on the CPU, N the smallest that
  fits. The only placement llama.cpp can express for stacked GGUF expert tensors
  (``blk.N.ffn_{up,gate,down}_exps.weight`` hold all of a layer's experts in one 3-D tensor).
- ``frequency``: the budget's worth of (layer, expert) pairs most often routed to in a profile (the trace
  itself unless another is given), as kTransformers' frequency profile picks a hot set. All experts
  cost the same to hold and to compute, so for any budget this set serves the most requests on the GPU
  (exchange argument); the simulator then prices how the CPU's share overlaps the GPU's.

The faster of the two is the answer; both are reported.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moesim.policies.execution import Pinned
from moesim.simulator.cost_model import CostModel
from moesim.simulator.timing import TimingResult, simulate_timing
from moesim.traces.format import Trace

GGUF_EXPERT_TENSORS = ("ffn_up_exps", "ffn_gate_exps", "ffn_down_exps")   # llama.cpp's LLM_TENSOR_FFN_*_EXPS
KT_EXPERTS_MODULE = r"^model\.layers\.{layers}\.block_sparse_moe\.experts$"   # Mixtral's module path (HF)


@dataclass
class Candidate:
    name: str
    gpu_experts: list[tuple[int, int]]
    timing: TimingResult

    @property
    def hit_rate(self) -> float:
        """Requests served by GPU-resident weights / all requests."""
        return self.timing.executed["pinned"] / self.timing.requests if self.timing.requests else 0.0

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "gpu_experts": len(self.gpu_experts), "tokens_per_s": round(self.timing.tokens_per_s, 4),
                "hit_rate": round(self.hit_rate, 6), "executed": dict(self.timing.executed or {})}


def expert_slots(vram_gb: float, expert_bytes: int, num_layers: int, num_experts: int) -> int:
    """Experts the budget holds (the budget is for expert weights; attention and the rest are elsewhere)."""
    return min(int(vram_gb * 1e9 // expert_bytes), num_layers * num_experts)


def frequency_set(profile: Trace, slots: int) -> list[tuple[int, int]]:
    """The ``slots`` (layer, expert) pairs most often routed to in ``profile`` (ties: lower layer, expert)."""
    counts = Counter(zip(profile.layer.repeat(profile.meta.top_k).tolist(), profile.experts.reshape(-1).tolist(),
                         strict=True))
    ranked = sorted(counts, key=lambda k: (-counts[k], k))
    return sorted(ranked[:slots])


def n_cpu_moe_set(num_layers: int, num_experts: int, slots: int) -> tuple[int, list[tuple[int, int]]]:
    """llama.cpp's family: N = the fewest layers on the CPU such that the rest's experts fit."""
    n_cpu = max(0, num_layers - slots // num_experts)
    return n_cpu, [(layer, e) for layer in range(n_cpu, num_layers) for e in range(num_experts)]


def llama_cpp_ot(cpu_layers: Sequence[int]) -> str:
    """An ``-ot`` / ``--override-tensor`` rule sending those layers' stacked expert tensors to the CPU
    (llama.cpp matches each rule with std::regex_search on the tensor name); "" when there are none."""
    if not cpu_layers:
        return ""
    return r"blk\.(" + "|".join(str(n) for n in sorted(cpu_layers)) + r")\.ffn_(up|gate|down)_exps\.weight=CPU"


def ktransformers_rules(gpu_layers: Sequence[int], cpu_layers: Sequence[int]) -> list[dict[str, Any]]:
    """kTransformers' optimize-rule list (its optimize_rules/*.yaml: match by module name, replace with an
    experts operator and its devices), one rule per device; whole layers, as its experts module is one."""
    rules = []
    for layers, device, op in ((gpu_layers, "cuda", "KExpertsMarlin"), (cpu_layers, "cpu", "KExpertsCPU")):
        if layers:
            rules.append({"match": {"name": KT_EXPERTS_MODULE.format(
                layers="(" + "|".join(str(n) for n in sorted(layers)) + ")")},
                "replace": {"class": "ktransformers.operators.experts.KTransformersExperts",
                            "kwargs": {"prefill_device": "cuda", "prefill_op": "KExpertsTorch",
                                       "generate_device": device, "generate_op": op, "out_device": "cuda"}},
                "recursive": False})
    return rules


def rules_yaml(rules: list[dict[str, Any]]) -> str:
    """The rule list in the YAML layout of kTransformers' files (no YAML library needed)."""
    lines = []
    for r in rules:
        kw = r["replace"]["kwargs"]
        lines += ["- match:", f'    name: "{_yaml_escape(r["match"]["name"])}"', "  replace:",
                  f'    class: {r["replace"]["class"]}', "    kwargs:",
                  *[f'      {k}: "{v}"' for k, v in kw.items()], "  recursive: False"]
    return "\n".join(lines)


def _yaml_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def price(trace: Trace, cost: CostModel, gpu_experts: list[tuple[int, int]], name: str,
          batch_size: int = 1) -> Candidate:
    """One static placement through the timing simulator: ``gpu_experts`` pinned, the rest on the CPU."""
    E = trace.meta.num_experts
    timing = simulate_timing(trace, "lru", [E] * trace.meta.num_layers, cost,
                             execution=Pinned(gpu_experts, name, rest="cpu"), batch_size=batch_size)
    return Candidate(name, gpu_experts, timing)


def best_placement(trace: Trace, cost: CostModel, vram_gb: float, profile: Trace | None = None,
                   batch_size: int = 1) -> dict[str, Any]:
    """Both families priced; the faster one's placement with its speed and hit rate, llama.cpp's ``-ot``
    for the best placement it can express, and kTransformers' rules for the same."""
    meta = trace.meta
    L, E = meta.num_layers, meta.num_experts
    xb = cost.expert_bytes(meta.expert_bytes)
    slots = expert_slots(vram_gb, xb, L, E)
    n_cpu, layer_set = n_cpu_moe_set(L, E, slots)
    cands = [price(trace, cost, layer_set, f"n-cpu-moe={n_cpu}", batch_size),
             price(trace, cost, frequency_set(profile or trace, slots), "frequency", batch_size)]
    best = max(cands, key=lambda c: (c.timing.tokens_per_s, c.name == "frequency"))
    cpu_layers, gpu_layers = list(range(n_cpu)), list(range(n_cpu, L))
    rules = ktransformers_rules(gpu_layers, cpu_layers)
    return {
        "gpu_experts": [list(p) for p in best.gpu_experts], "tokens_per_s": round(best.timing.tokens_per_s, 4),
        "hit_rate": round(best.hit_rate, 6), "placement": best.name,
        "llama_cpp_ot": llama_cpp_ot(cpu_layers), "llama_cpp_n_cpu_moe": n_cpu,
        "llama_cpp_note": ("llama.cpp stores a layer's experts as one stacked tensor per projection "
                           "(blk.N.ffn_{up,gate,down}_exps.weight), so -ot places whole layers' experts: the "
                           f"expression is the n-cpu-moe={n_cpu} placement ({cands[0].timing.tokens_per_s:.2f} tok/s); "
                           "a per-expert set is not expressible"),
        "ktransformers_rules": rules, "vram_gb": vram_gb, "expert_bytes": xb, "gpu_slots": slots,
        "hardware": cost.name, "candidates": [c.summary() for c in cands],
        "search": "whole layers (n-cpu-moe family, smallest N that fits) vs the most-routed experts of the "
                  "profile; each priced by the timing simulator with the rest on the CPU",
    }

