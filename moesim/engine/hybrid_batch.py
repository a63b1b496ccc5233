"""Hybrid execution at batch B > 1 (issue 24; docs/engine.md, "Hybrid execution"): the batch engine
(:mod:`moesim.engine.batch`) whose step unions are served by the executors an execution policy chooses,
as the timing simulator's batch steps are (``moesim.simulator.timing``, ``build_steps(trace, B)``).

Per step and layer, the union of the step's routed experts is split by the batch-1 engine's rules
(:func:`~moesim.engine.hybrid.choose_executors`: a CPU layer, the pinned set, the policy's choice for each
miss with its routed tokens and their mean weight; a pricing policy replays the simulator's schedule):

- ``cpu``: the CPU worker (:class:`~moesim.engine.hybrid.CpuWorker`) computes the expert on just the rows
  routed to it, from the step's hidden states copied to a pinned host buffer after the gate, and adds
  their weighted outputs into a pinned host row block; before the layer's combine the block is copied to
  the device and added to the layer's expert accumulator;
- ``lowbit``: HOBBIT's substitute copied into the slot and computed in its format (``lowbit_expert``
  pieces) until a full copy replaces it;
- ``pinned``: slots loaded before the run that no eviction touches; everything else goes through the
  layer's cache (chunks of its capacity) and is copied, as in the copy-only batch engine.

**Proof.** The batch program's device check (every routed expert of the step counted exactly once by
the identities its pieces found) also counts the CPU's experts: the worker reports the identity of each
CPU copy it computed (read from the copy, made from the host blob), and the merge adds those to the same
device count. On the host, the plan names each routed expert's executor (``cpu``, ``pinned``, ``lowbit``
or ``gpu``) before serving it, and each executor records what it computed (the worker from its copies'
identities; the GPU path by the piece table and slot it launched): ``once_violations`` counts routed
experts not computed exactly once, ``executor_violations`` those computed by another executor than the
plan named.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any

from moesim.engine.batch import BatchEngine, BatchProgram, Lanes, token_bucket
from moesim.engine.hybrid import (
    CpuExperts,
    CpuWorker,
    LowbitCopies,
    account,
    check_pinned,
    choose_executors,
    engine_execution,
    fresh_worker,
    host_proof,
    issue_lowbit,
    shape_plan,
)
from moesim.engine.identity import TAG_BASE
from moesim.engine.plan import CachePlan, Routing
from moesim.engine.runtime import EngineResult, Weights
from moesim.engine.sync import COMPUTE
from moesim.errors import SettingError
from moesim.policies.execution import EXECUTORS, ExecutionPolicy
from moesim.traces.steps import Step


class HybridBatchProgram(BatchProgram):
    """A :class:`BatchProgram` with the substitute's expert pieces (``lowbit_expert[l][s][n]``: the slot
    read in the substitute's format), a device block for the CPU's weighted outputs (``cpu_y``) and the
    identities of the experts the CPU computed (``cpu_tags``)."""

    def __init__(self, weights: Weights, rows: int, prefill: bool, max_steps: int, lanes: Lanes,
                 lowbit: LowbitCopies | None = None, **kw: Any) -> None:
        import torch

        self.lowbit = lowbit
        super().__init__(weights, rows, prefill, max_steps, lanes, **kw)
        g = weights.geometry
        self.lowbit_expert = None if lowbit is None else [
            [{nb: functools.partial(self._run_expert, layer, s, nb, lowbit.spec, lowbit.nbytes)
              for nb in self.token_buckets} for s in range(self.max_slots)] for layer in range(g.num_layers)]
        self.cpu_y = torch.zeros(g.num_layers, 1, rows, g.hidden, dtype=torch.float32, device=weights.d.dev)
        self.cpu_tags = torch.zeros(g.num_layers, g.num_experts, dtype=torch.int64, device=weights.d.dev)

    def _expert_tables(self) -> list:
        return [self.expert] + ([self.lowbit_expert] if self.lowbit_expert is not None else [])

    def add_cpu(self, layer: int, n: int) -> None:
        """The CPU's weighted outputs (``cpu_y[layer]``) into the layer's accumulator, and the identities of
        its ``n`` experts (``cpu_tags[layer, :n]``) into the residency count, as an expert piece's."""
        self.yacc[layer].add_(self.cpu_y[layer, 0])
        if self.check_residency:
            E = self.num_experts
            rel = self.cpu_tags[layer, :n] - (TAG_BASE + layer * E)
            valid = (rel >= 0) & (rel < E)
            self.seen[layer].index_add_(0, rel.clamp(0, E - 1), valid.long())
            self.violations.add_((~valid).sum())


class HybridBatchEngine(BatchEngine):
    """:class:`BatchEngine` whose misses are served by the executor an execution policy chooses (no
    prefetcher, cold start; tested on decode steps -- prefill chunks take the same path, untested).
    ``cpu_experts`` is needed for policies that put experts on the CPU and ``program.lowbit`` for HOBBIT;
    ``execution`` may be a spelling, a policy or a :class:`~moesim.engine.hybrid.ScheduledChoices` of the
    simulator's run at the same batch size."""

    def __init__(self, program: HybridBatchProgram, cache_size: int, policy: str = "lru",
                 execution: str | ExecutionPolicy | None = "copy", *, cpu_experts: CpuExperts | None = None,
                 cpu_threads: int = 1, **kw: Any) -> None:
        super().__init__(program, cache_size, policy, **kw)
        self.exe = engine_execution(execution)
        g = self.w.geometry
        self.pinned_sets = check_pinned(self.exe, g.num_layers, g.num_experts, cache_size)
        self.cpu_experts, self.cpu_threads = cpu_experts, cpu_threads
        self.worker: CpuWorker | None = None

    def run(self, steps: list[Step], routing: Routing, warm: bool = False, **kw: Any) -> EngineResult:
        """:meth:`BatchEngine.run` from cold caches (the simulator's start; pinned sets load untimed)."""
        if warm:
            raise SettingError("execution", "the hybrid engine starts cold, as the simulator does (warm=False)")
        return super().run(steps, routing, False, **kw)

    # -- the hooks of BatchEngine.run ----------------------------------------------------------------------
    def _plan(self, routing: Routing, steps: list[Step]) -> CachePlan:
        g = self.w.geometry
        plan = CachePlan(routing, self.cache_size, self.policy_name, "none", self.policy_params)
        self.pinned_slot = shape_plan(plan, self.pinned_sets, self.cache_size, self.policy_name, self.policy_params)
        for layer, slots in enumerate(self.pinned_slot):
            for e, slot in slots.items():   # loaded before the run, untimed
                self._copy(layer, slot, e, None)
        self.slot_kind = [dict.fromkeys(range(self.cache_size), "copy") for _ in range(g.num_layers)]
        self.substitutes: set[tuple[int, int]] = set()   # (layer, expert) whose slot holds its substitute
        self.executed = dict.fromkeys(EXECUTORS, 0)
        self.named: dict[tuple[int, int, int], str] = {}   # (step, layer, expert) -> the executor the plan names
        self.ran: list[tuple[int, int, int, str]] = []     # (step, layer, expert, executor) as each one reports
        self.routed = {(i, layer, e) for i, st in enumerate(steps) for layer, S in st.layers.items() for e in S}
        self.worker = fresh_worker(self.worker, self.program.x, self.program.cpu_y, self.w.d, self.cpu_experts,
                                   self.cpu_threads)
        return plan

    def _serve(self, plan: CachePlan, i: int, st: Step, layer: int, gate_done, log: list | None,
               nxt: dict[int, int] | None) -> None:
        S = st.layers.get(layer)
        if not S:
            return
        self._step = i
        pinned = self.pinned_sets[layer]
        kinds = choose_executors(self.exe, plan.caches[layer], pinned, layer, S, [st.weights[layer][e] for e in S],
                                 self.program.lowbit is not None, [st.counts[layer][e] for e in S])
        for e in S:
            low = kinds.get(e) == "lowbit" or (layer, e) in self.substitutes
            self.named[(i, layer, e)] = kinds.get(e) or ("pinned" if e in pinned else "lowbit" if low else "gpu")
        self._to_cpu(i, layer, [e for e in S if kinds.get(e) == "cpu"])
        to_gpu = [e for e in S if e not in pinned and kinds.get(e) != "cpu"]
        on_pinned = [e for e in S if e in pinned]
        copied: list[str] = []

        def on_copy(slot: int, e: int) -> None:
            kind = kinds.get(e, "copy")
            copied.append(kind)
            self.slot_kind[layer][slot] = kind
            (self.substitutes.add if kind == "lowbit" else self.substitutes.discard)((layer, e))
            self.named[(i, layer, e)] = "lowbit" if kind == "lowbit" else "gpu"
            if kind == "copy":
                self._copy(layer, slot, e, gate_done, log, i)
            else:
                issue_lowbit(self.w, self.program, self.order, self.marks, layer, slot, e, gate_done, log,
                             (i, layer, "lowbit"))
        for e in on_pinned:   # ready since the start
            slot = self.pinned_slot[layer][e]
            self.order.wait(COMPUTE, self.marks.ready[layer][slot])
            self._piece(layer, slot, e)[self._bucket(st, layer, e)]()
            self.marks.free[layer][slot] = self.order.record(COMPUTE)
        if to_gpu:
            self._gpu_experts(plan, i, st, layer, to_gpu, gate_done, log, nxt, on_copy)
        account(plan, self.executed, layer, S, to_gpu, copied, pinned)

    def _bucket(self, st: Step, layer: int, e: int) -> int:
        return token_bucket(st.counts[layer][e], self.program.rows)

    def _piece(self, layer: int, slot: int, expert: int) -> dict[int, Any]:
        prog = self.program
        pinned = self.pinned_slot[layer].get(expert) == slot
        low = not pinned and self.slot_kind[layer][slot] == "lowbit"
        self.ran.append((self._step, layer, expert, "pinned" if pinned else "lowbit" if low else "gpu"))
        return (prog.lowbit_expert if low else prog.expert)[layer][slot]

    def _to_cpu(self, i: int, layer: int, experts: list[int]) -> None:
        if not experts:
            return
        if self.worker is None:
            raise SettingError("execution", f"{self.exe.name} runs experts on the CPU: build the engine with cpu_experts")
        import torch

        gidx, gw, fill = self.program.gather_host
        E = self.w.geometry.num_experts
        jobs = []
        for e in experts:
            n = int(fill[i, layer, e])
            jobs.append((0, e, TAG_BASE + layer * E + e, torch.from_numpy(gidx[i, layer, e, :n]),
                         torch.from_numpy(gw[i, layer, e, :n])))
        self.worker.submit(layer, jobs)

    def _merge(self, layer: int) -> None:
        if self.worker is None:
            return
        n = self.worker.merge(layer)
        if not n:
            return
        prog = self.program
        prog.cpu_tags[layer, :n].copy_(self.worker.tag_host[layer, :n], non_blocking=True)
        prog.add_cpu(layer, n)
        base = TAG_BASE + layer * self.w.geometry.num_experts
        self.ran += [(self._step, layer, int(t) - base, "cpu") for t in self.worker.tag_host[layer, :n].tolist()]

    def _executed(self) -> dict[str, Any]:
        """``executed`` (the simulator's keys) and the host half of the proof."""
        ran = Counter((i, layer, e) for i, layer, e, _ in self.ran)
        once = sum(ran[key] != 1 for key in self.routed) + sum(1 for key in ran if key not in self.routed)
        by_key: dict[tuple[int, int, int], list[str]] = {}
        for i, layer, e, kind in self.ran:
            by_key.setdefault((i, layer, e), []).append(kind)
        wrong = sum(by_key.get(key, []) != [kind] for key, kind in self.named.items())
        wrong += sum(1 for key in by_key if key not in self.named)
        out = host_proof(self.executed, once, self.worker, self.w.expert_bytes, self.program.lowbit)
        out["executor_violations"] = wrong
        self.worker = None
        return out
