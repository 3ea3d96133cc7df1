"""The readout: every piece of mathematics that turns raw activations into label-word logits.

At the last prompt token the final residual stream is a sum of what each part wrote into it:

    resid = resid_0 + sum_layer m * post_attn(sum_head z[layer, head] @ W_O[layer, head] + b_O[layer])
                    + sum_layer m * post_mlp(mlp_out[layer])

with `resid_0` the input of the first block (embeddings, positions, any embedding scale or norm),
`m` a residual multiplier (Granite; 1 elsewhere) and `post_*` a post-norm (Gemma-2/3, OLMo-2) or
the identity. Every norm is linear once its scale is frozen at the value the full forward gave it,
so each term reaches the label-word logits on its own:

    logit[label] = logit_multiplier * (final_norm(resid) @ W_U[:, label] + b_U[label])

A final-logit soft-cap (Gemma-2) is not linear: the pre-cap logits are decomposed (a run's info
says so; accuracies are unchanged, as capping is monotonic).

`Layout` says which raw activations an engine must capture (under the bridge's own hook names,
located by the architecture adapter's component mapping), and `Readout` holds every frozen scale,
centring, bias and multiplier: engines only capture, the readout only computes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from parts.errors import PartsError

Activations = dict[str, Tensor]

# Names of the raw activations (the bridge's hook names; the hf engine hooks the same modules).
RESID_0 = "blocks.0.hook_in"
FINAL_NORM_IN = "ln_final.hook_in"
UNEMBED_OUT = "unembed.hook_out"


def z_name(layer: int) -> str:
    """Every head's output before the output projection (TransformerLens's hook_z)."""
    return f"blocks.{layer}.attn.o.hook_in"


def experts_name(layer: int) -> str:
    """Each expert's router-weighted output (captured only when experts are split)."""
    return f"blocks.{layer}.mlp.experts.parts_split"


@dataclass(frozen=True)
class Layout:
    """Where the raw activations sit: bridge hook names and the Hugging Face module paths behind them.

    Built from the architecture adapter's component mapping (module paths), so it names the same
    modules in every transformers version the adapter supports.
    """

    n_layers: int
    n_heads: int
    taps: dict[str, tuple[str, str]]  # activation name -> (Hugging Face module path, "input" or "output")
    o_paths: list[str]  # per layer: the attention output projection
    mlp_out: list[str]  # per layer: the activation holding the MLP's contribution
    post_attn: list[str | None]  # per layer: the post-attention norm's input activation, if any
    post_mlp: list[str | None]
    post_attn_paths: list[str | None]
    post_mlp_paths: list[str | None]
    experts_paths: list[str | None]  # per layer: the MoE experts module (None: a dense MLP)
    n_experts: list[int]  # per layer: routed experts (0: dense)
    shared_expert: list[bool]  # per layer: the MoE block adds more than its routed experts (a shared expert)
    final_norm_path: str
    unembed_path: str

    @classmethod
    def from_bridge(cls, model: Any, hf_model: nn.Module) -> Layout:
        """The layout of a bridged model; `hf_model` is its Hugging Face model (or a copy of its module tree)."""
        config: Any = hf_model.config
        problem = unsupported_feature(config)
        if problem:  # before reading the mapping, which may lack what such a model lacks
            raise PartsError(f"parts cannot split {config.model_type} models exactly: {problem}")
        mapping = model.adapter.component_mapping
        blocks = mapping["blocks"]
        subs = blocks.submodules
        attn, mlp = subs["attn"], subs["mlp"]
        mlp_subs = getattr(mlp, "submodules", None) or {}
        n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)

        def path(*names: str | None) -> str:
            return ".".join(n for n in names if n)  # a component without a name (OPT's MLP) is its parent

        taps: dict[str, tuple[str, str]] = {
            RESID_0: (path(blocks.name, "0"), "input"),
            FINAL_NORM_IN: (mapping["ln_final"].name, "input"),
            UNEMBED_OUT: (mapping["unembed"].name, "output"),
        }
        o_paths, mlp_out, experts_paths, n_experts, shared = [], [], [], [], []
        post: dict[str, tuple[list[str | None], list[str | None]]] = {"ln1_post": ([], []), "ln2_post": ([], [])}
        for layer in range(n_layers):
            block = path(blocks.name, str(layer))
            o_paths.append(path(block, attn.name, attn.submodules["o"].name))
            taps[z_name(layer)] = (o_paths[-1], "input")
            mlp_path = path(block, mlp.name)
            experts = getattr(hf_model.get_submodule(mlp_path), "experts", None)
            is_moe = isinstance(experts, nn.Module)
            n_experts.append(expert_count(experts) if isinstance(experts, nn.Module) else 0)
            # The MLP's contribution is its output projection's output where the adapter maps one
            # (Bloom's MLP module adds the residual itself; OPT has no MLP module).
            if "out" in mlp_subs and not is_moe:
                name, module_path = f"blocks.{layer}.mlp.out.hook_out", path(mlp_path, mlp_subs["out"].name)
            else:
                name, module_path = f"blocks.{layer}.mlp.hook_out", mlp_path
            taps[name] = (module_path, "output")
            mlp_out.append(name)
            experts_paths.append(path(mlp_path, "experts") if is_moe else None)
            # Anything in the block besides the router and the routed experts (Qwen-MoE's shared expert and
            # its gate, DeepSeek's shared experts) is one more component: the block's output minus its experts'.
            extra = {name for name, _ in hf_model.get_submodule(mlp_path).named_children()} - {"gate", "router", "experts"}
            shared.append(is_moe and bool(extra))
            for key, (names, paths) in post.items():
                if key in subs:
                    norm_path = path(block, subs[key].name)
                    paths.append(norm_path)
                    names.append(f"blocks.{layer}.{key}.hook_in")
                    taps[f"blocks.{layer}.{key}.hook_in"] = (norm_path, "input")
                else:
                    names.append(None)
                    paths.append(None)
        return cls(n_layers, n_heads, taps, o_paths, mlp_out, post["ln1_post"][0], post["ln2_post"][0],
                   post["ln1_post"][1], post["ln2_post"][1], experts_paths, n_experts, shared,
                   mapping["ln_final"].name, mapping["unembed"].name)

    @property
    def is_moe(self) -> bool:
        return any(self.n_experts)


def expert_count(experts: nn.Module) -> int:
    """Routed experts in a mixture-of-experts experts module (fused 3D weights, or a list of MLPs)."""
    return int(getattr(experts, "num_experts", 0) or len(list(experts.children())))


@dataclass(frozen=True)
class FrozenNorm:
    """A LayerNorm or RMSNorm as the readout uses it: norm(x) = centre(x) / scale(x) * weight + bias,
    with centre(x) = x - mean(x) for LayerNorm (the identity for RMSNorm) and
    scale(x) = sqrt(mean(centre(x)^2) + eps), frozen per example from the full forward."""

    centres: bool
    weight: Float[Tensor, " d_model"]  # any (1 + weight) offset included
    bias: Float[Tensor, " d_model"] | None
    eps: float

    def centre(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        return x - x.mean(-1, keepdim=True) if self.centres else x

    def scale(self, x: Float[Tensor, "batch d_model"]) -> Float[Tensor, " batch"]:
        return (self.centre(x.float()).pow(2).mean(-1) + self.eps).sqrt()

    def apply(self, x: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch d_model"]:
        out = self.centre(x) / self.scale(x)[:, None] * self.weight
        return out + self.bias if self.bias is not None else out

    def fold(self, readout: Float[Tensor, "d_model label"]) -> Float[Tensor, "d_model label"]:
        """The readout seen before this norm, for an input already divided by its frozen scale:
        (centre(x) * w) @ R == x @ centre_rows(w * R)."""
        folded = self.weight[:, None] * readout
        return folded - folded.mean(0, keepdim=True) if self.centres else folded

    @classmethod
    def of(cls, module: nn.Module, where: str, d_model: int, device: torch.device) -> FrozenNorm:
        """Identify a norm module by probing it (on a float32 copy on the CPU): which LayerNorm / RMSNorm form
        (centring or not, with or without a (1 + weight) offset, with its epsilon) it computes. A norm without
        a weight (OLMo's) has weight 1; one without an epsilon attribute is tried at the usual values.
        Anything else is refused: its scale cannot be frozen. The norm returned lives on `device`."""
        probe = copy.deepcopy(module).float().to("cpu").eval()
        weight, bias = getattr(probe, "weight", None), getattr(probe, "bias", None)
        weight = weight.detach() if isinstance(weight, Tensor) else torch.ones(d_model, device="cpu")
        bias = bias.detach() if isinstance(bias, Tensor) else None
        named = [float(getattr(module, a)) for a in ("variance_epsilon", "eps", "epsilon") if hasattr(module, a)]
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(4, d_model, generator=generator, device="cpu") + 0.5
        for eps in named[:1] or [1e-5, 1e-6, 1e-8, 1e-12]:
            rows = torch.cat([x * 3.0, x * eps**0.5])  # the small rows check epsilon too
            with torch.no_grad():
                expected = probe(rows).float().cpu()
            for centres in (False, True):
                for offset in (0.0, 1.0):
                    norm = cls(centres, weight + offset, bias, eps)
                    if torch.allclose(norm.apply(rows), expected, rtol=1e-4, atol=1e-5):
                        return cls(centres, norm.weight.to(device), None if bias is None else bias.to(device), eps)
        raise PartsError(
            f"parts cannot split this model exactly: the norm {where} ({type(module).__name__}) is neither a LayerNorm nor "
            "an RMSNorm form parts knows, so its scale cannot be frozen; use another model"
        )


def affine_parts(
    module: nn.Module, where: str, outputs: Sequence[int] | None = None
) -> tuple[Float[Tensor, "d_in d_out"], Float[Tensor, " d_out"] | None]:
    """Weight (as [input, output]) and bias of a linear layer (torch Linear, or GPT-2's Conv1D), in float32;
    `outputs`: only these output features (the label words of an unembedding: no float copy of the vocabulary)."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if isinstance(module, nn.Linear) and isinstance(weight, Tensor):
        rows = weight.detach() if outputs is None else weight.detach()[torch.tensor(list(outputs), device=weight.device)]
        matrix = rows.float().T
    elif type(module).__name__ == "Conv1D" and isinstance(weight, Tensor):  # transformers' GPT-2 layer: [in, out]
        columns = weight.detach() if outputs is None else weight.detach()[:, torch.tensor(list(outputs), device=weight.device)]
        matrix = columns.float()
    else:
        raise PartsError(f"parts cannot split this model exactly: the projection {where} ({type(module).__name__}) is not "
                         "a linear layer parts can read; use another model")
    if not isinstance(bias, Tensor):
        return matrix, None
    bias = bias.detach() if outputs is None else bias.detach()[torch.tensor(list(outputs), device=bias.device)]
    return matrix, bias.float()


def unsupported_feature(config: Any) -> str | None:
    """A feature of this architecture that no frozen-scale readout can split exactly, with what to do."""
    if config.model_type == "opt" and getattr(config, "do_layer_norm_before", True) is False:
        return ("OPT with do_layer_norm_before=False (OPT-350m) normalises the whole residual stream after every block, "
                "so no component reaches the logits on its own: use another OPT size")
    if config.model_type == "opt" and getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
        return ("OPT with word_embed_proj_dim != hidden_size projects the stream after the final norm, which parts "
                "does not read out: use another OPT size")
    return None


def multipliers(config: Any) -> tuple[float, float]:
    """(residual multiplier, logit multiplier) of a model: Granite's residual_multiplier and
    1 / logits_scaling, Cohere's logit_scale; 1 for everyone else."""
    residual = float(getattr(config, "residual_multiplier", None) or 1.0)
    logit = 1.0
    if getattr(config, "logits_scaling", None):
        logit /= float(config.logits_scaling)
    if getattr(config, "logit_scale", None) and config.model_type.startswith("cohere"):
        logit *= float(config.logit_scale)
    return residual, logit


@dataclass
class Readout:
    """Everything between raw activations and label-word logits, for one model and one set of label words.

    Readouts (`*_unembed`) already include the final norm's weight and centring, every post-norm's
    weight and centring, the residual and logit multipliers: per example only the frozen scales
    (final norm, post-norms) divide them.
    """

    label_token_ids: list[int]
    layout: Layout
    final_norm: FrozenNorm
    unembed: Float[Tensor, "d_model label"]  # what the final residual stream reads (already centred)
    head_unembed: Float[Tensor, "layer head d_head label"]
    mlp_unembed: Float[Tensor, "layer d_model label"]
    attn_bias_logits: Float[Tensor, "layer label"]  # b_O through the post-norm (divided by its scale)
    post_bias_logits: Float[Tensor, " label"]  # post-norm biases (divided by the final scale only)
    constant: Float[Tensor, " label"]  # final norm bias and unembedding bias: not divided by any scale
    post_attn: list[FrozenNorm | None]
    post_mlp: list[FrozenNorm | None]
    logit_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    final_logit_softcap: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_modules(cls, hf_model: nn.Module, layout: Layout, label_token_ids: Sequence[int]) -> Readout:
        """Read the weights from the Hugging Face modules the layout names (any copy sharing them)."""
        config: Any = hf_model.config
        d_model = int(config.hidden_size)
        # Every readout tensor lives where the unembedding does (one device, also for a model spread over several).
        W_U, b_U = affine_parts(hf_model.get_submodule(layout.unembed_path), "unembed", list(label_token_ids))
        device = W_U.device
        final_norm = FrozenNorm.of(hf_model.get_submodule(layout.final_norm_path), layout.final_norm_path, d_model, device)
        residual_multiplier, logit_multiplier = multipliers(config)
        unembed = final_norm.fold(W_U) * logit_multiplier
        constant = torch.zeros(len(label_token_ids), device=W_U.device)
        if final_norm.bias is not None:
            constant = constant + final_norm.bias @ W_U
        if b_U is not None:
            constant = constant + b_U
        constant = constant * logit_multiplier

        post_attn = [None if p is None else FrozenNorm.of(hf_model.get_submodule(p), p, d_model, device)
                     for p in layout.post_attn_paths]
        post_mlp = [None if p is None else FrozenNorm.of(hf_model.get_submodule(p), p, d_model, device)
                    for p in layout.post_mlp_paths]

        def before(norm: FrozenNorm | None) -> Float[Tensor, "d_model label"]:
            """What a component's output reads, before its post-norm's scale divides it."""
            return residual_multiplier * (unembed if norm is None else norm.fold(unembed))

        head_unembed, attn_bias_logits, mlp_unembed = [], [], []
        post_bias_logits = torch.zeros(len(label_token_ids), device=W_U.device)
        for layer in range(layout.n_layers):
            W_O, b_O = affine_parts(hf_model.get_submodule(layout.o_paths[layer]), layout.o_paths[layer])
            W_O, b_O = W_O.to(device), None if b_O is None else b_O.to(device)
            attn_readout = before(post_attn[layer])
            W_O_heads = einops.rearrange(W_O, "(head d_head) d_model -> head d_head d_model", head=layout.n_heads)
            head_unembed.append(einops.einsum(
                W_O_heads, attn_readout, "head d_head d_model, d_model label -> head d_head label"))
            attn_bias_logits.append(b_O @ attn_readout if b_O is not None else torch.zeros_like(constant))
            mlp_unembed.append(before(post_mlp[layer]))
            for norm in (post_attn[layer], post_mlp[layer]):
                if norm is not None and norm.bias is not None:
                    post_bias_logits = post_bias_logits + residual_multiplier * norm.bias @ unembed
        softcap = getattr(config, "final_logit_softcapping", None)
        info: dict[str, Any] = {}
        if softcap:
            info["decomposed_logits"] = f"pre-soft-cap (the model caps its logits at {float(softcap):g})"
        if residual_multiplier != 1.0 or logit_multiplier != 1.0:
            info["multipliers"] = {"residual": residual_multiplier, "logit": logit_multiplier}
        return cls(
            list(label_token_ids), layout, final_norm, unembed, torch.stack(head_unembed), torch.stack(mlp_unembed),
            torch.stack(attn_bias_logits), post_bias_logits, constant, post_attn, post_mlp, logit_multiplier,
            residual_multiplier, float(softcap) if softcap else None, info,
        )

    def _label_index(self, device: torch.device) -> Int[Tensor, " label"]:
        """The label words' token ids on `device`, copied there once (not once per batch: a host copy per
        batch would make the GPU wait)."""
        cached = self.__dict__.setdefault("_label_indices", {})
        if device not in cached:
            cached[device] = torch.tensor(self.label_token_ids, dtype=torch.long, device=device)
        return cached[device]

    def post_scales(self, activations: Activations, names: list[str | None], norms: list[FrozenNorm | None],
                    batch: int, device: torch.device) -> Float[Tensor, "batch layer"]:
        """Each post-norm's frozen scale per example (1 where a layer has none)."""
        columns = [norm.scale(_last(activations, name)) if norm is not None and name is not None
                   else torch.ones(batch, device=device) for name, norm in zip(names, norms, strict=True)]
        return torch.stack(columns, dim=1)

    def attention_scales(self, activations: Activations) -> Float[Tensor, "batch layer"]:
        """What divides each layer's attention output on its way to the logits: the final norm's frozen
        scale times the layer's post-attention norm's (1 where it has none)."""
        final_scale = self.final_norm.scale(_last(activations, FINAL_NORM_IN))
        batch, device = final_scale.shape[0], final_scale.device
        return self.post_scales(activations, self.layout.post_attn, self.post_attn, batch, device) * final_scale[:, None]

    def source_logits(
        self, activations: Activations, layer: int, heads: Sequence[int],
        pattern: Float[Tensor, "batch layer_head key"], values: Float[Tensor, "batch kv_head key d_head"],
    ) -> Float[Tensor, "batch head key label"]:
        """Heads' direct label-word logits split over the positions they read, at the last position.

        A head's output there is `sum_key pattern[key] * values[key] @ W_O[head]`; read through the same
        frozen scales as `split` reads the head's whole output, each key's term reaches the logits on its
        own, and the terms sum to the head's entry of the component logits. `pattern` holds every head of
        the layer (the last query's row); `values` every key/value head (grouped-query: head h reads group
        h // (heads / key-value heads)).
        """
        n_kv = values.shape[1]
        if self.layout.n_heads % n_kv:
            raise PartsError(f"layer {layer} has {n_kv} key/value heads for {self.layout.n_heads} query heads: "
                             "parts cannot tell which values a head reads")
        index = torch.tensor(list(heads), dtype=torch.long, device=values.device)
        head_values = values.float()[:, index // (self.layout.n_heads // n_kv)]  # batch head key d_head
        weighted = pattern.float()[:, index, :, None] * head_values
        scale = self.attention_scales(activations)[:, layer]
        return einops.einsum(
            weighted.to(self.unembed.device), self.head_unembed[layer, index.to(self.unembed.device)],
            "batch head key d_head, head d_head label -> batch head key label",
        ) / scale.to(self.unembed.device)[:, None, None, None]

    def split(self, activations: Activations, logits: Float[Tensor, "batch vocab"]) -> tuple[
        Float[Tensor, "batch component label"], Float[Tensor, "batch label"], Float[Tensor, "batch label"]
    ]:
        """(component logits, remainder, model logits) of a batch from its raw last-position activations.

        Components are every head (layer-major), then each layer's MLP, or with split experts each
        layer's experts (and, for a shared expert, the rest of the MLP) in the MLP's place.
        """
        layout = self.layout
        # A model spread over devices leaves each activation where its layer ran: read out on one device.
        activations = {name: value.to(self.unembed.device) for name, value in activations.items()}
        logits = logits.to(self.unembed.device)
        final_scale = self.final_norm.scale(_last(activations, FINAL_NORM_IN))  # batch
        batch, device = final_scale.shape[0], final_scale.device
        attn_scale = self.attention_scales(activations)
        mlp_scale = self.post_scales(activations, layout.post_mlp, self.post_mlp, batch, device) * final_scale[:, None]
        # The output projection's input, as that module sees it (the bridge may split it into heads by its own
        # d_head, which is not the value head size of every model: DeepSeek's): split by the model's heads here.
        z = torch.stack([_last(activations, z_name(l)).flatten(1) for l in range(layout.n_layers)], dim=1)
        z = einops.rearrange(z, "batch layer (head d_head) -> batch layer head d_head", head=layout.n_heads)
        head_logits = einops.einsum(
            z, self.head_unembed, "batch layer head d_head, layer head d_head label -> batch layer head label"
        ) / attn_scale[:, :, None, None]
        parts = [einops.rearrange(head_logits, "batch layer head label -> batch (layer head) label")]
        # Without a shared expert, the MLP's output minus its experts' is float noise: it joins the remainder.
        rest_logits = torch.zeros(batch, len(self.label_token_ids), device=device)
        for layer in range(layout.n_layers):
            mlp_out = _last(activations, layout.mlp_out[layer])
            contributions = mlp_out[:, None]  # batch part d_model
            if experts_name(layer) in activations:
                expert_out = activations[experts_name(layer)].float()  # batch expert d_model
                rest = mlp_out - expert_out.sum(1)
                if layout.shared_expert[layer]:
                    contributions = torch.cat([expert_out, rest[:, None]], dim=1)
                else:
                    contributions = expert_out
                    rest_logits = rest_logits + rest @ self.mlp_unembed[layer] / mlp_scale[:, layer, None]
            parts.append(einops.einsum(
                contributions, self.mlp_unembed[layer], "batch part d_model, d_model label -> batch part label"
            ) / mlp_scale[:, layer, None, None])
        component_logits = torch.cat(parts, dim=1)
        remainder = (
            _last(activations, RESID_0) @ self.unembed / final_scale[:, None]
            + einops.reduce(self.attn_bias_logits / attn_scale[:, :, None], "batch layer label -> batch label", "sum")
            + self.post_bias_logits / final_scale[:, None]
            + self.constant
            + rest_logits
        )
        ids = self._label_index(logits.device)
        if self.final_logit_softcap is not None:  # decompose what the cap is applied to
            model_logits = _last(activations, UNEMBED_OUT)[:, ids] * self.logit_multiplier
        else:
            model_logits = logits.float()[:, ids]
        return component_logits, remainder, model_logits

    def final_residual(self, activations: Activations) -> Float[Tensor, "batch d_model"]:
        """The last position's final residual stream after the final norm (its own scale, weight and bias): what the
        unembedding reads. Kept per run for the residual probe (parts.reweighting.supervised)."""
        resid = _last(activations, FINAL_NORM_IN).to(self.unembed.device)
        return self.final_norm.apply(resid)


def _last(activations: Activations, name: str) -> Tensor:
    """A captured activation at the last position, in float32: [batch ...]."""
    value = activations[name]
    return value.float()
