"""Checkpoint sweeps on checkpoints made here: a tiny Llama trained a few steps on the tiny task."""

from __future__ import annotations

import hashlib

import pandas as pd
import pytest
import torch

from parts.errors import PartsError
from parts.experiments.checkpoints import (
    Checkpoint,
    checkpoint_figure,
    checkpoint_runs,
    checkpoint_summary,
    checkpoint_table,
    parse_checkpoint,
    pythia_checkpoints,
)
from parts.experiments.options import RunOptions
from parts.experiments.runner import model_slug

STEPS = (0, 30, 80)


@pytest.fixture(scope="module")
def trained_checkpoints(tmp_path_factory, tokenizer, tiny_task_file):
    """Folders step0, step30, step80: a tiny Llama after that many Adam steps on the task's labelled lines."""
    from conftest import make_hf_model

    import parts.data.prompts as prompts_module
    from parts.data.prompts import build_prompts
    from parts.data.tasks import get_task

    task = get_task(str(tiny_task_file))
    # In-context prompts of training examples (four demonstration sets), each followed by its label word. The 40
    # training examples hold one of the seeds' disjoint labelled sets of 24, so the lines are made with the sets
    # overlapping (nothing excluded), as before: the checkpoints need varied lines, not disjoint sets.
    with pytest.MonkeyPatch.context() as overlapping:
        overlapping.setattr(prompts_module, "_taken_before", lambda *args: frozenset())
        prompt_sets = [build_prompts(task, 1, seed, split="train") for seed in range(4)]
    lines = [p + ps.label_words[y] for ps in prompt_sets for p, y in zip(ps.prompts, ps.labels, strict=True)]
    batch = tokenizer(lines, return_tensors="pt", padding=True)
    # Loss on the label word only (the last real token of each right-padded line).
    last = batch["attention_mask"].sum(1) - 1
    rows_index = torch.arange(len(lines))
    targets = torch.full_like(batch["input_ids"], -100)
    targets[rows_index, last] = batch["input_ids"][rows_index, last]
    model = make_hf_model("llama").train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    root = tmp_path_factory.mktemp("checkpoints")
    folders = []
    for step in range(max(STEPS) + 1):
        if step in STEPS:
            folder = root / f"step{step}"
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            folders.append(folder)
        loss = model(**batch, labels=targets).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return folders


def test_parse_checkpoint_specs():
    assert parse_checkpoint("EleutherAI/pythia-160m@step1000") == Checkpoint("EleutherAI/pythia-160m", 1000.0, "step1000")
    assert parse_checkpoint("ckpts/run-a/step-250") == Checkpoint("ckpts/run-a/step-250", 250.0)
    assert parse_checkpoint("ckpts/final=5000") == Checkpoint("ckpts/final", 5000.0)
    assert parse_checkpoint("embedded", position=3) == Checkpoint("embedded", 3.0)
    assert parse_checkpoint("random", base_model="m") == Checkpoint("m", 0.0, random_init=True)
    assert parse_checkpoint("random", base_model="m").label == "m+random-init-s0"
    assert parse_checkpoint("embedded").label == "SmolLM2-135M-Instruct"
    assert pythia_checkpoints(steps=(0, 143000))[1].label == "EleutherAI/pythia-160m@step143000"
    with pytest.raises(PartsError, match="the step after '=' must be a number"):
        parse_checkpoint("ckpts/final=last")
    with pytest.raises(PartsError, match="has no model"):
        parse_checkpoint("@step1")


def test_local_folders_are_named_by_last_part_and_path_hash(tmp_path, monkeypatch):
    for place in ("a", "b"):
        (tmp_path / place / "step80").mkdir(parents=True)
    first, second = tmp_path / "a" / "step80", tmp_path / "b" / "step80"
    digest = hashlib.sha256(str(first.resolve()).encode()).hexdigest()[:8]
    assert model_slug(str(first)) == f"step80-{digest}"
    assert model_slug(str(first) + "/") == f"step80-{digest}"  # the same folder, however spelled
    monkeypatch.chdir(tmp_path / "a")
    assert model_slug("./step80") == model_slug("step80") == f"step80-{digest}"
    assert model_slug(str(second)) != model_slug(str(first))  # same last part, another place: other runs
    assert model_slug(str(first) + "+random-init-s2") == f"step80-{digest}+random-init-s2"
    assert model_slug(parse_checkpoint("random", base_model=str(first)).label) == f"step80-{digest}+random-init-s0"
    assert "--" not in model_slug(str(first)) and "tmp" not in model_slug(str(first))
    # Hub names keep their readable form.
    assert model_slug("EleutherAI/pythia-160m@step1000") == "EleutherAI--pythia-160m@step1000"
    assert model_slug("EleutherAI/pythia-160m", RunOptions(dtype="bf16")) == "EleutherAI--pythia-160m" + RunOptions(
        dtype="bf16").variant


def test_checkpoint_sweep_tracks_full_model_and_components(trained_checkpoints, tiny_task_file, tmp_path):
    checkpoints = [parse_checkpoint(str(folder)) for folder in trained_checkpoints]
    assert [c.step for c in checkpoints] == [0.0, 30.0, 80.0]
    runs = checkpoint_runs(checkpoints, [str(tiny_task_file)], templates=[1], seeds=[0, 1], limit=20,
                           root=tmp_path, device="cpu")
    assert len(runs) == 3 * 2
    # Each checkpoint's runs sit in a folder named by the checkpoint folder's last part and a hash of its path.
    digests = [hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8] for folder in trained_checkpoints]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        f"step{step}-{digest}" for step, digest in zip(STEPS, digests, strict=True)]
    table = checkpoint_table(runs, k=2)
    # Per run: the full model, 2 best components, 2 final top components.
    assert len(table) == len(runs) * 5
    full = checkpoint_summary(table).query("line == 'full model'")["accuracy"].tolist()
    # Training teaches the task: 80 steps take the model from the untrained rate to (near) perfect.
    assert full[0] <= 0.6 and full[-1] >= 0.9
    final = table[table["step"] == 80.0]
    for checkpoint, run in runs:  # the best components, ranked by hand from the run's accuracies (ties: earlier)
        accuracy = run.component_accuracy.tolist()
        ranked = sorted(range(len(accuracy)), key=lambda i: (-accuracy[i], i))[:2]
        mine = table[(table["step"] == checkpoint.step) & (table["seed"] == run.prompts.seed)]
        best = mine[mine["line"].str.startswith("best #")]
        assert best["component"].tolist() == [run.component_names[i] for i in ranked]
        assert best["accuracy"].tolist() == [accuracy[i] for i in ranked]
        final_run = next(r for c, r in runs if c.step == 80.0 and r.prompts.seed == run.prompts.seed)
        final_names = [final_run.component_names[i] for i in sorted(
            range(len(accuracy)), key=lambda i: (-final_run.component_accuracy[i].item(), i))[:2]]
        tracked = mine[mine["line"].str.startswith("final top-")]
        assert tracked["component"].tolist() == final_names
        assert tracked["accuracy"].tolist() == [accuracy[run.component_names.index(n)] for n in final_names]
    first_run = runs[0][1]
    top_name = final[(final["line"] == "final top-1") & (final["seed"] == 0)]["component"].item()
    at_step0 = table[(table["step"] == 0.0) & (table["line"] == "final top-1") & (table["seed"] == 0)]["accuracy"].item()
    assert at_step0 == pytest.approx(float(first_run.component_accuracy[first_run.component_index(top_name)]))
    figure = checkpoint_figure(table)
    assert {trace.name for trace in figure.data} == {"full model", "best #1", "best #2", "final top-1", "final top-2"}
    assert list(figure.data[0].x) == [0.0, 30.0, 80.0]
    # Resuming: every run is read back, no model is loaded.
    again = checkpoint_runs(checkpoints, [str(tiny_task_file)], templates=[1], seeds=[0, 1], limit=20, root=tmp_path,
                            load=lambda *a, **kw: pytest.fail("a finished run was recomputed"))
    assert checkpoint_table(again, k=2).equals(table)


def test_checkpoints_command_writes_table_and_figure(trained_checkpoints, tiny_task_file, tmp_path, capsys):
    from parts.cli import main

    specs = ",".join(str(folder) for folder in trained_checkpoints[::2]) + "=1000"  # the last one at step 1000
    code = main(["checkpoints", "--checkpoints", specs, "--tasks", str(tiny_task_file), "--limit", "10", "--top-k", "2",
                 "--device", "cpu", "--out", str(tmp_path)])
    assert code == 0
    assert "rows in" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "checkpoints.csv")
    assert sorted(set(table["step"])) == [0.0, 1000.0] and len(table) == 2 * 5
    assert (tmp_path / "checkpoints.html").read_text().count("final top-2") >= 1
    assert main(["checkpoints", "--checkpoints", "x=soon", "--out", str(tmp_path)]) == 2
    assert "the step after '=' must be a number" in capsys.readouterr().err
