"""Every shell command in README.md's code blocks runs, in order, in a fresh copy of the repository.

The copy holds only the repository's own files (tracked by git), so an example that needs a file no
earlier line creates -- or a file from outside the repository -- fails here. ``moesim``, ``python`` and
``python3`` run this interpreter on the copied package. The commands not run are few and listed below
with the reason; a README line of any other kind runs through ``bash`` as typed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SHIPPED_TRACE = REPO / "traces" / "synth-mixtral-8x7b.parquet"
COMMAND_TIMEOUT_S = 300
SCRATCH = "scratch"  # the examples' outputs go here; .gitignore covers it

# (pattern searched in the command, why it is not run). Keep this list tiny.
SKIPS: list[tuple[str, str]] = [
    (r"^(make|\.|source|pip)\s", "set-up: installs into .venv (CI runs `make test` itself)"),
    (r"--device\s+cuda", "needs a CUDA GPU"),
    (r"^moesim calibrate\b(?!.*--from-raw)", "measures a CUDA GPU"),
    (r"(benchmarks|studies/\w+)/gpu_", "GPU script"),
    (r"^python3? (benchmarks|studies|tools)/", "benchmark, study or tool script: run on demand (long, rewrites data)"),
    # files from outside the repository (the README says "if you have a vLLM routing log")
    (r"_vllm\.jsonl\b", "needs the user's vLLM routing log"),
    (r"(^|\s|/)real\.parquet\b", "needs the trace imported from the user's vLLM routing log"),
]
RUNNABLE_FIRST_WORDS = ("moesim", "python", "python3")


@dataclass
class Command:
    line: int   # README line number of the command's first line
    text: str

    def skip_reason(self) -> str | None:
        for pattern, why in SKIPS:
            if re.search(pattern, self.text):
                return why
        return None


def _shell_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of every shell code block: indented (4 spaces) blocks outside fences,
    and fenced blocks tagged sh/bash/shell/console or untagged. Fenced blocks in another language
    (```python) are code, not commands."""
    blocks: list[tuple[int, list[str]]] = []
    lines = text.splitlines()
    i = 0
    prev_blank = True
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", line)
        if fence:
            marker, lang = fence.group(1), fence.group(2).lower()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(marker):
                j += 1
            if lang in ("", "sh", "bash", "shell", "console"):
                blocks.append((i + 2, lines[i + 1:j]))
            i, prev_blank = j + 1, False
            continue
        if prev_blank and line.startswith("    ") and line.strip():
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            blocks.append((i + 1, [x[4:] for x in lines[i:j]]))
            i, prev_blank = j, True
            continue
        prev_blank = not line.strip()
        i += 1
    return blocks


def readme_commands(text: str) -> list[Command]:
    """Shell commands in order; a line ending in a backslash continues on the next."""
    out: list[Command] = []
    for start, block in _shell_blocks(text):
        pending: list[str] = []
        first = start
        for offset, raw in enumerate(block):
            line = raw.rstrip()
            if not pending:
                first = start + offset
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                line = re.sub(r"^\$\s+", "", line.strip())  # a "$ " prompt
            if line.endswith("\\"):
                pending.append(line[:-1].rstrip())
                continue
            pending.append(line.strip() if pending else line)
            out.append(Command(first, " ".join(p.strip() for p in pending)))
            pending = []
        if pending:
            out.append(Command(first, " ".join(p.strip() for p in pending)))
    return out


def _copy_repository(dest: Path) -> None:
    """The repository's tracked files (a fresh clone's), or the whole tree without git."""
    try:
        names = subprocess.run(["git", "ls-files", "-z", "--cached"], cwd=REPO, capture_output=True,
                               check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.pyc"),
                        dirs_exist_ok=True)
        return
    for name in filter(None, names):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _shims(bin_dir: Path) -> None:
    """``moesim``, ``python``, ``python3`` on PATH: this interpreter, as a user's installed ones."""
    bin_dir.mkdir()
    exe = sys.executable
    for name, body in (("moesim", f'exec "{exe}" -m moesim "$@"'), ("python", f'exec "{exe}" "$@"'),
                       ("python3", f'exec "{exe}" "$@"')):
        p = bin_dir / name
        p.write_text(f"#!/bin/sh\n{body}\n")
        p.chmod(0o755)


# ---- the parser, on hand-written READMEs ---------------------------------------------------------

def test_parser_finds_indented_and_fenced_shell_blocks_in_order():
    text = "\n".join([
        "# Title", "", "Prose with `moesim inline` that is not a command.", "",
        "    moesim info a.parquet        # a comment", "    moesim synth --tokens 5 \\", "        --seed 1 b.parquet",
        "", "    # only a comment", "", "```python", "import moesim", "```", "", "```bash",
        "$ python tool.py --x 1", "```", "", "- a list item", "    continued list text? no: after a non-blank line", "",
    ])
    cmds = readme_commands(text)
    assert [c.text for c in cmds] == ["moesim info a.parquet        # a comment",
                                      "moesim synth --tokens 5 --seed 1 b.parquet", "python tool.py --x 1"]
    assert [c.line for c in cmds] == [5, 6, 16]


def test_skip_rules():
    def why(text: str) -> str | None:
        return Command(1, text).skip_reason()

    assert why("moesim calibrate -o h.json --raw-out raw.json") and not why("moesim calibrate --from-raw r.json -o h.json")
    assert why("moesim record --model m --device cuda -o x.parquet") and why("python3 benchmarks/gpu_validate.py --out o")
    assert why("moesim validate real.parquet --engine e.json") and not why("moesim info unreal.parquet")
    assert why("make demo") and not why("moesim simulate t.parquet --policy lru --cache-size 4")


# ---- the README itself -----------------------------------------------------------------------------

def test_readme_uses_no_file_from_outside_the_repository_outside_the_skip_list():
    text = README.read_text(encoding="utf-8")
    assert "../shared" not in text and "CONTRACTS.md" not in text
    assert SHIPPED_TRACE.is_file()


def test_readme_is_short_and_quotes_no_measurement():
    """The README is a ten-minute guide: measured numbers live in the reports it links (studies/,
    benchmarks/results/), where they are rebuilt from data; a figure typed here would go stale."""
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    measured = re.findall(r"\d+(?:\.\d+)?\s*(?:%|x\b|tok/s|tokens/s|ms/token|M req|GB/s|us\b|µs)", text)
    assert not measured, f"README.md quotes measurements {measured}: link the report instead"


def test_shipped_trace_is_what_its_documented_command_makes(tmp_path):
    """traces/README.md's command regenerates the shipped trace (same rows, same metadata)."""
    from moesim.cli import main
    from moesim.traces.format import read_trace

    doc = (REPO / "traces" / "README.md").read_text(encoding="utf-8")
    m = re.search(r"^\s+moesim (synth .*traces/synth-mixtral-8x7b\.parquet)\s*$", doc, re.M)
    assert m, "traces/README.md must show the command that made synth-mixtral-8x7b.parquet"
    argv = m.group(1).replace("traces/synth-mixtral-8x7b.parquet", str(tmp_path / "t.parquet")).split()
    assert main(argv) == 0
    made, shipped = read_trace(tmp_path / "t.parquet"), read_trace(SHIPPED_TRACE)
    assert made.table.equals(shipped.table)
    assert made.meta == shipped.meta


def test_every_readme_command_runs_in_order(tmp_path):
    commands = readme_commands(README.read_text(encoding="utf-8"))
    work = tmp_path / "repo"
    work.mkdir()
    _copy_repository(work)
    tracked = {p for p in work.rglob("*") if p.is_file() or p.is_symlink()}
    _shims(tmp_path / "bin")
    env = dict(os.environ)
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(work)
    env["MPLBACKEND"] = "Agg"
    env.pop("MOESIM_DEBUG", None)
    ran, skipped = [], []
    for cmd in commands:
        why = cmd.skip_reason()
        if why:
            skipped.append((cmd, why))
            continue
        first = cmd.text.split()[0]
        assert first in RUNNABLE_FIRST_WORDS or shutil.which(first, path=env["PATH"]), \
            f"README.md:{cmd.line}: {first!r} is not a command this test can run: {cmd.text}"
        r = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd.text}"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        assert r.returncode == 0, (f"README.md:{cmd.line}: exit {r.returncode}: {cmd.text}\n"
                                   f"--- stderr ---\n{r.stderr[-3000:]}\n--- stdout ---\n{r.stdout[-1000:]}")
        ran.append(cmd)
    assert len(ran) >= 20, f"only {len(ran)} README commands ran (skipped: {[(c.text, w) for c, w in skipped]})"
    left = sorted(str(p.relative_to(work)) for p in _untracked_outputs(work, tracked))
    assert not left, f"README examples wrote outside {SCRATCH}/ (which .gitignore covers): {left[:20]}"


def _untracked_outputs(work: Path, tracked: set[Path]) -> list[Path]:
    """Files in the copy that the repository does not track, outside scratch/ and Python's caches."""
    return [p for p in work.rglob("*") if (p.is_file() or p.is_symlink()) and p not in tracked
            and p.relative_to(work).parts[0] != SCRATCH and "__pycache__" not in p.parts]


def test_scratch_folder_is_git_ignored_and_named_in_the_readme():
    ignored = (REPO / ".gitignore").read_text(encoding="utf-8").split()
    assert f"/{SCRATCH}/" in ignored or f"{SCRATCH}/" in ignored
    assert f"`{SCRATCH}/`" in README.read_text(encoding="utf-8")


def test_shipped_trace_hit_rate_table_is_what_mrc_measures():
    """The table in traces/README.md is `moesim mrc` on the shipped trace, to the printed digits."""
    from moesim.simulator.replay import mrc
    from moesim.traces.format import read_trace

    doc = (REPO / "traces" / "README.md").read_text(encoding="utf-8")
    header = re.search(r"^\| K \|((?: \d+ \|)+)\s*$", doc, re.M)
    assert header, "traces/README.md lost its hit-rate table"
    sizes = [int(x) for x in header.group(1).split("|") if x.strip()]
    rows = {p: c for p, c in re.findall(r"^\| (\w+) +\|((?: [\d.]+ \|)+)\s*$", doc, re.M) if p != "K"}
    assert set(rows) >= {"lru", "lfu", "fifo", "opt"}
    trace = read_trace(SHIPPED_TRACE)
    for policy, cells in rows.items():
        printed = [x.strip() for x in cells.split("|") if x.strip()]
        measured = [f"{c['hit_rate']:.4f}" for c in mrc(trace, policy, sizes).curve]
        assert printed == measured, policy
