"""File helpers: write-then-rename (a crash or an error never leaves a half-written file under the
final name) and reading JSON with one-line errors."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from moesim.errors import DataError, SettingError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_temp(final: Path) -> str:
    """An empty temp file beside ``final`` with the permissions a plain open() would give.

    A directory that cannot be written (read-only, no permission, full) is a DataError naming
    ``final``: the user typed that path, not the hidden temp name."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    except OSError as exc:
        raise cannot_write(final, exc) from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return tmp


def cannot_write(final: str | os.PathLike, exc: OSError) -> DataError:
    """The one-line error for an OSError met while writing ``final`` (or its temp file)."""
    why = exc.strerror or str(exc).strip().splitlines()[0] or type(exc).__name__
    return DataError(final, f"cannot write it ({why})")


@contextlib.contextmanager
def naming_final(final: str | os.PathLike, tmp: str | os.PathLike) -> Iterator[None]:
    """Re-raise an OSError about ``tmp`` (disk full, read-only remount, ...) as one naming ``final``."""
    try:
        yield
    except OSError as exc:
        if os.fspath(tmp) in (exc.filename, exc.filename2) or os.fspath(tmp) in str(exc):
            raise cannot_write(final, exc) from None
        raise


def refuse_overwrite(paths: Iterable[str | os.PathLike | None], force: bool) -> None:
    """Usage error (exit 2) naming the first of ``paths`` that already exists, unless ``force``.

    Commands call this before doing any work, so an existing file -- a committed report, a trace --
    is never replaced (nor an hour of computing wasted) unless the user passed ``--force``."""
    if force:
        return
    for path in paths:
        if path is not None and os.path.lexists(path):
            raise SettingError("force", f"{path}: already exists")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it over ``path``, on error delete it."""
    p = Path(path)
    if not p.parent.is_dir():
        raise DataError(p, f"output directory {str(p.parent)!r} does not exist")
    tmp = make_temp(p)
    try:
        with naming_final(p, tmp):
            yield Path(tmp)
            os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh


def read_json(path: str | os.PathLike, what: str = "valid JSON") -> object:
    """Parse a JSON file; a missing or unreadable file is one DataError line naming it."""
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "no such file")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(p, f"not {what} ({str(exc).splitlines()[0]})") from None
