"""How the model is run: one options object that every model-running command and function takes.

`RunOptions` holds everything that says how (not what) to decompose: the engine, prefix reuse,
the weights' dtype and device, the batch size, where the data is, whether to show progress. The
command line builds it in one place (`parts.cli.common.run_options`), so no command can drop an
option; the library passes it on whole (`parts.experiments.runner`, `parts.experiments.driver`).

Options that change the numbers (dtype, engine, prefix reuse) are part of a run's key: `variant`
is appended to the model's folder name under an output root (`SmolLM2-135M-Instruct+bfloat16`),
so a bfloat16 sweep never reuses a float32 run. The defaults add nothing, so folders written
before options were keyed still resolve. Batch size, device, data folder and progress are not in
the key: they change the numbers by float32 rounding at most (padding), or not at all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from parts.errors import PartsError
from parts.model.engines import ENGINES
from parts.model.loading import DTYPES
from parts.model.preflight import check_device


def dtype_name(dtype: str | torch.dtype) -> str:
    """The canonical name of a weights' dtype ("bf16" -> "bfloat16"); unknown names are a PartsError."""
    resolved = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype):
        raise PartsError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(DTYPES))}")
    return str(resolved).replace("torch.", "")


@dataclass(frozen=True)
class RunOptions:
    """How to run the model for every setting of a command (not which settings: those are the plan).

    engine: "hf" (the model's own modules, default) or "bridge" (TransformerLens's run_with_cache).
    prefix_reuse: compute the shared demonstrations' keys and values once per prompt set.
    dtype: the weights' dtype ("float32", "bfloat16", "float16"; aliases such as "bf16" accepted).
    device: "cpu", "cuda", "cuda:1", "auto" (spread over every visible GPU with Hugging Face's
        `device_map`), or None (CUDA when available).
    batch_size: prompts per forward pass, or "auto" / None (chosen from free memory).
    data_dir: the folder with `<task>/{train,test}.jsonl` (None: $PARTS_DATA_DIR, else the hub).
    progress: show progress bars.
    split_experts: mixture-of-experts models: one component per expert (`MLP{layer}E{expert}`).
    allow_inexact: warn instead of failing when the components do not sum to the model's logits.
    recompute_changed: recompute a finished run or results row made otherwise (its fingerprint differs from
        these settings', or it predates fingerprints) instead of refusing (`parts.decomposition.fingerprint`).
    """

    engine: str = "hf"
    prefix_reuse: bool = True
    dtype: str = "float32"
    device: str | None = None
    batch_size: int | str | None = 8
    data_dir: str | Path | None = None
    progress: bool = True
    split_experts: bool = False
    allow_inexact: bool = False
    recompute_changed: bool = False

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise PartsError(f"unknown engine {self.engine!r}: use one of {', '.join(ENGINES)}")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        check_device(self.device, here=False)  # a known kind; whether this machine has it is `load_model`'s check
        if isinstance(self.batch_size, int) and self.batch_size < 1:
            raise PartsError(f"batch size {self.batch_size} must be at least 1 (or auto)")

    @property
    def variant(self) -> str:
        """What a run's folder name gains for options that change the numbers: "" for the defaults."""
        changed = []
        if self.dtype != "float32":
            changed.append(self.dtype)
        if self.engine != "hf":
            changed.append(f"{self.engine}-engine")
        if not self.prefix_reuse:
            changed.append("no-prefix-reuse")
        if self.split_experts:  # other components, so another run
            changed.append("split-experts")
        return "".join(f"+{c}" for c in changed)

    def replace(self, **changes: Any) -> RunOptions:
        """A copy with some options changed (unknown names are a PartsError)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise PartsError(f"unknown run option(s) {', '.join(unknown)}: "
                             f"use {', '.join(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes)

    @staticmethod
    def split(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(option overrides, everything else) of a keyword dictionary mixing both."""
        names = {f.name for f in dataclasses.fields(RunOptions)}
        return ({k: v for k, v in settings.items() if k in names}, {k: v for k, v in settings.items() if k not in names})


def resolve(options: RunOptions | None = None, **overrides: Any) -> RunOptions:
    """`options` (default: the defaults) with `overrides` applied: the keyword shorthand of the Python API."""
    return (options or RunOptions()).replace(**overrides) if overrides else (options or RunOptions())
