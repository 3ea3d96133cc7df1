"""Benchmark: how long the command line takes to answer help and mistakes (issue 17: under a second).

    python benchmarks/bench_cli.py            # prints the table and appends it to benchmarks/results.md

Each case is a fresh `python -m parts ...` process (what a user waits for), timed wall-clock, median of
`--repeats` interleaved rounds; for comparison, a process that only imports torch, transformers and
TransformerLens, the cost these answers avoid.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
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
}
HEAVY = "import torch, transformers, transformer_lens"


def wall(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-save", action="store_true", help="print the table without appending it to results.md")
    args = parser.parse_args()
    commands = {name: [sys.executable, "-m", "parts", *argv] for name, argv in CASES.items()}
    commands["for comparison: import torch, transformers, transformer_lens"] = [sys.executable, "-c", HEAVY]
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeats):
        for name, command in commands.items():
            times[name].append(wall(command))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node()} ({platform.machine()}, "
        f"{os.cpu_count()} CPUs), Python {platform.python_version()}; load average {load}",
        "",
        f"benchmarks/bench_cli.py: wall time of a fresh `python -m parts ...` process, median (min-max) of "
        f"{args.repeats} interleaved rounds. The machine was shared with other engineers' tests and runs.",
        "",
        "| case | wall time (s) |",
        "|---|---|",
    ]
    for name, values in times.items():
        lines.append(f"| {name} | {statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f}) |")
    text = "\n".join(lines)
    print(text)
    if not args.no_save:
        append_results(text)


if __name__ == "__main__":
    main()
