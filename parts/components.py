"""Component names: the one place that makes, parses and orders them.

A run's components are every attention head, named `L{layer}H{head}`, layer-major, then every
MLP, named `MLP{layer}` (`component_names`). `parse_component` turns a name back into its kind,
layer and head (-1 for an MLP); `component_order` sorts names into that same canonical order.
Kinds are `HEAD` and `MLP`; a further kind (e.g. a mixture-of-experts expert `MLP{layer}E{expert}`)
is one more pattern in `_PATTERN`, one more branch in `parse_component` and one more maker here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

from parts.errors import PartsError

HEAD, MLP = "head", "mlp"
KINDS = (HEAD, MLP)
_PATTERN = re.compile(r"^L(?P<layer>\d+)H(?P<head>\d+)$|^MLP(?P<mlp_layer>\d+)$")


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


def component_names(n_layers: int, n_heads: int) -> list[str]:
    """Every head as `L{layer}H{head}` layer-major, then every MLP as `MLP{layer}`."""
    heads = [head_name(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    return heads + [mlp_name(layer) for layer in range(n_layers)]


def parse_component(name: str) -> Component:
    """'L3H5' -> Component('head', 3, 5); 'MLP7' -> Component('mlp', 7, -1)."""
    match = _PATTERN.match(name)
    if match is None:
        raise PartsError(f"component name {name!r} is not like L0H0 or MLP0: use a name from the run's component_names")
    if match["mlp_layer"] is not None:
        return Component(MLP, int(match["mlp_layer"]), -1)
    return Component(HEAD, int(match["layer"]), int(match["head"]))


def component_kind(name: str) -> str:
    """'head' or 'mlp'."""
    return parse_component(name).kind


def component_order(name: str) -> tuple[int, int, int]:
    """Sort key of the canonical order: every head (layer, then head), then every MLP by layer."""
    component = parse_component(name)
    return KINDS.index(component.kind), component.layer, component.head


def sort_components(names: Iterable[str]) -> list[str]:
    """Names in `component_names` order (heads layer-major, then MLPs)."""
    return sorted(names, key=component_order)
