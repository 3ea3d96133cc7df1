"""Ablation at every position of the prompt (`--positions all`): every prompt rerun in full once per component."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from parts.components import HEAD
from parts.decomposition.effect_data import TotalEffects
from parts.decomposition.effects.common import StopAtFinalNorm, Target, check_clean_logits, until_final_norm
from parts.decomposition.effects.runner import RunnerBase
from parts.errors import PartsError
from parts.model.engines import suffix_position_ids
from parts.model.readout import FINAL_NORM_IN, z_name

# --positions all reruns every prompt in full once per component: refused beyond this many component-examples
# without `yes` (with an estimate of the time it would take).
ALL_POSITIONS_LIMIT = 3000


def duration(seconds: float) -> str:
    """`seconds` for a person: seconds under two minutes, minutes under two hours, else hours."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


class AllPositions(RunnerBase):
    """Ablation at every position (`all_positions`)."""

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
                raise StopAtFinalNorm
            handles.append(self.hf.get_submodule(self.layout.taps[FINAL_NORM_IN][0]).register_forward_pre_hook(
                capture, with_kwargs=True))
            with torch.inference_mode():
                until_final_norm(lambda: self.hf(ids, attention_mask=mask, position_ids=suffix_position_ids(mask, 0),
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
                # the first batch's seconds per (padded) token, times every batch's tokens, once per component
                # and once for this clean pass
                tokens = [len(batch) * max(len(token_lists[i]) for i in batch) for batch in batches]
                estimate = clean_seconds / tokens[0] * sum(tokens) * (len(self.targets) + 1)
                raise PartsError(
                    f"--positions all reruns every prompt once per component: {len(self.targets)} components x {n} "
                    f"examples would take about {duration(estimate)} here (measured on the first batch); add --yes "
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

                    def replace(value: Tensor, target: Target = target, mean: Tensor = mean, ids: Tensor = ids) -> Tensor:
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


