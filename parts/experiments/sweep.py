"""Sweeps: every (task, template, seed) decomposition of one model, resumable.

A sweep plans its run folders with `parts.experiments.runner.run_dir`, skips those already finished
(a run folder is written atomically, so one with a `summary.json` is complete), loads the
model once if anything is left to do, and runs the rest through `parts.experiments.runner.ensure_run`.
Interrupt it at any point and run it again: it redoes only the unfinished runs, and since a
run depends only on its settings the files come out byte-identical to an uninterrupted sweep.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from parts.data.prompts import build_prompts
from parts.data.tasks import Task, get_task
from parts.decomposition.runs import SUMMARY
from parts.errors import PartsError
from parts.experiments.options import RunOptions, resolve
from parts.experiments.runner import ensure_run, model_label, run_dir
from parts.model.loading import load_model


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: its settings and its folder."""

    task: Task
    template: int
    seed: int
    path: Path

    @property
    def label(self) -> str:
        return f"{self.task.name} t{self.template} s{self.seed}"

    @property
    def finished(self) -> bool:
        return (self.path / SUMMARY).is_file()


def plan_sweep(
    model_name: str | None,
    tasks: Sequence[str | Task],
    templates: Sequence[int],
    seeds: Sequence[int],
    split: str = "test",
    limit: int | None = None,
    shots: int | None = None,
    out: str | Path = "runs",
    options: RunOptions | None = None,
) -> list[PlannedRun]:
    """Every (task, template, seed) of the sweep in order (task-major), with its run folder (keyed by `options`)."""
    for what, values in (("task", tasks), ("template", templates), ("seed", seeds)):
        if not values:
            raise PartsError(f"a sweep needs at least one {what}: give --{what}s")
    resolved = [t if isinstance(t, Task) else get_task(t) for t in tasks]
    for task in resolved:
        for template in templates:
            task.template(template)  # names the task and template that do not exist
    return [
        PlannedRun(task, template, seed, run_dir(out, model_name, task, template, seed, split, shots, limit, options))
        for task in resolved
        for template in templates
        for seed in seeds
    ]


def sweep(
    model_name: str | None,
    tasks: Sequence[str | Task],
    templates: Sequence[int],
    seeds: Sequence[int],
    split: str = "test",
    limit: int | None = None,
    shots: int | None = None,
    out: str | Path = "runs",
    revision: str | None = None,
    options: RunOptions | None = None,
    **overrides: Any,
) -> list[Path]:
    """Run every (task, template, seed) into `out` and return the run folders, in plan order.

    The model is loaded once, and not at all when every run is already finished. `overrides` are
    `RunOptions` fields (`device="cpu"`...), a shorthand for `options`.
    """
    options = resolve(options, **overrides)
    progress, data_dir = options.progress, options.data_dir
    planned = plan_sweep(model_label(model_name, revision), tasks, templates, seeds, split, limit, shots, out, options)
    pending = [run for run in planned if not run.finished]
    if pending:
        # Build every missing run's prompts first: a data problem surfaces before the model load.
        for run in pending:
            build_prompts(run.task, run.template, run.seed, shots, split, limit, data_dir)
        model = load_model(model_name, device=options.device, dtype=options.dtype, revision=revision)
        with tqdm(total=len(planned), initial=len(planned) - len(pending), desc="sweep", unit="run",
                  disable=not progress) as bar:
            for run in pending:
                bar.set_postfix_str(run.label)
                ensure_run(run.path, model, load=False, options=options, task=run.task, template=run.template,
                           seed=run.seed, shots=shots, split=split, limit=limit)
                bar.update(1)
    return [run.path for run in planned]
