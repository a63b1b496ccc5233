"""The decode loop of the offloaded decoder: gate-driven (routing from the model's own gates) or replay
(routing forced from a trace, for validation), over one :class:`DecoderProgram` and one
:class:`ExpertStore`, with residency decided by :class:`~moesim.engine.plan.CachePlan` -- the same
``ExpertCache`` / policy / prefetcher objects the simulator replays.

Per token and layer, gate-driven:

1. launch ``attn[l]`` (attention + gate; the routing is copied to pinned host memory inside the piece);
2. wait for it (the **routing hand-off**: the GPU drains while the host learns the routing, runs the
   plan and issues work -- the one cost replay mode does not pay);
3. ``plan.demand`` -> misses copied on the copy stream (each waits for the slot's last reader);
   non-speculative prefetchers run right after (``plan.prefetch_after``), as in replay;
4. the expert pieces, resident experts first, misses as they land (compute waits on the slot's
   "ready" event), then ``combine[l]``;
5. speculative prefetch (d >= 1): ``predict[l]`` applies layer l+d's norm and router to h_l (layer l's
   output) on the GPU; the host launches ``attn[l+1]`` first and only then waits for the prediction,
   so its copies overlap layer l+1's attention. ``plan.prefetch_after(l, ...)`` runs before layer l+1's
   demand, so the plan sees the same call sequence as a replay of the recorded trace.

Replay: the host never waits inside a token (``plan.step`` from the trace; copies wait on the layer's
gate event), but waits for each token's logits as a decoder must. Feeding the recorded token ids makes
the gates compute the recorded routing, so both modes run identical kernels and copies.

Prompts run as prefill chunks (``prefill_chunk`` tokens per step, the whole prompt by default in
``moesim generate``): eager pieces over the chunk, per layer the union of its tokens' experts through
the plan (:meth:`Decoder._prefill_chunk`), each token a row of the trace, phase prefill; with
``prefill_chunk=1`` a prompt runs token by token through the captured decode pieces. The expert caches persist across prompts; the KV cache is position-masked, so nothing stale
is ever attended.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moesim.engine.decoder_program import DecoderProgram
from moesim.engine.expert_store import ExpertStore
from moesim.engine.plan import CachePlan, Routing
from moesim.engine.sync import COMPUTE, COPY, DEFAULT_SYNC, SlotEvents, StreamOrder, SyncMode
from moesim.errors import SettingError
from moesim.policies.prefetch import PrefetchContext
from moesim.simulator.results import HitCounts
from moesim.traces.format import DECODE, PREFILL


@dataclass
class StepRecord:
    """What one forward step (one token) did: the trace row material and its measured time."""

    seq: int
    token: int            # position within the sequence
    phase: int
    experts: np.ndarray   # (L, k) router order
    weights: np.ndarray   # (L, k)
    router_logits: np.ndarray | None   # (L, E)
    preds: dict[int, np.ndarray]       # d -> (L, k) on the TARGET layer's row (-1 where none)
    gpu_ms: float = 0.0
    wall_ms: float = 0.0


@dataclass
class GenerateResult(HitCounts):
    token_ids: list[list[int]]
    steps: list[StepRecord]
    wall_s: float
    requests: int
    hits: int
    prefetches: int
    expert_bytes: int
    mode: str
    policy: str
    cache_size: int
    prefetch: str
    logits: list[np.ndarray] = field(default_factory=list)   # per step (float32, vocab), when kept
    handoff_wait_ms: float = 0.0   # host time spent waiting for routing hand-offs
    # the residency proof, counted on the device (None: the program was built without the check)
    violations: int | None = None      # expert pieces whose slot did not hold the expert the gate routed
    device_copies: int | None = None   # copies whose identity landed in the slot they were issued to
    executed: dict[str, int] | None = None   # requests by executor (``execution`` given), simulate's keys
    first_token_s: float | None = None   # from the first step's start to the first generated token (prefill included)

    @property
    def generated(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.generated / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def decode_steps(self) -> list[StepRecord]:
        return [s for s in self.steps if s.phase == DECODE]

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode steps per second of their own wall time (prefill excluded)."""
        ms = sum(s.wall_ms for s in self.decode_steps)
        return len(self.decode_steps) / (ms / 1e3) if ms > 0 else 0.0

    @property
    def bytes_h2d(self) -> int:
        if self.executed is not None:   # CPU experts are misses of the cache that move no bytes
            return (self.executed["copy"] + self.prefetches) * self.expert_bytes
        return (self.misses + self.prefetches) * self.expert_bytes

    def summary(self) -> dict[str, Any]:
        return {"mode": self.mode, "policy": self.policy, "cache_size": self.cache_size, "prefetch": self.prefetch,
                "tokens_per_s": self.tokens_per_s, "ms_per_token": 1e3 / self.tokens_per_s if self.tokens_per_s else None,
                "decode_tokens_per_s": self.decode_tokens_per_s, "steps": len(self.steps),
                "generated_tokens": self.generated, "wall_s": self.wall_s, "requests": self.requests,
                "hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate, "prefetches": self.prefetches,
                "bytes_h2d": self.bytes_h2d, "expert_bytes": self.expert_bytes,
                "handoff_wait_ms": self.handoff_wait_ms, "violations": self.violations,
                "device_copies": self.device_copies, "plan_copies": self.misses + self.prefetches,
                "first_token_s": self.first_token_s,
                **({"executed": self.executed} if self.executed is not None else {})}


@dataclass
class _Run:
    """The state of one :meth:`Decoder.generate` call, shared by its steps."""

    plan: CachePlan
    forced: Routing | None
    speculative: bool
    dist: int
    keep_logits: bool
    record_routing: bool
    record_predictions: bool
    on_step: Any
    prof: dict[str, float]
    steps: list[StepRecord] = field(default_factory=list)
    logits_kept: list[np.ndarray] = field(default_factory=list)
    handoff_wait: float = 0.0   # seconds the host waited for routing hand-offs and predictions
    step_index: int = 0         # row of the forced routing / the live plan's clock base
    bar: Any = None
    gc_started: float = 0.0
    pinned_slot: list[dict[int, int]] | None = None   # hybrid execution: each layer's {pinned expert: slot}
    executed: dict[str, int] | None = None
    worker: Any = None                                # the CPU expert worker (CpuWorker), if any

    def on_gc(self, phase: str, info: dict) -> None:
        """gc callback: time spent collecting goes to the profile's "gc"."""
        if phase == "start":
            self.gc_started = time.perf_counter()
        else:
            self.prof["gc"] += time.perf_counter() - self.gc_started


class Decoder:
    """One configuration (policy, K slots per layer, prefetcher) over a shared program and store."""

    def __init__(self, program: DecoderProgram, store: ExpertStore, cache_size: int, policy: str = "lru",
                 prefetch: str = "none", params: dict[str, Any] | None = None, sync: SyncMode = DEFAULT_SYNC,
                 execution: str | None = None, cpu_threads: int | None = None) -> None:
        s = program.spec
        if cache_size > program.max_slots:
            raise ValueError(f"cache size {cache_size} exceeds the program's {program.max_slots} slots")
        self.program, self.store, self.spec = program, store, s
        self.cache_size, self.policy, self.prefetch, self.params = cache_size, policy, prefetch, params
        self.sync = sync
        # fails early (one line) for future-knowing policies / prefetchers and K < top-k
        CachePlan.live(s.num_layers, s.num_experts, s.top_k, cache_size, policy, prefetch, params)
        if prefetch == "speculative" and not program.distances:
            raise ValueError("the speculative prefetcher needs a program built with predict_distance >= 1")
        self._hybrid_setup(execution, cpu_threads)

    def _hybrid_setup(self, execution: str | None, cpu_threads: int | None) -> None:
        """The execution policy (``moesim.policies.execution``; docs/engine.md, "Hybrid execution"): static
        ones only (the decoder has no simulator to price Fiddler's rule or the split with, and no low-bit
        substitutes), without a prefetcher; CPU copies of every expert the policy may put on the CPU."""
        import torch

        from moesim.engine.hybrid import CpuExperts, check_pinned
        from moesim.policies.execution import Hobbit, Pinned, parse_execution

        s = self.spec
        self.exe = exe = parse_execution(execution)
        self.cpu_experts, self.cpu_threads = None, cpu_threads or torch.get_num_threads()
        if exe.name == "copy":
            return
        if exe.prices or isinstance(exe, Hobbit):
            raise SettingError("execution", f"the engine runs copy, n-cpu-moe=N and pinned=FILE, not {exe.name} (it "
                                            "needs the simulator's prices or low-bit substitutes: the simulator "
                                            "prices it)")
        if self.prefetch != "none":
            raise SettingError("prefetch", f"execution {exe.name} runs without a prefetcher", fix="none")
        self.pinned_sets = check_pinned(exe, s.num_layers, s.num_experts, self.cache_size)
        all_cpu = isinstance(exe, Pinned) and exe.rest == "cpu"
        keys = [(layer, e) for layer in range(s.num_layers) if all_cpu or exe.cpu_layer(layer)
                for e in range(s.num_experts)]
        if keys:
            st = self.store
            self.cpu_experts = CpuExperts(st.blobs, st.fmt, st.hidden, st.ffn, self.program.d.dev, keys,
                                          dtype=self.program.dtype)

    # -- copies -----------------------------------------------------------------------------------------
    def _copy(self, layer: int, slot: int, expert: int, after=None) -> None:
        d = self.program.d
        with d.copy_context():
            self.order.wait(COPY, after)
            self.order.wait(COPY, self.marks.free[layer][slot])
            self.store.copy_to(self.program.slots[layer][slot], layer, expert)
            self.marks.ready[layer][slot] = self.order.record(COPY)
            self.program.count_copy(layer, slot, expert)   # after "ready": compute never waits for it

    def _experts(self, layer: int, keys: list[int], slots: list[int], missed: set[int]) -> None:
        prog = self.program
        for j in sorted(range(len(keys)), key=lambda j: keys[j] in missed):   # resident first, then misses as they land
            slot = slots[j]
            if slot is None:
                continue   # computed on the CPU (hybrid execution)
            self.order.wait(COMPUTE, self.marks.ready[layer][slot])
            prog.expert[layer][slot][j]()
            self.marks.free[layer][slot] = self.order.record(COMPUTE)

    # -- the loop ---------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0, seed: int = 0,
                 stop_at_eos: bool = True, keep_logits: bool = False, record_routing: bool = True,
                 record_predictions: bool = True, warm: bool = False, profile: dict[str, float] | None = None,
                 forced: Routing | None = None, forced_tokens: list[list[int]] | None = None,
                 progress: bool = False, on_step=None, prefill_chunk: int | None = 1) -> GenerateResult:
        """Decode ``prompts`` in turn (batch 1). ``forced``: replay mode -- the routing of each step comes
        from this trace (same step order) and the inputs from ``forced_tokens`` (the recorded run's
        generated ids), so the gates compute the recorded routing. ``on_step(StepRecord)`` is called
        after every token (the trace recorder streams rows from it). ``warm``: experts 0..K-1 of every
        layer are loaded before the clock starts (not counted as requests). ``prefill_chunk``: prompt
        tokens per prefill step (None: the whole prompt in one step; 1: token by token through the
        captured decode pieces); a chunk requests the union of its tokens' experts per layer, as
        :func:`moesim.traces.steps.build_steps` defines and the simulator replays."""
        import gc

        import torch

        prog, d = self.program, self.program.d
        run = self._start(forced, warm, keep_logits, record_routing, record_predictions, on_step, profile)
        if run.executed is not None:
            prefill_chunk = 1   # CPU experts and pinned slots run through the decode pieces, token by token
        if progress:
            from tqdm import tqdm
            total = sum(len(p) + max_new_tokens - 1 for p in prompts)
            run.bar = tqdm(total=total, desc=f"{self.policy} K={self.cache_size} {self.prefetch}", unit="tok",
                           leave=False)
        gen = torch.Generator().manual_seed(seed)
        out_ids: list[list[int]] = []
        if profile is not None:
            gc.callbacks.append(run.on_gc)
        d.synchronize()
        prog.reset_proof()
        t0 = time.perf_counter()
        first_token_s: float | None = None
        with torch.inference_mode():
            for seq, prompt in enumerate(prompts):
                if len(prompt) + max_new_tokens > prog.ctx:
                    raise ValueError(f"prompt {seq} has {len(prompt)} tokens; with {max_new_tokens} new tokens "
                                     f"that exceeds the context of {prog.ctx}")
                generated: list[int] = []
                feed = list(prompt)
                pos = 0
                while pos < len(feed):
                    if pos < len(prompt) and prefill_chunk != 1:
                        n = min(prefill_chunk or len(prompt), len(prompt) - pos)
                        logits = self._prefill_step(run, seq, feed[pos:pos + n], pos)
                        pos += n - 1
                    else:
                        logits = self._decode_step(run, seq, feed[pos], pos, PREFILL if pos < len(prompt) else DECODE)
                    self._next_token(logits, pos, seq, feed, generated, max_new_tokens, temperature, gen,
                                     forced_tokens, stop_at_eos)
                    if first_token_s is None and generated:
                        first_token_s = time.perf_counter() - t0
                    pos += 1
                out_ids.append(generated)
        if run.bar is not None:
            run.bar.close()
        if profile is not None:
            gc.callbacks.remove(run.on_gc)
        wall = time.perf_counter() - t0
        violations, device_copies = prog.proof()
        plan = run.plan
        if run.worker is not None:
            run.worker.close()
        return GenerateResult(out_ids, run.steps, wall, plan.requests, plan.hits, plan.prefetches, self.store.expert_bytes,
                              "replay" if forced is not None else "gate", self.policy, self.cache_size, self.prefetch,
                              run.logits_kept, run.handoff_wait * 1e3, violations, device_copies, run.executed,
                              first_token_s)

    def _start(self, forced: Routing | None, warm: bool, keep_logits: bool, record_routing: bool,
               record_predictions: bool, on_step, profile: dict[str, float] | None) -> _Run:
        """A fresh plan (live, or replaying ``forced``), stream order and slot marks, the warm pre-load,
        and the run's state."""
        s, d = self.spec, self.program.d
        L, k = s.num_layers, s.top_k
        if forced is None:
            plan = CachePlan.live(L, s.num_experts, k, self.cache_size, self.policy, self.prefetch, self.params)
        else:
            plan = CachePlan(forced, self.cache_size, self.policy, self.prefetch, self.params)
        self.marks = SlotEvents(L, self.cache_size)
        self.order = StreamOrder(d, self.sync)
        if warm:
            for layer in range(L):
                for e in range(min(self.cache_size, s.num_experts)):
                    self._copy(layer, plan._admit(layer, e, -1, ()), e)
        prof = profile if profile is not None else {}
        for key in ("wait", "plan", "issue", "launch", "spec", "gc"):
            prof.setdefault(key, 0.0)
        run = _Run(plan, forced, self.prefetch == "speculative", plan.target_distance or 1, keep_logits,
                   record_routing, record_predictions, on_step, prof)
        if self.exe.name != "copy":
            from moesim.engine.hybrid import CpuWorker, shape_plan
            from moesim.policies.execution import EXECUTORS

            run.pinned_slot = shape_plan(plan, self.pinned_sets, self.cache_size, self.policy, self.params)
            for layer, slots in enumerate(run.pinned_slot):
                for e, slot in slots.items():   # loaded before the clock starts
                    self._copy(layer, slot, e)
            run.executed = dict.fromkeys(EXECUTORS, 0)
            prog = self.program
            if self.cpu_experts is not None:
                run.worker = CpuWorker(prog.xn, prog.ybuf, prog.d, self.cpu_experts, self.cpu_threads)
        return run

    def _emit(self, run: _Run, records: list[StepRecord], logits: list[np.ndarray]) -> None:
        """Steps recorded (and streamed to ``on_step``), logits kept, the progress bar moved."""
        for rec in records:
            run.steps.append(rec)
            if run.on_step is not None:
                run.on_step(rec)
        if run.keep_logits:
            run.logits_kept.extend(row.copy() for row in logits)
        run.step_index += len(records)
        if run.bar is not None:
            run.bar.update(len(records))

    def _prefill_step(self, run: _Run, seq: int, ids: list[int], start: int) -> np.ndarray:
        """One prefill chunk of ``ids`` from position ``start``; returns its last token's logits."""
        rows = self._prefill_chunk(run.plan, seq, ids, start, run.step_index, run.forced, run.record_predictions,
                                   run.dist)
        all_logits = self.program.chunk_logits
        self._emit(run, rows, list(all_logits))
        return all_logits[-1]

    def _route(self, run: _Run, layer: int, now: int) -> tuple[list[int], list[float], list[int], list]:
        """Layer ``layer``'s routing (the gate's hand-off, or the trace's) through the plan, and the
        copies of its misses and prefetches issued: (keys, weights, slots, demand copies)."""
        plan, prof, clock = run.plan, run.prof, time.perf_counter
        if run.executed is not None:
            return self._route_hybrid(run, layer, now)
        if run.forced is None:
            h0 = clock()
            self.order.host_wait(self.order.gate())   # the routing hand-off
            c0 = clock()
            run.handoff_wait += c0 - h0
            prof["wait"] += c0 - h0
            k = self.spec.top_k
            hand = self.program.host_hand[layer].numpy()
            keys = [int(e) for e in hand[:k]]
            weights = [float(w) for w in hand[k:2 * k]]
            copies = plan.demand(layer, keys, now, weights)
            c1 = clock()
            for slot, e in copies:
                self._copy(layer, slot, e)
            c2 = clock()
            slots = plan.slots(layer, keys)
            prefetched = []
            if not run.speculative:
                prefetched = plan.prefetch_after(layer, keys, now, PrefetchContext(current=keys))
            c3 = clock()
            for tl, slot, e in prefetched:
                self._copy(tl, slot, e)
        else:
            c0 = clock()
            gate = self.order.gate()
            st = plan.step(run.step_index, layer)
            if st is None:
                raise ValueError(f"the forced routing has no row for step {run.step_index}, layer {layer}")
            keys, weights, slots, copies = st.experts, st.weights, st.slots, st.copies
            c1 = c2 = c3 = clock()
            for slot, e in copies:
                self._copy(layer, slot, e, gate)
            for tl, slot, e in st.prefetches:
                self._copy(tl, slot, e, gate)
        c4 = clock()
        prof["plan"] += (c1 - c0) + (c3 - c2)
        prof["issue"] += (c2 - c1) + (c4 - c3)
        return keys, weights, slots, copies

    def _route_hybrid(self, run: _Run, layer: int, now: int) -> tuple[list[int], list[float], list, list]:
        """:meth:`_route` under an execution policy: the routing (gate hand-off or trace), each expert's
        executor (``moesim.engine.hybrid.choose_executors``), the CPU experts queued on the worker, the
        rest through the cache; slots None for CPU experts."""
        from moesim.engine.hybrid import account, choose_executors
        from moesim.engine.identity import expert_tag

        plan, k = run.plan, self.spec.top_k
        gate = self.order.gate()
        if run.forced is None:
            h0 = time.perf_counter()
            self.order.host_wait(gate)   # the routing hand-off
            run.handoff_wait += time.perf_counter() - h0
            hand = self.program.host_hand[layer].numpy()
            keys, weights, after = [int(e) for e in hand[:k]], [float(w) for w in hand[k:2 * k]], None
        else:
            if run.forced.row[run.step_index, layer] < 0:
                raise ValueError(f"the forced routing has no row for step {run.step_index}, layer {layer}")
            keys = [int(e) for e in run.forced.experts[run.step_index, layer]]
            weights, after = [float(w) for w in run.forced.weights[run.step_index, layer]], gate
        pinned = self.pinned_sets[layer]
        kinds = choose_executors(self.exe, plan.caches[layer], pinned, layer, keys, weights, False)
        on_cpu = [j for j, e in enumerate(keys) if kinds.get(e) == "cpu"]
        if on_cpu:
            E = self.spec.num_experts   # the identity the gate's routing names (checked against the CPU copy's)
            run.worker.submit(layer, [(j, keys[j], expert_tag(layer, keys[j], E)) for j in on_cpu])
        to_gpu = [e for e in keys if e not in pinned and kinds.get(e) != "cpu"]
        copies = plan.demand(layer, to_gpu, now, [weights[keys.index(e)] for e in to_gpu]) if to_gpu else []
        for slot, e in copies:
            self._copy(layer, slot, e, after)
        account(plan, run.executed, layer, keys, to_gpu, ["copy"] * len(copies), pinned)
        slots = [None if j in on_cpu else run.pinned_slot[layer][e] if e in pinned else plan.slot_of[layer][e]
                 for j, e in enumerate(keys)]
        return keys, weights, slots, copies

    def _decode_step(self, run: _Run, seq: int, token_id: int, pos: int, phase: int) -> np.ndarray:
        """One token through the captured pieces, layer by layer; returns its logits."""
        prog, s, d = self.program, self.spec, self.program.d
        L, k = s.num_layers, s.top_k
        w0 = time.perf_counter()
        start = d.event()
        start.record()
        prog.set_input(token_id, pos)
        prog.embed()
        rec_ids = np.full((L, k), -1, np.int64)
        rec_w = np.zeros((L, k), np.float32)
        rec_logits = np.zeros((L, s.num_experts), np.float32) if run.record_routing else None
        pending = None   # speculative prefetch of the previous layer, waiting for its prediction
        for layer in range(L):
            now = run.step_index * L + layer
            prog.attn[layer]()
            if pending is not None:
                c0 = time.perf_counter()
                run.handoff_wait += self._speculate(run.plan, *pending)
                run.prof["spec"] += time.perf_counter() - c0
                pending = None
            keys, weights, slots, copies = self._route(run, layer, now)
            c4 = time.perf_counter()
            rec_ids[layer], rec_w[layer] = keys, weights
            self._experts(layer, keys, slots, {e for _, e in copies})
            if run.worker is not None:
                run.worker.merge(layer)   # the CPU experts' outputs, before the combine reads them
            prog.combine[layer]()
            if prog.distances and (run.speculative or run.record_predictions):
                prog.predict[layer]()
            run.prof["launch"] += time.perf_counter() - c4
            if run.speculative and run.forced is None:
                ev = d.event(timing=False)
                ev.record()
                pending = (layer, keys, now, ev, run.dist)
        prog.final()
        if pending is not None:
            run.handoff_wait += self._speculate(run.plan, *pending)
        done = d.event()
        done.record()
        done.synchronize()   # the logits: the next input depends on them
        self.order.new_step()
        wall_ms = (time.perf_counter() - w0) * 1e3
        preds = {}
        if prog.distances and run.record_predictions:
            hp = prog.host_pred.numpy()
            for i, dd in enumerate(prog.distances):
                p = np.full((L, k), -1, np.int64)
                p[dd:] = hp[: L - dd, i].astype(np.int64)
                preds[dd] = p
        if run.record_routing:
            rec_logits[:] = prog.host_hand.numpy()[:, 2 * k:]
        logits = prog.host_logits.numpy()[0]
        self._emit(run, [StepRecord(seq, pos, phase, rec_ids, rec_w, rec_logits, preds, start.elapsed_time(done),
                                    wall_ms)], [logits])
        return logits

    def _next_token(self, logits: np.ndarray, pos: int, seq: int, feed: list[int], generated: list[int],
                    max_new_tokens: int, temperature: float, gen, forced_tokens, stop_at_eos: bool) -> None:
        """After the step that ends at ``pos``: when it was the last fed token, pick the next one (forced,
        sampled or greedy) and feed it unless the run stops."""
        import torch

        if pos != len(feed) - 1 or len(generated) >= max_new_tokens:
            return
        if forced_tokens is not None:
            nxt = forced_tokens[seq][len(generated)]
        elif temperature > 0:
            probs = torch.softmax(torch.from_numpy(logits).double() / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        else:
            nxt = int(np.argmax(logits))
        generated.append(nxt)
        stop = stop_at_eos and forced_tokens is None and nxt in self.spec.eos_token_ids
        if forced_tokens is not None:
            stop = len(generated) >= len(forced_tokens[seq])
        if len(generated) < max_new_tokens and not stop:
            feed.append(nxt)

    def _prefill_chunk(self, plan: CachePlan, seq: int, ids: list[int], start: int, row0: int,
                       forced: Routing | None, record_predictions: bool, dist: int) -> list[StepRecord]:
        """One prefill step of ``ids`` (positions ``start``..): per layer the chunk's attention and gate,
        the union of its tokens' experts requested through the plan in chunks of K (each chunk computes
        before the next may evict it), then the prefetcher with the union as the current set (a
        speculative one with the chunk's first token's prediction, as the simulator reads the step's
        first row). Returns one StepRecord per token; ``program.chunk_logits`` holds their logits."""
        from moesim.traces.steps import add_to_union

        prog, s, d = self.program, self.spec, self.program.d
        L, k, T = s.num_layers, s.top_k, len(ids)
        w0 = time.perf_counter()
        start_ev = d.event()
        start_ev.record()
        prog.chunk_begin(ids, start)
        rec_ids, rec_w = np.full((T, L, k), -1, np.int64), np.zeros((T, L, k), np.float32)
        rec_logits = np.zeros((T, L, s.num_experts), np.float32)
        preds = {dd: np.full((T, L, k), -1, np.int64) for dd in prog.distances} if record_predictions else {}
        speculative = self.prefetch == "speculative"
        for layer in range(L):
            now = row0 * L + layer
            rec_ids[:, layer], rec_w[:, layer], rec_logits[:, layer] = prog.chunk_attn(layer)
            keys, weights = ((forced.experts[row0:row0 + T, layer], forced.weights[row0:row0 + T, layer])
                             if forced is not None else (rec_ids[:, layer], rec_w[:, layer]))
            union: list[int] = []
            counts: dict[int, int] = {}
            wsum: dict[int, float] = {}
            for t in range(T):
                add_to_union([int(e) for e in keys[t]], [float(w) for w in weights[t]], union, counts, wsum)
            missed: set[int] = set()
            for chunk, copies, slots in plan.request_union(layer, union, now, wsum):
                for slot, e in copies:
                    self._copy(layer, slot, e)
                missed |= {e for _, e in copies}
                for e, slot in sorted(zip(chunk, slots, strict=True), key=lambda p: p[0] in missed):
                    self.order.wait(COMPUTE, self.marks.ready[layer][slot])
                    prog.chunk_expert(layer, slot, e)
                    self.marks.free[layer][slot] = self.order.record(COMPUTE)
            if not speculative:
                ctx = PrefetchContext(current=union, predicted=plan._predicted(row0, dist) if forced is not None
                                      and plan.prefetcher is not None and plan.prefetcher.needs_predictions else None)
                for tl, slot, e in plan.prefetch_after(layer, union, now, ctx):
                    self._copy(tl, slot, e)
            prog.chunk_combine(layer)
            if prog.distances and (speculative or record_predictions):
                p = prog.chunk_predict(layer)
                for i, dd in enumerate(prog.distances):
                    if dd in preds and layer + dd < L:
                        preds[dd][:, layer + dd] = p[:, i]
                if speculative:
                    i = prog.distances.index(dist) if dist in prog.distances else None
                    first = [int(e) for e in p[0, i]] if i is not None else []
                    predicted = (plan._predicted(row0, dist) if forced is not None
                                 else (lambda target, first=first, layer=layer: first if target == layer + dist else []))
                    for tl, slot, e in plan.prefetch_after(layer, union, now,
                                                           PrefetchContext(current=union, predicted=predicted)):
                        self._copy(tl, slot, e)
        prog.chunk_logits = prog.chunk_final()
        done = d.event()
        done.record()
        done.synchronize()
        self.order.new_step()
        gpu_ms, wall_ms = start_ev.elapsed_time(done), (time.perf_counter() - w0) * 1e3
        # the step's time sits on its first token's record (the others 0): one forward pass for all T
        return [StepRecord(seq, start + t, PREFILL, rec_ids[t], rec_w[t], rec_logits[t],
                           {dd: p[t] for dd, p in preds.items()}, gpu_ms if t == 0 else 0.0,
                           wall_ms if t == 0 else 0.0) for t in range(T)]

    def _speculate(self, plan: CachePlan, layer: int, keys: list[int], now: int, ev, dist: int) -> float:
        """Wait for layer ``layer``'s speculative prediction, then prefetch (returns the wait in s)."""
        prog = self.program
        h0 = time.perf_counter()
        ev.synchronize()
        waited = time.perf_counter() - h0
        i = prog.distances.index(dist) if dist in prog.distances else None
        pred = prog.host_pred.numpy()[layer, i].astype(np.int64) if i is not None else np.array([], np.int64)

        def predicted(target: int) -> list[int]:
            return [int(e) for e in pred] if target == layer + dist else []
        for tl, slot, e in plan.prefetch_after(layer, keys, now, PrefetchContext(current=keys, predicted=predicted)):
            self._copy(tl, slot, e)
        return waited
