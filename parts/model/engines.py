"""How a batch of prompts is run to catch the activations the decomposition reads.

Both engines take the same left-padded batch and return the same thing: the logits at the last
position and, under TransformerLens's hook names, the last position's activations
(`hook_embed`, `hook_pos_embed`, `blocks.{l}.attn.hook_z`, `blocks.{l}.hook_mlp_out`,
`ln_final.hook_scale`), shaped as `run_with_cache(..., pos_slice=-1)` returns them.

- `HFEngine` (the default) runs a plain copy of the bridge's Hugging Face modules, sharing their
  weights, with SDPA attention and five small torch hooks. It costs what the model's own forward
  costs: the bridge computes attention eagerly (explicit float32 [batch head query key] scores, so
  its pattern hooks can fire), which takes up to twice the time and three times the memory on long
  prompts (benchmarks/results.md).
- `BridgeEngine` is TransformerLens's filtered `run_with_cache`: the reference the HF engine is
  tested against, and the path for architectures the HF engine cannot map.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Protocol

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from parts.errors import PartsError

Activations = dict[str, Tensor]
ENGINES = ("hf", "bridge")


class Engine(Protocol):
    def prefix_cache(self, prefix: Int[Tensor, "1 pos"]) -> Any: ...

    def run(
        self, input_ids: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch key"], prefix_length: int,
        cache: Any,
    ) -> tuple[Float[Tensor, "batch vocab"], Activations]: ...


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


class BridgeEngine:
    """TransformerLens's `run_with_cache`, filtered to the decomposition's hooks at the last position."""

    def __init__(self, model: TransformerBridge):
        self.model = model
        n_layers = int(model.cfg.n_layers)
        self.hooks = {"hook_embed", "hook_pos_embed", "ln_final.hook_scale"}
        for layer in range(n_layers):
            self.hooks |= {f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_mlp_out"}

    def prefix_cache(self, prefix: Int[Tensor, "1 pos"]) -> Any:
        with torch.inference_mode():
            _, cache = self.model(prefix, return_type="logits_and_cache", logits_to_keep=1)
        return cache

    def run(self, input_ids: Tensor, attention_mask: Tensor, prefix_length: int, cache: Any) -> tuple[Tensor, Activations]:
        # Without a prefix to extend, a KV cache would only cost memory (as much as the activations).
        kwargs: dict[str, Any] = {"use_cache": False} if cache is None else {"past_key_values": cache}
        with torch.inference_mode():
            logits, activations = self.model.run_with_cache(
                input_ids, attention_mask=attention_mask, names_filter=lambda name: name in self.hooks,
                pos_slice=-1, logits_to_keep=1, **kwargs,
            )
        return logits[:, -1], {name: activations[name] for name in self.hooks if name in activations}


def plain_modules(model: nn.Module, config: Any) -> nn.Module:
    """A copy of a bridged Hugging Face model with every bridge wrapper removed.

    The bridge replaces the model's submodules by wrappers in place; this rebuilds the module tree
    from the wrapped originals. Weights, buffers and attributes are shared (nothing is copied but
    the tree itself); hooks are not, and `config` replaces the shared config (to choose attention).
    """
    copies: dict[int, nn.Module] = {}

    def unwrap(module: nn.Module) -> nn.Module:
        while isinstance(module, GeneralizedComponent):
            module = module.original_component  # type: ignore[assignment]
        if id(module) in copies:
            return copies[id(module)]
        clone = copy.copy(module)
        copies[id(module)] = clone
        for attr, value in list(vars(clone).items()):
            if "hooks" in attr and isinstance(value, dict):
                setattr(clone, attr, type(value)())  # hooks on the copy must not fire in the bridge
        clone._modules = {name: None if child is None else unwrap(child) for name, child in module._modules.items()}
        if "config" in vars(clone) and clone.config is not None:
            clone.config = config
        return clone

    plain = unwrap(model)
    plain._parts_copies = copies  # type: ignore[assignment]  # original module id -> its plain copy
    return plain


class HFEngine:
    """The bridge's Hugging Face modules run plainly (SDPA attention) with torch hooks at the last position.

    The modules hooked are the ones the bridge maps to `attn.o` (the output projection, whose input is
    every head's z), `mlp`, `embed`, `pos_embed` and `ln_final`; so the activations equal the bridge's
    hooks of the same names (tested on Llama, GPT-NeoX and GPT-2 models and the embedded model).
    """

    def __init__(self, model: TransformerBridge, attention: str = GQA_SDPA):
        hf_model = model.original_model
        config: Any = copy.deepcopy(hf_model.config)
        config._attn_implementation = attention
        self.model = plain_modules(hf_model, config)
        copies: dict[int, nn.Module] = self.model._parts_copies  # type: ignore[assignment]

        def plain(component: Any) -> nn.Module:
            return copies[id(component.original_component)]

        self.n_heads = int(model.cfg.n_heads)
        self.uses_rms_norm = bool(model.cfg.uses_rms_norm)
        final_norm = plain(model.ln_final)
        self.eps = float(getattr(final_norm, "variance_epsilon", getattr(final_norm, "eps", model.cfg.eps)))
        self._taps: list[tuple[nn.Module, str, str]] = [(plain(model.embed), "hook_embed", "output")]
        if hasattr(model, "pos_embed"):
            self._taps.append((plain(model.pos_embed), "hook_pos_embed", "output"))
        for layer, block in enumerate(model.blocks):
            self._taps.append((plain(block.attn.o), f"blocks.{layer}.attn.hook_z", "input"))
            self._taps.append((plain(block.mlp), f"blocks.{layer}.hook_mlp_out", "output"))
        self._taps.append((final_norm, "ln_final.hook_scale", "input"))

    def _store(self, activations: Activations, name: str, value: Tensor) -> None:
        last = value[:, -1:]  # [batch 1 ...]: left padding puts every prompt's last token here
        if name.endswith("hook_z"):
            last = einops.rearrange(last, "batch 1 (head d_head) -> batch 1 head d_head", head=self.n_heads)
        elif name == "ln_final.hook_scale":
            last = last.float()
            if not self.uses_rms_norm:
                last = last - einops.reduce(last, "batch 1 d_model -> batch 1 1", "mean")
            mean_square = einops.reduce(last.pow(2), "batch 1 d_model -> batch 1 1", "mean")
            last = (mean_square + self.eps).sqrt()
        activations[name] = last.clone()  # a view would keep the whole [batch pos ...] tensor alive

    def _attach(self, activations: Activations) -> list[Any]:
        handles = []
        for module, name, where in self._taps:
            if where == "input":
                def pre_hook(_m: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
                    value = args[0] if args else next(iter(kwargs.values()))
                    self._store(activations, name, value)
                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:
                def hook(_m: nn.Module, _args: tuple, output: Any, name: str = name) -> None:
                    self._store(activations, name, output[0] if isinstance(output, tuple) else output)
                handles.append(module.register_forward_hook(hook))
        return handles

    def prefix_cache(self, prefix: Int[Tensor, "1 pos"]) -> Any:
        with torch.inference_mode():
            return self.model(prefix, use_cache=True, logits_to_keep=1).past_key_values

    def run(self, input_ids: Tensor, attention_mask: Tensor, prefix_length: int, cache: Any) -> tuple[Tensor, Activations]:
        activations: Activations = {}
        handles = self._attach(activations)
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


def make_engine(model: TransformerBridge, engine: str = "hf") -> Engine:
    """The engine named `engine` ("hf": plain modules with SDPA, the default; "bridge": TransformerLens)."""
    if engine == "bridge":
        return BridgeEngine(model)
    if engine == "hf":
        try:
            return HFEngine(model)
        except (AttributeError, KeyError, TypeError) as err:  # a bridge whose modules do not map one to one
            warnings.warn(f"the hf engine cannot map this model's modules ({err}); using the slower bridge engine",
                          stacklevel=2)
            return BridgeEngine(model)
    raise PartsError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
