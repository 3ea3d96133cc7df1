"""Label-biased masking (beyond the paper): drop the components that answer one label whatever the input.

A component whose own prediction (the argmax of its label-word logits) is the same label on every one of the
L - k labelled training examples is called label-biased here (the paper's rule, `parts.experiments.export.
one_label_count`, applied to the training prompts instead of the test set). The prediction is the argmax of
the sum of the other components' logits: weights of 0 or 1, none learned. It reads the training prompts'
component logits but not their gold labels (the k demonstrations' labels are in every prompt, as for CompRW).

It approximates UniBias (Zhou et al., "UniBias: Unveiling and Mitigating LLM Bias through Internal Attention
and FFN Manipulation", NeurIPS 2024, arXiv:2405.20612), which masks attention heads and FFN value vectors that
push the prediction towards one label; docs/guide/methods.md says where the two differ.
"""

from __future__ import annotations

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from parts.errors import PartsError


def label_biased(component_logits: Float[Tensor, "example component label"]) -> Bool[Tensor, " component"]:
    """Which components predict one and the same label on every example given."""
    if component_logits.ndim != 3 or component_logits.shape[0] == 0:
        raise PartsError(f"label-biased masking needs component logits [example component label] of at least one "
                         f"example, got shape {tuple(component_logits.shape)}")
    predictions = component_logits.argmax(-1)  # example component
    return (predictions == predictions[:1]).all(0)


def masked_logits(keep: Bool[Tensor, " component"], component_logits: Float[Tensor, "example component label"]
                  ) -> Float[Tensor, "example label"]:
    """The sum over the kept components' logits."""
    return einops.einsum(keep.to(component_logits.dtype), component_logits,
                         "component, example component label -> example label")


def mask_biased(train_logits: Float[Tensor, "example component label"]) -> Bool[Tensor, " component"]:
    """The components to keep: every one not label-biased on the training examples (all of them when every
    component is, rather than predicting from an empty sum)."""
    biased = label_biased(train_logits)
    return ~biased if not bool(biased.all()) else torch.ones_like(biased)


def mask_predict(keep: Bool[Tensor, " component"], component_logits: Float[Tensor, "example component label"]
                 ) -> Int[Tensor, " example"]:
    """Each example's label under the masked sum (ties go to the lower label index)."""
    return masked_logits(keep, component_logits).argmax(-1)
