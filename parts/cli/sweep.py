"""`parts sweep`: every (task, template, seed) decomposition of one model into a run root."""

from __future__ import annotations

import argparse
import time
from typing import Any

from parts.cli.common import (
    add_dry_run_options,
    add_executor_options,
    add_model_options,
    add_run_options,
    check_label_words,
    check_task_data,
    count,
    executor,
    int_list,
    name_list,
    plan_target,
    run_options,
    wants_plan,
)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="decompose every task x template x seed with one model load; rerun to resume",
        description=(
            "Decompose every (task, template, seed) into OUT/<model>/<task>/t{template}-s{seed}-k{shots}-{split}-n{limit}. "
            "Finished runs are skipped, so an interrupted sweep continues where it stopped."
        ),
    )
    parser.add_argument("--task", "--tasks", dest="tasks", type=name_list, required=True,
                        help="task names or task JSON files, comma-separated (sst2,agnews)")
    parser.add_argument("--templates", type=int_list, default=[1, 2, 3, 4],
                        help="template numbers: 1,2,3,4 (default) or a range 1-3; 4 = the perturbed template")
    parser.add_argument("--seeds", type=int_list, default=[0, 1, 2, 3, 4], help="demonstration seeds (default 0-4)")
    add_run_options(parser)
    parser.add_argument("--out", required=True, help="root folder of the run folders")
    add_model_options(parser)
    add_executor_options(parser)
    add_dry_run_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from parts.data.tasks import check_tasks

    dry_run = wants_plan(args)
    tasks = check_tasks(args.tasks, args.templates)  # before torch is imported: a mistake is reported at once
    check_task_data(args, tasks, args.templates[0], args.seeds, args.split, args.limit, args.shots)
    check_label_words(args, tasks, args.templates)

    from parts.experiments.runner import model_label
    from parts.experiments.sweep import plan_sweep, sweep

    options = run_options(args)
    label = model_label(args.model, args.revision)
    planned = plan_sweep(label, args.tasks, args.templates, args.seeds, args.split, args.limit, args.shots, args.out,
                         options)
    already = sum(run.is_done(options) for run in planned)  # a run made otherwise is refused here, before any work
    if dry_run:
        from parts.experiments.plan import sweep_plan

        plan = sweep_plan(plan_target(args), planned, options)
        print(plan.describe())
        plan.check_fits()
        return 0
    if args.ray is None:  # Ray's workers have their own memory
        from parts.experiments.plan import check_command_fits, sweep_plan

        check_command_fits(sweep_plan, planned, options, args.model, args.revision, args.device)
    start = time.perf_counter()
    paths = sweep(args.model, args.tasks, args.templates, args.seeds, split=args.split, limit=args.limit,
                  shots=args.shots, out=args.out, revision=args.revision, options=options, executor=executor(args))
    print(f"{count(len(paths), 'run')} under {args.out} ({len(paths) - already} new, {already} already finished; "
          f"{time.perf_counter() - start:.0f} s)")
    return 0
