"""Exact source attribution: a head's direct label-word logits split over the positions it reads.

At the last prompt token a head writes `sum_source pattern[source] * value[source] @ W_O[head]`.
The readout (parts.model.readout) sends that output to the label words through the frozen final-norm
and post-attention-norm scales, which are linear once frozen, so each source position's term reaches
the logits on its own:

    source_logits[example, head, source, label] = pattern[source] * value[source] @ head_unembed / scale

and, summed over sources, they equal the head's entry of the component logits. The value vectors
keep any value-projection bias (it is part of every position's value, weighted by its attention);
an output-projection bias belongs to no head (it is in the remainder), so it is not a source.

The pattern is what the model computes (soft-caps, ALiBi, sinks, sliding windows included): the
engine runs the model's own eager attention and records the last query's row, and the value vectors
as the KV cache hands them to attention (the reused prefix's and each batch's own). Every batch is
checked: a head whose sources do not sum to its direct effect is an error, never a wrong split.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from parts.components import EXPERT, MLP, head_name, parse_component
from parts.decomposition.decompose import Decomposer, PlannedBatches
from parts.decomposition.exactness import reconstruction_tolerance
from parts.errors import PartsError
from parts.model.engines import pattern_name, values_name
from parts.model.loading import plain_model
from parts.model.readout import Activations
from parts.progress import bar_disabled

# Largest |sum over sources - direct effect| / max(1, |logit|) accepted in float32 (measured below 1e-6);
# other dtypes: the decomposition's own tolerance.
SOURCE_TOLERANCE = {"float32": 1e-5, "float64": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}


@dataclass
class SourceAttribution:
    """Heads' direct label-word logits split over the prompt positions they read (plain data).

    Tensors are position-aligned: source `s` of example `e` is token `s` of `token_ids[e]`; entries past a
    prompt's end are zero.
    """

    heads: list[str]
    token_ids: list[list[int]]
    logits: Float[Tensor, "example head source label"]  # each source's share of the head's direct logits
    attention: Float[Tensor, "example head source"]  # the head's attention from the last token
    direct: Float[Tensor, "example head label"]  # the heads' direct effect (their component logits)

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.token_ids]

    @property
    def max_error(self) -> float:
        """Largest |sum over sources - direct effect| over examples, heads and labels."""
        total = einops.reduce(self.logits, "example head source label -> example head label", "sum")
        return float((total - self.direct).abs().max()) if self.direct.numel() else 0.0

    def head_index(self, head: str) -> int:
        try:
            return self.heads.index(head)
        except ValueError:
            raise PartsError(f"{head} was not attributed: choose one of {', '.join(self.heads)}") from None


def check_heads(heads: Sequence[str], n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """(layer, head) of each named head, or a one-line error naming the valid range."""
    if not heads:
        raise PartsError("no heads to attribute: name at least one, like L0H0")
    located = []
    for name in heads:
        kind, layer, head = parse_component(name)
        if kind in (MLP, EXPERT):
            raise PartsError(f"{name} is an MLP: only attention heads read source positions; choose a head "
                             f"L0H0-L{n_layers - 1}H{n_heads - 1}")
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise PartsError(f"{name} is not in this model ({n_layers} layers x {n_heads} heads): choose a head "
                             f"L0H0-L{n_layers - 1}H{n_heads - 1}")
        located.append((layer, head))
    return located


def attribute_sources(
    decomposer: Decomposer, prompts: Sequence[str], heads: Sequence[str], batch_size: int | str | None = 8,
    prefix_reuse: bool = True, progress: bool = False, token_lists: Sequence[Sequence[int]] | None = None,
) -> SourceAttribution:
    """Split the direct effect of `heads` ("L14H2", ...) on every prompt over the positions each head reads.

    `token_lists`: the token ids a run recorded (else the prompts are tokenised as a decomposition does).
    Raises when a head's sources do not sum to its direct effect (a family whose attention parts cannot read).
    """
    located = check_heads(heads, decomposer.n_layers, decomposer.n_heads)
    if not prompts:
        raise PartsError("no prompts to attribute")
    token_lists = [list(t) for t in token_lists] if token_lists is not None else decomposer.tokenize(prompts)
    layers = sorted({layer for layer, _ in located})
    by_layer = {layer: [head for l2, head in located if l2 == layer] for layer in layers}
    columns = {layer: [located.index((layer, head)) for head in by_layer[layer]] for layer in layers}
    n, n_labels = len(token_lists), len(decomposer.label_token_ids)
    longest = max(len(t) for t in token_lists)
    logits = torch.zeros(n, len(located), longest, n_labels)
    attention = torch.zeros(n, len(located), longest)
    direct = torch.zeros(n, len(located), n_labels)
    model_logits = torch.zeros(n, n_labels)
    readout = decomposer.readout
    head_columns = [decomposer.component_names.index(head_name(layer, head)) for layer, head in located]
    batches = PlannedBatches(decomposer, token_lists, batch_size, prefix_reuse)
    prefix = batches.prefix_length
    with decomposer.engine.sources(layers), tqdm(total=n, desc="attributing", disable=bar_disabled(progress),
                                                 unit="prompt") as bar:
        for rows, batch_logits, activations in _checked(batches):
            component_logits, _, batch_model_logits = readout.split(activations, batch_logits)
            direct[rows] = component_logits[:, head_columns].float().cpu()
            model_logits[rows] = batch_model_logits.float().cpu()
            for layer in layers:
                if values_name(layer) not in activations:
                    raise PartsError("this engine hands the model's attention no KV cache for this family, so the "
                                     "values its heads read cannot be captured: use --engine hf")
                pattern, values = activations[pattern_name(layer)], activations[values_name(layer)]
                keys = pattern.shape[-1]
                if values.shape[2] != keys or keys < max(len(token_lists[r]) for r in rows):
                    raise PartsError(f"layer {layer}'s attention reads {values.shape[2]} values over {keys} keys for "
                                     f"prompts of {max(len(token_lists[r]) for r in rows)} tokens: this family is "
                                     "not supported by source attribution")
                split = readout.source_logits(activations, layer, by_layer[layer], pattern, values).float().cpu()
                weights = pattern[:, by_layer[layer]].float().cpu()
                for i, row in enumerate(rows):
                    # Left padding: the prompt's own suffix tokens are the batch's last keys.
                    suffix = len(token_lists[row]) - prefix
                    real = torch.cat([torch.arange(prefix), torch.arange(keys - suffix, keys)])
                    logits[row, columns[layer], : len(real)] = split[i][:, real]
                    attention[row, columns[layer], : len(real)] = weights[i][:, real]
            bar.update(len(rows))
    result = SourceAttribution(list(heads), token_lists, logits, attention, direct)
    dtype = str(decomposer.dtype).removeprefix("torch.")
    check_sources(result, dtype)
    # The capture runs eager attention with a KV cache: check it is the model's own forward on one prompt.
    # The prompt checked is the one padded most in its batch (MPT's ALiBi, for one, is placed otherwise once a
    # cache is given, and only padded prompts show it).
    padding = {batches.order[row]: len(batches.suffixes[start]) - len(batches.suffixes[row])
               for start in range(0, n, batches.batch_size) for row in range(start, min(start + batches.batch_size, n))}
    example = max(padding, key=lambda i: padding[i])
    alone = decomposer([prompts[example]], batch_size=1, prefix_reuse=False, progress=False)
    scale = float(alone.model_logits.abs().max().clamp(min=1.0))
    if float((alone.model_logits[0] - model_logits[example]).abs().max()) / scale > reconstruction_tolerance(dtype):
        raise PartsError("this model's logits change when its attention is captured (eager attention with a KV "
                         "cache), so its heads cannot be split by source: source attribution does not support "
                         f"{type(plain_model(decomposer.model)).__name__}")
    return result


def _checked(batches: PlannedBatches) -> Iterator[tuple[list[int], Tensor, Activations]]:
    """The batches, with a model whose own eager attention fails refused in one line."""
    iterator = iter(batches)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except RuntimeError as err:  # raised inside the model's own attention code
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise PartsError(f"this model's eager attention fails ({reason}), so its heads cannot be split by "
                             "source: source attribution does not support this family") from err
        yield item


def check_sources(result: SourceAttribution, dtype: str = "float32") -> None:
    """Stop unless every head's sources sum to its direct effect (relative to the logits' size)."""
    total = einops.reduce(result.logits, "example head source label -> example head label", "sum")
    scale = result.direct.abs().amax(-1, keepdim=True).clamp(min=1.0)
    error = ((total - result.direct).abs() / scale).amax(-1)  # example head
    worst = float(error.max()) if error.numel() else 0.0
    if worst > SOURCE_TOLERANCE.get(dtype, 1e-2):
        example, head = divmod(int(error.argmax()), error.shape[1])
        raise PartsError(f"{result.heads[head]}'s sources do not sum to its direct effect on prompt {example} "
                         f"(relative error {worst:.1e}): this model's attention is not split exactly; "
                         "report it with the model's name")
