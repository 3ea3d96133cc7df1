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

from parts import io
from parts.analysis import paper
from parts.errors import PartsError
from parts.experiments.results import markdown_table
from parts.figures.export import write_figures
from parts.methods import label_order

BLOCK = re.compile(r"(<!-- parts-tables:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /parts-tables:(?P=name) -->)", re.S)
INPUTS = ("main.csv", "transfer.csv", "predictions.csv", "runs.csv", "components.txt")


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


def load_results(folder: str | Path) -> Results:
    folder = Path(folder)
    missing = [name for name in INPUTS if not (folder / name).is_file()]
    if missing:
        raise PartsError(f"{folder} lacks {', '.join(missing)}: run `parts tables --from-runs RUNS_ROOT` to export them")

    def read(name: str) -> pd.DataFrame:
        try:
            return pd.read_csv(folder / name, dtype={"correct": str})
        except pd.errors.EmptyDataError:
            return pd.DataFrame()

    return Results(read("main.csv"), read("transfer.csv"), read("predictions.csv"), read("runs.csv"),
                   (folder / "components.txt").read_text().split())


def _records(frame: pd.DataFrame) -> list[dict[str, object]]:
    """JSON-ready rows: NaN (an undefined correlation) as null, numpy scalars as Python numbers."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v.item() if hasattr(v, "item") else v)
             for k, v in row.items()} for row in frame.to_dict("records")]


def build_tables(results: Results, n_resamples: int = 2000) -> tuple[dict[str, str], dict[str, object]]:
    """Every generated docs block (name -> markdown) and the analysis JSON (plain data)."""
    blocks: dict[str, str] = {"coverage": markdown(paper.coverage_table(results.main, results.runs, results.transfer))}
    analysis: dict[str, object] = {}
    if not results.predictions.empty and (results.predictions["kind"] == "main").any():
        intervals = paper.main_intervals(results.predictions, results.main, n_resamples)
        blocks["main"] = markdown(paper.main_table(intervals))
        blocks["differences"] = markdown(paper.difference_table(intervals))
        blocks["paper-comparison"] = markdown(paper.paper_comparison(intervals))
        analysis["intervals"] = _records(intervals)
    if not results.runs.empty:
        measures = paper.run_measures(results.runs, results.components)
        blocks["table1"] = markdown(paper.component_table_1(measures))
        blocks["label-biased"] = markdown(paper.label_biased_table(measures))
        pairs = paper.agreement_pairs(results.runs)
        blocks["table2"] = markdown(paper.agreement_table(pairs))
        analysis["runs"] = _records(measures)
        analysis["pairs"] = _records(pairs)
    if not results.transfer.empty:
        blocks["table3"] = markdown(paper.transfer_table(results.transfer))
    if not results.predictions.empty and (results.predictions["kind"] == "transfer").any():
        blocks["table3-intervals"] = markdown(paper.transfer_intervals(results.predictions, n_resamples))
    return blocks, analysis


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
    return figures


def rewrite_blocks(text: str, blocks: Mapping[str, str]) -> str:
    """`text` with every known marker block's body replaced by the generated markdown."""
    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in blocks:
            return match.group(0)
        return f"{match.group(1)}{blocks[name]}\n{match.group(4)}"

    return BLOCK.sub(replace, text)


def rebuild(results_dir: str | Path, docs_dir: str | Path, figures_dir: str | Path | None, check: bool = False,
            n_resamples: int = 2000, formats: tuple[str, ...] = ("png", "svg")) -> list[str]:
    """Rewrite the docs blocks and figures; with `check`, write nothing and return the stale pages."""
    results = load_results(results_dir)
    blocks, analysis = build_tables(results, n_resamples)
    stale: list[str] = []
    for page in sorted(Path(docs_dir).glob("*.md")):
        text = page.read_text()
        new = rewrite_blocks(text, blocks)
        if new != text:
            stale.append(str(page))
            if not check:
                io.rewrite_text(page, new)  # only the marked blocks changed: the page stays the user's
    if check:
        return stale
    io.write_json(Path(results_dir) / "analysis.json", analysis)
    if figures_dir is not None:
        figures = result_figures(results, analysis)
        if figures:
            write_figures(figures, figures_dir, formats, progress=False)
    return stale
