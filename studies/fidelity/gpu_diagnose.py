"""Diagnosis run: where do real cells lose time against the simulator? CPU issue time per token and
full CUDA-event timelines for a few cells, plain and instrumented (see studies/fidelity/sim_vs_real_h200.md)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from moesim.engine.cuda import exit_unless_cuda  # noqa: E402
from moesim.engine.plan import Routing  # noqa: E402
from moesim.engine.quant import quant_spec  # noqa: E402
from moesim.engine.runtime import MIXTRAL_8X7B, OffloadedEngine, Program, Weights  # noqa: E402
from moesim.traces.format import read_trace  # noqa: E402

exit_unless_cuda("gpu_diagnose.py", cpu_run=None)
out = Path(sys.argv[2])
routing = Routing.from_trace(read_trace(sys.argv[1]), 128)
t0 = time.perf_counter()
weights = Weights(MIXTRAL_8X7B, quant_spec("hqq2"), "cuda", pin=True)
print(f"pinned in {time.perf_counter() - t0:.1f}s", flush=True)
program = Program(weights, 6, routing.num_tokens, compile_kernels=True)   # one capture serves every cell
OffloadedEngine(weights, 4, "lru", "none", program=program).run(routing.head(6))
res = {}
for pol, k, pf in [("lru", 4, "none"), ("opt", 4, "none"), ("opt", 6, "transition"), ("lru", 6, "oracle")]:
    eng = OffloadedEngine(weights, k, pol, pf, program=program)
    r = eng.run(routing)
    ri = eng.run(routing, instrument=True)
    key = f"{pol}-{k}-{pf}"
    res[key] = {"plain": r.to_dict(), "instrumented": ri.to_dict(events=True)}
    cpu = sum(r.token_issue_ms)
    print(f"{key}: tok/s {r.tokens_per_s:.2f} (instrumented {ri.tokens_per_s:.2f}); CPU issue {cpu:.0f} ms "
          f"of wall {r.wall_s * 1e3:.0f} ms", flush=True)
    del eng
    torch.cuda.empty_cache()
    (out / "diagnose.json").write_text(json.dumps(res))
print("done", flush=True)
