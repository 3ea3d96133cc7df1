"""The decomposition is exact: components + remainder == the model's own label-word logits."""

from __future__ import annotations

import copy
import weakref

import einops
import pytest
import torch
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

from parts.components import component_names
from parts.decomposition import decompose
from parts.decomposition.decompose import Decomposer
from parts.model.engines import GQA_SDPA, HFEngine, suffix_position_ids
from parts.model.loading import plain_model
from tests.prompts import PREFIX, SENTIMENT_PROMPTS

PROMPTS = SENTIMENT_PROMPTS[:5]


def label_ids(model):
    return [model.tokenizer.convert_tokens_to_ids(w) for w in ("negative", "positive", "yes")]


def reference_logits(model, prompt: str) -> torch.Tensor:
    """The Hugging Face model's own logits at the last token, one prompt at a time."""
    ids = torch.tensor([model.tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        return model.original_model(ids).logits[0, -1]


def test_component_names_layer_major():
    assert component_names(2, 3) == ["L0H0", "L0H1", "L0H2", "L1H0", "L1H1", "L1H2", "MLP0", "MLP1"]


ENGINES = ("hf", "bridge")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("prefix_reuse", [True, False])
def test_components_sum_to_model_logits(tiny_model, prefix_reuse, engine):
    ids = label_ids(tiny_model)
    decomposer = Decomposer(tiny_model, ids, engine)
    out = decomposer(PROMPTS, batch_size=2, prefix_reuse=prefix_reuse, progress=False)
    n_components = tiny_model.cfg.n_layers * (tiny_model.cfg.n_heads + 1)
    assert out.component_logits.shape == (len(PROMPTS), n_components, 3)
    total = einops.reduce(out.component_logits, "batch component label -> batch label", "sum") + out.remainder
    reference = torch.stack([reference_logits(tiny_model, p)[ids] for p in PROMPTS])
    assert (out.model_logits - reference).abs().max() < 1e-4  # padding and prefix reuse change nothing
    assert (total - reference).abs().max() < 1e-4
    assert out.reconstruction_error.max() < 1e-4
    # Not trivially exact: the components themselves carry the logits.
    assert out.component_logits.abs().sum() > 10 * out.remainder.abs().sum() / n_components


@pytest.mark.parametrize("engine", ENGINES)
def test_padding_and_prefix_reuse_do_not_change_results(tiny_model, engine):
    decomposer = Decomposer(tiny_model, label_ids(tiny_model), engine)
    batched = decomposer(PROMPTS, batch_size=5, prefix_reuse=True, progress=False)
    for i, prompt in enumerate(PROMPTS):
        alone = decomposer([prompt], batch_size=1, prefix_reuse=False, progress=False)
        assert (alone.component_logits[0] - batched.component_logits[i]).abs().max() < 1e-4
        assert (alone.remainder[0] - batched.remainder[i]).abs().max() < 1e-4


@pytest.mark.parametrize("engine", ENGINES)
def test_matches_transformer_lens_activation_cache(tiny_model, engine):
    """An independent decomposition: TransformerLens's own `get_full_resid_decomposition`."""
    ids = label_ids(tiny_model)
    out = Decomposer(tiny_model, ids, engine)(PROMPTS[:2], progress=False, prefix_reuse=False, batch_size=1)
    for i, prompt in enumerate(PROMPTS[:2]):
        tokens = torch.tensor([tiny_model.tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            _, cache = tiny_model.run_with_cache(tokens)
            stack, labels = cache.get_full_resid_decomposition(
                layer=-1, pos_slice=-1, expand_neurons=False, apply_ln=True, return_labels=True
            )
        tl_logits = einops.einsum(stack[:, 0], tiny_model.W_U[:, ids], "component d_model, d_model label -> component label")
        n_heads = tiny_model.cfg.n_layers * tiny_model.cfg.n_heads
        assert labels[:2] == ["L0H0", "L0H1"] and labels[n_heads].endswith("mlp_out")
        n = len(out.component_logits[i])
        assert (tl_logits[:n] - out.component_logits[i]).abs().max() < 1e-4


def test_a_bridge_that_keeps_no_cache_runs_prompts_in_full(tiny_llama, monkeypatch):
    """If the bridge ever drops the KV cache again (or never keeps one for a model), the decomposition says so
    and runs every prompt in full: the numbers stay the model's own."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    monkeypatch.setattr(AttentionBridge, "_update_kv_cache", lambda self, k, v, **kwargs: (k, v))
    decomposer = Decomposer(tiny_llama, label_ids(tiny_llama), engine="bridge")
    with pytest.warns(UserWarning, match="TransformerLens's bridge keeps no KV cache for this model"):
        out = decomposer(PROMPTS, batch_size=2, prefix_reuse=True, progress=False)
    expected = torch.stack([reference_logits(tiny_llama, p)[label_ids(tiny_llama)] for p in PROMPTS])
    assert (out.model_logits - expected).abs().max() < 1e-4


def test_a_prefix_that_changes_the_logits_is_not_reused(tiny_llama, monkeypatch):
    """When the most padded example's logits with the reused prefix differ from its prompt run alone (a model
    whose attention depends on where padding sits), the decomposition warns and runs every prompt in full."""
    monkeypatch.setattr(decompose, "VERIFIED_PADDING", weakref.WeakKeyDictionary())  # nothing checked before
    decomposer = Decomposer(tiny_llama, label_ids(tiny_llama))
    original = decomposer._forward

    def shifted(input_ids, lengths, cache, prefix_length):  # a prefix-reused forward that is off
        logits, activations = original(input_ids, lengths, cache, prefix_length)
        return (logits + 0.5, activations) if prefix_length else (logits, activations)

    monkeypatch.setattr(decomposer, "_forward", shifted)
    with pytest.warns(UserWarning, match="changes this model's logits .* every prompt runs in full"):
        out = decomposer(PROMPTS, batch_size=2, prefix_reuse=True, progress=False)
    expected = torch.stack([reference_logits(tiny_llama, p)[label_ids(tiny_llama)] for p in PROMPTS])
    assert (out.model_logits - expected).abs().max() < 1e-4


def test_prefix_reuse_is_checked_once_per_model_until_a_call_pads_more(tiny_llama, monkeypatch):
    """The full-prompt check runs on a model's first prefix-reused call, not on a call that pads no more, and
    again on one that pads more (each check: one forward without a prefix cache)."""
    monkeypatch.setattr(decompose, "VERIFIED_PADDING", weakref.WeakKeyDictionary())
    full_forwards: list[int] = []

    def counting(decomposer):
        original = decomposer._forward

        def forward(input_ids, lengths, cache, prefix_length):
            if cache is None:
                full_forwards.append(int(input_ids.shape[1]))
            return original(input_ids, lengths, cache, prefix_length)

        monkeypatch.setattr(decomposer, "_forward", forward)
        return decomposer

    def call(prompts):
        before = len(full_forwards)
        counting(Decomposer(tiny_llama, label_ids(tiny_llama)))(prompts, batch_size=2, progress=False)
        return len(full_forwards) - before

    short = [f"{PREFIX}{q} sentiment :" for q in ("good fun", "the movie was very boring")]  # padding 3 words
    shorter = [f"{PREFIX}{q} sentiment :" for q in ("good fun", "the movie was boring")]  # 2
    longer = [f"{PREFIX}{q} sentiment :" for q in ("dull", "the movie was very boring and the acting was bad")]  # 9
    assert call(short) == 1 and call(short) == 0 and call(shorter) == 0  # checked once, then trusted
    assert call(longer) == 1  # more padding than was checked: checked again
    assert decompose.VERIFIED_PADDING[plain_model(tiny_llama)] == {"hf torch.float32": 9}


def test_shared_prefix_length():
    assert Decomposer.shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert Decomposer.shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # each keeps one token


def test_prompt_longer_than_context_is_an_error(tiny_llama):
    from parts.errors import PartsError

    long_prompt = " ".join(["film"] * 300)
    n = len(tiny_llama.tokenizer(long_prompt)["input_ids"])  # 300 words, plus BOS if the tokenizer adds one
    with pytest.raises(PartsError, match=rf"prompt 0 is {n} tokens, {n - 256} more than .* 256"):
        Decomposer(tiny_llama, label_ids(tiny_llama))([long_prompt], progress=False)


# -- the engines: the model's own modules (SDPA) against TransformerLens's run_with_cache ------------


def test_engines_agree(tiny_model):
    ids = label_ids(tiny_model)
    fast = Decomposer(tiny_model, ids, "hf")(PROMPTS, batch_size=2, progress=False)
    reference = Decomposer(tiny_model, ids, "bridge")(PROMPTS, batch_size=2, progress=False)
    for name in ("component_logits", "remainder", "model_logits"):
        assert (getattr(fast, name) - getattr(reference, name)).abs().max() < 1e-5, name


def test_hf_engine_runs_the_plain_modules_and_leaves_the_bridge_alone(tiny_model):
    decomposer = Decomposer(tiny_model, label_ids(tiny_model), "hf")
    plain, bridged = decomposer.engine.model, tiny_model.original_model
    assert plain.config._attn_implementation == GQA_SDPA
    assert bridged.config._attn_implementation == "eager"  # the bridge keeps its own attention
    assert not any(isinstance(m, GeneralizedComponent) for m in plain.modules())
    # The model's own weights, not a copy (the bridge adds split q/k/v weights for fused-QKV models).
    assert {p.data_ptr() for p in plain.parameters()} <= {p.data_ptr() for p in bridged.parameters()}

    def hook_counts() -> list[int]:
        return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in [*plain.modules(), *tiny_model.modules()]]

    before = hook_counts()
    decomposer(PROMPTS[:2], progress=False)
    assert hook_counts() == before  # the engine's hooks live only during its forward, on its own modules


def test_suffix_position_ids_continue_the_prefix():
    mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1, 1]])  # prefix 3, suffixes of 2 and 4 tokens
    assert suffix_position_ids(mask, 3).tolist() == [[3, 3, 3, 4], [3, 4, 5, 6]]
    assert suffix_position_ids(torch.tensor([[0, 1, 1], [1, 1, 1]]), 0).tolist() == [[0, 0, 1], [0, 1, 2]]


def test_grouped_query_attention_is_not_copied_per_head_on_cpu(tiny_llama, monkeypatch):
    """With a prefix cache (so an attention mask) the HF engine's attention never calls transformers' `repeat_kv`
    (a copy of every key/value head group) and gives transformers' own SDPA numbers."""
    import transformers.integrations.sdpa_attention as sdpa

    assert tiny_llama.cfg.n_key_value_heads < tiny_llama.cfg.n_heads  # the fixture is grouped-query
    reference_engine = Decomposer(tiny_llama, label_ids(tiny_llama), "hf")
    reference_engine.engine = HFEngine(tiny_llama, reference_engine.layout, attention="sdpa")
    copies: list[tuple[int, ...]] = []
    original = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda states, n: copies.append(tuple(states.shape)) or original(states, n))
    reference = reference_engine(PROMPTS, batch_size=2, prefix_reuse=True, progress=False)
    assert copies  # transformers' own path copies them
    copies.clear()
    fast = Decomposer(tiny_llama, label_ids(tiny_llama), "hf")(PROMPTS, batch_size=2, prefix_reuse=True, progress=False)
    assert copies == []
    for name in ("component_logits", "remainder", "model_logits"):
        assert (getattr(fast, name) - getattr(reference, name)).abs().max() < 1e-5, name


@pytest.mark.parametrize("engine", ENGINES)
def test_the_unembedding_gets_a_contiguous_last_position(tiny_llama, monkeypatch, engine):
    """The unembedding is handed [batch 1 d_model] contiguous, not a strided view of [batch pos d_model]: torch's
    matmul of such a view copies the weight once per prompt ([batch d_model vocab]: 2 GiB at batch 8 at
    Llama-2-7B's shape, benchmarks/scale_check.py), and the numbers stay the model's own."""
    unembed = plain_model(tiny_llama).lm_head if engine == "hf" else tiny_llama.unembed.original_component
    seen: list[tuple[tuple[int, ...], bool]] = []
    forward = unembed.forward
    monkeypatch.setattr(unembed, "forward", lambda x: seen.append((tuple(x.shape), x.is_contiguous())) or forward(x))
    ids = label_ids(tiny_llama)
    out = Decomposer(tiny_llama, ids, engine)(PROMPTS, batch_size=2, prefix_reuse=True, progress=False)
    assert (1, 1, tiny_llama.cfg.d_model) in [shape for shape, _ in seen]  # the prefix's forward
    assert (2, 1, tiny_llama.cfg.d_model) in [shape for shape, _ in seen]  # a batch's
    assert all(contiguous for _, contiguous in seen)
    reference = torch.stack([reference_logits(tiny_llama, p)[ids] for p in PROMPTS])
    assert (out.model_logits - reference).abs().max() < 1e-4


def test_hf_engine_prefix_cache_guard(tiny_llama, monkeypatch):
    """A forward that does not extend the prefix cache it is given fails loudly."""
    original = HFEngine.run
    monkeypatch.setattr(HFEngine, "run", lambda self, ids, mask, prefix, cache: original(self, ids, mask, prefix,
                                                                                          copy.deepcopy(cache)))
    decomposer = Decomposer(tiny_llama, label_ids(tiny_llama), "hf")
    with pytest.raises(RuntimeError, match="prefix KV cache was ignored"):
        decomposer(PROMPTS, batch_size=2, prefix_reuse=True, progress=False)


def test_unknown_engine_is_an_error(tiny_llama):
    from parts.errors import PartsError

    with pytest.raises(PartsError, match="unknown engine 'fast': use one of hf, bridge"):
        Decomposer(tiny_llama, label_ids(tiny_llama), "fast")


def test_an_unmappable_model_falls_back_to_the_bridge_engine(tiny_llama, monkeypatch):
    def cannot_map(self, *args, **kwargs):
        raise AttributeError("'AttentionBridge' object has no attribute 'o'")

    monkeypatch.setattr(HFEngine, "__init__", cannot_map)
    with pytest.warns(UserWarning, match=r"the hf engine cannot map this model's modules \('AttentionBridge' object has "
                                         r"no attribute 'o'\); using the slower bridge engine"):
        decomposer = Decomposer(tiny_llama, label_ids(tiny_llama), "hf")
    assert decomposer.engine_name == "bridge"
    out = decomposer(PROMPTS, batch_size=2, progress=False)
    assert out.reconstruction_error.max() < 1e-4


def test_hf_engine_follows_accelerate_device_hooks(tokenizer):
    """Under `--device auto` accelerate wraps each layer's forward in place (bound to the original module, whose
    children the bridge replaces): the engine's twin rebinds them, so its own hooks still see every activation."""
    accelerate_hooks = pytest.importorskip("accelerate.hooks")
    from parts.model.loading import from_hf
    from tests.conftest import make_hf_model

    hf_model = make_hf_model("llama")
    for layer in hf_model.model.layers:
        accelerate_hooks.add_hook_to_module(layer, accelerate_hooks.AlignDevicesHook(execution_device="cpu"))
    model = from_hf(hf_model, tokenizer, "tiny-llama-accelerate")
    out = Decomposer(model, label_ids(model))(PROMPTS, batch_size=2, progress=False)
    expected = torch.stack([reference_logits(model, p)[label_ids(model)] for p in PROMPTS])
    assert (out.model_logits - expected).abs().max() < 1e-4
    assert out.reconstruction_error.max() < 1e-4
