"""The labelled sets of seeds 0-4 are disjoint, as the paper's (docs/guide/evaluate.md).

Each seed's k demonstrations and 24 - k training examples share no example with any other seed's, for every
built-in task on the real data (skipped without the data folder, as every data test); seed 0 is the draw parts
always made; a training split too small for disjoint sets is refused in one line that says how many it needs.
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import combinations
from pathlib import Path

import pytest

from parts.data.prompts import LABEL_BUDGET, build_prompts, sample_labeled_set
from parts.data.tasks import _EXTRA_TASKS, PAPER_TASK_NAMES, get_task, load_split
from parts.errors import PartsError

TEST_ONLY = ("yelp", "boolq_contrast")  # out-of-domain test sets: no training split, so no labelled sets
TRAINABLE = [name for name in (*PAPER_TASK_NAMES, *_EXTRA_TASKS) if name not in TEST_ONLY]


@pytest.mark.parametrize("name", TRAINABLE)
def test_every_built_in_task_draws_disjoint_labelled_sets_for_seeds_0_to_4(name, data_dir):
    task = get_task(name)
    k = task.default_shots
    labels = [row["label"] for row in load_split(task, "train", data_dir)]
    drawn = {}
    for seed in range(5):
        train = build_prompts(task, 1, seed, split="train", data_dir=data_dir)  # the 24 - k examples CompRW trains on
        demos, further = list(train.demonstrations), list(train.example_indices)
        assert sample_labeled_set(task, labels, k, seed)[0] == demos  # a test run's demonstrations: the same
        assert len(demos) == k and len(further) == LABEL_BUDGET - k
        assert len(set(demos + further)) == LABEL_BUDGET
        assert {labels[i] for i in demos} == set(range(task.n_labels))
        drawn[seed] = set(demos + further)
        no_demos, zero_shot = sample_labeled_set(task, labels, 0, seed, LABEL_BUDGET)  # --shots 0: 24 to train on
        drawn[seed, 0] = set(zero_shot)
        assert len(drawn[seed, 0]) == LABEL_BUDGET and not no_demos
    for first, second in combinations(range(5), 2):
        assert not drawn[first] & drawn[second], (name, first, second)
        assert not drawn[first, 0] & drawn[second, 0], (name, first, second)


def test_label_balance_is_kept_and_a_scarce_class_is_shared_among_the_five_seeds(data_dir):
    sst2 = get_task("sst2")
    labels = [row["label"] for row in load_split(sst2, "train", data_dir)]
    for seed in range(5):
        demos, further = sample_labeled_set(sst2, labels, 4, seed, LABEL_BUDGET - 4)
        assert Counter(labels[i] for i in demos) == {0: 2, 1: 2} and Counter(labels[i] for i in further) == {0: 10, 1: 10}
    cb = get_task("cb")  # 16 neutral of 250: seed 0 takes 8, the later seeds leave one for each other's demonstrations
    labels = [row["label"] for row in load_split(cb, "train", data_dir)]
    assert Counter(labels)[2] == 16
    neutral = [sum(labels[i] == 2 for part in sample_labeled_set(cb, labels, 3, seed, 21) for i in part)
               for seed in range(5)]
    assert neutral == [8, 5, 1, 1, 1]
    with pytest.raises(PartsError, match=r"^class neutral of cb has 0 training examples left beside the labelled sets "
                                         r"of seeds 0-4: the 3 demonstrations of seed 5 need 1; add examples of "
                                         r"neutral to its train split, or use seeds 0-4 only$"):
        sample_labeled_set(cb, labels, 3, 5, 21)


def test_seed_0_is_the_draw_parts_always_made(data_dir):
    """Committed seed-0 runs (and their total-effects files) keep their prompts and fingerprints."""
    sst2 = get_task("sst2")
    train = build_prompts(sst2, 1, 0, split="train", data_dir=data_dir)
    assert list(train.demonstrations) == [1568, 3853, 4762, 4752]
    assert list(train.example_indices) == [5832, 146, 654, 4309, 2065, 4377, 3445, 490, 1150, 4040, 2203, 1451, 2478,
                                           2365, 1066, 6053, 6366, 4478, 6142, 5011]


def small_task(folder: Path, n_train: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"text": f"review {i}", "label": i % 2} for i in range(n_train)]
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:10]))
    spec = {"name": "small", "data_dir": ".", "template": "{text} :", "label_words": [" no", " yes"]}
    (folder / "small.json").write_text(json.dumps(spec))
    return str(folder / "small.json")


def test_a_training_split_too_small_for_disjoint_seeds_is_refused_in_one_line(tmp_path):
    task = get_task(small_task(tmp_path, 60))
    first, second = (build_prompts(task, 1, seed, split="train") for seed in (0, 1))
    assert not set(first.demonstrations + first.example_indices) & set(second.demonstrations + second.example_indices)
    assert len(build_prompts(task, 1, 2, split="test").demonstrations) == 4  # 12 left: room for seed 2's demonstrations
    with pytest.raises(PartsError) as refused:
        build_prompts(task, 1, 2, split="train")
    assert str(refused.value) == (
        "task small has 60 labelled training examples (per class [30, 30]); seed 2 needs 72: its own 24 and the 24 of "
        "each of seeds 0-1, all disjoint (5 seeds of 24 need 120); add training examples, or use seeds 0-1 only")
    with pytest.raises(PartsError, match=r"^task small has 60 labelled training examples \(per class \[30, 30\]\); "
                                         r"seed 4 needs 100: .* or use seeds 0-1 only$"):
        build_prompts(task, 1, 4, split="test")  # seed 2's set does not fit, so seeds 3 and 4 have no place
    assert len(build_prompts(get_task(small_task(tmp_path / "enough", 120)), 1, 4, split="train")) == 20


def test_a_command_whose_highest_seed_does_not_fit_is_refused_before_any_work(tiny_model_dir, tiny_task_file, tmp_path,
                                                                              capsys):
    from parts.cli import main

    out = tmp_path / "out"
    argv = ["evaluate", "--model", str(tiny_model_dir), "--tasks", str(tiny_task_file), "--templates", "1",
            "--seeds", "0-2", "--limit", "4", "--device", "cpu", "--out", str(out)]
    capsys.readouterr()
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["parts evaluate: error: task tiny has 40 labelled training examples (per class [20, 20]); seed 2 "
                     "needs 52: its own 4 and the 24 of each of seeds 0-1, all disjoint (5 seeds of 24 need 120); add "
                     "training examples, or use seed 0 only"]
    assert not out.exists()  # refused before seed 0 ran
