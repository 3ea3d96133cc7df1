"""How a batch of prompts is run to capture the raw activations the readout needs.

Both engines take the same left-padded batch and return the same thing: the logits at the last
position and the raw activations a `parts.model.readout.Layout` names (the bridge's own hook names:
the first block's input, every attention output projection's input, every MLP's output, any
post-norm's input, the final norm's input and the unembedding's output), at the last position,
shaped [batch ...]. All mathematics on them is the readout's.

- `HFEngine` (the default) runs the model's own Hugging Face modules (a twin of the tree taken
  before the bridge wrapped it, sharing its weights) with small torch hooks and the model's fastest
  exact attention (SDPA, or eager where SDPA would drop an attention soft-cap). It costs what the
  model's own forward costs: the bridge computes attention eagerly, which takes up to twice the time
  and three times the memory on long prompts (benchmarks/results.md).
- `BridgeEngine` is TransformerLens's filtered `run_with_cache`: the reference the HF engine is
  tested against.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge
from transformers.cache_utils import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from parts.errors import PartsError
from parts.model.loading import plain_model
from parts.model.readout import Activations, Layout, expert_count, experts_name

ENGINES = ("hf", "bridge")


def pattern_name(layer: int) -> str:
    """Every head's attention from the last position over all keys: [batch head key] (source attribution only)."""
    return f"blocks.{layer}.attn.parts_pattern"


def values_name(layer: int) -> str:
    """Every key/value head's value vectors at all keys, as attention reads them: [batch kv_head key d_head]."""
    return f"blocks.{layer}.attn.parts_values"


@runtime_checkable
class Engine(Protocol):
    """What an engine does: build the demonstrations' prefix cache, then run batches and capture raw activations."""

    def prefix_cache(self, prefix: Int[Tensor, "1 pos"]) -> Any: ...

    def run(
        self, input_ids: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch key"], prefix_length: int,
        cache: Any,
    ) -> tuple[Float[Tensor, "batch vocab"], Activations]: ...

    def sources(self, layers: Sequence[int]) -> Any: ...


def record_values(cache: Any, layers: Sequence[int], activations: Activations) -> Any:
    """Make `cache` record, for `layers`, the value vectors attention reads at every key (the cached prefix's and
    this forward's, as the cache's `update` returns them to the attention module)."""
    update = cache.update

    def recording_update(key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
        keys, values = update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx in layers:
            activations[values_name(layer_idx)] = values
        return keys, values

    cache.update = recording_update
    return cache


def last_query_pattern(weights: Any, batch: int, layer: int) -> Float[Tensor, "batch head key"]:
    """The last query's row of an attention module's weights ([batch head query key]); a module that returns
    none (an attention kernel that does not materialise them) cannot be split by source."""
    if not isinstance(weights, Tensor) or weights.ndim != 4 or weights.shape[0] != batch:
        raise PartsError(f"the attention of layer {layer} returned no attention pattern parts can read, so its heads "
                         "cannot be split by source: this family is not supported by source attribution")
    return weights[:, :, -1].clone()


def suffix_position_ids(attention_mask: Int[Tensor, "batch key"], prefix_length: int) -> Int[Tensor, "batch pos"]:
    """Positions of left-padded suffixes after a shared prefix: real tokens continue the prefix's count.

    Without them a rotary or learned-position model would place each suffix as if its padding were text.
    """
    suffix_mask = attention_mask[:, prefix_length:]
    positions = prefix_length + suffix_mask.cumsum(-1) - 1
    return positions.clamp(min=prefix_length).masked_fill(suffix_mask == 0, prefix_length)


GQA_SDPA = "parts_gqa_sdpa"


def gqa_sdpa_attention(
    module: nn.Module, query: Float[Tensor, "batch head query d_head"], key: Float[Tensor, "batch kv_head key d_head"],
    value: Float[Tensor, "batch kv_head key d_head"], attention_mask: Tensor | None, dropout: float = 0.0,
    scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any,
) -> tuple[Float[Tensor, "batch query head d_head"], None]:
    """Transformers' SDPA attention, except that on the CPU grouped-query keys and values are not copied per head.

    With an attention mask (always there after a prefix cache) transformers materialises every key/value
    head group (`repeat_kv`), which on the CPU costs more than the attention itself over a long prefix;
    torch's CPU kernel takes the groups as they are (`enable_gqa`), with the same result to float rounding
    (benchmarks/results.md). On CUDA the masked kernels do not take `enable_gqa` (they would fall back
    to the slow math kernel), so there, and whenever there is nothing to save, this is transformers' own.
    """
    groups = int(getattr(module, "num_key_value_groups", 1))
    special = kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
    if groups == 1 or attention_mask is None or query.device.type != "cpu" or special:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    attn_output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return einops.rearrange(attn_output, "batch head query d_head -> batch query head d_head").contiguous(), None


AttentionInterface.register(GQA_SDPA, gqa_sdpa_attention)
AttentionMaskInterface.register(GQA_SDPA, sdpa_mask)


def contiguous_input(_module: nn.Module, args: tuple) -> tuple | None:
    """A forward pre-hook handing a module a contiguous copy of its input.

    The unembedding gets the last position as a strided view ([batch 1 d_model] of [batch pos d_model], from
    `logits_to_keep=1`); torch's matmul multiplies such a view by the weight as a batched product over a
    [batch d_model vocab] copy of the weight: 2 GiB at batch 8 at Llama-2-7B's shape in bfloat16 (benchmarks/
    scale_check.py). The copy of the input is [batch 1 d_model].
    """
    if args and isinstance(args[0], Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


@contextmanager
def contiguous_inputs(module: nn.Module) -> Iterator[None]:
    """While open, `module` is handed its input contiguous (`contiguous_input`)."""
    handle = module.register_forward_pre_hook(contiguous_input)
    try:
        yield
    finally:
        handle.remove()


class BridgeEngine:
    """TransformerLens's `run_with_cache`, filtered to the layout's hooks at the last position."""

    def __init__(self, model: TransformerBridge, layout: Layout, split_experts: bool = False):
        if split_experts:
            raise PartsError("--split-experts needs the hf engine: drop --engine bridge")
        self.model = model
        self.hooks = set(layout.taps)
        try:  # one token: TransformerLens's own forward fails on some adapters (CodeGen's attention)
            with torch.inference_mode():
                model(torch.zeros((1, 1), dtype=torch.long, device=model.W_U.device), logits_to_keep=1)
        except Exception as err:  # whatever TransformerLens raises, the user's fix is the other engine
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise PartsError(
                f"TransformerLens's bridge cannot run this model ({type(err).__name__}: {reason}): use --engine hf"
            ) from err

    def prefix_cache(self, prefix: Int[Tensor, "1 pos"]) -> Any:
        """The prefix's keys and values, or None where this bridge keeps none for this model."""
        cache = self._prefix_cache(prefix)
        if cache is not None and cache.get_seq_length() != prefix.shape[1]:
            # This TransformerLens drops a cache passed under transformers' `cache=` keyword: rename it.
            fix_cache_keyword(self.model)
            cache = self._prefix_cache(prefix)
        if cache is None or cache.get_seq_length() != prefix.shape[1]:
            return None  # an attention bridge without cache support (MPT, DeepSeek-V3)
        return cache

    def _prefix_cache(self, prefix: Int[Tensor, "1 pos"]) -> Any:
        with torch.inference_mode(), contiguous_inputs(self.model.unembed):
            _, cache = self.model(prefix, return_type="logits_and_cache", logits_to_keep=1)
        return cache

    @contextmanager
    def sources(self, layers: Sequence[int]) -> Iterator[None]:
        """While open, `run` also captures these layers' attention from the last position (`pattern_name`) and
        their value vectors at every key (`values_name`)."""
        fix_cache_keyword(self.model)  # the values are read from the cache the attention is handed
        self._source_layers = tuple(layers)
        try:
            yield
        finally:
            self._source_layers = ()

    def run(
        self, input_ids: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch key"], prefix_length: int,
        cache: Any,
    ) -> tuple[Float[Tensor, "batch vocab"], Activations]:
        """The last position's logits over the vocabulary, and the activations the decomposition reads
        (`input_ids` are the tokens after the cached prefix; `attention_mask` covers prefix and tokens)."""
        layers = getattr(self, "_source_layers", ())
        extra: Activations = {}
        if layers and cache is None:  # the values are read where the cache hands them to attention
            config: Any = plain_model(self.model).config
            cache = DynamicCache(config=config)
        if layers:
            record_values(cache, layers, extra)
        # Without a prefix to extend, a KV cache would only cost memory (as much as the activations).
        kwargs: dict[str, Any] = {"use_cache": False} if cache is None else {"past_key_values": cache}
        batch = input_ids.shape[0]
        hooks = [(f"blocks.{layer}.attn.hook_pattern",
                  lambda pattern, hook, layer=layer: extra.__setitem__(pattern_name(layer),
                                                                       last_query_pattern(pattern, batch, layer)))
                 for layer in layers]
        with torch.inference_mode(), self.model.hooks(fwd_hooks=hooks), contiguous_inputs(self.model.unembed):
            logits, activations = self.model.run_with_cache(
                input_ids, attention_mask=attention_mask, names_filter=lambda name: name in self.hooks,
                pos_slice=-1, logits_to_keep=1, **kwargs,
            )
        captured = {name: activations[name][:, -1] for name in self.hooks if name in activations}
        return logits[:, -1], {**captured, **extra}


def fix_cache_keyword(model: TransformerBridge) -> None:
    """Let this bridge's attention see a KV cache passed under transformers' new `cache=` name.

    transformers 5.x hands the cache to attention modules as `cache=`; TransformerLens 4.3's
    attention bridge only reads `past_key_values` / `layer_past`, so a prefix cache is silently
    ignored (the suffix attends only to itself). Renaming the keyword restores Hugging Face's
    behaviour bit for bit. Applied to this model's attention modules only, when its prefix cache
    came back empty; `Decomposer` checks the cache length after every cached forward, so a
    regression fails loudly instead of giving wrong numbers.
    """
    for module in model.modules():
        if not hasattr(module, "_update_kv_cache") or "_update_kv_cache" in vars(module):
            continue  # not an attention bridge, or fixed already

        def update_kv_cache(self: Any, k: Tensor, v: Tensor, **kwargs: Any) -> Any:
            if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
                kwargs["past_key_values"] = kwargs["cache"]
            return type(self)._update_kv_cache(self, k, v, **kwargs)

        vars(module)["_update_kv_cache"] = types.MethodType(update_kv_cache, module)


def choose_attention(model: nn.Module, attention: str | None = None) -> str:
    """Set the attention the twin runs (public transformers API) and return it: `attention` if given, else
    SDPA (`GQA_SDPA`), unless it would change the model's forward (an attention soft-cap, which
    SDPA drops) or the model does not support SDPA: then eager, as the model's own code computes it."""
    config: Any = model.config
    if attention is None:
        softcapped = getattr(config, "attn_logit_softcapping", None)
        attention = GQA_SDPA if getattr(model, "_supports_sdpa", False) and not softcapped else "eager"
    model.set_attn_implementation(attention)  # type: ignore[operator]
    return str(config._attn_implementation)


class HFEngine:
    """The model's own Hugging Face modules with torch hooks at the last position.

    The modules hooked are the ones the adapter maps to the layout's activations, so they equal the
    bridge's hooks of the same names (tested on every family in tests/test_families.py).
    """

    def __init__(self, model: TransformerBridge, layout: Layout, split_experts: bool = False,
                 attention: str | None = None):
        self.model = plain_model(model)
        self.attention = choose_attention(self.model, attention)
        self._taps: list[tuple[nn.Module, str, str]] = [
            (self.model.get_submodule(path), name, where) for name, (path, where) in layout.taps.items()
        ]
        self._experts: list[tuple[nn.Module, int]] = []
        if split_experts:
            if not layout.is_moe:
                raise PartsError("--split-experts applies to mixture-of-experts models only: this model has dense MLPs")
            self._experts = [(self.model.get_submodule(path), layer)
                             for layer, path in enumerate(layout.experts_paths) if path is not None]
        self._shape = (0, 0)  # batch, positions of the running forward
        # Source attribution (`sources`): layers whose attention pattern and values are captured too.
        self._source_layers: tuple[int, ...] = ()
        self._attention_modules = [self.model.get_submodule(path.rsplit(".", 1)[0]) for path in layout.o_paths]
        self._unembed = self.model.get_submodule(layout.unembed_path)

    @contextmanager
    def sources(self, layers: Sequence[int]) -> Iterator[None]:
        """While open, `run` also captures these layers' attention from the last position (`pattern_name`) and
        their value vectors at every key (`values_name`): the model runs its own eager attention, the one
        implementation that returns its attention weights (soft-caps, ALiBi and sinks included)."""
        try:
            choose_attention(self.model, "eager")
        except (ValueError, NotImplementedError) as err:
            raise PartsError(f"this model cannot run eager attention ({err}), so its heads cannot be split by "
                             "source") from err
        self._source_layers = tuple(layers)
        try:
            yield
        finally:
            self._source_layers = ()
            choose_attention(self.model, self.attention)

    def _attach(self, activations: Activations) -> list[Any]:
        handles = [self._unembed.register_forward_pre_hook(contiguous_input)]
        for module, name, where in self._taps:
            if where == "input":
                def pre_hook(_m: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
                    value = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
                    activations[name] = self._last(value)
                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:
                def hook(_m: nn.Module, _args: tuple, output: Any, name: str = name) -> None:
                    activations[name] = self._last(output[0] if isinstance(output, tuple) else output)
                handles.append(module.register_forward_hook(hook))
        for module, layer in self._experts:
            def experts_hook(m: nn.Module, args: tuple, layer: int = layer) -> None:
                activations[experts_name(layer)] = self._split_experts(m, *args[:3])
            handles.append(module.register_forward_pre_hook(experts_hook))
        for layer in self._source_layers:
            def pattern_hook(_m: nn.Module, _args: tuple, output: Any, layer: int = layer) -> None:
                weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
                activations[pattern_name(layer)] = last_query_pattern(weights, self._shape[0], layer)
            handles.append(self._attention_modules[layer].register_forward_hook(pattern_hook))
        return handles

    def _last(self, value: Tensor) -> Tensor:
        """The last position of a [batch pos ...] activation (left padding puts every prompt's last token
        there), also when a module sees the tokens flattened to [(batch pos) ...] (OPT's MLP)."""
        batch, positions = self._shape
        if value.ndim == 2 and value.shape[0] == batch * positions:  # flattened tokens (also at one position)
            value = value.view(batch, positions, *value.shape[1:])
        return value[:, -1].clone()  # a view would keep the whole [batch pos ...] tensor alive

    def _split_experts(self, experts: nn.Module, hidden: Float[Tensor, "token d_model"], index: Int[Tensor, "token k"],
                       weights: Float[Tensor, "token k"]) -> Float[Tensor, "batch expert d_model"]:
        """Each expert's router-weighted output at the last positions (zero where not chosen), by the
        experts module's own forward with every other expert's routing weight set to zero."""
        batch, positions = self._shape
        rows = torch.arange(batch, device=hidden.device) * positions + positions - 1
        hidden, index, weights = hidden[rows], index[rows], weights[rows]
        n_experts = expert_count(experts)
        outputs = [experts.forward(hidden, index, torch.where(index == e, weights, torch.zeros_like(weights)))
                   for e in range(n_experts)]
        return torch.stack(outputs, dim=1).clone()

    def prefix_cache(self, prefix: Int[Tensor, "1 pos"]) -> Any:
        with torch.inference_mode(), contiguous_inputs(self._unembed):
            return self.model(prefix, use_cache=True, logits_to_keep=1).past_key_values

    def run(
        self, input_ids: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch key"], prefix_length: int,
        cache: Any,
    ) -> tuple[Float[Tensor, "batch vocab"], Activations]:
        """The last position's logits over the vocabulary, and the activations the decomposition reads
        (`input_ids` are the tokens after the cached prefix; `attention_mask` covers prefix and tokens)."""
        activations: Activations = {}
        self._shape = (input_ids.shape[0], input_ids.shape[1])
        handles = self._attach(activations)
        if self._source_layers:  # the values are read where the cache hands them to attention
            config: Any = self.model.config
            cache = record_values(DynamicCache(config=config) if cache is None else cache,
                                  self._source_layers, activations)
        kwargs: dict[str, Any] = {"use_cache": False} if cache is None else {"past_key_values": cache, "use_cache": True}
        try:
            with torch.inference_mode():
                output = self.model(
                    input_ids, attention_mask=attention_mask,
                    position_ids=suffix_position_ids(attention_mask, prefix_length), logits_to_keep=1, **kwargs,
                )
        finally:
            for handle in handles:
                handle.remove()
        return output.logits[:, -1], activations


def make_engine(model: TransformerBridge, layout: Layout, engine: str = "hf", split_experts: bool = False) -> Engine:
    """The engine named `engine` ("hf": the model's own modules, the default; "bridge": TransformerLens)."""
    if engine == "bridge":
        return BridgeEngine(model, layout, split_experts)
    if engine == "hf":
        try:
            return HFEngine(model, layout, split_experts)
        except AttributeError as err:  # a module the adapter names is not in this model's tree
            if split_experts:
                raise
            warnings.warn(f"the hf engine cannot map this model's modules ({err}); using the slower bridge engine",
                          stacklevel=2)
            return BridgeEngine(model, layout)
    raise PartsError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
