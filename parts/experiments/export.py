"""The small text files every table is made from, exported from an output root of run folders.

`export_results(root, out)` reads what `parts evaluate` / `parts transfer` / `parts sweep` left under
`root` and writes, under `out` (committed with the repository, so a reader can check a number
without rerunning the model):

| file | one row per | holds |
|---|---|---|
| `main.csv` | setting x method | `parts evaluate`'s `results.csv` rows (accuracy, n_test, note) |
| `transfer.csv` | setting x method x side | `parts transfer`'s rows, the paper's TRANSFER-1 / ORACLE-1 included |
| `predictions.csv` | setting x method | `correct`: one 0/1 per test example, in the task's test-sample order (bootstrap input) |
| `runs.csv` | test run | full-model accuracy, label-biased count, every component's accuracy (in `components.txt` order) |
| `components.txt` | component | the component names |
| `controls.csv` | control run | a random-init run and its pretrained twin: `control_row`, one-label count, accuracies |

Every accuracy recomputed from the run folders is checked against the row `parts evaluate` wrote.

`only` exports some tables and keeps the others as `out` has them (`TABLES`: which files each table owns):
`only=("main",)` replaces `main.csv` and the main-table rows of `predictions.csv` from a root that holds a
main-table rerun alone, and keeps the transfer rows of `predictions.csv`, `transfer.csv`, `runs.csv`,
`controls.csv` and `components.txt` untouched.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from parts import io
from parts.analysis import paper
from parts.data.prompts import LABEL_BUDGET
from parts.data.tasks import Task, get_task
from parts.decomposition.runs import SUMMARY, DecompositionRun
from parts.errors import PartsError
from parts.experiments.controls import control_row
from parts.experiments.evaluate import Setting, setting_predictions
from parts.experiments.results import RESULTS_CSV, TRANSFER_CSV, read_results, text_records
from parts.experiments.transfer import TransferSetting, transfer_setting_predictions
from parts.model.loading import RANDOM_INIT_MARK

RUN_NAME = re.compile(r"t(?P<template>\d+)-s(?P<seed>\d+)-k(?P<shots>\d+)-test-n(?P<limit>\w+)$")


def _task(name: str, tasks: Mapping[str, str | Path]) -> Task:
    """A task by the name in a results file; `tasks` maps the names of user tasks to their JSON files."""
    return get_task(tasks.get(name, name))


def _limit(value: str) -> int | None:
    return None if value == "all" else int(value)


def _correct(labels: torch.Tensor, predictions: torch.Tensor) -> str:
    return "".join("1" if c else "0" for c in (predictions == labels).tolist())


def _check(row: dict[str, Any], correct: str) -> None:
    recomputed = correct.count("1") / len(correct)
    if abs(recomputed - float(row["accuracy"])) > 1e-5:
        raise PartsError(f"{row['task']} t{row['template']} s{row['seed']} {row['method']} {row['labels']}: accuracy "
                         f"{recomputed:.6f} from the run folders but {float(row['accuracy']):.6f} in the results file: "
                         "the folders changed after evaluation; rerun `parts evaluate` for this setting")


def main_predictions(root: Path, rows: list[dict[str, Any]], tasks: Mapping[str, str | Path]) -> list[dict[str, Any]]:
    """One `predictions.csv` row per `results.csv` row, recomputed from the run folders."""
    out = []
    keys = dict.fromkeys((r["model"], r["task"], r["template"], r["seed"], r["shots"], r["limit"]) for r in rows)
    for model, task, template, seed, shots, limit in keys:
        mine = [r for r in rows if (r["model"], r["task"], r["template"], r["seed"], r["shots"], r["limit"])
                == (model, task, template, seed, shots, limit)]
        budgets = tuple(sorted({int(r["labels"]) for r in mine} - {int(shots)})) or (LABEL_BUDGET,)
        setting = Setting(_task(task, tasks), int(template), int(seed), _limit(limit), budgets, int(shots))
        labels, predictions = setting_predictions(root, model, setting)  # a slug names its own folder
        for r in mine:
            key = (r["method"], int(r["labels"]))
            if key not in predictions:
                continue
            correct = _correct(labels, predictions[key])
            _check(r, correct)
            out.append({"kind": "main", "model": model, "task": task, "template": int(template), "seed": int(seed),
                        "method": r["method"], "labels": int(r["labels"]), "n_test": len(correct), "correct": correct})
    return out


def transfer_rows_and_predictions(root: Path, rows: list[dict[str, Any]], tasks: Mapping[str, str | Path]
                                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`transfer.csv` rows (with TRANSFER-1 / ORACLE-1 added where the run predates them) and their predictions."""
    table: dict[tuple[str, ...], dict[str, Any]] = {}
    predictions = []
    sources = dict.fromkeys((r["model"], r["task"], r["template"], r["seed"], r["shots"]) for r in rows
                            if " -> " not in r["task"])
    for r in rows:
        table[(r["model"], r["task"], str(r["template"]), str(r["seed"]), r["method"])] = r
    for model, source_name, template, seed, shots in sources:
        targets = {r["task"]: r for r in rows if r["task"].startswith(f"{source_name} -> ")
                   and (r["model"], str(r["template"]), str(r["seed"])) == (model, str(template), str(seed))}
        source_rows = [r for r in rows if (r["model"], r["task"], str(r["template"]), str(r["seed"]))
                       == (model, source_name, str(template), str(seed))]
        for target_task, target_row in targets.items():
            setting = TransferSetting(_task(source_name, tasks), _task(target_task.split(" -> ")[1], tasks), int(template),
                                      int(seed), _limit(source_rows[0]["limit"]), _limit(target_row["limit"]), int(shots))
            for (task_name, method, labels), (gold, predicted) in transfer_setting_predictions(
                    root, model, setting).items():
                correct = _correct(gold, predicted)
                key = (model, task_name, str(template), str(seed), method)
                if key in table:
                    _check(table[key], correct)
                else:
                    table[key] = {"model": model, "task": task_name, "template": template, "seed": seed, "shots": shots,
                                  "limit": target_row["limit"], "method": method, "labels": labels,
                                  "accuracy": round(correct.count("1") / len(correct), 6), "n_test": len(correct),
                                  "note": "recomputed from the run folders"}
                predictions.append({"kind": "transfer", "model": model, "task": task_name, "template": int(template),
                                    "seed": int(seed), "method": method, "labels": labels, "n_test": len(correct),
                                    "correct": correct})
    return list(table.values()), predictions


def one_label_count(run: DecompositionRun) -> int:
    """Components that predict one label on every example: the paper's label-biased rule."""
    predictions = run.component_predictions
    return int((predictions == predictions[:1]).all(0).sum())


def _test_runs(root: Path, limit: str) -> list[Path]:
    """The folders of finished test runs of `limit` examples under `root` (hidden folders skipped)."""
    folders = []
    for summary in sorted(root.rglob(SUMMARY)):
        folder = summary.parent
        match = RUN_NAME.match(folder.name)
        if match is not None and match["limit"] == limit and not any(
                p.startswith(".") for p in folder.relative_to(root).parts):
            folders.append(folder)
    return folders


def _is_random_init(root: Path, folder: Path) -> bool:
    return RANDOM_INIT_MARK in folder.relative_to(root).parts[0]


def run_rows(root: Path, limit: str) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per finished test run of `limit` examples (main tasks and transfer targets) and the component names;
    runs of a randomly re-initialised model are the controls' (`control_rows`)."""
    rows: list[dict[str, Any]] = []
    names: list[str] = []
    for folder in _test_runs(root, limit):
        if _is_random_init(root, folder):
            continue
        run = DecompositionRun.load(folder)
        names = names or list(run.component_names)
        if list(run.component_names) != names:
            raise PartsError(f"{folder} has other components than the runs before it: export one model at a time")
        is_transfer = "transfer" in folder.relative_to(root).parts
        task = f"{folder.parent.name.split('-to-')[0]} -> {run.prompts.task}" if is_transfer else run.prompts.task
        rows.append({"model": run.model, "task": task, "template": run.prompts.template, "seed": run.prompts.seed,
                     "shots": run.prompts.shots, "n_examples": run.n_examples, "n_labels": len(run.prompts.label_names),
                     "full": round(run.full_accuracy, 6), "label_biased": one_label_count(run),
                     "accuracies": " ".join(f"{a:.4f}" for a in run.component_accuracy.tolist())})
    return rows, names


# each table `export_results(only=...)` can export alone: the files it owns; predictions.csv is shared, by `kind`
TABLES = {"main": ("main.csv", "predictions.csv"), "transfer": ("transfer.csv", "predictions.csv"),
          "runs": ("runs.csv", "components.txt"), "controls": ("controls.csv",)}


def check_tables(only: Collection[str]) -> None:
    """Refuse an empty or unknown choice of tables to export."""
    unknown = sorted(set(only) - set(TABLES))
    if unknown or not only:
        raise PartsError(f"unknown table(s) to export {', '.join(unknown) or '(none given)'}: choose among "
                         f"{', '.join(TABLES)}")


def _kept_predictions(out: Path, kinds: Collection[str]) -> pd.DataFrame:
    """The rows of `out`'s predictions.csv whose `kind` is not among `kinds` (empty where there is no file)."""
    path = out / "predictions.csv"
    if not path.is_file():
        return pd.DataFrame()
    io.check_file(path)  # the user's own file of that name: refused before reading it as ours
    try:
        frame = pd.read_csv(path, dtype={"correct": str})
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    if "kind" not in frame.columns:
        raise PartsError(f"{path} has no `kind` column: export every table (`parts tables --from-runs ROOT` without "
                         "--only) to rewrite it")
    return frame[~frame["kind"].isin(list(kinds))]


def export_results(root: str | Path, out: str | Path, limit: int | None = 200,
                   tasks: Mapping[str, str | Path] | None = None, only: Collection[str] | None = None
                   ) -> dict[str, Path]:
    """Write the table inputs (see the module docstring) for the runs of `limit` test examples under `root`.
    `tasks` maps user task names to their JSON files (the paper's tasks resolve by name); `only`: the tables of
    `TABLES` to export (default all), the other files under `out` kept as they are."""
    if only is not None:
        check_tables(only)
        if set(only) != set(TABLES):
            return _export_some(Path(root), Path(out), limit, tasks or {}, set(only))
    tasks = tasks or {}
    root, out = Path(root), Path(out)
    size = "all" if limit is None else str(limit)
    main_rows = [r for r in text_records(read_results(root / RESULTS_CSV)) if r["limit"] == size]
    transfer_rows = [r for r in text_records(read_results(root / TRANSFER_CSV)) if r["limit"] == size or " -> " in r["task"]]
    runs, names = run_rows(root, size)
    controls = control_rows(root, size, names)
    if not main_rows and not transfer_rows and not runs and not controls:
        raise PartsError(f"no results at n={size} under {root}: run `parts evaluate --limit {size} --out {root}` first")
    predictions = main_predictions(root, main_rows, tasks)
    transfer_table, transfer_predictions = transfer_rows_and_predictions(root, transfer_rows, tasks)
    names = names or (DecompositionRun.load(_test_runs(root, size)[0]).component_names if controls else [])
    frames = {"main.csv": pd.DataFrame(main_rows), "transfer.csv": pd.DataFrame(transfer_table),
              "predictions.csv": pd.DataFrame(predictions + transfer_predictions), "runs.csv": pd.DataFrame(runs),
              "controls.csv": pd.DataFrame(controls)}
    for name in [*frames, "components.txt"]:  # refuse before writing any if a user's file is in the way
        io.check_file(out / name)
    written = {name: io.write_file(out / name, partial(frame.to_csv, index=False)) for name, frame in frames.items()}
    written["components.txt"] = io.write_text(out / "components.txt", "\n".join(names) + "\n")
    return written


def _export_some(root: Path, out: Path, limit: int | None, tasks: Mapping[str, str | Path], only: set[str]
                 ) -> dict[str, Path]:
    """`export_results` for the tables `only`: each is exported from `root`, which must hold it; the files of
    the other tables, and the other tables' rows of predictions.csv, stay as `out` has them."""
    size = "all" if limit is None else str(limit)
    frames: dict[str, pd.DataFrame] = {}
    predictions: list[dict[str, Any]] = []
    names: list[str] = []
    if "main" in only:
        main_rows = [r for r in text_records(read_results(root / RESULTS_CSV)) if r["limit"] == size]
        if not main_rows:
            raise PartsError(f"no main-table results at n={size} under {root}: run `parts evaluate --limit {size} "
                             f"--out {root}` first, or leave main out of --only")
        frames["main.csv"] = pd.DataFrame(main_rows)
        predictions += main_predictions(root, main_rows, tasks)
    if "transfer" in only:
        transfer_rows = [r for r in text_records(read_results(root / TRANSFER_CSV))
                         if r["limit"] == size or " -> " in r["task"]]
        if not transfer_rows:
            raise PartsError(f"no transfer results at n={size} under {root}: run `parts transfer --out {root}` first, "
                             "or leave transfer out of --only")
        transfer_table, transfer_predictions = transfer_rows_and_predictions(root, transfer_rows, tasks)
        frames["transfer.csv"] = pd.DataFrame(transfer_table)
        predictions += transfer_predictions
    if "runs" in only:
        runs, names = run_rows(root, size)
        if not runs:
            raise PartsError(f"no test runs of {size} examples under {root}: leave runs out of --only")
        frames["runs.csv"] = pd.DataFrame(runs)
    if "controls" in only:
        committed = out / "components.txt"  # the main runs' component order, where they are not exported now
        order = names or (committed.read_text().split() if committed.is_file() else [])
        controls = control_rows(root, size, order)
        if not controls:
            raise PartsError(f"no control runs of {size} examples under {root}: run `parts control --out {root}` "
                             "first, or leave controls out of --only")
        frames["controls.csv"] = pd.DataFrame(controls)
    if {"main", "transfer"} & only:
        kept = _kept_predictions(out, {"main", "transfer"} & only)
        merged = pd.concat([pd.DataFrame(predictions), kept], ignore_index=True)
        # the main table's rows first, as a full export writes them
        frames["predictions.csv"] = merged.sort_values("kind", key=lambda kind: kind != "main", kind="stable")
    for name in [*frames, *(["components.txt"] if names else [])]:  # refuse before writing any
        io.check_file(out / name)
    written = {name: io.write_file(out / name, partial(frame.to_csv, index=False)) for name, frame in frames.items()}
    if names:
        written["components.txt"] = io.write_text(out / "components.txt", "\n".join(names) + "\n")
    return written


def control_rows(root: Path, limit: str, names: list[str]) -> list[dict[str, Any]]:
    """Per test run of a randomly re-initialised model under `root` (`parts control`), its row and its pretrained
    twin's (the same prompts, `root/<model>/...`): `control_row`'s columns, the paper's label-biased count (one
    label on every example) and every component's accuracy (in the order of `names`, the main runs' components,
    where there are main runs). A random run without its twin is refused."""
    rows = []
    for folder in _test_runs(root, limit):
        if not _is_random_init(root, folder):
            continue
        model_folder = folder.relative_to(root).parts[0]
        pretrained_folder = re.sub(re.escape(RANDOM_INIT_MARK) + r"\d+", "", model_folder)  # the variant stays
        twin = root / pretrained_folder / folder.relative_to(root / model_folder)
        if not (twin / SUMMARY).is_file():
            raise PartsError(f"{folder} has no pretrained twin at {twin}: run `parts control --out {root}` to finish "
                             "the control")
        for init, path in (("pretrained", twin), ("random", folder)):
            run = DecompositionRun.load(path)
            if names and list(run.component_names) != names:
                raise PartsError(f"{path} has other components than the runs before it: export one model at a time")
            rows.append({"init": init, **control_row(run), "one_label": one_label_count(run),
                         "accuracies": " ".join(f"{a:.4f}" for a in run.component_accuracy.tolist())})
    return rows


def interval_tables(root: str | Path, results: pd.DataFrame, tasks: Mapping[str, str | Path] | None = None,
                    n_resamples: int = 2000) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """The main table with 95% hierarchical bootstrap intervals, CompRW minus each baseline with its interval, and
    the sentence saying which settings they hold and which methods ran on fewer settings and are left out where
    they lack some (`paper.main_settings_line`), for `results.csv` rows whose settings are finished under `root`
    (`parts evaluate` prints them)."""
    rows = text_records(results)
    predictions = pd.DataFrame(main_predictions(Path(root), rows, tasks or {}))
    if predictions.empty:
        return pd.DataFrame(), pd.DataFrame(), ""
    main = pd.DataFrame(rows)
    intervals = paper.main_intervals(predictions, main, n_resamples)
    return (paper.main_table(intervals), paper.difference_table(intervals),
            paper.main_settings_line(predictions, main))
