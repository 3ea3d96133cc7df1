"""Token lengths of the paper's main-table protocol, so a benchmark can run prompts of the real lengths
without the data, the tokenizer or any weights (e.g. on a GPU machine with nothing else installed).

    python benchmarks/protocol_lengths.py            # rebuild benchmarks/protocol-lengths.json from the data

For every main-table task the file holds, with the embedded model's tokenizer (SmolLM2, 49,152 tokens;
Llama-2's SentencePiece tokenizer gives somewhat more tokens for the same text):

- per template, the suffix length of each test example in parts' balanced sample order (up to 2,000:
  a run at `--limit n` scores the first n), i.e. the query after the demonstrations;
- per (template, seed), the token length of each of the k demonstrations and of each of the L = 24
  labelled examples in their L-shot order (each with its label word and the template's separator),
  the suffix lengths of the L - k training queries, and the lengths of the content-free prompts.

A prompt's length is then its prefix (BOS + demonstrations) plus its suffix. Lengths are per piece, so
they are exact up to a token at each boundary where BPE merges across the separator. Left truncation of
the L-shot prompts to a context window (whole leading demonstrations dropped, as `parts evaluate` does)
is applied by `Protocol.passes` for the context window asked for.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's parts, not an installed one
LENGTHS_FILE = Path(__file__).with_name("protocol-lengths.json")
MAIN_TASKS = ("sst2", "boolq", "qqp", "wic", "rte", "mnli", "agnews", "arc")
TEMPLATES = (1, 2, 3)
SEEDS = (0, 1, 2, 3, 4)
MAX_TEST = 2000
STAGES = ("test", "train", "content-free", "many-shot")


@dataclass(frozen=True)
class Pass:
    """One prompt set run through the model: a shared prefix and each prompt's own suffix (in tokens)."""

    stage: str  # one of STAGES
    task: str
    prefix: int
    suffixes: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return self.prefix + sum(self.suffixes)


class Protocol:
    """The committed lengths, and the prompt sets of any setting at any test size and context window."""

    def __init__(self, data: dict[str, Any]):
        self.data = data
        self.bos = int(data["bos_tokens"])

    @classmethod
    def load(cls, path: Path = LENGTHS_FILE) -> Protocol:
        return cls(json.loads(path.read_text()))

    def settings(self, tasks: tuple[str, ...] = MAIN_TASKS, templates: tuple[int, ...] = TEMPLATES,
                 seeds: tuple[int, ...] = SEEDS) -> list[tuple[str, int, int]]:
        return [(t, tp, s) for s in seeds for tp in templates for t in tasks]

    def passes(self, task: str, template: int, seed: int, n_test: int, n_ctx: int) -> list[Pass]:
        """The four prompt sets of one setting of `parts evaluate` (test, train, content-free, L-shot)."""
        per_template = self.data["tasks"][task]["templates"][str(template)]
        setting = per_template["seeds"][str(seed)]
        test = tuple(per_template["test_suffixes"][:n_test])
        k_prefix = self.bos + sum(setting["demonstrations"])
        passes = [Pass("test", task, k_prefix, test), Pass("train", task, k_prefix, tuple(setting["train_suffixes"]))]
        # The content-free prompts share the k demonstrations too: prefix reused, the rest is theirs.
        content_free = tuple(max(1, n - k_prefix) for n in setting["content_free"])
        passes.append(Pass("content-free", task, k_prefix, content_free))
        many = setting["many_shot"]
        dropped = 0  # whole leading demonstrations dropped until the longest prompt fits
        while dropped < len(many) and self.bos + sum(many[dropped:]) + max(test) > n_ctx:
            dropped += 1
        passes.append(Pass("many-shot", task, self.bos + sum(many[dropped:]), test))
        return passes


def build(data_dir: str | None) -> dict[str, Any]:
    """Measure every length with parts' own prompt builders and the embedded tokenizer."""
    from transformers import AutoTokenizer

    from parts.data.prompts import (
        LABEL_BUDGET,
        many_shot_order,
        sample_labeled_set,
        sample_test,
    )
    from parts.data.tasks import get_task, load_split
    from parts.model.loading import _embedded_checkpoint
    from parts.reweighting.calibration import content_free_prompts

    tokenizer = AutoTokenizer.from_pretrained(_embedded_checkpoint())
    bos = len(tokenizer("")["input_ids"])

    def lengths(texts: list[str], special: bool = False) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]

    tasks: dict[str, Any] = {}
    for name in MAIN_TASKS:
        task = get_task(name)
        train = load_split(task, "train", data_dir)
        test = load_split(task, "test", data_dir)
        test_order = sample_test(task, [r["label"] for r in test], "test", MAX_TEST)
        per_template: dict[str, Any] = {}
        for template_id in TEMPLATES:
            template = task.template(template_id)
            queries = [template.render(test[i]) for i in test_order]
            seeds: dict[str, Any] = {}
            for seed in SEEDS:
                k = task.default_shots
                demos, further = sample_labeled_set(task, [r["label"] for r in train], k, seed, LABEL_BUDGET - k)
                shown = [train[i] for i in demos]
                drawn = shown + [train[i] for i in further]
                ordered = [drawn[i] for i in many_shot_order(task, seed, [d["label"] for d in drawn])]

                def pieces(examples: list[dict[str, Any]], template: Any = template) -> list[int]:
                    return lengths([template.render(d) + template.label_words[d["label"]] + template.separator
                                    for d in examples])

                seeds[str(seed)] = {
                    "demonstrations": pieces(shown),
                    "many_shot": pieces(ordered),
                    "train_suffixes": lengths([template.render(train[i]) for i in further]),
                    "content_free": lengths(content_free_prompts(template, shown), special=True),
                }
            per_template[str(template_id)] = {"test_suffixes": lengths(queries), "seeds": seeds}
        tasks[name] = {"shots": task.default_shots, "labels": task.n_labels, "n_test_available": len(test),
                       "templates": per_template}
    return {"tokenizer": "SmolLM2-135M-Instruct (embedded)", "bos_tokens": bos, "label_budget": LABEL_BUDGET,
            "tasks": tasks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="default: $PARTS_DATA_DIR")
    parser.add_argument("--out", type=Path, default=LENGTHS_FILE)
    args = parser.parse_args()
    args.out.write_text(json.dumps(build(args.data_dir), separators=(",", ":")) + "\n")
    protocol = Protocol.load(args.out)
    for n, n_ctx in ((200, 2048), (2000, 4096)):
        totals = {s: 0 for s in STAGES}
        for setting in protocol.settings():
            for p in protocol.passes(*setting, n_test=n, n_ctx=n_ctx):
                totals[p.stage] += p.tokens
        print(f"n={n}, context {n_ctx}: tokens per stage over 120 settings {totals}")


if __name__ == "__main__":
    main()
