"""Errors the command line turns into one line on stderr and an exit status (exit 1 bad data, 2 usage)."""

from __future__ import annotations


class MoesimError(Exception):
    """Base class; ``exit_code`` is what ``moesim`` exits with."""

    exit_code = 1


class DataError(MoesimError):
    """Bad data: missing, corrupt or truncated file, wrong schema, out-of-range ids (exit 1)."""

    exit_code = 1

    def __init__(self, path: object, problem: str, setting: str | None = None, fix: str | None = None) -> None:
        """``setting`` and ``fix``, when given, say which setting would read the data right and how, as
        :class:`SettingError`'s do (the command line adds its flag)."""
        self.path = str(path) if path is not None else None
        self.problem = problem
        self.setting = setting
        self.fix = fix
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class UsageError(MoesimError):
    """Bad invocation: unknown policy, cache smaller than top-k, bad flag value (exit 2)."""

    exit_code = 2


class SettingError(UsageError):
    """A setting of a run that cannot work, said in the library's own words ("per-layer budgets need a
    per-layer cache"). ``setting`` names the setting (a :class:`~moesim.simulator.cell.CellSpec` field
    such as ``"scope"``) and ``fix``, when there is one, the value that would work: the command line
    adds its own flag for them (``--scope layer``), so the library never names a flag (exit 2)."""

    def __init__(self, setting: str, problem: str, fix: str | None = None) -> None:
        self.setting = setting
        self.problem = problem
        self.fix = fix
        super().__init__(problem)


class SettingNote(str):
    """A one-line remark for the user (what was inferred rather than read) that, as a
    :class:`SettingError` does, may name the ``setting`` that would change it and its ``fix``: the command
    line adds its flag, so the library never names one."""

    setting: str | None
    fix: str | None

    def __new__(cls, text: str, setting: str | None = None, fix: str | None = None) -> SettingNote:
        note = super().__new__(cls, text)
        note.setting, note.fix = setting, fix
        return note


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal (Ctrl-C's SIGINT, or SIGTERM) once the work in flight finished;
    ``moesim`` exits with 128 + the signal number, as a shell reports a process a signal ended."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signum)
