"""The one place `parts` writes files: atomically, with the user's umask, never over what parts did not write.

How a write goes:

- **A file** (`write_file`, `write_text`, `write_bytes`, `write_json`) is written under a staging name beside it
  (`.NAME.parts-tmp-XXXXXXXX`), flushed to disk, and renamed over the target: the target is always either the old
  file or the new one, never a torn mix. A failed write (disk full, permission denied, Ctrl-C) removes the staging
  file, leaves the old file as it was, and raises a one-line `PartsError` saying so.
- **A folder** (`write_folder`, for a run) is filled under a staging name and renamed into place; an old folder
  is moved aside in one rename and removed only once the new one stands, and put back if the new one failed.
- **Permissions**: staging files and folders are created like `open()` and `mkdir` create them (0666 / 0777
  less the umask), not private as `mkstemp` / `mkdtemp` would make them; a writer that makes its file private
  (safetensors' `save_file`) is overruled, so every file parts writes follows the umask.
- **Ownership**: every folder parts writes into holds a marker file `.parts` listing the names parts wrote
  there. An existing file is replaced only if its name is listed (or `legacy(path)` recognises it as the output
  of a parts version older than the marker); an existing folder only if everything in it is parts' (or it is
  empty). Anything else is refused with a one-line error naming the path: parts never deletes, moves or
  overwrites a file it did not write.
- **Symbolic links** are followed: the link stays, what it points to is written (a broken link is refused).
- **Locks**: `lock(path)` is a `filelock.FileLock` beside `path`, for read-merge-write of a shared file.

Usage::

    from parts import io
    io.write_json(out / "analysis.json", report)
    io.write_file(path, lambda staging: save_file(tensors, str(staging)))   # any writer taking a path
    with io.write_folder(run_path) as staging:                              # a folder, renamed into place
        io.write_text(staging / "summary.json", text)
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock

from parts.errors import PartsError

MARKER = ".parts"  # in every folder parts writes into: JSON {"written_by": "parts", "files": [names]}
STAGING = ".parts-tmp-"  # infix of staging names: `.NAME.parts-tmp-XXXXXXXX`
LOCK_SUFFIX = ".parts-lock"  # `.NAME.parts-lock`: the lock file of NAME

Legacy = Callable[[Path], bool]  # recognises an output of a parts version that predates the marker


# -- What parts wrote -------------------------------------------------------------------------------
def recorded(folder: str | Path) -> set[str]:
    """The names parts has recorded writing in `folder` (empty if it has no readable marker)."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
        return {str(name) for name in marker["files"]} if isinstance(marker, dict) else set()
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def folder_kind(folder: str | Path) -> str | None:
    """What parts wrote `folder` whole as ("run", "report", "model"), from its marker; None if it does not say."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    kind = marker.get("kind") if isinstance(marker, dict) else None
    return kind if isinstance(kind, str) else None


def is_bookkeeping(name: str) -> bool:
    """parts' own marker, lock and staging names (left by a killed write), which are never a user's file."""
    return name.startswith(".") and (name == MARKER or name.endswith(LOCK_SUFFIX) or STAGING in name)


def is_parts_file(path: str | Path, legacy: Legacy | None = None) -> bool:
    """Whether the existing file at `path` is one parts wrote (recorded in its folder's marker, or legacy)."""
    path = Path(path)
    return path.name in recorded(path.parent) or (legacy is not None and legacy(path))


def is_parts_folder(folder: str | Path, legacy: Legacy | None = None) -> bool:
    """Whether everything in `folder` is parts' (an empty folder counts): it may then be replaced whole."""
    return not foreign_entries(folder, legacy)


def foreign_entries(folder: str | Path, legacy: Legacy | None = None) -> list[str]:
    """Names in `folder` that parts did not write (sorted); empty if the folder is parts' or legacy."""
    folder = Path(folder)
    names = sorted(entry.name for entry in folder.iterdir())
    if not (folder / MARKER).exists() and legacy is not None and legacy(folder):
        return []
    mine = recorded(folder)

    def foreign(name: str) -> bool:
        entry = folder / name
        if name not in mine:
            return True
        # A folder parts wrote (a report's data/) is parts' only if all in it is, by its own marker, all the way down.
        return entry.is_dir() and (entry.is_symlink() or bool(foreign_entries(entry)))

    return [name for name in names if not is_bookkeeping(name) and foreign(name)]


def starts_with(text: str) -> Legacy:
    """A `legacy` test: the file begins with `text` (e.g. the header line parts writes in a CSV)."""
    return contains(text, start_only=True)


def contains(text: str, start_only: bool = False) -> Legacy:
    """A `legacy` test: the file's first 64 KiB hold `text` (at the start, with `start_only`)."""
    wanted = text.encode()

    def test(path: Path) -> bool:
        try:
            with path.open("rb") as handle:
                head = handle.read(65536)
        except OSError:
            return False
        return head.startswith(wanted) if start_only else wanted in head

    return test


# -- Checks before reading ----------------------------------------------------------------------------
def existing_folder(path: str | Path, what: str, fix: str) -> Path:
    """`path` if it is a folder; else a one-line error naming it as `what` ("data directory"), saying what stands
    there instead, and `fix`.

    It reads nothing, so a command runs it on its folder arguments before its slow imports."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        problem = "is a file, not a folder" if folder.exists() else "does not exist"
        raise PartsError(f"{what} {folder} {problem}: {fix}")
    return folder


# -- Checks before writing ----------------------------------------------------------------------------
def _resolve(path: str | Path) -> Path:
    """The real path to write (symlinks followed); a broken link is refused."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise PartsError(f"{path} is a broken symbolic link: point it at an existing folder or choose another path")
    return Path(os.path.realpath(path))


def check_file(path: str | Path, legacy: Legacy | None = None) -> Path:
    """The real path `path` may be written to; raise if what stands there is not a file parts wrote."""
    target = _resolve(path)
    if target.is_dir():
        raise PartsError(f"{path} is a folder, where parts would write a file: choose another path")
    if target.exists() and not is_parts_file(target, legacy):
        raise PartsError(
            f"{path} exists and parts did not write it (it is not listed in {target.parent / MARKER}): "
            "move it away or choose another path; parts never overwrites a file it did not write"
        )
    return target


def check_folder(path: str | Path, legacy: Legacy | None = None, kind: str | None = None) -> Path:
    """The real path a folder may be written to; raise if what stands there holds anything parts did not write,
    or is a folder parts wrote whole as another `kind` (a run never replaces a report, nor a report a run)."""
    target = _resolve(path)
    if target.exists() and not target.is_dir():
        raise PartsError(f"{path} is a file, where parts would write a folder: choose another path")
    found = folder_kind(target) if target.is_dir() else None
    if kind is not None and found is not None and found != kind:
        raise PartsError(f"{path} holds a {found} parts wrote, not a {kind}: choose another path; "
                         f"parts replaces a {kind} only with a {kind}")
    if target.is_dir():
        foreign = foreign_entries(target, legacy)
        users = [name for name in foreign if outputs_within(target / name, legacy) is None]
        if users:
            more = f" and {len(users) - 1} more" if len(users) > 1 else ""
            raise PartsError(
                f"{path} holds {users[0]}{more}, which parts did not write: choose another path or move them away; "
                "parts never replaces a folder holding files it did not write"
            )
        if foreign:  # folders of outputs parts wrote elsewhere (a sweep's runs): parts', but not this folder's own
            outputs = [output for name in foreign for output in outputs_within(target / name, legacy) or []]
            kinds = sorted({folder_kind(output) or "output" for output in outputs})
            example = outputs[0].relative_to(target)
            more = f" and {len(outputs) - 1} more" if len(outputs) > 1 else ""
            raise PartsError(
                f"{path} holds {' and '.join(kinds)} folders parts wrote ({example}{more}), so it is not one "
                f"{kind or 'folder'} parts may replace: choose another path"
            )
    return target


def outputs_within(folder: Path, legacy: Legacy | None = None) -> list[Path] | None:
    """The folders parts wrote whole (runs, reports...) that make up `folder`, by their markers (a sweep's
    `MODEL/TASK/` folders have none of their own); None if anything in it is not parts'."""
    if not folder.is_dir() or folder.is_symlink():
        return None
    if (folder / MARKER).exists() or (legacy is not None and legacy(folder)):
        return None if foreign_entries(folder, legacy) else [folder]
    entries = sorted(entry for entry in folder.iterdir() if not is_bookkeeping(entry.name))
    found: list[Path] = []
    for entry in entries:
        within = outputs_within(entry, legacy)
        if within is None:
            return None
        found += within
    return found or None


# -- Writing ----------------------------------------------------------------------------------------------
def _staging_name(target: Path, suffix: str = "") -> Path:
    return target.parent / f".{target.name}{STAGING}{secrets.token_hex(4)}{suffix}"


def _explain(err: BaseException, path: str | Path) -> BaseException:
    """An OS error as a one-line PartsError naming the path and saying nothing there changed."""
    if not isinstance(err, OSError):
        return err
    reason = os.strerror(err.errno) if err.errno else str(err)
    fix = {
        errno.ENOSPC: "free some space and rerun",
        errno.EDQUOT: "free some space and rerun",
        errno.EACCES: "choose a folder you can write to",
        errno.EPERM: "choose a folder you can write to",
        errno.EROFS: "choose a folder on a writable disk",
    }.get(err.errno or 0, "fix that and rerun")
    return PartsError(f"could not write {path} ({reason}); what was there before is unchanged: {fix}")


def _make_folder(folder: Path, path: str | Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)  # 0777 less the umask, as `mkdir` does
    except OSError as err:
        raise _explain(err, path) from err


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _record(folder: Path, names: Iterable[str]) -> None:
    """Add `names` to `folder`'s marker (under a lock: several sweeps may share a folder)."""
    names = set(names)
    with FileLock(str(folder / LOCK_SUFFIX)):  # `.parts-lock`
        known = recorded(folder)
        if names <= known:
            return
        kind = folder_kind(folder)  # a run keeps saying it is one when evaluate adds its weights
        _replace_with(folder / MARKER, lambda staging: staging.write_text(_marker_text(known | names, kind)))


def _marker_text(names: Iterable[str], kind: str | None = None) -> str:
    marker: dict[str, Any] = {"written_by": "parts", **({"kind": kind} if kind else {}), "files": sorted(names)}
    return json.dumps(marker, indent=1) + "\n"


def _replace_with(target: Path, write: Callable[[Path], Any], mode: int | None = None) -> None:
    """Write through a staging file created with the umask's permissions (or `mode`), then rename it over `target`.

    The permissions are set again after `write`: a writer may replace the staging file by one of its own making
    (safetensors' `save_file` writes a private 0600 file and renames it over the path it is given).
    """
    staging = _staging_name(target)
    os.close(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0666 less the umask
    try:
        mode = stat.S_IMODE(staging.stat().st_mode) if mode is None else mode
        write(staging)
        os.chmod(staging, mode)
        _fsync(staging)
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def write_file(path: str | Path, write: Callable[[Path], Any], legacy: Legacy | None = None) -> Path:
    """Write a file atomically: `write(staging_path)` writes it, then it is renamed to `path`.

    `write` gets a path to an empty file it may overwrite (e.g. `lambda p: save_file(tensors, str(p))`).
    Refuses (PartsError) if `path` holds a file parts did not write (see the module docstring); an OS
    error while writing becomes a PartsError and leaves the previous file unchanged. Returns `path`.
    """
    target = check_file(path, legacy)
    _make_folder(target.parent, path)
    try:
        _record(target.parent, [target.name])  # first: a name recorded but never written is harmless
        _replace_with(target, write)
    except BaseException as err:
        raise _explain(err, path) from err
    return Path(path)


def write_bytes(path: str | Path, data: bytes, legacy: Legacy | None = None) -> Path:
    """`data` written atomically to `path` (see `write_file`)."""
    return write_file(path, lambda staging: staging.write_bytes(data), legacy)


def write_text(path: str | Path, text: str, legacy: Legacy | None = None) -> Path:
    """`text` written atomically to `path` (see `write_file`)."""
    return write_file(path, lambda staging: staging.write_text(text), legacy)


def write_json(path: str | Path, data: Any, legacy: Legacy | None = None, indent: int = 1) -> Path:
    """JSON (no NaN: it is not JSON) with a final newline, written atomically."""
    return write_text(path, json.dumps(data, indent=indent, allow_nan=False) + "\n", legacy)


def rewrite_text(path: str | Path, text: str) -> Path:
    """Rewrite a file of the user's in place, atomically, keeping its permission bits: only for edits confined
    to blocks parts owns inside it (the `<!-- parts-tables:NAME -->` blocks of a docs page). It is not recorded
    as parts' file, so parts never replaces it whole."""
    target = _resolve(path)
    if not target.is_file():
        raise PartsError(f"{path} is not a file: parts rewrites only the marked blocks of an existing page")
    try:
        _replace_with(target, lambda staging: staging.write_text(text), mode=stat.S_IMODE(target.stat().st_mode))
    except BaseException as err:
        raise _explain(err, path) from err
    return Path(path)


@contextmanager
def write_folder(path: str | Path, legacy: Legacy | None = None, kind: str | None = None,
                 check: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Fill the yielded staging folder; on leaving the block it replaces `path` in one rename.

    Every file and subfolder in the staging folder is recorded in its folder's marker, so the folder is parts' own
    all the way down (`foreign_entries` looks into recorded subfolders). An old folder
    at `path` may only hold what parts wrote (else PartsError before anything is written); it is moved aside,
    removed once the new folder stands, and put back if the block or the rename failed. `kind` ("run",
    "report"...) is recorded in the marker: a folder parts wrote as another kind is refused, not replaced.
    `check(path)` (e.g. "is the run there one of other settings?") raises to refuse; it runs under `lock(path)`
    together with the rename, so of two processes writing one folder at once the second sees the first's
    folder, as it would have one after the other.
    """
    target = check_folder(path, legacy, kind)
    _make_folder(target.parent, path)
    staging = _staging_name(target)
    retired = staging.with_name(staging.name + "-old")
    try:
        staging.mkdir()  # 0777 less the umask, as `mkdir` does
        yield staging
        _follow_umask(staging)
        # Everything in the staging folder is parts': each folder's marker lists it, subfolders included.
        for folder in [staging, *sorted(p for p in staging.rglob("*") if p.is_dir() and not p.is_symlink())]:
            names = [entry.name for entry in folder.iterdir()]
            (folder / MARKER).write_text(_marker_text(names, kind if folder == staging else None))
        with lock(target):  # the last check and the rename are one step
            check_folder(path, legacy, kind)  # again: something may have been put there meanwhile
            if check is not None:
                check(Path(path))
            if target.exists():
                os.replace(target, retired)  # one rename: never removed file by file in place
            os.replace(staging, target)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if retired.exists() and not target.exists():
            os.replace(retired, target)  # the new folder failed: put the old one back
        raise _explain(err, path) from err
    if retired.exists():
        remove_parts_folder(retired, legacy)


def _follow_umask(staging: Path) -> None:
    """Give everything in a staging folder the permissions `open` and `mkdir` give under the umask, which the
    staging folder itself got from `mkdir`: writers that make their files private (safetensors' `save_file`,
    and through it `save_pretrained`) would otherwise leave a shared run or model cache unreadable to others."""
    folder_mode = stat.S_IMODE(staging.stat().st_mode) & 0o777
    for entry in staging.rglob("*"):
        if not entry.is_symlink():
            bits = stat.S_IMODE(entry.stat().st_mode)
            wanted = folder_mode if entry.is_dir() else folder_mode & 0o666
            os.chmod(entry, (bits & ~0o777) | wanted)  # a folder's setgid bit (shared group) is kept


def remove_parts_folder(folder: Path, legacy: Legacy | None = None) -> None:
    """Delete a folder parts wrote, entry by entry; anything parts did not write is left (and the folder kept)."""
    foreign = set(foreign_entries(folder, legacy))
    for entry in folder.iterdir():
        if entry.name in foreign:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)  # a staging folder of a killed write
        else:
            entry.unlink(missing_ok=True)
    if not foreign:
        folder.rmdir()


def remove_stale_staging(path: str | Path) -> None:
    """Remove what killed writes of `path` left behind (`.NAME.parts-tmp-*`): only parts' own staging names."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for stale in path.parent.glob(f".{path.name}{STAGING}*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def lock(path: str | Path) -> FileLock:
    """A lock for read-merge-write of `path` (a file `.NAME.parts-lock` beside it): `with io.lock(p): ...`.

    Re-entrant within a process (one lock object per lock file), so a caller may hold it around a write that
    takes it again (a run being computed, then its folder renamed into place by `write_folder`)."""
    path = Path(path)
    _make_folder(path.parent, path)
    return FileLock(os.path.join(os.path.realpath(path.parent), f".{path.name}{LOCK_SUFFIX}"), is_singleton=True)
