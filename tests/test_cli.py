"""The `parts` command on a tiny model saved to disk, and its one-line errors."""

from __future__ import annotations

import json

import pytest

from parts.cli import main
from parts.decomposition.runs import DecompositionRun


def test_decompose_command_writes_a_run(tmp_path, tiny_model_dir, tiny_task_file, capsys):
    out = tmp_path / "run"
    code = main(["decompose", "--model", str(tiny_model_dir), "--task", str(tiny_task_file), "--template", "2",
                 "--seed", "1", "--limit", "10", "--out", str(out), "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "full model accuracy" in printed and "reconstruction error" in printed
    run = DecompositionRun.load(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_examples"] == 10 and summary["template"] == 2 and summary["seed"] == 1
    assert summary["max_reconstruction_error"] < 1e-4
    assert summary["full_accuracy"] == pytest.approx(run.full_accuracy)
    assert len(summary["component_names"]) == len(summary["component_accuracy"]) == 3 * 4 + 3


@pytest.mark.parametrize("argv,message", [
    (["decompose", "--task", "nope", "--out", "x"], "unknown task 'nope'"),
    (["decompose", "--task", "sst2", "--template", "9", "--out", "x", "--data-dir", "."], "has no template 9"),
    (["decompose", "--task", "sst2", "--out", "x", "--data-dir", "/nowhere"], "does not exist"),
])
def test_user_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("option", [["--limit", "0"], ["--limit", "-3"], ["--seed", "x"], ["--batch-size", "0"]])
def test_bad_numbers_are_rejected_by_the_parser(option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["decompose", "--task", "sst2", "--out", "x", *option])
    assert exit_info.value.code == 2
    assert "error: argument" in capsys.readouterr().err
