"""`parts checkpoints`: the full model and its best components across training checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from parts.cli.common import (
    add_executor_options,
    add_model_options,
    check_task_data,
    executor,
    int_list,
    name_list,
    positive_int,
    run_options,
)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "checkpoints",
        help="decompose the same prompts at every training checkpoint; track the full model and top-k components",
        description=(
            "CHECKPOINTS are NAME@REVISION (a hub revision, e.g. EleutherAI/pythia-160m@step1000), local folders "
            "saved with save_pretrained, or 'random' (--model re-initialised: step 0); append =STEP to set the "
            "x-axis value (default: the last number in the revision or folder name). Runs are kept under OUT "
            "and reused; writes checkpoints.csv and a figure."
        ),
    )
    parser.add_argument("--checkpoints", type=name_list, required=True,
                        help="comma-separated, e.g. EleutherAI/pythia-160m@step1000,EleutherAI/pythia-160m@step143000")
    parser.add_argument("--tasks", type=name_list, default=["sst2"], help="comma-separated tasks (default sst2)")
    parser.add_argument("--templates", type=int_list, default=[1], help="templates (default 1)")
    parser.add_argument("--seeds", type=int_list, default=[0], help="demonstration seeds (default 0)")
    parser.add_argument("--limit", type=positive_int, default=100, help="test examples per run (default 100)")
    parser.add_argument("--top-k", type=positive_int, default=3, help="components to follow (default 3)")
    parser.add_argument("--out", default="runs/checkpoints", help="root of the run folders (default runs/checkpoints)")
    parser.add_argument("--figure", default=None, help="figure file (.html; default OUT/checkpoints.html)")
    add_model_options(parser, model_help="the model 'random' re-initialises (default: the embedded model)",
                      revision=False, batch_size_default=8)
    add_executor_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from parts import io
    from parts.data.tasks import check_tasks

    tasks = check_tasks(args.tasks, args.templates)  # before torch is imported: a mistake is reported at once
    check_task_data(args, tasks, args.templates[0], args.seeds, "test", args.limit)
    from parts.experiments.checkpoints import (
        checkpoint_figure,
        checkpoint_runs,
        checkpoint_summary,
        checkpoint_table,
        parse_checkpoint,
    )

    csv_path = Path(args.out) / "checkpoints.csv"
    figure_path = Path(args.figure or Path(args.out) / "checkpoints.html")
    # Files from before parts marked its folders are recognised by their first bytes.
    legacy = {csv_path: io.starts_with("checkpoint,step,task,"), figure_path: io.contains("plotly")}
    for path, older in legacy.items():  # refuse before the work if a user's file is in the way
        io.check_file(path, older)
    checkpoints = [parse_checkpoint(spec, args.model, position) for position, spec in enumerate(args.checkpoints)]
    runs = checkpoint_runs(checkpoints, args.tasks, args.templates, args.seeds, args.limit, args.out, run_options(args),
                           executor=executor(args))
    table = checkpoint_table(runs, args.top_k)
    io.write_file(csv_path, lambda staging: table.to_csv(staging, index=False), legacy[csv_path])
    figure = checkpoint_figure(table)
    io.write_file(figure_path, lambda staging: figure.write_html(staging, include_plotlyjs="cdn"), legacy[figure_path])
    summary = checkpoint_summary(table).pivot_table(index=["task", "step", "checkpoint"], columns="line", values="accuracy")
    print(summary.to_string(float_format=lambda x: f"{x:.3f}"))
    print(f"rows in {csv_path}, figure in {figure_path}")
    return 0
