"""Every family is exact or refused at load time, by each engine: never a silently wrong decomposition.

A tiny random model of each family (tests/families.py; norm weights and biases drawn too, so a
dropped norm weight or bias shows) is decomposed by each engine. Either the components plus the
remainder equal the Hugging Face model's own label-word logits (below 1e-4 in float32; for a
final-logit soft-cap, capping the sum gives the model's logits), or `parts` refuses the model when
the decomposer is built, with one line naming the feature. The observed status must equal the
committed table docs/families.json, which the family table of docs/concepts/models.md is rendered from
(scripts/family_table.py); `PARTS_UPDATE_FAMILY_TABLE=1` rewrites that file from what is observed.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import einops
import pytest
import torch

from parts.decomposition.decompose import Decomposer
from parts.errors import PartsError
from tests.conftest import WORDS
from tests.families import FAMILIES, make_config

TABLE = Path(__file__).resolve().parents[1] / "docs" / "families.json"
ENGINES = ("hf", "bridge")
PROMPTS = [
    "review : great film sentiment : positive review : dull plot sentiment : negative review : fun sentiment :",
    "review : great film sentiment : positive review : dull plot sentiment : negative review : the acting was bad "
    "and boring sentiment :",
    "review : great film sentiment : positive review : dull plot sentiment : negative review : loved it sentiment :",
]
LABELS = ("negative", "positive", "yes")
_BUILT: dict[str, tuple] = {}


def build(family: str, tokenizer):
    """(bridge, Hugging Face reference logits at the label words, one prompt at a time), built once per family."""
    if family in _BUILT:
        return _BUILT[family]
    from transformers import AutoModelForCausalLM

    from parts.model.loading import from_hf

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf_model = AutoModelForCausalLM.from_config(make_config(family, len(WORDS))).eval()
        with torch.no_grad():  # initialisers set norm weights to 1 and biases to 0, which would hide dropping them
            for name, param in hf_model.named_parameters():
                if param.ndim == 1:
                    param.copy_(torch.randn_like(param) * 0.2 + (0.0 if "bias" in name else 1.0))
    ids = [tokenizer.convert_tokens_to_ids(w) for w in LABELS]
    plain = copy.deepcopy(hf_model)  # the bridge wraps the model's modules in place
    try:
        model = from_hf(hf_model, tokenizer, f"tiny-{family}")
    except PartsError as err:  # TransformerLens cannot wrap it: refused at load
        _BUILT[family] = (err, None, ids)
        return _BUILT[family]
    with torch.no_grad():  # tokenised as the decomposition does (the bridge's tokenizer may prepend BOS)
        reference = torch.stack([
            plain(torch.tensor([model.tokenizer(p)["input_ids"]])).logits[0, -1, ids] for p in PROMPTS
        ])
    _BUILT[family] = (model, reference, ids)
    return _BUILT[family]


def observe(family: str, engine: str, tokenizer) -> dict:
    """What parts does with this family and engine: exact (with the features it handled) or refused (why)."""
    model, reference, ids = build(family, tokenizer)
    if isinstance(model, PartsError):
        return {"status": "refused", "reason": str(model)}
    try:
        decomposer = Decomposer(model, ids, engine)
    except PartsError as err:
        return {"status": "refused", "reason": str(err)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = decomposer(PROMPTS, batch_size=2, prefix_reuse=True, progress=False)
    in_full = any("every prompt runs in full" in str(w.message) for w in caught)
    total = einops.reduce(out.component_logits, "example component label -> example label", "sum") + out.remainder
    cap = decomposer.readout.final_logit_softcap
    model_logits = out.model_logits if cap is None else cap * torch.tanh(out.model_logits / cap)
    error = float(max((total - out.model_logits).abs().max(), (model_logits - reference).abs().max()))
    assert out.component_logits.abs().max() > 1e-3  # the components carry the logits, not the remainder alone
    layout = decomposer.layout
    features = []
    if any(layout.post_attn) or any(layout.post_mlp):
        features.append("post-norms")
    if cap is not None:
        features.append("final soft-cap (pre-cap logits decomposed)")
    if decomposer.readout.residual_multiplier != 1.0 or decomposer.readout.logit_multiplier != 1.0:
        features.append("multipliers")
    if layout.is_moe:
        features.append("MoE")
    if getattr(decomposer.engine, "attention", None) == "eager":
        features.append("eager attention")
    if in_full:
        features.append("prompts in full")
    return {"status": "exact" if error < 1e-4 else f"INEXACT ({error:.1e})", "features": features}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_is_exact_or_refused_at_load(family, engine, tokenizer):
    observed = observe(family, engine, tokenizer)
    assert observed["status"] in ("exact", "refused"), observed  # never silently wrong
    if observed["status"] == "refused":
        assert "\n" not in observed["reason"]
    table = json.loads(TABLE.read_text()) if TABLE.is_file() else {}
    if os.environ.get("PARTS_UPDATE_FAMILY_TABLE"):
        table.setdefault(family, {})[engine] = observed
        TABLE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        return
    assert table.get(family, {}).get(engine) == observed, "rerun with PARTS_UPDATE_FAMILY_TABLE=1 and commit the table"


def test_the_docs_table_is_rendered_from_the_test_results():
    from scripts.family_table import render, section

    readme = (TABLE.parent / "concepts" / "models.md").read_text()
    assert section(readme) == render(json.loads(TABLE.read_text()))
    assert len(json.loads(TABLE.read_text())) >= 15


# MoE families TransformerLens can wrap; DeepSeek-V3's first layer is dense (first_k_dense_replace=1).
MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "gpt_oss", "deepseek_v3"]
SHARED_EXPERT = {"qwen2_moe", "deepseek_v3"}
DENSE_LAYERS = {"deepseek_v3": {0}}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_split_experts_still_sum_exactly(family, tokenizer):
    """One component per expert (its router-weighted output, zero where not chosen), in the MLP's place."""
    model, reference, ids = build(family, tokenizer)
    whole = Decomposer(model, ids)(PROMPTS, batch_size=2, progress=False)
    decomposer = Decomposer(model, ids, split_experts=True)
    split = decomposer(PROMPTS, batch_size=2, progress=False)
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    n_experts, top_k = 4, 2
    shared = family in SHARED_EXPERT
    expected_names = [f"L{l}H{h}" for l in range(n_layers) for h in range(n_heads)]
    for layer in range(n_layers):
        if layer in DENSE_LAYERS.get(family, set()):
            expected_names.append(f"MLP{layer}")
        else:
            expected_names += [f"MLP{layer}E{e}" for e in range(n_experts)] + ([f"MLP{layer}S"] if shared else [])
    assert decomposer.component_names == expected_names
    assert decomposer.info["split_experts"] is True
    total = einops.reduce(split.component_logits, "example component label -> example label", "sum") + split.remainder
    assert (total - reference).abs().max() < 1e-4
    heads = n_layers * n_heads
    assert torch.allclose(split.component_logits[:, :heads], whole.component_logits[:, :heads], atol=1e-6)
    start = heads
    for layer in range(n_layers):
        width = 1 if layer in DENSE_LAYERS.get(family, set()) else n_experts + int(shared)
        parts = split.component_logits[:, start:start + width]
        start += width
        # The experts of a layer (and its shared expert) sum to that layer's MLP.
        assert torch.allclose(parts.sum(1), whole.component_logits[:, heads + layer], atol=1e-5)
        if width > 1:  # exactly top_k routed experts chosen per example: the others are zero
            chosen = (parts[:, :n_experts].abs().amax(-1) > 0).sum(-1)
            assert (chosen == top_k).all(), chosen
    assert start == split.component_logits.shape[1]


def test_split_experts_is_refused_where_it_cannot_apply(tokenizer):
    model, _, ids = build("llama", tokenizer)
    with pytest.raises(PartsError, match="--split-experts applies to mixture-of-experts models only"):
        Decomposer(model, ids, split_experts=True)
    moe, _, moe_ids = build("mixtral", tokenizer)
    with pytest.raises(PartsError, match="--split-experts needs the hf engine"):
        Decomposer(moe, moe_ids, engine="bridge", split_experts=True)


def test_split_experts_from_the_command_line(tmp_path, tokenizer, tiny_task_file, capsys):
    """`parts decompose --split-experts` on a Mixtral folder: expert components saved, analysed like any other."""
    from transformers import AutoModelForCausalLM

    from parts.analysis.analyze import component_table
    from parts.cli import main
    from parts.decomposition.runs import DecompositionRun

    folder = tmp_path / "tiny-mixtral"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(make_config("mixtral", len(WORDS))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "run"
    assert main(["decompose", "--model", str(folder), "--task", str(tiny_task_file), "--template", "2", "--limit", "6",
                 "--out", str(out), "--device", "cpu", "--split-experts"]) == 0
    # the summary line counts what the run holds: 8 heads and 8 experts, no MLP
    assert "components           16 (2 layers x 4 heads + 2 layers x 4 experts)\n" in capsys.readouterr().out
    run = DecompositionRun.load(out)
    assert run.component_names[-4:] == ["MLP1E0", "MLP1E1", "MLP1E2", "MLP1E3"] and run.info["split_experts"] is True
    assert run.max_reconstruction_error < 1e-4
    table = component_table(run)
    assert set(table["kind"]) == {"head", "expert"} and len(table) == 2 * 4 + 2 * 4


@pytest.mark.parametrize("family", ["falcon", "gemma2", "opt", "gpt2", "mixtral"])
def test_overflow_search_reads_the_same_activations(family, tokenizer):
    """The non-finite search finds its activations by the adapter's names on every family (Falcon's bridge
    has no hook_z alias) and reports nothing on a finite model."""
    from parts.experiments.runner import overflow_origin

    model, _, _ = build(family, tokenizer)
    assert overflow_origin(model, PROMPTS[0]) is None


def test_a_soft_capped_run_says_it_decomposed_the_pre_cap_logits(tokenizer):
    model, reference, ids = build("gemma2", tokenizer)
    decomposer = Decomposer(model, ids)
    assert decomposer.info["decomposed_logits"] == "pre-soft-cap (the model caps its logits at 3)"
    out = decomposer(PROMPTS, progress=False)
    assert (out.model_logits - reference).abs().max() > 1e-3  # the pre-cap logits differ from the capped ones...
    assert (3.0 * torch.tanh(out.model_logits / 3.0) - reference).abs().max() < 1e-5  # ...which capping restores
    assert torch.equal(out.model_logits.argmax(-1), reference.argmax(-1))  # so accuracies are unchanged
