"""Record a model bigger than the device's memory: routed experts stay on the host, the rest on the device.

:func:`place_model` puts a host-loaded transformers MoE model on its device in one of two ways:

* ``resident``: the whole model on the device (``model.to(device)``), as before;
* ``experts``: every non-expert weight (embeddings, attention, norms, routers, shared experts, head) on
  the device; each MoE layer's routed experts in a host store (pinned when the device is CUDA). The
  module's own expert parameters are replaced by ``meta`` tensors of the same shape, so the store holds
  the only real copy. A forward pre-hook on the layer's experts module -- which every supported family
  calls as ``experts(hidden, expert_ids, weights)`` after routing -- builds a device tensor per expert
  weight, copies in only the rows of the experts this forward pass routed to (zeros elsewhere: no
  expert outside the routing is read, and a zero one would contribute nothing), and puts it in the
  module; a forward hook puts the ``meta`` placeholder back, so at most one layer's experts are on the
  device at a time.

The arithmetic is the resident model's: the same weights in the same kernels, so the recorded trace is
the same (tests/test_recorder_offload.py; on the device, ``studies/record_offload/gpu_record_offload.py``).
The price is time: every forward pass copies its routed experts over the host link.

``auto`` (the default) keeps the model resident when its weights fit the device budget (``max_gpu_gb``,
else the device's free memory less a margin for activations) and offloads the experts when they do not.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moesim.errors import SettingError
from moesim.recorder.adapters import MoEAdapter

OFFLOAD_CHOICES = ("auto", "none", "experts")
GIB = 1 << 30
ACTIVATION_MARGIN = 0.10       # share of the auto budget kept free for activations, KV cache and workspace
ACTIVATION_MARGIN_MIN = 1 << 30


@dataclass(frozen=True)
class Footprint:
    """Bytes of the model's weights (parameters and buffers) by where offloading puts them."""

    total: int
    experts: int         # routed experts of all MoE layers
    largest_layer: int   # routed experts of the largest MoE layer (what is on the device at once)

    @property
    def dense(self) -> int:
        return self.total - self.experts

    @property
    def offloaded_peak(self) -> int:
        return self.dense + self.largest_layer


@dataclass
class Placement:
    mode: str                 # "resident" | "experts"
    footprint: Footprint
    budget: int | None        # bytes the weights may take on the device (None: not limited)
    offload: ExpertOffload | None = None

    def describe(self) -> dict[str, Any]:
        """What the trace's provenance says about where the weights were."""
        out: dict[str, Any] = {"weights": self.mode, "weight_bytes": self.footprint.total}
        if self.budget is not None:
            out["device_budget_bytes"] = self.budget
        if self.mode == "experts":
            out["expert_bytes_on_host"] = self.footprint.experts
        return out


def _gb(n: int) -> str:
    return f"{n / 1e9:.3g} GB"


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def footprint(model: nn.Module, adapter: MoEAdapter) -> Footprint:
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:  # tied weights count once
            seen.add(id(t))
            total += _tensor_bytes(t)
    per_layer = [sum(_tensor_bytes(p) for p in layer.experts.parameters()) for layer in adapter.layers]
    return Footprint(total, sum(per_layer), max(per_layer))


def device_budget(device: torch.device, max_gpu_gb: float | None) -> int | None:
    """Bytes the weights may take: ``max_gpu_gb`` when given; else on CUDA what is free (within this
    process's memory fraction) less a margin; else (CPU) no limit."""
    if max_gpu_gb is not None:
        if not max_gpu_gb > 0:
            raise SettingError("max_gpu_gb", f"the device memory budget must be > 0 GB, got {max_gpu_gb}")
        return int(max_gpu_gb * 1e9)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda i: 1.0)(index)
    capped = total * fraction - torch.cuda.memory_reserved(index)
    usable = min(free, capped)
    return int(usable - max(ACTIVATION_MARGIN * usable, ACTIVATION_MARGIN_MIN))


def choose_mode(fp: Footprint, budget: int | None, offload: str) -> str:
    """``resident`` or ``experts`` for ``offload`` (auto | none | experts) and the budget."""
    if offload not in OFFLOAD_CHOICES:
        raise SettingError("offload", f"unknown offload mode {offload!r} (choose from {', '.join(OFFLOAD_CHOICES)})")
    gb = _gb(budget) if budget is not None else ""
    if offload == "none":
        if budget is not None and fp.total > budget:
            raise SettingError("offload", f"the model's weights ({_gb(fp.total)}) do not fit the device "
                               f"budget of {gb}", "auto")
        return "resident"
    if offload == "auto" and (budget is None or fp.total <= budget):
        return "resident"
    if budget is not None and fp.offloaded_peak > budget:
        raise SettingError("max_gpu_gb", f"even with the experts on the host the model needs "
                           f"{_gb(fp.offloaded_peak)} on the device ({_gb(fp.dense)} of non-expert "
                           f"weights + {_gb(fp.largest_layer)} for one layer's experts); the budget is {gb}")
    return "experts"


@dataclass
class _LayerStore:
    module: nn.Module                                   # the experts module
    host: dict[str, torch.Tensor]                       # name -> the real weights (host)
    meta: dict[str, nn.Parameter]                       # name -> the placeholder kept in the module
    by_expert: dict[str, bool] = field(default_factory=dict)  # leading dim = experts: copy routed rows only


class ExpertOffload:
    """Hooks that bring each MoE layer's routed experts onto ``device`` for its forward pass only.

    ``bytes_copied`` / ``copies`` count host->device traffic; ``resident_layers`` is how many layers'
    experts are on the device right now (0 between layers, 1 inside one)."""

    def __init__(self, adapter: MoEAdapter, device: torch.device, *, pin: bool) -> None:
        self.device = device
        self.pin = pin
        self.num_experts = adapter.num_experts
        self.layers: list[_LayerStore] = []
        self._handles: list[Any] = []
        self.bytes_copied = 0
        self.copies = 0
        self.resident_layers = 0

    def park(self, experts: nn.Module) -> None:
        """Move one layer's expert weights into the host store and leave ``meta`` placeholders behind."""
        if any(True for c in experts.children() for _ in c.parameters()):  # per-expert submodules (older layouts)
            raise SettingError("offload", f"{type(experts).__name__} keeps its experts in submodules; expert "
                               "offloading needs fused (experts, ...) weights, as transformers 5.x has", "none")
        store = _LayerStore(experts, {}, {})
        for name, p in experts.named_parameters(recurse=False):
            host = p.detach().to("cpu")
            store.host[name] = host.pin_memory() if self.pin else host
            store.meta[name] = nn.Parameter(torch.empty_like(host, device="meta"), requires_grad=False)
            store.by_expert[name] = host.dim() >= 1 and host.shape[0] == self.num_experts
            experts._parameters[name] = store.meta[name]
        self._handles.append(experts.register_forward_pre_hook(self._bring(store)))
        self._handles.append(experts.register_forward_hook(self._release(store)))
        self.layers.append(store)

    def _bring(self, store: _LayerStore):
        def hook(module, args) -> None:
            # every supported family calls experts(hidden, expert_ids, weights); anything else: copy all
            ids = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) and not args[1].is_floating_point() \
                else None
            routed = None if ids is None else torch.unique(ids.detach().reshape(-1)).tolist()
            for name, host in store.host.items():
                if routed is not None and store.by_expert[name]:
                    dev = torch.zeros(host.shape, dtype=host.dtype, device=self.device)
                    for e in routed:
                        if 0 <= e < self.num_experts:
                            dev[e].copy_(host[e], non_blocking=self.pin)
                            self.bytes_copied += _tensor_bytes(host[e])
                            self.copies += 1
                else:
                    dev = host.to(self.device, non_blocking=self.pin, copy=True)
                    self.bytes_copied += _tensor_bytes(host)
                    self.copies += 1
                module._parameters[name] = nn.Parameter(dev, requires_grad=False)
            self.resident_layers += 1
        return hook

    def _release(self, store: _LayerStore):
        def hook(module, args, out) -> None:
            for name, placeholder in store.meta.items():
                module._parameters[name] = placeholder
            self.resident_layers -= 1
        return hook

    def remove(self) -> None:
        """Take the hooks off and put the host weights back into the modules (on the host)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for store in self.layers:
            for name, host in store.host.items():
                store.module._parameters[name] = nn.Parameter(host, requires_grad=False)
        self.layers.clear()


def _move_dense(model: nn.Module, device: torch.device, skip: set[int]) -> None:
    """Every parameter and buffer not in ``skip`` (by id) onto ``device``, keeping tied weights tied."""
    moved: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or id(p) in skip:
                continue
            if id(p) not in moved:
                moved[id(p)] = nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
            module._parameters[name] = moved[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = b.to(device)


def place_model(model: nn.Module, adapter: MoEAdapter, device: str | torch.device, *, offload: str = "auto",
                max_gpu_gb: float | None = None, progress: bool | None = None) -> Placement:
    """Put a host-loaded ``model`` on ``device``, resident or with its experts offloaded (see the module)."""
    from tqdm import tqdm

    dev = torch.device(device)
    fp = footprint(model, adapter)
    budget = device_budget(dev, max_gpu_gb)
    mode = choose_mode(fp, budget, offload)
    if mode == "resident":
        model.to(dev)
        return Placement(mode, fp, budget)
    off = ExpertOffload(adapter, dev, pin=dev.type == "cuda")
    expert_ids = {id(p) for layer in adapter.layers for p in layer.experts.parameters()}
    bar = tqdm(adapter.layers, desc="offload experts", unit="layer", file=sys.stderr,
               disable=(not sys.stderr.isatty()) if progress is None else not progress)
    _move_dense(model, dev, expert_ids)
    for layer in bar:
        off.park(layer.experts)
    bar.close()
    return Placement(mode, fp, budget, off)
