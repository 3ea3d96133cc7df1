"""The runner's base: the model and run, the batches (the shared prefix computed once, the keys and values of every
position but the last), the clean last-token pass, and what an ablation replaces a component's output by."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from typing import Any

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from parts.components import HEAD, MLP
from parts.decomposition.decompose import Decomposer
from parts.decomposition.effects.common import (
    ABLATIONS,
    RESAMPLE_SEED,
    Batch,
    Clean,
    cache_tensors,
    check_clean_logits,
    check_run_matches,
    layer_copies,
    resample_order,
    suffix_keys_values,
    targets_of,
)
from parts.decomposition.runs import DecompositionRun
from parts.errors import PartsError
from parts.model.engines import suffix_position_ids
from parts.model.loading import plain_model
from parts.model.readout import FINAL_NORM_IN, RESID_0, experts_name, z_name


class RunnerBase:
    """One run's model, batches, clean pass and replacements: what every stage (exact, attribution, all positions)
    starts from."""

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
        self.targets = targets_of(run.component_names, self.n_experts)
        self.device, self.dtype = self.decomposer.device, self.decomposer.dtype
        blocks_path = self.layout.taps[RESID_0][0].rsplit(".", 1)[0]
        parent_path, _, self.blocks_attr = blocks_path.rpartition(".")
        self.blocks_parent = self.hf.get_submodule(parent_path) if parent_path else self.hf
        self.blocks: nn.ModuleList = getattr(self.blocks_parent, self.blocks_attr)
        self.mode: str | None = None  # "positions" or "batch", settled on the first batch
        self.prefix_reuse = True
        self._prefix: tuple[list[int], Any] | None = None  # the shared prefix's tokens and keys and values
        self.prefix: Any = None  # the latest pass's prefix cache (None: no shared prefix)
        self.prefix_length = 0
        self.model_type = str(getattr(self.hf.config, "model_type", type(self.hf).__name__))
        self.rows_shape = (0, 0)
        """(examples, rows per example) of the running forward: how `as_rows` views its activations; set by whoever
        runs a forward with several rows per example (the ablations, attribution, reweighting's gates)."""

    # -- tokens and the clean pass ----------------------------------------------------------------------------
    def token_lists(self) -> list[list[int]]:
        if self.run.token_ids is not None:
            return [list(t) for t in self.run.token_ids]
        return self.decomposer.tokenize(self.run.prompts.prompts)

    def batches(self) -> Iterator[Batch]:
        """The run's examples, longest first, `batch_size` at a time, with the keys and values of every
        position but the last (the shared prefix computed once, as the decomposition does)."""
        token_lists = self.token_lists()
        reuse = self.prefix_reuse and len(token_lists) > 1
        prefix_length = self.decomposer.shared_prefix_length(token_lists) if reuse else 0
        config: Any = self.hf.config
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        if prefix_length and isinstance(window, int) and max(len(t) for t in token_lists) > window:
            prefix_length = 0  # padding after a prefix would take a sliding window's key slots (as in decompose)
        prefix_cache = self._prefix_cache(token_lists[0][:prefix_length]) if prefix_length else None
        if prefix_cache is None:
            prefix_length = 0
        self.prefix_length, self.prefix = prefix_length, prefix_cache
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
            yield Batch(rows, ids, mask, cache)

    def _prefix_cache(self, tokens: list[int]) -> Any:
        """The shared prefix's keys and values, computed once per runner (every pass over the batches reuses them)."""
        if self._prefix is None or self._prefix[0] != tokens:
            self._prefix = (tokens, self.decomposer.prefix_cache(tokens))
        return self._prefix[1]

    def clean_pass(self, keep_bytes: int = 0) -> tuple[Any, list[tuple[Batch, list[tuple[Tensor, Tensor]] | None]] | None]:
        """Every batch's clean last token, and the replacement computed from them (None: zero ablation); with
        `keep_bytes`, also the batches, their suffixes' keys and values kept while they fit in that many bytes
        (None: they did not, or this cache cannot be split from the prefix), for `kept_batches`."""
        cleans = []
        kept: list[tuple[Batch, list[tuple[Tensor, Tensor]] | None]] | None = [] if keep_bytes > 0 else None
        size = 0
        for batch in tqdm(self.batches(), desc="clean pass", disable=not self.progress, unit="batch"):
            batch.clean = self.clean(batch)
            cleans.append((batch.rows, batch.clean))
            if kept is not None:
                suffix = suffix_keys_values(batch.cache, self.prefix_length) if self.prefix is not None else None
                tensors = [t for pair in suffix for t in pair] if suffix is not None else cache_tensors(batch.cache)
                size += sum(t.numel() * t.element_size() for t in tensors)
                if size > keep_bytes or (self.prefix is not None and suffix is None):
                    kept = None  # recomputed instead: one batch's keys and values alive at a time
                else:
                    kept.append((Batch(batch.rows, batch.ids, batch.mask, None if suffix is not None else batch.cache,
                                       batch.clean), suffix))
        return self.replacements(cleans), kept

    def kept_batches(self, kept: list[tuple[Batch, list[tuple[Tensor, Tensor]] | None]]) -> Iterator[Batch]:
        """The batches `clean_pass` kept, each with its full cache again (the shared prefix's, then its suffix's)."""
        for batch, suffix in kept:
            if suffix is not None:
                batch.cache = copy.deepcopy(self.prefix)
                batch.cache.batch_repeat_interleave(len(batch.rows))
                for layer, (keys, values) in zip(batch.cache.layers, suffix, strict=True):
                    layer.keys, layer.values = torch.cat([layer.keys, keys], -2), torch.cat([layer.values, values], -2)
            yield batch
            batch.cache = None

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

    def clean(self, batch: Batch) -> Clean:
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
                self.hf(batch.ids[:, -1:], attention_mask=batch.mask, position_ids=self.last_positions(batch),
                        past_key_values=layer_copies(batch.cache), use_cache=batch.cache is not None, logits_to_keep=1)
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
        return Clean(z, mlp_parts, torch.stack([resid[l] for l in range(self.n_layers)], dim=1),
                      activations[FINAL_NORM_IN].float().reshape(n, -1), post_in)

    def last_positions(self, batch: Batch) -> Int[Tensor, "batch 1"]:
        """The position id of each example's last token after the shared prefix (left padding does not count), for a
        forward of the last token alone."""
        return suffix_position_ids(batch.mask, self.prefix_length)[:, -1:]

    def label_logits(self, final_in: Float[Tensor, "... d_model"],
                     scale: Float[Tensor, ...] | None = None) -> Float[Tensor, "... label"]:
        """Label-word logits (pre-soft-cap) read from the final norm's input; `scale`: a frozen final-norm scale."""
        norm = self.readout.final_norm
        if scale is None:
            scale = (norm.centre(final_in).pow(2).mean(-1) + norm.eps).sqrt()
        return final_in @ self.readout.unembed / scale[..., None] + self.readout.constant

    # -- replacements ------------------------------------------------------------------------------------------
    def replacements(self, cleans: list[tuple[list[int], Clean]]) -> tuple[Tensor, list[Tensor]] | None:
        """Per example of the run, what each head's z and each MLP part is replaced by (None: zero ablation)."""
        if self.ablation == "zero":
            return None
        return self.replacement_of(*self.stack_cleans(cleans))

    def stack_cleans(self, cleans: list[tuple[list[int], Clean]]
                     ) -> tuple[Float[Tensor, "example layer head d_head"], list[Float[Tensor, "example part d_model"]]]:
        """Every example's clean z and MLP parts, in the run's order, from the batches' clean values."""
        n = self.run.n_examples
        z = torch.zeros((n, *cleans[0][1].z.shape[1:]), device=self.device)
        mlp = [torch.zeros((n, *part.shape[1:]), device=self.device) for part in cleans[0][1].mlp_parts]
        for rows, clean in cleans:
            index = torch.tensor(rows, device=self.device)
            z[index] = clean.z
            for layer, part in enumerate(clean.mlp_parts):
                mlp[layer][index] = part
        return z, mlp

    def replacement_of(self, z: Float[Tensor, "example layer head d_head"], mlp: list[Float[Tensor, "example part d_model"]]
                       ) -> tuple[Tensor, list[Tensor]] | None:
        """What the ablation replaces every example's clean z and MLP parts by (None: zero ablation)."""
        if self.ablation == "zero":
            return None
        if self.ablation == "mean":
            return z.mean(0, keepdim=True).expand_as(z), [m.mean(0, keepdim=True).expand_as(m) for m in mlp]
        source = resample_order(self.run.n_examples)
        return z[source], [m[source] for m in mlp]

    def as_rows(self, value: Tensor) -> Tensor:
        """A [batch row ...] view of an activation of the running forward ([batch row ...] as positions,
        [(batch row) 1 ...] as a batch, or flattened tokens [(batch row) ...]), by `rows_shape`."""
        n, rows = self.rows_shape
        return value.reshape(n, rows, -1)

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
