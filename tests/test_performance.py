"""Performance features keep results exact: automatic batch size, prefix reuse, low-precision weights.

Speed itself is measured by benchmarks/bench_decompose.py, never asserted here.
"""

from __future__ import annotations

import pytest
import torch

from parts.cli.common import batch_size as batch_size_arg
from parts.data.prompts import build_prompts, label_token_ids
from parts.data.tasks import get_task
from parts.decomposition.decompose import (
    ESTIMATE_MARGIN,
    MAX_AUTO_BATCH_SIZE_CPU,
    Decomposer,
    auto_batch_size,
    prompt_memory_bytes,
    resolve_batch_size,
)
from parts.errors import PartsError
from parts.model.loading import from_hf
from tests.conftest import make_hf_model
from tests.test_decompose import PROMPTS, label_ids

# tiny llama: 3 layers, d_model 32, d_mlp 64, 4 heads of 8 (2 key-value heads), vocabulary 32.
# One prompt of 5 new tokens after a 10-token prefix (15 keys), float32:
#   keys and values 2*3*2*8*15 = 1440, one layer 5*(6*32 + 3*64) = 1920, scores 2*4*5*15 = 600,
#   cached last position 3*(4*8 + 32) + 32 = 224: 4184 elements = 16736 bytes.
TINY_PROMPT_BYTES = 16736


def test_prompt_memory_estimate_by_hand(tiny_llama):
    cfg = tiny_llama.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_vocab) == (
        3, 32, 64, 4, 2, 8, 32)
    assert prompt_memory_bytes(cfg, new_tokens=5, prefix_tokens=10, element_bytes=4) == TINY_PROMPT_BYTES
    # bfloat16 halves everything but the scores, which softmax keeps in float32: 3584 * 2 + 600 * 4.
    assert prompt_memory_bytes(cfg, new_tokens=5, prefix_tokens=10, element_bytes=2) == 9568


def test_auto_batch_size_stays_within_bounds(tiny_llama):
    token_lists = [list(range(15))] * 100  # 10 shared + 5 new tokens each
    per_prompt = ESTIMATE_MARGIN * TINY_PROMPT_BYTES
    # On a CPU half of the available memory is planned for: room for 3 prompts, not 4.
    assert auto_batch_size(tiny_llama, token_lists, 10, free_bytes=2 * per_prompt * 4 - 1) == 3
    assert auto_batch_size(tiny_llama, token_lists, 10, free_bytes=2 * per_prompt * 4) == 4
    assert auto_batch_size(tiny_llama, token_lists, 10, free_bytes=1) == 1  # never less than one
    # On a CPU never more than 8 (larger batches are slower there); elsewhere up to 64.
    assert auto_batch_size(tiny_llama, token_lists, 10, free_bytes=10**15) == MAX_AUTO_BATCH_SIZE_CPU == 8
    assert auto_batch_size(tiny_llama, token_lists[:7], 10, free_bytes=10**15) == 7  # never more than the prompts
    assert 1 <= resolve_batch_size("auto", tiny_llama, token_lists, 10) <= 8  # this machine's free memory


def test_auto_batch_size_gives_the_same_results_as_fixed_sizes(tiny_model):
    decomposer = Decomposer(tiny_model, label_ids(tiny_model))
    one_at_a_time = decomposer(PROMPTS, batch_size=1, prefix_reuse=True, progress=False)
    for size in ("auto", None, 2, 5):
        out = decomposer(PROMPTS, batch_size=size, prefix_reuse=True, progress=False)
        assert (out.component_logits - one_at_a_time.component_logits).abs().max() < 1e-5, size
        assert (out.model_logits - one_at_a_time.model_logits).abs().max() < 1e-5, size


@pytest.mark.parametrize("bad", [0, -3, "big"])
def test_bad_batch_size_is_a_user_error(tiny_llama, bad):
    with pytest.raises(PartsError, match=f"--batch-size must be a positive whole number or auto, got {bad!r}"):
        Decomposer(tiny_llama, label_ids(tiny_llama))(PROMPTS, batch_size=bad, progress=False)


def test_batch_size_option_parses_auto_and_numbers():
    import argparse

    assert batch_size_arg("auto") == "auto" and batch_size_arg("AUTO") == "auto"
    assert batch_size_arg("12") == 12
    with pytest.raises(argparse.ArgumentTypeError, match="0 must be at least 1"):
        batch_size_arg("0")


def test_bfloat16_weights_give_float32_component_logits(tokenizer):
    full = from_hf(make_hf_model("llama", seed=1), tokenizer, "tiny-llama-f32")
    half = from_hf(make_hf_model("llama", seed=1).to(torch.bfloat16), tokenizer, "tiny-llama-bf16")
    ids = label_ids(full)
    reference = Decomposer(full, ids)(PROMPTS, batch_size=2, progress=False)
    out = Decomposer(half, ids)(PROMPTS, batch_size=2, progress=False)
    assert out.component_logits.dtype == out.remainder.dtype == out.model_logits.dtype == torch.float32
    # The split of bfloat16 activations is exact in float32; what is left is the model's own bf16 rounding
    # of its logits (about 2**-8 relative): reported, not hidden.
    error = out.reconstruction_error
    assert error.dtype == torch.float32 and error.shape == (len(PROMPTS),)
    assert 0 < error.max() < 2**-7 * out.model_logits.abs().max() + 1e-3
    # The same components as the float32 model, to bfloat16 precision.
    scale = reference.component_logits.abs().max()
    assert (out.component_logits - reference.component_logits).abs().max() < 0.02 * scale


# -- the embedded model: prefix reuse equals full prompts to float32 precision ----------------


def _reuse_difference(model, task: str, shots: int, limit: int, batch_size: int, data_dir) -> tuple[float, float, int]:
    prompts = build_prompts(get_task(task), 1, 0, shots, "test", limit, data_dir)
    decomposer = Decomposer(model, label_token_ids(model.tokenizer, prompts.label_words))
    full = decomposer(prompts.prompts, batch_size=batch_size, prefix_reuse=False, progress=False)
    reused = decomposer(prompts.prompts, batch_size=batch_size, prefix_reuse=True, progress=False)
    prefix = decomposer.shared_prefix_length(decomposer.tokenize(prompts.prompts))
    return (
        float((reused.component_logits - full.component_logits).abs().max()),
        float((reused.model_logits - full.model_logits).abs().max()),
        prefix,
    )


@pytest.mark.integration
@pytest.mark.parametrize(("task", "shots", "limit", "min_prefix"), [("sst2", 4, 16, 80), ("rte", 4, 8, 200),
                                                                      ("sst2", 24, 8, 500)])
def test_prefix_reuse_equals_full_prompts(embedded_model, data_dir, task, shots, limit, min_prefix):
    components, logits, prefix = _reuse_difference(embedded_model, task, shots, limit, 8, data_dir)
    assert prefix >= min_prefix  # the demonstrations really are shared and reused
    assert components <= 1e-4
    assert logits <= 1e-4


@pytest.mark.integration
@pytest.mark.parametrize(("task", "shots"), [("sst2", 4), ("rte", 4)])
def test_hf_engine_equals_the_bridge_on_the_embedded_model(embedded_model, data_dir, task, shots):
    """The default engine (plain modules, SDPA, prefix reused) against TransformerLens over full prompts."""
    prompts = build_prompts(get_task(task), 1, 0, shots, "test", 8, data_dir)
    ids = label_token_ids(embedded_model.tokenizer, prompts.label_words)
    fast = Decomposer(embedded_model, ids, "hf")(prompts.prompts, batch_size=4, prefix_reuse=True, progress=False)
    reference = Decomposer(embedded_model, ids, "bridge")(prompts.prompts, batch_size=4, prefix_reuse=False,
                                                          progress=False)
    for name in ("component_logits", "remainder", "model_logits"):
        assert (getattr(fast, name) - getattr(reference, name)).abs().max() <= 1e-4, name
    assert fast.reconstruction_error.max() <= 1e-4
