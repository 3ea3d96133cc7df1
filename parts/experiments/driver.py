"""The one settings driver: a plan of settings, a model (or how to load it), one `RunOptions`.

Every experiment that runs many settings (`sweep`, `evaluate`, `transfer`, `controls`,
`checkpoints`, notebook 02) is a plan of `Work` items handed to `drive`:

- a `Work` item is one setting: which model it needs (`ModelSpec`), whether it is already on disk, made
  exactly as now (`is_done`: its fingerprint matches, `parts.decomposition.fingerprint`; one made otherwise
  is refused, or with `RunOptions.recompute_changed` not done), and how to run it (`run`, which computes
  only what is missing and writes its own run folders atomically, then returns a small result such as
  `results.csv` rows);
- `drive` skips finished items, groups the rest by model so each model is loaded once (lazily: not
  at all when everything is finished), runs them through an executor, shows one progress bar (one plain
  line per finished setting where output is not a terminal), and
  hands each result to `record` in the driver's process: the only writer of shared tables.

The executor is where the settings run: `LocalExecutor` (this process, one model in memory at a
time) or `parts.experiments.ray_executor.RayExecutor` (workers on a Ray cluster). Both run the same
`Work.run`, so a run folder comes out byte-identical whichever ran it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from transformer_lens.model_bridge import TransformerBridge

from parts.experiments.options import RunOptions
from parts.experiments.runner import Loader, ModelSpec, load_spec
from parts.progress import Progress

Record = Callable[["Work", Any], None]
SettingT = TypeVar("SettingT")


@runtime_checkable
class Work(Protocol):
    """One setting of a plan. Instances are sent to other processes (Ray): keep them plain data."""

    @property
    def model(self) -> ModelSpec:
        """The model it runs on."""
        ...

    @property
    def label(self) -> str:
        """A short name for progress bars and errors ("sst2 t1 s0")."""
        ...

    def is_done(self, options: RunOptions) -> bool:
        """Whether everything this setting produces is already on disk, with the fingerprint these settings give
        (`parts.experiments.runner.reusable_run` for a run, `parts.experiments.results.rows_reusable` for rows):
        made otherwise, a one-line PartsError, or False with `options.recompute_changed`."""
        ...

    def run(self, model: Callable[[], TransformerBridge], options: RunOptions) -> Any:
        """Compute what is missing (`model()` loads the model on first call) and return the result to record."""
        ...


@dataclass(frozen=True)
class SettingWork(Generic[SettingT]):
    """The plain data of a `Work` item that writes under an output root: the model, the setting, the root.
    Subclasses add `label`, `is_done` and `run`."""

    model: ModelSpec
    setting: SettingT
    root: Path


class LazyModel:
    """Loads the model the first time it is needed, so a finished setting never loads it."""

    def __init__(self, load: Callable[[], TransformerBridge]):
        self._load = load
        self._model: TransformerBridge | None = None

    def __call__(self) -> TransformerBridge:
        if self._model is None:
            self._model = self._load()
        return self._model


@runtime_checkable
class Executor(Protocol):
    """Where a plan's pending settings run: in this process (`LocalExecutor`) or on Ray workers."""

    def run(self, pending: Sequence[Work], options: RunOptions, loader: Loader | None, done: Record,
            bar: Progress) -> None:
        """Run every item of `pending` (grouped by model) and call `done(work, result)` here as each finishes."""
        ...


class LocalExecutor:
    """Runs the settings one after another in this process, one model in memory at a time."""

    def run(self, pending: Sequence[Work], options: RunOptions, loader: Loader | None, done: Record,
            bar: Progress) -> None:
        spec: ModelSpec | None = None
        model: LazyModel | None = None
        for work in pending:
            if work.model != spec:
                spec, model = work.model, None  # drop the previous model before loading the next
                model = LazyModel(partial(load_spec, spec, options, loader))
            assert model is not None
            bar.set_postfix_str(work.label)
            if work.is_done(options):  # another sweep sharing the output root did it meanwhile
                bar.update(1, work.label, "finished by another process")
                continue
            done(work, work.run(model, options))


def by_model(plan: Sequence[Work]) -> list[Work]:
    """The plan grouped by model (models in order of first appearance, settings in plan order within each)."""
    first: dict[ModelSpec, int] = {}
    for work in plan:
        first.setdefault(work.model, len(first))
    return sorted(plan, key=lambda work: first[work.model])


def drive(
    plan: Sequence[Work],
    options: RunOptions,
    *,
    loader: Loader | None = None,
    record: Record | None = None,
    executor: Executor | None = None,
    description: str = "settings",
    unit: str = "setting",
) -> int:
    """Run every unfinished setting of `plan`; returns how many were run.

    `loader` replaces `parts.model.loading.load_model` (same keywords); `record(work, result)` is called
    in this process for each finished setting, in the order they finish.
    """
    pending = by_model([work for work in plan if not work.is_done(options)])
    if not pending:
        return 0
    # On a terminal one bar; in a log or a pipe one plain line per finished setting (`parts.progress`).
    with Progress(len(plan), description, unit, options.progress, initial=len(plan) - len(pending)) as bar:

        def done(work: Work, result: Any) -> None:
            if record is not None:
                record(work, result)
            bar.update(1, work.label)

        (executor or LocalExecutor()).run(pending, options, loader, done, bar)
    return len(pending)


def given_model(model: TransformerBridge) -> Loader:
    """A loader that returns an already loaded model (the notebooks' case): `drive(..., loader=given_model(m))`."""

    def load(*args: Any, **kwargs: Any) -> TransformerBridge:
        return model

    return load
