"""Packed expert formats: hqq-style 2-bit / 4-bit group quantisation, and bf16.

Layout of one quantised matrix of ``n`` weights as mixtral-offloading configured hqq (``nbits=2,
group_size=16, quant_scale=True, quant_zero=True``: scale/zero re-quantised to 8 bits in groups of 128
with fp16 meta; formats ``hqq2`` and ``hqq4``):

    packed   uint8  n * bits / 8      weight codes, 8 / bits codes per byte
    scale_q  uint8  n / group         per-group scale, 8-bit
    zero_q   uint8  n / group         per-group zero point, 8-bit
    meta     fp16   (n / group / 128, 4)   per 128 groups: scale and zero of the scale, of the zero

hqq 0.2 (what ``pip install hqq`` gives today) ignores ``quant_scale`` / ``quant_zero`` (deprecated)
and keeps scale and zero in bf16 per group: formats ``hqq2-v02`` / ``hqq4-v02`` (packed, scale, zero).
For Mixtral that is 88,080,384 B per 2-bit expert against 66,748,416 B for mixtral-offloading's.
``tests/test_engine_hqq.py`` checks both byte counts and the dequantisation against hqq itself when
hqq is installed.

All of an expert's three matrices (w1, w3: ffn x hidden; w2: hidden x ffn) lie in ONE flat uint8 blob,
so a miss is one host-to-device copy. Codes sit consecutively, first code in the high bits (hqq packs
the same codes strided over rows; the bytes and the work are the same). Weight values are random:
copy and compute times do not depend on them (meta is set so that dequantised weights stay finite).

We implement the format ourselves (pure PyTorch dequant, torch.compile'd on the GPU) rather than import
hqq: hqq is not installed on the GPU image.
"""

from __future__ import annotations

from dataclasses import dataclass

META_GROUP = 128  # scale/zero are themselves quantised in groups of this many groups


@dataclass(frozen=True)
class QuantSpec:
    name: str
    bits: int          # 16 / 32: plain (unquantised) weights of dtype ``plain``
    group_size: int = 16
    quant_meta: bool = True   # scale/zero re-quantised to 8 bits (hqq < 0.2); False: bf16 per group (hqq 0.2)
    plain: str = ""           # "bf16" | "fp16" | "fp32" for unquantised formats

    @property
    def is_plain(self) -> bool:
        return bool(self.plain)

    @property
    def is_bf16(self) -> bool:
        """Unquantised (kept under its historical name: callers only ask "is there a dequant step?")."""
        return self.is_plain

    def matrix_parts(self, n: int) -> list[tuple[str, int]]:
        """(part, byte length) of one matrix of ``n`` weights, in blob order."""
        if self.is_plain:
            return [(self.plain, self.bits // 8 * n)]
        groups = n // self.group_size
        if not self.quant_meta:
            if n % self.group_size or (n * self.bits) % 8:
                raise ValueError(f"{n} weights do not split into groups of {self.group_size}")
            return [("packed", n * self.bits // 8), ("scale", 2 * groups), ("zero", 2 * groups)]
        if n % (self.group_size * META_GROUP) or (n * self.bits) % 8:
            raise ValueError(f"{n} weights do not split into groups of {self.group_size} x {META_GROUP}")
        return [("packed", n * self.bits // 8), ("scale_q", groups), ("zero_q", groups),
                ("meta", (groups // META_GROUP) * 4 * 2)]

    def matrix_bytes(self, n: int) -> int:
        return sum(b for _, b in self.matrix_parts(n))

    def expert_bytes(self, hidden: int, ffn: int) -> int:
        return 3 * self.matrix_bytes(hidden * ffn)


QUANTS: dict[str, QuantSpec] = {
    "hqq2": QuantSpec("hqq2", 2, 16),   # mixtral-offloading's expert format
    "hqq4": QuantSpec("hqq4", 4, 64),   # hqq's usual 4-bit setting
    # what hqq 0.2 stores for the same settings: it ignores quant_scale / quant_zero (deprecated), so
    # scale and zero stay bf16 per group: 4 bits per weight for 2-bit g16 (88,080,384 B per expert)
    "hqq2-v02": QuantSpec("hqq2-v02", 2, 16, quant_meta=False),
    "hqq4-v02": QuantSpec("hqq4-v02", 4, 64, quant_meta=False),
    # hqq 0.2's (and gemlite's) usual 2-bit setting: group 64, bf16 scale/zero (55,050,240 B per expert:
    # each copy ~17% shorter than hqq2's)
    "hqq2-g64": QuantSpec("hqq2-g64", 2, 64, quant_meta=False),
    # HOBBIT's low-bit substitute of an hqq2 expert (issue 24): 1-bit codes, bf16 scale/zero per 64
    # (half of hqq2's bytes); made from the full expert by :func:`quantize_matrix`
    "hqq1-g64": QuantSpec("hqq1-g64", 1, 64, quant_meta=False),
    "bf16": QuantSpec("bf16", 16, plain="bf16"),
    # unquantised in a checkpoint's own dtype (the decoder's ``--quant none``)
    "fp16": QuantSpec("fp16", 16, plain="fp16"),
    "fp32": QuantSpec("fp32", 32, plain="fp32"),
}

PLAIN_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def plain_spec(torch_dtype) -> QuantSpec:
    """The unquantised format of a torch dtype."""
    name = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}.get(str(torch_dtype))
    if name is None:
        raise KeyError(f"no plain expert format for {torch_dtype}")
    return QUANTS[name]


def quant_spec(name: str) -> QuantSpec:
    try:
        return QUANTS[name]
    except KeyError:
        raise KeyError(f"unknown quantization {name!r} (known: {', '.join(QUANTS)})") from None


def fill_random_matrix(view, spec: QuantSpec, n: int, generator=None) -> None:
    """Fill one packed matrix of ``n`` weights (uint8 torch tensor) with random codes and finite meta."""
    import torch

    off = 0
    for part, nbytes in spec.matrix_parts(n):
        chunk = view[off:off + nbytes]
        if part == "meta":
            meta = chunk.view(torch.float16).view(-1, 4)
            # scale = scale_q * 1e-4 (<= 0.0255); zero = zero_q * (2^bits - 1) / 255, inside the code
            # range, so weights are centred (|w| ~ 0.01, like a trained layer's) and outputs stay O(1)
            meta[:, 0] = 1e-4
            meta[:, 1] = 0.0
            meta[:, 2] = ((1 << spec.bits) - 1) / 255
            meta[:, 3] = 0.0
        elif part in PLAIN_DTYPES:
            chunk.view(getattr(torch, PLAIN_DTYPES[part])).normal_(0.0, 0.02, generator=generator)
        elif part == "scale":   # bf16 per group, same ranges as the quantised meta above
            chunk.view(torch.bfloat16).uniform_(0.0, 0.0255, generator=generator)
        elif part == "zero":
            chunk.view(torch.bfloat16).uniform_(0.0, float((1 << spec.bits) - 1), generator=generator)
        else:
            chunk.random_(0, 256, generator=generator)
        off += nbytes


def fill_random_blob(blob, spec: QuantSpec, n: int, generator=None) -> None:
    """Fill an expert blob (three matrices of ``n`` weights) with random codes and finite meta."""
    size = spec.matrix_bytes(n)
    for i in range(3):
        fill_random_matrix(blob[i * size:(i + 1) * size], spec, n, generator)


def split_matrix(view, spec: QuantSpec, n: int) -> dict:
    """Views of one packed matrix's parts (no copy)."""
    import torch

    parts, off = {}, 0
    for part, nbytes in spec.matrix_parts(n):
        chunk = view[off:off + nbytes]
        if part == "meta":
            chunk = chunk.view(torch.float16).view(-1, 4)
        elif part in PLAIN_DTYPES:
            chunk = chunk.view(getattr(torch, PLAIN_DTYPES[part]))
        elif part in ("scale", "zero"):
            chunk = chunk.view(torch.bfloat16)
        parts[part] = chunk
        off += nbytes
    return parts


def split_blob(blob, spec: QuantSpec, n: int) -> list[dict]:
    """Views of the three matrices' parts inside an expert blob (no copy)."""
    size = spec.matrix_bytes(n)
    return [split_matrix(blob[i * size:(i + 1) * size], spec, n) for i in range(3)]


def matrix(view, spec: QuantSpec, rows: int, cols: int):
    """A (rows, cols) bf16 weight from one packed matrix (dequantised; a view for bf16)."""
    n = rows * cols
    return dequantize(split_matrix(view, spec, n), spec, n).view(rows, cols)


def dequantize(parts: dict, spec: QuantSpec, n: int):
    """bf16 weights (flat, ``n``) from one matrix's parts: w = (code - zero) * scale.

    hqq 0.2 formats (bf16 scale/zero) compute exactly as hqq's ``Quantizer.dequantize`` does with
    ``compute_dtype=bfloat16`` -- codes cast to bf16, minus zero, times scale, each step rounded to bf16 --
    so the weights are bit-identical to hqq's (tests/test_engine_hqq.py)."""
    import torch

    if spec.is_plain:
        return parts[spec.plain]
    per_byte = 8 // spec.bits
    mask = (1 << spec.bits) - 1
    packed = parts["packed"]
    shifts = torch.arange(8 - spec.bits, -1, -spec.bits, device=packed.device, dtype=torch.uint8)
    codes = (packed.unsqueeze(-1) >> shifts) & mask                       # (n / per_byte, per_byte)
    groups = n // spec.group_size
    if spec.quant_meta:
        meta = parts["meta"].float()
        scale = (parts["scale_q"].float().view(-1, META_GROUP) - meta[:, 1:2]) * meta[:, 0:1]
        zero = (parts["zero_q"].float().view(-1, META_GROUP) - meta[:, 3:4]) * meta[:, 2:3]
    else:
        groups_codes = codes.view(groups, spec.group_size // per_byte * per_byte).to(torch.bfloat16)
        return ((groups_codes - parts["zero"].view(-1, 1)) * parts["scale"].view(-1, 1)).view(-1)
    w = (codes.view(groups, spec.group_size // per_byte * per_byte).float() - zero.view(-1, 1)) * scale.view(-1, 1)
    return w.to(torch.bfloat16).view(-1)


def quantize_matrix(w, spec: QuantSpec):
    """One matrix's packed bytes (uint8, ``spec.matrix_bytes(w.numel())``) from float weights ``w``, for
    a format with bf16 scale and zero per group (hqq 0.2's layout): per group, codes 0..2^bits-1
    spread over [min, max], w ~ (code - zero) x scale; first code in the high bits. Used to make a
    smaller copy of an existing expert (HOBBIT's substitute)."""
    import torch

    if spec.is_plain or spec.quant_meta:
        raise ValueError(f"quantize_matrix makes bf16-scale formats only, not {spec.name!r}")
    n = w.numel()
    levels = (1 << spec.bits) - 1
    g = w.float().reshape(n // spec.group_size, spec.group_size)
    lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
    scale = ((hi - lo) / levels).clamp(min=1e-8).to(torch.bfloat16)
    zero = (-lo / scale.float()).to(torch.bfloat16)
    codes = (g / scale.float() + zero.float()).round().clamp(0, levels).to(torch.uint8).reshape(-1, 8 // spec.bits)
    shifts = torch.arange(8 - spec.bits, -1, -spec.bits, device=w.device, dtype=torch.uint8)
    packed = (codes << shifts).sum(1, dtype=torch.uint8)
    return torch.cat([packed, scale.reshape(-1).view(torch.uint8), zero.reshape(-1).view(torch.uint8)])
