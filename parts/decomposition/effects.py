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
layer recomputed. Which one ran is checked on the first batch: rows that ablate nothing must give
the clean logits, or the model is refused.

The ablated pass recomputes the final norm from the ablated residual, so a total effect includes the
norm's response. `freeze_norm` keeps the clean scales of the norms a direct effect reads through
(the final norm, and the component's own post-norm in Gemma-2/3 and OLMo-2), so total minus direct
is what later components do: with zero ablation the last layer's MLP then has total effect equal to
its direct effect.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from parts.components import HEAD, MLP, SHARED_EXPERT, parse_component
from parts.decomposition.decompose import Decomposer
from parts.decomposition.effect_data import TotalEffects
from parts.decomposition.exactness import reconstruction_tolerance
from parts.decomposition.fingerprint import digest
from parts.decomposition.runs import DecompositionRun
from parts.errors import PartsError
from parts.model.engines import suffix_position_ids
from parts.model.loading import model_name, plain_model
from parts.model.readout import FINAL_NORM_IN, RESID_0, experts_name, z_name

ABLATIONS = ("mean", "zero", "resample")
POSITIONS = ("last", "all")
METHODS = ("exact", "attribution")
# --positions all reruns every prompt in full once per component: refused beyond this many component-examples
# without `yes` (with an estimate of the time it would take).
ALL_POSITIONS_LIMIT = 3000
RESAMPLE_SEED = 0


# -- what a component is, as the ablation sees it ------------------------------------------------------------
@dataclass(frozen=True)
class _Target:
    """Where one component's output is replaced: a head's slice of the output projection's input (`z`), or
    one part of an MLP's output (the whole MLP; an expert's router-weighted output; the rest, a shared expert)."""

    layer: int
    kind: str  # HEAD or MLP (an MLP, an expert or a shared expert: all replace part of the MLP's output)
    index: int  # head, or the part of the layer's MLP output (0: the whole MLP; e: expert e; n_experts: shared)


def _targets(names: Sequence[str], n_experts: Sequence[int]) -> list[_Target]:
    targets = []
    for name in names:
        component = parse_component(name)
        if component.kind == HEAD:
            targets.append(_Target(component.layer, HEAD, component.head))
        elif component.kind == MLP:
            targets.append(_Target(component.layer, MLP, 0))
        else:  # EXPERT
            index = n_experts[component.layer] if component.head == SHARED_EXPERT else component.head
            targets.append(_Target(component.layer, MLP, index))
    return targets


@dataclass
class _Clean:
    """A batch's clean last-position values (float32, on the model's device)."""

    z: Float[Tensor, "batch layer head d_head"]  # each head's output before the output projection
    mlp_parts: list[Float[Tensor, "batch part d_model"]]  # per layer: the MLP's output, or its experts (+ shared)
    resid_in: Float[Tensor, "batch layer d_model"]  # each block's input
    final_in: Float[Tensor, "batch d_model"]  # the final norm's input
    post_in: dict[tuple[str, int], Float[Tensor, "batch d_model"]]  # (HEAD|MLP, layer) -> its post-norm's input


@dataclass
class _Batch:
    rows: list[int]  # which examples of the run, in order
    ids: Int[Tensor, "batch pos"]  # left-padded suffixes (after the shared prefix)
    mask: Int[Tensor, "batch key"]  # prefix + suffix
    cache: Any  # keys and values of every position but the last
    clean: _Clean | None = None


class _Stop(Exception):
    """Raised at the final norm's input: the label-word logits are read from there (no vocabulary-wide unembedding)."""


class TotalEffectRunner:
    """Computes total effects of one run's components with a loaded model (`total_effects` is the entry point)."""

    def __init__(self, model: TransformerBridge, run: DecompositionRun, ablation: str = "mean", freeze_norm: bool = False,
                 batch_size: int = 4, progress: bool = True):
        if ablation not in ABLATIONS:
            raise PartsError(f"unknown ablation {ablation!r}: use one of {', '.join(ABLATIONS)}")
        check_run_matches(model, run)
        split_experts = bool(run.info.get("split_experts"))
        self.decomposer = Decomposer(model, run.label_token_ids, "hf", split_experts=split_experts)
        if self.decomposer.engine_name != "hf":
            raise PartsError("total effects need the hf engine, which cannot map this model's modules: "
                             "this family cannot be ablated exactly")
        self.model, self.run = model, run
        self.hf = plain_model(model)
        self.layout, self.readout = self.decomposer.layout, self.decomposer.readout
        self.ablation, self.freeze_norm = ablation, freeze_norm
        self.batch_size, self.progress = max(1, int(batch_size)), progress
        self.n_layers, self.n_heads = self.layout.n_layers, self.layout.n_heads
        self.n_experts = self.layout.n_experts if split_experts else [0] * self.n_layers
        self.targets = _targets(run.component_names, self.n_experts)
        self.device, self.dtype = self.decomposer.device, self.decomposer.dtype
        blocks_path = self.layout.taps[RESID_0][0].rsplit(".", 1)[0]
        parent_path, _, self.blocks_attr = blocks_path.rpartition(".")
        self.blocks_parent = self.hf.get_submodule(parent_path) if parent_path else self.hf
        self.blocks: nn.ModuleList = getattr(self.blocks_parent, self.blocks_attr)
        self.mode: str | None = None  # "positions" or "batch", settled on the first batch
        self.prefix_reuse = True
        self.model_type = str(getattr(self.hf.config, "model_type", type(self.hf).__name__))
        self._rows_shape = (0, 0)  # examples, rows per example of the running forward

    # -- tokens and the clean pass ----------------------------------------------------------------------------
    def token_lists(self) -> list[list[int]]:
        if self.run.token_ids is not None:
            return [list(t) for t in self.run.token_ids]
        return self.decomposer.tokenize(self.run.prompts.prompts)

    def batches(self) -> Iterator[_Batch]:
        """The run's examples, longest first, `batch_size` at a time, with the keys and values of every
        position but the last (the shared prefix computed once, as the decomposition does)."""
        token_lists = self.token_lists()
        reuse = self.prefix_reuse and len(token_lists) > 1
        prefix_length = self.decomposer.shared_prefix_length(token_lists) if reuse else 0
        config: Any = self.hf.config
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        if prefix_length and isinstance(window, int) and max(len(t) for t in token_lists) > window:
            prefix_length = 0  # padding after a prefix would take a sliding window's key slots (as in decompose)
        prefix_cache = self.decomposer.prefix_cache(token_lists[0][:prefix_length]) if prefix_length else None
        if prefix_cache is None:
            prefix_length = 0
        self.prefix_length = prefix_length
        order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
        pad = self.decomposer.pad_token_id
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            suffixes = [token_lists[i][prefix_length:] for i in rows]
            width = max(len(s) for s in suffixes)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            suffix_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, tokens in enumerate(suffixes):
                ids[row, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
                suffix_mask[row, width - len(tokens):] = 1
            mask = torch.cat([torch.ones((len(rows), prefix_length), dtype=torch.long), suffix_mask], dim=1)
            ids, mask = ids.to(self.device), mask.to(self.device)
            cache = None
            if prefix_cache is not None:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(rows))
            if width > 1:  # every position but the last, keys and values kept
                with torch.inference_mode():
                    output = self.hf(ids[:, :-1], attention_mask=mask[:, :-1],
                                     position_ids=suffix_position_ids(mask[:, :-1], prefix_length),
                                     past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache = output.past_key_values
            yield _Batch(rows, ids, mask, cache)

    def settle_batching(self) -> None:
        """Keep batching (and the shared prefix's reuse) only where the first batch's clean logits are the run's:
        a model whose attention depends on where padding sits (ALiBi from slots) runs one example at a time."""
        while True:
            batch = next(self.batches())
            logits = self.label_logits(self.clean(batch).final_in).cpu()
            try:
                check_clean_logits(self.run, batch.rows, logits, self.dtype)
                return
            except PartsError:
                if self.batch_size > 1:
                    self.batch_size = 1
                elif self.prefix_reuse:
                    self.prefix_reuse = False
                else:
                    raise

    def clean(self, batch: _Batch) -> _Clean:
        """The last token's clean pass: every value an ablation reads or replaces, at the last position."""
        engine: Any = self.decomposer.engine
        activations: dict[str, Tensor] = {}
        resid: dict[int, Tensor] = {}
        engine._shape = (len(batch.rows), 1)
        handles = engine._attach(activations)
        for layer, block in enumerate(self.blocks):
            def pre_hook(_m: nn.Module, args: tuple, kwargs: dict, layer: int = layer) -> None:
                value = args[0] if args else kwargs["hidden_states"]
                resid[layer] = value[:, -1].float().clone()
            handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
        try:
            with torch.inference_mode():
                self.hf(batch.ids[:, -1:], attention_mask=batch.mask, position_ids=self._last_positions(batch),
                        past_key_values=_layer_copies(batch.cache), use_cache=batch.cache is not None, logits_to_keep=1)
        finally:
            for handle in handles:
                handle.remove()
        n = len(batch.rows)
        z = torch.stack([activations[z_name(l)].float().reshape(n, -1) for l in range(self.n_layers)], dim=1)
        z = einops.rearrange(z, "batch layer (head d_head) -> batch layer head d_head", head=self.n_heads)
        mlp_parts = []
        for layer in range(self.n_layers):
            mlp_out = activations[self.layout.mlp_out[layer]].float().reshape(n, -1)
            if self.n_experts[layer]:
                experts = activations[experts_name(layer)].float()
                parts = [experts]
                if self.layout.shared_expert[layer]:
                    parts.append((mlp_out - experts.sum(1))[:, None])
                mlp_parts.append(torch.cat(parts, dim=1))
            else:
                mlp_parts.append(mlp_out[:, None])
        post_in = {}
        for kind, names in ((HEAD, self.layout.post_attn), (MLP, self.layout.post_mlp)):
            for layer, name in enumerate(names):
                if name is not None:
                    post_in[(kind, layer)] = activations[name].float().reshape(n, -1)
        return _Clean(z, mlp_parts, torch.stack([resid[l] for l in range(self.n_layers)], dim=1),
                      activations[FINAL_NORM_IN].float().reshape(n, -1), post_in)

    def _last_positions(self, batch: _Batch) -> Int[Tensor, "batch 1"]:
        return suffix_position_ids(batch.mask, self.prefix_length)[:, -1:]

    def label_logits(self, final_in: Float[Tensor, "... d_model"],
                     scale: Float[Tensor, ...] | None = None) -> Float[Tensor, "... label"]:
        """Label-word logits (pre-soft-cap) read from the final norm's input; `scale`: a frozen final-norm scale."""
        norm = self.readout.final_norm
        if scale is None:
            scale = (norm.centre(final_in).pow(2).mean(-1) + norm.eps).sqrt()
        return final_in @ self.readout.unembed / scale[..., None] + self.readout.constant

    # -- replacements ------------------------------------------------------------------------------------------
    def replacements(self, cleans: list[tuple[list[int], _Clean]]) -> tuple[Tensor, list[Tensor]] | None:
        """Per example of the run, what each head's z and each MLP part is replaced by (None: zero ablation)."""
        if self.ablation == "zero":
            return None
        n = self.run.n_examples
        z = torch.zeros((n, *cleans[0][1].z.shape[1:]), device=self.device)
        mlp = [torch.zeros((n, *part.shape[1:]), device=self.device) for part in cleans[0][1].mlp_parts]
        for rows, clean in cleans:
            index = torch.tensor(rows, device=self.device)
            z[index] = clean.z
            for layer, part in enumerate(clean.mlp_parts):
                mlp[layer][index] = part
        if self.ablation == "mean":
            return z.mean(0, keepdim=True).expand_as(z), [m.mean(0, keepdim=True).expand_as(m) for m in mlp]
        source = resample_order(n)
        return z[source], [m[source] for m in mlp]

    # -- the ablated forward -----------------------------------------------------------------------------------
    def ablated_final(self, batch: _Batch, clean: _Clean, start: int, targets: Sequence[_Target | None],
                      replacement: tuple[Tensor, list[Tensor]] | None, mode: str, skip: bool
                      ) -> Float[Tensor, "batch row d_model"]:
        """The final norm's input at the last token, one row per target (None: nothing ablated), every row
        started at block `start` from the clean residual stream (`skip`; else at the embeddings)."""
        n, rows = len(batch.rows), len(targets)
        layers = sorted({t.layer for t in targets if t is not None})
        # A head's z and a dense MLP's output are set to their replacement (so a zero ablation is exactly zero: a
        # post-norm would blow float noise up); an expert's share is added to the MLP's output as a change.
        z_new: dict[int, Tensor] = {}
        z_set: dict[int, Tensor] = {}
        mlp_new: dict[int, Tensor] = {}
        mlp_set: dict[int, Tensor] = {}
        mlp_add: dict[int, Tensor] = {}
        frozen: dict[tuple[str, int], Tensor] = {}  # rows whose post-norm keeps its clean scale
        index = torch.tensor(batch.rows, device=self.device)
        for layer in layers:
            z_new[layer] = torch.zeros((n, rows, self.n_heads, clean.z.shape[-1]), device=self.device)
            z_set[layer] = torch.zeros((rows, self.n_heads), dtype=torch.bool, device=self.device)
            mlp_new[layer] = torch.zeros((n, rows, clean.final_in.shape[-1]), device=self.device)
            mlp_set[layer] = torch.zeros(rows, dtype=torch.bool, device=self.device)
            mlp_add[layer] = torch.zeros((n, rows, clean.final_in.shape[-1]), device=self.device)
        for row, target in enumerate(targets):
            if target is None:
                continue
            layer = target.layer
            if target.kind == HEAD:
                z_set[layer][row, target.index] = True
                if replacement is not None:
                    z_new[layer][:, row, target.index] = replacement[0][index, layer, target.index]
            elif not self.n_experts[layer]:
                mlp_set[layer][row] = True
                if replacement is not None:
                    mlp_new[layer][:, row] = replacement[1][layer][index, 0]
            else:
                new = 0.0 if replacement is None else replacement[1][layer][index, target.index]
                mlp_add[layer][:, row] = new - clean.mlp_parts[layer][:, target.index]
            if self.freeze_norm and (target.kind, layer) in clean.post_in:
                frozen.setdefault((target.kind, layer), torch.zeros(rows, dtype=torch.bool, device=self.device))[row] = True
        handles = []
        captured: dict[str, Tensor] = {}
        self._rows_shape = (n, rows)
        modules = {name: self.hf.get_submodule(path) for name, (path, _) in self.layout.taps.items()}
        for layer in layers:
            handles.append(modules[z_name(layer)].register_forward_pre_hook(
                self._replace_input(z_new[layer], z_set[layer]), with_kwargs=True))
            handles.append(modules[self.layout.mlp_out[layer]].register_forward_hook(
                self._replace_output(mlp_new[layer], mlp_set[layer], mlp_add[layer])))
        for (kind, layer), row_mask in frozen.items():
            path = (self.layout.post_attn_paths if kind == HEAD else self.layout.post_mlp_paths)[layer]
            norm = (self.readout.post_attn if kind == HEAD else self.readout.post_mlp)[layer]
            assert path is not None and norm is not None
            scale = norm.scale(clean.post_in[(kind, layer)])
            handles.append(self.hf.get_submodule(path).register_forward_hook(self._freeze(norm, scale, row_mask)))
        final_path = self.layout.taps[FINAL_NORM_IN][0]

        def capture(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            value = args[0] if args else kwargs["hidden_states"]
            captured["final"] = self._rows(value).float()
            raise _Stop
        handles.append(self.hf.get_submodule(final_path).register_forward_pre_hook(capture, with_kwargs=True))
        first = start if skip else 0
        if first > 0:
            resid = clean.resid_in[:, first]

            def replace(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                value = args[0] if args else kwargs["hidden_states"]
                new = einops.repeat(resid, "batch d_model -> batch row d_model", row=rows).to(value.dtype)
                new = new.reshape(value.shape)
                return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})
            handles.append(self.blocks[first].register_forward_pre_hook(replace, with_kwargs=True))
        try:
            with torch.inference_mode(), self._blocks_from(first):
                self._forward_rows(batch, rows, mode, first)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if "final" not in captured:
            raise RuntimeError("the final norm was never reached: the model's forward does not end in its final norm")
        return captured["final"]

    def _forward_rows(self, batch: _Batch, rows: int, mode: str, first: int) -> None:
        n = len(batch.rows)
        last = batch.ids[:, -1:]
        positions = self._last_positions(batch)
        if mode == "positions":
            # Every row a position of one sequence after the prompt, each seeing the prompt's keys and values and itself.
            keys = batch.mask.shape[1] - 1
            allowed = torch.cat([batch.mask[:, None, :-1].expand(n, rows, keys).bool(),
                                 torch.eye(rows, dtype=torch.bool, device=self.device).expand(n, rows, rows)], dim=2)
            bias = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
            bias = bias.masked_fill(~allowed, torch.finfo(self.dtype).min)[:, None]
            self.hf(last.expand(n, rows), attention_mask=bias, position_ids=positions.expand(n, rows),
                    past_key_values=_layer_copies(batch.cache), use_cache=batch.cache is not None, logits_to_keep=1)
        else:
            cache = _layer_copies(batch.cache, repeats=rows)
            self.hf(einops.repeat(last, "batch 1 -> (batch row) 1", row=rows),
                    attention_mask=einops.repeat(batch.mask, "batch key -> (batch row) key", row=rows),
                    position_ids=einops.repeat(positions, "batch 1 -> (batch row) 1", row=rows),
                    past_key_values=cache, use_cache=cache is not None, logits_to_keep=1)

    @contextmanager
    def _blocks_from(self, first: int) -> Iterator[None]:
        """Run only blocks `first`.. (their attention keeps its own layer index into the cache)."""
        if first == 0:
            yield
            return
        config: Any = self.hf.config
        layer_types = getattr(config, "layer_types", None)
        setattr(self.blocks_parent, self.blocks_attr, nn.ModuleList(list(self.blocks)[first:]))
        if isinstance(layer_types, list) and len(layer_types) == self.n_layers:
            config.layer_types = layer_types[first:]
        try:
            yield
        finally:
            setattr(self.blocks_parent, self.blocks_attr, self.blocks)
            if isinstance(layer_types, list) and len(layer_types) == self.n_layers:
                config.layer_types = layer_types

    def _rows(self, value: Tensor) -> Tensor:
        """A [batch row ...] view of an activation of the running forward ([batch row ...] as positions,
        [(batch row) 1 ...] as a batch, or flattened tokens [(batch row) ...])."""
        n, rows = self._rows_shape
        return value.reshape(n, rows, -1)

    def _replace_input(self, new: Float[Tensor, "batch row head d_head"], chosen: Bool[Tensor, "row head"]) -> Any:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            value = args[0] if args else kwargs["hidden_states"]
            heads = self._rows(value).reshape(*new.shape)
            out = torch.where(chosen[None, :, :, None], new.to(value.dtype), heads).reshape(value.shape)
            return ((out, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": out})
        return hook

    def _replace_output(self, new: Float[Tensor, "batch row d_model"], chosen: Bool[Tensor, " row"],
                        change: Float[Tensor, "batch row d_model"]) -> Any:
        def hook(_m: nn.Module, _args: tuple, output: Any) -> Any:
            value = output[0] if isinstance(output, tuple) else output
            rows = torch.where(chosen[None, :, None], new.to(value.dtype), self._rows(value)) + change.to(value.dtype)
            out = rows.reshape(value.shape)
            return (out, *output[1:]) if isinstance(output, tuple) else out
        return hook

    def _freeze(self, norm: Any, scale: Float[Tensor, " batch"], row_mask: Tensor) -> Any:
        def hook(_m: nn.Module, args: tuple, output: Any) -> Any:
            value = output[0] if isinstance(output, tuple) else output
            x = self._rows(args[0]).float()
            fixed = norm.centre(x) / scale[:, None, None] * norm.weight
            if norm.bias is not None:
                fixed = fixed + norm.bias
            new = torch.where(row_mask[None, :, None], fixed.to(value.dtype), self._rows(value)).reshape(value.shape)
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    # -- everything ---------------------------------------------------------------------------------------------
    def layer_groups(self) -> list[tuple[int, list[int]]]:
        """(layer, indices of the run's components at that layer), layer by layer."""
        groups: dict[int, list[int]] = {}
        for i, target in enumerate(self.targets):
            groups.setdefault(target.layer, []).append(i)
        return sorted(groups.items())

    def effects_of_batch(self, batch: _Batch, clean: _Clean, replacement: Any, check: bool
                         ) -> Float[Tensor, "batch component label"]:
        """Total effects of every component on one batch; `check`: settle the forward's mode on this batch."""
        clean_logits = self.label_logits(clean.final_in)
        scale = (self.readout.final_norm.scale(clean.final_in) if self.freeze_norm else None)
        effects = torch.zeros((len(batch.rows), len(self.targets), clean_logits.shape[-1]), device=self.device)
        positions_agree = True
        for layer, indices in self.layer_groups():
            targets: list[_Target | None] = [self.targets[i] for i in indices]
            if check:
                final, agree = self._checked(batch, clean, layer, targets, replacement, clean_logits)
                positions_agree = positions_agree and agree
            else:
                mode = self.mode or "batch"
                final = self.ablated_final(batch, clean, layer, targets, replacement, mode, mode == "positions")
            logits = self.label_logits(final, None if scale is None else scale[:, None].expand(final.shape[:2]))
            effects[:, indices] = clean_logits[:, None] - logits
        if check:
            self.mode = "positions" if positions_agree else "batch"
        return effects

    def _checked(self, batch: _Batch, clean: _Clean, layer: int, targets: list[_Target | None], replacement: Any,
                 clean_logits: Tensor) -> tuple[Tensor, bool]:
        """One layer's ablations on the first batch by both forwards: rows of a batch from the embeddings up (the
        model's own attention; a row ablating nothing must give the clean logits, or the family is refused), and
        rows as positions from the layer up, kept for the other batches only where they agree."""
        rows = [None, *targets]
        try:
            reference = self.ablated_final(batch, clean, layer, rows, replacement, "batch", False)
        except Exception as err:  # noqa: BLE001 - whatever the family's forward raises, the answer is a refusal
            raise PartsError(f"parts cannot ablate {self.model_type} models exactly: its forward refuses a "
                             f"cached last token ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})") from err
        error = float((self.label_logits(reference[:, 0]) - clean_logits).abs().max()
                      / clean_logits.abs().max().clamp(min=1.0))
        if error > reconstruction_tolerance(self.dtype):
            raise PartsError(f"parts cannot ablate {self.model_type} models exactly: recomputing the last "
                             f"token from its cached keys and values does not give the model's logits (relative "
                             f"error {error:.1e})")
        try:
            fast = self.ablated_final(batch, clean, layer, rows, replacement, "positions", True)
        except Exception:  # noqa: BLE001 - this family's attention takes no custom mask: the batch forward it is
            return reference[:, 1:], False
        expected = self.label_logits(reference)
        error = float((self.label_logits(fast) - expected).abs().max() / expected.abs().max().clamp(min=1.0))
        return reference[:, 1:], error <= reconstruction_tolerance(self.dtype)

    def __call__(self) -> TotalEffects:
        started, cpu_started = time.perf_counter(), time.process_time()
        self.settle_batching()
        n = self.run.n_examples
        replacement = self._replacement_pass()
        effects = torch.zeros((n, len(self.targets), len(self.run.label_token_ids)))
        clean_logits = torch.zeros((n, len(self.run.label_token_ids)))
        with tqdm(total=n, desc="total effects", disable=not self.progress, unit="example") as bar:
            for number, batch in enumerate(self.batches()):
                clean = self.clean(batch)
                logits = self.label_logits(clean.final_in).cpu()
                check_clean_logits(self.run, batch.rows, logits, self.dtype)
                effects[batch.rows] = self.effects_of_batch(batch, clean, replacement, check=number == 0).cpu()
                clean_logits[batch.rows] = logits
                bar.update(len(batch.rows))
        info = {**self._info("exact", "last", started, cpu_started), "forward": self.mode}
        return TotalEffects(effects, clean_logits, list(self.run.component_names), info)


    def _info(self, method: str, positions: str, started: float, cpu_started: float) -> dict[str, Any]:
        info = {"method": method, "positions": positions, "ablation": self.ablation, "freeze_norm": self.freeze_norm,
                "model": self.run.model, "dtype": str(self.dtype).replace("torch.", ""), "engine": "hf",
                "n_examples": self.run.n_examples, "seconds": round(time.perf_counter() - started, 3),
                "cpu_seconds": round(time.process_time() - cpu_started, 3)}
        if self.ablation == "resample":
            info["resample_seed"] = RESAMPLE_SEED
        if self.run.info.get("split_experts"):
            info["split_experts"] = True
        return info

    # -- attribution patching ---------------------------------------------------------------------------------
    def attribution(self) -> TotalEffects:
        """Attribution patching at the last position: each label's gradient at every component's output times
        the ablation's change of that output, one forward and one backward pass per label and batch."""
        if self.freeze_norm and (any(p is not None for p in self.layout.post_attn_paths)
                                 or any(p is not None for p in self.layout.post_mlp_paths)):
            raise PartsError("--method attribution --freeze-norm freezes the final norm only; this model has post-norms: "
                             "use --method exact")
        started, cpu_started = time.perf_counter(), time.process_time()
        self.settle_batching()
        n, n_labels = self.run.n_examples, len(self.run.label_token_ids)
        replacement = self._replacement_pass()
        effects = torch.zeros((n, len(self.targets), n_labels))
        clean_logits = torch.zeros((n, n_labels))
        with tqdm(total=n, desc="attribution", disable=not self.progress, unit="example") as bar:
            for batch in self.batches():
                clean = self.clean(batch)
                effects[batch.rows] = self._attribution_batch(batch, clean, replacement).cpu()
                clean_logits[batch.rows] = self.label_logits(clean.final_in).cpu()
                bar.update(len(batch.rows))
        info = self._info("attribution", "last", started, cpu_started)
        return TotalEffects(effects, clean_logits, list(self.run.component_names), info)

    def _attribution_batch(self, batch: _Batch, clean: _Clean, replacement: Any) -> Float[Tensor, "batch component label"]:
        """One batch: a last-token forward with a zero tensor added at every component's output, then each label's
        gradient with respect to those tensors, times the ablation's change (clean minus ablated: minus that)."""
        size = len(batch.rows)
        modules = {name: self.hf.get_submodule(path) for name, (path, _) in self.layout.taps.items()}
        z_leaf = torch.zeros((size, self.n_layers, self.n_heads * clean.z.shape[-1]), device=self.device,
                             dtype=self.dtype, requires_grad=True)
        mlp_leaf = torch.zeros((size, self.n_layers, clean.final_in.shape[-1]), device=self.device, dtype=self.dtype,
                               requires_grad=True)
        captured: dict[str, Tensor] = {}
        self._rows_shape = (size, 1)
        handles = []
        for layer in range(self.n_layers):
            def pre(_m: nn.Module, args: tuple, kwargs: dict, layer: int = layer) -> tuple[tuple, dict]:
                value = args[0] if args else kwargs["hidden_states"]
                new = (self._rows(value) + z_leaf[:, layer, None]).reshape(value.shape)
                return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

            def post(_m: nn.Module, _args: tuple, output: Any, layer: int = layer) -> Any:
                value = output[0] if isinstance(output, tuple) else output
                new = (self._rows(value) + mlp_leaf[:, layer, None]).reshape(value.shape)
                return (new, *output[1:]) if isinstance(output, tuple) else new
            handles.append(modules[z_name(layer)].register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(modules[self.layout.mlp_out[layer]].register_forward_hook(post))

        def capture(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            captured["final"] = self._rows(args[0] if args else kwargs["hidden_states"]).float()[:, 0]
            raise _Stop
        handles.append(self.hf.get_submodule(self.layout.taps[FINAL_NORM_IN][0]).register_forward_pre_hook(
            capture, with_kwargs=True))
        with torch.enable_grad():
            _until_final_norm(lambda: self.hf(
                batch.ids[:, -1:], attention_mask=batch.mask, position_ids=self._last_positions(batch),
                past_key_values=_layer_copies(batch.cache, detach=True), use_cache=batch.cache is not None,
                logits_to_keep=1), handles)
        n_labels = len(self.run.label_token_ids)
        effects = torch.zeros((size, len(self.targets), n_labels), device=self.device)
        z_delta, mlp_delta = self._deltas(batch, clean, replacement)
        with torch.enable_grad():
            scale = self.readout.final_norm.scale(clean.final_in) if self.freeze_norm else None
            logits = self.label_logits(captured["final"], scale)
            for label in range(n_labels):
                z_grad, mlp_grad = torch.autograd.grad(logits[:, label].sum(), [z_leaf, mlp_leaf],
                                                       retain_graph=label < n_labels - 1)
                z_grad = einops.rearrange(z_grad.float(), "batch layer (head d_head) -> batch layer head d_head",
                                          head=self.n_heads)
                for c, target in enumerate(self.targets):
                    if target.kind == HEAD:
                        change = (z_grad[:, target.layer, target.index] * z_delta[:, target.layer, target.index]).sum(-1)
                    else:
                        change = (mlp_grad[:, target.layer].float() * mlp_delta[target.layer][:, target.index]).sum(-1)
                    effects[:, c, label] = -change.detach()
        return effects

    def _replacement_pass(self) -> Any:
        if self.ablation == "zero":
            return None
        cleans = [(batch.rows, self.clean(batch))  # one batch's keys and values alive at a time
                  for batch in tqdm(self.batches(), desc="clean pass", disable=not self.progress, unit="batch")]
        return self.replacements(cleans)

    def _deltas(self, batch: _Batch, clean: _Clean, replacement: Any) -> tuple[Tensor, list[Tensor]]:
        """(replacement - clean) for every head's z and every MLP part of a batch."""
        if replacement is None:
            return -clean.z, [-part for part in clean.mlp_parts]
        index = torch.tensor(batch.rows, device=self.device)
        return replacement[0][index] - clean.z, [r[index] - part for r, part in zip(replacement[1], clean.mlp_parts, strict=True)]

    # -- every position -----------------------------------------------------------------------------------------
    def all_positions(self, yes: bool) -> TotalEffects:
        """Ablation at every position of the prompt (the demonstrations' reading included): every prompt rerun in
        full once per component. Mean ablation replaces each position's output by the component's mean output at
        the same distance from the end of the prompt over the run's examples."""
        if self.ablation == "resample":
            raise PartsError("--positions all takes --ablation mean or zero (resample would keep every example's "
                             "outputs at every position)")
        if self.freeze_norm:
            raise PartsError("--freeze-norm is for --positions last: drop one of them")
        if any(self.n_experts):
            raise PartsError("--positions all does not split experts: use --positions last for a --split-experts run")
        started, cpu_started = time.perf_counter(), time.process_time()
        self.settle_batching()
        token_lists = self.token_lists()
        n, n_labels = len(token_lists), len(self.run.label_token_ids)
        order = sorted(range(n), key=lambda i: -len(token_lists[i]))
        batches = [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
        longest = len(token_lists[order[0]])
        modules = {name: self.hf.get_submodule(path) for name, (path, _) in self.layout.taps.items()}
        sums: dict[str, Tensor] = {}
        counts = torch.zeros(longest, device=self.device)
        clean_logits = torch.zeros((n, n_labels))

        def padded(rows: list[int]) -> tuple[Tensor, Tensor]:
            width = max(len(token_lists[i]) for i in rows)
            ids = torch.full((len(rows), width), self.decomposer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, i in enumerate(rows):
                ids[row, width - len(token_lists[i]):] = torch.tensor(token_lists[i])
                mask[row, width - len(token_lists[i]):] = 1
            return ids.to(self.device), mask.to(self.device)

        def forward(ids: Tensor, mask: Tensor, handles: list[Any]) -> Tensor:
            captured: dict[str, Tensor] = {}

            def capture(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                value = args[0] if args else kwargs["hidden_states"]
                captured["final"] = value.reshape(ids.shape[0], ids.shape[1], -1)[:, -1].float()
                raise _Stop
            handles.append(self.hf.get_submodule(self.layout.taps[FINAL_NORM_IN][0]).register_forward_pre_hook(
                capture, with_kwargs=True))
            with torch.inference_mode():
                _until_final_norm(lambda: self.hf(ids, attention_mask=mask, position_ids=suffix_position_ids(mask, 0),
                                                  use_cache=False, logits_to_keep=1), handles)
            return captured["final"]

        def by_distance(value: Tensor, mask: Tensor) -> Tensor:
            """[distance from the end, feature]: a batch's outputs summed over its real tokens."""
            shaped = value.reshape(mask.shape[0], mask.shape[1], -1).float() * mask[:, :, None]
            return shaped.sum(0).flip(0)

        clean_seconds = 0.0
        for rows in batches:
            ids, mask = padded(rows)
            handles = []
            for layer in range(self.n_layers):
                for name in (z_name(layer), self.layout.mlp_out[layer]):
                    def accumulate(value: Tensor, name: str = name, mask: Tensor = mask) -> None:
                        summed = by_distance(value, mask)
                        total = sums.setdefault(name, torch.zeros((longest, summed.shape[-1]), device=self.device))
                        total[:summed.shape[0]] += summed
                    if name == z_name(layer):
                        handles.append(modules[name].register_forward_pre_hook(
                            lambda _m, args, kwargs, f=accumulate: f(args[0] if args else kwargs["hidden_states"]),
                            with_kwargs=True))
                    else:
                        handles.append(modules[name].register_forward_hook(
                            lambda _m, _a, out, f=accumulate: f(out[0] if isinstance(out, tuple) else out)))
            tick = time.perf_counter()
            final = forward(ids, mask, handles)
            clean_seconds += time.perf_counter() - tick
            counts[:mask.shape[1]] += mask.flip(1).sum(0)
            clean_logits[rows] = self.label_logits(final).cpu()
            check_clean_logits(self.run, rows, clean_logits[rows], self.dtype)
            if rows is batches[0] and len(self.targets) * n > ALL_POSITIONS_LIMIT and not yes:
                estimate = clean_seconds * len(batches) * (len(self.targets) + 1)
                raise PartsError(
                    f"--positions all reruns every prompt once per component: {len(self.targets)} components x {n} "
                    f"examples would take about {estimate / 3600:.1f} h here (measured on the first batch); add --yes "
                    f"to run it, or use a run with fewer examples")
        means = {name: total / counts.clamp(min=1)[:, None] for name, total in sums.items()}
        effects = torch.zeros((n, len(self.targets), n_labels))
        with tqdm(total=len(self.targets) * n, desc="all positions", disable=not self.progress, unit="ablation") as bar:
            for c, target in enumerate(self.targets):
                name = z_name(target.layer) if target.kind == HEAD else self.layout.mlp_out[target.layer]
                for rows in batches:
                    ids, mask = padded(rows)
                    width = ids.shape[1]
                    mean = means[name][:width].flip(0)  # [position, feature] of this batch's left-padded positions

                    def replace(value: Tensor, target: _Target = target, mean: Tensor = mean, ids: Tensor = ids) -> Tensor:
                        shaped = value.reshape(ids.shape[0], ids.shape[1], -1).clone()
                        new = mean.to(value.dtype) if self.ablation == "mean" else torch.zeros_like(mean, dtype=value.dtype)
                        if target.kind == HEAD:
                            d_head = shaped.shape[-1] // self.n_heads
                            part = slice(target.index * d_head, (target.index + 1) * d_head)
                            shaped[:, :, part] = new[None, :, part]
                        else:
                            shaped[:, :, :] = new[None]
                        return shaped.reshape(value.shape)
                    if target.kind == HEAD:
                        handle = modules[name].register_forward_pre_hook(
                            lambda _m, args, kwargs, f=replace: ((f(args[0]), *args[1:]), kwargs) if args
                            else (args, {**kwargs, "hidden_states": f(kwargs["hidden_states"])}), with_kwargs=True)
                    else:
                        handle = modules[name].register_forward_hook(
                            lambda _m, _a, out, f=replace: (f(out[0]), *out[1:]) if isinstance(out, tuple) else f(out))
                    final = forward(ids, mask, [handle])
                    effects[rows, c] = clean_logits[rows] - self.label_logits(final).cpu()
                    bar.update(len(rows))
        info = self._info("exact", "all", started, cpu_started)
        info["mean_position"] = "the same distance from the end of the prompt"
        return TotalEffects(effects, clean_logits, list(self.run.component_names), info)


def _until_final_norm(forward: Any, handles: list[Any]) -> None:
    """Run `forward()` until the final norm's capturing hook stops it (`_Stop`), then remove `handles`."""
    try:
        forward()
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()


def _layer_copies(cache: Any, repeats: int = 1, detach: bool = False) -> Any:
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
