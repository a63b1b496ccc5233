"""The third tier of the timing simulator (issue 25 item 5): host RAM holds a budget of experts, the rest
are read from disk (docs/timing.md, "Host RAM and disk").

- Host RAM is one cache over every (layer, expert) of the model, ``host_ram_experts`` slots, starting
  empty, under an eviction policy from the one resolver. It sees the GPU tier's copies: the misses of
  one (token, layer) as one atomic set in router order (docs/semantics.md), a prefetch as a set of one.
  A GPU hit does not touch it (an expert on the GPU may have left host RAM: it is read again when next
  copied).
- An expert not in host RAM is read from disk on the ``disk`` stream (one read after another; the read
  itself keeps ``queue_depth`` block requests in flight), priced by the calibrated read curve
  ``latency + bytes / bandwidth`` of ``moesim calibrate --disk`` for the chosen mode (``direct``: the
  page cache bypassed; ``page_cache``: the file cached by the OS), block size and queue depth. Its
  host-to-device copy starts when the read ends.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from moesim.errors import DataError, SettingError
from moesim.policies.base import ExpertCache
from moesim.policies.resolve import eviction_factory
from moesim.safe_write import read_json
from moesim.traces.steps import union_chunks

DISK_MODES = ("direct", "page_cache")


@dataclass(frozen=True)
class DiskCurve:
    """A calibration's ``disk`` block: per mode, (block bytes, queue depth) -> (latency s, bytes/s)."""

    points: dict[tuple[str, int, int], tuple[float, float]]
    default: tuple[str, int, int]
    name: str = ""

    @classmethod
    def from_dict(cls, raw: Any, path: object = None) -> DiskCurve:
        """The ``disk`` block of a calibration JSON (or the JSON holding it), checked: a
        :class:`DataError` naming ``path`` and what is wrong."""
        block = raw.get("disk", raw) if isinstance(raw, dict) else None
        try:
            points = {}
            for mode in DISK_MODES:
                for p in block.get(mode) or []:
                    lat, bw = float(p["latency_s"]), float(p["bytes_per_s"])
                    if not (lat >= 0 and bw > 0 and math.isfinite(lat + bw)):
                        raise ValueError(f"{mode} point {p['block_bytes']}x{p['queue_depth']} has latency {lat}, "
                                         f"bandwidth {bw}")
                    points[(mode, int(p["block_bytes"]), int(p["queue_depth"]))] = (lat, bw)
            d = block["default"]
            default = (str(d["mode"]), int(d["block_bytes"]), int(d["queue_depth"]))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise DataError(path, f"not a disk calibration (the disk benchmark writes one): {exc}") from None
        if default not in points:
            raise DataError(path, f"its disk default {default} is not one of its measured points")
        name = str(raw.get("name") or "") if isinstance(raw, dict) else ""
        return cls(points, default, name or (os.path.basename(str(path)) if path else ""))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> DiskCurve:
        return cls.from_dict(read_json(path), path)

    def point(self, mode: str | None, block: int | None, queue_depth: int | None) -> tuple[str, int, int]:
        """The measured point the run reads at (the calibration's default for what is not given)."""
        key = (mode or self.default[0], block or self.default[1], queue_depth or self.default[2])
        if key[0] not in DISK_MODES:
            raise SettingError("disk_mode", f"unknown disk read mode {key[0]!r} (known: {', '.join(DISK_MODES)})")
        if key not in self.points:
            known = sorted(f"{b}x{q}" for m, b, q in self.points if m == key[0])
            raise SettingError("disk_block", f"the disk calibration has no {key[0]} point at block {key[1]} bytes, "
                                             f"queue depth {key[2]} (measured BLOCKxDEPTH: {', '.join(known) or 'none'})")
        return key

    def read_seconds(self, nbytes: int, point: tuple[str, int, int]) -> float:
        latency, bandwidth = self.points[point]
        return latency + nbytes / bandwidth


@dataclass(frozen=True)
class HostTierSpec:
    """A host-RAM budget (bytes or experts), its residency policy, and the disk below it."""

    disk: DiskCurve
    host_ram_bytes: float | None = None
    host_ram_experts: int | None = None
    policy: str = "lru"
    mode: str | None = None
    block: int | None = None
    queue_depth: int | None = None

    def experts(self, expert_bytes: int) -> int:
        """How many experts the budget holds."""
        if self.host_ram_experts is not None:
            n = self.host_ram_experts
        elif self.host_ram_bytes is not None and math.isfinite(self.host_ram_bytes):
            n = int(self.host_ram_bytes // max(expert_bytes, 1))
        else:
            raise SettingError("host_ram", f"host RAM budget {self.host_ram_bytes!r} is not a number of bytes")
        return n


class HostTier:
    """One run's host RAM and disk: which experts are in RAM, the disk reads and their accounting."""

    def __init__(self, spec: HostTierSpec, num_layers: int, num_experts: int, top_k: int, expert_bytes: int) -> None:
        self.E, self.xb = num_experts, expert_bytes
        self.capacity = spec.experts(expert_bytes)
        if self.capacity < top_k:
            raise SettingError("host_ram", f"a host RAM budget of {self.capacity} experts of {expert_bytes} bytes "
                                           f"is smaller than top-k ({top_k}): every set must fit")
        make = eviction_factory(spec.policy, None)
        policy = make()
        if policy.needs_future:
            raise SettingError("host_policy", f"host RAM policy {spec.policy!r} needs the future; the host tier "
                                              "takes an online policy", fix="lru")
        self.policy_name = spec.policy
        self.cache = ExpertCache(self.capacity, policy)
        self.disk = spec.disk
        self.point = spec.disk.point(spec.mode, spec.block, spec.queue_depth)
        self.read_s = spec.disk.read_seconds(expert_bytes, self.point)
        self.clock = 0
        self.host_hits = self.disk_reads = self.prefetch_reads = 0
        self.busy_s = 0.0

    def stage(self, env, step: int, layer: int, experts: list[int], at: float, demand: bool) -> dict[int, float]:
        """``experts`` (router order) about to be copied to the GPU, wanted from ``at``: through host RAM
        as one atomic set; each one not there is read from disk. Returns when each is in host RAM."""
        ready = dict.fromkeys(experts, at)
        if not experts:
            return ready
        keys = [layer * self.E + e for e in experts]
        read: list[int] = []
        for chunk in union_chunks(keys, self.capacity):
            read += self.cache.request(chunk, self.clock)
            self.clock += 1
        for key in read:
            e = key - layer * self.E
            _, ready[e] = env.run("disk", at, self.read_s, f"read L{layer} E{e}", {"step": step, "demand": demand})
            self.busy_s += self.read_s
        if demand:
            self.disk_reads += len(read)
            self.host_hits += len(experts) - len(read)
        else:
            self.prefetch_reads += len(read)
        return ready

    def summary(self, gpu_hits: int, h2d_bytes: int) -> dict[str, Any]:
        """The tier keys of ``simulate --json`` (docs/timing.md, "Host RAM and disk")."""
        reads = self.disk_reads + self.prefetch_reads
        mode, block, depth = self.point
        return {"tier_requests": {"gpu": gpu_hits, "host_ram": self.host_hits, "disk": self.disk_reads},
                "tier_bytes": {"disk_to_host": reads * self.xb, "host_to_gpu": h2d_bytes},
                "host_tier": {"policy": self.policy_name, "host_ram_experts": self.capacity, "disk_reads": reads,
                              "prefetch_disk_reads": self.prefetch_reads,
                              "disk_busy_ms": round(self.busy_s * 1e3, 3), "disk_read_ms": round(self.read_s * 1e3, 4),
                              "disk_mode": mode, "disk_block_bytes": block, "disk_queue_depth": depth,
                              "disk_calibration": self.disk.name}}
