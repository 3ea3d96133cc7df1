"""The statistics module: one significance rule, tested at its boundary."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from parts.analysis.analyze import categorize
from parts.analysis.stats import adjust_pvalues, chance_test_size, is_significant, significant
from parts.errors import PartsError


def test_a_p_value_exactly_at_alpha_is_not_significant():
    assert not is_significant(0.05, 0.05)
    assert is_significant(math.nextafter(0.05, 0.0), 0.05)
    p = torch.tensor([0.05, math.nextafter(0.05, 0.0), 0.5], dtype=torch.float64)
    assert significant(p, 0.05, "none").tolist() == [False, True, False]


def test_categories_follow_the_same_rule():
    table = pd.DataFrame({"label_bias": [0.5, 0.5, 0.5, 0.5], "accuracy": [0.9, 0.9, 0.1, 0.1],
                          "p_above": [0.05, 0.049, 1.0, 1.0], "p_below": [1.0, 1.0, 0.05, 0.049]})
    assert categorize(table, full_accuracy=0.8, alpha=0.05).tolist() == ["neutral", "good", "neutral", "bad"]


def test_chance_test_size_counts_only_outcomes_strictly_below_alpha():
    # Bin(10, 0.5): P(X >= 10) = 1/1024, P(X >= 9) = 11/1024 exactly. At alpha = 11/1024 only 10/10 passes.
    assert chance_test_size(10, 0.5, alpha=11 / 1024) == 1 / 1024
    assert chance_test_size(10, 0.5, alpha=math.nextafter(11 / 1024, 1.0)) == pytest.approx(11 / 1024, abs=1e-15)


def test_an_unknown_correction_is_refused():
    with pytest.raises(PartsError, match="unknown correction 'bonf': use one of holm, bh, none"):
        adjust_pvalues(torch.tensor([0.1]), "bonf")
