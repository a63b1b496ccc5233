"""``moesim record --model PATH|PRESET [-o OUT.parquet] ...``: record a routing trace from a real model run."""

from __future__ import annotations

import argparse
import sys

from moesim.commands._common import (
    add_force_arg,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    require_torch_device,
)

INTERRUPTED_EXIT = 130  # the shell convention for "stopped by SIGINT"; the trace is still complete
# The tiny presets of moesim.recorder.presets, named here so that building the parser -- which every
# command does -- never imports torch (seconds per command); tests/test_cli_without_torch.py keeps them equal.
PRESET_NAMES = ("tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-olmoe", "tiny-deepseek-v3", "tiny-gpt-oss",
                "tiny-phimoe")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("record", help="record router decisions from a Hugging Face MoE model",
                       description="Run a transformers MoE model on prompts and record, through forward hooks, "
                                   "every token's routed experts and weights plus speculative next-layer "
                                   "predictions. Streams crash-safe part files to OUT.parquet.parts/ and merges "
                                   f"them into OUT.parquet on a clean finish. Presets (need the torch extra): "
                                   f"{', '.join(PRESET_NAMES)}.")
    p.add_argument("--model", help="local checkpoint directory or a tiny random-weight preset")
    p.add_argument("--prompts", help="prompt file: .json list of strings or text, one prompt per line "
                                     "(default: the built-in set of 50)")
    p.add_argument("--num-prompts", type=positive_int, help="use only the first N prompts")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (and preset weight seed)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--offload", choices=("auto", "none", "experts"), default="auto",
                   help="where the routed experts live: auto (default) keeps the model on the device when it "
                        "fits and otherwise keeps the experts in host memory, copying each forward pass's "
                        "routed experts to the device; none = all on the device; experts = always offload. "
                        "The trace is the same either way")
    p.add_argument("--max-gpu-gb", type=positive_float, metavar="GB",
                   help="device memory the weights may take (default: what is free, less 10%% for activations)")
    p.add_argument("--predict-distance", type=non_negative_int, default=1,
                   help="record speculative predictions for d = 1..D layers ahead (0 = none)")
    p.add_argument("--logits", action="store_true", help="also store full router logits (float16)")
    p.add_argument("--pred-logits", action="store_true", help="also store the logits of each prediction")
    p.add_argument("--flush-tokens", type=positive_int, default=64,
                   help="write a durable row group every N tokens")
    p.add_argument("-o", "--output", help="output trace (.parquet)")
    p.add_argument("--recover", metavar="OUT", help="merge the parts a killed recording left in OUT.parts/ into OUT")
    add_force_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moesim.errors import DataError, UsageError
    from moesim.safe_write import refuse_overwrite

    refuse_overwrite([args.recover or args.output], args.force)
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise UsageError("moesim record needs torch and transformers: pip install 'moesim[torch]'") from None
    require_torch_device(args.device)
    from moesim.recorder.parts import merge_parts, parts_dir_for
    from moesim.traces.format import read_trace

    if args.recover:
        parts = parts_dir_for(args.recover)
        if not parts.is_dir():
            raise DataError(parts, "no such directory (nothing to recover)")
        read_trace(parts)  # validate before merging
        merge_parts(parts, args.recover)
        t = read_trace(args.recover)
        print(f"recovered {args.recover}: {len(t)} rows")
        return 0
    if not args.model or not args.output:
        raise UsageError("record needs --model and -o OUT.parquet (or --recover OUT)")
    from moesim.recorder.session import load_prompts, record

    prompts = load_prompts(args.prompts)
    if args.num_prompts:
        prompts = prompts[:args.num_prompts]
    result = record(args.model, prompts, args.output, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, seed=args.seed, device=args.device, dtype=args.dtype,
                    predict_distance=args.predict_distance, logits=args.logits, pred_logits=args.pred_logits,
                    flush_tokens=args.flush_tokens, offload=args.offload, max_gpu_gb=args.max_gpu_gb)
    t = read_trace(result.path)
    rate = result.tokens / result.seconds if result.seconds > 0 else 0.0
    print(f"wrote {result.path}: {len(t)} rows, {result.sequences} sequences, {result.tokens} tokens "
          f"x {t.meta.num_layers} MoE layers ({t.meta.family}), {rate:.1f} tokens/s")
    placed = result.placement
    if placed is not None and placed.offload is not None:
        print(f"routed experts kept in host memory ({placed.footprint.experts / 1e9:.3g} GB); "
              f"{placed.offload.bytes_copied / 1e9:.3g} GB of them copied to {args.device} during the run")
    if result.interrupted:
        print("recording was interrupted; the trace holds every token recorded before Ctrl-C", file=sys.stderr)
        return INTERRUPTED_EXIT
    return 0
