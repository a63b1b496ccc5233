"""What a sweep is: a grid of cells, each a job keyed by a stable hash of everything that decides its
result (the trace's CONTENT hash, never its path, so moving or renaming a trace keeps old results)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from moesim.errors import DataError, SettingError, UsageError

# Bump when the meaning of a cell's result changes, so results computed under the old meaning are not
# reused by a resumed sweep. 2: ``hit_rate`` of a timed cell is the exact replay's (was the timing run's,
# now ``timing_hit_rate``), as in ``simulate --json``.
SWEEP_VERSION = 2
NO_PREFETCH = "none"
NO_HARDWARE = "none"
# no execution policy named: every miss copied, as ``simulate`` without ``--execution`` (no ``executed`` key)
NO_EXECUTION = "none"


@dataclass(frozen=True)
class Cell:
    """One point of the grid. ``hardware == "none"``: a hit-rate replay (``simulate``); otherwise a
    timing simulation (``simulate_timing``) with that hardware preset."""

    trace: str
    trace_sha256: str
    policy: str
    cache_size: int
    params: str = "{}"  # canonical JSON of the policy's parameters
    scope: str = "layer"
    semantics: str = "atomic"
    prefetch: str = NO_PREFETCH
    prefetch_budget: int = 0
    hardware: str = NO_HARDWARE
    batch_size: int = 1
    execution: str = NO_EXECUTION   # who serves each miss (``simulate --execution``'s spelling)
    vs_bound: bool = False          # also the offline bound's keys (``simulate --vs-bound``)

    @property
    def key(self) -> str:
        """Stable id: hash of every input but the trace path (the content hash stands for it). Inputs at
        their defaults that older sweeps did not have are left out, so those tables' cells keep their ids."""
        ident = {k: v for k, v in asdict(self).items() if k != "trace"}
        for name, default in (("execution", NO_EXECUTION), ("vs_bound", False)):
            if ident[name] == default:
                del ident[name]
        ident["sweep_version"] = SWEEP_VERSION
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]

    @property
    def policy_params(self) -> dict[str, Any]:
        return json.loads(self.params)

    def to_row(self) -> dict[str, Any]:
        return {"cell_id": self.key, **asdict(self)}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Cell:
        """The cell of a results row; a column a table written by an older sweep lacks takes its default."""
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})


INPUT_COLUMNS = ("cell_id", *(f.name for f in fields(Cell)))


@dataclass
class SweepSpec:
    """The axes of a sweep. Every combination is a cell; ``params`` maps a policy name to its
    parameter axes (``{"lfu-decay": {"half_life": [100, 1000]}}``), which apply to that policy only."""

    traces: list[str]
    policies: list[str]
    cache_sizes: list[int]
    params: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    scopes: list[str] = field(default_factory=lambda: ["layer"])
    semantics: list[str] = field(default_factory=lambda: ["atomic"])
    prefetch: list[str] = field(default_factory=lambda: [NO_PREFETCH])
    prefetch_budgets: list[int] = field(default_factory=lambda: [1])
    hardware: list[str] = field(default_factory=lambda: [NO_HARDWARE])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    executions: list[str] = field(default_factory=lambda: [NO_EXECUTION])
    vs_bound: bool = False   # every cell also measured against the offline bound (docs/bound.md)


_LIST_KEYS = {f.name for f in fields(SweepSpec)} - {"params", "vs_bound"}
_INT_KEYS = {"cache_sizes", "prefetch_budgets", "batch_sizes"}


def _as_list(value: Any, key: str, where: str) -> list[Any]:
    if isinstance(value, str) and key in _INT_KEYS and ".." in value:
        lo, _, hi = value.partition("..")
        try:
            lo_i, hi_i = int(lo), int(hi)
        except ValueError:
            raise UsageError(f"{where}: {key} range {value!r} is not LO..HI") from None
        if lo_i > hi_i:
            raise UsageError(f"{where}: {key} range {value!r} is reversed (did you mean {hi_i}..{lo_i}?)")
        return list(range(lo_i, hi_i + 1))
    items = value if isinstance(value, list) else [value]
    if key in _INT_KEYS:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            raise UsageError(f"{where}: {key} must be integers, got {value!r}")
    elif not all(isinstance(v, str) for v in items):
        raise UsageError(f"{where}: {key} must be strings, got {value!r}")
    if not items:
        raise UsageError(f"{where}: {key} is empty")
    return list(items)


def load_config(path: str | os.PathLike) -> SweepSpec:
    """Read a TOML sweep config. Trace paths are relative to the config file's folder."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise DataError(p, "no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DataError(p, f"not a valid TOML file ({exc})") from None
    unknown = set(raw) - _LIST_KEYS - {"params", "vs_bound"}
    if unknown:
        known = ", ".join(sorted(_LIST_KEYS | {"params", "vs_bound"}))
        raise DataError(p, f"unknown key {sorted(unknown)[0]!r} (known: {known})")
    if not isinstance(raw.get("vs_bound", False), bool):
        raise DataError(p, f"vs_bound must be true or false, got {raw['vs_bound']!r}")
    values: dict[str, Any] = {}
    for key in _LIST_KEYS & set(raw):
        try:
            values[key] = _as_list(raw[key], key, str(p))
        except UsageError as exc:
            raise DataError(p, str(exc).split(": ", 1)[1]) from None
    for key in ("traces", "policies", "cache_sizes"):
        if key not in values:
            raise DataError(p, f"missing required key {key!r}")
    values["traces"] = [str(t) if Path(t).is_absolute() else str(p.parent / t) for t in values["traces"]]
    values["vs_bound"] = raw.get("vs_bound", False)
    if "executions" in values:   # a pinned set's file, like a trace, is relative to the config's folder
        values["executions"] = [_relative_pinned(x, p.parent) for x in values["executions"]]
    params = raw.get("params", {})
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise DataError(p, "[params] must hold one table per policy, e.g. [params.lfu-decay] half_life = [100, 1000]")
    values["params"] = {pol: {k: v if isinstance(v, list) else [v] for k, v in axes.items()} for pol, axes in params.items()}
    return SweepSpec(**values)


def _relative_pinned(execution: str, folder: Path) -> str:
    name, sep, value = execution.partition("=")
    if name != "pinned" or not sep or Path(value).is_absolute():
        return execution
    return f"pinned={folder / value}"


def trace_sha256(path: str | os.PathLike) -> str:
    """Content hash of a trace file (or of a directory of part files: names and bytes, in name order)."""
    p = Path(path)
    if not p.exists():
        from moesim.traces.format import missing_trace

        raise missing_trace(p)
    files = sorted(f for f in p.iterdir() if f.suffix == ".parquet") if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        if p.is_dir():
            h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _param_grid(axes: dict[str, list[Any]]) -> list[str]:
    if not axes:
        return ["{}"]
    names = sorted(axes)
    return [json.dumps(dict(zip(names, combo, strict=True)), sort_keys=True)
            for combo in itertools.product(*(axes[n] for n in names))]


def _validate(spec: SweepSpec, metas: dict[str, Any]) -> None:
    from moesim.policies.execution import parse_execution
    from moesim.policies.resolve import eviction_factory
    from moesim.simulator.replay import SCOPES, SEMANTICS

    for name in spec.policies:
        for params in _param_grid(spec.params.get(name, {})):
            eviction_factory(name, json.loads(params))   # the replay's own check of name and parameters
    stray = set(spec.params) - set(spec.policies)
    if stray:
        raise UsageError(f"parameters given for policy {sorted(stray)[0]!r}, which is not in the sweep")
    for s in spec.scopes:
        if s not in SCOPES:
            raise UsageError(f"unknown scope {s!r} (known: {', '.join(SCOPES)})")
    for s in spec.semantics:
        if s not in SEMANTICS:
            raise UsageError(f"unknown semantics {s!r} (known: {', '.join(SEMANTICS)})")
    for path, meta in metas.items():
        small = [k for k in spec.cache_sizes if k < meta.top_k]
        if small:
            raise UsageError(f"cache size {small[0]} is smaller than top-k ({meta.top_k}) of {path}")
    if any(b < 0 for b in spec.prefetch_budgets) or any(b < 1 for b in spec.batch_sizes):
        raise UsageError("prefetch budgets must be >= 0 and batch sizes >= 1")
    timed = [h for h in spec.hardware if h != NO_HARDWARE]
    if any(p != NO_PREFETCH for p in spec.prefetch) and not timed:
        raise SettingError("hardware", "prefetchers need a timing model: name a hardware preset (prefetch has no "
                           "effect on hit-rate replay)", fix="NAME")
    if any(x != NO_EXECUTION for x in spec.executions) and not timed:
        raise SettingError("hardware", "execution policies need a timing model: name a hardware preset (who "
                           "serves a miss does not change the hit-rate replay)", fix="NAME")
    if spec.vs_bound and (set(spec.scopes) - {"layer"} or set(spec.semantics) - {"atomic"} or set(spec.batch_sizes) - {1}):
        raise SettingError("vs_bound", "the bound is for per-layer caches, atomic sets and batch 1: sweep other "
                                       "scopes, semantics or batch sizes without it")
    for execution in set(spec.executions) - {NO_EXECUTION}:
        parse_execution(execution)   # the timing model's own check of the spelling (and a pinned set's file)
    if timed:
        _validate_hardware(timed, spec.prefetch)
        if set(spec.scopes) - {"layer"} or set(spec.semantics) - {"atomic"}:
            raise SettingError("hardware", "the timing model simulates one cache per layer with atomic sets: sweep "
                               "other scopes / semantics without it", fix="none")


def _validate_hardware(names: Iterable[str], prefetchers: Iterable[str]) -> None:
    from moesim.policies.prefetch import prefetcher_names
    from moesim.simulator.cost_model import CostModel

    for name in names:
        CostModel.preset(name)  # UsageError naming the known presets
    known = prefetcher_names()
    for name in prefetchers:
        if name not in known:
            raise UsageError(f"unknown prefetcher {name!r} (known: {', '.join(known)})")


def expand(spec: SweepSpec, hashes: dict[str, str] | None = None) -> list[Cell]:
    """Every cell of the grid, validated, in a stable order, without duplicates.

    A hit-rate cell (no hardware) ignores prefetchers, budgets, batch size and execution, so those axes
    collapse for it; a cell without a prefetcher ignores the budget (stored as 0).
    """
    from moesim.simulator.replay import clamp_cache_size
    from moesim.traces.format import read_meta

    metas = {t: read_meta(t) for t in spec.traces}
    _validate(spec, metas)
    hashes = dict(hashes or {})
    for t in spec.traces:
        if t not in hashes:
            hashes[t] = trace_sha256(t)
    cells: dict[str, Cell] = {}
    for trace, hw, pf, budget, bs, ex, scope, sem, policy in itertools.product(
            spec.traces, spec.hardware, spec.prefetch, spec.prefetch_budgets, spec.batch_sizes, spec.executions,
            spec.scopes, spec.semantics, spec.policies):
        if hw == NO_HARDWARE:
            pf, budget, bs, ex = NO_PREFETCH, 0, 1, NO_EXECUTION
        elif pf == NO_PREFETCH:
            budget = 0
        for params in _param_grid(spec.params.get(policy, {})):
            for k in spec.cache_sizes:  # sizes past everything resident are one cell (`moesim sweep` says so)
                k = clamp_cache_size(k, metas[trace], scope)
                cell = Cell(trace, hashes[trace], policy, k, params, scope, sem, pf, int(budget), hw, int(bs), ex,
                            spec.vs_bound)
                cells.setdefault(cell.key, cell)
    return list(cells.values())


def split_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def spec_from_lists(base: SweepSpec | None, lists: dict[str, Sequence[Any] | None],
                    params: dict[str, dict[str, list[Any]]] | None) -> SweepSpec:
    """Overlay command-line axes (``None`` = not given) on a config's spec (or on the defaults)."""
    values = asdict(base) if base is not None else {}
    for key, val in lists.items():
        if val is not None:
            values[key] = list(val)
    if params:
        merged = dict(values.get("params", {}))
        for pol, axes in params.items():
            merged[pol] = {**merged.get(pol, {}), **axes}
        values["params"] = merged
    missing = [k for k in ("traces", "policies", "cache_sizes") if not values.get(k)]
    if missing:
        what = missing[0].replace("_", " ")
        raise SettingError(missing[0], f"no {what} given: list them, or name a config file that does")
    return SweepSpec(**values)
