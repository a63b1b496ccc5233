"""Tiny random-weight MoE models for CPU recordings and tests, and a byte-level tokenizer.

No hub access is needed: each preset builds a small config of one transformers family and
initialises its weights from a seed, so the same preset + seed gives the same model everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moesim.errors import UsageError

# Shared tiny geometry: small enough for fast CPU tests, big enough for non-trivial routing.
_BASE: dict[str, Any] = dict(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


class ByteTokenizer:
    """UTF-8 bytes shifted by 3 (0 = pad, 1 = bos, 2 = eos). Enough to drive a random-weight model."""

    pad_token_id, bos_token_id, eos_token_id = PAD_ID, BOS_ID, EOS_ID
    offset = 3

    def encode(self, text: str) -> list[int]:
        return [BOS_ID, *(b + self.offset for b in text.encode("utf-8"))]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM, MixtralConfig(**_BASE, num_local_experts=8, num_experts_per_tok=2)


def _qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM, Qwen2MoeConfig(**_BASE, num_experts=8, num_experts_per_tok=2,
                                               moe_intermediate_size=48, shared_expert_intermediate_size=96,
                                               norm_topk_prob=False)


def _qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM, Qwen3MoeConfig(**_BASE, num_experts=8, num_experts_per_tok=2, head_dim=16,
                                               moe_intermediate_size=48, norm_topk_prob=True)


def _olmoe():
    from transformers import OlmoeConfig, OlmoeForCausalLM

    return OlmoeForCausalLM, OlmoeConfig(**_BASE, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)


def _deepseek_v3():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(**{**_BASE, "num_key_value_heads": 4}, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                           first_k_dense_replace=1, n_shared_experts=1, moe_intermediate_size=48,
                           q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                           v_head_dim=16, routed_scaling_factor=2.5, norm_topk_prob=True)
    return DeepseekV3ForCausalLM, cfg


def _gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(**_BASE, num_local_experts=8, num_experts_per_tok=2, head_dim=16, sliding_window=16,
                       layer_types=["sliding_attention", "full_attention"] * 2,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return GptOssForCausalLM, cfg


def _phimoe():
    from transformers import PhimoeConfig, PhimoeForCausalLM

    return PhimoeForCausalLM, PhimoeConfig(**_BASE, num_local_experts=8, num_experts_per_tok=2)


PRESETS: dict[str, Callable[[], tuple[type, Any]]] = {
    "tiny-mixtral": _mixtral,
    "tiny-qwen2-moe": _qwen2_moe,
    "tiny-qwen3-moe": _qwen3_moe,
    "tiny-olmoe": _olmoe,
    "tiny-deepseek-v3": _deepseek_v3,
    "tiny-gpt-oss": _gpt_oss,
    "tiny-phimoe": _phimoe,
}


def build_preset(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The preset's model in eval mode, every parameter drawn from N(0, 0.1^2) with ``seed``.

    The std is larger than the usual 0.02 so random routers give decided (non-tied) top-k choices.
    """
    if name not in PRESETS:
        raise UsageError(f"unknown model preset {name!r} (choose from {', '.join(PRESETS)})")
    cls, cfg = PRESETS[name]()
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = PAD_ID, BOS_ID, EOS_ID
    cfg._attn_implementation = "eager"
    gen = torch.Generator().manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            if "norm" in pname and p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen)) if pname.endswith("weight") else p.zero_()
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):  # DeepSeek's load-balancing bias
                b.copy_(0.05 * torch.randn(b.shape, generator=gen))
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.bos_token_id = BOS_ID
    return model.to(dtype).eval()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer_fast():
    """A ``PreTrainedTokenizerFast`` that encodes exactly like :class:`ByteTokenizer` (saveable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID}
    vocab = {**specials, **{ch: b + ByteTokenizer.offset for b, ch in _bytes_to_unicode().items()}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_preset_checkpoint(name: str, directory: str, seed: int = 0) -> None:
    """Write a preset as a local Hugging Face checkpoint directory (model + tokenizer)."""
    build_preset(name, seed=seed).save_pretrained(directory)
    byte_tokenizer_fast().save_pretrained(directory)
