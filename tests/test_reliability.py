"""Reliability: every bad input is a one-line error naming the fix; runs are deterministic, atomic and resumable.

Errors the foundation tests already cover (unknown task and template, bad data rows, label words at the
API level, run format version) are not repeated here; these add the command-line path and the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from parts import io
from parts.cli import main
from parts.cli.common import int_list
from parts.data.prompts import PromptSet, build_prompts
from parts.data.tasks import get_task
from parts.decomposition.runs import Decomposition, DecompositionRun
from parts.errors import PartsError
from parts.experiments.results import read_results
from parts.experiments.runner import check_finite, decompose_task, ensure_run, run_decomposition
from parts.methods import MAIN_METHODS

ROWS_PER_SETTING = 7 + sum(m.beyond_paper and not m.optional for m in MAIN_METHODS)  # results.csv rows of one setting

REPO = Path(__file__).resolve().parents[1]


def one_line_error(argv: list[str], capsys) -> str:
    """Run the command; it must fail with status 2 and print one error line (after any loading bars), no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert "Traceback" not in err and len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


def write_task(folder: Path, label_words: list[str], train: list[dict], test: list[dict] | None = None,
               **extra: object) -> Path:
    """A user task JSON and its data folder."""
    folder.mkdir(parents=True, exist_ok=True)
    test = test if test is not None else train
    for split, rows in (("train", train), ("test", test)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"name": "mine", "data_dir": ".", "template": "review : {text} sentiment :", "label_words": label_words, **extra}
    path = folder / "mine.json"
    path.write_text(json.dumps(spec))
    return path


ROWS = [{"text": "great film" if i % 2 else "awful film", "label": i % 2} for i in range(12)]


# -- unknown model ----------------------------------------------------------------------------------------


def test_unknown_models_are_one_line_errors_without_the_hub(tmp_path, tiny_task_file, capsys):
    """A missing folder, a folder that is no model, and an unknown hub name (offline: no retries)."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "alien").mkdir()
    (tmp_path / "alien" / "config.json").write_text('{"model_type": "no-such-architecture"}')
    base = ["decompose", "--task", str(tiny_task_file), "--limit", "2", "--out", str(tmp_path / "run"), "--device", "cpu"]
    expected = {
        str(tmp_path / "nowhere"): f"model folder {tmp_path / 'nowhere'} does not exist: pass a folder saved with",
        str(tmp_path / "afile"): f"model folder {tmp_path / 'afile'} is a file, not a folder",
        str(tmp_path / "empty"): f"model folder {tmp_path / 'empty'} has no config.json",
        str(tmp_path / "alien"): "has model type `no-such-architecture` but Transformers does not recognize",
        "nobody-here/no-such-model": "cannot load model 'nobody-here/no-such-model': ",
    }
    for name, message in expected.items():
        err = one_line_error([*base, "--model", name], capsys)
        assert message in err
    assert not (tmp_path / "run").exists()


def test_a_revision_of_a_local_model_is_an_error(tiny_model_dir, tmp_path, tiny_task_file, capsys):
    """Only hub models have revisions: the embedded model or a folder would silently load its one set of weights."""
    from parts.model.loading import load_model

    with pytest.raises(PartsError, match=r"^--revision step1000 applies to hub models only: SmolLM2-135M-Instruct is a "
                                         r"local copy with one set of weights \(pass a hub name"):
        load_model(None, revision="step1000")
    base = ["decompose", "--task", str(tiny_task_file), "--limit", "2", "--out", str(tmp_path / "run"), "--device", "cpu"]
    err = one_line_error([*base, "--model", str(tiny_model_dir), "--revision", "main"], capsys)
    assert f"--revision main applies to hub models only: {tiny_model_dir} is a local copy" in err
    assert not (tmp_path / "run").exists()


def test_architectures_transformer_lens_cannot_wrap(tokenizer):
    """An unsupported architecture, and a supported one in a variant its adapter rejects (bias-free GPT-NeoX)."""
    from transformers import CTRLConfig, CTRLLMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    from parts.model.loading import from_hf

    ctrl = CTRLLMHeadModel(CTRLConfig(vocab_size=40, n_embd=8, n_layer=1, n_head=2, dff=16))
    # parts' own words around TransformerLens's reason (its wording is TransformerLens's to change): one line,
    # without the list of every supported architecture that TransformerLens appends.
    with pytest.raises(PartsError, match=r"^TransformerLens cannot wrap model 'c' \(CTRLLMHeadModel\): [^\n]+; "
                                         r"use an architecture TransformerLens supports \(Llama, [^\n]*\)$") as error:
        from_hf(ctrl, tokenizer, "c")
    assert "Available architectures" not in str(error.value) and isinstance(error.value.__cause__, Exception)
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=16, attention_bias=False))
    with pytest.raises(PartsError, match=r"^TransformerLens cannot wrap model 'n' \(GPTNeoXForCausalLM\): its architecture "
                                         "adapter rejected this variant"):
        from_hf(neox, tokenizer, "n")


def test_unknown_dtype(tiny_task_file, tmp_path, capsys):
    err = one_line_error(["decompose", "--task", str(tiny_task_file), "--out", str(tmp_path / "r"), "--dtype", "int3"], capsys)
    assert "unknown dtype 'int3': use one of bf16, bfloat16, float16, float32, fp16, fp32" in err


# -- data directory and task files ---------------------------------------------------------------------------


def test_data_directory_problems_at_the_command_line(tmp_path, capsys):
    base = ["decompose", "--task", "sst2", "--out", str(tmp_path / "run")]
    (tmp_path / "empty").mkdir()
    err = one_line_error([*base, "--data-dir", str(tmp_path / "empty")], capsys)
    assert f"{tmp_path / 'empty' / 'sst2' / 'train.jsonl'} not found: the data directory must hold <task>/train.jsonl" in err
    (tmp_path / "file").write_text("")
    err = one_line_error([*base, "--data-dir", str(tmp_path / "file")], capsys)
    assert f"data directory {tmp_path / 'file'} is a file, not a folder" in err
    (tmp_path / "blank" / "sst2").mkdir(parents=True)
    (tmp_path / "blank" / "sst2" / "train.jsonl").write_text("\n")
    (tmp_path / "blank" / "sst2" / "test.jsonl").write_text('{"text": "a", "label": 0}\n')
    err = one_line_error([*base, "--data-dir", str(tmp_path / "blank")], capsys)
    assert "the train split of sst2 is empty" in err
    (tmp_path / "rows" / "sst2").mkdir(parents=True)
    (tmp_path / "rows" / "sst2" / "train.jsonl").write_text('{"text": "a", "label": 0}\n[1, 2]\n')
    err = one_line_error([*base, "--data-dir", str(tmp_path / "rows")], capsys)
    assert "train.jsonl:2 is a JSON list: each line must be an object" in err
    (tmp_path / "rows" / "sst2" / "train.jsonl").write_text('{"text": "a", "label": true}\n')
    err = one_line_error([*base, "--data-dir", str(tmp_path / "rows")], capsys)
    assert "train.jsonl:1: label must be an integer index into ['negative', 'positive'], got True" in err


@pytest.mark.parametrize("extra,message", [
    ({"template": "review : {text sentiment :"}, "is not a valid format string"),
    ({"templates": {"two": "{text}"}}, "templates must map numbers to strings, got 'two'"),
    ({"shots": "four"}, "shots must be a whole number of demonstrations, got 'four'"),
    ({"label_words": [" good"]}, "label_words must be a list of at least two strings"),
])
def test_bad_task_files(tmp_path, extra, message, capsys):
    spec = {"name": "mine", "data_dir": ".", "template": "review : {text} sentiment :", "label_words": [" bad", " good"]}
    (tmp_path / "mine.json").write_text(json.dumps({**spec, **extra}))
    err = one_line_error(["decompose", "--task", str(tmp_path / "mine.json"), "--out", str(tmp_path / "r")], capsys)
    assert message in err


# -- label words, shots and classes --------------------------------------------------------------------------


def test_label_word_problems_at_the_command_line(tmp_path, tiny_model_dir, capsys):
    base = ["--model", str(tiny_model_dir), "--limit", "4", "--device", "cpu"]
    two_tokens = write_task(tmp_path / "a", [" awful", " very good"], ROWS)
    err = one_line_error(["decompose", "--task", str(two_tokens), "--out", str(tmp_path / "ra"), *base], capsys)
    assert "label word ' very good' is 2 tokens ['very', 'good'] for this model's tokenizer: choose a label word" in err
    same = write_task(tmp_path / "b", [" good", "good"], ROWS)
    err = one_line_error(["decompose", "--task", str(same), "--out", str(tmp_path / "rb"), *base], capsys)
    assert "label words [' good', 'good'] map to the same token: choose distinct label words" in err
    assert not (tmp_path / "ra").exists() and not (tmp_path / "rb").exists()


def test_shots_and_classes_the_training_split_cannot_give(tmp_path, tiny_task_file, capsys):
    base = ["decompose", "--task", str(tiny_task_file), "--out", str(tmp_path / "r")]
    err = one_line_error([*base, "--shots", "50"], capsys)  # 40 training rows, 20 per class
    assert "the training split of tiny (40 examples, per class [20, 20]) cannot give 50 balanced demonstrations" in err
    err = one_line_error([*base, "--split", "train", "--limit", "37"], capsys)
    assert "cannot give 4 balanced demonstrations and 37 further examples: lower --shots, or --limit" in err
    err = one_line_error([*base, "--shots", "1"], capsys)
    assert "1 shots cannot show all 2 classes of tiny: use --shots 2 or more" in err
    one_class = write_task(tmp_path / "c", [" negative", " positive"], [r for r in ROWS if r["label"] == 0], ROWS)
    err = one_line_error(["decompose", "--task", str(one_class), "--out", str(tmp_path / "r")], capsys)
    assert "the training split of mine has no example of class(es) positive: demonstrations must cover every class" in err


def test_prompt_longer_than_the_context_names_the_example(tmp_path, tiny_task_file, tiny_model_dir, tokenizer, capsys):
    """36 demonstrations of ~9 tokens overflow the tiny model's 256-token window."""
    prompts = build_prompts(get_task(str(tiny_task_file)), 1, 0, 36, "test", 6)
    lengths = [len(tokenizer(p)["input_ids"]) + 1 for p in prompts.prompts]  # + the BOS the bridge's tokenizer adds
    worst = max(range(6), key=lambda i: lengths[i])
    n_over = sum(n > 256 for n in lengths)
    assert n_over >= 1
    err = one_line_error(["decompose", "--task", str(tiny_task_file), "--shots", "36", "--limit", "6", "--model",
                          str(tiny_model_dir), "--device", "cpu", "--out", str(tmp_path / "r")], capsys)
    assert (f"{n_over} of 6 prompts exceed the model's context window of 256 tokens; the longest, example "
            f"{prompts.example_indices[worst]} of the test split, is {lengths[worst]} tokens ({lengths[worst] - 256} "
            "too many): use fewer --shots") in err


# -- option values -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option,message", [
    (["--limit", "0"], "argument --limit: 0 must be at least 1"),
    (["--limit", "-3"], "argument --limit: -3 must be at least 1"),
    (["--limit", "ten"], "argument --limit: 'ten' is not a whole number"),
    (["--seed", "-1"], "argument --seed: -1 must be 0 or more"),
    (["--shots", "2.5"], "argument --shots: '2.5' is not a whole number"),
    (["--template", "0"], "argument --template: 0 must be at least 1"),
    (["--split", "dev"], "argument --split: invalid choice: 'dev'"),
])
def test_bad_option_values_name_the_option(option, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["decompose", "--task", "sst2", "--out", "x", *option])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("text,message", [
    ("5-0", "range '5-0' runs backwards: write 0-5"),
    ("-1", "'-1': numbers must be 0 or more"),
    ("1,,2", "'1,,2' is not a list of numbers like 0-4 or 1,2,3"),
    ("a-b", "'a-b' is not a list of numbers like 0-4 or 1,2,3"),
])
def test_number_lists_reject_bad_ranges(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        int_list(text)


@pytest.mark.parametrize("option,message", [
    (["--seeds", "5-0"], "argument --seeds: range '5-0' runs backwards: write 0-5"),
    (["--templates", "1,x"], "argument --templates: '1,x' is not a list of numbers like 0-4 or 1,2,3"),
    (["--limit", "0"], "argument --limit: 0 must be at least 1"),
    (["--batch-size", "-2"], "argument --batch-size: -2 must be at least 1"),
])
def test_bad_sweep_options_name_the_option(option, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--tasks", "sst2", "--out", "x", *option])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_number_lists_parse():
    assert int_list("0-2,5") == [0, 1, 2, 5]
    assert int_list("3,1,3") == [3, 1]
    assert int_list("4-4") == [4]


# -- run folders ----------------------------------------------------------------------------------------------


def small_run(model: str = "m", n_layers: int = 2, n_heads: int = 1, seed: int = 0) -> DecompositionRun:
    """3 examples (split indices 10, 11, 12), 2 labels, `n_layers` x (`n_heads` + 1) components of known values."""
    from parts.components import component_names

    names = component_names(n_layers, n_heads)
    prompts = PromptSet("tiny", 1, seed, 2, "test", ("neg", "pos"), (" neg", " pos"), (5, 6), (10, 11, 12),
                        ("p0", "p1", "p2"), (0, 1, 1))
    component_logits = torch.arange(3 * len(names) * 2, dtype=torch.float32).reshape(3, len(names), 2) / 10
    remainder = torch.zeros(3, 2)
    model_logits = component_logits.sum(1)
    decomposition = Decomposition(component_logits, remainder, model_logits)
    return DecompositionRun.from_decomposition(model, prompts, [7, 8], names, n_layers, n_heads, decomposition)


def test_damaged_run_folders_do_not_load(tmp_path):
    run = small_run()
    path = run.save(tmp_path / "run")

    def damaged(edit) -> str:
        target = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        run.save(target)
        edit(target)
        with pytest.raises(PartsError) as info:
            DecompositionRun.load(target)
        return str(info.value)

    assert "is damaged (" in damaged(lambda f: (f / "tensors.safetensors").write_bytes(
        (path / "tensors.safetensors").read_bytes()[:100]))
    assert "is damaged (" in damaged(lambda f: (f / "prompts.jsonl").unlink())
    assert "summary.json is not valid JSON" in damaged(lambda f: (f / "summary.json").write_text('{"format_version": 1,'))
    assert "prompts.jsonl has 2 examples, the summary says 3" in damaged(
        lambda f: (f / "prompts.jsonl").write_text("".join((f / "prompts.jsonl").read_text().splitlines(True)[:2])))

    def wrong_shape(folder: Path) -> None:
        from safetensors.torch import save_file

        tensors = {"component_logits": torch.zeros(3, 5, 2), "remainder": torch.zeros(3, 2), "model_logits": torch.zeros(3, 2)}
        save_file(tensors, str(folder / "tensors.safetensors"))

    assert "component_logits has shape (3, 5, 2), the summary says (3, 4, 2)" in damaged(wrong_shape)

    def no_model_key(folder: Path) -> None:
        summary = json.loads((folder / "summary.json").read_text())
        del summary["model"]
        (folder / "summary.json").write_text(json.dumps(summary))

    assert "is damaged (missing model)" in damaged(no_model_key)
    assert DecompositionRun.load(path) == run  # the original is untouched


def test_a_staging_folder_is_not_a_run(tmp_path):
    """What a killed save leaves behind: a `.name.tmp-*` folder, never `name` itself."""
    small_run().save(tmp_path / "run")
    (tmp_path / "run").rename(tmp_path / ".next.tmp-abc")
    with pytest.raises(PartsError, match="next is not a finished run"):
        DecompositionRun.load(tmp_path / "next")


def test_analyze_keeps_models_apart_and_refuses_damaged_or_old_runs(tmp_path, capsys):
    """Runs of two models under one root are never compared; one bad folder stops the analysis with its name."""
    root = tmp_path / "runs"
    for model in ("a", "b"):
        for seed in (0, 1):
            small_run(model, seed=seed).save(root / model / f"s{seed}")
    (root / "a" / ".s2.tmp-killed").mkdir()  # a killed save's leftovers are not runs
    assert main(["analyze", str(root), "--out", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["runs"]) == 4
    assert sorted((g["model"], g["runs"]) for g in report["groups"]) == [
        ("a", ["tiny t1 s0", "tiny t1 s1"]), ("b", ["tiny t1 s0", "tiny t1 s1"])]
    capsys.readouterr()

    summary_file = root / "b" / "s1" / "summary.json"
    summary = json.loads(summary_file.read_text())
    summary_file.write_text(json.dumps({**summary, "format_version": 999}))
    err = one_line_error(["analyze", str(root)], capsys)
    assert f"{root / 'b' / 's1'} was written in run format 999 (this parts reads 1): delete it and rerun it" in err
    summary_file.write_text(json.dumps(summary))
    tensors = root / "a" / "s0" / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:50])
    err = one_line_error(["analyze", str(root)], capsys)
    assert f"{root / 'a' / 's0'} is damaged (" in err and "delete it and rerun" in err


def test_ensure_run_refuses_a_folder_holding_another_run(tmp_path, tiny_task_file, tiny_llama):
    task = get_task(str(tiny_task_file))
    path = small_run().save(tmp_path / "run")  # saved without a fingerprint, as before parts recorded them
    with pytest.raises(PartsError, match=r"run was made otherwise: the run's fingerprint is not recorded \(made before "
                                         r"parts recorded fingerprints\); pass --recompute-changed to recompute it"):
        ensure_run(path, None, task=task, template=1, seed=0, shots=2)
    made = ensure_run(path, tiny_llama, task=task, template=1, seed=0, limit=4, recompute_changed=True, progress=False)
    with pytest.raises(PartsError, match=r"template text differs from the run's \('review : \{text\} sentiment :' "
                                         r"there, now 'review \{text\} \?'\); pass --recompute-changed"):
        ensure_run(path, None, task=task, template=2, seed=0, limit=4)
    with pytest.raises(PartsError, match=r"seed differs from the run's \(0 there, now 3\)"):
        ensure_run(path, tiny_llama, task=task, template=1, seed=3, limit=4)
    assert ensure_run(path, None, model_label="tiny-llama", task=task, template=1, seed=0, limit=4) == made


def test_ensure_run_reruns_a_damaged_folder_to_the_same_result(tmp_path, tiny_task_file, tiny_llama):
    settings = dict(task=get_task(str(tiny_task_file)), template=1, seed=1, limit=6, progress=False)
    first = ensure_run(tmp_path / "run", tiny_llama, **settings)
    tensors = tmp_path / "run" / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-7])  # a torn write
    again = ensure_run(tmp_path / "run", tiny_llama, **settings)
    assert again == first and torch.equal(again.component_logits, first.component_logits)


# -- non-finite logits ---------------------------------------------------------------------------------------


def test_non_finite_logits_name_the_example_and_the_earliest_component():
    run = small_run()  # components L0H0, L1H0, MLP0, MLP1; computed in the order L0H0, MLP0, L1H0, MLP1
    check_finite(run)
    run.component_logits[1, 1, 0] = float("nan")  # L1H0
    run.component_logits[1, 2, 1] = float("inf")  # MLP0: computed before L1H0
    run.component_logits[2, 3, 0] = float("-inf")  # MLP1
    with pytest.raises(PartsError) as info:
        check_finite(run)
    assert str(info.value) == (
        "non-finite logits in 2 of 3 examples, first example 11 of the test split at component MLP0 (and 1 more): "
        "the model overflowed; load it in float32 (--dtype float32) or check its weights"
    )
    only_model = small_run()
    only_model.model_logits[2, 0] = float("nan")
    with pytest.raises(PartsError, match="1 of 3 examples, first example 12 of the test split at the model's own logits"):
        check_finite(only_model)


def test_a_model_that_overflows_stops_the_run(tokenizer, tiny_task_file):
    """Infinite weights in layer 1's MLP: every component's logits are NaN (the final norm's scale is), and
    rerunning the example finds where it started."""
    from parts.model.loading import from_hf
    from tests.conftest import make_hf_model

    hf_model = make_hf_model("llama")
    with torch.no_grad():
        hf_model.model.layers[1].mlp.down_proj.weight.fill_(float("inf"))
    model = from_hf(hf_model, tokenizer, "tiny-broken")
    prompts = build_prompts(get_task(str(tiny_task_file)), 1, 0, 4, "test", 4)
    with pytest.raises(PartsError) as info:
        run_decomposition(model, prompts, progress=False)
    assert (f"non-finite logits in 4 of 4 examples, first example {prompts.example_indices[0]} of the test split at "
            "component MLP1 (the first non-finite output): the model overflowed") in str(info.value)


def test_evaluation_forwards_stop_on_non_finite_logits(tokenizer):
    """The 24-shot ICL and content-free forwards keep no decomposition, but they are checked too."""
    from parts.experiments.evaluate import label_logits
    from parts.model.loading import from_hf
    from tests.conftest import make_hf_model

    hf_model = make_hf_model("llama")
    with torch.no_grad():
        hf_model.model.layers[2].mlp.down_proj.weight[:, 0] = float("inf")
    model = from_hf(hf_model, tokenizer, "tiny-broken")
    ids = [model.tokenizer.convert_tokens_to_ids(w) for w in ("negative", "positive")]
    prompts = ["review : good sentiment : positive review : fun sentiment :", "review : bad sentiment :"]
    with pytest.raises(PartsError, match=r"^non-finite logits in 2 of 2 sst2 t1 s0 content-free prompts, first prompt 0: "
                                         r"the model overflowed; load it in float32"):
        label_logits(model, prompts, ids, progress=False, description="sst2 t1 s0 content-free")


# -- determinism ----------------------------------------------------------------------------------------------


def saved_bytes(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in ("summary.json", "prompts.jsonl", "tensors.safetensors")}


def test_two_runs_are_bit_identical(tmp_path, tokenizer, tiny_task_file):
    """Same model (built twice from the same seed), task, template, seed and data: the same bytes on disk."""
    from parts.model.loading import from_hf
    from tests.conftest import make_hf_model

    paths = []
    for attempt in range(2):
        model = from_hf(make_hf_model("neox", seed=5), tokenizer, "tiny-neox")
        run = decompose_task(model, str(tiny_task_file), template=2, seed=1, limit=9, batch_size=4, progress=False)
        paths.append(run.save(tmp_path / f"run{attempt}"))
    first, second = (DecompositionRun.load(p) for p in paths)
    assert torch.equal(first.component_logits, second.component_logits)
    assert saved_bytes(paths[0]) == saved_bytes(paths[1])


@pytest.mark.integration
def test_embedded_model_runs_are_bit_identical(tmp_path, embedded_model, data_dir):
    settings = dict(template=3, seed=4, limit=4, data_dir=data_dir, progress=False)
    first = decompose_task(embedded_model, "sst2", **settings).save(tmp_path / "a")
    second = decompose_task(embedded_model, "sst2", **settings).save(tmp_path / "b")
    assert torch.equal(DecompositionRun.load(first).component_logits, DecompositionRun.load(second).component_logits)
    assert saved_bytes(first) == saved_bytes(second)


# -- atomic writes ---------------------------------------------------------------------------------------------


def test_a_failed_save_leaves_no_run_and_keeps_the_old_one(tmp_path, monkeypatch):
    import parts.decomposition.runs

    old, new = small_run("old"), small_run("new")
    target = tmp_path / "run"

    def torn_save_file(tensors, filename):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(parts.decomposition.runs, "save_file", torn_save_file)
    with pytest.raises(PartsError, match="disk full"):
        new.save(target)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    old.save(target)
    real_replace = os.replace

    def failing_final_rename(src, dst):
        if Path(dst) == target and not str(src).endswith("-old"):  # the new run's rename, not the old one's return
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_final_rename)
    with pytest.raises(PartsError, match="rename failed"):
        new.save(target)
    monkeypatch.undo()
    assert DecompositionRun.load(target) == old  # the old run is back in place
    assert [p.name for p in tmp_path.iterdir() if not io.is_bookkeeping(p.name)] == ["run"]  # no staging or retired folder left


KILLER = textwrap.dedent("""
    # One interpreter imports everything once, then forks a child per job (before any torch work).
    import json, os, signal, sys
    from pathlib import Path

    import parts.decomposition.decompose, parts.decomposition.runs
    from parts.cli import main

    jobs_file = Path(sys.argv[1])
    NTH_SAVE = {"tensors": 1, "sweep": 2, "second-save": 2}

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    def patch(moment, out):
        if moment == "decompose":  # during the second batch's forward pass
            split, calls = parts.decomposition.decompose.Decomposer._split, []
            def second_batch_dies(self, *args):
                calls.append(1)
                return die() if len(calls) == 2 else split(self, *args)
            parts.decomposition.decompose.Decomposer._split = second_batch_dies
        elif moment in NTH_SAVE:  # a run's tensors written, the rest of its folder not
            save_file, calls = parts.decomposition.runs.save_file, []
            def dies_after_writing(tensors, name):
                calls.append(1)
                save_file(tensors, name)
                if len(calls) == NTH_SAVE[moment]:
                    die()
            parts.decomposition.runs.save_file = dies_after_writing
        elif moment == "rename":  # everything written, the final rename not done
            replace = os.replace
            os.replace = lambda src, dst: die() if Path(dst) == out else replace(src, dst)

    codes = {}
    for moment, argv, out in json.loads(jobs_file.read_text()):
        pid = os.fork()
        if pid == 0:
            patch(moment, Path(out))
            os._exit(main(argv))
        codes[moment] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    jobs_file.with_suffix(".codes.json").write_text(json.dumps(codes))
""")


def all_files(root: Path) -> dict[str, bytes]:
    """Every file under `root` (staging folders included) by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_killed_runs_leave_nothing_that_loads_and_rerun_identically(tmp_path, tiny_task_file, tiny_model_dir):
    """SIGKILL at three moments of `parts decompose` (mid-forward, mid-save, before the rename), and a
    `parts sweep` and a `parts evaluate` killed between two runs; restarted, each ends with exactly the
    files of an uninterrupted run. A clean decompose in another process is the reference, so this also
    checks determinism across processes."""
    moments = ("none", "decompose", "tensors", "rename")
    outs = {moment: tmp_path / moment / "run" for moment in moments}
    small_run("old").save(outs["rename"])  # an old run the killed one was overwriting
    model = ["--model", str(tiny_model_dir), "--device", "cpu", "--batch-size", "3"]
    decompose = ["decompose", *model, "--task", str(tiny_task_file), "--seed", "1", "--limit", "10"]
    sweep = ["sweep", *model, "--tasks", str(tiny_task_file), "--templates", "1-2", "--seeds", "0-1", "--limit", "4"]
    # The old run has other settings: replacing it takes --overwrite.
    jobs = [(m, [*decompose, "--out", str(outs[m]), *(["--overwrite"] if m == "rename" else [])], str(outs[m]))
            for m in moments]
    jobs.append(("sweep", [*sweep, "--out", str(tmp_path / "sweep-killed")], str(tmp_path / "sweep-killed")))
    evaluate = ["evaluate", *model, "--tasks", str(tiny_task_file), "--templates", "1", "--seeds", "0", "--labels", "12",
                "--limit", "8"]
    # Killed saving the train run, after the test run was saved.
    jobs.append(("second-save", [*evaluate, "--out", str(tmp_path / "evaluate-killed")], str(tmp_path / "evaluate-killed")))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "killer.py").write_text(KILLER)
    done = subprocess.run([sys.executable, str(tmp_path / "killer.py"), str(tmp_path / "jobs.json")],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    codes = json.loads((tmp_path / "jobs.codes.json").read_text())
    assert codes == {"none": 0, "decompose": -signal.SIGKILL, "tensors": -signal.SIGKILL, "rename": -signal.SIGKILL,
                     "sweep": -signal.SIGKILL, "second-save": -signal.SIGKILL}
    for moment in moments[1:]:
        with pytest.raises(PartsError, match="is not a finished run"):
            DecompositionRun.load(outs[moment])
        assert not outs[moment].exists()
        assert main([*decompose, "--out", str(outs[moment])]) == 0  # restart
        assert saved_bytes(outs[moment]) == saved_bytes(outs["none"])
    # And the same bytes in this process as in the other.
    assert main([*decompose, "--out", str(tmp_path / "here")]) == 0
    assert saved_bytes(tmp_path / "here") == saved_bytes(outs["none"])

    # The sweep died saving its second run: one finished run and a staging folder; rerun, it matches a clean sweep.
    killed = tmp_path / "sweep-killed"
    assert len(list(killed.rglob("summary.json"))) == 1 and list(killed.rglob(".t1-s1-*.parts-tmp-*"))
    assert main([*sweep, "--out", str(killed)]) == 0
    assert main([*sweep, "--out", str(tmp_path / "sweep-whole")]) == 0
    assert len(list(killed.rglob("summary.json"))) == 4
    assert all_files(killed) == all_files(tmp_path / "sweep-whole")

    # The evaluation died the same way: the test run finished, the train run not, no results yet.
    killed = tmp_path / "evaluate-killed"
    assert len(list(killed.rglob("summary.json"))) == 1 and read_results(killed / "results.csv").empty
    assert main([*evaluate, "--out", str(killed)]) == 0
    assert main([*evaluate, "--out", str(tmp_path / "evaluate-whole")]) == 0
    assert len(read_results(killed / "results.csv")) == ROWS_PER_SETTING
    assert evaluation_outputs(killed) == evaluation_outputs(tmp_path / "evaluate-whole")


def evaluation_outputs(root: Path) -> dict[str, object]:
    """Every file's bytes, except the weight and logit caches' (safetensors writes metadata in a random order,
    and it names `root`): their tensors and metadata."""
    from safetensors import safe_open

    outputs: dict[str, object] = {}
    for name, data in all_files(root).items():
        if name.endswith(".safetensors") and not name.endswith("/tensors.safetensors"):
            with safe_open(str(root / name), framework="pt") as handle:
                metadata = {k: v.replace(str(root), "ROOT") for k, v in (handle.metadata() or {}).items()}
                outputs[name] = (metadata, {k: handle.get_tensor(k).tolist() for k in handle.keys()})
        else:
            outputs[name] = data
    return outputs


def test_the_model_a_run_records_loads_again(tiny_model_dir):
    """`parts report --attention` loads each run's model from the name the run records, revision and random
    re-initialisation included."""
    from parts.model.loading import load_model, model_name, recorded_model

    assert recorded_model("EleutherAI/pythia-160m@step1000") == {"name": "EleutherAI/pythia-160m", "revision": "step1000"}
    assert recorded_model("SmolLM2-135M-Instruct") == {"name": "SmolLM2-135M-Instruct", "revision": None}
    random_model = load_model(str(tiny_model_dir), device="cpu", random_init=True, seed=3)
    arguments = recorded_model(model_name(random_model))
    assert arguments == {"name": str(tiny_model_dir), "revision": None, "random_init": True, "seed": 3}
    again = load_model(**arguments, device="cpu")
    assert model_name(again) == model_name(random_model)
    assert torch.equal(again.original_model.get_input_embeddings().weight,
                       random_model.original_model.get_input_embeddings().weight)
