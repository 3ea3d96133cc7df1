"""Where a report's top heads look: attention from the last token, for `parts report --attention`.

The only part of a report that needs the model (one forward pass per example, cached at its heads' patterns
only: `parts.analysis.inspect_head.heads_attention_from_last_token`). Examples are the reference run's first test
example of each gold label, up to `examples` of them; tokens are stored once per example.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformer_lens.model_bridge import TransformerBridge

from parts.analysis.inspect_head import heads_attention_from_last_token, run_sources, view_tokens
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
    {run, examples: [{example, gold, tokens, label_positions}], heads: {head: [pattern per example]}}, and, where the
    run records its token ids, each token's contribution to each head's vote for the label it predicts
    (`contributions: {head: [votes per example]}`, exact source attribution: the votes sum to the head's own)."""
    run = task.reference
    chosen = example_choice(run, examples)
    contributions: dict[str, list[list[float]]] = {}
    predicted: dict[str, list[str]] = {}
    if run.token_ids is not None:
        attribution = run_sources(model, run, heads, chosen)
        votes = attribution.logits - attribution.logits.mean(-1, keepdim=True)  # example head source label
        for column, head in enumerate(heads):
            labels = attribution.direct[:, column].argmax(-1).tolist()
            predicted[head] = [run.prompts.label_names[label] for label in labels]
            # Four significant digits: contributions are small logits, far below DIGITS' fixed decimals.
            contributions[head] = [[float(f"{float(v):.4g}") for v in votes[row, column, : len(ids), label]]
                                   for row, (ids, label) in enumerate(zip(attribution.token_ids, labels, strict=True))]
    shown: list[dict[str, Any]] = []
    patterns: dict[str, list[list[float]]] = {head: [] for head in heads}
    components = [parse_component(head) for head in heads]
    for example in chosen:  # one forward per example serves every head
        token_ids, tokens, label_positions = view_tokens(model.tokenizer, run, example)
        rows = heads_attention_from_last_token(model, token_ids, [(c.layer, c.head) for c in components])
        for head, pattern in zip(heads, rows, strict=True):
            patterns[head].append([round(float(a), DIGITS) for a in pattern])
        shown.append({"example": example, "gold": run.prompts.label_names[run.prompts.labels[example]],
                      "tokens": tokens, "label_positions": label_positions})
    data: dict[str, Any] = {"run": 0, "examples": shown, "heads": patterns}
    if contributions:
        data["contributions"], data["predicted"] = contributions, predicted
    return data
