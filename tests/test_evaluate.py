"""`parts evaluate`: L-shot prompts and their truncation, the results table, and a tiny sweep end to end."""

from __future__ import annotations

import pytest

from parts.cli import main
from parts.data.tasks import Template
from parts.decomposition.runs import DecompositionRun
from parts.experiments.evaluate import many_shot_prompts
from parts.experiments.results import read_results, results_table, write_results
from parts.experiments.runner import run_dir
from parts.methods import MAIN_METHODS
from parts.reweighting.reweight import load_weights

TEMPLATE = Template("review : {text} sentiment :", (" negative", " positive"))
DEMONSTRATIONS = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}, {"text": "fun", "label": 1}]
QUERIES = [{"text": "awful", "label": 0}, {"text": "very very dull", "label": 0}]


def test_many_shot_prompts_show_every_demonstration_in_order(tokenizer):
    prompts, dropped = many_shot_prompts(tokenizer, TEMPLATE, DEMONSTRATIONS, QUERIES, n_ctx=25)
    assert dropped == 0
    assert prompts[0] == ("review : good sentiment : positive\nreview : bad sentiment : negative\n"
                          "review : fun sentiment : positive\nreview : awful sentiment :")
    # word-level tokens: 6 per demonstration, 5 and 7 for the queries
    assert [len(tokenizer(p)["input_ids"]) for p in prompts] == [23, 25]


@pytest.mark.parametrize("n_ctx,dropped", [(24, 1), (19, 1), (18, 2), (13, 2), (12, 3), (7, 3)])
def test_many_shot_prompts_drop_leading_demonstrations_to_fit(tokenizer, n_ctx, dropped):
    with pytest.warns(UserWarning, match=f"dropped the first {dropped} demonstrations \\({3 - dropped} shown\\)"):
        prompts, got = many_shot_prompts(tokenizer, TEMPLATE, DEMONSTRATIONS, QUERIES, n_ctx, "tiny 3-shot")
    assert got == dropped
    assert all(len(tokenizer(p)["input_ids"]) <= n_ctx for p in prompts)
    # the longest prompt decides for all, so they keep sharing one prefix: the last demonstrations
    assert prompts[1] == "".join(f"review : {d['text']} sentiment :{TEMPLATE.label_words[d['label']]}\n"
                                 for d in DEMONSTRATIONS[dropped:]) + "review : very very dull sentiment :"


def test_a_query_longer_than_the_context_is_a_parts_error(tokenizer):
    from parts.errors import PartsError

    with pytest.raises(PartsError, match=r"^test prompt 1 alone \('review : very very dull sentiment :'\) is 7 tokens, 1 more "
                                         "than the context window of 6 tokens: use a model with a longer context"):
        many_shot_prompts(tokenizer, TEMPLATE, DEMONSTRATIONS, QUERIES, n_ctx=6)


def _row(task, seed, method, labels, shots, accuracy):
    return {"model": "m", "task": task, "template": 1, "seed": seed, "shots": shots, "limit": 10, "method": method,
            "labels": labels, "accuracy": accuracy, "n_test": 10, "note": ""}


def test_results_table_is_mean_and_std_per_task_then_the_average():
    rows = [
        _row("sst2", 0, "icl", 4, 4, 0.5), _row("sst2", 1, "icl", 4, 4, 0.7),
        _row("sst2", 0, "comprw", 24, 4, 0.8), _row("sst2", 1, "comprw", 24, 4, 0.9),
        _row("mnli", 0, "icl", 3, 3, 0.4), _row("mnli", 0, "comprw", 24, 3, 0.5),
    ]
    assert results_table(rows).splitlines() == [
        "| task | runs | k-shot ICL | CompRW 24 |",
        "|---|---|---|---|",
        "| sst2 | 2 | 60.0 ± 14.1 | 85.0 ± 7.1 |",
        "| mnli | 1 | 40.0 ± 0.0 | 50.0 ± 0.0 |",
        "| **average** | 3 | **50.0** | **67.5** |",
    ]


def test_a_transfer_table_averages_sources_and_shifts_apart():
    """A transfer table holds the source task and its shift: one average over both would mix a test set the
    weights were chosen on with one they were not."""
    rows = [
        _row("sst2", 0, "icl", 4, 4, 0.9), _row("sst2 -> yelp", 0, "icl", 4, 4, 0.6),
        _row("agnews", 0, "icl", 4, 4, 0.7), _row("agnews -> news", 0, "icl", 4, 4, 0.3),
        _row("sst2 -> yelp", 0, "transfer-1", 4, 4, 0.5), _row("agnews -> news", 0, "transfer-1", 4, 4, 0.4),
    ]
    assert results_table(rows).splitlines()[-2:] == [
        "| **average of the sources** | 2 | **80.0** |  |",
        "| **average of the shifts** | 2 | **45.0** | **45.0** |",
    ]


def test_results_table_orders_columns_as_the_paper():
    methods = [("oracle", 4), ("comprw", 12), ("calib+", 24), ("icl", 12), ("batch", 4), ("comprw", 24),
               ("icl", 24), ("contextual", 4), ("icl", 4), ("calib+", 12)]
    header = results_table([_row("sst2", 0, m, n, 4, 0.5) for m, n in methods]).splitlines()[0]
    assert header == ("| task | runs | k-shot ICL | ContextualCal | BatchCal | 24-shot ICL | Calib+ 24 | CompRW 24 | "
                      "12-shot ICL | Calib+ 12 | CompRW 12 | Oracle RW (fit on test) |")


def test_write_results_merges_by_key_atomically(tmp_path):
    path = tmp_path / "results.csv"
    write_results(path, [_row("sst2", 0, "icl", 4, 4, 0.5), _row("sst2", 1, "icl", 4, 4, 0.7)])
    write_results(path, [_row("sst2", 1, "icl", 4, 4, 0.9), _row("rte", 0, "icl", 4, 4, 0.6)])
    rows = read_results(path)
    assert list(zip(rows["task"], rows["seed"], rows["accuracy"], strict=True)) == [("sst2", 0, 0.5), ("sst2", 1, 0.9),
                                                                                      ("rte", 0, 0.6)]
    # parts' marker and locks beside it, no staging file left
    assert sorted(p.name for p in tmp_path.iterdir()) == [".parts", ".parts-lock", ".results.csv.parts-lock", "results.csv"]
    # The bytes the csv module wrote before the table was a DataFrame: CRLF lines, minimal quoting.
    assert path.read_bytes() == (b"model,task,template,seed,shots,limit,method,labels,accuracy,n_test,note,fingerprint\r\n"
                                 b"m,sst2,1,0,4,10,icl,4,0.5,10,,\r\nm,sst2,1,1,4,10,icl,4,0.9,10,,\r\n"
                                 b"m,rte,1,0,4,10,icl,4,0.6,10,,\r\n")


EXPECTED_METHODS = {("icl", 4), ("contextual", 4), ("batch", 4), ("oracle", 4), ("icl", 12), ("calib+", 12),
                    ("comprw", 12)} | {(m.key, 12) for m in MAIN_METHODS if m.beyond_paper and not m.optional}


def test_evaluate_end_to_end_then_resumes_without_the_model(tmp_path, tiny_model_dir, tiny_task_file, capsys,
                                                           monkeypatch):
    argv = ["evaluate", "--model", str(tiny_model_dir), "--tasks", str(tiny_task_file), "--templates", "1,2",
            "--seeds", "0", "--labels", "12", "--limit", "8", "--out", str(tmp_path), "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "0 of 2 settings already evaluated; 2 to go" in printed
    assert "| tiny | 2 |" in printed and "CompRW 12" in printed
    rows = read_results(tmp_path / "results.csv")
    assert len(rows) == 2 * len(EXPECTED_METHODS)
    for template in (1, 2):
        mine = rows[rows["template"] == template]
        assert set(zip(mine["method"], mine["labels"], strict=True)) == EXPECTED_METHODS
        assert set(mine["n_test"]) == {8}
        assert all(accuracy * 8 == pytest.approx(round(accuracy * 8), abs=1e-4) for accuracy in mine["accuracy"])
        folder = run_dir(tmp_path, str(tiny_model_dir), tiny_task_file, template, 0, "test", limit=8)
        run = DecompositionRun.load(folder)
        k_shot = mine[(mine["method"] == "icl") & (mine["labels"] == 4)]["accuracy"].item()
        assert k_shot == pytest.approx(run.full_accuracy, abs=1e-6)
        names, weights = load_weights(folder, labels=12)
        assert names == run.component_names and weights.shape == (3 * 4 + 3,)
        assert load_weights(folder, labels="oracle")[1].shape == (15,)
        assert (folder / "icl-labels12.safetensors").is_file() and (folder / "content-free.safetensors").is_file()
        train = run_dir(tmp_path, str(tiny_model_dir), tiny_task_file, template, 0, "train", limit=8)
        assert DecompositionRun.load(train).n_examples == 12 - 4
    assert len(list(tmp_path.glob("results-*-n8.md"))) == 1

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although everything needed is on disk")

    monkeypatch.setattr("parts.model.loading.load_model", no_model)
    assert main(argv) == 0
    assert "2 of 2 settings already evaluated; 0 to go" in capsys.readouterr().out

    assert argv[7:9] == ["--seeds", "0"]
    assert main([*argv[:8], "0,1", *argv[9:], "--table-only"]) == 0  # seed 1 was never run, and is not now
    printed = capsys.readouterr().out
    assert "2 of 4 settings already evaluated; the table shows those" in printed and "| tiny | 2 |" in printed

    # An interrupted sweep: template 2's rows never made it to results.csv. Its runs, L-shot logits
    # and content-free logits are on disk, so it is finished without the model, to the same numbers.
    whole = (tmp_path / "results.csv").read_bytes()
    rows[rows["template"] == 1].to_csv(tmp_path / "results.csv", index=False, lineterminator="\r\n")
    assert main(argv) == 0
    assert "1 of 2 settings already evaluated; 1 to go" in capsys.readouterr().out
    assert (tmp_path / "results.csv").read_bytes() == whole


def test_a_budget_no_larger_than_the_shots_is_a_one_line_error(tmp_path, tiny_model_dir, tiny_task_file, capsys):
    argv = ["evaluate", "--model", str(tiny_model_dir), "--tasks", str(tiny_task_file), "--templates", "1",
            "--seeds", "0", "--labels", "4", "--limit", "4", "--out", str(tmp_path), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--labels 4 leaves no training examples beside the 4 demonstrations" in err and "Traceback" not in err


def test_table_only_without_results_is_a_one_line_error(tmp_path, capsys):
    from parts.cli import main

    argv = ["evaluate", "--tasks", "sst2", "--templates", "1", "--seeds", "0", "--out", str(tmp_path / "none"), "--table-only"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "results.csv does not exist" in err and "Traceback" not in err
