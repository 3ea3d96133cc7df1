"""`parts evaluate`: component reweighting against ICL and calibration, the paper's main table."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from parts.cli.common import (
    add_dry_run_options,
    add_executor_options,
    add_model_options,
    check_label_words,
    check_task_data,
    executor,
    int_list,
    name_list,
    non_negative_int,
    plan_target,
    positive_int,
    run_options,
    wants_plan,
)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="reweight components and compare with k-shot / 24-shot ICL and calibration (the paper's main table)",
        description=(
            "For every task, template and seed: decompose the test examples and the seed's labelled examples "
            "(reusing finished runs), learn component weights, run the baselines, and write <out>/results.csv "
            "and a markdown table (mean ± std over templates x seeds). Rerun the same command to resume."
        ),
    )
    parser.add_argument("--tasks", type=name_list, required=True, help="comma-separated tasks, e.g. sst2,rte")
    parser.add_argument("--templates", type=int_list, default=[1, 2, 3], help="templates, e.g. 1,2,3 (default)")
    parser.add_argument("--seeds", type=int_list, default=[0, 1, 2, 3, 4], help="demonstration seeds, e.g. 0-4 (default)")
    parser.add_argument("--labels", type=int_list, default=[24],
                        help="label budgets (k demonstrations + the rest to train on), e.g. 24 or 24,12 (default 24)")
    parser.add_argument("--shots", type=non_negative_int, default=None, help="demonstrations (default 4; 3 for mnli)")
    parser.add_argument("--limit", type=positive_int, default=None, help="test examples per task (a balanced sample)")
    parser.add_argument("--out", required=True, help="output root: run folders, results.csv and the table go here")
    parser.add_argument("--gates", action="store_true",
                        help="also train in-forward component gates (beyond the paper; off by default: minutes of "
                             "backpropagation through the model per setting, see docs/guide/methods.md)")
    parser.add_argument("--table-only", action="store_true",
                        help="compute nothing: print and write the table of the settings already in results.csv")
    add_model_options(parser)
    add_executor_options(parser)
    add_dry_run_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from parts.data.tasks import check_tasks

    dry_run = wants_plan(args)
    checked = check_tasks(args.tasks, args.templates, args.shots, args.labels)  # before torch is imported: at once
    check_task_data(args, checked, args.templates[0], args.seeds, "test", args.limit, args.shots)
    check_label_words(args, checked, args.templates)

    from parts.errors import PartsError
    from parts.experiments.evaluate import (
        RESULTS_CSV,
        evaluation_plan,
        evaluation_rows,
        evaluation_table,
        evaluation_table_path,
        run_evaluation,
        sweep_settings,
    )
    from parts.experiments.results import check_outputs
    from parts.experiments.runner import ModelSpec

    options = run_options(args)
    settings = sweep_settings(args.tasks, args.templates, args.seeds, args.limit, args.labels, args.shots, args.gates)
    plan = evaluation_plan(ModelSpec(args.model, args.revision), settings, args.out)
    csv_path = Path(args.out) / RESULTS_CSV
    check_outputs(csv_path, evaluation_table_path(plan, options))  # before reading them: a user's file is refused
    if dry_run:
        from parts.experiments.plan import evaluate_plan

        planned = evaluate_plan(plan_target(args), plan, options)
        print(planned.describe())
        planned.check_fits()
        return 0
    if args.ray is None and not args.table_only:  # Ray's workers have their own memory
        from parts.experiments.plan import check_command_fits, evaluate_plan

        check_command_fits(evaluate_plan, plan, options, args.model, args.revision, args.device)
    done = sum(work.is_done(options) for work in plan)
    print(f"{done} of {len(plan)} settings already evaluated; "
          + ("the table shows those" if args.table_only else f"{len(plan) - done} to go"))
    if args.table_only:
        if not csv_path.is_file():
            raise PartsError(f"{csv_path} does not exist: run `parts evaluate` without --table-only first, or fix --out")
        text, table = evaluation_table(plan, options)
    else:
        text, table = run_evaluation(plan, options, executor(args))
    print(text)
    print(f"rows in {csv_path}, table in {table}")
    chosen = evaluation_rows(plan, options)
    if not chosen.empty:
        from parts.data.tasks import get_task
        from parts.experiments.export import interval_tables
        from parts.figures.tables import markdown

        tasks = {s.task.name: s.task.name for s in settings}
        tasks |= {get_task(t).name: t for t in args.tasks}  # user task files, by the name their rows carry
        accuracy, differences, settings_line = interval_tables(args.out, chosen, tasks)
        print("\naccuracy (%), mean over runs [95% bootstrap interval: test examples and runs resampled per task]")
        if settings_line:  # the settings, and the methods run on fewer (--gates on some) that the tables leave out
            print(settings_line)
        print(markdown(accuracy))
        print("\nCompRW minus each baseline (percentage points) [95% bootstrap interval]")
        print(markdown(differences))
    return 0
