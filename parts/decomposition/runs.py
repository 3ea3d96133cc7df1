"""A decomposition run: its prompts, component logits and what follows from them.

A run saves to a folder holding `summary.json` (what was run and the headline numbers),
`prompts.jsonl` (one line per example: the exact prompt, its gold label and the token ids the model
was given, so a run can be checked elsewhere without guessing the tokenisation) and
`tensors.safetensors` (component logits, remainder, model logits and, since the residual probe, the last
position's final residual after the final norm), and parts' marker `.parts`.
The folder is written under a staging name and renamed into place (`parts.io`), so a folder that
exists is complete.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import einops
import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor

from parts import __version__, io
from parts.components import EXPERT, component_summary, head_name, mlp_name, parse_component
from parts.data.prompts import PromptSet
from parts.errors import PartsError

FORMAT_VERSION = 1
SUMMARY = "summary.json"
PROMPTS = "prompts.jsonl"
TENSORS = "tensors.safetensors"
RUN_KIND = "run"  # what a run folder's marker says it is (parts.io)
_TENSOR_NAMES = ("component_logits", "remainder", "model_logits")
FINAL_RESIDUAL = "final_residual"  # an extra tensor of tensors.safetensors; runs saved before it lack it


def reconstruction_error(
    component_logits: Float[Tensor, "example component label"],
    remainder: Float[Tensor, "example label"],
    model_logits: Float[Tensor, "example label"],
) -> Float[Tensor, " example"]:
    """Per example, the largest |sum of components + remainder - model logit| over the label words."""
    total = einops.reduce(component_logits, "example component label -> example label", "sum")
    return (total + remainder - model_logits).abs().amax(-1)


def layer_head_logits(
    component_logits: Float[Tensor, "example component label"], component_names: list[str], n_layers: int,
    n_heads: int,
) -> Float[Tensor, "example layer head label"]:
    """The heads' direct logits as a `layer x head` grid (TransformerLens's `blocks.{layer}.attn.hook_z` head
    order): `[:, 12, 4]` is `L12H4`. The names must hold every head, layer-major, first (`component_names`)."""
    heads = n_layers * n_heads
    expected = [head_name(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    if list(component_names[:heads]) != expected or component_logits.shape[1] != len(component_names):
        raise PartsError(f"these component logits do not start with every head of {n_layers} layers x {n_heads} heads "
                         "in L0H0, L0H1, ... order: pass the component names that came with them")
    return einops.rearrange(component_logits[:, :heads], "example (layer head) label -> example layer head label",
                            layer=n_layers, head=n_heads)


def layer_mlp_logits(
    component_logits: Float[Tensor, "example component label"], component_names: list[str], n_layers: int,
    n_heads: int,
) -> Float[Tensor, "example layer label"]:
    """The MLPs' direct logits by layer (TransformerLens's `blocks.{layer}.hook_mlp_out`): `[:, 12]` is `MLP12`.
    A run with split experts has no one MLP per layer: refused (its `MLP{layer}E{expert}` columns hold them)."""
    heads = n_layers * n_heads
    mlps = list(component_names[heads:])
    if mlps != [mlp_name(layer) for layer in range(n_layers)]:
        split = [name for name in mlps if parse_component(name).kind == EXPERT]
        if split:
            raise PartsError(f"these components split mixture-of-experts MLPs into experts ({split[0]}, ...): there is "
                             "no one MLP per layer to view; read the experts' columns by name (component_names), or "
                             "decompose without --split-experts")
        raise PartsError(f"these component logits do not end with MLP0 ... MLP{n_layers - 1} after the heads: pass the "
                         "component names that came with them")
    return component_logits[:, heads:]


@dataclass
class Decomposition:
    """Label-word logits of a batch of prompts, split into per-component contributions (what
    `parts.decomposition.decompose.Decomposer` returns; plain data, no model code)."""

    component_logits: Float[Tensor, "example component label"]
    remainder: Float[Tensor, "example label"]  # embeddings and biases
    model_logits: Float[Tensor, "example label"]  # the model's own logits at the label words
    # The last position's final residual after the final norm (what the unembedding reads), for the residual probe.
    final_residual: Float[Tensor, "example d_model"] | None = None

    @property
    def reconstruction_error(self) -> Float[Tensor, " example"]:
        return reconstruction_error(self.component_logits, self.remainder, self.model_logits)


@dataclass(eq=False)
class DecompositionRun:
    """One (model, task, template, seed, split) decomposition and its results."""

    model: str
    prompts: PromptSet
    label_token_ids: list[int]
    n_layers: int
    n_heads: int
    component_names: list[str]
    component_logits: Float[Tensor, "example component label"]
    remainder: Float[Tensor, "example label"]
    model_logits: Float[Tensor, "example label"]
    info: dict[str, Any] = field(default_factory=dict)  # how it was run: batch size, timings...
    # What the model was given, token by token, per example (None: a run saved before parts recorded it).
    token_ids: list[list[int]] | None = None
    # Everything that determined the run (`parts.decomposition.fingerprint`; None: saved before parts recorded it).
    fingerprint: dict[str, Any] | None = None
    # The last position's final residual after the final norm, d_model floats per example (None: saved before parts
    # stored it); the input of the residual probe (`parts.experiments.evaluate.beyond_paper_predictions`).
    final_residual: Float[Tensor, "example d_model"] | None = None

    @classmethod
    def from_decomposition(
        cls, model: str, prompts: PromptSet, label_token_ids: list[int], component_names: list[str],
        n_layers: int, n_heads: int, decomposition: Decomposition, token_ids: list[list[int]] | None = None,
        fingerprint: dict[str, Any] | None = None, **info: Any,
    ) -> DecompositionRun:
        return cls(
            model, prompts, list(label_token_ids), n_layers, n_heads, list(component_names),
            decomposition.component_logits, decomposition.remainder, decomposition.model_logits, dict(info),
            None if token_ids is None else [list(t) for t in token_ids], fingerprint, decomposition.final_residual,
        )

    def __eq__(self, other: object) -> bool:
        """Same run: same metadata, prompts and (bit-identical) tensors."""
        if not isinstance(other, DecompositionRun):
            return NotImplemented
        return (
            self.summary() == other.summary()
            and self.prompts == other.prompts
            and all(torch.equal(getattr(self, n), getattr(other, n)) for n in _TENSOR_NAMES)
            and _same(self.final_residual, other.final_residual)
        )

    # -- derived numbers ---------------------------------------------------------------
    @property
    def labels(self) -> Int[Tensor, " example"]:
        return torch.tensor(self.prompts.labels, dtype=torch.long, device="cpu")

    @property
    def n_examples(self) -> int:
        return len(self.prompts)

    @property
    def chance(self) -> float:
        """Accuracy of always answering the most frequent gold label."""
        counts = torch.bincount(self.labels, minlength=len(self.prompts.label_names))
        return float(counts.max()) / max(1, self.n_examples)

    @property
    def component_predictions(self) -> Int[Tensor, "example component"]:
        """Each component's label: the argmax over its label-word logits (ties: lower label)."""
        return self.component_logits.argmax(-1)

    @property
    def component_accuracy(self) -> Float[Tensor, " component"]:
        correct = self.component_predictions == einops.rearrange(self.labels, "example -> example 1")
        return correct.float().mean(0)

    @property
    def full_predictions(self) -> Int[Tensor, " example"]:
        return self.model_logits.argmax(-1)

    @property
    def full_accuracy(self) -> float:
        return float((self.full_predictions == self.labels).float().mean())

    @property
    def reconstruction_error(self) -> Float[Tensor, " example"]:
        """Largest |sum of components + remainder - model logit| over the label words."""
        return reconstruction_error(self.component_logits, self.remainder, self.model_logits)

    @property
    def max_reconstruction_error(self) -> float:
        return float(self.reconstruction_error.max())

    @property
    def layer_head_logits(self) -> Float[Tensor, "example layer head label"]:
        """Every head's direct logits as a `layer x head` grid: `[:, 12, 4]` is `L12H4` (`layer_head_logits`)."""
        return layer_head_logits(self.component_logits, self.component_names, self.n_layers, self.n_heads)

    @property
    def layer_mlp_logits(self) -> Float[Tensor, "example layer label"]:
        """Every MLP's direct logits by layer: `[:, 12]` is `MLP12` (refused for a run with split experts)."""
        return layer_mlp_logits(self.component_logits, self.component_names, self.n_layers, self.n_heads)

    def top_components(self, k: int = 5) -> list[tuple[str, float]]:
        accuracy = self.component_accuracy
        order = torch.argsort(accuracy, descending=True, stable=True)[:k]
        return [(self.component_names[i], float(accuracy[i])) for i in order]

    def component_index(self, name: str) -> int:
        try:
            return self.component_names.index(name)
        except ValueError:
            raise PartsError(f"no component {name!r}: names look like L0H0 or MLP0") from None

    # -- description ---------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        p = self.prompts
        return {
            "format_version": FORMAT_VERSION,
            "parts_version": __version__,
            "model": self.model,
            "task": p.task,
            "template": p.template,
            "seed": p.seed,
            "shots": p.shots,
            "split": p.split,
            "n_examples": self.n_examples,
            "limit": p.limit,  # asked for: more than n_examples when the split held fewer
            "label_names": list(p.label_names),
            "label_words": list(p.label_words),
            "label_token_ids": self.label_token_ids,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "chance": self.chance,
            "full_accuracy": self.full_accuracy,
            "component_names": self.component_names,
            "component_accuracy": [round(float(a), 6) for a in self.component_accuracy],
            "max_reconstruction_error": self.max_reconstruction_error,
            "demonstrations": list(p.demonstrations),
            "info": self.info,
            **({"fingerprint": self.fingerprint} if self.fingerprint is not None else {}),
        }

    def describe(self, k: int = 5) -> str:
        p = self.prompts
        best = ", ".join(f"{name} {acc:.1%}" for name, acc in self.top_components(k))
        return "\n".join(
            [
                f"{self.model} | {p.task} template {p.template} seed {p.seed} | {p.shots}-shot | "
                f"{p.split} n={self.n_examples}" + (f" (--limit {p.limit}: the split holds only these)" if p.capped else ""),
                f"full model accuracy  {self.full_accuracy:.1%}   (majority class {self.chance:.1%})",
                f"best components      {best}",
                f"components           {component_summary(self.component_names)}",
                f"reconstruction error {self.max_reconstruction_error:.2e} (max |sum of parts - model logit|)",
            ]
        )

    def __repr__(self) -> str:
        p = self.prompts
        return (
            f"DecompositionRun({self.model!r}, task={p.task!r}, template={p.template}, seed={p.seed}, "
            f"split={p.split!r}, n={self.n_examples}, full_accuracy={self.full_accuracy:.3f})"
        )

    # -- persistence ------------------------------------------------------------------------
    def save(self, path: str | Path, check: Callable[[Path], None] | None = None) -> Path:
        """Write the run to the folder `path` atomically (a staging folder renamed into place).

        An old run at `path` is replaced (moved aside, removed once the new one stands); a folder holding
        anything parts did not write is refused (`parts.io`). Which runs to redo is the caller's choice:
        `check(path)` may refuse (raise) under the lock that makes it one step with the rename, so a run
        another process saved meanwhile is judged as if it had been there from the start.
        """
        with io.write_folder(path, legacy=is_legacy_run, kind=RUN_KIND, check=check) as staging:
            tensors = {name: getattr(self, name).contiguous().cpu() for name in _TENSOR_NAMES}
            if self.final_residual is not None:
                tensors[FINAL_RESIDUAL] = self.final_residual.contiguous().cpu()
            save_file(tensors, str(staging / TENSORS))
            p = self.prompts
            token_ids = self.token_ids if self.token_ids is not None else [None] * len(p.prompts)
            rows = [json.dumps({"index": index, "label": label, "prompt": prompt,
                                **({"token_ids": tokens} if tokens is not None else {})}) + "\n"
                    for index, prompt, label, tokens in zip(p.example_indices, p.prompts, p.labels, token_ids, strict=True)]
            (staging / PROMPTS).write_text("".join(rows))
            (staging / SUMMARY).write_text(json.dumps(self.summary(), indent=1))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> DecompositionRun:
        folder = Path(path)
        summary_file = folder / SUMMARY
        if not summary_file.is_file():
            raise PartsError(f"{folder} is not a finished run (no {SUMMARY}): rerun it")
        try:
            summary = json.loads(summary_file.read_text())
        except ValueError as err:
            raise PartsError(f"{summary_file} is not valid JSON ({err}): delete {folder} and rerun") from err
        if not isinstance(summary, dict) or summary.get("format_version") != FORMAT_VERSION:
            version = summary.get("format_version") if isinstance(summary, dict) else None
            raise PartsError(
                f"{folder} was written in run format {version!r} "
                f"(this parts reads {FORMAT_VERSION}): delete it and rerun it with this version"
            )
        try:
            tensors = load_file(str(folder / TENSORS))
            rows = [json.loads(line) for line in (folder / PROMPTS).read_text().splitlines() if line]
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for a torn file
            raise PartsError(f"{folder} is damaged ({err}): delete it and rerun") from err
        _check_consistent(folder, summary, tensors, rows)
        prompts = PromptSet(
            task=summary["task"],
            template=summary["template"],
            seed=summary["seed"],
            shots=summary["shots"],
            split=summary["split"],
            label_names=tuple(summary["label_names"]),
            label_words=tuple(summary["label_words"]),
            demonstrations=tuple(summary["demonstrations"]),
            example_indices=tuple(r["index"] for r in rows),
            prompts=tuple(r["prompt"] for r in rows),
            labels=tuple(r["label"] for r in rows),
            limit=summary.get("limit"),
        )
        return cls(
            summary["model"], prompts, summary["label_token_ids"], summary["n_layers"], summary["n_heads"],
            summary["component_names"], tensors["component_logits"], tensors["remainder"], tensors["model_logits"],
            summary.get("info", {}),
            [r["token_ids"] for r in rows] if rows and all("token_ids" in r for r in rows) else None,
            summary.get("fingerprint"), tensors.get(FINAL_RESIDUAL),
        )


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    """Both absent, or bit-identical."""
    return a is None and b is None or a is not None and b is not None and torch.equal(a, b)


_SUMMARY_KEYS = ("model", "task", "template", "seed", "shots", "split", "n_examples", "label_names", "label_words",
                 "label_token_ids", "n_layers", "n_heads", "component_names", "demonstrations")


def _check_consistent(folder: Path, summary: dict[str, Any], tensors: dict[str, Tensor], rows: list[Any]) -> None:
    """A run folder whose files disagree (hand-edited, or mixed from two runs) is an error, not a run."""
    missing = [k for k in _SUMMARY_KEYS if k not in summary] + [n for n in _TENSOR_NAMES if n not in tensors]
    if missing:
        raise PartsError(f"{folder} is damaged (missing {', '.join(missing)}): delete it and rerun")
    expected = {
        "component_logits": (summary["n_examples"], len(summary["component_names"]), len(summary["label_names"])),
        "remainder": (summary["n_examples"], len(summary["label_names"])),
        "model_logits": (summary["n_examples"], len(summary["label_names"])),
    }
    if FINAL_RESIDUAL in tensors:
        expected[FINAL_RESIDUAL] = (summary["n_examples"], *tensors[FINAL_RESIDUAL].shape[1:])
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape or (name == FINAL_RESIDUAL and len(shape) != 2):
            raise PartsError(
                f"{folder} is damaged ({name} has shape {tuple(tensors[name].shape)}, the summary says {shape}): "
                "delete it and rerun"
            )
    if not all(isinstance(row, dict) and {"index", "label", "prompt"} <= row.keys() for row in rows):
        raise PartsError(f"{folder} is damaged ({PROMPTS} lines lack index, label or prompt): delete it and rerun")
    if len(rows) != summary["n_examples"]:
        raise PartsError(
            f"{folder} is damaged ({PROMPTS} has {len(rows)} examples, the summary says {summary['n_examples']}): "
            "delete it and rerun"
        )


def is_saved_run(path: str | Path) -> bool:
    """Whether parts saved a run in the folder `path` (its summary.json is parts'; whether the run loads is
    another question). A user's folder that happens to hold a summary.json is not one: it is never skipped as
    finished, nor replaced."""
    summary = Path(path) / SUMMARY
    return summary.is_file() and io.is_parts_file(summary, is_legacy_run)


def recorded_fingerprint(path: str | Path) -> dict[str, Any] | None:
    """The fingerprint a saved run records (`parts.decomposition.fingerprint`), None for a run saved before parts
    recorded one; a summary that cannot be read is a PartsError."""
    summary_file = Path(path) / SUMMARY
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, ValueError) as err:
        raise PartsError(f"{summary_file} cannot be read ({err}): delete {path} and rerun") from err
    fingerprint = summary.get("fingerprint") if isinstance(summary, dict) else None
    return fingerprint if isinstance(fingerprint, dict) else None


def check_replaceable(path: str | Path, prompts: PromptSet, model: str | None = None, overwrite: bool = False) -> None:
    """Before a run of `prompts` (and `model`, if known) is saved at `path`: raise unless that is safe.

    Refused: a folder holding anything parts did not write, a file, a broken link (`parts.io`), and without
    `overwrite` a finished run of other settings. A run of the same settings, or a damaged one, may be replaced.
    """
    io.check_folder(path, legacy=is_legacy_run, kind=RUN_KIND)
    try:
        summary = json.loads((Path(path) / SUMMARY).read_text())
    except (OSError, ValueError):
        return  # nothing there, or a damaged run
    if not isinstance(summary, dict) or overwrite:
        return
    wanted = {"model": model, "task": prompts.task, "template": prompts.template, "seed": prompts.seed,
              "shots": prompts.shots, "split": prompts.split, "n_examples": len(prompts)}
    differs = [f"{key} {summary.get(key)!r} (now {value!r})" for key, value in wanted.items()
               if value is not None and summary.get(key) != value]
    if differs:
        raise PartsError(f"{path} holds a run of other settings ({', '.join(differs)}): "
                         "choose another --out, or pass --overwrite to replace it")


def is_legacy_run(path: Path) -> bool:
    """A run folder (or a file in one) written before parts marked its folders: a `summary.json` with a run
    format version and nothing but .json, .jsonl and .safetensors files beside it."""
    folder = path if path.is_dir() else path.parent
    try:
        summary = json.loads((folder / SUMMARY).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(summary, dict) and "format_version" in summary
            and all(e.is_file() and e.suffix in (".json", ".jsonl", ".safetensors") or io.is_bookkeeping(e.name)
                    for e in folder.iterdir()))


# -- finding saved runs --------------------------------------------------------------------------
def find_runs(root: str | Path) -> list[Path]:
    """Every finished run folder under `root` (itself included), sorted; staging folders skipped."""
    root = Path(root)
    if not root.is_dir():
        raise PartsError(f"{root} is not a folder: give the --out folder of a sweep or a run folder")
    found = [p.parent for p in root.rglob(SUMMARY)]
    return sorted(p for p in found if not any(part.startswith(".") for part in p.relative_to(root).parts))


@dataclass(frozen=True)
class SavedRun:
    """A run and the folder it was loaded from (weights and cached logits are saved beside it)."""

    path: Path
    run: DecompositionRun


def load_saved_runs(root: str | Path) -> list[SavedRun]:
    """Every finished run under `root` with its folder, in `find_runs` order."""
    paths = find_runs(root)
    if not paths:
        raise PartsError(f"no finished runs under {root}: run `parts sweep --out {root}` or `parts decompose` first")
    return [SavedRun(path, DecompositionRun.load(path)) for path in paths]


def load_runs(root: str | Path) -> list[DecompositionRun]:
    """Every finished run under `root`, in `find_runs` order."""
    return [saved.run for saved in load_saved_runs(root)]
