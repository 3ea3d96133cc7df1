"""The paper's own measures and tables, computed from the exported result files (plain pandas).

Inputs are the frames of `parts.experiments.export` (`main.csv`, `transfer.csv`, `predictions.csv`,
`runs.csv`), so every function here runs without the model or the run folders. Outputs are
DataFrames (percentages where the paper prints percentages) for `parts tables` and the report:

- `main_table`: the paper's Table 4 layout, every method's accuracy per task (mean over the runs)
  with a 95% hierarchical bootstrap interval (`parts.analysis.stats`), the 8-task average, and
  CompRW minus each baseline with its interval.
- `component_table_1`: the paper's Table 1 measures per task: FULL, ORACLE-T1 (best single component,
  chosen on the test set) and ORACLE-B1 (worst), mean ± std over runs, each beside its chance
  yardstick: the expected best / worst of as many chance-level classifiers on as many examples.
- `label_biased_table`: components that predict one label on the entire test set (the paper's rule),
  share of all components with n beside it (the share grows as the test set shrinks).
- `agreement_table`: the paper's Table 2: Pearson r and top-5 IoU of component accuracies between
  runs that differ in demonstrations, in a minimally contrastive template, or in other templates.
- `transfer_table`: the paper's Table 3: FULL / TRANSFER-1 / ORACLE-1 on the shifted test set.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import torch

from parts.analysis.analyze import relation_between, top_k
from parts.analysis.stats import (
    DDOF,
    bootstrap_intervals,
    chance_extremes,
    correctness_arrays,
    correctness_runs,
    rounded,
    spread,
)
from parts.methods import BEYOND_PAPER_MARK, label_order, method_label

PAPER_TASK_ORDER = ("sst2", "boolq", "qqp", "wic", "rte", "mnli", "agnews", "arc")

# Llama-2-7B, K = 24 (paper Table 4 / Appendix): per-task accuracy (%)
PAPER_MAIN = {
    "24-shot ICL": dict(zip(PAPER_TASK_ORDER, (77.8, 71.6, 66.4, 53.2, 71.9, 39.9, 71.1, 58.3), strict=True)),
    "CompRW 24": dict(zip(PAPER_TASK_ORDER, (90.6, 71.7, 71.9, 57.1, 70.0, 49.8, 88.1, 58.8), strict=True)),
}
PAPER_MAIN_AVERAGE = {"k-shot ICL": 61.2, "24-shot ICL": 63.8, "Calib+ 24": 67.7, "CompRW 24": 69.8}
PAPER_COMPONENT_AVERAGE = {"FULL": 61.2, "ORACLE-T1": 66.6, "ORACLE-B1": 24.5}  # Llama-2-7B, 8-task average
# share of all components that predict one label on the entire test set (%), Llama-2-7B, n = 2,000
PAPER_LABEL_BIASED = dict(zip(PAPER_TASK_ORDER, (37.8, 18.9, 43.4, 44.2, 35.4, 28.2, 13.4, 11.5), strict=True))
# Table 2, Llama-2-7B: (Pearson r, top-5 IoU) per relation
_T2_TASKS = ("sst2", "boolq", "qqp", "agnews", "arc")
PAPER_AGREEMENT = {
    "seeds": dict(zip(_T2_TASKS, zip((0.81, 0.84, 0.60, 0.89, 0.88), (0.36, 0.74, 0.27, 0.63, 0.70), strict=True),
                      strict=True)),
    "templates": dict(zip(_T2_TASKS, zip((0.40, 0.16, 0.03, 0.68, 0.44), (0.12, 0.01, 0.01, 0.20, 0.20), strict=True),
                          strict=True)),
    "perturbed template": dict(zip(_T2_TASKS, zip((0.72, 0.63, 0.23, 0.82, 0.46), (0.40, 0.23, 0.02, 0.36, 0.45),
                                                  strict=True), strict=True)),
}
PAPER_TRANSFER = {"sst2 -> yelp": (84.7, 94.9, 96.9), "boolq -> boolq_contrast": (64.9, 64.3, 66.2)}

REFERENCE = "CompRW 24"
PAPER_TEMPLATES = (1, 2, 3)


def ordered_tasks(tasks: pd.Series | list[str]) -> list[str]:
    """The tasks present, the paper's eight in the paper's order first, then any others in order of appearance."""
    present = list(dict.fromkeys(tasks))
    return [t for t in PAPER_TASK_ORDER if t in present] + [t for t in present if t not in PAPER_TASK_ORDER]


def _with_columns(predictions: pd.DataFrame, main: pd.DataFrame) -> pd.DataFrame:
    shots = main.groupby("task")["shots"].first().astype(int).to_dict()
    frame = predictions[predictions["kind"] == "main"].copy()
    frame["method"] = [method_label(m, int(n), shots[t]) for m, n, t in zip(frame["method"], frame["labels"],
                                                                               frame["task"], strict=True)]
    return frame


def _settings(frame: pd.DataFrame) -> dict[str, dict[str, set[tuple[int, int]]]]:
    """Per task and method (named as in tables): its settings, (template, seed) pairs."""
    return {str(task): {str(m): {(int(t), int(s)) for t, s in zip(g["template"], g["seed"], strict=True)}
                        for m, g in rows.groupby("method", sort=False)}
            for task, rows in frame.groupby("task", sort=False)}


def partial_methods(predictions: pd.DataFrame, main: pd.DataFrame) -> dict[str, dict[str, set[tuple[int, int]]]]:
    """The methods that lack some of a task's settings (those of any method of the task), e.g. the optional
    gates run on a subset: method -> task -> its settings there. `main_intervals` leaves them out of that task,
    so that the other methods keep every setting; `pairwise_intervals` compares them on what they have."""
    partial: dict[str, dict[str, set[tuple[int, int]]]] = {}
    for task, by_method in _settings(_with_columns(predictions, main)).items():
        every = set().union(*by_method.values())
        for method, settings in by_method.items():
            if settings != every:
                partial.setdefault(method, {})[task] = settings
    return partial


def main_intervals(predictions: pd.DataFrame, main: pd.DataFrame, n_resamples: int = 2000, seed: int = 0,
                   resample: str = "runs", reference: str | None = None) -> pd.DataFrame:
    """Every method's accuracy and CompRW 24 (or `reference`) minus every other method, per task and for the
    average, with 95% hierarchical bootstrap intervals (percent; `resample`: "runs" or "nested", see
    `parts.analysis.stats.bootstrap_replicates`). Only tasks with at least one finished run; in each, only the
    methods that have every one of its settings (`partial_methods` names the others). The same `seed`
    draws the same replicates whatever the reference, so differences from two calls are paired alike."""
    frame = _with_columns(predictions, main)
    partial = partial_methods(predictions, main)
    if partial:
        left_out = pd.Series([task in partial.get(method, {}) for task, method in zip(frame["task"], frame["method"],
                                                                                       strict=True)], index=frame.index)
        frame = frame[~left_out]
    arrays = correctness_arrays(frame)
    ordered = {t: arrays[t] for t in ordered_tasks(list(arrays))}
    templates = {task: [key[0] for key in keys] for task, keys in correctness_runs(frame).items()}
    if reference is None:
        comprw = sorted({m for per_task in ordered.values() for m in per_task if m.startswith("CompRW ")},
                        key=lambda m: int(m.split()[1]))
        reference = REFERENCE if REFERENCE in comprw else (comprw[-1] if comprw else None)
    table = bootstrap_intervals(ordered, reference=reference, n_resamples=n_resamples, seed=seed, resample=resample,
                                groups=templates)
    table[["estimate", "low", "high"]] *= 100
    return table


def _cell(row: pd.Series) -> str:
    return f"{rounded(row['estimate'])} [{rounded(row['low'])}, {rounded(row['high'])}]"


def _interval(row: pd.Series) -> str:
    return f"[{rounded(row['low'])}, {rounded(row['high'])}]"


def one_difference_table(intervals: pd.DataFrame, difference: str) -> pd.DataFrame:
    """One paired difference of `main_intervals` ('24-shot ICL - k-shot ICL') per task and for the average:
    runs, n, and 'diff [low, high]' percentage points."""
    rows = intervals[(intervals["quantity"] == "difference") & (intervals["method"] == difference)]
    return pd.DataFrame({"task": rows["task"], "runs": rows["runs"].astype(int), "n": rows["examples"].astype(int),
                         difference.replace(" - ", " minus "): [_cell(r) for _, r in rows.iterrows()]})


def resampling_table(runs: pd.DataFrame, nested: pd.DataFrame, task: str = "average") -> pd.DataFrame:
    """The `task` row of two `main_intervals` tables side by side, one per resampling scheme: every method's
    accuracy and every difference, the estimate, and the 95% interval with runs resampled as exchangeable
    and with templates, then seeds, then examples resampled (nested)."""
    merged = runs[runs["task"] == task].merge(nested[nested["task"] == task], on=["task", "quantity", "method"],
                                              suffixes=("", " nested"))
    accuracy = merged[merged["quantity"] == "accuracy"]
    accuracy = accuracy.iloc[sorted(range(len(accuracy)), key=lambda i: label_order(accuracy["method"].iloc[i]))]
    ordered = pd.concat([accuracy, merged[merged["quantity"] == "difference"]])
    return pd.DataFrame({
        "quantity": ordered["method"].str.replace(" - ", " minus "), "runs": ordered["runs"].astype(int),
        "n": ordered["examples"].astype(int), "estimate": ordered["estimate"].map(rounded),
        "interval, runs exchangeable (default)": [_interval(r) for _, r in ordered.iterrows()],
        "interval, nested: templates, seeds, examples": [
            _interval(pd.Series({"low": r["low nested"], "high": r["high nested"]})) for _, r in ordered.iterrows()],
    })


def main_table(intervals: pd.DataFrame) -> pd.DataFrame:
    """Task x method: 'mean [low, high]' accuracy (%), tasks then the average; runs and n per task."""
    accuracy = intervals[intervals["quantity"] == "accuracy"]
    present = list(dict.fromkeys(accuracy["method"]))
    columns = sorted(present, key=label_order)  # the methods' one order (parts.methods)
    rows = []
    for task, group in accuracy.groupby("task", sort=False):
        by_method = group.set_index("method")
        first = by_method.iloc[0]
        rows.append({"task": task, "runs": int(first["runs"]), "n": int(first["examples"]),
                     **{c: _cell(by_method.loc[c]) if c in by_method.index else "" for c in columns}})
    return pd.DataFrame(rows, columns=["task", "runs", "n", *columns])


def difference_table(intervals: pd.DataFrame, beyond_paper: bool = True) -> pd.DataFrame:
    """Task x baseline: CompRW 24 minus the baseline, 'diff [low, high]' percentage points; without
    `beyond_paper`, the paper's baselines alone (`beyond_paper_differences` has the others)."""
    differences = intervals[intervals["quantity"] == "difference"]
    if not beyond_paper:
        differences = differences[~differences["method"].str.contains(BEYOND_PAPER_MARK, regex=False)]
    rows = []
    for task, group in differences.groupby("task", sort=False):
        by_method = group.set_index("method")
        rows.append({"task": task, **{m.split(" - ", 1)[1]: _cell(r) for m, r in by_method.iterrows()}})
    return pd.DataFrame(rows)


def settings_text(per_task: dict[str, set[tuple[int, int]]]) -> str:
    """Which settings (template x seed) each task has, in a phrase: 't1-3 × s0-2, 9 per task, 8 tasks, 72 in all';
    tasks with other settings listed apart: 'sst2, qqp: t1 × s0, 1; boolq: t1-2 × s0, 2; 4 in all'."""
    groups: dict[frozenset[tuple[int, int]], list[str]] = {}
    for task, settings in per_task.items():
        groups.setdefault(frozenset(settings), []).append(task)
    total = sum(len(settings) for settings in per_task.values())
    if len(groups) == 1:
        shared, tasks = next(iter(groups.items()))
        return f"{compact_runs(set(shared))} per task, {len(tasks)} task{'s' * (len(tasks) != 1)}, {total} in all"
    return "; ".join(f"{', '.join(tasks)}: {compact_runs(set(shared))}" for shared, tasks in groups.items()) \
        + f"; {total} in all"


def main_settings_line(predictions: pd.DataFrame, main: pd.DataFrame) -> str:
    """What the main table holds, in a sentence for its block: its settings, and the methods left out because they
    ran on fewer settings (`partial_methods`)."""
    frame = _with_columns(predictions, main)
    per_task = {task: set().union(*by_method.values()) for task, by_method in _settings(frame).items()}
    line = f"Settings (template t, demonstration seed s): {settings_text(per_task)}."
    partial = partial_methods(predictions, main)
    if partial:
        named = ", ".join(f"{method} ({settings_text(tasks)})" for method, tasks in
                          sorted(partial.items(), key=lambda item: label_order(item[0])))
        line += f" Run on fewer settings, so left out of this table where they lack some: {named}."
    return line


def pairwise_intervals(predictions: pd.DataFrame, main: pd.DataFrame, n_resamples: int = 2000, seed: int = 0,
                       resample: str = "runs") -> pd.DataFrame:
    """Every method beyond the paper against CompRW at its label budget ('SignedRW† 24' against 'CompRW 24'), each
    pair over only the settings both have, per task and for the average over the tasks that have both: the
    `main_intervals` rows (percent) of the two accuracies and of CompRW minus the method, with the column `versus`
    (the method) and `settings` (per task: the (template, seed) pairs; for the average, every task's, as text
    by `settings_text`). Empty where no method beyond the paper has a row."""
    frame = _with_columns(predictions, main)
    tables = []
    beyond = [m for m in dict.fromkeys(frame["method"]) if BEYOND_PAPER_MARK in m]
    for method in sorted(beyond, key=label_order):
        reference = f"{REFERENCE.rpartition(' ')[0]} {method.rpartition(' ')[2]}"  # CompRW at the method's budget
        pair = frame[frame["method"].isin([method, reference])]
        runs = {task: set(keys) for task, keys in correctness_runs(pair).items()}
        both = [t for t in ordered_tasks(list(runs)) if {method, reference} <= set(pair.loc[pair["task"] == t, "method"])]
        if not both:
            continue
        arrays = correctness_arrays(pair[pair["task"].isin(both)])
        groups = {task: [key[0] for key in keys] for task, keys in correctness_runs(pair[pair["task"].isin(both)]).items()}
        table = bootstrap_intervals({t: arrays[t] for t in both}, reference=reference, n_resamples=n_resamples,
                                    seed=seed, resample=resample, groups=groups)
        table[["estimate", "low", "high"]] *= 100
        per_task = {t: {(int(a), int(b)) for a, b in runs[t]} for t in both}
        table["versus"] = method
        table["settings"] = [settings_text(per_task) if t == "average" else compact_runs(per_task[t])
                             for t in table["task"]]
        tables.append(table)
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def beyond_paper_differences(pairs: pd.DataFrame) -> pd.DataFrame:
    """Task x method beyond the paper (`pairwise_intervals`): CompRW minus the method over the settings both have,
    'diff [low, high] (runs)' percentage points and the number of settings it is over; tasks in the paper's order,
    then the average ('' where a task lacks the method)."""
    differences = pairs[pairs["quantity"] == "difference"]
    tasks = [*ordered_tasks([t for t in differences["task"] if t != "average"]), "average"]
    methods = list(dict.fromkeys(differences["versus"]))
    rows = []
    for task in tasks:
        row: dict[str, object] = {"task": task}
        for method, group in differences[differences["task"] == task].groupby("versus", sort=False):
            r = group.iloc[0]
            row[str(method)] = f"{_cell(r)} ({int(r['runs'])} run{'s' * (int(r['runs']) != 1)})"
        rows.append(row)
    return pd.DataFrame(rows, columns=["task", *methods]).fillna("")


def pair_table(pairs: pd.DataFrame, methods: list[str] | None = None, average_only: bool = False) -> pd.DataFrame:
    """Per method beyond the paper (those of `methods`, default all) and task, then the average over tasks, from
    `pairwise_intervals`: the settings it shares with CompRW, runs and n (summed over tasks for the average), CompRW's
    accuracy and the method's on those settings, 'mean [low, high]' (%), and CompRW minus the method (percentage
    points). `average_only`: the average rows alone, one per method (the task column left out)."""
    rows = []
    for method in sorted(methods or list(dict.fromkeys(pairs["versus"])), key=label_order):
        mine = pairs[(pairs["versus"] == method) & ((pairs["task"] == "average") | (not average_only))]
        for task, group in mine.groupby("task", sort=False):
            by_quantity = {(q, m): r for (q, m), r in group.set_index(["quantity", "method"]).iterrows()}
            reference = next(m for q, m in by_quantity if q == "accuracy" and m != method)
            ours = by_quantity[("accuracy", method)]
            rows.append({"method": method, **({} if average_only else {"task": task}),
                         "settings (both methods)": ours["settings"], "runs": int(ours["runs"]),
                         "n": int(ours["examples"]), "CompRW (same settings)": _cell(by_quantity[("accuracy", reference)]),
                         "the method": _cell(ours),
                         "CompRW minus the method": _cell(by_quantity[("difference", f"{reference} - {method}")])})
    return pd.DataFrame(rows)


def paper_comparison(intervals: pd.DataFrame) -> pd.DataFrame:
    """Per task: 24-shot ICL and CompRW 24 here (with intervals) beside the paper's Llama-2-7B values."""
    accuracy = intervals[intervals["quantity"] == "accuracy"].set_index(["task", "method"])
    rows = []
    for task in dict.fromkeys(intervals["task"]):
        row: dict[str, object] = {"task": task}
        for column in ("24-shot ICL", "CompRW 24"):
            row[f"{column} (here)"] = _cell(accuracy.loc[(task, column)]) if (task, column) in accuracy.index else ""
            paper = PAPER_MAIN_AVERAGE.get(column) if task == "average" else PAPER_MAIN[column].get(task)
            row[f"{column} (paper)"] = "" if paper is None else rounded(paper)
        rows.append(row)
    return pd.DataFrame(rows)


def resampling_changes(runs: pd.DataFrame, nested: pd.DataFrame) -> pd.DataFrame:
    """The differences of two `main_intervals` tables (runs exchangeable, nested) whose 95% interval excludes
    zero under one scheme and not under the other, per task and for the average: where the choice matters."""
    merged = runs.merge(nested, on=["task", "quantity", "method"], suffixes=("", " nested"))
    merged = merged[merged["quantity"] == "difference"]
    excludes = (merged["low"] > 0) | (merged["high"] < 0)
    nested_excludes = (merged["low nested"] > 0) | (merged["high nested"] < 0)
    changed = merged[excludes != nested_excludes]
    return pd.DataFrame({
        "task": changed["task"], "difference": changed["method"].str.replace(" - ", " minus "),
        "runs": changed["runs"].astype(int), "n": changed["examples"].astype(int),
        "estimate": changed["estimate"].map(rounded),
        "interval, runs exchangeable (default)": [_interval(r) for _, r in changed.iterrows()],
        "interval, nested": [_interval(pd.Series({"low": r["low nested"], "high": r["high nested"]}))
                             for _, r in changed.iterrows()],
    })


# -- Table 1 and label bias -------------------------------------------------------------------------
def component_accuracies(runs: pd.DataFrame) -> np.ndarray:
    """[run component] accuracies from `runs.csv`'s space-separated `accuracies` column."""
    return np.array([[float(a) for a in text.split()] for text in runs["accuracies"]])


def run_measures(runs: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Per test run: FULL, ORACLE-T1 / ORACLE-B1 (and which components), the chance yardsticks, label bias."""
    accuracies = component_accuracies(runs)
    n_components = accuracies.shape[1]
    yardsticks = [chance_extremes(int(n), int(c), n_components) for n, c in zip(runs["n_examples"], runs["n_labels"],
                                                                              strict=True)]
    return pd.DataFrame({
        "task": runs["task"].to_numpy(), "template": runs["template"].to_numpy(), "seed": runs["seed"].to_numpy(),
        "n": runs["n_examples"].to_numpy(), "labels": runs["n_labels"].to_numpy(),
        "full": 100 * runs["full"].to_numpy(),
        "best": 100 * accuracies.max(1), "best_component": [names[i] for i in accuracies.argmax(1)],
        "worst": 100 * accuracies.min(1), "worst_component": [names[i] for i in accuracies.argmin(1)],
        "chance_best": [100 * y[0] for y in yardsticks], "chance_worst": [100 * y[1] for y in yardsticks],
        "chance": 100 / runs["n_labels"].to_numpy(),
        "label_biased": runs["label_biased"].to_numpy(), "label_biased_share": 100 * runs["label_biased"] / n_components,
    })


def _mean_std(values: pd.Series, digits: int = 1, ddof: int = DDOF) -> str:
    """'mean ± std' over runs (`parts.analysis.stats.spread`, ddof 1 by default); the mean alone for a single
    run (no spread to show); '' for none."""
    if not len(values):
        return ""
    mean = rounded(values.mean(), digits)
    return f"{mean} ± {rounded(spread(values, ddof), digits)}" if len(values) > 1 else mean


def component_table_1(measures: pd.DataFrame, ddof: int = DDOF) -> pd.DataFrame:
    """The paper's Table 1 per task (mean ± std over runs, %, std with `ddof`), each beside its chance
    yardstick, and the average."""
    # the paper's runs: templates 1-3 (template 4, the minimal perturbation, is for Table 2 only)
    main = measures[~measures["task"].str.contains(" -> ") & measures["template"].isin(PAPER_TEMPLATES)]
    rows = []
    for task in ordered_tasks(list(main["task"])):
        group = main[main["task"] == task]
        rows.append({"task": task, "runs": len(group), "n": int(group["n"].iloc[0]), "chance": rounded(group["chance"].iloc[0]),
                     "FULL": _mean_std(group["full"], ddof=ddof), "ORACLE-T1": _mean_std(group["best"], ddof=ddof),
                     "best of N at chance": rounded(group["chance_best"].mean()),
                     "ORACLE-B1": _mean_std(group["worst"], ddof=ddof),
                     "worst of N at chance": rounded(group["chance_worst"].mean())})
    means = main.groupby("task")[["full", "best", "worst", "chance_best", "chance_worst", "chance"]].mean()
    if len(means):
        rows.append({"task": "average", "runs": len(main), "n": "", "chance": rounded(means["chance"].mean()),
                     "FULL": rounded(means["full"].mean()), "ORACLE-T1": rounded(means["best"].mean()),
                     "best of N at chance": rounded(means["chance_best"].mean()),
                     "ORACLE-B1": rounded(means["worst"].mean()), "worst of N at chance": rounded(means["chance_worst"].mean())})
    return pd.DataFrame(rows)


def oracle_differences(measures: pd.DataFrame, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Table 1's comparisons as paired differences, per task and for the average: ORACLE-T1 minus FULL, ORACLE-T1
    minus its best-of-N-at-chance yardstick and ORACLE-B1 minus its worst-of-N one, each the mean over a task's
    runs (templates 1-3) with a 95% bootstrap interval that resamples the runs (one draw for every column, so
    each difference is paired; `runs.csv` keeps accuracies, not each component's answers, so the test examples
    are not resampled: the intervals are narrower than the main table's would be). Percentage points."""
    main = measures[~measures["task"].str.contains(" -> ") & measures["template"].isin(PAPER_TEMPLATES)]
    if main.empty:
        return pd.DataFrame()
    columns = {"ORACLE-T1": "best", "FULL": "full", "best of N at chance": "chance_best", "ORACLE-B1": "worst",
               "worst of N at chance": "chance_worst"}
    per_run = {task: {name: main.loc[main["task"] == task, column].to_numpy(dtype=np.float64)[:, None]
                      for name, column in columns.items()}
               for task in ordered_tasks(list(main["task"]))}
    wanted = ("ORACLE-T1 - FULL", "ORACLE-T1 - best of N at chance", "ORACLE-B1 - worst of N at chance")
    table = pd.concat([bootstrap_intervals(per_run, reference=reference, n_resamples=n_resamples, seed=seed)
                       for reference in ("ORACLE-T1", "ORACLE-B1")])  # the same seed: the same draws
    differences = table[table["method"].isin(wanted)]
    rows = []
    for task, group in differences.groupby("task", sort=False):
        by_method = group.set_index("method")
        tasks = list(per_run) if task == "average" else [task]
        n = sum(int(main.loc[main["task"] == t, "n"].iloc[0]) for t in tasks)
        rows.append({"task": task, "runs": int(by_method["runs"].iloc[0]), "n": n,
                     **{name.replace(" - ", " minus "): _cell(by_method.loc[name]) for name in wanted}})
    return pd.DataFrame(rows)


def label_biased_table(measures: pd.DataFrame, ddof: int = DDOF) -> pd.DataFrame:
    """Share (%) of components that predict one label on the entire test set, per task, beside the paper's."""
    # the paper's runs: templates 1-3 (template 4, the minimal perturbation, is for Table 2 only)
    main = measures[~measures["task"].str.contains(" -> ") & measures["template"].isin(PAPER_TEMPLATES)]
    rows = []
    for task in ordered_tasks(list(main["task"])):
        group = main[main["task"] == task]
        paper = PAPER_LABEL_BIASED.get(task)
        rows.append({"task": task, "runs": len(group), "n (here)": int(group["n"].iloc[0]),
                     "label-biased % (here)": _mean_std(group["label_biased_share"], ddof=ddof),
                     "label-biased % (paper, n = 2,000)": "" if paper is None else rounded(paper)})
    return pd.DataFrame(rows)


# -- Table 2 --------------------------------------------------------------------------------------
def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def agreement_pairs(runs: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    """Every pair of test runs of a task: how they differ (`parts.analysis.analyze.relation_between`),
    the Pearson r of their component accuracies and the IoU of their top-k components."""
    main = runs[~runs["task"].str.contains(" -> ")].reset_index(drop=True)
    accuracies = component_accuracies(main) if len(main) else np.zeros((0, 0))
    rows = []
    for task, group in main.groupby("task", sort=False):
        for i, j in itertools.combinations(group.index, 2):
            a, b = main.loc[i], main.loc[j]
            top_a = top_k(torch.from_numpy(accuracies[i]), k)
            top_b = top_k(torch.from_numpy(accuracies[j]), k)
            rows.append({"task": task, "run_a": f"t{a['template']} s{a['seed']}", "run_b": f"t{b['template']} s{b['seed']}",
                         "template_a": int(a["template"]), "template_b": int(b["template"]),
                         "relation": relation_between(str(task), (int(a["template"]), int(a["seed"])),
                                                      (int(b["template"]), int(b["seed"]))),
                         "pearson": _pearson(accuracies[i], accuracies[j]),
                         "top_k_iou": len(top_a & top_b) / len(top_a | top_b)})
    return pd.DataFrame(rows, columns=["task", "run_a", "run_b", "template_a", "template_b", "relation", "pearson",
                                       "top_k_iou"])


def agreement_table(pairs: pd.DataFrame, ddof: int = DDOF, templates: tuple[int, ...] | None = PAPER_TEMPLATES
                    ) -> pd.DataFrame:
    """Per task and relation: Pearson r and top-5 IoU, mean ± std over the pairs (how many), beside the paper's.
    As in the paper, the demonstration and template pairs are among `templates` (1-3; None: every template);
    template 4 enters only the minimally contrastive pairs. The pairs of a task share runs, so the std describes
    their spread, not the mean's uncertainty."""
    among = (pd.Series(True, index=pairs.index) if templates is None
             else pairs["template_a"].isin(templates) & pairs["template_b"].isin(templates))
    rows = []
    for task in ordered_tasks(list(pairs["task"])):
        for relation in ("seeds", "perturbed template", "templates"):
            kept = among | (relation == "perturbed template")
            group = pairs[(pairs["task"] == task) & (pairs["relation"] == relation) & kept]
            paper = PAPER_AGREEMENT[relation].get(task)
            rows.append({"task": task, "runs differ in": {"seeds": "demonstrations"}.get(relation, relation),
                         "pairs": len(group),
                         "pearson r (here)": _mean_std(group["pearson"].dropna(), 2, ddof),
                         "pearson r (paper)": "" if paper is None else rounded(paper[0], 2),
                         "top-5 IoU (here)": _mean_std(group["top_k_iou"], 2, ddof),
                         "top-5 IoU (paper)": "" if paper is None else rounded(paper[1], 2)})
    return pd.DataFrame(rows)


# -- Table 3 --------------------------------------------------------------------------------------
TRANSFER_METHODS = {"icl": "FULL", "transfer-1": "TRANSFER-1", "oracle-1": "ORACLE-1 (upper bound)",
                    "comprw": "CompRW 24 (extension)", "calib+": "Calib+ 24 (extension)", "batch": "BatchCal (extension)"}


def transfer_table(transfer: pd.DataFrame, ddof: int = DDOF) -> pd.DataFrame:
    """The paper's Table 3 on each shifted test set (mean ± std over runs, %), the paper's values beside,
    then parts' reweighting-under-shift extension."""
    rows = []
    shifted = transfer[transfer["task"].str.contains(" -> ")]
    for task, group in shifted.groupby("task", sort=False):
        row: dict[str, object] = {"shift": task, "runs": group[["template", "seed"]].drop_duplicates().shape[0],
                                  "n": int(group["n_test"].iloc[0])}
        for method, column in TRANSFER_METHODS.items():
            values = 100 * group.loc[group["method"] == method, "accuracy"].astype(float)
            row[column] = _mean_std(values, ddof=ddof) if len(values) else ""
        paper = PAPER_TRANSFER.get(str(task))
        row["paper FULL / TRANSFER-1 / ORACLE-1"] = "" if paper is None else " / ".join(rounded(p) for p in paper)
        rows.append(row)
    return pd.DataFrame(rows)


def _shift_intervals(predictions: pd.DataFrame, reference: str, n_resamples: int, seed: int, resample: str
                     ) -> pd.DataFrame:
    """`bootstrap_intervals` (percent) of every method on each shifted test set, `reference` minus each other."""
    shifted = predictions[(predictions["kind"] == "transfer") & predictions["task"].str.contains(" -> ")].copy()
    if shifted.empty:
        return pd.DataFrame()
    shifted["method"] = shifted["method"].map(lambda m: TRANSFER_METHODS.get(m, m))
    templates = {task: [key[0] for key in keys] for task, keys in correctness_runs(shifted).items()}
    table = bootstrap_intervals(correctness_arrays(shifted), reference=reference, n_resamples=n_resamples, seed=seed,
                                average="average of the shifts", resample=resample, groups=templates)
    table[["estimate", "low", "high"]] *= 100
    return table


def transfer_intervals(predictions: pd.DataFrame, n_resamples: int = 2000, seed: int = 0, resample: str = "runs"
                       ) -> pd.DataFrame:
    """Table 3 on each shifted test set with 95% bootstrap intervals (examples and runs resampled), and
    TRANSFER-1 minus FULL and minus each other method: one row per shift, 'mean [low, high]' cells (%)."""
    table = _shift_intervals(predictions, "TRANSFER-1", n_resamples, seed, resample)
    if table.empty:
        return table
    rows = []
    for task, group in table.groupby("task", sort=False):
        by_method = group.set_index("method")
        first = by_method.iloc[0]
        row: dict[str, object] = {"shift": task, "runs": int(first["runs"]), "n": int(first["examples"])}
        for column in TRANSFER_METHODS.values():
            if column in by_method.index:
                row[column] = _cell(by_method.loc[column])
        for name in ("FULL", "ORACLE-1 (upper bound)"):
            key = f"TRANSFER-1 - {name}"
            if key in by_method.index:
                row[f"TRANSFER-1 minus {name.split(' ')[0]}"] = _cell(by_method.loc[key])
        rows.append(row)
    return pd.DataFrame(rows)


def _numbers(values: list[int]) -> str:
    """[0, 1, 2, 4] -> '0-2,4': runs of consecutive numbers as ranges."""
    spans: list[list[int]] = []
    for value in sorted(values):
        if spans and value == spans[-1][1] + 1:
            spans[-1][1] = value
        else:
            spans.append([value, value])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def compact_runs(pairs: set[tuple[int, int]], design: int | None = None) -> str:
    """(template, seed) pairs as template x seed ranges: 't1-3 × s0-4, all 15' (all of a `design` of 15),
    't1-2 × s0-4; t3 × s0-2, 13' where templates differ in their seeds; '0' for none."""
    if not pairs:
        return "0"
    seeds: dict[int, tuple[int, ...]] = {}
    for template, seed in sorted(pairs):
        seeds[template] = (*seeds.get(template, ()), seed)
    groups: dict[tuple[int, ...], list[int]] = {}
    for template, its_seeds in seeds.items():
        groups.setdefault(its_seeds, []).append(template)
    text = "; ".join(f"t{_numbers(templates)} × s{_numbers(list(its_seeds))}" for its_seeds, templates in groups.items())
    return f"{text}, {'all ' if len(pairs) == design else ''}{len(pairs)}"


def coverage_table(main: pd.DataFrame, runs: pd.DataFrame, transfer: pd.DataFrame, templates: tuple[int, ...] = (1, 2, 3),
                   seeds: tuple[int, ...] = (0, 1, 2, 3, 4), test_templates: tuple[int, ...] = (1, 2, 3, 4)) -> pd.DataFrame:
    """What has finished, per task: main-table settings (of `templates` x `seeds`), test runs (Tables 1 and 2,
    of `test_templates` x `seeds`) and transfer runs (of `templates` x `seeds`), each as template x seed ranges
    (`compact_runs`), so the docs say exactly what is there."""
    def listed(frame: pd.DataFrame, design: int) -> str:
        if frame.empty:
            return "0"
        return compact_runs({(int(t), int(s)) for t, s in zip(frame["template"], frame["seed"], strict=True)}, design)

    design, test_design = len(templates) * len(seeds), len(test_templates) * len(seeds)
    tasks = ordered_tasks(list(PAPER_TASK_ORDER) + list(main.get("task", pd.Series(dtype=str)))
                           + [t for t in runs.get("task", pd.Series(dtype=str)) if " -> " not in t])
    rows = []
    for task in tasks:
        settings = main[main["task"] == task] if len(main) else main
        tested = runs[runs["task"] == task] if len(runs) else runs
        rows.append({"task": task, f"main-table settings (of {design})": listed(settings, design),
                     f"test runs (Tables 1, 2; of {test_design})": listed(tested, test_design)})
    for shift in [t for t in dict.fromkeys(transfer.get("task", pd.Series(dtype=str))) if " -> " in t]:
        done = transfer[(transfer["task"] == shift) & (transfer["method"] == "transfer-1")]
        rows.append({"task": shift, f"main-table settings (of {design})": "",
                     f"test runs (Tables 1, 2; of {test_design})": "",
                     f"transfer runs (Table 3; of {design})": listed(done, design)})
    return pd.DataFrame(rows).fillna("")


def transfer_differences(predictions: pd.DataFrame, n_resamples: int = 2000, seed: int = 0, resample: str = "runs"
                         ) -> pd.DataFrame:
    """Every method minus FULL on each shifted test set, paired (the same resampled examples and runs for both),
    'diff [low, high]' percentage points: one row per shift, one column per method."""
    table = _shift_intervals(predictions, "FULL", n_resamples, seed, resample)
    if table.empty:
        return table
    rows = []
    for task, group in table[table["quantity"] == "difference"].groupby("task", sort=False):
        first = group.iloc[0]
        row: dict[str, object] = {"shift": task, "runs": int(first["runs"]), "n": int(first["examples"])}
        by_method = group.set_index("method")
        for column in TRANSFER_METHODS.values():
            if f"FULL - {column}" in by_method.index:  # FULL minus the method, turned round
                r = by_method.loc[f"FULL - {column}"]
                row[f"{column.split(' (')[0]} minus FULL"] = _cell(pd.Series(
                    {"estimate": -r["estimate"], "low": -r["high"], "high": -r["low"]}))
        rows.append(row)
    return pd.DataFrame(rows)
