"""Peak host memory of ``moesim generate`` while it loads a checkpoint (issue 27 item 1), on CPU.

Writes a random Mixtral-family checkpoint (bf16 safetensors, one shard per layer, written layer by layer
so this script never holds more than one layer), then runs ``python -m moesim generate`` on it in a
child process per (quant, layers) cell and records the child's peak RSS (``RUSAGE_CHILDREN``'s ``ru_maxrss``)
beside the budget the issue sets: host store (every expert blob) + non-expert weights + 2 GB. hqq cells
run twice: cold (quantize, write the cache) and from the cache; each cell keeps ``generate --json``'s
load time and time to the first token (``load_s``, ``first_token_s``, ``quant_cache``).

One checkpoint of the most layers is written; each smaller layer count is a directory with its own
config (fewer ``num_hidden_layers``) linking the first shards, so a 4/8/16-layer curve at full width
writes 47 GB once, not 82 GB.

    python studies/checkpoint_load/measure.py --code DIR --label after -o studies/checkpoint_load/raw/after.json
    # the device run (issue 27's full-width curve; hqq2 quantizes on the GPU)
    python studies/checkpoint_load/measure.py --code . --label device --device cuda --hidden 4096 --ffn 14336 \
        --layers 4,8,16 --hqq-layers 4,8,16 --work /tmp -o $OUT/device.json

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


def write_checkpoint(path: Path, hidden: int, ffn: int, layers: int, experts: int, vocab: int,
                     device: str = "cpu") -> dict[str, list[int] | int]:
    """A random bf16 Mixtral checkpoint in ``path``, one shard per layer (drawn on ``device``: a GPU draws
    a full-width layer in well under a second, the CPU in about a minute); returns its byte counts per
    layer (``expert_bytes``, ``other_bytes``) and of the global tensors (``global_bytes``)."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    cfg = _config(hidden, ffn, layers, experts, vocab)
    heads, kv, head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()
    sizes: dict[str, list[int] | int] = {"expert_bytes": [], "other_bytes": []}
    for layer in tqdm(range(layers), desc="writing the checkpoint", unit="layer"):
        p = f"model.layers.{layer}."
        t = {f"{p}input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
             f"{p}post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
             f"{p}block_sparse_moe.gate.weight": rand(experts, hidden),
             f"{p}self_attn.q_proj.weight": rand(heads * head_dim, hidden),
             f"{p}self_attn.k_proj.weight": rand(kv * head_dim, hidden),
             f"{p}self_attn.v_proj.weight": rand(kv * head_dim, hidden),
             f"{p}self_attn.o_proj.weight": rand(hidden, heads * head_dim)}
        sizes["other_bytes"].append(sum(v.numel() * 2 for v in t.values()))
        for e in range(experts):
            for w, shape in (("w1", (ffn, hidden)), ("w3", (ffn, hidden)), ("w2", (hidden, ffn))):
                t[f"{p}block_sparse_moe.experts.{e}.{w}.weight"] = rand(*shape)
        sizes["expert_bytes"].append(experts * 3 * ffn * hidden * 2)
        save_file(t, str(path / f"model-{layer:05d}.safetensors"))
        del t
    glob = {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
            "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    sizes["global_bytes"] = sum(v.numel() * 2 for v in glob.values())
    save_file(glob, str(path / "model-globals.safetensors"))
    return sizes


def _config(hidden: int, ffn: int, layers: int, experts: int, vocab: int) -> dict:
    heads, kv, head_dim = hidden // 128, max(hidden // 512, 1), 128
    return {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": hidden,
            "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": head_dim, "num_local_experts": experts, "num_experts_per_tok": 2,
            "vocab_size": vocab, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
            "torch_dtype": "bfloat16", "tie_word_embeddings": False, "eos_token_id": None}


def first_layers(full: Path, view: Path, layers: int) -> Path:
    """The first ``layers`` layers of the checkpoint in ``full`` as a checkpoint of their own, without a
    byte of weights written: a config with fewer ``num_hidden_layers`` and links to the first shards and
    the globals' shard (the loader reads every ``*.safetensors`` in the directory, so only those are linked)."""
    cfg = json.loads((full / "config.json").read_text())
    if layers == cfg["num_hidden_layers"] or (view / "config.json").is_file():   # the whole one, or made already
        return full if layers == cfg["num_hidden_layers"] else view
    view.mkdir(parents=True, exist_ok=True)
    (view / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": layers}))
    for name in [f"model-{layer:05d}.safetensors" for layer in range(layers)] + ["model-globals.safetensors"]:
        (view / name).symlink_to((full / name).resolve())
    return view


def sizes_of(sizes: dict, layers: int) -> dict[str, int]:
    """The byte counts of the first ``layers`` layers' checkpoint (what :func:`first_layers` links)."""
    return {"expert_bytes": sum(sizes["expert_bytes"][:layers]),
            "other_bytes": sum(sizes["other_bytes"][:layers]) + sizes["global_bytes"]}


def budget(hidden: int, ffn: int, layers: int, experts: int, quant: str, other_bytes: int) -> dict[str, int]:
    """The issue's bound: host store + non-expert weights + 2 GB (from this tree's formats)."""
    import torch

    from moesim.engine.identity import blob_bytes
    from moesim.engine.pack import formats

    efmt = formats(quant, torch.bfloat16)[0]
    store = layers * experts * blob_bytes(efmt.expert_bytes(hidden, ffn))
    return {"store_bytes": store, "budget_bytes": store + other_bytes + int(2 * GB)}


# what each cell keeps of ``generate --json``: the load and the first token, cold or from the cache
GENERATE_KEYS = ("load_s", "first_token_s", "quant_cache", "load_parts_s", "token_ids")


def run_generate(code: Path, ckpt: Path, quant: str, cache: Path, device: str) -> dict:
    """One ``moesim generate`` in a child; its wall time and :data:`GENERATE_KEYS` of its JSON."""
    from closure import child_env  # run as a script (the child of measure_child): its folder is on the path

    env = child_env(code)
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "2"
    cmd = [sys.executable, "-m", "moesim", "generate", "--model", str(ckpt), "--prompt-ids", "1,2,3,4",
           "--max-new-tokens", "2", "--cache-size", "2", "--policy", "lru", "--quant", quant, "--json",
           "--quant-cache", str(cache), "--device", device]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"generate failed ({quant}): {err.decode()[-500:]}")
    got = json.loads(out)
    return {"wall_s": wall, **{k: got.get(k) for k in GENERATE_KEYS}}


def measure_child(code: Path, ckpt: Path, quant: str, cache: Path, device: str) -> dict:
    """``RUSAGE_CHILDREN``'s peak covers every child a process waited for, so each measurement runs under
    a fresh parent: this script re-invoked with ``--one``."""
    cmd = [sys.executable, __file__, "--one", str(code), str(ckpt), quant, str(cache), device]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-800:])
    return json.loads(res.stdout)


def one(code: str, ckpt: str, quant: str, cache: str, device: str) -> None:
    import resource

    r = run_generate(Path(code), Path(ckpt), quant, Path(cache), device)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"peak_rss_bytes": peak_kb * 1024, **r}))


def _host(device: str) -> dict:
    """What measured: host name, CPUs, RAM and (on CUDA) the GPU."""
    out = {"host": platform.node(), "cpu_count": os.cpu_count(), "device": device,
           "host_ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    if device.startswith("cuda"):
        import torch

        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        one(*sys.argv[2:7])
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
    ap.add_argument("--device", default="cpu", help="generate's --device (cuda: hqq quantizes on the GPU, the "
                                                    "store is pinned); the checkpoint is drawn there too")
    ap.add_argument("--work", help="where the checkpoint and caches go (default: a temporary directory)")
    ap.add_argument("--cache-work", help="where the quantization caches go (default: --work; /dev/shm when the "
                                         "disk holds only the checkpoint)")
    ap.add_argument("--stop-after-s", type=float, help="start no cell after this many seconds of measuring "
                                                       "(the skipped cells are listed in the output)")
    ap.add_argument("--closure", action="store_true", help="after the largest checkpoint's --closure-quant cells, "
                    "run closure.py's record -> replay check on it (every prefetcher)")
    ap.add_argument("--closure-quant", default="hqq2")
    ap.add_argument("--commit", help="the commit of --code, recorded in the output (the device box has no git)")
    args = ap.parse_args()
    from closure import run_closure
    from tqdm import tqdm

    cells: list[dict] = []
    raw = {"label": args.label, **_host(args.device),
           "geometry": {"hidden": args.hidden, "ffn": args.ffn, "experts": args.experts, "vocab": args.vocab},
           "cells": cells}
    if args.commit:
        raw["commit"] = args.commit

    def save() -> None:   # after every cell: a cut-short run keeps what it measured
        raw["date"] = datetime.now(UTC).isoformat(timespec="seconds")
        Path(args.out).write_text(json.dumps(raw, indent=1) + "\n")
    work = Path(tempfile.mkdtemp(prefix="ckload-", dir=args.work))
    caches = Path(tempfile.mkdtemp(prefix="ckcache-", dir=args.cache_work)) if args.cache_work else work
    try:
        layer_list = [int(x) for x in args.layers.split(",")]
        hqq_layers = {int(x) for x in args.hqq_layers.split(",")}
        # quant by quant (the whole bf16 curve first), each over every layer count
        todo = [(q, n) for q in args.quants.split(",") for n in layer_list if q == "bf16" or n in hqq_layers]
        ckpt_bytes = max(layer_list) * args.experts * 3 * args.ffn * args.hidden * 2 * 1.05   # bf16 shards + slack
        cache_bytes = max(layer_list) * args.experts * 3 * args.ffn * args.hidden * 0.4   # hqq2: ~2.3 bits a weight
        for where, need in ((work, ckpt_bytes + (cache_bytes if caches == work else 0)), (caches, cache_bytes)):
            if shutil.disk_usage(where).free < need:
                raise SystemExit(f"measure.py: {where} has {shutil.disk_usage(where).free / GB:.1f} GB free; it needs "
                                 f"about {need / GB:.1f} GB (pick --work / --cache-work)")
        # one checkpoint of the most layers; every smaller count reads its first shards (nothing more written)
        full = work / f"L{max(layer_list)}"
        sizes = write_checkpoint(full, args.hidden, args.ffn, max(layer_list), args.experts, args.vocab,
                                 "cuda" if args.device.startswith("cuda") else "cpu")
        started = time.perf_counter()
        for quant, n in tqdm(todo, desc="cells", unit="cell"):
            if args.stop_after_s and time.perf_counter() - started > args.stop_after_s:
                raw["skipped"] = raw.get("skipped", []) + [[n, quant]]   # out of time: said, not silently dropped
                save()
                continue
            ckpt, size = first_layers(full, work / f"L{n}", n), sizes_of(sizes, n)
            cache = caches / f"cache-{quant}-{n}"
            b = budget(args.hidden, args.ffn, n, args.experts, quant, size["other_bytes"])
            for run in ["cold", "cached"] if quant.startswith("hqq") else ["cold"]:
                m = measure_child(Path(args.code), ckpt, quant, cache, args.device)
                cells.append({"layers": n, "quant": quant, "run": run, **size, **b, **m})
                save()
                tqdm.write(f"L={n} {quant} {run}: peak {m['peak_rss_bytes'] / GB:.2f} GB "
                           f"(budget {b['budget_bytes'] / GB:.2f} GB), load {m['load_s']} s, first token "
                           f"{m['first_token_s']} s (cache {m['quant_cache']}), wall {m['wall_s']:.1f} s")
            if args.closure and quant == args.closure_quant and n == max(layer_list):
                # issue 27 item 3 quoted on the same run: the largest checkpoint, from the cache just written
                deadline = started + args.stop_after_s if args.stop_after_s else None
                raw["closure"] = {"layers": n, **run_closure(Path(args.code), ckpt, quant=quant, cache=cache,
                                                              device=args.device, deadline=deadline)}
                save()
            shutil.rmtree(cache, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.cache_work:
            shutil.rmtree(caches, ignore_errors=True)
    save()


if __name__ == "__main__":
    main()
