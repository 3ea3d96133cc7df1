"""Where a report's top heads look: attention from the last token, for `parts report --attention`.

The only part of a report that needs the model (one filtered forward pass per head and example,
`parts.analysis.inspect_head.attention_view`). Examples are the reference run's first test
example of each gold label, up to `examples` of them; tokens are stored once per example.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformer_lens.model_bridge import TransformerBridge

from parts.analysis.inspect_head import attention_view
from parts.components import parse_component
from parts.decomposition.runs import DecompositionRun
from parts.report.data import DIGITS, TaskRuns


def example_choice(run: DecompositionRun, examples: int) -> list[int]:
    """The first example of each gold label in turn (label 0, 1, ..., then again), `examples` of them."""
    labels = run.prompts.labels
    by_label = [[i for i, gold in enumerate(labels) if gold == label] for label in range(len(run.prompts.label_names))]
    chosen: list[int] = []
    for rank in range(len(labels)):
        for indices in by_label:
            if rank < len(indices) and len(chosen) < examples:
                chosen.append(indices[rank])
    return sorted(chosen)


def attention_data(model: TransformerBridge, task: TaskRuns, heads: Sequence[str], examples: int = 3) -> dict[str, Any]:
    """The attention of `heads` from the last token of a few of the task's reference run's prompts:
    {run, examples: [{example, gold, tokens, label_positions}], heads: {head: [pattern per example]}}."""
    run = task.reference
    chosen = example_choice(run, examples)
    shown: list[dict[str, Any]] = []
    patterns: dict[str, list[list[float]]] = {head: [] for head in heads}
    for example in chosen:
        for head in heads:
            component = parse_component(head)
            view = attention_view(model, run, example, component.layer, component.head)
            patterns[head].append([round(float(a), DIGITS) for a in view.pattern])
        shown.append({"example": example, "gold": run.prompts.label_names[view.gold], "tokens": view.tokens,
                      "label_positions": view.label_positions})
    return {"run": 0, "examples": shown, "heads": patterns}
