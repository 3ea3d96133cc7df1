"""Components across training: decompose the same prompts at every checkpoint of a model.

A checkpoint is a hub revision (Pythia's `EleutherAI/pythia-160m@step1000`), a local folder
saved with `save_pretrained`, or `random` (the architecture re-initialised: training step 0).
Every (checkpoint, task, template, seed) run is kept under `root` with `parts.experiments.runner.run_dir`
(the model label carries the revision), so an interrupted sweep resumes where it stopped.

`checkpoint_table` tracks, per checkpoint and run, the full model's accuracy, the accuracy of
the k best components at that checkpoint (by rank), and the accuracy at that checkpoint of the
final checkpoint's k best components (fixed identities: do the good components of the trained
model exist early?). `checkpoint_figure` draws them against the training step.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from parts.decomposition.runs import DecompositionRun
from parts.errors import PartsError
from parts.experiments.driver import Executor, drive
from parts.experiments.options import RunOptions, resolve
from parts.experiments.runner import Loader, ModelSpec, PlannedRun

if TYPE_CHECKING:
    pass

RANDOM = "random"


@dataclass(frozen=True)
class Checkpoint:
    """One point of training: what to load and where it sits on the x-axis."""

    model: str | None  # hub name or local folder; None is the embedded model
    step: float
    revision: str | None = None
    random_init: bool = False

    @property
    def spec(self) -> ModelSpec:
        """The model to load for this checkpoint."""
        return ModelSpec(self.model, self.revision, self.random_init, 0)

    @property
    def label(self) -> str:
        """The model label its runs are saved under (and the figure's hover text)."""
        return self.spec.label


def _number_in(text: str) -> float | None:
    """The last number in a revision or folder name ('step1000' -> 1000), if any."""
    found = re.findall(r"\d+", text)
    return float(found[-1]) if found else None


def parse_checkpoint(spec: str, base_model: str | None = None, position: int = 0) -> Checkpoint:
    """`NAME[@REVISION][=STEP]`, a folder, or 'random' (`base_model` re-initialised, step 0).

    The step defaults to the last number in the revision, else in the folder's name, else
    the checkpoint's position in the list.
    """
    text, _, step_text = spec.partition("=")
    step: float | None = None
    if step_text:
        try:
            step = float(step_text)
        except ValueError:
            raise PartsError(f"checkpoint {spec!r}: the step after '=' must be a number, e.g. ckpt/=1000") from None
    if text == RANDOM:
        return Checkpoint(base_model, 0.0 if step is None else step, random_init=True)
    name, _, revision = text.partition("@")
    if not name:
        raise PartsError(f"checkpoint {spec!r} has no model: write NAME@REVISION, a folder, or random")
    if step is None:
        step = _number_in(revision) if revision else _number_in(Path(name).name)
    return Checkpoint(name, float(position) if step is None else step, revision or None)


def pythia_checkpoints(
    name: str = "EleutherAI/pythia-160m", steps: Sequence[int] = (0, 1000, 8000, 36000, 143000)
) -> list[Checkpoint]:
    """Pythia's published revisions `step{N}` (step0 ... step143000; every 1000 plus 1-512 early)."""
    return [Checkpoint(name, float(step), f"step{step}") for step in steps]


def checkpoint_runs(
    checkpoints: Sequence[Checkpoint],
    tasks: Sequence[str],
    templates: Sequence[int] = (1,),
    seeds: Sequence[int] = (0,),
    limit: int | None = 100,
    root: str | Path = "runs/checkpoints",
    options: RunOptions | None = None,
    load: Loader | None = None,
    executor: Executor | None = None,
    **overrides: Any,
) -> list[tuple[Checkpoint, DecompositionRun]]:
    """Every (checkpoint, task, template, seed) run, loading each checkpoint only if a run of it is missing.

    `overrides` are `RunOptions` fields (`device="cpu"`...), a shorthand for `options`.
    """
    options = resolve(options, **overrides)
    if not checkpoints:
        raise PartsError("give at least one checkpoint")
    plan = [(checkpoint, PlannedRun.of(root, checkpoint.spec, task, template, seed, "test", None, limit, options))
            for checkpoint in checkpoints for task in tasks for template in templates for seed in seeds]
    # Grouped by checkpoint, so one checkpoint is in memory at a time.
    drive([planned for _, planned in plan], options, loader=load, executor=executor, description="checkpoints",
          unit="run")
    results = []
    for checkpoint, planned in plan:
        run = planned.load(options)
        results.append((checkpoint, run))
    return results


def checkpoint_table(runs: Sequence[tuple[Checkpoint, DecompositionRun]], k: int = 3) -> pd.DataFrame:
    """Long table: one row per (checkpoint, run, line) with line in {full model, best #i, final top-i NAME}."""
    return checkpoint_lines([
        ({"checkpoint": checkpoint.label, "step": checkpoint.step, "task": run.prompts.task,
          "template": run.prompts.template, "seed": run.prompts.seed, "n_examples": run.n_examples},
         run.full_accuracy, dict(zip(run.component_names, run.component_accuracy.tolist(), strict=True)))
        for checkpoint, run in runs], k)


def checkpoint_lines(runs: Sequence[tuple[dict[str, Any], float, dict[str, float]]], k: int = 3) -> pd.DataFrame:
    """`checkpoint_table` from plain data: per run, its key ({checkpoint, step, task, template, seed,
    n_examples}), the full model's accuracy and every component's accuracy by name (in component order)."""
    if k < 1:
        raise PartsError(f"k must be at least 1, got {k}")

    def top(accuracies: dict[str, float]) -> list[tuple[str, float]]:  # ties keep component order
        return sorted(accuracies.items(), key=lambda item: -item[1])[:k]

    def key(base: dict[str, Any]) -> tuple[str, int, int]:
        return base["task"], base["template"], base["seed"]

    last_step = max(base["step"] for base, _, _ in runs)
    # The final checkpoint's k best components of each (task, template, seed), tracked back in time.
    final_top = {key(base): [name for name, _ in top(accuracies)] for base, _, accuracies in runs
                 if base["step"] == last_step}
    rows = []
    for base, full, accuracies in runs:
        rows.append({**base, "line": "full model", "component": "", "accuracy": full})
        for rank, (name, accuracy) in enumerate(top(accuracies), start=1):
            rows.append({**base, "line": f"best #{rank}", "component": name, "accuracy": accuracy})
        for rank, name in enumerate(final_top.get(key(base), []), start=1):
            rows.append({**base, "line": f"final top-{rank}", "component": name, "accuracy": accuracies[name]})
    return pd.DataFrame(rows)


def checkpoint_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy over templates and seeds per (task, step, line)."""
    return (
        table.groupby(["task", "step", "checkpoint", "line"], as_index=False, sort=True)["accuracy"].mean()
        .sort_values(["task", "step", "line"], kind="stable", ignore_index=True)
    )


def _line_style(line: str) -> dict[str, object]:
    if line == "full model":
        return {"color": "black", "width": 3}
    if line.startswith("best"):
        return {"width": 2}
    return {"width": 1.5, "dash": "dot"}


def checkpoint_figure(table: pd.DataFrame, title: str = "Components across training") -> go.Figure:
    """x = training step, y = accuracy (mean over templates and seeds): one panel per task.

    Solid black: the full model; solid: the k best components at each step; dotted: the
    final checkpoint's k best components, followed back through training.
    """
    summary = checkpoint_summary(table)
    tasks = list(dict.fromkeys(summary["task"]))
    figure = make_subplots(rows=1, cols=len(tasks), subplot_titles=tasks, shared_yaxes=True)
    for column, task in enumerate(tasks, start=1):
        part = summary[summary["task"] == task]
        for line in dict.fromkeys(part["line"]):
            points = part[part["line"] == line]
            figure.add_trace(
                go.Scatter(x=points["step"], y=points["accuracy"], mode="lines+markers", name=line,
                           legendgroup=line, showlegend=column == 1, line=_line_style(line),
                           text=points["checkpoint"], hovertemplate="%{text}<br>step %{x}<br>accuracy %{y:.3f}"),
                row=1, col=column,
            )
        figure.update_xaxes(title_text="training step", row=1, col=column)
    figure.update_yaxes(title_text="accuracy", row=1, col=1)
    figure.update_layout(title=title, template="plotly_white", width=420 * len(tasks) + 200, height=420)
    return figure
