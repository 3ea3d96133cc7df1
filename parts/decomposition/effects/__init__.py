"""Total (causal) effects: what each component changes in the model's own label-word logits when ablated.

A direct effect (parts.decomposition.decompose) is what a component writes into the final residual
stream, read through the frozen final norm. Its total effect also counts how every later component
responds to it:

    total_effect[example, component, label] = clean_logits[example, label] - ablated_logits[example, component, label]

with `ablated_logits` the model's label-word logits (pre-soft-cap, as for direct effects) after the
component's output at the last prompt token is replaced by

- `mean` (the default): its mean output at the same position over the run's examples. "Same position"
  means the same distance from the end of the prompt; for `--positions last` that is the last token,
  the position every direct effect is read at;
- `zero`: nothing (the component removed);
- `resample`: its output on another example of the run (a seeded derangement of the examples).

Ablating at the last position only leaves every earlier position's keys and values as the clean
run's, so only the last token is recomputed, from the component's layer upward, with the clean
keys and values of the prompt before it (exact; tested against a full rerun with a hook). The
ablations of one layer run together: every component of the layer (and every example of a batch)
is one row of a single forward over the last token, started at that layer from the clean residual
stream. Where the model's attention allows it, the rows are positions of one sequence with a mask
that lets each see only the clean prompt and itself (no copies of the keys and values); otherwise
(sliding windows, ALiBi) they are rows of a batch with the prompt's keys and values repeated, every
layer recomputed. Which one ran is checked on the first batch (the first two layers' ablations): rows
that ablate nothing must give the clean logits, or the model is refused.

The ablated pass recomputes the final norm from the ablated residual, so a total effect includes the
norm's response. `freeze_norm` keeps the clean scales of the norms a direct effect reads through
(the final norm, and the component's own post-norm in Gemma-2/3 and OLMo-2), so total minus direct
is what later components do: with zero ablation the last layer's MLP then has total effect equal to
its direct effect.

The stages, one module each: `common` (settings, targets, checks), `runner` (batches, the clean pass,
replacements), `exact` (the last-position ablation), `attribution` (attribution patching) and
`all_positions` (`--positions all`).
"""

from __future__ import annotations

from transformer_lens.model_bridge import TransformerBridge

from parts.decomposition.effect_data import TotalEffects
from parts.decomposition.effects.all_positions import ALL_POSITIONS_LIMIT, AllPositions
from parts.decomposition.effects.attribution import AttributionPatching
from parts.decomposition.effects.common import (
    ABLATIONS,
    METHODS,
    POSITIONS,
    RESAMPLE_SEED,
    check_clean_logits,
    check_effects_match,
    check_run_matches,
    resample_order,
    run_digest,
)
from parts.decomposition.effects.exact import ExactLastPosition
from parts.decomposition.runs import DecompositionRun
from parts.errors import PartsError

__all__ = ["ABLATIONS", "ALL_POSITIONS_LIMIT", "METHODS", "POSITIONS", "RESAMPLE_SEED", "TotalEffectRunner",
           "check_clean_logits", "check_effects_match", "check_run_matches", "resample_order", "run_digest",
           "total_effects"]


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
