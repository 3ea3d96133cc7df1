"""Controls: categories with and without correction over components, and a randomly initialised model.

The statistics (binomial tests, Holm and Benjamini-Hochberg corrections, what chance alone
gives) live in `parts.analysis.stats`; this module runs the experiments that use them.

The random-initialisation control decomposes the same prompts with the pretrained model and
with the same architecture and tokenizer re-drawn by its initialiser (`load_model(...,
random_init=True)`), and counts each model's categories (`random_init_control`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from parts.analysis.analyze import CATEGORIES, categorize, component_table
from parts.analysis.stats import chance_best_accuracy, chance_table, check_correction, is_significant
from parts.decomposition.runs import DecompositionRun
from parts.experiments.driver import Executor, drive
from parts.experiments.options import RunOptions, resolve
from parts.experiments.runner import Loader, ModelSpec, PlannedRun


# -- categories with and without correction ---------------------------------------------------------
def corrected_component_table(
    run: DecompositionRun, alpha: float = 0.05, correction: str = "holm", label_bias_threshold: float = 0.9
) -> pd.DataFrame:
    """`parts.analysis.analyze.component_table` (categories on corrected p-values) plus `category_uncorrected`."""
    table = component_table(run, label_bias_threshold, alpha, correction)
    table["category_uncorrected"] = categorize(table, run.full_accuracy, label_bias_threshold, alpha)
    return table


# -- the random-initialisation control --------------------------------------------------------
def control_row(run: DecompositionRun, alpha: float = 0.05, correction: str = "holm") -> dict[str, object]:
    """One run's line of the control table: accuracies and category counts, uncorrected and corrected."""
    chance = 1.0 / len(run.prompts.label_names)
    best_name, best_accuracy = run.top_components(1)[0]
    row: dict[str, object] = {
        "model": run.model,
        "task": run.prompts.task,
        "template": run.prompts.template,
        "seed": run.prompts.seed,
        "n_examples": run.n_examples,
        "n_labels": len(run.prompts.label_names),
        "full_accuracy": run.full_accuracy,
        "best_component": best_name,
        "best_accuracy": best_accuracy,
        "chance_best_accuracy": chance_best_accuracy(len(run.component_names), run.n_examples, chance),
    }
    table = corrected_component_table(run, alpha, correction)
    for label, column in (("uncorrected", "category_uncorrected"), (correction, "category")):
        for category in CATEGORIES:
            row[f"{category} ({label})"] = int((table[column] == category).sum())
    # Above chance at all (label bias and the full model's accuracy aside): what the random model must lack.
    row["above chance (uncorrected)"] = int(is_significant(table["p_above"], alpha).sum())
    row[f"above chance ({correction})"] = int(is_significant(table["p_above_adjusted"], alpha).sum())
    return row


def random_init_control(
    tasks: Sequence[str],
    templates: Sequence[int] = (1, 2),
    seeds: Sequence[int] = (0,),
    limit: int | None = 200,
    root: str | Path = "runs/controls",
    model: str | None = None,
    init_seed: int = 0,
    alpha: float = 0.05,
    correction: str = "holm",
    options: RunOptions | None = None,
    load: Loader | None = None,
    executor: Executor | None = None,
    **overrides: Any,
) -> pd.DataFrame:
    """Decompose the same prompts with the pretrained and the randomly initialised model; one row per run.

    Runs are kept under `root` (`parts.experiments.runner.run_dir`), so an interrupted control resumes.
    `load` replaces `parts.model.loading.load_model` (tests pass tiny models); `overrides` are
    `RunOptions` fields (`device="cpu"`...), a shorthand for `options`.
    """
    check_correction(correction)
    options = resolve(options, **overrides)
    plan = [PlannedRun.of(root, ModelSpec(model, random_init=random_init, init_seed=init_seed), task, template, seed,
                          "test", None, limit, options)
            for random_init in (False, True) for task in tasks for template in templates for seed in seeds]
    drive(plan, options, loader=load, executor=executor, description="control", unit="run")
    rows = []
    for planned in plan:
        run = planned.load(options)
        rows.append({"init": "random" if planned.model.random_init else "pretrained",
                     **control_row(run, alpha, correction)})
    return pd.DataFrame(rows)


def chance_yardsticks(table: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """What chance alone gives over all components, for each (test examples, labels) pair of a control table:
    chance is 1 / labels of each run's task, so a 2-label and a 14-label task get their own yardsticks."""
    counts = table[[f"{category} (uncorrected)" for category in CATEGORIES]].sum(axis=1)
    n_components = int(counts.iloc[0])
    settings = table.groupby(["n_examples", "n_labels"], sort=True)["task"].unique()
    frames = [chance_table([int(n)], [1 / int(labels)], n_components, alpha).assign(
        labels=int(labels), tasks=",".join(map(str, tasks))) for (n, labels), tasks in settings.items()]
    return pd.concat(frames, ignore_index=True)[["tasks", "labels", *frames[0].columns[:-2]]]
