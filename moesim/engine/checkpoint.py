"""Loading a Hugging Face MoE checkpoint for the offloaded decoder: geometry from config.json, tensors
from safetensors shards (or from an in-memory transformers model), per-family weight names.

Supported families (``SUPPORTED_FAMILIES``): mixtral, qwen2_moe (shared expert with a sigmoid gate,
q/k/v bias, top-k weights not renormalised unless ``norm_topk_prob``), qwen3_moe (per-head RMSNorm on q
and k, ``norm_topk_prob``). Every decoder layer must be an MoE layer. Rotary embeddings: the default
RoPE only. Errors are :class:`DataError` (bad or unsupported checkpoint, exit 1) naming the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moesim.errors import DataError

SUPPORTED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


@dataclass(frozen=True)
class ModelSpec:
    """What the decoder needs to know about a model, read from its config."""

    family: str
    hidden: int
    ffn: int                # routed expert intermediate size
    num_layers: int
    num_experts: int
    top_k: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    max_context: int
    rms_eps: float
    rope_theta: float
    norm_topk: bool         # top-k weights renormalised to sum 1
    qkv_bias: bool
    qk_norm: bool           # per-head RMSNorm of q and k before RoPE (qwen3_moe)
    shared_ffn: int         # intermediate size of the always-on shared expert (0: none)
    tie_embeddings: bool
    sliding_window: int | None
    weights_in_dtype: bool  # routing weights cast to the compute dtype before weighting (qwen)
    eos_token_ids: tuple[int, ...]
    dtype: str              # the checkpoint's torch_dtype

    @classmethod
    def from_config(cls, cfg: dict[str, Any], where: object = "config.json") -> ModelSpec:
        family = cfg.get("model_type")
        if family not in SUPPORTED_FAMILIES:
            arch = family or (cfg.get("architectures") or ["(none)"])[0]
            raise DataError(where, f"architecture {arch!r} is not supported by the offloaded decoder "
                                   f"(supported: {', '.join(SUPPORTED_FAMILIES)})")
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            layers = int(cfg["num_hidden_layers"])
            if family == "mixtral":
                experts, ffn = int(cfg["num_local_experts"]), int(cfg["intermediate_size"])
            else:
                # transformers 5 writes num_local_experts; older Qwen configs num_experts
                experts = int(cfg["num_local_experts"] if "num_local_experts" in cfg else cfg["num_experts"])
                ffn = int(cfg["moe_intermediate_size"])
                if cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step", 1)) != 1:
                    raise DataError(where, "dense (non-MoE) decoder layers are not supported by the offloaded "
                                           "decoder (mlp_only_layers / decoder_sparse_step)")
                if cfg.get("use_sliding_window"):
                    raise DataError(where, "use_sliding_window is not supported by the offloaded decoder")
            rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
            rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
            if rope_type != "default":
                raise DataError(where, f"rope type {rope_type!r} is not supported (only the default RoPE)")
            theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
            head_dim = int(cfg.get("head_dim") or hidden // heads)
            window = cfg.get("sliding_window") if family == "mixtral" else None
            return cls(family=family, hidden=hidden, ffn=ffn, num_layers=layers, num_experts=experts,
                       top_k=int(cfg["num_experts_per_tok"]), n_heads=heads,
                       n_kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=head_dim,
                       vocab=int(cfg["vocab_size"]), max_context=int(cfg.get("max_position_embeddings", 4096)),
                       rms_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta,
                       norm_topk=True if family == "mixtral" else bool(cfg.get("norm_topk_prob", False)),
                       qkv_bias=family == "qwen2_moe" and bool(cfg.get("qkv_bias", True)),
                       qk_norm=family == "qwen3_moe",
                       shared_ffn=int(cfg.get("shared_expert_intermediate_size") or 0) if family == "qwen2_moe" else 0,
                       tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                       sliding_window=int(window) if window else None,
                       weights_in_dtype=family != "mixtral", eos_token_ids=eos_ids,
                       dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(where, f"config lacks or mangles a field the decoder needs ({exc})") from None

    @classmethod
    def from_model(cls, model) -> ModelSpec:
        """From an in-memory transformers model's config."""
        cfg = model.config.to_dict()
        cfg["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")   # what it holds now
        return cls.from_config(cfg, where=f"<in-memory {type(model).__name__}>")


class TensorSource:
    """Named tensors of a checkpoint (safetensors shards or a state dict)."""

    where: str = ""

    def names(self) -> set[str]:
        raise NotImplementedError

    def get(self, name: str, index: int | None = None):
        raise NotImplementedError

    def fingerprint(self) -> str | None:
        """Identifies the weights for the on-disk quantization cache (None: do not cache)."""
        return None


class SafetensorsDir(TensorSource):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise DataError(path, "holds no *.safetensors weights (only safetensors checkpoints are supported)")
        self.files = files
        self._where: dict[str, Path] = {}
        for f in files:
            with self._open(f) as h:
                for name in h.keys():
                    self._where[name] = f

    def _open(self, f: Path):
        """A memory-mapped view of one shard, opened per read and closed after it: a mapping kept open
        would leave every page read so far in this process's resident set (the whole checkpoint)."""
        from safetensors import safe_open

        try:
            return safe_open(str(f), framework="pt")
        except Exception as exc:   # noqa: BLE001 - safetensors raises its own error types
            raise DataError(f, f"corrupt safetensors file ({str(exc).splitlines()[0][:160]})") from None

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str, index: int | None = None):
        """The tensor ``name`` (only its row ``index`` when given: one expert of a fused tensor)."""
        f = self._where.get(name)
        if f is None:
            raise DataError(self.path, f"checkpoint lacks tensor {name!r}")
        try:
            with self._open(f) as h:
                return h.get_tensor(name) if index is None else h.get_slice(name)[index]
        except DataError:
            raise
        except Exception as exc:   # noqa: BLE001
            raise DataError(f, f"cannot read tensor {name!r} ({str(exc).splitlines()[0][:160]})") from None

    def fingerprint(self) -> str:
        stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in [self.path / "config.json", *self.files]]
        return json.dumps([str(self.path.resolve()), stats])


class StateDict(TensorSource):
    def __init__(self, tensors: dict[str, Any], where: str, fingerprint: str | None = None) -> None:
        self.tensors, self.where, self._fp = tensors, where, fingerprint

    def names(self) -> set[str]:
        return set(self.tensors)

    def get(self, name: str, index: int | None = None):
        if name not in self.tensors:
            raise DataError(self.where, f"model lacks tensor {name!r}")
        return self.tensors[name] if index is None else self.tensors[name][index]

    def fingerprint(self) -> str | None:
        return self._fp


@dataclass
class Checkpoint:
    spec: ModelSpec
    source: TensorSource
    tokenizer: Any = None
    name: str = ""

    # -- per-family tensor names ----------------------------------------------------------------
    def _moe_prefix(self, layer: int) -> str:
        base = f"model.layers.{layer}."
        if self.spec.family == "mixtral" and f"{base}block_sparse_moe.gate.weight" in self.source.names():
            return base + "block_sparse_moe."
        return base + "mlp."

    def expert(self, layer: int, e: int):
        """(gate w1 (ffn, hidden), up w3 (ffn, hidden), down w2 (hidden, ffn)) of expert ``e``."""
        p = self._moe_prefix(layer) + "experts."
        names = self.source.names()
        if f"{p}gate_up_proj" in names:   # transformers 5.x in-memory layout: fused over experts
            gu = self.source.get(f"{p}gate_up_proj", e)   # one expert's rows, not the whole fused tensor
            return gu[: self.spec.ffn], gu[self.spec.ffn:], self.source.get(f"{p}down_proj", e)
        if self.spec.family == "mixtral":
            return tuple(self.source.get(f"{p}{e}.{w}.weight") for w in ("w1", "w3", "w2"))
        return tuple(self.source.get(f"{p}{e}.{w}_proj.weight") for w in ("gate", "up", "down"))

    def attention(self, layer: int) -> dict[str, Any]:
        """q/k/v/o weights (out, in), plus biases and q/k norms where the family has them."""
        p = f"model.layers.{layer}.self_attn."
        out = {w: self.source.get(f"{p}{w}_proj.weight") for w in "qkvo"}
        if self.spec.qkv_bias:
            out.update({f"{w}_bias": self.source.get(f"{p}{w}_proj.bias") for w in "qkv"})
        if self.spec.qk_norm:
            out["q_norm"] = self.source.get(f"{p}q_norm.weight")
            out["k_norm"] = self.source.get(f"{p}k_norm.weight")
        return out

    def dense(self, layer: int) -> dict[str, Any]:
        """Norms, router and shared expert of a layer (always resident)."""
        base = f"model.layers.{layer}."
        moe = self._moe_prefix(layer)
        out = {"in_norm": self.source.get(f"{base}input_layernorm.weight"),
               "post_norm": self.source.get(f"{base}post_attention_layernorm.weight"),
               "router": self.source.get(f"{moe}gate.weight")}
        if self.spec.shared_ffn:
            s = f"{moe}shared_expert."
            out.update({"shared_gate_proj": self.source.get(f"{s}gate_proj.weight"),
                        "shared_up_proj": self.source.get(f"{s}up_proj.weight"),
                        "shared_down_proj": self.source.get(f"{s}down_proj.weight"),
                        "shared_expert_gate": self.source.get(f"{moe}shared_expert_gate.weight")})
        return out

    def globals(self) -> dict[str, Any]:
        embed = self.source.get("model.embed_tokens.weight")
        names = self.source.names()
        head = self.source.get("lm_head.weight") if "lm_head.weight" in names and not self.spec.tie_embeddings else embed
        return {"embed": embed, "final_norm": self.source.get("model.norm.weight"), "lm_head": head}

    def check_shapes(self) -> None:
        """Fail early, naming the tensor, when the weights do not match the config."""
        s = self.spec
        w1, w3, w2 = self.expert(0, 0)
        want = {"expert w1": ((s.ffn, s.hidden), w1), "expert w3": ((s.ffn, s.hidden), w3),
                "expert w2": ((s.hidden, s.ffn), w2), "embed_tokens": ((s.vocab, s.hidden), self.globals()["embed"]),
                "router": ((s.num_experts, s.hidden), self.dense(0)["router"]),
                "q_proj": ((s.n_heads * s.head_dim, s.hidden), self.attention(0)["q"])}
        for what, (shape, t) in want.items():
            if tuple(t.shape) != shape:
                raise DataError(self.source.where, f"{what} has shape {tuple(t.shape)}, config implies {shape}")


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """A checkpoint directory: config.json + *.safetensors (+ tokenizer files when present)."""
    p = Path(path)
    if not p.is_dir():
        raise DataError(p, "no such checkpoint directory")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise DataError(p, "not a Hugging Face checkpoint (no config.json)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(cfg_path, f"not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise DataError(cfg_path, "expected a JSON object")
    spec = ModelSpec.from_config(cfg, cfg_path)
    ckpt = Checkpoint(spec, SafetensorsDir(p), _tokenizer(p), p.name)
    ckpt.check_shapes()
    return ckpt


def checkpoint_from_model(model, tokenizer=None, cache_key: str | None = None) -> Checkpoint:
    """An in-memory transformers model (e.g. full-geometry random weights built on the GPU).
    ``cache_key`` names it for the quantization cache (None: never cached)."""
    spec = ModelSpec.from_model(model)
    ckpt = Checkpoint(spec, StateDict(dict(model.state_dict()), f"<in-memory {type(model).__name__}>", cache_key),
                      tokenizer, type(model).__name__)
    ckpt.check_shapes()
    return ckpt


def _tokenizer(path: Path):
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:   # noqa: BLE001 - any tokenizer failure is a data problem of that directory
        raise DataError(path, f"cannot load the tokenizer ({str(exc).splitlines()[0][:160]})") from None
