"""`parts transfer`: weights and Calib+ learned on a source task, scored on a shifted target test set."""

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
    non_negative_int,
    plan_target,
    positive_int,
    run_options,
    wants_plan,
)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "transfer",
        help="score weights and Calib+ learned on a source task on a shifted test set (sst2:yelp, boolq:boolq_contrast)",
        description=(
            "For every SOURCE:TARGET pair, template and seed: learn component weights and Calib+ on the source's "
            "24 - k labelled examples, then score every method on the source test set and on the target test set "
            "rendered with the source's template and demonstrations. Writes <out>/transfer.csv and a markdown "
            "table (rows 'sst2' and 'sst2 -> yelp'). Rerun the same command to resume."
        ),
    )
    parser.add_argument("--pairs", default="sst2:yelp,boolq:boolq_contrast",
                        help="SOURCE:TARGET pairs, comma-separated; any task or task JSON as target "
                             "(default sst2:yelp,boolq:boolq_contrast)")
    parser.add_argument("--templates", type=int_list, default=[1, 2, 3], help="source templates (default 1,2,3)")
    parser.add_argument("--seeds", type=int_list, default=[0, 1, 2, 3, 4], help="demonstration seeds (default 0-4)")
    parser.add_argument("--shots", type=non_negative_int, default=None, help="demonstrations (default 4; 3 for mnli)")
    parser.add_argument("--limit", type=positive_int, default=40,
                        help="source test examples (default 40; matches `parts evaluate --limit` to share its runs)")
    parser.add_argument("--target-limit", type=positive_int, default=100, help="target test examples (default 100)")
    parser.add_argument("--out", required=True, help="output root (share it with `parts evaluate` to reuse source runs)")
    add_model_options(parser)
    add_executor_options(parser)
    add_dry_run_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from parts.data.tasks import check_tasks, parse_pairs

    dry_run = wants_plan(args)
    pairs = parse_pairs(args.pairs)  # before torch is imported: a mistake is reported at once
    check_tasks([task for pair in pairs for task in pair], args.templates)
    sources = check_tasks(list(dict.fromkeys(source for source, _ in pairs)))  # the targets take their words and shots
    check_task_data(args, sources, args.templates[0], args.seeds, "test", args.limit, args.shots)
    check_label_words(args, sources, args.templates)

    from parts.experiments.results import TRANSFER_CSV, results_table
    from parts.experiments.runner import ModelSpec
    from parts.experiments.transfer import run_transfer, transfer_gap, transfer_settings

    settings = transfer_settings(pairs, args.templates, args.seeds, args.limit, args.target_limit,
                                 args.shots)
    from parts.experiments.results import check_outputs
    from parts.experiments.transfer import transfer_outputs

    # before any plan reads them: a user's file in the way is refused as the run itself would
    check_outputs(*transfer_outputs(ModelSpec(args.model, args.revision), args.out, run_options(args)))
    if dry_run:
        from parts.experiments.plan import transfer_plan
        from parts.experiments.transfer import transfer_works

        planned = transfer_plan(plan_target(args), transfer_works(ModelSpec(args.model, args.revision), settings,
                                                                  args.out), run_options(args))
        print(planned.describe())
        planned.check_fits()
        return 0
    if args.ray is None:  # Ray's workers have their own memory
        from parts.experiments.plan import check_command_fits, transfer_plan
        from parts.experiments.transfer import transfer_works

        check_command_fits(transfer_plan, transfer_works(ModelSpec(args.model, args.revision), settings, args.out),
                           run_options(args), args.model, args.revision, args.device)
    rows, table = run_transfer(ModelSpec(args.model, args.revision), settings, args.out, run_options(args),
                               executor(args))
    print(results_table(rows))
    gaps = transfer_gap(rows)
    print("target - source accuracy: " + ", ".join(f"{m} {100 * g:+.1f}" for m, g in gaps.items()))
    print(f"rows in {Path(args.out) / TRANSFER_CSV}, table in {table}")
    return 0
