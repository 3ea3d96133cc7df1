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

from parts.decomposition.effects.all_positions import ALL_POSITIONS_LIMIT
from parts.decomposition.effects.api import TotalEffectRunner, total_effects
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

__all__ = ["ABLATIONS", "ALL_POSITIONS_LIMIT", "METHODS", "POSITIONS", "RESAMPLE_SEED", "TotalEffectRunner",
           "check_clean_logits", "check_effects_match", "check_run_matches", "resample_order", "run_digest",
           "total_effects"]
