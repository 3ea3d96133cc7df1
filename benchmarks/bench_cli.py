"""Benchmark: how long the command line takes to answer help and mistakes (issue 17: under a second).

    python benchmarks/bench_cli.py            # prints the table and appends it to benchmarks/results.md

Each case is a fresh `python -m parts ...` process (what a user waits for), timed wall-clock, median of
`--repeats` interleaved rounds; for comparison, a process that only imports torch, transformers and
TransformerLens, the cost these answers avoid (and torch alone, which an answer that asks torch pays).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_decompose import append_results  # noqa: E402

CASES = {
    "parts --help": ["--help"],
    "parts decompose --help": ["decompose", "--help"],
    "parts evaluate --help": ["evaluate", "--help"],
    "mistyped option (decompose --tempalte 2)": ["decompose", "--task", "sst2", "--out", "x", "--tempalte", "2"],
    "unknown task (decompose --task sts2)": ["decompose", "--task", "sts2", "--out", "x"],
    "unknown template (sweep --templates 9)": ["sweep", "--tasks", "sst2", "--templates", "9", "--out", "x"],
    "too few labels (evaluate --labels 4)": ["evaluate", "--tasks", "sst2", "--labels", "4", "--out", "x"],
    "bad pair (transfer --pairs sst2-yelp)": ["transfer", "--pairs", "sst2-yelp", "--out", "x"],
    "device not here (decompose --device cuda, CPU-only torch)": ["decompose", "--task", "sst2", "--out", "x",
                                                                  "--device", "cuda"],
    "unknown device (decompose --device gpu)": ["decompose", "--task", "sst2", "--out", "x", "--device", "gpu"],
    "no such folder (analyze NO_SUCH_FOLDER)": ["analyze", "NO_SUCH_FOLDER"],
    "no such folder (report NO_SUCH_FOLDER --out x)": ["report", "NO_SUCH_FOLDER", "--out", "x"],
    # Issue 28 section 3: user tasks written by `user_tasks` into a temporary folder (TASKS), the embedded model's
    # tokenizer read from its converted copy in the cache.
    "label word of 5 tokens (decompose, user task)": ["decompose", "--task", "TASKS/longword.json", "--out", "x"],
    "label word of 5 tokens (sweep, user task)": ["sweep", "--tasks", "TASKS/longword.json", "--templates", "1",
                                                  "--out", "x"],
    "template field the data lacks (evaluate, user task)": ["evaluate", "--tasks", "TASKS/nofield.json",
                                                            "--templates", "1", "--out", "x"],
    "test split of one class (sweep, user task)": ["sweep", "--tasks", "TASKS/oneclass.json", "--templates", "1",
                                                   "--out", "x"],
    "no data folder, offline (decompose --task sst2, PARTS_DATA_DIR unset)": ["decompose", "--task", "sst2", "--out", "x"],
}
WITHOUT_DATA_DIR = {"no data folder, offline (decompose --task sst2, PARTS_DATA_DIR unset)"}
HEAVY = "import torch, transformers, transformer_lens"


def user_tasks(folder: Path) -> None:
    """Task files with one mistake each (and their data) in `folder`."""
    rows = {"train": [0, 1] * 10, "test": [0, 1] * 5, "oneclass": [1] * 10}
    for name, labels in rows.items():
        text = "".join(json.dumps({"text": f"a film {i}", "label": label}) + "\n" for i, label in enumerate(labels))
        (folder / f"{name}.jsonl").write_text(text)
    (folder / "one").mkdir()
    (folder / "one" / "train.jsonl").write_text((folder / "train.jsonl").read_text())
    (folder / "one" / "test.jsonl").write_text((folder / "oneclass.jsonl").read_text())
    tasks = {"longword": (".", "Review: {text}\nSentiment:", [" negative", " unfavourably"]),
             "nofield": (".", "Review: {txt}\nSentiment:", [" negative", " positive"]),
             "oneclass": ("one", "Review: {text}\nSentiment:", [" negative", " positive"])}
    for name, (data, template, words) in tasks.items():
        spec = {"name": name, "data_dir": data, "template": template, "label_words": words}
        (folder / f"{name}.json").write_text(json.dumps(spec))


def wall(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    """(seconds, what it answered: the exit status and its last line on stderr, shortened) of one fresh process."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    seconds = time.perf_counter() - start
    last = (done.stderr.strip().splitlines() or [""])[-1].replace("|", "/")
    return seconds, f"{done.returncode}" + (f": {last[:90]}{'...' if len(last) > 90 else ''}" if done.returncode else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-save", action="store_true", help="print the table without appending it to results.md")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    user_tasks(folder)
    commands = {name: [sys.executable, "-m", "parts", *(a.replace("TASKS", str(folder)) for a in argv)]
                for name, argv in CASES.items()}
    commands["for comparison: import torch"] = [sys.executable, "-c", "import torch"]
    commands["for comparison: import torch, transformers, transformer_lens"] = [sys.executable, "-c", HEAVY]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bare = {k: v for k, v in env.items() if k != "PARTS_DATA_DIR"} | {"HF_HOME": str(folder / "hf")}
    times: dict[str, list[float]] = {name: [] for name in commands}
    answers: dict[str, set[str]] = {name: set() for name in commands}
    for _ in range(args.repeats):
        for name, command in commands.items():
            seconds, answer = wall(command, bare if name in WITHOUT_DATA_DIR else env)
            times[name].append(seconds)
            answers[name].add(answer.replace(str(folder), "TASKS"))  # no machine paths in results.md
    shutil.rmtree(folder)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node()} ({platform.machine()}, "
        f"{os.cpu_count()} CPUs), Python {platform.python_version()}; load average {load}",
        "",
        f"benchmarks/bench_cli.py: wall time of a fresh `python -m parts ...` process, median (min-max) of "
        f"{args.repeats} interleaved rounds. The machine was shared with other engineers' tests and runs.",
        "",
        "| case | wall time (s) | exit status: answer |",
        "|---|---|---|",
    ]
    for name, values in times.items():
        lines.append(f"| {name} | {statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f}) | "
                     f"{' / '.join(f'`{a}`' for a in sorted(answers[name]))} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_save:
        append_results(text)


if __name__ == "__main__":
    main()
