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

    def attribution(self) -> TotalEffects:
        """Attribution patching at the last position: each label's gradient at every component's output times
        the ablation's change of that output.

        One pass over the batches: the clean last token, then a last-token forward with a zero tensor added at
        every component's output and one backward pass per label (the gradient at a component's last-position
        output flows only through the last token: the earlier keys and values do not depend on it). The
        effect is linear in the replacement (`-grad . (replacement - clean)`), so the gradients and clean
        values are kept and the replacement (a mean or another example's output) is applied after the pass:
        no separate clean pass for the means."""
        if self.freeze_norm and (any(p is not None for p in self.layout.post_attn_paths)
                                 or any(p is not None for p in self.layout.post_mlp_paths)):
            raise PartsError("--method attribution --freeze-norm freezes the final norm only; this model has post-norms: "
                             "use --method exact")
        started, cpu_started = time.perf_counter(), time.process_time()
        self.settle_batching()
        n, n_labels = self.run.n_examples, len(self.run.label_token_ids)
        clean_logits = torch.zeros((n, n_labels))
        cleans: list[tuple[list[int], Clean]] = []
        z_grads: Tensor | None = None
        mlp_grads: Tensor | None = None
        with tqdm(total=n, desc="attribution", disable=not self.progress, unit="example") as bar:
            for batch in self.batches():
                clean = self.clean(batch)
                z_grad, mlp_grad = self._gradients(batch, clean)
                if z_grads is None or mlp_grads is None:
                    z_grads = z_grad.new_zeros((n, *z_grad.shape[1:]))
                    mlp_grads = mlp_grad.new_zeros((n, *mlp_grad.shape[1:]))
                index = torch.tensor(batch.rows, device=self.device)
                z_grads[index], mlp_grads[index] = z_grad, mlp_grad
                cleans.append((batch.rows, clean))
                clean_logits[batch.rows] = self.label_logits(clean.final_in).cpu()
                bar.update(len(batch.rows))
        assert z_grads is not None and mlp_grads is not None
        effects = self._attribution_effects(cleans, z_grads, mlp_grads).cpu()
        info = self._info("attribution", "last", started, cpu_started)
        return TotalEffects(effects, clean_logits, list(self.run.component_names), info)

    def _gradients(self, batch: Batch, clean: Clean) -> tuple[Float[Tensor, "batch label layer head d_head"],
                                                             Float[Tensor, "batch label layer d_model"]]:
        """One batch: a last-token forward with a zero tensor added at every head's z and every MLP's output, then
        each label-word logit's gradient with respect to those tensors (one backward pass per label)."""
        size = len(batch.rows)
        modules = {name: self.hf.get_submodule(path) for name, (path, _) in self.layout.taps.items()}
        z_leaf = torch.zeros((size, self.n_layers, self.n_heads * clean.z.shape[-1]), device=self.device,
                             dtype=self.dtype, requires_grad=True)
        mlp_leaf = torch.zeros((size, self.n_layers, clean.final_in.shape[-1]), device=self.device, dtype=self.dtype,
                               requires_grad=True)
        captured: dict[str, Tensor] = {}
        self.rows_shape = (size, 1)
        handles = []
        for layer in range(self.n_layers):
            def pre(_m: nn.Module, args: tuple, kwargs: dict, layer: int = layer) -> tuple[tuple, dict]:
                value = args[0] if args else kwargs["hidden_states"]
                new = (self.as_rows(value) + z_leaf[:, layer, None]).reshape(value.shape)
                return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

            def post(_m: nn.Module, _args: tuple, output: Any, layer: int = layer) -> Any:
                value = output[0] if isinstance(output, tuple) else output
                new = (self.as_rows(value) + mlp_leaf[:, layer, None]).reshape(value.shape)
                return (new, *output[1:]) if isinstance(output, tuple) else new
            handles.append(modules[z_name(layer)].register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(modules[self.layout.mlp_out[layer]].register_forward_hook(post))

        def capture(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            captured["final"] = self.as_rows(args[0] if args else kwargs["hidden_states"]).float()[:, 0]
            raise StopAtFinalNorm
        handles.append(self.hf.get_submodule(self.layout.taps[FINAL_NORM_IN][0]).register_forward_pre_hook(
            capture, with_kwargs=True))
        with torch.enable_grad():
            until_final_norm(lambda: self.hf(
                batch.ids[:, -1:], attention_mask=batch.mask, position_ids=self.last_positions(batch),
                past_key_values=layer_copies(batch.cache, detach=True), use_cache=batch.cache is not None,
                logits_to_keep=1), handles)
        n_labels = len(self.run.label_token_ids)
        z_grads, mlp_grads = [], []
        with torch.enable_grad():
            scale = self.readout.final_norm.scale(clean.final_in) if self.freeze_norm else None
            logits = self.label_logits(captured["final"], scale)
            for label in range(n_labels):
                z_grad, mlp_grad = torch.autograd.grad(logits[:, label].sum(), [z_leaf, mlp_leaf],
                                                       retain_graph=label < n_labels - 1)
                z_grads.append(z_grad.float())
                mlp_grads.append(mlp_grad.float())
        z_grad = einops.rearrange(torch.stack(z_grads, dim=1),
                                  "batch label layer (head d_head) -> batch label layer head d_head", head=self.n_heads)
        return z_grad, torch.stack(mlp_grads, dim=1)

    def _attribution_effects(self, cleans: list[tuple[list[int], Clean]],
                             z_grads: Float[Tensor, "example label layer head d_head"],
                             mlp_grads: Float[Tensor, "example label layer d_model"]
                             ) -> Float[Tensor, "example component label"]:
        """Minus each label's gradient times the ablation's change (replacement - clean) of every component's output:
        clean minus ablated logits, to first order."""
        z_clean, mlp_clean = self.stack_cleans(cleans)
        replacement = self.replacement_of(z_clean, mlp_clean)
        z_new, mlp_new = (torch.zeros_like(z_clean), [torch.zeros_like(m) for m in mlp_clean]) \
            if replacement is None else replacement
        head_change = einops.einsum(z_grads, z_new - z_clean,
                                    "example label layer head d_head, example layer head d_head -> example layer head label")
        mlp_change = [einops.einsum(mlp_grads[:, :, layer], new - clean,
                                    "example label d_model, example part d_model -> example part label")
                      for layer, (new, clean) in enumerate(zip(mlp_new, mlp_clean, strict=True))]
        changes = [head_change[:, t.layer, t.index] if t.kind == HEAD else mlp_change[t.layer][:, t.index]
                   for t in self.targets]
        return -torch.stack(changes, dim=1)
