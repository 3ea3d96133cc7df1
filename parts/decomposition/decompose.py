"""Direct logit attribution of label-word logits to every attention head and MLP.

At the last prompt token the final residual stream is a sum:

    resid = embed (+ pos_embed) + sum_layer (sum_head z[layer, head] @ W_O[layer, head] + b_O[layer])
            + sum_layer mlp_out[layer]

The final norm is linear once its scale is frozen from the full residual stream, so each term
reaches the label-word logits on its own:

    logit[label] = sum_component component @ U[:, label] / scale + constant[label]

with U the unembedding's label-word columns times the norm's weight (centred over d_model for
LayerNorm, whose mean subtraction is then absorbed), and `constant` the norm's bias and the
unembedding's bias. Each head's readout is folded into its W_O once, so a batch costs one
small contraction on top of a forward pass that caches only the last position.

All test prompts of a run share their demonstrations: their longest common token prefix is
run once and its keys and values reused for every batch (exact, as attention is causal).
The forward passes themselves are run by an engine (parts.model.engines).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from parts.components import component_names
from parts.decomposition.runs import Decomposition
from parts.errors import PartsError
from parts.model.engines import Activations, BridgeEngine, make_engine

MAX_AUTO_BATCH_SIZE = 64  # beyond this a batch saves no time on any device measured
# On a CPU larger batches are slower, not faster: every batch copies the prefix's keys and values per prompt
# and pads to its longest prompt, while the matmuls are as efficient at 8 prompts (benchmarks/results.md:
# 24-shot sst2, batch 8 vs 64, 1.5x CPU time).
MAX_AUTO_BATCH_SIZE_CPU = 8
# Share of free memory an automatic batch may plan to use: the estimate below is rough, and on a
# CPU the memory is shared with other processes.
MEMORY_FRACTION = {"cuda": 0.8, "cpu": 0.5}
ESTIMATE_MARGIN = 2  # allocator slack and temporaries the per-prompt estimate leaves out


@dataclass(frozen=True)
class Readout:
    """The final norm (weight and bias; the scale comes per example) and unembedding,
    restricted to the label words."""

    unembed: Float[Tensor, "d_model label"]
    head_unembed: Float[Tensor, "layer head d_head label"]
    attn_bias_logits: Float[Tensor, label]  # sum over layers of b_O @ unembed (before / scale)
    constant: Float[Tensor, label]  # norm bias and unembedding bias: not divided by the scale

    @classmethod
    def from_model(cls, model: TransformerBridge, label_token_ids: Sequence[int]) -> Readout:
        norm = model.ln_final._original_component
        weight = norm.weight.detach().float()
        if getattr(model.cfg, "rmsnorm_uses_offset", False):
            weight = weight + 1.0  # Gemma-style RMSNorm multiplies by (1 + weight)
        ids = torch.tensor(list(label_token_ids), device=weight.device)
        W_U = model.W_U.detach().float()[:, ids]
        unembed = einops.einsum(weight, W_U, "d_model, d_model label -> d_model label")
        if not model.cfg.uses_rms_norm:
            # LayerNorm subtracts the mean: (x - mean x) . u == x . (u - mean u).
            unembed = unembed - einops.reduce(unembed, "d_model label -> 1 label", "mean")
        bias = getattr(norm, "bias", None)
        constant = _optional(model, "b_U", ids)
        if bias is not None:
            constant = constant + einops.einsum(bias.detach().float(), W_U, "d_model, d_model label -> label")
        head_unembed = einops.einsum(
            model.W_O.detach().float(), unembed, "layer head d_head d_model, d_model label -> layer head d_head label"
        )
        b_O = _optional(model, "b_O", None)
        attn_bias = b_O.sum(0) if b_O.ndim == 2 else torch.zeros_like(unembed[:, 0])
        attn_bias_logits = einops.einsum(attn_bias, unembed, "d_model, d_model label -> label")
        return cls(unembed, head_unembed, attn_bias_logits, constant)


def _optional(model: TransformerBridge, name: str, ids: Tensor | None) -> Tensor:
    """A bias the model may not have (bias-free models raise): zeros then."""
    try:
        value = getattr(model, name).detach().float()
    except AttributeError:
        return torch.zeros(len(ids) if ids is not None else 1, device=model.W_U.device)
    return value[ids] if ids is not None else value


def _last(activations: Activations, name: str) -> Tensor:
    """The activation at the last position (the only one kept), in float32."""
    return activations[name][:, -1].float()


def free_memory_bytes(device: torch.device) -> int:
    """Memory a new batch can use now: free CUDA memory, or the system's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil
    except ImportError:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return int(psutil.virtual_memory().available)


def prompt_memory_bytes(cfg: Any, new_tokens: int, prefix_tokens: int, element_bytes: int) -> int:
    """Rough peak memory one prompt adds to a batch: its keys and values in every layer, one
    layer's activations (inference mode frees the others), attention scores, the cached
    last-position activations and one row of logits."""
    n_heads = int(cfg.n_heads)
    n_kv_heads = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    d_head, d_model, d_mlp, n_layers = int(cfg.d_head), int(cfg.d_model), int(cfg.d_mlp), int(cfg.n_layers)
    keys = prefix_tokens + new_tokens
    kv_cache = 2 * n_layers * n_kv_heads * d_head * keys
    layer = new_tokens * (6 * d_model + 3 * d_mlp)
    scores = 2 * n_heads * new_tokens * keys * max(element_bytes, 4) // element_bytes  # softmax runs in float32
    cached = n_layers * (n_heads * d_head + d_model) + int(cfg.d_vocab)
    return (kv_cache + layer + scores + cached) * element_bytes


def auto_batch_size(
    model: TransformerBridge, token_lists: Sequence[Sequence[int]], prefix_length: int, free_bytes: int | None = None
) -> int:
    """The largest batch whose longest prompts fit a share of free memory, from 1 to MAX_AUTO_BATCH_SIZE (8 on a CPU)."""
    device = model.W_U.device
    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    budget = free * MEMORY_FRACTION.get(device.type, 0.5)
    longest = max(len(t) for t in token_lists) - prefix_length
    per_prompt = ESTIMATE_MARGIN * prompt_memory_bytes(model.cfg, longest, prefix_length, model.W_U.element_size())
    cap = MAX_AUTO_BATCH_SIZE_CPU if device.type == "cpu" else MAX_AUTO_BATCH_SIZE
    return max(1, min(cap, len(token_lists), int(budget // per_prompt)))


def resolve_batch_size(
    batch_size: int | str | None, model: TransformerBridge, token_lists: Sequence[Sequence[int]], prefix_length: int
) -> int:
    """A given batch size checked, or (None / "auto") one chosen from free memory."""
    if batch_size is None or batch_size == "auto":
        return auto_batch_size(model, token_lists, prefix_length)
    if isinstance(batch_size, str) or batch_size < 1:
        raise PartsError(f"--batch-size must be a positive whole number or auto, got {batch_size!r}")
    return int(batch_size)


class Decomposer:
    """Runs prompts through the model and returns their `Decomposition`.

    Built once per (model, label words); `__call__` handles batching, padding and prefix reuse.
    `engine` runs the batches: "hf" (default) the model's own modules with torch hooks and SDPA
    attention, "bridge" TransformerLens's `run_with_cache` (the reference; see parts.model.engines).
    """

    def __init__(self, model: TransformerBridge, label_token_ids: Sequence[int], engine: str = "hf"):
        self.model = model
        self.engine = make_engine(model, engine)
        self.engine_name = "bridge" if isinstance(self.engine, BridgeEngine) else engine  # after any fallback
        self.label_token_ids = list(label_token_ids)
        self.readout = Readout.from_model(model, label_token_ids)
        self.n_layers = int(model.cfg.n_layers)
        self.n_heads = int(model.cfg.n_heads)
        self.component_names = component_names(self.n_layers, self.n_heads)
        tokenizer = model.tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.device = model.W_U.device

    # -- tokenisation ------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        token_lists = [list(self.model.tokenizer(p)["input_ids"]) for p in prompts]
        n_ctx = int(self.model.cfg.n_ctx)
        for index, tokens in enumerate(token_lists):
            if len(tokens) > n_ctx:
                raise PartsError(
                    f"prompt {index} is {len(tokens)} tokens, {len(tokens) - n_ctx} more than the model's "
                    f"context window of {n_ctx}: use fewer --shots or a task with shorter inputs"
                )
            if not tokens:
                raise PartsError(f"prompt {index} is empty after tokenisation")
        return token_lists

    @staticmethod
    def shared_prefix_length(token_lists: Sequence[Sequence[int]]) -> int:
        """Tokens every prompt starts with, leaving each at least one token of its own."""
        limit = min(len(t) for t in token_lists) - 1
        first = token_lists[0]
        length = 0
        while length < limit and all(t[length] == first[length] for t in token_lists):
            length += 1
        return length

    # -- forward passes ----------------------------------------------------------------
    def prefix_cache(self, prefix: Sequence[int]) -> Any:
        """Keys and values of the shared prefix, computed once."""
        cache = self.engine.prefix_cache(torch.tensor([list(prefix)], device=self.device))
        if cache is None or cache.get_seq_length() != len(prefix):
            raise RuntimeError("the model returned no usable KV cache for the prompt prefix; rerun with prefix reuse off")
        return cache

    def _forward(
        self, suffixes: Sequence[Sequence[int]], prefix_cache: Any, prefix_length: int
    ) -> tuple[Float[Tensor, "batch vocab_kept"], Activations]:
        """One left-padded batch: logits at the last position and the cached activations there."""
        width = max(len(s) for s in suffixes)
        batch = len(suffixes)
        input_ids: Int[Tensor, "batch pos"] = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((batch, prefix_length + width), dtype=torch.long)
        mask[:, :prefix_length] = 1
        for row, tokens in enumerate(suffixes):
            input_ids[row, width - len(tokens):] = torch.tensor(tokens)
            mask[row, prefix_length + width - len(tokens):] = 1
        cache = None
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)  # every forward extends the cache it is given
            cache.batch_repeat_interleave(batch)
        logits, activations = self.engine.run(input_ids.to(self.device), mask.to(self.device), prefix_length, cache)
        if cache is not None and cache.get_seq_length() != prefix_length + width:
            # The prefix cache was dropped (see parts.model.loading._install_kv_cache_fix for the bridge's case):
            # the suffix attended only to itself, so these numbers would be wrong.
            raise RuntimeError(
                f"the prefix KV cache was ignored (length {cache.get_seq_length()}, expected "
                f"{prefix_length + width}); rerun with prefix reuse off (--no-prefix-reuse)"
            )
        return logits.float(), activations

    def _split(self, logits: Tensor, activations: Activations) -> Decomposition:
        """Component logits from the last position's activations."""
        readout = self.readout
        z = torch.stack([_last(activations, f"blocks.{l}.attn.hook_z") for l in range(self.n_layers)], dim=1)
        mlp_out = torch.stack([_last(activations, f"blocks.{l}.hook_mlp_out") for l in range(self.n_layers)], dim=1)
        scale = einops.rearrange(_last(activations, "ln_final.hook_scale"), "batch 1 -> batch 1 1")
        head_logits = einops.einsum(
            z, readout.head_unembed, "batch layer head d_head, layer head d_head label -> batch layer head label"
        )
        mlp_logits = einops.einsum(mlp_out, readout.unembed, "batch layer d_model, d_model label -> batch layer label")
        component_logits = torch.cat(
            [einops.rearrange(head_logits, "batch layer head label -> batch (layer head) label"), mlp_logits], dim=1
        ) / scale
        embed = _last(activations, "hook_embed")
        if "hook_pos_embed" in activations:  # learned absolute positions (GPT-2); rotary models have none
            embed = embed + _last(activations, "hook_pos_embed")
        embed_logits = einops.einsum(embed, readout.unembed, "batch d_model, d_model label -> batch label")
        remainder = (embed_logits + readout.attn_bias_logits) / scale[:, :, 0] + readout.constant
        ids = torch.tensor(self.label_token_ids, device=logits.device)
        return Decomposition(component_logits, remainder, logits[:, ids])

    def __call__(
        self,
        prompts: Sequence[str],
        batch_size: int | str | None = 8,
        prefix_reuse: bool = True,
        progress: bool = True,
        description: str = "decomposing",
    ) -> Decomposition:
        """Decompose `prompts`, `batch_size` at a time (None or "auto": chosen from free memory)."""
        if not prompts:
            raise PartsError("no prompts to decompose")
        token_lists = self.tokenize(prompts)
        prefix_length = self.shared_prefix_length(token_lists) if prefix_reuse and len(prompts) > 1 else 0
        batch_size = resolve_batch_size(batch_size, self.model, token_lists, prefix_length)
        prefix_cache = self.prefix_cache(token_lists[0][:prefix_length]) if prefix_length else None
        # Longest first so padding within a batch is small (and memory peaks at the start).
        order = sorted(range(len(prompts)), key=lambda i: -len(token_lists[i]))
        parts: list[Decomposition] = []
        with tqdm(total=len(prompts), desc=description, disable=not progress, unit="prompt") as bar:
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                logits, activations = self._forward(
                    [token_lists[i][prefix_length:] for i in batch], prefix_cache, prefix_length
                )
                parts.append(self._split(logits, activations))
                bar.update(len(batch))
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        def gather(name: str) -> Tensor:
            return torch.cat([getattr(p, name) for p in parts]).cpu()[inverse]

        return Decomposition(gather("component_logits"), gather("remainder"), gather("model_logits"))
