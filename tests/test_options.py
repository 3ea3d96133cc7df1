"""Run options: every command that runs the model passes every option on, and options that change
the numbers key the run folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import parts.model.loading
from parts.cli import main
from parts.decomposition.decompose import Decomposer
from parts.errors import PartsError
from parts.experiments.options import RunOptions
from parts.experiments.runner import ensure_run, run_dir

OPTIONS = ["--device", "cpu", "--dtype", "bf16", "--engine", "bridge", "--no-prefix-reuse", "--batch-size", "3",
           "--allow-inexact"]
VARIANT = "+bfloat16+bridge-engine+no-prefix-reuse"


@pytest.fixture
def spy(monkeypatch):
    """Records every model load's and every decomposer's options (and still runs them)."""
    seen: dict[str, list] = {"loads": [], "engines": [], "calls": [], "inexact": []}
    real_load, real_init, real_call = parts.model.loading.load_model, Decomposer.__init__, Decomposer.__call__

    def load(name=None, **kwargs):
        seen["loads"].append(kwargs)
        return real_load(name, **kwargs)

    def init(self, model, label_token_ids, engine="hf", **kwargs):
        seen["engines"].append(engine)
        seen["inexact"].append(kwargs.get("allow_inexact", False))
        real_init(self, model, label_token_ids, engine, **kwargs)

    def call(self, prompts, batch_size=8, prefix_reuse=True, progress=True, description="", **kwargs):
        seen["calls"].append((batch_size, prefix_reuse))
        return real_call(self, prompts, batch_size, prefix_reuse, progress, description, **kwargs)

    monkeypatch.setattr(parts.model.loading, "load_model", load)  # every command loads through this one name
    monkeypatch.setattr(Decomposer, "__init__", init)
    monkeypatch.setattr(Decomposer, "__call__", call)
    return seen


def commands(model: Path, task: Path, target: Path, out: Path) -> dict[str, list[str]]:
    small = ["--templates", "1", "--seeds", "0", "--limit", "4"]
    return {
        "decompose": ["decompose", "--model", str(model), "--task", str(task), "--limit", "4", "--out", str(out / "one")],
        "sweep": ["sweep", "--model", str(model), "--tasks", str(task), *small, "--out", str(out)],
        "evaluate": ["evaluate", "--model", str(model), "--tasks", str(task), *small, "--labels", "8", "--out", str(out)],
        "transfer": ["transfer", "--model", str(model), "--pairs", f"{task}:{target}", "--templates", "1", "--seeds", "0",
                     "--limit", "4", "--target-limit", "4", "--out", str(out)],
        "control": ["control", "--model", str(model), "--tasks", str(task), *small, "--out", str(out)],
        "checkpoints": ["checkpoints", "--checkpoints", str(model), "--tasks", str(task), "--limit", "4",
                        "--out", str(out)],
    }


@pytest.mark.parametrize("command", ["decompose", "sweep", "evaluate", "transfer", "control", "checkpoints"])
def test_every_option_reaches_the_model(command, spy, tiny_model_dir, tiny_task_file, shifted_task_file, tmp_path,
                                        capsys):
    argv = commands(tiny_model_dir, tiny_task_file, shifted_task_file, tmp_path)[command]
    assert main([*argv, *OPTIONS]) == 0, capsys.readouterr().err
    assert spy["loads"] and all(kw["device"] == "cpu" and kw["dtype"] == "bfloat16" for kw in spy["loads"])
    assert spy["engines"] and set(spy["engines"]) == {"bridge"}
    assert set(spy["inexact"]) == {True}
    assert spy["calls"] and set(spy["calls"]) == {(3, False)}
    summaries = [json.loads(p.read_text()) for p in tmp_path.rglob("summary.json")]
    assert summaries and all(s["info"]["dtype"] == "bfloat16" and s["info"]["engine"] == "bridge"
                             and s["info"]["prefix_reuse"] is False for s in summaries)
    if command != "decompose":  # a run folder named by the user is not keyed
        assert all(VARIANT in str(p.relative_to(tmp_path)).split("/")[0] for p in tmp_path.rglob("summary.json"))


def test_figures_loads_the_model_with_its_device_and_dtype(spy, tiny_model_dir, tiny_task_file, tmp_path):
    assert main(["sweep", "--model", str(tiny_model_dir), "--tasks", str(tiny_task_file), "--templates", "1",
                 "--seeds", "0", "--limit", "4", "--out", str(tmp_path / "runs"), "--device", "cpu"]) == 0
    spy["loads"].clear()
    assert main(["figures", str(tmp_path / "runs"), "--out", str(tmp_path / "figures"), "--formats", "html",
                 "--only", "*-head-*", "--device", "cpu", "--dtype", "bfloat16"]) == 0
    assert spy["loads"] == [{"device": "cpu", "dtype": "bfloat16"}]


def test_options_that_change_the_numbers_key_the_run_folder(tiny_task_file, tmp_path):
    default = run_dir(tmp_path, "m", str(tiny_task_file), 1, 0, "test", None, 6)
    assert default == run_dir(tmp_path, "m", str(tiny_task_file), 1, 0, "test", None, 6, RunOptions(batch_size=2))
    assert default == tmp_path / "m" / "tiny" / "t1-s0-k4-test-n6"  # folders written before options were keyed
    assert run_dir(tmp_path, "m", str(tiny_task_file), 1, 0, "test", None, 6, RunOptions(dtype="bf16")) == (
        tmp_path / "m+bfloat16" / "tiny" / "t1-s0-k4-test-n6")
    assert RunOptions(engine="bridge", prefix_reuse=False, dtype="fp16").variant == "+float16+bridge-engine+no-prefix-reuse"
    with pytest.raises(PartsError, match="unknown dtype 'float8'"):
        RunOptions(dtype="float8")
    with pytest.raises(PartsError, match="unknown engine 'tl'"):
        RunOptions(engine="tl")
    with pytest.raises(PartsError, match="unknown run option\\(s\\) bach_size"):
        RunOptions().replace(bach_size=3)


def test_a_float32_request_never_reuses_a_bfloat16_run_in_its_folder(tiny_llama, tiny_task_file, tmp_path):
    """A folder written before options were keyed (a bf16 run at the float32 path) is named, not reused."""
    settings = dict(task=str(tiny_task_file), template=1, seed=0, limit=4)
    path = tmp_path / "run"
    ensure_run(path, tiny_llama, options=RunOptions(progress=False), **settings)
    summary = json.loads((path / "summary.json").read_text())
    summary["fingerprint"]["dtype"] = "bfloat16"
    (path / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(PartsError, match=r"dtype differs from the run's \('bfloat16' there, now 'float32'\); "
                                         r"pass --recompute-changed"):
        ensure_run(path, tiny_llama, **settings)
    assert ensure_run(path, tiny_llama, options=RunOptions(dtype="bfloat16"), **settings) is not None
