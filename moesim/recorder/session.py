"""``record(model_or_path, prompts, out, ...)``: load a model, generate for each prompt, record a trace.

Ctrl-C (SIGINT) stops generation after the current token, closes the trace cleanly and returns
with ``interrupted=True``; a second Ctrl-C aborts at once (the flushed parts stay on disk).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moesim.errors import DataError, SettingError, UsageError
from moesim.recorder.adapters import adapter_for
from moesim.recorder.offload import Placement, place_model
from moesim.recorder.presets import PRESETS, ByteTokenizer, build_preset
from moesim.recorder.record import Recorder

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
BUILTIN_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "prompts.json"


@dataclass
class RecordResult:
    path: Path
    sequences: int
    tokens: int
    generated: list[list[int]]
    seconds: float
    interrupted: bool = False
    placement: Placement | None = None  # where the weights were (None: a model object recorded where it was)


def load_prompts(path: str | os.PathLike | None = None) -> list[str]:
    """A JSON list of strings, or a text file with one prompt per line (blank lines skipped)."""
    p = Path(path) if path is not None else BUILTIN_PROMPTS
    if not p.is_file():
        raise DataError(p, "no such file")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            prompts = json.loads(text)
        except ValueError as exc:
            raise DataError(p, f"not valid JSON ({exc})") from None
        if not isinstance(prompts, list) or not all(isinstance(x, str) for x in prompts):
            raise DataError(p, "expected a JSON list of prompt strings")
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DataError(p, "holds no prompts")
    return prompts


def load_model(model: str, *, device: str = "cpu", dtype: str = "float32", seed: int = 0, offload: str = "auto",
               max_gpu_gb: float | None = None, progress: bool | None = None):
    """(model, tokenizer, name, placement) for a preset name or a local Hugging Face checkpoint directory.

    The weights are read into host memory, then placed on ``device`` whole or with the routed experts
    kept on the host (``offload``, ``max_gpu_gb``: see :mod:`moesim.recorder.offload`)."""
    if dtype not in DTYPES:
        raise SettingError("dtype", f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    torch_dtype = DTYPES[dtype]
    if model in PRESETS:
        net, tok, name = build_preset(model, seed=seed, dtype=torch_dtype), ByteTokenizer(), model
    else:
        net, tok, name = _load_checkpoint(model, torch_dtype)
    placement = place_model(net, adapter_for(net), device, offload=offload, max_gpu_gb=max_gpu_gb, progress=progress)
    return net, tok, name, placement


def _load_checkpoint(model: str, torch_dtype: torch.dtype):
    path = Path(model)
    if not path.is_dir():
        raise SettingError("model", f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint "
                           "directory")
    if not (path / "config.json").is_file():
        raise DataError(path, "not a Hugging Face checkpoint (no config.json)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        net = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(path, f"cannot load checkpoint ({str(exc).splitlines()[0][:200]})") from None
    return net.eval(), tok, path.name


def _encode(tok: Any, text: str) -> list[int]:
    if isinstance(tok, ByteTokenizer):
        return tok.encode(text)
    return list(tok(text)["input_ids"])


class _StopFlag:
    """Stopping criterion: ends generation after the current token once set (Ctrl-C); ticks the bar."""

    def __init__(self) -> None:
        self.set = False
        self.bar: Any = None

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        if self.bar is not None:
            self.bar.update(1)
        return torch.full((input_ids.shape[0],), self.set, dtype=torch.bool, device=input_ids.device)


_MAX_LENGTH_LOGGER = "transformers.generation.stopping_criteria"


class _PastPositions(logging.Filter):
    """Prompt + new tokens longer than the model's ``max_position_embeddings``: one moesim note per
    recording, naming the prompt and the lengths, instead of transformers' "friendly reminder" (which
    this filter drops) -- the routing recorded past that point is outside what the model was trained on."""

    def __init__(self, positions: int | None) -> None:
        super().__init__()
        self.positions = positions
        self.noted = False

    def check(self, seq: int, prompt_tokens: int, max_new_tokens: int) -> None:
        if self.noted or not self.positions or prompt_tokens + max_new_tokens <= self.positions:
            return
        self.noted = True
        print(f"note: prompt {seq} ({prompt_tokens} tokens) + {max_new_tokens} new tokens goes past the "
              f"model's {self.positions} positions; tokens beyond them are outside what it was trained on",
              file=sys.stderr)

    def filter(self, record: logging.LogRecord) -> bool:
        return "predefined maximum length" not in record.getMessage()


def record(model_or_path: Any, prompts: list[str], out: str | os.PathLike, *, max_new_tokens: int = 32,
           temperature: float = 0.0, seed: int = 0, device: str = "cpu", dtype: str = "float32",
           predict_distance: int = 1, logits: bool = False, pred_logits: bool = False,
           flush_tokens: int = 64, tokenizer: Any = None, progress: bool | None = None,
           offload: str | None = None, max_gpu_gb: float | None = None) -> RecordResult:
    """Record one trace for ``prompts`` (each in turn, batch size 1) into ``out``.

    ``offload`` (auto | none | experts) and ``max_gpu_gb`` place the weights (see
    :mod:`moesim.recorder.offload`); a model object given with neither is recorded where it is."""
    out_path = Path(out)
    if not out_path.parent.is_dir():  # fail before loading a large model
        raise DataError(out_path, f"output directory {str(out_path.parent)!r} does not exist")
    placement: Placement | None = None
    if isinstance(model_or_path, str | os.PathLike):
        model, tokenizer, name, placement = load_model(str(model_or_path), device=device, dtype=dtype, seed=seed,
                                                       offload=offload or "auto", max_gpu_gb=max_gpu_gb,
                                                       progress=progress)
    else:
        model, name = model_or_path, None
        if tokenizer is None:
            raise UsageError("record(model, ...) needs tokenizer= when given a model object")
        if offload is not None or max_gpu_gb is not None:
            placement = place_model(model, adapter_for(model), device, offload=offload or "auto",
                                    max_gpu_gb=max_gpu_gb, progress=progress)
    try:
        return _record_placed(model, tokenizer, name, prompts, out_path, placement, max_new_tokens=max_new_tokens,
                              temperature=temperature, seed=seed, dtype=dtype, predict_distance=predict_distance,
                              logits=logits, pred_logits=pred_logits, flush_tokens=flush_tokens, progress=progress)
    finally:
        if placement is not None and placement.offload is not None:
            placement.offload.remove()


def _record_placed(model: Any, tokenizer: Any, name: str | None, prompts: list[str], out: Path,
                   placement: Placement | None, *, max_new_tokens: int, temperature: float, seed: int, dtype: str,
                   predict_distance: int, logits: bool, pred_logits: bool, flush_tokens: int,
                   progress: bool | None) -> RecordResult:
    from tqdm import tqdm
    from transformers import StoppingCriteriaList

    adapter = adapter_for(model)
    offloaded = placement is not None and placement.offload is not None
    dev = placement.offload.device if offloaded else next(model.parameters()).device
    decoding = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
                "strategy": "sampled" if temperature > 0 else "greedy"}
    gen_kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0)
    if temperature > 0:
        gen_kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    pad = getattr(tokenizer, "pad_token_id", None)
    gen_kwargs["pad_token_id"] = pad if pad is not None else getattr(tokenizer, "eos_token_id", None)

    stop = _StopFlag()
    main = threading.current_thread() is threading.main_thread()

    def on_sigint(signum, frame) -> None:
        stop.set = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C aborts
        print("\ninterrupted: finishing the current token and closing the trace", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint) if main else None
    generated: list[list[int]] = []
    start = time.perf_counter()
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    past_positions = _PastPositions(positions)
    logging.getLogger(_MAX_LENGTH_LOGGER).addFilter(past_positions)
    try:
        prov = {"device": str(dev), "dtype": dtype, "decoding": decoding, "prompts": len(prompts)}
        if placement is not None:
            prov["placement"] = placement.describe()
        with Recorder(model, adapter, out, predict_distance=predict_distance, logits=logits,
                      pred_logits=pred_logits, flush_tokens=flush_tokens, model_name=name,
                      provenance=prov) as rec:
            bar = tqdm(total=len(prompts) * max_new_tokens, unit="tok", desc="record", file=sys.stderr,
                       disable=(not sys.stderr.isatty()) if progress is None else not progress)
            stop.bar = bar
            for seq, prompt in enumerate(prompts):
                if stop.set:
                    break
                ids = torch.tensor([_encode(tokenizer, prompt)], device=dev)
                past_positions.check(seq, ids.shape[1], max_new_tokens)
                rec.begin_sequence(seq)
                torch.manual_seed(seed * 1_000_003 + seq)  # per-prompt stream: same output alone or in a set
                with torch.no_grad():
                    outs = model.generate(ids, attention_mask=torch.ones_like(ids),
                                          stopping_criteria=StoppingCriteriaList([stop]), **gen_kwargs)
                new = outs[0, ids.shape[1]:].tolist()
                generated.append(new)
                bar.update(max_new_tokens - len(new))  # a prompt that hit EOS early
            bar.close()
    finally:
        logging.getLogger(_MAX_LENGTH_LOGGER).removeFilter(past_positions)
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return RecordResult(Path(out), len(generated), rec.tokens_recorded, generated,
                        time.perf_counter() - start, stop.set, placement)
