"""On-disk cache of request streams: a second replay of the same trace file skips reading, validating and
flattening its rows.

Building the request stream of a large trace (Parquet decode, row checks, the flattening pass) costs
more than a compiled replay of it; a sweep, an mrc or the next ``moesim simulate`` of the same file
builds the very same arrays again. So the arrays are kept in the user's cache directory
(``$MOESIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/moesim``, else ``~/.cache/moesim``; never beside the
trace), one file per (trace file contents, scope, semantics), keyed by

- the trace files' identity (:func:`moesim.traces.format.file_identity`: resolved path, size,
  modification time in ns, inode and the Parquet footer),
- the trace's metadata (layers, experts, top-k),
- the source of the code that builds streams (this module, the replay, its kernels, the trace reader):
  a moesim that builds streams differently never reads an older entry.

An entry is written only after the file's rows were read and validated, through a temp file renamed
into place (concurrent writers each rename a complete file; a reader sees one or the other). On load
its header, size, end marker and a checksum of every array are checked: a truncated, corrupt or
foreign entry is deleted and the stream rebuilt. ``MOESIM_NO_CACHE=1`` (or ``--no-cache``) turns the
cache off.

The directory is bounded: after a write, the least recently used entries (a hit marks its entry used)
are removed until the entries take at most ``$MOESIM_CACHE_MAX_GB`` GiB (default 16; the entry just
written is always kept, whatever its size).

The arrays are stored as the replay's int64 arrays and memory-mapped (private, copy-on-write: the
kernels see ordinary writable arrays): a fresh process then maps pages of the page cache instead of
faulting in new zeroed memory, which cost more than the replay itself (measured, 9.6M rows: widening
narrow arrays from the file 0.45 s in a fresh process; mapping and checking the int64 ones 0.03 s).
An entry takes 8 bytes per stream value: 40 bytes per (token, layer) row of a top-2 trace.
"""

from __future__ import annotations

import functools
import hashlib
import json
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

from moesim.errors import UsageError

ENV_DIR = "MOESIM_CACHE_DIR"
ENV_OFF = "MOESIM_NO_CACHE"
ENV_MAX = "MOESIM_CACHE_MAX_GB"
DEFAULT_MAX_GB = 16.0
FORMAT = 1
MAGIC = b"MOESIMRS"
END = b"MOESIMRE"
ALIGN = 64
# the code that decides what a stream holds: an entry written by other code is never read
_BUILDERS = ("simulator/stream_cache.py", "simulator/replay.py", "simulator/kernels.py", "traces/format.py")
_STALE_TEMP_S = 3600.0  # temp files of writers that died are removed after this long


def enabled() -> bool:
    """Whether the cache is on: ``$MOESIM_NO_CACHE`` unset, empty or 0."""
    return os.environ.get(ENV_OFF, "").strip().lower() in ("", "0", "false", "no")


def max_bytes() -> int:
    """The entries' size bound: ``$MOESIM_CACHE_MAX_GB`` GiB (a number >= 0; unset or empty: 16)."""
    raw = os.environ.get(ENV_MAX, "").strip()
    if not raw:
        return int(DEFAULT_MAX_GB * 2**30)
    try:
        gb = float(raw)
    except ValueError:
        gb = -1.0
    if not gb >= 0.0 or gb == float("inf"):
        raise UsageError(f"${ENV_MAX} must be a number of GiB >= 0, not {raw!r}")
    return int(gb * 2**30)


def cache_root() -> Path:
    """``$MOESIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/moesim``, else ``~/.cache/moesim``."""
    env = os.environ.get(ENV_DIR, "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "moesim"


@functools.cache
def _code_digest() -> str:
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(f"{FORMAT} {sys.byteorder} {np.__version__}".encode())
    for rel in _BUILDERS:
        h.update((root / rel).read_bytes())
    return h.hexdigest()


def entry_path(trace_path: str, source: str, meta_json: str, scope: str, semantics: str) -> Path:
    """Where the stream of ``(source, scope, semantics)`` lives. The name starts with a digest of the
    trace's path, scope and semantics, so that writing a new entry removes the stale ones of the same
    file (an older version of it, or an older moesim)."""
    where = hashlib.sha256(repr((str(Path(trace_path).resolve()), scope, semantics)).encode()).hexdigest()[:16]
    what = hashlib.sha256(repr((_code_digest(), source, meta_json, scope, semantics)).encode()).hexdigest()[:32]
    return cache_root() / "streams" / f"{where}-{what}.stream"


@njit(cache=True, nogil=True)
def _fletcher(words: np.ndarray) -> tuple[int, int]:
    """Fletcher-style sums of 64-bit words (wrapping): any changed word, and any two swapped, change
    them."""
    s1 = 0
    s2 = 0
    for i in range(words.shape[0]):
        s1 += words[i]
        s2 += s1
    return s1, s2


def _padded(n_bytes: int) -> int:
    return -(-n_bytes // ALIGN) * ALIGN


def store(path: Path, arrays: dict[str, np.ndarray], info: dict[str, Any]) -> bool:
    """Write an entry of int64 arrays (best effort: a full disk or a read-only cache directory only
    costs the next run its rebuild). Returns whether it was written."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        flat = {name: np.ascontiguousarray(a, dtype=np.int64) for name, a in arrays.items()}
        specs, offset = [], 0
        for name, a in flat.items():
            specs.append({"name": name, "shape": list(a.shape), "offset": offset,
                          "sum": [int(x) for x in _fletcher(a.reshape(-1))]})
            offset += _padded(a.nbytes)
        header = json.dumps({"format": FORMAT, "name": path.name, "info": info, "arrays": specs,
                             "body": offset}).encode()
        head = MAGIC + len(header).to_bytes(8, "little") + header
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(head + bytes(_padded(len(head)) - len(head)))
            for a in flat.values():
                fh.write(a.reshape(-1).data)
                fh.write(bytes(_padded(a.nbytes) - a.nbytes))
            fh.write(END)
        os.replace(tmp, path)
        tmp = None
        _remove_stale(path)
        _bound(path, max_bytes())
        return True
    except OSError:
        return False
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _remove_stale(path: Path) -> None:
    """Other entries of the same trace path, scope and semantics (superseded), and old temp files."""
    where = path.name.split("-", 1)[0]
    now = time.time()
    for other in path.parent.iterdir():
        try:
            if other.name.startswith(f"{where}-") and other.suffix == ".stream" and other != path:
                other.unlink(missing_ok=True)
            elif other.suffix == ".partial" and now - other.stat().st_mtime > _STALE_TEMP_S:
                other.unlink(missing_ok=True)
        except OSError:
            pass


def _bound(keep: Path, limit: int) -> None:
    """Remove the least recently used entries (by modification time: a hit touches its entry) other than
    ``keep`` until all of them take at most ``limit`` bytes."""
    entries = []
    for other in keep.parent.glob("*.stream"):
        try:
            st = other.stat()
        except OSError:  # removed meanwhile (another writer's bound)
            continue
        entries.append((other == keep, st.st_mtime_ns, st.st_size, other))
    total = sum(size for _, _, size, _ in entries)
    for kept, _, size, other in sorted(entries):  # the oldest first, ``keep`` last
        if total <= limit or kept:
            break
        _discard(other)
        total -= size


class _Corrupt(Exception):
    pass


def _discard(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # not ours to remove after all (a cache directory that is not one): leave it
        pass


def load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The arrays (int64, mapped from the entry) and info of an entry, or None when there is none. A
    corrupt or foreign entry is deleted (and None returned: the caller rebuilds it)."""
    try:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size < len(MAGIC) + 8 + len(END):
                raise _Corrupt
            # private and writable, so numba types the arrays like built ones (no second compilation);
            # nothing writes them
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, _Corrupt):
        _discard(path)
        return None
    try:
        found = _parse(mm, path)
    except (_Corrupt, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
        _discard(path)
        return None
    try:
        os.utime(path)  # used now: the size bound removes the least recently used entries first
    except OSError:
        pass
    return found


def _parse(mm: mmap.mmap, path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    if mm[:len(MAGIC)] != MAGIC or mm[-len(END):] != END:
        raise _Corrupt
    n = int.from_bytes(mm[len(MAGIC):len(MAGIC) + 8], "little")
    header = json.loads(bytes(mm[len(MAGIC) + 8:len(MAGIC) + 8 + n]).decode())
    start = _padded(len(MAGIC) + 8 + n)
    body = int(header["body"])
    if header["format"] != FORMAT or header["name"] != path.name or start + body + len(END) != len(mm):
        raise _Corrupt
    out = {}
    for spec in header["arrays"]:
        shape = tuple(int(x) for x in spec["shape"])
        count = int(np.prod(shape))
        at = int(spec["offset"])
        if at < 0 or at + count * 8 > body or at % ALIGN:
            raise _Corrupt
        a = np.frombuffer(mm, np.int64, count, start + at)
        if [int(x) for x in _fletcher(a)] != spec["sum"]:
            raise _Corrupt
        out[spec["name"]] = a.reshape(shape)
    return out, header["info"]
