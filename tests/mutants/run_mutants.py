"""``make mutants``: apply each hand-written mutation of tests/mutants/mutants.toml, one at a time, to a
temporary copy of the repository (never the working tree), run the tests named for it, and print a table
of which mutants the tests killed and which survived.

    python tests/mutants/run_mutants.py                 # every mutant
    python tests/mutants/run_mutants.py --only NAME ... # some of them
    python tests/mutants/run_mutants.py --list          # the list, with whether each site is found

A mutant whose ``old`` text is not in its file (the code moved) or is there more than once is an ERROR,
never a pass. The unmutated copy runs every named test first: a failing baseline would make every mutant
look killed, so it stops the run. Exit status: 0 when every mutant was killed, 1 otherwise, 2 on a bad
mutant list. Runs outside CI (minutes: numba recompiles each mutated kernel).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIST = Path(__file__).resolve().parent / "mutants.toml"
KEYS = ("name", "file", "old", "new", "tests", "why")


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str


@dataclass(frozen=True)
class Outcome:
    mutant: Mutant
    status: str      # killed | SURVIVED | ERROR
    detail: str      # the first failing test, or what went wrong
    seconds: float


def load_mutants(path: Path = LIST) -> list[Mutant]:
    """The list, checked: every key present, names unique, old != new. A bad list exits 2."""
    try:
        entries = tomllib.loads(path.read_text())["mutant"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        sys.exit(f"run_mutants: error: {path}: {exc}")
    mutants, seen = [], set()
    for i, entry in enumerate(entries, 1):
        missing = [k for k in KEYS if k not in entry]
        if missing or entry.get("old") == entry.get("new") or entry.get("name") in seen:
            print(f"run_mutants: error: {path}: mutant #{i} ({entry.get('name', '?')}): missing {missing}, "
                  "a duplicate name, or old == new", file=sys.stderr)
            sys.exit(2)
        seen.add(entry["name"])
        mutants.append(Mutant(entry["name"], entry["file"], entry["old"], entry["new"], tuple(entry["tests"]),
                              entry["why"]))
    return mutants


def copy_repository(dest: Path) -> None:
    """The working tree's files as git sees them (tracked, and untracked ones it does not ignore)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    shared = REPO.parent / "shared"   # the real trace the fixtures look for beside the repository
    if shared.is_dir():
        (dest.parent / "shared").symlink_to(shared)


def site_count(root: Path, m: Mutant) -> int:
    path = root / m.file
    return path.read_text().count(m.old) if path.is_file() else 0


def run_tests(root: Path, args: tuple[str, ...] | list[str], timeout: float,
              numba_cache: str = "numba-cache") -> tuple[int | None, str]:
    """pytest in the copy (stop at the first failure); (exit status or None on timeout, its output)."""
    env = {**os.environ, "PYTHONPATH": str(root), "MOESIM_CACHE_DIR": str(root.parent / "stream-cache"),
           "NUMBA_CACHE_DIR": str(root.parent / numba_cache)}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", *args]
    try:
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, ""
    return done.returncode, done.stdout + done.stderr


def first_failure(output: str) -> str:
    found = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    return found.group(1) if found else (output.strip().splitlines() or ["?"])[-1][:80]


def try_mutant(root: Path, m: Mutant, timeout: float) -> Outcome:
    t0 = time.perf_counter()
    n = site_count(root, m)
    if n != 1:
        detail = "mutation site not found" if n == 0 else f"mutation site ambiguous ({n} matches)"
        return Outcome(m, "ERROR", f"{detail} in {m.file}", 0.0)
    path = root / m.file
    original = path.read_text()
    path.write_text(original.replace(m.old, m.new, 1))
    # a numba cache of its own: numba checks a cached function against its own file only, so a kernel that
    # inlines the mutated helper from another module (every policy inlines loop.request_loop) would
    # otherwise load its unmutated machine code from the baseline's cache
    cache = f"numba-cache-{m.name}"
    try:
        code, output = run_tests(root, m.tests, timeout, cache)
    finally:
        path.write_text(original)
        shutil.rmtree(root.parent / cache, ignore_errors=True)
    seconds = time.perf_counter() - t0
    if code is None:
        return Outcome(m, "killed", f"timeout after {timeout:.0f} s", seconds)
    if code == 0:
        return Outcome(m, "SURVIVED", "every test passed", seconds)
    if code in (4, 5):   # usage error / no tests collected: the entry's test arguments are wrong
        return Outcome(m, "ERROR", f"pytest exit {code}: {first_failure(output)}", seconds)
    if code < 0:   # the mutant crashed the interpreter (a compiled kernel reading out of bounds, say)
        return Outcome(m, "killed", f"crashed (signal {-code})", seconds)
    return Outcome(m, "killed", first_failure(output) if code == 1 else f"pytest exit {code}", seconds)


def print_table(outcomes: list[Outcome]) -> None:
    rows = [("mutant", "file", "result", "by / why", "s")]
    rows += [(o.mutant.name, o.mutant.file.removeprefix("moesim/"), o.status, o.detail, f"{o.seconds:.0f}")
             for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for i, row in enumerate(rows):
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    counts = {s: sum(o.status == s for o in outcomes) for s in ("killed", "SURVIVED", "ERROR")}
    print(f"\n{counts['killed']} killed, {counts['SURVIVED']} survived, {counts['ERROR']} errors "
          f"of {len(outcomes)} mutants")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and whether each site is found")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant's tests (default 900)")
    args = parser.parse_args()
    mutants = load_mutants()
    if args.only:
        unknown = set(args.only) - {m.name for m in mutants}
        if unknown:
            print(f"run_mutants: error: unknown mutant(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        mutants = [m for m in mutants if m.name in args.only]
    if args.list:
        for m in mutants:
            n = site_count(REPO, m)
            print(f"{m.name:<40} {m.file:<40} {'ok' if n == 1 else 'NOT FOUND' if n == 0 else f'{n} SITES'}  {m.why}")
        return 0
    with tempfile.TemporaryDirectory(prefix="moesim-mutants-") as tmp:
        root = Path(tmp) / "repo"
        copy_repository(root)
        print(f"baseline: the unmutated copy runs every listed test ({root})", file=sys.stderr, flush=True)
        suites = list(dict.fromkeys(m.tests for m in mutants))
        for suite in suites:
            code, output = run_tests(root, suite, args.timeout)
            if code != 0:
                print(f"run_mutants: error: the unmutated copy fails {' '.join(suite)}: {first_failure(output)}",
                      file=sys.stderr)
                return 1
        outcomes = []
        for i, m in enumerate(mutants, 1):
            print(f"[{i}/{len(mutants)}] {m.name} ...", end="", file=sys.stderr, flush=True)
            outcome = try_mutant(root, m, args.timeout)
            print(f" {outcome.status} ({outcome.seconds:.0f} s)", file=sys.stderr, flush=True)
            outcomes.append(outcome)
    print_table(outcomes)
    return 0 if all(o.status == "killed" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
