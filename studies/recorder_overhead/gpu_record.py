"""Recorder overhead at full Mixtral-8x7B geometry (random bf16 weights) on one GPU, plus a short trace.

    python3 studies/recorder_overhead/gpu_record.py --out $OUT            (H200: ~3-4 min in all)
    python studies/recorder_overhead/gpu_record.py --cpu-check --out /tmp/r    (CPU smoke run, seconds; = --tiny --device cpu)

Builds ``MixtralForCausalLM`` with the Mixtral-8x7B config (hidden 4096, intermediate 14336, 32 layers,
8 experts top-2, 32 heads / 8 kv heads, vocab 32000: 46.7B params, 93 GB in bf16) directly on the
device in bf16, with transformers' own random init (normal_ on the device; no fp32 copy). Then
times greedy ``model.generate`` (batch 1, built-in prompts, ByteTokenizer ids) in interleaved rounds
for: plain (no hooks), recorder without predictions, recorder d=1, recorder d=1 + logits, and
recorder d=1 on the per-layer prediction path (the path before batching, for comparison); the
median tokens/s of each over ``--repeats`` rounds and its overhead vs plain. Finally records one
short trace with predictions (d=1..2, logits) through the recorder into ``OUT/trace.parquet``.

Writes (each atomically) ``OUT/gpu_record.json`` (device, versions, params, tokens/s and overhead
per variant, date), ``OUT/gpu_record.txt`` (the table) and ``OUT/trace.parquet``. Progress lines go
to stdout with timestamps. Imports neither polars nor anything outside torch / transformers /
pyarrow / numpy.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.bench_recorder import timed_generate  # noqa: E402  (the speed benchmark's timing loop)
from moesim.recorder import ByteTokenizer, Recorder, load_prompts  # noqa: E402
from moesim.recorder.presets import BOS_ID, EOS_ID, PAD_ID  # noqa: E402
from moesim.safe_write import atomic_open  # noqa: E402

T0 = time.perf_counter()

FULL = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
            max_position_embeddings=32768, rms_norm_eps=1e-5)  # rope theta: the config default (1e6)
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
            rms_norm_eps=1e-5)
PLAIN = "plain (no hooks)"
VARIANTS = {
    PLAIN: None,
    "recorder, no predictions": dict(predict_distance=0, flush_tokens=256),
    "recorder, d=1": dict(predict_distance=1, flush_tokens=256),
    "recorder, d=1 + logits": dict(predict_distance=1, logits=True, pred_logits=True, flush_tokens=256),
    "recorder, d=1 per-layer path": dict(predict_distance=1, flush_tokens=256, batch_predictions=False),
}


def log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def build(args: argparse.Namespace, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(**(TINY if args.tiny else FULL), tie_word_embeddings=False, pad_token_id=PAD_ID,
                        bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    cfg._attn_implementation = "sdpa"
    cfg.dtype = dtype
    torch.manual_seed(args.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in the target dtype on the device: no fp32 copy
    try:
        with torch.device(args.device), torch.no_grad():
            model = MixtralForCausalLM(cfg)  # transformers' random init (normal_, std 0.02) runs on the device
    finally:
        torch.set_default_dtype(previous)
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = PAD_ID, EOS_ID, BOS_ID
    return model.eval()


def record_trace(model, prompts, tok, new_tokens: int, device: str, path: Path) -> dict:
    """One short trace with predictions (d=1..2) and logits, through the recorder's crash-safe writer."""
    prov = {"device": device, "weights": "random (transformers init), Mixtral-8x7B geometry",
            "script": "studies/recorder_overhead/gpu_record.py"}
    with Recorder(model, None, path, predict_distance=2, logits=True, pred_logits=True, flush_tokens=64,
                  model_name="mixtral-8x7b-geometry-random", provenance=prov) as rec:
        for seq, p in enumerate(prompts):
            ids = torch.tensor([tok.encode(p)], device=device)
            rec.begin_sequence(seq)
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False)
    return {"path": str(path), "tokens": rec.tokens_recorded, "predict_path": rec.predict_path,
            "pred_distances": list(rec.distances)}


def predict_path_of(model, kw: dict | None) -> str | None:
    if kw is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        rec = Recorder(model, None, Path(tmp) / "probe.parquet", **kw)
        with rec:
            return rec.predict_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (created)")
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens per prompt in the timed runs")
    ap.add_argument("--prompts", type=int, default=3, help="built-in prompts per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median reported)")
    ap.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (cpu only with --tiny)")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny geometry (CPU smoke test)")
    ap.add_argument("--trace-tokens", type=int, default=16, help="decode tokens per prompt of the kept trace")
    ap.add_argument("--trace-prompts", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=4, help="torch CPU threads")
    ap.add_argument("--cpu-check", action="store_true", help="the same as --tiny --device cpu")
    args = ap.parse_args()
    if args.cpu_check:
        args.tiny, args.device = True, "cpu"
    from moesim.engine.cuda import require_device

    require_device(args.device, args.tiny, "gpu_record.py")  # never full Mixtral in fp32 on the CPU
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    cuda = args.device.startswith("cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import transformers

    dev_name = torch.cuda.get_device_name(torch.device(args.device)) if cuda else platform.processor() or "cpu"
    log(f"device {args.device} ({dev_name}), torch {torch.__version__}, transformers {transformers.__version__}")
    if cuda:
        free, total = torch.cuda.mem_get_info(torch.device(args.device))
        log(f"GPU memory free {free / 2**30:.1f} / {total / 2**30:.1f} GiB")
    log(f"building {'tiny' if args.tiny else 'full Mixtral-8x7B'} geometry, {dtype}, random weights ...")
    t = time.perf_counter()
    model = build(args, dtype)
    if cuda:
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t
    n_params = sum(p.numel() for p in model.parameters())
    log(f"built in {build_s:.1f}s: {human(n_params)} params"
        + (f", {torch.cuda.memory_allocated(torch.device(args.device)) / 2**30:.1f} GiB allocated" if cuda else ""))

    tok = ByteTokenizer()
    prompts = load_prompts()[:args.prompts]
    assert max(max(tok.encode(p)) for p in prompts) < model.config.vocab_size
    paths = {name: predict_path_of(model, kw) for name, kw in VARIANTS.items()}
    log("prediction paths: " + ", ".join(f"{k}: {v}" for k, v in paths.items() if v))

    rates: dict[str, list[float]] = {k: [] for k in VARIANTS}
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        t = time.perf_counter()
        timed_generate(model, prompts[:1], tok, 4, args.device, None, Path(tmp))  # warm-up (kernels, allocator)
        timed_generate(model, prompts[:1], tok, 4, args.device, VARIANTS["recorder, d=1 + logits"], Path(tmp))
        log(f"warm-up done in {time.perf_counter() - t:.1f}s")
        for r in range(args.repeats):  # interleaved, so drift hits every variant alike
            for name, kw in VARIANTS.items():
                rate = timed_generate(model, prompts, tok, args.tokens, args.device, kw, Path(tmp))
                rates[name].append(rate)
                log(f"round {r + 1}/{args.repeats} {name:30s} {rate:8.2f} tok/s ({1000 / rate:7.2f} ms/token)")

    base = statistics.median(rates[PLAIN])
    variants = {}
    for name, r in rates.items():
        m = statistics.median(r)
        variants[name] = {"tokens_per_s": m, "ms_per_token": 1000 / m, "rates": r, "vs_plain": m / base,
                          "overhead_pct": 100 * (base / m - 1), "predict_path": paths[name]}

    log(f"recording a trace ({args.trace_prompts} prompts x {args.trace_tokens} tokens, d=1..2, logits) ...")
    t = time.perf_counter()
    trace = record_trace(model, load_prompts()[:args.trace_prompts], tok, args.trace_tokens, args.device,
                         out / "trace.parquet")
    trace["seconds"] = time.perf_counter() - t
    log(f"trace: {trace['tokens']} tokens in {trace['seconds']:.1f}s -> {trace['path']}")

    g = model.config
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": args.device, "device_name": dev_name,
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "model": "tiny Mixtral geometry" if args.tiny else "Mixtral-8x7B geometry (random weights)",
        "params": n_params, "dtype": str(dtype).replace("torch.", ""),
        "geometry": {k: getattr(g, k) for k in (TINY if args.tiny else FULL)},
        "attn_implementation": g._attn_implementation,
        "experts_implementation": getattr(g, "_experts_implementation", None),
        "prompts": len(prompts), "tokens_per_prompt": args.tokens, "repeats": args.repeats,
        "build_seconds": build_s, "variants": variants, "trace": trace,
        "max_memory_allocated_gib": (torch.cuda.max_memory_allocated(torch.device(args.device)) / 2**30
                                     if cuda else None),
        "total_seconds": time.perf_counter() - T0,
        "command": " ".join(sys.argv),
    }
    lines = [f"# python3 {' '.join(sys.argv)}",
             f"# {dev_name}, torch {torch.__version__}, transformers {transformers.__version__}, {result['date']}",
             f"model {result['model']} ({human(n_params)} params, {result['dtype']}, {args.device}), "
             f"{len(prompts)} prompts x {args.tokens} decode tokens, median of {args.repeats}",
             f"{'variant':30s} {'tokens/s':>10s} {'ms/token':>9s} {'vs plain':>9s} {'overhead':>9s}  path"]
    for name, v in variants.items():
        lines.append(f"{name:30s} {v['tokens_per_s']:10.2f} {v['ms_per_token']:9.2f} {v['vs_plain']:9.3f} "
                     f"{v['overhead_pct']:8.1f}%  {v['predict_path'] or '-'}")
    table = "\n".join(lines) + "\n"
    with atomic_open(out / "gpu_record.json") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")
    with atomic_open(out / "gpu_record.txt") as fh:
        fh.write(table)
    print(table, end="", flush=True)
    log(f"done: {out / 'gpu_record.json'}, {out / 'gpu_record.txt'}, {out / 'trace.parquet'}")


if __name__ == "__main__":
    main()
