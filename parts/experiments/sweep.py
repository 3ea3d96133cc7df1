"""Sweeps: every (task, template, seed) decomposition of one model, resumable.

A sweep is a plan of `parts.experiments.runner.PlannedRun`s (one run folder each, from `run_dir`)
handed to the driver (`parts.experiments.driver.drive`): finished folders are skipped (a run folder
is written atomically, so one with a `summary.json` is complete) if their fingerprint says they were made
exactly as asked now (else refused, or redone with `RunOptions.recompute_changed`), the model is loaded once if
anything is left to do, and the rest run in this process or on Ray workers. Interrupt it at any
point and run it again: it redoes only the unfinished runs, and since a run depends only on its
settings the files come out byte-identical to an uninterrupted sweep.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformer_lens.model_bridge import TransformerBridge

from parts.data.prompts import build_prompts
from parts.data.tasks import Task, get_task
from parts.errors import PartsError
from parts.experiments.driver import Executor, drive, given_model
from parts.experiments.options import RunOptions, resolve
from parts.experiments.runner import Loader, ModelSpec, PlannedRun
from parts.model.loading import model_name as loaded_model_name

__all__ = ["PlannedRun", "plan_sweep", "sweep"]


def plan_sweep(
    model_name: str | None | ModelSpec,
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
    spec = model_name if isinstance(model_name, ModelSpec) else ModelSpec(model_name)
    resolved = [t if isinstance(t, Task) else get_task(t) for t in tasks]
    for task in resolved:
        for template in templates:
            task.template(template)  # names the task and template that do not exist
    return [
        PlannedRun.of(out, spec, task, template, seed, split, shots, limit, options)
        for task in resolved
        for template in templates
        for seed in seeds
    ]


def sweep(
    model: str | None | TransformerBridge,
    tasks: Sequence[str | Task],
    templates: Sequence[int],
    seeds: Sequence[int],
    split: str = "test",
    limit: int | None = None,
    shots: int | None = None,
    out: str | Path = "runs",
    revision: str | None = None,
    options: RunOptions | None = None,
    executor: Executor | None = None,
    loader: Loader | None = None,
    **overrides: Any,
) -> list[Path]:
    """Run every (task, template, seed) into `out` and return the run folders, in plan order.

    `model` is a name (loaded once, and not at all when every run is already finished) or a loaded
    model. `overrides` are `RunOptions` fields (`device="cpu"`...), a shorthand for `options`;
    `executor` runs the settings elsewhere (`parts.experiments.ray_executor.RayExecutor`).
    """
    options = resolve(options, **overrides)
    if isinstance(model, TransformerBridge):
        spec, loader = ModelSpec(loaded_model_name(model)), given_model(model)
    else:
        spec = ModelSpec(model, revision)
    planned = plan_sweep(spec, tasks, templates, seeds, split, limit, shots, out, options)
    # Build every missing run's prompts first: a data problem surfaces before the model load.
    for run in planned:
        if not run.is_done(options):  # (a run made otherwise is refused here, or redone with recompute_changed)
            build_prompts(run.task, run.template, run.seed, shots, split, limit, options.data_dir)
    drive(planned, options, loader=loader, executor=executor, description="sweep", unit="run")
    return [run.path for run in planned]
