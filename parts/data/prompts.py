"""In-context prompts: demonstrations drawn by seed, test examples drawn once per task, rendering.

The paper's protocol: k demonstrations from the training split (k = 4, or 3 for 3-way tasks),
the same number from every class, shuffled until the last two have different labels. The
24-labelled-example budget is those k demonstrations plus 24 - k further training examples,
disjoint from them, which reweighting trains on (`split="train"`). The labelled sets of
different seeds are disjoint, as the paper's: seed s draws from the training split less the
24-example sets of seeds 0..s-1 (so seeds 0..s are pairwise disjoint, for any s the split
holds; seed 0 is the draw parts always made). Test examples are a
label-balanced random sample that depends only on the task and split, never on the
demonstration seed, so every run of a task scores the same examples. Some test files are
sorted by label, so the first N rows would be a biased sample.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parts.data.tasks import Example, Task, Template, load_split
from parts.errors import PartsError

LABEL_BUDGET = 24
PROTOCOL_SEEDS = 5  # seeds 0-4: a seed's further examples leave the later ones of these their demonstrations


def _stable_seed(*parts: object) -> list[int]:
    """A numpy seed from strings and ints, identical across processes (unlike `hash`)."""
    return [zlib.crc32(str(p).encode()) for p in parts]


def balanced_sample(
    labels: Sequence[int], n: int, n_labels: int, rng: np.random.Generator, exclude: Collection[int] = (),
    cap: Sequence[int] | None = None,
) -> list[int]:
    """`n` indices with every class as equally represented as possible, in class round-robin.

    Classes take turns in a random order, each giving its next example from a shuffled list,
    so a smaller sample is always a prefix of a larger one drawn with the same generator state.
    `cap[c]`: class c gives more than `cap[c]` only once every class has given all it may (what it
    keeps back is for the demonstrations of later seeds).
    """
    excluded = set(exclude)
    pools = [
        [int(i) for i in rng.permutation(len(labels)) if labels[i] == c and i not in excluded]
        for c in range(n_labels)
    ]
    limits = [len(pool) for pool in pools] if cap is None else [max(0, int(limit)) for limit in cap]
    kept = [pool[limit:] for pool, limit in zip(pools, limits, strict=True)]
    chosen: list[int] = []
    order = [int(c) for c in rng.permutation(n_labels)]
    for turns in ([pool[:limit] for pool, limit in zip(pools, limits, strict=True)], kept):
        while len(chosen) < n and any(turns):
            for c in order:
                if turns[c] and len(chosen) < n:
                    chosen.append(turns[c].pop(0))
    return chosen


def sample_labeled_set(
    task: Task, train_labels: Sequence[int], shots: int, seed: int, n_train: int = 0
) -> tuple[list[int], list[int]]:
    """Demonstrations and `n_train` further labelled examples for one seed, disjoint, and disjoint from the
    labelled sets (`LABEL_BUDGET` examples each) of seeds 0..seed-1.

    Every class appears among the demonstrations and the last two have different labels.
    `shots` 0: no demonstrations, only the further examples.
    """
    if 0 < shots < task.n_labels:
        raise PartsError(
            f"{shots} shots cannot show all {task.n_labels} classes of {task.name}: "
            f"use --shots {task.n_labels} or more"
        )
    present = set(train_labels)
    absent = [task.label_names[c] for c in range(task.n_labels) if c not in present]
    if absent and shots:
        raise PartsError(
            f"the training split of {task.name} has no example of class(es) {', '.join(absent)}: "
            "demonstrations must cover every class; fix the data"
        )
    per_class = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=task.n_labels)
    if per_class.min() < shots // task.n_labels or len(train_labels) < shots + n_train:
        raise PartsError(
            f"the training split of {task.name} ({len(train_labels)} examples, per class "
            f"{per_class.tolist()}) cannot give {shots} balanced demonstrations and {n_train} "
            "further examples: lower --shots, or --limit (--split train) or --labels"
        )
    taken = _taken_before(task, train_labels, shots, seed)
    demos, train = _draw(task, train_labels, shots, seed, n_train, taken)
    if len(train) < n_train:
        raise _too_few(task, train_labels, shots, seed, n_train)
    return demos, train


def _draw(
    task: Task, labels: Sequence[int], shots: int, seed: int, n_train: int, taken: frozenset[int]
) -> tuple[list[int], list[int]]:
    """One seed's demonstrations and further examples, from the training split less `taken` (the labelled
    sets of seeds 0..seed-1). Seed 0 takes nothing out, so its draw is the one parts always made."""
    n_labels = task.n_labels
    if shots == 0 and seed == 0:  # the zero-shot draw parts always made for every seed, kept for seed 0
        rng = np.random.default_rng(_stable_seed(task.name, "train", "test-sample"))
        return [], balanced_sample(labels, n_train, n_labels, rng)
    rng = np.random.default_rng(_stable_seed(task.name, seed))
    left = np.bincount([c for i, c in enumerate(labels) if i not in taken], minlength=n_labels)
    short = [c for c in range(n_labels) if left[c] < shots // n_labels]
    if short:
        c = short[0]
        raise PartsError(
            f"class {task.label_names[c]} of {task.name} has {left[c]} training examples left beside the labelled "
            f"sets of {_seeds_below(seed)}: the {shots} demonstrations of seed {seed} need {shots // n_labels}; add "
            f"examples of {task.label_names[c]} to its train split, or use {_seeds_below(seed)} only"
        )
    demos = balanced_sample(labels, shots, n_labels, rng, exclude=taken) if shots else []
    # Shuffle until the last two demonstrations have different labels (the paper's rule).
    for _ in range(1000):
        if not shots:
            break
        demos = [demos[i] for i in rng.permutation(len(demos))]
        if len(demos) < 2 or labels[demos[-1]] != labels[demos[-2]]:
            break
    cap = None
    later = PROTOCOL_SEEDS - 1 - seed
    if seed > 0 and later > 0 and shots:  # a scarce class keeps what the later seeds' demonstrations need
        for i in demos:
            left[labels[i]] -= 1
        cap = [int(n) - later * -(-shots // n_labels) for n in left]
    train = balanced_sample(labels, n_train, n_labels, rng, exclude=taken | set(demos), cap=cap)
    return demos, train


_chains: dict[tuple[str, int, int, tuple[int, ...]], list[frozenset[int]]] = {}


def _taken_before(task: Task, labels: Sequence[int], shots: int, seed: int) -> frozenset[int]:
    """The union of the labelled sets of seeds 0..seed-1 (`LABEL_BUDGET` examples each), drawn in turn."""
    key = (task.name, task.n_labels, shots, tuple(labels))
    if key not in _chains and len(_chains) >= 32:
        _chains.clear()
    chain = _chains.setdefault(key, [frozenset()])  # chain[s]: the union for seed s
    while len(chain) <= seed:
        earlier = len(chain) - 1
        further = max(LABEL_BUDGET - shots, 0)
        demos, train = _draw(task, labels, shots, earlier, further, chain[earlier])
        if len(train) < further:
            raise _too_few(task, labels, shots, seed, 0, fits=earlier)
        chain.append(chain[earlier] | set(demos) | set(train))
    return chain[seed]


def _too_few(task: Task, labels: Sequence[int], shots: int, seed: int, n_train: int, fits: int | None = None
             ) -> PartsError:
    """The one-line error of a training split too small for seed `seed`'s disjoint labelled set."""
    per_class = np.bincount(np.asarray(labels, dtype=np.int64), minlength=task.n_labels).tolist()
    budget = max(LABEL_BUDGET, shots)
    need = seed * budget + shots + n_train
    fits = seed if fits is None else fits
    return PartsError(
        f"task {task.name} has {len(labels)} labelled training examples (per class {per_class}); seed {seed} needs "
        f"{need}: its own {shots + n_train} and the {budget} of {'' if seed == 1 else 'each of '}{_seeds_below(seed)}, all "
        f"disjoint "
        f"({PROTOCOL_SEEDS} seeds of {budget} need {PROTOCOL_SEEDS * budget}); add training examples, or use "
        f"{_seeds_below(fits)} only"
    )


def _seeds_below(seed: int) -> str:
    return "seed 0" if seed == 1 else f"seeds 0-{seed - 1}"


def sample_test(task: Task, labels: Sequence[int], split: str, limit: int | None) -> list[int]:
    """A label-balanced random sample of a split, the same for every run of the task."""
    if limit is None or limit >= len(labels):
        limit = len(labels)
    rng = np.random.default_rng(_stable_seed(task.name, split, "test-sample"))
    return balanced_sample(labels, limit, task.n_labels, rng)


def check_classes(task: Task, labels: Sequence[int], split: str, sample: Sequence[int]) -> None:
    """Test examples of one class only make every component that always answers that class score 100%.

    Data of one class is refused (no accuracy on it means anything); a sample that misses classes the data has
    (a --limit below the number of classes) is the user's choice, and is warned about."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=task.n_labels)
    per_label = ", ".join(f"{name} {int(n)}" for name, n in zip(task.label_names, counts, strict=True))
    if len(labels) and np.count_nonzero(counts) == 1:
        only = task.label_names[int(counts.argmax())]
        raise PartsError(
            f"the {split} split of {task.name} has {len(labels)} examples, all labelled {only} (per label: {per_label}):"
            f" every component that always answers {only} would score 100%; add examples of the other labels"
        )
    shown = {labels[i] for i in sample}
    if len(shown) < np.count_nonzero(counts):
        warnings.warn(f"the {len(sample)} {split} examples of {task.name} show {len(shown)} of its "
                      f"{np.count_nonzero(counts)} labels: a component that always answers one they show scores "
                      f"high by default; use --limit {np.count_nonzero(counts)} or more to show every label", stacklevel=3)


def render_prompt(template: Template, demonstrations: Sequence[Example], example: Example) -> str:
    """Demonstrations, each `{filled template}{label word}{template.separator}`, then the query,
    ending where its label goes (the authors' code: one newline after each demonstration)."""
    shown = "".join(template.render(d) + template.label_words[d["label"]] + template.separator for d in demonstrations)
    return shown + template.render(example)


def shuffle_last_two_differ(labels: Sequence[int], rng: np.random.Generator, tries: int = 1000) -> list[int]:
    """An order of `labels`' positions, reshuffled until the last two labels differ (the paper's rule
    against recency bias; the authors' code applies it to every demonstration set, 24-shot included).
    Left as the last shuffle when every label is the same."""
    order = [int(i) for i in rng.permutation(len(labels))]
    for _ in range(tries):
        if len(order) < 2 or labels[order[-1]] != labels[order[-2]] or len(set(labels)) < 2:
            break
        order = [int(i) for i in rng.permutation(len(labels))]
    return order


def many_shot_order(task: Task, seed: int, labels: Sequence[int]) -> list[int]:
    """The order in which the L labelled examples of a seed (k demonstrations, then the L - k others,
    as drawn) are shown in the L-shot ICL prompt: all L shuffled together, the last two of different
    labels, as the authors' code (never the drawing order, whose class rotation invites copying)."""
    rng = np.random.default_rng(_stable_seed(task.name, seed, "many-shot", len(labels)))
    return shuffle_last_two_differ(labels, rng)


def label_token_ids(tokenizer: Any, label_words: Sequence[str]) -> list[int]:
    """One token id per label word; a word that is not exactly one token is an error."""
    ids: list[int] = []
    for word in label_words:
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            pieces = [tokenizer.decode([t]) for t in tokens]
            raise PartsError(
                f"label word {word!r} is {len(tokens)} tokens {pieces} for this model's tokenizer: "
                "choose a label word that is a single token (try it with or without a leading space)"
            )
        ids.append(int(tokens[0]))
    if len(set(ids)) != len(ids):
        dupes = [w for w, i in zip(label_words, ids, strict=True) if ids.count(i) > 1]
        raise PartsError(f"label words {dupes} map to the same token: choose distinct label words")
    return ids


@dataclass(frozen=True)
class PromptSet:
    """The prompts of one run and where each came from: plain data, saved with the run."""

    task: str
    template: int
    seed: int
    shots: int
    split: str
    label_names: tuple[str, ...]
    label_words: tuple[str, ...]
    demonstrations: tuple[int, ...]  # indices into the training split
    example_indices: tuple[int, ...]  # indices into `split`
    prompts: tuple[str, ...]
    labels: tuple[int, ...]
    limit: int | None = None  # the examples asked for (None: all); more than the split holds gives all it holds

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def capped(self) -> bool:
        """Whether `limit` asked for more examples than the split holds (the run holds them all)."""
        return self.limit is not None and self.limit > len(self.prompts)


def build_prompts(
    task: Task,
    template: int = 1,
    seed: int = 0,
    shots: int | None = None,
    split: str = "test",
    limit: int | None = None,
    data_dir: str | Path | None = None,
) -> PromptSet:
    """The prompts of one run.

    `split="test"`: a balanced sample of `limit` test examples (all when None).
    `split="train"`: the seed's further labelled examples, disjoint from its demonstrations:
    `limit` of them, by default 24 - shots (the paper's 24-label budget).
    """
    if limit is not None and limit < 1:
        raise PartsError(f"--limit must be a positive number of examples, got {limit}")
    chosen_template = task.template(template)
    shots = task.default_shots if shots is None else shots
    if shots < 0:
        raise PartsError(f"--shots must be zero or more, got {shots}")
    train = load_split(task, "train", data_dir)
    if not train and (shots > 0 or split == "train"):
        raise PartsError(f"the train split of {task.name} is empty: demonstrations come from it; check the data directory")
    train_labels = [row["label"] for row in train]
    n_train = (LABEL_BUDGET - shots if limit is None else limit) if split == "train" else 0
    demos: list[int]
    further: list[int]
    demos, further = sample_labeled_set(task, train_labels, shots, seed, n_train) if shots or n_train else ([], [])
    if split == "train":
        rows, indices = train, further
    else:
        rows = load_split(task, split, data_dir)
        if not rows:
            raise PartsError(f"the {split} split of {task.name} is empty: check the data directory")
        indices = sample_test(task, [row["label"] for row in rows], split, limit)
        check_classes(task, [row["label"] for row in rows], split, indices)
        if limit is not None and limit > len(rows):
            warnings.warn(f"--limit {limit} is more than the {len(rows)} examples of the {split} split of {task.name}: "
                          f"the run holds all {len(rows)} (its summary records both)", stacklevel=2)
    demo_rows = [train[i] for i in demos]
    prompts = tuple(render_prompt(chosen_template, demo_rows, rows[i]) for i in indices)
    return PromptSet(
        task=task.name,
        template=template,
        seed=seed,
        shots=shots,
        split=split,
        label_names=task.label_names,
        label_words=chosen_template.label_words,
        demonstrations=tuple(demos),
        example_indices=tuple(indices),
        prompts=prompts,
        labels=tuple(rows[i]["label"] for i in indices),
        limit=limit,
    )
