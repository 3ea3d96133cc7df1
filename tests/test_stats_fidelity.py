"""Chance yardsticks and hierarchical bootstrap intervals (`parts.analysis.stats`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from parts.analysis.stats import (
    bootstrap_intervals,
    bootstrap_replicates,
    chance_extremes,
    correctness_arrays,
    correctness_runs,
    rounded,
    spread,
)
from parts.errors import PartsError


def test_chance_extremes_hand_cases():
    # one example, two labels, two guessers: the best is right unless both are wrong (3/4)
    assert chance_extremes(1, 2, 2) == pytest.approx((0.75, 0.25))
    # one guesser: best = worst = the mean accuracy 1/c
    assert chance_extremes(2, 3, 1) == pytest.approx((1 / 3, 1 / 3))
    # two examples, two labels, two guessers: accuracies 0, .5, 1 w.p. 1/4, 1/2, 1/4 each;
    # P(max = 1) = 1 - (3/4)^2 = 7/16, P(max >= .5) = 1 - (1/4)^2 = 15/16 -> E = (7/16 + 15/16) / 2
    assert chance_extremes(2, 2, 2)[0] == pytest.approx((7 / 16 + 15 / 16) / 2)
    assert chance_extremes(2, 2, 2)[1] == pytest.approx((1 / 16 + 9 / 16) / 2)


def test_chance_extremes_match_a_simulation():
    rng = np.random.default_rng(0)
    accuracies = rng.binomial(200, 0.5, size=(4000, 300)) / 200
    best, worst = chance_extremes(200, 2, 300)
    assert best == pytest.approx(accuracies.max(1).mean(), abs=2e-3)
    assert worst == pytest.approx(accuracies.min(1).mean(), abs=2e-3)
    assert 0.58 < best < 0.61  # the "about 60% by chance alone"
    with pytest.raises(PartsError, match="n_labels >= 2"):
        chance_extremes(10, 1, 5)


def test_bootstrap_all_correct_is_a_point():
    table = bootstrap_intervals({"t": {"a": np.ones((3, 5)), "b": np.zeros((3, 5))}}, reference="a", n_resamples=200)
    row = table.set_index(["task", "method"]).loc[("t", "a")]
    assert (row.estimate, row.low, row.high) == (1.0, 1.0, 1.0)
    diff = table[(table.task == "t") & (table.quantity == "difference")].iloc[0]
    assert diff.method == "a - b" and (diff.estimate, diff.low, diff.high) == (1.0, 1.0, 1.0)


def test_bootstrap_resamples_runs_not_only_examples():
    # two runs, one always right, one always wrong: resampling examples alone would give exactly 0.5;
    # resampling the two runs gives 0, .5, 1 with probability 1/4, 1/2, 1/4
    correct = {"t": {"a": np.array([[1, 1, 1], [0, 0, 0]])}}
    draws = bootstrap_replicates(correct, n_resamples=4000, seed=1)["t"]["a"]
    shares = [np.mean(draws == v) for v in (0.0, 0.5, 1.0)]
    assert shares == pytest.approx([0.25, 0.5, 0.25], abs=0.03)
    row = bootstrap_intervals(correct, n_resamples=4000).iloc[0]
    assert (row.estimate, row.low, row.high) == (0.5, 0.0, 1.0)
    fixed = bootstrap_replicates(correct, n_resamples=50, resample_runs=False)["t"]["a"]
    assert np.all(fixed == 0.5)


def test_one_run_matches_scipy_percentile_bootstrap():
    rng = np.random.default_rng(3)
    values = (rng.random(200) < 0.62).astype(np.int8)
    ours = bootstrap_intervals({"t": {"a": values[None, :]}}, n_resamples=20000, seed=0).iloc[0]
    theirs = scipy_stats.bootstrap((values,), np.mean, n_resamples=20000, method="percentile",
                                   confidence_level=0.95, random_state=0).confidence_interval
    assert ours.low == pytest.approx(theirs.low, abs=0.01) and ours.high == pytest.approx(theirs.high, abs=0.01)


def test_differences_are_paired_and_average_is_mean_of_tasks():
    rng = np.random.default_rng(5)
    base = (rng.random((4, 100)) < 0.5).astype(np.int8)
    better = base.copy()
    better[:, :10] = 1  # a always at least as right as b, on the same examples
    b_only = base.copy()
    correct = {"x": {"a": better, "b": b_only}, "y": {"a": np.ones((4, 50)), "b": np.zeros((4, 50))}}
    table = bootstrap_intervals(correct, reference="a", n_resamples=1000).set_index(["task", "quantity", "method"])
    paired = table.loc[("x", "difference", "a - b")]
    assert paired.low >= 0  # paired: a never loses an example, so no replicate can favour b
    assert paired.estimate == pytest.approx(float(better.mean() - b_only.mean()))
    average = table.loc[("average", "accuracy", "a")]
    assert average.estimate == pytest.approx((better.mean() + 1.0) / 2)
    assert average.runs == 8 and average.examples == 150
    assert table.loc[("average", "difference", "a - b")].estimate == pytest.approx(
        (better.mean() - b_only.mean() + 1.0) / 2)


def test_correctness_arrays_align_runs_across_methods():
    frame = pd.DataFrame([
        {"task": "t", "method": "a", "template": 1, "seed": 0, "correct": "110"},
        {"task": "t", "method": "a", "template": 2, "seed": 0, "correct": "011"},
        {"task": "t", "method": "b", "template": 2, "seed": 0, "correct": "000"},
        {"task": "t", "method": "b", "template": 1, "seed": 0, "correct": "111"},
        {"task": "t", "method": "b", "template": 3, "seed": 0, "correct": "111"},  # a lacks it: dropped
    ])
    arrays = correctness_arrays(frame)["t"]
    assert arrays["a"].tolist() == [[1, 1, 0], [0, 1, 1]] and arrays["b"].tolist() == [[1, 1, 1], [0, 0, 0]]
    with pytest.raises(PartsError, match="lacks column"):
        correctness_arrays(frame.drop(columns="correct"))
    with pytest.raises(PartsError, match="one shape"):
        bootstrap_intervals({"t": {"a": np.ones((2, 3)), "b": np.ones((2, 4))}})


def test_nested_bootstrap_draws_templates_then_seeds():
    # template 1's two runs always right, template 2's always wrong: runs as exchangeable give the mean of 4 draws
    # (0, .25, ..., 1); nested draws 2 templates, so only 0, .5, 1 with probability 1/4, 1/2, 1/4
    correct = {"t": {"a": np.array([[1, 1], [1, 1], [0, 0], [0, 0]])}}
    groups = {"t": [1, 1, 2, 2]}
    nested = bootstrap_replicates(correct, n_resamples=4000, seed=2, resample="nested", groups=groups)["t"]["a"]
    assert [np.mean(nested == v) for v in (0.0, 0.5, 1.0)] == pytest.approx([0.25, 0.5, 0.25], abs=0.03)
    flat = bootstrap_replicates(correct, n_resamples=4000, seed=2)["t"]["a"]
    assert np.mean(flat == 0.25) == pytest.approx(4 / 16, abs=0.03)  # binomial(4, 1/2) / 4
    # seeds within a template: template 1 has one right and one wrong run, template 2 two wrong ones;
    # a drawn template 1 averages two seed draws (0, .5, 1 w.p. 1/4, 1/2, 1/4), each template weighs 1/2
    mixed = {"t": {"a": np.array([[1, 1], [0, 0], [0, 0], [0, 0]])}}
    draws = bootstrap_replicates(mixed, n_resamples=8000, seed=3, resample="nested", groups=groups)["t"]["a"]
    assert draws.mean() == pytest.approx(0.25, abs=0.01)
    # 1 only when template 1 is drawn twice (1/4) and each time its right run twice ((1/4)^2)
    assert np.mean(draws == 1.0) == pytest.approx(1 / 4 * (1 / 4) ** 2, abs=0.004)
    assert set(np.unique(draws)) <= {0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0}
    table = bootstrap_intervals(correct, n_resamples=2000, resample="nested", groups=groups).iloc[0]
    assert (table.estimate, table.low, table.high) == (0.5, 0.0, 1.0)
    with pytest.raises(PartsError, match="each of its 4 runs' template"):
        bootstrap_replicates(correct, resample="nested")
    with pytest.raises(PartsError, match="unknown resample 'templates'"):
        bootstrap_intervals(correct, resample="templates")


def test_correctness_runs_give_the_arrays_run_order():
    frame = pd.DataFrame([{"task": "t", "method": m, "template": t, "seed": s, "correct": "10"}
                          for m in ("a", "b") for t, s in ((2, 0), (1, 1), (1, 0))])
    assert correctness_runs(frame) == {"t": [(1, 0), (1, 1), (2, 0)]}
    assert correctness_arrays(frame)["t"]["a"].shape == (3, 2)


def test_one_rounding_rule_and_the_spread_with_its_ddof():
    # 45.85% exactly (11004 of 24000 answers right), however the float comes out: half away from zero
    assert {rounded(v) for v in (100 * 11004 / 24000, 45.85, 45.849999999999994, 45.85000000000001)} == {"45.9"}
    assert f"{45.85:.1f}" == "45.9" and f"{45.849999999999994:.1f}" == "45.8"  # what one rule replaces
    assert (rounded(0.125, 2), rounded(-2.5, 0), rounded(-0.04), rounded(float("nan"))) == ("0.13", "-3", "0.0", "nan")
    assert spread([1, 2, 3, 4]) == pytest.approx((5 / 3) ** 0.5)  # the sample std by default
    assert spread([1, 2, 3, 4], ddof=0) == pytest.approx(1.25 ** 0.5)  # the authors' code (numpy's default)
    with pytest.raises(PartsError, match="ddof must be 0"):
        spread([1, 2], ddof=2)
    with pytest.raises(PartsError, match="needs more than 1 value"):
        spread([1.0])
