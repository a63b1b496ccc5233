"""What a routing log's model name (or file name) tells an importer: the MoE geometry of a few public
models, and the weight format ("fp8", "gptq-int4", ...) that names like ``...-Instruct-FP8`` carry."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelGeometry:
    model: str          # canonical Hugging Face id
    family: str
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int


# From each model's config.json (num_hidden_layers, num_local_experts / num_experts,
# num_experts_per_tok, hidden_size). Keys match the start of a lower-cased name without its org.
KNOWN_MODELS: dict[str, ModelGeometry] = {
    "mixtral-8x7b": ModelGeometry("mistralai/Mixtral-8x7B-Instruct-v0.1", "mixtral", 32, 8, 2, 4096),
    "mixtral-8x22b": ModelGeometry("mistralai/Mixtral-8x22B-Instruct-v0.1", "mixtral", 56, 8, 2, 6144),
    "qwen1.5-moe-a2.7b": ModelGeometry("Qwen/Qwen1.5-MoE-A2.7B-Chat", "qwen2_moe", 24, 60, 4, 2048),
    "qwen3-30b-a3b": ModelGeometry("Qwen/Qwen3-30B-A3B", "qwen3_moe", 48, 128, 8, 2048),
    "olmoe-1b-7b": ModelGeometry("allenai/OLMoE-1B-7B-0924", "olmoe", 16, 64, 8, 2048),
}
MIXTRAL_8X7B = KNOWN_MODELS["mixtral-8x7b"]
# the model families the recorder and importers write into trace metadata
MOE_FAMILIES = frozenset({*(g.family for g in KNOWN_MODELS.values()), "deepseek_v3", "gpt_oss", "phimoe"})


def known_model(name: str | None) -> ModelGeometry | None:
    """The geometry of ``name`` (e.g. "Qwen/Qwen1.5-MoE-A2.7B-Chat-GPTQ-Int4", a file name), or None."""
    if not name:
        return None
    text = name.lower()
    for key, geo in KNOWN_MODELS.items():
        # anywhere in the text, as a whole word ("...-mixtral-8x7b-instruct..." but not "xmixtral-8x7bz")
        if re.search(rf"(^|[^a-z0-9]){re.escape(key)}($|[^a-z0-9])", text):
            return geo
    return None


# weight-format words in model ids and file names, in the spelling the trace metadata uses
_QUANT_WORDS = {"fp8": "fp8", "int8": "int8", "int4": "int4", "w8a8": "w8a8", "w4a16": "w4a16", "gptq": "gptq",
                "awq": "awq", "nf4": "nf4", "gguf": "gguf", "bf16": "bf16", "fp16": "fp16", "hqq2": "hqq2",
                "hqq4": "hqq4"}


def quantization_in_name(name: str | None) -> str | None:
    """"fp8" for "mixtral-8x7b-instruct-fp8_humaneval-2_vllm.jsonl", "gptq-int4" for
    "Qwen1.5-MoE-A2.7B-Chat-GPTQ-Int4"; None when the name says nothing."""
    if not name:
        return None
    words = re.split(r"[^a-z0-9]+", name.lower())
    found = [_QUANT_WORDS[w] for w in words if w in _QUANT_WORDS]
    return "-".join(dict.fromkeys(found)) or None
