"""Interop with TransformerLens: component names <-> activation names, layer x head views, and the Decomposer on
arbitrary prompts checked against TransformerLens's own cache of the same model (docs/guide/transformerlens.md)."""

from __future__ import annotations

import pytest
import torch

from parts.components import (
    component_names,
    expert_name,
    from_transformer_lens,
    head_name,
    mlp_name,
    shared_expert_name,
    to_transformer_lens,
)
from parts.decomposition.runs import layer_head_logits, layer_mlp_logits
from parts.errors import PartsError


def test_names_map_to_transformer_lens_and_back():
    assert to_transformer_lens("L12H4") == ("blocks.12.attn.hook_z", 4)
    assert to_transformer_lens("MLP12") == ("blocks.12.hook_mlp_out", None)
    assert from_transformer_lens("blocks.12.attn.hook_z", 4) == "L12H4"
    assert from_transformer_lens("blocks.12.attn.hook_z", head=0) == "L12H0"
    assert from_transformer_lens("blocks.12.attn.hook_result", 4) == "L12H4"  # the per-head output, W_O applied
    assert from_transformer_lens("blocks.12.hook_mlp_out") == "MLP12"
    names = component_names(13, 5)
    assert [from_transformer_lens(*to_transformer_lens(name)) for name in names] == names
    hooks = [(f"blocks.{layer}.attn.hook_z", head) for layer in range(13) for head in range(5)]
    hooks += [(f"blocks.{layer}.hook_mlp_out", None) for layer in range(13)]
    assert [to_transformer_lens(from_transformer_lens(*hook)) for hook in hooks] == hooks


@pytest.mark.parametrize(("hook", "head", "message"), [
    ("blocks.12.attn.hook_z", None, r"holds every head of layer 12: say which"),
    ("blocks.12.attn.hook_z", -1, r"say which, e.g. from_transformer_lens\('blocks.12.attn.hook_z', head=0\)"),
    ("blocks.12.attn.hook_z", True, "say which"),
    ("blocks.12.hook_mlp_out", 3, r"is the whole MLP of layer 12, which has no heads: drop head=3"),
    ("blocks.12.attn.hook_q", 4, "is not a TransformerLens activation of one head or MLP"),
    ("blocks.12.hook_resid_post", None, "is not a TransformerLens activation of one head or MLP"),
    ("L12H4", None, "is not a TransformerLens activation"),
    ("blocks.x.attn.hook_z", 0, "is not a TransformerLens activation"),
    (" blocks.1.hook_mlp_out", None, "is not a TransformerLens activation"),
])
def test_a_bad_transformer_lens_name_is_refused(hook, head, message):
    with pytest.raises(PartsError, match=message):
        from_transformer_lens(hook, head)


@pytest.mark.parametrize("name", ["blocks.12.attn.hook_z", "L12", "H4", "l12h4", "MLP", "L1H2 "])
def test_a_bad_component_name_is_refused(name):
    with pytest.raises(PartsError, match="is not like L0H0 or MLP0"):
        to_transformer_lens(name)


def test_an_expert_has_no_transformer_lens_hook():
    for name in (expert_name(3, 1), shared_expert_name(3)):
        with pytest.raises(PartsError, match=r"TransformerLens hooks only whole \(blocks.3.hook_mlp_out, component "
                                             r"MLP3\): decompose without --split-experts"):
            to_transformer_lens(name)


def test_layer_views_index_like_the_names():
    n_layers, n_heads = 3, 4
    names = component_names(n_layers, n_heads)
    logits = torch.randn(5, len(names), 2)
    heads = layer_head_logits(logits, names, n_layers, n_heads)
    mlps = layer_mlp_logits(logits, names, n_layers, n_heads)
    assert heads.shape == (5, n_layers, n_heads, 2) and mlps.shape == (5, n_layers, 2)
    for layer in range(n_layers):
        assert torch.equal(mlps[:, layer], logits[:, names.index(mlp_name(layer))])
        for head in range(n_heads):
            assert torch.equal(heads[:, layer, head], logits[:, names.index(head_name(layer, head))])
    with pytest.raises(PartsError, match="do not start with every head of 3 layers x 4 heads"):
        layer_head_logits(logits, names[::-1], n_layers, n_heads)
    with pytest.raises(PartsError, match="do not start with every head"):
        layer_head_logits(logits[:, :-1], names, n_layers, n_heads)
    # Split experts: the heads still view as a grid; the MLPs have no one column per layer and are refused.
    split = names[:n_layers * n_heads] + [mlp_name(0), expert_name(1, 0), expert_name(1, 1), shared_expert_name(1),
                                          mlp_name(2)]
    split_logits = torch.randn(5, len(split), 2)
    assert torch.equal(layer_head_logits(split_logits, split, n_layers, n_heads)[:, 2, 3],
                       split_logits[:, split.index("L2H3")])
    with pytest.raises(PartsError, match=r"split mixture-of-experts MLPs into experts \(MLP1E0, ...\).*"
                                         "decompose without --split-experts"):
        layer_mlp_logits(split_logits, split, n_layers, n_heads)
    with pytest.raises(PartsError, match="do not end with MLP0 ... MLP2"):
        layer_mlp_logits(logits, names[:-1] + ["MLP7"], n_layers, n_heads)


def test_decomposer_on_arbitrary_prompts_matches_transformer_lens_cache(tiny_llama):
    """Any prompts, any label words: each head's component logits are its `hook_z` slice through `W_O`, the
    final norm (scale frozen from the full residual) and the unembedding, as TransformerLens computes them."""
    from parts.decomposition.decompose import Decomposer
    from parts.model.loading import plain_model

    model = tiny_llama
    tokenizer = model.tokenizer
    labels = tokenizer.convert_tokens_to_ids(["good", "bad", "dull"])
    prompts = ["the film was fun and", "a very boring plot but the acting was", "movie ?"]
    decomposer = Decomposer(model, labels)
    result = decomposer(prompts, batch_size=2, progress=False)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    assert decomposer.component_names == component_names(n_layers, n_heads)
    assert result.component_logits.shape == (3, n_layers * n_heads + n_layers, 3)
    heads = layer_head_logits(result.component_logits, decomposer.component_names, n_layers, n_heads)
    mlps = layer_mlp_logits(result.component_logits, decomposer.component_names, n_layers, n_heads)
    norm_weight = plain_model(model).model.norm.weight
    unembed = model.W_U[:, labels]  # d_model label
    for example, tokens in enumerate(decomposer.tokenize(prompts)):
        with torch.no_grad():
            _, cache = model.run_with_cache(torch.tensor([tokens]))
        scale = cache["ln_final.hook_scale"][0, -1]
        for index, name in enumerate(decomposer.component_names):
            hook, head = to_transformer_lens(name)
            if head is None:
                written = cache[hook][0, -1]  # d_model
                view = mlps[example, index - n_layers * n_heads]
            else:
                layer = int(hook.split(".")[1])
                written = cache[hook][0, -1, head] @ model.W_O[layer, head]  # d_head @ (d_head d_model)
                view = heads[example, layer, head]
            expected = (written / scale * norm_weight) @ unembed
            torch.testing.assert_close(result.component_logits[example, index], expected.detach(), atol=1e-5, rtol=1e-4)
            assert torch.equal(view, result.component_logits[example, index])


@pytest.mark.integration
def test_the_transformer_lens_page_runs_as_written():
    """docs/guide/transformerlens.md, every Python block in order on the embedded model: what it prints holds."""
    from test_docs import ROOT, code_blocks

    blocks = code_blocks(ROOT / "docs" / "guide" / "transformerlens.md", ("python",))
    assert len(blocks) == 4
    namespace: dict = {}
    for _, code in blocks:
        exec(compile(code, "transformerlens.md", "exec"), namespace)
    assert float(namespace["error"]) < 1e-3
    assert tuple(namespace["heads"].shape) == (2, 30, 9, 2) and tuple(namespace["mlps"].shape) == (2, 30, 2)
    name = f"L{namespace['layer']}H{namespace['head']}"
    torch.testing.assert_close(namespace["direct"],
                               namespace["result"].component_logits[0, namespace["names"].index(name)],
                               atol=1e-4, rtol=1e-4)
    assert not torch.equal(namespace["ablated"][0, -1], namespace["logits"][0, -1])  # the hook took effect
