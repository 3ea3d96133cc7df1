"""Multiple-comparison corrections, chance-level yardsticks, random initialisation, the control table."""

from __future__ import annotations

import pytest
import torch

from parts.analysis.analyze import CATEGORIES
from parts.analysis.stats import (
    benjamini_hochberg,
    chance_best_accuracy,
    chance_test_size,
    expected_false_good,
    holm,
    significant,
)
from parts.data.prompts import PromptSet
from parts.decomposition.runs import DecompositionRun
from parts.errors import PartsError
from parts.experiments.controls import chance_yardsticks, control_row, corrected_component_table, random_init_control


def test_holm_and_bh_adjusted_pvalues_by_hand():
    p = torch.tensor([0.5, 0.02, 0.01, 0.03], dtype=torch.float64)
    # Holm: sorted 0.01, 0.02, 0.03, 0.5 times 4, 3, 2, 1 = 0.04, 0.06, 0.06, 0.5 (running max).
    assert holm(p).tolist() == pytest.approx([0.5, 0.06, 0.04, 0.06])
    # BH: times 4/1, 4/2, 4/3, 4/4 = 0.04, 0.04, 0.04, 0.5 (running min from the top).
    assert benjamini_hochberg(p).tolist() == pytest.approx([0.5, 0.04, 0.04, 0.04])
    assert significant(p, 0.05, "holm").tolist() == [False, False, True, False]
    assert significant(p, 0.05, "bh").tolist() == [False, True, True, True]
    assert significant(p, 0.05, "none").tolist() == [False, True, True, True]
    assert holm(torch.tensor([0.4, 0.9], dtype=torch.float64)).tolist() == [0.8, 0.9]
    with pytest.raises(PartsError, match="unknown correction 'bonf'"):
        significant(p, 0.05, "bonf")


def test_chance_yardsticks():
    # n = 10, p = 0.5: only 9 or 10 correct pass at alpha = 0.05, probability 11/1024.
    assert chance_test_size(10, 0.5) == pytest.approx(11 / 1024)
    assert expected_false_good(300, 10, 0.5) == pytest.approx(300 * 11 / 1024)
    # One component: the expected best accuracy is the mean, chance itself.
    assert chance_best_accuracy(1, 40, 0.25) == pytest.approx(0.25)
    # Two fair coins on one example: E[max] = P(at least one correct) = 3/4.
    assert chance_best_accuracy(2, 1, 0.5) == pytest.approx(0.75)


def _run(predictions: list[list[int]], labels: list[int]) -> DecompositionRun:
    """A run whose components predict `predictions[example][component]` (one-hot logits)."""
    prediction = torch.tensor(predictions)
    logits = torch.nn.functional.one_hot(prediction, 2).float()
    n, m = prediction.shape
    prompts = PromptSet("t", 1, 0, 2, "test", ("neg", "pos"), (" neg", " pos"), (0, 1), tuple(range(n)),
                        tuple(f"p{i}" for i in range(n)), tuple(labels))
    names = [f"L0H{i}" for i in range(m)]
    # The full model always answers label 0 (50% here), so it does not keep any component from "good".
    full = torch.zeros(n, 2)
    return DecompositionRun("m", prompts, [1, 2], 1, m, names, logits, full - logits.sum(1), full)


def test_categorize_with_and_without_correction():
    labels = [i % 2 for i in range(20)]
    perfect = labels
    wrong = [1 - y for y in labels]
    biased = [1] * 20
    # 15 of 20 right: P(X >= 15) = 0.0207, significant alone but not after Holm over 3 tests (0.05/3).
    fifteen = labels[:15] + [1 - y for y in labels[15:]]
    columns = [perfect, wrong, biased, fifteen]
    run = _run([list(row) for row in zip(*columns, strict=True)], labels)
    table = corrected_component_table(run, correction="holm")
    assert table["category_uncorrected"].tolist() == ["good", "bad", "label-biased", "good"]
    assert table["category"].tolist() == ["good", "bad", "label-biased", "neutral"]
    assert table["p_above_adjusted"][3] == pytest.approx(min(1.0, 3 * 0.020694732666015625))
    row = control_row(run)
    assert row["good (uncorrected)"] == 2 and row["good (holm)"] == 1
    assert row["above chance (uncorrected)"] == 2 and row["above chance (holm)"] == 1
    assert row["best_component"] == "L0H0" and row["best_accuracy"] == 1.0


def test_random_init_redraws_weights_with_the_models_initialiser(tokenizer):
    from conftest import make_hf_model

    from parts.model.loading import from_hf

    hf = make_hf_model("llama")
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = from_hf(hf, tokenizer, "tiny", random_init=True, seed=5).original_model
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    again = from_hf(hf, tokenizer, "tiny", random_init=True, seed=5)
    other = from_hf(hf, tokenizer, "tiny", random_init=True, seed=6).original_model
    assert again.cfg.model_name == "tiny+random-init-s5"
    assert again.tokenizer.get_vocab() == tokenizer.get_vocab()  # the same tokenizer
    embed, head = first.get_input_embeddings().weight, first.get_output_embeddings().weight
    assert embed.data_ptr() == head.data_ptr()  # tied embeddings stay tied
    assert torch.equal(embed, again.original_model.get_input_embeddings().weight)
    assert not torch.equal(embed, other.get_input_embeddings().weight)
    assert not torch.equal(embed, hf.get_input_embeddings().weight)
    q = first.model.layers[0].self_attn.q_proj.weight
    assert abs(float(q.std()) - first.config.initializer_range) < 0.005
    assert torch.equal(first.model.norm.weight, torch.ones(32))


def test_random_init_control_runs_both_models_on_the_same_prompts(tiny_task_file, tokenizer, tmp_path):
    from conftest import make_hf_model

    from parts.model.loading import from_hf

    loads: list[bool] = []

    def load(name, device=None, random_init=False, seed=0, **options):
        loads.append(random_init)
        return from_hf(make_hf_model("llama"), tokenizer, "tiny", random_init=random_init, seed=seed)

    table = random_init_control([str(tiny_task_file)], templates=[1], seeds=[0, 1], limit=10, root=tmp_path,
                                model="tiny", load=load)
    assert loads == [False, True]
    assert table["init"].tolist() == ["pretrained", "pretrained", "random", "random"]
    assert table["model"].tolist()[2] == "tiny+random-init-s0"
    assert (table["n_examples"] == 10).all()
    for label in ("holm", "uncorrected"):  # every component (3 layers x 4 heads + 3 MLPs) in exactly one category
        counts = table[[f"{category} ({label})" for category in CATEGORIES]].sum(axis=1)
        assert (counts == 3 * 4 + 3).all()
    assert (table["above chance (holm)"] <= table["above chance (uncorrected)"]).all()
    # Resuming reads the saved runs and loads no model.
    again = random_init_control([str(tiny_task_file)], templates=[1], seeds=[0, 1], limit=10, root=tmp_path,
                                model="tiny", load=load)
    assert loads == [False, True]
    assert again.equals(table)


def test_chance_yardsticks_follow_each_tasks_label_count():
    """Chance is 1 / labels of each task at its own n: a 3-label task is not measured against 2 or 4 labels."""
    import pandas as pd

    counts = {f"{category} (uncorrected)": count for category, count in zip(CATEGORIES, (1, 2, 3, 9), strict=True)}
    table = pd.DataFrame([{"task": "two", "n_examples": 10, "n_labels": 2, **counts},
                          {"task": "three", "n_examples": 12, "n_labels": 3, **counts},
                          {"task": "two", "n_examples": 10, "n_labels": 2, **counts}])
    yardsticks = chance_yardsticks(table, alpha=0.05)
    assert yardsticks[["tasks", "labels", "n_examples"]].values.tolist() == [["two", 2, 10], ["three", 3, 12]]
    assert yardsticks["chance"].tolist() == pytest.approx([1 / 2, 1 / 3])
    # n = 10 at 1/2: 9 or 10 correct pass, probability 11/1024; 15 components each may pass.
    assert yardsticks["test_size"][0] == pytest.approx(11 / 1024)
    assert yardsticks["expected_false_good"][0] == pytest.approx(15 * 11 / 1024)
    assert yardsticks["expected_best_accuracy"][1] == pytest.approx(chance_best_accuracy(15, 12, 1 / 3))


def test_control_command_prints_the_tasks_own_yardsticks(tiny_model_dir, tiny_task_file, tmp_path, capsys):
    from parts.cli import main

    argv = ["control", "--model", str(tiny_model_dir), "--tasks", str(tiny_task_file), "--templates", "1",
            "--limit", "10", "--out", str(tmp_path), "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out.split("chance alone (1 / labels) over 15 components, alpha=0.05")[1]
    rows = [line.split() for line in printed.strip().splitlines()[2:]]  # after the title and the header
    assert [row[:4] for row in rows] == [["tiny", "2", "10", "0.500"]]  # one task of 2 labels: no 4-label row


def test_control_exports_to_the_docs_tables(tiny_task_file, tokenizer, tmp_path):
    """`parts tables --from-runs` carries a control: its runs are kept out of runs.csv, each random run is paired
    with its pretrained twin, and the control and checkpoint tables are recomputed from the accuracies."""
    from conftest import make_hf_model

    from parts.experiments.export import export_results
    from parts.experiments.runner import run_dir
    from parts.figures.tables import build_tables, control_checkpoints, load_results

    def load(name, device=None, random_init=False, seed=0, **options):
        return from_hf(make_hf_model("llama"), tokenizer, "tiny", random_init=random_init, seed=seed)

    from parts.model.loading import from_hf

    random_init_control([str(tiny_task_file)], templates=[1, 2], seeds=[0], limit=10, root=tmp_path / "runs",
                        model="tiny", load=load)
    export_results(tmp_path / "runs", tmp_path / "results", limit=10, tasks={"tiny": tiny_task_file})
    results = load_results(tmp_path / "results")
    assert results.runs["model"].tolist() == ["tiny", "tiny"]  # the random runs are the control's only
    assert results.controls["init"].tolist() == ["pretrained", "random", "pretrained", "random"]
    runs = {(init, template): DecompositionRun.load(run_dir(tmp_path / "runs", name, tiny_task_file, template, 0,
                                                            limit=10))
            for init, name in (("pretrained", "tiny"), ("random", "tiny+random-init-s0")) for template in (1, 2)}
    for _, row in results.controls.iterrows():
        run = runs[(row["init"], row["template"])]
        assert [float(a) for a in row["accuracies"].split()] == pytest.approx(run.component_accuracy.tolist(), abs=1e-4)
        predictions = run.component_predictions
        assert row["one_label"] == sum(len(set(predictions[:, c].tolist())) == 1 for c in range(predictions.shape[1]))
        assert row["full_accuracy"] == pytest.approx(run.full_accuracy)
    # the checkpoints view: the pretrained model's best component, followed back to the random model, by hand
    table = control_checkpoints(results.controls, results.components, k=1).set_index(["task", "checkpoint"])
    best = [runs[("pretrained", t)].top_components(1)[0][0] for t in (1, 2)]
    followed = [runs[("random", t)].component_accuracy[runs[("random", t)].component_index(b)].item()
                for t, b in zip((1, 2), best, strict=True)]
    assert table.loc[("tiny", "random init (step 0)"), "final top-1"] == pytest.approx(50 * sum(followed), abs=0.06)
    assert table.loc[("tiny", "tiny"), "final top-1"] == table.loc[("tiny", "tiny"), "best #1"]
    blocks, _ = build_tables(results, n_resamples=100)
    assert "| random | tiny | 1 | 10 |" in blocks["random-init"]
    assert "| 200 | 0.50 | 0.0384 |" in blocks["chance-rule"]  # the binomial test's size at n = 200, by scipy
    # a random run without its pretrained twin is refused, naming the command that finishes it
    import shutil
    shutil.rmtree(run_dir(tmp_path / "runs", "tiny", tiny_task_file, 2, 0, limit=10))
    with pytest.raises(PartsError, match="has no pretrained twin"):
        export_results(tmp_path / "runs", tmp_path / "again", limit=10, tasks={"tiny": tiny_task_file})
