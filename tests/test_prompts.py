"""Tasks, templates, demonstrations and test samples."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from parts.data.prompts import build_prompts, label_token_ids, render_prompt, sample_labeled_set, sample_test
from parts.data.tasks import PAPER_TASK_NAMES, PAPER_TASKS, Template, get_task, load_split
from parts.errors import PartsError


def test_paper_tasks_have_four_templates_with_one_word_per_label():
    assert PAPER_TASK_NAMES == ("sst2", "boolq", "qqp", "wic", "rte", "mnli", "agnews", "arc")
    for task in PAPER_TASKS.values():
        assert sorted(task.templates) == [1, 2, 3, 4]
        assert 4 in task.perturbed
        for template in task.templates.values():
            assert len(template.label_words) == task.n_labels
            assert all(w.startswith(" ") for w in template.label_words)


def test_render_prompt_exact_text():
    template = Template("Review: {text}\nSentiment:", (" negative", " positive"))
    demos = [{"text": "bad", "label": 0}, {"text": "good", "label": 1}]
    prompt = render_prompt(template, demos, {"text": "fine", "label": 1})
    assert prompt == "Review: bad\nSentiment: negative\nReview: good\nSentiment: positive\nReview: fine\nSentiment:"


def test_arc_template_reads_choices():
    template = PAPER_TASKS["arc"].templates[1]
    text = template.render({"question": "Q?", "choices": ["w", "x", "y", "z"], "label": 2})
    assert text == "Question: Q?\nA. w\nB. x\nC. y\nD. z\nAnswer:"
    assert template.fields == ["choices", "question"]


LABELS = [0] * 60 + [1] * 50 + [2] * 50  # room for six disjoint labelled sets of 24, seven of each class to train on


@pytest.mark.parametrize("seed", range(6))
def test_demonstrations_cover_classes_end_on_different_labels_and_are_seeded(seed):
    task = PAPER_TASKS["mnli"]
    demos, train = sample_labeled_set(task, LABELS, 3, seed, n_train=21)
    assert sorted(LABELS[i] for i in demos) == [0, 1, 2]
    assert LABELS[demos[-1]] != LABELS[demos[-2]]
    assert not set(demos) & set(train) and len(set(train)) == 21
    assert Counter(LABELS[i] for i in train) == Counter({0: 7, 1: 7, 2: 7})
    assert (demos, train) == sample_labeled_set(task, LABELS, 3, seed, n_train=21)
    assert sample_labeled_set(task, LABELS, 3, seed)[0] == demos  # the demonstrations of a test run: the same
    for other in range(seed):  # disjoint from every lower seed's labelled set
        assert not set(demos + train) & set(sum(sample_labeled_set(task, LABELS, 3, other, n_train=21), []))


def test_different_seeds_give_different_demonstrations():
    task = PAPER_TASKS["sst2"]
    labels = [i % 2 for i in range(200)]
    sets = {tuple(sample_labeled_set(task, labels, 4, seed)[0]) for seed in range(5)}
    assert len(sets) == 5
    for seed in range(5):
        demos = sample_labeled_set(task, labels, 4, seed)[0]
        assert Counter(labels[i] for i in demos) == Counter({0: 2, 1: 2})


def test_demonstration_errors():
    task = PAPER_TASKS["sst2"]
    with pytest.raises(PartsError, match="cannot show all 2 classes"):
        sample_labeled_set(task, [0, 1, 0, 1], 1, 0)
    with pytest.raises(PartsError, match="no example of class.*positive"):
        sample_labeled_set(task, [0, 0, 0, 0], 2, 0)
    with pytest.raises(PartsError, match="cannot give 4 balanced"):
        sample_labeled_set(task, [0, 1, 0], 4, 0)


def test_test_sample_is_balanced_nested_and_independent_of_seed():
    task = PAPER_TASKS["sst2"]
    labels = [0] * 1000 + [1] * 1000  # sorted by label, like mr's test file
    small, large = sample_test(task, labels, "test", 10), sample_test(task, labels, "test", 100)
    assert Counter(labels[i] for i in small) == Counter({0: 5, 1: 5})
    assert large[:10] == small
    assert small != list(range(10))
    assert sample_test(task, labels, "test", None) and len(sample_test(task, labels, "test", None)) == 2000


def test_label_token_ids_checks_single_distinct_tokens(tokenizer):
    assert label_token_ids(tokenizer, [" negative", " positive"]) == [
        tokenizer.convert_tokens_to_ids("negative"), tokenizer.convert_tokens_to_ids("positive")]
    with pytest.raises(PartsError, match=r"label word ' very good' is 2 tokens"):
        label_token_ids(tokenizer, [" bad", " very good"])
    with pytest.raises(PartsError, match="map to the same token"):
        label_token_ids(tokenizer, [" good", "good"])


def test_user_task_builds_prompts(tiny_task_file):
    task = get_task(str(tiny_task_file))
    prompts = build_prompts(task, template=1, seed=0, shots=4, split="test", limit=6)
    assert len(prompts) == 6 and Counter(prompts.labels) == Counter({0: 3, 1: 3})
    assert prompts.prompts[0].count("sentiment :") == 5 and prompts.prompts[0].endswith("sentiment :")
    train = build_prompts(task, template=1, seed=0, shots=4, split="train")
    assert len(train) == 20 and not set(train.example_indices) & set(train.demonstrations)
    assert train.demonstrations == prompts.demonstrations


def test_user_task_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "template": "{text}"}))
    with pytest.raises(PartsError, match="lacks data_dir, label_words"):
        get_task(str(bad))
    with pytest.raises(PartsError, match="unknown task 'nope'"):
        get_task("nope")


@pytest.mark.parametrize("rows,message", [
    ('{"text": "a", "label": 5}\n', "label 5 is out of range"),
    ('{"text": "a", "label": "positive"}\n', "label must be an integer"),
    ('{"text": "a"}\n', "label must be an integer"),
    ('{"label": 1}\n', "lacks field"),
    ("not json\n", "not valid JSON"),
])
def test_bad_data_files(tmp_path, rows, message):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.jsonl").write_text(rows)
    with pytest.raises(PartsError, match=message):
        load_split(PAPER_TASKS["sst2"], "train", tmp_path)


def test_missing_data_dir(tmp_path):
    with pytest.raises(PartsError, match="does not exist"):
        load_split(PAPER_TASKS["sst2"], "train", tmp_path / "nowhere")
    with pytest.raises(PartsError, match="sst2/test.jsonl not found"):
        load_split(PAPER_TASKS["sst2"], "test", tmp_path)


@pytest.mark.parametrize("name", PAPER_TASK_NAMES)
def test_every_paper_task_renders_from_the_data_directory(name, data_dir):
    task = get_task(name)
    for number in task.templates:
        prompts = build_prompts(task, number, seed=0, split="test", limit=4, data_dir=data_dir)
        assert len(prompts) == 4 and len(prompts.demonstrations) == task.default_shots
        assert prompts.prompts[0].count(prompts.label_words[0].strip()) >= 1


def test_separator_ends_every_demonstration_and_is_a_template_property():
    demos = [{"text": "bad", "label": 0}, {"text": "good", "label": 1}]
    paper = get_task("sst2").template(1)
    assert paper.separator == "\n"  # the authors' code: f"{sents[i]}{labels[i]}\n"
    assert render_prompt(paper, demos, {"text": "ok", "label": 0}) == (
        "Review: bad\nSentiment: negative\nReview: good\nSentiment: positive\nReview: ok\nSentiment:")
    own = Template("{text} =>", (" no", " yes"), separator=" || ")
    assert render_prompt(own, demos, {"text": "ok", "label": 0}) == "bad => no || good => yes || ok =>"
    assert render_prompt(own, [], {"text": "ok", "label": 0}) == "ok =>"


def test_user_task_sets_its_own_separator(tmp_path):
    spec = {"name": "mine", "data_dir": ".", "template": "{text}:", "label_words": [" a", " b"], "separator": "\n\n"}
    (tmp_path / "mine.json").write_text(json.dumps(spec))
    assert get_task(tmp_path / "mine.json").template(1).separator == "\n\n"
    spec["separator"] = 3
    (tmp_path / "bad.json").write_text(json.dumps(spec))
    with pytest.raises(PartsError, match="separator must be a string"):
        get_task(tmp_path / "bad.json")
    del spec["separator"]
    (tmp_path / "plain.json").write_text(json.dumps(spec))
    assert get_task(tmp_path / "plain.json").template(1).separator == "\n"


def test_many_shot_order_shuffles_all_labelled_examples_last_two_differ():
    from parts.data.prompts import many_shot_order

    sst2, agnews = get_task("sst2"), get_task("agnews")
    drawn = [1, 0, 1, 0] + [1, 0] * 10  # the drawing order: class rotation
    for seed in range(20):
        order = many_shot_order(sst2, seed, drawn)
        assert sorted(order) == list(range(24))
        shown = [drawn[i] for i in order]
        assert shown[-1] != shown[-2]
        # demonstrations are no longer a fixed prefix
        assert order[:4] != [0, 1, 2, 3]
    assert many_shot_order(sst2, 3, drawn) == many_shot_order(sst2, 3, drawn)  # deterministic per seed
    assert many_shot_order(sst2, 3, drawn) != many_shot_order(sst2, 4, drawn)
    four = [c for _ in range(6) for c in (1, 3, 0, 2)]
    orders = {tuple(many_shot_order(agnews, s, four)) for s in range(10)}
    assert len(orders) == 10
    periodic = sum(all(four[o[i]] != four[o[i + 1]] for i in range(23)) for o in orders)
    assert periodic < 10  # not a rotation: some neighbours share a label
