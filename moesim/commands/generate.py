"""``moesim generate --model DIR ...``: run a local MoE checkpoint through the offloaded decoder.

Experts live in (pinned) host memory, K slots per layer on the device, residency by the same policy and
prefetcher classes the simulator replays; the routing comes from the model's own gates. ``--record``
writes the run's trace (crash-safe) plus its measured per-token times (``OUT.parquet.times.json``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from moesim.commands._common import (
    add_force_arg,
    emit_json,
    int_list,
    non_negative_float,
    non_negative_int,
    positive_int,
    require_torch_device,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="decode with a local MoE checkpoint through the offloaded decoder",
                       description="Generate text with a local Hugging Face MoE checkpoint (mixtral, qwen2_moe, "
                                   "qwen3_moe) whose experts are offloaded: K device slots per layer, routing "
                                   "from the model's own gates, residency by a moesim policy and prefetcher.")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + *.safetensors), or a "
                                                   "random-weight preset (tiny-mixtral, tiny-qwen2-moe, tiny-qwen3-moe)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer)")
    src.add_argument("--prompts", help="prompt file: .json list of strings or one prompt per line")
    src.add_argument("--prompt-ids", type=int_list, help="comma-separated token ids (no tokenizer needed)")
    p.add_argument("--max-new-tokens", type=positive_int, required=True)
    p.add_argument("--cache-size", type=positive_int, required=True, help="expert slots per layer (>= top-k)")
    p.add_argument("--policy", required=True, help="eviction policy (lru, lfu, fifo, ...; not opt: it needs the future)")
    p.add_argument("--prefetch", default="none",
                   help="none | transition | previous-token | speculative (live: layer l+d's gate on layer l's output)")
    p.add_argument("--quant", default="none",
                   help="expert format: none (checkpoint dtype) | bf16 | hqq2 (2-bit g16, 8-bit scale/zero: "
                        "mixtral-offloading's layout, what presets price) | hqq4 (4-bit g64, same scheme) | hqq2-v02 / "
                        "hqq4-v02 (hqq 0.2's own layout: bf16 scale/zero, 32%% more bytes); attention 4-bit")
    p.add_argument("--prefill-chunk", type=positive_int, default=None, metavar="N",
                   help="prompt tokens per prefill step (default: the whole prompt in one step; each step requests "
                        "the union of its tokens' experts per layer; 1 = token by token)")
    p.add_argument("--execution", metavar="SPEC", default="copy",
                   help="who serves each miss (docs/engine.md, Hybrid execution): copy (default) | n-cpu-moe=N (the "
                        "experts of layers 0..N-1 on the CPU, int8) | pinned=FILE (JSON [[layer, expert], ...] held "
                        "in GPU slots); prompts then run token by token, without a prefetcher")
    p.add_argument("--cpu-threads", type=positive_int, default=None,
                   help="threads of the CPU expert worker (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--record", metavar="OUT.parquet", help="write the run's trace (and OUT.parquet.times.json)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--predict-distance", type=non_negative_int, default=None,
                   help="record speculative predictions d = 1..D (default: 1 with --prefetch speculative, else 0)")
    p.add_argument("--logits", action="store_true", help="also record the router logits")
    p.add_argument("--quant-cache", help="directory of the quantization cache (default ~/.cache/moesim/quantized)")
    p.add_argument("--no-quant-cache", action="store_true", help="quantize without reading or writing the cache")
    add_force_arg(p)
    p.set_defaults(func=run)


def _check_choices(args) -> None:
    """Usage errors that need no model (exit 2 before anything is loaded)."""
    from moesim.engine.pack import QUANT_CHOICES
    from moesim.engine.plan import CachePlan, LiveRefusal
    from moesim.errors import UsageError
    from moesim.policies.base import policy_names
    from moesim.policies.prefetch import prefetcher_names

    if args.quant not in QUANT_CHOICES:
        raise UsageError(f"--quant must be one of {', '.join(QUANT_CHOICES)}, got {args.quant!r}")
    if args.policy not in policy_names():
        raise UsageError(f"unknown policy {args.policy!r} (known: {', '.join(policy_names())})")
    if args.prefetch not in prefetcher_names():
        raise UsageError(f"unknown prefetcher {args.prefetch!r} (known: {', '.join(prefetcher_names())})")
    try:
        CachePlan.live(1, args.cache_size, 1, args.cache_size, args.policy, args.prefetch)
    except LiveRefusal as exc:
        raise UsageError(str(exc)) from None
    from moesim.policies.execution import parse_execution

    exe = parse_execution(args.execution)   # a bad spelling or pinned file: one line before the model loads
    if exe.name != "copy" and args.prefetch != "none":
        raise UsageError(f"--execution {exe.name} runs without a prefetcher (--prefetch none)")


def run(args: argparse.Namespace) -> int:
    from moesim.errors import DataError, UsageError

    try:
        import torch  # noqa: F401 - present, or the one-line install hint
    except ImportError:
        raise UsageError("moesim generate needs torch: pip install 'moesim[torch]'") from None
    _check_choices(args)
    if args.record:
        from moesim.safe_write import refuse_overwrite

        refuse_overwrite([args.record, f"{args.record}.times.json"], args.force)
    if args.record and not Path(args.record).parent.is_dir():
        raise DataError(args.record, f"output directory {str(Path(args.record).parent)!r} does not exist")
    require_torch_device(args.device)
    if args.execution != "copy":
        args.prefill_chunk = 1   # the decoder runs hybrid execution through its decode pieces, token by token
    from moesim.engine.decode import Decoder
    from moesim.engine.decoder_program import DecoderProgram
    from moesim.engine.expert_store import ExpertStore
    from moesim.engine.pack import default_cache_root, pack_checkpoint

    load_started = time.perf_counter()   # the load and the first token as a user waits for them
    ckpt = _checkpoint(args)
    s = ckpt.spec
    if args.cache_size < s.top_k:
        raise UsageError(f"--cache-size {args.cache_size} is smaller than the model's top-k ({s.top_k})")
    prompts = _prompts(args, ckpt)
    for i, p in enumerate(prompts):
        if not p:
            raise UsageError(f"prompt {i} is empty")
        bad = [t for t in p if not 0 <= t < s.vocab]
        if bad:
            raise UsageError(f"prompt {i}: token id {bad[0]} is outside the vocabulary (0..{s.vocab - 1})")
        if len(p) + args.max_new_tokens > s.max_context:
            raise UsageError(f"prompt {i} has {len(p)} tokens; with --max-new-tokens {args.max_new_tokens} that "
                             f"exceeds the model's context of {s.max_context}")
    dist = args.predict_distance if args.predict_distance is not None else (1 if args.prefetch == "speculative" else 0)
    if args.prefetch == "speculative" and dist < 1:
        raise UsageError("--prefetch speculative needs --predict-distance >= 1")
    cuda = args.device.startswith("cuda")
    cache_root = None if args.no_quant_cache else Path(args.quant_cache) if args.quant_cache else default_cache_root()
    tty = sys.stderr.isatty()
    packed = pack_checkpoint(ckpt, args.quant, device=args.device, cache_root=cache_root, progress=tty, pin=cuda)
    store = ExpertStore.from_packed(packed, pin=cuda)
    longest = max(len(p) for p in prompts) + args.max_new_tokens
    slots = min(args.cache_size, s.num_experts)
    program = DecoderProgram(packed, args.device, slots, predict_distance=dist, compile_kernels=cuda,
                             max_context=longest, progress=tty)
    decoder = Decoder(program, store, slots, args.policy, args.prefetch, execution=args.execution,
                      cpu_threads=args.cpu_threads)
    load_s = time.perf_counter() - load_started
    recorder = None
    if args.record:
        from moesim.engine.recording import DecodeRecorder

        recorder = DecodeRecorder(args.record, s, model_name=ckpt.name, expert_format=packed.expert_format.name,
                                  prefill_chunk=args.prefill_chunk or max(len(p) for p in prompts),
                                  expert_bytes=packed.expert_bytes, pred_distances=program.distances,
                                  logits=args.logits,
                                  provenance={"device": args.device, "policy": args.policy, "cache_size": slots,
                                              "prefetch": args.prefetch, "quant": args.quant,
                                              "temperature": args.temperature,
                                              "seed": args.seed})
    try:
        res = decoder.generate(prompts, args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                               stop_at_eos=not args.ignore_eos, progress=tty, prefill_chunk=args.prefill_chunk,
                               on_step=recorder.on_step if recorder else None)
    except BaseException:
        if recorder is not None:
            recorder.abort()
        raise
    summary = res.summary()
    if recorder is not None:
        recorder.close(summary)
    text = "\n".join(_decode(ckpt, ids) for ids in res.token_ids)
    if args.json:
        flat = [t for ids in res.token_ids for t in ids]
        emit_json({"token_ids": flat, "text": text, "tokens_per_s": res.tokens_per_s,
                   "ms_per_token": 1e3 / res.tokens_per_s if res.tokens_per_s else None,
                   "requests": res.requests, "hits": res.hits, "hit_rate": res.hit_rate, "prefetches": res.prefetches,
                   "bytes_h2d": res.bytes_h2d, "misses": res.misses,
                   "copies": (res.executed["copy"] if res.executed else res.misses) + res.prefetches,
                   "device_copies": res.device_copies, "violations": res.violations,
                   "policy": args.policy, "cache_size": slots,
                   "prefetch": args.prefetch, "quant": args.quant, "device": args.device,
                   "token_ids_per_prompt": res.token_ids, "steps": len(res.steps),
                   "prefill_chunk": args.prefill_chunk or max(len(p) for p in prompts),
                   "decode_tokens_per_s": res.decode_tokens_per_s, "record": args.record,
                   "load_s": load_s, "quant_cache": packed.cache_state, "load_parts_s": packed.timings,
                   "first_token_s": load_s + res.first_token_s if res.first_token_s is not None else None,
                   **({"execution": args.execution, "executed": res.executed} if res.executed is not None else {})})
    else:
        print(text)
    return 0


def _checkpoint(args):
    """A checkpoint directory, or (when no such directory exists) a recorder preset built in memory."""
    from moesim.engine.checkpoint import checkpoint_from_model, load_checkpoint

    if not Path(args.model).exists():
        from moesim.recorder.presets import PRESETS, ByteTokenizer, build_preset

        if args.model in PRESETS:
            model = build_preset(args.model, seed=args.seed)
            return checkpoint_from_model(model, ByteTokenizer(), cache_key=f"preset-{args.model}-seed{args.seed}")
    return load_checkpoint(args.model)


def _prompts(args, ckpt) -> list[list[int]]:
    from moesim.errors import UsageError

    if args.prompt_ids is not None:
        return [list(args.prompt_ids)]
    if ckpt.tokenizer is None:
        raise UsageError(f"{args.model} has no tokenizer files; pass --prompt-ids")
    if args.prompt is not None:
        texts = [args.prompt]
    else:
        from moesim.recorder.session import load_prompts

        texts = load_prompts(args.prompts)
    return [list(ckpt.tokenizer.encode(t)) for t in texts]


def _decode(ckpt, ids: list[int]) -> str:
    if ckpt.tokenizer is None:
        return " ".join(str(i) for i in ids)
    from moesim.recorder.presets import ByteTokenizer

    if isinstance(ckpt.tokenizer, ByteTokenizer):
        return ckpt.tokenizer.decode(ids)
    return ckpt.tokenizer.decode(ids, skip_special_tokens=True)
