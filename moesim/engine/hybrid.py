"""Hybrid execution in the real engine (issue 24; docs/engine.md, "Hybrid execution").

The same execution policy objects the simulator runs (``moesim.policies.execution``) decide, per layer,
which executor serves each routed expert that is not in the layer's GPU cache:

- ``copy``: copied into a GPU slot (the engine before hybrid execution);
- ``cpu``: computed on the host by :class:`CpuWorker`, from a CPU-format copy made at load
  (:class:`CpuExperts`: torch's int8 weight-only kernel); the layer's hidden state goes to the host
  through a pinned buffer, the worker thread computes while the GPU runs the layer's other experts and
  the copies, and its outputs come back into the layer's expert buffer before the combine;
- ``lowbit``: HOBBIT's substitute, a smaller format of the same expert (:class:`LowbitCopies`), copied
  into the slot and computed in that format while it stays there;
- ``pinned``: a GPU set loaded before the run into slots no eviction touches.

Policies that price their choice (Fiddler's rule, the dynamic split: ``prices``) ask the simulator's
estimate; the engine has no clock of its own to price with, so their choices come from the simulator's
run of the same tokens with the measured calibration (:func:`priced_schedule`), replayed in order and
checked against the engine's own misses (:class:`ScheduledChoices`).

**Proof.** Besides the device counters (each GPU piece compares its slot's identity with the trace's
expert), the engine counts, per routed (token, layer, rank), the executors that computed it: each must
be computed exactly once (``once_violations``), and a CPU expert's copy carries its identity too, read
from the host blob it was made from (``cpu_violations``). ``executed`` has the simulator's keys.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from moesim.engine.identity import TAG_BASE, TAG_BYTES
from moesim.engine.plan import CachePlan, Routing
from moesim.engine.quant import QuantSpec, matrix, quant_spec, quantize_matrix
from moesim.engine.runtime import OffloadedEngine, Program, Weights, expert_forward, issue_copy
from moesim.engine.sync import COMPUTE
from moesim.errors import SettingError
from moesim.policies.base import ExpertCache, make_policy
from moesim.policies.execution import EXECUTORS, ExecutionPolicy, Miss, parse_execution

# HOBBIT's substitute of each engine format: a smaller format :func:`quantize_matrix` can make (bf16
# scale/zero); hqq4 -> hqq2-g64 keeps both on the fused kernels (1-bit has none: dequantise + matmul)
LOWBIT_OF = {"hqq4": "hqq2-g64", "hqq2": "hqq1-g64", "hqq4-v02": "hqq2-g64", "hqq2-v02": "hqq1-g64"}


def expert_matrices(blob, spec: QuantSpec, hidden: int, ffn: int, device):
    """(w1, w3, w2) of one expert as float weights on ``device``, dequantised from its host blob."""
    size = spec.matrix_bytes(hidden * ffn)
    blob = blob[:3 * size].to(device)
    shapes = ((ffn, hidden), (ffn, hidden), (hidden, ffn))
    return [matrix(blob[i * size:(i + 1) * size], spec, r, c) for i, (r, c) in enumerate(shapes)]


def host_tag(blob) -> int:
    """The identity word stored at the end of an expert's host blob."""
    import torch

    return int(blob[-TAG_BYTES:].view(torch.int64)[0])


class CpuExperts:
    """Host copies of experts in torch's int8 weight-only CPU layout, made at load from an engine's own
    blobs (``host[layer][expert]`` in ``spec``; dequantised on ``device``, re-quantised per output row,
    scales in ``dtype``: the activations' type), each with the identity of the blob it came from."""

    def __init__(self, host: Sequence[Sequence[Any]], spec: QuantSpec, hidden: int, ffn: int, device,
                 keys: Iterable[tuple[int, int]], dtype: Any = None, progress: bool = False) -> None:
        import torch

        from moesim.engine.cpu_bench import int8_rows

        dtype = dtype or torch.bfloat16
        self.copies: dict[tuple[int, int], list[tuple[Any, Any]]] = {}
        self.tags: dict[tuple[int, int], int] = {}
        keys = list(keys)
        it: Iterable[tuple[int, int]] = keys
        if progress:
            from tqdm import tqdm
            it = tqdm(keys, desc="CPU expert copies", unit="expert")
        for layer, e in it:
            mats = expert_matrices(host[layer][e], spec, hidden, ffn, device)
            self.copies[(layer, e)] = [(w8.cpu(), sc.to(dtype).cpu()) for w8, sc in map(int8_rows, mats)]
            self.tags[(layer, e)] = host_tag(host[layer][e])

    @classmethod
    def of(cls, weights: Weights, keys: Iterable[tuple[int, int]], progress: bool = False) -> CpuExperts:
        """CPU copies of the synthetic engine's experts ``keys`` ((layer, expert) pairs)."""
        g = weights.geometry
        return cls(weights.host, weights.quant, g.hidden, g.ffn, weights.d.dev, keys, progress=progress)

    def forward(self, layer: int, expert: int, x):
        """The expert's SwiGLU FFN on ``x`` (tokens, hidden) bf16 on the host."""
        import torch

        (w1, s1), (w3, s3), (w2, s2) = self.copies[(layer, expert)]
        mm = torch.ops.aten._weight_int8pack_mm
        xs = x.to(s1.dtype)
        return mm(torch.nn.functional.silu(mm(xs, w1, s1)) * mm(xs, w3, s3), w2, s2).to(x.dtype)


class LowbitCopies:
    """HOBBIT's substitutes: each expert re-quantised to ``fmt`` from its dequantised weights, in
    pinned host memory, plus the expert's identity word (copied last, to the slot's identity place)."""

    def __init__(self, weights: Weights, fmt: str | None = None, progress: bool = False) -> None:
        import torch

        fmt = fmt or LOWBIT_OF.get(weights.quant.name)
        if fmt is None:
            raise SettingError("lowbit_format", f"no low-bit substitute for {weights.quant.name!r}; name one")
        self.spec: QuantSpec = quant_spec(fmt)
        g = weights.geometry
        self.nbytes = self.spec.expert_bytes(g.hidden, g.ffn)
        if self.nbytes + TAG_BYTES > weights.blob_bytes:
            raise SettingError("lowbit_format", f"{fmt} is not smaller than the engine's {weights.quant.name}")
        pin = weights.d.cuda
        self.host: list[list[tuple[Any, Any]]] = []
        it: Iterable[int] = range(g.num_layers)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc=f"{fmt} substitutes", unit="layer")
        for layer in it:
            row = []
            for e in range(g.num_experts):
                blob = weights.host[layer][e]
                packed = torch.cat([quantize_matrix(m.reshape(-1), self.spec)
                                    for m in expert_matrices(blob, weights.quant, g.hidden, g.ffn, weights.d.dev)]).cpu()
                tag = torch.tensor([host_tag(blob)], dtype=torch.int64).view(torch.uint8)
                row.append((packed.pin_memory() if pin else packed, tag.pin_memory() if pin else tag))
            self.host.append(row)


class HybridProgram(Program):
    """A :class:`Program` with the low-bit substitute's expert pieces too (``lowbit_expert[l][s][j]``:
    the expert in slot s read in the substitute's format), captured like the others on a GPU."""

    def __init__(self, weights: Weights, max_slots: int, max_tokens: int, lowbit: LowbitCopies | None = None,
                 **kw: Any) -> None:
        self.lowbit = lowbit
        g = weights.geometry
        self.lowbit_expert: list[list[list[Any]]] = [
            [[lambda layer=layer, s=s, j=j: self._run_lowbit(layer, s, j) for j in range(g.top_k)]
             for s in range(max_slots)] for layer in range(g.num_layers)]
        super().__init__(weights, max_slots, max_tokens, **kw)

    def _run_lowbit(self, layer: int, slot: int, rank: int) -> None:
        g = self.w.geometry
        if self.check_residency:
            want = self.expect[layer, rank].index_select(0, self.tok.view(1))
            self.violations.add_(self.slot_tags[layer][slot:slot + 1].ne(want).sum())
        blob = self.slots[layer][slot][:self.lowbit.nbytes]
        self.ybuf[layer, rank].copy_(expert_forward(blob, self.x, self.lowbit.spec, g.hidden, g.ffn))

    def _capture(self, progress: bool) -> None:
        from moesim.engine.runtime import capture_graphs

        super()._capture(progress)
        if self.lowbit is None:
            return
        g = self.w.geometry
        # the base capture left tok at -1 (the step counter's start); the warm-up below runs the pieces
        # eagerly, and their residency check indexes by tok, so it needs a valid token first
        self.tok.zero_()
        pieces = [(self.lowbit_expert[layer][s][j],
                   lambda gr, layer=layer, s=s, j=j: self.lowbit_expert[layer][s].__setitem__(j, gr))
                  for layer in range(g.num_layers) for s in range(self.max_slots) for j in range(g.top_k)]
        self._lowbit_graphs = capture_graphs(self.torch, self.w.d.dev, pieces, progress,
                                             after_warmup=lambda: self.tok.fill_(-1))


class CpuWorker:
    """The host's expert worker: one dedicated thread running torch's CPU kernels on ``threads``
    threads. Per layer, :meth:`submit` copies the layer's expert input ``x`` (rows, hidden: 1 at batch 1,
    the step's rows at batch B) to a pinned host buffer (on the compute stream, right after the gate) and
    queues the layer's CPU experts; :meth:`merge` waits for them and copies their outputs from pinned
    host buffers into ``ybuf[layer, place]`` on the compute stream, before the combine reads it. A job's
    output place is the router rank at batch 1 (``ybuf`` (L, k, 1, hidden): the expert's output); at batch
    B it names the rows routed to the expert and their weights, and the layer's jobs add their weighted
    outputs into place 0 (``ybuf`` (L, 1, rows, hidden) float32). ``d``: the engine's Device."""

    def __init__(self, x, ybuf, d, cpu: CpuExperts, threads: int) -> None:
        import torch

        self.x, self.ybuf, self.d, self.cpu, self.torch = x, ybuf, d, cpu, torch
        L = ybuf.shape[0]
        self.x_host = torch.zeros(L, *x.shape, dtype=x.dtype, pin_memory=d.cuda)
        self.y_host = torch.zeros(ybuf.shape, dtype=ybuf.dtype, pin_memory=d.cuda)
        # the identity of each copy a layer's job computed, in job order, read from the copy itself
        width = 1 + max((e for _, e in cpu.tags), default=0)
        self.tag_host = torch.zeros(L, width, dtype=torch.int64, pin_memory=d.cuda)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="moesim-cpu-experts",
                                       initializer=torch.set_num_threads, initargs=(threads,))
        self.pending: dict[int, tuple[Future, list[int], int]] = {}
        self.thread_ids: set[int] = set()
        self.wrong_tags = 0
        # each CPU expert's wall clock (start, end, first of its layer's job?): what the timing model prices;
        # per job, how long the worker waited for the hidden state and when its last expert ended; per merge,
        # how long after that the main thread had the result
        self.spans: list[tuple[float, float, bool]] = []
        self.ready_waits: list[float] = []
        self.job_ends: dict[int, float] = {}
        self.merge_lags: list[float] = []

    def submit(self, layer: int, jobs: Sequence[tuple]) -> None:
        """Queue ``layer``'s jobs on the worker: (place, expert, expected identity) at batch 1, or
        (place, expert, expected identity, rows, weights) with the routed rows (int64) and their weights."""
        self.x_host[layer].copy_(self.x, non_blocking=True)
        ready = self.d.event(timing=False)
        ready.record()
        jobs = [(*j, None, None)[:5] for j in jobs]
        self.pending[layer] = (self.pool.submit(self._run, layer, jobs, ready), sorted({j[0] for j in jobs}),
                               len(jobs))

    def _run(self, layer: int, jobs: list[tuple], ready) -> None:
        self.thread_ids.add(threading.get_ident())
        t0 = time.perf_counter()
        ready.synchronize()   # the hidden state is on the host
        self.ready_waits.append(time.perf_counter() - t0)
        x = self.x_host[layer]
        started: set[int] = set()
        with self.torch.inference_mode():
            for n, (place, expert, want, rows, wts) in enumerate(jobs):
                t0 = time.perf_counter()
                tag = self.cpu.tags[(layer, expert)]
                self.wrong_tags += tag != want
                self.tag_host[layer, n] = tag
                out = self.y_host[layer, place]
                if rows is None:
                    out.copy_(self.cpu.forward(layer, expert, x))
                else:
                    if place not in started:
                        out.zero_()
                        started.add(place)
                    y = self.cpu.forward(layer, expert, x.index_select(0, rows))
                    out.index_add_(0, rows, y.to(out.dtype) * wts.view(-1, 1).to(out.dtype))
                self.spans.append((t0, time.perf_counter(), n == 0))
        self.job_ends[layer] = self.spans[-1][1]

    def timing(self) -> dict[str, Any]:
        """The run's CPU experts in ms (medians): all, the first of each layer's job (after the workers
        waited) and the others (back to back), the idle time before each first one but the run's first; the
        worker's wait for the hidden state; the main thread's lag from a job's end to having its result."""
        def med(xs: list[float]) -> float | None:
            return statistics.median(xs) * 1e3 if xs else None
        spans = self.spans
        return {"n": len(spans), "expert_ms": med([b - a for a, b, _ in spans]),
                "first_ms": med([b - a for a, b, first in spans if first]),
                "later_ms": med([b - a for a, b, first in spans if not first]),
                "idle_before_first_ms": med([a - prev[1] for prev, (a, _, first) in zip(spans, spans[1:], strict=False)
                                             if first]),
                "ready_wait_ms": med(self.ready_waits), "merge_lag_ms": med(self.merge_lags)}

    def merge(self, layer: int) -> int:
        """Wait for ``layer``'s job and copy its outputs to the device; returns how many experts it ran
        (their identities are ``tag_host[layer, :n]``), 0 without a job."""
        if layer not in self.pending:
            return 0
        fut, places, n = self.pending.pop(layer)
        fut.result()   # the host's outputs are ready (re-raises a worker failure)
        self.merge_lags.append(time.perf_counter() - self.job_ends.pop(layer))
        for place in places:
            self.ybuf[layer, place].copy_(self.y_host[layer, place], non_blocking=True)
        return n

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class ScheduledChoices(ExecutionPolicy):
    """A pricing policy's choices as the simulator made them, replayed layer by layer in order; a miss
    set that differs from the simulator's is an error (the engine and the simulator diverged)."""

    def __init__(self, base: ExecutionPolicy, choices: dict[int, deque]) -> None:
        self.base, self.choices, self.name = base, choices, base.name

    def cpu_layer(self, layer: int) -> bool:
        return self.base.cpu_layer(layer)

    def pinned(self, layer: int) -> frozenset[int]:
        return self.base.pinned(layer)

    def choose(self, layer: int, misses: Sequence[Miss], estimate) -> list[str]:
        queue = self.choices.get(layer)
        if not queue:
            raise RuntimeError(f"{self.name}: the engine has misses at layer {layer} the simulator never priced")
        experts, kinds = queue.popleft()
        if list(experts) != [m.expert for m in misses]:
            raise RuntimeError(f"{self.name}: the engine's misses {[m.expert for m in misses]} at layer {layer} "
                               f"differ from the simulator's {list(experts)}")
        return list(kinds)


class _Recorder(ExecutionPolicy):
    """Delegates to ``base`` and records each ``choose`` (layer, the misses' experts, the choice)."""

    def __init__(self, base: ExecutionPolicy) -> None:
        self.base, self.name = base, base.name
        self.choices: dict[int, deque] = {}
        if hasattr(base, "by_layer"):
            self.by_layer = base.by_layer

    def cpu_layer(self, layer: int) -> bool:
        return self.base.cpu_layer(layer)

    def pinned(self, layer: int) -> frozenset[int]:
        return self.base.pinned(layer)

    def choose(self, layer: int, misses: Sequence[Miss], estimate) -> list[str]:
        kinds = self.base.choose(layer, misses, estimate)
        self.choices.setdefault(layer, deque()).append((tuple(m.expert for m in misses), tuple(kinds)))
        return kinds


def priced_schedule(trace, policy: str, cache_size: int, cost, execution: ExecutionPolicy, batch_size: int = 1):
    """Run the simulator (the one cell runner) on ``trace`` with ``execution`` at ``batch_size`` and return
    (its choices as :class:`ScheduledChoices`, the cell's result)."""
    from moesim.simulator.cell import CellSpec, run_cell

    rec = _Recorder(execution)
    res = run_cell(trace, CellSpec(policy, cache_size, cost=cost, execution=rec, interval=False,
                                   batch_size=batch_size))
    return ScheduledChoices(execution, rec.choices), res


def engine_execution(execution: str | ExecutionPolicy | None) -> ExecutionPolicy:
    """An engine's execution policy: a pricing one only as the simulator's schedule."""
    exe = parse_execution(execution)
    if getattr(exe, "prices", False):
        raise SettingError("execution", f"{exe.name} prices its choices with the simulator: give the engine "
                                        "its schedule (moesim.engine.hybrid.priced_schedule)")
    return exe


def issue_lowbit(weights: Weights, program: Any, order, marks, layer: int, slot: int, e: int, after, log,
                 tag: tuple) -> None:
    """Copy ``e``'s low-bit substitute (``program.lowbit``) into ``slot``, its identity landing last."""
    packed, ident = program.lowbit.host[layer][e]
    dst = program.slots[layer][slot]
    issue_copy(weights, program, order, marks, layer, slot, e, after, log, tag,
               parts=[(dst[:packed.numel()], packed), (dst[-TAG_BYTES:], ident)])


def host_proof(executed: dict[str, int], once: int, worker: CpuWorker | None, expert_bytes: int,
               lowbit: LowbitCopies | None) -> dict[str, Any]:
    """A hybrid run's ``executed`` counts (the simulator's keys) and the host half of its proof; closes the
    CPU worker."""
    out = {"executed": dict(executed), "once_violations": once,
           "bytes_h2d": executed["copy"] * expert_bytes + (executed["lowbit"] * lowbit.nbytes if lowbit else 0),
           "cpu_violations": worker.wrong_tags if worker else 0,
           "cpu_threads_used": len(worker.thread_ids) if worker else 0,
           "cpu_timing": worker.timing() if worker else None}
    if worker is not None:
        worker.close()
    return out


def fresh_worker(old: CpuWorker | None, x, ybuf, d, cpu: CpuExperts | None, threads: int) -> CpuWorker | None:
    """A run's CPU worker (the previous run's closed), or None for an engine without CPU copies."""
    if old is not None:
        old.close()
    return CpuWorker(x, ybuf, d, cpu, threads) if cpu else None


def check_pinned(exe: ExecutionPolicy, num_layers: int, num_experts: int, cache_size: int) -> list[frozenset[int]]:
    """Each layer's pinned experts, refused when they are not experts or leave the cache no slot."""
    beyond = [layer for layer in getattr(exe, "by_layer", {}) if layer >= num_layers]
    if beyond:
        raise SettingError("execution", f"{exe.name} pins experts of layer {beyond[0]}; the model has {num_layers}")
    sets = [exe.pinned(layer) for layer in range(num_layers)]
    for layer, p in enumerate(sets):
        if any(not 0 <= e < num_experts for e in p):
            raise SettingError("execution", f"{exe.name} pins an expert outside 0..{num_experts - 1}")
        if p and len(p) >= cache_size:
            raise SettingError("execution", f"{exe.name} pins {len(p)} experts of layer {layer}, which leaves none "
                                            f"of its {cache_size} GPU slots to the cache")
    return sets


def shape_plan(plan: CachePlan, pinned_sets: list[frozenset[int]], cache_size: int, policy: str,
               params: dict[str, Any] | None) -> list[dict[int, int]]:
    """Give each layer's cache the slots its pinned experts leave (the pinned ones take the last
    slots); returns each layer's {pinned expert: slot}."""
    out = []
    for layer, pinned in enumerate(pinned_sets):
        cap = cache_size - len(pinned)
        plan.caches[layer] = ExpertCache(cap, make_policy(policy, **(params or {})))
        plan.free_slots[layer] = list(range(cap))
        out.append({e: cap + i for i, e in enumerate(sorted(pinned))})
    return out


def choose_executors(exe: ExecutionPolicy, cache: ExpertCache, pinned: frozenset[int], layer: int, keys: list[int],
                     wts: list[float], lowbit_ok: bool, counts: list[int] | None = None) -> dict[int, str]:
    """The executor of each expert of ``keys`` (router order; a batch step's union) the policy does not
    leave to the cache: all "cpu" in a CPU layer, else the policy's choice for each non-pinned miss ("copy"
    ones left out). ``wts``: each key's summed routing weight over the ``counts`` tokens routed to it (1
    each at batch 1); a miss carries their mean, as the simulator's does."""
    if exe.cpu_layer(layer):
        return dict.fromkeys(keys, "cpu")
    cand = [e for e in keys if e not in pinned and e not in cache.resident]
    if not cand or exe.name == "copy":
        return {}
    counts = counts or [1] * len(keys)
    misses = [Miss(e, counts[keys.index(e)], wts[keys.index(e)] / max(counts[keys.index(e)], 1)) for e in cand]

    def no_estimate(_plan):
        raise SettingError("execution", f"{exe.name} prices its choices: run it from a simulator schedule")
    kinds = exe.choose(layer, misses, no_estimate)
    if len(kinds) != len(cand) or not set(kinds) <= {"copy", "cpu", "lowbit"}:
        raise SettingError("execution", f"{exe.name} chose {list(kinds)} for {len(cand)} misses")
    if "lowbit" in kinds and not lowbit_ok:
        raise SettingError("execution", f"{exe.name} needs low-bit substitutes, which this engine does not hold")
    return {e: k for e, k in zip(cand, kinds, strict=True) if k != "copy"}


def account(plan: CachePlan, executed: dict[str, int], layer: int, keys: list[int], to_gpu: list[int],
            copied: list[str], pinned: frozenset[int]) -> None:
    """Count one layer's requests by executor (``copied``: the kind of each copy issued) and add the
    requests the cache did not see (pinned: hits; CPU: neither) to the plan's counts."""
    n_pinned = sum(e in pinned for e in keys)
    for kind in copied:
        executed[kind] += 1
    executed["gpu_hit"] += len(to_gpu) - len(copied)
    executed["pinned"] += n_pinned
    executed["cpu"] += len(keys) - len(to_gpu) - n_pinned
    extra = len(keys) - len(to_gpu)
    plan.requests += extra
    plan.layer_requests[layer] += extra
    plan.hits += n_pinned
    plan.layer_hits[layer] += n_pinned


class HybridEngine(OffloadedEngine):
    """:class:`OffloadedEngine` whose misses are served by the executor an execution policy chooses
    (batch 1, no prefetcher). ``cpu_experts`` is needed for policies that put experts on the CPU and
    ``program.lowbit`` for HOBBIT; ``execution`` may be a spelling, a policy or
    :class:`ScheduledChoices` (a pricing policy needs one: :func:`priced_schedule`)."""

    def __init__(self, weights: Weights, cache_size: int, policy: str = "lru",
                 execution: str | ExecutionPolicy | None = "copy", *, program: HybridProgram,
                 cpu_experts: CpuExperts | None = None, cpu_threads: int = 1, **kw: Any) -> None:
        super().__init__(weights, cache_size, policy, "none", program=program, **kw)
        self.exe = engine_execution(execution)
        g = weights.geometry
        self.pinned_sets = check_pinned(self.exe, g.num_layers, g.num_experts, cache_size)
        self.cpu_experts, self.cpu_threads = cpu_experts, cpu_threads
        self.worker: CpuWorker | None = None

    def run(self, routing: Routing, instrument: bool = False, progress: bool = False, warm: bool = False,
            sync_tokens: bool = True):
        """:meth:`OffloadedEngine.run` from cold caches (the simulator's start; pinned sets load untimed)."""
        if warm:
            raise SettingError("execution", "the hybrid engine starts cold, as the simulator does (warm=False)")
        return super().run(routing, instrument, progress, False, sync_tokens)

    # -- the hooks of OffloadedEngine.run --------------------------------------------------------------
    def _plan(self, routing: Routing) -> CachePlan:
        g = self.w.geometry
        plan = CachePlan(routing, self.cache_size, self.policy_name, "none", self.policy_params)
        self.pinned_slot = shape_plan(plan, self.pinned_sets, self.cache_size, self.policy_name, self.policy_params)
        for layer, slots in enumerate(self.pinned_slot):
            for e, slot in slots.items():   # loaded before the run, untimed
                self._copy(layer, slot, e, None, -1, "pinned")
        self.slot_kind = [dict.fromkeys(range(self.cache_size), "copy") for _ in range(g.num_layers)]
        self.executed = dict.fromkeys(EXECUTORS, 0)
        self.computed = np.zeros((routing.num_tokens, g.num_layers, g.top_k), np.int64)
        self.routing = routing
        self.worker = fresh_worker(self.worker, self.program.x, self.program.ybuf, self.w.d, self.cpu_experts,
                                   self.cpu_threads)
        return plan

    def _serve(self, plan: CachePlan, t: int, layer: int, log: list | None, gate_done) -> None:
        r = self.routing
        now = int(r.row[t, layer])
        if now < 0:
            return
        keys = [int(e) for e in r.experts[t, layer]]
        wts = [float(x) for x in r.weights[t, layer]]
        pinned = self.pinned_sets[layer]
        kinds = choose_executors(self.exe, plan.caches[layer], pinned, layer, keys, wts,
                                 getattr(self.program, "lowbit", None) is not None)
        on_cpu = [j for j, e in enumerate(keys) if kinds.get(e) == "cpu"]
        self._to_cpu(t, layer, keys, on_cpu)
        to_gpu = [e for e in keys if e not in pinned and kinds.get(e) != "cpu"]
        copies = plan.demand(layer, to_gpu, now, [wts[keys.index(e)] for e in to_gpu]) if to_gpu else []
        for slot, e in copies:
            self.slot_kind[layer][slot] = kinds.get(e, "copy")
            self._issue(layer, slot, e, kinds.get(e, "copy"), log, t, gate_done)
        account(plan, self.executed, layer, keys, to_gpu, [kinds.get(e, "copy") for _, e in copies], pinned)
        missed = {e for _, e in copies}
        gpu_ranks = [j for j in range(len(keys)) if j not in on_cpu]
        for j in sorted(gpu_ranks, key=lambda j: keys[j] in missed):   # resident first, then misses
            e = keys[j]
            slot = self.pinned_slot[layer][e] if e in pinned else plan.slot_of[layer][e]
            self.order.wait(COMPUTE, self.marks.ready[layer][slot])
            lowbit = e not in pinned and self.slot_kind[layer][slot] == "lowbit"
            (self.program.lowbit_expert if lowbit else self.program.expert)[layer][slot][j]()
            self.marks.free[layer][slot] = self.order.record(COMPUTE)
            self.computed[t, layer, j] += 1

    def _to_cpu(self, t: int, layer: int, keys: list[int], ranks: list[int]) -> None:
        if not ranks:
            return
        if self.worker is None:
            raise SettingError("execution", f"{self.exe.name} runs experts on the CPU: build the engine with cpu_experts")
        g = self.w.geometry
        jobs = []
        for j in ranks:
            jobs.append((j, keys[j], TAG_BASE + layer * g.num_experts + keys[j]))
            self.computed[t, layer, j] += 1
        self.worker.submit(layer, jobs)

    def _issue(self, layer: int, slot: int, e: int, kind: str, log, t: int, gate_done) -> None:
        if kind == "copy":
            self._copy(layer, slot, e, log, t, "miss", gate_done)
            return
        issue_lowbit(self.w, self.program, self.order, self.marks, layer, slot, e, gate_done, log, (t, layer, "lowbit"))

    def _merge(self, layer: int) -> None:
        if self.worker is not None:
            self.worker.merge(layer)

    def _executed(self) -> dict[str, Any]:
        """``executed`` (the simulator's keys) and the host half of the proof."""
        r = self.routing
        routed = r.experts >= 0
        routed &= (r.row >= 0)[:, :, None]
        once = int(((self.computed != 1) & routed).sum() + (self.computed[~routed] != 0).sum())
        out = host_proof(self.executed, once, self.worker, self.w.expert_bytes, getattr(self.program, "lowbit", None))
        self.worker = None
        return out
