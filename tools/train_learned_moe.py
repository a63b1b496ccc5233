"""Train a Mixtral-architecture MoE from scratch on text found on the machine, then record its routing.

ONE device command (see traces/README.md for the exact invocation that made the shipped traces):

    PYTHONUNBUFFERED=1 python3 tools/train_learned_moe.py --config h200 --out $OUT --work /tmp/learned

1. corpus: every ``*.py *.md *.rst *.txt`` file under the interpreter's stdlib, its site-packages and
   /usr/share/doc (sorted listing, files over 1 MB skipped); a file is held out when the first byte of
   sha256(path) is < 13 (~5%); the training files are read in a seeded hash order up to ``--corpus-mb``;
2. a byte-level BPE tokenizer (``tokenizers``) trained on the first ``tokenizer_mb`` of that order;
3. a transformers ``MixtralConfig`` model (8 experts, top-2, Mixtral's router aux loss through
   ``output_router_logits``) in bf16 with fp32 master weights (AdamW), trained for ``--train-seconds``:
   the step count is fixed after 10 measured steps so the LR schedule is step-based (``--steps N``
   repeats a run exactly);
4. held-out loss / perplexity and per-layer expert load (top-2 shares) on held-out windows;
5. the checkpoint (bf16) and tokenizer are saved under ``--work``, and ``moesim record`` runs on
   held-out prompts in ``--record-procs`` parallel processes (the recorder handles batch size 1; the
   processes share the GPU); their traces are merged (sequence ids offset) into one trace.

Writes under ``--out``: ``train_metrics.json`` (config, loss curve, held-out ppl, expert load, timings),
``learned_full/`` (every recorded row, all columns, as ``--out-parts`` part files: a directory of
parts is a trace) and, under ``--work``, ``learned_full.parquet`` (the same rows in one file). Needs only torch,
transformers, tokenizers, numpy, pyarrow, tqdm (no polars). ``--config tiny`` runs on a CPU in minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import site
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

T0 = time.perf_counter()
SUFFIXES = (".py", ".md", ".rst", ".txt")
MAX_FILE_BYTES = 1 << 20
EOS = "<|endoftext|>"

CONFIGS: dict[str, dict] = {
    # 32 layers like Mixtral; width chosen so ~5 minutes on one H200 sees tens of millions of tokens
    "h200": dict(layers=32, hidden=384, ffn=1152, heads=6, kv_heads=2, vocab=16384, seq=512, batch=64,
                 lr=1e-3, warmup=0.05, tokenizer_mb=48, eval_windows=512, prompt_tokens=128),
    # CPU smoke test of the whole pipeline
    "tiny": dict(layers=4, hidden=64, ffn=128, heads=2, kv_heads=1, vocab=512, seq=64, batch=8,
                 lr=3e-3, warmup=0.1, tokenizer_mb=1, eval_windows=16, prompt_tokens=24),
}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# -- corpus -------------------------------------------------------------------------------------------

def default_roots() -> list[str]:
    roots = [sysconfig.get_paths()["stdlib"], *site.getsitepackages(), sysconfig.get_paths()["purelib"],
             "/usr/share/doc"]
    out: list[str] = []
    for r in roots:
        r = os.path.realpath(r)
        if os.path.isdir(r) and r not in out:
            out.append(r)
    return out


def corpus_files(roots: list[str]) -> list[str]:
    """Every matching file under ``roots``, deterministic (sorted walk), each real path once."""
    seen, files = set(), []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                if not name.endswith(SUFFIXES):
                    continue
                p = os.path.join(dirpath, name)
                try:
                    real = os.path.realpath(p)
                    if real in seen or not os.path.isfile(real) or os.path.getsize(real) > MAX_FILE_BYTES:
                        continue
                except OSError:
                    continue
                seen.add(real)
                files.append(real)
    return files


def held_out(path: str) -> bool:
    return hashlib.sha256(path.encode()).digest()[0] < 13


def hash_order(paths: list[str], seed: int) -> list[str]:
    return sorted(paths, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).digest())


def read_texts(paths: list[str], max_bytes: int) -> tuple[list[str], list[str]]:
    texts, used, total = [], [], 0
    for p in paths:
        try:
            with open(p, encoding="utf-8") as fh:
                t = fh.read()
        except (OSError, UnicodeDecodeError):
            continue
        if not t.strip():
            continue
        texts.append(t)
        used.append(p)
        total += len(t.encode())
        if total >= max_bytes:
            break
    return texts, used


# -- tokenizer ---------------------------------------------------------------------------------------

def tokenizer_sample(texts: list[str], megabytes: float) -> tuple[list[str], int]:
    """The tokenizer's training sample: the first texts, in order, until ``megabytes`` million characters."""
    sample, acc = [], 0
    for t in texts:
        sample.append(t)
        acc += len(t)
        if acc >= megabytes * 1e6:
            break
    return sample, acc


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_all(tok, texts: list[str], eos_id: int, chunk: int = 2048) -> np.ndarray:
    """All texts as one uint16 stream, each document followed by EOS."""
    parts = []
    for i in range(0, len(texts), chunk):
        for enc in tok.encode_batch(texts[i:i + chunk]):
            parts.append(np.asarray(enc.ids, np.uint16))
            parts.append(np.asarray([eos_id], np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


# -- model -------------------------------------------------------------------------------------------

def build_model(c: dict, seed: int):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["ffn"],
        num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
        head_dim=c["hidden"] // c["heads"], max_position_embeddings=max(1024, 2 * c["seq"]),
        num_local_experts=8, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.02,  # Mixtral-8x7B's config.json
        rope_theta=1e6, tie_word_embeddings=False, sliding_window=None, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg)
    return model, cfg


def lr_at(step: int, total: int, peak: float, warmup_frac: float) -> float:
    warm = max(1, int(total * warmup_frac))
    if step < warm:
        return peak * (step + 1) / warm
    p = min(1.0, (step - warm) / max(1, total - warm))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def evaluate(model, data: np.ndarray, c: dict, device: str) -> dict:
    """Mean held-out loss over the first ``eval_windows`` windows, and per-layer top-2 expert shares."""
    import torch

    seq, bs = c["seq"], c["batch"]
    n = min(c["eval_windows"], len(data) // seq)
    loss_sum, tok_sum = 0.0, 0
    load = np.zeros((c["layers"], 8), np.int64)
    model.eval()
    with torch.no_grad():
        for i in range(0, n, bs):
            rows = [data[j * seq:(j + 1) * seq] for j in range(i, min(n, i + bs))]
            x = torch.as_tensor(np.stack(rows).astype(np.int64), device=device)
            out = model(input_ids=x, output_router_logits=True)
            logits = out.logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                     reduction="sum")
            loss_sum += float(loss)
            tok_sum += x[:, 1:].numel()
            for layer, rl in enumerate(out.router_logits):
                ids = rl.float().topk(2, dim=-1).indices.reshape(-1)
                load[layer] += torch.bincount(ids, minlength=8).cpu().numpy()
    model.train()
    mean = loss_sum / max(tok_sum, 1)
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": tok_sum,
            "expert_share": (load / load.sum(1, keepdims=True)).round(5).tolist()}


def train(model, data: np.ndarray, c: dict, args, device: str) -> dict:
    import torch

    params = [p for p in model.parameters()]
    master = [p.detach().float().clone().requires_grad_(False) for p in params]
    opt = torch.optim.AdamW(master, lr=c["lr"], betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8,
                            fused=device == "cuda")
    seq, bs = c["seq"], c["batch"]
    windows = len(data) // seq
    if windows < bs:
        raise SystemExit(f"corpus too small: {windows} windows of {seq} tokens for batch {bs}")
    rng = np.random.default_rng(args.seed)
    curve, total, step = [], args.steps, 0
    t_start = time.perf_counter()
    t_measure, steps_measured = None, 0
    from tqdm import tqdm

    bar = tqdm(desc="train", unit="step", file=sys.stderr, mininterval=10)
    while True:
        idx = rng.integers(0, windows, bs)
        x = torch.as_tensor(np.stack([data[j * seq:(j + 1) * seq] for j in idx]).astype(np.int64))
        x = x.to(device, non_blocking=True)
        lr = lr_at(step, total or 10_000, c["lr"], c["warmup"])
        for g in opt.param_groups:
            g["lr"] = lr
        # transformers shifts the labels: loss = next-token cross-entropy + coef * Mixtral's aux loss
        out = model(input_ids=x, labels=x, output_router_logits=True)
        out.loss.backward()
        for m, p in zip(master, params, strict=True):
            m.grad = p.grad.float() if p.grad is not None else None
            p.grad = None
        torch.nn.utils.clip_grad_norm_(master, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_copy_(params, master)
        step += 1
        bar.update(1)
        if step % 10 == 0 or step == 1:
            aux = float(out.aux_loss.detach())
            lv = float(out.loss.detach()) - model.config.router_aux_loss_coef * aux   # cross-entropy alone
            curve.append({"step": step, "tokens": step * bs * seq, "loss": round(lv, 4),
                          "aux_loss": round(aux, 4), "lr": lr,
                          "seconds": round(time.perf_counter() - t_start, 2)})
            if step % 100 == 0 or step == 1:
                log(f"step {step}/{total or '?'} loss {lv:.4f} aux {aux:.4f} lr {lr:.2e}")
        if total is None:
            if step == 3:
                if device == "cuda":
                    torch.cuda.synchronize()
                t_measure = time.perf_counter()
            elif step == 13:
                if device == "cuda":
                    torch.cuda.synchronize()
                steps_measured = 10
                per_step = (time.perf_counter() - t_measure) / steps_measured
                left = args.train_seconds - (time.perf_counter() - t_start)
                if args.train_deadline is not None:   # the whole script's clock: slow corpus prep eats training
                    left = min(left, args.train_deadline - (time.perf_counter() - T0))
                total = max(step + 1, step + int(left / per_step))
                log(f"{per_step * 1e3:.1f} ms/step ({bs * seq / per_step:,.0f} tokens/s): {total} steps in all")
        elif step >= total:
            break
    if device == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t_start
    bar.close()
    return {"steps": step, "tokens": step * bs * seq, "seconds": round(secs, 2),
            "tokens_per_s": round(step * bs * seq / secs, 1), "curve": curve}


# -- recording ---------------------------------------------------------------------------------------

def make_prompts(tok, held_paths: list[str], n: int, prompt_tokens: int, seed: int) -> list[str]:
    """``n`` prompts: a window of ``prompt_tokens`` tokens from each of ``n`` held-out files (hash order,
    files shorter than two windows skipped), decoded back to text."""
    rng = random.Random(seed)
    prompts = []
    for p in hash_order(held_paths, seed + 1):
        try:
            text = Path(p).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        ids = tok.encode(text).ids
        if len(ids) < 2 * prompt_tokens:
            continue
        start = rng.randrange(0, len(ids) - prompt_tokens)
        prompt = tok.decode(ids[start:start + prompt_tokens])
        if prompt.strip():
            prompts.append(prompt)
        if len(prompts) == n:
            break
    return prompts


def record_parallel(ckpt: Path, prompts: list[str], work: Path, args, device: str) -> Path:
    """``moesim record`` in ``--record-procs`` processes over interleaved prompt shares; merged trace."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    procs, shares = [], []
    n = max(1, min(args.record_procs, len(prompts)))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for i in range(n):
        share = list(range(i, len(prompts), n))
        shares.append(share)
        pfile = work / f"prompts{i}.json"
        pfile.write_text(json.dumps([prompts[j] for j in share]))
        out = work / f"rec{i}.parquet"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "moesim", "record", "--model", str(ckpt), "--prompts", str(pfile),
               "--max-new-tokens", str(args.new_tokens), "--temperature", str(args.temperature),
               "--seed", str(args.seed + i), "--device", device, "--dtype", args.record_dtype,
               "--predict-distance", "3", "--logits", "--pred-logits", "--flush-tokens", "256", "-o", str(out)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=str(Path(__file__).resolve().parents[1])))
    deadline = time.perf_counter() + args.record_seconds
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            p.send_signal(2)   # SIGINT: the recorder closes its trace cleanly after the current token
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    tables = []
    for i, share in enumerate(shares):
        f = work / f"rec{i}.parquet"
        if not f.is_file():
            log(f"recorder {i} left no trace (exit {procs[i].returncode})")
            continue
        t = pq.read_table(f)
        seq_map = np.asarray(share, np.int32)   # local prompt index -> global prompt index
        seq = seq_map[t.column("seq").to_numpy()]
        t = t.set_column(t.schema.get_field_index("seq"), pa.field("seq", pa.int32(), nullable=False),
                         pa.array(seq, pa.int32()))
        tables.append(t)
    if not tables:
        raise SystemExit("no recorder produced a trace")
    meta = tables[0].schema.metadata
    tables = [t.replace_schema_metadata(meta) for t in tables]
    merged = pa.concat_tables(tables)
    key = merged.column("seq").to_numpy().astype(np.int64) << 40
    key += merged.column("token").to_numpy().astype(np.int64) << 16
    key += merged.column("layer").to_numpy().astype(np.int64)
    merged = merged.take(pa.array(np.argsort(key, kind="stable")))
    out = work / "learned_full.parquet"
    pq.write_table(merged, out, compression="zstd", use_dictionary=["seq", "phase", "layer"])
    return out


def write_parts(trace: Path, folder: Path, n: int) -> list[Path]:
    """The trace as ``n`` part files split by sequence (a directory of parts is itself a trace), so
    that no file exceeds what one device call may bring back."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(trace)
    seqs = np.unique(table.column("seq").to_numpy())
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, chunk in enumerate(np.array_split(seqs, n)):
        if not len(chunk):
            continue
        part = table.filter(pc.is_in(table.column("seq"), value_set=pa_array(chunk)))
        path = folder / f"part-{i:06d}.parquet"
        pq.write_table(part, path, compression="zstd", use_dictionary=["seq", "phase", "layer"])
        paths.append(path)
    return paths


def pa_array(values: np.ndarray):
    import pyarrow as pa

    return pa.array(values.astype(np.int32), pa.int32())


def train_and_save(args, c: dict, roots: list[str], files: list[str], train_files: list[str], held: list[str],
                   metrics: dict, save, device: str, ckpt: Path):
    """Tokenizer, model, training, held-out evaluation; checkpoint + tokenizer saved to ``ckpt``."""
    import torch

    texts, used = read_texts(hash_order(train_files, args.seed), int(args.corpus_mb * 1e6))
    held_texts, _ = read_texts(hash_order(held, args.seed), int(max(2e6, args.corpus_mb * 1e6 / 40)))
    n_bytes = sum(len(t.encode()) for t in texts)
    log(f"read {len(texts)} training files ({n_bytes / 1e6:.1f} MB), {len(held_texts)} held-out files")
    sample, acc = tokenizer_sample(texts, c["tokenizer_mb"])
    tok = train_tokenizer(sample, c["vocab"])
    eos_id = tok.token_to_id(EOS)
    log(f"tokenizer: vocab {tok.get_vocab_size()} trained on {acc / 1e6:.1f} MB")
    data = encode_all(tok, texts, eos_id)
    held_data = encode_all(tok, held_texts, eos_id)
    log(f"encoded {len(data):,} training tokens ({n_bytes / max(len(data), 1):.2f} bytes/token), "
        f"{len(held_data):,} held-out tokens")
    metrics["corpus"] = {"roots": roots, "files": len(files), "held_out_files": len(held),
                         "train_files_read": len(texts), "train_bytes": n_bytes, "train_tokens_available": int(len(data)),
                         "held_out_tokens_available": int(len(held_data)), "tokenizer_sample_bytes": acc,
                         "split": "held out iff sha256(real path)[0] < 13", "suffixes": list(SUFFIXES),
                         "max_file_bytes": MAX_FILE_BYTES}
    save()

    model, cfg = build_model(c, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    metrics["params"] = n_params
    metrics["model_config"] = cfg.to_dict()
    log(f"model: {n_params / 1e6:.1f}M parameters, experts implementation "
        f"{getattr(cfg, '_experts_implementation', None)}")
    model.to(device=device, dtype=torch.bfloat16)
    model.train()
    tr = train(model, data, c, args, device)
    metrics["train"] = tr
    log(f"trained {tr['steps']} steps, {tr['tokens']:,} tokens in {tr['seconds']} s ({tr['tokens_per_s']:,.0f} tokens/s)")
    save()
    ev = evaluate(model, held_data, c, device)
    metrics["held_out"] = ev
    log(f"held-out loss {ev['loss']:.4f}, perplexity {ev['perplexity']:.2f} over {ev['tokens']:,} tokens")
    save()

    from transformers import PreTrainedTokenizerFast

    model.config.output_router_logits = False
    model.generation_config.eos_token_id = None
    model.save_pretrained(ckpt)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS).save_pretrained(ckpt)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return tok


# -- main --------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="h200")
    ap.add_argument("--out", required=True, help="results folder (metrics, merged trace)")
    ap.add_argument("--work", required=True, help="scratch folder (checkpoint, per-process traces)")
    ap.add_argument("--roots", help="comma-separated corpus roots (default: stdlib, site-packages, /usr/share/doc)")
    ap.add_argument("--corpus-mb", type=float, default=300.0, help="training text to read (MB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-seconds", type=float, default=300.0)
    ap.add_argument("--train-deadline", type=float, help="end training by this many s after the script started")
    ap.add_argument("--steps", type=int, help="exact number of steps (default: fitted to --train-seconds)")
    ap.add_argument("--prompts", type=int, default=80)
    ap.add_argument("--new-tokens", type=int, default=160)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--record-procs", type=int, default=4)
    ap.add_argument("--record-seconds", type=float, default=150.0, help="stop the recorders after this long")
    ap.add_argument("--record-dtype", default="bfloat16")
    ap.add_argument("--device", default=None)
    ap.add_argument("--record-only", action="store_true",
                    help="skip training: record again with the checkpoint an earlier run left in --work")
    ap.add_argument("--out-parts", type=int, default=5, help="part files of the recorded trace under --out")
    args = ap.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    c = CONFIGS[args.config]
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    metrics: dict = {"config_name": args.config, "config": c, "seed": args.seed, "argv": sys.argv[1:],
                     "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                     "torch": torch.__version__}

    def save() -> None:
        tmp = out / ".train_metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=1))
        os.replace(tmp, out / "train_metrics.json")

    import tokenizers
    import transformers
    metrics["transformers"], metrics["tokenizers"] = transformers.__version__, tokenizers.__version__
    roots = args.roots.split(",") if args.roots else default_roots()
    files = corpus_files(roots)
    held = [p for p in files if held_out(p)]
    train_files = [p for p in files if not held_out(p)]
    log(f"corpus: {len(files)} files under {roots}; {len(held)} held out")
    ckpt = work / "checkpoint"
    if args.record_only:   # the weights of an earlier run on this machine: record again, no training
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(ckpt).backend_tokenizer
        metrics["record_only"] = str(ckpt)
    else:
        tok = train_and_save(args, c, roots, files, train_files, held, metrics, save, device, ckpt)
    prompts = make_prompts(tok, held, args.prompts, c["prompt_tokens"], args.seed)
    metrics["prompts"] = prompts
    log(f"{len(prompts)} held-out prompts of {c['prompt_tokens']} tokens; recording in {args.record_procs} processes")
    t_rec = time.perf_counter()
    trace = record_parallel(ckpt, prompts, work, args, device)
    rec_s = time.perf_counter() - t_rec
    from moesim.traces.format import DECODE, read_trace

    t = read_trace(trace)
    dec = int((t.phase == DECODE).sum()) // t.meta.num_layers
    metrics["record"] = {"seconds": round(rec_s, 1), "rows": len(t), "decode_tokens": dec,
                         "prefill_tokens": len(t) // t.meta.num_layers - dec, "sequences": int(len(np.unique(t.seq))),
                         "procs": args.record_procs, "temperature": args.temperature, "new_tokens": args.new_tokens,
                         "dtype": args.record_dtype, "predict_distance": 3}
    parts = write_parts(trace, out / "learned_full", args.out_parts)
    metrics["record"]["parts"] = {p.name: p.stat().st_size for p in parts}
    log(f"recorded {metrics['record']}")
    metrics["total_seconds"] = round(time.perf_counter() - T0, 1)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
