"""Attribution patching at the last position: the gradient of each label-word logit at every component's output
times the ablation's change of that output."""

from __future__ import annotations

import time
from typing import Any

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from parts.components import HEAD
from parts.decomposition.effect_data import TotalEffects
from parts.decomposition.effects.common import Batch, Clean, StopAtFinalNorm, layer_copies, until_final_norm
from parts.decomposition.effects.runner import RunnerBase
from parts.errors import PartsError
from parts.model.readout import FINAL_NORM_IN, z_name


class AttributionPatching(RunnerBase):
    """Attribution patching at the last token (`attribution`)."""

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

    def _attribution_batch(self, batch: Batch, clean: Clean, replacement: Any) -> Float[Tensor, "batch component label"]:
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
            raise StopAtFinalNorm
        handles.append(self.hf.get_submodule(self.layout.taps[FINAL_NORM_IN][0]).register_forward_pre_hook(
            capture, with_kwargs=True))
        with torch.enable_grad():
            until_final_norm(lambda: self.hf(
                batch.ids[:, -1:], attention_mask=batch.mask, position_ids=self._last_positions(batch),
                past_key_values=layer_copies(batch.cache, detach=True), use_cache=batch.cache is not None,
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

