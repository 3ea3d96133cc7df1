"""How long `parts report` takes and how large the report is, for issue 16's 40-run sweep.

By default it writes a synthetic sweep in `parts sweep`'s layout with the embedded model's shape (30 layers x
9 heads + 30 MLPs = 300 components): sst2 (2 labels) and agnews (4 labels) x templates 1-4 x seeds 0-4, 200
test examples per run, component logits drawn at random around a per-component skill and label bias. A
report's time and size depend on these shapes, not on the numbers, and the sweep takes seconds instead of
CPU-hours. `--runs DIR` times the report of a real sweep instead. The report is built without --attention.

    python benchmarks/bench_report.py                      # synthetic 2 x 4 x 5 sweep, n = 200
    python benchmarks/bench_report.py --runs runs/         # an existing sweep

It prints the time and size and appends a row to benchmarks/results.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from parts.data.prompts import PromptSet
from parts.data.tasks import get_task
from parts.decomposition.runs import DecompositionRun
from parts.experiments.runner import run_dir
from parts.report.site import build_report

RESULTS = Path(__file__).with_name("results.md")
N_LAYERS, N_HEADS = 30, 9  # the embedded SmolLM2-135M-Instruct


def synthetic_run(task_name: str, template: int, seed: int, n: int) -> DecompositionRun:
    """A run of the embedded model's shape whose component logits are random but structured: each component
    has a skill (how much it favours the gold label) and a bias towards some label."""
    task = get_task(task_name)
    n_labels = len(task.label_names)
    generator = torch.Generator().manual_seed(1000 * template + seed + (0 if task_name == "sst2" else 10_000))
    labels = torch.arange(n) % n_labels
    names = [f"L{layer}H{head}" for layer in range(N_LAYERS) for head in range(N_HEADS)] + [
        f"MLP{layer}" for layer in range(N_LAYERS)]
    skill = torch.randn(len(names), generator=generator).clamp(min=0) * 0.8
    bias = torch.randn(len(names), n_labels, generator=generator) * 1.5
    noise = torch.randn(n, len(names), n_labels, generator=generator)
    gold = torch.nn.functional.one_hot(labels, n_labels).float()
    logits = noise + bias + skill[None, :, None] * gold[:, None, :]
    prompts = PromptSet(
        task=task.name, template=template, seed=seed, shots=task.default_shots, split="test",
        label_names=task.label_names, label_words=task.template(template).label_words,
        demonstrations=tuple(range(task.default_shots)), example_indices=tuple(range(n)),
        prompts=tuple(f"synthetic example {i}" for i in range(n)), labels=tuple(labels.tolist()),
    )
    model_logits = logits.sum(1) + 0.1 * torch.randn(n, n_labels, generator=generator)
    return DecompositionRun("SmolLM2-135M-Instruct", prompts, list(range(n_labels)), N_LAYERS, N_HEADS, names, logits,
                            model_logits - logits.sum(1), model_logits, {"synthetic": True})


def write_sweep(root: Path, tasks: list[str], templates: list[int], seeds: list[int], n: int) -> int:
    count = 0
    for task in tasks:
        for template in templates:
            for seed in seeds:
                synthetic_run(task, template, seed, n).save(run_dir(root, None, task, template, seed, limit=n))
                count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=None, help="report this sweep instead of a synthetic one")
    parser.add_argument("--examples", type=int, default=200, help="test examples per synthetic run (default 200)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per task and template (default 5)")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="parts-bench-report-") as scratch:
        if args.runs is None:
            root = Path(scratch) / "runs"
            started = time.perf_counter()
            runs = write_sweep(root, ["sst2", "agnews"], [1, 2, 3, 4], list(range(args.seeds)), args.examples)
            what = (f"synthetic sweep: sst2 + agnews x templates 1-4 x seeds 0-{args.seeds - 1}, n = {args.examples}, "
                    f"300 components ({runs} runs, written in {time.perf_counter() - started:.1f} s)")
        else:
            root = Path(args.runs)
            what = f"the sweep in {root.name}/"
        report = build_report(root, Path(scratch) / "report")
        files = sum(1 for p in report.out.rglob("*") if p.is_file())
        plotly = (report.out / "assets" / "plotly.min.js").stat().st_size
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    line = (f"{report.runs} runs of {report.tasks} tasks: report built in **{report.seconds:.1f} s**, "
            f"**{report.bytes / 1e6:.1f} MB** in {files} files (plotly.js {plotly / 1e6:.1f} MB of it)")
    print(f"{what}\n{line}")
    if not args.no_record:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with RESULTS.open("a") as handle:
            handle.write(f"\n## {stamp} `parts report` on {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs); "
                         f"load average {load}\n\n- {what}: {line}, without --attention (build time excludes imports).\n")


if __name__ == "__main__":
    main()
