"""A run or results row is reused only if everything that made it is the same (docs/guide/reuse.md).

The fingerprint is checked field by field here (each field edited alone between two fingerprints), then each
command that reuses (sweep, evaluate, transfer, control, checkpoints) is run end to end twice on a tiny model:
with a task edited in between it refuses in one line, and with --recompute-changed it recomputes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import parts.decomposition.fingerprint as fingerprint_module
import parts.model.identity as identity
from parts.cli import main
from parts.data.tasks import get_task
from parts.decomposition.fingerprint import RECOMPUTE_FLAG, check_reuse, differences, digest, run_fingerprint
from parts.decomposition.runs import DecompositionRun
from parts.errors import PartsError
from parts.experiments.results import read_results, result_row, rows_reusable, write_results
from parts.model.identity import folder_hash, model_identity

SPEC = {"name": "fp", "data_dir": ".", "template": "review : {text} sentiment :",
        "label_words": [" negative", " positive"], "label_names": ["negative", "positive"]}


def make_task(folder: Path, source: Path, spec_changes: dict | None = None, train_edit: bool = False,
              test_edit: bool = False) -> Path:
    """A copy of the tiny task's data and a task JSON (SPEC with `spec_changes`); one row edited if asked."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, edit in (("train", train_edit), ("test", test_edit)):
        rows = [json.loads(line) for line in (source.parent / f"{split}.jsonl").read_text().splitlines() if line]
        if edit:
            rows[0]["text"] = rows[0]["text"] + " very"
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = folder / "task.json"
    path.write_text(json.dumps({**SPEC, **(spec_changes or {})}))
    return path


BASE = dict(model="tiny-llama", template=1, seed=0, shots=None, split="test", limit=6)

# field -> (how to edit it, the fields that then differ)
EDITS = {
    "template_text": ({"spec": {"template": "review {text} sentiment :"}}, ["template_text"]),
    "separator": ({"spec": {"separator": "\n\n"}}, ["separator"]),
    "label_words": ({"spec": {"label_words": [" bad", " good"]}}, ["label_words"]),
    "label_names": ({"spec": {"label_names": ["neg", "pos"]}}, ["label_names"]),
    "task": ({"spec": {"name": "fp2"}}, ["task"]),
    "train_data": ({"train_edit": True}, ["train_data"]),
    "split_data": ({"test_edit": True}, ["split_data"]),
    "shots": ({"shots": 2}, ["shots"]),
    "seed": ({"seed": 1}, ["seed", "labelled_sets"]),  # seeds 1 and up: drawn disjoint from the lower seeds' sets
    "split": ({"split": "train"}, ["split_data", "split"]),  # a train run reads the train split's rows
    "sample": ({"limit": 8}, ["sample"]),
    "model": ({"model": "tiny-gpt2"}, ["model"]),
    "model_revision": ({"model": "tiny-llama@step1000"}, ["model"]),
    "dtype": ({"dtype": "bfloat16"}, ["dtype"]),
    "engine": ({"engine": "bridge"}, ["engine"]),
    "prefix_reuse": ({"prefix_reuse": False}, ["prefix_reuse"]),
    "split_experts": ({"split_experts": True}, ["split_experts"]),
    "label_token_ids": ({"label_token_ids": [7, 6]}, ["label_token_ids"]),
    "format_version": ({"format_version": 2}, ["format_version"]),
}


def fingerprint_of(folder: Path, source: Path, monkeypatch, spec: dict | None = None, train_edit: bool = False,
                   test_edit: bool = False, format_version: int | None = None, label_token_ids=(6, 7), **changes):
    task = get_task(str(make_task(folder, source, spec, train_edit, test_edit)))
    if format_version is not None:
        monkeypatch.setattr(fingerprint_module, "FORMAT_VERSION", format_version)
    settings = {**BASE, **changes}
    options = {k: settings.pop(k) for k in ("dtype", "engine", "prefix_reuse", "split_experts") if k in settings}
    return run_fingerprint(settings.pop("model"), task, **settings, label_token_ids=list(label_token_ids), **options)


@pytest.mark.parametrize("field", list(EDITS))
def test_each_field_edited_alone_is_the_one_difference_named(field, tiny_task_file, tmp_path, monkeypatch):
    edit, changed = EDITS[field]
    before = fingerprint_of(tmp_path / "a", tiny_task_file, monkeypatch)
    after = fingerprint_of(tmp_path / "b", tiny_task_file, monkeypatch, **edit)
    assert [key for key in after if before.get(key) != after[key]] == changed
    assert set(after) - set(before) == ({"labelled_sets"} if field == "seed" else set()) and set(before) <= set(after)
    found = differences(before, after)
    assert len(found) == len(changed)
    edited = [key for key in changed if key in before][-1]
    name = fingerprint_module.FIELD_NAMES[edited]
    assert any(line.startswith(f"{name} differs from the run's ({before[edited]!r}"[:60]) for line in found), found
    assert digest(before) != digest(after) or changed == ["label_token_ids"]  # token ids follow from words and model


def test_equal_settings_give_equal_fingerprints_wherever_the_data_lives(tiny_task_file, tmp_path, monkeypatch):
    first = fingerprint_of(tmp_path / "a", tiny_task_file, monkeypatch)
    assert differences(first, fingerprint_of(tmp_path / "b", tiny_task_file, monkeypatch)) == []
    unknown_ids = {k: v for k, v in first.items() if k != "label_token_ids"}
    assert differences(first, unknown_ids) == []  # a field not known yet is not compared


def test_check_reuse_reuses_refuses_in_one_line_or_recomputes(tiny_task_file, tmp_path, monkeypatch):
    before = fingerprint_of(tmp_path / "a", tiny_task_file, monkeypatch)
    after = fingerprint_of(tmp_path / "b", tiny_task_file, monkeypatch, spec={"template": "review {text} ?"}, seed=3)
    assert check_reuse("runs/x", before, before, recompute=False) is True
    assert check_reuse("runs/x", before, after, recompute=True) is False
    with pytest.raises(PartsError) as refused:
        check_reuse("runs/x", before, after, recompute=False)
    assert str(refused.value) == (
        "runs/x was made otherwise: template text differs from the run's ('review : {text} sentiment :' there, now "
        f"'review {{text}} ?') (and 2 more); pass {RECOMPUTE_FLAG} to recompute it, or choose another --out")
    with pytest.raises(PartsError, match=r"^runs/x was made otherwise: the run's fingerprint is not recorded \(made "
                                         r"before parts recorded fingerprints\); pass --recompute-changed"):
        check_reuse("runs/x", None, after, recompute=False)
    assert check_reuse("runs/x", None, after, recompute=True) is False


def test_a_local_model_folder_is_identified_by_its_files_hashed_once(tiny_model_dir, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    reads: list[str] = []
    real_digest = identity.hashlib.file_digest

    def counting(handle, name):
        reads.append(handle.name)
        return real_digest(handle, name)

    monkeypatch.setattr(identity.hashlib, "file_digest", counting)
    monkeypatch.setattr(identity, "_memory", {})
    monkeypatch.setenv("PARTS_CACHE_DIR", str(tmp_path / "cache"))
    first = model_identity(str(folder))
    assert first["model"] == str(folder) and first["model_files"] == f"folder sha256:{folder_hash(folder)}"
    n_files = len([p for p in folder.iterdir() if p.is_file()])
    assert len(reads) == n_files  # each file read once; the second call above was answered from the cache
    monkeypatch.setattr(identity, "_memory", {})  # another process: the cache on disk answers
    assert model_identity(str(folder)) == first and len(reads) == n_files

    from conftest import make_hf_model

    make_hf_model("llama", seed=1).save_pretrained(folder)  # other weights, same config
    changed = model_identity(str(folder))
    assert changed["model_files"] != first["model_files"]
    assert len(reads) > n_files and all("safetensors" in name or "json" in name for name in reads[n_files:])
    assert model_identity("EleutherAI/pythia-160m@step1000") == {"model": "EleutherAI/pythia-160m@step1000",
                                                                   "model_files": "hub"}
    assert model_identity(None)["model_files"].startswith("gguf SmolLM2-135M-Instruct.Q4_1.gguf sha256:")


def test_a_user_task_cannot_take_a_built_in_name(tiny_task_file, tmp_path):
    path = make_task(tmp_path, tiny_task_file, {"name": "sst2"})
    with pytest.raises(PartsError, match=r"is named 'sst2', the name of a built-in task: rename it"):
        get_task(str(path))


def test_results_rows_are_reused_only_with_their_fingerprint(tmp_path):
    csv = tmp_path / "results.csv"
    # A table written before parts recorded fingerprints still reads, its rows without one.
    csv.write_text("model,task,template,seed,shots,limit,method,labels,accuracy,n_test,note\r\n"
                   "m,fp,1,0,4,4,icl,4,0.5,4,\r\n")
    old = read_results(csv)
    assert list(old["fingerprint"]) == [""]
    made = {"template_text": "review : {text} sentiment :", "seed": 0}
    with pytest.raises(PartsError, match=r"^the rows of fp t1 s0 in .*results.csv were made otherwise: the rows' "
                                         r"fingerprint is not recorded .*; pass --recompute-changed to recompute them"):
        rows_reusable(csv, old, made, False, "the rows of fp t1 s0")
    assert rows_reusable(csv, old, made, True, "the rows of fp t1 s0") is False
    assert rows_reusable(csv, old.iloc[:0], made, False, "the rows of fp t1 s0") is False  # none there: make them

    write_results(csv, [result_row("m", "fp", 1, 0, 4, 4, "icl", 4, 0.5, 4, fingerprint=digest(made))], {digest(made): made})
    rows = read_results(csv)
    assert rows_reusable(csv, rows, made, False, "the rows of fp t1 s0") is True
    edited = {**made, "template_text": "review {text} sentiment :"}
    with pytest.raises(PartsError, match=r"were made otherwise: template text differs from the rows' \('review : "
                                         r"\{text\} sentiment :' there, now 'review \{text\} sentiment :'\)"):
        rows_reusable(csv, rows, edited, False, "the rows of fp t1 s0")


# -- every command that reuses: refuses an edited task in one line, recomputes with the flag -------------------
def one_line_error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"parts {argv[0]}: error: "), lines
    return lines[0]


def command_line(command: str, model: str, task: Path, target: Path, out: Path) -> list[str]:
    small = ["--templates", "1", "--seeds", "0", "--limit", "4", "--device", "cpu", "--batch-size", "4"]
    return {
        "sweep": ["sweep", "--model", model, "--tasks", str(task), *small, "--out", str(out)],
        "evaluate": ["evaluate", "--model", model, "--tasks", str(task), *small, "--labels", "8", "--out", str(out)],
        "transfer": ["transfer", "--model", model, "--pairs", f"{task}:{target}", "--templates", "1", "--seeds", "0",
                     "--limit", "4", "--target-limit", "4", "--device", "cpu", "--out", str(out)],
        "control": ["control", "--model", model, "--tasks", str(task), *small, "--out", str(out),
                    "--csv", str(out / "control.csv")],
        "checkpoints": ["checkpoints", "--checkpoints", model, "--tasks", str(task), "--limit", "4", "--device", "cpu",
                        "--out", str(out)],
    }[command]


KEPT = ("results.csv", "results.fingerprints.json", "transfer.csv", "transfer.fingerprints.json")


def stamps(out: Path) -> dict[str, int]:
    """The modification time of every file of a run folder and of the results tables under `out` (what is reused;
    the summary tables and figures a command draws are redrawn every time), by relative path."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*")
            if p.is_file() and not p.name.endswith(".parts-lock")
            and ((p.parent / "summary.json").is_file() or p.name in KEPT)}


def saved_prompts(out: Path) -> set[str]:
    """The first prompt of every run under `out`."""
    return {DecompositionRun.load(p.parent).prompts.prompts[0] for p in out.rglob("summary.json")}


@pytest.mark.parametrize("command", ["sweep", "evaluate", "transfer", "control", "checkpoints"])
def test_an_edited_template_is_refused_then_recomputed_never_reused(command, tiny_model_dir, tiny_task_file,
                                                                    shifted_task_file, tmp_path, capsys):
    task = make_task(tmp_path / "task", tiny_task_file)
    out = tmp_path / "out"
    argv = command_line(command, str(tiny_model_dir), task, shifted_task_file, out)
    assert main(argv) == 0
    first = stamps(out)
    assert first and all("review : " in prompt for prompt in saved_prompts(out))
    assert main(argv) == 0 and stamps(out) == first  # unchanged: reused, not one file rewritten

    task.write_text(json.dumps({**SPEC, "template": "review {text} sentiment :"}))
    err = one_line_error(argv, capsys)
    assert "made otherwise: template text differs from the" in err and RECOMPUTE_FLAG in err
    assert stamps(out) == first  # refused before any work: nothing changed

    assert main([*argv, RECOMPUTE_FLAG]) == 0
    prompts = saved_prompts(out)
    assert prompts and all("review : " not in prompt and "sentiment :" in prompt for prompt in prompts)
    second = stamps(out)
    assert main(argv) == 0 and stamps(out) == second  # the recomputed runs match the task: reused
    if command in ("evaluate", "transfer"):
        csv = out / ("results.csv" if command == "evaluate" else "transfer.csv")
        rows = csv.read_text().splitlines()
        fingerprints = json.loads(csv.with_name(csv.stem + ".fingerprints.json").read_text())
        assert rows[0].endswith(",fingerprint") and all(line.rsplit(",", 1)[1] in fingerprints for line in rows[1:])


def test_changed_weights_in_a_model_folder_are_refused_then_recomputed(tiny_model_dir, tiny_task_file, tmp_path,
                                                                       capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    out = tmp_path / "out"
    argv = command_line("sweep", str(model), tiny_task_file, tiny_task_file, out)
    assert main(argv) == 0
    (run_folder,) = [p.parent for p in out.rglob("summary.json")]
    before = DecompositionRun.load(run_folder)

    from conftest import make_hf_model

    make_hf_model("llama", seed=1).save_pretrained(model)
    err = one_line_error(argv, capsys)
    assert f"{run_folder} was made otherwise: model files differs from the run's" in err
    assert main([*argv, RECOMPUTE_FLAG]) == 0
    after = DecompositionRun.load(run_folder)
    assert after.fingerprint is not None and before.fingerprint is not None
    assert after.fingerprint["model_files"] != before.fingerprint["model_files"]
    assert not after.model_logits.equal(before.model_logits)


def test_a_run_saved_before_fingerprints_loads_but_is_never_reused(tiny_model_dir, tiny_task_file, tmp_path, capsys):
    out = tmp_path / "out"
    argv = command_line("sweep", str(tiny_model_dir), tiny_task_file, tiny_task_file, out)
    assert main(argv) == 0
    (summary_file,) = out.rglob("summary.json")
    summary = json.loads(summary_file.read_text())
    del summary["fingerprint"]
    summary_file.write_text(json.dumps(summary, indent=1))
    old = DecompositionRun.load(summary_file.parent)  # still read for analysis and reports
    assert old.fingerprint is None and main(["analyze", str(out), "--out", str(tmp_path / "a.json")]) == 0
    err = one_line_error(argv, capsys)
    assert "the run's fingerprint is not recorded (made before parts recorded fingerprints)" in err
    assert main([*argv, RECOMPUTE_FLAG]) == 0
    assert DecompositionRun.load(summary_file.parent).fingerprint is not None


def test_effects_are_reused_only_with_their_fingerprint(tiny_model_dir, tiny_task_file, tmp_path, capsys):
    from conftest import make_hf_model

    from parts.decomposition.effect_data import TotalEffects

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    out = tmp_path / "out"
    assert main(command_line("sweep", str(model), tiny_task_file, tiny_task_file, out)) == 0
    (run_folder,) = [p.parent for p in out.rglob("summary.json")]
    effects = ["effects", str(out), "--device", "cpu"]
    assert main(effects) == 0
    first = TotalEffects.load(run_folder)
    run = DecompositionRun.load(run_folder)
    assert run.fingerprint is not None
    assert first.info["fingerprint"]["run"] == digest(run.fingerprint)
    assert first.info["fingerprint"]["model_files"] == model_identity(str(model))["model_files"]
    capsys.readouterr()
    assert main(effects) == 0 and "0 computed, 1 already there" in capsys.readouterr().out

    # Effects saved before parts recorded fingerprints: refused, then recomputed with the flag.
    legacy = {key: value for key, value in first.info.items() if key != "fingerprint"}
    TotalEffects(first.total_effects, first.clean_logits, first.component_names, legacy).save(run_folder)
    err = one_line_error(effects, capsys)
    assert "the effects in" in err and "were made otherwise: the effects' fingerprint is not recorded" in err
    assert main([*effects, RECOMPUTE_FLAG]) == 0
    assert TotalEffects.load(run_folder).info["fingerprint"] == first.info["fingerprint"]

    # Other weights in the model folder: the run itself is stale, so its effects are not computed from them.
    make_hf_model("llama", seed=1).save_pretrained(model)
    err = one_line_error(effects, capsys)
    assert f"{run_folder} was made with other model files than {model} has now" in err


@pytest.mark.parametrize("command", ["sweep", "evaluate", "transfer", "control"])
def test_a_run_of_seed_1_drawn_when_seeds_could_overlap_is_refused_then_recomputed(
        command, tiny_model_dir, tiny_task_file, shifted_task_file, tmp_path, capsys, monkeypatch):
    """Seeds 1-4 draw their labelled sets disjoint from the lower seeds' now, so a run made with the earlier draw
    (which overlapped) holds other demonstrations: it is refused, never reused, and recomputed with the flag."""
    import parts.data.prompts as prompts
    import parts.experiments.runner as runner
    from parts.data.prompts import sample_labeled_set
    from parts.data.tasks import load_split

    task = make_task(tmp_path / "task", tiny_task_file)
    rows = [json.loads(line) for line in (task.parent / "train.jsonl").read_text().splitlines()]
    more = [{**row, "text": row["text"] + " film"} for row in rows]  # 80 rows: room for seed 1's 24 (transfer)
    (task.parent / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows + more))
    out = tmp_path / "out"
    argv = command_line(command, str(tiny_model_dir), task, shifted_task_file, out)
    argv[argv.index("--seeds") + 1] = "1"

    with monkeypatch.context() as earlier:  # the earlier draw: nothing excluded, no field in the fingerprint
        earlier.setattr(prompts, "_taken_before", lambda *args: frozenset())
        made = runner.run_fingerprint
        earlier.setattr(runner, "run_fingerprint",
                        lambda *args, **kwargs: {k: v for k, v in made(*args, **kwargs).items() if k != "labelled_sets"})
        assert main(argv) == 0
    old = {p.parent: DecompositionRun.load(p.parent).prompts.demonstrations for p in out.rglob("summary.json")}
    first = stamps(out)
    err = one_line_error(argv, capsys)
    assert "made otherwise: the draw of the labelled sets (disjoint across seeds) is not recorded in the" in err
    assert RECOMPUTE_FLAG in err and stamps(out) == first  # refused before any work

    assert main([*argv, RECOMPUTE_FLAG]) == 0
    fp = get_task(str(task))
    labels = [row["label"] for row in load_split(fp, "train")]
    seed_0 = set(sum(sample_labeled_set(fp, labels, 4, 0, 20), []))
    new = {folder: DecompositionRun.load(folder).prompts.demonstrations for folder in old}
    assert all(set(demos) & seed_0 for demos in old.values())  # the earlier draw overlapped seed 0's set here
    assert all(not set(demos) & seed_0 for demos in new.values()) and new != old
    second = stamps(out)
    assert main(argv) == 0 and stamps(out) == second  # the recomputed runs are reused
