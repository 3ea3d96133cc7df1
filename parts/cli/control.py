"""`parts control`: the random-initialisation control and what chance alone gives over all components."""

from __future__ import annotations

import argparse
from typing import Any

from parts.cli.common import (
    add_executor_options,
    add_model_options,
    check_label_words,
    check_task_data,
    executor,
    int_list,
    name_list,
    non_negative_int,
    positive_int,
    run_options,
)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "control",
        help="categorise components of the pretrained and a randomly initialised model on the same prompts",
        description=(
            "Decompose the same prompts with the model and with its architecture re-initialised at random "
            "(same tokenizer), then count good / bad / label-biased / neutral components, without and with a "
            "correction over components. Runs are kept under OUT, so an interrupted control resumes."
        ),
    )
    parser.add_argument("--tasks", type=name_list, default=["sst2", "arc"], help="comma-separated tasks (default sst2,arc)")
    parser.add_argument("--templates", type=int_list, default=[1, 2], help="templates (default 1,2)")
    parser.add_argument("--seeds", type=int_list, default=[0], help="demonstration seeds (default 0)")
    parser.add_argument("--limit", type=positive_int, default=200, help="test examples per run (default 200)")
    parser.add_argument("--init-seed", type=non_negative_int, default=0, help="seed of the random re-initialisation")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    parser.add_argument("--correction", choices=["holm", "bh", "none"], default="holm",
                        help="correction over components: holm (default), bh (Benjamini-Hochberg) or none")
    parser.add_argument("--out", default="runs/controls", help="root of the run folders (default runs/controls)")
    parser.add_argument("--csv", default=None, help="also write the table to this CSV file")
    add_model_options(parser, revision=False, batch_size_default=8)
    add_executor_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from parts import io
    from parts.data.tasks import check_tasks
    from parts.errors import PartsError

    # Before torch is imported: a mistake is reported at once.
    if not 0 < args.alpha < 1:
        raise PartsError(f"--alpha must be between 0 and 1, got {args.alpha}")
    tasks = check_tasks(args.tasks, args.templates)
    check_task_data(args, tasks, args.templates[0], args.seeds, "test", args.limit)
    check_label_words(args, tasks, args.templates)  # a re-initialised model keeps its tokenizer
    if args.csv:
        io.check_file(args.csv)  # refuse before the work if a user's file is in the way

    from parts.experiments.controls import chance_yardsticks, random_init_control
    table = random_init_control(args.tasks, args.templates, args.seeds, args.limit, args.out, args.model, args.init_seed,
                                args.alpha, args.correction, run_options(args), executor=executor(args))
    if args.csv:
        io.write_file(args.csv, lambda staging: table.to_csv(staging, index=False))
    shown = table.drop(columns=["model"])
    print(shown.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    yardsticks = chance_yardsticks(table, args.alpha)
    n_components = int(table[[f"{c} (uncorrected)" for c in ("good", "bad", "label-biased", "neutral")]].iloc[0].sum())
    print(f"\nchance alone (1 / labels) over {n_components} components, alpha={args.alpha} (uncorrected test):")
    print(yardsticks.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    return 0
