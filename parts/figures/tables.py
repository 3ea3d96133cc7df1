"""`parts tables`: every table in docs/ and the result figures in figures/, rebuilt from the committed
result files (`parts.experiments.export`), with no model and no run folders.

A table lives in a docs page between two markers, which this module rewrites in place (the prose
around them is left alone):

    <!-- parts-tables:main -->
    ...generated markdown...
    <!-- /parts-tables:main -->

`--check` rebuilds in memory and reports the blocks that differ from the committed pages.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from parts import io
from parts.analysis import paper, total
from parts.analysis.stats import DDOF, chance_table, check_resample, rounded
from parts.components import parse_component
from parts.errors import PartsError
from parts.experiments.checkpoints import checkpoint_lines, checkpoint_summary
from parts.experiments.results import markdown_table, stale_note_rows
from parts.figures.export import write_figures
from parts.methods import label_order

BLOCK = re.compile(r"(<!-- parts-tables:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /parts-tables:(?P=name) -->)", re.S)
INPUTS = ("main.csv", "transfer.csv", "predictions.csv", "runs.csv", "components.txt")
CHANCE_RULE_SIZES = (40, 100, 200, 2000)
NOT_RUN = ("(not run yet: main.csv has no row of a method beyond the paper; `parts evaluate` writes them, "
           "`parts tables --from-runs ROOT --only main` exports them)")


def markdown(frame: pd.DataFrame) -> str:
    """`parts.experiments.results.markdown_table`, or a line saying nothing is finished yet."""
    return "(nothing finished yet)" if frame.empty else markdown_table(frame)


@dataclass
class Results:
    """The committed result files, loaded."""

    main: pd.DataFrame
    transfer: pd.DataFrame
    predictions: pd.DataFrame
    runs: pd.DataFrame
    components: list[str]
    controls: pd.DataFrame
    effects: pd.DataFrame  # results/effects.csv (`parts effects --summary`); empty where no run has total effects
    effect_variants: pd.DataFrame  # results/effects-variants.csv (`parts effects --summary --against`); may be empty


def load_results(folder: str | Path) -> Results:
    """The committed result files of `folder` (`results/`), read as DataFrames; a missing one is named in the error."""
    folder = Path(folder)
    missing = [name for name in INPUTS if not (folder / name).is_file()]
    if missing:
        raise PartsError(f"{folder} lacks {', '.join(missing)}: run `parts tables --from-runs RUNS_ROOT` to export them")

    def read(name: str) -> pd.DataFrame:
        if not (folder / name).is_file():  # controls.csv: absent where no control was run
            return pd.DataFrame()
        try:
            return pd.read_csv(folder / name, dtype={"correct": str})
        except pd.errors.EmptyDataError:
            return pd.DataFrame()

    return Results(read("main.csv"), read("transfer.csv"), read("predictions.csv"), read("runs.csv"),
                   (folder / "components.txt").read_text().split(), read("controls.csv"), read("effects.csv"),
                   read("effects-variants.csv"))


def _percent(value: float) -> str:
    return rounded(100 * value)


def control_table(controls: pd.DataFrame, correction: str = "holm") -> pd.DataFrame:
    """The random-initialisation control: the paper's measures first (FULL, ORACLE-T1, the best of N at
    chance, one label on every example), then parts' significance categories as "uncorrected / corrected"."""
    rows = []
    order = {task: i for i, task in enumerate(paper.ordered_tasks(list(dict.fromkeys(controls["task"]))))}
    controls = controls.sort_values(["task", "template", "seed"], key=lambda c: c.map(order) if c.name == "task" else c,
                                    kind="stable")  # the paper's task order, each pretrained run above its random twin
    for _, r in controls.iterrows():
        row = {"model": r["init"], "task": r["task"], "template": r["template"], "n": r["n_examples"],
               "FULL": _percent(r["full_accuracy"]), "ORACLE-T1": f"{r['best_component']} {_percent(r['best_accuracy'])}",
               "best of N at chance": _percent(r["chance_best_accuracy"]), "one label (paper's rule)": r["one_label"]}
        for category in ("above chance", "good", "bad", "label-biased", "neutral"):
            row[f"{category} (parts)"] = f"{r[f'{category} (uncorrected)']} / {r[f'{category} ({correction})']}"
        rows.append(row)
    return pd.DataFrame(rows)


def control_checkpoints(controls: pd.DataFrame, components: list[str], k: int = 3) -> pd.DataFrame:
    """The checkpoints view of the control: random init as step 0, the pretrained model as the last step;
    mean over templates and seeds of the full model, the k best components at each, and the pretrained
    model's k best followed back to the random model (`parts.experiments.checkpoints.checkpoint_lines`)."""
    runs = []
    for _, r in controls.iterrows():
        accuracies = dict(zip(components, (float(a) for a in r["accuracies"].split()), strict=True))
        base = {"checkpoint": "random init (step 0)" if r["init"] == "random" else r["model"],
                "step": int(r["init"] != "random"), "task": r["task"], "template": int(r["template"]),
                "seed": int(r["seed"]), "n_examples": int(r["n_examples"])}
        runs.append((base, float(r["full_accuracy"]), accuracies))
    summary = checkpoint_summary(checkpoint_lines(runs, k))
    table = summary.pivot_table(index=["task", "step", "checkpoint"], columns="line", values="accuracy", sort=False)
    lines = ["full model", *(f"best #{i}" for i in range(1, k + 1)), *(f"final top-{i}" for i in range(1, k + 1))]
    table = (100 * table[lines]).reset_index().drop(columns="step")  # percent, unrounded (`rounded` prints them)
    order = {task: i for i, task in enumerate(paper.ordered_tasks(list(dict.fromkeys(table["task"]))))}
    return table.sort_values("task", key=lambda column: column.map(order), kind="stable", ignore_index=True)


def chance_rule_table(n_components: int, alpha: float = 0.05) -> pd.DataFrame:
    """What an uncorrected one-sided binomial test calls "good" among `n_components` chance-level components."""
    table = chance_table(CHANCE_RULE_SIZES, (0.5, 0.25), n_components, alpha)
    return pd.DataFrame({
        "n examples": table["n_examples"], "chance": table["chance"].map(lambda v: rounded(v, 2)),
        "size of the test": table["test_size"].map(lambda v: rounded(v, 4)),
        f"expected false \"good\" of {n_components}": table["expected_false_good"].map(rounded),
        "P(at least one)": table["p_any_false_good"].map(lambda v: rounded(v, 3)),
        f"expected best accuracy of {n_components} (%)": (100 * table["expected_best_accuracy"]).map(rounded),
    })


def _records(frame: pd.DataFrame) -> list[dict[str, object]]:
    """JSON-ready rows: NaN (an undefined correlation) as null, numpy scalars as Python numbers."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v.item() if hasattr(v, "item") else v)
             for k, v in row.items()} for row in frame.to_dict("records")]


def build_tables(results: Results, n_resamples: int = 2000, ddof: int = DDOF, resample: str = "runs"
                 ) -> tuple[dict[str, str], dict[str, object]]:
    """Every generated docs block (name -> markdown) and the analysis JSON (plain data). `ddof`: of every
    spread over runs (1, the sample std; 0 as the paper's authors' code); `resample`: the bootstrap's scheme
    ("runs" exchangeable, or "nested": templates, then seeds, then examples; `parts.analysis.stats`)."""
    check_resample(resample)
    blocks: dict[str, str] = {"coverage": markdown(paper.coverage_table(results.main, results.runs, results.transfer))}
    analysis: dict[str, object] = {}
    if not results.predictions.empty and (results.predictions["kind"] == "main").any():
        intervals = paper.main_intervals(results.predictions, results.main, n_resamples, resample=resample)
        blocks["main"] = (f"{paper.main_settings_line(results.predictions, results.main)}\n\n"
                          f"{markdown(paper.main_table(intervals))}")
        blocks["differences"] = markdown(paper.difference_table(intervals, beyond_paper=False))
        pairs = paper.pairwise_intervals(results.predictions, results.main, n_resamples, resample=resample)
        blocks["beyond-paper"] = NOT_RUN if pairs.empty else markdown(paper.pair_table(pairs, average_only=True))
        blocks["beyond-paper-differences"] = NOT_RUN if pairs.empty else markdown(paper.beyond_paper_differences(pairs))
        partial = [] if pairs.empty else [m for m in paper.partial_methods(results.predictions, results.main)
                                          if m in set(pairs["versus"])]
        blocks["beyond-paper-partial"] = (NOT_RUN if pairs.empty else markdown(paper.pair_table(pairs, partial))
                                          if partial else "(none: every method beyond the paper has every setting of "
                                                          "the main table)")
        blocks["paper-comparison"] = markdown(paper.paper_comparison(intervals))
        if {"24-shot ICL", "k-shot ICL"} <= set(intervals["method"]):  # both shot counts were evaluated
            many_shot = paper.main_intervals(results.predictions, results.main, n_resamples, resample=resample,
                                             reference="24-shot ICL")
            blocks["shots-difference"] = markdown(paper.one_difference_table(many_shot, "24-shot ICL - k-shot ICL"))
        schemes = {scheme: intervals if scheme == resample else
                   paper.main_intervals(results.predictions, results.main, n_resamples, resample=scheme)
                   for scheme in ("runs", "nested")}
        blocks["resampling"] = markdown(paper.resampling_table(schemes["runs"], schemes["nested"]))
        changes = paper.resampling_changes(schemes["runs"], schemes["nested"])
        blocks["resampling-changes"] = "(none)" if changes.empty else markdown(changes)
        analysis["intervals"] = _records(intervals)
    if not results.runs.empty:
        measures = paper.run_measures(results.runs, results.components)
        blocks["table1"] = markdown(paper.component_table_1(measures, ddof))
        blocks["table1-differences"] = markdown(paper.oracle_differences(measures, n_resamples))
        blocks["label-biased"] = markdown(paper.label_biased_table(measures, ddof))
        pairs = paper.agreement_pairs(results.runs)
        blocks["table2"] = markdown(paper.agreement_table(pairs, ddof))
        analysis["runs"] = _records(measures)
        analysis["pairs"] = _records(pairs)
    if results.components:
        blocks["chance-rule"] = markdown(chance_rule_table(len(results.components)))
    if not results.controls.empty:
        blocks["random-init"] = markdown(control_table(results.controls))
        checkpoints = control_checkpoints(results.controls, results.components)
        numbers = checkpoints.columns[2:]  # after task and checkpoint: accuracies (%)
        blocks["control-checkpoints"] = markdown(checkpoints.assign(**{c: checkpoints[c].map(rounded) for c in numbers}))
    if not results.effects.empty:
        blocks["effects"] = markdown(total.effects_table(results.effects))
        blocks["effects-layers"] = markdown(total.layer_table(results.effects))
        blocks["effects-tasks"] = markdown(total.task_table(results.effects))
    if not results.effect_variants.empty:
        blocks["effects-variants"] = markdown(total.agreement_table(results.effect_variants))
    if not results.transfer.empty:
        blocks["table3"] = markdown(paper.transfer_table(results.transfer, ddof))
    if not results.predictions.empty and (results.predictions["kind"] == "transfer").any():
        blocks["table3-intervals"] = markdown(paper.transfer_intervals(results.predictions, n_resamples, resample=resample))
        blocks["table3-differences"] = markdown(paper.transfer_differences(results.predictions, n_resamples,
                                                                           resample=resample))
    return blocks, analysis


def direct_vs_total_figure(rows: pd.DataFrame, components: list[str]) -> go.Figure:
    """Direct against total accuracy per task (first template of each task), one point per component, coloured
    by layer: points below the diagonal lose accuracy once later layers respond (self-repair candidates)."""
    rows = rows.sort_values(["task", "template"], kind="stable").drop_duplicates("task")
    columns = min(4, len(rows))
    figure = make_subplots(rows=math.ceil(len(rows) / columns), cols=columns, subplot_titles=list(rows["task"]),
                           horizontal_spacing=0.05, vertical_spacing=0.12)
    layers = [parse_component(name).layer for name in components]
    for i, row in enumerate(rows.itertuples()):
        direct = [100 * float(x) for x in str(row.direct_accuracies).split()]
        total = [100 * float(x) for x in str(row.total_accuracies).split()]
        where = {"row": i // columns + 1, "col": i % columns + 1}
        figure.add_scatter(x=direct, y=total, mode="markers", text=components, showlegend=False,
                           marker={"color": layers, "colorscale": "Viridis", "size": 5, "showscale": i == 0,
                                   "colorbar": {"title": "layer"}}, **where)
        figure.add_scatter(x=[0, 100], y=[0, 100], mode="lines", line={"dash": "dot", "color": "grey"},
                           showlegend=False, **where)
    figure.update_xaxes(title_text="direct accuracy (%)", range=[0, 100])
    figure.update_yaxes(title_text="total accuracy (%)", range=[0, 100])
    figure.update_layout(title="Each component's accuracy by direct and by total effect (mean ablation, last token)",
                         width=1200, height=330 * math.ceil(len(rows) / columns), template="plotly_white")
    return figure


def result_figures(results: Results, analysis: Mapping[str, object]) -> dict[str, go.Figure]:
    """Figures drawn from the result files alone: the main table with its intervals, and Table 1."""
    figures: dict[str, go.Figure] = {}
    intervals = pd.DataFrame(analysis.get("intervals", []))
    if not intervals.empty:
        accuracy = intervals[intervals["quantity"] == "accuracy"]
        figure = go.Figure()
        for method in sorted(dict.fromkeys(accuracy["method"]), key=label_order):  # the methods' one order
            group = accuracy[accuracy["method"] == method]
            figure.add_bar(name=str(method), x=group["task"], y=group["estimate"],
                           error_y={"type": "data", "symmetric": False, "array": group["high"] - group["estimate"],
                                    "arrayminus": group["estimate"] - group["low"]})
        figure.update_layout(title="Accuracy per task and method (mean over runs, 95% bootstrap interval)",
                             yaxis_title="accuracy (%)", barmode="group", width=1100, height=450, template="plotly_white")
        figures["main-table"] = figure
    measures = pd.DataFrame(analysis.get("runs", []))
    if not measures.empty:
        main = measures[~measures["task"].str.contains(" -> ") & measures["template"].isin(paper.PAPER_TEMPLATES)]
        means = main.groupby("task", sort=False)[["full", "best", "worst", "chance_best", "chance_worst", "chance"]].mean()
        means = means.reindex(paper.ordered_tasks(list(means.index)))  # the paper's task order
        figure = go.Figure()
        for column, name in (("best", "ORACLE-T1 (best component)"), ("full", "FULL"), ("worst", "ORACLE-B1 (worst)")):
            figure.add_bar(name=name, x=means.index, y=means[column])
        for column, name, dash in (("chance_best", "best of N at chance", "dash"), ("chance", "chance", "dot"),
                                   ("chance_worst", "worst of N at chance", "dash")):
            figure.add_scatter(name=name, x=means.index, y=means[column], mode="markers+lines",
                               line={"dash": dash, "color": "grey"})
        figure.update_layout(title="Single components against the full model and against chance (mean over runs)",
                             yaxis_title="accuracy (%)", barmode="group", width=1000, height=450, template="plotly_white")
        figures["table1-components"] = figure
    if not results.effects.empty and results.components:
        figures["effects-direct-vs-total"] = direct_vs_total_figure(results.effects, results.components)
    return figures


def rewrite_blocks(text: str, blocks: Mapping[str, str]) -> str:
    """`text` with every known marker block's body replaced by the generated markdown."""
    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in blocks:
            return match.group(0)
        return f"{match.group(1)}{blocks[name]}\n{match.group(4)}"

    return BLOCK.sub(replace, text)


def stale_notes(results_dir: str | Path, main: pd.DataFrame) -> list[str]:
    """One line per `main.csv` row whose note is not what `parts evaluate` writes now
    (`parts.experiments.results.NOTE_PATTERNS`), saying which row and how to fix it."""
    if main.empty or "method" not in main:
        return []
    path = Path(results_dir) / "main.csv"
    return [f"{path}: {r['task']} t{r['template']} s{r['seed']} {r['method']} {r['labels']} has the note "
            f"{r.get('note', '')!r}, which `parts evaluate` no longer writes: re-export it "
            "(`parts tables --from-runs ROOT`) or correct the note" for _, r in stale_note_rows(main).iterrows()]


def rebuild(results_dir: str | Path, docs_dir: str | Path, figures_dir: str | Path | None, check: bool = False,
            n_resamples: int = 2000, formats: tuple[str, ...] = ("png", "svg"), ddof: int = DDOF,
            resample: str = "runs") -> list[str]:
    """Rewrite the docs blocks and figures and return the pages rewritten; with `check`, write nothing and
    return what is out of date: each stale page (with the fix) and each results row with a stale note."""
    results = load_results(results_dir)
    blocks, analysis = build_tables(results, n_resamples, ddof, resample)
    stale: list[str] = []
    for page in sorted(Path(docs_dir).rglob("*.md")):  # the docs site's pages in folders too
        text = page.read_text()
        new = rewrite_blocks(text, blocks)
        if new != text:
            stale.append(f"{page} (run `parts tables`)" if check else str(page))
            if not check:
                io.rewrite_text(page, new)  # only the marked blocks changed: the page stays the user's
    if check:
        return stale + stale_notes(results_dir, results.main)
    io.write_json(Path(results_dir) / "analysis.json", analysis)
    if figures_dir is not None:
        figures = result_figures(results, analysis)
        if figures:
            write_figures(figures, figures_dir, formats, progress=False)
    return stale
