"""The pinned expert store: every routed expert of a model as one flat blob in (pinned) host memory.

A miss or a prefetch is ONE host-to-device copy of a blob into a GPU slot (``copy_to``), issued on the
copy stream by the decode loop; pinned memory makes the copy asynchronous (DMA at full PCIe rate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moesim.engine.quant import QuantSpec


@dataclass
class ExpertStore:
    blobs: list[list[Any]]   # [layer][expert] uint8 tensors
    fmt: QuantSpec
    hidden: int
    ffn: int

    @classmethod
    def from_packed(cls, packed, pin: bool) -> ExpertStore:
        """The packed model's experts, pinned when asked (already pinned blobs are kept as they are)."""
        import torch

        blobs = []
        for row in packed.experts:
            out = []
            for b in row:
                if pin and not b.is_pinned():
                    p = torch.empty(b.numel(), dtype=torch.uint8, pin_memory=True)
                    p.copy_(b)
                    b = p
                out.append(b)
            blobs.append(out)
        return cls(blobs, packed.expert_format, packed.spec.hidden, packed.spec.ffn)

    @property
    def num_layers(self) -> int:
        return len(self.blobs)

    @property
    def num_experts(self) -> int:
        return len(self.blobs[0])

    @property
    def expert_bytes(self) -> int:
        return self.fmt.expert_bytes(self.hidden, self.ffn)

    def copy_to(self, dst, layer: int, expert: int) -> None:
        """Copy an expert into a slot (``non_blocking``: asynchronous from pinned memory on a GPU)."""
        dst.copy_(self.blobs[layer][expert], non_blocking=True)
