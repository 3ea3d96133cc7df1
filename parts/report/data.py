"""What a report shows, computed from saved runs as plain JSON-ready data.

Test runs are grouped as `parts.analysis.analyze.group_runs` groups them (same sweep root, model,
task, split, shots and number of examples: accuracies that compare); each group is one task page,
its runs sorted by (template, seed). Per page (`task_data`):

- per run and component: accuracy, the share of examples predicted as each label, the category
  (`parts.analysis.analyze.component_table`), and the mean over runs;
- the heatmap's figure (`parts.figures.plotting.accuracy_heatmap` of the mean) and colour-bar
  ticks per run, so the page swaps a run's numbers into one figure;
- stability: Pearson correlation of component accuracies between every two runs
  (`parts.analysis.paper.agreement_pairs`), averaged into a seeds x seeds matrix (same template: other
  demonstrations) and a templates x templates matrix (same seed), and the paper's Table 2 for the task;
- per layer, loaded only when one of its components is opened (`layer_details`): histograms of every
  component's vote margin split by gold label, and its learned reweighting weights.

The overview: every page's runs measured as the paper does (`run_measures`: FULL, ORACLE-T1/B1 beside the
best and worst of N at chance, via `parts.analysis.paper`), and `main_tables` from `parts evaluate`'s results.

Histograms keep the size bounded: `HISTOGRAM_BINS` counts per (component, gold label, run), and
for a task with more than `PER_RUN_HISTOGRAMS` runs one histogram per template (its seeds pooled).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import einops
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import torch
from jaxtyping import Float, Int
from torch import Tensor

from parts.analysis import paper
from parts.analysis.analyze import (
    CATEGORIES,
    component_table,
    group_runs,
)
from parts.analysis.stats import chance_extremes
from parts.decomposition.effect_data import TotalEffects, has_effects
from parts.decomposition.runs import DecompositionRun, load_saved_runs
from parts.errors import PartsError
from parts.experiments.export import interval_tables
from parts.experiments.results import RESULTS_CSV, mean_std_table, read_results
from parts.figures import plotting
from parts.methods import method_label
from parts.reweighting.reweight import load_weights

HISTOGRAM_BINS = 24
PER_RUN_HISTOGRAMS = 25  # more runs than this in a task: one histogram per template instead of per run
DIGITS = 4  # accuracies and shares are multiples of 1/n: 4 decimals keep n <= 10000 exact enough to read


@dataclass(frozen=True)
class TaskRuns:
    """The comparable test runs of one task page, sorted by (template, seed), and their folders."""

    key: str  # the page's file-safe name: the task, with shots, size or model added only where needed
    paths: tuple[Path, ...]
    runs: tuple[DecompositionRun, ...]

    @property
    def reference(self) -> DecompositionRun:
        return self.runs[0]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "task"


def collect_tasks(root: str | Path) -> tuple[list[TaskRuns], int]:
    """Every group of comparable test runs under `root`, and how many train runs were left out."""
    saved = load_saved_runs(root)
    test = [(item.path, item.run) for item in saved if item.run.prompts.split == "test"]
    if not test:
        raise PartsError(f"the runs under {root} are all --split train runs: the report shows test runs; "
                         f"run `parts sweep --out {root}` for the test split")
    groups = group_runs([run for _, run in test], [path for path, _ in test])
    models = {key[1] for key in groups}
    tasks, used = [], set()
    for (_, model, task, _, shots, n), indices in groups.items():
        same_task = sum(1 for key in groups if key[1] == model and key[2] == task)
        key = task if same_task == 1 else f"{task}-k{shots}-n{n}"
        key = _safe(f"{model}-{key}" if len(models) > 1 else key)
        while key in used:  # the same settings in two sweep roots under `root`
            key += "-2"
        used.add(key)
        members = sorted((test[i] for i in indices), key=lambda item: (item[1].prompts.template, item[1].prompts.seed))
        tasks.append(TaskRuns(key, tuple(p for p, _ in members), tuple(r for _, r in members)))
    return tasks, len(saved) - len(test)


def run_name(run: DecompositionRun) -> str:
    """'t1 s0': a run within its task."""
    return f"t{run.prompts.template} s{run.prompts.seed}"


def _rounded(values: Tensor | np.ndarray | Sequence[float]) -> Any:
    return np.round(np.asarray(values, dtype=np.float64), DIGITS).tolist()


def figure_json(figure: go.Figure) -> dict[str, Any]:
    """A figure as the plain {data, layout} that `Plotly.newPlot` takes."""
    return json.loads(pio.to_json(figure, validate=False, remove_uids=True))


def clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null (an undefined correlation), recursively."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


# -- the vote margin and its histograms ---------------------------------------------------------
def margin_axis(label_names: Sequence[str]) -> str:
    """What `vote_margin` measures, as an axis title."""
    if len(label_names) == 2:
        return f"logit '{label_names[1]}' − logit '{label_names[0]}'"
    return "gold label's logit − best other label's logit"


def vote_margin(run: DecompositionRun) -> Float[Tensor, "example component"]:
    """What decides each component's vote on each example: for two labels logit(label 1) - logit(label 0)
    (the vote is label 1 above 0); for more, the gold label's logit minus the largest other label's
    (the vote is right above 0)."""
    logits = run.component_logits.float()
    if logits.shape[-1] == 2:
        return logits[..., 1] - logits[..., 0]
    gold_index = einops.repeat(run.labels, "example -> example component 1", component=logits.shape[1])
    gold = logits.gather(-1, gold_index)
    others = logits.scatter(-1, gold_index, float("-inf")).amax(-1, keepdim=True)
    return einops.rearrange(gold - others, "example component 1 -> example component")


def histogram_groups(runs: Sequence[DecompositionRun]) -> list[dict[str, Any]]:
    """Which runs each stored histogram pools: one per run, or one per template for a long sweep."""
    if len(runs) <= PER_RUN_HISTOGRAMS:
        return [{"label": run_name(run), "runs": [i]} for i, run in enumerate(runs)]
    templates = sorted({run.prompts.template for run in runs})
    return [{"label": f"template {t} ({sum(r.prompts.template == t for r in runs)} seeds pooled)",
             "runs": [i for i, r in enumerate(runs) if r.prompts.template == t]} for t in templates]


def margin_histograms(
    margins: Float[Tensor, "run example component"], labels: Int[Tensor, "run example"], group_of_run: Sequence[int],
    n_labels: int, bins: int = HISTOGRAM_BINS,
) -> tuple[Float[Tensor, "component edge"], Int[Tensor, "group component gold bin"]]:
    """Counts of each component's margin per (group of runs, gold label, bin), over bins shared by all runs
    of the component (its [min, max] cut in `bins` equal bins), and those [min, max] per component."""
    n_runs, _, n_components = margins.shape
    low = einops.reduce(margins, "run example component -> component", "min")
    high = einops.reduce(margins, "run example component -> component", "max")
    high = torch.where(high > low, high, low + 1.0)  # a constant component: one bin holds everything
    position = (margins - low) / (high - low) * bins
    bin_index = position.floor().long().clamp(0, bins - 1)
    group = torch.tensor(group_of_run, dtype=torch.long)
    n_groups = int(group.max()) + 1
    flat = ((einops.repeat(group, "run -> run example component", example=margins.shape[1], component=n_components)
             * n_components + torch.arange(n_components)) * n_labels
            + einops.repeat(labels, "run example -> run example component", component=n_components)) * bins + bin_index
    counts = torch.bincount(flat.flatten(), minlength=n_groups * n_components * n_labels * bins)
    counts = einops.rearrange(counts, "(group component gold bin) -> group component gold bin",
                              group=n_groups, component=n_components, gold=n_labels)
    return torch.stack([low, high], -1), counts


# -- the results of `parts evaluate` -------------------------------------------------------------
def results_path(root: str | Path, results: str | Path | None = None) -> Path | None:
    """The `results.csv` of `parts evaluate` to show: `results` (which must exist), else `root/results.csv` if any."""
    path = Path(root) / RESULTS_CSV if results is None else Path(results)
    if not path.is_file():
        if results is not None:
            raise PartsError(f"{path} does not exist: give the results.csv written by `parts evaluate`")
        return None
    return path


def read_results_frame(path: Path) -> pd.DataFrame:
    """`results.csv` as a typed table (`parts.experiments.results.read_results`), its path named if it is not one."""
    try:
        return read_results(path)
    except PartsError as err:
        raise PartsError(f"{path}: {err}") from None


def main_tables(root: str | Path, path: Path, tasks: Mapping[str, str | Path] | None = None) -> list[dict[str, Any]]:
    """The main table per (model, test size) in `path`: every method's accuracy per task with a 95% hierarchical
    bootstrap interval and CompRW minus each baseline (`parts.experiments.export.interval_tables`, recomputed from
    the run folders under `root`); where that cannot be done (a setting's files are missing, a user task whose
    JSON is not in `tasks`), mean ± sd over templates x seeds (`parts.experiments.results.mean_std_table`) and why.
    With intervals, `settings` is the sentence naming the settings the table holds and the methods it leaves out
    for running on fewer settings (`parts.analysis.paper.main_settings_line`, as `parts evaluate` prints it)."""
    frame = read_results_frame(path)
    tables = []
    for (model, limit), group in frame.groupby(["model", "limit"], sort=False):
        entry: dict[str, Any] = {"model": str(model), "limit": str(limit)}
        try:
            accuracy, differences, settings = interval_tables(root, group, tasks)
            if accuracy.empty:
                raise PartsError("no setting's predictions could be recomputed")
            entry |= {"intervals": True, "accuracy": accuracy, "differences": differences, "note": "",
                      "settings": settings}
        except PartsError as err:
            entry |= {"intervals": False, "accuracy": mean_std_table(group), "differences": None, "note": str(err),
                      "settings": ""}
        tables.append(entry)
    return tables


def run_results(results: pd.DataFrame | None, run: DecompositionRun) -> dict[str, float]:
    """The accuracy of every method `parts evaluate` scored on this run's setting, by the main table's headings."""
    if results is None:
        return {}
    p = run.prompts
    rows = results[(results["task"] == p.task) & (results["template"].astype(str) == str(p.template))
                   & (results["seed"].astype(str) == str(p.seed)) & (results["limit"].astype(str) == str(run.n_examples))
                   & (results["shots"].astype(str) == str(p.shots))]
    return {method_label(str(r.method), int(r.labels), p.shots): float(r.accuracy) for r in rows.itertuples()}


def learned_weights(path: Path, run: DecompositionRun) -> dict[str, Float[Tensor, " component"]]:
    """Every reweighting learned for a test run by `parts evaluate`, clipped to [0, 1] as predictions use
    them, by label budget ('24', ..., 'oracle': fitted on the test set itself)."""
    found = {}
    for file in sorted(path.glob("reweight-labels*.safetensors")):
        budget = file.name[len("reweight-labels"):-len(".safetensors")]
        names, weights = load_weights(path, labels=budget)
        if names == run.component_names:
            found[budget] = weights.float().clamp(0.0, 1.0)
    return dict(sorted(found.items(), key=lambda item: (not item[0].isdigit(), int(item[0]) if item[0].isdigit() else 0)))


# -- stability ------------------------------------------------------------------------------------
def runs_frame(task: str, runs: Sequence[Mapping[str, Any]], accuracy: np.ndarray, n_examples: int,
               n_labels: int) -> pd.DataFrame:
    """A task's runs in the layout of `parts.experiments.export.run_rows` (`runs.csv`), which
    `parts.analysis.paper` reads: one row per run, its component accuracies space-separated."""
    return pd.DataFrame({
        "task": task, "template": [r["template"] for r in runs], "seed": [r["seed"] for r in runs],
        "n_examples": n_examples, "n_labels": n_labels, "full": [r["full_accuracy"] for r in runs],
        "label_biased": [r["label_biased"] for r in runs],
        "accuracies": [" ".join(map(repr, row)) for row in np.asarray(accuracy, dtype=np.float64).tolist()],  # exact
    }, index=range(len(runs)))


def stability_matrices(pairs: pd.DataFrame, runs: Sequence[Mapping[str, Any]]) -> dict[str, pd.DataFrame]:
    """Pearson correlation of component accuracies between runs (`pairs`: `parts.analysis.paper.agreement_pairs`):
    every pair ('runs'), and averaged into seeds x seeds over templates ('demonstrations') and templates x
    templates over seeds ('templates')."""
    names = [f"t{r['template']} s{r['seed']}" for r in runs]
    matrix = pd.DataFrame(1.0, index=names, columns=names)
    for pair in pairs.itertuples():
        matrix.loc[pair.run_a, pair.run_b] = matrix.loc[pair.run_b, pair.run_a] = pair.pearson
    long = matrix.rename_axis(index="a", columns="b").stack().rename("r").reset_index()
    setting = {name: (r["template"], r["seed"]) for name, r in zip(names, runs, strict=True)}
    long["template_a"], long["seed_a"] = zip(*(setting[a] for a in long["a"]), strict=True)
    long["template_b"], long["seed_b"] = zip(*(setting[b] for b in long["b"]), strict=True)
    matrices = {"runs": matrix}
    same_template = long[long["template_a"] == long["template_b"]]
    if same_template["seed_a"].nunique() > 1:
        demonstrations = same_template.pivot_table(index="seed_a", columns="seed_b", values="r", aggfunc="mean")
        demonstrations.index = demonstrations.columns = [f"seed {s}" for s in demonstrations.columns]
        matrices["demonstrations"] = demonstrations
    same_seed = long[long["seed_a"] == long["seed_b"]]
    if same_seed["template_a"].nunique() > 1:
        templates = same_seed.pivot_table(index="template_a", columns="template_b", values="r", aggfunc="mean")
        templates.index = templates.columns = [f"template {t}" for t in templates.columns]
        matrices["templates"] = templates
    return matrices


STABILITY_TITLES = {
    "demonstrations": "Across demonstrations: seed x seed, same template (mean over templates)",
    "templates": "Across templates: template x template, same seed (mean over seeds)",
    "runs": "Every pair of runs",
}


# -- a task page ------------------------------------------------------------------------------------
def _category_codes(table: pd.DataFrame) -> list[int]:
    return [CATEGORIES.index(c) for c in table["category"]]


def _mode_category(codes: np.ndarray) -> list[str]:
    """The most frequent category of each component over runs (ties: the earlier in CATEGORIES)."""
    return [CATEGORIES[int(np.bincount(column, minlength=len(CATEGORIES)).argmax())] for column in codes.T]


def task_data(
    task: TaskRuns, root: str | Path, results: pd.DataFrame | None = None, attention_heads: Sequence[str] = (),
) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """A task page's data, and its per-layer details (histograms, weights) keyed by layer."""
    runs, reference = task.runs, task.reference
    label_names = list(reference.prompts.label_names)
    tables = [component_table(run) for run in runs]
    first = tables[0]
    accuracy = np.stack([t["accuracy"].to_numpy() for t in tables])  # [run component]
    share_columns = [f"share_{name}" for name in label_names]
    shares = np.stack([t[share_columns].to_numpy() for t in tables])  # [run component label]
    codes = np.array([_category_codes(t) for t in tables])  # [run component]
    chance = 1 / len(label_names)  # as the overview and the paper's yardsticks: the majority rate is named apart
    mean_full = float(np.mean([r.full_accuracy for r in runs]))
    mean_table = first[["component", "kind", "layer", "head"]].assign(
        accuracy=accuracy.mean(0), label_bias=shares.mean(0).max(-1), category=_mode_category(codes))
    heatmap = plotting.accuracy_heatmap(mean_table, mean_full, chance, "Accuracy of every component")
    root = Path(root)
    run_rows = [{"template": r.prompts.template, "seed": r.prompts.seed, "full_accuracy": r.full_accuracy,
                 "label_biased": int((t["label_bias"] >= 1.0).sum())}  # the paper's rule: one label on every example
                for r, t in zip(runs, tables, strict=True)]
    frame = runs_frame(reference.prompts.task, run_rows, accuracy, reference.n_examples, len(label_names))
    pairs = paper.agreement_pairs(frame)
    matrices = stability_matrices(pairs, run_rows) if len(runs) > 1 else {}
    # every template the user ran (the docs' Table 2 keeps the paper's templates 1-3)
    agreement = paper.agreement_table(pairs, templates=None).drop(columns="task") if len(runs) > 1 else pd.DataFrame()
    groups = histogram_groups(runs)
    group_of_run = [0] * len(runs)
    for g, group in enumerate(groups):
        for i in group["runs"]:
            group_of_run[i] = g
    weights = [learned_weights(path, run) for path, run in zip(task.paths, runs, strict=True)]
    budgets = list(dict.fromkeys(b for w in weights for b in w))
    data = {
        "key": task.key, "task": reference.prompts.task, "model": reference.model, "split": reference.prompts.split,
        "shots": reference.prompts.shots, "n_examples": reference.n_examples, "label_names": label_names,
        "label_words": list(reference.prompts.label_words), "n_layers": reference.n_layers, "n_heads": reference.n_heads,
        "chance": chance, "majority_rate": reference.chance,
        "categories": list(CATEGORIES), "category_colors": plotting.CATEGORY_COLORS,
        "components": list(reference.component_names),
        "kind": first["kind"].tolist(), "layer": first["layer"].tolist(), "head": first["head"].tolist(),
        "cell": plotting.heatmap_cells(mean_table),  # [heatmap trace, layer, column] per component
        "runs": [{
            "label": run_name(run), "template": run.prompts.template, "seed": run.prompts.seed,
            "full_accuracy": run.full_accuracy, "majority_rate": run.chance,
            "colorbar": plotting.accuracy_colorbar(chance, run.full_accuracy),
            "path": path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name,
            "results": run_results(results, run),
            "label_biased": rows["label_biased"],
        } for path, run, rows in zip(task.paths, runs, run_rows, strict=True)],
        "accuracy": _rounded(accuracy), "shares": _rounded(shares), "category": codes.tolist(),
        "mean": {"accuracy": _rounded(accuracy.mean(0)), "shares": _rounded(shares.mean(0)), "full_accuracy": mean_full,
                 "colorbar": plotting.accuracy_colorbar(chance, mean_full)},
        "heatmap": figure_json(heatmap),
        "stability": {
            "figures": {name: clean(figure_json(plotting.correlation_heatmap(m, STABILITY_TITLES[name])))
                        for name, m in matrices.items()},
            "agreement": clean(agreement.to_dict("split")),
        },
        "histogram": {"bins": HISTOGRAM_BINS, "groups": groups, "axis": margin_axis(label_names)},
        "weights": budgets,
        "attention": {"heads": list(attention_heads), "run": 0} if attention_heads else None,
        "yardsticks": dict(zip(("best", "worst"), chance_extremes(reference.n_examples, len(label_names),
                                                                   len(reference.component_names)), strict=True)),
    }
    totals = [TotalEffects.load(path).accuracy(run.labels) if has_effects(path) else None
              for path, run in zip(task.paths, runs, strict=True)]
    if any(t is not None for t in totals):  # the component view plots them beside the direct accuracy
        data["total_accuracy"] = [None if t is None else _rounded(t) for t in totals]
    return data, layer_details(runs, first["layer"].tolist(), weights, group_of_run)


def layer_details(
    runs: Sequence[DecompositionRun], layers: Sequence[int], weights: Sequence[Mapping[str, Tensor]],
    group_of_run: Sequence[int],
) -> dict[int, dict[str, Any]]:
    """Per layer (`layers`: each component's), per component: margin histograms per group of runs and gold
    label, and learned weights per run."""
    reference = runs[0]
    margins = torch.stack([vote_margin(run) for run in runs])
    labels = torch.stack([run.labels for run in runs])
    edges, counts = margin_histograms(margins, labels, group_of_run, len(reference.prompts.label_names))
    budgets = list(dict.fromkeys(b for w in weights for b in w))
    details: dict[int, dict[str, Any]] = {}
    for index, (name, layer) in enumerate(zip(reference.component_names, layers, strict=True)):
        details.setdefault(int(layer), {})[name] = {
            "edges": _rounded(edges[index]),
            "counts": counts[:, index].tolist(),
            "weights": {b: [round(float(w[b][index]), DIGITS) if b in w else None for w in weights] for b in budgets},
        }
    return details


def attention_heads(data: Mapping[str, Any], k: int) -> list[str]:
    """The k heads most accurate on average over the task's runs (those whose attention a report shows)."""
    mean = data["mean"]["accuracy"]
    heads = [i for i, kind in enumerate(data["kind"]) if kind == "head"]
    ranked = sorted(heads, key=lambda i: (-mean[i], i))[:k]
    return [data["components"][i] for i in ranked]


# -- the overview ---------------------------------------------------------------------------------
def run_measures(data: Mapping[str, Any]) -> pd.DataFrame:
    """A task page's runs measured as the paper does (`parts.analysis.paper.run_measures`: FULL, ORACLE-T1,
    ORACLE-B1 and their chance yardsticks, label-biased components), in percent, the task named by its page."""
    frame = runs_frame(data["key"], data["runs"], np.asarray(data["accuracy"]), data["n_examples"], len(data["label_names"]))
    return paper.run_measures(frame, list(data["components"]))


def task_overview(task: TaskRuns, data: Mapping[str, Any], measures: pd.DataFrame) -> dict[str, Any]:
    """One task's line of the overview's list of runs found, and how often its best component beats FULL."""
    best_names = Counter(measures["best_component"])
    return {
        "key": task.key, "task": data["task"], "model": data["model"], "split": data["split"], "shots": data["shots"],
        "n_examples": data["n_examples"], "runs": len(task.runs), "n_labels": len(data["label_names"]),
        "templates": sorted({r.prompts.template for r in task.runs}), "seeds": sorted({r.prompts.seed for r in task.runs}),
        "full": float(measures["full"].mean()), "best": float(measures["best"].mean()),
        "best_beats_full": int((measures["best"] > measures["full"]).sum()),
        "most_often_best": best_names.most_common(1)[0],
    }


def overview_figure(measures: pd.DataFrame) -> go.Figure:
    """Per task: FULL, the best and the worst component (mean ± sd over runs) as bars, and the best and
    worst of as many chance-level components as markers (`run_measures`, percent)."""
    grouped = measures.groupby("task", sort=False)
    names = list(grouped.groups)
    mean, sd = grouped.mean(numeric_only=True), grouped.std(ddof=1, numeric_only=True).fillna(0.0)
    counts = grouped.size()
    figure = go.Figure()
    for what, label, color in (("full", "full model", "#444"), ("best", "best component (ORACLE-T1)", plotting.ABOVE),
                               ("worst", "worst component (ORACLE-B1)", plotting.BELOW)):
        figure.add_trace(go.Bar(
            x=names, y=mean.loc[names, what].tolist(), name=label, marker_color=color,
            error_y=dict(type="data", array=sd.loc[names, what].tolist(), thickness=1.2, width=3),
            customdata=np.stack([sd.loc[names, what], counts.loc[names]], -1),
            hovertemplate=f"{label}<br>%{{x}}: %{{y:.1f}}% ± %{{customdata[0]:.1f}} over %{{customdata[1]}} runs<extra></extra>",
        ))
    for what, symbol in (("best", "triangle-up"), ("worst", "triangle-down")):
        figure.add_trace(go.Scatter(
            x=names, y=mean.loc[names, f"chance_{what}"].tolist(), mode="markers", name=f"{what} of N at chance",
            marker=dict(symbol=symbol, size=13, color="#f2b01e", line=dict(width=1, color="black")),
            hovertemplate=f"expected {what} of as many components guessing at random: %{{y:.1f}}%<extra></extra>",
        ))
    figure.update_layout(barmode="group", bargap=0.25, legend=dict(orientation="h", y=-0.18), template="plotly_white",
                         font=plotting.FONT, height=430, margin=dict(l=60, r=20, t=50, b=40),
                         title=dict(text="Full model vs its best and worst component, per task", x=0.01))
    figure.update_yaxes(title_text="accuracy, % (mean ± sd over runs)", range=[0, 105], ticksuffix="%")
    return figure
