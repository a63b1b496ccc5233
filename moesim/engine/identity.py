"""Expert identities for the device-side residency proof.

Every pinned expert blob ends with 8 bytes naming its (layer, expert), the last bytes of its one
host-to-device copy. An expert piece reads the identity in its GPU slot before its weights and compares
it with the expert it is meant to compute; the copy stream compares it after each copy. The weights'
layout is untouched (formats split a blob from its start), so every kernel reads the same bytes as before.
"""

from __future__ import annotations

TAG_BYTES = 8               # one int64 identity at the end of every expert blob
TAG_BASE = 0x5E51D0 << 32   # a random blob or an empty (zeroed) slot never carries a valid identity
# A blob's size is a multiple of this, so that every slot row of a (slots, blob_bytes) tensor starts
# 16-byte aligned: torch.compile (Inductor) assumes 16-byte aligned inputs and copies any other input to
# an aligned buffer before its kernels -- with 8-byte padding every odd slot's expert paid a copy of its
# whole blob (+36 us per hqq2 expert on the H200, studies/miss_cost/miss_cost_h200.md).
BLOB_ALIGN = 16


def expert_tag(layer: int, expert: int, num_experts: int) -> int:
    """The identity stored in (layer, expert)'s blob and expected by the expert pieces."""
    return TAG_BASE + layer * num_experts + expert


def blob_bytes(expert_bytes: int) -> int:
    """An expert blob's size: its packed weights, zero padding, then the identity in the last 8 bytes; a
    multiple of ``BLOB_ALIGN``."""
    return -(-(expert_bytes + TAG_BYTES) // BLOB_ALIGN) * BLOB_ALIGN


def tagged_blob(weights, layer: int, expert: int, num_experts: int, pin: bool):
    """A new (pinned when asked) host blob: ``weights`` (uint8), zero padding, then the identity."""
    import torch

    blob = torch.zeros(blob_bytes(weights.numel()), dtype=torch.uint8, pin_memory=pin)
    blob[:weights.numel()].copy_(weights)
    blob[-TAG_BYTES:].view(torch.int64).fill_(expert_tag(layer, expert, num_experts))
    return blob


def slot_tags(slots):
    """The identity word of each slot of a (slots, blob_bytes) uint8 tensor, as an int64 view (slots,)."""
    import torch

    return slots[:, -TAG_BYTES:].view(torch.int64).view(slots.shape[0])


class ResidencyProof:
    """The device counters of the residency proof, shared by both engine programs. A program sets
    ``check_residency``, ``slot_tags`` (per layer, each slot's identity word on the device),
    ``violations`` and ``device_copies`` (device scalars) and ``num_experts``; its expert pieces add to
    ``violations`` when their slot holds another expert's identity."""

    check_residency: bool
    num_experts: int

    def count_copy(self, layer: int, slot: int, expert: int) -> None:
        """On the copy stream right after a copy: count it if its identity landed in the slot."""
        if self.check_residency:
            tag = expert_tag(layer, expert, self.num_experts)
            self.device_copies.add_(self.slot_tags[layer][slot:slot + 1].eq(tag).sum())

    def reset_proof(self) -> None:
        self.violations.zero_()
        self.device_copies.zero_()

    def proof(self) -> tuple[int | None, int | None]:
        """(violations, device_copies) read back from the device (synchronises)."""
        if not self.check_residency:
            return None, None
        return int(self.violations.item()), int(self.device_copies.item())
