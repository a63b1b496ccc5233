"""The pinned expert store: every routed expert of a model as one flat blob in (pinned) host memory.

A miss or a prefetch is ONE host-to-device copy of a blob into a GPU slot (``copy_to``), issued on the
copy stream by the decode loop; pinned memory makes the copy asynchronous (DMA at full PCIe rate). Each
blob ends with its (layer, expert) identity (``moesim.engine.identity``) for the device-side residency
proof.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moesim.engine.identity import TAG_BYTES, blob_bytes, expert_tag, tagged_blob
from moesim.engine.quant import QuantSpec


def host_buffer(nbytes: int, pin: bool):
    """``nbytes`` of zeroed host memory, page-locked when ``pin``. Pinned memory is registered in place
    (``cudaHostRegister``) rather than taken from torch's pinned allocator, which rounds every block up to
    a power of two (a 352 MB bf16 expert would hold 512 MB); the allocator is the fallback."""
    import torch

    buf = torch.zeros(nbytes, dtype=torch.uint8)
    if not pin:
        return buf
    try:
        if int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)) == 0:
            return buf
    except (AttributeError, RuntimeError, TypeError):
        pass
    return torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True)


def expert_blob(expert_bytes: int, layer: int, expert: int, num_experts: int, pin: bool):
    """An expert's slot in the host store, allocated once: room for its packed weights (written in place
    by the packer or the cache reader), zero padding, and its identity already in the last bytes."""
    import torch

    blob = host_buffer(blob_bytes(expert_bytes), pin)
    blob[-TAG_BYTES:].view(torch.int64).fill_(expert_tag(layer, expert, num_experts))
    return blob


@dataclass
class ExpertStore:
    blobs: list[list[Any]]   # [layer][expert] uint8 tensors
    fmt: QuantSpec
    hidden: int
    ffn: int

    @classmethod
    def from_packed(cls, packed, pin: bool) -> ExpertStore:
        """The packed model's experts in (pinned, when asked) blobs that end with their identity: the
        packer's own blobs when it wrote them in place with the same pinning, else each copied once."""
        if packed.tagged is not None and packed.pinned == pin:
            return cls(packed.tagged, packed.expert_format, packed.spec.hidden, packed.spec.ffn)
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
