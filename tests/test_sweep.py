"""Sweeps on a tiny model saved to disk: one model load, skipping finished runs, byte-identical resume."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import parts.experiments.runner
import parts.model.loading
from parts import io
from parts.cli import main
from parts.errors import PartsError
from parts.experiments.runner import run_dir
from parts.experiments.sweep import plan_sweep, sweep


@pytest.fixture
def count_loads(monkeypatch):
    """Counts the sweep's model loads."""
    loads: list[str] = []
    real = parts.model.loading.load_model

    def counting(name, **kwargs):
        loads.append(name)
        return real(name, **kwargs)

    monkeypatch.setattr(parts.model.loading, "load_model", counting)
    return loads


def file_hashes(root: Path) -> dict[str, str]:
    """Every file under root (hidden staging folders included) and the SHA-256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def tiny_sweep(model_dir: Path, task_file: Path, out: Path) -> list[Path]:
    return sweep(str(model_dir), [str(task_file)], [1, 2], [0, 1], split="test", limit=6, out=out, device="cpu",
                 batch_size=4, progress=False)


def test_plan_is_task_template_seed_order_in_run_dirs(tiny_task_file, tmp_path):
    planned = plan_sweep("m", [str(tiny_task_file)], [2, 1], [3, 0], "test", 6, None, tmp_path)
    assert [(p.template, p.seed) for p in planned] == [(2, 3), (2, 0), (1, 3), (1, 0)]
    assert planned[0].path == run_dir(tmp_path, "m", str(tiny_task_file), 2, 3, "test", None, 6)
    assert planned[0].path == tmp_path / "m" / "tiny" / "t2-s3-k4-test-n6"
    assert planned[0].label == "tiny t2 s3"
    with pytest.raises(PartsError, match="has no template 7"):
        plan_sweep("m", [str(tiny_task_file)], [1, 7], [0], "test", 6, None, tmp_path)
    with pytest.raises(PartsError, match="at least one seed"):
        plan_sweep("m", [str(tiny_task_file)], [1], [], "test", 6, None, tmp_path)


def test_interrupted_sweep_resumes_to_identical_files(tiny_model_dir, tiny_task_file, tmp_path, monkeypatch, count_loads):
    whole = tiny_sweep(tiny_model_dir, tiny_task_file, tmp_path / "whole")
    assert len(whole) == 4 and all((p / "summary.json").is_file() for p in whole)
    assert len(count_loads) == 1

    # Crash after two runs are saved; a killed process also leaves a staging folder behind.
    real_ensure_run = parts.experiments.runner.ensure_run
    calls = []

    def crashing(path, *args, **kwargs):
        if len(calls) == 2:
            staging = Path(path).parent / f".{Path(path).name}.parts-tmp-killed"
            staging.mkdir(parents=True)
            (staging / "tensors.safetensors").write_bytes(b"half written")
            raise KeyboardInterrupt
        calls.append(path)
        return real_ensure_run(path, *args, **kwargs)

    monkeypatch.setattr(parts.experiments.runner, "ensure_run", crashing)
    with pytest.raises(KeyboardInterrupt):
        tiny_sweep(tiny_model_dir, tiny_task_file, tmp_path / "resumed")
    finished = [p for p in tmp_path.joinpath("resumed").rglob("summary.json")]
    assert len(finished) == 2
    monkeypatch.setattr(parts.experiments.runner, "ensure_run", real_ensure_run)

    resumed = tiny_sweep(tiny_model_dir, tiny_task_file, tmp_path / "resumed")
    assert [p.relative_to(tmp_path / "resumed") for p in resumed] == [p.relative_to(tmp_path / "whole") for p in whole]
    whole_files, resumed_files = file_hashes(tmp_path / "whole"), file_hashes(tmp_path / "resumed")
    # summary.json, prompts.jsonl, tensors.safetensors, .parts per run (and its lock file beside it); no staging
    assert len([f for f in whole_files if not f.endswith(io.LOCK_SUFFIX)]) == 4 * 4
    assert resumed_files == whole_files
    assert len(count_loads) == 3  # the whole sweep, the interrupted one, the resumed one

    assert tiny_sweep(tiny_model_dir, tiny_task_file, tmp_path / "resumed") == resumed
    assert len(count_loads) == 3  # every run finished: no model load at all


def test_sweep_command_skips_finished_runs(tiny_model_dir, tiny_task_file, tmp_path, capsys):
    argv = ["sweep", "--model", str(tiny_model_dir), "--tasks", str(tiny_task_file), "--templates", "1-2", "--seeds", "0",
            "--limit", "4", "--out", str(tmp_path), "--device", "cpu"]
    assert main(argv) == 0
    assert f"2 runs under {tmp_path} (2 new, 0 already finished" in capsys.readouterr().out
    assert main([*argv[:8], "0-1", *argv[9:]]) == 0
    assert f"4 runs under {tmp_path} (2 new, 2 already finished" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["sweep", "--tasks", "sst2,nope", "--out", "x"], "unknown task 'nope'"),
    (["sweep", "--task", "sst2", "--templates", "1,9", "--out", "x"], "task 'sst2' has no template 9"),
    (["sweep", "--task", "sst2", "--out", "x", "--data-dir", "/nowhere"], "does not exist"),
])
def test_sweep_errors_are_one_line(argv, message, tmp_path, capsys):
    argv = [a if a != "x" else str(tmp_path / "runs") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_sweep_logged_to_a_file_prints_one_plain_line_per_run(tiny_model_dir, tiny_task_file, tmp_path):
    """Output that is not a terminal (a log file, CI) gets no bars (no carriage returns, no nested per-prompt
    bars, no model-loading bar): one line per finished run."""
    import os
    import subprocess
    import sys

    argv = [sys.executable, "-m", "parts", "sweep", "--model", str(tiny_model_dir), "--tasks", str(tiny_task_file),
            "--templates", "1,2", "--seeds", "0", "--limit", "6", "--device", "cpu", "--out", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    with (tmp_path / "log.txt").open("w") as log:  # a file, as `parts sweep ... 2> log.txt` gives
        assert subprocess.run(argv, stdout=log, stderr=log, env=env, stdin=subprocess.DEVNULL).returncode == 0
    log = (tmp_path / "log.txt").read_text()
    assert "\r" not in log and "it/s" not in log and "prompt/s" not in log and "%|" not in log, log
    progress = [line for line in log.splitlines() if line.startswith("sweep ")]
    assert [line.split(" (")[0] for line in progress] == ["sweep 1/2 runs: tiny t1 s0 done",
                                                          "sweep 2/2 runs: tiny t2 s0 done"], log
