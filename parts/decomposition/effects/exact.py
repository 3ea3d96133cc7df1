"""Exact total effects at the last position: each layer's ablations as rows of one last-token forward, started
at that layer from the clean residual stream, with the clean prompt's keys and values."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import einops
import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from parts.components import HEAD
from parts.decomposition.effect_data import TotalEffects
from parts.decomposition.effects.common import Batch, Clean, StopAtFinalNorm, Target, check_clean_logits, layer_copies
from parts.decomposition.effects.runner import RunnerBase
from parts.decomposition.exactness import reconstruction_tolerance
from parts.errors import PartsError
from parts.model.readout import FINAL_NORM_IN, z_name

# The clean pass for the means keeps every batch's suffix keys and values for the ablations (instead of computing
# the suffixes twice) while they fit in this many bytes.
KEEP_BYTES = 2**30


class ExactLastPosition(RunnerBase):
    """Exact ablation at the last token (`__call__`)."""

    # -- the ablated forward -----------------------------------------------------------------------------------
    def ablated_final(self, batch: Batch, clean: Clean, start: int, targets: Sequence[Target | None],
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
        self.rows_shape = (n, rows)
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
            captured["final"] = self.as_rows(value).float()
            raise StopAtFinalNorm
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
        except StopAtFinalNorm:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if "final" not in captured:
            raise RuntimeError("the final norm was never reached: the model's forward does not end in its final norm")
        return captured["final"]

    def _forward_rows(self, batch: Batch, rows: int, mode: str, first: int) -> None:
        n = len(batch.rows)
        last = batch.ids[:, -1:]
        positions = self.last_positions(batch)
        if mode == "positions":
            # Every row a position of one sequence after the prompt, each seeing the prompt's keys and values and itself.
            keys = batch.mask.shape[1] - 1
            allowed = torch.cat([batch.mask[:, None, :-1].expand(n, rows, keys).bool(),
                                 torch.eye(rows, dtype=torch.bool, device=self.device).expand(n, rows, rows)], dim=2)
            bias = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
            bias = bias.masked_fill(~allowed, torch.finfo(self.dtype).min)[:, None]
            self.hf(last.expand(n, rows), attention_mask=bias, position_ids=positions.expand(n, rows),
                    past_key_values=layer_copies(batch.cache), use_cache=batch.cache is not None, logits_to_keep=1)
        else:
            cache = layer_copies(batch.cache, repeats=rows)
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

    def _replace_input(self, new: Float[Tensor, "batch row head d_head"], chosen: Bool[Tensor, "row head"]) -> Any:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            value = args[0] if args else kwargs["hidden_states"]
            heads = self.as_rows(value).reshape(*new.shape)
            out = torch.where(chosen[None, :, :, None], new.to(value.dtype), heads).reshape(value.shape)
            return ((out, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": out})
        return hook

    def _replace_output(self, new: Float[Tensor, "batch row d_model"], chosen: Bool[Tensor, " row"],
                        change: Float[Tensor, "batch row d_model"]) -> Any:
        def hook(_m: nn.Module, _args: tuple, output: Any) -> Any:
            value = output[0] if isinstance(output, tuple) else output
            rows = torch.where(chosen[None, :, None], new.to(value.dtype), self.as_rows(value)) + change.to(value.dtype)
            out = rows.reshape(value.shape)
            return (out, *output[1:]) if isinstance(output, tuple) else out
        return hook

    def _freeze(self, norm: Any, scale: Float[Tensor, " batch"], row_mask: Tensor) -> Any:
        def hook(_m: nn.Module, args: tuple, output: Any) -> Any:
            value = output[0] if isinstance(output, tuple) else output
            x = self.as_rows(args[0]).float()
            fixed = norm.centre(x) / scale[:, None, None] * norm.weight
            if norm.bias is not None:
                fixed = fixed + norm.bias
            new = torch.where(row_mask[None, :, None], fixed.to(value.dtype), self.as_rows(value)).reshape(value.shape)
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    # -- everything ---------------------------------------------------------------------------------------------
    def layer_groups(self) -> list[tuple[int, list[int]]]:
        """(layer, indices of the run's components at that layer), layer by layer: the ablations that run as rows
        of one forward started at that layer (more layers per forward measured no faster: benchmarks/results.md)."""
        groups: dict[int, list[int]] = {}
        for i, target in enumerate(self.targets):
            groups.setdefault(target.layer, []).append(i)
        return sorted(groups.items())

    def effects_of_batch(self, batch: Batch, clean: Clean, replacement: Any, check: bool
                         ) -> Float[Tensor, "batch component label"]:
        """Total effects of every component on one batch; `check`: settle the forward's mode on this batch."""
        clean_logits = self.label_logits(clean.final_in)
        scale = (self.readout.final_norm.scale(clean.final_in) if self.freeze_norm else None)
        effects = torch.zeros((len(batch.rows), len(self.targets), clean_logits.shape[-1]), device=self.device)
        groups = self.layer_groups()
        checked: dict[int, Tensor] = {}
        if check:  # the first two layers' ablations: rows through every layer, and rows started past the embeddings
            agree = True
            for layer, indices in groups[:2]:
                checked[layer], agrees = self._checked(batch, clean, layer, [self.targets[i] for i in indices],
                                                       replacement, clean_logits)
                agree = agree and agrees
            self.mode = "positions" if agree else "batch"
        for layer, indices in groups:
            final = checked[layer] if layer in checked else self.ablated_final(
                batch, clean, layer, [self.targets[i] for i in indices], replacement, self.mode or "batch",
                self.mode == "positions")
            logits = self.label_logits(final, None if scale is None else scale[:, None].expand(final.shape[:2]))
            effects[:, indices] = clean_logits[:, None] - logits
        return effects

    def _checked(self, batch: Batch, clean: Clean, layer: int, targets: list[Target | None], replacement: Any,
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
        replacement, kept = None, None
        if self.ablation != "zero":  # the clean pass for the replacements keeps the batches' keys and values
            replacement, kept = self.clean_pass(KEEP_BYTES)
        effects = torch.zeros((n, len(self.targets), len(self.run.label_token_ids)))
        clean_logits = torch.zeros((n, len(self.run.label_token_ids)))
        with tqdm(total=n, desc="total effects", disable=not self.progress, unit="example") as bar:
            for number, batch in enumerate(self.batches() if kept is None else self.kept_batches(kept)):
                clean = batch.clean if batch.clean is not None else self.clean(batch)
                logits = self.label_logits(clean.final_in).cpu()
                check_clean_logits(self.run, batch.rows, logits, self.dtype)
                effects[batch.rows] = self.effects_of_batch(batch, clean, replacement, check=number == 0).cpu()
                clean_logits[batch.rows] = logits
                bar.update(len(batch.rows))
        info = {**self._info("exact", "last", started, cpu_started), "forward": self.mode}
        return TotalEffects(effects, clean_logits, list(self.run.component_names), info)


