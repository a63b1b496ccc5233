"""Quantizing a checkpoint into the engine's packed formats with hqq, cached on disk.

``--quant`` chooses (experts / attention q,k,v,o; everything else stays in the compute dtype):

========  ==============================  ==============================  ==========================
quant     experts                          attention                       compute dtype
========  ==============================  ==============================  ==========================
none      checkpoint dtype (plain)        checkpoint dtype (plain)        checkpoint dtype
bf16      bf16 (plain)                    bf16 (plain)                    bf16
hqq2      2-bit g16, 8-bit scale/zero     hqq 4-bit, group 64 (hqq4-v02)  checkpoint dtype
hqq4      4-bit g64, 8-bit scale/zero     hqq 4-bit, group 64 (hqq4-v02)  checkpoint dtype
hqq2-v02  hqq 0.2's 2-bit g16 (bf16 meta) hqq 4-bit, group 64 (hqq4-v02)  checkpoint dtype
hqq4-v02  hqq 0.2's 4-bit g64 (bf16 meta) hqq 4-bit, group 64 (hqq4-v02)  checkpoint dtype
========  ==============================  ==============================  ==========================

One name per expert format, the same name everywhere (generate, calibrate, presets, trace metadata):
``hqq2`` / ``hqq4`` are mixtral-offloading's layout (the replay engine's, the calibration's and every
preset's: 66,748,416 B per Mixtral 2-bit expert), ``hqq2-v02`` / ``hqq4-v02`` hqq 0.2's own layout
(88,080,384 B). The codes, scale and zero come from hqq's own quantizer (``Quantizer.quantize``, axis 1,
``optimize=True``): its packed codes are unpacked with hqq's ``BitPack`` and laid out consecutively in our
blob (one copy per miss). ``*-v02`` keeps hqq's scale and zero in bf16 per group, so the engine's
dequantisation is bit-identical to hqq's ``Quantizer.dequantize`` (tests/test_engine_hqq.py); ``hqq2`` /
``hqq4`` re-quantise them to 8 bits per 128 groups (min-max, fp16 meta), as hqq < 0.2 did for
mixtral-offloading with ``quant_scale`` / ``quant_zero`` (hqq 0.2 ignores those flags).

Cache (hqq quants only; ``none`` / ``bf16`` are a cast): ``<cache root>/<key>/`` with one safetensors file per layer plus ``dense.safetensors`` and, last,
``meta.json`` (a cache without it is incomplete and rebuilt). The key hashes the checkpoint's files
(path, sizes, mtimes), the quant name and ``CACHE_VERSION``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moesim.engine.checkpoint import Checkpoint
from moesim.engine.quant import META_GROUP, QuantSpec, plain_spec, quant_spec, split_matrix
from moesim.errors import UsageError

# 2: ``hqq2`` / ``hqq4`` caches hold mixtral-offloading's layout (version 1 held hqq 0.2's under that name)
CACHE_VERSION = 2
QUANT_CHOICES = ("none", "bf16", "hqq2", "hqq4", "hqq2-v02", "hqq4-v02")
HQQ_SETTINGS = {"hqq2": (2, 16), "hqq4": (4, 64), "hqq2-v02": (2, 16), "hqq4-v02": (4, 64)}


def default_cache_root() -> Path:
    return Path(os.environ.get("MOESIM_CACHE", Path.home() / ".cache" / "moesim")) / "quantized"


def formats(quant: str, checkpoint_dtype) -> tuple[QuantSpec, QuantSpec, Any]:
    """(expert format, attention format, compute dtype) of a ``--quant`` choice."""
    import torch

    if quant == "none":
        plain = plain_spec(checkpoint_dtype)
        return plain, plain, checkpoint_dtype
    if quant == "bf16":
        return quant_spec("bf16"), quant_spec("bf16"), torch.bfloat16
    if quant in HQQ_SETTINGS:   # attention stays on the device (never copied): hqq 0.2's 4-bit for all
        return quant_spec(quant), quant_spec("hqq4-v02"), checkpoint_dtype
    raise UsageError(f"--quant must be one of {', '.join(QUANT_CHOICES)}, got {quant!r}")


def pack_matrix(w, spec: QuantSpec, device=None, optimize: bool = True):
    """One weight matrix (out, in) as a flat uint8 blob of ``spec`` (on the device it was made on)."""
    import torch

    if spec.is_plain:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[spec.plain]
        return w.detach().to(dtype).contiguous().view(-1).view(torch.uint8)
    from hqq.core.bitpack import BitPack
    from hqq.core.quantize import Quantizer

    nbits, group = HQQ_SETTINGS[spec.name]
    dev = device or w.device
    n = w.numel()
    w_q, meta = Quantizer.quantize(w.detach().to(dev), nbits=nbits, group_size=group, optimize=optimize, axis=1,
                                   compute_dtype=torch.bfloat16, device=str(dev))
    unpack = {2: BitPack.unpack_2bit_u8, 4: BitPack.unpack_4bit_u8}[nbits]
    codes = unpack(w_q, dtype=torch.uint8).reshape(-1)      # group-major: hqq's own grouping order
    per_byte = 8 // nbits
    shifts = torch.arange(8 - nbits, -1, -nbits, dtype=torch.uint8, device=codes.device)
    blob = torch.empty(spec.matrix_bytes(n), dtype=torch.uint8, device=codes.device)
    parts = split_matrix(blob, spec, n)
    parts["packed"].copy_((codes.view(-1, per_byte) << shifts).sum(dim=1, dtype=torch.uint8))
    if spec.quant_meta:
        scale_q, scale_meta = requantize_8bit(meta["scale"].reshape(-1))
        zero_q, zero_meta = requantize_8bit(meta["zero"].reshape(-1))
        parts["scale_q"].copy_(scale_q)
        parts["zero_q"].copy_(zero_q)
        parts["meta"].copy_(torch.cat([scale_meta, zero_meta], dim=1))
    else:
        parts["scale"].copy_(meta["scale"].reshape(-1).to(torch.bfloat16))
        parts["zero"].copy_(meta["zero"].reshape(-1).to(torch.bfloat16))
    return blob


def requantize_8bit(values):
    """Per-group scales (or zeros) as 8-bit codes per ``META_GROUP`` groups, min-max round-to-nearest, the
    way hqq < 0.2 quantised them for mixtral-offloading: (codes uint8 (n,), meta fp16 (n / 128, 2) =
    (step, offset)), dequantised as (code - offset) * step."""
    import torch

    v = values.float().view(-1, META_GROUP)
    lo, hi = v.min(dim=1, keepdim=True).values, v.max(dim=1, keepdim=True).values
    step = torch.where(hi > lo, (hi - lo) / 255, torch.ones_like(hi)).half().float()
    offset = (-lo / step).half().float()      # rounded to the fp16 the blob stores before coding with it
    codes = torch.round(v / step + offset).clamp_(0, 255).to(torch.uint8).view(-1)
    return codes, torch.cat([step, offset], dim=1).half()


def hqq_reference(w, spec: QuantSpec):
    """hqq's own dequantized weights for ``w`` (same settings as :func:`pack_matrix`; scale and zero as hqq
    0.2 keeps them, so only the ``*-v02`` formats equal it bit for bit), for the tests."""
    import torch
    from hqq.core.quantize import Quantizer

    nbits, group = HQQ_SETTINGS[spec.name]
    w_q, meta = Quantizer.quantize(w.detach(), nbits=nbits, group_size=group, optimize=True, axis=1,
                                   compute_dtype=torch.bfloat16, device=str(w.device))
    meta["scale"], meta["zero"] = meta["scale"].to(torch.bfloat16), meta["zero"].to(torch.bfloat16)
    meta["compute_dtype"] = torch.bfloat16
    return Quantizer.dequantize(w_q, meta)


@dataclass
class PackedModel:
    """A checkpoint in the engine's formats, on the CPU: expert blobs for the pinned store, attention
    blobs and dense tensors for the GPU program."""

    checkpoint: Checkpoint
    quant: str
    expert_format: QuantSpec
    attn_format: QuantSpec
    dtype: Any                                   # compute dtype
    experts: list[list[Any]]                     # [layer][expert] uint8 blobs
    attn: list[dict[str, Any]]                   # per layer: q/k/v/o blobs (+ biases, q/k norms)
    dense: list[dict[str, Any]]                  # per layer: norms, router, shared expert
    globals: dict[str, Any]                      # embed, final_norm, lm_head
    timings: dict[str, float] = field(default_factory=dict)   # quantize_s / cache_write_s / cache_load_s

    @property
    def spec(self):
        return self.checkpoint.spec

    @property
    def expert_bytes(self) -> int:
        return self.expert_format.expert_bytes(self.spec.hidden, self.spec.ffn)


def _cache_dir(ckpt: Checkpoint, quant: str, root: Path | None, optimize: bool = True) -> Path | None:
    fp = ckpt.source.fingerprint()
    if fp is None or root is None:
        return None
    key = hashlib.sha256(json.dumps([fp, quant, CACHE_VERSION, optimize]).encode()).hexdigest()[:20]
    return root / f"{ckpt.name or 'model'}-{quant}-{key}"


def _host(blob, pin: bool):
    """``blob`` in (pinned, when asked) host memory: the store copies experts from there."""
    import torch

    if not pin:
        return blob.cpu()
    out = torch.empty(blob.numel(), dtype=torch.uint8, pin_memory=True)
    out.copy_(blob)
    return out


def pack_checkpoint(ckpt: Checkpoint, quant: str, *, device: str = "cpu", cache_root: Path | None = None,
                    progress: bool = False, pin: bool = False, optimize: bool = True) -> PackedModel:
    """Quantize (or convert) every weight; with ``cache_root``, reuse or write the on-disk cache.
    ``device``: where hqq's quantizer runs (the GPU for a full-size model); ``pin``: expert blobs in
    pinned host memory (for asynchronous copies to a GPU); ``optimize``: hqq's proximal solver (its
    default) or plain round-to-nearest min/max quantization (hqq's ``optimize=False``)."""
    import torch

    ckpt_dtype = getattr(torch, ckpt.spec.dtype.removeprefix("torch."), None)
    if not isinstance(ckpt_dtype, torch.dtype) or not ckpt_dtype.is_floating_point:
        ckpt_dtype = ckpt.globals()["embed"].dtype
    efmt, afmt, dtype = formats(quant, ckpt_dtype)
    if not (efmt.is_plain and afmt.is_plain):
        try:
            import hqq  # noqa: F401
        except ImportError:
            raise UsageError(f"--quant {quant} needs hqq: pip install 'moesim[torch]' (or pip install hqq)") from None
    # plain formats are a dtype cast: caching them would only copy the checkpoint
    cache = None if (efmt.is_plain and afmt.is_plain) else _cache_dir(ckpt, quant, cache_root, optimize)
    if cache is not None and (cache / "meta.json").is_file():
        return _load_cache(ckpt, quant, efmt, afmt, dtype, cache, progress, pin)
    s = ckpt.spec
    t0 = time.perf_counter()
    experts, attn, dense = [], [], []
    it = range(s.num_layers)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"quantizing ({quant})", unit="layer")
    for layer in it:
        row = []
        for e in range(s.num_experts):
            mats = [pack_matrix(w, efmt, device, optimize) for w in ckpt.expert(layer, e)]
            row.append(_host(torch.cat([m.to(mats[0].device) for m in mats]), pin))
        experts.append(row)
        a = ckpt.attention(layer)
        attn.append({k: (pack_matrix(v, afmt, device, optimize).cpu() if k in "qkvo" else v.detach().to(dtype).cpu())
                     for k, v in a.items()})
        dense.append({k: v.detach().to(dtype).cpu() for k, v in ckpt.dense(layer).items()})
    glob = {k: v.detach().to(dtype).cpu() for k, v in ckpt.globals().items()}
    packed = PackedModel(ckpt, quant, efmt, afmt, dtype, experts, attn, dense, glob,
                         {"quantize_s": time.perf_counter() - t0})
    if cache is not None:
        t1 = time.perf_counter()
        _write_cache(packed, cache, progress)
        packed.timings["cache_write_s"] = time.perf_counter() - t1
    return packed


def _write_cache(p: PackedModel, cache: Path, progress: bool) -> None:
    from safetensors.torch import save_file

    tmp = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    it = range(p.spec.num_layers)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="writing quantization cache", unit="layer")
    for layer in it:
        t = {f"expert.{e}": b for e, b in enumerate(p.experts[layer])}
        t.update({f"attn.{k}": v for k, v in p.attn[layer].items()})
        t.update({f"dense.{k}": v.contiguous() for k, v in p.dense[layer].items()})
        save_file(t, str(tmp / f"layer-{layer:04d}.safetensors"))
    save_file({k: v.contiguous() for k, v in p.globals.items()}, str(tmp / "globals.safetensors"))
    (tmp / "meta.json").write_text(json.dumps({"version": CACHE_VERSION, "quant": p.quant,
                                               "layers": p.spec.num_layers, "expert_format": p.expert_format.name}))
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)


def _load_cache(ckpt, quant, efmt, afmt, dtype, cache: Path, progress: bool, pin: bool) -> PackedModel:
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    experts, attn, dense = [], [], []
    s = ckpt.spec
    it = range(s.num_layers)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="loading quantization cache", unit="layer")
    for layer in it:
        t = load_file(str(cache / f"layer-{layer:04d}.safetensors"))
        experts.append([_host(t[f"expert.{e}"], pin) for e in range(s.num_experts)])
        attn.append({k[5:]: v for k, v in t.items() if k.startswith("attn.")})
        dense.append({k[6:]: v for k, v in t.items() if k.startswith("dense.")})
    glob = load_file(str(cache / "globals.safetensors"))
    return PackedModel(ckpt, quant, efmt, afmt, dtype, experts, attn, dense, glob,
                       {"cache_load_s": time.perf_counter() - t0})
