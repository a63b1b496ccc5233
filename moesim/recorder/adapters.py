"""Where a transformers MoE model keeps its gates, pre-gate norms and experts, and how it routes.

One small adapter class per family. In transformers 5.x every supported family's router module
returns ``(router_logits, routing_weights, expert_ids)`` — the weights already normalised exactly as
the experts apply them — so the recorder takes ids and weights from the router's own output. The
adapter's :meth:`route` re-derives them from logits; it is used when a router returns bare logits
(older layouts) and for the recorder's batched speculative predictions, and is cross-checked against
the router in the tests.

Batched predictions (:meth:`MoEAdapter.stacked_router`): for mixtral, qwen2_moe, qwen3_moe and olmoe
the pre-gate norm is a plain RMSNorm (``weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)``, no +1 on the
weight) and the router a bias-free linear of shape (E, hidden), so the recorder can apply many
layers' norms and routers at once. deepseek_v3 (correction bias, groups), gpt_oss (router bias, norm
casts after the weight), phimoe (LayerNorm) and unknown families are predicted layer by layer.

Routing per family (transformers 5.x sources):

========== ==========================================================================================
mixtral    softmax over E, top-k, renormalise the k weights to sum 1
qwen2_moe  softmax over E, top-k, renormalise only if ``norm_topk_prob``; plus a sigmoid-gated
           shared expert that every token uses (not cached: always resident)
qwen3_moe  as qwen2_moe without the shared expert
olmoe      as qwen3_moe
deepseek_v3 sigmoid scores + ``e_score_correction_bias`` choose top-k inside the best ``topk_group``
           of ``n_group`` groups; weights are the unbiased sigmoid scores, renormalised if
           ``norm_topk_prob``, times ``routed_scaling_factor``; shared experts always on;
           the first ``first_k_dense_replace`` decoder layers are dense (no router)
gpt_oss    linear with bias, top-k on logits, softmax over the k
phimoe     sparsemixer (eval mode): top-1 by logit, then top-1 of the rest, each weighted by a softmax
           over the logits within a jitter-eps window of its maximum
========== ==========================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moesim.errors import UsageError


@dataclass
class MoELayer:
    """One MoE layer: ``index`` counts MoE layers only (the trace's layer); ``decoder_index`` is the
    position in the model's decoder stack (they differ when dense layers are interleaved)."""

    index: int
    decoder_index: int
    decoder: nn.Module
    block: nn.Module
    gate: nn.Module
    norm: nn.Module
    experts: nn.Module


class MoEAdapter:
    """Generic layout: ``model.model.layers[i].mlp.{gate|router, experts}`` and ``post_attention_layernorm``."""

    family = "generic"
    routing = "router module output"
    gate_attrs = ("gate", "router")
    batch_predict = False  # True: pre-gate norm = plain RMSNorm, router = bias-free linear (see stacked_router)

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self.num_experts = self._num_experts()
        self.top_k = int(self.config.num_experts_per_tok)
        self.hidden_size = int(self.config.hidden_size)
        self.base = getattr(model, "model", model)
        decoders = getattr(self.base, "layers", None)
        if decoders is None:
            raise UsageError(f"{type(model).__name__}: no decoder layers at model.model.layers")
        self.layers: list[MoELayer] = []
        for i, dec in enumerate(decoders):
            block = getattr(dec, "mlp", None) or getattr(dec, "block_sparse_moe", None)
            gate = next((getattr(block, a) for a in self.gate_attrs if hasattr(block, a)), None)
            experts = getattr(block, "experts", None)
            if gate is None or experts is None or isinstance(gate, nn.Linear) and not self._linear_gate_ok(gate):
                continue  # a dense layer
            self.layers.append(MoELayer(len(self.layers), i, dec, block, gate, dec.post_attention_layernorm, experts))
        if not self.layers:
            raise UsageError(f"{type(model).__name__}: found no MoE layers (no mlp.gate / mlp.router with experts)")

    def _linear_gate_ok(self, gate: nn.Linear) -> bool:
        return gate.out_features == self.num_experts

    # -- geometry -------------------------------------------------------------------------------
    def _num_experts(self) -> int:
        c = self.config
        for key in ("num_local_experts", "n_routed_experts", "num_experts"):
            v = getattr(c, key, None)
            if isinstance(v, int) and v > 0:
                return v
        raise UsageError(f"config of {c.model_type!r} names no expert count")

    def expert_bytes(self) -> int:
        """Bytes of one routed expert's weights as loaded (all experts of a layer are alike)."""
        experts = self.layers[0].experts
        total = sum(p.numel() * p.element_size() for p in experts.parameters())
        return total // self.num_experts

    def shared_experts(self) -> int:
        return 0

    def describe(self) -> dict[str, Any]:
        return {"routing": self.routing, "shared_experts": self.shared_experts(),
                "moe_decoder_layers": [m.decoder_index for m in self.layers]}

    # -- routing --------------------------------------------------------------------------------
    def route(self, logits: torch.Tensor, gate: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, ids) from raw router logits; generic = softmax, top-k, renormalise."""
        probs = F.softmax(logits.float(), dim=-1)
        w, ids = torch.topk(probs, self.top_k, dim=-1)
        return w / w.sum(dim=-1, keepdim=True), ids

    def split(self, out: Any, gate: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, weights, ids) from a router's forward output, each (tokens, .)."""
        if isinstance(out, tuple) and len(out) >= 3:
            logits, weights, ids = out[0], out[1], out[2]
        else:
            logits = out[0] if isinstance(out, tuple) else out
            weights, ids = self.route(logits, gate)
        return logits.reshape(-1, logits.shape[-1]), weights.reshape(ids.shape[0], -1), ids.reshape(-1, self.top_k)

    def stacked_router(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(norm weights (L, hidden), router weights (L, E, hidden), eps) of every MoE layer, stacked
        (copies), for families whose norm and router :meth:`predict` may apply to many layers at once.

        None when the family is not one of those (``batch_predict``) or a layer does not have the
        expected shape: an RMSNorm with ``weight`` (hidden,) and ``variance_epsilon`` (one value for all
        layers), a router whose only parameter is ``weight`` (E, hidden), all on one device in one dtype.
        """
        if not self.batch_predict:
            return None
        norms, gates, eps = [], [], set()
        for m in self.layers:
            nw, gw = getattr(m.norm, "weight", None), getattr(m.gate, "weight", None)
            if (not type(m.norm).__name__.endswith("RMSNorm") or not hasattr(m.norm, "variance_epsilon")
                    or not isinstance(nw, torch.Tensor) or tuple(nw.shape) != (self.hidden_size,)
                    or not isinstance(gw, torch.Tensor) or tuple(gw.shape) != (self.num_experts, self.hidden_size)
                    or getattr(m.gate, "bias", None) is not None
                    or [n for n, _ in m.gate.named_parameters()] != ["weight"]
                    or any(True for _ in m.gate.named_buffers())):
                return None
            norms.append(nw)
            gates.append(gw)
            eps.add(float(m.norm.variance_epsilon))
        if (len(eps) != 1 or len({(t.device, t.dtype) for t in norms}) != 1
                or len({(t.device, t.dtype) for t in gates}) != 1 or norms[0].device != gates[0].device):
            return None
        with torch.no_grad():
            return torch.stack([t.detach() for t in norms]), torch.stack([t.detach() for t in gates]), eps.pop()

    def predict(self, target: MoELayer, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply ``target``'s pre-gate norm and router to a hidden state: (logits, ids).

        Calls ``gate.forward`` directly so the recorder's own hook on that gate does not fire.
        """
        x = target.norm(hidden).reshape(-1, self.hidden_size)
        logits, _, ids = self.split(target.gate.forward(x), target.gate)
        return logits, ids


class MixtralAdapter(MoEAdapter):
    family = "mixtral"
    batch_predict = True
    routing = "softmax over experts, top-k, renormalised to sum 1"


class Qwen3MoeAdapter(MoEAdapter):
    family = "qwen3_moe"
    batch_predict = True
    routing = "softmax over experts, top-k, renormalised iff norm_topk_prob"

    def route(self, logits, gate):
        w, ids = torch.topk(F.softmax(logits.float(), dim=-1), self.top_k, dim=-1)
        return (w / w.sum(dim=-1, keepdim=True) if self.config.norm_topk_prob else w), ids


class OlmoeAdapter(Qwen3MoeAdapter):
    family = "olmoe"


class Qwen2MoeAdapter(Qwen3MoeAdapter):
    family = "qwen2_moe"
    routing = "softmax over experts, top-k, renormalised iff norm_topk_prob; plus one sigmoid-gated shared expert"

    def shared_experts(self) -> int:
        return 1


class DeepseekV3Adapter(MoEAdapter):
    family = "deepseek_v3"
    routing = ("sigmoid scores + correction bias, group-limited top-k; weights = unbiased scores "
               "(renormalised iff norm_topk_prob) x routed_scaling_factor; shared experts always on")

    def shared_experts(self) -> int:
        return int(self.config.n_shared_experts or 0)

    def route(self, logits, gate):
        c = self.config
        scores = logits.float().sigmoid()
        choice = scores + gate.e_score_correction_bias
        groups = choice.view(-1, c.n_group, self.num_experts // c.n_group)
        best_groups = groups.topk(2, dim=-1)[0].sum(-1).topk(c.topk_group, dim=-1)[1]
        keep = torch.zeros_like(groups[..., 0]).scatter_(1, best_groups, 1).bool()
        choice = choice.masked_fill(~keep.repeat_interleave(self.num_experts // c.n_group, dim=1), float("-inf"))
        ids = choice.topk(self.top_k, dim=-1)[1]
        w = scores.gather(1, ids)
        if c.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * c.routed_scaling_factor, ids


class GptOssAdapter(MoEAdapter):
    family = "gpt_oss"
    routing = "linear with bias, top-k on logits, softmax over the k"

    def route(self, logits, gate):
        top, ids = torch.topk(logits, self.top_k, dim=-1)
        return F.softmax(top, dim=-1), ids


class PhimoeAdapter(MoEAdapter):
    family = "phimoe"
    routing = "sparsemixer (eval): two rounds of argmax, each weighted by a softmax within a jitter window"

    def route(self, logits, gate):
        eps = self.config.router_jitter_noise
        scores = logits.float()
        ids, weights = [], []
        for _ in range(self.top_k):
            top, idx = scores.max(dim=-1, keepdim=True)
            factor = logits.float().abs().clamp(min=top)
            masked = scores.masked_fill((top - logits.float()) / factor > 2 * eps, float("-inf"))
            weights.append(F.softmax(masked, dim=-1).gather(-1, idx))
            ids.append(idx)
            scores = scores.scatter(-1, idx, float("-inf"))
        return torch.cat(weights, -1), torch.cat(ids, -1)


ADAPTERS: dict[str, type[MoEAdapter]] = {
    "mixtral": MixtralAdapter,
    "qwen2_moe": Qwen2MoeAdapter,
    "qwen3_moe": Qwen3MoeAdapter,
    "olmoe": OlmoeAdapter,
    "deepseek_v3": DeepseekV3Adapter,
    "gpt_oss": GptOssAdapter,
    "phimoe": PhimoeAdapter,
}


def adapter_for(model: nn.Module) -> MoEAdapter:
    """The family's adapter, or the generic one for an unknown model type with the usual layout."""
    model_type = getattr(model.config, "model_type", "")
    return ADAPTERS.get(model_type, MoEAdapter)(model)
