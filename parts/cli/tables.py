"""`parts tables`: rebuild every table in docs/ and the result figures from the committed result files."""

from __future__ import annotations

import argparse
from typing import Any

from parts.cli.common import positive_int
from parts.errors import PartsError


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "tables",
        help="rebuild the docs' tables and the result figures from results/ (no model needed)",
        description=(
            "Rewrite every '<!-- parts-tables:NAME -->' block in the docs pages and the result figures from the "
            "committed result files (main.csv, transfer.csv, predictions.csv, runs.csv, components.txt). "
            "With --from-runs, first export those files from an output root of `parts evaluate` / "
            "`parts transfer` / `parts sweep`; with --only, some of them, the others kept as they are."
        ),
    )
    parser.add_argument("--results", default="results", help="folder of the result files (default results/)")
    parser.add_argument("--docs", default="docs", help="folder of the docs pages to rewrite (default docs/)")
    parser.add_argument("--figures", default="figures", help="folder for the result figures (default figures/)")
    parser.add_argument("--no-figures", action="store_true", help="tables only (figures need a Chromium browser)")
    parser.add_argument("--from-runs", default=None, metavar="ROOT",
                        help="export the result files from this output root first (needs its run folders)")
    parser.add_argument("--only", default=None, metavar="TABLES",
                        help="with --from-runs: export only these tables (comma-separated, of main, transfer, runs, "
                             "controls) and keep the other result files as they are; main replaces main.csv and the "
                             "main-table rows of predictions.csv (a root with a main-table rerun alone)")
    parser.add_argument("--limit", type=positive_int, default=200, help="test examples of the runs to export (default 200)")
    parser.add_argument("--resamples", type=positive_int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--ddof", type=int, choices=(0, 1), default=1,
                        help="delta degrees of freedom of every spread over runs: 1, the sample std (default); 0, as "
                             "the paper's authors' code")
    parser.add_argument("--resample", choices=("runs", "nested"), default="runs",
                        help="what the bootstrap resamples besides the test examples: the runs as exchangeable "
                             "(default), or nested: templates, then seeds within each (docs/concepts/statistics.md)")
    parser.add_argument("--check", action="store_true", help="write nothing; fail if a docs table is out of date")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from parts.figures.tables import rebuild

    only = None if args.only is None else [name.strip() for name in args.only.split(",") if name.strip()]
    if only is not None and args.from_runs is None:
        raise PartsError("--only chooses the tables to export from runs: give --from-runs ROOT too")
    if args.from_runs is not None:
        from parts.experiments.export import export_results

        for path in export_results(args.from_runs, args.results, args.limit, only=only).values():
            print(f"wrote {path}")
    stale = rebuild(args.results, args.docs, None if args.no_figures else args.figures, args.check, args.resamples,
                    ddof=args.ddof, resample=args.resample)
    if args.check:
        for item in stale:
            print(f"out of date: {item}")
        return 1 if stale else 0
    print(f"rewrote {len(stale)} docs page(s): {', '.join(stale) or 'none changed'}")
    return 0
