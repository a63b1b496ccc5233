"""Timing options of ``simulate``: the cost model, what-if overrides, prefetch."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from moesim.commands._common import parse_params, positive_int

DEFAULT_HARDWARE = "h200"
DEFAULT_PREFILL_CHUNK = 512
OVERRIDES = ("pcie_gbps", "pcie_latency_us", "expert_bytes", "expert_ms", "layer_ms", "token_ms", "miss_issue_us",
             "routing_handoff_us", "host_copy_issue_us", "predict_us", "cpu_threads", "cpu_speed", "lowbit_format")


def add_timing_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("timing (discrete-event simulation; any of these turns it on)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--hardware", metavar="NAME", help="hardware preset (see `moesim hardware`)")
    src.add_argument("--calibration", metavar="FILE", help="calibration JSON (from `moesim calibrate`)")
    g.add_argument("--quantization", choices=("bf16", "hqq4", "hqq2"), help="expert format (default: the preset's)")
    g.add_argument("--prefetch", default=None, metavar="NAME",
                   help="prefetcher: none, previous-token, transition, speculative, oracle")
    g.add_argument("--prefetch-budget", type=int, metavar="N", help="prefetches per layer (default top-k)")
    g.add_argument("--prefetch-distance", type=positive_int, default=1, metavar="D", help="layers ahead (default 1)")
    g.add_argument("--prefetch-param", action="append", metavar="KEY=VALUE", help="prefetcher parameter, e.g. threshold=0.2")
    g.add_argument("--batch-size", type=positive_int, default=1, help="decode batch (sequences per step)")
    g.add_argument("--prefill-chunk", type=positive_int, default=None,
                   help="prefill tokens per step (default: the chunk the trace's engine ran, as `generate --record` "
                        "writes it, else 512)")
    g.add_argument("--timeline", metavar="FILE", help="write a Chrome/Perfetto trace JSON of the streams")
    g.add_argument("--pcie-gbps", type=float, help="what-if: host-to-device bandwidth (GB/s)")
    g.add_argument("--pcie-latency-us", type=float, help="what-if: per-copy latency (us)")
    g.add_argument("--expert-bytes", type=int, help="what-if: bytes per expert")
    g.add_argument("--expert-ms", type=float, help="what-if: constant expert compute time (ms)")
    g.add_argument("--layer-ms", type=float, help="what-if: constant attention/other time per layer (ms)")
    g.add_argument("--token-ms", type=float, help="what-if: constant per-token overhead (ms)")
    g.add_argument("--engine-mode", choices=("replay", "gate"), default=None,
                   help="replay (default): the routing is known ahead, as in the validation engine; gate: a "
                        "gate-driven decoder reads each layer's top-k back before its copies and experts "
                        "(charges the calibration's engine.routing_handoff_s per layer)")
    g.add_argument("--engine-profile", choices=("moesim", "mixtral-offloading"), default=None,
                   help="moesim (default): this project's engine (copies on a copy stream overlap compute); "
                        "mixtral-offloading: its engine (routing read back per layer, each miss swapped on the "
                        "compute stream: expert in, evicted expert back to the host, two syncs per expert)")
    g.add_argument("--miss-issue-us", type=float, help="what-if: engine cost per demand miss (us)")
    g.add_argument("--routing-handoff-us", type=float, help="what-if: per-layer routing hand-off (us; gate mode)")
    g.add_argument("--host-copy-issue-us", type=float,
                   help="what-if: host time per issued copy (us; gate mode, where it sits on the critical path)")
    g.add_argument("--predict-us", type=float, help="what-if: the speculative predict piece (us; --speculative-ready hidden)")
    g.add_argument("--execution", metavar="SPEC",
                   help="who serves each miss (docs/timing.md, Hybrid execution): copy (default), n-cpu-moe=N "
                        "(layers 0..N-1's experts on the CPU), fiddler, hybrid, hobbit[=THRESHOLD] (low-bit copy "
                        "below that routing weight, default 0.2), pinned=FILE (JSON [[layer, expert], ...] on the "
                        "GPU for good); adds the key executed")
    g.add_argument("--cpu-threads", type=positive_int, metavar="N", help="what-if: threads of the CPU experts")
    g.add_argument("--cpu-speed", type=float, metavar="X", help="what-if: CPU expert time divided by X")
    g.add_argument("--lowbit-format", metavar="FMT",
                   help="what-if: hobbit's substitute format (default one step down: bf16>hqq4>hqq2>hqq1)")
    g.add_argument("--speculative-ready", choices=("hidden", "gate"), default="hidden",
                   help="when a speculative prefetch for layer l+d may start: hidden (default, a live decoder) -- "
                        "after layer l's experts and the predict piece, since the prediction applies layer l+d's "
                        "router to layer l's output; gate -- right after layer l's gate, as the replay engine issues "
                        "a trace's recorded predictions")


def add_host_tier_args(p: argparse.ArgumentParser) -> None:
    """The host-RAM budget and the disk below it (docs/timing.md, "Host RAM and disk")."""
    g = p.add_argument_group("host RAM and disk (a third tier; any budget turns it and the timing on)")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--host-ram-gb", type=float, metavar="X",
                        help="host RAM for experts (GB = 1e9 bytes); the others are read from disk")
    budget.add_argument("--host-ram-experts", type=int, metavar="N", help="host RAM for N experts")
    g.add_argument("--host-policy", default="lru", metavar="NAME", help="which experts stay in host RAM (default lru)")
    g.add_argument("--disk-calibration", metavar="FILE",
                   help="the disk read curve: a JSON with a disk block (moesim calibrate --disk writes one)")
    g.add_argument("--disk-mode", choices=("direct", "page_cache"),
                   help="read from the disk (page cache bypassed) or from the page cache (default the calibration's)")
    g.add_argument("--disk-block", type=int, metavar="BYTES", help="read block size (default the calibration's)")
    g.add_argument("--disk-queue-depth", type=int, metavar="N", help="reads in flight (default the calibration's)")


def host_tier_spec(args: argparse.Namespace):
    """The host-RAM and disk flags as a :class:`~moesim.simulator.disk_tier.HostTierSpec`; None without
    a budget (the other flags alone are refused: they would be silently ignored)."""
    from moesim.errors import UsageError
    from moesim.simulator.disk_tier import DiskCurve, HostTierSpec

    if not hasattr(args, "disk_calibration"):   # a command without the host-tier flags (budgets prices cells too)
        return None
    gb, n = getattr(args, "host_ram_gb", None), getattr(args, "host_ram_experts", None)
    if gb is None and n is None:
        if args.disk_calibration or args.disk_mode or args.disk_block or args.disk_queue_depth:
            raise UsageError("the disk flags need a host RAM budget: --host-ram-gb X or --host-ram-experts N")
        return None
    if (gb is not None and not gb > 0) or (gb is not None and gb == float("inf")) or (n is not None and n < 1):
        raise UsageError(f"the host RAM budget must be positive and finite, got {gb if n is None else n}")
    if not args.disk_calibration:
        raise UsageError("a host RAM budget needs the disk's read curve: --disk-calibration FILE "
                         "(moesim calibrate --disk PATH writes one)")
    return HostTierSpec(DiskCurve.from_json(args.disk_calibration), host_ram_bytes=None if gb is None else gb * 1e9,
                        host_ram_experts=n, policy=args.host_policy, mode=args.disk_mode, block=args.disk_block,
                        queue_depth=args.disk_queue_depth)


def default_hardware_note(args: argparse.Namespace) -> None:
    """A timing option alone (--prefetch, --timeline, a what-if) still needs a machine: say which (on
    stderr, after the run, so that an error stays the one line on stderr)."""
    if timing_requested(args) and not (args.hardware or args.calibration):
        print(f"moesim {args.command}: note: no --hardware or --calibration given; timing uses the "
              f"{DEFAULT_HARDWARE} preset (see `moesim hardware`)", file=sys.stderr)


def timing_requested(args: argparse.Namespace) -> bool:
    return bool(args.hardware or args.calibration or args.prefetch or args.timeline or args.engine_mode
                or args.engine_profile or getattr(args, "execution", None)
                or getattr(args, "host_ram_gb", None) is not None or getattr(args, "host_ram_experts", None) is not None
                or any(getattr(args, o) is not None for o in OVERRIDES))


def cost_model(args: argparse.Namespace):
    from moesim.simulator.cost_model import CostModel

    if args.calibration:
        cost = CostModel.from_json(args.calibration)
    else:
        cost = CostModel.preset(args.hardware or DEFAULT_HARDWARE)
    return cost.with_overrides(quantization=args.quantization, engine_mode=args.engine_mode,
                               engine_profile=args.engine_profile,
                               **{o: getattr(args, o) for o in OVERRIDES})


def prefetch_params(args: argparse.Namespace) -> dict[str, Any]:
    """The prefetcher's parameters: ``--prefetch-param`` pairs, ``--prefetch-distance``, ``--prefetch-budget``."""
    out: dict[str, Any] = parse_params(args.prefetch_param)
    out["distance"] = args.prefetch_distance
    if args.prefetch_budget is not None:
        out["budget"] = args.prefetch_budget
    return out


def say_timeline_written(path: str) -> None:
    """Where the timeline went and how big it is (on stderr: stdout may be --json's one object)."""
    import os
    import sys

    from moesim.simulator.timeline_file import is_parquet
    from moesim.traces.describe import human_bytes

    size = os.path.getsize(path)
    hint = "" if is_parquet(path) else " (a .parquet name writes the same events in a fraction of the size)"
    print(f"wrote timeline {path}: {human_bytes(size)}{hint}", file=sys.stderr)


def prefill_chunk(args: argparse.Namespace, trace) -> int:
    """``--prefill-chunk``, else the chunk a recorded engine ran its prompts in (trace metadata), else 512."""
    from moesim.traces.format import TRACE_PREFILL_CHUNK_KEY

    if args.prefill_chunk is not None:
        return int(args.prefill_chunk)
    recorded = trace.meta.extra.get(TRACE_PREFILL_CHUNK_KEY)
    return int(recorded) if isinstance(recorded, int) and recorded > 0 else DEFAULT_PREFILL_CHUNK
