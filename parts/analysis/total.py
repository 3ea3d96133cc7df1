"""Direct against total effects across runs: the rows of `results/effects.csv` and the tables `parts tables`
builds from them (docs/effects.md).

One row per run with total effects (`parts effects`): the full model's accuracy, ORACLE-T1 by direct and by total
effect (each with a Wilson 95% interval over the run's examples) beside the expected best of as many chance-level
classifiers, the Pearson and Spearman correlation of direct and total accuracy over components (Fisher-z 95%
intervals over components), how many direct "good" components stay above chance by total effect, and per layer the
mean of total minus direct accuracy.
"""

from __future__ import annotations

import math
from typing import Any

import einops
import numpy as np
import pandas as pd
import torch
from scipy import stats

from parts.analysis.analyze import component_table, total_effect_report
from parts.analysis.stats import chance_extremes
from parts.components import parse_component
from parts.decomposition.effect_data import TotalEffects
from parts.decomposition.runs import DecompositionRun
from parts.errors import PartsError

EFFECT_COLUMNS = ("model", "task", "template", "seed", "n_examples", "n_components", "ablation", "positions", "method",
                  "full", "t1_direct", "t1_direct_component", "t1_total", "t1_total_low", "t1_total_high",
                  "t1_total_component", "chance_best_of_n", "pearson", "pearson_low", "pearson_high", "spearman",
                  "spearman_low", "spearman_high", "direct_good", "stay_good", "lose", "gain", "layer_difference",
                  "direct_accuracies", "total_accuracies")


def wilson(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score 95% interval of a proportion `correct / n`."""
    if n == 0:
        return math.nan, math.nan
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def correlation_interval(direct: torch.Tensor, total: torch.Tensor, method: str) -> tuple[float, float, float]:
    """(value, low, high): the correlation over components of direct and total accuracy (`direct`, `total`:
    [example component] correct or not), with a Fisher-z 95% interval over the components. It treats the
    components as independent draws, which they are not (a layer's heads move together): read it as a lower
    bound on the uncertainty. (A bootstrap over examples is biased here: resampling moves the many components
    stuck at one label off their constant accuracy in both classifiers alike.)"""
    correlate = stats.pearsonr if method == "pearson" else stats.spearmanr
    a, b = direct.double().mean(0).numpy(), total.double().mean(0).numpy()
    if a.std() == 0 or b.std() == 0:
        return math.nan, math.nan, math.nan
    r, n = float(correlate(a, b)[0]), a.shape[0]
    half = 1.959964 / math.sqrt(max(n - 3, 1))
    return r, math.tanh(math.atanh(max(min(r, 0.999999), -0.999999)) - half), \
        math.tanh(math.atanh(max(min(r, 0.999999), -0.999999)) + half)


def effects_row(run: DecompositionRun, effects: TotalEffects) -> dict[str, Any]:
    """One run's row of results/effects.csv (see the module docstring)."""
    if effects.component_names != run.component_names:
        raise PartsError("the total effects do not belong to this run: rerun `parts effects` on it")
    table = component_table(run, effects=effects)
    report = total_effect_report(run, table, effects)
    labels = einops.rearrange(run.labels, "example -> example 1")
    direct_correct, total_correct = run.component_predictions == labels, effects.predictions == labels
    best_total = run.component_names.index(report["oracle_t1_component"])
    low, high = wilson(int(total_correct[:, best_total].sum()), run.n_examples)
    best_direct = int(torch.argsort(run.component_accuracy, descending=True, stable=True)[0])
    pearson = correlation_interval(direct_correct, total_correct, "pearson")
    spearman = correlation_interval(direct_correct, total_correct, "spearman")
    layers = [parse_component(name).layer for name in run.component_names]
    difference = (table["total_accuracy"] - table["accuracy"]).groupby(layers).mean()
    chance_best, _ = chance_extremes(run.n_examples, len(run.prompts.label_names), len(run.component_names))
    p = run.prompts
    return {
        "model": run.model, "task": p.task, "template": p.template, "seed": p.seed, "n_examples": run.n_examples,
        "n_components": len(run.component_names), "ablation": effects.info.get("ablation"),
        "positions": effects.info.get("positions"), "method": effects.info.get("method"),
        "full": run.full_accuracy, "t1_direct": float(run.component_accuracy[best_direct]),
        "t1_direct_component": run.component_names[best_direct], "t1_total": report["oracle_t1"],
        "t1_total_low": low, "t1_total_high": high, "t1_total_component": report["oracle_t1_component"],
        "chance_best_of_n": chance_best, "pearson": pearson[0], "pearson_low": pearson[1], "pearson_high": pearson[2],
        "spearman": spearman[0], "spearman_low": spearman[1], "spearman_high": spearman[2],
        "direct_good": report["direct_good"], "stay_good": report["stay_good"], "lose": " ".join(report["lose"]),
        "gain": " ".join(report["gain"]), "layer_difference": " ".join(f"{x:.4f}" for x in difference.to_numpy()),
        "direct_accuracies": " ".join(f"{x:.4f}" for x in table["accuracy"]),
        "total_accuracies": " ".join(f"{x:.4f}" for x in table["total_accuracy"]),
    }


def _pct(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def effects_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per run: full model, ORACLE-T1 by direct and by total effect (with its interval) beside chance, and the
    direct-vs-total correlations with their intervals (docs/effects.md)."""
    out = pd.DataFrame({
        "task": rows["task"], "template": rows["template"], "n": rows["n_examples"],
        "FULL (%)": rows["full"].map(_pct),
        "T1 direct (%)": rows["t1_direct"].map(_pct) + " " + rows["t1_direct_component"],
        "T1 total (%) [95% CI]": [f"{_pct(t)} [{_pct(lo)}, {_pct(hi)}] {c}" for t, lo, hi, c in
                                  zip(rows["t1_total"], rows["t1_total_low"], rows["t1_total_high"],
                                      rows["t1_total_component"], strict=True)],
        "best of N at chance (%)": rows["chance_best_of_n"].map(_pct),
        "pearson [95% CI]": [f"{r:.2f} [{lo:.2f}, {hi:.2f}]" for r, lo, hi in
                             zip(rows["pearson"], rows["pearson_low"], rows["pearson_high"], strict=True)],
        "spearman [95% CI]": [f"{r:.2f} [{lo:.2f}, {hi:.2f}]" for r, lo, hi in
                              zip(rows["spearman"], rows["spearman_low"], rows["spearman_high"], strict=True)],
        "direct good -> stay above chance by total": [f"{g} -> {s}" for g, s in
                                                      zip(rows["direct_good"], rows["stay_good"], strict=True)],
    })
    return out.sort_values(["task", "template"], kind="stable").reset_index(drop=True)


def layer_table(rows: pd.DataFrame, top: int = 5) -> pd.DataFrame:
    """The layers whose components' total accuracy differs most from their direct accuracy, averaged over runs."""
    matrix = np.array([[float(x) for x in str(text).split()] for text in rows["layer_difference"]])
    mean = matrix.mean(0)
    order = np.argsort(-np.abs(mean), kind="stable")[:top]
    return pd.DataFrame({"layer": order, "mean total - direct accuracy (points)": [f"{100 * mean[i]:+.1f}" for i in order],
                         "runs": len(rows)})



AGREEMENT_COLUMNS = ("model", "task", "template", "seed", "n_examples", "n_components", "reference", "variant",
                     "spearman", "pearson", "accuracy_spearman", "largest_accuracy_difference", "largest_error",
                     "largest_error_component", "largest_reference_effect", "relative_difference",
                     "t1_reference", "t1_variant", "cpu_seconds_reference", "cpu_seconds_variant")


def settings_label(info: dict[str, Any]) -> str:
    """How effects were computed, in the CLI's words: 'exact, last, mean' (+ ', freeze-norm')."""
    label = f"{info.get('method')}, {info.get('positions')}, {info.get('ablation')}"
    return label + (", freeze-norm" if info.get("freeze_norm") else "")


def agreement_row(run: DecompositionRun, reference: TotalEffects, variant: TotalEffects) -> dict[str, Any]:
    """How far one way of computing a run's total effects (`variant`: attribution patching, `--positions all`,
    `--freeze-norm`) is from another (`reference`) on the same run: rank and linear correlation of the effects
    (example x component x label), of the components' accuracies, the largest error (logits) and where, and the
    mean absolute difference as a share of the reference's mean absolute effect (for `--freeze-norm` against the
    default, the final norm's share of the total effects)."""
    for effects in (reference, variant):
        if effects.component_names != run.component_names or effects.total_effects.shape[0] != run.n_examples:
            raise PartsError("the total effects compared do not belong to this run: compare effects of one run folder "
                             "and its copy")
    a, b = reference.total_effects.double(), variant.total_effects.double()
    error = (a - b).abs()
    worst = int(error.amax(dim=(0, 2)).argmax())
    accuracy_a, accuracy_b = reference.accuracy(run.labels), variant.accuracy(run.labels)
    p = run.prompts
    return {
        "model": run.model, "task": p.task, "template": p.template, "seed": p.seed, "n_examples": run.n_examples,
        "n_components": len(run.component_names), "reference": settings_label(reference.info),
        "variant": settings_label(variant.info),
        "spearman": float(stats.spearmanr(a.flatten().numpy(), b.flatten().numpy())[0]),
        "pearson": float(stats.pearsonr(a.flatten().numpy(), b.flatten().numpy())[0]),
        "accuracy_spearman": float(stats.spearmanr(accuracy_a.numpy(), accuracy_b.numpy())[0]),
        "largest_accuracy_difference": float((accuracy_a - accuracy_b).abs().max()),
        "largest_error": float(error.max()), "largest_error_component": run.component_names[worst],
        "largest_reference_effect": float(a.abs().max()),
        "relative_difference": float(error.mean() / a.abs().mean()),
        "t1_reference": float(accuracy_a.max()), "t1_variant": float(accuracy_b.max()),
        "cpu_seconds_reference": reference.info.get("cpu_seconds"), "cpu_seconds_variant": variant.info.get("cpu_seconds"),
    }


def agreement_table(rows: pd.DataFrame) -> pd.DataFrame:
    """docs/effects.md's comparison of the ways to compute total effects, one row per (run, variant). (Their costs
    are benchmark rows, benchmarks/results.md: the seconds a file records were taken on whatever machine made it.)"""
    return pd.DataFrame({
        "task": rows["task"], "template": rows["template"], "n": rows["n_examples"],
        "reference": rows["reference"], "variant": rows["variant"],
        "spearman (effects)": rows["spearman"].map(lambda r: f"{r:.3f}"),
        "spearman (accuracies)": rows["accuracy_spearman"].map(lambda r: f"{r:.3f}"),
        "largest accuracy difference (points)": rows["largest_accuracy_difference"].map(_pct),
        "largest error (logits) at": [f"{e:.2f} {c} (largest effect {m:.2f})" for e, c, m in
                                      zip(rows["largest_error"], rows["largest_error_component"],
                                          rows["largest_reference_effect"], strict=True)],
        "mean abs difference / mean abs effect": rows["relative_difference"].map(lambda r: f"{r:.3f}"),
        "T1 reference -> variant (%)": [f"{_pct(a)} -> {_pct(b)}" for a, b in
                                        zip(rows["t1_reference"], rows["t1_variant"], strict=True)],
    })


def task_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per task over its runs (templates): does "parts > sums" hold by total effect (in how many runs ORACLE-T1 by
    total effect is above the full model and its Wilson interval above the best-of-N-at-chance yardstick), the mean
    accuracies, the direct-vs-total Pearson correlation per run, and how many direct "good" components stay above chance."""
    out = []
    for task, group in rows.groupby("task", sort=True):
        group = group.sort_values("template", kind="stable")
        # "Clears" the yardstick only where the whole Wilson interval is above it: a best-of-300 a point or two above
        # the expected best of 300 chance-level classifiers is what chance alone gives.
        above = int(((group["t1_total"] > group["full"]) & (group["t1_total_low"] > group["chance_best_of_n"])).sum())
        out.append({
            "task": task, "runs (templates)": f"{len(group)} ({', '.join(str(t) for t in group['template'])})",
            "n per run": ", ".join(sorted({str(n) for n in group["n_examples"]})),
            "FULL (%)": _pct(group["full"].mean()), "T1 direct (%)": _pct(group["t1_direct"].mean()),
            "T1 total (%)": _pct(group["t1_total"].mean()),
            "best of N at chance (%)": _pct(group["chance_best_of_n"].mean()),
            "runs where T1 total > FULL and its interval > chance best": f"{above} of {len(group)}",
            "pearson per run": ", ".join(f"{r:.2f}" for r in group["pearson"]),
            "direct good -> stay": f"{int(group['direct_good'].sum())} -> {int(group['stay_good'].sum())}",
        })
    return pd.DataFrame(out)
