"""Components as classifiers: per-component statistics, categories, and their stability across runs.

Per run (`component_table`): every head and MLP's accuracy, macro accuracy, the share of
examples it predicts as each label, and a category after the paper's Section 4:

- label-biased: predicts one label on at least `label_bias_threshold` of the examples (the
  paper's rule is "the same label on the entire test set", i.e. a threshold of 1.0);
- bad: accuracy significantly below chance (one-sided binomial test, p < `alpha` after a Holm
  correction over all components: see `parts.analysis.stats`), not label-biased;
- good: accuracy significantly above chance and at least the full model's, not label-biased;
- neutral: the rest.

Chance is the accuracy a component would get if its predictions were independent of the gold
labels: `sum over labels of share(label) * gold frequency(label)`. On a label-balanced test set
(every `--limit` sample) that is 1/n_labels for every component; on an unbalanced one it keeps a
component that always answers the majority label at chance instead of calling it good (against
1/n_labels) or a fair coin bad (against the majority rate).

Across runs (`accuracy_correlation`, `correlation_matrix`, `pair_table`): Pearson and Spearman
correlation of the component accuracies of two runs of the same model and task, and the IoU of
their top-k components (the paper's Section 5: 0.80 across demonstration sets, 0.57 across
minimally contrastive templates for Llama-2-7B).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import einops
import pandas as pd
import torch
from jaxtyping import Float, Int
from scipy import stats
from torch import Tensor

from parts.analysis.stats import adjust_pvalues, binomial_p_values, chance_accuracy, chance_extremes, is_significant
from parts.components import parse_component
from parts.data.tasks import get_task
from parts.decomposition.effect_data import TotalEffects
from parts.decomposition.runs import DecompositionRun
from parts.errors import PartsError

CATEGORIES = ("good", "bad", "label-biased", "neutral")
CORRECTION_NAMES = {"holm": "Holm-corrected over components", "bh": "Benjamini-Hochberg-corrected over components",
                    "none": "uncorrected"}
METHODS = ("pearson", "spearman")


# -- per-component statistics --------------------------------------------------------------
def label_shares(predictions: Int[Tensor, "example component"], n_labels: int) -> Float[Tensor, "component label"]:
    """Share of examples each component predicts as each label (float64: 9/10 must equal a 0.9 threshold)."""
    one_hot = torch.nn.functional.one_hot(predictions, n_labels).double()
    return einops.reduce(one_hot, "example component label -> component label", "mean")


def macro_accuracy(
    predictions: Int[Tensor, "example component"], labels: Int[Tensor, " example"], n_labels: int
) -> Float[Tensor, " component"]:
    """Mean over the gold labels present of each component's recall on that label."""
    correct = (predictions == einops.rearrange(labels, "example -> example 1")).float()
    gold = torch.nn.functional.one_hot(labels, n_labels).float()
    hits = einops.einsum(correct, gold, "example component, example label -> component label")
    counts = einops.reduce(gold, "example label -> label", "sum")
    present = counts > 0
    recall = hits[:, present] / counts[present]
    return einops.reduce(recall, "component label -> component", "mean")


def categorize(
    table: pd.DataFrame, full_accuracy: float, label_bias_threshold: float = 0.9, alpha: float = 0.05
) -> pd.Series:
    """The category of every row of a component table (label-biased first, then bad, good, neutral)."""
    biased = table["label_bias"] >= label_bias_threshold
    bad = ~biased & is_significant(table["p_below"], alpha)
    # A tolerance so a component with exactly the full model's accuracy is not lost to rounding.
    good = ~biased & is_significant(table["p_above"], alpha) & (table["accuracy"] >= full_accuracy - 1e-9)
    category = pd.Series("neutral", index=table.index, dtype=object)
    category[good] = "good"
    category[bad] = "bad"
    category[biased] = "label-biased"
    return category


def component_table(
    run: DecompositionRun, label_bias_threshold: float = 0.9, alpha: float = 0.05, correction: str = "holm",
    effects: TotalEffects | None = None,
) -> pd.DataFrame:
    """One row per component (in `run.component_names` order) with its statistics and category; with the run's
    total effects (`parts.decomposition.effects`), also its total-effect classifier's accuracy (`total_accuracy`),
    chance (`total_chance`), corrected p-value above chance (`total_p_above_adjusted`) and whether it is above that
    yardstick (`total_above_chance`)."""
    if not 0 < label_bias_threshold <= 1:
        raise PartsError(f"label_bias_threshold must be in (0, 1], got {label_bias_threshold}")
    if not 0 < alpha < 1:
        raise PartsError(f"alpha must be in (0, 1), got {alpha}")
    label_names = list(run.prompts.label_names)
    n_labels = len(label_names)
    predictions = run.component_predictions
    labels = run.labels
    shares = label_shares(predictions, n_labels)
    chance = chance_accuracy(shares, labels)
    n_correct = (predictions == einops.rearrange(labels, "example -> example 1")).sum(0)
    p_above, p_below = binomial_p_values(n_correct.tolist(), run.n_examples, chance.tolist())
    kinds, layers, heads = zip(*(parse_component(n) for n in run.component_names), strict=True)
    table = pd.DataFrame({
        "component": run.component_names,
        "kind": kinds,
        "layer": layers,
        "head": heads,
        "accuracy": run.component_accuracy.double().numpy(),
        "macro_accuracy": macro_accuracy(predictions, labels, n_labels).double().numpy(),
    })
    for index, name in enumerate(label_names):
        table[f"share_{name}"] = shares[:, index].double().numpy()
    table["label_bias"] = shares.max(-1).values.double().numpy()
    table["majority_label"] = [label_names[i] for i in shares.argmax(-1).tolist()]
    table["chance"] = chance.double().numpy()
    table["p_above"] = p_above
    table["p_below"] = p_below
    # Uncorrected, ~4% of chance-level components would pass at alpha = 0.05 (about 12 of 300 per run):
    # categories use p-values corrected over components ("holm", "bh" or "none"; `parts.analysis.stats`).
    for side in ("above", "below"):
        raw = torch.tensor(table[f"p_{side}"].to_numpy(), dtype=torch.float64)
        table[f"p_{side}_adjusted"] = adjust_pvalues(raw, correction).numpy()
    adjusted = table.assign(p_above=table["p_above_adjusted"], p_below=table["p_below_adjusted"])
    table["category"] = categorize(adjusted, run.full_accuracy, label_bias_threshold, alpha)
    if effects is not None:
        add_total_effect_columns(table, run, effects, alpha, correction)
    return table


def add_total_effect_columns(table: pd.DataFrame, run: DecompositionRun, effects: TotalEffects, alpha: float,
                             correction: str) -> None:
    """The total-effect classifier of every component beside its direct one (same chance and test as direct)."""
    if effects.component_names != run.component_names or effects.total_effects.shape[0] != run.n_examples:
        raise PartsError("the total effects do not belong to this run (other components or examples): "
                         "rerun `parts effects` on it")
    predictions, labels = effects.predictions, run.labels
    shares = label_shares(predictions, len(run.prompts.label_names))
    chance = chance_accuracy(shares, labels)
    n_correct = (predictions == einops.rearrange(labels, "example -> example 1")).sum(0)
    p_above, _ = binomial_p_values(n_correct.tolist(), run.n_examples, chance.tolist())
    adjusted = adjust_pvalues(torch.tensor(p_above, dtype=torch.float64), correction).numpy()
    table["total_accuracy"] = effects.accuracy(labels).double().numpy()
    table["total_chance"] = chance.double().numpy()
    table["total_p_above_adjusted"] = adjusted
    table["total_above_chance"] = is_significant(pd.Series(adjusted, index=table.index), alpha)


def total_effect_report(run: DecompositionRun, table: pd.DataFrame, effects: TotalEffects) -> dict[str, Any]:
    """Direct against total effects in one run: their agreement, ORACLE-T1 by total effect beside its chance
    yardstick, and what becomes of the direct "good" components (stay above chance by total effect, or not:
    self-repair candidates) and which components only the total effect puts above chance (they gain)."""
    direct, total = torch.tensor(table["accuracy"].to_numpy()), torch.tensor(table["total_accuracy"].to_numpy())
    best = int(torch.argsort(total, descending=True, stable=True)[0])
    chance_best, _ = chance_extremes(run.n_examples, len(run.prompts.label_names), len(table))
    good = table["category"] == "good"
    above = table["total_above_chance"].astype(bool)
    settings = {key: effects.info.get(key) for key in ("method", "positions", "ablation", "freeze_norm")}
    return {
        "settings": settings,
        "pearson": _finite(_correlation(direct, total, "pearson")),
        "spearman": _finite(_correlation(direct, total, "spearman")),
        "oracle_t1": float(total[best]), "oracle_t1_component": run.component_names[best],
        "chance_best_of_n": chance_best,
        "direct_good": int(good.sum()), "stay_good": int((good & above).sum()),
        "stay_good_components": table.loc[good & above, "component"].tolist(),
        "lose": table.loc[good & ~above, "component"].tolist(),
        "gain": table.loc[~good & above & (table["category"] != "label-biased"), "component"].tolist(),
        "above_chance_by_total": int(above.sum()),
    }


def category_counts(table: pd.DataFrame) -> dict[str, int]:
    """How many components fall in each category (every category listed, zeros included)."""
    counts = table["category"].value_counts()
    return {category: int(counts.get(category, 0)) for category in CATEGORIES}


# -- stability across runs -----------------------------------------------------------------
def run_label(run: DecompositionRun) -> str:
    """'sst2 t1 s0': the run's task, template and seed."""
    return f"{run.prompts.task} t{run.prompts.template} s{run.prompts.seed}"


def check_comparable(run_a: DecompositionRun, run_b: DecompositionRun) -> None:
    """Refuse to compare runs of different models, tasks or component sets."""
    for what, a, b in (
        ("models", run_a.model, run_b.model),
        ("tasks", run_a.prompts.task, run_b.prompts.task),
    ):
        if a != b:
            raise PartsError(f"cannot compare runs of different {what} ({a!r} vs {b!r}): compare runs of one {what[:-1]}")
    if run_a.component_names != run_b.component_names:
        raise PartsError(
            f"cannot compare runs with different component sets ({len(run_a.component_names)} vs "
            f"{len(run_b.component_names)} components): compare runs of one model"
        )


def top_k(accuracy: Float[Tensor, " component"], k: int) -> set[int]:
    """Indices of the k most accurate components (ties: the earlier component, as `top_components`)."""
    return set(torch.argsort(accuracy, descending=True, stable=True)[:k].tolist())


def _correlation(a: Tensor, b: Tensor, method: str) -> float:
    if method not in METHODS:
        raise PartsError(f"unknown correlation method {method!r}: use pearson or spearman")
    x, y = a.double().numpy(), b.double().numpy()
    if x.std() == 0 or y.std() == 0:
        return math.nan  # undefined for a run whose components all score the same
    result = stats.pearsonr(x, y) if method == "pearson" else stats.spearmanr(x, y)
    return float(result[0])


def accuracy_correlation(run_a: DecompositionRun, run_b: DecompositionRun, k: int = 5) -> dict[str, float]:
    """Pearson and Spearman correlation of two runs' component accuracies, and their top-k IoU."""
    check_comparable(run_a, run_b)
    if k < 1:
        raise PartsError(f"k must be at least 1, got {k}")
    a, b = run_a.component_accuracy, run_b.component_accuracy
    top_a, top_b = top_k(a, k), top_k(b, k)
    return {
        "pearson": _correlation(a, b, "pearson"),
        "spearman": _correlation(a, b, "spearman"),
        "top_k_iou": len(top_a & top_b) / len(top_a | top_b),
    }


def _unique_labels(runs: Sequence[DecompositionRun]) -> list[str]:
    labels = [run_label(run) for run in runs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise PartsError(
            f"several runs are labelled {repeated[0]!r} (same task, template and seed): "
            "compare one split, shot count and example count at a time"
        )
    return labels


def correlation_matrix(runs: Sequence[DecompositionRun], method: str = "pearson") -> pd.DataFrame:
    """Correlation of component accuracies between every two runs, indexed by run label."""
    if method not in METHODS:
        raise PartsError(f"unknown correlation method {method!r}: use pearson or spearman")
    labels = _unique_labels(runs)
    for run in runs[1:]:
        check_comparable(runs[0], run)
    matrix = pd.DataFrame(1.0, index=labels, columns=labels)
    for (i, run_a), (j, run_b) in itertools.combinations(enumerate(runs), 2):
        value = _correlation(run_a.component_accuracy, run_b.component_accuracy, method)
        matrix.iloc[i, j] = matrix.iloc[j, i] = value
    return matrix


def pair_relation(run_a: DecompositionRun, run_b: DecompositionRun) -> str:
    """How two runs of a task differ: 'seeds' (same template), 'perturbed template' (the minimally
    contrastive pair, `Task.perturbed`), 'templates' (other template pairs, same seed) or 'both'."""
    a, b = run_a.prompts, run_b.prompts
    return relation_between(a.task, (a.template, a.seed), (b.template, b.seed))


def relation_between(task: str, run_a: tuple[int, int], run_b: tuple[int, int]) -> str:
    """`pair_relation` for two (template, seed) runs of `task`."""
    (template_a, seed_a), (template_b, seed_b) = run_a, run_b
    if template_a == template_b:
        return "seeds"
    if seed_a != seed_b:
        return "both"
    try:
        perturbed = get_task(task).perturbed
    except PartsError:  # a user task known only by name: no perturbed templates
        perturbed = {}
    if perturbed.get(template_a) == template_b or perturbed.get(template_b) == template_a:
        return "perturbed template"
    return "templates"


def pair_table(runs: Sequence[DecompositionRun], k: int = 5) -> pd.DataFrame:
    """One row per pair of runs: their labels, how they differ, and `accuracy_correlation`."""
    labels = _unique_labels(runs)
    rows = []
    for (i, run_a), (j, run_b) in itertools.combinations(enumerate(runs), 2):
        rows.append({"run_a": labels[i], "run_b": labels[j], "relation": pair_relation(run_a, run_b),
                     **accuracy_correlation(run_a, run_b, k)})
    return pd.DataFrame(rows, columns=["run_a", "run_b", "relation", "pearson", "spearman", "top_k_iou"])


def stability_summary(pairs: pd.DataFrame) -> pd.DataFrame:
    """Mean correlation and top-k IoU per relation, with the number of pairs."""
    grouped = pairs.groupby("relation")
    summary = grouped[["pearson", "spearman", "top_k_iou"]].mean()
    summary.insert(0, "pairs", grouped.size())
    return summary


# -- finding runs ----------------------------------------------------------------------------
def collection(path: str | Path) -> str:
    """The sweep root a run folder sits in (`root/<model>/<task>/<run>`): runs of one root are compared together."""
    parents = Path(path).parents
    return str(parents[2] if len(parents) > 2 else parents[0])


def group_runs(runs: Sequence[DecompositionRun], paths: Sequence[str | Path] | None = None) -> dict[tuple[Any, ...], list[int]]:
    """Indices of comparable runs: same collection (with paths), model, task, split, shots and number of examples."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, run in enumerate(runs):
        p = run.prompts
        where = collection(paths[index]) if paths is not None else ""
        groups.setdefault((where, run.model, p.task, p.split, p.shots, run.n_examples), []).append(index)
    return groups


# -- the report of `parts analyze` -----------------------------------------------------------
def _finite(value: float) -> float | None:
    """JSON has no NaN: an undefined correlation is written as null."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{key: _finite(v) if isinstance(v, float) else v for key, v in row.items()} for row in frame.to_dict("records")]


def run_report(
    run: DecompositionRun, table: pd.DataFrame, k: int = 5, path: str | Path | None = None,
    effects: TotalEffects | None = None,
) -> dict[str, Any]:
    """One run's headline numbers: accuracies, category counts, best and worst components (and, with its total
    effects, `total_effect_report` under "total_effects")."""
    p = run.prompts
    ranked = table.sort_values("accuracy", ascending=False, kind="stable")
    top = [{"component": row.component, "accuracy": float(row.accuracy), "category": row.category}
           for row in ranked.head(k).itertuples()]
    worst = ranked.iloc[-1]
    n_labels = len(p.label_names)
    chance_best, chance_worst = chance_extremes(run.n_examples, n_labels, len(table))
    biased_on_all = int((table["label_bias"] >= 1.0).sum())
    return {
        "label": run_label(run), "path": None if path is None else str(path), "model": run.model, "task": p.task,
        "template": p.template, "seed": p.seed, "split": p.split, "shots": p.shots, "n_examples": run.n_examples,
        "full_accuracy": run.full_accuracy, "majority_rate": run.chance, "category_counts": category_counts(table),
        # The paper's own rule: one label on every example.
        "label_biased_on_all_examples": biased_on_all,
        # The paper's measures (ORACLE-T1 / ORACLE-B1: best / worst single component chosen on the test set),
        # each beside what as many chance-level classifiers would reach on as many examples.
        "paper": {"full": run.full_accuracy, "oracle_t1": float(ranked.iloc[0]["accuracy"]),
                  "oracle_t1_component": ranked.iloc[0]["component"], "oracle_b1": float(worst["accuracy"]),
                  "oracle_b1_component": worst["component"], "chance": 1 / n_labels, "chance_best_of_n": chance_best,
                  "chance_worst_of_n": chance_worst, "n_components": len(table), "n_examples": run.n_examples,
                  "label_biased": biased_on_all, "label_biased_share": biased_on_all / len(table)},
        "top_components": top, "best_accuracy": top[0]["accuracy"],
        "worst_component": {"component": worst["component"], "accuracy": float(worst["accuracy"])},
        "components": _records(table),
        **({"total_effects": total_effect_report(run, table, effects)} if effects is not None else {}),
    }


def group_report(
    runs: Sequence[DecompositionRun], reports: Sequence[dict[str, Any]], k: int = 5, where: str = ""
) -> dict[str, Any]:
    """Comparable runs together: correlation matrices, every pair, means per relation, best vs full."""
    first = runs[0]
    pairs = pair_table(runs, k)
    stability = stability_summary(pairs) if len(pairs) else pd.DataFrame()
    best = [r["best_accuracy"] for r in reports]
    full = [r["full_accuracy"] for r in reports]
    worst = [r["worst_component"]["accuracy"] for r in reports]
    return {
        "collection": where, "model": first.model, "task": first.prompts.task, "split": first.prompts.split,
        "shots": first.prompts.shots, "n_examples": first.n_examples, "runs": [run_label(run) for run in runs],
        "pearson": _records(correlation_matrix(runs, "pearson").reset_index(names="run")),
        "spearman": _records(correlation_matrix(runs, "spearman").reset_index(names="run")),
        "pairs": _records(pairs),
        "stability": {relation: {key: _finite(v) if key != "pairs" else int(v) for key, v in row.items()}
                      for relation, row in stability.to_dict("index").items()},
        "best_vs_full": {
            "runs": len(runs), "best_beats_full": sum(b > f for b, f in zip(best, full, strict=True)),
            "mean_best": sum(best) / len(best), "mean_full": sum(full) / len(full), "mean_worst": sum(worst) / len(worst),
        },
        "mean_category_counts": {c: sum(r["category_counts"][c] for r in reports) / len(reports) for c in CATEGORIES},
    }


def analysis_report(
    runs: Sequence[DecompositionRun],
    paths: Sequence[str | Path] | None = None,
    label_bias_threshold: float = 0.9,
    alpha: float = 0.05,
    k: int = 5,
    correction: str = "holm",
    effects: Sequence[TotalEffects | None] | None = None,
) -> dict[str, Any]:
    """Everything `parts analyze` prints and saves, as plain JSON-ready data (`effects`: each run's total
    effects, or None where it has none)."""
    if not runs:
        raise PartsError("no runs to analyse")
    effects = list(effects) if effects is not None else [None] * len(runs)
    reports = [
        run_report(run, component_table(run, label_bias_threshold, alpha, correction, effects[i]), k,
                   None if paths is None else paths[i], effects[i])
        for i, run in enumerate(runs)
    ]
    groups = []
    for key, indices in group_runs(runs, paths).items():
        group = group_report([runs[i] for i in indices], [reports[i] for i in indices], k, where=key[0])
        groups.append({**group, "run_indices": indices})
    return {
        "settings": {"label_bias_threshold": label_bias_threshold, "alpha": alpha, "k": k, "correction": correction},
        "runs": reports,
        "groups": groups,
    }


def format_report(report: dict[str, Any], top: int = 3) -> str:
    """The readable text of an analysis report: per run, then per group of comparable runs."""
    settings = report["settings"]
    lines = [
        "the paper's measures: ORACLE-T1 / ORACLE-B1 = best / worst single component chosen on the test set, beside "
        "the expected best / worst of as many chance-level classifiers on as many examples; label-biased = one "
        "label on every test example (its share grows as n shrinks)",
        f"parts' extension, significance categories: label-biased = one label on >= "
        f"{settings['label_bias_threshold']:.0%} of examples; good/bad = binomial p < {settings['alpha']} above/below "
        f"chance, {CORRECTION_NAMES[settings['correction']]} (good also >= the full model)",
    ]
    for group in report["groups"]:
        members = [report["runs"][i] for i in group["run_indices"]]
        where = f"{group['collection']} | " if group["collection"] else ""
        lines += ["", f"{where}{group['model']} | {group['task']} | {group['split']} n={group['n_examples']} | "
                      f"{group['shots']}-shot | {len(members)} run{'' if len(members) == 1 else 's'}",
                  f"{'run':<14} {'FULL':>6} {'T1':>6} {'(N@chance)':>10} {'B1':>6} {'(N@chance)':>10} "
                  f"{'biased(all)':>11} | extension: {'good':>4} {'bad':>4} {'biased':>6} {'neutral':>7}  top components"]
        for r in members:
            counts, measures = r["category_counts"], r["paper"]
            best = ", ".join(f"{c['component']} {c['accuracy']:.1%}" for c in r["top_components"][:top])
            lines.append(f"{r['label']:<14} {measures['full']:6.1%} {measures['oracle_t1']:6.1%} "
                         f"{measures['chance_best_of_n']:10.1%} {measures['oracle_b1']:6.1%} "
                         f"{measures['chance_worst_of_n']:10.1%} {measures['label_biased']:5d}/{measures['n_components']:<5d} "
                         f"| {'':>10} {counts['good']:4d} {counts['bad']:4d} {counts['label-biased']:6d} "
                         f"{counts['neutral']:7d}  {best}")
        for r in members:
            if "total_effects" in r:
                lines.append(format_total_effects(r))
        if group["stability"]:
            lines.append(f"{'agreement of component accuracies':<36} {'pairs':>5} {'pearson':>8} {'spearman':>8} "
                         f"{'top-' + str(settings['k']) + ' IoU':>9}")
            for relation, row in group["stability"].items():
                lines.append(f"  {relation:<34} {row['pairs']:5d} {_fmt(row['pearson']):>8} {_fmt(row['spearman']):>8} "
                             f"{_fmt(row['top_k_iou']):>9}")
        versus = group["best_vs_full"]
        lines.append(f"best component beats the full model in {versus['best_beats_full']}/{versus['runs']} runs "
                     f"(mean best {versus['mean_best']:.1%} vs full {versus['mean_full']:.1%}; "
                     f"mean worst {versus['mean_worst']:.1%})")
    return "\n".join(lines)


def format_total_effects(report: dict[str, Any]) -> str:
    """One run's direct-vs-total line of `parts analyze`."""
    t = report["total_effects"]
    how = f"{t['settings']['ablation']} ablation, {t['settings']['positions']} position(s), {t['settings']['method']}"
    lose = ", ".join(t["lose"][:5]) or "none"
    gain = ", ".join(t["gain"][:5]) or "none"
    return (f"  {report['label']} total effects ({how}): direct vs total accuracy pearson {_fmt(t['pearson'])}, "
            f"spearman {_fmt(t['spearman'])}; T1 by total {t['oracle_t1']:.1%} ({t['oracle_t1_component']}; "
            f"{t['chance_best_of_n']:.1%} at chance); direct-good {t['direct_good']}, above chance by total "
            f"{t['stay_good']}; lose (self-repair candidates): {lose}; gain: {gain}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
