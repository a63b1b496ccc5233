"""Peak host memory of ``moesim generate`` while it loads a checkpoint (issue 27 item 1), on CPU.

Writes a random Mixtral-family checkpoint (bf16 safetensors, one shard per layer, written layer by layer
so this script never holds more than one layer), then runs ``python -m moesim generate`` on it in a
child process per (quant, layers) cell and records the child's peak RSS (``RUSAGE_CHILDREN``'s ``ru_maxrss``)
beside the budget the issue sets: host store (every expert blob) + non-expert weights + 2 GB. hqq cells
run twice: cold (quantize, write the cache) and from the cache.

    python studies/checkpoint_load/measure.py --code DIR --label after -o studies/checkpoint_load/raw/after.json

``--code`` is the moesim source tree to measure (a checkout of the commit before the streaming load for
the "before" numbers); the budget terms come from the tree this script runs in.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

GB = 1e9


def write_checkpoint(path: Path, hidden: int, ffn: int, layers: int, experts: int, vocab: int) -> dict[str, int]:
    """A random bf16 Mixtral checkpoint in ``path``; returns its byte counts (experts, other)."""
    import torch
    from safetensors.torch import save_file

    heads, kv, head_dim = hidden // 128, max(hidden // 512, 1), 128
    cfg = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": hidden,
           "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "head_dim": head_dim, "num_local_experts": experts, "num_experts_per_tok": 2,
           "vocab_size": vocab, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
           "torch_dtype": "bfloat16", "tie_word_embeddings": False, "eos_token_id": None}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
    sizes = {"expert_bytes": 0, "other_bytes": 0}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        t = {f"{p}input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
             f"{p}post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
             f"{p}block_sparse_moe.gate.weight": rand(experts, hidden),
             f"{p}self_attn.q_proj.weight": rand(heads * head_dim, hidden),
             f"{p}self_attn.k_proj.weight": rand(kv * head_dim, hidden),
             f"{p}self_attn.v_proj.weight": rand(kv * head_dim, hidden),
             f"{p}self_attn.o_proj.weight": rand(hidden, heads * head_dim)}
        sizes["other_bytes"] += sum(v.numel() * 2 for v in t.values())
        for e in range(experts):
            for w, shape in (("w1", (ffn, hidden)), ("w3", (ffn, hidden)), ("w2", (hidden, ffn))):
                t[f"{p}block_sparse_moe.experts.{e}.{w}.weight"] = rand(*shape)
                sizes["expert_bytes"] += ffn * hidden * 2
        save_file(t, str(path / f"model-{layer:05d}.safetensors"))
        del t
    glob = {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
            "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    sizes["other_bytes"] += sum(v.numel() * 2 for v in glob.values())
    save_file(glob, str(path / "model-globals.safetensors"))
    return sizes


def budget(hidden: int, ffn: int, layers: int, experts: int, quant: str, other_bytes: int) -> dict[str, int]:
    """The issue's bound: host store + non-expert weights + 2 GB (from this tree's formats)."""
    import torch

    from moesim.engine.identity import blob_bytes
    from moesim.engine.pack import formats

    efmt = formats(quant, torch.bfloat16)[0]
    store = layers * experts * blob_bytes(efmt.expert_bytes(hidden, ffn))
    return {"store_bytes": store, "budget_bytes": store + other_bytes + int(2 * GB)}


def run_generate(code: Path, ckpt: Path, quant: str, cache: Path) -> dict[str, float]:
    """One ``moesim generate`` in a child; its peak RSS and wall time."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "moesim", "generate", "--model", str(ckpt), "--prompt-ids", "1,2,3,4",
           "--max-new-tokens", "2", "--cache-size", "2", "--policy", "lru", "--quant", quant, "--json",
           "--quant-cache", str(cache)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"generate failed ({quant}): {err.decode()[-500:]}")
    return {"wall_s": wall, "stdout": json.loads(out)["token_ids"]}


def measure_child(code: Path, ckpt: Path, quant: str, cache: Path) -> dict[str, float]:
    """``RUSAGE_CHILDREN``'s peak covers every child a process waited for, so each measurement runs under
    a fresh parent: this script re-invoked with ``--one``."""
    cmd = [sys.executable, __file__, "--one", str(code), str(ckpt), quant, str(cache)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-800:])
    return json.loads(res.stdout)


def one(code: str, ckpt: str, quant: str, cache: str) -> None:
    import resource

    r = run_generate(Path(code), Path(ckpt), quant, Path(cache))
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"peak_rss_bytes": peak_kb * 1024, "wall_s": r["wall_s"], "token_ids": r["stdout"]}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        one(*sys.argv[2:6])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", required=True, help="moesim source tree to measure")
    ap.add_argument("--label", required=True)
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=3584)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--layers", default="2,4,8")
    ap.add_argument("--quants", default="bf16,hqq2")
    ap.add_argument("--hqq-layers", default="2", help="layer counts for hqq cells (quantizing is slow on CPU)")
    args = ap.parse_args()
    from tqdm import tqdm

    cells: list[dict] = []
    raw = {"label": args.label, "host": platform.node(), "cpu_count": os.cpu_count(),
           "geometry": {"hidden": args.hidden, "ffn": args.ffn, "experts": args.experts, "vocab": args.vocab},
           "cells": cells}

    def save() -> None:   # after every cell: a cut-short run keeps what it measured
        raw["date"] = datetime.now(UTC).isoformat(timespec="seconds")
        Path(args.out).write_text(json.dumps(raw, indent=1) + "\n")
    work = Path(tempfile.mkdtemp(prefix="ckload-"))
    try:
        layer_list = [int(x) for x in args.layers.split(",")]
        hqq_layers = {int(x) for x in args.hqq_layers.split(",")}
        todo = [(n, q) for n in layer_list for q in args.quants.split(",") if q == "bf16" or n in hqq_layers]
        for n in tqdm(layer_list, desc="checkpoints", unit="ckpt"):
            ckpt = work / f"L{n}"
            sizes = write_checkpoint(ckpt, args.hidden, args.ffn, n, args.experts, args.vocab)
            for _, quant in [c for c in todo if c[0] == n]:
                cache = work / f"cache-{quant}-{n}"
                b = budget(args.hidden, args.ffn, n, args.experts, quant, sizes["other_bytes"])
                runs = ["cold", "cached"] if quant.startswith("hqq") else ["cold"]
                for run in runs:
                    m = measure_child(Path(args.code), ckpt, quant, cache)
                    cells.append({"layers": n, "quant": quant, "run": run, **sizes, **b, **m})
                    save()
                    tqdm.write(f"L={n} {quant} {run}: peak {m['peak_rss_bytes'] / GB:.2f} GB "
                               f"(budget {b['budget_bytes'] / GB:.2f} GB) in {m['wall_s']:.1f}s")
                shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(ckpt, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save()


if __name__ == "__main__":
    main()
