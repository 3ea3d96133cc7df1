"""Every statistic `parts` reports: tests, multiple-testing corrections and chance yardsticks.

Calling a component good (bad) is a one-sided binomial test of its number of correct answers
against chance (`binomial_p_values`). With ~300 components and alpha = 0.05, an uncorrected test
calls about 12-15 chance-level components good on every run, so p-values are corrected over a
run's components (`adjust_pvalues`): "holm" keeps the chance of even one false call below alpha
(valid for any dependence between components); "bh" (Benjamini-Hochberg) keeps the expected share
of false ones among those called significant below alpha.

One significance rule everywhere (`is_significant`): a p-value is significant when it is strictly
below alpha, the rule `parts analyze` prints ("p < 0.05").

Plain numbers in, plain numbers out: nothing here reads runs or loads a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import einops
import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from scipy import stats
from torch import Tensor

from parts.errors import PartsError

CORRECTIONS = ("holm", "bh", "none")


# -- the significance rule ------------------------------------------------------------------------
def is_significant(pvalues: Any, alpha: float) -> Any:
    """The one rule: significant when p < alpha (a p-value exactly at alpha is not), elementwise
    for a tensor, array or Series."""
    return pvalues < alpha


# -- per-component tests ---------------------------------------------------------------------------
def chance_accuracy(shares: Float[Tensor, "component label"], labels: Int[Tensor, example]) -> Float[Tensor, component]:
    """Expected accuracy of predictions independent of the gold labels (1/n_labels when balanced):
    sum over labels of the share of examples a component predicts as the label x the label's gold frequency."""
    gold_frequency = torch.bincount(labels, minlength=shares.shape[-1]).double() / len(labels)
    return einops.einsum(shares, gold_frequency, "component label, label -> component")


def binomial_p_values(
    n_correct: Sequence[int], n_examples: int, chance: Sequence[float]
) -> tuple[list[float], list[float]]:
    """One-sided binomial p-values of P(X >= correct) and P(X <= correct) for X ~ Bin(n, chance)."""
    above = [float(stats.binom.sf(k - 1, n_examples, p)) for k, p in zip(n_correct, chance, strict=True)]
    below = [float(stats.binom.cdf(k, n_examples, p)) for k, p in zip(n_correct, chance, strict=True)]
    return above, below


# -- corrections over components -------------------------------------------------------------------
def holm(pvalues: Float[Tensor, component]) -> Float[Tensor, component]:
    """Holm-adjusted p-values (step-down): significant adjusted values keep the family-wise error <= alpha, any dependence."""
    m = pvalues.numel()
    order = torch.argsort(pvalues, stable=True)
    scaled = (m - torch.arange(m, dtype=torch.float64)) * pvalues[order].double()
    adjusted = torch.empty(m, dtype=torch.float64)
    adjusted[order] = torch.cummax(scaled, 0).values.clamp(max=1.0)
    return adjusted


def benjamini_hochberg(pvalues: Float[Tensor, component]) -> Float[Tensor, component]:
    """Benjamini-Hochberg-adjusted p-values (step-up): significant adjusted values keep the false discovery rate <= alpha."""
    m = pvalues.numel()
    order = torch.argsort(pvalues, stable=True)
    scaled = m / torch.arange(1, m + 1, dtype=torch.float64) * pvalues[order].double()
    # The running minimum from the largest p-value down.
    from_top = torch.flip(torch.cummin(torch.flip(scaled, [0]), 0).values, [0])
    adjusted = torch.empty(m, dtype=torch.float64)
    adjusted[order] = from_top.clamp(max=1.0)
    return adjusted


def check_correction(correction: str) -> None:
    """Refuse an unknown correction name."""
    if correction not in CORRECTIONS:
        raise PartsError(f"unknown correction {correction!r}: use one of {', '.join(CORRECTIONS)}")


def adjust_pvalues(pvalues: Float[Tensor, component], correction: str = "holm") -> Float[Tensor, component]:
    """p-values corrected over all components: "holm", "bh" (Benjamini-Hochberg) or "none"."""
    check_correction(correction)
    if correction == "holm":
        return holm(pvalues)
    if correction == "bh":
        return benjamini_hochberg(pvalues)
    return pvalues.double()


def significant(
    pvalues: Float[Tensor, component], alpha: float = 0.05, correction: str = "holm"
) -> Bool[Tensor, component]:
    """Which p-values are significant at `alpha` after correcting over all components."""
    result = is_significant(adjust_pvalues(pvalues, correction), alpha)
    assert isinstance(result, Tensor)
    return result


# -- what chance alone gives -----------------------------------------------------------------------
def chance_test_size(n_examples: int, chance: float, alpha: float = 0.05) -> float:
    """The probability that a chance-level component passes the uncorrected one-sided test.

    The binomial is discrete, so this is at most alpha, usually a little less.
    """
    k = np.arange(n_examples + 1)
    passing = is_significant(stats.binom.sf(k - 1, n_examples, chance), alpha)
    return float(stats.binom.pmf(k[passing], n_examples, chance).sum())


def expected_false_good(n_components: int, n_examples: int, chance: float, alpha: float = 0.05) -> float:
    """Expected number of chance-level components an uncorrected test calls good (by linearity)."""
    return n_components * chance_test_size(n_examples, chance, alpha)


def chance_false_good_probability(n_components: int, n_examples: int, chance: float, alpha: float = 0.05) -> float:
    """P(at least one of `n_components` independent chance-level components is called good, uncorrected)."""
    return 1.0 - (1.0 - chance_test_size(n_examples, chance, alpha)) ** n_components


def chance_best_accuracy(n_components: int, n_examples: int, chance: float) -> float:
    """Expected accuracy of the best of `n_components` independent chance-level components.

    The yardstick for "best component" numbers chosen on the test set: max of m binomials,
    E[max] = sum over k of P(max >= k) = sum over k >= 1 of 1 - F(k - 1)^m.
    """
    k = np.arange(1, n_examples + 1)
    below = stats.binom.cdf(k - 1, n_examples, chance) ** n_components
    return float((1.0 - below).sum()) / n_examples


def chance_table(
    n_examples: Sequence[int], chances: Sequence[float], n_components: int = 300, alpha: float = 0.05
) -> pd.DataFrame:
    """For each (sample size, chance rate): false "good" components expected without correction."""
    rows = []
    for n in n_examples:
        for chance in chances:
            rows.append({
                "n_examples": n,
                "chance": chance,
                "test_size": chance_test_size(n, chance, alpha),
                "expected_false_good": expected_false_good(n_components, n, chance, alpha),
                "p_any_false_good": chance_false_good_probability(n_components, n, chance, alpha),
                "expected_best_accuracy": chance_best_accuracy(n_components, n, chance),
            })
    return pd.DataFrame(rows)
