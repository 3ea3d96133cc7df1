"""Benchmark: in-forward component gates against post-hoc CompRW on one setting, in CPU time, with their accuracy.

    python benchmarks/bench_gates.py                    # embedded model, sst2 template 1 seed 0, 24 labels, n = 200

Both methods learn on the same 24 - k = 20 labelled examples (the setting's training run) with CompRW's recipe
(`parts.reweighting.reweight.descend`) and are scored on the same test run. Timed (this process's CPU seconds,
`time.process_time`, one torch thread): CompRW's training on the saved component logits (its predictions are one
weighted sum); the gates' training (the clean keys and values of the labelled prompts, then one one-token forward
and backward per epoch); the gates' test predictions (one ungated check pass and one gated pass of the last token).
The decompositions both need are made first and not timed. Prints a markdown section for benchmarks/results.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--template", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labels", type=int, default=24)
    parser.add_argument("--limit", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from parts.data.tasks import get_task
    from parts.experiments.runner import decompose_task
    from parts.model.loading import load_model
    from parts.reweighting.gates import gated_logits, train_gates
    from parts.reweighting.reweight import predict, train_weights

    model = load_model(device="cpu")
    k = get_task(args.task).default_shots
    where = dict(template=args.template, seed=args.seed, progress=False)
    test = decompose_task(model, args.task, split="test", limit=args.limit, **where)
    train = decompose_task(model, args.task, split="train", limit=args.labels - k, **where)

    start = time.process_time()
    weights = train_weights(train.component_logits, train.labels)
    comprw_train = time.process_time() - start
    comprw_accuracy = float((predict(weights.weights, test.component_logits) == test.labels).float().mean())

    start, wall = time.process_time(), time.perf_counter()
    gates = train_gates(model, train)
    gates_train, gates_wall = time.process_time() - start, time.perf_counter() - wall
    start = time.process_time()
    logits = gated_logits(model, test, gates.weights)
    gates_test = time.process_time() - start
    gates_accuracy = float((logits.argmax(-1) == test.labels).float().mean())
    closed = int((gates.clipped < 0.5).sum())

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    n = test.n_examples
    print(f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: in-forward gates vs CompRW (issue 24, method 5) "
          f"on {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs), torch threads 1; load average {load}\n")
    print(f"The embedded model in float32 on the CPU, {args.task} template {args.template}, seed {args.seed}, "
          f"{args.labels} labels ({args.labels - k} to train on), n = {n} test examples. Command: "
          f"`python benchmarks/bench_gates.py --task {args.task} --limit {args.limit}` (niced, one thread).\n")
    print("| what | CPU s | epochs (stopped) | test accuracy (n) |")
    print("|---|---|---|---|")
    print(f"| CompRW: training on the saved component logits | {comprw_train:.2f} | {weights.epochs} "
          f"({weights.stopped_because}) | {comprw_accuracy:.3f} ({n}) |")
    print(f"| gates: training through the cached last token (wall {gates_wall:.0f} s) | {gates_train:.1f} | "
          f"{gates.epochs} ({gates.stopped_because}) | |")
    print(f"| gates: test predictions (check + gated pass) | {gates_test:.1f} | | {gates_accuracy:.3f} ({n}) |")
    print(f"\nGates: train accuracy {gates.train_accuracy:.3f}, {closed} of {len(gates.weights)} below 0.5, "
          f"{gates_train / max(gates.epochs, 1):.2f} CPU s per epoch; CompRW train accuracy {weights.train_accuracy:.3f}.")


if __name__ == "__main__":
    main()
