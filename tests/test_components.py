"""Component names: made, parsed and ordered in one place."""

from __future__ import annotations

import pytest

from parts.components import (
    Component,
    component_kind,
    component_names,
    component_summary,
    parse_component,
    sort_components,
)
from parts.errors import PartsError


def test_names_are_heads_layer_major_then_mlps():
    assert component_names(2, 3) == ["L0H0", "L0H1", "L0H2", "L1H0", "L1H1", "L1H2", "MLP0", "MLP1"]


def test_parse_gives_kind_layer_and_head():
    assert parse_component("L12H7") == Component("head", 12, 7)
    assert parse_component("MLP10") == Component("mlp", 10, -1)
    assert [component_kind(n) for n in ("L0H0", "MLP0")] == ["head", "mlp"]


def test_every_made_name_parses_back():
    for index, name in enumerate(component_names(3, 4)):
        kind, layer, head = parse_component(name)
        assert (kind, layer, head) == (("head", index // 4, index % 4) if index < 12 else ("mlp", index - 12, -1))


def test_sort_restores_the_canonical_order():
    names = component_names(11, 2)  # two-digit layers: L10 sorts after L9, not after L1
    assert sort_components(reversed(names)) == names
    assert sort_components(["MLP2", "L10H0", "MLP0", "L2H1", "L2H0"]) == ["L2H0", "L2H1", "L10H0", "MLP0", "MLP2"]


@pytest.mark.parametrize("name", ["", "L1", "H1", "L1H", "mlp1", "MLP", "L1H1 ", "MLPx", "L-1H0"])
def test_a_malformed_name_is_refused(name):
    with pytest.raises(PartsError, match="is not like L0H0 or MLP0"):
        parse_component(name)


def test_the_summary_counts_each_kind_the_run_holds():
    assert component_summary(component_names(30, 9)) == "300 (30 layers x 9 heads + 30 MLPs)"
    # --split-experts on a 2-layer, 4-head, 4-expert Mixtral: no MLP left, 8 experts in their place
    experts = [f"MLP{layer}E{e}" for layer in range(2) for e in range(4)]
    assert component_summary(component_names(2, 4)[:8] + experts) == "16 (2 layers x 4 heads + 2 layers x 4 experts)"
    # a shared expert counted apart; a kind uneven over layers given as its total
    mixed = ["L0H0", "L0H1", "L1H0", "MLP0", "MLP1E0", "MLP1E1", "MLP1S"]
    assert component_summary(mixed) == "7 (3 heads + 1 MLP + 1 layer x 2 experts + 1 layer x 1 shared expert)"
