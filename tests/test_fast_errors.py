"""Mistakes answered first, in one line, before the model loads (issue 28, section 3).

The wall times these checks save are benchmark rows (benchmarks/bench_cli.py, benchmarks/results.md),
not asserted here; what is asserted is the message, the exit status, and that torch and transformers
were not imported where the check does not need them.
"""

from __future__ import annotations

import json
import os
import re
import warnings

import pytest
import torch

from parts.data.tasks import PAPER_TASKS
from parts.errors import PartsError
from parts.model import preflight
from parts.model.preflight import check_device
from tests.test_fast_cli import probe

CPU_ONLY_TORCH = preflight._without_accelerators(preflight.torch_build())


# -- the device ---------------------------------------------------------------------------------


def test_the_torch_build_is_read_as_torch_reports_it():
    build = preflight.torch_build()
    assert build["__version__"] == torch.__version__
    assert [build.get(field) for field in ("cuda", "hip")] == [torch.version.cuda, torch.version.hip]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert [d for d in preflight.available_devices() if d.startswith("cuda")] == [f"cuda:{i}" for i in range(gpus)]


def test_an_unknown_device_is_one_line_naming_the_devices_here():
    result = probe(["decompose", "--task", "sst2", "--out", "x", "--device", "gpu"])
    assert result["code"] == 2, result
    assert result["err"].splitlines() == [
        "parts decompose: error: unknown device 'gpu': use cpu, cuda, cuda:N (one GPU), mps, xpu or auto "
        f"(spread over every GPU); this machine has {preflight._one_of(preflight.available_devices())}"]
    if CPU_ONLY_TORCH:
        assert result["heavy"] == [], result


@pytest.mark.skipif(not CPU_ONLY_TORCH, reason="this torch is built with an accelerator: the case needs a CPU-only torch")
def test_cuda_on_a_cpu_only_torch_is_refused_before_torch_is_imported():
    result = probe(["sweep", "--tasks", "sst2", "--out", "x", "--device", "cuda"])
    assert result["code"] == 2 and result["heavy"] == [], result
    assert result["err"].splitlines() == [
        f"parts sweep: error: device 'cuda' is not available here (this torch {torch.__version__} is built without "
        "CUDA: install a CUDA build of torch for a GPU): use cpu"]


def test_the_devices_of_a_gpu_machine(monkeypatch):
    """What a machine with two GPUs accepts and refuses (its device list stood in for)."""
    monkeypatch.setattr(preflight, "torch_build", lambda: {"__version__": "2.13.0+cu128", "cuda": "12.8"})
    monkeypatch.setattr(preflight, "available_devices", lambda: ["cpu", "cuda:0", "cuda:1", "auto"])
    for device in ("cpu", "cuda", "cuda:1", torch.device("cuda", 0), "auto", None):
        check_device(device)
    with pytest.raises(PartsError, match=r"^device 'cuda:2' is not available here: use cpu, cuda:0, cuda:1 or auto$"):
        check_device("cuda:2")
    with pytest.raises(PartsError, match=r"^device 'mps' is not available here: use cpu, cuda:0, cuda:1 or auto$"):
        check_device("mps")
    with pytest.raises(PartsError, match=r"^unknown device 'cuda:one': use cpu, cuda, cuda:N"):
        check_device("cuda:one")
    monkeypatch.setattr(preflight, "available_devices", lambda: ["cpu"])
    with pytest.raises(PartsError, match=r"^device 'cuda' is not available here \(torch sees no CUDA GPU: check the "
                                         r"driver and CUDA_VISIBLE_DEVICES\): use cpu$"):
        check_device("cuda")
    check_device("cuda:3", here=False)  # a Ray driver names its workers' device: the name is checked, not the GPU


def test_the_library_checks_the_device_before_loading():
    from parts.experiments.options import RunOptions
    from parts.model.loading import load_model

    with pytest.raises(PartsError, match="^unknown device 'gpu'"):
        RunOptions(device="gpu")
    with pytest.raises(PartsError, match="^unknown device 'gpu'"):
        load_model("/nonexistent-model-folder", device="gpu")  # the device is refused before the folder is read


# -- the label words and the template's fields ------------------------------------------------------------


def user_task(folder, data, name: str, template: str, label_words: list[str]):
    """A task JSON in `folder` over the data in `data` (the tiny task's: tests/conftest.py)."""
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"name": name, "data_dir": str(data), "template": template, "label_words": label_words}))
    return path


def test_a_label_word_of_two_tokens_is_answered_with_the_tokenizer_alone(tiny_task_file, tiny_model_dir, tmp_path):
    task = user_task(tmp_path, tiny_task_file.parent, "twotokens", "review : {text} sentiment :", [" negative", " good film"])
    for argv in (["decompose", "--task", str(task)], ["sweep", "--tasks", str(task), "--seeds", "0", "--templates", "1"],
                 ["evaluate", "--tasks", str(task), "--seeds", "0", "--templates", "1"]):
        result = probe([*argv, "--model", str(tiny_model_dir), "--out", str(tmp_path / "out")])
        assert result["code"] == 2 and result["heavy"] == [], result
        assert result["err"].splitlines() == [
            f"parts {argv[0]}: error: task 'twotokens' template 1: label word ' good film' is 2 tokens ['good', 'film'] "
            "for this model's tokenizer: choose a label word that is a single token (try it with or without a leading "
            "space)"]
    assert not (tmp_path / "out").exists()


def test_a_template_field_the_data_lacks_is_answered_before_the_slow_imports(tiny_task_file, tmp_path):
    task = user_task(tmp_path, tiny_task_file.parent, "nofield", "review : {txt} sentiment :", [" negative", " positive"])
    for argv in (["sweep", "--tasks", str(task), "--templates", "1"], ["evaluate", "--tasks", str(task), "--templates", "1"],
                 ["control", "--tasks", str(task), "--templates", "1"]):
        result = probe([*argv, "--out", str(tmp_path / "out")])
        assert result["code"] == 2 and result["heavy"] == [], result
        assert result["err"].splitlines() == [f"parts {argv[0]}: error: {tiny_task_file.parent / 'train.jsonl'}: "
                                              "example 1 lacks field(s) txt that the templates of 'nofield' use"]


WORDS = sorted({w for task in PAPER_TASKS.values() for t in task.templates.values() for w in t.label_words}
               | {" unfavourably", " Neither", "positive", " positive ", " 42", " naïve", "\n", " <|im_end|>"})


def test_the_early_tokenizer_is_the_models_own(embedded_model, tiny_model_dir, tokenizer):
    """Read from tokenizer.json alone, the tokenizer gives the ids the loaded model's tokenizer gives, for every
    label word of the paper's tasks and words of several tokens (the embedded model and a word-level one)."""
    for name, loaded in ((None, embedded_model.tokenizer), (str(tiny_model_dir), tokenizer)):
        early = preflight.early_tokenizer(name)
        assert isinstance(early, preflight.FileTokenizer)
        for word in WORDS:
            assert early(word, add_special_tokens=False) == {"input_ids": loaded(word, add_special_tokens=False)["input_ids"]}
    assert any(len(embedded_model.tokenizer(w, add_special_tokens=False)["input_ids"]) > 1 for w in WORDS)


def test_no_early_tokenizer_without_its_files(tmp_path, monkeypatch):
    monkeypatch.setenv("PARTS_CACHE_DIR", str(tmp_path / "empty-cache"))
    assert preflight.early_tokenizer(None) is None  # the embedded model not converted yet: checked after loading
    assert preflight.early_tokenizer("nobody/no-such-model") is None  # not in the hub cache (offline)
    assert preflight.early_tokenizer(str(tmp_path / "missing")) is None  # loading it says the folder is missing
    preflight.check_label_words(None, None, {"task 'x' template 1": [" two words", " b"]})  # nothing to check with


# -- data from the hub, when there is no network ----------------------------------------------------------


@pytest.fixture
def no_data_dir(monkeypatch, tmp_path):
    """No data directory, empty Hugging Face caches, offline unless a test says otherwise."""
    from huggingface_hub import constants

    monkeypatch.delenv("PARTS_DATA_DIR", raising=False)
    for variable in ("HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


FIX = "pass --data-dir FOLDER or set PARTS_DATA_DIR=FOLDER, a folder holding sst2/train.jsonl and sst2/test.jsonl"


def test_offline_without_a_data_folder_fails_at_once_saying_what_to_set(no_data_dir):
    from parts.data.prompts import build_prompts

    with pytest.raises(PartsError, match=r"^no data directory is set and sst2 must come from the Hugging Face hub, "
                                         r"but HF_HUB_OFFLINE is set and nyu-mll/glue is not in its cache: " + FIX):
        build_prompts(PAPER_TASKS["sst2"], limit=4)


def test_an_unreachable_hub_is_decided_by_one_connection(no_data_dir, monkeypatch):
    from parts.data import tasks

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    tried = []

    def refuse(address, timeout):
        tried.append((address, timeout))
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(tasks.socket, "create_connection", refuse)
    with pytest.raises(PartsError, match=r"but huggingface.co cannot be reached \(Network is unreachable\) and "
                                         r"nyu-mll/glue is not in its cache: " + FIX):
        tasks.check_hub_data(PAPER_TASKS["sst2"])
    assert tried == [(("huggingface.co", 443), 3)]
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # behind a proxy nothing is decided: datasets tries
    tasks.check_hub_data(PAPER_TASKS["sst2"])
    assert len(tried) == 1


def test_a_cached_dataset_is_left_to_datasets(no_data_dir):
    from parts.data.tasks import check_hub_data

    (no_data_dir / "hub" / "datasets--nyu-mll--glue").mkdir(parents=True)
    check_hub_data(PAPER_TASKS["sst2"])  # offline, but in the cache: datasets reads it from there
    (no_data_dir / "datasets" / "google___boolq").mkdir(parents=True)
    check_hub_data(PAPER_TASKS["boolq"])
    with pytest.raises(PartsError, match="rte must come from the Hugging Face hub"):
        check_hub_data(PAPER_TASKS["rte"])


@pytest.mark.parametrize("argv", [["decompose", "--task", "sst2"], ["sweep", "--tasks", "sst2"],
                                  ["evaluate", "--tasks", "sst2"]])
def test_the_commands_answer_missing_data_before_the_slow_imports(argv, tmp_path):
    unset = ("PARTS_DATA_DIR", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k not in unset} | {
        "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}
    result = probe([*argv, "--out", str(tmp_path / "out")], env)
    assert result["code"] == 2 and result["heavy"] == [], result
    assert result["err"].splitlines() == [f"parts {argv[0]}: error: no data directory is set and sst2 must come from "
                                          f"the Hugging Face hub, but HF_HUB_OFFLINE is set and nyu-mll/glue is not "
                                          f"in its cache: {FIX}"]


# -- --limit above the data, and test examples of one class ------------------------------------------------


def test_a_limit_above_the_data_is_said_in_the_output_and_recorded(tiny_task_file, tiny_model_dir, tiny_llama, tmp_path):
    from parts.data.prompts import build_prompts
    from parts.data.tasks import get_task
    from parts.decomposition.runs import DecompositionRun
    from parts.experiments.runner import run_decomposition

    task = get_task(str(tiny_task_file))
    with pytest.warns(UserWarning, match=r"^--limit 5000 is more than the 30 examples of the test split of tiny: the "
                                         r"run holds all 30 \(its summary records both\)$"):
        prompts = build_prompts(task, limit=5000)
    assert (len(prompts), prompts.limit, prompts.capped) == (30, 5000, True)
    run = run_decomposition(tiny_llama, prompts, progress=False)
    assert (run.summary()["n_examples"], run.summary()["limit"]) == (30, 5000)
    assert "| test n=30 (--limit 5000: the split holds only these)\n" in run.describe()
    assert DecompositionRun.load(run.save(tmp_path / "run")) == run
    assert not build_prompts(task, limit=30).capped and "(--limit" not in run_decomposition(
        tiny_llama, build_prompts(task, limit=4), progress=False).describe()

    result = probe(["decompose", "--task", str(tiny_task_file), "--model", str(tiny_model_dir), "--limit", "5000",
                    "--out", str(tmp_path / "cli"), "--device", "cpu", "--batch-size", "8"])
    assert result["code"] == 0, result
    assert [line for line in result["err"].splitlines() if "warning" in line] == [
        "parts decompose: warning: --limit 5000 is more than the 30 examples of the test split of tiny: the run holds "
        "all 30 (its summary records both)"]
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert (summary["n_examples"], summary["limit"]) == (30, 5000)


def one_class_task(folder, test_labels: list[int]):
    """A task whose training split has both labels and whose test split has `test_labels`."""
    for split, labels in (("train", [0, 1] * 6), ("test", test_labels)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": f"film {i}", "label": label}) + "\n"
                                                       for i, label in enumerate(labels)))
    return user_task(folder, folder, "oneclass", "review : {text} sentiment :", [" negative", " positive"])


def test_a_test_split_of_one_class_is_refused_with_its_counts(tmp_path):
    from parts.data.prompts import build_prompts
    from parts.data.tasks import get_task

    task = one_class_task(tmp_path, [1] * 10)
    message = ("the test split of oneclass has 10 examples, all labelled positive (per label: negative 0, positive 10): "
               "every component that always answers positive would score 100%; add examples of the other labels")
    with pytest.raises(PartsError, match=f"^{re.escape(message)}$"):
        build_prompts(get_task(str(task)))
    result = probe(["sweep", "--tasks", str(task), "--templates", "1", "--out", str(tmp_path / "out")])
    assert result["code"] == 2 and result["heavy"] == [], result
    assert result["err"].splitlines() == [f"parts sweep: error: {message}"]


def test_a_sample_that_misses_a_label_is_warned_about(tmp_path):
    """A --limit below the number of labels is a user's choice (a quick look at one example): a warning, not an error."""
    from parts.data.prompts import build_prompts
    from parts.data.tasks import get_task

    task = get_task(str(one_class_task(tmp_path, [0, 1, 1, 0])))
    with pytest.warns(UserWarning, match=r"^the 1 test examples of oneclass show 1 of its 2 labels: a component that "
                                         r"always answers one they show scores high by default; use --limit 2 or more"):
        assert len(build_prompts(task, limit=1)) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sorted(build_prompts(task, limit=2).labels) == [0, 1]


# -- parts figures on runs of several sizes ------------------------------------------------------------------


def test_figures_name_the_sizes_that_would_draw(tiny_llama, tiny_task_file, tmp_path, capsys):
    from parts.cli import main
    from parts.experiments.runner import decompose_task

    for limit in (4, 6):
        for seed in (0, 1):
            run = decompose_task(tiny_llama, str(tiny_task_file), seed=seed, limit=limit, progress=False)
            run.save(tmp_path / "runs" / "tiny" / f"t1-s{seed}-n{limit}")
    base = ["figures", str(tmp_path / "runs"), "--out", str(tmp_path / "figures"), "--no-model", "--formats", "html"]
    expected = {
        ("--examples", "16"): f"no test run under {tmp_path / 'runs'} has 16 examples: use --examples 4 or 6 (runs per "
                              "task: tiny 4, 6), or drop --examples to draw every size",
        ("--tasks", "sst2"): f"no test run under {tmp_path / 'runs'} is of --tasks sst2: its tasks are tiny",
    }
    for extra, message in expected.items():
        assert main([*base, *extra]) == 2
        assert capsys.readouterr().err.splitlines() == [f"parts figures: error: {message}"]
    assert main([*base, "--examples", "6"]) == 0
    assert "tiny-accuracy-heatmap" in capsys.readouterr().out.split()


# -- parts.decompose_task given a plain Hugging Face model ----------------------------------------------------


def test_decompose_task_accepts_a_plain_hugging_face_model(tokenizer, tiny_task_file, tiny_model_dir):
    """Wrapped without touching the user's model, and exact: the components and the remainder sum to the Hugging
    Face model's own label-word logits, computed here one unpadded prompt at a time from the tokens it was given."""
    from transformers import AutoModelForCausalLM

    import parts
    from parts.model.loading import as_bridge
    from tests.conftest import make_hf_model

    hf_model = make_hf_model("llama", seed=3)
    modules = [type(m) for m in hf_model.modules()]
    run = parts.decompose_task(hf_model, str(tiny_task_file), limit=6, tokenizer=tokenizer, progress=False)
    assert [type(m) for m in hf_model.modules()] == modules  # the bridge wrapped a twin sharing the weights
    with torch.no_grad():
        own = torch.stack([hf_model(torch.tensor([ids])).logits[0, -1, run.label_token_ids] for ids in run.token_ids])
    assert run.n_examples == 6 and run.model == "LlamaForCausalLM"
    torch.testing.assert_close(run.component_logits.sum(1) + run.remainder, own, atol=1e-4, rtol=0)
    torch.testing.assert_close(run.model_logits, own, atol=1e-4, rtol=0)
    assert as_bridge(hf_model) is as_bridge(hf_model, tokenizer)  # wrapped once

    saved = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # its tokenizer is found under its name
    assert parts.decompose_task(saved, str(tiny_task_file), limit=2, progress=False).model == str(tiny_model_dir)


def test_what_cannot_be_decomposed_says_what_to_pass(tiny_task_file):
    import parts
    from tests.conftest import make_hf_model

    with pytest.raises(PartsError, match=r"^this GPT2LMHeadModel has no name_or_path to load its tokenizer from \(a "
                                         r"model made from a config\): pass tokenizer=AutoTokenizer.from_pretrained"):
        parts.decompose_task(make_hf_model("gpt2"), str(tiny_task_file), limit=2, progress=False)
    with pytest.raises(PartsError, match=r"^cannot decompose a str: pass a model from parts.load_model, or a Hugging "
                                         r"Face causal LM \(AutoModelForCausalLM.from_pretrained\) and its tokenizer=$"):
        parts.decompose_task("gpt2", str(tiny_task_file), limit=2, progress=False)
