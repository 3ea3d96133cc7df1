"""`parts decompose`: one task, template and seed; writes a run folder."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from parts.cli.common import add_model_options, add_run_options, check_label_words, non_negative_int, positive_int, run_options


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "decompose",
        help="split a task's label-word logits into per-component contributions",
        description="Decompose the label-word logits of one (task, template, seed) into every head and MLP.",
    )
    parser.add_argument("--task", required=True, help="sst2, boolq, qqp, wic, rte, mnli, agnews, arc, or a task JSON file")
    parser.add_argument("--template", type=positive_int, default=1, help="template number (1-3, 4 = perturbed)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="demonstration seed")
    add_run_options(parser)
    parser.add_argument("--out", required=True, help="run folder to write (a run of the same settings there is replaced)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run of other settings at --out (never a folder holding files parts did not write)")
    add_model_options(parser, reuses=False)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from parts.data.prompts import build_prompts
    from parts.data.tasks import get_task

    # Build (and validate) the task and prompts first: a mistake is reported before torch is even imported.
    task = get_task(args.task)
    prompts = build_prompts(task, args.template, args.seed, args.shots, args.split, args.limit, args.data_dir)
    check_label_words(args, [task], [args.template])  # with the tokenizer alone: before the model loads

    from parts.decomposition.runs import check_replaceable
    from parts.experiments.runner import ModelSpec, expected_fingerprint, load_spec, run_decomposition
    from parts.model.loading import model_name

    options = run_options(args)
    check_replaceable(args.out, prompts, overwrite=args.overwrite)  # before the model load and the work
    from parts.experiments.plan import check_command_fits, sweep_plan
    from parts.experiments.runner import PlannedRun

    run = PlannedRun(ModelSpec(args.model, args.revision), task, args.template, args.seed, Path(args.out), args.shots,
                     args.split, args.limit)  # planned as a sweep of one run: refused now if it will not fit
    check_command_fits(sweep_plan, [run], options.replace(recompute_changed=True), args.model, args.revision,
                       args.device)
    model = load_spec(ModelSpec(args.model, args.revision), options)
    check_replaceable(args.out, prompts, model_name(model), args.overwrite)
    start = time.perf_counter()
    fingerprint = expected_fingerprint(model_name(model), task, args.template, args.seed, args.shots, args.split,
                                       args.limit, options)
    result = run_decomposition(model, prompts, options, fingerprint)
    # Checked again with the rename, under its lock: a run another command saved there meanwhile is judged too.
    path = result.save(args.out, check=lambda out: check_replaceable(out, prompts, model_name(model), args.overwrite))
    print(result.describe())
    print(f"saved to {path} ({time.perf_counter() - start:.1f} s)")
    return 0
