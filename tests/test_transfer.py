"""Out-of-distribution transfer on a tiny model: source demonstrations and weights, target test rows."""

from __future__ import annotations

import json

import pytest
import torch

from parts.data.prompts import build_prompts, render_prompt
from parts.data.tasks import get_task, load_split, parse_pairs
from parts.decomposition.runs import DecompositionRun
from parts.errors import PartsError
from parts.experiments.results import read_results
from parts.experiments.transfer import (
    TransferSetting,
    check_compatible,
    evaluate_transfer,
    transfer_gap,
    transfer_prompts,
    transfer_settings,
)
from parts.reweighting.reweight import predict, train_weights


@pytest.fixture(scope="module")
def target_task_file(tmp_path_factory):
    """A shifted target: longer reviews, test split only, its own template and label words."""
    folder = tmp_path_factory.mktemp("target")
    rows = [{"text": ("the movie was very " + word + " and " + word), "label": label}
            for label, word in [(1, "great"), (0, "awful"), (1, "fun"), (0, "dull")] * 4]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "train.jsonl").write_text("")
    spec = {"name": "shifted", "data_dir": ".", "template": "{text} ?", "label_words": [" no", " yes"]}
    path = folder / "shifted.json"
    path.write_text(json.dumps(spec))
    return path


def test_target_prompts_use_the_source_template_and_demonstrations(tiny_task_file, target_task_file):
    source, target = get_task(str(tiny_task_file)), get_task(str(target_task_file))
    prompts = transfer_prompts(source, target, template=1, seed=1, limit=6)
    own = build_prompts(source, 1, 1, split="test", limit=1)
    assert prompts.demonstrations == own.demonstrations
    assert prompts.label_words == (" negative", " positive")  # the source's, not the target's " no"/" yes"
    train, rows = load_split(source, "train"), load_split(target, "test")
    expected = render_prompt(source.template(1), [train[i] for i in own.demonstrations], rows[prompts.example_indices[0]])
    assert prompts.prompts[0] == expected
    assert prompts.prompts[0].endswith("review : " + rows[prompts.example_indices[0]]["text"] + " sentiment :")
    assert sorted(prompts.labels) == [0, 0, 0, 1, 1, 1]  # the target's balanced sample
    assert prompts.task == "shifted"


def test_incompatible_targets_are_user_errors(tiny_task_file, tmp_path):
    source = get_task(str(tiny_task_file))
    three = {"name": "three", "data_dir": ".", "template": "{text}", "label_words": [" a", " b", " c"]}
    (tmp_path / "three.json").write_text(json.dumps(three))
    with pytest.raises(PartsError, match="three has 3 labels but tiny has 2"):
        check_compatible(source, get_task(str(tmp_path / "three.json")), 1)
    other_field = {"name": "pairs", "data_dir": ".", "template": "{question} ?", "label_words": [" no", " yes"]}
    (tmp_path / "pairs.json").write_text(json.dumps(other_field))
    with pytest.raises(PartsError, match="reads field\\(s\\) text that pairs does not have"):
        check_compatible(source, get_task(str(tmp_path / "pairs.json")), 1)
    with pytest.raises(PartsError, match="'sst2-yelp' is not SOURCE:TARGET"):
        parse_pairs("sst2-yelp")
    assert parse_pairs("sst2:yelp, boolq:boolq_contrast") == [("sst2", "yelp"), ("boolq", "boolq_contrast")]


def test_evaluate_transfer_scores_source_weights_on_both_test_sets(tiny_task_file, target_task_file, tiny_llama, tmp_path):
    source, target = get_task(str(tiny_task_file)), get_task(str(target_task_file))
    setting = TransferSetting(source, target, template=2, seed=0, source_limit=10, target_limit=8)
    rows = evaluate_transfer(lambda: tiny_llama, "tiny", setting, tmp_path, progress=False)
    assert [(r["task"], r["method"], r["labels"]) for r in rows[:4]] == [
        ("tiny", "icl", 4), ("tiny -> shifted", "icl", 4), ("tiny", "batch", 4), ("tiny -> shifted", "batch", 4)]
    assert {r["method"] for r in rows} == {"icl", "batch", "calib+", "comprw", "transfer-1", "oracle-1"}
    assert len(rows) == 10

    source_test = DecompositionRun.load(tmp_path / "tiny" / "tiny" / "t2-s0-k4-test-n10")
    source_train = DecompositionRun.load(tmp_path / "tiny" / "tiny" / "t2-s0-k4-train-n20")
    target_test = DecompositionRun.load(tmp_path / "tiny" / "transfer" / "tiny-to-shifted" / "t2-s0-k4-test-n8")
    assert target_test.info["demonstrations_from"] == "tiny"
    assert target_test.prompts.demonstrations == source_test.prompts.demonstrations
    by_key = {(r["task"], r["method"]): r for r in rows}
    assert by_key[("tiny", "icl")]["accuracy"] == pytest.approx(source_test.full_accuracy, abs=1e-6)
    assert by_key[("tiny -> shifted", "icl")]["accuracy"] == pytest.approx(target_test.full_accuracy, abs=1e-6)
    assert by_key[("tiny -> shifted", "icl")]["n_test"] == 8
    weights = train_weights(source_train.component_logits, source_train.labels).weights
    on_target = float((predict(weights, target_test.component_logits) == target_test.labels).float().mean())
    assert by_key[("tiny -> shifted", "comprw")]["accuracy"] == pytest.approx(on_target, abs=1e-6)
    # The paper's Table 3: the best source component, scored on the target; the best target component
    best_source = int(torch.argsort(source_test.component_accuracy, descending=True, stable=True)[0])
    transfer_one = by_key[("tiny -> shifted", "transfer-1")]
    assert transfer_one["accuracy"] == pytest.approx(float(target_test.component_accuracy[best_source]), abs=1e-6)
    assert transfer_one["note"].startswith(source_test.component_names[best_source] + ", chosen on the source")
    assert by_key[("tiny -> shifted", "oracle-1")]["accuracy"] == pytest.approx(
        float(target_test.component_accuracy.max()), abs=1e-6)
    assert by_key[("tiny -> shifted", "oracle-1")]["accuracy"] >= transfer_one["accuracy"]
    from parts.experiments.transfer import transfer_setting_predictions

    recomputed = transfer_setting_predictions(tmp_path, "tiny", setting)
    for (task_name, method, _), (gold, predicted) in recomputed.items():
        assert float((predicted == gold).float().mean()) == pytest.approx(by_key[(task_name, method)]["accuracy"], abs=1e-6)
    assert len(recomputed) == 10
    # Resuming: every run is on disk, so no model is needed and the rows are the same.
    again = evaluate_transfer(lambda: pytest.fail("a finished run was recomputed"), "tiny", setting, tmp_path)
    assert again == rows
    gaps = transfer_gap(rows)
    assert gaps["icl"] == pytest.approx(target_test.full_accuracy - source_test.full_accuracy, abs=1e-6)


def test_transfer_settings_check_every_pair_first(tiny_task_file, target_task_file):
    settings = transfer_settings([(str(tiny_task_file), str(target_task_file))], [1, 2], [0, 3], 10, 8)
    assert [(s.template, s.seed) for s in settings] == [(1, 0), (2, 0), (1, 3), (2, 3)]
    with pytest.raises(PartsError, match="has no template 7"):
        transfer_settings([(str(tiny_task_file), str(target_task_file))], [7], [0])


def test_transfer_command_writes_rows_and_table(tiny_task_file, target_task_file, tiny_model_dir, tmp_path, capsys):
    from parts.cli import main

    code = main(["transfer", "--pairs", f"{tiny_task_file}:{target_task_file}", "--templates", "1", "--seeds", "0",
                 "--limit", "10", "--target-limit", "8", "--model", str(tiny_model_dir), "--device", "cpu",
                 "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| tiny -> shifted | 1 |" in printed and "target - source accuracy: icl" in printed
    rows = read_results(tmp_path / "transfer.csv")
    assert len(rows) == 10 and set(rows["n_test"]) == {10, 8}
    # Each accuracy is a count of right answers over n_test, and the full model's equals its saved runs'.
    assert all(abs(a * n - round(a * n)) < 1e-4 for a, n in zip(rows["accuracy"], rows["n_test"], strict=True))
    (model_folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    source_run = DecompositionRun.load(model_folder / "tiny" / "t1-s0-k4-test-n10")
    target_run = DecompositionRun.load(model_folder / "transfer" / "tiny-to-shifted" / "t1-s0-k4-test-n8")
    icl = rows[rows["method"] == "icl"].set_index("task")["accuracy"]
    assert icl["tiny"] == pytest.approx(source_run.full_accuracy, abs=1e-6)
    assert icl["tiny -> shifted"] == pytest.approx(target_run.full_accuracy, abs=1e-6)
    assert f"| tiny -> shifted | 1 | {100 * target_run.full_accuracy:.1f} ± 0.0 |" in printed
    assert main(["transfer", "--pairs", "sst2", "--out", str(tmp_path)]) == 2
    assert "is not SOURCE:TARGET" in capsys.readouterr().err
