"""Component reweighting (the paper's COMPRW): one learned weight per component.

Given the component logits `g[example, component, label]` of a few labelled examples, learn
`w[component]` (initialised to 1) and predict

    argmax_label  sum_component clip(w, 0, 1) * g[example, component, label]

The recipe follows the paper's public code (terarachang/LLMDecomp, `train_components.py`):
loss = cross-entropy + l1 * ||w||_1 (on the raw, unclipped w), full-batch SGD with learning rate
0.05, at most 2000 epochs (one epoch = one update), stopping early with `stopped_because`

- `"perfect"`: the training accuracy, checked right after the 1st update and then every
  `check_every` (100) updates (after updates 1, 101, 201, ...), is 100%;
- `"plateau"`: the cross-entropy alone (without the L1 term; measured at every epoch on the
  weights before that epoch's update) was not lower than the best seen so far `patience` (3)
  times in total (not necessarily in a row: the count never resets);
- `"max_epochs"`: neither happened.

The L1 term shrinks every weight, so the cross-entropy typically stops improving after a few
hundred epochs and "plateau" ends most runs. The weights after the last update are returned.

Signed CompRW (`signed=True`, beyond the paper) is the same recipe with every weight clipped to [-1, 1]
instead of [0, 1], so a component that is reliably wrong can be flipped rather than only switched off.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from parts import io
from parts.decomposition.runs import is_legacy_run
from parts.errors import PartsError

LEARNING_RATE = 0.05
L1_PENALTY = 0.01  # the public code's default (the paper's text says 0.1)
MAX_EPOCHS = 2000
CHECK_EVERY = 100
PATIENCE = 3


@dataclass
class ReweightResult:
    """Learned weights (raw; predictions clip them to [0, 1]) and how training ended."""

    weights: Float[Tensor, " component"]
    epochs: int
    stopped_because: str  # "perfect", "plateau" or "max_epochs"
    train_accuracy: float
    losses: list[float] = field(default_factory=list)  # cross-entropy at every epoch, before its update

    @property
    def clipped(self) -> Float[Tensor, " component"]:
        return self.weights.clamp(0.0, 1.0)


def combine(weights: Float[Tensor, " component"], component_logits: Float[Tensor, "example component label"],
            clip: bool = True, signed: bool = False) -> Float[Tensor, "example label"]:
    """The reweighted logits: sum over components of clip(w, 0, 1) * g (clip(w, -1, 1) with `signed`; w itself with
    `clip=False`)."""
    used = weights.clamp(-1.0 if signed else 0.0, 1.0) if clip else weights
    return einops.einsum(used, component_logits, "component, example component label -> example label")


def predict(weights: Float[Tensor, " component"], component_logits: Float[Tensor, "example component label"],
            clip: bool = True, signed: bool = False) -> Int[Tensor, " example"]:
    """Each example's label under the reweighted sum (ties go to the lower label index)."""
    return combine(weights, component_logits, clip, signed).argmax(-1)


def accuracy(weights: Float[Tensor, " component"], component_logits: Float[Tensor, "example component label"],
             labels: Int[Tensor, " example"], clip: bool = True, signed: bool = False) -> float:
    """The share of examples `predict` gets right with these weights."""
    return float((predict(weights, component_logits, clip, signed) == labels).float().mean())


def _check_inputs(component_logits: Tensor, labels: Tensor) -> None:
    if component_logits.ndim != 3:
        raise PartsError(f"component logits must be [example component label], got shape {tuple(component_logits.shape)}")
    if len(labels) != len(component_logits) or len(labels) == 0:
        raise PartsError(
            f"{len(labels)} labels for {len(component_logits)} examples: give one label per training example"
        )
    n_labels = component_logits.shape[-1]
    if int(labels.min()) < 0 or int(labels.max()) >= n_labels:
        raise PartsError(f"labels must lie in 0..{n_labels - 1}, got {sorted(set(labels.tolist()))}")


@contextmanager
def _one_thread() -> Iterator[None]:
    """Tensors this small gain nothing from intra-op threads, and on a busy machine their
    synchronisation makes each step tens of times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_weights(
    component_logits: Float[Tensor, "example component label"],
    labels: Int[Tensor, " example"],
    learning_rate: float = LEARNING_RATE,
    l1_penalty: float = L1_PENALTY,
    max_epochs: int = MAX_EPOCHS,
    check_every: int = CHECK_EVERY,
    patience: int = PATIENCE,
    init: float = 1.0,
    clip: bool = True,
    signed: bool = False,
) -> ReweightResult:
    """Learn one weight per component on labelled examples (the recipe in the module docstring; `signed`: clipped to
    [-1, 1] instead of [0, 1])."""
    _check_inputs(component_logits, labels)
    logits = component_logits.detach().float()
    with _one_thread():
        return descend(lambda weights: combine(weights, logits, clip, signed), logits.shape[1], labels.long().to(logits.device),
                       learning_rate, l1_penalty, max_epochs, check_every, patience, init, logits.device)


def descend(
    logits_of: Callable[[Float[Tensor, " component"]], Float[Tensor, "example label"]],
    n_weights: int,
    labels: Int[Tensor, " example"],
    learning_rate: float = LEARNING_RATE,
    l1_penalty: float = L1_PENALTY,
    max_epochs: int = MAX_EPOCHS,
    check_every: int = CHECK_EVERY,
    patience: int = PATIENCE,
    init: float = 1.0,
    device: torch.device | str = "cpu",
) -> ReweightResult:
    """The recipe's descent (module docstring) for any differentiable `logits_of(weights)`: the labelled
    examples' label logits under raw weights `w` (CompRW: the clipped weighted sum of component logits;
    the in-forward gates of `parts.reweighting.gates`: the gated model's own logits)."""
    if max_epochs < 1 or check_every < 1 or patience < 1 or learning_rate <= 0:
        raise PartsError("max_epochs, check_every, patience and learning_rate must all be positive")
    weights = torch.full((n_weights,), float(init), device=device, requires_grad=True)
    best_loss = float("inf")
    failures = 0
    losses: list[float] = []
    stopped_because = "max_epochs"
    epoch = 0
    with torch.enable_grad():
        for epoch in range(1, max_epochs + 1):
            classification = F.cross_entropy(logits_of(weights), labels)
            (gradient,) = torch.autograd.grad(classification + l1_penalty * weights.abs().sum(), weights)
            with torch.no_grad():  # plain SGD, as torch.optim.SGD without momentum (whose first use costs seconds)
                weights -= learning_rate * gradient
            losses.append(float(classification.detach()))
            if (epoch - 1) % check_every == 0 and _accuracy_of(logits_of, weights, labels) == 1.0:
                stopped_because = "perfect"
                break
            if losses[-1] < best_loss:
                best_loss = losses[-1]
            else:
                failures += 1
            if failures >= patience:
                stopped_because = "plateau"
                break
    final = weights.detach()
    return ReweightResult(final, epoch, stopped_because, _accuracy_of(logits_of, final, labels), losses)


def _accuracy_of(logits_of: Callable[[Tensor], Tensor], weights: Tensor, labels: Tensor) -> float:
    with torch.no_grad():
        return float((logits_of(weights.detach()).argmax(-1) == labels).float().mean())


# -- Saved weights -----------------------------------------------------------------------------
def weights_file(run_dir: str | Path, labels: int | str = 24) -> Path:
    """Where the weights learned for a test run are kept: `reweight-labels{labels}.safetensors`
    (`labels="oracle"` for the weights trained on the test set itself)."""
    return Path(run_dir) / f"reweight-labels{labels}.safetensors"


METADATA_KEY = "parts"


def save_weights(path: str | Path, component_names: list[str], result: ReweightResult, **info: object) -> Path:
    """Write weights and how they were trained, atomically (`parts.io`)."""
    path = Path(path)
    if len(component_names) != len(result.weights):
        raise ValueError(f"{len(component_names)} names for {len(result.weights)} weights")
    record = {
        "component_names": component_names,
        "epochs": result.epochs,
        "stopped_because": result.stopped_because,
        "train_accuracy": result.train_accuracy,
        "losses": [round(x, 6) for x in result.losses],
        "info": json.loads(json.dumps(info, default=str)),
    }
    # One key: safetensors writes several metadata keys in a random order, so equal weights gave unequal bytes.
    metadata = {METADATA_KEY: json.dumps(record, sort_keys=True)}
    weights = {"weights": result.weights.detach().contiguous().cpu()}
    return io.write_file(path, lambda staging: save_file(weights, str(staging), metadata=metadata), legacy=is_legacy_run)


def read_weights(path: str | Path) -> tuple[list[str], ReweightResult, dict[str, object]]:
    """Component names, the training result and its recorded settings from a weights file."""
    path = Path(path)
    if not path.is_file():
        raise PartsError(f"no learned weights at {path}: run `parts evaluate` for this task, template and seed first")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        weights = handle.get_tensor("weights")
    if METADATA_KEY in metadata:
        record = json.loads(metadata[METADATA_KEY])
    else:  # files written before the single key: every value a string
        record = {key: json.loads(metadata[key]) for key in ("component_names", "losses", "info") if key in metadata}
        record |= {"epochs": int(metadata["epochs"]), "stopped_because": metadata["stopped_because"],
                   "train_accuracy": float(metadata["train_accuracy"])}
    result = ReweightResult(
        weights, int(record["epochs"]), record["stopped_because"], float(record["train_accuracy"]), record.get("losses", []),
    )
    return record["component_names"], result, record.get("info", {})


def load_weights(run_dir: str | Path, labels: int | str = 24) -> tuple[list[str], Tensor]:
    """Component names and the learned (raw) weights saved with a test run by `parts evaluate`.

    `run_dir` is the test run's folder (`parts.experiments.runner.run_dir(..., split="test")`); every
    (task, template, seed) has its own. Clip to [0, 1] for the weights predictions use.
    """
    names, result, _ = read_weights(weights_file(run_dir, labels))
    return names, result.weights
