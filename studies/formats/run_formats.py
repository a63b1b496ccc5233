"""Quality and size of every expert format (issue 23 item 1), on CPU: held-out perplexity of a learned
Mixtral-architecture MoE whose expert weights are quantised to each format and dequantised back exactly
as the engine's reference path does (``moesim.engine.pack.pack_matrix`` -> ``quant.matrix``), against the
same model in bf16.

The model is the project's learned MoE (``tools/train_learned_moe.py``: same corpus, held-out split,
tokenizer and training loop), trained here on CPU at a small width (``CONFIG``) in fp32 (bf16 matmuls
are many times slower on a CPU): the H200 checkpoint behind the shipped learned traces is not committed.
The reference row is the model's weights rounded to bf16 (the engine's unquantised expert format);
attention, router, embeddings and norms stay fp32, so the difference between two rows is the expert
format alone.

    python studies/formats/run_formats.py --out studies/formats/raw [--train-seconds 240]

Writes ``formats.json`` under --out (model config, training summary, one row per format).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from moesim.engine.quant import quant_spec  # noqa: E402
from studies._common import write_json  # noqa: E402

# wide enough that every format's groups fit a row (hqq2: 16 x 128 groups per meta span) and the
# formats separate; small enough to train on two CPU cores in minutes
CONFIG = dict(layers=4, hidden=128, ffn=256, heads=4, kv_heads=2, vocab=1024, seq=128, batch=16,
              lr=3e-3, warmup=0.1, tokenizer_mb=2, eval_windows=96, prompt_tokens=24)
FORMATS = ("bf16", "hqq4", "hqq4-v02", "hqq2-v02", "hqq2-g64", "hqq2")
MIXTRAL_8X7B = (4096, 14336)   # hidden, ffn: the bytes per expert the engine copies


def _trainer():
    spec = importlib.util.spec_from_file_location("train_learned_moe", ROOT / "tools" / "train_learned_moe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def quantise_experts(model, spec) -> float:
    """Replace every expert matrix of ``model`` (transformers' fused layout) with its ``spec`` round trip
    (for bf16: the weights rounded to bf16). Returns the relative error of all expert weights together,
    ||W_q - W|| / ||W|| (Frobenius)."""
    import torch

    from moesim.engine.pack import pack_matrix
    from moesim.engine.quant import matrix

    err2 = ref2 = 0.0
    with torch.no_grad():
        for layer in model.model.layers:
            experts = layer.mlp.experts
            for param in (experts.gate_up_proj, experts.down_proj):
                for e in range(param.shape[0]):
                    w = param[e].double().clone()
                    rows, cols = w.shape
                    blob = pack_matrix(w.float(), spec, "cpu")
                    param[e].copy_(matrix(blob, spec, rows, cols).to(param.dtype))
                    err2 += float((param[e].double() - w).pow(2).sum())
                    ref2 += float(w.pow(2).sum())
    return (err2 / ref2) ** 0.5


def data_and_model(tlm, c: dict, args) -> tuple:
    """(held-out tokens, trained fp32 model, corpus and training summary)."""

    roots = tlm.default_roots()
    files = tlm.corpus_files(roots)
    held = [f for f in files if tlm.held_out(f)]
    train_files = [f for f in files if not tlm.held_out(f)]
    texts, _ = tlm.read_texts(tlm.hash_order(train_files, args.seed), int(args.corpus_mb * 1e6))
    held_texts, _ = tlm.read_texts(tlm.hash_order(held, args.seed), int(args.held_mb * 1e6))
    tok = tlm.train_tokenizer(tlm.tokenizer_sample(texts, c["tokenizer_mb"])[0], c["vocab"])
    eos = tok.token_to_id(tlm.EOS)
    data, held_data = tlm.encode_all(tok, texts, eos), tlm.encode_all(tok, held_texts, eos)
    tlm.log(f"{len(data):,} training tokens, {len(held_data):,} held-out tokens")
    model, _ = tlm.build_model(c, args.seed)   # fp32: bf16 matmuls are many times slower on a CPU
    tr = tlm.train(model, data, c, SimpleNamespace(seed=args.seed, steps=args.steps, train_seconds=args.train_seconds,
                                                   train_deadline=None), "cpu")
    tr.pop("curve")
    summary = {"train_files_read": len(texts), "held_out_files_read": len(held_texts),
               "train_tokens_available": int(len(data)), "held_out_tokens_available": int(len(held_data)),
               "split": "held out iff sha256(real path)[0] < 13 (tools/train_learned_moe.py)", "train": tr}
    return held_data, model, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train-seconds", type=float, default=240.0)
    ap.add_argument("--steps", type=int, help="exact training steps (default: fitted to --train-seconds)")
    ap.add_argument("--corpus-mb", type=float, default=8.0)
    ap.add_argument("--held-mb", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: on a shared 2-core box more threads thrash, ~10x slower)")
    args = ap.parse_args(argv)
    import copy

    import torch

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tlm = _trainer()
    c = dict(CONFIG)
    held_data, model, summary = data_and_model(tlm, c, args)
    rows = []
    for name in FORMATS:
        spec = quant_spec(name)
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        weight_err = quantise_experts(m, spec)
        ev = tlm.evaluate(m, held_data, c, "cpu")
        rows.append({"format": name, "bits": spec.bits, "group_size": None if spec.is_plain else spec.group_size,
                     "quant_meta": None if spec.is_plain else spec.quant_meta,
                     "expert_bytes_model": spec.expert_bytes(c["hidden"], c["ffn"]),
                     "expert_bytes_mixtral_8x7b": spec.expert_bytes(*MIXTRAL_8X7B),
                     "expert_weight_rel_error": weight_err, "held_out_loss": ev["loss"], "perplexity": ev["perplexity"], "tokens": ev["tokens"],
                     "seconds": round(time.perf_counter() - t0, 1)})
        tlm.log(f"{name}: perplexity {ev['perplexity']:.3f} ({ev['tokens']:,} tokens)")
    out = {"model_config": c, "seed": args.seed, "corpus_mb": args.corpus_mb, "held_mb": args.held_mb,
           "torch": torch.__version__, "threads": args.threads, "date": time.strftime("%Y-%m-%d", time.gmtime()), **summary,
           "mixtral_8x7b_expert_weights": 3 * MIXTRAL_8X7B[0] * MIXTRAL_8X7B[1], "formats": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "formats.json"
    write_json(path, out)
    tlm.log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
