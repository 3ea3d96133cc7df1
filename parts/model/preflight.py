"""What can be checked about running a model before its weights load: the device, and the label words.

A mistake here (`--device gpu`, a label word of two tokens) used to surface after the model had loaded,
seconds to minutes in; these checks answer it first. They import no torch where they can: importing torch
alone takes one to several seconds, transformers and TransformerLens several more.

- `check_device`: the device names a kind parts runs models on, and it exists here. Whether this torch was
  built with CUDA is read from its `torch/version.py` without importing it, so on a CPU-only torch
  `--device cuda` is refused at once; where a GPU build is installed, torch is imported to count the GPUs.
- `check_label_words`: every label word of every template is one token, and they differ, for the model's
  tokenizer alone (read with the `tokenizers` library when it is the model's whole tokenizer). The same check
  runs again with the loaded model's own tokenizer (`parts.data.prompts.label_token_ids`): this one only
  answers sooner.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from parts.data.prompts import label_token_ids
from parts.errors import PartsError
from parts.model.locations import files_on_disk

DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")  # the kinds of device parts runs a model on, besides "auto"
DEVICE_FORMS = "cpu, cuda, cuda:N (one GPU), mps, xpu or auto (spread over every GPU)"


@cache
def torch_build() -> dict[str, Any]:
    """`torch.version`'s fields (`__version__`; `cuda`, `hip`, `xpu`: None where this torch was built without
    them), read from the file without importing torch; {} if it cannot be read (then torch is asked)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return {}
    try:
        tree = ast.parse((Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text())
    except (OSError, SyntaxError, ValueError):
        return {}
    fields: dict[str, Any] = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else getattr(node, "target", None)
        value = getattr(node, "value", None)
        if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(target, ast.Name) and isinstance(value, ast.Constant):
            fields[target.id] = value.value
    return fields if "__version__" in fields and "cuda" in fields else {}


def _without_accelerators(build: dict[str, Any]) -> bool:
    """Whether this torch can only use the CPU, as far as its build says (macOS builds may still have mps)."""
    return bool(build) and not any(build.get(name) for name in ("cuda", "hip", "xpu")) and sys.platform != "darwin"


def available_devices() -> list[str]:
    """The devices a model can be put on here: cpu, each CUDA GPU (cuda:0 ...), mps, each XPU; auto with GPUs."""
    if _without_accelerators(torch_build()):
        return ["cpu"]  # known without importing torch
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = ["cpu", *(f"cuda:{i}" for i in range(gpus))]
    if torch.backends.mps.is_available():
        devices.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        devices += [f"xpu:{i}" for i in range(xpu.device_count())]
    return devices + (["auto"] if gpus else [])


def check_device(device: Any, here: bool = True) -> None:
    """Raise a one-line `PartsError` unless `device` (a name, a `torch.device` or None: the default) is one parts
    runs models on and, with `here`, one this machine has. `here` False checks the name only (a Ray driver
    names its workers' device)."""
    if device is None:
        return
    text = str(device).strip()
    kind, _, index = text.partition(":")
    if text == "auto" or (kind == "cpu" and index in ("", "0")):
        return
    if kind not in DEVICE_TYPES or (index and not index.isdigit()) or (kind == "mps" and index not in ("", "0")):
        raise PartsError(f"unknown device {text!r}: use {DEVICE_FORMS}; this machine has {_one_of(available_devices())}")
    if not here:
        return
    devices = available_devices()
    if (kind if kind == "mps" else text) in {*devices, *(d.partition(":")[0] for d in devices)}:
        return  # "cuda": any GPU; "cuda:1": that one
    build = torch_build()
    why = ""
    if kind == "cuda" and build and not (build.get("cuda") or build.get("hip")):
        why = f" (this torch {build['__version__']} is built without CUDA: install a CUDA build of torch for a GPU)"
    elif kind == "cuda" and "cuda:0" not in devices:
        why = " (torch sees no CUDA GPU: check the driver and CUDA_VISIBLE_DEVICES)"
    raise PartsError(f"device {text!r} is not available here{why}: use {_one_of(devices)}")


def _one_of(names: list[str]) -> str:
    """'cpu', 'cpu or auto', 'cpu, cuda:0 or auto'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


# -- the label words ------------------------------------------------------------------------------------
# Tokenizer classes transformers builds from tokenizer.json unchanged (others may rebuild it from the vocabulary).
GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


class FileTokenizer:
    """A tokenizer.json read by the `tokenizers` library alone, called as a transformers tokenizer is called
    by `label_token_ids` (a fraction of a second, where importing transformers takes seconds)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.core = Tokenizer.from_file(str(path))

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.core.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.core.decode(list(ids)))


def early_tokenizer(name: str | None, revision: str | None = None) -> Any | None:
    """The model's tokenizer without its weights, if its files are on this disk (`files_on_disk`): read by the
    `tokenizers` library when transformers would build it unchanged from tokenizer.json, else by transformers'
    AutoTokenizer; None when it cannot be read now (loading the model then says why)."""
    folder = files_on_disk(name, revision)
    if folder is None:
        return None
    try:
        tokenizer_class = json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        tokenizer_class = None
    if tokenizer_class in GENERIC_TOKENIZERS and (folder / "tokenizer.json").is_file():
        return FileTokenizer(folder / "tokenizer.json")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    except Exception:  # noqa: BLE001 - whatever stops it here stops the model load too, which explains it
        return None


def check_label_words(name: str | None, revision: str | None, label_words: Mapping[str, Sequence[str]]) -> None:
    """Each set of label words (keyed by whose they are: "task 'mine' template 1") is one token per word and
    distinct for the model's tokenizer, checked before the weights load. Nothing is checked when the tokenizer
    is not on disk yet (a model still to download or convert): the loaded model's tokenizer checks it then."""
    tokenizer = early_tokenizer(name, revision) if label_words else None
    if tokenizer is None:
        return
    for whose, words in label_words.items():
        try:
            label_token_ids(tokenizer, words)
        except PartsError as err:
            raise PartsError(f"{whose}: {err}") from None
