"""Calibration baselines on the full model's label-word probabilities.

- Calib+ (the paper's): one learned weight per class, trained on the labelled examples with
  `parts.reweighting.reweight.train_weights`: class c is a "component" whose logit for label c is the
  probability of c and 0 elsewhere, so the prediction is argmax_label v[label] * p[label]. As in
  the public code (`train_calib.py`) the class weights are not clipped, have no L1 term and may
  train for up to 5000 epochs; the rest of the recipe (SGD, lr 0.05, stopping) is shared.
- Contextual calibration (Zhao et al., 2021): the label prior is the mean probability over
  content-free inputs ("N/A", "", "[MASK]" in every field of the template, after the same
  demonstrations); predict argmax p / prior (their W = diag(prior)^-1, b = 0).
- Batch calibration (Zhou et al., 2024): the prior is the mean probability over the test batch
  itself; predict argmax p - prior (their linear decision boundary, in probability space).

Probabilities are the softmax over the label words only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from parts.data.prompts import render_prompt
from parts.data.tasks import Example, Template
from parts.errors import PartsError
from parts.reweighting.reweight import ReweightResult, predict, train_weights

CONTENT_FREE = ("N/A", "", "[MASK]")


def label_probabilities(label_logits: Float[Tensor, "example label"]) -> Float[Tensor, "example label"]:
    """Softmax over the label words only, in float32."""
    return label_logits.float().softmax(-1)


# -- Calib+ ---------------------------------------------------------------------------------------
def class_components(probabilities: Float[Tensor, "example label"]) -> Float[Tensor, "example component label"]:
    """One component per class: component c gives p[c] to label c and 0 to every other label."""
    identity = torch.eye(probabilities.shape[-1], dtype=probabilities.dtype, device=probabilities.device)
    return einops.einsum(probabilities, identity, "example component, component label -> example component label")


CALIB_PLUS_RECIPE: dict[str, Any] = {"clip": False, "l1_penalty": 0.0, "max_epochs": 5000}


def train_calib_plus(train_logits: Float[Tensor, "example label"], labels: Int[Tensor, " example"],
                     **recipe: Any) -> ReweightResult:
    """Per-class weights on the full model's probabilities (`recipe` overrides `CALIB_PLUS_RECIPE`)."""
    settings = {**CALIB_PLUS_RECIPE, **recipe}
    return train_weights(class_components(label_probabilities(train_logits)), labels, **settings)


def calib_plus_predict(class_weights: Float[Tensor, " label"], label_logits: Float[Tensor, "example label"]
                       ) -> Int[Tensor, " example"]:
    """Calib+'s prediction: the learned per-class weights applied to the label probabilities."""
    return predict(class_weights, class_components(label_probabilities(label_logits)), clip=False)


# -- Contextual calibration -------------------------------------------------------------------------
def content_free_example(example: Example, fields: Sequence[str], text: str) -> Example:
    """`example` with every field the template reads replaced by `text` (a list field by a list of it)."""
    blank = dict(example)
    for name in fields:
        value = example.get(name)
        blank[name] = [text] * len(value) if isinstance(value, list | tuple) else text
    return blank


def content_free_prompts(template: Template, demonstrations: Sequence[Example],
                         inputs: Sequence[str] = CONTENT_FREE) -> list[str]:
    """The content-free queries, after the same demonstrations and through the same template."""
    if not demonstrations:
        raise PartsError("contextual calibration needs the run's demonstrations (got none): use --shots 1 or more")
    fields = template.fields
    return [render_prompt(template, demonstrations, content_free_example(demonstrations[0], fields, text))
            for text in inputs]


def contextual_prior(content_free_logits: Float[Tensor, "input label"]) -> Float[Tensor, " label"]:
    """The label prior the content-free inputs reveal: their mean label probabilities."""
    return einops.reduce(label_probabilities(content_free_logits), "input label -> label", "mean")


def contextual_predict(label_logits: Float[Tensor, "example label"], prior: Float[Tensor, " label"]
                       ) -> Int[Tensor, " example"]:
    """argmax p / prior: dividing out the label prior the content-free inputs reveal."""
    return (label_probabilities(label_logits) / einops.rearrange(prior, "label -> 1 label")).argmax(-1)


# -- Batch calibration ------------------------------------------------------------------------------
def batch_prior(label_logits: Float[Tensor, "example label"]) -> Float[Tensor, " label"]:
    """The label prior estimated from the test batch itself: its mean label probabilities."""
    return einops.reduce(label_probabilities(label_logits), "example label -> label", "mean")


def batch_predict(label_logits: Float[Tensor, "example label"]) -> Int[Tensor, " example"]:
    """argmax p - mean_batch p: the prior estimated from the test batch itself."""
    prior = batch_prior(label_logits)
    return (label_probabilities(label_logits) - einops.rearrange(prior, "label -> 1 label")).argmax(-1)
