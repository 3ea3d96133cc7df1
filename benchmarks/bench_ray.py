"""The same small sweep three ways: in one process, on 1 Ray worker, on 2 Ray workers (a local cluster).

    python benchmarks/bench_ray.py --tasks sst2 --templates 1,2 --seeds 0,1 --limit 16
    python benchmarks/bench_ray.py --no-one-process --tasks sst2,boolq,qqp,wic,rte,mnli,agnews,arc \
        --templates 1,2 --seeds 3 --limit 200      # 1 vs 2 workers on a sweep of over 10 minutes

Each way writes into its own fresh folder (nothing is reused); the script checks that the three sets of
run folders are byte-identical, then appends a section to benchmarks/results.md: wall time of each, the
speed-up of 2 workers over 1, and Ray's overhead (1 worker against one process: cluster start, worker
start-up and a model load per worker). Wall times on a machine shared with other work are noisy: the
load average is recorded beside them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import ray
import torch

from parts.experiments.options import RunOptions
from parts.experiments.ray_executor import RayExecutor
from parts.experiments.sweep import sweep


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def table(walls: dict[str, float]) -> str:
    """The wall times as a markdown table, each against one process where it ran, else against 1 worker."""
    base_name = "one process" if "one process" in walls else "1 Ray worker"
    labels = {"one process": "one process (no Ray)", "1 Ray worker": "Ray, 1 worker (cluster start included)",
              "2 Ray workers": "Ray, 2 workers (cluster start included)"}
    rows = [f"| {labels[name]} | {wall:.1f} | {walls[base_name] / wall:.2f}x |" for name, wall in walls.items()]
    return "\n".join([f"| how | wall time (s) | vs {base_name} |", "|---|---|---|", *rows]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--tasks", default="sst2")
    parser.add_argument("--templates", default="1,2")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data-dir", default=os.environ.get("PARTS_DATA_DIR"))
    parser.add_argument("--no-one-process", action="store_true",
                        help="time only 1 and 2 Ray workers (a long sweep: the one-process way adds as much again)")
    parser.add_argument("--note", default="", help="a sentence on the machine's state, for the results")
    parser.add_argument("--results", default=str(Path(__file__).with_name("results.md")))
    args = parser.parse_args()
    tasks, templates, seeds = args.tasks.split(","), [int(t) for t in args.templates.split(",")], \
        [int(s) for s in args.seeds.split(",")]
    options = RunOptions(device="cpu", batch_size=args.batch_size, data_dir=args.data_dir, progress=False)
    n_runs = len(tasks) * len(templates) * len(seeds)
    checkout = str(Path(__file__).resolve().parents[1])

    walls: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as scratch:
        def timed(name: str, executor: RayExecutor | None) -> None:
            start = time.perf_counter()
            sweep(args.model, tasks, templates, seeds, limit=args.limit, out=Path(scratch) / name, options=options,
                  executor=executor)
            walls[name] = time.perf_counter() - start
            print(f"{name}: {walls[name]:.1f} s", flush=True)

        if not args.no_one_process:
            timed("one process", None)
        for workers in (1, 2):
            start = time.perf_counter()  # the cluster's start counts: it is what --ray local costs
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": checkout, "OMP_NUM_THREADS": "1"}})
            started = time.perf_counter() - start
            timed(f"{workers} Ray worker{'s' if workers > 1 else ''}", RayExecutor("auto", workers=workers))
            walls[f"{workers} Ray worker{'s' if workers > 1 else ''}"] += started
            ray.shutdown()
        hashes = {name: file_hashes(Path(scratch) / name) for name in walls}
    reference = next(iter(hashes.values()))
    identical = all(h == reference for h in hashes.values())

    w1, w2 = walls["1 Ray worker"], walls["2 Ray workers"]
    one = walls.get("one process")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    machine = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)"
    versions = f"ray {ray.__version__}, torch {torch.__version__}"
    model = args.model or "embedded SmolLM2-135M-Instruct"
    overhead = "" if one is None else (f" Ray's overhead (1 worker minus one process): {w1 - one:+.1f} s for {n_runs} "
                                        "runs, i.e. starting the local cluster, a worker process (imports) and its "
                                        "model load.")
    section = f"""
## {stamp} on {machine}; {versions}; load average {load}

`benchmarks/bench_ray.py`: the same sweep ({model}, float32, CPU, tasks {args.tasks},
templates {args.templates}, seeds {args.seeds}, {args.limit} test examples per run: {n_runs} runs,
batch {args.batch_size}, 1 torch thread per process) into a fresh folder {len(walls)} ways.
Run folders byte-identical across the {len(walls)}: {"yes" if identical else "NO"}.
{args.note}

{table(walls)}
Speed-up of 2 workers over 1: {w1 / w2:.2f}x.{overhead}
"""
    print(section)
    with open(args.results, "a") as handle:
        handle.write(section)
    if not identical:
        sys.exit("run folders differ between the three ways")


if __name__ == "__main__":
    main()
