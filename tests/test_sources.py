"""Source attribution: a head's direct effect split exactly over the positions it reads.

Every family of the tiny-model suite either splits exactly (the sources of every head sum to the head's
entry of the component logits, with and without prefix reuse, on each engine) or is refused with one
line; a hand-built two-layer attention model gives the split computed by hand.
"""

from __future__ import annotations

import warnings

import einops
import pytest
import torch

from parts.decomposition.decompose import Decomposer
from parts.decomposition.sources import attribute_sources
from parts.errors import PartsError
from tests.families import FAMILIES
from tests.test_families import PROMPTS, build

ENGINES = ("hf", "bridge")
# What source attribution refuses (one line each); every other family the decomposer splits is split exactly.
REFUSED = {
    ("falcon", "hf"): "returned no attention pattern",  # Falcon-7B's attention returns no weights
    ("deepseek_v3", "hf"): "eager attention fails",  # transformers' eager attention cannot run multi-head latent
    ("deepseek_v3", "bridge"): "no KV cache",
    ("mpt", "hf"): "logits change when its attention is captured",  # MPT's ALiBi moves once a cache is given
}


def every_head(decomposer: Decomposer) -> list[str]:
    return [n for n in decomposer.component_names if n.startswith("L")]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_splits_exactly_over_sources_or_is_refused(family, engine, tokenizer):
    model, _, ids = build(family, tokenizer)
    if isinstance(model, PartsError):
        pytest.skip("the family is refused at load")
    try:
        decomposer = Decomposer(model, ids, engine)
    except PartsError:
        pytest.skip("the family is refused by the decomposer")
    heads = every_head(decomposer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = decomposer(PROMPTS, batch_size=2, progress=False)
        if (family, engine) in REFUSED:
            with pytest.raises(PartsError, match=REFUSED[family, engine]) as caught:
                attribute_sources(decomposer, PROMPTS, heads, batch_size=2, prefix_reuse=True)
            assert "\n" not in str(caught.value)
            return
        reused = attribute_sources(decomposer, PROMPTS, heads, batch_size=2, prefix_reuse=True)
        full = attribute_sources(decomposer, PROMPTS, heads, batch_size=2, prefix_reuse=False)
    columns = [decomposer.component_names.index(h) for h in heads]
    direct = reference.component_logits[:, columns]
    for result in (reused, full):
        total = einops.reduce(result.logits, "example head source label -> example head label", "sum")
        torch.testing.assert_close(total, direct, atol=1e-5, rtol=1e-5)
        # Each prompt's attention over its own tokens sums to one (less an attention sink's share): no weight
        # fell on padding.
        mass = result.attention.sum(-1)
        if family == "gpt_oss":
            assert bool((mass < 1).all()) and bool((mass > 0).all())
        else:
            torch.testing.assert_close(mass, torch.ones(len(PROMPTS), len(heads)), atol=1e-5, rtol=0)
    torch.testing.assert_close(reused.logits, full.logits, atol=1e-5, rtol=1e-4)


def test_a_hand_built_two_layer_model_gives_the_sources_computed_by_hand(tokenizer):
    """Two llama layers, grouped-query attention: pattern x value x W_O read through the final RMSNorm (its scale
    frozen from the final residual) and the unembedding, computed here from the Hugging Face modules alone."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from parts.model.loading import from_hf

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         tie_word_embeddings=False, initializer_range=0.3)
    hf_model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        hf_model.model.norm.weight.copy_(torch.randn(16) * 0.3 + 1.0)
    plain = copy.deepcopy(hf_model)
    plain.set_attn_implementation("eager")
    labels = [tokenizer.convert_tokens_to_ids(w) for w in ("negative", "positive")]
    prompt = PROMPTS[1]
    model = from_hf(hf_model, tokenizer, "hand-built")  # wraps hf_model in place: `plain` is the reference
    ids = torch.tensor([model.tokenizer(prompt)["input_ids"]])  # as the decomposition tokenises (BOS first)
    captured = {}
    hooks = [plain.model.layers[layer].self_attn.v_proj.register_forward_hook(
        lambda _m, _a, out, layer=layer: captured.__setitem__(layer, out[0])) for layer in range(2)]
    hooks.append(plain.model.norm.register_forward_pre_hook(lambda _m, args: captured.__setitem__("final", args[0][0])))
    with torch.no_grad():
        out = plain(ids, output_attentions=True)
    for hook in hooks:
        hook.remove()
    final = captured["final"][-1]
    scale = (final.pow(2).mean() + config.rms_norm_eps).sqrt()
    readout = plain.model.norm.weight[:, None] * plain.lm_head.weight[labels].T / scale  # d_model label
    expected = torch.zeros(2, 4, ids.shape[1], 2)
    for layer in range(2):
        values = captured[layer].view(ids.shape[1], 2, 4)  # pos kv_head d_head
        W_O = plain.model.layers[layer].self_attn.o_proj.weight  # d_model (head d_head)
        for head in range(4):
            pattern = out.attentions[layer][0, head, -1]  # key
            written = pattern[:, None] * values[:, head // 2] @ W_O[:, head * 4:(head + 1) * 4].T  # pos d_model
            expected[layer, head] = (written @ readout).detach()
    decomposer = Decomposer(model, labels, "hf")
    heads = [f"L{layer}H{head}" for layer in range(2) for head in range(4)]
    result = attribute_sources(decomposer, [prompt], heads, prefix_reuse=False)
    assert result.token_ids[0] == ids[0].tolist()
    torch.testing.assert_close(result.logits[0], expected.reshape(8, ids.shape[1], 2), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result.attention[0], torch.stack(
        [out.attentions[layer][0, head, -1] for layer in range(2) for head in range(4)]), atol=1e-6, rtol=1e-5)


def test_bad_heads_get_one_line_errors_naming_the_range(tokenizer):
    model, _, ids = build("llama", tokenizer)
    decomposer = Decomposer(model, ids, "hf")
    for head, message in (("MLP1", "is an MLP"), ("L2H0", "L0H0-L1H3"), ("L0H4", "L0H0-L1H3"), ("X", "component")):
        with pytest.raises(PartsError, match=message) as caught:
            attribute_sources(decomposer, PROMPTS, [head])
        assert "\n" not in str(caught.value)


@pytest.mark.integration
def test_the_embedded_model_splits_exactly_over_sources(embedded_model, data_dir):
    """SmolLM2-135M (grouped-query attention) on 4-shot sst2 prompts: the sources of two late heads sum to their
    direct effects in the run, with the demonstrations' keys and values reused and in full."""
    from parts.experiments.runner import decompose_task

    run = decompose_task(embedded_model, "sst2", template=1, seed=0, limit=4, data_dir=data_dir, progress=False)
    decomposer = Decomposer(embedded_model, run.label_token_ids)
    heads = ["L21H1", "L23H2"]
    direct = run.component_logits[:, [run.component_index(h) for h in heads]]
    results = [attribute_sources(decomposer, run.prompts.prompts, heads, prefix_reuse=reuse) for reuse in (True, False)]
    for result in results:
        assert result.token_ids == run.token_ids
        total = einops.reduce(result.logits, "example head source label -> example head label", "sum")
        torch.testing.assert_close(total, result.direct, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result.direct, direct, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results[0].logits, results[1].logits, atol=1e-5, rtol=1e-4)
