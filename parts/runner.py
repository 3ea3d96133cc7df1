"""One decomposition from start to end: task and template -> prompts -> model -> saved run."""

from __future__ import annotations

from pathlib import Path

from transformer_lens.model_bridge import TransformerBridge

from parts.decompose import Decomposer
from parts.models import model_name
from parts.prompts import PromptSet, build_prompts, label_token_ids
from parts.results import DecompositionRun
from parts.tasks import Task, get_task


def run_decomposition(
    model: TransformerBridge,
    prompts: PromptSet,
    batch_size: int = 8,
    prefix_reuse: bool = True,
    progress: bool = True,
) -> DecompositionRun:
    """Decompose every prompt of a prompt set with a loaded model."""
    ids = label_token_ids(model.tokenizer, prompts.label_words)
    decomposer = Decomposer(model, ids)
    decomposition = decomposer(
        prompts.prompts,
        batch_size=batch_size,
        prefix_reuse=prefix_reuse,
        progress=progress,
        description=f"{prompts.task} t{prompts.template} s{prompts.seed} {prompts.split}",
    )
    info = {"dtype": str(model.W_U.dtype).replace("torch.", ""), "prefix_reuse": prefix_reuse}
    return DecompositionRun.from_decomposition(
        model_name(model), prompts, ids, decomposer.component_names, decomposer.n_layers,
        decomposer.n_heads, decomposition, **info,
    )


def decompose_task(
    model: TransformerBridge,
    task: str | Task,
    template: int = 1,
    seed: int = 0,
    shots: int | None = None,
    split: str = "test",
    limit: int | None = None,
    data_dir: str | Path | None = None,
    batch_size: int = 8,
    prefix_reuse: bool = True,
    progress: bool = True,
) -> DecompositionRun:
    """Build the prompts of (task, template, seed, split) and decompose them."""
    task = get_task(task) if not isinstance(task, Task) else task
    prompts = build_prompts(task, template, seed, shots, split, limit, data_dir)
    return run_decomposition(model, prompts, batch_size, prefix_reuse, progress)


def model_slug(name: str | None) -> str:
    """A folder name for a model: the embedded default, or the hub name with '/' replaced."""
    from parts.models import EMBEDDED_ALIASES, EMBEDDED_MODEL

    label = EMBEDDED_MODEL if name in EMBEDDED_ALIASES else str(name)
    return label.replace("/", "--").replace(" ", "_")


def run_dir(
    root: str | Path,
    model: str | None,
    task: str | Task,
    template: int,
    seed: int,
    split: str = "test",
    shots: int | None = None,
    limit: int | None = None,
) -> Path:
    """Where a sweep keeps one run: `root/<model>/<task>/t{template}-s{seed}-k{shots}-{split}-n{limit}`.

    Every setting that changes the numbers is in the path, so a finished folder can be reused.
    """
    task = get_task(task) if not isinstance(task, Task) else task
    shots = task.default_shots if shots is None else shots
    size = "all" if limit is None else str(limit)
    return Path(root) / model_slug(model) / task.name / f"t{template}-s{seed}-k{shots}-{split}-n{size}"


def ensure_run(
    path: str | Path,
    model: TransformerBridge | None,
    load: bool = True,
    **settings: object,
) -> DecompositionRun | None:
    """The finished run at `path`, or run it now (`settings` as for `decompose_task`) and save it.

    A folder counts as finished only if it loads (runs are saved atomically), so an interrupted
    sweep reruns exactly what it had not finished. With `load=False` a finished run is not read.
    """
    from parts.errors import PartsError

    path = Path(path)
    if (path / "summary.json").is_file():
        if not load:
            return None
        try:
            return DecompositionRun.load(path)
        except PartsError:
            pass  # damaged or from another version: run it again
    if model is None:
        raise ValueError("a model is needed to run a missing decomposition")
    result = decompose_task(model, **settings)  # type: ignore[arg-type]
    result.save(path)
    return result
