"""In-forward component gates (parts.reweighting.gates) on tiny random models and the embedded model.

The reference for the gated forward reruns each whole prompt with no cache and multiplies every head's `z`
slice and every MLP's output at the last position by its gate through hooks on the model's own modules.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from parts.components import parse_component
from parts.errors import PartsError
from parts.model.loading import from_hf, plain_model
from parts.model.readout import FINAL_NORM_IN, z_name
from parts.reweighting import gates as gates_module
from parts.reweighting.gates import GatedForward, gated_logits, train_gates
from parts.reweighting.reweight import train_weights
from tests.conftest import make_hf_model
from tests.test_effects import tiny_run

TOL = 1e-5
REVIEWS = ["great film", "dull plot", "fun", "the acting was bad and boring", "loved it", "hated the movie",
           "good plot", "awful acting", "very fun film", "boring", "the film was great", "bad movie"]


def review_run(model, n=12):
    """A two-label run over the tokenizer's words: one demonstration each, then the review."""
    prompts = [f"review : great film sentiment : positive review : dull plot sentiment : negative review : {text} "
               "sentiment :" for text in REVIEWS[:n]]
    return tiny_run(model, prompts)


def rerun_logits(forward: GatedForward, gates: torch.Tensor) -> torch.Tensor:
    """[example label]: every prompt rerun whole with no cache, each component's last-position output multiplied by
    its (clipped) gate through hooks."""
    runner, hf = forward.runner, plain_model(forward.runner.model)
    used = gates.clamp(0, 1)
    out = []
    for ids in runner.token_lists():
        width = len(ids)
        captured = {}
        handles = []
        for c, name in enumerate(forward.run.component_names):
            component = parse_component(name)
            if component.kind == "head":
                def pre(_m, args, kwargs, head=component.head, g=used[c], width=width):
                    value = args[0] if args else kwargs["hidden_states"]
                    flat = value.reshape(1, width, runner.n_heads, -1).clone()
                    flat[0, -1, head] = flat[0, -1, head] * g.to(value.dtype)
                    new = flat.reshape(value.shape)
                    return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})
                module = hf.get_submodule(runner.layout.taps[z_name(component.layer)][0])
                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(_m, _args, output, g=used[c], width=width):
                    value = output[0] if isinstance(output, tuple) else output
                    shaped = value.reshape(1, width, -1).clone()
                    shaped[0, -1] = shaped[0, -1] * g.to(value.dtype)
                    new = shaped.reshape(value.shape)
                    return (new, *output[1:]) if isinstance(output, tuple) else new
                module = hf.get_submodule(runner.layout.taps[runner.layout.mlp_out[component.layer]][0])
                handles.append(module.register_forward_hook(post))

        def final(_m, args, kwargs, captured=captured):
            captured["final"] = (args[0] if args else kwargs["hidden_states"])[0, -1].float()
        handles.append(hf.get_submodule(runner.layout.taps[FINAL_NORM_IN][0]).register_forward_pre_hook(
            final, with_kwargs=True))
        try:
            with torch.no_grad():
                hf(torch.tensor([ids]))
        finally:
            for handle in handles:
                handle.remove()
        out.append(runner.label_logits(captured["final"]))
    return torch.stack(out)


def test_gates_at_one_are_the_clean_model_and_any_gates_a_full_rerun(tiny_model):
    """Gates at 1 give the run's own logits; random gates (and ones outside [0, 1], clipped) give what a full rerun
    with hooks gives: the cached last token is exact, for a rotary, a parallel-residual and an absolute-position family."""
    run = review_run(tiny_model)
    forward = GatedForward(tiny_model, run, batch_size=3)
    ones = torch.ones(len(run.component_names))
    with torch.inference_mode():
        clean = forward.logits(ones)
    assert torch.allclose(clean, run.model_logits, atol=TOL, rtol=0)
    assert torch.allclose(forward.check_exact(), run.model_logits, atol=TOL, rtol=0)
    gates = torch.rand(len(run.component_names), generator=torch.Generator().manual_seed(0)) * 1.4 - 0.2
    with torch.inference_mode():
        gated = forward.logits(gates)
    expected = rerun_logits(forward, gates)
    assert torch.allclose(gated, expected, atol=TOL, rtol=0), (gated - expected).abs().max()
    assert (gated - clean).abs().max() > 1e-2  # the gates do something
    assert torch.allclose(gated_logits(tiny_model, run, gates), expected, atol=TOL, rtol=0)


def test_gradient_matches_finite_differences_in_float64(tokenizer):
    """d(loss)/d(gates) by backpropagation through the cached last token equals central finite differences of the
    same forward (float64 model, gates inside (0, 1) where the clip is smooth), and the cached forward's value is a
    full rerun's."""
    # GPT-2: its LayerNorms compute in the model's dtype (Llama's RMSNorm upcasts to float32, which would bury a
    # finite difference of 1e-6 in rounding)
    model = from_hf(make_hf_model("gpt2").double(), tokenizer, "tiny-gpt2")
    run = review_run(model, 4)
    forward = GatedForward(model, run, batch_size=4, keep=True)
    n = len(run.component_names)
    gates = (0.2 + 0.6 * torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    d_model = plain_model(model).config.hidden_size
    direction = torch.randn((4, d_model), generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def loss(g: torch.Tensor) -> torch.Tensor:
        (batch,) = forward.batches()
        final = forward.final_in(batch, g)
        assert final.dtype == torch.float64
        return (final * direction).sum()

    with torch.enable_grad():
        leaf = gates.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(leaf), leaf)
    eps = 1e-6
    with torch.no_grad():
        numeric = torch.stack([(loss(gates + eps * e) - loss(gates - eps * e)) / (2 * eps)
                               for e in torch.eye(n, dtype=torch.float64)])
    assert torch.allclose(grad, numeric, atol=1e-8, rtol=1e-6), (grad - numeric).abs().max()
    assert grad.abs().min() > 0  # every gate reaches the last token's readout
    # the cross-entropy of the label logits (what training descends) too, on a few gates
    labels = run.labels

    def cross_entropy(g: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(forward.logits(g).double(), labels)
    with torch.enable_grad():
        leaf = gates.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(cross_entropy(leaf), leaf)
    eps = 1e-3  # the readout is float32
    with torch.no_grad():
        for c in (0, 5, n - 1):
            e = torch.zeros(n, dtype=torch.float64)
            e[c] = eps
            numeric_c = (cross_entropy(gates + e) - cross_entropy(gates - e)) / (2 * eps)
            assert abs(float(grad[c] - numeric_c)) <= 1e-4 + 1e-3 * abs(float(numeric_c)), (c, grad[c], numeric_c)


def test_training_removes_a_biased_mlp(tokenizer):
    """A GPT-2 whose last MLP carries a large bias toward one label: the clean model says that label for every
    review; zeroing that MLP gives the labels. CompRW's recipe on the gates gets most labels right (its plateau
    rule stops it before all), and the biased MLP is the gate that closes most."""
    hf_model = make_hf_model("gpt2", seed=0, initializer_range=0.2)  # 5 of its 12 labels are 1
    model = from_hf(hf_model, tokenizer, "tiny-gpt2")
    run = review_run(model)
    forward = GatedForward(model, run, batch_size=12)
    last = run.component_index(f"MLP{run.n_layers - 1}")
    closed = torch.ones(len(run.component_names))
    closed[last] = 0.0
    with torch.inference_mode():
        labels = forward.logits(closed).argmax(-1)
    unembed = plain_model(model).lm_head.weight
    ids = run.label_token_ids
    with torch.no_grad():  # the bias pushes label 0's logit up through the final norm
        hf_model.transformer.h[-1].mlp.c_proj.bias.add_(20.0 * (unembed[ids[0]] - unembed[ids[1]]))
    biased = review_run(model)
    assert (biased.model_logits.argmax(-1) == 0).all()
    assert set(labels.tolist()) == {0, 1}
    biased.prompts = dataclasses.replace(biased.prompts, labels=tuple(labels.tolist()))
    result = train_gates(model, biased)
    clean_accuracy = float((biased.model_logits.argmax(-1) == labels).float().mean())  # 8 of 12
    assert result.train_accuracy > clean_accuracy, (result.train_accuracy, result.stopped_because)  # 10 of 12
    assert int(result.clipped.argmin()) == last, result.clipped
    # post-hoc CompRW on the same labelled examples, for contrast: the recipe itself is shared
    assert train_weights(biased.component_logits, biased.labels).epochs >= 1


def test_refusals_are_one_line(tiny_llama, tokenizer, monkeypatch):
    """A family whose forward refuses a cached last token, or whose cached last token is not its full forward (here
    made so by corrupting the cache), is refused in one line; so is a run with split experts."""
    run = tiny_run(tiny_llama)

    def corrupt(cache, repeats=1, detach=False):
        copied = original(cache, repeats, detach)
        for layer in copied.layers:
            layer.values = layer.values * 2.0
        return copied
    original = gates_module.layer_copies
    monkeypatch.setattr(gates_module, "layer_copies", corrupt)
    with pytest.raises(PartsError, match="cannot gate llama models in the forward pass: recomputing") as caught:
        GatedForward(tiny_llama, run).check_exact()
    assert "\n" not in str(caught.value)

    def refuse(cache, repeats=1, detach=False):
        raise TypeError("past_key_values is not supported\nsecond line")
    monkeypatch.setattr(gates_module, "layer_copies", refuse)
    with pytest.raises(PartsError, match=r"its forward refuses a cached last token \(TypeError: past_key_values") as caught:
        gated_logits(tiny_llama, run, torch.ones(len(run.component_names)))
    assert "\n" not in str(caught.value)
    split = tiny_run(tiny_llama)
    split.info = {**split.info, "split_experts": True}
    with pytest.raises(PartsError, match="one gate per MLP"):
        GatedForward(tiny_llama, split)


def test_embedded_model_gates_at_one_and_a_full_rerun(embedded_model, data_dir):
    """The embedded model on four sst2 prompts: gates at 1 give the run's logits, and random gates what a full
    rerun with hooks gives (1e-5 of the logit scale)."""
    from parts.experiments.runner import decompose_task

    run = decompose_task(embedded_model, "sst2", template=1, seed=0, limit=4, data_dir=data_dir, progress=False)
    forward = GatedForward(embedded_model, run, batch_size=4)
    scale = float(run.model_logits.abs().max())
    assert (forward.check_exact() - run.model_logits).abs().max() <= TOL * scale
    gates = torch.rand(len(run.component_names), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        gated = forward.logits(gates)
    assert (gated - rerun_logits(forward, gates)).abs().max() <= TOL * scale


def test_evaluate_with_gates_adds_their_row_and_their_predictions(tmp_path, tiny_model_dir, tiny_task_file, capsys):
    """`parts evaluate --gates`: a gates row whose accuracy is the saved gated logits' (recomputed by hand against
    the test labels), the gates saved beside the test run, and `setting_predictions` reading them without a model;
    without --gates no gates row is expected; with gates on one seed of two, the printed tables say they left them
    out (one gated evaluation serves both checks: it is this file's slowest step)."""
    from parts.cli import main
    from parts.data.tasks import get_task
    from parts.decomposition.runs import DecompositionRun
    from parts.experiments.evaluate import Setting, setting_predictions
    from parts.experiments.results import read_results
    from parts.experiments.runner import run_dir
    from parts.reweighting.gates import gated_logits_file, gates_file
    from parts.reweighting.reweight import read_weights

    argv = ["evaluate", "--model", str(tiny_model_dir), "--tasks", str(tiny_task_file), "--templates", "1",
            "--seeds", "0", "--labels", "12", "--limit", "8", "--out", str(tmp_path), "--device", "cpu"]
    assert main(argv) == 0
    rows = read_results(tmp_path / "results.csv")
    assert "gates" not in set(rows["method"])
    assert main([*argv, "--gates"]) == 0
    assert "0 of 1 settings already evaluated" in capsys.readouterr().out  # the gates row was missing
    rows = read_results(tmp_path / "results.csv")
    gates_row = rows[rows["method"] == "gates"]
    assert len(gates_row) == 1 and gates_row["labels"].item() == 12 and "epochs" in gates_row["note"].item()
    folder = run_dir(tmp_path, str(tiny_model_dir), tiny_task_file, 1, 0, "test", limit=8)
    test = DecompositionRun.load(folder)
    names, result, info = read_weights(gates_file(folder, 12))
    assert names == test.component_names and info["method"] == "gates"
    from safetensors.torch import load_file
    logits = load_file(str(gated_logits_file(folder, 12)))["logits"]
    by_hand = sum(int(p == y) for p, y in zip(logits.argmax(-1).tolist(), test.labels.tolist(), strict=True)) / 8
    assert gates_row["accuracy"].item() == pytest.approx(by_hand)
    task = get_task(str(tiny_task_file))
    labels, predictions = setting_predictions(tmp_path, str(tiny_model_dir), Setting(task, 1, 0, 8, (12,)))
    assert torch.equal(predictions[("gates", 12)], logits.argmax(-1)) and torch.equal(labels, test.labels)

    # Gates on one of two settings: the printed interval tables keep both settings of every other method and leave
    # the gates out, and `parts evaluate` says so in one line with the gates' own settings, not silently.
    seeds = argv.index("--seeds") + 1
    assert main([*argv[:seeds], "0,1", *argv[seeds + 1:]]) == 0
    capsys.readouterr()
    assert main([*argv[:seeds], "0,1", *argv[seeds + 1:], "--table-only"]) == 0
    printed = capsys.readouterr().out
    intervals = printed.split("accuracy (%), mean over runs", 1)[1]
    line, accuracy_header = intervals.splitlines()[1:3]
    assert line == ("Settings (template t, demonstration seed s): t1 × s0-1, 2 per task, 1 task, 2 in all. Run on fewer "
                    "settings, so left out of this table where they lack some: Gates† 12 (t1 × s0, 1 per task, 1 task, "
                    "1 in all).")
    assert "CompRW 12" in accuracy_header and "Gates" not in intervals.split(line, 1)[1]
    assert "| 2 |" in intervals  # CompRW and the others keep both runs
