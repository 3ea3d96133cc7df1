"""Component reweighting on hand-made component logits: what it learns and when it stops."""

from __future__ import annotations

import math

import pytest
import torch

from parts.errors import PartsError
from parts.reweighting.reweight import (
    ReweightResult,
    combine,
    load_weights,
    predict,
    read_weights,
    save_weights,
    train_weights,
    weights_file,
)


def one_perfect_among_noise() -> tuple[torch.Tensor, torch.Tensor]:
    """Component 0 gives +1 to the gold label; component 1 gives +2 to the wrong one (so the
    unweighted sum is always wrong); components 2-5 are small noise."""
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0])
    gold = torch.nn.functional.one_hot(labels, 2).float()
    generator = torch.Generator().manual_seed(0)
    noise = 0.1 * torch.randn(len(labels), 4, 2, generator=generator)
    logits = torch.cat([gold[:, None], 2 * (1 - gold)[:, None], noise], dim=1)
    return logits, labels


def test_the_perfect_component_gets_the_weight():
    logits, labels = one_perfect_among_noise()
    assert float((combine(torch.ones(6), logits).argmax(-1) == labels).float().mean()) == 0.0
    result = train_weights(logits, labels)
    assert result.stopped_because == "perfect"
    assert result.epochs == 101  # not yet perfect after update 1; perfect at the next check
    assert result.train_accuracy == 1.0
    clipped = result.clipped
    assert clipped[0] > 0.99  # the perfect component keeps its full weight
    assert clipped[1] == 0.0  # the anti-correlated one is switched off
    assert torch.equal(predict(result.weights, logits), labels)


def constant_loss_logits() -> tuple[torch.Tensor, torch.Tensor]:
    """All component logits zero: the cross-entropy is log 2 whatever the weights, every
    prediction is a tie (label 0), and only the L1 term moves w: down by lr * l1 = 0.0005 per epoch."""
    return torch.zeros(2, 3, 2), torch.tensor([1, 1])


def test_plateau_stops_after_three_epochs_without_improvement():
    logits, labels = constant_loss_logits()
    result = train_weights(logits, labels)
    # Epoch 1 sets the best loss (log 2); epochs 2, 3, 4 fail to go below it: three failures.
    assert result.stopped_because == "plateau"
    assert result.epochs == 4
    assert result.losses == pytest.approx([math.log(2)] * 4)
    assert result.weights == pytest.approx(torch.full((3,), 1 - 0.0005 * 4), abs=1e-6)
    assert result.train_accuracy == 0.0


@pytest.mark.parametrize("patience,epochs", [(1, 2), (3, 4), (10, 11)])
def test_plateau_follows_patience(patience, epochs):
    logits, labels = constant_loss_logits()
    result = train_weights(logits, labels, patience=patience)
    assert (result.stopped_because, result.epochs) == ("plateau", epochs)


def test_failures_to_improve_count_in_total_not_in_a_row():
    # One component, logit +1 for label 0 on the two examples, labels [0, 1]: the cross-entropy
    # is log(1 + e^-w)/2 + log(1 + e^w)/2, smallest at w = 0. With lr 1 and no L1 the weight
    # goes 1 -> 1 - (s(1) - 1/2) = 0.7689 -> ... and keeps improving; with lr 30 it overshoots
    # 1 -> 1 - 30 * 0.2311 = -5.93 (clipped to 0: loss log 2, an improvement on epoch 1's 0.7201),
    # where the clipped weight gets no gradient: every later epoch fails (log 2 is not < log 2).
    logits, labels = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]]), torch.tensor([0, 1])
    result = train_weights(logits, labels, learning_rate=30.0, l1_penalty=0.0)
    assert result.losses[:2] == pytest.approx([0.5 * (math.log1p(math.exp(-1)) + math.log1p(math.exp(1))), math.log(2)])
    assert (result.stopped_because, result.epochs) == ("plateau", 5)
    assert float(result.weights[0]) == pytest.approx(1 - 30 * (1 / (1 + math.exp(-1)) - 0.5), abs=1e-5)


def test_max_epochs_ends_training_before_the_plateau():
    logits, labels = constant_loss_logits()
    result = train_weights(logits, labels, max_epochs=3)  # two failures by then
    assert (result.stopped_because, result.epochs) == ("max_epochs", 3)
    assert result.weights == pytest.approx(torch.full((3,), 0.9985), abs=1e-6)


@pytest.mark.parametrize("check_every,epochs", [(1, 11), (7, 15), (20, 21), (100, 101)])
def test_perfect_is_only_noticed_at_a_check(check_every, epochs):
    logits, labels = one_perfect_among_noise()
    # Checked at every update, the training set is first all right after update 11 (the wrong-way
    # component's weight has fallen from 1 to about 0.34, below the perfect one's 1 / 2); checked every
    # c updates (after 1, 1 + c, 1 + 2c, ...) it is noticed at the first check from 11 on.
    # A large patience leaves the accuracy check as the only way to stop.
    result = train_weights(logits, labels, check_every=check_every, patience=10_000)
    assert (result.stopped_because, result.epochs, result.train_accuracy) == ("perfect", epochs, 1.0)


def test_already_perfect_stops_after_the_first_update():
    logits = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])  # one component, right on both examples
    result = train_weights(logits, torch.tensor([1, 0]))
    assert (result.stopped_because, result.epochs, result.train_accuracy) == ("perfect", 1, 1.0)


def test_l1_and_learning_rate_are_parameters():
    logits, labels = constant_loss_logits()
    result = train_weights(logits, labels, learning_rate=0.1, l1_penalty=0.02, max_epochs=3)
    assert result.weights == pytest.approx(torch.full((3,), 1 - 3 * 0.1 * 0.02), abs=1e-6)


def test_predict_clips_weights_to_zero_one():
    # Two examples, three components, two labels.
    logits = torch.tensor([
        [[1.0, 0.0], [0.0, 3.0], [2.0, 0.0]],
        [[0.0, 1.0], [1.0, 0.0], [0.0, 4.0]],
    ])
    weights = torch.tensor([2.0, -1.0, 0.5])  # clipped: 1, 0, 0.5
    # example 0: [1 + 1, 0] -> label 0; example 1: [0, 1 + 2] -> label 1
    assert combine(weights, logits).tolist() == [[2.0, 0.0], [0.0, 3.0]]
    assert predict(weights, logits).tolist() == [0, 1]
    # With the unclipped weights example 0 would be [2 + 1, -3] and example 1 [-1, 2 + 2]: the same labels,
    # but weight 1 at -1 would flip example 0 of this other set:
    assert predict(torch.tensor([0.0, -1.0, 0.0]), logits).tolist() == [0, 0]  # all zero: ties go to label 0


@pytest.mark.parametrize("labels,message", [
    (torch.tensor([0]), "1 labels for 2 examples"),
    (torch.tensor([0, 2]), "labels must lie in 0..1"),
])
def test_bad_training_input_is_a_parts_error(labels, message, unchecked_shapes):
    with pytest.raises(PartsError, match=message):
        train_weights(torch.zeros(2, 3, 2), labels)


def test_weights_round_trip_and_missing_file(tmp_path):
    result = ReweightResult(torch.tensor([0.25, 1.5, -0.5]), 300, "plateau", 0.75, [0.7, 0.69])
    path = save_weights(weights_file(tmp_path, 24), ["L0H0", "L0H1", "MLP0"], result, labels=24)
    assert path.name == "reweight-labels24.safetensors"
    names, weights = load_weights(tmp_path, labels=24)
    assert names == ["L0H0", "L0H1", "MLP0"] and weights.tolist() == [0.25, 1.5, -0.5]
    _, again, info = read_weights(path)
    assert (again.epochs, again.stopped_because, again.train_accuracy, again.losses) == (300, "plateau", 0.75, [0.7, 0.69])
    assert info == {"labels": 24}
    # no temporary file left: the weights, parts' marker and its lock
    assert sorted(p.name for p in tmp_path.iterdir()) == [".parts", ".parts-lock", "reweight-labels24.safetensors"]
    with pytest.raises(PartsError, match="no learned weights at .*reweight-labels12.safetensors"):
        load_weights(tmp_path, labels=12)


def test_equal_weights_give_equal_bytes(tmp_path):
    """safetensors writes several metadata keys in a random order; the weights file keeps one."""
    result = ReweightResult(torch.tensor([0.25, 1.5, -0.5]), 300, "plateau", 0.75, [0.7, 0.69])
    files = [save_weights(tmp_path / f"w{i}.safetensors", ["L0H0", "L0H1", "MLP0"], result, labels=24, trained_on="x")
             for i in range(6)]
    assert len({path.read_bytes() for path in files}) == 1


def test_weights_files_of_the_old_format_still_load(tmp_path):
    from safetensors.torch import save_file

    metadata = {"component_names": '["L0H0", "MLP0"]', "epochs": "12", "stopped_because": "max epochs",
                "train_accuracy": "0.5", "losses": "[0.7]", "info": '{"labels": 24}'}
    save_file({"weights": torch.tensor([1.0, 0.5])}, tmp_path / "old.safetensors", metadata=metadata)
    names, result, info = read_weights(tmp_path / "old.safetensors")
    assert names == ["L0H0", "MLP0"] and result.weights.tolist() == [1.0, 0.5]
    assert (result.epochs, result.stopped_because, result.train_accuracy, result.losses, info) == (
        12, "max epochs", 0.5, [0.7], {"labels": 24})
