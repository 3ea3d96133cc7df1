"""The cross-run readings of total effects: the per-task table and the comparison of two ways of computing one
run's effects (`parts effects --summary --against`), against numbers recomputed by hand."""

from __future__ import annotations

import argparse
import shutil

import pandas as pd
import pytest
from scipy import stats

from parts.analysis.total import AGREEMENT_COLUMNS, agreement_row, agreement_table, effects_row, task_table
from parts.cli import effects as effects_cli
from parts.decomposition.effect_data import TotalEffects
from parts.decomposition.effects import total_effects
from parts.decomposition.runs import find_runs
from parts.errors import PartsError
from tests.conftest import WORDS
from tests.test_effects import tiny_run
from tests.test_families import PROMPTS


@pytest.fixture
def two_ways(tiny_llama):
    prompts = [PROMPTS[i % 3].replace("fun", WORDS[5 + i % 8]) for i in range(10)]
    run = tiny_run(tiny_llama, prompts)
    return run, total_effects(tiny_llama, run, ablation="mean"), total_effects(tiny_llama, run, ablation="zero")


def test_agreement_row_by_hand(two_ways):
    run, mean, zero = two_ways
    same = agreement_row(run, mean, mean)
    assert same["spearman"] == pytest.approx(1.0) and same["largest_error"] == 0 and same["relative_difference"] == 0
    row = agreement_row(run, mean, zero)
    assert list(row) == list(AGREEMENT_COLUMNS)
    a, b = mean.total_effects.double(), zero.total_effects.double()
    assert row["spearman"] == pytest.approx(stats.spearmanr(a.flatten(), b.flatten())[0])
    assert row["relative_difference"] == pytest.approx(float((a - b).abs().mean() / a.abs().mean()))
    worst = int((a - b).abs().amax(dim=(0, 2)).argmax())
    assert (row["largest_error"], row["largest_error_component"]) == (pytest.approx(float((a - b).abs().max())),
                                                                      run.component_names[worst])
    assert row["reference"] == "exact, last, mean" and row["variant"] == "exact, last, zero"
    assert row["t1_variant"] == pytest.approx(float(zero.accuracy(run.labels).max()))
    assert len(agreement_table(pd.DataFrame([row]))) == 1
    cut = TotalEffects(mean.total_effects[:-1], mean.clean_logits[:-1], mean.component_names, mean.info)
    with pytest.raises(PartsError, match="do not belong to this run"):
        agreement_row(run, cut, zero)


def test_task_table_counts_runs(two_ways):
    run, mean, _ = two_ways
    row = effects_row(run, mean)
    rows = pd.DataFrame([row, {**row, "template": 2, "t1_total": 0.0, "pearson": 0.5}])
    table = task_table(rows).iloc[0]
    beats = row["t1_total"] > row["full"] and row["t1_total_low"] > row["chance_best_of_n"]
    assert table["runs where T1 total > FULL and its interval > chance best"] == f"{int(beats)} of 2"
    clear = {**row, "full": 0.0, "t1_total": 0.9, "t1_total_low": 0.8, "chance_best_of_n": 0.7}
    near = {**clear, "t1_total_low": 0.69}  # the best component's interval reaches the chance yardstick: not counted
    assert task_table(pd.DataFrame([clear, near])).iloc[0]["runs where T1 total > FULL and its interval > chance best"] \
        == "1 of 2"
    assert table["pearson per run"] == f"{row['pearson']:.2f}, 0.50"
    assert table["T1 total (%)"] == f"{100 * row['t1_total'] / 2:.1f}"


def test_against_writes_and_accumulates_rows(two_ways, tiny_llama, tmp_path):
    run, mean, zero = two_ways
    reference, variants = tmp_path / "reference", tmp_path / "variants"
    run.save(reference)
    mean.save(reference)
    shutil.copytree(reference, variants / "zero")
    zero.save(variants / "zero")
    out = tmp_path / "variants.csv"

    def summary(root, against):
        args = argparse.Namespace(summary=str(out), against=str(against))
        return effects_cli.write_summary(find_runs(root), args.summary, args.against)

    assert summary(variants, reference) == 0
    first = pd.read_csv(out)
    assert list(first["variant"]) == ["exact, last, zero"]
    summary(variants, reference)  # the same comparison again replaces its row
    assert len(pd.read_csv(out)) == 1
    other = tmp_path / "other"
    shutil.copytree(reference, other / "run")
    edited = TotalEffects(mean.total_effects, mean.clean_logits, mean.component_names, {**mean.info, "freeze_norm": True})
    edited.save(other / "run")
    summary(other, reference)  # another variant adds a row
    assert list(pd.read_csv(out)["variant"]) == ["exact, last, zero", "exact, last, mean, freeze-norm"]
    with pytest.raises(PartsError, match="give --summary CSV too"):
        effects_cli.run(argparse.Namespace(root=str(other), against=str(reference), summary=None, dry_run=False,
                                          assume=None, shape=None))
    stranger_run = tiny_run(tiny_llama, list(reversed(PROMPTS)))
    stranger_run.save(tmp_path / "stranger" / "run")
    total_effects(tiny_llama, stranger_run, ablation="zero").save(tmp_path / "stranger" / "run")
    with pytest.raises(PartsError, match="is not a copy of the run"):
        summary(tmp_path / "stranger", reference)
