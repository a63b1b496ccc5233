"""The ``moesim`` command. Each subcommand lives in its own module under ``moesim.commands`` and is
discovered at start-up, so adding one never touches this file.

Errors become one line on stderr and an exit status: 2 for usage, 1 for bad data.
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from moesim import __version__
from moesim.commands._common import error_line
from moesim.errors import MoesimError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is ONE line (and exit 2), as every moesim error is."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    import moesim.commands as pkg

    parser = _Parser(prog="moesim", description="MoE expert-offloading lab: traces, cache policies, simulation.")
    parser.add_argument("--version", action="version", version=f"moesim {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"moesim.commands.{info.name}")
        module.register(sub)
    for subparser in _all_subparsers(parser):
        # ``moesim COMMAND ... --debug`` as well as ``moesim --debug COMMAND ...`` (SUPPRESS: a subcommand
        # without the flag leaves the top level's value alone)
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                               help="show Python tracebacks on errors")
    return parser


def _subparser_actions(parser: argparse.ArgumentParser) -> list[argparse._SubParsersAction]:
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def _all_subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below ``parser`` (``plot`` and its kinds too), each once."""
    out: dict[int, argparse.ArgumentParser] = {}
    for action in _subparser_actions(parser):
        for child in action.choices.values():
            for p in (child, *_all_subparsers(child)):
                out.setdefault(id(p), p)
    return list(out.values())


def _innermost_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the subcommand the user typed (``moesim plot mrc``), so that its errors name it."""
    for action in _subparser_actions(parser):
        child = action.choices.get(getattr(args, action.dest, None) or "")
        if child is not None:
            return _innermost_parser(child, args)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # argparse would blame the top level ("moesim: error: ..."): name the subcommand instead
        _innermost_parser(parser, args).error(f"unrecognized arguments: {' '.join(extras)}")
    debug = bool(args.debug)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except MoesimError as exc:
        if debug:
            raise
        print(f"moesim {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print(f"moesim {args.command}: interrupted", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)  # 130 for Ctrl-C, 143 for SIGTERM
    except Exception as exc:
        # Anything that slipped past validation still gets one line, never a traceback.
        if debug:
            raise
        if not isinstance(exc, OSError | ValueError | KeyError):
            print(f"moesim {args.command}: internal error: {type(exc).__name__}: {exc} "
                  "(run with --debug for the traceback)", file=sys.stderr)
            return 1
        where = getattr(exc, "filename", None)
        msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"moesim {args.command}: error: {where + ': ' if where else ''}{msg}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
