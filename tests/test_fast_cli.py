"""The first hour: `parts --help`, every command's parsing and its argument and task errors import no torch
(the ~10 s that importing torch and transformers takes); the wall times are in benchmarks/results.md
(benchmarks/bench_cli.py), not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "transformer_lens", "pandas", "scipy", "plotly")

PROBE = """
import contextlib, io, json, sys
from parts.cli import build_parser, main
argv = json.loads(sys.argv[1])
err = io.StringIO()
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    try:
        code = main(argv) if argv else build_parser() and 0
    except SystemExit as exit:
        code = exit.code
heavy = [name for name in json.loads(sys.argv[2]) if name in sys.modules]
print(json.dumps({"code": code, "heavy": heavy, "err": err.getvalue()}))
"""


def probe(argv: list[str], env: dict[str, str] | None = None) -> dict:
    """What `parts ARGV` returns, prints to stderr and imports of HEAVY (`env`: its whole environment)."""
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv), json.dumps(HEAVY)], cwd=REPO,
                          capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout)


COMMANDS = ["decompose", "sweep", "evaluate", "analyze", "figures", "control", "transfer", "checkpoints", "tables"]


@pytest.mark.parametrize("argv", [[], ["--help"], ["--version"], *[[c, "--help"] for c in COMMANDS]])
def test_help_imports_nothing_heavy(argv):
    result = probe(argv)
    assert result["code"] == 0 and result["heavy"] == [], result


@pytest.mark.parametrize("argv, message", [
    (["decompose", "--task", "nosuch", "--out", "x"], "unknown task 'nosuch'"),
    (["decompose", "--task", "sst2", "--template", "9", "--out", "x"], "has no template 9"),
    (["decompose", "--task", "sst2", "--limit", "0", "--out", "x"], "argument --limit: 0 must be at least 1"),
    (["decompose", "--task", "sst2", "--out", "x", "--data-dir", "/nonexistent"], "fix --data-dir"),
    (["decompose", "--task", "sst2", "--out", "x", "--tempalte", "2"], "unrecognized arguments: --tempalte"),
    (["sweep", "--tasks", "sst2,nosuch", "--out", "x"], "unknown task 'nosuch'"),
    (["sweep", "--tasks", "sst2", "--templates", "7", "--out", "x"], "has no template 7"),
    (["evaluate", "--tasks", "nosuch", "--out", "x"], "unknown task 'nosuch'"),
    (["evaluate", "--tasks", "sst2", "--labels", "4", "--out", "x"], "--labels 4 leaves no training examples"),
    (["transfer", "--pairs", "sst2-yelp", "--out", "x"], "is not SOURCE:TARGET"),
    (["transfer", "--pairs", "sst2:nosuch", "--out", "x"], "unknown task 'nosuch'"),
    (["control", "--tasks", "nosuch"], "unknown task 'nosuch'"),
    (["control", "--alpha", "2"], "--alpha must be between 0 and 1"),
    (["checkpoints", "--checkpoints", "random", "--tasks", "nosuch"], "unknown task 'nosuch'"),
    (["analyze", "/nonexistent"], "runs folder /nonexistent does not exist: give the --out folder of a sweep"),
    (["report", "/nonexistent", "--out", "x"], "runs folder /nonexistent does not exist: give the --out folder"),
    (["figures", "/nonexistent", "--out", "x"], "runs folder /nonexistent does not exist: give the --out folder"),
])
def test_argument_and_task_errors_import_nothing_heavy(argv, message):
    """Reported as one line, exit status 2, before torch or transformers is imported."""
    result = probe(argv)
    assert result["code"] == 2 and message in result["err"], result
    assert result["heavy"] == [], result


def test_a_user_task_with_a_wrong_data_dir_names_the_task_file_not_the_option(tmp_path):
    task = tmp_path / "mine.json"
    task.write_text(json.dumps({"name": "mine", "data_dir": "nowhere", "template": "{text} :", "label_words": [" a", " b"]}))
    result = probe(["decompose", "--task", str(task), "--out", str(tmp_path / "run")])
    assert result["code"] == 2 and result["heavy"] == [], result
    assert f'reads its examples from {tmp_path / "nowhere"}, the "data_dir" of its task JSON file' in result["err"]
    assert "--data-dir" not in result["err"]


def test_counts_agree_with_their_nouns():
    from parts.cli.common import count

    assert [count(n, "run") for n in (0, 1, 2)] == ["0 runs", "1 run", "2 runs"]


def test_the_top_level_api_is_lazy_and_is_the_library():
    """`import parts` imports no torch; `parts.load_model` etc. are the library's own functions."""
    code = ("import sys, parts; light = 'torch' not in sys.modules; "
            "from parts.model.loading import load_model; from parts.experiments.runner import decompose_task; "
            "from parts.decomposition.runs import DecompositionRun; "
            "print(light, parts.load_model is load_model, parts.decompose_task is decompose_task, "
            "parts.DecompositionRun is DecompositionRun, sorted(set(parts.EXPORTS) - set(dir(parts))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "True", "True", "True", "[]"]
    import parts

    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        parts.nope  # noqa: B018


def test_the_top_level_api_decomposes_and_loads(tiny_llama, tiny_task_file, tmp_path):
    import parts

    run = parts.decompose_task(tiny_llama, str(tiny_task_file), template=1, seed=0, limit=4, progress=False)
    assert isinstance(run, parts.DecompositionRun) and run.component_logits.shape[:2] == (4, len(run.component_names))
    assert parts.DecompositionRun.load(run.save(tmp_path / "run")) == run
