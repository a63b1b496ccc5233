"""The pinned expert store: every routed expert of a model as one flat blob in (pinned) host memory.

A miss or a prefetch is ONE host-to-device copy of a blob into a GPU slot (``copy_to``), issued on the
copy stream by the decode loop; pinned memory makes the copy asynchronous (DMA at full PCIe rate). Each
blob ends with its (layer, expert) identity (``moesim.engine.identity``) for the device-side residency
proof.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moesim.engine.identity import blob_bytes, tagged_blob
from moesim.engine.quant import QuantSpec


@dataclass
class ExpertStore:
    blobs: list[list[Any]]   # [layer][expert] uint8 tensors
    fmt: QuantSpec
    hidden: int
    ffn: int

    @classmethod
    def from_packed(cls, packed, pin: bool) -> ExpertStore:
        """The packed model's experts, each copied once into a (pinned, when asked) blob that ends with
        its identity."""
        blobs = []
        E = len(packed.experts[0])
        for layer, row in enumerate(packed.experts):
            out = []
            for e, b in enumerate(row):
                blob = tagged_blob(b, layer, e, E, pin)
                # the packed model now sees the same bytes inside the tagged blob: one host copy, not two
                row[e] = blob[:b.numel()]
                out.append(blob)
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

    @property
    def blob_bytes(self) -> int:
        """What one copy moves: the packed weights and the identity."""
        return blob_bytes(self.expert_bytes)

    def copy_to(self, dst, layer: int, expert: int) -> None:
        """Copy an expert into a slot (``non_blocking``: asynchronous from pinned memory on a GPU)."""
        dst.copy_(self.blobs[layer][expert], non_blocking=True)
