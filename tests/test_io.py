"""parts.io: atomic writes under the user's umask, and never over a file parts did not write."""

from __future__ import annotations

import errno
import json
import os
import stat
import threading

import pytest

from parts import io
from parts.errors import PartsError


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_and_folders_get_the_umasks_permissions(tmp_path, umask_022):
    """mkstemp/mkdtemp would make them 0600/0700: results on a shared machine private to their creator."""
    io.write_text(tmp_path / "a.txt", "hello")
    io.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    io.write_json(tmp_path / "c.json", {"x": 1})
    io.write_file(tmp_path / "d.bin", lambda staging: staging.write_bytes(b"via callback"))
    with io.write_folder(tmp_path / "run") as staging:
        (staging / "summary.json").write_text("{}")
    assert [mode(tmp_path / n) for n in ("a.txt", "b.bin", "c.json", "d.bin")] == [0o644] * 4
    assert mode(tmp_path / "run") == 0o755
    os.umask(0o077)
    io.write_text(tmp_path / "private.txt", "secret")
    assert mode(tmp_path / "private.txt") == 0o600
    assert (tmp_path / "d.bin").read_bytes() == b"via callback"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": 1}


def test_a_writer_that_makes_its_file_private_is_overruled(tmp_path, umask_022):
    """safetensors' `save_file` (and `save_pretrained` through it) writes 0600 whatever the umask, renaming its own
    file over the path it is given: run tensors, weights and the model cache would be unreadable to a group."""
    import torch
    from safetensors.torch import save_file

    tensors = {"x": torch.arange(3.0)}
    io.write_file(tmp_path / "w.safetensors", lambda staging: save_file(tensors, str(staging)))
    with io.write_folder(tmp_path / "run") as staging:
        save_file(tensors, str(staging / "tensors.safetensors"))
        (staging / "sub").mkdir(mode=0o700)
        save_file(tensors, str(staging / "sub" / "model.safetensors"))
    assert mode(tmp_path / "w.safetensors") == 0o644
    assert [mode(tmp_path / "run" / n) for n in ("tensors.safetensors", "sub", "sub/model.safetensors")] \
        == [0o644, 0o755, 0o644]
    os.umask(0o027)  # a group's umask: what the group may read, others not
    io.write_file(tmp_path / "g.safetensors", lambda staging: save_file(tensors, str(staging)))
    assert mode(tmp_path / "g.safetensors") == 0o640


def test_the_marker_records_what_parts_wrote(tmp_path):
    io.write_text(tmp_path / "a.txt", "1")
    io.write_text(tmp_path / "b.txt", "2")
    assert io.recorded(tmp_path) == {"a.txt", "b.txt"}
    with io.write_folder(tmp_path / "run") as staging:
        (staging / "x.json").write_text("{}")
        (staging / "y.safetensors").write_bytes(b"")
    assert io.recorded(tmp_path / "run") == {"x.json", "y.safetensors"}
    assert io.is_parts_folder(tmp_path / "run")
    io.write_text(tmp_path / "a.txt", "3")  # parts' own file is replaced
    assert (tmp_path / "a.txt").read_text() == "3"


def test_a_file_parts_did_not_write_is_never_replaced(tmp_path):
    (tmp_path / "mine.csv").write_text("the user's")
    with pytest.raises(PartsError, match=r"mine.csv exists and parts did not write it"):
        io.write_text(tmp_path / "mine.csv", "parts'")
    assert (tmp_path / "mine.csv").read_text() == "the user's"
    (tmp_path / "folder").mkdir()
    with pytest.raises(PartsError, match="is a folder, where parts would write a file"):
        io.write_text(tmp_path / "folder", "x")
    # An output of a parts version that predates the marker is recognised by its content.
    (tmp_path / "old.csv").write_text("model,task\nm,t\n")
    io.write_text(tmp_path / "old.csv", "model,task\n", legacy=io.starts_with("model,task"))
    with pytest.raises(PartsError, match="parts did not write it"):
        io.write_text(tmp_path / "mine.csv", "x", legacy=io.starts_with("model,task"))


def test_a_folder_holding_anything_parts_did_not_write_is_never_replaced(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(PartsError, match=r"user holds notes.txt, which parts did not write"), \
            io.write_folder(user) as staging:
        (staging / "summary.json").write_text("{}")
    assert (user / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user"]  # no staging left
    # A parts folder the user put a file into is not replaced either.
    with io.write_folder(tmp_path / "run") as staging:
        (staging / "summary.json").write_text("old")
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(PartsError, match="holds notes.txt"), io.write_folder(tmp_path / "run") as staging:
        (staging / "summary.json").write_text("new")
    assert (tmp_path / "run" / "summary.json").read_text() == "old"
    # A file where a folder goes, and an empty folder (nothing to lose: replaced).
    (tmp_path / "file").write_text("x")
    with pytest.raises(PartsError, match="is a file, where parts would write a folder"), \
            io.write_folder(tmp_path / "file"):
        pass
    (tmp_path / "empty").mkdir()
    with io.write_folder(tmp_path / "empty") as staging:
        (staging / "summary.json").write_text("{}")
    assert (tmp_path / "empty" / "summary.json").is_file()


def test_symlinks_are_followed_never_replaced(tmp_path):
    real = tmp_path / "real"
    with io.write_folder(real) as staging:
        (staging / "summary.json").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(real)
    with io.write_folder(link) as staging:
        (staging / "summary.json").write_text("new")
    assert link.is_symlink() and (real / "summary.json").read_text() == "new"
    io.write_text(tmp_path / "target.txt", "1")
    (tmp_path / "file-link").symlink_to(tmp_path / "target.txt")
    io.write_text(tmp_path / "file-link", "2")
    assert (tmp_path / "file-link").is_symlink() and (tmp_path / "target.txt").read_text() == "2"
    (tmp_path / "broken").symlink_to(tmp_path / "nowhere")
    with pytest.raises(PartsError, match="broken symbolic link"):
        io.write_text(tmp_path / "broken", "x")
    assert not (tmp_path / "nowhere").exists()


def test_a_failing_write_keeps_the_old_file_and_says_so(tmp_path):
    io.write_text(tmp_path / "results.csv", "old rows")

    def disk_full(staging):
        staging.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(PartsError, match=r"could not write .*results.csv \(No space left on device\); what was there "
                                         r"before is unchanged: free some space"):
        io.write_file(tmp_path / "results.csv", disk_full)
    assert (tmp_path / "results.csv").read_text() == "old rows"
    assert sorted(p.name for p in tmp_path.iterdir() if not io.is_bookkeeping(p.name) or ".parts-tmp-" in p.name) \
        == ["results.csv"]  # no staging file left


def test_an_interrupted_folder_write_puts_the_old_folder_back(tmp_path):
    with io.write_folder(tmp_path / "run") as staging:
        (staging / "summary.json").write_text("old")
    with pytest.raises(KeyboardInterrupt), io.write_folder(tmp_path / "run") as staging:
        (staging / "summary.json").write_text("new")
        raise KeyboardInterrupt
    assert (tmp_path / "run" / "summary.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir() if not io.is_bookkeeping(p.name)] == ["run"]  # a lock file may stay


def test_a_read_only_folder_is_a_one_line_error(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    io.write_text(folder / "a.txt", "old")
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes into read-only folders: refuse the rename as the kernel would for a user
        def denied(src, dst):
            raise PermissionError(errno.EACCES, "Permission denied")
        monkeypatch.setattr(os, "replace", denied)
    try:
        with pytest.raises(PartsError, match=r"could not write .*a.txt \(Permission denied\).*choose a folder you can"):
            io.write_text(folder / "a.txt", "new")
        assert (folder / "a.txt").read_text() == "old"
        assert sorted(p.name for p in folder.iterdir()) == [".parts", ".parts-lock", "a.txt"]
    finally:
        folder.chmod(0o755)


def test_the_lock_serialises_read_merge_write(tmp_path):
    """Eight threads each add one line under the lock: none is lost."""
    path = tmp_path / "rows.txt"
    io.write_text(path, "")

    def add(line: str) -> None:
        with io.lock(path):
            io.write_text(path, path.read_text() + line + "\n")

    threads = [threading.Thread(target=add, args=(str(i),)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(path.read_text().split()) == [str(i) for i in range(8)]


def test_stale_staging_is_removed_only_by_its_own_name(tmp_path):
    (tmp_path / ".run.parts-tmp-1234abcd").mkdir()
    (tmp_path / ".run.tmp-user").mkdir()  # not parts' staging name
    (tmp_path / "run.parts-tmp-notes").write_text("mine")
    io.remove_stale_staging(tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.tmp-user", "run.parts-tmp-notes"]


def test_a_folder_of_one_kind_never_replaces_one_of_another(tmp_path):
    """A run never replaces a report (nor a report a run), though both are parts' own; the kind survives files
    added later (evaluate's weights in a run folder)."""
    with io.write_folder(tmp_path / "run", kind="run") as staging:
        (staging / "summary.json").write_text("{}")
    io.write_text(tmp_path / "run" / "weights.safetensors", "w")
    assert io.folder_kind(tmp_path / "run") == "run"
    with pytest.raises(PartsError, match=r"run holds a run parts wrote, not a report: choose another path"), \
            io.write_folder(tmp_path / "run", kind="report") as staging:
        (staging / "index.html").write_text("<html>")
    assert (tmp_path / "run" / "summary.json").read_text() == "{}"
    with io.write_folder(tmp_path / "run", kind="run") as staging:  # the same kind: replaced
        (staging / "summary.json").write_text("new")
    assert (tmp_path / "run" / "summary.json").read_text() == "new"


def test_every_file_parts_writes_follows_the_umask(tmp_path, umask_022, tiny_model_dir, tiny_task_file, tokenizer):
    """Run folders (summary, prompts, tensors, effects), reweighting weights and cached logits, results.csv and its table,
    the exported result tables, figures, a report, and the converted model in the cache: under umask 022 every file
    is 0644 and every folder 0755, so a group sharing runs or a cache can read them (safetensors alone made 0600)."""
    from conftest import make_hf_model

    from parts.cli import main
    from parts.experiments.export import export_results
    from parts.model.loading import save_checkpoint

    out = tmp_path / "parts"
    runs = out / "runs"
    assert main(["evaluate", "--model", str(tiny_model_dir), "--tasks", str(tiny_task_file), "--templates", "1",
                 "--seeds", "0", "--labels", "12", "--limit", "8", "--out", str(runs), "--device", "cpu"]) == 0
    (test_run,) = runs.rglob("t1-s0-k4-test-n8")
    assert main(["effects", str(test_run), "--device", "cpu", "--yes"]) == 0
    export_results(runs, out / "results", limit=8, tasks={"tiny": tiny_task_file})
    assert main(["figures", str(runs), "--out", str(out / "figures"), "--formats", "html", "--no-model",
                 "--examples", "8"]) == 0
    assert main(["report", str(runs), "--out", str(out / "report")]) == 0
    save_checkpoint(make_hf_model("llama"), tokenizer, out / "cache" / "tiny-f32", {"format": 1})

    files = [p for p in out.rglob("*") if p.is_file()]
    written = {p.relative_to(out).parts[0] for p in files if not io.is_bookkeeping(p.relative_to(out).parts[0])}
    assert written == {"runs", "results", "figures", "report", "cache"}
    suffixes = {p.suffix for p in files}
    assert {".safetensors", ".json", ".jsonl", ".csv", ".md", ".html", ".js", ".css"} <= suffixes
    assert {p.name for p in files} >= {"tensors.safetensors", "effects.safetensors", "reweight-labels12.safetensors",
                                       "content-free.safetensors", "results.csv", "model.safetensors", "parts-stamp.json"}
    wrong = {str(p.relative_to(out)): oct(mode(p)) for p in files if mode(p) != 0o644}
    wrong |= {str(p.relative_to(out)): oct(mode(p)) for p in out.rglob("*") if p.is_dir() and mode(p) != 0o755}
    assert wrong == {}
