"""Tasks: labelled examples, their templates and label words.

A task is a list of label names, the fields an example has, and numbered templates. A template
is a format string over an example's fields that ends where the label word goes, plus one label
word per class, written exactly as appended to the prompt (leading space included).

The paper's eight tasks (sst2, boolq, qqp, wic, rte, mnli, agnews, arc) each have templates
1-3 and a template 4 that is a minimal perturbation of one of them (after the paper's Table 9),
for the template-robustness analysis. Data come from a data directory laid out as
`<dir>/<task>/{train,test}.jsonl` (`--data-dir` or `PARTS_DATA_DIR`) or, when none is set,
from the Hugging Face hub with the same splits. A user's own task is a JSON file with keys
`name`, `data_dir`, `template`, `label_words` (and optionally `label_names`, `separator`).
"""

from __future__ import annotations

import json
import os
import socket
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from parts import io
from parts.errors import PartsError

Example = dict[str, Any]
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Template:
    """A prompt format: `text.format(**example)` followed by one of `label_words`.

    `separator` ends every demonstration (`{filled template}{label word}{separator}`), so the
    query follows the last one directly. The paper's tasks use one newline, as the authors' code.
    """

    text: str
    label_words: tuple[str, ...]
    note: str = ""
    separator: str = "\n"

    @property
    def fields(self) -> list[str]:
        """The example fields the template reads (`choices[0]` reads `choices`)."""
        names = [f for _, f, _, _ in string.Formatter().parse(self.text) if f]
        return sorted({n.split("[")[0].split(".")[0] for n in names})

    def render(self, example: Example) -> str:
        return self.text.format(**example)


@dataclass(frozen=True)
class Task:
    """A classification task: its label names, its templates by number, and its default number of shots."""

    name: str
    label_names: tuple[str, ...]
    templates: dict[int, Template]
    default_shots: int = 4
    data_dir: Path | None = None  # set for user tasks: the folder holding train/test.jsonl
    perturbed: dict[int, int] = field(default_factory=dict)  # template -> the one it perturbs

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    def template(self, number: int) -> Template:
        if number not in self.templates:
            raise PartsError(
                f"task {self.name!r} has no template {number}: choose one of "
                f"{', '.join(map(str, sorted(self.templates)))}"
            )
        return self.templates[number]


def _paper_tasks() -> dict[str, Task]:
    """Templates in the style of PromptSource (as the paper), label words single tokens in
    common BPE vocabularies; template 4 is the minimally contrastive twin of the template in
    `perturbed`, following the paper's Table 9 where it gives one."""
    no_yes = (" No", " Yes")
    tasks = [
        Task(
            "sst2",
            ("negative", "positive"),
            {
                1: Template("Review: {text}\nSentiment:", (" negative", " positive")),
                2: Template(
                    "Review: {text}\nDo you think the review is positive or negative?",
                    (" negative", " positive"),
                ),
                3: Template("{text}\nIs this sentence good or bad? Answer:", (" bad", " good")),
                4: Template(
                    "Review: {text} \nDo you think the review is positive or negative?",
                    (" negative", " positive"),
                    "template 2 with a space before the newline (paper Table 9)",
                ),
            },
            perturbed={4: 2},
        ),
        Task(
            "boolq",
            ("no", "yes"),
            {
                1: Template("{passage}\nQuestion: {question}?\nAnswer:", (" no", " yes")),
                2: Template("Based on the following passage, {question}? {passage}\nAnswer:", no_yes),
                3: Template(
                    "Passage: {passage}\nAfter reading this passage, I have a question: "
                    "{question}? True or False?\nAnswer:",
                    (" False", " True"),
                ),
                4: Template(
                    "Based on the following passage, {question}? {passage} Answer:",
                    no_yes,
                    "template 2 with ' Answer:' for '\\nAnswer:' (paper Table 9)",
                ),
            },
            perturbed={4: 2},
        ),
        Task(
            "qqp",
            ("not_duplicate", "duplicate"),
            {
                1: Template(
                    'Are the questions "{question1}" and "{question2}" asking the same thing?',
                    (" no", " yes"),
                ),
                2: Template(
                    "Question 1: {question1}\nQuestion 2: {question2}\n"
                    "Do these two questions have the same meaning?",
                    no_yes,
                ),
                3: Template(
                    'I can merge questions on Quora if they ask the same thing. One asks "{question1}" '
                    'and another asks "{question2}". Can I merge them? Answer:',
                    (" false", " true"),
                ),
                4: Template(
                    'Are the questions "{question1}" and "{question2}" asking the same thing?',
                    no_yes,
                    "template 1 with No/Yes for no/yes (paper Table 9)",
                ),
            },
            perturbed={4: 1},
        ),
        Task(
            "wic",
            ("false", "true"),
            {
                1: Template(
                    "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nQuestion: Is the word "
                    "'{word}' used in the same way in the two sentences above?\nAnswer:",
                    no_yes,
                ),
                2: Template(
                    'Does the word "{word}" have the same meaning in these two sentences? '
                    "Yes, No?\n{sentence1}\n{sentence2}\nAnswer:",
                    no_yes,
                ),
                3: Template(
                    "{sentence1}\n{sentence2}\nQuestion: Is the word '{word}' used with the same "
                    "meaning in both sentences? True or False?\nAnswer:",
                    (" False", " True"),
                ),
                4: Template(
                    "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nQuestion: Is the word "
                    "'{word}' used in the same way in the two sentences above? Answer:",
                    no_yes,
                    "template 1 with ' Answer:' for '\\nAnswer:'",
                ),
            },
            perturbed={4: 1},
        ),
        Task(
            "rte",
            ("entailment", "not_entailment"),
            {
                1: Template(
                    '{premise}\nQuestion: Does this imply that "{hypothesis}"? Yes or No?\nAnswer:',
                    (" Yes", " No"),
                ),
                2: Template("{premise}\nQuestion: {hypothesis} True or False?\nAnswer:", (" True", " False")),
                3: Template(
                    'Given that "{premise}" Does it follow that "{hypothesis}" Yes or no?',
                    (" yes", " no"),
                ),
                4: Template(
                    '{premise}\nQuestion: Does this imply that "{hypothesis}"? Yes or No? Answer:',
                    (" Yes", " No"),
                    "template 1 with ' Answer:' for '\\nAnswer:'",
                ),
            },
            perturbed={4: 1},
        ),
        Task(
            "mnli",
            ("entailment", "neutral", "contradiction"),
            {
                1: Template(
                    "{premise}\nQuestion: {hypothesis} True, False, or Neither?\nAnswer:",
                    (" True", " Neither", " False"),
                ),
                2: Template(
                    "Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the "
                    "hypothesis? Yes, No, or Maybe?\nAnswer:",
                    (" Yes", " Maybe", " No"),
                ),
                3: Template(
                    'Suppose "{premise}" Can we infer that "{hypothesis}"? Yes, no, or maybe?',
                    (" yes", " maybe", " no"),
                ),
                4: Template(
                    "{premise}\nQuestion: {hypothesis} True, False, or Neither? Answer:",
                    (" True", " Neither", " False"),
                    "template 1 with ' Answer:' for '\\nAnswer:'",
                ),
            },
            default_shots=3,
            perturbed={4: 1},
        ),
        Task(
            "agnews",
            ("World", "Sports", "Business", "Sci/Tech"),
            {
                1: Template(
                    "{text}\nIs this a piece of news regarding World, Sports, Business, or Technology?",
                    (" World", " Sports", " Business", " Technology"),
                ),
                2: Template("Article: {text}\nTopic:", (" World", " Sports", " Business", " Science")),
                3: Template(
                    "What label best describes this news article?\n{text}\nAnswer:",
                    (" world", " sports", " business", " science"),
                ),
                4: Template(
                    "{text} Is this a piece of news regarding World, Sports, Business, or Technology?",
                    (" World", " Sports", " Business", " Technology"),
                    "template 1 with a space for the newline (paper Table 9)",
                ),
            },
            perturbed={4: 1},
        ),
        Task(
            "arc",
            ("A", "B", "C", "D"),
            {
                1: Template(
                    "Question: {question}\nA. {choices[0]}\nB. {choices[1]}\nC. {choices[2]}\n"
                    "D. {choices[3]}\nAnswer:",
                    (" A", " B", " C", " D"),
                ),
                2: Template(
                    "{question}\nChoices:\nA: {choices[0]}\nB: {choices[1]}\nC: {choices[2]}\n"
                    "D: {choices[3]}\nThe correct choice is",
                    (" A", " B", " C", " D"),
                ),
                3: Template(
                    "Pick the most correct option to answer the following question.\n{question}\n"
                    "Options:\n- A: {choices[0]}\n- B: {choices[1]}\n- C: {choices[2]}\n"
                    "- D: {choices[3]}\nAnswer:",
                    (" A", " B", " C", " D"),
                ),
                4: Template(
                    "Question: {question}\nA. {choices[0]}\nB. {choices[1]}\nC. {choices[2]}\n"
                    "D. {choices[3]} Answer:",
                    (" A", " B", " C", " D"),
                    "template 1 with ' Answer:' for '\\nAnswer:'",
                ),
            },
            perturbed={4: 1},
        ),
    ]
    return {task.name: task for task in tasks}


PAPER_TASKS = _paper_tasks()
PAPER_TASK_NAMES = tuple(PAPER_TASKS)

# Further tasks in the data directory, for transfer and for users: (label names, template 1).
_EXTRA_TASKS: dict[str, tuple[str, Template]] = {
    "yelp": ("sst2", PAPER_TASKS["sst2"].templates[1]),
    "boolq_contrast": ("boolq", PAPER_TASKS["boolq"].templates[1]),
    "mr": ("sst2", PAPER_TASKS["sst2"].templates[1]),
    "arc_challenge": ("arc", PAPER_TASKS["arc"].templates[1]),
    "cb": ("mnli", PAPER_TASKS["mnli"].templates[1]),
}


def _extra_task(name: str) -> Task:
    """Out-of-distribution twins borrow their source task's templates (same label words)."""
    source = PAPER_TASKS[_EXTRA_TASKS[name][0]]
    label_names = source.label_names
    if name == "cb":  # CB orders its labels entailment, contradiction, neutral
        label_names = ("entailment", "contradiction", "neutral")
        reorder = (0, 2, 1)
        templates = {
            n: Template(t.text, tuple(t.label_words[i] for i in reorder), t.note)
            for n, t in source.templates.items()
        }
        return Task(name, label_names, templates, source.default_shots, perturbed=dict(source.perturbed))
    return Task(name, label_names, dict(source.templates), source.default_shots, perturbed=dict(source.perturbed))


def data_dir_from_env(data_dir: str | Path | None = None) -> Path | None:
    """The data directory: the argument, else `PARTS_DATA_DIR`, else None (the hub)."""
    chosen = data_dir if data_dir not in (None, "") else os.environ.get("PARTS_DATA_DIR") or None
    if chosen is None:
        return None
    return io.existing_folder(chosen, "data directory", "fix --data-dir or PARTS_DATA_DIR")


def reads_local_data(task: Task, data_dir: str | Path | None = None) -> bool:
    """Whether the task's examples come from files here (its own data_dir, --data-dir or PARTS_DATA_DIR), not the hub."""
    return task.data_dir is not None or data_dir_from_env(data_dir) is not None


def get_task(name_or_file: str | Path) -> Task:
    """A paper task by name, a further task of the data directory, or a user task JSON file."""
    key = str(name_or_file)
    if key in PAPER_TASKS:
        return PAPER_TASKS[key]
    if key in _EXTRA_TASKS:
        return _extra_task(key)
    if key.endswith(".json") or Path(key).is_file():
        return load_user_task(Path(key))
    known = ", ".join(list(PAPER_TASKS) + list(_EXTRA_TASKS))
    raise PartsError(f"unknown task {key!r}: use one of {known}, or a task JSON file (docs/guide/own-task.md)")


def check_tasks(names: Sequence[str | Path], templates: Sequence[int] = (), shots: int | None = None,
                labels: Sequence[int] = ()) -> list[Task]:
    """The named tasks, each checked to have every template and, for each label budget, examples to train on
    beside its demonstrations. Commands call this first (it imports no torch), so a mistyped task or template
    is reported at once, not after loading a model."""
    tasks = [get_task(name) for name in names]
    for task in tasks:
        for template in templates:
            task.template(template)  # names the task and the template that does not exist
        k = task.default_shots if shots is None else shots
        for budget in labels:
            if budget <= k:
                raise PartsError(f"--labels {budget} leaves no training examples beside the {k} demonstrations of "
                                 f"{task.name}: use more than {k}")
    return tasks


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """'sst2:yelp,boolq:boolq_contrast' -> [("sst2", "yelp"), ("boolq", "boolq_contrast")] (transfer pairs)."""
    pairs = []
    for piece in text.split(","):
        source, sep, target = piece.strip().partition(":")
        if not sep or not source or not target:
            raise PartsError(f"transfer pair {piece.strip()!r} is not SOURCE:TARGET (e.g. sst2:yelp)")
        pairs.append((source, target))
    return pairs


def load_user_task(path: Path) -> Task:
    """A user task: {"name", "data_dir", "template", "label_words"[, "label_names", "separator", ...]}."""
    if not path.is_file():
        raise PartsError(f"task file {path} does not exist")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PartsError(f"task file {path} is not valid JSON: {err}") from err
    missing = [k for k in ("name", "data_dir", "template", "label_words") if k not in spec]
    if missing:
        raise PartsError(f"task file {path} lacks {', '.join(missing)}: see docs/guide/own-task.md")
    words = spec["label_words"]
    if not isinstance(words, list) or len(words) < 2 or not all(isinstance(w, str) for w in words):
        raise PartsError(f"task file {path}: label_words must be a list of at least two strings")
    names = spec.get("label_names", [w.strip() for w in words])
    if len(names) != len(words):
        raise PartsError(f"task file {path}: label_names and label_words differ in length")
    if str(spec["name"]) in PAPER_TASKS or str(spec["name"]) in _EXTRA_TASKS:
        raise PartsError(f"task file {path} is named {spec['name']!r}, the name of a built-in task: rename it "
                         "(its runs and results would be filed with the built-in task's)")
    data_dir = (path.parent / spec["data_dir"]).resolve()
    separator = spec.get("separator", "\n")
    if not isinstance(separator, str):
        raise PartsError(f"task file {path}: separator must be a string (what ends each demonstration), got {separator!r}")
    texts = {1: spec["template"], **(spec.get("templates") or {})}
    templates: dict[int, Template] = {}
    for number, text in texts.items():
        if not str(number).isdigit() or not isinstance(text, str):
            raise PartsError(f"task file {path}: templates must map numbers to strings, got {number!r}: {text!r}")
        templates[int(number)] = _checked_template(path, text, tuple(words), separator)
    shots = spec.get("shots", 4 if len(words) != 3 else 3)
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
        raise PartsError(f"task file {path}: shots must be a whole number of demonstrations, got {shots!r}")
    return Task(str(spec["name"]), tuple(names), templates, shots, data_dir=data_dir)


def _checked_template(path: Path, text: str, words: tuple[str, ...], separator: str = "\n") -> Template:
    """A template whose format string parses (an unmatched brace is an error here, not mid-run)."""
    template = Template(text, words, separator=separator)
    try:
        template.fields  # noqa: B018 - parsing is the check
    except ValueError as err:
        raise PartsError(
            f"task file {path}: template {text!r} is not a valid format string ({err}); write a literal brace as {{{{ or }}}}"
        ) from err
    return template


def _read_jsonl(path: Path, task: Task) -> list[Example]:
    rows: list[Example] = []
    with path.open() as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PartsError(f"{path}:{line_number} is not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise PartsError(
                    f"{path}:{line_number} is a JSON {type(row).__name__}: each line must be an object with "
                    'the fields the templates use and an integer "label"'
                )
            label = row.get("label")
            if not isinstance(label, int) or isinstance(label, bool):
                raise PartsError(
                    f"{path}:{line_number}: label must be an integer index into "
                    f"{list(task.label_names)}, got {label!r}"
                )
            if not 0 <= label < task.n_labels:
                raise PartsError(
                    f"{path}:{line_number}: label {label} is out of range for "
                    f"{task.n_labels} labels {list(task.label_names)}"
                )
            rows.append(row)
    return rows


def load_split(task: Task, split: str, data_dir: str | Path | None = None) -> list[Example]:
    """The examples of one split, each a dict of fields plus an integer `label`."""
    if split not in SPLITS:
        raise PartsError(f"unknown split {split!r}: use train or test")
    if task.data_dir is not None:
        folder = task.data_dir
    else:
        root = data_dir_from_env(data_dir)
        if root is None:
            return _load_from_hub(task, split)
        folder = root / task.name
    path = folder / f"{split}.jsonl"
    if not path.is_file() and task.data_dir is not None:  # --data-dir plays no part for a user task
        raise PartsError(
            f"{path} not found: task {task.name!r} reads its examples from {folder}, the \"data_dir\" of its task "
            f"JSON file (relative to that file); fix \"data_dir\" there so it names a folder holding {split}.jsonl"
        )
    if not path.is_file():
        raise PartsError(
            f"{path} not found: the data directory must hold <task>/{split}.jsonl "
            "(docs/guide/own-task.md); fix --data-dir or PARTS_DATA_DIR"
        )
    rows = _read_jsonl(path, task)
    needed = {f for t in task.templates.values() for f in t.fields}
    for line_number, row in enumerate(rows, 1):
        absent = needed - set(row)
        if absent:
            raise PartsError(
                f"{path}: example {line_number} lacks field(s) {', '.join(sorted(absent))} "
                f"that the templates of {task.name!r} use"
            )
    return rows


# The Hugging Face datasets with the splits of the data directory (GLUE/SuperGLUE: validation
# is the test split). Field names are mapped to the data directory's.
_HUB: dict[str, tuple[str, str | None, dict[str, str]]] = {
    "sst2": ("nyu-mll/glue", "sst2", {"sentence": "text"}),
    "boolq": ("google/boolq", None, {}),
    "qqp": ("nyu-mll/glue", "qqp", {}),
    "wic": ("aps/super_glue", "wic", {}),
    "rte": ("aps/super_glue", "rte", {}),
    "mnli": ("nyu-mll/glue", "mnli", {}),
    "agnews": ("fancyzhx/ag_news", None, {}),
    "arc": ("allenai/ai2_arc", "ARC-Easy", {}),
}


def hub_source(task: Task, split: str) -> str:
    """Where the hub serves a task's split from ("nyu-mll/glue sst2 train"), or "none"."""
    if task.name not in _HUB:
        return "none"
    repo, config, _ = _HUB[task.name]
    return " ".join(part for part in (repo, config, split) if part)


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached from here, decided at once (None: it may be reached).

    Offline mode is read as `datasets` reads it (HF_DATASETS_OFFLINE, else HF_HUB_OFFLINE). Otherwise one TCP
    connection to the hub's host, a few seconds at most, stands in for the half minute of retries `datasets`
    spends before it gives up; behind a proxy that connection proves nothing, so nothing is decided there."""
    from huggingface_hub import constants

    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        value = os.environ.get(variable)
        if value is not None:
            if value.strip().upper() in {"1", "ON", "YES", "TRUE"}:
                return f"{variable} is set"
            break
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlsplit(constants.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as err:
        return f"{host} cannot be reached ({err.strerror or type(err).__name__})"
    return None


def check_hub_data(task: Task) -> None:
    """A task read from the hub (no data directory set) fails at once, with what to set, when the hub cannot be
    reached and its dataset is not in the Hugging Face caches; otherwise `datasets` is left to read it."""
    if task.name not in _HUB:
        raise PartsError(f"task {task.name!r} has no hub source: set --data-dir or PARTS_DATA_DIR to a folder holding "
                         f"{task.name}/train.jsonl and {task.name}/test.jsonl")
    from huggingface_hub import constants

    repo = _HUB[task.name][0]
    org, _, name = repo.partition("/")
    cached = [Path(constants.HF_HUB_CACHE) / f"datasets--{org}--{name}",
              Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets")) / f"{org}___{name}"]
    if any(folder.is_dir() for folder in cached):
        return
    why = _hub_unreachable()
    if why is not None:
        raise PartsError(
            f"no data directory is set and {task.name} must come from the Hugging Face hub, but {why} and {repo} is "
            f"not in its cache: pass --data-dir FOLDER or set PARTS_DATA_DIR=FOLDER, a folder holding "
            f"{task.name}/train.jsonl and {task.name}/test.jsonl"
        )


def _load_from_hub(task: Task, split: str) -> list[Example]:
    check_hub_data(task)  # before `datasets` is imported (seconds) and retries the hub (half a minute)
    try:
        import datasets
    except ImportError as err:
        raise PartsError(
            "no data directory set (--data-dir or PARTS_DATA_DIR) and the `datasets` package "
            "is missing: `pip install datasets` to read tasks from the Hugging Face hub"
        ) from err
    repo, config, renames = _HUB[task.name]
    hub_split = {"train": "train", "test": "test" if task.name == "agnews" else "validation"}[split]
    if task.name == "mnli" and split == "test":
        hub_split = "validation_matched"
    try:
        rows = datasets.load_dataset(repo, config, split=hub_split)
    except Exception as err:  # noqa: BLE001 - the hub raises many kinds; all mean "unreachable"
        raise PartsError(
            f"cannot read {task.name} from the hub ({err}): set --data-dir or PARTS_DATA_DIR"
        ) from err
    out = []
    for row in rows:
        row = {renames.get(k, k): v for k, v in row.items()}
        if task.name == "boolq":
            row["label"] = int(row.pop("answer"))
        if task.name == "arc":
            if len(row["choices"]["text"]) != 4:
                continue
            key = str(row.pop("answerKey"))
            if key not in ("A", "B", "C", "D"):
                continue
            row["label"] = "ABCD".index(key)
            row["choices"] = row["choices"]["text"]
        out.append(row)
    return out
