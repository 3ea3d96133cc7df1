"""The methods beyond the paper (issue 24), each on a tiny case built by hand whose answer is known."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from parts.cli import main
from parts.components import component_names
from parts.data.prompts import PromptSet
from parts.decomposition.runs import TENSORS, DecompositionRun
from parts.errors import PartsError
from parts.experiments.evaluate import beyond_paper_predictions
from parts.experiments.results import read_results
from parts.experiments.runner import decompose_task, run_dir
from parts.methods import MAIN_METHODS
from parts.reweighting import masking, supervised
from parts.reweighting.reweight import predict, train_weights

N_TRAIN, N_TEST = 20, 30


def gold(n: int, labels: int = 2) -> torch.Tensor:
    return torch.arange(n) % labels


def one_hot(labels: torch.Tensor, scale: float = 1.0, n_labels: int = 2) -> torch.Tensor:
    return scale * torch.nn.functional.one_hot(labels, n_labels).float()


def make_run(component_logits: torch.Tensor, labels: torch.Tensor, residual: torch.Tensor | None = None,
             model_logits: torch.Tensor | None = None) -> DecompositionRun:
    """A run of these component logits (3 components: L0H0, L0H1, MLP0) and gold labels."""
    n, n_components, n_labels = component_logits.shape
    assert n_components == 3
    label_names = tuple(f"l{i}" for i in range(n_labels))
    prompts = PromptSet("t", 1, 0, 2, "test", label_names, tuple(" " + x for x in label_names), (0, 1), tuple(range(n)),
                        tuple(f"p{i}" for i in range(n)), tuple(int(y) for y in labels))
    total = component_logits.sum(1) if model_logits is None else model_logits
    run = DecompositionRun("m", prompts, list(range(n_labels)), 1, 2, component_names(1, 2), component_logits,
                           total - component_logits.sum(1), total)
    run.final_residual = residual
    return run


def flipped_case(n: int) -> torch.Tensor:
    """L0H0 strongly wrong on every example, L0H1 a weak constant pull to label 0, MLP0 silent."""
    y = gold(n)
    return torch.stack([one_hot(1 - y, 2.0), one_hot(torch.zeros(n, dtype=torch.long), 0.5), torch.zeros(n, 2)], dim=1)


def test_signed_comprw_flips_a_reliably_wrong_component():
    train, test = flipped_case(N_TRAIN), flipped_case(N_TEST)
    plain = train_weights(train, gold(N_TRAIN))
    signed = train_weights(train, gold(N_TRAIN), signed=True)
    assert float(signed.weights[0]) < 0  # flipped, where [0, 1] can only switch it off
    assert float(plain.clipped[0]) >= 0
    assert torch.equal(predict(signed.weights, test, signed=True), gold(N_TEST))  # 100%
    assert float((predict(plain.weights, test) == gold(N_TEST)).float().mean()) <= 0.5
    # the same weights read through [0, 1] lose the flip: signed is a different prediction rule, not only training
    assert not torch.equal(predict(signed.weights, test), gold(N_TEST))


def biased_case(n: int) -> torch.Tensor:
    """L0H0 answers label 0 on every example with a large logit; L0H1 is right but weaker; MLP0 right, weaker still."""
    y = gold(n)
    return torch.stack([one_hot(torch.zeros(n, dtype=torch.long), 3.0), one_hot(y, 1.0), one_hot(y, 0.5)], dim=1)


def test_masking_removes_the_label_biased_component():
    train, test = biased_case(N_TRAIN), biased_case(N_TEST)
    assert masking.label_biased(train).tolist() == [True, False, False]
    keep = masking.mask_biased(train)
    assert keep.tolist() == [False, True, True]
    assert float((test.sum(1).argmax(-1) == gold(N_TEST)).float().mean()) == 0.5  # the full sum: always label 0
    assert torch.equal(masking.mask_predict(keep, test), gold(N_TEST))  # masked: 100%


def test_masking_keeps_everything_when_every_component_is_biased():
    logits = one_hot(torch.zeros(4, 3, dtype=torch.long))
    assert masking.mask_biased(logits).tolist() == [True, True, True]


def test_masking_refuses_no_examples():
    with pytest.raises(Exception, match="at least one example"):
        masking.label_biased(torch.zeros(0, 3, 2))


def test_predictions_never_read_the_test_labels():
    train = make_run(flipped_case(N_TRAIN) + biased_case(N_TRAIN), gold(N_TRAIN), separable_features(N_TRAIN, 0))
    test = make_run(flipped_case(N_TEST) + biased_case(N_TEST), gold(N_TEST), separable_features(N_TEST, 1))
    poisoned = dataclasses.replace(test, prompts=dataclasses.replace(test.prompts, labels=(0,) * N_TEST))
    clean, dirty = beyond_paper_predictions(train, test), beyond_paper_predictions(train, poisoned)
    assert clean.keys() == dirty.keys()
    assert {m.key for m in MAIN_METHODS if m.beyond_paper} - {"gates"} <= clean.keys()
    assert torch.equal(clean["probe-resid"][0], gold(N_TEST))  # the residual holds the label: the probe finds it
    for method in clean:
        assert torch.equal(clean[method][0], dirty[method][0]) and clean[method][1] == dirty[method][1], method


def separable_features(n: int, seed: int) -> torch.Tensor:
    """Label y sits in feature 3 (+/-1 plus small noise); 9 other features are noise of scale 1."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=generator)
    x[:, 3] = 2.0 * gold(n).float() - 1.0 + 0.1 * torch.randn(n, generator=generator)
    return x


def test_probe_recovers_separable_features():
    fitted = supervised.fit_probe("probe", separable_features(N_TRAIN, 0), gold(N_TRAIN), 2)
    assert torch.equal(fitted.predict(separable_features(N_TEST, 1)), gold(N_TEST))
    assert fitted.train_accuracy == 1.0 and fitted.C in supervised.C_GRID
    assert fitted.held_out_log_probability > math.log(0.9)  # leave-one-out: each held-out example well predicted


def test_probe_on_component_logits_is_unconstrained_comprw():
    """Three labels; the label lives in MLP0's logits with a permuted sign pattern no [0, 1] weight can use."""
    y = torch.arange(N_TRAIN) % 3
    logits = torch.zeros(N_TRAIN, 3, 3)
    logits[:, 2] = -3.0 * one_hot(y, n_labels=3)  # MLP0 votes against the right label: only a negative weight reads it
    logits[:, 0] = one_hot(torch.zeros(N_TRAIN, dtype=torch.long), 5.0, 3)  # L0H0: always label 0
    fitted = supervised.fit_probe("probe-logits", logits, y, 3)
    assert torch.equal(fitted.predict(logits), y)
    assert float((predict(train_weights(logits, y).weights, logits) == y).float().mean()) < 0.5


def test_affine_calibration_removes_a_label_bias_of_the_full_model():
    """The model's logits say the label plus a constant pull of 1.5 towards label 0: half right; calibrated, all right."""
    def biased_logits(n: int) -> torch.Tensor:
        return one_hot(gold(n), 1.0) + one_hot(torch.zeros(n, dtype=torch.long), 1.5)

    assert float((biased_logits(N_TEST).argmax(-1) == gold(N_TEST)).float().mean()) == 0.5
    fitted = supervised.fit_affine_calibration(biased_logits(N_TRAIN), gold(N_TRAIN))
    assert torch.equal(fitted.predict(biased_logits(N_TEST)), gold(N_TEST))


def test_strongest_penalty_leaves_the_model_as_it_is():
    """C -> 0: scale 1, bias 0 (the penalty's centre), so the calibrated argmax is the model's own."""
    logits = torch.randn(N_TRAIN, 3, generator=torch.Generator().manual_seed(0))
    fitted = supervised.fit_affine_calibration(logits, torch.arange(N_TRAIN) % 3, grid=(1e-9,))
    assert torch.equal(fitted.predict(logits), logits.argmax(-1))


@pytest.mark.parametrize("fit", ["probe", "calibration"])
def test_fewer_than_two_per_class_is_a_one_line_error_naming_the_method(fit):
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    with pytest.raises(PartsError, match=r"^probe-logits: leave-one-out .* class 1 has 1 of 6: use a larger --labels"):
        if fit == "probe":
            supervised.fit_probe("probe-logits", torch.randn(6, 4), labels, 3)
        else:
            supervised.fit_affine_calibration(torch.randn(6, 3), labels, method="probe-logits")
    with pytest.raises(PartsError, match="class 2 has 0 of 4"):
        supervised.fit_probe("m", torch.randn(4, 4), torch.tensor([0, 0, 1, 1]), 3)


def test_a_run_without_its_final_residual_is_refused_by_the_residual_probe_only():
    train = make_run(biased_case(N_TRAIN), gold(N_TRAIN))  # as a run saved before parts stored the residual
    test = make_run(biased_case(N_TEST), gold(N_TEST), separable_features(N_TEST, 1))
    with pytest.raises(PartsError, match=r"^the test run of t t1 s0 stores no final residual .*probe-resid.*"
                                         r"pass --recompute-changed to recompute it$"):
        beyond_paper_predictions(train, test)
    others = beyond_paper_predictions(train, test, residual=False)
    assert "probe-resid" not in others and "mask-biased" in others


def test_the_stored_residual_is_what_the_unembedding_reads(tiny_model, tiny_task_file, tmp_path):
    run = decompose_task(tiny_model, tiny_task_file, limit=6, progress=False)
    assert run.final_residual is not None and run.final_residual.shape == (6, 32)
    ids = run.label_token_ids
    bias = tiny_model.b_U[ids].float() if getattr(tiny_model, "b_U", None) is not None else 0.0
    logits = run.final_residual @ tiny_model.W_U[:, ids].float() + bias
    torch.testing.assert_close(logits, run.model_logits, atol=1e-4, rtol=1e-4)
    run.save(tmp_path / "run")
    again = DecompositionRun.load(tmp_path / "run")
    assert again == run and torch.equal(again.final_residual, run.final_residual)


def test_evaluate_refuses_a_run_saved_without_its_residual_until_recomputed(tmp_path, tiny_model_dir, tiny_task_file,
                                                                          capsys):
    argv = ["evaluate", "--model", str(tiny_model_dir), "--tasks", str(tiny_task_file), "--templates", "1",
            "--seeds", "0", "--labels", "12", "--limit", "8", "--out", str(tmp_path), "--device", "cpu"]
    assert main(argv) == 0
    folder = run_dir(tmp_path, str(tiny_model_dir), tiny_task_file, 1, 0, "test", limit=8)
    tensors = load_file(str(folder / TENSORS))
    save_file({k: v for k, v in tensors.items() if k != "final_residual"}, str(folder / TENSORS))  # as saved before
    (tmp_path / "results.csv").unlink()
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("stores no final residual (saved before parts stored one), which the residual probe "
                        "(probe-resid) needs: pass --recompute-changed to recompute it") and "\n" not in err
    assert main([*argv, "--recompute-changed"]) == 0
    assert DecompositionRun.load(folder).final_residual is not None
    assert "probe-resid" in set(read_results(tmp_path / "results.csv")["method"])


@pytest.mark.integration
def test_evaluate_on_the_embedded_model_gives_every_method_beyond_the_paper(tmp_path, data_dir):
    argv = ["evaluate", "--tasks", "sst2", "--templates", "1", "--seeds", "0", "--labels", "24", "--limit", "8",
            "--data-dir", str(data_dir), "--out", str(tmp_path), "--device", "cpu"]
    assert main(argv) == 0
    rows = read_results(tmp_path / "results.csv")
    by_default = {m.key for m in MAIN_METHODS if m.beyond_paper and not m.optional}  # gates only with --gates
    beyond = rows[rows["method"].isin([m.key for m in MAIN_METHODS if m.beyond_paper])]
    assert set(beyond["method"]) == by_default and "gates" not in by_default
    assert set(beyond["labels"]) == {24} and set(beyond["n_test"]) == {8}
    assert all(round(8 * a) == pytest.approx(8 * a, abs=1e-4) for a in beyond["accuracy"])  # a share of 8 examples
