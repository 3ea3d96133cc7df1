"""Chance yardsticks and hierarchical bootstrap intervals (`parts.analysis.stats`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from parts.analysis.stats import bootstrap_intervals, bootstrap_replicates, chance_extremes, correctness_arrays
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
