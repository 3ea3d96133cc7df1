"""Every statistic `parts` reports: tests, multiple-testing corrections and chance yardsticks.

Calling a component good (bad) is a one-sided binomial test of its number of correct answers
against chance (`binomial_p_values`). With ~300 components and alpha = 0.05, an uncorrected test
calls about 12-15 chance-level components good on every run, so p-values are corrected over a
run's components (`adjust_pvalues`): "holm" keeps the chance of even one false call below alpha
(valid for any dependence between components); "bh" (Benjamini-Hochberg) keeps the expected share
of false ones among those called significant below alpha.

One significance rule everywhere (`is_significant`): a p-value is significant when it is strictly
below alpha, the rule `parts analyze` prints ("p < 0.05").

The paper's ORACLE-T1 / ORACLE-B1 are read against `chance_extremes`: the expected best and worst
accuracy of as many chance-level classifiers on as many test examples (exact, from the binomial).

Intervals (`bootstrap_intervals`): 95% percentile intervals for every method's accuracy and every
difference (one method minus each other), per task and for the average over tasks. The runs of a
task (templates x seeds) share one set of test examples and one model, so they are not independent
samples: each bootstrap replicate resamples the task's test examples AND its runs (with
replacement, the same draw for every method, so differences are paired), tasks independently of
each other. The 8-task average is the mean of the per-task means. No p-value treats the settings
of a task as independent.

Plain numbers in, plain numbers out: nothing here reads runs or loads a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
def chance_accuracy(shares: Float[Tensor, "component label"], labels: Int[Tensor, " example"]) -> Float[Tensor, " component"]:
    """Expected accuracy of predictions independent of the gold labels (1/n_labels when balanced):
    sum over labels of the share of examples a component predicts as the label x the label's gold frequency."""
    gold_frequency = torch.bincount(labels, minlength=shares.shape[-1]).double() / len(labels)
    return einops.einsum(shares, gold_frequency, "component label, label -> component")


def binomial_p_values(
    n_correct: Sequence[int], n_examples: int, chance: Sequence[float]
) -> tuple[list[float], list[float]]:
    """One-sided binomial p-values of P(X >= correct) and P(X <= correct) for X ~ Bin(n, chance)."""
    if len(n_correct) != len(chance):
        raise PartsError(f"{len(n_correct)} counts of correct answers for {len(chance)} chance rates: give one each")
    correct, rate = np.asarray(n_correct, dtype=np.int64), np.asarray(chance, dtype=np.float64)
    # One vectorised call per side (elementwise the same as one call per component, ~50x faster for 300).
    above = stats.binom.sf(correct - 1, n_examples, rate).tolist()
    below = stats.binom.cdf(correct, n_examples, rate).tolist()
    return above, below


# -- corrections over components -------------------------------------------------------------------
def holm(pvalues: Float[Tensor, " component"]) -> Float[Tensor, " component"]:
    """Holm-adjusted p-values (step-down): significant adjusted values keep the family-wise error <= alpha, any dependence."""
    m = pvalues.numel()
    order = torch.argsort(pvalues, stable=True)
    scaled = (m - torch.arange(m, dtype=torch.float64)) * pvalues[order].double()
    adjusted = torch.empty(m, dtype=torch.float64)
    adjusted[order] = torch.cummax(scaled, 0).values.clamp(max=1.0)
    return adjusted


def benjamini_hochberg(pvalues: Float[Tensor, " component"]) -> Float[Tensor, " component"]:
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


def adjust_pvalues(pvalues: Float[Tensor, " component"], correction: str = "holm") -> Float[Tensor, " component"]:
    """p-values corrected over all components: "holm", "bh" (Benjamini-Hochberg) or "none"."""
    check_correction(correction)
    if correction == "holm":
        return holm(pvalues)
    if correction == "bh":
        return benjamini_hochberg(pvalues)
    return pvalues.double()


def significant(
    pvalues: Float[Tensor, " component"], alpha: float = 0.05, correction: str = "holm"
) -> Bool[Tensor, " component"]:
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


# -- best and worst of N at chance (the yardsticks of the paper's ORACLE-T1 / ORACLE-B1) -----------------------
def chance_extremes(n_examples: int, n_labels: int, n_classifiers: int) -> tuple[float, float]:
    """Expected (best, worst) accuracy of `n_classifiers` independent classifiers that each answer
    every one of `n_examples` test examples correctly with probability 1 / `n_labels`.

    Each accuracy is Binomial(n, 1/c) / n with CDF F; the best of N has P(max <= k) = F(k)^N, so
    E[max] = sum_{k=0}^{n-1} (1 - F(k)^N) / n, and E[min] = sum_{k=0}^{n-1} (1 - F(k))^N / n.
    """
    if n_examples < 1 or n_labels < 2 or n_classifiers < 1:
        raise PartsError(f"chance_extremes needs n_examples >= 1, n_labels >= 2 and n_classifiers >= 1, got "
                         f"{n_examples}, {n_labels}, {n_classifiers}")
    cdf = stats.binom.cdf(np.arange(n_examples), n_examples, 1 / n_labels)
    worst = float(np.sum((1 - cdf) ** n_classifiers)) / n_examples
    return chance_best_accuracy(n_classifiers, n_examples, 1 / n_labels), worst


# -- hierarchical bootstrap --------------------------------------------------------------------
def _check_correct(task: str, correct: Mapping[str, np.ndarray]) -> tuple[int, int]:
    shapes = {method: np.shape(c) for method, c in correct.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise PartsError(f"task {task}: every method needs a [run, example] correctness array of one shape, got {shapes}: "
                         "give each method the same runs and test examples")
    runs, examples = next(iter(shapes.values()))
    if runs < 1 or examples < 1:
        raise PartsError(f"task {task}: no runs or no test examples to bootstrap")
    return runs, examples


def bootstrap_replicates(
    correct: Mapping[str, Mapping[str, np.ndarray]], n_resamples: int = 2000, seed: int = 0,
    resample_runs: bool = True,
) -> dict[str, dict[str, np.ndarray]]:
    """Bootstrap distributions of every method's mean accuracy, per task.

    `correct[task][method]` is a 0/1 array [run, example]: run r and example e are the same
    (template, seed) and the same test example for every method of the task. A replicate draws
    runs and examples with replacement (once per task, shared by its methods) and takes the mean
    over the drawn run x example grid. Returns `[task][method] -> [n_resamples]` arrays.
    """
    if n_resamples < 1:
        raise PartsError(f"n_resamples must be at least 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    replicates: dict[str, dict[str, np.ndarray]] = {}
    for task, methods in correct.items():
        n_runs, n_examples = _check_correct(task, methods)
        example_draw = rng.integers(0, n_examples, size=(n_resamples, n_examples))
        run_draw = (rng.integers(0, n_runs, size=(n_resamples, n_runs)) if resample_runs
                    else np.broadcast_to(np.arange(n_runs), (n_resamples, n_runs)))
        # how often each example is drawn in each replicate: [resample example]
        counts = np.stack([np.bincount(row, minlength=n_examples) for row in example_draw]).astype(np.float64)
        replicates[task] = {}
        for method, values in methods.items():
            # per replicate and run, the mean over the drawn examples; then the mean over the drawn runs
            per_run = counts @ np.asarray(values, dtype=np.float64).T / n_examples  # [resample run]
            replicates[task][method] = np.take_along_axis(per_run, run_draw, axis=1).mean(axis=1)
    return replicates


def _interval(point: float, draws: np.ndarray, level: float) -> dict[str, float]:
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return {"estimate": point, "low": float(low), "high": float(high)}


def bootstrap_intervals(
    correct: Mapping[str, Mapping[str, np.ndarray]], reference: str | None = None, n_resamples: int = 2000,
    seed: int = 0, level: float = 0.95, average: str = "average",
) -> pd.DataFrame:
    """Percentile intervals of every method's accuracy, and of `reference` minus every other method,
    per task and for the average over tasks (a row with task == `average`, only over tasks that
    have the method). Columns: task, quantity ('accuracy' or 'difference'), method, estimate, low,
    high, runs, examples. Accuracies are fractions (0-1)."""
    if not 0 < level < 1:
        raise PartsError(f"level must be between 0 and 1, got {level}")
    replicates = bootstrap_replicates(correct, n_resamples, seed)
    rows: list[dict[str, object]] = []
    methods = list(dict.fromkeys(m for per_task in correct.values() for m in per_task))
    if reference is not None and reference not in methods:
        raise PartsError(f"reference method {reference!r} is not among the methods {methods}")

    def add(task: str, quantity: str, method: str, point: float, draws: np.ndarray, runs: int, examples: int) -> None:
        rows.append({"task": task, "quantity": quantity, "method": method, **_interval(point, draws, level),
                     "runs": runs, "examples": examples})

    for task, per_task in correct.items():
        runs, examples = _check_correct(task, per_task)
        points = {m: float(np.mean(v)) for m, v in per_task.items()}
        for method in per_task:
            add(task, "accuracy", method, points[method], replicates[task][method], runs, examples)
        if reference is not None and reference in per_task:
            for method in per_task:
                if method != reference:
                    add(task, "difference", f"{reference} - {method}", points[reference] - points[method],
                        replicates[task][reference] - replicates[task][method], runs, examples)
    for method in methods:
        tasks = [t for t in correct if method in correct[t]]
        point = float(np.mean([np.mean(correct[t][method]) for t in tasks]))
        draws = np.mean([replicates[t][method] for t in tasks], axis=0)
        add(average, "accuracy", method, point, draws, sum(len(correct[t][method]) for t in tasks),
            sum(np.shape(correct[t][method])[1] for t in tasks))
        if reference is not None and method != reference:
            both = [t for t in tasks if reference in correct[t]]
            if both:
                point = float(np.mean([np.mean(correct[t][reference]) - np.mean(correct[t][method]) for t in both]))
                draws = np.mean([replicates[t][reference] - replicates[t][method] for t in both], axis=0)
                add(average, "difference", f"{reference} - {method}", point, draws,
                    sum(len(correct[t][method]) for t in both), sum(np.shape(correct[t][method])[1] for t in both))
    return pd.DataFrame(rows, columns=["task", "quantity", "method", "estimate", "low", "high", "runs", "examples"])


def correctness_arrays(frame: pd.DataFrame, run_keys: Sequence[str] = ("template", "seed")
                       ) -> dict[str, dict[str, np.ndarray]]:
    """`bootstrap_intervals`' input from a long table with columns task, method, the `run_keys`,
    and `correct` (a string of 0/1, one per test example, in the task's test-sample order).

    Only runs that every method of the task has are kept, in one order for all methods, so run r
    is the same (template, seed) for every method."""
    missing = [c for c in ("task", "method", "correct", *run_keys) if c not in frame.columns]
    if missing:
        raise PartsError(f"the predictions table lacks column(s) {', '.join(missing)}")
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for task, rows in frame.groupby("task", sort=False):
        per_method = {m: {tuple(r[k] for k in run_keys): r["correct"] for _, r in g.iterrows()}
                      for m, g in rows.groupby("method", sort=False)}
        common = sorted(set.intersection(*(set(v) for v in per_method.values())))
        if not common:
            continue
        arrays[str(task)] = {
            str(m): np.array([[int(ch) for ch in runs[key]] for key in common], dtype=np.int8)
            for m, runs in per_method.items()
        }
    return arrays
