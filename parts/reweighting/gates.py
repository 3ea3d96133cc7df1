"""In-forward component gates: CompRW's weights applied inside the model's forward pass (beyond the paper).

CompRW (`parts.reweighting.reweight`) reweights each component's *direct* contribution after the fact:
later layers still read every component at full strength. Here one scalar gate per head and per MLP
multiplies that component's output inside the forward pass, at the last prompt token only, so every
later layer reads the gated output:

    head (layer, h):  z[last, h]       <- clip(w, 0, 1) * z[last, h]      (its slice of the output projection's input)
    MLP layer:        mlp_out[last]    <- clip(w, 0, 1) * mlp_out[last]

and the prediction is the argmax of the gated forward's own label-word logits (the final norm recomputed,
embeddings and biases included: unlike CompRW, which sums the weighted direct logits alone).

The gates are learned with CompRW's recipe (`reweight.descend`: raw weights initialised to 1, clipped to
[0, 1] in the forward, cross-entropy + L1 on the raw weights, full-batch SGD with the same learning rate,
epochs, early stopping) on the same L - k labelled examples, by backpropagation through the model.
Since only the last token is gated, every earlier position's keys and values are the clean run's: they
are computed once (the shared prefix once for all examples, as for total effects) and each epoch is one
one-token forward and backward over the labelled examples from those cached keys and values.

The one-token forward, its hooks (a head's `z` slice at the output projection's input, the MLP's output)
and the capture at the final norm's input are the total-effect runner's
(`parts.decomposition.effects.runner`). A family whose cached last token does not reproduce the run's logits,
or whose forward refuses a cached last token, is refused in one line; so is a run with split experts
(one gate per MLP).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge

from parts.components import HEAD
from parts.decomposition.effects.common import Batch, StopAtFinalNorm, layer_copies, until_final_norm
from parts.decomposition.effects.runner import RunnerBase
from parts.decomposition.exactness import reconstruction_tolerance
from parts.decomposition.runs import DecompositionRun
from parts.errors import PartsError
from parts.model.readout import FINAL_NORM_IN, z_name
from parts.reweighting.reweight import (
    CHECK_EVERY,
    L1_PENALTY,
    LEARNING_RATE,
    MAX_EPOCHS,
    PATIENCE,
    ReweightResult,
    descend,
)

TRAIN_BATCH = 32  # labelled examples per one-token forward while training (24 - k fit in one)
TEST_BATCH = 8


def gates_file(run_dir: str | Path, labels: int) -> Path:
    """Where the gates learned for a test run are kept: `gates-labels{labels}.safetensors`."""
    return Path(run_dir) / f"gates-labels{labels}.safetensors"


def gated_logits_file(run_dir: str | Path, labels: int) -> Path:
    """Where the test examples' gated label-word logits are kept (so predictions need no model)."""
    return Path(run_dir) / f"gates-labels{labels}-logits.safetensors"


class GatedForward:
    """One run's examples, their clean keys and values before the last token, and the gated last-token forward."""

    def __init__(self, model: TransformerBridge, run: DecompositionRun, batch_size: int = TEST_BATCH,
                 keep: bool = False):
        if run.info.get("split_experts"):
            raise PartsError("in-forward gates take one gate per MLP: use a run decomposed without --split-experts")
        self.runner = RunnerBase(model, run, "zero", batch_size=batch_size, progress=False)
        self.run, self.hf = run, self.runner.hf
        runner = self.runner
        # where each component's gate goes: [layer, head] for heads, [layer] for MLPs
        self.head_at = [(c, t.layer, t.index) for c, t in enumerate(runner.targets) if t.kind == HEAD]
        self.mlp_at = [(c, t.layer) for c, t in enumerate(runner.targets) if t.kind != HEAD]
        runner.settle_batching()
        # Training reruns the same examples every epoch: their caches are kept, as ordinary tensors (a backward
        # pass cannot save inference-mode ones).
        self.kept: list[Batch] | None = None
        if keep:
            self.kept = []
            for batch in runner.batches():
                batch.cache = layer_copies(batch.cache, detach=True)
                self.kept.append(batch)

    def batches(self) -> list[Batch] | Any:
        return self.kept if self.kept is not None else self.runner.batches()

    def grids(self, gates: Float[Tensor, " component"]) -> tuple[Float[Tensor, "layer head"], Float[Tensor, " layer"]]:
        """The clipped gates as a [layer, head] grid and a [layer] vector (1 where the run has no such component)."""
        runner, used = self.runner, gates.clamp(0.0, 1.0)
        heads = torch.ones((runner.n_layers, runner.n_heads), device=gates.device, dtype=gates.dtype)
        mlps = torch.ones(runner.n_layers, device=gates.device, dtype=gates.dtype)
        if self.head_at:
            c, layer, head = (torch.tensor(x, device=gates.device) for x in zip(*self.head_at, strict=True))
            heads = heads.index_put((layer, head), used[c])
        if self.mlp_at:
            c, layer = (torch.tensor(x, device=gates.device) for x in zip(*self.mlp_at, strict=True))
            mlps = mlps.index_put((layer,), used[c])
        return heads, mlps

    def final_in(self, batch: Batch, gates: Float[Tensor, " component"]) -> Float[Tensor, "batch d_model"]:
        """The final norm's input at the last token with every component's output there multiplied by its gate
        (differentiable in `gates` where grad is enabled; float32, or float64 for a float64 model)."""
        runner = self.runner
        heads, mlps = self.grids(gates)
        n = len(batch.rows)
        runner.rows_shape = (n, 1)
        modules = {name: self.hf.get_submodule(path) for name, (path, _) in runner.layout.taps.items()}
        captured: dict[str, Tensor] = {}
        handles = []
        for layer in range(runner.n_layers):
            def gate_z(_m: nn.Module, args: tuple, kwargs: dict, layer: int = layer) -> tuple[tuple, dict]:
                value = args[0] if args else kwargs["hidden_states"]
                z = runner.as_rows(value).reshape(n, 1, runner.n_heads, -1)
                new = (z * heads[layer, None, None, :, None].to(value.dtype)).reshape(value.shape)
                return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

            def gate_mlp(_m: nn.Module, _args: tuple, output: Any, layer: int = layer) -> Any:
                value = output[0] if isinstance(output, tuple) else output
                new = value * mlps[layer].to(value.dtype)
                return (new, *output[1:]) if isinstance(output, tuple) else new
            handles.append(modules[z_name(layer)].register_forward_pre_hook(gate_z, with_kwargs=True))
            handles.append(modules[runner.layout.mlp_out[layer]].register_forward_hook(gate_mlp))

        def capture(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            value = runner.as_rows(args[0] if args else kwargs["hidden_states"])[:, 0]
            captured["final"] = value if value.dtype == torch.float64 else value.float()  # float64 kept: gradient checks
            raise StopAtFinalNorm
        handles.append(self.hf.get_submodule(runner.layout.taps[FINAL_NORM_IN][0]).register_forward_pre_hook(
            capture, with_kwargs=True))
        until_final_norm(lambda: self.hf(
            batch.ids[:, -1:], attention_mask=batch.mask, position_ids=runner.last_positions(batch),
            past_key_values=layer_copies(batch.cache), use_cache=batch.cache is not None, logits_to_keep=1), handles)
        if "final" not in captured:
            raise RuntimeError("the final norm was never reached: the model's forward does not end in its final norm")
        return captured["final"]

    def logits(self, gates: Float[Tensor, " component"]) -> Float[Tensor, "example label"]:
        """Every example's gated label-word logits (pre-soft-cap), in the run's order."""
        out: list[Tensor] = []
        rows: list[int] = []
        for batch in self.batches():
            out.append(self.runner.label_logits(self.final_in(batch, gates).float()))
            rows += batch.rows
        logits = torch.cat(out)
        return logits[torch.argsort(torch.tensor(rows, device=logits.device))]

    def check_exact(self) -> Float[Tensor, "example label"]:
        """The ungated last-token forward of every example must give the run's own logits: else the family is
        refused. Returns those logits."""
        model_type = self.runner.model_type
        ones = torch.ones(len(self.runner.targets), device=self.runner.device)
        try:
            with torch.inference_mode():
                logits = self.logits(ones)
        except Exception as err:  # noqa: BLE001 - whatever the family's forward raises, the answer is a refusal
            raise PartsError(f"parts cannot gate {model_type} models in the forward pass: its forward refuses a "
                             f"cached last token ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})") from err
        recorded = self.run.model_logits.to(logits.device)
        error = float((logits.float() - recorded).abs().max() / recorded.abs().max().clamp(min=1.0))
        if not error <= reconstruction_tolerance(self.runner.dtype):
            raise PartsError(f"parts cannot gate {model_type} models in the forward pass: recomputing the last token "
                             f"from its cached keys and values does not give the run's logits (relative error "
                             f"{error:.1e}); use CompRW")
        return logits


def train_gates(model: TransformerBridge, train: DecompositionRun, learning_rate: float = LEARNING_RATE,
                l1_penalty: float = L1_PENALTY, max_epochs: int = MAX_EPOCHS, check_every: int = CHECK_EVERY,
                patience: int = PATIENCE, init: float = 1.0, batch_size: int = TRAIN_BATCH) -> ReweightResult:
    """Learn one in-forward gate per component of `train` (CompRW's recipe, backpropagated through the model)."""
    forward = GatedForward(model, train, batch_size, keep=True)
    forward.check_exact()
    labels = train.labels.long().to(forward.runner.device)
    logits_of: Callable[[Tensor], Tensor] = forward.logits
    return descend(logits_of, len(train.component_names), labels, learning_rate, l1_penalty, max_epochs, check_every,
                   patience, init, forward.runner.device)


def gated_logits(model: TransformerBridge, run: DecompositionRun, gates: Float[Tensor, " component"],
                 batch_size: int = TEST_BATCH) -> Float[Tensor, "example label"]:
    """The label-word logits of `run`'s examples under the (raw; clipped here) gates: the gates' predictions."""
    forward = GatedForward(model, run, batch_size)
    forward.check_exact()
    with torch.inference_mode():
        return forward.logits(gates.to(forward.runner.device)).cpu()


def gated_predictions(model: TransformerBridge, run: DecompositionRun, gates: Float[Tensor, " component"]
                      ) -> Int[Tensor, " example"]:
    """Each example's label under the gated forward (ties go to the lower label index)."""
    return gated_logits(model, run, gates).argmax(-1)
