"""Where a model's files are, known without importing torch: the embedded model's names and converted copy,
a local folder, or the Hugging Face cache (`parts.model.loading` loads from them; `parts.model.preflight`
reads a tokenizer from them before the weights load)."""

from __future__ import annotations

import os
from pathlib import Path

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_ALIASES = {None, "", "embedded", "smollm2", EMBEDDED_MODEL.lower(), EMBEDDED_MODEL}
EMBEDDED_FOLDER = "smollm2-135m-instruct-f32"  # the embedded model converted to a float32 checkpoint, in the cache


def cache_dir() -> Path:
    """Where converted weights are kept (`PARTS_CACHE_DIR`, else `~/.cache/parts`)."""
    return Path(os.environ.get("PARTS_CACHE_DIR", Path.home() / ".cache" / "parts"))


def resolve_model_name(name: str | None) -> str:
    """The name a model is known by: the embedded model's for any of its aliases (None, "embedded", ...),
    else the hub name or folder as given."""
    return EMBEDDED_MODEL if name in EMBEDDED_ALIASES else str(name)


def files_on_disk(name: str | None, revision: str | None = None) -> Path | None:
    """The folder of the model's config and tokenizer files if they are on this disk now: the embedded model's
    converted copy (once converted), a local folder, or a hub model's snapshot in the Hugging Face cache; None
    otherwise (not converted yet, not downloaded, or no such model: loading it says which)."""
    if name in EMBEDDED_ALIASES:
        folder = cache_dir() / EMBEDDED_FOLDER
        return folder if (folder / "config.json").is_file() else None
    path = Path(str(name)).expanduser()
    if path.is_dir():
        return path if revision is None else None  # a revision of a local folder is refused when it loads
    if str(name).startswith(("/", ".", "~")) or str(name).count("/") > 1:
        return None  # a folder that does not exist, not a hub name
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(str(name), "config.json", revision=revision)
    return Path(found).parent if isinstance(found, str) else None
