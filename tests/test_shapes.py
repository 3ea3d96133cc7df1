"""The jaxtyping shapes in parts are checked while the tests run (tests/conftest.py installs jaxtyping's
import hook with beartype over the package): a wrong shape or dtype fails the call, not a later line."""

from __future__ import annotations

import pytest
import torch
from jaxtyping import TypeCheckError

from parts.decomposition.runs import Decomposition, reconstruction_error
from parts.reweighting.reweight import predict


def test_matching_shapes_pass():
    logits = torch.zeros(2, 3, 4)  # example component label
    assert reconstruction_error(logits, torch.zeros(2, 4), torch.zeros(2, 4)).tolist() == [0.0, 0.0]
    assert predict(torch.ones(3), logits).tolist() == [0, 0]


def test_an_axis_that_disagrees_between_arguments_fails():
    # 2 examples in the component logits, 3 in the remainder
    with pytest.raises(TypeCheckError, match="remainder"):
        reconstruction_error(torch.zeros(2, 3, 4), torch.zeros(3, 4), torch.zeros(2, 4))
    # 5 weights for 3 components
    with pytest.raises(TypeCheckError, match="weights"):
        predict(torch.ones(5), torch.zeros(2, 3, 4))


def test_a_wrong_rank_or_dtype_fails():
    with pytest.raises(TypeCheckError, match="component_logits"):
        predict(torch.ones(3), torch.zeros(2, 3))  # no label axis
    with pytest.raises(TypeCheckError, match="weights"):
        predict(torch.ones(3, dtype=torch.long), torch.zeros(2, 3, 4))  # integer weights


def test_dataclass_fields_are_checked():
    with pytest.raises(TypeCheckError):
        Decomposition(torch.zeros(2, 3, 4), torch.zeros(2, 5), torch.zeros(2, 4))  # 5 labels beside 4


def test_unchecked_shapes_turns_the_checker_off(unchecked_shapes):
    # As a user runs parts: no checker, so a function's own checks (or torch) meet the bad input.
    with pytest.raises(RuntimeError):
        predict(torch.ones(5), torch.zeros(2, 3, 4))
