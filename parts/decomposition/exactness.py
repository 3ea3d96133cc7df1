"""How exact a decomposition must be: the one home of the reconstruction tolerance and its check.

The sum of every component's logits plus the remainder must equal the model's own label-word
logits. The error allowed is relative to the logit scale of each example (its largest label-word
logit in absolute value, at least 1) and set by the dtype the model computes in:

- float32: 1e-3. Exact decompositions measure below 1e-5 (tests/test_families.py); a readout
  that misses a norm, a multiplier or a bias is off by 1e-2 or more.
- float16: 1e-2, bfloat16: 5e-2. The model's activations and logits carry about 3 (bf16) or
  4 (fp16) significant digits, and the decomposition is computed in float32 from them.

A larger error means the readout does not describe this model: the run stops with one line naming
the worst example, unless the user asked to keep going (`allow_inexact`), which warns instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from parts.decomposition.runs import reconstruction_error
from parts.errors import PartsError

RECONSTRUCTION_TOLERANCE = {"float32": 1e-3, "float64": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}


def reconstruction_tolerance(dtype: torch.dtype | str) -> float:
    """The relative reconstruction error allowed for a model computing in `dtype`."""
    name = str(dtype).replace("torch.", "")
    if name not in RECONSTRUCTION_TOLERANCE:
        raise PartsError(f"no reconstruction tolerance for dtype {name}: use one of {', '.join(RECONSTRUCTION_TOLERANCE)}")
    return RECONSTRUCTION_TOLERANCE[name]


def relative_reconstruction_error(
    component_logits: Float[Tensor, "example component label"],
    remainder: Float[Tensor, "example label"],
    model_logits: Float[Tensor, "example label"],
) -> Float[Tensor, " example"]:
    """|sum of components + remainder - model logit|, largest over label words, over the example's logit scale."""
    scale = model_logits.abs().amax(-1).clamp(min=1.0)
    return reconstruction_error(component_logits, remainder, model_logits) / scale


def check_reconstruction(
    component_logits: Float[Tensor, "example component label"],
    remainder: Float[Tensor, "example label"],
    model_logits: Float[Tensor, "example label"],
    dtype: torch.dtype | str,
    allow_inexact: bool = False,
    example_names: Sequence[str] | None = None,
) -> float:
    """Fail (or, with `allow_inexact`, warn) when the decomposition does not sum to the model's logits.

    Returns the largest relative error. Non-finite errors are left to the caller's finiteness check.
    """
    relative = relative_reconstruction_error(component_logits, remainder, model_logits)
    finite = torch.isfinite(relative)
    if not finite.any():
        return float("nan")
    worst = int(torch.where(finite, relative, torch.full_like(relative, -1.0)).argmax())
    worst_error = float(relative[worst])
    tolerance = reconstruction_tolerance(dtype)
    if worst_error <= tolerance:
        return worst_error
    name = example_names[worst] if example_names is not None else f"prompt {worst}"
    message = (
        f"the components do not sum to the model's logits: {name} is off by {worst_error:.2e} of its logit scale "
        f"(tolerance {tolerance:g} in {str(dtype).replace('torch.', '')}); parts cannot split this model exactly "
        "(please report its family); --allow-inexact keeps going with this warning"
    )
    if not allow_inexact:
        raise PartsError(message)
    warnings.warn(message, stacklevel=2)
    return worst_error
