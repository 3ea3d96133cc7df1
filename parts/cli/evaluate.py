"""`parts evaluate`: component reweighting against ICL and calibration, the paper's main table."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from parts.cli.common import add_model_options, int_list, name_list, non_negative_int, positive_int, run_options


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
    parser.add_argument("--table-only", action="store_true",
                        help="compute nothing: print and write the table of the settings already in results.csv")
    add_model_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from parts.errors import PartsError
    from parts.experiments.evaluate import LazyModel, evaluate_setting, finished, select, sweep_settings, table_path
    from parts.experiments.results import RESULTS_CSV, check_outputs, read_results, results_table, write_results, write_table
    from parts.experiments.runner import model_slug
    from parts.model.loading import load_model

    options = run_options(args)
    settings = sweep_settings(args.tasks, args.templates, args.seeds, args.limit, args.labels, args.shots)
    model = LazyModel(lambda: load_model(args.model, device=options.device, dtype=options.dtype, revision=args.revision))
    name = model_slug(args.model, options)
    csv_path = Path(args.out) / RESULTS_CSV
    todo = [s for s in settings if not finished(read_results(csv_path), name, s)]
    print(f"{len(settings) - len(todo)} of {len(settings)} settings already evaluated; "
          + ("the table shows those" if args.table_only else f"{len(todo)} to go"))
    if args.table_only:
        if not Path(csv_path).is_file():
            raise PartsError(f"{csv_path} does not exist: run `parts evaluate` without --table-only first, or fix --out")
        todo = []
    table = table_path(args.out, args.model, args.limit, options)
    check_outputs(csv_path, table)  # refuse now, not after the first setting, if a user's file is in the way
    header = (f"{name}, test examples per task: {args.limit or 'all'}; accuracy (%) mean ± std over templates "
              f"{','.join(map(str, args.templates))} x seeds {','.join(map(str, args.seeds))}")
    for setting in tqdm(todo, desc="settings", unit="setting"):
        if finished(read_results(csv_path), name, setting):  # another sweep sharing this root did it meanwhile
            continue
        rows = evaluate_setting(model, args.model, setting, args.out, options)
        write_results(csv_path, rows)
        write_table(table, results_table(select(read_results(csv_path), name, settings)), header)
    chosen = select(read_results(csv_path), name, settings)
    text = results_table(chosen)
    write_table(table, text, header)
    print(text)
    print(f"rows in {csv_path}, table in {table}")
    if not chosen.empty:
        from parts.data.tasks import get_task
        from parts.experiments.export import interval_tables
        from parts.figures.tables import markdown

        tasks = {s.task.name: s.task.name for s in settings}
        tasks |= {get_task(t).name: t for t in args.tasks}  # user task files, by the name their rows carry
        accuracy, differences = interval_tables(args.out, chosen, tasks)
        print("\naccuracy (%), mean over runs [95% bootstrap interval: test examples and runs resampled per task]")
        print(markdown(accuracy))
        print("\nCompRW minus each baseline (percentage points) [95% bootstrap interval]")
        print(markdown(differences))
    return 0
