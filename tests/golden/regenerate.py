"""Golden outputs of the replay, the timing model, ``mrc`` and ``sweep`` (issue 22's guard).

    !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
    !!  REGENERATE ONLY FOR AN INTENDED CHANGE OF BEHAVIOUR.                                      !!
    !!  A refactor (kernels by family, one cell runner, moved modules) must leave every byte of   !!
    !!  these files as it is: if tests/test_golden_outputs.py fails after a refactor, the refactor !!
    !!  is wrong, not the golden file. When a change is MEANT to alter a number, regenerate, read  !!
    !!  the diff line by line, and say in the commit message which cases changed and why.         !!
    !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!

    PYTHONPATH=. python tests/golden/regenerate.py            # rewrite tests/golden/*.jsonl
    PYTHONPATH=. python tests/golden/regenerate.py --reslice  # also re-cut trace.parquet (rarely)

The first files were generated from main at bd85472. The input is ``trace.parquet``: sequences 0, 2 and 3
of ``traces/synth-mixtral-8x7b.parquet`` (120 decode tokens x 32 layers, top-2 of 8), committed so that
the goldens do not depend on the synthesiser or on how a Parquet writer lays out bytes.

Each case runs ``moesim.cli.main(argv)`` in this process and keeps its stdout as text. Only what is truly
nondeterministic is removed (``NONDETERMINISTIC_KEYS``): wall-clock seconds and throughput of the sweep
run, the sweep's run id / worker name, and the temporary paths of the trace and the results table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent
REPO = GOLDEN.parents[1]
TRACE = GOLDEN / "trace.parquet"
SOURCE_TRACE = REPO / "traces" / "synth-mixtral-8x7b.parquet"
SLICE_SEQUENCES = (0, 2, 3)

# Every built-in policy at bd85472 (`moesim policies`); the test checks this list against the registry.
POLICIES = ("arc", "fifo", "gate-weighted", "hobbit", "lfu", "lfu-cache", "lfu-decay", "lrfu", "lru", "opt",
            "random", "s3fifo", "sieve")
# Cache sizes valid for each scope, away from the trivial ends: a layer cache holds at most the 8 experts of
# its layer; a global cache is shared by 32 layers x 8 experts, and below ~64 slots (one token's 32 x 2
# requests) every request misses.
SIZES = {"layer": (3, 5), "global": (72, 160)}
SEMANTICS = ("atomic", "sequential")

# Sweep run facts that change from run to run (timing of this machine, run id, worker, temporary paths); the
# cell_id stays: it hashes every input but the path, and a changed id re-runs old results tables.
NONDETERMINISTIC_KEYS = ("elapsed_s", "cells_per_s", "run_id", "worker", "output", "trace")


@dataclass(frozen=True)
class Case:
    """One command line; ``{trace}`` and ``{out}`` are filled in when it runs."""

    name: str
    argv: tuple[str, ...]


def simulate_cases() -> list[Case]:
    cases = []
    for policy in POLICIES:
        for scope, sizes in SIZES.items():
            for semantics in SEMANTICS:
                for k in sizes:
                    cases.append(Case(f"{policy}-{scope}-{semantics}-k{k}", (
                        "simulate", "{trace}", "--policy", policy, "--cache-size", str(k), "--scope", scope,
                        "--semantics", semantics, "--json")))
    cases.append(Case("lru-layer-atomic-k3-per-layer", (
        "simulate", "{trace}", "--policy", "lru", "--cache-size", "3", "--per-layer", "--json")))
    cases.append(Case("lfu-decay-half-life-8-k4", (
        "simulate", "{trace}", "--policy", "lfu-decay", "--param", "half_life=8", "--cache-size", "4", "--json")))
    cases.append(Case("random-seed-7-k4", (
        "simulate", "{trace}", "--policy", "random", "--seed", "7", "--cache-size", "4", "--json")))
    return cases


def _timed(name: str, policy: str, k: int, *extra: str) -> Case:
    return Case(name, ("simulate", "{trace}", "--policy", policy, "--cache-size", str(k), "--hardware", "h200",
                       *extra, "--json"))


def timing_cases() -> list[Case]:
    return [
        _timed("h200-lru-k4", "lru", 4),
        _timed("h200-lru-k4-transition", "lru", 4, "--prefetch", "transition"),
        _timed("h200-lfu-k3", "lfu", 3),
        _timed("h200-lfu-k3-previous-token", "lfu", 3, "--prefetch", "previous-token"),
        _timed("h200-opt-k4-oracle-budget1", "opt", 4, "--prefetch", "oracle", "--prefetch-budget", "1"),
        _timed("h200-fifo-k5", "fifo", 5),
        _timed("h200-s3fifo-k5-batch4", "s3fifo", 5, "--batch-size", "4"),
        _timed("h200-lru-k4-batch4-transition", "lru", 4, "--batch-size", "4", "--prefetch", "transition"),
        _timed("h200-hobbit-k4-gate", "hobbit", 4, "--engine-mode", "gate"),
        _timed("h200-lru-k3-hqq4", "lru", 3, "--quantization", "hqq4"),
        _timed("h200-lru-k3-mixtral-offloading", "lru", 3, "--engine-profile", "mixtral-offloading"),
        _timed("h200-lru-k4-distance2", "lru", 4, "--prefetch", "previous-token", "--prefetch-distance", "2"),
        Case("a6000-sieve-k4-transition", ("simulate", "{trace}", "--policy", "sieve", "--cache-size", "4",
                                           "--hardware", "a6000", "--prefetch", "transition", "--json")),
    ]


def mrc_cases() -> list[Case]:
    cases = [Case(f"mrc-{p}", ("mrc", "{trace}", "--policy", p, "--json"))
             for p in ("lru", "fifo", "lfu", "opt", "arc", "s3fifo", "random", "hobbit")]
    cases.append(Case("mrc-lru-global", ("mrc", "{trace}", "--policy", "lru", "--scope", "global",
                                         "--sizes", "8,24,64,128", "--json")))
    cases.append(Case("mrc-lru-sequential", ("mrc", "{trace}", "--policy", "lru", "--semantics", "sequential",
                                             "--json")))
    return cases


def sweep_cases() -> list[Case]:
    return [Case("sweep-small", (
        "sweep", "--trace", "{trace}", "--policy", "lru,sieve,lfu", "--cache-size", "3,4",
        "--hardware", "none,h200", "--executor", "inprocess", "--no-progress", "--json", "-o", "{out}"))]


GROUPS: dict[str, Callable[[], list[Case]]] = {
    "simulate": simulate_cases, "timing": timing_cases, "mrc": mrc_cases, "sweep": sweep_cases}


def _without_nondeterministic(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in NONDETERMINISTIC_KEYS}


def run_case(case: Case, workdir: Path, trace: Path = TRACE) -> str:
    """The case's output text: stdout as printed (a sweep: its report, then its table sorted by cell)."""
    from moesim.cli import main

    out = workdir / f"{case.name}.parquet"
    argv = [a.replace("{trace}", str(trace)).replace("{out}", str(out)) for a in case.argv]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    if code != 0:
        raise RuntimeError(f"{case.name}: moesim {' '.join(argv)} exited {code}: {stderr.getvalue().strip()}")
    if case.argv[0] != "sweep":
        return stdout.getvalue()
    import polars as pl

    report = _without_nondeterministic(json.loads(stdout.getvalue()))
    table = pl.read_parquet(out).sort(["policy", "cache_size", "hardware"])
    rows = [json.dumps(_without_nondeterministic(row)) for row in table.to_dicts()]
    return "\n".join([json.dumps(report), json.dumps(table.columns), *rows]) + "\n"


def golden_path(group: str) -> Path:
    return GOLDEN / f"{group}.jsonl"


def read_golden(group: str) -> dict[str, dict]:
    """{case name: {"argv": [...], "stdout": "..."}} from one group's file."""
    lines = golden_path(group).read_text().splitlines()
    return {rec["case"]: rec for rec in map(json.loads, lines)}


def _reslice() -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(SOURCE_TRACE)
    keep = pc.is_in(table["seq"], value_set=pa.array(SLICE_SEQUENCES, type=table["seq"].type))
    pq.write_table(table.filter(keep), TRACE, compression="zstd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reslice", action="store_true", help="re-cut trace.parquet from the synthetic trace")
    parser.add_argument("--group", choices=sorted(GROUPS), action="append", help="only these groups")
    args = parser.parse_args()
    if args.reslice or not TRACE.exists():
        _reslice()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MOESIM_CACHE_DIR"] = str(Path(tmp) / "stream-cache")
        for group in args.group or sorted(GROUPS):
            cases = GROUPS[group]()
            lines = []
            for i, case in enumerate(cases, 1):
                print(f"\r{group}: {i}/{len(cases)} {case.name:<50}", end="", file=sys.stderr, flush=True)
                text = run_case(case, Path(tmp))
                lines.append(json.dumps({"case": case.name, "argv": list(case.argv), "stdout": text}))
            golden_path(group).write_text("\n".join(lines) + "\n")
            print(f"\rwrote {golden_path(group)} ({len(cases)} cases){' ' * 40}", file=sys.stderr)


if __name__ == "__main__":
    main()
