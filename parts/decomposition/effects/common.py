"""What every stage of the total effects shares: the settings, a component as a target, a batch and its clean
values, the checks that a run is this model's, and the KV-cache copies the last-token forwards run from."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from parts.components import HEAD, MLP, SHARED_EXPERT, parse_component
from parts.decomposition.effect_data import TotalEffects
from parts.decomposition.exactness import reconstruction_tolerance
from parts.decomposition.fingerprint import digest
from parts.decomposition.runs import DecompositionRun
from parts.errors import PartsError
from parts.model.loading import model_name

ABLATIONS = ("mean", "zero", "resample")
POSITIONS = ("last", "all")
METHODS = ("exact", "attribution")
RESAMPLE_SEED = 0


# -- what a component is, as the ablation sees it ------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """Where one component's output is replaced: a head's slice of the output projection's input (`z`), or
    one part of an MLP's output (the whole MLP; an expert's router-weighted output; the rest, a shared expert)."""

    layer: int
    kind: str  # HEAD or MLP (an MLP, an expert or a shared expert: all replace part of the MLP's output)
    index: int  # head, or the part of the layer's MLP output (0: the whole MLP; e: expert e; n_experts: shared)


def targets_of(names: Sequence[str], n_experts: Sequence[int]) -> list[Target]:
    """Where each named component's output is replaced (`n_experts`: per layer, 0 unless experts are split)."""
    targets = []
    for name in names:
        component = parse_component(name)
        if component.kind == HEAD:
            targets.append(Target(component.layer, HEAD, component.head))
        elif component.kind == MLP:
            targets.append(Target(component.layer, MLP, 0))
        else:  # EXPERT
            index = n_experts[component.layer] if component.head == SHARED_EXPERT else component.head
            targets.append(Target(component.layer, MLP, index))
    return targets


@dataclass
class Clean:
    """A batch's clean last-position values (float32, on the model's device)."""

    z: Float[Tensor, "batch layer head d_head"]  # each head's output before the output projection
    mlp_parts: list[Float[Tensor, "batch part d_model"]]  # per layer: the MLP's output, or its experts (+ shared)
    resid_in: Float[Tensor, "batch layer d_model"]  # each block's input
    final_in: Float[Tensor, "batch d_model"]  # the final norm's input
    post_in: dict[tuple[str, int], Float[Tensor, "batch d_model"]]  # (HEAD|MLP, layer) -> its post-norm's input


@dataclass
class Batch:
    """A batch of the run's examples: its suffix tokens, mask, and the keys and values of every position but the last."""

    rows: list[int]  # which examples of the run, in order
    ids: Int[Tensor, "batch pos"]  # left-padded suffixes (after the shared prefix)
    mask: Int[Tensor, "batch key"]  # prefix + suffix
    cache: Any  # keys and values of every position but the last
    clean: Clean | None = None


class StopAtFinalNorm(Exception):
    """Raised at the final norm's input: the label-word logits are read from there (no vocabulary-wide unembedding)."""



def until_final_norm(forward: Any, handles: list[Any]) -> None:
    """Run `forward()` until the final norm's capturing hook stops it (`StopAtFinalNorm`), then remove `handles`."""
    try:
        forward()
    except StopAtFinalNorm:
        pass
    finally:
        for handle in handles:
            handle.remove()


def layer_copies(cache: Any, repeats: int = 1, detach: bool = False) -> Any:
    """A copy of a KV cache whose layers a forward can extend without touching the original (a forward
    concatenates new keys into new tensors, so the old ones are shared); `repeats`: each batch row repeated;
    `detach`: ordinary copies of the tensors (inference-mode tensors cannot take part in a backward pass)."""
    if cache is None:
        return None
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    if detach:
        for layer in new.layers:
            if getattr(layer, "keys", None) is not None and layer.get_seq_length() > 0:
                layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
    if repeats > 1:
        for layer in new.layers:
            layer.batch_repeat_interleave(repeats)
    return new


def suffix_keys_values(cache: Any, prefix_length: int) -> list[tuple[Tensor, Tensor]] | None:
    """Each layer's keys and values after the shared prefix (copies), or None where the cache is not a plain
    dynamic cache of every position (a sliding window's layers drop keys): then it is not split."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer).__name__ != "DynamicLayer" or layer.keys is None for layer in layers):
        return None
    if len({layer.keys.shape[-2] for layer in layers}) != 1 or layers[0].keys.shape[-2] < prefix_length:
        return None
    return [(layer.keys[..., prefix_length:, :].clone(), layer.values[..., prefix_length:, :].clone()) for layer in layers]


def cache_tensors(cache: Any) -> list[Tensor]:
    """Every key and value tensor of a cache (to measure it)."""
    return [t for layer in getattr(cache, "layers", []) for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
            if isinstance(t, Tensor)]


def run_digest(run: DecompositionRun) -> str | None:
    """The digest of the run's fingerprint (None: a run saved before parts recorded one): effects record it, so
    effects of a run that was since remade are recognised as stale."""
    return None if run.fingerprint is None else digest(run.fingerprint)


def check_effects_match(path: str | Path, run: DecompositionRun, effects: TotalEffects) -> None:
    """Effects computed for another version of the run (its fingerprint changed since) are refused in one line."""
    recorded = (effects.info.get("fingerprint") or {}).get("run")  # what `parts effects` records (its fingerprint)
    if recorded != run_digest(run) or effects.component_names != run.component_names:
        raise PartsError(f"the total effects in {path} were computed for another version of that run: rerun "
                         f"`parts effects {path}`")


def resample_order(n: int, seed: int = RESAMPLE_SEED) -> Int[Tensor, " example"]:
    """For each example, the example whose output replaces it: a seeded permutation with no fixed point."""
    if n < 2:
        raise PartsError("resample ablation needs at least 2 examples in the run")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    source = torch.empty(n, dtype=torch.long)
    source[order] = order.roll(1)
    return source


def check_run_matches(model: TransformerBridge, run: DecompositionRun, dtype: str | None = None,
                      engine: str | None = None) -> None:
    """A run is ablated only with the model, dtype and engine it was made with (one-line error otherwise)."""
    name = model_name(model)
    if run.model != name:
        raise PartsError(f"the run was made with model {run.model!r}, not {name!r}: load {run.model!r} (--model)")
    loaded = str(model.W_U.dtype).replace("torch.", "")
    recorded = run.info.get("dtype")
    if recorded is not None and recorded != loaded:
        raise PartsError(f"the run was made in {recorded}, the model is loaded in {loaded}: load it with --dtype {recorded}")
    if dtype is not None and recorded is not None and dtype != recorded:
        raise PartsError(f"the run was made in {recorded}, not {dtype}: use --dtype {recorded}")
    if engine is not None and run.info.get("engine", engine) != engine:
        raise PartsError(f"the run was made with the {run.info['engine']} engine, not {engine}: "
                         f"use --engine {run.info['engine']}")


def check_clean_logits(run: DecompositionRun, rows: Sequence[int], logits: Float[Tensor, "batch label"],
                       dtype: torch.dtype) -> None:
    """The clean last-token pass must give the run's own model logits: else the run is not this model's."""
    recorded = run.model_logits[list(rows)]
    error = float((logits - recorded).abs().max() / recorded.abs().max().clamp(min=1.0))
    if error > reconstruction_tolerance(dtype):
        raise PartsError(f"this model's logits differ from the run's (relative error {error:.1e} on example "
                         f"{run.prompts.example_indices[rows[0]]}): the run was made by another model or settings; "
                         "rerun the decomposition")

