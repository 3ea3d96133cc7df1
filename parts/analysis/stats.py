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
of a task as independent. That resample ("runs") treats a task's runs as exchangeable, though they
are templates x seeds; `resample="nested"` is the stricter choice: templates with replacement, then
seeds within each drawn template, then (as before) the test examples.

Spreads over runs (`spread`) are sample standard deviations, ddof = 1 (`DDOF`); the paper's authors'
code uses numpy's default, ddof = 0, smaller by sqrt((n - 1) / n) (0.966 at 15 runs): pass ddof=0 to
compare like with like.

Every number parts prints is rounded by one rule (`rounded`): half away from zero on the decimal value,
so 45.85 is 45.9 whichever way the float came out.

Plain numbers in, plain numbers out: nothing here reads runs or loads a model.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal
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
RESAMPLES = ("runs", "nested")  # what a bootstrap replicate draws besides the test examples
DDOF = 1  # spreads over runs: the sample standard deviation (the authors' code: ddof = 0)


# -- the rounding rule and the spread ----------------------------------------------------------------
def rounded(value: float, digits: int = 1) -> str:
    """`value` to `digits` decimals by the one rule every table uses: half away from zero on the decimal
    value, after dropping float noise below 1e-9 (45.85 -> '45.9', whether computed as 45.8499999999 or
    45.8500000001; Python's format rounds the binary value, half to even); zero unsigned; NaN stays 'nan'."""
    if not np.isfinite(value):
        return str(value)
    result = Decimal(f"{value:.9f}").quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP)
    return str(abs(result) if result == 0 else result)  # no '-0.0


def spread(values: Sequence[float] | np.ndarray | pd.Series, ddof: int = DDOF) -> float:
    """Standard deviation of `values` with `ddof` delta degrees of freedom: 1 (the default) for the sample
    standard deviation, 0 for numpy's default, as in the paper's authors' code."""
    if ddof not in (0, 1):
        raise PartsError(f"ddof must be 0 (the authors' code) or 1 (the sample standard deviation), got {ddof}")
    values = np.asarray(values, dtype=np.float64)
    if len(values) <= ddof:
        raise PartsError(f"a standard deviation with ddof = {ddof} needs more than {ddof} value(s), got {len(values)}")
    return float(np.std(values, ddof=ddof))


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


def check_resample(resample: str) -> None:
    """Refuse an unknown resampling scheme."""
    if resample not in RESAMPLES:
        raise PartsError(f"unknown resample {resample!r}: use one of {', '.join(RESAMPLES)}")


def _nested_draw(rng: np.random.Generator, groups: Sequence[Hashable], n_resamples: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Templates with replacement, then within each drawn template as many of its runs (seeds) with replacement:
    the drawn runs [resample draw] and their weights [resample draw] (each drawn template weighs 1 / n_templates,
    shared among its drawn seeds)."""
    members = [np.flatnonzero([g == group for g in groups]) for group in dict.fromkeys(groups)]
    sizes = np.array([len(m) for m in members])
    padded = np.stack([np.pad(m, (0, sizes.max() - len(m))) for m in members])  # [template seed]
    template_draw = rng.integers(0, len(members), size=(n_resamples, len(members)))
    drawn_sizes = sizes[template_draw][..., None]  # [resample template 1]
    position = np.floor(rng.random((n_resamples, len(members), sizes.max())) * drawn_sizes).astype(np.int64)
    runs = padded[template_draw[..., None], position]  # [resample template seed]
    weights = (np.arange(sizes.max()) < drawn_sizes) / drawn_sizes / len(members)
    return runs.reshape(n_resamples, -1), weights.reshape(n_resamples, -1)


def bootstrap_replicates(
    correct: Mapping[str, Mapping[str, np.ndarray]], n_resamples: int = 2000, seed: int = 0,
    resample_runs: bool = True, resample: str = "runs", groups: Mapping[str, Sequence[Hashable]] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Bootstrap distributions of every method's mean accuracy, per task.

    `correct[task][method]` is a 0/1 array [run, example]: run r and example e are the same
    (template, seed) and the same test example for every method of the task. A replicate draws
    examples with replacement and, with `resample="runs"`, runs with replacement (once per task,
    shared by its methods), and takes the mean over the drawn run x example grid. With
    `resample="nested"`, `groups[task]` gives each run's template: a replicate draws templates, then
    seeds within each drawn template, then examples. `resample_runs=False` keeps every run once.
    Returns `[task][method] -> [n_resamples]` arrays.
    """
    if n_resamples < 1:
        raise PartsError(f"n_resamples must be at least 1, got {n_resamples}")
    check_resample(resample)
    rng = np.random.default_rng(seed)
    replicates: dict[str, dict[str, np.ndarray]] = {}
    for task, methods in correct.items():
        n_runs, n_examples = _check_correct(task, methods)
        example_draw = rng.integers(0, n_examples, size=(n_resamples, n_examples))
        run_weights: np.ndarray | None = None
        if not resample_runs:
            run_draw = np.broadcast_to(np.arange(n_runs), (n_resamples, n_runs))
        elif resample == "runs":
            run_draw = rng.integers(0, n_runs, size=(n_resamples, n_runs))
        else:
            if groups is None or task not in groups or len(groups[task]) != n_runs:
                raise PartsError(f"task {task}: the nested bootstrap needs each of its {n_runs} runs' template "
                                 "(groups[task], one per run, in the arrays' run order)")
            run_draw, run_weights = _nested_draw(rng, groups[task], n_resamples)
        # how often each example is drawn in each replicate: [resample example]
        counts = np.stack([np.bincount(row, minlength=n_examples) for row in example_draw]).astype(np.float64)
        replicates[task] = {}
        for method, values in methods.items():
            # per replicate and run, the mean over the drawn examples; then the mean over the drawn runs
            per_run = counts @ np.asarray(values, dtype=np.float64).T / n_examples  # [resample run]
            drawn = np.take_along_axis(per_run, run_draw, axis=1)
            replicates[task][method] = drawn.mean(axis=1) if run_weights is None else (drawn * run_weights).sum(axis=1)
    return replicates


def _interval(point: float, draws: np.ndarray, level: float) -> dict[str, float]:
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return {"estimate": point, "low": float(low), "high": float(high)}


def bootstrap_intervals(
    correct: Mapping[str, Mapping[str, np.ndarray]], reference: str | None = None, n_resamples: int = 2000,
    seed: int = 0, level: float = 0.95, average: str = "average", resample: str = "runs",
    groups: Mapping[str, Sequence[Hashable]] | None = None,
) -> pd.DataFrame:
    """Percentile intervals of every method's accuracy, and of `reference` minus every other method,
    per task and for the average over tasks (a row with task == `average`, only over tasks that
    have the method). Columns: task, quantity ('accuracy' or 'difference'), method, estimate, low,
    high, runs, examples. Accuracies are fractions (0-1). `resample` and `groups`: as
    `bootstrap_replicates` ("nested" needs each run's template)."""
    if not 0 < level < 1:
        raise PartsError(f"level must be between 0 and 1, got {level}")
    replicates = bootstrap_replicates(correct, n_resamples, seed, resample=resample, groups=groups)
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


def _common_runs(frame: pd.DataFrame, run_keys: Sequence[str]
                 ) -> dict[str, tuple[dict[str, dict[tuple[Any, ...], str]], list[tuple[Any, ...]]]]:
    """Per task: each method's correctness strings by run key, and the run keys every method has (sorted)."""
    missing = [c for c in ("task", "method", "correct", *run_keys) if c not in frame.columns]
    if missing:
        raise PartsError(f"the predictions table lacks column(s) {', '.join(missing)}")
    runs: dict[str, tuple[dict[str, dict[tuple[Any, ...], str]], list[tuple[Any, ...]]]] = {}
    for task, rows in frame.groupby("task", sort=False):
        per_method = {str(m): {tuple(r[k] for k in run_keys): r["correct"] for _, r in g.iterrows()}
                      for m, g in rows.groupby("method", sort=False)}
        common = sorted(set.intersection(*(set(v) for v in per_method.values())))
        if common:
            runs[str(task)] = (per_method, common)
    return runs


def correctness_arrays(frame: pd.DataFrame, run_keys: Sequence[str] = ("template", "seed")
                       ) -> dict[str, dict[str, np.ndarray]]:
    """`bootstrap_intervals`' input from a long table with columns task, method, the `run_keys`,
    and `correct` (a string of 0/1, one per test example, in the task's test-sample order).

    Only runs that every method of the task has are kept, in one order for all methods, so run r
    is the same (template, seed) for every method."""
    return {task: {m: np.array([[int(ch) for ch in by_run[key]] for key in common], dtype=np.int8)
                   for m, by_run in per_method.items()}
            for task, (per_method, common) in _common_runs(frame, run_keys).items()}


def correctness_runs(frame: pd.DataFrame, run_keys: Sequence[str] = ("template", "seed")
                     ) -> dict[str, list[tuple[Any, ...]]]:
    """The run keys of `correctness_arrays`' rows, per task, in its order (the first key of each is the
    template: the groups of the nested bootstrap)."""
    return {task: common for task, (_, common) in _common_runs(frame, run_keys).items()}
