"""Component names: the one place that makes, parses and orders them.

A run's components are every attention head, named `L{layer}H{head}`, layer-major, then every
MLP, named `MLP{layer}` (`component_names`). `parse_component` turns a name back into its kind,
layer and head (-1 for an MLP); `component_order` sorts names into that same canonical order.
Kinds are `HEAD`, `MLP` and `EXPERT`: with `--split-experts` a mixture-of-experts MLP is replaced,
in its place, by its experts `MLP{layer}E{expert}` and, where the block has one, its shared expert
`MLP{layer}S` (head field: the expert's index, `SHARED_EXPERT` for the shared one).

`to_transformer_lens` and `from_transformer_lens` map names to TransformerLens's activation names and back:
`L12H4` is head 4 of `blocks.12.attn.hook_z` (shape `batch pos head d_head`; the head's direct contribution is
its z times its `W_O`), `MLP12` is `blocks.12.hook_mlp_out`. An expert has no hook of its own in TransformerLens.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import NamedTuple

from parts.errors import PartsError

HEAD, MLP, EXPERT = "head", "mlp", "expert"
KINDS = (HEAD, MLP, EXPERT)
SHARED_EXPERT = 1_000_000  # the head field of a shared expert: after every routed expert of its layer
_PATTERN = re.compile(
    r"^L(?P<layer>\d+)H(?P<head>\d+)$|^MLP(?P<mlp_layer>\d+)$"
    r"|^MLP(?P<expert_layer>\d+)(?:E(?P<expert>\d+)|(?P<shared>S))$"
)


_TL_HOOK = re.compile(r"^blocks\.(?P<layer>\d+)\.(?:attn\.hook_(?P<head_hook>z|result)|hook_mlp_out)$")
TL_HEAD_HOOK = "blocks.{layer}.attn.hook_z"  # batch pos head d_head: a head's output before W_O
TL_MLP_HOOK = "blocks.{layer}.hook_mlp_out"  # batch pos d_model


class Component(NamedTuple):
    """What a component name says: its kind, its layer, and its head (-1 for an MLP)."""

    kind: str
    layer: int
    head: int


def head_name(layer: int, head: int) -> str:
    """'L3H5': head 5 of layer 3."""
    return f"L{layer}H{head}"


def mlp_name(layer: int) -> str:
    """'MLP3': the MLP of layer 3."""
    return f"MLP{layer}"


def expert_name(layer: int, expert: int) -> str:
    """'MLP3E5': expert 5 of layer 3's mixture-of-experts MLP (its router-weighted output)."""
    return f"MLP{layer}E{expert}"


def shared_expert_name(layer: int) -> str:
    """'MLP3S': the shared expert of layer 3's mixture-of-experts MLP (Qwen-MoE)."""
    return f"MLP{layer}S"


def component_names(n_layers: int, n_heads: int) -> list[str]:
    """Every head as `L{layer}H{head}` layer-major, then every MLP as `MLP{layer}`."""
    heads = [head_name(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    return heads + [mlp_name(layer) for layer in range(n_layers)]


def parse_component(name: str) -> Component:
    """'L3H5' -> Component('head', 3, 5); 'MLP7' -> Component('mlp', 7, -1)."""
    match = _PATTERN.match(name)
    if match is None:
        raise PartsError(f"component name {name!r} is not like L0H0 or MLP0 (or MLP0E1, an expert): use a name "
                         "from the run's component_names")
    if match["mlp_layer"] is not None:
        return Component(MLP, int(match["mlp_layer"]), -1)
    if match["expert_layer"] is not None:
        return Component(EXPERT, int(match["expert_layer"]), SHARED_EXPERT if match["shared"] else int(match["expert"]))
    return Component(HEAD, int(match["layer"]), int(match["head"]))


def component_kind(name: str) -> str:
    """'head' or 'mlp'."""
    return parse_component(name).kind


def component_order(name: str) -> tuple[int, int, int]:
    """Sort key of the canonical order: every head (layer, then head), then every MLP by layer (a split
    MLP's experts in its place, in expert order, its shared expert last)."""
    component = parse_component(name)
    return (0 if component.kind == HEAD else 1), component.layer, component.head


def sort_components(names: Iterable[str]) -> list[str]:
    """Names in `component_names` order (heads layer-major, then MLPs)."""
    return sorted(names, key=component_order)


def component_summary(names: Iterable[str]) -> str:
    """What a run's components are, counted from their names: '300 (30 layers x 9 heads + 30 MLPs)';
    with `--split-experts`, '16 (2 layers x 4 heads + 2 layers x 4 experts)' (a shared expert counted apart).
    A kind with a different count on some layers is given as its total ('7 heads')."""
    parsed = [parse_component(name) for name in names]

    def count(kind: str, noun: str, keep: bool = True) -> str:
        per_layer = Counter(c.layer for c in parsed if c.kind == kind and (c.head != SHARED_EXPERT) == keep)
        total, sizes = sum(per_layer.values()), set(per_layer.values())
        if not total:
            return ""
        if kind == MLP or len(sizes) > 1:
            return f"{total} {noun}{'s' if total > 1 else ''}"
        size = sizes.pop()
        return f"{len(per_layer)} layer{'s' if len(per_layer) > 1 else ''} x {size} {noun}{'s' if size > 1 else ''}"

    parts = [count(HEAD, "head"), count(MLP, "MLP"), count(EXPERT, "expert"), count(EXPERT, "shared expert", keep=False)]
    return f"{len(parsed)} ({' + '.join(p for p in parts if p)})"


def to_transformer_lens(name: str) -> tuple[str, int | None]:
    """A component's TransformerLens activation: 'L12H4' -> ('blocks.12.attn.hook_z', 4) (the head index in
    that hook's `head` axis); 'MLP12' -> ('blocks.12.hook_mlp_out', None)."""
    component = parse_component(name)
    if component.kind == HEAD:
        return TL_HEAD_HOOK.format(layer=component.layer), component.head
    if component.kind == MLP:
        return TL_MLP_HOOK.format(layer=component.layer), None
    raise PartsError(f"{name} is one expert of layer {component.layer}'s mixture-of-experts MLP, which TransformerLens "
                     f"hooks only whole ({TL_MLP_HOOK.format(layer=component.layer)}, component "
                     f"{mlp_name(component.layer)}): decompose without --split-experts to compare with it")


def from_transformer_lens(hook: str, head: int | None = None) -> str:
    """A TransformerLens activation (and head) as a component name: ('blocks.12.attn.hook_z', 4) -> 'L12H4'
    (`hook_result`, the per-head output, too); 'blocks.12.hook_mlp_out' -> 'MLP12'."""
    match = _TL_HOOK.match(hook)
    if match is None:
        raise PartsError(f"{hook!r} is not a TransformerLens activation of one head or MLP: use "
                         "blocks.L.attn.hook_z (with a head), blocks.L.attn.hook_result (with a head) or "
                         "blocks.L.hook_mlp_out")
    layer = int(match["layer"])
    if match["head_hook"] is None:
        if head is not None:
            raise PartsError(f"{hook} is the whole MLP of layer {layer}, which has no heads: drop head={head}")
        return mlp_name(layer)
    if head is None or isinstance(head, bool) or not isinstance(head, int) or head < 0:
        raise PartsError(f"{hook} holds every head of layer {layer}: say which, e.g. "
                         f"from_transformer_lens({hook!r}, head=0) (got head={head!r})")
    return head_name(layer, head)
