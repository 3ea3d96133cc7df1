"""Calibration baselines on hand-made label probabilities with answers worked out by hand."""

from __future__ import annotations

import pytest
import torch

from parts.data.tasks import Template
from parts.errors import PartsError
from parts.reweighting.calibration import (
    batch_predict,
    batch_prior,
    calib_plus_predict,
    class_components,
    content_free_example,
    content_free_prompts,
    contextual_predict,
    contextual_prior,
    train_calib_plus,
)

# Logits whose softmax over the label words is exactly these probabilities.
PROBABILITIES = torch.tensor([[0.6, 0.4], [0.72, 0.28], [0.8, 0.2]])
LOGITS = PROBABILITIES.log()


def test_contextual_calibration_divides_out_the_content_free_prior():
    content_free = torch.tensor([[0.75, 0.25], [0.65, 0.35]]).log()
    prior = contextual_prior(content_free)
    assert prior.tolist() == pytest.approx([0.7, 0.3])
    # p / prior: [0.857, 1.333] -> 1; [1.029, 0.933] -> 0; [1.143, 0.667] -> 0
    assert contextual_predict(LOGITS, prior).tolist() == [1, 0, 0]
    # uncalibrated, all three say label 0
    assert LOGITS.argmax(-1).tolist() == [0, 0, 0]


def test_batch_calibration_subtracts_the_batch_mean():
    prior = batch_prior(LOGITS)
    assert prior.tolist() == pytest.approx([2.12 / 3, 0.88 / 3])
    # p - prior: [-0.107, +0.107] -> 1; [+0.013, -0.013] -> 0; [+0.093, -0.093] -> 0
    assert batch_predict(LOGITS).tolist() == [1, 0, 0]


def test_batch_calibration_of_a_balanced_batch_changes_nothing():
    logits = torch.tensor([[0.9, 0.1], [0.1, 0.9]]).log()  # mean [0.5, 0.5]
    assert batch_predict(logits).tolist() == [0, 1]


def test_class_components_put_each_probability_on_its_own_label():
    components = class_components(torch.tensor([[0.6, 0.4]]))
    assert torch.equal(components, torch.tensor([[[0.6, 0.0], [0.0, 0.4]]]))


def test_calib_plus_learns_to_favour_the_underpredicted_class():
    # The model leans to label 0 on both examples; a weight ratio v0 / v1 in (0.25, 0.667) gets both right.
    logits = torch.tensor([[0.8, 0.2], [0.6, 0.4]]).log()
    labels = torch.tensor([0, 1])
    assert logits.argmax(-1).tolist() == [0, 0]
    result = train_calib_plus(logits, labels)
    assert result.stopped_because == "perfect" and result.train_accuracy == 1.0
    v0, v1 = result.weights.tolist()
    assert 0.25 < v0 / v1 < 2 / 3
    assert v1 > 1.0  # class weights are not clipped (as in the public code)
    assert calib_plus_predict(result.weights, logits).tolist() == [0, 1]


def test_content_free_prompts_follow_template_and_demonstrations():
    template = Template("Review: {text}\nSentiment:", (" negative", " positive"))
    demonstrations = [{"text": "great fun", "label": 1}, {"text": "dull", "label": 0}]
    prompts = content_free_prompts(template, demonstrations)
    shown = "Review: great fun\nSentiment: positive\nReview: dull\nSentiment: negative\n"
    assert prompts == [shown + "Review: N/A\nSentiment:", shown + "Review: \nSentiment:", shown + "Review: [MASK]\nSentiment:"]


def test_content_free_inputs_fill_every_field_and_list_fields():
    example = {"question": "Why?", "choices": ["a", "b", "c"], "label": 2, "id": "x"}
    blank = content_free_example(example, ["choices", "question"], "N/A")
    assert blank == {"question": "N/A", "choices": ["N/A", "N/A", "N/A"], "label": 2, "id": "x"}
    template = Template("Q: {question}\nA. {choices[0]}\nB. {choices[1]}\nAnswer:", (" A", " B"))
    assert content_free_prompts(template, [{"question": "Why?", "choices": ["a", "b"], "label": 0}], ["[MASK]"]) == [
        "Q: Why?\nA. a\nB. b\nAnswer: A\nQ: [MASK]\nA. [MASK]\nB. [MASK]\nAnswer:"
    ]


def test_content_free_prompts_need_demonstrations():
    with pytest.raises(PartsError, match="needs the run's demonstrations"):
        content_free_prompts(Template("{text}:", (" a", " b")), [])
