"""The `parts` command: one subcommand per pipeline stage, each in its own module.

A subcommand module defines `add_parser(subparsers)` (which sets `func` on its parser).
User errors (`PartsError`) print as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
