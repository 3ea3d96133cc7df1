"""Component statistics, categories and cross-run agreement on hand-made component logits."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import pytest
import torch
from scipy import stats

from parts.analysis.analyze import (
    accuracy_correlation,
    analysis_report,
    categorize,
    category_counts,
    component_table,
    correlation_matrix,
    format_report,
    pair_relation,
    pair_table,
    stability_summary,
)
from parts.cli import main
from parts.components import component_names
from parts.data.prompts import PromptSet
from parts.decomposition.runs import Decomposition, DecompositionRun, find_runs, load_runs
from parts.errors import PartsError

GOLD = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]


def make_run(
    predictions: Sequence[Sequence[int]],
    gold: Sequence[int] = GOLD,
    full_predictions: Sequence[int] | None = None,
    n_layers: int = 2,
    n_heads: int = 2,
    n_labels: int = 2,
    task: str = "tiny",
    template: int = 1,
    seed: int = 0,
    model: str = "m",
) -> DecompositionRun:
    """A run whose component c predicts `predictions[c][example]` (a logit of 1 on that label)."""
    names = component_names(n_layers, n_heads)
    assert len(predictions) == len(names)
    n = len(gold)
    component_logits = torch.nn.functional.one_hot(torch.tensor(predictions).T, n_labels).float()
    full = torch.tensor(full_predictions if full_predictions is not None else gold)
    model_logits = 10 * torch.nn.functional.one_hot(full, n_labels).float()
    remainder = model_logits - component_logits.sum(1)  # components + remainder = model logits
    label_names = tuple(f"l{i}" for i in range(n_labels))
    prompts = PromptSet(task, template, seed, 4, "test", label_names, tuple(" " + x for x in label_names), (0, 1),
                        tuple(range(n)), tuple(f"p{i}" for i in range(n)), tuple(gold))
    decomposition = Decomposition(component_logits, remainder, model_logits)
    return DecompositionRun.from_decomposition(model, prompts, list(range(n_labels)), names, n_layers, n_heads, decomposition)


def correct_on_first(m: int, gold: Sequence[int] = GOLD) -> list[int]:
    """Predictions right on the first m examples and wrong (the other label) afterwards."""
    return [g if i < m else 1 - g for i, g in enumerate(gold)]


# Six components of a 2-layer, 2-head model on 10 balanced examples (gold 0 x5, then 1 x5).
ALWAYS_0 = [0] * 10                                   # L0H0: label-biased (share 1.0), accuracy 0.5
ALWAYS_WRONG = [1 - g for g in GOLD]                  # L0H1: accuracy 0, p_below = 1/1024 -> bad
ALWAYS_RIGHT = list(GOLD)                             # L1H0: accuracy 1, p_above = 1/1024 -> good
SIX_RIGHT = [0, 0, 0, 1, 1, 1, 1, 1, 0, 0]            # L1H1: 6/10, p_above = 386/1024 -> neutral
NINE_ONES = [0, 1, 1, 1, 1, 1, 1, 1, 1, 1]            # MLP0: label 1 on exactly 90% -> label-biased at 0.9
NINE_RIGHT = [1, 0, 0, 0, 0, 1, 1, 1, 1, 1]           # MLP1: 9/10 (label 1 on 60%), p_above = 11/1024 -> good
FULL_SEVEN = [0, 0, 0, 0, 1, 1, 1, 1, 0, 0]           # the full model: 7/10


@pytest.fixture
def six() -> DecompositionRun:
    return make_run([ALWAYS_0, ALWAYS_WRONG, ALWAYS_RIGHT, SIX_RIGHT, NINE_ONES, NINE_RIGHT], full_predictions=FULL_SEVEN)


def test_component_table_by_hand(six):
    assert six.full_accuracy == pytest.approx(0.7)
    table = component_table(six, correction="none")
    assert list(table.columns) == [
        "component", "kind", "layer", "head", "accuracy", "macro_accuracy", "share_l0", "share_l1", "label_bias",
        "majority_label", "chance", "p_above", "p_below", "p_above_adjusted", "p_below_adjusted", "category",
    ]
    assert table["component"].tolist() == ["L0H0", "L0H1", "L1H0", "L1H1", "MLP0", "MLP1"]
    assert table["kind"].tolist() == ["head"] * 4 + ["mlp"] * 2
    assert table["layer"].tolist() == [0, 0, 1, 1, 0, 1]
    assert table["head"].tolist() == [0, 1, 0, 1, -1, -1]
    assert table["accuracy"].tolist() == pytest.approx([0.5, 0.0, 1.0, 0.6, 0.6, 0.9])
    assert table["share_l0"].tolist() == pytest.approx([1.0, 0.5, 0.5, 0.5, 0.1, 0.4])
    assert table["share_l1"].tolist() == pytest.approx([0.0, 0.5, 0.5, 0.5, 0.9, 0.6])
    assert table["label_bias"].tolist() == pytest.approx([1.0, 0.5, 0.5, 0.5, 0.9, 0.6])
    assert table["majority_label"].tolist() == ["l0", "l0", "l0", "l0", "l1", "l1"]  # ties: the first label
    assert table["chance"].tolist() == pytest.approx([0.5] * 6)  # balanced: 1/n_labels for every component
    # One-sided binomial tails of Bin(10, 1/2), by hand (counts of the 1024 outcomes).
    assert table["p_above"].tolist() == pytest.approx([638 / 1024, 1.0, 1 / 1024, 386 / 1024, 386 / 1024, 11 / 1024])
    assert table["p_below"].tolist() == pytest.approx([638 / 1024, 1 / 1024, 1.0, 848 / 1024, 848 / 1024, 1023 / 1024])
    assert table["category"].tolist() == ["label-biased", "bad", "good", "neutral", "label-biased", "good"]
    assert category_counts(table) == {"good": 2, "bad": 1, "label-biased": 2, "neutral": 1}


def test_categories_are_holm_corrected_by_default(six):
    table = component_table(six)
    # Holm over 6 components: sorted p_above 1, 11, 386, 386, 638, 1024 (/1024) times 6, 5, 4, 3, 2, 1, running max.
    assert table["p_above_adjusted"].tolist() == pytest.approx([1.0, 1.0, 6 / 1024, 1.0, 1.0, 55 / 1024])
    assert table["p_below_adjusted"][1] == pytest.approx(6 / 1024)
    # MLP1 (9/10 right, p 0.0107) no longer passes once six components are tested.
    assert table["category"].tolist() == ["label-biased", "bad", "good", "neutral", "label-biased", "neutral"]


def test_p_values_match_scipy(six):
    table = component_table(six)
    for correct, row in zip([5, 0, 10, 6, 6, 9], table.itertuples(), strict=True):
        assert row.p_above == pytest.approx(stats.binomtest(correct, 10, 0.5, alternative="greater").pvalue)
        assert row.p_below == pytest.approx(stats.binomtest(correct, 10, 0.5, alternative="less").pvalue)


def test_thresholds_are_parameters(six):
    strict = component_table(six, label_bias_threshold=0.95, correction="none")  # MLP0's 90% is no longer enough
    assert strict["category"].tolist() == ["label-biased", "bad", "good", "neutral", "neutral", "good"]
    # L1H1 and MLP0 (p 0.377) are significant, but below the full 0.7
    lenient = component_table(six, alpha=0.5, correction="none")
    assert lenient["category"].tolist() == ["label-biased", "bad", "good", "neutral", "label-biased", "good"]
    table = component_table(six)
    # Significantly above chance but below the full model is not good.
    assert categorize(table, full_accuracy=0.95).tolist() == ["label-biased", "bad", "good", "neutral", "label-biased",
                                                               "neutral"]
    with pytest.raises(PartsError, match="label_bias_threshold must be in"):
        component_table(six, label_bias_threshold=0)
    with pytest.raises(PartsError, match="alpha must be in"):
        component_table(six, alpha=1.5)


def test_macro_accuracy_and_chance_on_an_unbalanced_run():
    gold = [0, 0, 0, 1]
    run = make_run([[0, 0, 0, 0], [0, 1, 1, 1]], gold=gold, n_layers=1, n_heads=1)
    table = component_table(run)
    assert table["accuracy"].tolist() == pytest.approx([0.75, 0.5])
    # Macro: mean of recall on label 0 and label 1: (3/3 + 0/1) / 2 and (1/3 + 1/1) / 2.
    assert table["macro_accuracy"].tolist() == pytest.approx([0.5, 2 / 3])
    # Chance = sum of share x gold frequency: 1 x 3/4; and 1/4 x 3/4 + 3/4 x 1/4.
    assert table["chance"].tolist() == pytest.approx([0.75, 0.375])
    # Always the majority label is at chance, not above it: P(X >= 3) for Bin(4, 3/4) = 4 (3/4)^3 (1/4) + (3/4)^4.
    assert table["p_above"][0] == pytest.approx(0.73828125)
    assert table["category"].tolist() == ["label-biased", "neutral"]
    assert table["p_above"][1] == pytest.approx(stats.binom.sf(1, 4, 0.375))


def test_three_labels_shares_and_chance():
    gold = [0, 1, 2, 0, 1, 2]
    run = make_run([[0, 0, 0, 0, 0, 1], list(gold)], gold=gold, n_layers=1, n_heads=1, n_labels=3)
    table = component_table(run)
    shares = table[["share_l0", "share_l1", "share_l2"]].values.ravel().tolist()
    assert shares == pytest.approx([5 / 6, 1 / 6, 0, 1 / 3, 1 / 3, 1 / 3])
    assert table["chance"].tolist() == pytest.approx([1 / 3, 1 / 3])
    assert table["p_above"][1] == pytest.approx((1 / 3) ** 6)
    assert table["category"].tolist() == ["neutral", "good"]


# -- agreement across runs ----------------------------------------------------------------------
def run_with_correct(counts: Sequence[int], **kwargs) -> DecompositionRun:
    """A 2-layer, 2-head run whose components are right on counts[c] of the 10 examples."""
    return make_run([correct_on_first(m) for m in counts], **kwargs)


def test_identical_runs_correlate_one(six):
    assert accuracy_correlation(six, six) == {"pearson": pytest.approx(1.0), "spearman": pytest.approx(1.0),
                                              "top_k_iou": 1.0}


def test_correlations_by_hand():
    a = run_with_correct([1, 2, 3, 4, 5, 6])
    b = run_with_correct([2, 1, 4, 3, 6, 5], seed=1)
    # Centred: a (-2.5 -1.5 -0.5 0.5 1.5 2.5), b (-1.5 -2.5 0.5 -0.5 2.5 1.5): 14.5 / 17.5; the values are their ranks.
    assert accuracy_correlation(a, b, k=2) == {"pearson": pytest.approx(29 / 35), "spearman": pytest.approx(29 / 35),
                                               "top_k_iou": 1.0}
    assert accuracy_correlation(a, b, k=3)["top_k_iou"] == pytest.approx(2 / 4)  # {MLP1 MLP0 L1H1} vs {MLP0 MLP1 L1H0}
    reversed_b = run_with_correct([6, 5, 4, 3, 2, 1], seed=2)
    assert accuracy_correlation(a, reversed_b, k=2) == {"pearson": pytest.approx(-1.0), "spearman": pytest.approx(-1.0),
                                                        "top_k_iou": 0.0}


def test_constant_accuracies_have_no_correlation():
    flat = run_with_correct([5] * 6)
    result = accuracy_correlation(flat, run_with_correct([1, 2, 3, 4, 5, 6]))
    assert math.isnan(result["pearson"]) and math.isnan(result["spearman"])


@pytest.mark.parametrize("change,message", [
    ({"model": "other"}, "different models ('m' vs 'other')"),
    ({"task": "sst2"}, "different tasks ('tiny' vs 'sst2')"),
    ({"n_heads": 1}, "different component sets (6 vs 4 components)"),
])
def test_incomparable_runs_are_refused(change, message):
    a = run_with_correct([1, 2, 3, 4, 5, 6])
    counts = [1, 2, 3, 4] if change.get("n_heads") == 1 else [1, 2, 3, 4, 5, 6]
    b = run_with_correct(counts, **change)
    with pytest.raises(PartsError) as error:
        accuracy_correlation(a, b)
    assert message in str(error.value)
    with pytest.raises(PartsError):
        correlation_matrix([a, b])


def test_correlation_matrix_and_pairs():
    runs = [
        run_with_correct([1, 2, 3, 4, 5, 6], task="sst2", template=2, seed=0),
        run_with_correct([2, 1, 4, 3, 6, 5], task="sst2", template=2, seed=1),
        run_with_correct([6, 5, 4, 3, 2, 1], task="sst2", template=4, seed=0),
        run_with_correct([1, 2, 3, 4, 6, 5], task="sst2", template=1, seed=0),
    ]
    matrix = correlation_matrix(runs)
    labels = ["sst2 t2 s0", "sst2 t2 s1", "sst2 t4 s0", "sst2 t1 s0"]
    assert matrix.index.tolist() == labels and matrix.columns.tolist() == labels
    assert matrix.loc["sst2 t2 s0", "sst2 t2 s1"] == pytest.approx(29 / 35)
    assert matrix.loc["sst2 t2 s1", "sst2 t2 s0"] == pytest.approx(29 / 35)
    assert matrix.loc["sst2 t2 s0", "sst2 t4 s0"] == pytest.approx(-1.0)
    assert [matrix.iloc[i, i] for i in range(4)] == [1.0] * 4
    assert pair_relation(runs[0], runs[1]) == "seeds"
    assert pair_relation(runs[0], runs[2]) == "perturbed template"  # sst2's template 4 perturbs template 2
    assert pair_relation(runs[0], runs[3]) == "templates"
    assert pair_relation(runs[1], runs[2]) == "both"
    pairs = pair_table(runs, k=2)
    assert len(pairs) == 6
    assert pairs.iloc[0].to_dict() == {"run_a": "sst2 t2 s0", "run_b": "sst2 t2 s1", "relation": "seeds",
                                       "pearson": pytest.approx(29 / 35), "spearman": pytest.approx(29 / 35),
                                       "top_k_iou": 1.0}
    summary = stability_summary(pairs)
    assert summary.loc["seeds", "pairs"] == 1 and summary.loc["seeds", "pearson"] == pytest.approx(29 / 35)
    assert summary.loc["perturbed template", "pearson"] == pytest.approx(-1.0)
    # t1 s0 vs t4 s0 is not the perturbed pair: a 'templates' pair like t2 s0 vs t1 s0.
    assert summary.loc["templates", "pairs"] == 2
    with pytest.raises(PartsError, match="several runs are labelled 'sst2 t2 s0'"):
        correlation_matrix([runs[0], runs[0]])


# -- finding runs, the report and the command -------------------------------------------------------
def test_find_runs_skips_staging_and_unfinished_folders(tmp_path, six):
    six.save(tmp_path / "m" / "tiny" / "t1-s1")
    six.save(tmp_path / "m" / "tiny" / "t1-s0")
    (tmp_path / "m" / "tiny" / ".t1-s2.tmp-abc").mkdir()
    (tmp_path / "m" / "tiny" / ".t1-s2.tmp-abc" / "summary.json").write_text("{}")
    (tmp_path / "m" / "tiny" / "t1-s3").mkdir()  # no summary.json: not finished
    assert find_runs(tmp_path) == [tmp_path / "m" / "tiny" / "t1-s0", tmp_path / "m" / "tiny" / "t1-s1"]
    assert load_runs(tmp_path)[0] == six
    with pytest.raises(PartsError, match="no finished runs under"):
        load_runs(tmp_path / "m" / "tiny" / "t1-s3")
    with pytest.raises(PartsError, match="is not a folder"):
        find_runs(tmp_path / "nowhere")


def sst2_runs() -> list[DecompositionRun]:
    return [
        make_run([ALWAYS_0, ALWAYS_WRONG, ALWAYS_RIGHT, SIX_RIGHT, NINE_ONES, NINE_RIGHT], full_predictions=FULL_SEVEN,
                 task="sst2", template=2, seed=0),
        run_with_correct([2, 1, 4, 3, 6, 5], task="sst2", template=2, seed=1),
        run_with_correct([6, 5, 4, 3, 2, 1], task="sst2", template=4, seed=0),
    ]


def test_analyze_command_prints_and_writes_the_same_numbers(tmp_path, capsys):
    runs = sst2_runs()
    for run in runs:
        run.save(tmp_path / "runs" / "m" / "sst2" / f"t{run.prompts.template}-s{run.prompts.seed}")
    out = tmp_path / "analysis.json"
    assert main(["analyze", str(tmp_path / "runs"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{tmp_path / 'runs'} | m | sst2 | test n=10 | 4-shot | 3 runs" in printed
    # Holm-corrected by default: MLP1 (p 0.0107 over 6 components) is neutral, not good.
    # The paper's measures first: FULL, ORACLE-T1 beside the best of 6 chance classifiers on 10 examples
    # (69.7%), ORACLE-B1 beside the worst (30.3%), one label on every example (L0H0); then the categories.
    assert ("sst2 t2 s0      70.0% 100.0%      69.7%   0.0%      30.3%     1/6     |               1    1      2"
            "       2  L1H0 100.0%, MLP1 90.0%, L1H1 60.0%") in printed
    assert "parts' extension, significance categories" in printed
    # Best 100%, 60%, 60% against full 70%, 100%, 100%; worst 0%, 10%, 10%.
    assert "best component beats the full model in 1/3 runs (mean best 73.3% vs full 90.0%; mean worst 6.7%)" in printed
    report = json.loads(out.read_text())
    first = report["runs"][0]
    # Holm over 6 components (see test_categories_are_holm_corrected_by_default): MLP1 is neutral.
    assert first["label"] == "sst2 t2 s0"
    assert first["category_counts"] == {"good": 1, "bad": 1, "label-biased": 2, "neutral": 2}
    assert [c["component"] for c in first["top_components"]] == ["L1H0", "MLP1", "L1H1", "MLP0", "L0H0"]
    assert first["worst_component"] == {"component": "L0H1", "accuracy": 0.0}
    assert first["label_biased_on_all_examples"] == 1  # L0H0; MLP0 says label 1 on 90% only
    assert first["paper"]["oracle_t1_component"] == "L1H0" and first["paper"]["oracle_b1"] == 0.0
    assert first["paper"]["chance_best_of_n"] == pytest.approx(0.6971071471946135)
    assert first["paper"]["label_biased_share"] == pytest.approx(1 / 6)
    assert first["components"][4]["p_above"] == pytest.approx(386 / 1024)
    group = report["groups"][0]
    pairs = {(p["run_a"], p["run_b"]): p for p in group["pairs"]}
    # Pearson of the accuracies (0.5 0 1 .6 .6 .9) and (.2 .1 .4 .3 .6 .5), by hand.
    a, b = [0.5, 0.0, 1.0, 0.6, 0.6, 0.9], [0.2, 0.1, 0.4, 0.3, 0.6, 0.5]
    ma, mb = sum(a) / 6, sum(b) / 6
    pearson = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True)) / math.sqrt(
        sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))
    assert pairs[("sst2 t2 s0", "sst2 t2 s1")]["pearson"] == pytest.approx(pearson)
    assert group["stability"]["perturbed template"]["pairs"] == 1
    assert group["pearson"][0]["sst2 t2 s1"] == pytest.approx(pearson)
    assert group["collection"] == str(tmp_path / "runs") and group["run_indices"] == [0, 1, 2]
    assert report["settings"] == {"label_bias_threshold": 0.9, "alpha": 0.05, "k": 5, "correction": "holm"}
    assert "seeds" in format_report(report)


def test_copies_of_a_run_in_two_sweep_roots_are_grouped_apart(tmp_path, capsys):
    runs = sst2_runs()
    for root in ("runs", "runs/controls"):
        for run in runs[:2]:
            run.save(tmp_path / root / "m" / "sst2" / f"t{run.prompts.template}-s{run.prompts.seed}")
    report = analysis_report(load_runs(tmp_path / "runs"), find_runs(tmp_path / "runs"))
    assert [(g["collection"], g["run_indices"]) for g in report["groups"]] == [
        (str(tmp_path / "runs" / "controls"), [0, 1]), (str(tmp_path / "runs"), [2, 3])]  # sorted paths: controls/ < m/
    assert report["groups"][0]["pairs"] == report["groups"][1]["pairs"]


def test_analyze_correction_option(tmp_path, capsys):
    sst2_runs()[0].save(tmp_path / "m" / "sst2" / "t2-s0")
    assert main(["analyze", str(tmp_path), "--correction", "none"]) == 0
    printed = capsys.readouterr().out
    assert "above/below chance, uncorrected" in printed
    assert "|               2    1      2       1" in printed  # MLP1 (p 0.0107) is good uncorrected
    assert json.loads((tmp_path / "analysis.json").read_text())["settings"]["correction"] == "none"


def test_analyze_errors_are_one_line(tmp_path, capsys):
    assert main(["analyze", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no finished runs under" in err and len(err.strip().splitlines()) == 1
