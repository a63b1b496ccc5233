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
hqq2-g64  hqq 0.2's 2-bit g64 (bf16 meta) hqq 4-bit, group 64 (hqq4-v02)  checkpoint dtype
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
from moesim.engine.expert_store import expert_blob
from moesim.engine.quant import META_GROUP, QuantSpec, plain_spec, quant_spec, split_matrix
from moesim.errors import SettingError

# 2: ``hqq2`` / ``hqq4`` caches hold mixtral-offloading's layout (version 1 held hqq 0.2's under that name)
CACHE_VERSION = 2
QUANT_CHOICES = ("none", "bf16", "hqq2", "hqq4", "hqq2-v02", "hqq4-v02", "hqq2-g64")
HQQ_SETTINGS = {"hqq2": (2, 16), "hqq4": (4, 64), "hqq2-v02": (2, 16), "hqq4-v02": (4, 64), "hqq2-g64": (2, 64)}


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
    raise SettingError("quant", f"unknown expert format {quant!r} (known: {', '.join(QUANT_CHOICES)})")


def pack_matrix(w, spec: QuantSpec, device=None, optimize: bool = True, out=None):
    """One weight matrix (out, in) as a flat uint8 blob of ``spec`` (on the device it was made on), or
    written into ``out`` (a uint8 view of ``spec.matrix_bytes`` bytes, e.g. inside an expert's store blob)."""
    import torch

    if spec.is_plain:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[spec.plain]
        flat = w.detach().to(dtype).contiguous().view(-1).view(torch.uint8)
        return flat if out is None else out.copy_(flat)
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
    blob = torch.empty(spec.matrix_bytes(n), dtype=torch.uint8, device=codes.device) if out is None else out
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
    # the host store's blobs the experts were written into ([layer][expert]: weights, padding, identity;
    # ``experts`` are views of them), and whether they are pinned: ExpertStore.from_packed takes them as is
    tagged: list[list[Any]] | None = None
    pinned: bool = False

    @property
    def spec(self):
        return self.checkpoint.spec

    @property
    def expert_bytes(self) -> int:
        return self.expert_format.expert_bytes(self.spec.hidden, self.spec.ffn)

    @property
    def cache_state(self) -> str:
        """How the quantization cache served this load: ``"hit"`` (read back, nothing quantized),
        ``"cold"`` (quantized and written), ``"none"`` (no cache: a plain format is a cast, or no cache root)."""
        if "cache_load_s" in self.timings:
            return "hit"
        return "cold" if "cache_write_s" in self.timings else "none"


def _cache_dir(ckpt: Checkpoint, quant: str, root: Path | None, optimize: bool = True) -> Path | None:
    fp = ckpt.source.fingerprint()
    if fp is None or root is None:
        return None
    key = hashlib.sha256(json.dumps([fp, quant, CACHE_VERSION, optimize]).encode()).hexdigest()[:20]
    return root / f"{ckpt.name or 'model'}-{quant}-{key}"


def _bar(progress: bool, total: int, desc: str):
    """A progress bar over experts (tqdm's rate and ETA), or None."""
    if not progress:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="expert")


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
            raise SettingError("quant", f"the {quant} expert format needs hqq: pip install 'moesim[torch]' "
                               "(or pip install hqq)") from None
    # plain formats are a dtype cast: caching them would only copy the checkpoint
    cache = None if (efmt.is_plain and afmt.is_plain) else _cache_dir(ckpt, quant, cache_root, optimize)
    if cache is not None and (cache / "meta.json").is_file():
        return _load_cache(ckpt, quant, efmt, afmt, dtype, cache, progress, pin)
    return _pack_streaming(ckpt, quant, efmt, afmt, dtype, device, cache, progress, pin, optimize)


def _pack_streaming(ckpt: Checkpoint, quant: str, efmt: QuantSpec, afmt: QuantSpec, dtype, device: str,
                    cache: Path | None, progress: bool, pin: bool, optimize: bool) -> PackedModel:
    """Tensor by tensor from the checkpoint, one expert at a time straight into its blob of the host store
    (allocated once, pinned when asked); each layer goes to the quantization cache as soon as it is packed.
    Peak host memory: the store, the non-expert weights, and one layer's transient buffers."""
    s = ckpt.spec
    t0 = time.perf_counter()
    eb = efmt.expert_bytes(s.hidden, s.ffn)
    size = efmt.matrix_bytes(s.hidden * s.ffn)
    tagged: list[list[Any]] = []
    attn, dense = [], []
    writer = _CacheWriter(cache) if cache is not None else None
    bar = _bar(progress, s.num_layers * s.num_experts, f"loading experts ({quant})")
    for layer in range(s.num_layers):
        row = []
        for e in range(s.num_experts):
            blob = expert_blob(eb, layer, e, s.num_experts, pin)
            for i, w in enumerate(ckpt.expert(layer, e)):
                pack_matrix(w, efmt, device, optimize, out=blob[i * size:(i + 1) * size])
            row.append(blob)
            if bar is not None:
                bar.update(1)
        tagged.append(row)
        a = ckpt.attention(layer)
        attn.append({k: (pack_matrix(v, afmt, device, optimize).cpu() if k in "qkvo" else v.detach().to(dtype).cpu())
                     for k, v in a.items()})
        dense.append({k: v.detach().to(dtype).cpu() for k, v in ckpt.dense(layer).items()})
        if writer is not None:
            writer.layer(layer, [b[:eb] for b in row], attn[layer], dense[layer])
    if bar is not None:
        bar.close()
    glob = {k: v.detach().to(dtype).cpu() for k, v in ckpt.globals().items()}
    packed = PackedModel(ckpt, quant, efmt, afmt, dtype, [[b[:eb] for b in row] for row in tagged], attn, dense,
                         glob, {}, tagged, pin)
    if writer is not None:
        writer.finish(packed)
        packed.timings["cache_write_s"] = writer.seconds
    packed.timings["quantize_s"] = time.perf_counter() - t0 - packed.timings.get("cache_write_s", 0.0)
    return packed


class _CacheWriter:
    """The quantization cache, written layer by layer into ``<cache>.tmp`` while the model is packed;
    ``meta.json`` last, then renamed into place (a cache without it is incomplete and rebuilt)."""

    def __init__(self, cache: Path) -> None:
        self.cache, self.tmp = cache, cache.with_name(cache.name + ".tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.seconds = 0.0

    def layer(self, layer: int, experts: list[Any], attn: dict[str, Any], dense: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        t0 = time.perf_counter()
        t = {f"expert.{e}": b for e, b in enumerate(experts)}
        t.update({f"attn.{k}": v for k, v in attn.items()})
        t.update({f"dense.{k}": v.contiguous() for k, v in dense.items()})
        save_file(t, str(self.tmp / f"layer-{layer:04d}.safetensors"))
        self.seconds += time.perf_counter() - t0

    def finish(self, p: PackedModel) -> None:
        from safetensors.torch import save_file

        t0 = time.perf_counter()
        save_file({k: v.contiguous() for k, v in p.globals.items()}, str(self.tmp / "globals.safetensors"))
        (self.tmp / "meta.json").write_text(json.dumps({"version": CACHE_VERSION, "quant": p.quant,
                                                        "layers": p.spec.num_layers,
                                                        "expert_format": p.expert_format.name}))
        shutil.rmtree(self.cache, ignore_errors=True)
        os.replace(self.tmp, self.cache)
        self.seconds += time.perf_counter() - t0


def _load_cache(ckpt, quant, efmt, afmt, dtype, cache: Path, progress: bool, pin: bool) -> PackedModel:
    """The cache read back tensor by tensor (memory-mapped, one layer file open at a time), each expert
    straight into its store blob."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    tagged, attn, dense = [], [], []
    s = ckpt.spec
    eb = efmt.expert_bytes(s.hidden, s.ffn)
    bar = _bar(progress, s.num_layers * s.num_experts, "loading quantization cache")
    for layer in range(s.num_layers):
        row = []
        with safe_open(str(cache / f"layer-{layer:04d}.safetensors"), framework="pt") as f:
            for e in range(s.num_experts):
                blob = expert_blob(eb, layer, e, s.num_experts, pin)
                blob[:eb].copy_(f.get_tensor(f"expert.{e}"))
                row.append(blob)
                if bar is not None:
                    bar.update(1)
            # copies: a tensor read from a safe_open handle is a view of the file's mapping, and one kept
            # keeps the whole file mapped with every expert page read through it resident (measured on the
            # H100 box, 16 full-width layers from a cache in /dev/shm: peak RSS 19.8 GB, the store twice over)
            names = list(f.keys())
            attn.append({k[5:]: f.get_tensor(k).clone() for k in names if k.startswith("attn.")})
            dense.append({k[6:]: f.get_tensor(k).clone() for k in names if k.startswith("dense.")})
        tagged.append(row)
    if bar is not None:
        bar.close()
    glob = load_file(str(cache / "globals.safetensors"))
    return PackedModel(ckpt, quant, efmt, afmt, dtype, [[b[:eb] for b in row] for row in tagged], attn, dense, glob,
                       {"cache_load_s": time.perf_counter() - t0}, tagged, pin)
