"""``moesim calibrate``: GPU micro-benchmarks -> the cost model's calibration JSON.

On a CUDA machine it measures (CUDA events, device time): the pinned host-to-device copy curve
(64 KB ... 512 MB), one expert's dequantise + FFN time vs tokens for hqq2 / hqq4 / bf16, attention +
gate vs context, the LM head, the engine's captured pieces (layer, expert, final), an
all-resident engine run (the per-token overhead beyond the pieces), the engine terms (per-miss issue
cost, per-layer routing hand-off) and one expert copy repeated from several buffers (the copy spread); ``--from-raw FILE`` converts a raw measurement file brought back
from the GPU (``benchmarks/gpu_validate.py``) instead, on any machine.

``--cpu-only`` measures the CPU half (hybrid execution, issue 24) on THIS machine, no GPU needed: one
expert FFN with torch's CPU weight-only kernels per format, tokens and threads
(:mod:`moesim.engine.cpu_bench`), written as the ``cpu`` block of a calibration that is otherwise
``--base``'s (a preset or a calibration file).
"""

from __future__ import annotations

import argparse
import json

from moesim.commands._common import add_force_arg, int_list


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="measure a GPU (or convert raw measurements) into a calibration JSON",
                       description="On a CUDA machine, measure host-to-device copies, expert and layer compute "
                                   "and the engine's own costs, and write the cost model's calibration JSON; "
                                   "with --from-raw, convert a raw measurement file from a GPU run instead "
                                   "(any machine).")
    p.add_argument("-o", "--out", required=True, help="calibration JSON to write (CostModel format)")
    p.add_argument("--raw-out", help="also keep the raw measurements here")
    p.add_argument("--from-raw", help="convert this raw measurement file instead of measuring")
    p.add_argument("--name", default="h200", help="the calibration's name (default h200)")
    p.add_argument("--add-to", metavar="CAL",
                   help="with --from-raw: keep CAL's copies and kernels, add the raw file's engine terms and its "
                        "expert-copy session (the copy interval then spans both sessions)")
    p.add_argument("--with-pieces", action="store_true",
                   help="with --add-to: also take the engine's captured pieces and per-token overhead from the raw "
                        "file (after a change to the engine itself)")
    p.add_argument("--quants", default="hqq2,hqq4,bf16")
    p.add_argument("--layers", type=int, default=32,
                   help="layers of the engine measured for its pieces and per-token overhead (8 slots each, "
                        "~0.53 GB of GPU memory per layer; default 32 = Mixtral-8x7B)")
    cpu = p.add_argument_group("the CPU half (--cpu-only: no GPU needed)")
    cpu.add_argument("--cpu-only", action="store_true",
                     help="measure only this machine's CPU expert FFN curve and write it into --base's calibration")
    cpu.add_argument("--base", default="h200", metavar="PRESET|FILE",
                     help="the calibration the CPU block goes into (default the h200 preset)")
    cpu.add_argument("--geometry", default="4096x14336", metavar="HIDDENxFFN",
                     help="expert size measured (default Mixtral-8x7B's; a smaller one is scaled to it by "
                          "parameter count)")
    cpu.add_argument("--cpu-formats", default="int8,int4,bf16", help="CPU weight formats (int8, int4, bf16)")
    cpu.add_argument("--cpu-threads", type=int_list, default=None, metavar="N,N,...",
                     help="thread counts (default 1 and every core torch sees)")
    cpu.add_argument("--cpu-tokens", type=int_list, default=[1, 4], metavar="N,N,...", help="tokens per expert (default 1,4)")
    cpu.add_argument("--repeats", type=int, default=5, help="timed runs per point (default 5)")
    disk = p.add_argument_group("the disk below host RAM (--disk: no GPU needed)")
    disk.add_argument("--disk", metavar="DIR", help="measure file reads in DIR (a scratch file, removed afterwards) "
                                                    "and write the disk read curve")
    disk.add_argument("--disk-file-mb", type=int, default=256, metavar="MB",
                      help="scratch file size (default 256; larger than the drive's cache reads truer)")
    disk.add_argument("--disk-blocks-kb", type=int_list, default=[128, 1024], metavar="KB,KB,...",
                      help="read block sizes (default 128,1024; multiples of 4)")
    disk.add_argument("--disk-depths", type=int_list, default=[1, 4], metavar="N,N,...",
                      help="queue depths: block reads in flight (default 1,4)")
    disk.add_argument("--disk-sizes-kb", type=int_list, default=[1024, 4096, 16384], metavar="KB,KB,...",
                      help="read sizes the line latency + bytes/bandwidth is fitted to (default 1024,4096,16384)")
    add_force_arg(p)
    p.set_defaults(func=run)


def run_cpu_only(args: argparse.Namespace) -> int:
    """``--cpu-only``: measure the CPU curve and write ``--base`` with it as its ``cpu`` block."""
    import os

    from tqdm import tqdm

    from moesim.engine import cpu_bench
    from moesim.errors import UsageError
    from moesim.safe_write import atomic_open
    from moesim.simulator.cost_model import CostModel

    base = (CostModel.from_json(args.base) if os.path.exists(args.base) or args.base.endswith(".json")
            else CostModel.preset(args.base))
    geometry = cpu_bench.parse_geometry(args.geometry)
    formats = [f for f in args.cpu_formats.split(",") if f]
    if not formats or any(f not in cpu_bench.FORMATS for f in formats):
        raise UsageError(f"--cpu-formats takes {', '.join(cpu_bench.FORMATS)}, got {args.cpu_formats!r}")
    try:
        import torch
    except ImportError:
        raise UsageError("moesim calibrate --cpu-only needs torch: pip install 'moesim[torch]'") from None
    threads = args.cpu_threads or sorted({1, torch.get_num_threads()})
    tokens = args.cpu_tokens
    if not tokens or min(threads) < 1 or min(tokens) < 1 or args.repeats < 1:
        raise UsageError("--cpu-threads, --cpu-tokens and --repeats must be >= 1")
    with tqdm(total=len(formats) * len(threads) * len(tokens), desc="cpu expert", unit="point") as bar:
        raw = cpu_bench.measure(formats, geometry, tokens, threads, args.repeats,
                                progress=lambda msg: (bar.set_postfix_str(msg), bar.update()))
    top = max(threads)
    print(f"CPU experts ({formats[0]}, {top} threads) back to back and after idle gaps ...", flush=True)
    raw["after_idle"] = cpu_bench.measure_after_idle(formats[0], geometry, top)
    copy_bytes = base.expert_bytes_by_quant.get(base.quantization, 0)
    copy_once = cpu_bench.pinned_copy(copy_bytes) if copy_bytes else None
    if copy_once is not None:   # a GPU here: the CPU expert beside running copies (hybrid execution's regime)
        print(f"CPU experts ({formats[0]}, {top} threads) alone and beside {copy_bytes} B copies ...", flush=True)
        raw["beside_copies"] = cpu_bench.measure_beside_copies(formats[0], geometry, top, max(args.repeats, 24),
                                                               copy_once, copy_bytes)
    block = cpu_bench.cpu_block(raw)
    cal = base.to_dict() | {"cpu": block}
    if args.name != "h200" or base.name == "h200":
        cal["name"] = args.name
    CostModel.from_dict(cal, args.out)     # what --calibration will read back
    if args.raw_out:
        with atomic_open(args.raw_out) as fh:
            json.dump(raw, fh, indent=1)
            fh.write("\n")
    with atomic_open(args.out) as fh:
        json.dump(cal, fh, indent=1)
        fh.write("\n")
    fmt = block["format"]
    print(f"wrote {args.out}: CPU expert ({fmt}, {block['threads']} threads) "
          + ", ".join(f"{t:g} tok {s * 1e3:.2f} ms" for t, s in block["expert_s"][fmt])
          + (f"; x{block['beside_copies']:.2f} beside copies" if "beside_copies" in block else "")
          + "; after idle " + ", ".join(f"{g * 1e3:g} ms +{x * 1e3:.3f} ms" for g, x in block["after_idle"]))
    return 0


def run_disk(args: argparse.Namespace) -> int:
    """``--disk DIR``: the disk read curve of DIR's file system, written as a calibration's ``disk`` block."""
    import os
    import shutil
    import tempfile

    from tqdm import tqdm

    from moesim.engine import disk_bench
    from moesim.errors import DataError, UsageError
    from moesim.safe_write import atomic_open
    from moesim.simulator.disk_tier import DiskCurve

    file_bytes = args.disk_file_mb * 2**20
    blocks = [kb * 1024 for kb in args.disk_blocks_kb]
    sizes = [kb * 1024 for kb in args.disk_sizes_kb]
    if (args.disk_file_mb < 1 or not blocks or not args.disk_depths or not sizes or args.repeats < 1
            or min(args.disk_depths) < 1 or min(blocks) < 4096 or any(b % 4096 for b in blocks + sizes)):
        raise UsageError("--disk-file-mb, --disk-depths and --repeats must be >= 1, --disk-blocks-kb and "
                         "--disk-sizes-kb multiples of 4")
    if max(sizes) > file_bytes:
        raise UsageError(f"--disk-sizes-kb {max(sizes) // 1024} is larger than the scratch file (--disk-file-mb "
                         f"{args.disk_file_mb})")
    try:
        tempfile.TemporaryFile(dir=args.disk).close()
    except OSError as exc:
        raise DataError(args.disk, f"cannot write a scratch file there ({exc.strerror or exc})") from None
    if shutil.disk_usage(args.disk).free < file_bytes * 1.1:
        raise DataError(args.disk, f"less than {args.disk_file_mb * 1.1:.0f} MB free for the scratch file "
                                   "(lower --disk-file-mb)")
    points = 2 * len(blocks) * len(args.disk_depths)
    with tqdm(total=file_bytes + points, desc="disk", unit="B", unit_scale=True) as bar:
        block = disk_bench.measure(args.disk, file_bytes, blocks, args.disk_depths, sizes, args.repeats,
                                   progress=lambda msg, n: (bar.set_postfix_str(msg), bar.update(n or 1)))
    cal = {"name": args.name if args.name != "h200" else f"disk-{os.path.basename(os.path.abspath(args.disk))}",
           "disk": block}
    curve = DiskCurve.from_dict(cal, args.out)     # what --disk-calibration will read back
    with atomic_open(args.out) as fh:
        json.dump(cal, fh, indent=1)
        fh.write("\n")
    lat, bw = curve.points[curve.default]
    print(f"wrote {args.out}: {block['direct_method']} reads at {curve.default[1] // 1024} KiB x{curve.default[2]}: "
          f"{lat * 1e3:.3f} ms + {bw / 1e9:.2f} GB/s")
    return 0


def run(args: argparse.Namespace) -> int:
    from moesim.engine.calibration import to_cost_model
    from moesim.errors import UsageError
    from moesim.safe_write import atomic_open, refuse_overwrite

    if args.with_pieces and not args.add_to:
        raise UsageError("--with-pieces needs --add-to")
    refuse_overwrite([args.out, args.raw_out], args.force)
    if args.disk:
        if args.from_raw or args.add_to or args.cpu_only:
            raise UsageError("--disk measures the disk alone; it takes none of --from-raw, --add-to, --cpu-only")
        return run_disk(args)
    if args.cpu_only:
        if args.from_raw or args.add_to:
            raise UsageError("--cpu-only measures; it takes neither --from-raw nor --add-to")
        return run_cpu_only(args)
    if args.from_raw:
        from moesim.safe_write import read_json

        path = args.from_raw
        raw = read_json(path)
    else:
        import torch

        if not torch.cuda.is_available():
            raise UsageError("CUDA is not available here, and calibrate measures a CUDA GPU; "
                             "convert measurements taken elsewhere with --from-raw FILE")
        from moesim.engine.gpu_bench import measure

        raw = measure(args.quants.split(","), layers=args.layers)
        path = None
    if args.add_to:
        from moesim.engine.calibration import add_session
        from moesim.errors import UsageError
        from moesim.safe_write import read_json

        if not args.from_raw:
            raise UsageError("--add-to needs --from-raw")
        cal = add_session(read_json(args.add_to), raw, path, pieces=args.with_pieces)
        with atomic_open(args.out) as fh:
            json.dump(cal, fh, indent=1)
            fh.write("\n")
        ec = cal["pcie"].get("expert_copy") or {}
        print(f"wrote {args.out}: engine terms miss_issue {cal['engine']['miss_issue_s'] * 1e6:.1f} us, routing "
              f"hand-off {cal['engine']['routing_handoff_s'] * 1e6:.1f} us; copy interval "
              f"{ec.get('low_s', 0) * 1e3:.4f}-{ec.get('high_s', 0) * 1e3:.4f} ms over {len(ec.get('sessions', []))} sessions")
        return 0
    cal = to_cost_model(raw, args.name, path=path)
    if args.raw_out:
        with atomic_open(args.raw_out) as fh:
            json.dump(raw, fh, indent=1)
    with atomic_open(args.out) as fh:
        json.dump(cal, fh, indent=1)
        fh.write("\n")
    print(f"wrote {args.out}: {cal['pcie']['bandwidth_gbps']:.1f} GB/s, expert "
          f"{cal['expert_compute'][cal['quantization']][0][1] * 1e3:.3f} ms ({cal['quantization']}), "
          f"layer {cal['layer']['base_s'] * 1e3:.3f} ms")
    return 0
