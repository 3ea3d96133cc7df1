"""One head up close (figure 6): its label-word logits and where it looks from the last token.

The logits come from a saved run (no model needed). The attention pattern needs the model: a
`run_with_cache` filtered to the one `blocks.{layer}.attn.hook_pattern` it reads, one prompt at a
time, keeping only the last token's row for the chosen head. The demonstrations' label words
are located in the prompt text (each demonstration ends with its label word, then the
separator) and mapped to token positions through the tokenizer's character offsets.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from parts.analysis.analyze import component_table
from parts.components import MLP, parse_component
from parts.data.tasks import get_task
from parts.decomposition.runs import DecompositionRun
from parts.errors import PartsError


@dataclass(frozen=True)
class AttentionView:
    """Where a head looks from the last token of one prompt."""

    example: int  # index of the example in the run
    gold: int  # its gold label
    tokens: list[str]  # every position's token, as text
    pattern: Float[Tensor, " pos"]  # attention from the last position, sums to 1
    label_positions: list[int]  # positions of the demonstrations' label words


@dataclass(frozen=True)
class HeadInspection:
    """Everything figure 6 draws about one head."""

    component: str
    layer: int
    head: int
    accuracy: float
    label_bias: float
    category: str
    label_names: tuple[str, ...]
    logits: Float[Tensor, "example label"]  # the head's direct contribution to each label word's logit
    labels: Int[Tensor, " example"]  # gold labels
    attention: list[AttentionView]


def head_logits(run: DecompositionRun, component: str) -> Float[Tensor, "example label"]:
    """One component's label-word logits on every example of a run."""
    return run.component_logits[:, run.component_index(component), :]


def demonstration_label_spans(prompt: str, label_words: Sequence[str], separator: str = "\n", tail: str = ""
                              ) -> list[tuple[int, int]]:
    """Character spans of the label words that end a demonstration: a label word right after the
    template's literal `tail` (its text after the last field, e.g. "\nSentiment:") and right before
    the `separator`, so a label word inside an example's own text is not taken for one."""
    # Longest first, so a label word that is a prefix of another cannot take its place.
    words = "|".join(re.escape(w) for w in sorted(label_words, key=len, reverse=True))
    after = f"(?<={re.escape(tail)})" if tail else ""
    return [m.span() for m in re.finditer(f"{after}(?:{words})(?={re.escape(separator)})", prompt)]


def _template_tail(text: str) -> str:
    """A template's literal text after its last field (where the label word follows)."""
    return text[text.rfind("}") + 1:] if "}" in text else text


def spans_to_positions(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """The last token overlapping each character span (label words are single tokens)."""
    positions = []
    for start, end in spans:
        overlapping = [pos for pos, (a, b) in enumerate(offsets) if a < end and b > start]
        if overlapping:
            positions.append(overlapping[-1])
    return positions


def attention_from_last_token(
    model: TransformerBridge, token_ids: Sequence[int], layer: int, head: int
) -> Float[Tensor, " pos"]:
    """One head's attention from the last position over a prompt (one filtered forward pass)."""
    if not 0 <= layer < model.cfg.n_layers or not 0 <= head < model.cfg.n_heads:
        raise PartsError(
            f"L{layer}H{head} is not in this model ({model.cfg.n_layers} layers x {model.cfg.n_heads} heads): "
            "choose a head from the run's component names"
        )
    hook = f"blocks.{layer}.attn.hook_pattern"
    tokens = torch.tensor([list(token_ids)], device=model.W_U.device)
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name == hook)
    pattern: Float[Tensor, "batch head query key"] = cache[hook]
    return pattern[0, head, -1].float().cpu()


def attention_view(model: TransformerBridge, run: DecompositionRun, example: int, layer: int, head: int) -> AttentionView:
    """The attention of one head from the last token of one of the run's prompts."""
    if not 0 <= example < run.n_examples:
        raise PartsError(f"example {example} is not in this run of {run.n_examples} examples: choose 0-{run.n_examples - 1}")
    prompt = run.prompts.prompts[example]
    encoded = model.tokenizer(prompt, return_offsets_mapping=True)
    token_ids = list(encoded["input_ids"])
    pattern = attention_from_last_token(model, token_ids, layer, head)
    try:
        template = get_task(run.prompts.task).template(run.prompts.template)
        separator, tail = template.separator, _template_tail(template.text)
    except PartsError:  # a user task known only by name: the default separator, no tail check
        separator, tail = "\n", ""
    spans = demonstration_label_spans(prompt, run.prompts.label_words, separator, tail)
    return AttentionView(
        example=example,
        gold=run.prompts.labels[example],
        tokens=[model.tokenizer.decode([t]) for t in token_ids],
        pattern=pattern,
        label_positions=spans_to_positions(encoded["offset_mapping"], spans),
    )


def inspect_head(
    run: DecompositionRun,
    component: str,
    model: TransformerBridge | None = None,
    examples: Sequence[int] = (0,),
    table: pd.DataFrame | None = None,
) -> HeadInspection:
    """Figure 6's data for one head of a run; attention only when a model is given.

    `table` is the run's `parts.analysis.analyze.component_table` (computed here when not given), the
    source of the head's label-bias score and category.
    """
    kind, layer, head = parse_component(component)
    if kind == MLP:
        raise PartsError(f"{component} is an MLP and has no attention pattern: choose a head like L3H5")
    if table is None:
        table = component_table(run)
    row = table.loc[table["component"] == component]
    if row.empty:
        raise PartsError(f"no component {component!r} in the table: names look like L0H0")
    attention = [attention_view(model, run, e, layer, head) for e in examples] if model is not None else []
    return HeadInspection(
        component=component,
        layer=layer,
        head=head,
        accuracy=float(row["accuracy"].iloc[0]),
        label_bias=float(row["label_bias"].iloc[0]),
        category=str(row["category"].iloc[0]),
        label_names=tuple(run.prompts.label_names),
        logits=head_logits(run, component),
        labels=run.labels,
        attention=attention,
    )


def top_attended(view: AttentionView, k: int = 5) -> pd.DataFrame:
    """The k positions a head attends to most from the last token, with their tokens."""
    order = torch.argsort(view.pattern, descending=True, stable=True)[:k].tolist()
    marked = set(view.label_positions)
    return pd.DataFrame({
        "position": order,
        "token": [view.tokens[p] for p in order],
        "attention": [float(view.pattern[p]) for p in order],
        "demonstration_label_word": [p in marked for p in order],
    })


def pick_heads(table: pd.DataFrame) -> dict[str, str]:
    """A head worth a look of each kind: the most accurate 'good' head (else the most accurate head)
    and the most one-sided 'label-biased' head, when there is one."""
    heads = table[table["kind"] == "head"]
    good = heads[heads["category"] == "good"]
    picked = {"good": str((good if len(good) else heads).sort_values("accuracy", ascending=False, kind="stable")
                          ["component"].iloc[0])}
    biased = heads[heads["category"] == "label-biased"]
    if len(biased):
        picked["label-biased"] = str(biased.sort_values("label_bias", ascending=False, kind="stable")["component"].iloc[0])
    return picked
