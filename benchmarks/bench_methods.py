"""Each method's fit + predict time per setting, from a finished `parts evaluate` folder, against the table's CPU time.

    python benchmarks/bench_methods.py runs/main                           # every finished setting there
    python benchmarks/bench_methods.py runs/main --gates 2                 # and the in-forward gates on 2 settings
    python benchmarks/bench_methods.py runs/main --profile p1.json,p2.json # per-setting model time from profiles

Reads the stored runs only (the output root is never written): for every setting with its test run, training run
and content-free logits on disk, it reruns each method exactly as `parts.experiments.evaluate.evaluate_setting`
does, in its order and through its functions (`beyond_paper_predictions` for the methods beyond the paper), with
no model forward, each timed in this process's CPU seconds (`--repeats`: the mean of that many rounds). The gates
need the model: `--gates N` loads it and trains and applies them on the first N settings
(`parts.reweighting.gates.train_gates`, `gated_logits`, as `parts evaluate --gates` does).

Then the methods' share of the 120-setting table: each method's mean seconds per setting x 120 against the table's
CPU time (`--table-cpu-minutes`, default 300: the n = 200 table measured at about 150 minutes on 2 one-thread
workers, benchmarks/results.md). Per setting, the whole setting's time is a `benchmarks/profile_setting.py --json`
profile's where one is given for that setting at the same test size, else the per-task estimate recorded in
benchmarks/results.md (the cost model fitted to the per-stage profile).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # profile_setting, beside this file

from profile_setting import BEYOND_PAPER, Profile, instrument_methods  # noqa: E402

import parts.experiments.evaluate as evaluate  # noqa: E402
from parts.data.prompts import LABEL_BUDGET  # noqa: E402
from parts.decomposition.runs import DecompositionRun  # noqa: E402
from parts.experiments.results import RESULTS_CSV, read_results  # noqa: E402
from parts.experiments.runner import run_dir  # noqa: E402
from parts.reweighting import calibration  # noqa: E402

PAPER = ("contextual", "batch", "oracle", "comprw", "calib+")
# CPU s per setting of the whole evaluate run, n = 200 (benchmarks/results.md: the cost model fitted to the
# per-stage profile, measured under load): used where no profile of the setting is given.
RECORDED_SETTING_CPU = {"sst2": 62, "qqp": 95, "wic": 90, "mnli": 120, "arc": 134, "agnews": 139, "rte": 204,
                        "boolq": 466}
TABLE_SETTINGS = 120


def finished_settings(root: Path, model: str | None) -> list[evaluate.Setting]:
    """The settings of `root/results.csv` whose runs and content-free logits are on disk."""
    rows = read_results(root / RESULTS_CSV)
    out = []
    for (task, template, seed, shots, limit), _ in rows.groupby(["task", "template", "seed", "shots", "limit"], sort=False):
        limit = None if str(limit) in ("", "nan", "None") else int(limit)
        setting = evaluate.sweep_settings([task], [int(template)], [int(seed)], limit, [LABEL_BUDGET], int(shots))[0]
        test_dir = run_dir(root, model, setting.task, setting.template, setting.seed, "test", setting.k, limit)
        train_dir = run_dir(root, model, setting.task, setting.template, setting.seed, "train", setting.k,
                            LABEL_BUDGET - setting.k)
        if all((d / "summary.json").is_file() for d in (test_dir, train_dir)) and \
                (test_dir / "content-free.safetensors").is_file():
            out.append(setting)
    return out


def label(setting: evaluate.Setting) -> str:
    return f"{setting.task.name} t{setting.template} s{setting.seed}"


def time_methods(profile: Profile, test: DecompositionRun, train: DecompositionRun, content_free: Any,
                 repeats: int) -> dict[str, float]:
    """Mean CPU s per method of `repeats` rounds of what `evaluate_setting` runs after the model."""
    profile.cpu.clear()
    for _ in range(repeats):
        profile.unsigned_trainings = 0
        # evaluate_setting's order: contextual, batch, the oracle, then per budget CompRW, Calib+, beyond the paper.
        calibration.contextual_predict(test.model_logits, calibration.contextual_prior(content_free))
        calibration.batch_predict(test.model_logits)
        evaluate.train_weights(test.component_logits, test.labels)
        weights = evaluate.train_weights(train.component_logits, train.labels)
        evaluate.predict(weights.weights, test.component_logits)
        class_weights = calibration.train_calib_plus(train.model_logits, train.labels)
        calibration.calib_plus_predict(class_weights.weights, test.model_logits)
        evaluate.beyond_paper_predictions(train, test)
    return {stage: cpu / repeats for (run, stage), cpu in profile.cpu.items() if run == "methods"}


def time_gates(model: Any, test: DecompositionRun, train: DecompositionRun) -> dict[str, float]:
    from parts.reweighting.gates import gated_logits, train_gates

    start = time.process_time()
    gates = train_gates(model, train)
    trained = time.process_time()
    gated_logits(model, test, gates.weights)
    return {"gates: training": trained - start, "gates: test predictions": time.process_time() - trained,
            "gates: epochs": gates.epochs}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="a `parts evaluate` output root (read only)")
    parser.add_argument("--model", default=None, help="the model its runs are filed under (default: embedded)")
    parser.add_argument("--settings", default=None, help="task:template:seed,... (default: every finished one)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per setting (default 3; the mean is kept)")
    parser.add_argument("--gates", type=int, default=0, help="time the in-forward gates on the first N settings")
    parser.add_argument("--profile", default=None, help="profile_setting.py --json files, comma-separated")
    parser.add_argument("--table-cpu-minutes", type=float, default=300.0,
                        help="the 120-setting table's CPU minutes without these methods (default 300: 150 min x 2)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    profile = Profile()
    instrument_methods(profile)
    settings = finished_settings(args.root, args.model)
    if args.settings:
        wanted = {tuple(s.split(":")) for s in args.settings.split(",")}
        settings = [s for s in settings if (s.task.name, str(s.template), str(s.seed)) in wanted]
    if not settings:
        raise SystemExit(f"no finished setting in {args.root} (a test run, its training run and content-free logits)")
    profiles = {}
    for path in (args.profile.split(",") if args.profile else []):
        data = json.loads(Path(path).read_text())
        profiles[(data["setting"], data["limit"])] = data
    model = None
    if args.gates:
        from parts.model.loading import load_model

        model = load_model(args.model, device="cpu")

    rows: list[dict[str, Any]] = []
    load = os.getloadavg()
    for index, setting in enumerate(settings):
        where = dict(model=args.model, task=setting.task, template=setting.template, seed=setting.seed,
                     shots=setting.k)
        test_dir = run_dir(args.root, split="test", limit=setting.limit, **where)  # type: ignore[arg-type]
        start = time.process_time()
        test = DecompositionRun.load(test_dir)
        train = DecompositionRun.load(run_dir(args.root, split="train", limit=LABEL_BUDGET - setting.k,
                                              **where))  # type: ignore[arg-type]
        content_free, _ = evaluate._cached_logits(test_dir / "content-free.safetensors", lambda: (torch.empty(0), {}))
        row: dict[str, Any] = {"setting": label(setting), "n": test.n_examples, "load runs": time.process_time() - start}
        row |= time_methods(profile, test, train, content_free, args.repeats)
        if model is not None and index < args.gates:
            row |= time_gates(model, test, train)
        known = profiles.get((label(setting), setting.limit))
        if known is not None:
            row["setting CPU s"] = known["setting_cpu_s"]
            row["source"] = "profile"
        else:
            row["setting CPU s"] = RECORDED_SETTING_CPU.get(setting.task.name, float("nan"))
            row["source"] = "recorded estimate"
        rows.append(row)
        print(f"{row['setting']}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                              if isinstance(v, float) and k != "setting CPU s"), flush=True)

    methods = [*PAPER, *BEYOND_PAPER]
    print(f"\n## Methods' fit + predict per setting (issue 24): {len(rows)} setting(s) of {args.root.name}, CPU s "
          f"(mean of {args.repeats})\n")
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node()} ({platform.machine()}, "
          f"{os.cpu_count()} CPUs), torch {torch.__version__}, 1 torch thread; load average "
          f"{', '.join(f'{x:.2f}' for x in load)}.\n")
    print("| setting | n | " + " | ".join(methods) + " | beyond the paper | setting CPU s (source) | beyond / setting |")
    print("|---|---|" + "---|" * (len(methods) + 3))
    for row in rows:
        beyond = sum(row.get(m, 0.0) for m in BEYOND_PAPER)
        print(f"| {row['setting']} | {row['n']} | " + " | ".join(f"{row.get(m, 0.0):.3f}" for m in methods)
              + f" | {beyond:.3f} | {row['setting CPU s']:.0f} ({row['source']}) | {beyond / row['setting CPU s']:.2%} |")
    table_s = args.table_cpu_minutes * 60
    means = {m: statistics.fmean(row.get(m, 0.0) for row in rows) for m in methods}
    beyond_table = sum(means[m] for m in BEYOND_PAPER) * TABLE_SETTINGS
    print(f"\nProjected to the {TABLE_SETTINGS}-setting table (mean per setting x {TABLE_SETTINGS}, against "
          f"{args.table_cpu_minutes:.0f} CPU minutes):\n")
    print("| " + " | ".join(methods) + " | beyond the paper (target <= 25%) |")
    print("|" + "---|" * (len(methods) + 1))
    print("| " + " | ".join(f"{means[m] * TABLE_SETTINGS / table_s:.2%}" for m in methods)
          + f" | **{beyond_table / table_s:.2%}** ({beyond_table / 60:.1f} CPU min) |")
    gated = [row for row in rows if "gates: training" in row]
    for row in gated:
        cost = row["gates: training"] + row["gates: test predictions"]
        print(f"\nGates on {row['setting']}: training {row['gates: training']:.1f} CPU s ({row['gates: epochs']} "
              f"epochs), test predictions {row['gates: test predictions']:.1f} CPU s: {cost:.1f} CPU s, "
              f"{cost / row['setting CPU s']:.0%} of the setting's {row['setting CPU s']:.0f} CPU s "
              f"({row['source']}); x {TABLE_SETTINGS} = {cost * TABLE_SETTINGS / table_s:.0%} of the table.")
    return {"rows": rows, "means": means, "beyond_share": beyond_table / table_s}


if __name__ == "__main__":
    main()
