"""``moesim record`` on a model bigger than the GPU's memory (issue 27 item 5), measured on one GPU.

    python3 studies/record_offload/gpu_record_offload.py --out $OUT                (H100: ~2 min)
    python studies/record_offload/gpu_record_offload.py --cpu-check --out /tmp/r    (tiny, CPU, seconds)

Builds a Mixtral model with random bf16 weights at full width (hidden 4096, FFN 14336, 8 experts, top-2,
32/8 heads, vocab 32000) and ``--layers`` layers (8: about 24 GB) on the GPU (transformers' own init),
then keeps it in host memory. Then, on the same weights:

1. plain: the recorder with the whole model on the GPU (``offload="none"``), no memory cap;
2. the cap: ``torch.cuda.set_per_process_memory_fraction`` so the process may use ``--cap`` x the model's
   weight bytes; moving the whole model onto the GPU under it must fail (out of memory), which shows
   the model does not fit;
3. offloaded: the recorder under that cap with ``offload="auto"`` -- the choice ``moesim record`` makes
   by default -- which must pick expert offloading (routed experts copied from pinned host memory per
   forward pass);
4. compare the two traces, read back with the recorder's own reader: experts, weights and prediction
   columns, and the generated tokens, must be equal.

Each run reports seconds per generated token (prefill included), peak GPU memory
(``max_memory_allocated``) and host->device bytes; the process's peak host RSS is reported once.
Writes ``OUT/record_offload.json`` (everything), ``OUT/record_offload.log`` (the progress lines),
``OUT/plain.parquet`` and ``OUT/offloaded.parquet``. Imports only torch, transformers, pyarrow, numpy
and moesim (no polars, no hqq). ``--cpu-check`` runs the same steps on a tiny model on the CPU, with the
cap given as ``max_gpu_gb`` (a CPU has no allocator cap) and step 2 skipped.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from moesim.engine.cuda import exit_unless_cuda  # noqa: E402
from moesim.recorder import ByteTokenizer, adapter_for, load_prompts, record  # noqa: E402
from moesim.recorder.offload import choose_mode, device_budget, footprint  # noqa: E402
from moesim.recorder.presets import BOS_ID, EOS_ID, PAD_ID  # noqa: E402
from moesim.safe_write import atomic_open  # noqa: E402
from moesim.traces.format import read_trace  # noqa: E402

FULL_WIDTH = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                  num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2)
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            num_local_experts=8, num_experts_per_tok=2)


class Log:
    def __init__(self, path: Path) -> None:
        self.t0 = time.perf_counter()
        self.fh = open(path, "w", encoding="utf-8")  # noqa: SIM115 - kept open for the run

    def __call__(self, msg: str) -> None:
        line = f"[{datetime.now().strftime('%H:%M:%S')} +{time.perf_counter() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.fh.write(line + "\n")
        self.fh.flush()


def build_model(geometry: dict[str, int], layers: int, device: str, seed: int = 0) -> torch.nn.Module:
    """A random bf16 Mixtral built on ``device`` (transformers' init, no fp32 copy), returned on the host."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(**geometry, num_hidden_layers=layers, max_position_embeddings=4096, rms_norm_eps=1e-5,
                        tie_word_embeddings=False, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    cfg._attn_implementation = "sdpa"
    cfg.dtype = torch.bfloat16
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device), torch.no_grad():
            model = MixtralForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = PAD_ID, EOS_ID, BOS_ID
    return model.to("cpu").eval()


def compare_traces(a: Path, b: Path) -> dict[str, Any]:
    """Routing, routing weights and every prediction distance of two traces (the recorder's own reader):
    per column, equal or not and how many rows differ."""
    ta, tb = read_trace(a), read_trace(b)
    out: dict[str, Any] = {"rows": [len(ta), len(tb)], "columns": {}}
    same_rows = len(ta) == len(tb) and bool(np.array_equal(ta.seq, tb.seq) and np.array_equal(ta.token, tb.token)
                                             and np.array_equal(ta.layer, tb.layer))
    pairs = {"experts": (ta.experts, tb.experts), "weights": (ta.weights, tb.weights)}
    for d in ta.pred_distances:
        pairs[f"pred{d}_experts"] = (ta.pred_experts(d), tb.pred_experts(d) if d in tb.pred_distances else None)
    for name, (x, y) in pairs.items():
        differ = (int((x != y).reshape(len(x), -1).any(axis=1).sum())
                  if same_rows and y is not None and x.shape == y.shape else None)
        out["columns"][name] = {"equal": differ == 0, "rows_differing": differ}
    out["identical"] = same_rows and len(pairs) > 2 and all(v["equal"] for v in out["columns"].values())
    return out


def _peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int | None:
    return int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None


def run_recording(model, prompts: list[str], out: Path, device: str, new_tokens: int, log: Log, **placing) -> dict:
    """One recording of ``prompts`` (predictions 1 and 2 layers ahead); its time per token, peak GPU
    memory and host->device traffic."""
    _peak_reset(device)
    layers = model.config.num_hidden_layers
    res = record(model, prompts, out, max_new_tokens=new_tokens, device=device, dtype="bfloat16",
                 predict_distance=min(2, layers - 1), tokenizer=ByteTokenizer(), progress=False, **placing)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    generated = sum(len(g) for g in res.generated)
    pl = res.placement
    row = {"mode": pl.mode if pl else None, "seconds": res.seconds, "tokens_recorded": res.tokens,
           "tokens_generated": generated, "seconds_per_generated_token": res.seconds / max(generated, 1),
           "peak_gpu_bytes": _peak(device), "budget_bytes": pl.budget if pl else None,
           "bytes_host_to_device": pl.offload.bytes_copied if pl and pl.offload else 0,
           "copies": pl.offload.copies if pl and pl.offload else 0, "generated": res.generated}
    log(f"{out.name}: mode {row['mode']}, {generated} tokens in {res.seconds:.1f} s "
        f"({row['seconds_per_generated_token'] * 1e3:.0f} ms/token), peak GPU "
        f"{(row['peak_gpu_bytes'] or 0) / 1e9:.2f} GB, H2D {row['bytes_host_to_device'] / 1e9:.2f} GB")
    return row


def try_resident_under_cap(model, device: str) -> str:
    """Move the whole model onto the capped GPU: 'out of memory' is what shows it does not fit."""
    try:
        model.to(device)
        outcome = "fits"
    except torch.OutOfMemoryError:
        outcome = "out of memory"
    model.to("cpu")
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    _peak_reset(device)
    return outcome


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory (created)")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (8 at full width: about 24 GB)")
    ap.add_argument("--cap", type=float, default=0.45, help="GPU memory cap as a share of the model's weight bytes")
    ap.add_argument("--prompts", type=int, default=2, help="built-in prompts recorded")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens generated per prompt")
    ap.add_argument("--cpu-check", action="store_true", help="tiny model on the CPU (smoke run of every step)")
    args = ap.parse_args(argv)
    if not args.cpu_check:
        exit_unless_cuda(Path(__file__).name)
    device = "cpu" if args.cpu_check else "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "record_offload.log")
    geometry = TINY if args.cpu_check else FULL_WIDTH
    result: dict[str, Any] = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                              "host": platform.node(), "torch": torch.__version__,
                              "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                              "geometry": {**geometry, "num_hidden_layers": args.layers}, "cap_share": args.cap,
                              "prompts": args.prompts, "new_tokens": args.new_tokens}
    import transformers

    result["transformers"] = transformers.__version__
    try:
        measure(args, device, geometry, out, log, result)
    finally:
        result["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        with atomic_open(out / "record_offload.json") as fh:
            json.dump(result, fh, indent=1)
    log(f"wrote {out / 'record_offload.json'}")
    return 0 if result.get("comparison", {}).get("identical") and result.get("offloaded_mode_ok") else 1


def measure(args, device: str, geometry: dict[str, int], out: Path, log: Log, result: dict[str, Any]) -> None:
    """The four steps of the module docstring, filling ``result`` as they finish."""
    log(f"building a random Mixtral ({args.layers} layers, hidden {geometry['hidden_size']}) on {device}")
    model = build_model(geometry, args.layers, device)
    fp = footprint(model, adapter_for(model))
    result["weight_bytes"] = {"total": fp.total, "experts": fp.experts, "dense": fp.dense,
                              "largest_layer_experts": fp.largest_layer}
    log(f"model weights {fp.total / 1e9:.2f} GB ({fp.experts / 1e9:.2f} GB routed experts), now on the host")
    prompts = load_prompts()[:args.prompts]
    warm = out / "warm-up.parquet"  # first kernels, allocator and cuBLAS set-up, kept out of the timings
    record(model, prompts[:1], warm, max_new_tokens=2, device=device, dtype="bfloat16", tokenizer=ByteTokenizer(),
           progress=False, offload="none")
    warm.unlink()
    result["plain"] = run_recording(model, prompts, out / "plain.parquet", device, args.new_tokens, log,
                                    offload="none")
    model.to("cpu")
    if device.startswith("cuda"):
        # the cap binds only new cudaMallocs: blocks the plain run left cached would let the model back in
        torch.cuda.empty_cache()
    cap = int(args.cap * fp.total)
    placing: dict[str, Any] = {"offload": "auto"}
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        torch.cuda.set_per_process_memory_fraction(cap / total)
        result["cap_bytes"] = cap
        result["resident_under_cap"] = try_resident_under_cap(model, device)
        log(f"GPU capped at {cap / 1e9:.2f} GB; the whole model under the cap: {result['resident_under_cap']}")
        budget = device_budget(torch.device(device), None)
        result["auto_budget_bytes"] = budget
        result["auto_choice"] = choose_mode(fp, budget, "auto")
        if result["auto_choice"] != "experts":  # still measure the offload path, and say auto missed
            placing = {"offload": "experts", "max_gpu_gb": cap / 1e9}
    else:
        placing["max_gpu_gb"] = cap / 1e9
        result["cap_bytes"] = cap
    result["offloaded"] = run_recording(model, prompts, out / "offloaded.parquet", device, args.new_tokens, log,
                                        **placing)
    result["offloaded_mode_ok"] = result["offloaded"]["mode"] == "experts"
    cmp = compare_traces(out / "plain.parquet", out / "offloaded.parquet")
    cmp["generated_equal"] = result["plain"]["generated"] == result["offloaded"]["generated"]
    result["comparison"] = cmp
    p, o = result["plain"], result["offloaded"]
    result["slowdown"] = o["seconds_per_generated_token"] / p["seconds_per_generated_token"]
    log(f"traces identical: {cmp['identical']} (rows {cmp['rows']}), generated tokens equal: "
        f"{cmp['generated_equal']}; offloaded / plain time per token: {result['slowdown']:.1f}x")


if __name__ == "__main__":
    sys.exit(main())
