"""A plan before `parts effects` (`--dry-run`): the forwards the total-effects runner would make, its memory, the
`effects.safetensors` it would write and the time, from the model's config alone (no weights load).

The counting follows the runner (`parts.decomposition.effects`) pass by pass, per run:

- the shared prefix once (`Decomposer.shared_prefix_length`, off past a sliding window), then the batches
  (`--batch-size` examples, longest first): every position but the last (its keys and values kept), then the
  last token alone (the clean pass);
- `settle_batching` runs the first batch once to check the batching;
- exact at the last position: for mean and resample ablation a clean pass over every batch for the replacements,
  which keeps the batches' keys and values when they fit in `KEEP_BYTES` (else the batches are run again); then
  per batch and per layer one forward of the last token with one row per component of that layer, started at the
  layer (`forward: positions`), and on the first batch the first two layers' ablations twice more for the check
  (from the embeddings with one extra row, and from the layer with one extra row);
- attribution: per batch the clean pass, one last-token forward with gradients and one backward pass per label;
- every position: the clean full prompts, then every prompt once per component (no prefix reuse).

Forward tokens are the token positions handed to the model in every forward (a forward started at a layer counts
its rows once; its cost counts only the blocks it runs). The time uses `parts.experiments.plan`'s cost model with
a fixed cost per block a forward runs (`SECONDS_PER_BATCH_LAYER`) and per ablated forward
(`SECONDS_PER_ABLATION`: the hooks set up and removed).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from parts.components import parse_component
from parts.decomposition.effect_data import EFFECTS, EFFECTS_FORMAT
from parts.decomposition.effects.all_positions import ALL_POSITIONS_LIMIT
from parts.decomposition.effects.common import RESAMPLE_SEED
from parts.decomposition.effects.exact import KEEP_BYTES
from parts.decomposition.runs import DecompositionRun
from parts.experiments.plan import (
    ATTENTION_EFFICIENCY,
    GIB,
    LINEAR_EFFICIENCY,
    SECONDS_PER_BATCH_LAYER,
    SECONDS_PER_CALL,
    SECONDS_PER_WEIGHT_BYTE,
    ModelShape,
    Plan,
    Setting,
    Target,
    batch_bytes,
    batch_sizes_text,
    check_fits,
    element_bytes,
    format_seconds,
    safetensors_bytes,
    shared_prefix_length,
    tokenize,
)

# Fixed costs of the runner's own (calibrated on the embedded model on this project's CPU, tests/test_plan_effects.py)
SECONDS_PER_ABLATION = 0.004  # one ablated forward's hooks and replacement tensors, set up and removed
SECONDS_PER_BACKWARD_LAYER = 0.025  # attribution: one label's backward pass through one block of a batch


@dataclass
class Passes:
    """What the total-effects runner forwards for one run: model calls, the token positions handed to them, and
    what their cost is counted from (positions times the blocks each runs, attention's query-key pairs per block,
    rows unembedded, blocks of backward passes)."""

    label: str
    examples: int
    components: int
    prefix: int
    batch_size: int
    batches: list[tuple[int, int]]  # (examples, suffix width after the prefix)
    longest: int  # the longest prompt
    kept: bool = False  # the clean pass's keys and values kept for the ablations
    forwards: int = 0
    tokens: int = 0
    block_tokens: int = 0
    block_calls: int = 0  # blocks run, summed over forwards (each costs a fixed `SECONDS_PER_BATCH_LAYER`)
    query_keys: int = 0  # attention's query-key pairs, summed over the blocks run
    logit_rows: int = 0
    backward_block_tokens: int = 0
    backward_block_calls: int = 0  # blocks a backward pass goes through, summed over labels and batches
    ablations: int = 0  # forwards with ablation hooks
    peak_bytes: int = 0  # beyond the weights

    def forward(self, rows: int, new: int, keys_before: int, blocks: int, logits: bool = False) -> None:
        """Count one model call of `rows` rows of `new` positions each after `keys_before` cached ones, through
        `blocks` blocks."""
        self.forwards += 1
        self.tokens += rows * new
        self.block_tokens += rows * new * blocks
        self.block_calls += blocks
        self.query_keys += rows * (new * keys_before + new * (new + 1) // 2) * blocks
        self.logit_rows += rows if logits else 0


def layer_group_sizes(component_names: Sequence[str]) -> list[tuple[int, int]]:
    """(layer, components of that layer) in layer order: the ablations the exact runner runs as rows of one forward
    (`ExactLastPosition.layer_groups`)."""
    return sorted(Counter(parse_component(name).layer for name in component_names).items())


def effects_passes(shape: ModelShape, dtype: str, label: str, token_lists: Sequence[Sequence[int]],
                   component_names: Sequence[str], n_labels: int, method: str, positions: str, ablation: str,
                   batch_size: int) -> Passes:
    """The forwards of one run's total effects, counted as the runner makes them (see the module docstring)."""
    n, layers = len(token_lists), shape.n_layers
    prefix = shared_prefix_length(token_lists) if n > 1 else 0
    if prefix and shape.sliding_window is not None and max(len(t) for t in token_lists) > shape.sliding_window:
        prefix = 0
    order = sorted(range(n), key=lambda i: -len(token_lists[i]))
    lengths = [len(token_lists[i]) for i in order]
    batches = [(min(batch_size, n - start), lengths[start] - prefix) for start in range(0, n, batch_size)]
    passes = Passes(label, n, len(component_names), prefix, batch_size, batches, lengths[0])
    size = element_bytes(dtype)
    # A sliding window's rows cannot be positions of one sequence: the runner settles on batch rows from the embeddings.
    as_positions = shape.sliding_window is None

    def batch_pass(rows: int, width: int) -> None:  # every position but the last, then the clean last token
        if width > 1:
            passes.forward(rows, width - 1, prefix, layers, logits=True)
        passes.forward(rows, 1, prefix + width - 1, layers, logits=True)

    if prefix:
        passes.forward(1, prefix, 0, layers, logits=True)
    batch_pass(*batches[0])  # settle_batching: the first batch's clean logits against the run's
    peak = max(batch_bytes(shape, width, prefix, rows, dtype) for rows, width in batches)
    if positions == "all":  # the clean full prompts (to the final norm), then every prompt once per component
        full = [(rows, lengths[number * batch_size]) for number, (rows, _) in enumerate(batches)]
        for _ in range(len(component_names) + 1):
            for rows, width in full:
                passes.forward(rows, width, 0, layers)
        passes.ablations = len(component_names) * len(batches)
        passes.peak_bytes = max(peak, batch_bytes(shape, lengths[0], 0, batches[0][0], dtype))
        return passes
    if method == "attribution":
        for rows, width in batches:
            batch_pass(rows, width)
            passes.forward(rows, 1, prefix + width - 1, layers)  # with gradients, to the final norm
            passes.backward_block_tokens += n_labels * rows * layers
            passes.backward_block_calls += n_labels * layers
        passes.peak_bytes = peak
        return passes
    kept_bytes = 0
    if ablation != "zero":  # the clean pass for the replacements, keeping the suffixes' keys and values if they fit
        for rows, width in batches:
            batch_pass(rows, width)
            kept_bytes += 2 * layers * shape.n_key_value_heads * shape.d_head * rows * max(width - 1, 0) * size
        passes.kept = kept_bytes <= KEEP_BYTES
    if not passes.kept:
        for rows, width in batches:
            batch_pass(rows, width)
    groups = layer_group_sizes(component_names)
    for number, (rows, width) in enumerate(batches):
        keys = prefix + width - 1
        for index, (layer, count) in enumerate(groups):
            first = layer if as_positions else 0
            if number == 0 and index < 2:  # the check: batch rows from the embeddings, then positions from the layer
                passes.forward(rows, count + 1, keys, layers)
                passes.forward(rows, count + 1, keys, layers - layer)
                passes.ablations += 2
            else:
                passes.forward(rows, count, keys, layers - first)
                passes.ablations += 1
    widest = max(count for _, count in groups) + 1
    ablated = max(rows * (widest * (6 * shape.d_model + 3 * shape.d_mlp) + 2 * shape.n_heads * widest
                          * (prefix + width + widest)) * size * 2 for rows, width in batches)
    passes.peak_bytes = peak + ablated + (kept_bytes if passes.kept else 0)
    return passes


def effects_info(run: DecompositionRun, method: str, positions: str, ablation: str, freeze_norm: bool, dtype: str,
                 seconds: float, fingerprint: dict[str, Any] | None) -> dict[str, Any]:
    """The info `parts effects` records in effects.safetensors (`RunnerBase._info`), with `seconds` for the timings
    (known only after the run: the file's size differs from the plan's by their digits)."""
    info: dict[str, Any] = {"method": method, "positions": positions, "ablation": ablation, "freeze_norm": freeze_norm,
                            "model": run.model, "dtype": dtype, "engine": "hf", "n_examples": run.n_examples,
                            "seconds": round(seconds, 3), "cpu_seconds": round(seconds, 3)}
    if ablation == "resample":
        info["resample_seed"] = RESAMPLE_SEED
    if run.info.get("split_experts"):
        info["split_experts"] = True
    if positions == "all":
        info["mean_position"] = "the same distance from the end of the prompt"
    elif method == "exact":
        info["forward"] = "positions"
    if fingerprint is not None:
        info["fingerprint"] = fingerprint
    return info


def effects_file_bytes(run: DecompositionRun, info: dict[str, Any]) -> int:
    """The size of the effects.safetensors `TotalEffects.save` writes for `run` with `info` (exact)."""
    n, components, labels = run.n_examples, len(run.component_names), len(run.label_token_ids)
    metadata = {"format_version": str(EFFECTS_FORMAT), "component_names": json.dumps(list(run.component_names)),
                "info": json.dumps(info)}
    return safetensors_bytes({"total_effects": (n, components, labels), "clean_logits": (n, labels)}, metadata)


@dataclass
class EffectsPlan(Plan):
    """The plan of `parts effects`: per run to do, its `Passes` and its effects.safetensors."""

    passes: list[Passes] = field(default_factory=list)
    settings_text: str = ""  # method, positions, ablation as given
    needs_yes: bool = False  # --positions all over `ALL_POSITIONS_LIMIT` component-examples, without --yes

    @property
    def forwarded(self) -> int:
        return sum(p.tokens for p in self.passes)

    @property
    def peak_bytes(self) -> int:
        """Weights plus the largest run's estimate."""
        return self.shape.weights_bytes(element_bytes(self.dtype)) + max((p.peak_bytes for p in self.passes), default=0)

    def run_seconds(self, passes: Passes) -> float:
        """The cost model's time of one run's total effects."""
        shape = self.shape
        per_token = 2 * shape.block_parameters / shape.n_layers
        linear = per_token * (passes.block_tokens + 2 * passes.backward_block_tokens)
        linear += 2 * shape.d_model * shape.d_vocab * passes.logit_rows
        attention = 4 * shape.n_heads * shape.d_head * passes.query_keys
        return (linear / (self.rate * LINEAR_EFFICIENCY) + attention / (self.rate * ATTENTION_EFFICIENCY)
                + passes.block_calls * SECONDS_PER_BATCH_LAYER + passes.ablations * SECONDS_PER_ABLATION
                + passes.backward_block_calls * SECONDS_PER_BACKWARD_LAYER
                + SECONDS_PER_CALL)

    def seconds(self) -> float:
        load = self.loads * self.shape.weights_bytes(element_bytes(self.dtype)) * SECONDS_PER_WEIGHT_BYTE
        return sum(self.run_seconds(p) for p in self.passes) + load

    def check_fits(self) -> None:
        """`check_fits` with the largest run's estimate beyond the weights."""
        if not self.passes:
            return
        largest = max(self.passes, key=lambda p: p.peak_bytes)
        weights = self.shape.weights_bytes(element_bytes(self.dtype))
        check_fits(self.shape, self.dtype, self.device_kind, self.free_bytes, largest.longest - largest.prefix,
                   largest.prefix, largest.batch_size, self.device)
        budget = self.free_bytes * (0.8 if self.device_kind == "cuda" else 0.5)
        if weights + largest.peak_bytes > budget:
            check_fits(self.shape, self.dtype, self.device_kind, self.free_bytes, largest.longest - largest.prefix,
                       largest.prefix, 10**6, self.device)  # refused, naming a batch size that fits

    def describe(self) -> str:
        """The plan as `parts effects --dry-run` prints it."""
        shape, passes = self.shape, self.passes
        todo = [s for s in self.settings if not s.done]
        weights = shape.weights_bytes(element_bytes(self.dtype))
        sizes = [p.batch_size for p in passes]
        lines = [
            f"parts effects --dry-run: {shape.name}, {self.dtype}, on {self.device} (no weights loaded)",
            f"runs         {len(self.settings)}: {len(todo)} to do, {len(self.settings) - len(todo)} already have "
            f"these effects ({self.settings_text})",
        ]
        if todo:
            lines.append("to do        " + ", ".join(s.label for s in todo[:4]) + (" ..." if len(todo) > 4 else ""))
        lines += [
            f"components   {max((p.components for p in passes), default=shape.components)} ablated per example "
            f"({shape.n_layers} layers x {shape.n_heads} heads + {shape.n_layers} MLPs), "
            f"{sum(p.examples * p.components for p in passes):,} ablations",
            f"forwards     {sum(p.forwards for p in passes):,} model calls, {self.forwarded:,} tokens forwarded "
            f"({sum(p.block_tokens for p in passes) / max(shape.n_layers, 1):,.0f} full-depth equivalent; "
            f"{sum(p.examples for p in passes):,} examples, shared prefixes run once: "
            f"{sum(p.prefix for p in passes):,}; longest prompt {max((p.longest for p in passes), default=0):,})"
            + self.tokenizer_note,
            f"memory       {weights / GIB:.2f} GiB of weights + {(self.peak_bytes - weights) / GIB:.2f} GiB for the "
            f"largest batch = {self.peak_bytes / GIB:.2f} GiB peak; batch size {batch_sizes_text(sizes)} (--batch-size) "
            f"of {self.free_bytes / GIB:.1f} GiB free",
            f"disk         {self.disk_bytes / 1e6:,.2f} MB in {len(self.files)} files ({EFFECTS}: tensors exact, "
            "the timings in its metadata estimated)",
            f"time         about {format_seconds(self.seconds())} at {self.rate / 1e9:,.0f} GFLOP/s "
            f"({self.rate_source}); cost model: parts.experiments.plan_effects",
        ]
        if self.needs_yes:
            lines.append(f"refused      --positions all over {ALL_POSITIONS_LIMIT:,} component-examples stops after "
                         "the first batch without --yes")
        return "\n".join(lines)


def effects_plan(target: Target, runs: Sequence[tuple[str, DecompositionRun, bool, dict[str, Any] | None]],
                 method: str, positions: str, ablation: str, freeze_norm: bool, batch_size: int,
                 yes: bool = False) -> EffectsPlan:
    """The plan of `parts effects` on `target` for `runs`: (path, run, done, fingerprint `parts effects` records)
    each, done as the command's own reuse check says."""
    from pathlib import Path

    plan = EffectsPlan("effects", target.shape, target.dtype, target.device, target.device_kind, target.free_bytes,
                       target.rate, target.rate_source, tokenizer_note=target.tokenizer_note, auto=False,
                       settings_text=f"--method {method} --positions {positions} --ablation {ablation}"
                       + (" --freeze-norm" if freeze_norm else ""))
    for path, run, done, fingerprint in runs:
        label = f"{run.prompts.task} t{run.prompts.template} s{run.prompts.seed} n{run.n_examples}"
        if done:
            plan.settings.append(Setting(label, True))
            continue
        token_lists = ([list(t) for t in run.token_ids] if run.token_ids is not None
                       else tokenize(target.tokenizer, run.prompts.prompts))
        passes = effects_passes(target.shape, target.dtype, label, token_lists, run.component_names,
                                len(run.label_token_ids), method, positions, ablation, batch_size)
        plan.passes.append(passes)
        seconds = plan.run_seconds(passes)
        info = effects_info(run, method, positions, ablation, freeze_norm, target.dtype, seconds, fingerprint)
        plan.settings.append(Setting(label, False, files={str(Path(path) / EFFECTS): effects_file_bytes(run, info)}))
        plan.needs_yes = plan.needs_yes or (positions == "all" and not yes
                                            and len(run.component_names) * run.n_examples > ALL_POSITIONS_LIMIT)
    plan.loads = int(bool(plan.passes))
    return plan
