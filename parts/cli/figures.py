"""`parts figures`: every figure a folder of saved runs supports, as HTML and static images."""

from __future__ import annotations

import argparse
from typing import Any

from parts.cli.common import RUNS_FOLDER_FIX, add_model_options, count, name_list, positive_int, run_options


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "figures",
        help="draw the paper's figures from saved runs (HTML, PNG, SVG/PDF)",
        description=(
            "Write every figure the runs under ROOT support: per task the accuracy heatmap, categories, "
            "distribution by layer, stability and correlation matrix, learned weights, and one head up close; "
            "the method bars from ROOT/results.csv. Figures whose inputs are absent are skipped."
        ),
    )
    parser.add_argument("root", help="a sweep's output folder (or one run folder)")
    parser.add_argument("--out", required=True, help="folder to write the figures to")
    parser.add_argument("--formats", type=name_list, default=["html", "png", "svg"],
                        help="comma-separated: html, png, svg, pdf (default html,png,svg)")
    parser.add_argument("--html-only", type=name_list, default=None, metavar="PATTERNS",
                        help="write HTML only for figures matching these names or shell patterns, e.g. '*-heatmap' "
                             "(default: every figure)")
    parser.add_argument("--plotlyjs", choices=["directory", "cdn", "inline"], default="directory",
                        help="HTML pages load plotly.js from one shared copy in --out (default, works offline), "
                             "the CDN (smallest), or carry it inline")
    parser.add_argument("--tasks", type=name_list, default=None, help="only these tasks (comma-separated)")
    parser.add_argument("--examples", type=positive_int, default=None,
                        help="only runs of this many test examples (a sweep's --limit), and their results.csv rows")
    parser.add_argument("--only", type=name_list, default=None, metavar="PATTERNS",
                        help="only figures whose names match these comma-separated shell patterns, e.g. '*-heatmap,*-weights'")
    parser.add_argument("--results", default=None, help="results.csv for the method bars (default ROOT/results.csv)")
    parser.add_argument("--no-model", dest="use_model", action="store_false",
                        help="skip the head close-ups (they load the runs' model for attention patterns)")
    add_model_options(parser, model_help=None, revision=False, decomposes=False)  # the head close-ups' model
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from parts import io
    from parts.errors import PartsError

    io.existing_folder(args.root, "runs folder", RUNS_FOLDER_FIX)  # before the slow imports: answered at once
    from parts.figures.export import FORMATS, write_figures
    from parts.figures.figureset import figure_set, no_figure_reason
    from parts.model.loading import load_model

    unknown = [f for f in args.formats if f not in FORMATS]
    if unknown:
        raise PartsError(f"unknown format(s) {', '.join(unknown)}: choose from {', '.join(FORMATS)}")
    options = run_options(args)
    loader = (lambda name: load_model(name, device=options.device, dtype=options.dtype)) if args.use_model else None
    figures = figure_set(args.root, loader, args.tasks, args.results, args.examples, args.only)
    if not figures:
        raise PartsError(no_figure_reason(args.root, args.tasks, args.examples))
    written = write_figures(figures, args.out, args.formats, args.plotlyjs, args.html_only)
    for name in figures:
        print(name)
    print(f"wrote {count(len(written), 'file')} for {count(len(figures), 'figure')} to {args.out}")
    return 0
