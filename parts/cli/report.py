"""`parts report`: a sweep as a static site to open from disk, every component one click away."""

from __future__ import annotations

import argparse
from typing import Any

from parts.cli.common import (
    RUNS_FOLDER_FIX,
    add_dry_run_options,
    add_model_options,
    name_list,
    plan_target,
    positive_int,
    run_options,
    wants_plan,
)
from parts.errors import PartsError


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write an interactive report of a sweep (static HTML: open OUT/index.html, no server or network needed)",
        description=(
            "Write a static site of the test runs under RUNS: an overview (tasks, runs, full model vs best and worst "
            "component, the main table when RUNS/results.csv from `parts evaluate` is there), one page per task (the "
            "accuracy heatmap per run or averaged, top and bottom components, stability) and a view of every component "
            "(accuracy in every run, label shares, vote margins by gold label, learned weights, and with --attention "
            "where the top heads look). Open OUT/index.html."
        ),
    )
    parser.add_argument("runs", metavar="RUNS", help="a sweep's --out folder")
    parser.add_argument("--out", required=True,
                        help="folder to write the report to: new, empty, or an earlier report (which is replaced)")
    parser.add_argument("--attention", action="store_true",
                        help="also store the attention of the top heads (loads the runs' model)")
    parser.add_argument("--heads", type=positive_int, default=5,
                        help="with --attention: the heads most accurate on average per task (default 5)")
    parser.add_argument("--examples", type=positive_int, default=3,
                        help="with --attention: test examples per head (default 3, one per gold label in turn)")
    parser.add_argument("--results", default=None, help="results.csv of `parts evaluate` (default RUNS/results.csv)")
    parser.add_argument("--task-files", type=name_list, default=None, metavar="FILES",
                        help="JSON files of your own tasks in the sweep (comma-separated), for the main table's intervals")
    add_model_options(parser, model_help=None, revision=False, decomposes=False)  # --attention's model (the runs')
    add_dry_run_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from parts import io
    from parts.data.tasks import get_task

    if wants_plan(args) and not args.attention:
        raise PartsError("--dry-run plans --attention's model passes; the plain report loads no model: add --attention")
    io.existing_folder(args.runs, "runs folder", RUNS_FOLDER_FIX)  # before the slow imports: answered at once
    if args.dry_run:
        return plan(args)
    from parts.report.site import build_report, count

    tasks_files = {get_task(path).name: path for path in args.task_files or []}

    attention = None
    if args.attention:
        # The model is needed for attention only: its libraries are imported, and it is loaded, only here.
        from parts.model.loading import load_model, recorded_model
        from parts.report.attention import attention_data

        options = run_options(args)
        models: dict[str, Any] = {}

        def attention(task: Any, heads: Any) -> Any:
            name = task.reference.model
            if name not in models:
                models[name] = load_model(**recorded_model(name), device=options.device, dtype=options.dtype)
            return attention_data(models[name], task, heads, args.examples)

    report = build_report(args.runs, args.out, attention, args.heads, args.results, tasks_files)
    print(f"{count(report.runs, 'run')} of {count(report.tasks, 'task')}: {len(report.pages)} pages, "
          f"{report.bytes / 1e6:.1f} MB in {report.seconds:.1f} s; open {report.out}/index.html")
    return 0


def plan(args: argparse.Namespace) -> int:
    """`--dry-run` with --attention: the plan of every model the tasks need (parts.report.plan_attention)."""
    from parts.model.loading import recorded_model
    from parts.report import data as report_data
    from parts.report.plan_attention import attention_plan

    tasks, _ = report_data.collect_tasks(args.runs)
    groups: dict[str, list[tuple[Any, list[str]]]] = {}
    for task in tasks:
        summary, _ = report_data.task_data(task, args.runs, None)
        groups.setdefault(task.reference.model, []).append((task, report_data.attention_heads(summary, args.heads)))
    for model, items in groups.items():
        recorded = recorded_model(model)
        args.model, args.revision = recorded["name"], recorded["revision"]
        found = attention_plan(plan_target(args), items, args.examples, args.out)
        print(found.describe())
        found.check_fits()
    return 0
