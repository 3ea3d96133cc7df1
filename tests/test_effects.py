"""Total effects (parts.decomposition.effects) against a full rerun with a hook, on every tiny family.

The reference reruns each whole prompt, with no cache, and replaces one component's output at the last
position with a forward hook; its label-word logits are read from the final norm's input as the runner
reads them. The runner recomputes only the last token, from the component's layer up, with the clean
prompt's keys and values: both must agree to 1e-5 (float32).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from parts.components import HEAD, parse_component
from parts.data.prompts import PromptSet
from parts.decomposition.effect_data import TotalEffects
from parts.decomposition.effects import TotalEffectRunner, total_effects
from parts.errors import PartsError
from parts.experiments.runner import run_decomposition
from parts.model.loading import plain_model
from parts.model.readout import FINAL_NORM_IN, z_name
from tests.conftest import WORDS
from tests.families import FAMILIES
from tests.test_families import LABELS, PROMPTS, build

TOL = 1e-5


def tiny_run(model, prompts=PROMPTS, split_experts=False):
    ids_words = tuple(" " + w for w in LABELS[:2])
    prompt_set = PromptSet("tiny", 1, 0, 2, "test", LABELS[:2], ids_words, (0, 1), tuple(range(len(prompts))),
                           tuple(prompts), tuple(i % 2 for i in range(len(prompts))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_decomposition(model, prompt_set, progress=False, split_experts=split_experts, batch_size=2)


def rerun_logits(runner: TotalEffectRunner, ids: list[int], component: str, replace) -> torch.Tensor:
    """[label]: one whole prompt rerun with no cache, the component's output at the last position replaced by
    `replace(clean_value)` (None: nothing replaced) through a hook on the model's own module."""
    hf, layout = plain_model(runner.model), runner.layout
    target = parse_component(component)
    captured = {}
    if target.kind == HEAD:
        def pre(_m, args, kwargs):
            value = args[0] if args else kwargs["hidden_states"]
            flat = value.reshape(value.shape[0], value.shape[1], runner.n_heads, -1).clone()
            if replace is not None:
                flat[0, -1, target.head] = replace(flat[0, -1, target.head].clone())
            new = flat.reshape(value.shape)
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})
        handles = [hf.get_submodule(layout.taps[z_name(target.layer)][0]).register_forward_pre_hook(pre, with_kwargs=True)]
    else:
        def post(_m, _args, output):
            value = output[0] if isinstance(output, tuple) else output
            shaped = value.reshape(1, len(ids), -1).clone()
            if replace is not None:
                shaped[0, -1] = replace(shaped[0, -1].clone())
            new = shaped.reshape(value.shape)
            return (new, *output[1:]) if isinstance(output, tuple) else new
        handles = [hf.get_submodule(layout.taps[layout.mlp_out[target.layer]][0]).register_forward_hook(post)]

    def final(_m, args, kwargs):
        captured["final"] = (args[0] if args else kwargs["hidden_states"])[0, -1].float()
    handles.append(hf.get_submodule(layout.taps[FINAL_NORM_IN][0]).register_forward_pre_hook(final, with_kwargs=True))
    try:
        with torch.no_grad():
            hf(torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return runner.label_logits(captured["final"])


def reference_effects(runner: TotalEffectRunner, component: str, replacement) -> torch.Tensor:
    """[example label]: clean minus ablated logits by a full rerun per example; `replacement(example)` is what
    the component's last-position output becomes (None: zero)."""
    out = []
    for example, ids in enumerate(runner.token_lists()):
        new = None if replacement is None else replacement(example)
        ablated = rerun_logits(runner, ids, component, torch.zeros_like if new is None else (lambda _clean, new=new: new))
        out.append(rerun_logits(runner, ids, component, None) - ablated)
    return torch.stack(out)


def mean_of(z, mlp, component: str):
    """The mean-ablation replacement of a component, per example, from the runner's replacement tensors."""
    target = parse_component(component)
    if target.kind == HEAD:
        return lambda example: z[example, target.layer, target.head]
    return lambda example: mlp[target.layer][example, 0]


def exact_families():
    import json
    from pathlib import Path

    table = json.loads((Path(__file__).resolve().parents[1] / "docs" / "families.json").read_text())
    return [f for f in FAMILIES if table.get(f, {}).get("hf", {}).get("status") == "exact"]


@pytest.mark.parametrize("family", exact_families())
def test_last_position_equals_a_full_rerun_with_a_hook(family, tokenizer):
    """Zero ablation of the first layer's head 1 and MLP and of the last MLP, every family: the cached
    last-token pass equals a full rerun (1e-5), or the family is refused with one line."""
    model, _, _ = build(family, tokenizer)
    run = tiny_run(model)
    try:
        effects = total_effects(model, run, ablation="zero", batch_size=2)
    except PartsError as err:
        assert "cannot ablate" in str(err) and "\n" not in str(err)
        pytest.skip(f"refused: {err}")
    runner = TotalEffectRunner(model, run, "zero", progress=False)
    last = run.n_layers - 1
    for component in ("L0H1", f"MLP{last}", "MLP0") if run.n_layers > 1 else ("L0H1", "MLP0"):
        if component not in run.component_names:
            continue
        expected = reference_effects(runner, component, None)
        got = effects.total_effects[:, run.component_index(component)]
        assert torch.allclose(got, expected, atol=TOL, rtol=TOL), (family, component, (got - expected).abs().max())
    assert torch.allclose(effects.clean_logits, run.model_logits, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2", "olmo2", "gpt2", "qwen2_moe"])
def test_frozen_norm_zero_ablation_of_the_last_mlp_is_its_direct_effect(family, tokenizer):
    """Nothing is downstream of the last MLP: with the norms' scales frozen its total effect is its direct effect,
    by the exact method and by attribution patching (the response is linear there)."""
    model, _, _ = build(family, tokenizer)
    run = tiny_run(model)
    last = run.component_index(f"MLP{run.n_layers - 1}")
    for method in ("exact", "attribution"):
        if method == "attribution" and family in ("gemma2", "olmo2"):
            continue  # post-norms: attribution refuses --freeze-norm (tested below)
        effects = total_effects(model, run, ablation="zero", freeze_norm=True, method=method)
        assert torch.allclose(effects.total_effects[:, last], run.component_logits[:, last], atol=TOL, rtol=TOL), method
    if family == "llama":  # without the frozen scale the final norm responds: a different number
        free = total_effects(model, run, ablation="zero")
        assert not torch.allclose(free.total_effects[:, last], run.component_logits[:, last], atol=1e-3)


def test_ablating_with_the_clean_output_changes_nothing(tiny_llama):
    run = tiny_run(tiny_llama)
    runner = TotalEffectRunner(tiny_llama, run, "mean", progress=False)
    batch = next(runner.batches())
    clean = runner.clean(batch)
    z = torch.zeros((run.n_examples, *clean.z.shape[1:]))
    mlp = [torch.zeros((run.n_examples, *part.shape[1:])) for part in clean.mlp_parts]
    z[batch.rows] = clean.z
    for layer, part in enumerate(clean.mlp_parts):
        mlp[layer][batch.rows] = part
    effects = runner.effects_of_batch(batch, clean, (z, mlp), check=True)
    assert effects.abs().max() < TOL
    # ... while the mean of the examples' outputs does change the logits.
    mean = runner.effects_of_batch(batch, clean, runner.replacements([(batch.rows, clean)]), check=False)
    assert mean.abs().max() > 1e-3


def test_mean_ablation_equals_a_full_rerun_with_the_mean(tiny_llama):
    run = tiny_run(tiny_llama)
    runner = TotalEffectRunner(tiny_llama, run, "mean", progress=False)
    effects = total_effects(tiny_llama, run, ablation="mean", batch_size=2)
    cleans = [(batch.rows, runner.clean(batch)) for batch in runner.batches()]
    z, mlp = runner.replacements(cleans)
    for component in ("L1H2", "MLP0", "L2H0"):
        expected = reference_effects(runner, component, mean_of(z, mlp, component))
        got = effects.total_effects[:, run.component_index(component)]
        assert torch.allclose(got, expected, atol=TOL, rtol=TOL), component
    # Resample: each example gets another example's output (a derangement).
    from parts.decomposition.effects import resample_order
    source = resample_order(run.n_examples)
    assert not (source == torch.arange(run.n_examples)).any()
    assert sorted(source.tolist()) == list(range(run.n_examples))


def zero_everywhere_logits(runner: TotalEffectRunner, ids: list[int], component: str) -> torch.Tensor:
    """[label]: a whole prompt rerun with the component's output zeroed at every position."""
    hf, layout = plain_model(runner.model), runner.layout
    target = parse_component(component)
    captured = {}
    if target.kind == HEAD:
        def pre(_m, args, kwargs):
            value = args[0].reshape(1, len(ids), runner.n_heads, -1).clone()
            value[:, :, target.head] = 0
            return ((value.reshape(args[0].shape), *args[1:]), kwargs)
        handle = hf.get_submodule(layout.taps[z_name(target.layer)][0]).register_forward_pre_hook(pre, with_kwargs=True)
    else:
        handle = hf.get_submodule(layout.taps[layout.mlp_out[target.layer]][0]).register_forward_hook(
            lambda _m, _a, out: torch.zeros_like(out))
    final = hf.get_submodule(layout.taps[FINAL_NORM_IN][0]).register_forward_pre_hook(
        lambda _m, args: captured.__setitem__("final", args[0][0, -1].float()))
    try:
        with torch.no_grad():
            hf(torch.tensor([ids]))
    finally:
        handle.remove()
        final.remove()
    return runner.label_logits(captured["final"])


def test_all_positions_equals_a_full_rerun_ablating_every_position(tiny_llama):
    """Zero ablation at every position by hand (a hook over the whole prompt) against --positions all."""
    run = tiny_run(tiny_llama)
    effects = total_effects(tiny_llama, run, ablation="zero", positions="all", batch_size=2)
    runner = TotalEffectRunner(tiny_llama, run, "zero", progress=False)
    for component in ("L0H1", "MLP1"):
        for example, ids in enumerate(runner.token_lists()):
            expected = effects.clean_logits[example] - zero_everywhere_logits(runner, ids, component)
            got = effects.total_effects[example, run.component_index(component)]
            assert torch.allclose(got, expected, atol=TOL, rtol=TOL), (component, example)
    assert effects.info["positions"] == "all"


def test_effects_file_reloads_to_the_same_tensors(tiny_llama, tmp_path):
    run = tiny_run(tiny_llama)
    run.save(tmp_path / "run")
    effects = total_effects(tiny_llama, run, ablation="resample")
    effects.save(tmp_path / "run")
    again = TotalEffects.load(tmp_path / "run")
    assert again == effects and again.info["ablation"] == "resample"
    assert torch.equal(again.total_effects, effects.total_effects)
    accuracy = effects.accuracy(run.labels)
    by_hand = [(effects.total_effects[:, c].argmax(-1) == run.labels).float().mean() for c in range(len(run.component_names))]
    assert torch.allclose(accuracy, torch.stack(by_hand))


def test_bad_input_gets_one_line_errors(tiny_llama, tmp_path, monkeypatch, capsys):
    import copy as copy_

    from parts.cli import main
    from parts.decomposition.effects import all_positions as all_positions_module

    run = tiny_run(tiny_llama)
    other = copy_.copy(run)
    other.model = "someone/else"
    with pytest.raises(PartsError, match="made with model 'someone/else'"):
        total_effects(tiny_llama, other)
    other = copy_.copy(run)
    other.info = {**run.info, "dtype": "bfloat16"}
    with pytest.raises(PartsError, match="made in bfloat16"):
        total_effects(tiny_llama, other)
    tampered = copy_.copy(run)
    tampered.model_logits = run.model_logits + 1.0
    with pytest.raises(PartsError, match="differ from the run's"):
        total_effects(tiny_llama, tampered, ablation="zero")
    monkeypatch.setattr(all_positions_module, "ALL_POSITIONS_LIMIT", 5)
    with pytest.raises(PartsError, match=r"would take about [0-9.]+ (s|min|h) here.*--yes") as caught:
        total_effects(tiny_llama, run, positions="all")
    assert "\n" not in str(caught.value)
    run.save(tmp_path / "run")
    assert main(["effects", str(tmp_path / "run"), "--engine", "bridge"]) == 2
    assert "made with the hf engine, not bridge" in capsys.readouterr().err
    assert main(["effects", str(tmp_path / "run"), "--dtype", "float16"]) == 2
    assert "made in float32, not float16" in capsys.readouterr().err
    assert main(["effects", str(tmp_path / "run"), "--model", "gpt2"]) == 2
    assert "was made with model" in capsys.readouterr().err


def test_embedded_model_last_mlp_and_a_full_rerun(embedded_model, data_dir):
    """The embedded model: the frozen-norm zero ablation of MLP29 is its direct effect, and a head's and an MLP's
    mean ablation through the cached last token equal a full rerun with a hook."""
    from parts.experiments.runner import decompose_task

    run = decompose_task(embedded_model, "sst2", template=1, seed=0, limit=4, data_dir=data_dir, progress=False)
    last = run.component_index("MLP29")
    frozen = total_effects(embedded_model, run, ablation="zero", freeze_norm=True)
    assert torch.allclose(frozen.total_effects[:, last], run.component_logits[:, last], atol=TOL, rtol=TOL)
    assert frozen.info["forward"] == "positions"
    effects = total_effects(embedded_model, run, ablation="mean")
    runner = TotalEffectRunner(embedded_model, run, "mean", progress=False)
    z, mlp = runner.replacements([(batch.rows, runner.clean(batch)) for batch in runner.batches()])
    for component in ("L14H3", "MLP20"):
        expected = reference_effects(runner, component, mean_of(z, mlp, component))
        got = effects.total_effects[:, run.component_index(component)]
        scale = float(run.model_logits.abs().max())
        assert (got - expected).abs().max() <= TOL * scale, component


def test_analysis_columns_summary_row_and_tables(tiny_llama, tmp_path):
    """component_table's total-effect columns, the run report, the results/effects.csv row and the docs tables,
    each against numbers recomputed by hand."""
    import pandas as pd
    from scipy import stats

    from parts.analysis.analyze import analysis_report, component_table
    from parts.analysis.total import EFFECT_COLUMNS, effects_row, effects_table, layer_table, wilson

    prompts = [PROMPTS[i % 3].replace("fun", WORDS[5 + i % 8]) for i in range(12)]
    run = tiny_run(tiny_llama, prompts)
    effects = total_effects(tiny_llama, run, ablation="zero")
    table = component_table(run, effects=effects)
    by_hand = (effects.total_effects.argmax(-1) == run.labels[:, None]).float().mean(0)
    assert torch.allclose(torch.tensor(table["total_accuracy"].to_numpy(), dtype=torch.float32), by_hand)
    report = analysis_report([run], effects=[effects])["runs"][0]["total_effects"]
    direct, total = table["accuracy"].to_numpy(), table["total_accuracy"].to_numpy()
    if direct.std() > 0 and total.std() > 0:
        assert report["pearson"] == pytest.approx(stats.pearsonr(direct, total)[0])
    assert report["oracle_t1"] == pytest.approx(float(by_hand.max()))
    good = set(table.loc[table["category"] == "good", "component"])
    assert set(report["stay_good_components"]) | set(report["lose"]) == good
    row = effects_row(run, effects)
    assert list(row) == list(EFFECT_COLUMNS)
    assert row["t1_total"] == pytest.approx(float(by_hand.max()))
    low, high = wilson(round(row["t1_total"] * run.n_examples), run.n_examples)
    assert (row["t1_total_low"], row["t1_total_high"]) == pytest.approx((low, high))
    assert low <= row["t1_total"] <= high
    frame = pd.DataFrame([row, {**row, "template": 2}])
    assert len(effects_table(frame)) == 2
    assert len(layer_table(frame)) == run.n_layers


def test_effects_of_a_remade_run_are_refused(tiny_llama):
    from parts.decomposition.effects import check_effects_match, run_digest

    run = tiny_run(tiny_llama)
    effects = total_effects(tiny_llama, run, ablation="zero")
    effects.info["fingerprint"] = {"run": run_digest(run)}  # as `parts effects` records it
    check_effects_match("here", run, effects)  # the same run: accepted
    remade = copy.copy(run)
    remade.fingerprint = {**(run.fingerprint or {}), "template_text": "another {text}"}
    with pytest.raises(PartsError, match="computed for another version of that run: rerun `parts effects here`"):
        check_effects_match("here", remade, effects)
