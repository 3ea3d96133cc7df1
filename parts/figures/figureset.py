"""Every figure a folder of saved runs supports, by name: what `parts figures` writes.

Runs are grouped as `parts.analysis.analyze.group_runs` does (same model, task, split, shots and
examples: accuracies that can be compared). Per group of test runs, the reference run (lowest
template, then lowest seed) gives the heatmap, categories, distribution and, with a model, the
close-up of its best head; two runs give the stability scatters and all of them the correlation
matrix. `results.csv` at the root gives the method bars, and weights saved beside the reference
run by `parts evaluate` the weights heatmap. A figure whose inputs are absent is skipped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from fnmatch import fnmatch
from pathlib import Path

import plotly.graph_objects as go

from parts.analysis.analyze import accuracy_correlation, component_table, correlation_matrix, group_runs, run_label
from parts.analysis.inspect_head import head_inspection, pick_heads
from parts.data.tasks import get_task
from parts.decomposition.runs import SUMMARY, DecompositionRun, SavedRun, find_runs, load_saved_runs
from parts.errors import PartsError
from parts.experiments.results import RESULTS_CSV, read_results
from parts.figures import plotting
from parts.reweighting.reweight import load_weights, weights_file


def test_groups(saved: Sequence[SavedRun]) -> dict[str, list[SavedRun]]:
    """Comparable test runs by figure-name prefix: the task, with the model and size added only
    where needed to tell groups apart; each group sorted by (template, seed)."""
    tests = [item for item in saved if item.run.prompts.split == "test"]
    # group_runs's key: (collection, model, task, split, shots, n_examples); no paths, so no collection.
    groups = {key[1:]: [tests[i] for i in indices] for key, indices in group_runs([s.run for s in tests]).items()}
    models = {key[0] for key in groups}
    named: dict[str, list[SavedRun]] = {}
    for (model, task, _, shots, n), items in groups.items():
        tasks_like_this = sum(1 for key in groups if key[0] == model and key[1] == task)
        prefix = task if tasks_like_this == 1 else f"{task}-k{shots}-n{n}"
        if len(models) > 1:
            prefix = f"{model.replace('/', '--')}-{prefix}"
        named[prefix] = sorted(items, key=lambda s: (s.run.prompts.template, s.run.prompts.seed))
    return named


def stability_pairs(runs: Sequence[DecompositionRun]) -> dict[str, tuple[DecompositionRun, DecompositionRun]]:
    """The reference run against another demonstration set (same template), and against another
    template (its minimally contrastive one where the task names it; same seed)."""
    reference = runs[0]
    t, s = reference.prompts.template, reference.prompts.seed
    pairs = {}
    other_seed = [r for r in runs if r.prompts.template == t and r.prompts.seed != s]
    if other_seed:
        pairs["demonstrations"] = (reference, other_seed[0])
    try:
        perturbed = get_task(reference.prompts.task).perturbed
    except PartsError:
        perturbed = {}
    partners = [a for a, b in perturbed.items() if b == t] + [b for a, b in perturbed.items() if a == t]
    same_seed = [r for r in runs if r.prompts.seed == s and r.prompts.template != t]
    same_seed.sort(key=lambda r: (r.prompts.template not in partners, r.prompts.template))
    if same_seed:
        pairs["templates"] = (reference, same_seed[0])
    return pairs


def _describe(run: DecompositionRun) -> str:
    p = run.prompts
    return f"{run.model}, {p.task}, template {p.template}, seed {p.seed}, {p.shots}-shot, n={run.n_examples}"


def _pair_name(run: DecompositionRun, other: DecompositionRun, relation: str) -> tuple[str, str]:
    if relation == "demonstrations":
        return f"demonstrations seed {run.prompts.seed}", f"demonstrations seed {other.prompts.seed}"
    return f"template {run.prompts.template}", f"template {other.prompts.template}"


def group_figures(prefix: str, group: Sequence[SavedRun], model: object | None = None) -> dict[str, go.Figure]:
    """The figures of one group of comparable runs (see the module's docstring)."""
    reference = group[0].run
    table = component_table(reference)
    where = _describe(reference)
    # chance is 1 / labels wherever parts shows it (the report too); run.chance is the majority rate
    full, chance = reference.full_accuracy, 1 / len(reference.prompts.label_names)
    def titled(heading: str) -> str:
        return f"{heading}<br><sup>{where}</sup>"

    label_names = reference.prompts.label_names
    figures = {
        f"{prefix}-accuracy-heatmap": plotting.accuracy_heatmap(table, full, chance, titled("Accuracy of every component")),
        f"{prefix}-categories": plotting.categorization_scatter(
            table, full, chance, label_names, title=titled(plotting.CATEGORIES_TITLE)),
        f"{prefix}-distribution": plotting.accuracy_distribution(table, full, chance, titled("Component accuracy by layer")),
    }
    runs = [item.run for item in group]
    for relation, (run_a, run_b) in stability_pairs(runs).items():
        name_a, name_b = _pair_name(run_a, run_b, relation)
        figures[f"{prefix}-stability-{relation}"] = plotting.stability_scatter(
            run_a.component_accuracy, run_b.component_accuracy, run_a.component_names, accuracy_correlation(run_a, run_b),
            name_a, name_b, chance, f"{reference.prompts.task}: component accuracy across {relation}")
    if len(runs) > 2:
        matrix = correlation_matrix(runs)
        matrix.index = matrix.columns = [run_label(r).split(" ", 1)[1] for r in runs]
        figures[f"{prefix}-correlation"] = plotting.correlation_heatmap(
            matrix, f"{reference.prompts.task}: agreement of component accuracies between runs")
    if weights_file(group[0].path).is_file():
        names, weights = load_weights(group[0].path)
        figures[f"{prefix}-weights"] = plotting.weights_heatmap(
            names, weights, titled("Learned component weights (24 labelled examples)"))
    if model is not None:
        head = pick_heads(table)["good"]
        inspection = head_inspection(reference, head, model, examples=(0,), table=table)  # type: ignore[arg-type]
        figures[f"{prefix}-head-{head}"] = plotting.head_closeup(inspection)
    return figures


def results_figures(
    path: str | Path, tasks: Sequence[str] | None = None, examples: int | None = None
) -> dict[str, go.Figure]:
    """The method bars from a `results.csv` written by `parts evaluate` (none if it is absent), for
    `tasks` and runs of `examples` test examples when given; one figure per model."""
    path = Path(path)
    if not path.is_file():
        return {}
    results = read_results(path)
    if tasks:
        results = results[results["task"].isin(list(tasks))]
    if examples is not None and "limit" in results.columns:
        results = results[results["limit"].astype(str) == str(examples)]
    if results.empty:
        return {}
    if "model" not in results.columns or results["model"].nunique() == 1:
        return {"reweighting-accuracy": plotting.method_bars(results)}
    return {f"reweighting-accuracy-{str(m).replace('/', '--')}": plotting.method_bars(rows, f"Accuracy by method, {m}")
            for m, rows in results.groupby("model", sort=False)}


def test_run_sizes(root: str | Path) -> dict[str, list[int]]:
    """Per task, the numbers of test examples (`--examples` values) of the finished runs under `root`, read from
    their summaries alone (what a `--tasks` or `--examples` filter can keep)."""
    sizes: dict[str, set[int]] = {}
    for path in find_runs(root):
        try:
            summary = json.loads((path / SUMMARY).read_text())
        except (OSError, ValueError):
            continue  # damaged: loading it says so
        if isinstance(summary, dict) and summary.get("split") == "test":
            sizes.setdefault(str(summary.get("task")), set()).add(int(summary.get("n_examples", 0)))
    return {task: sorted(n) for task, n in sizes.items()}


def no_figure_reason(root: str | Path, tasks: Sequence[str] | None, examples: int | None) -> str:
    """Why the filters left no figure, and the values that would draw some (for the one-line error)."""
    sizes = test_run_sizes(root)
    if not sizes:
        return f"no finished test run under {root}: decompose some test runs first (parts sweep --out {root})"
    kept = {task: n for task, n in sizes.items() if not tasks or task in tasks}
    if not kept:
        return f"no test run under {root} is of --tasks {','.join(tasks or [])}: its tasks are {', '.join(sizes)}"
    if examples is not None and not any(examples in n for n in kept.values()):
        every = sorted({size for n in kept.values() for size in n})
        per_task = "; ".join(f"{task} {', '.join(map(str, n))}" for task, n in kept.items())
        return (f"no test run under {root} has {examples} examples: use --examples "
                f"{' or '.join(map(str, every))} (runs per task: {per_task}), or drop --examples to draw every size")
    return f"no figure to draw from the runs under {root} with these filters: check --only"


def figure_set(
    root: str | Path,
    model_loader: Callable[[str], object] | None = None,
    tasks: Sequence[str] | None = None,
    results: str | Path | None = None,
    examples: int | None = None,
    only: Sequence[str] | None = None,
) -> dict[str, go.Figure]:
    """Every figure the runs under `root` support, by file name.

    `model_loader(model_name)` gives the model for the head close-ups (none: they are skipped);
    `tasks` and `examples` keep only runs of those tasks and of that many test examples; `results`
    is the results.csv for the method bars (default: `root/results.csv`); `only` keeps the figures
    whose names match one of its shell patterns (`*-heatmap`)."""
    saved = [s for s in load_saved_runs(root)
             if (not tasks or s.run.prompts.task in tasks) and (examples is None or s.run.n_examples == examples)]
    wanted = (lambda name: any(fnmatch(name, pattern) for pattern in only)) if only else (lambda name: True)
    figures: dict[str, go.Figure] = {}
    models: dict[str, object] = {}
    for prefix, group in test_groups(saved).items():
        model = None
        # A close-up is named {prefix}-head-L<l>H<h>: load the model only if such a name is wanted.
        head_wanted = not only or any(fnmatch(f"{prefix}-head-L0H0", p) or p.startswith(f"{prefix}-head-") for p in only)
        if model_loader is not None and head_wanted:
            name = group[0].run.model
            model = models[name] if name in models else models.setdefault(name, model_loader(name))
        figures.update(group_figures(prefix, group, model))
    figures.update(results_figures(Path(root) / RESULTS_CSV if results is None else results, tasks, examples))
    return {name: figure for name, figure in figures.items() if wanted(name)}
