"""No command deletes, moves or overwrites a file parts did not write (issue 17; the table in the README).

For every command that writes, a clean reference run lists the paths it writes; then each kind of target is
put at those paths (a user's file, a user's folder, a symlink to them, a run of other settings, a read-only
folder, tracked files of a git repository) and the command is run again: it must refuse with one line naming
the path, or do its work, and every file of the user's must be byte-identical afterwards. A hypothesis
property test does the same over random trees of user files whose names collide with parts' outputs.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parts import io
from parts.cli import main

COMMANDS = ("decompose", "sweep", "evaluate", "transfer", "control", "checkpoints", "analyze", "figures", "report")
FOLDER_OUTPUTS = {"report": "report"}  # commands whose output is one folder, written whole (like a run)


@pytest.fixture(scope="module")
def argv_for(tiny_model_dir, tiny_task_file, shifted_task_file, tmp_path_factory) -> Callable[[str, Path], list[str]]:
    """The command line of each command writing under `out` (analyze and figures read a finished sweep)."""
    model, task = str(tiny_model_dir), str(tiny_task_file)
    small = ["--templates", "1", "--seeds", "0", "--limit", "4", "--device", "cpu"]
    runs = tmp_path_factory.mktemp("runs")
    assert main(["sweep", "--model", model, "--tasks", task, "--templates", "1,2", "--seeds", "0", "--limit", "4",
                 "--device", "cpu", "--out", str(runs)]) == 0

    def argv(command: str, out: Path) -> list[str]:
        return {
            "decompose": ["decompose", "--model", model, "--task", task, "--limit", "4", "--device", "cpu",
                          "--out", str(out / "run")],
            "sweep": ["sweep", "--model", model, "--tasks", task, *small, "--out", str(out)],
            "evaluate": ["evaluate", "--model", model, "--tasks", task, *small, "--labels", "8", "--out", str(out)],
            "transfer": ["transfer", "--model", model, "--pairs", f"{task}:{shifted_task_file}", "--templates", "1",
                         "--seeds", "0", "--limit", "4", "--target-limit", "4", "--device", "cpu", "--out", str(out)],
            "control": ["control", "--model", model, "--tasks", task, *small, "--out", str(out),
                        "--csv", str(out / "control.csv")],
            "checkpoints": ["checkpoints", "--checkpoints", model, "--tasks", task, "--limit", "4", "--device", "cpu",
                            "--out", str(out)],
            "analyze": ["analyze", str(runs), "--out", str(out / "analysis.json")],
            "figures": ["figures", str(runs), "--out", str(out), "--formats", "html", "--no-model"],
            "report": ["report", str(runs), "--out", str(out / "report")],
        }[command]

    return argv


def written(root: Path) -> tuple[list[Path], list[Path]]:
    """The files parts wrote under `root` (outside run folders) and its run folders (or the one folder a command
    like `report` writes whole), relative to `root`."""
    runs = sorted({p.parent.relative_to(root) for p in root.rglob("summary.json")}
                  | {Path(name) for name in FOLDER_OUTPUTS.values() if (root / name / "index.html").is_file()})
    files = sorted(p.relative_to(root) for p in root.rglob("*")
                   if p.is_file() and not io.is_bookkeeping(p.name)
                   and not any(p.relative_to(root).is_relative_to(r) for r in runs))
    return files, runs


@pytest.fixture(scope="module")
def reference(argv_for, tmp_path_factory) -> dict[str, tuple[list[Path], list[Path]]]:
    """What each command writes into a clean folder."""
    outputs = {}
    for command in COMMANDS:
        out = tmp_path_factory.mktemp(f"clean-{command}")
        assert main(argv_for(command, out)) == 0, command
        outputs[command] = written(out)
        assert outputs[command][0] or outputs[command][1], command
    return outputs


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file's bytes and every link's target under `root`, by relative path."""
    found: dict[str, bytes | str] = {}
    for path in root.rglob("*"):
        if path.is_symlink():
            found[str(path.relative_to(root))] = "-> " + os.readlink(path)
        elif path.is_file():
            found[str(path.relative_to(root))] = path.read_bytes()
    return found


def run(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def error_lines(err: str) -> list[str]:
    """The error lines of stderr (progress bars aside): `parts <command>: error: ...`."""
    return [line for line in err.replace("\r", "\n").splitlines() if line.startswith("parts ") and ": error: " in line]


def assert_refused(code: int, err: str, path: Path) -> None:
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and err.rstrip().endswith(lines[0]), err  # one line, no traceback
    assert str(path) in lines[0], (path, err)


# -- Every command against every kind of target -----------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS)
def test_a_users_file_or_folder_where_parts_writes_is_refused_and_kept(command, argv_for, reference, tmp_path, capsys):
    files, runs = reference[command]
    for index, target in enumerate([*files[:2], *runs[:1]]):
        for kind in ("file", "folder", "link to a file", "link to a folder"):
            out = tmp_path / f"{index}-{kind.replace(' ', '-')}"
            path = out / target
            elsewhere = out.with_name(out.name + "-elsewhere")
            path.parent.mkdir(parents=True)
            if kind == "file":
                path.write_bytes(b"the user's own \x00 bytes")
            elif kind == "folder":
                path.mkdir()
                (path / "notes.txt").write_text("the user's notes")
                (path / "summary.json").write_text('{"mine": true}')
            else:
                elsewhere.mkdir()
                real = elsewhere / "thing"
                if kind == "link to a file":
                    real.write_text("the user's file behind a link")
                else:
                    real.mkdir()
                    (real / "notes.txt").write_text("the user's notes behind a link")
                path.symlink_to(real)
            before, before_elsewhere = snapshot(out), snapshot(elsewhere) if elsewhere.exists() else {}
            code, err = run(argv_for(command, out), capsys)
            assert_refused(code, err, path)
            assert snapshot(out).items() >= before.items(), (command, kind, target)  # the user's files, byte for byte
            if elsewhere.exists():
                assert snapshot(elsewhere) == before_elsewhere


@pytest.mark.parametrize("command", COMMANDS)
def test_rerunning_into_parts_own_output_skips_or_replaces_only_it(command, argv_for, reference, tmp_path, capsys):
    """The same settings again: sweep-like commands reuse their runs, files parts wrote are rewritten; the user's
    files beside them are untouched, and parts' own outputs come out the same."""
    out = tmp_path / "out"
    assert main(argv_for(command, out)) == 0
    files, runs = written(out)
    first = {k: v for k, v in snapshot(out).items() if not io.is_bookkeeping(Path(k).name)}
    mine = {Path("my-notes.txt")} | {(r.parent / "my-results.csv") for r in runs}
    for path in mine:
        (out / path).write_text(f"mine: {path}")
    code, err = run(argv_for(command, out), capsys)
    assert code == 0, err
    after = {k: v for k, v in snapshot(out).items() if not io.is_bookkeeping(Path(k).name)}
    assert all(after[str(path)] == f"mine: {path}".encode() for path in mine)
    again_files, again_runs = written(out)
    assert (sorted(set(again_files) - mine), again_runs) == (files, runs)
    for run_folder in runs if command not in FOLDER_OUTPUTS else []:  # reused (decompose: replaced, same bytes)
        assert {k: v for k, v in after.items() if Path(k).is_relative_to(run_folder)} \
            == {k: v for k, v in first.items() if Path(k).is_relative_to(run_folder)}
    if command in ("analyze", "decompose", "sweep", "control"):  # outputs without timings or random ids
        assert {k: after[k] for k in first} == first


def test_decompose_refuses_a_run_of_other_settings_unless_overwrite(argv_for, tmp_path, capsys):
    out = tmp_path / "out"
    argv = argv_for("decompose", out)
    assert main([*argv, "--seed", "1"]) == 0
    other = snapshot(out)
    code, err = run(argv, capsys)
    assert_refused(code, err, out / "run")
    assert "holds a run of other settings (seed 1 (now 0))" in err and "--overwrite" in err
    assert snapshot(out) == other
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((out / "run" / "summary.json").read_text())["seed"] == 0
    assert [p.name for p in out.iterdir() if not io.is_bookkeeping(p.name)] == ["run"]  # the old run is gone, nothing else left


@pytest.mark.parametrize("command", ["sweep", "evaluate", "control", "checkpoints"])
def test_a_run_of_other_settings_under_a_root_is_refused_or_left(command, argv_for, reference, tmp_path, capsys):
    """A run copied by hand to the folder of other settings: every command refuses it (its fingerprint names
    the seed it was made with) and changes nothing."""
    _, runs = reference[command]
    out = tmp_path / "out"
    assert main(argv_for("decompose", tmp_path / "other") + ["--seed", "1"]) == 0
    (out / runs[0]).parent.mkdir(parents=True)
    shutil.copytree(tmp_path / "other" / "run", out / runs[0])
    before = snapshot(out)
    code, err = run(argv_for(command, out), capsys)
    assert_refused(code, err, out / runs[0])
    assert "was made otherwise: seed differs from the run's (1 there, now 0)" in err
    assert snapshot(out) == before


@pytest.mark.parametrize("command", COMMANDS)
def test_a_read_only_folder_is_a_one_line_error_that_changes_nothing(command, argv_for, tmp_path, capsys, monkeypatch):
    """Simulated (tests run as root, who may write anywhere): the kernel's answer for a read-only folder."""
    out = tmp_path / "read-only"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    real_open, real_mkdir = os.open, os.mkdir

    def inside(path) -> bool:
        return Path(os.fsdecode(path)).is_relative_to(out)

    def open_(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and inside(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if inside(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)
    code, err = run(argv_for(command, out), capsys)
    monkeypatch.undo()
    assert code == 2 and len(error_lines(err)) == 1 and "Permission denied" in error_lines(err)[0], err
    assert str(out) in error_lines(err)[0]
    assert snapshot(out) == {"mine.txt": b"mine"}


@pytest.mark.parametrize("command", COMMANDS)
def test_tracked_files_of_a_repository_are_never_replaced(command, argv_for, reference, tmp_path, capsys):
    files, runs = reference[command]
    repo = tmp_path / "repo"
    for target in [*files, *[r / "summary.json" for r in runs]]:
        (repo / target).parent.mkdir(parents=True, exist_ok=True)
        (repo / target).write_text(f"tracked {target}\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "user's files"], check=True)
    code, err = run(argv_for(command, repo), capsys)
    assert code == 2 and "parts did not write" in error_lines(err)[0], err
    assert subprocess.run([*git, "diff", "--exit-code", "--stat"], capture_output=True).returncode == 0


# -- Random trees of user files ---------------------------------------------------------------------------------
def user_tree(names: list[str]) -> st.SearchStrategy[dict[str, bytes]]:
    """Random files: some at paths parts writes (or under them), some beside them."""
    free = st.text("abcdefghij-_.", min_size=1, max_size=8).filter(lambda n: n not in (".", "..")
                                                                       and not n.startswith(".parts"))
    colliding = st.sampled_from(names)
    path = st.one_of(colliding, st.builds(lambda a, b: f"{a}/{b}", colliding, free), free,
                     st.builds(lambda a, b: f"{a}/{b}", free, free))
    return st.dictionaries(path, st.binary(max_size=64), min_size=1, max_size=6)


def plant(root: Path, tree: dict[str, bytes]) -> None:
    for name, data in sorted(tree.items(), key=lambda item: item[0].count("/")):
        path = root / name
        if any(parent.is_file() for parent in path.parents if parent.is_relative_to(root)) or path.is_dir():
            continue  # a file already stands where a folder of this one would go
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@pytest.mark.parametrize("command", COMMANDS)
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_trees_of_user_files_survive_every_command(command, argv_for, reference, capsys, data):
    files, runs = reference[command]
    names = sorted({str(p) for p in files} | {str(p) for p in runs} | {str(p.parent) for p in [*files, *runs]
                                                                        if str(p.parent) != "."})
    tree = data.draw(user_tree(names))
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "out"
        out.mkdir()
        plant(out, tree)
        before = snapshot(out)
        code, err = run(argv_for(command, out), capsys)
        after = snapshot(out)
        assert after.items() >= before.items(), (command, tree, err)  # every user file, byte for byte
        assert code in (0, 2), err
        if code == 2:
            assert len(error_lines(err)) == 1 and err.rstrip().endswith(error_lines(err)[0]), err


def test_a_run_and_a_report_never_replace_each_other(argv_for, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(argv_for("decompose", out)) == 0
    run_bytes = snapshot(out)
    code, err = run(argv_for("report", tmp_path / "x")[:2] + ["--out", str(out / "run")], capsys)
    assert_refused(code, err, out / "run")
    assert "holds a run parts wrote, not a report" in err and snapshot(out) == run_bytes
    assert main(argv_for("report", out)) == 0
    report_bytes = snapshot(out / "report")
    code, err = run([*argv_for("decompose", out)[:-1], str(out / "report")], capsys)
    assert_refused(code, err, out / "report")
    assert "holds a report parts wrote, not a run" in err and snapshot(out / "report") == report_bytes


def test_a_sweeps_folders_are_refused_as_parts_outputs_not_as_foreign(argv_for, tmp_path, capsys):
    """`decompose --out` or `report --out` at a folder `sweep` just wrote is refused, worded from what is there:
    runs parts wrote (not files parts "did not write"); a user's file among them is named as the user's."""
    out = tmp_path / "out"
    assert main(argv_for("sweep", out)) == 0
    model_folder = next(out.iterdir())
    runs = sorted(p.parent.relative_to(model_folder) for p in model_folder.rglob("summary.json"))
    assert len(runs) == 1
    before = snapshot(out)
    for target, command in ((model_folder, "decompose"), (out, "report"), (model_folder / runs[0].parent, "decompose")):
        argv = argv_for(command, tmp_path / "x")
        code, err = run([*argv[:-1], str(target)], capsys)
        assert_refused(code, err, target)
        kind = "run" if command == "decompose" else "report"
        example = (model_folder / runs[0]).relative_to(target)
        assert f"holds run folders parts wrote ({example}), so it is not one {kind} parts may replace: " \
               "choose another path" in error_lines(err)[0], err
        assert "did not write" not in err
    (model_folder / runs[0].parent / "notes.txt").write_text("mine")
    code, err = run([*argv_for("decompose", tmp_path / "x")[:-1], str(model_folder)], capsys)
    assert_refused(code, err, model_folder)
    assert f"holds {runs[0].parts[0]}, which parts did not write" in error_lines(err)[0], err
    assert snapshot(out) == {**before, str((model_folder / runs[0].parent / "notes.txt").relative_to(out)): b"mine"}


def test_a_results_csv_that_is_not_parts_is_a_one_line_error(argv_for, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_bytes(b"\x80\x81 not text")
    code, err = run(argv_for("evaluate", out), capsys)
    assert_refused(code, err, out / "results.csv")
    assert (out / "results.csv").read_bytes() == b"\x80\x81 not text"


@pytest.mark.parametrize("command", COMMANDS)
def test_a_full_disk_while_rewriting_keeps_the_previous_outputs(command, argv_for, tmp_path, capsys, monkeypatch):
    """Rerun over its own finished outputs with every new file or folder failing (ENOSPC): what was there stays
    byte for byte, and the error says what happened in one line (commands that find everything done write
    nothing and succeed)."""
    out = tmp_path / "out"
    assert main(argv_for(command, out)) == 0
    before = {k: v for k, v in snapshot(out).items() if not io.is_bookkeeping(Path(k).name)}
    real_open, real_mkdir = os.open, os.mkdir

    def full(path) -> None:
        if Path(os.fsdecode(path)).is_relative_to(out):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    def open_(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            full(path)
        return real_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        full(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)
    code, err = run(argv_for(command, out), capsys)
    monkeypatch.undo()
    after = {k: v for k, v in snapshot(out).items() if not io.is_bookkeeping(Path(k).name)}
    assert after == before, command
    if command in ("decompose", "analyze", "figures", "report", "checkpoints", "control"):  # these rewrite
        assert code == 2, err
    if code != 0:
        lines = error_lines(err)
        assert code == 2 and len(lines) == 1 and "No space left on device" in lines[0], err
        assert "what was there before is unchanged" in lines[0]
