"""Controls: how many "good" components chance alone gives, and a randomly initialised model.

Calling a component good is a one-sided binomial test per component (accuracy above chance).
With ~300 components and alpha = 0.05, an uncorrected test calls about 12-15 chance-level
components good on every run, so the significance rule must be corrected over components:
`significant(pvalues, alpha, "holm")` keeps the chance of even one false "good" component
below alpha (valid for any dependence between components); "bh" (Benjamini-Hochberg) keeps
the expected share of false ones among those called good below alpha.

The random-initialisation control decomposes the same prompts with the pretrained model and
with the same architecture and tokenizer re-drawn by its initialiser (`load_model(...,
random_init=True)`), and counts each model's categories (`random_init_control`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from scipy import stats
from torch import Tensor

from parts.decomposition.runs import DecompositionRun
from parts.errors import PartsError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

CORRECTIONS = ("holm", "bh", "none")


# -- per-component tests --------------------------------------------------------------------
def holm(pvalues: Float[Tensor, component]) -> Float[Tensor, component]:
    """Holm-adjusted p-values (step-down): adjusted <= alpha keeps the family-wise error <= alpha, any dependence."""
    m = pvalues.numel()
    order = torch.argsort(pvalues, stable=True)
    scaled = (m - torch.arange(m, dtype=torch.float64)) * pvalues[order].double()
    adjusted = torch.empty(m, dtype=torch.float64)
    adjusted[order] = torch.cummax(scaled, 0).values.clamp(max=1.0)
    return adjusted


def benjamini_hochberg(pvalues: Float[Tensor, component]) -> Float[Tensor, component]:
    """Benjamini-Hochberg-adjusted p-values (step-up): adjusted <= alpha keeps the false discovery rate <= alpha."""
    m = pvalues.numel()
    order = torch.argsort(pvalues, stable=True)
    scaled = m / torch.arange(1, m + 1, dtype=torch.float64) * pvalues[order].double()
    # The running minimum from the largest p-value down.
    from_top = torch.flip(torch.cummin(torch.flip(scaled, [0]), 0).values, [0])
    adjusted = torch.empty(m, dtype=torch.float64)
    adjusted[order] = from_top.clamp(max=1.0)
    return adjusted


def adjust_pvalues(pvalues: Float[Tensor, component], correction: str = "holm") -> Float[Tensor, component]:
    """p-values corrected over all components: "holm", "bh" (Benjamini-Hochberg) or "none"."""
    if correction == "holm":
        return holm(pvalues)
    if correction == "bh":
        return benjamini_hochberg(pvalues)
    if correction == "none":
        return pvalues.double()
    raise PartsError(f"unknown correction {correction!r}: use one of {', '.join(CORRECTIONS)}")


def significant(
    pvalues: Float[Tensor, component], alpha: float = 0.05, correction: str = "holm"
) -> Bool[Tensor, component]:
    """Which p-values are significant at `alpha` after correcting over all components."""
    return adjust_pvalues(pvalues, correction) <= alpha


# -- what chance alone gives ------------------------------------------------------------------
def chance_test_size(n_examples: int, chance: float, alpha: float = 0.05) -> float:
    """The probability that a chance-level component passes the uncorrected one-sided test.

    The binomial is discrete, so this is at most alpha, usually a little less.
    """
    k = np.arange(n_examples + 1)
    passing = stats.binom.sf(k - 1, n_examples, chance) <= alpha
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


# -- categories with and without correction ---------------------------------------------------------
def corrected_component_table(
    run: DecompositionRun, alpha: float = 0.05, correction: str = "holm", label_bias_threshold: float = 0.9
) -> pd.DataFrame:
    """`parts.analysis.analyze.component_table` (categories on corrected p-values) plus `category_uncorrected`."""
    from parts.analysis import analyze as analysis

    table = analysis.component_table(run, label_bias_threshold, alpha, correction)
    table["category_uncorrected"] = analysis.categorize(table, run.full_accuracy, label_bias_threshold, alpha)
    return table


# -- the random-initialisation control --------------------------------------------------------
def control_row(run: DecompositionRun, alpha: float = 0.05, correction: str = "holm") -> dict[str, object]:
    """One run's line of the control table: accuracies and category counts, uncorrected and corrected."""
    chance = 1.0 / len(run.prompts.label_names)
    best_name, best_accuracy = run.top_components(1)[0]
    row: dict[str, object] = {
        "model": run.model,
        "task": run.prompts.task,
        "template": run.prompts.template,
        "seed": run.prompts.seed,
        "n_examples": run.n_examples,
        "full_accuracy": run.full_accuracy,
        "best_component": best_name,
        "best_accuracy": best_accuracy,
        "chance_best_accuracy": chance_best_accuracy(len(run.component_names), run.n_examples, chance),
    }
    from parts.analysis.analyze import CATEGORIES

    table = corrected_component_table(run, alpha, correction)
    for label, column in (("uncorrected", "category_uncorrected"), (correction, "category")):
        for category in CATEGORIES:
            row[f"{category} ({label})"] = int((table[column] == category).sum())
    # Above chance at all (label bias and the full model's accuracy aside): what the random model must lack.
    row["above chance (uncorrected)"] = int((table["p_above"] < alpha).sum())
    row[f"above chance ({correction})"] = int((table["p_above_adjusted"] < alpha).sum())
    return row


def random_init_control(
    tasks: Sequence[str],
    templates: Sequence[int] = (1, 2),
    seeds: Sequence[int] = (0,),
    limit: int | None = 200,
    root: str | Path = "runs/controls",
    model: str | None = None,
    init_seed: int = 0,
    data_dir: str | Path | None = None,
    alpha: float = 0.05,
    correction: str = "holm",
    device: str | None = None,
    batch_size: int = 8,
    load: Callable[..., TransformerBridge] | None = None,
) -> pd.DataFrame:
    """Decompose the same prompts with the pretrained and the randomly initialised model; one row per run.

    Runs are kept under `root` (`parts.experiments.runner.run_dir`), so an interrupted control resumes.
    `load` replaces `parts.model.loading.load_model` (tests pass tiny models).
    """
    from parts.experiments.runner import ensure_run, run_dir
    from parts.model.loading import EMBEDDED_ALIASES, EMBEDDED_MODEL, load_model, random_init_name

    if correction not in CORRECTIONS:
        raise PartsError(f"unknown correction {correction!r}: use one of {', '.join(CORRECTIONS)}")
    loader = load or load_model
    base = EMBEDDED_MODEL if model in EMBEDDED_ALIASES else str(model)
    rows = []
    for random_init, name in ((False, base), (True, random_init_name(base, init_seed))):
        loaded: TransformerBridge | None = None  # loaded only if some run is missing
        for task in tasks:
            for template in templates:
                for seed in seeds:
                    path = run_dir(root, name, task, template, seed, "test", None, limit)
                    if not (path / "summary.json").is_file() and loaded is None:
                        loaded = loader(model, device=device, random_init=random_init, seed=init_seed)
                    run = ensure_run(path, loaded, task=task, template=template, seed=seed, split="test",
                                     limit=limit, data_dir=data_dir, batch_size=batch_size)
                    assert run is not None
                    rows.append({"init": "random" if random_init else "pretrained", **control_row(run, alpha, correction)})
    return pd.DataFrame(rows)
