"""Integration: the embedded SmolLM2-135M-Instruct on small slices of the real tasks."""

from __future__ import annotations

import json

import pytest

from parts.cli import main
from parts.experiments.runner import decompose_task

pytestmark = pytest.mark.integration


def test_embedded_model_decomposes_sst2_exactly(embedded_model, data_dir):
    run = decompose_task(embedded_model, "sst2", template=1, seed=0, limit=16, data_dir=data_dir, progress=False)
    assert run.component_logits.shape == (16, 30 * 9 + 30, 2)
    assert run.max_reconstruction_error < 1e-3
    assert run.model == "SmolLM2-135M-Instruct"
    assert run.full_accuracy > 0.6  # the model does the task (81% on this slice when written)


def test_embedded_prefix_reuse_matches_full_prompts(embedded_model, data_dir):
    kwargs = dict(template=2, seed=1, limit=8, data_dir=data_dir, progress=False)
    reused = decompose_task(embedded_model, "rte", prefix_reuse=True, **kwargs)
    full = decompose_task(embedded_model, "rte", prefix_reuse=False, **kwargs)
    assert (reused.component_logits - full.component_logits).abs().max() < 1e-3
    assert (reused.model_logits - full.model_logits).abs().max() < 1e-4


def test_readme_command_on_a_small_slice(tmp_path, data_dir, capsys):
    out = tmp_path / "sst2-f1-s0"
    assert main(["decompose", "--task", "sst2", "--template", "1", "--seed", "0", "--shots", "4", "--split", "test",
                 "--limit", "8", "--out", str(out), "--data-dir", str(data_dir), "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["label_words"] == [" negative", " positive"]
    assert summary["label_token_ids"] == [3524, 2731]
    assert summary["component_names"][:2] == ["L0H0", "L0H1"] and summary["component_names"][-1] == "MLP29"
    prompts = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 8 and prompts[0]["prompt"].endswith("\nSentiment:")
