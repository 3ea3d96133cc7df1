"""`parts analyze`: categories and stability of the components of every run under a folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from parts.cli.common import RUNS_FOLDER_FIX, number, positive_int


def probability(text: str) -> float:
    return number(text, float, lambda value: 0 < value <= 1, "must be in (0, 1]")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="good, bad and label-biased components per run, and their stability across seeds and templates",
        description=(
            "Read every finished run under ROOT, print per run the category counts, top components and full-model "
            "accuracy, and across runs of a task the agreement of component accuracies; write it all as JSON."
        ),
    )
    parser.add_argument("root", help="a sweep's --out folder (or a single run folder)")
    parser.add_argument("--out", default=None, help="JSON file to write (default: ROOT/analysis.json)")
    parser.add_argument("--label-bias", type=probability, default=0.9,
                        help="share of examples on one label that makes a component label-biased (default 0.9)")
    parser.add_argument("--alpha", type=probability, default=0.05, help="significance level of the binomial tests")
    parser.add_argument("--top-k", type=positive_int, default=5, help="top components compared by IoU (default 5)")
    parser.add_argument("--correction", choices=["holm", "bh", "none"], default="holm",
                        help="multiple-testing correction of the p-values over a run's components (default holm)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from parts import io

    io.existing_folder(args.root, "runs folder", RUNS_FOLDER_FIX)  # before the slow imports: answered at once

    from parts.analysis.analyze import analysis_report, format_report
    from parts.decomposition.effect_data import TotalEffects, has_effects
    from parts.decomposition.effects import check_effects_match
    from parts.decomposition.runs import find_runs, load_runs

    out = Path(args.out) if args.out else Path(args.root) / "analysis.json"
    io.check_file(out, legacy=io.contains('"label_bias_threshold"'))  # before the work: a user's file there is refused
    paths = find_runs(args.root)
    runs = load_runs(args.root)
    effects = [TotalEffects.load(path) if has_effects(path) else None for path in paths]  # `parts effects` wrote them
    for path, run, found in zip(paths, runs, effects, strict=True):
        if found is not None:
            check_effects_match(path, run, found)
    report = analysis_report(runs, paths, args.label_bias, args.alpha, args.top_k, args.correction, effects)
    io.write_json(out, report, legacy=io.contains('"label_bias_threshold"'))
    print(format_report(report))
    print(f"\nwrote {out}")
    return 0
