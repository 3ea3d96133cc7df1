"""Direct logit attribution of label-word logits to every attention head and MLP.

At the last prompt token the final residual stream is a sum of what the embeddings, every head and
every MLP wrote into it. The final norm (and any post-norm) is linear once its scale is frozen
from the full residual stream, so each term reaches the label-word logits on its own; every piece
of that mathematics (frozen scales, centring, biases, multipliers, pre-soft-cap logits) is the
readout's (parts.model.readout), and the sum is checked against the model's own logits
(parts.decomposition.exactness).

All test prompts of a run share their demonstrations: their longest common token prefix is
run once and its keys and values reused for every batch (exact, as attention is causal).
The forward passes themselves are run by an engine (parts.model.engines).
"""

from __future__ import annotations

import copy
import os
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from parts.components import component_names, expert_name, head_name, mlp_name, shared_expert_name
from parts.decomposition.exactness import check_reconstruction, reconstruction_tolerance
from parts.decomposition.runs import Decomposition
from parts.errors import PartsError
from parts.model.engines import BridgeEngine, make_engine
from parts.model.loading import plain_model
from parts.model.readout import Activations, Layout, Readout
from parts.progress import bar_disabled

MAX_AUTO_BATCH_SIZE = 64  # beyond this a batch saves no time on any device measured
# On a CPU larger batches are slower, not faster: every batch copies the prefix's keys and values per prompt
# and pads to its longest prompt, while the matmuls are as efficient at 8 prompts (benchmarks/results.md:
# 24-shot sst2, batch 8 vs 64, 1.5x CPU time).
MAX_AUTO_BATCH_SIZE_CPU = 8
# Share of free memory an automatic batch may plan to use: the estimate below is rough, and on a
# CPU the memory is shared with other processes.
MEMORY_FRACTION = {"cuda": 0.8, "cpu": 0.5}
ESTIMATE_MARGIN = 2  # allocator slack and temporaries the per-prompt estimate leaves out
# The most padding (between the reused prefix and a suffix) checked exact, per model and engine: the property is
# the architecture's (ALiBi from slots breaks it at any padding), so a call that pads no more is not rerun in full
# (the check costs one full-prompt forward, ~10% of a 24-shot call).
VERIFIED_PADDING: weakref.WeakKeyDictionary[Any, dict[str, int]] = weakref.WeakKeyDictionary()


def split_component_names(layout: Layout) -> list[str]:
    """Component names with each mixture-of-experts MLP split, in its place, into its experts
    `MLP{layer}E{expert}` (and `MLP{layer}S`, the shared expert, where the block has one)."""
    names = [head_name(layer, head) for layer in range(layout.n_layers) for head in range(layout.n_heads)]
    for layer in range(layout.n_layers):
        if not layout.n_experts[layer]:
            names.append(mlp_name(layer))
            continue
        names += [expert_name(layer, expert) for expert in range(layout.n_experts[layer])]
        if layout.shared_expert[layer]:
            names.append(shared_expert_name(layer))
    return names


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
    return planned_batch_size(model.cfg, device.type, model.W_U.element_size(), token_lists, prefix_length, free)


def planned_batch_size(cfg: Any, device_type: str, element_bytes: int, token_lists: Sequence[Sequence[int]],
                       prefix_length: int, free_bytes: int) -> int:
    """`auto_batch_size` from the model's shape alone (`cfg`: any object with `prompt_memory_bytes`' fields), so a
    plan can choose it before the weights load (`parts.experiments.plan`); `free_bytes` is what the batches may use."""
    budget = free_bytes * MEMORY_FRACTION.get(device_type, 0.5)
    longest = max(len(t) for t in token_lists) - prefix_length
    per_prompt = ESTIMATE_MARGIN * prompt_memory_bytes(cfg, longest, prefix_length, element_bytes)
    cap = MAX_AUTO_BATCH_SIZE_CPU if device_type == "cpu" else MAX_AUTO_BATCH_SIZE
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

    Any prompts and label words, not only a task's (docs/guide/transformerlens.md):
    `Decomposer(model, label_token_ids)(prompts)` gives `component_logits` of shape `example component label`,
    the component axis in `self.component_names` order (`L{layer}H{head}` layer-major, then `MLP{layer}`);
    `parts.decomposition.runs.layer_head_logits` / `layer_mlp_logits` view it as `layer x head` / `layer`, and
    `parts.components.to_transformer_lens` names each component's TransformerLens hook.

    Built once per (model, label words); `__call__` handles batching, padding and prefix reuse, and
    fails when the components do not sum to the model's logits (`allow_inexact`: warn instead).
    `engine` runs the batches: "hf" (default) the model's own modules with torch hooks, "bridge"
    TransformerLens's `run_with_cache` (the reference; see parts.model.engines). `split_experts`
    gives each expert of a mixture-of-experts MLP its own component (`MLP{layer}E{expert}`).
    """

    def __init__(self, model: TransformerBridge, label_token_ids: Sequence[int], engine: str = "hf",
                 split_experts: bool = False, allow_inexact: bool = False):
        self.model = model
        hf_model = plain_model(model)
        self.layout = Layout.from_bridge(model, hf_model)
        # The readout first: a model it cannot split is refused before anything runs.
        self.readout = Readout.from_modules(hf_model, self.layout, label_token_ids)
        self.engine = make_engine(model, self.layout, engine, split_experts)
        self.engine_name = "bridge" if isinstance(self.engine, BridgeEngine) else engine  # after any fallback
        self.label_token_ids = list(label_token_ids)
        self.split_experts = split_experts
        self.allow_inexact = allow_inexact
        self.n_layers = int(model.cfg.n_layers)
        self.n_heads = int(model.cfg.n_heads)
        self.component_names = (split_component_names(self.layout) if split_experts
                                else component_names(self.n_layers, self.n_heads))
        tokenizer = model.tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.device = model.W_U.device
        self.dtype = next(hf_model.parameters()).dtype

    @property
    def info(self) -> dict[str, Any]:
        """What a run records about how it was decomposed (beyond the engine and dtype)."""
        info = dict(self.readout.info)
        if self.split_experts:
            info["split_experts"] = True
        return info

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
        """Keys and values of the shared prefix, computed once (None: the bridge keeps none for this model)."""
        cache = self.engine.prefix_cache(torch.tensor([list(prefix)], device=self.device))
        if cache is None and isinstance(self.engine, BridgeEngine):
            warnings.warn("TransformerLens's bridge keeps no KV cache for this model: every prompt runs in full "
                          "(--engine hf reuses the demonstrations' keys and values)", stacklevel=3)
            return None
        if cache is None or cache.get_seq_length() != len(prefix):
            raise RuntimeError("the model returned no usable KV cache for the prompt prefix; rerun with prefix reuse off")
        return cache

    def _forward(
        self, input_ids: Int[Tensor, "batch pos"], suffix_lengths: Int[Tensor, " batch"], prefix_cache: Any,
        prefix_length: int,
    ) -> tuple[Float[Tensor, "batch vocab_kept"], Activations]:
        """One left-padded batch, already on the model's device: logits at the last position and the cached
        activations there. The mask is built on the device: nothing is copied from the host per batch."""
        batch, width = input_ids.shape
        positions = torch.arange(width, device=input_ids.device)
        suffix_mask = (positions >= width - suffix_lengths[:, None]).long()  # left padding
        prefix_mask = torch.ones((batch, prefix_length), dtype=torch.long, device=input_ids.device)
        mask = torch.cat([prefix_mask, suffix_mask], dim=1)
        cache = None
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)  # every forward extends the cache it is given
            cache.batch_repeat_interleave(batch)
        logits, activations = self.engine.run(input_ids, mask, prefix_length, cache)
        if cache is not None and cache.get_seq_length() != prefix_length + width:
            # The prefix cache was dropped (see parts.model.engines.fix_cache_keyword for the bridge's case):
            # the suffix attended only to itself, so these numbers would be wrong.
            raise RuntimeError(
                f"the prefix KV cache was ignored (length {cache.get_seq_length()}, expected "
                f"{prefix_length + width}); rerun with prefix reuse off (--no-prefix-reuse)"
            )
        return logits.float(), activations

    def _to_device(self, tokens: Tensor) -> Tensor:
        """One host-to-device copy, asynchronous on CUDA (from pinned memory), so it never waits for the GPU."""
        if self.device.type == "cuda":
            return tokens.pin_memory().to(self.device, non_blocking=True)
        return tokens.to(self.device)

    def _split(self, logits: Tensor, activations: Activations) -> Decomposition:
        """Component logits from the last position's raw activations (all mathematics is the readout's)."""
        return Decomposition(*self.readout.split(activations, logits), self.readout.final_residual(activations))

    def _prefix_reuse_is_exact(self, token_lists: Sequence[Sequence[int]], order: Sequence[int], batch_size: int,
                               prefix_length: int, result: Decomposition) -> bool:
        """Whether the example padded most between the prefix and its suffix got the model's logits of its
        full prompt run alone (one forward): a model whose attention depends on where padding sits does not.
        Checked once per model and engine, and again only for a call that pads more (`VERIFIED_PADDING`)."""
        padding = {order[row]: len(token_lists[order[start]]) - len(token_lists[order[row]])
                   for start in range(0, len(order), batch_size) for row in range(start, min(start + batch_size, len(order)))}
        example = max(padding, key=lambda i: padding[i])
        verified, key = VERIFIED_PADDING.setdefault(plain_model(self.model), {}), f"{self.engine_name} {self.dtype}"
        if padding[example] <= verified.get(key, 0):
            return True
        tokens = torch.tensor([list(token_lists[example])], dtype=torch.long, device=self.device)
        logits, activations = self._forward(tokens, torch.tensor([tokens.shape[1]], device=self.device), None, 0)
        alone = self._split(logits, activations).model_logits[0].cpu()
        scale = float(alone.abs().max().clamp(min=1.0))
        exact = float((alone - result.model_logits[example]).abs().max()) / scale <= reconstruction_tolerance(self.dtype)
        if exact:
            verified[key] = padding[example]
        return exact

    def __call__(
        self,
        prompts: Sequence[str],
        batch_size: int | str | None = 8,
        prefix_reuse: bool = True,
        progress: bool = True,
        description: str = "decomposing",
        example_names: Sequence[str] | None = None,
    ) -> Decomposition:
        """Decompose `prompts`, `batch_size` at a time (None or "auto": chosen from free memory).

        Fails with one line naming the worst example (`example_names[i]`, else "prompt i") when the
        components do not sum to the model's logits within the dtype's tolerance.
        """
        if not prompts:
            raise PartsError("no prompts to decompose")
        token_lists = self.tokenize(prompts)
        batches = PlannedBatches(self, token_lists, batch_size, prefix_reuse)
        order, prefix_length, batch_size = batches.order, batches.prefix_length, batches.batch_size
        parts: list[Decomposition] = []
        # A bar on a terminal only: in a log it would print a line per redraw (the caller logs each run once).
        with tqdm(total=len(prompts), desc=description, disable=bar_disabled(progress), unit="prompt") as bar:
            for rows, logits, activations in batches:
                parts.append(self._split(logits, activations))
                bar.update(len(rows))
        inverse = torch.empty(len(order), dtype=torch.long, device="cpu")
        inverse[torch.tensor(order, device="cpu")] = torch.arange(len(order), device="cpu")

        def gather(name: str) -> Tensor:
            return torch.cat([getattr(p, name) for p in parts]).cpu()[inverse]

        result = Decomposition(gather("component_logits"), gather("remainder"), gather("model_logits"),
                               gather("final_residual"))
        if prefix_length and not self._prefix_reuse_is_exact(token_lists, order, batch_size, prefix_length, result):
            warnings.warn("reusing the demonstrations' keys and values changes this model's logits (its attention "
                          "depends on where the padding sits: ALiBi from slots, a sliding window): every prompt runs "
                          "in full", stacklevel=2)
            return self(prompts, batch_size, False, progress, description, example_names)
        check_reconstruction(result.component_logits, result.remainder, result.model_logits, self.dtype,
                             self.allow_inexact, example_names)
        return result


class PlannedBatches:
    """The batches a decomposer runs a list of tokenised prompts in, iterated as (rows, logits, activations).

    Prefix reuse: the longest shared token prefix is run once and its keys and values copied into every
    batch (off where a sliding window would see the padding, or where the engine keeps no cache). Prompts
    run longest first, left-padded within their batch; `rows` are the batch's indices into the prompts.
    In a batch, key `prefix_length + (width - suffix_length) + i` is the prompt's token `prefix_length + i`.
    """

    def __init__(self, decomposer: Decomposer, token_lists: Sequence[Sequence[int]], batch_size: int | str | None,
                 prefix_reuse: bool):
        self.decomposer = decomposer
        prefix_length = decomposer.shared_prefix_length(token_lists) if prefix_reuse and len(token_lists) > 1 else 0
        config = plain_model(decomposer.model).config
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        if prefix_length and isinstance(window, int) and max(len(t) for t in token_lists) > window:
            # Pads between the prefix and a suffix would take key slots of a sliding window: not the model's
            # own attention any more. Run every prompt in full.
            prefix_length = 0
        self.prefix_cache = decomposer.prefix_cache(token_lists[0][:prefix_length]) if prefix_length else None
        self.prefix_length = prefix_length if self.prefix_cache is not None else 0
        self.batch_size = resolve_batch_size(batch_size, decomposer.model, token_lists, self.prefix_length)
        # Longest first so padding within a batch is small (and memory peaks at the start).
        self.order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
        self.suffixes = [token_lists[i][self.prefix_length:] for i in self.order]

    def __iter__(self) -> Iterator[tuple[list[int], Tensor, Activations]]:
        decomposer, suffixes = self.decomposer, self.suffixes
        # Every suffix, left-padded to the longest, in one host tensor copied to the device once: a batch is
        # then a slice of rows and of its last `width` columns (its own left padding).
        longest = len(suffixes[0])
        host_ids = torch.full((len(suffixes), longest), decomposer.pad_token_id, dtype=torch.long, device="cpu")
        for row, tokens in enumerate(suffixes):
            host_ids[row, longest - len(tokens):] = torch.tensor(tokens, dtype=torch.long, device="cpu")
        all_ids = decomposer._to_device(host_ids)
        all_lengths = decomposer._to_device(torch.tensor([len(t) for t in suffixes], dtype=torch.long, device="cpu"))
        for start in range(0, len(suffixes), self.batch_size):
            stop = min(start + self.batch_size, len(suffixes))
            width = len(suffixes[start])
            logits, activations = decomposer._forward(
                all_ids[start:stop, longest - width:], all_lengths[start:stop], self.prefix_cache, self.prefix_length
            )
            yield self.order[start:stop], logits, activations
