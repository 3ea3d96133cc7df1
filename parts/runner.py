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
