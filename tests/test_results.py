"""Accuracies recomputed by hand, and the save/load round trip."""

from __future__ import annotations

import json

import pytest
import torch

from parts.data.prompts import PromptSet
from parts.decomposition.runs import Decomposition, DecompositionRun
from parts.errors import PartsError


def hand_made_run() -> DecompositionRun:
    """3 examples (gold 0, 1, 1), 2 components, 2 labels, with known predictions."""
    prompts = PromptSet("tiny", 1, 0, 2, "test", ("neg", "pos"), (" neg", " pos"), (5, 6), (0, 1, 2),
                        ("p0", "p1", "p2"), (0, 1, 1))
    component_logits = torch.tensor([
        [[2.0, 0.0], [0.0, 1.0]],   # example 0: component 0 says 0 (right), component 1 says 1 (wrong)
        [[3.0, 0.0], [0.0, 2.0]],   # example 1: 0 (wrong), 1 (right)
        [[0.0, 1.0], [0.0, 2.0]],   # example 2: 1 (right), 1 (right)
    ])
    remainder = torch.tensor([[0.5, 0.0], [0.0, 0.0], [0.0, 0.0]])
    model_logits = component_logits.sum(1) + remainder + torch.tensor([[0.0, 0.0], [0.0, 1e-3], [0.0, 0.0]])
    decomposition = Decomposition(component_logits, remainder, model_logits)
    return DecompositionRun.from_decomposition("m", prompts, [7, 8], ["L0H0", "MLP0"], 1, 1, decomposition)


def test_accuracies_by_hand():
    run = hand_made_run()
    assert run.component_predictions.tolist() == [[0, 1], [0, 1], [1, 1]]
    assert run.component_accuracy.tolist() == pytest.approx([2 / 3, 2 / 3])
    # full logits: [2.5, 1] -> 0 right; [3, 2.001] -> 0 wrong; [0, 3] -> 1 right
    assert run.full_accuracy == pytest.approx(2 / 3)
    assert run.max_reconstruction_error == pytest.approx(1e-3, abs=1e-6)
    assert run.chance == pytest.approx(2 / 3)
    assert run.top_components(1) == [("L0H0", pytest.approx(2 / 3))]


def test_summary_keys_and_round_trip(tmp_path):
    run = hand_made_run()
    path = run.save(tmp_path / "run")
    summary = json.loads((path / "summary.json").read_text())
    for key in ("model task template seed shots split n_examples label_names label_words label_token_ids "
                "full_accuracy component_names component_accuracy max_reconstruction_error").split():
        assert key in summary
    assert summary["component_accuracy"] == pytest.approx([2 / 3, 2 / 3], abs=1e-6)
    lines = [json.loads(line) for line in (path / "prompts.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["label"]) for r in lines] == [("p0", 0), ("p1", 1), ("p2", 1)]
    loaded = DecompositionRun.load(path)
    assert loaded == run
    assert torch.equal(loaded.component_logits, run.component_logits)
    assert not list(tmp_path.glob(".run.parts-tmp-*"))  # no staging folder left behind


def test_overwrite_and_half_written_folders(tmp_path):
    run = hand_made_run()
    run.save(tmp_path / "run")
    run.save(tmp_path / "run")  # overwriting a finished run is fine
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "tensors.safetensors").write_bytes(b"partial")
    with pytest.raises(PartsError, match="not a finished run"):
        DecompositionRun.load(tmp_path / "half")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    summary["format_version"] = 999
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(PartsError, match="run format 999"):
        DecompositionRun.load(tmp_path / "run")


def test_describe_names_the_numbers():
    text = hand_made_run().describe()
    assert "full model accuracy  66.7%" in text and "L0H0 66.7%" in text
