"""Record -> replay closure on a real run (issue 27 item 3, quoted on the device): ``moesim generate --record``
on a checkpoint, then ``moesim simulate`` on the recorded trace with the same policy, cache size and
prefetcher; the live run's hits, misses, prefetches, copies and bytes against the replay's, for each
prefetcher. ``measure.py --closure`` runs it on its largest checkpoint (the full-width run's 16 layers),
reusing that cell's quantization cache; standalone:

    python studies/checkpoint_load/closure.py --model CKPT --device cuda -o closure.json

Each side runs as ``python -m moesim`` in a child, exactly as a user types it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PREFETCHERS = ("none", "transition", "previous-token", "speculative")
# the keys compared: the live run's JSON against simulate's (``timing_`` prefixed where simulate has both
# the exact replay's and the timing run's counts: the timing run is the one with prefetch)
LIVE_KEYS = ("requests", "hits", "misses", "prefetches", "copies", "bytes_h2d")
SIM_KEYS = {"requests": "timing_requests", "hits": "timing_hits", "misses": "timing_misses",
            "prefetches": "prefetches", "copies": "copies", "bytes_h2d": "bytes_h2d"}


def child_env(code: Path) -> dict[str, str]:
    """The environment of a ``python -m moesim`` child: the tree measured first on the path, whatever else
    the caller's path holds (a wheel folder on the device) after it."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(code), os.environ.get("PYTHONPATH")) if p)}


def _moesim(code: Path, *argv: str) -> dict:
    res = subprocess.run([sys.executable, "-m", "moesim", *argv], env=child_env(code), capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"closure: moesim {argv[0]} failed: {res.stderr.strip()[-600:]}")
    return json.loads(res.stdout)


def closure_cell(code: Path, model: Path, work: Path, prefetch: str, *, quant: str, cache: Path | None,
                 device: str, prompt: str, tokens: int, cache_size: int, chunk: int | None) -> dict:
    """One prefetcher: the live run and its replay, and whether every compared key is equal."""
    rec = work / f"run-{prefetch}.parquet"
    extra = ["--quant-cache", str(cache)] if cache else ["--no-quant-cache"]
    extra += ["--prefill-chunk", str(chunk)] if chunk else []
    t0 = time.perf_counter()
    live = _moesim(code, "generate", "--model", str(model), "--prompt-ids", prompt, "--max-new-tokens", str(tokens),
                   "--cache-size", str(cache_size), "--policy", "lru", "--prefetch", prefetch, "--quant", quant,
                   "--device", device, "--record", str(rec), "--json", *extra)
    live_s = time.perf_counter() - t0
    # the counts do not depend on the timing preset; --expert-ms prices a format no preset times
    sim = _moesim(code, "simulate", str(rec), "--policy", "lru", "--cache-size", str(cache_size), "--prefetch",
                  prefetch, "--hardware", "h200", "--expert-ms", "0.2", "--json")
    got_live = {k: live[k] for k in LIVE_KEYS}
    got_sim = {k: sim[v] for k, v in SIM_KEYS.items()}
    return {"prefetch": prefetch, "live": got_live, "replay": got_sim, "equal": got_live == got_sim,
            "device_copies": live.get("device_copies"), "violations": live.get("violations"),
            "live_wall_s": round(live_s, 2)}


def run_closure(code: Path, model: Path, *, quant: str = "hqq2", cache: Path | None = None, device: str = "cpu",
                prefetchers: tuple[str, ...] = PREFETCHERS, tokens: int = 32, cache_size: int = 4,
                prompt_len: int = 16, chunk: int | None = None, deadline: float | None = None) -> dict:
    """Every prefetcher's :func:`closure_cell`; a prefetcher not started before ``deadline``
    (``time.perf_counter()``) is listed as skipped."""
    from tqdm import tqdm

    prompt = ",".join(str(3 + 7 * i % 97) for i in range(prompt_len))
    out: dict = {"quant": quant, "device": device, "tokens": tokens, "cache_size": cache_size, "policy": "lru",
                 "prompt_len": prompt_len, "prefill_chunk": chunk, "cells": [], "skipped": []}
    with tempfile.TemporaryDirectory(prefix="closure-") as tmp:
        for prefetch in tqdm(prefetchers, desc="closure", unit="prefetcher"):
            if deadline is not None and time.perf_counter() > deadline:
                out["skipped"].append(prefetch)
                continue
            cell = closure_cell(code, model, Path(tmp), prefetch, quant=quant, cache=cache, device=device,
                                prompt=prompt, tokens=tokens, cache_size=cache_size, chunk=chunk)
            out["cells"].append(cell)
            tqdm.write(f"closure {prefetch}: equal={cell['equal']} live={cell['live']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--code", default=str(Path(__file__).resolve().parents[2]), help="moesim source tree")
    ap.add_argument("--quant", default="hqq2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--cache-size", type=int, default=4)
    ap.add_argument("--prefill-chunk", type=int)
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    res = run_closure(Path(args.code), Path(args.model), quant=args.quant, device=args.device, tokens=args.tokens,
                      cache_size=args.cache_size, chunk=args.prefill_chunk)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
