"""The reconstruction check: a readout that does not describe the model fails the run, loudly and in one line."""

from __future__ import annotations

import json

import pytest
import torch

from parts.cli import main
from parts.decomposition.decompose import Decomposer
from parts.decomposition.exactness import (
    RECONSTRUCTION_TOLERANCE,
    check_reconstruction,
    reconstruction_tolerance,
    relative_reconstruction_error,
)
from parts.errors import PartsError
from parts.model import readout

PROMPTS = ["review : great film sentiment : positive review : dull plot sentiment :",
           "review : awful acting sentiment : negative review : loved it sentiment :",
           "review : the movie was fun sentiment :"]


def label_ids(model):
    return [model.tokenizer.convert_tokens_to_ids(w) for w in ("negative", "positive")]


@pytest.fixture
def broken_readout(monkeypatch):
    """A readout with a logit multiplier the model does not have (as if it misread a Granite-style config)."""
    monkeypatch.setattr(readout, "multipliers", lambda config: (1.0, 1.1))


def test_a_broken_readout_fails_the_decomposition_naming_the_worst_example(tiny_llama, broken_readout):
    decomposer = Decomposer(tiny_llama, label_ids(tiny_llama))
    names = ["example 4 of the test split", "example 9 of the test split", "example 2 of the test split"]
    with pytest.raises(PartsError) as caught:
        decomposer(PROMPTS, progress=False, example_names=names)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("the components do not sum to the model's logits: example ")
    assert "(tolerance 0.001 in float32)" in message and "--allow-inexact" in message
    # The example named is the one with the largest relative error.
    decomposer.allow_inexact = True
    with pytest.warns(UserWarning, match="do not sum"):
        out = decomposer(PROMPTS, progress=False)
    worst = int(relative_reconstruction_error(out.component_logits, out.remainder, out.model_logits).argmax())
    assert f"{names[worst]} is off by" in message


def test_allow_inexact_keeps_going_with_a_warning(tiny_llama, broken_readout):
    decomposer = Decomposer(tiny_llama, label_ids(tiny_llama), allow_inexact=True)
    with pytest.warns(UserWarning, match=r"prompt \d is off by .* of its logit scale"):
        out = decomposer(PROMPTS, progress=False)
    assert out.reconstruction_error.max() > 1e-3


def test_a_broken_readout_fails_the_command_in_one_line(tmp_path, tiny_model_dir, tiny_task_file, broken_readout,
                                                         capsys):
    argv = ["decompose", "--model", str(tiny_model_dir), "--task", str(tiny_task_file), "--template", "2",
            "--limit", "6", "--out", str(tmp_path / "run"), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # progress bars come before it
    assert "do not sum to the model's logits: example " in last and " of the test split is off by " in last
    assert "Traceback" not in err and not (tmp_path / "run").exists()
    # --allow-inexact: the run is written, with the warning.
    with pytest.warns(UserWarning, match="do not sum"):
        assert main([*argv, "--allow-inexact"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["max_reconstruction_error"] > 1e-3


def test_tolerance_is_set_by_the_compute_dtype():
    assert reconstruction_tolerance(torch.float32) == reconstruction_tolerance("float32") == 1e-3
    assert reconstruction_tolerance(torch.float16) > 1e-3 and reconstruction_tolerance(torch.bfloat16) > 1e-3
    assert set(RECONSTRUCTION_TOLERANCE) >= {"float32", "float16", "bfloat16"}
    with pytest.raises(PartsError, match="no reconstruction tolerance for dtype int8"):
        reconstruction_tolerance(torch.int8)


def test_error_is_relative_to_the_logit_scale():
    model_logits = torch.tensor([[100.0, -50.0], [0.2, 0.1]])
    components = torch.zeros(2, 3, 2)
    remainder = model_logits + torch.tensor([[0.05, 0.0], [0.0, 0.002]])
    relative = relative_reconstruction_error(components, remainder, model_logits)
    # 0.05 on a scale of 100; 0.002 on logits below 1 (the scale is at least 1).
    assert relative.tolist() == pytest.approx([5e-4, 2e-3], rel=1e-3)
    assert check_reconstruction(components, remainder, model_logits, "bfloat16") == pytest.approx(2e-3, rel=1e-3)
    with pytest.raises(PartsError, match="prompt 1 is off by 2.00e-03"):
        check_reconstruction(components, remainder, model_logits, "float32")


def test_importing_parts_patches_nothing_in_transformer_lens():
    """The bridge's KV-cache keyword fix is applied per model, when its prefix cache comes back empty."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    before = AttentionBridge.__dict__["_update_kv_cache"]
    import parts.model.engines  # noqa: F401
    import parts.model.loading  # noqa: F401

    assert AttentionBridge.__dict__["_update_kv_cache"] is before


def test_no_transformer_lens_internals_in_the_engines():
    """The hf engine finds modules by the adapter's module paths, never through the bridge's wrappers."""
    from pathlib import Path

    import parts.model.engines as engines
    import parts.model.readout as readout_module

    for module in (engines, readout_module):
        source = Path(module.__file__).read_text()
        assert "original_component" not in source and "GeneralizedComponent" not in source


def test_a_run_records_the_token_ids_the_model_was_given(tmp_path, tiny_model_dir, tiny_task_file):
    from transformers import AutoTokenizer

    from parts.decomposition.runs import DecompositionRun

    out = tmp_path / "run"
    assert main(["decompose", "--model", str(tiny_model_dir), "--task", str(tiny_task_file), "--template", "2",
                 "--limit", "4", "--out", str(out), "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    bos = tokenizer.convert_tokens_to_ids("[BOS]")
    for row in rows:
        words = row["prompt"].split()
        body = row["token_ids"][1:] if summary["info"]["bos_prepended"] else row["token_ids"]
        assert body == [tokenizer.convert_tokens_to_ids(w) for w in words]  # the word-level tokenizer: one id a word
        assert (row["token_ids"][0] == bos) == summary["info"]["bos_prepended"]
    assert DecompositionRun.load(out).token_ids == [row["token_ids"] for row in rows]
