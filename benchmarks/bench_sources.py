"""Benchmark: source attribution of 5 heads against the decomposition of the same run, in CPU time.

    python benchmarks/bench_sources.py                     # embedded model, sst2 template 1 seed 0, n = 200

Both paths decompose the same test prompts (template 1, seed 0, the default 4 demonstrations) with the default
engine, batch 8 and prefix reuse: the decomposition (`Decomposer.__call__`: every component's logits) and the
source attribution of the run's 5 most accurate heads (`parts.decomposition.sources.attribute_sources`: the same
forward with the model's eager attention, the pattern and values of their layers captured, split over every source
position, plus one check forward). Rounds alternate the two paths, so load from other processes hits them alike;
the median CPU time of each (one torch thread) is printed and appended, with the date, machine and load average, to
benchmarks/results.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--heads", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from parts.analysis.analyze import component_table
    from parts.decomposition.decompose import Decomposer
    from parts.decomposition.sources import attribute_sources
    from parts.experiments.runner import decompose_task
    from parts.model.loading import load_model

    model = load_model(device="cpu")
    run = decompose_task(model, args.task, template=1, seed=0, limit=args.limit, progress=False)
    table = component_table(run)
    heads = table[table["kind"] == "head"].sort_values("accuracy", ascending=False, kind="stable")["component"]
    heads = list(heads[: args.heads])
    decomposer = Decomposer(model, run.label_token_ids)
    prompts = list(run.prompts.prompts)
    times: dict[str, list[float]] = {"decomposition": [], "attribution": []}
    error = 0.0
    for _ in range(args.repeats):
        start = time.process_time()
        decomposer(prompts, batch_size=8, progress=False)
        times["decomposition"].append(time.process_time() - start)
        start = time.process_time()
        result = attribute_sources(decomposer, prompts, heads, batch_size=8)
        times["attribution"].append(time.process_time() - start)
        error = result.max_error
    decomposition, attribution = (statistics.median(times[k]) for k in ("decomposition", "attribution"))
    row = (f"| embedded | cpu | float32 | {args.task} | 4 | 8 | {len(prompts)} | {', '.join(heads)} | "
           f"{decomposition:.1f} | {attribution:.1f} | {attribution / decomposition:.2f}x | {error:.1e} |")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    text = "\n".join([
        f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} source attribution (`benchmarks/bench_sources.py`) "
        f"on {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs), torch threads 1; load average {load}",
        "",
        f"Median CPU time of {args.repeats} alternating rounds: the run's decomposition vs the source attribution of "
        f"its {len(heads)} most accurate heads (issue 25's target: at most 1.5x).",
        "",
        "| model | device | dtype | task | shots | batch | examples | heads | decomposition CPU s | attribution CPU s | "
        "ratio | max sum error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        row, "",
    ])
    print(text)
    if not args.no_write:
        results = Path(__file__).with_name("results.md")
        results.write_text(results.read_text().rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()
