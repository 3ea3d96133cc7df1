"""Fingerprints: everything that determines a run or a results row, so it is reused only when all of it is the same.

Runs are filed by task name, template number, seed, shots, split and size (`runner.run_dir`), but those do not
say whether the task's template text, its label words, its data or the model's weights are still what they
were. So every run records a fingerprint in its `summary.json` (and every results row a digest of its own,
`results.py`): a flat dictionary of plain values, compared field by field so a refusal can say what changed.

| field | what |
|---|---|
| format_version | the run format (`runs.FORMAT_VERSION`) |
| task, label_names | the task's name and classes |
| template_text, separator, label_words | the chosen template, as rendered |
| label_token_ids | the label words' token ids (known once the tokenizer is loaded) |
| train_data, split_data | a hash of the rows of the training split (demonstrations) and of the run's split |
| shots, seed, split, sample | the demonstrations, their seed, the split and how many examples were asked for |
| labelled_sets | seeds 1 and up: drawn apart from the lower seeds' labelled sets (absent for seed 0, whose draw is unchanged) |
| model, model_files | the model's label and what its weights are (`parts.model.identity`) |
| dtype, engine, prefix_reuse, split_experts | the options that change the numbers |

The API every command that reuses runs or rows goes through (an experiment of its own uses the same three):

- `run_fingerprint(...)`: the fingerprint a run of these settings has;
- `differences(recorded, wanted)`: what differs, in words ("template text differs from the run's (...)");
- `check_reuse(what, recorded, wanted, recompute)`: True to reuse, False to recompute (`recompute`, from
  `RunOptions.recompute_changed`, the command line's `--recompute-changed`), else a one-line PartsError.

A field missing from `wanted` is not compared (label token ids before the tokenizer is loaded). A run or row
without a fingerprint (written before parts recorded one) is never reused silently: it is refused, or
recomputed with the flag.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from parts.data.prompts import LABEL_BUDGET
from parts.data.tasks import Task, data_dir_from_env, hub_source
from parts.decomposition.runs import FORMAT_VERSION
from parts.errors import PartsError
from parts.model.identity import model_identity

RECOMPUTE_FLAG = "--recompute-changed"
FINGERPRINT = "fingerprint"  # the key of a run's summary.json that holds it

FIELD_NAMES = {  # how a difference in each field is named
    "format_version": "the run format version",
    "task": "task name",
    "label_names": "label names",
    "template_text": "template text",
    "separator": "separator",
    "label_words": "label words",
    "label_token_ids": "label token ids",
    "train_data": "training data",
    "split_data": "the split's data",
    "shots": "shots",
    "seed": "seed",
    "labelled_sets": "the draw of the labelled sets (disjoint across seeds)",
    "split": "split",
    "sample": "sample size",
    "model": "model",
    "model_files": "model files",
    "dtype": "dtype",
    "engine": "engine",
    "prefix_reuse": "prefix reuse",
    "split_experts": "expert split",
}

_split_hashes: dict[tuple[str, int, int], str] = {}  # (real path, size, mtime) -> hash, for this process


def split_hash(task: Task, split: str, data_dir: str | Path | None = None) -> str:
    """A hash of the rows of one split of a task's data (each row's fields, as parsed), or where the hub
    serves it from when no data folder is used. A row added, removed or edited changes it; reformatting
    the file does not."""
    folder = task.data_dir
    if folder is None:
        root = data_dir_from_env(data_dir)
        if root is None:
            return f"hub {hub_source(task, split)}"
        folder = root / task.name
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        return "missing"
    stat = path.stat()
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _split_hashes:
        digest = hashlib.sha256()
        with path.open() as handle:
            for line in handle:
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError:
                        row = line  # not JSON: reading the split reports it; its text still identifies it
                    digest.update(json.dumps(row, sort_keys=True).encode() + b"\n")
        _split_hashes[key] = "sha256:" + digest.hexdigest()
    return _split_hashes[key]


def run_fingerprint(
    model: str | None,
    task: Task,
    template: int,
    seed: int,
    shots: int | None,
    split: str,
    limit: int | None,
    *,
    data_dir: str | Path | None = None,
    dtype: str = "float32",
    engine: str = "hf",
    prefix_reuse: bool = True,
    split_experts: bool = False,
    label_token_ids: list[int] | None = None,
    template_task: Task | None = None,
) -> dict[str, Any]:
    """The fingerprint of a run of these settings (`model`: its label, as `runner.ModelSpec.label` gives it).

    `template_task` (a transfer): the task whose template, label words and training split (demonstrations)
    are used, `task` giving the examples. `label_token_ids` None: not known yet, so not compared.
    """
    source = template_task or task
    chosen = source.template(template)
    fields: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "task": task.name if template_task is None else f"{source.name} -> {task.name}",
        "label_names": list(source.label_names),
        "template_text": chosen.text,
        "separator": chosen.separator,
        "label_words": list(chosen.label_words),
        "train_data": split_hash(source, "train", data_dir),
        "split_data": split_hash(task, split, data_dir),
        "shots": source.default_shots if shots is None else shots,
        "seed": seed,
        **({"labelled_sets": _labelled_sets_drawn(seed)} if seed else {}),
        "split": split,
        "sample": "all" if limit is None else limit,
        **model_identity(model),
        "dtype": dtype,
        "engine": engine,
        "prefix_reuse": prefix_reuse,
        "split_experts": split_experts,
    }
    if label_token_ids is not None:
        fields["label_token_ids"] = list(label_token_ids)
    return fields


def _labelled_sets_drawn(seed: int) -> str:
    """How a seed's labelled set is drawn, for seeds 1 and up (`parts.data.prompts.sample_labeled_set`)."""
    below = "seed 0" if seed == 1 else f"seeds 0-{seed - 1}"
    return f"disjoint from those of {below} ({LABEL_BUDGET} labelled each)"


def digest(fields: Mapping[str, Any], leave_out: tuple[str, ...] = ("label_token_ids",)) -> str:
    """A short hash of a fingerprint (for a results row), over every field but `leave_out`."""
    kept = {key: value for key, value in fields.items() if key not in leave_out}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def differences(recorded: Mapping[str, Any] | None, wanted: Mapping[str, Any], whose: str = "the run's") -> list[str]:
    """What differs between a recorded fingerprint and the wanted one, in words, in field order:
    "template text differs from the run's ('Review: {text}' there, now 'Text: {text}')". Fields missing from
    `wanted` are not compared; None for `recorded` (no fingerprint) is one difference."""
    if recorded is None:
        return [f"{whose} fingerprint is not recorded (made before parts recorded fingerprints)"]
    found = []
    for key, value in wanted.items():
        if key not in recorded:
            found.append(f"{FIELD_NAMES.get(key, key)} is not recorded in {whose} fingerprint")
        elif recorded[key] != value:
            found.append(f"{FIELD_NAMES.get(key, key)} differs from {whose} ({_shown(recorded[key])} there, "
                         f"now {_shown(value)})")
    return found


def check_reuse(what: str | Path, recorded: Mapping[str, Any] | None, wanted: Mapping[str, Any], recompute: bool,
                whose: str = "the run's") -> bool:
    """Whether `what` (a run folder, results rows) may be reused: True when nothing differs; False when
    something does and `recompute` says to redo it; else a one-line PartsError naming what changed and the flag."""
    changed = differences(recorded, wanted, whose)
    if not changed:
        return True
    if recompute:
        return False
    more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
    plural = whose.endswith("s'")  # "the rows'"
    raise PartsError(f"{what} {'were' if plural else 'was'} made otherwise: {changed[0]}{more}; pass {RECOMPUTE_FLAG} "
                     f"to recompute {'them' if plural else 'it'}, or choose another --out")
