"""A run's total effects as plain data, and its file `effects.safetensors` in the run folder.

What `parts effects` (parts.decomposition.effects) computes and `parts analyze` reads: per example, component and
label, the clean minus the ablated label-word logits, with how they were computed (the ablation, positions,
method, model and timing) in the file's metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import einops
import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from parts import io
from parts.errors import PartsError

EFFECTS = "effects.safetensors"
EFFECTS_FORMAT = 1


@dataclass(eq=False)
class TotalEffects:
    """Total effects of every component of one run, and how they were computed (plain data)."""

    total_effects: Float[Tensor, "example component label"]  # clean - ablated label-word logits
    clean_logits: Float[Tensor, "example label"]  # the model's own (pre-soft-cap) label-word logits
    component_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)  # ablation, positions, method, freeze_norm, model, timing...

    @property
    def predictions(self) -> Int[Tensor, "example component"]:
        """Each component's total-effect classifier: the argmax over labels (ties: the lower label)."""
        return self.total_effects.argmax(-1)

    def accuracy(self, labels: Int[Tensor, " example"]) -> Float[Tensor, " component"]:
        """Per component, the share of examples whose total-effect argmax is the gold label."""
        return (self.predictions == einops.rearrange(labels, "example -> example 1")).float().mean(0)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TotalEffects):
            return NotImplemented
        return (self.component_names == other.component_names and self.info == other.info
                and torch.equal(self.total_effects, other.total_effects)
                and torch.equal(self.clean_logits, other.clean_logits))

    def save(self, run_folder: str | Path) -> Path:
        """Write `effects.safetensors` into a run folder (atomically, through parts.io)."""
        path = Path(run_folder) / EFFECTS
        tensors = {"total_effects": self.total_effects.contiguous().cpu(), "clean_logits": self.clean_logits.contiguous().cpu()}
        metadata = {"format_version": str(EFFECTS_FORMAT), "component_names": json.dumps(self.component_names),
                    "info": json.dumps(self.info)}
        io.write_file(path, lambda staging: save_file(tensors, str(staging), metadata=metadata))
        return path

    @classmethod
    def load(cls, run_folder: str | Path) -> TotalEffects:
        path = Path(run_folder) / EFFECTS
        if not path.is_file():
            raise PartsError(f"{run_folder} has no total effects ({EFFECTS}): run `parts effects {run_folder}` first")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in ("total_effects", "clean_logits")}
            names, info = json.loads(metadata["component_names"]), json.loads(metadata["info"])
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for a torn file
            raise PartsError(f"{path} is damaged ({err}): delete it and rerun `parts effects`") from err
        if metadata.get("format_version") != str(EFFECTS_FORMAT):
            raise PartsError(f"{path} is in effects format {metadata.get('format_version')!r} (this parts reads "
                             f"{EFFECTS_FORMAT}): rerun `parts effects`")
        return cls(tensors["total_effects"], tensors["clean_logits"], names, info)


def has_effects(run_folder: str | Path) -> bool:
    """Whether `parts effects` has written total effects into the run folder."""
    return (Path(run_folder) / EFFECTS).is_file()
