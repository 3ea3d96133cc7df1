"""The entry point of total effects: `total_effects`, and the runner that puts the stages together."""

from __future__ import annotations

from transformer_lens.model_bridge import TransformerBridge

from parts.decomposition.effect_data import TotalEffects
from parts.decomposition.effects.all_positions import AllPositions
from parts.decomposition.effects.attribution import AttributionPatching
from parts.decomposition.effects.common import METHODS, POSITIONS
from parts.decomposition.effects.exact import ExactLastPosition
from parts.decomposition.runs import DecompositionRun
from parts.errors import PartsError


class TotalEffectRunner(ExactLastPosition, AttributionPatching, AllPositions):
    """Computes total effects of one run's components with a loaded model (`total_effects` is the entry point):
    `runner()` exact at the last position, `runner.attribution()`, `runner.all_positions(yes)`."""


def total_effects(model: TransformerBridge, run: DecompositionRun, ablation: str = "mean", positions: str = "last",
                  method: str = "exact", freeze_norm: bool = False, batch_size: int = 4, progress: bool = False,
                  yes: bool = False) -> TotalEffects:
    """Total effects of every component of `run` on its label-word logits (see the module docstring).

    `ablation`: mean (default), zero or resample. `positions`: last (the last token only; exact and cheap) or
    all (every position, one full run per component: refused beyond `ALL_POSITIONS_LIMIT` component-examples
    unless `yes`). `method`: exact, or attribution (gradient times the ablation's change: one forward and one
    backward pass per label and batch). `freeze_norm`: keep the clean final-norm (and the component's
    post-norm) scale.
    """
    if positions not in POSITIONS:
        raise PartsError(f"unknown positions {positions!r}: use one of {', '.join(POSITIONS)}")
    if method not in METHODS:
        raise PartsError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if positions == "all" and method == "attribution":
        raise PartsError("--method attribution is for --positions last: drop one of them")
    runner = TotalEffectRunner(model, run, ablation, freeze_norm, batch_size, progress)
    if positions == "all":
        return runner.all_positions(yes)
    if method == "attribution":
        return runner.attribution()
    return runner()
