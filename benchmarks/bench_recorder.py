"""Recorder overhead: decode tokens/s of ``model.generate`` with and without the recorder attached.

    python benchmarks/bench_recorder.py [--preset tiny-mixtral] [--tokens 64] [--prompts 4] [--repeats 3]
    python benchmarks/bench_recorder.py --device cuda --dtype bfloat16 --hidden 4096 ...   (GPU box)

Runs the same greedy ``model.generate`` calls (same prompts, same seed) in interleaved rounds: plain, recorder
without predictions, recorder with d=1 predictions, recorder with d=1 + logits. Reports the median
generated tokens/s of each and its ratio to plain in the same run. ``--hidden/--layers/--experts`` scale the
preset's geometry (random weights) so the fixed per-layer cost of the hooks can be seen against a
realistic amount of compute.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moesim.recorder import ByteTokenizer, Recorder, load_prompts
from moesim.recorder.presets import PRESETS, build_preset


def build(args: argparse.Namespace) -> torch.nn.Module:
    if args.hidden or args.layers or args.experts:
        cls, cfg = PRESETS[args.preset]()
        if args.hidden:
            cfg.hidden_size, cfg.intermediate_size = args.hidden, int(args.hidden * 3.5)
            cfg.head_dim = args.hidden // cfg.num_attention_heads
        if args.layers:
            cfg.num_hidden_layers = args.layers
        if args.experts:
            for key in ("num_local_experts", "num_experts", "n_routed_experts"):
                if hasattr(cfg, key):
                    setattr(cfg, key, args.experts)
        torch.manual_seed(args.seed)
        model = cls(cfg).to(getattr(torch, args.dtype)).eval()
    else:
        model = build_preset(args.preset, seed=args.seed, dtype=getattr(torch, args.dtype))
    return model.to(args.device)


def timed_generate(model, prompts, tok, new_tokens: int, device: str, recorder_kwargs: dict | None,
                   out_dir: Path) -> float:
    """Generated tokens/s of greedy ``model.generate`` (prefill included; exactly ``new_tokens`` each)."""
    rec = None
    if recorder_kwargs is not None:
        rec = Recorder(model, None, out_dir / f"r{time.monotonic_ns()}.parquet", **recorder_kwargs).__enter__()
    try:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for seq, p in enumerate(prompts):
            ids = torch.tensor([tok.encode(p)], device=device)
            if rec is not None:
                rec.begin_sequence(seq)
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    finally:
        if rec is not None:
            rec.__exit__(None, None, None)
    return len(prompts) * new_tokens / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-mixtral", choices=sorted(PRESETS))
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per prompt")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, help="override hidden size (intermediate = 3.5x)")
    ap.add_argument("--layers", type=int, help="override decoder layers")
    ap.add_argument("--experts", type=int, help="override experts per layer")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = steadier numbers)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = build(args)
    tok = ByteTokenizer()
    prompts = load_prompts()[:args.prompts]
    variants = {
        "plain (no hooks)": None,
        "recorder, no predictions": dict(predict_distance=0, flush_tokens=256),
        "recorder, d=1": dict(predict_distance=1, flush_tokens=256),
        "recorder, d=1 + logits": dict(predict_distance=1, logits=True, pred_logits=True, flush_tokens=256),
    }
    rates: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        timed_generate(model, prompts[:1], tok, 4, args.device, None, Path(tmp))  # warm-up
        for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
            for name, kw in variants.items():
                rates[name].append(timed_generate(model, prompts, tok, args.tokens, args.device, kw, Path(tmp)))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.preset} ({n_params / 1e6:.1f}M params, {args.dtype}, {args.device}), "
          f"{args.prompts} prompts x {args.tokens} decode tokens, median of {args.repeats}")
    base = statistics.median(rates["plain (no hooks)"])
    print(f"{'variant':28s} {'tokens/s':>10s} {'vs plain':>9s} {'overhead':>9s}")
    for name, r in rates.items():
        m = statistics.median(r)
        print(f"{name:28s} {m:10.1f} {m / base:9.3f} {100 * (base / m - 1):8.1f}%")


if __name__ == "__main__":
    main()
