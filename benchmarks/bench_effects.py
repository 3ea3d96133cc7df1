"""Benchmark: total effects (`parts effects`) against the decomposition of the same run, CPU seconds.

    OMP_NUM_THREADS=1 python benchmarks/bench_effects.py                 # 200-example sst2, exact + attribution
    python benchmarks/bench_effects.py --limit 16 --methods exact --no-save

In one process, one torch thread (the machine is shared: CPU seconds of this process, `time.process_time`,
are the measure; wall seconds are printed beside them): the embedded SmolLM2-135M-Instruct in float32,
`decompose_task(model, TASK, template=1, seed=0, limit=LIMIT)` timed after a warm-up (a 4-example
decomposition, which also loads the data), then `total_effects(model, run, ...)` for each method
(mean ablation, last position). `--positions-all N` also checks the `--positions all` refusal's time
estimate against a real run on the first N examples. The table is printed and appended, with the date,
machine, versions and load average, to benchmarks/results.md (unless `--no-save`).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).with_name("results.md")


def timed(work: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, CPU seconds of this process, wall seconds)."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = work()
    return result, time.process_time() - cpu, time.perf_counter() - wall


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--methods", default="exact,attribution")
    parser.add_argument("--batch-size", type=int, default=None, help="total_effects' batch size (default: its own)")
    parser.add_argument("--positions-all", type=int, default=0, metavar="N",
                        help="also: the --positions all estimate against a real run on N examples")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import parts
    from parts.decomposition.effects import total_effects
    from parts.errors import PartsError
    from parts.experiments.runner import decompose_task

    model = parts.load_model()
    decompose_task(model, args.task, template=1, seed=0, limit=4, progress=False)  # warm-up
    run, decompose_cpu, decompose_wall = timed(
        lambda: decompose_task(model, args.task, template=1, seed=0, limit=args.limit, progress=False))
    rows = [("decomposition of the run", decompose_cpu, decompose_wall)]
    extra = {} if args.batch_size is None else {"batch_size": args.batch_size}
    results: dict[str, Any] = {"decomposition": decompose_cpu}
    for method in [m for m in args.methods.split(",") if m]:
        effects, cpu, wall = timed(lambda method=method: total_effects(model, run, method=method, **extra))
        rows.append((f"{method} total effects, last position, mean ablation", cpu, wall))
        results[method] = cpu
        results[f"{method}_effects"] = effects
        print(f"{method}: {cpu:.1f} CPU s ({cpu / decompose_cpu:.2f}x), {wall:.1f} wall s", flush=True)
    if args.positions_all:
        from parts.decomposition.effects import all_positions

        small = decompose_task(model, args.task, template=1, seed=0, limit=args.positions_all, progress=False)
        all_positions.ALL_POSITIONS_LIMIT = 0  # refused whatever its size: the refusal carries the estimate
        try:
            total_effects(model, small, positions="all")
            estimate = float("nan")
        except PartsError as err:
            number, unit = str(err).split("about ")[1].split(" ")[:2]
            estimate = float(number) * {"s": 1, "min": 60, "h": 3600}[unit]
            results["estimate_message"] = str(err)
        _, cpu, wall = timed(lambda: total_effects(model, small, positions="all", yes=True, **extra))
        print(f"positions all: estimate {estimate:.0f} s, real {wall:.0f} wall s ({cpu:.0f} CPU s)", flush=True)
        results.update(all_estimate=estimate, all_cpu=cpu, all_wall=wall)
        rows.append((f"`--positions all`, {small.n_examples} examples (estimate {estimate:.0f} wall s)", cpu, wall))
    table = ["| what | CPU s | wall s | vs the decomposition (CPU) |", "|---|---|---|---|"]
    table += [f"| {what} | {cpu:.1f} | {wall:.0f} | {cpu / decompose_cpu:.2f}x |" for what, cpu, wall in rows]
    text = "\n".join(table)
    print(text)
    if not args.no_save:
        now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        header = (f"\n## {now}: total effects against the decomposition (`benchmarks/bench_effects.py`) on "
                  f"{platform.node() and 'vm'} ({platform.machine()}, {os.cpu_count()} CPUs), torch threads "
                  f"{args.threads}, torch {torch.__version__}; load average {load}\n\n"
                  f"Command: `OMP_NUM_THREADS={args.threads} python benchmarks/bench_effects.py --task {args.task} "
                  f"--limit {args.limit} --methods {args.methods}"
                  f"{f' --positions-all {args.positions_all}' if args.positions_all else ''}`. The embedded "
                  f"SmolLM2-135M-Instruct, float32, CPU; {run.n_examples} examples ({args.task}, template 1, seed 0), "
                  f"{len(run.component_names)} components, mean ablation at the last position. CPU seconds of this "
                  "process (the machine is shared; wall seconds are inflated by the others' load).\n\n")
        with RESULTS.open("a") as handle:
            handle.write(header + text + "\n")
    return results


if __name__ == "__main__":
    main()
