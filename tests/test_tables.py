"""Result files exported from run folders, and the docs tables rebuilt from them (`parts tables`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from parts.analysis import paper
from parts.analysis.stats import rounded
from parts.cli import main
from parts.decomposition.runs import DecompositionRun
from parts.errors import PartsError
from parts.experiments.export import export_results
from parts.experiments.runner import run_dir
from parts.figures.tables import load_results, rewrite_blocks
from parts.methods import MAIN_METHODS

PAGE = """# Results

Some prose that stays.

<!-- parts-tables:main -->
old table
<!-- /parts-tables:main -->

<!-- parts-tables:table1 -->
<!-- /parts-tables:table1 -->

<!-- parts-tables:unknown -->
kept as is
<!-- /parts-tables:unknown -->
"""


@pytest.fixture(scope="module")
def roomy_task_file(tmp_path_factory, tiny_task_file):
    """The tiny task with its 40 training rows twice: seeds 0 and 1 need 48 for disjoint 24-example sets."""
    folder = tmp_path_factory.mktemp("roomytask")
    for name in ("tiny.json", "test.jsonl"):
        (folder / name).write_text((tiny_task_file.parent / name).read_text())
    (folder / "train.jsonl").write_text(2 * (tiny_task_file.parent / "train.jsonl").read_text())
    return folder / "tiny.json"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model_dir, roomy_task_file):
    root = tmp_path_factory.mktemp("evaluated")
    argv = ["evaluate", "--model", str(tiny_model_dir), "--tasks", str(roomy_task_file), "--templates", "1,2",
            "--seeds", "0,1", "--labels", "24", "--limit", "8", "--out", str(root), "--device", "cpu"]
    assert main(argv) == 0
    results = root / "results-files"
    export_results(root, results, limit=8, tasks={"tiny": roomy_task_file})
    return root, results, argv


def test_evaluate_prints_the_intervals(evaluated, capsys):
    _, _, argv = evaluated
    assert main(argv) == 0  # finished: resumes from disk, prints the tables
    printed = capsys.readouterr().out
    assert "95% bootstrap interval" in printed and "| tiny | 4 | 8 |" in printed
    assert "24-shot ICL" in printed.split("CompRW minus each baseline")[1]


def test_export_recomputes_every_accuracy_per_example(evaluated, tiny_model_dir, roomy_task_file):
    root, results, _ = evaluated
    loaded = load_results(results)
    per_setting = 7 + sum(m.beyond_paper and not m.optional for m in MAIN_METHODS)  # the paper's 7 rows, those beyond it
    assert len(loaded.main) == 4 * per_setting and len(loaded.predictions) == 4 * per_setting
    merged = loaded.predictions.merge(loaded.main, on=["task", "template", "seed", "method", "labels"])
    hits = merged["correct"].map(lambda text: text.count("1") / len(text))
    np.testing.assert_allclose(hits, merged["accuracy"], atol=1e-6)
    assert set(merged["correct"].str.len()) == {8}
    # one row per test run, the paper's label-biased rule counted by hand
    assert len(loaded.runs) == 4
    run = DecompositionRun.load(run_dir(root, str(tiny_model_dir), roomy_task_file, 2, 1, "test", limit=8))
    row = loaded.runs[(loaded.runs.template == 2) & (loaded.runs.seed == 1)].iloc[0]
    predictions = run.component_predictions
    by_hand = sum(len(set(predictions[:, c].tolist())) == 1 for c in range(predictions.shape[1]))
    assert row["label_biased"] == by_hand
    assert [float(a) for a in row["accuracies"].split()] == pytest.approx(run.component_accuracy.tolist(), abs=1e-4)
    assert loaded.components == list(run.component_names)


def test_main_table_means_and_intervals(evaluated):
    _, results, _ = evaluated
    loaded = load_results(results)
    intervals = paper.main_intervals(loaded.predictions, loaded.main, n_resamples=300)
    accuracy = intervals[intervals.quantity == "accuracy"].set_index(["task", "method"])
    for column, method in (("CompRW 24", "comprw"), ("24-shot ICL", "icl")):
        labels = 24
        expected = 100 * loaded.main[(loaded.main.method == method) & (loaded.main.labels == labels)]["accuracy"].mean()
        cell = accuracy.loc[("tiny", column)]
        assert cell.estimate == pytest.approx(expected, abs=1e-6)
        assert cell.low <= cell.estimate <= cell.high and cell.runs == 4 and cell.examples == 8
    # one task: its average is the task itself
    assert accuracy.loc[("average", "CompRW 24")].estimate == pytest.approx(accuracy.loc[("tiny", "CompRW 24")].estimate)
    difference = intervals[(intervals.quantity == "difference") & (intervals.method == "CompRW 24 - 24-shot ICL")]
    assert len(difference) == 2
    table = paper.main_table(intervals)
    assert list(table["task"]) == ["tiny", "average"] and "CompRW 24" in table.columns


def test_tables_command_rewrites_marked_blocks_only(evaluated, tmp_path, capsys):
    _, results, _ = evaluated
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text(PAGE)
    argv = ["tables", "--results", str(results), "--docs", str(docs), "--no-figures", "--resamples", "200"]
    assert main([*argv, "--check"]) == 1
    assert "out of date" in capsys.readouterr().out
    assert main(argv) == 0
    text = (docs / "results.md").read_text()
    assert "old table" not in text and "| tiny | 4 | 8 |" in text and "Some prose that stays." in text
    assert "kept as is" in text and "| task | runs | n | chance | FULL | ORACLE-T1 |" in text
    assert main([*argv, "--check"]) == 0  # rebuilt: up to date, the same numbers (seeded bootstrap)
    assert (results / "analysis.json").is_file()
    assert main(["tables", "--results", str(tmp_path / "none"), "--docs", str(docs), "--no-figures"]) == 2
    assert "lacks main.csv" in capsys.readouterr().err


def test_rewrite_blocks_and_yardsticks_in_table1():
    assert rewrite_blocks(PAGE, {"main": "new"}).count("new\n<!-- /parts-tables:main -->") == 1
    runs = pd.DataFrame([{"task": "sst2", "template": 1, "seed": 0, "n_examples": 2, "n_labels": 2, "full": 0.5,
                          "label_biased": 1, "accuracies": "0.5 1.0 0.0"}])
    measures = paper.run_measures(runs, ["L0H0", "L0H1", "MLP0"])
    assert measures.loc[0, "best_component"] == "L0H1" and measures.loc[0, "worst_component"] == "MLP0"
    # best / worst of 3 chance classifiers on 2 examples: P(acc <= k/2) = 1/4, 3/4, 1
    assert measures.loc[0, "chance_best"] == pytest.approx(100 * ((1 - 0.25**3) + (1 - 0.75**3)) / 2)
    assert measures.loc[0, "label_biased_share"] == pytest.approx(100 / 3)
    table = paper.component_table_1(measures)
    assert table.loc[0, "ORACLE-T1"] == "100.0" and table.loc[0, "ORACLE-B1"] == "0.0"  # one run: no spread shown


def test_agreement_pairs_name_the_relation():
    runs = pd.DataFrame([
        {"task": "sst2", "template": t, "seed": s, "accuracies": acc}
        for t, s, acc in ((2, 0, "0.1 0.2 0.3 0.4 0.5 0.6"), (2, 1, "0.1 0.2 0.3 0.4 0.6 0.5"),
                          (4, 0, "0.6 0.5 0.4 0.3 0.2 0.1"), (1, 0, "0.1 0.2 0.3 0.4 0.5 0.6"))])
    pairs = paper.agreement_pairs(runs).set_index(["run_a", "run_b"])
    assert pairs.loc[("t2 s0", "t2 s1"), "relation"] == "seeds"
    assert pairs.loc[("t2 s0", "t4 s0"), "relation"] == "perturbed template"  # sst2's template 4 perturbs 2
    assert pairs.loc[("t2 s0", "t4 s0"), "pearson"] == pytest.approx(-1.0)
    assert pairs.loc[("t2 s0", "t1 s0"), "relation"] == "templates"
    assert pairs.loc[("t2 s0", "t1 s0"), "top_k_iou"] == 1.0
    assert pairs.loc[("t2 s0", "t2 s1"), "top_k_iou"] == pytest.approx(1.0)  # same top 5 of 6
    table = paper.agreement_table(pairs.reset_index())
    seeds = table[table["runs differ in"] == "demonstrations"].iloc[0]
    assert seeds["pairs"] == 1 and seeds["pearson r (paper)"] == "0.81"


def _shift_rows() -> list[dict[str, object]]:
    """Two runs on a shifted set of 4 examples: FULL 50%, TRANSFER-1 75%, ORACLE-1 87.5%, each right where FULL is."""
    rows: list[dict[str, object]] = []
    for seed, (full, one, oracle) in enumerate((("0101", "1101", "1111"), ("0011", "0111", "0111"))):
        for method, correct in (("icl", full), ("transfer-1", one), ("oracle-1", oracle)):
            rows.append({"kind": "transfer", "task": "sst2 -> yelp", "template": 1, "seed": seed, "method": method,
                         "labels": 4, "correct": correct})
    return rows


def test_transfer_intervals_table3():
    rows = _shift_rows()
    rows.append({"kind": "transfer", "task": "sst2", "template": 1, "seed": 0, "method": "icl", "labels": 4,
                 "correct": "0000"})  # the source side: not a shift
    table = paper.transfer_intervals(pd.DataFrame(rows), n_resamples=500)
    row = table.iloc[0]
    assert row["shift"] == "sst2 -> yelp" and row["runs"] == 2 and row["n"] == 4
    assert row["FULL"].startswith("50.0 [") and row["TRANSFER-1"].startswith("75.0 [")
    assert row["ORACLE-1 (upper bound)"].startswith("87.5 [")
    assert row["TRANSFER-1 minus FULL"].startswith("25.0 [")
    assert list(table["shift"]) == ["sst2 -> yelp", "average of the shifts"]


def test_coverage_lists_what_finished():
    main_rows = pd.DataFrame([{"task": "sst2", "template": t, "seed": s, "method": "icl"} for t, s in ((1, 0), (2, 0))])
    runs = pd.DataFrame([{"task": "sst2", "template": 4, "seed": 0}, {"task": "sst2 -> yelp", "template": 1, "seed": 0}])
    transfer = pd.DataFrame([{"task": "sst2 -> yelp", "template": t, "seed": s, "method": "transfer-1"}
                             for t in (1, 2, 3) for s in range(5)])
    table = paper.coverage_table(main_rows, runs, transfer).set_index("task")
    assert table.loc["sst2", "main-table settings (of 15)"] == "t1-2 × s0, 2"
    assert table.loc["sst2", "test runs (Tables 1, 2; of 20)"] == "t4 × s0, 1"
    assert table.loc["boolq", "main-table settings (of 15)"] == "0"
    assert table.loc["sst2 -> yelp", "transfer runs (Table 3; of 15)"] == "t1-3 × s0-4, all 15"
    uneven = {(1, 0), (1, 1), (1, 2), (1, 4), (2, 0), (2, 1), (2, 2), (2, 4), (3, 0)}
    assert paper.compact_runs(uneven, 15) == "t1-2 × s0-2,4; t3 × s0, 9"


def test_tables_never_replaces_what_parts_did_not_write(evaluated, roomy_task_file, tmp_path, capsys):
    """Docs pages: only the marked blocks change, the page keeps its permissions and never becomes parts' file;
    result files: a user's file of the same name is refused before anything is written."""
    import os
    import stat

    from parts import io

    root, results, _ = evaluated
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text(PAGE)
    os.chmod(docs / "results.md", 0o640)
    assert main(["tables", "--results", str(results), "--docs", str(docs), "--no-figures", "--resamples", "200"]) == 0
    assert stat.S_IMODE(os.stat(docs / "results.md").st_mode) == 0o640 and "Some prose that stays." in \
        (docs / "results.md").read_text()
    assert io.recorded(docs) == set() and not (docs / ".parts").exists()
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "runs.csv").write_text("the user's own runs table\n")
    with pytest.raises(PartsError, match=f"{mine / 'runs.csv'} exists and parts did not write it"):
        export_results(root, mine, limit=8, tasks={"tiny": roomy_task_file})
    assert sorted(p.name for p in mine.iterdir()) == ["runs.csv"]
    assert (mine / "runs.csv").read_text() == "the user's own runs table\n"


def test_committed_docs_tables_match_the_committed_results():
    """Every generated table in docs/ is what `parts tables` makes from results/ (rerun it after an export)."""

    from parts.figures.tables import rebuild

    root = Path(__file__).resolve().parents[1]
    assert rebuild(root / "results", root / "docs", None, check=True) == []
    text = (root / "docs" / "results.md").read_text()
    assert "<!-- parts-tables:main -->\nSettings (template t, demonstration seed s): " in text
    assert "\n\n| task | runs | n |" in text.split("<!-- parts-tables:main -->")[1]


def test_table1_uses_the_papers_templates_only():
    runs = pd.DataFrame([{"task": "sst2", "template": t, "seed": 0, "n_examples": 2, "n_labels": 2, "full": 0.5,
                          "label_biased": 0, "accuracies": acc} for t, acc in ((1, "0.5 1.0"), (4, "0.0 0.0"))])
    table = paper.component_table_1(paper.run_measures(runs, ["L0H0", "MLP0"]))
    assert table.loc[0, "runs"] == 1 and table.loc[0, "ORACLE-T1"] == "100.0"  # template 4 left out


def test_check_fails_on_a_stale_note(evaluated, tmp_path, capsys):
    """`parts tables --check` compares the results rows' notes with what `parts evaluate` writes now."""
    import shutil

    from parts.experiments.results import ORACLE_NOTE, stale_note_rows

    _, results, _ = evaluated
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text(PAGE)
    argv = ["tables", "--results", str(copy), "--docs", str(docs), "--no-figures", "--resamples", "200", "--check"]
    assert main(argv[:-1]) == 0 and main(argv) == 0
    capsys.readouterr()
    main_csv = pd.read_csv(copy / "main.csv", dtype=str, keep_default_na=False)
    oracle = main_csv.index[main_csv["method"] == "oracle"][0]
    assert main_csv.loc[oracle, "note"].startswith(f"{ORACLE_NOTE}; ")  # what the tiny evaluation wrote
    main_csv.loc[oracle, "note"] = main_csv.loc[oracle, "note"].replace(ORACLE_NOTE, "upper bound: trained on the test labels")
    main_csv.to_csv(copy / "main.csv", index=False)
    assert main(argv) == 1
    printed = capsys.readouterr().out.splitlines()
    row = main_csv.loc[oracle]
    assert printed == [f"out of date: {copy / 'main.csv'}: tiny t{row['template']} s{row['seed']} oracle {row['labels']} "
                       f"has the note {row['note']!r}, which `parts evaluate` no longer writes: re-export it "
                       "(`parts tables --from-runs ROOT`) or correct the note"]
    committed = pd.read_csv(Path(__file__).resolve().parents[1] / "results" / "main.csv")
    settings = committed[["task", "template", "seed"]].drop_duplicates()
    assert stale_note_rows(committed).empty and len(committed[committed["method"] == "oracle"]) == len(settings) >= 72


def test_table2_keeps_template_4_for_the_contrastive_pairs_only():
    """Demonstration and template pairs among the paper's templates 1-3; template 4 only in its contrastive pairs."""
    runs = pd.DataFrame([{"task": "sst2", "template": t, "seed": s, "accuracies": f"0.{t}{s} 0.5 0.{9 - t}"}
                         for t in (1, 2, 4) for s in (0, 1)])
    pairs = paper.agreement_pairs(runs)
    by_relation = paper.agreement_table(pairs).set_index("runs differ in")["pairs"]
    # seeds: t1 and t2 (t4's pair left out); templates: t1-t2 at each seed (t1-t4 left out); perturbed: t2-t4
    assert by_relation.to_dict() == {"demonstrations": 2, "perturbed template": 2, "templates": 2}
    every = paper.agreement_table(pairs, templates=None).set_index("runs differ in")["pairs"]
    assert every.to_dict() == {"demonstrations": 3, "perturbed template": 2, "templates": 4}


def test_spreads_follow_ddof():
    runs = pd.DataFrame([{"task": "sst2", "template": 1, "seed": s, "n_examples": 10, "n_labels": 2, "full": full,
                          "label_biased": 0, "accuracies": "0.5 0.5"} for s, full in ((0, 0.5), (1, 0.7))])
    measures = paper.run_measures(runs, ["L0H0", "MLP0"])
    assert paper.component_table_1(measures).loc[0, "FULL"] == "60.0 ± 14.1"  # sample std: 20 / sqrt(2)
    assert paper.component_table_1(measures, ddof=0).loc[0, "FULL"] == "60.0 ± 10.0"  # the authors' ddof = 0


def test_transfer_differences_are_each_method_minus_full_paired():
    rows = _shift_rows()
    row = paper.transfer_differences(pd.DataFrame(rows), n_resamples=500).set_index("shift").loc["sst2 -> yelp"]
    assert row["runs"] == 2 and row["n"] == 4
    assert row["TRANSFER-1 minus FULL"].startswith("25.0 [") and row["ORACLE-1 minus FULL"].startswith("37.5 [")
    low = float(row["TRANSFER-1 minus FULL"].split("[")[1].split(",")[0])
    assert low >= 0  # paired: TRANSFER-1 is right wherever FULL is, so no replicate favours FULL


def test_paired_differences_and_both_resampling_schemes(evaluated, tmp_path, capsys):
    _, results, _ = evaluated
    loaded = load_results(results)
    many_shot = paper.main_intervals(loaded.predictions, loaded.main, n_resamples=300, reference="24-shot ICL")
    table = paper.one_difference_table(many_shot, "24-shot ICL - k-shot ICL").set_index("task")
    by_hand = {m: 100 * loaded.main[(loaded.main.method == "icl") & (loaded.main.labels == n)]["accuracy"].mean()
               for m, n in (("24", 24), ("k", 4))}
    cell = table.loc["tiny", "24-shot ICL minus k-shot ICL"]
    assert float(cell.split(" [")[0]) == pytest.approx(by_hand["24"] - by_hand["k"], abs=0.051)
    assert table.loc["tiny", "runs"] == 4 and table.loc["tiny", "n"] == 8
    runs = paper.main_intervals(loaded.predictions, loaded.main, n_resamples=300)
    nested = paper.main_intervals(loaded.predictions, loaded.main, n_resamples=300, resample="nested")
    assert np.allclose(runs["estimate"], nested["estimate"])  # one estimate, two intervals
    both = paper.resampling_table(runs, nested).set_index("quantity")
    average = runs.set_index(["task", "method"]).loc[("average", "CompRW 24"), "estimate"]
    assert both.loc["CompRW 24", "estimate"] == rounded(average)
    assert "CompRW 24 minus 24-shot ICL" in both.index and (both["runs"] == 4).all()
    # the options of `parts tables`: docs made with them are stale for the defaults, and the other way round
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "page.md").write_text(PAGE.replace("parts-tables:main", "parts-tables:resampling"))
    argv = ["tables", "--results", str(results), "--docs", str(docs), "--no-figures", "--resamples", "200"]
    assert main([*argv, "--ddof", "0", "--resample", "nested"]) == 0
    assert main([*argv, "--ddof", "0", "--resample", "nested", "--check"]) == 0
    assert main([*argv, "--check"]) == 1
    assert "interval, nested: templates, seeds, examples" in (docs / "page.md").read_text()
    capsys.readouterr()


def test_oracle_differences_are_paired_over_runs():
    runs = pd.DataFrame([{"task": "sst2", "template": t, "seed": 0, "n_examples": 10, "n_labels": 2, "full": full,
                          "label_biased": 0, "accuracies": acc}
                         for t, full, acc in ((1, 0.5, "0.5 0.3"), (2, 0.7, "0.6 0.4"), (4, 0.9, "1.0 0.0"))])
    measures = paper.run_measures(runs, ["L0H0", "MLP0"])
    row = paper.oracle_differences(measures, n_resamples=2000).set_index("task").loc["sst2"]
    assert row["runs"] == 2 and row["n"] == 10  # template 4 left out, as in Table 1
    # best - full per run: 0 and -10 points; two runs resampled: -10, -5 or 0 points
    assert row["ORACLE-T1 minus FULL"] == "-5.0 [-10.0, 0.0]"
    best_yardstick, worst_yardstick = (100 * y for y in paper.chance_extremes(10, 2, 2))
    assert row["ORACLE-T1 minus best of N at chance"].startswith(f"{rounded(55 - best_yardstick)} [")
    assert row["ORACLE-B1 minus worst of N at chance"].startswith(f"{rounded(35 - worst_yardstick)} [")


def test_resampling_changes_lists_the_verdicts_that_differ():
    def intervals(low: float, high: float) -> pd.DataFrame:
        return pd.DataFrame([{"task": "sst2", "quantity": "difference", "method": "a - b", "estimate": 3.0, "low": low,
                              "high": high, "runs": 15, "examples": 200},
                             {"task": "sst2", "quantity": "difference", "method": "a - c", "estimate": 5.0, "low": 1.0,
                              "high": 9.0, "runs": 15, "examples": 200}])

    changes = paper.resampling_changes(intervals(0.2, 6.4), intervals(-1.0, 7.8))
    assert changes.to_dict("records") == [{"task": "sst2", "difference": "a minus b", "runs": 15, "n": 200,
                                           "estimate": "3.0", "interval, runs exchangeable (default)": "[0.2, 6.4]",
                                           "interval, nested": "[-1.0, 7.8]"}]
    assert paper.resampling_changes(intervals(0.2, 6.4), intervals(0.1, 7.0)).empty


def test_export_only_main_keeps_the_other_tables(evaluated, roomy_task_file, tmp_path, capsys):
    """`--only main` replaces main.csv and the main rows of predictions.csv; transfer's rows and the other files stay."""
    import shutil

    root, results, _ = evaluated
    out = tmp_path / "results"
    shutil.copytree(results, out)  # with its marker: parts wrote these files
    transfer_line = "transfer,tiny-model,tiny -> other,1,0,icl,4,4,0110"
    predictions = (out / "predictions.csv").read_text()
    main_lines = predictions.splitlines()[1:]
    (out / "predictions.csv").write_text(predictions.splitlines()[0] + "\n" + transfer_line + "\n" + main_lines[0] + "\n")
    (out / "main.csv").write_text((results / "main.csv").read_text().splitlines()[0] + "\n")  # an old, smaller table
    (out / "runs.csv").write_text("the committed runs\n")
    (out / "transfer.csv").write_text("the committed transfer table\n")
    (out / "components.txt").write_text("L0H0\n")
    written = export_results(root, out, limit=8, tasks={"tiny": roomy_task_file}, only=["main"])
    assert sorted(written) == ["main.csv", "predictions.csv"]
    assert (out / "main.csv").read_text() == (results / "main.csv").read_text()
    lines = (out / "predictions.csv").read_text().splitlines()
    assert lines == [predictions.splitlines()[0], *main_lines, transfer_line]  # main rows first, as a full export
    assert (out / "runs.csv").read_text() == "the committed runs\n"
    assert (out / "transfer.csv").read_text() == "the committed transfer table\n"
    assert (out / "components.txt").read_text() == "L0H0\n"
    with pytest.raises(PartsError, match="unknown table.*mainn"):
        export_results(root, out, limit=8, only=["mainn"])
    with pytest.raises(PartsError, match="no transfer results at n=8"):
        export_results(root, out, limit=8, tasks={"tiny": roomy_task_file}, only=["transfer"])
    assert main(["tables", "--results", str(out), "--docs", str(tmp_path), "--only", "main", "--no-figures"]) == 2
    assert "give --from-runs ROOT too" in capsys.readouterr().err


def _pair_predictions() -> pd.DataFrame:
    """Two tasks; CompRW 24 and SignedRW† 24 on 2 settings each, Gates† 24 on one setting of task a only."""
    rows = []
    table = {("a", 1, 0): {"comprw": "1101", "comprw-signed": "1001", "gates": "0101", "icl": "0001"},
             ("a", 2, 0): {"comprw": "0111", "comprw-signed": "0110", "icl": "0011"},
             ("b", 1, 0): {"comprw": "1100", "comprw-signed": "1110", "icl": "1000"},
             ("b", 2, 0): {"comprw": "0011", "comprw-signed": "0001", "icl": "0010"}}
    for (task, template, seed), methods in table.items():
        for method, correct in methods.items():
            rows.append({"kind": "main", "task": task, "template": template, "seed": seed, "method": method,
                         "labels": 4 if method == "icl" else 24, "correct": correct})
    return pd.DataFrame(rows)


def test_beyond_paper_difference_by_hand():
    """CompRW minus each method beyond the paper over only the settings both have, recomputed by hand: the estimate,
    and the 95% interval from the same draws (examples, then runs, with replacement) averaged over tasks."""
    predictions = _pair_predictions()
    main_rows = pd.DataFrame({"task": ["a", "b"], "shots": [4, 4]})
    pairs = paper.pairwise_intervals(predictions, main_rows, n_resamples=400, seed=3)
    gates = pairs[(pairs["versus"] == "Gates† 24") & (pairs["quantity"] == "difference")].set_index("task")
    assert list(gates.index) == ["a", "average"]  # task b has no gates: not in the pair
    assert gates.loc["a", "runs"] == 1 and gates.loc["a", "settings"] == "t1 × s0, 1"
    assert gates.loc["a", "estimate"] == pytest.approx(100 * (3 / 4 - 2 / 4))  # t1 s0 alone, not t2 s0
    assert gates.loc["average", "settings"] == "t1 × s0, 1 per task, 1 task, 1 in all"
    # SignedRW: both tasks, both settings; redo the bootstrap by hand, task by task, with the same generator
    rng = np.random.default_rng(3)
    draws = []
    for task in ("a", "b"):
        rows = predictions[predictions["task"] == task]
        settings = sorted({(t, s) for t, s in zip(rows["template"], rows["seed"], strict=True)})

        def correct(method: str, rows: pd.DataFrame = rows, settings: list = settings) -> np.ndarray:
            by = {(r.template, r.seed): [int(c) for c in r.correct] for r in rows[rows["method"] == method].itertuples()}
            return np.array([by[key] for key in settings], dtype=float)

        difference = correct("comprw") - correct("comprw-signed")  # [run example]
        examples = rng.integers(0, 4, size=(400, 4))
        runs = rng.integers(0, 2, size=(400, 2))
        draws.append([difference[np.ix_(runs[i], examples[i])].mean() for i in range(400)])
    by_hand = 100 * np.mean(draws, axis=0)
    signed = pairs[(pairs["versus"] == "SignedRW† 24") & (pairs["quantity"] == "difference")].set_index("task")
    # a: (3 + 3 - 2 - 2) / 8 = 25 points; b: (2 + 2 - 3 - 1) / 8 = 0 points; the average: 12.5
    assert signed.loc["average", "estimate"] == pytest.approx(12.5)
    assert signed.loc["average", "low"] == pytest.approx(np.quantile(by_hand, 0.025))
    assert signed.loc["average", "high"] == pytest.approx(np.quantile(by_hand, 0.975))
    assert signed.loc["average", "settings"] == "t1-2 × s0, 2 per task, 2 tasks, 4 in all"
    table = paper.pair_table(pairs, average_only=True).set_index("method")
    assert list(table.index) == ["SignedRW† 24", "Gates† 24"]
    assert table.loc["Gates† 24", "settings (both methods)"] == "t1 × s0, 1 per task, 1 task, 1 in all"
    assert table.loc["SignedRW† 24", "CompRW minus the method"] == (
        f"12.5 [{rounded(np.quantile(by_hand, 0.025))}, {rounded(np.quantile(by_hand, 0.975))}]")
    assert table.loc["Gates† 24", "the method"].startswith("50.0 [")
    assert table.loc["Gates† 24", "CompRW (same settings)"].startswith("75.0 [")
    gates_per_task = paper.pair_table(pairs, ["Gates† 24"])
    assert list(gates_per_task["task"]) == ["a", "average"] and gates_per_task["runs"].tolist() == [1, 1]
    assert gates_per_task.loc[0, "CompRW minus the method"].startswith("25.0 [")
    per_task = paper.beyond_paper_differences(pairs).set_index("task")
    assert per_task.loc["b", "Gates† 24"] == "" and per_task.loc["a", "Gates† 24"].endswith("(1 run)")
    assert per_task.loc["a", "SignedRW† 24"].startswith("25.0 [") and list(per_task.index) == ["a", "b", "average"]


def test_main_table_leaves_out_a_method_run_on_fewer_settings():
    """Gates on one setting of task a: the main table keeps both settings of every other method, names the gates."""
    predictions = _pair_predictions()
    main_rows = pd.DataFrame({"task": ["a", "b"], "shots": [4, 4]})
    intervals = paper.main_intervals(predictions, main_rows, n_resamples=50)
    accuracy = intervals[intervals["quantity"] == "accuracy"].set_index(["task", "method"])
    assert "Gates† 24" not in set(intervals["method"])
    assert accuracy.loc[("a", "CompRW 24"), "runs"] == 2
    assert accuracy.loc[("a", "CompRW 24"), "estimate"] == pytest.approx(100 * 6 / 8)
    assert paper.main_settings_line(predictions, main_rows) == (
        "Settings (template t, demonstration seed s): t1-2 × s0, 2 per task, 2 tasks, 4 in all. Run on fewer "
        "settings, so left out of this table where they lack some: Gates† 24 (t1 × s0, 1 per task, 1 task, 1 in all).")
    table = paper.difference_table(intervals, beyond_paper=False)
    assert list(table.columns) == ["task", "k-shot ICL"]  # SignedRW† is in the beyond-paper table instead


def test_beyond_paper_blocks_of_the_docs():
    """`parts tables`' blocks: the gates on fewer settings in their own table, the paper's baselines alone in
    `differences`; with no method beyond the paper, the blocks say they have not run."""
    from parts.figures.tables import NOT_RUN, Results, build_tables

    predictions = _pair_predictions()
    main_rows = predictions.drop(columns=["kind", "correct"]).assign(shots=4)
    empty = pd.DataFrame()
    blocks, _ = build_tables(Results(main_rows, empty, predictions, empty, [], empty, empty, empty), n_resamples=50)
    assert blocks["main"].startswith("Settings (template t, demonstration seed s): t1-2 × s0, 2 per task, 2 tasks")
    assert "| SignedRW† 24 |" in blocks["main"].splitlines()[2] and "Gates†" not in blocks["main"].split("\n\n")[1]
    assert blocks["differences"].splitlines()[0] == "| task | k-shot ICL |"
    assert blocks["beyond-paper-partial"].splitlines()[2].startswith("| Gates† 24 | a | t1 × s0, 1 | 1 | 4 | 75.0 [")
    assert len(blocks["beyond-paper-partial"].splitlines()) == 4  # task a and the average
    assert blocks["beyond-paper"].splitlines()[2].startswith("| SignedRW† 24 | t1-2 × s0, 2 per task, 2 tasks, 4 in all |")
    paper_only = predictions[~predictions["method"].isin(["comprw-signed", "gates"])]
    blocks, _ = build_tables(Results(main_rows, empty, paper_only, empty, [], empty, empty, empty), n_resamples=50)
    assert blocks["beyond-paper"] == blocks["beyond-paper-partial"] == NOT_RUN
