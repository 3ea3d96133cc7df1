"""The `parts` command: one subcommand per pipeline stage, each in its own module.

A subcommand module defines `add_parser(subparsers)` (which sets `func` on its parser).
User errors (`PartsError`) print as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from parts import __version__
from parts.cli import (
    analyze,
    checkpoints,
    control,
    decompose,
    effects,
    evaluate,
    figures,
    inspect,
    report,
    sweep,
    tables,
    transfer,
)
from parts.cli.common import check_device_option
from parts.errors import PartsError

COMMANDS = [decompose, sweep, evaluate, effects, analyze, inspect, figures, report, control, transfer, checkpoints,
            tables]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parts",
        description="Individual LLM components as classifiers: decompose, analyse, reweight, plot.",
    )
    parser.add_argument("--version", action="version", version=f"parts {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


PACKAGE = Path(__file__).resolve().parents[1]
_PLAIN_FORMAT = warnings.formatwarning


def one_line_warnings(command: str) -> None:
    """Show parts' own warnings as `parts COMMAND: warning: ...`, one line as its errors are (not a file
    name, a line number and the source line); other libraries' warnings keep their usual form."""

    def format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                       line: str | None = None) -> str:
        if Path(filename).resolve().is_relative_to(PACKAGE):
            return f"parts {command}: warning: {message}\n"
        return _PLAIN_FORMAT(message, category, filename, lineno, line)

    warnings.formatwarning = format_warning


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    one_line_warnings(args.command)
    try:
        check_device_option(args)  # every command that runs a model: a wrong --device is answered first
        return int(args.func(args) or 0)
    except PartsError as err:
        print(f"parts {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"parts {args.command}: interrupted; finished runs are saved, rerun to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
