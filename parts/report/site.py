"""Write a report: a static site that opens from disk, with no server and no network.

```
report/
  index.html                 overview: model, tasks, runs found; FULL vs best/worst component; the main table
  task-<key>.html            one page per task (client-side view of any component: #component=L3H5&run=2)
  assets/plotly.min.js       plotly.js, copied once from the plotly package; every page loads this file
  assets/report.js, .css     the pages' code and style
  data/overview.js           the overview's figure
  data/<key>.js              a task page's numbers: per run and component accuracy, shares, categories
  data/<key>/layer-<l>.js    histograms and weights of layer l's components, loaded when one is opened
  data/<key>/attention.js    with --attention: where the top heads look, loaded when one is opened
  .parts (in every folder)   what parts wrote there (`parts.io`), so a rebuild may replace the report
```

Data files are scripts (`window.PARTS_... = {...}`), since a page opened from disk may not fetch
JSON. The folder is built under a staging name beside `out` and renamed into place (`parts.io.write_folder`);
a folder already at `out` is replaced only when it is empty or everything in it is parts' (an earlier report).
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from parts import __version__, io
from parts.analysis import paper
from parts.components import component_summary
from parts.report import data as report_data
from parts.report.data import TaskRuns

ASSETS = ("report.js", "report.css")

# (task, heads) -> attention data for those heads (see parts.report.attention.attention_data)
AttentionSource = Callable[[TaskRuns, Sequence[str]], Mapping[str, Any]]


@dataclass(frozen=True)
class Report:
    """What `build_report` wrote."""

    out: Path
    pages: list[str]
    tasks: int
    runs: int
    bytes: int
    seconds: float


def _plotlyjs() -> bytes:
    """The plotly.js bundle of the installed plotly package (the version its figures are written for)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs().encode()


def _asset(name: str) -> bytes:
    return resources.files("parts.report").joinpath("assets", name).read_bytes()


def _script(variable: str, value: Any) -> str:
    return f"window.{variable} = {json.dumps(value, separators=(',', ':'), allow_nan=False)};\n"


def _call(function: str, *arguments: Any) -> str:
    text = ",".join(json.dumps(a, separators=(",", ":"), allow_nan=False) for a in arguments)
    return f"PartsReport.{function}({text});\n"


# -- HTML -------------------------------------------------------------------------------------------
e = html.escape


def _page(title: str, nav: str, body: str, scripts: Sequence[str], start: str) -> str:
    tags = "\n".join(f'<script src="{e(src)}"></script>' for src in scripts)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title>
<link rel="stylesheet" href="assets/report.css">
</head>
<body>
<nav>{nav}</nav>
<main>
{body}
</main>
<footer>Written by parts {e(__version__)} (<code>parts report</code>). Opens from disk: no server, no network.</footer>
{tags}
<script>{start}</script>
</body>
</html>
"""


def _nav(tasks: Sequence[TaskRuns], current: str | None) -> str:
    links = [f'<a href="index.html"{" class=current" if current is None else ""}>overview</a>']
    links += [f'<a href="task-{e(t.key)}.html"{" class=current" if t.key == current else ""}>{e(t.key)}</a>' for t in tasks]
    return '<span class="brand">parts report</span>' + "".join(links)


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]], css: str = "", footer: Sequence[Any] | None = None) -> str:
    head = "".join(f"<th>{e(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    foot = "<tfoot><tr>" + "".join(f"<td>{cell}</td>" for cell in footer) + "</tr></tfoot>" if footer else ""
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>{foot}</table>'


def count(n: int, noun: str) -> str:
    """'1 run', '3 runs'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _pct(value: float) -> str:
    return f"{value:.1%}"


def _pm(pair: Sequence[float]) -> str:
    return f"{pair[0]:.1%} <span class=sd>± {pair[1]:.1%}</span>"


def _frame(frame: pd.DataFrame, css: str, links: Mapping[str, str] | None = None) -> str:
    """A DataFrame as an HTML table; `links` turns a task column's values into links to their pages."""
    rows = []
    for record in frame.to_dict("records"):
        cells = [e(str(v)) for v in record.values()]
        task = str(record.get("task", ""))
        if links and task in links:
            cells[0] = f'<a href="{e(links[task])}">{e(task)}</a>'
        rows.append(cells)
    return _table(list(frame.columns), rows, css)


def overview_html(root_name: str, lines: Sequence[Mapping[str, Any]], measures: pd.DataFrame,
                  tables: Sequence[Mapping[str, Any]], skipped: int) -> str:
    """The overview page (`index.html`): the tasks and runs found, the paper's measures, the main table."""
    models = sorted({line["model"] for line in lines})
    runs = sum(line["runs"] for line in lines)
    pages = {line["key"]: f"task-{line['key']}.html" for line in lines}
    found = _table(
        ["task", "model", "split", "examples", "shots", "runs", "templates", "seeds", "best beats full in",
         "most often best"],
        [[f'<a href="{e(pages[line["key"]])}">{e(line["key"])}</a>', e(line["model"]), e(line["split"]),
          line["n_examples"], line["shots"], line["runs"], e(", ".join(map(str, line["templates"]))),
          e(", ".join(map(str, line["seeds"]))), f'{line["best_beats_full"]} of {count(line["runs"], "run")}',
          f'<a href="{e(pages[line["key"]])}#component={e(line["most_often_best"][0])}">{e(line["most_often_best"][0])}</a>'
          f' ({line["most_often_best"][1]} of {line["runs"]})'] for line in lines], "runs-found")
    skipped_note = (f"<p class=note>{skipped} train run{'s' if skipped != 1 else ''} (the labelled examples "
                    "reweighting trains on) not shown.</p>") if skipped else ""
    main = ""
    for t in tables:
        main += f"<h3>{e(t['model'])}, {e(t['limit'])} test examples per run</h3>" + _frame(t["accuracy"], "main-table", pages)
        if t["intervals"]:
            main += ("<p class=note>Accuracy (%) per task and method: the mean over runs with a 95% hierarchical bootstrap "
                     "interval (test examples and runs resampled within each task); the average is over tasks. "
                     "Oracle reweighting fits its weights on the test set itself.</p>")
            if t["settings"]:  # a method run on fewer settings (e.g. --gates on some) is left out: say so
                main += f"<p class=note>{e(t['settings'])}</p>"
            if t["differences"] is not None and not t["differences"].empty:
                main += "<h3>CompRW minus each baseline (percentage points, 95% interval)</h3>" + _frame(
                    t["differences"], "differences", pages)
        else:
            main += (f"<p class=note>Accuracy (%) per task and method: mean ± sample standard deviation over templates × "
                     f"seeds. No intervals: {e(t['note'])}.</p>")
    if not tables:
        main = ("<p class=note>No <code>results.csv</code> here: run <code>parts evaluate</code> with this "
                "<code>--out</code> to add the main table (reweighting against ICL and calibration).</p>")
    cards = "".join(
        f'<a class=card href="{e(pages[line["key"]])}"><b>{e(line["key"])}</b><br>{count(line["runs"], "run")} · '
        f'full {line["full"]:.1f}% · best component {line["best"]:.1f}%</a>' for line in lines)
    return f"""
<h1>Components as classifiers: {e(root_name)}</h1>
<p class=lead>Model{'s' if len(models) > 1 else ''}: <b>{e(", ".join(models))}</b>. {len(lines)} task
page{'s' if len(lines) != 1 else ''}, {count(runs, "test run")}. Every attention head and MLP scored as a classifier by its
direct contribution to the label-word logits at the last prompt token.</p>
<div class=cards>{cards}</div>
<h2>Runs found</h2>
{found}
{skipped_note}
<h2>Full model vs its best and worst component</h2>
<div id="overview-figure" class="figure"></div>
{_frame(paper.component_table_1(measures), "versus", pages)}
<p class=note>Accuracy (%), mean ± sample standard deviation over runs. ORACLE-T1 and ORACLE-B1: the best and the worst
single component, chosen on each run's test examples (the paper's measures). Beside them, the accuracy expected of the
best and the worst of as many components guessing at random (1 / number of labels) on as many examples: a best
component near its chance yardstick is no evidence of a good component.</p>
<h3>Label-biased components</h3>
{_frame(paper.label_biased_table(measures), "label-biased", pages)}
<p class=note>Components that predict one label on every test example (the paper's rule), as a share of all components,
mean ± sd over runs; the share grows as the test set shrinks, so n is beside it.</p>
<h2>Main table</h2>
{main}
"""


def task_html(data: Mapping[str, Any]) -> str:
    """A task's page (`task-<task>.html`): heatmap, run selector, top components, correlations, component view."""
    runs = data["runs"]
    options = f'<option value="mean">mean over {count(len(runs), "run")}</option>' + "".join(
        f'<option value="{i}">template {r["template"]}, seed {r["seed"]} (full model {_pct(r["full_accuracy"])})</option>'
        for i, r in enumerate(runs))
    accuracy = data["accuracy"]
    names = data["components"]
    methods = list(dict.fromkeys(m for r in runs for m in r["results"]))
    run_rows = []
    for i, r in enumerate(runs):
        best = max(range(len(names)), key=lambda c: (accuracy[i][c], -c))
        worst = min(range(len(names)), key=lambda c: (accuracy[i][c], c))
        run_rows.append(
            [f'<a href="#run={i}">{e(r["label"])}</a>', r["template"], r["seed"], _pct(r["full_accuracy"]),
             f'<a href="#run={i}&component={e(names[best])}">{e(names[best])}</a> {_pct(accuracy[i][best])}',
             f'<a href="#run={i}&component={e(names[worst])}">{e(names[worst])}</a> {_pct(accuracy[i][worst])}',
             *[_pct(r["results"][m]) if m in r["results"] else "" for m in methods], f"<code>{e(r['path'])}</code>"])
    run_table = _table(["run", "template", "seed", "full model", "best component", "worst component", *methods, "folder"],
                       run_rows, "runs")
    agreement = data["stability"]["agreement"]
    stability_table = (_table(agreement["columns"], [["" if v is None else e(str(v)) for v in row] for row in agreement["data"]],
                              "stability") if agreement["data"] else "<p class=note>One run: nothing to compare.</p>")
    figures = "".join(f'<div id="stability-{name}" class="figure stability"></div>' for name in data["stability"]["figures"])
    labels = ", ".join(f"{e(n)} ({e(repr(w))})" for n, w in zip(data["label_names"], data["label_words"], strict=True))
    return f"""
<h1>{e(data["task"])} <span class=sub>{e(data["model"])}</span></h1>
<p class=lead>{count(len(runs), "run")} ({e(data["split"])} split, {data["n_examples"]} examples each, {data["shots"]}-shot) ·
labels {labels} · {e(component_summary(names).replace(" (", " components (", 1))} ·
chance (1 / {len(data["label_names"])} labels) {_pct(data["chance"])} · most frequent gold label
{_pct(data["majority_rate"])} of the examples</p>
<div class=controls><label for="run-select">Run</label> <select id="run-select">{options}</select>
<span class=hint>Hover a cell for its numbers; click it, or a row below, to open the component.</span></div>
<div id="heatmap" class="figure"></div>
<section id="component" hidden>
  <h2><span id="component-name"></span> <span id="component-accuracy" class=accuracy></span>
      <a id="component-close" href="#" class=close title="close">×</a></h2>
  <p id="component-facts" class=lead></p>
  <div class=grid>
    <div id="component-runs" class="figure"></div>
    <div id="component-shares" class="figure"></div>
    <div id="component-margins" class="figure"></div>
    <div id="component-weights" class="figure"></div>
  </div>
  <div id="component-attention"></div>
</section>
<h2>Most and least accurate components <span class=sub id="ranking-view"></span></h2>
<div class=grid>
  <table id="top-table" class="ranking"><caption>top 10</caption><thead><tr><th>#</th><th>component</th><th>accuracy</th>
  <th>mean ± sd over runs</th><th>every run</th><th>category</th></tr></thead><tbody></tbody></table>
  <table id="bottom-table" class="ranking"><caption>bottom 10</caption><thead><tr><th>#</th><th>component</th>
  <th>accuracy</th><th>mean ± sd over runs</th><th>every run</th><th>category</th></tr></thead><tbody></tbody></table>
</div>
<p class=note>Every run: the component's accuracy in each run in the order of the run selector (template, then seed),
on one scale for the whole task (its lowest to highest component accuracy), the dashed line at chance (1 / labels),
the selected run dotted; hover for the numbers.</p>
<h2>Stability across demonstrations and templates</h2>
<p class=note>Agreement of the component accuracies of two runs (the paper's Table 2): Pearson r and the IoU of their
top-5 components, averaged over the pairs of runs that differ only in their demonstrations (seed), only in a minimally
contrastive template, or only in another template; the paper's Llama-2-7B values beside where it has them. The
matrices: Pearson r of every pair of runs, and averaged into seed × seed (same template) and template × template
(same seed).</p>
{stability_table}
<div class=grid>{figures}</div>
<h2>Runs</h2>
{run_table}
"""


# -- writing ------------------------------------------------------------------------------------------
def _write(staging: Path, relative: str, content: str | bytes) -> None:
    """A file of the report in its staging folder (`parts.io.write_folder` renames the whole folder into place)."""
    path = staging / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)


def build_report(
    root: str | Path,
    out: str | Path,
    attention: AttentionSource | None = None,
    attention_heads: int = 5,
    results: str | Path | None = None,
    tasks_files: Mapping[str, str | Path] | None = None,
) -> Report:
    """Write the report of every test run under `root` to the folder `out` (see the module's docstring).

    `attention(task, heads)` gives where those heads look (`parts.report.attention`: it needs the model);
    without it the report holds everything a saved run knows. `results` is a `parts evaluate` results.csv
    (default: `root/results.csv` when there is one); `tasks_files` maps user tasks' names to their JSON files,
    which the main table's intervals need to recompute predictions (the paper's tasks resolve by name).
    """
    started = time.perf_counter()
    root, out = Path(root), Path(out)
    io.check_folder(out, kind="report")  # before the work: a folder of the user's is refused at once
    tasks, skipped = report_data.collect_tasks(root)
    results_file = report_data.results_path(root, results)
    frame = report_data.read_results_frame(results_file) if results_file is not None else None
    with io.write_folder(out, kind="report") as staging:
        lines, measures = [], []
        pages = ["index.html"]
        for task in tasks:
            summary, details = report_data.task_data(task, root, frame)
            if attention is not None:
                heads = report_data.attention_heads(summary, attention_heads)
                summary["attention"] = {"heads": heads, "run": 0}
                _write(staging, f"data/{task.key}/attention.js", _call("addAttention", task.key, attention(task, heads)))
            _write(staging, f"data/{task.key}.js", _script("PARTS_TASK", summary))
            for layer, detail in details.items():
                _write(staging, f"data/{task.key}/layer-{layer}.js", _call("addDetail", task.key, layer, detail))
            page = f"task-{task.key}.html"
            _write(staging, page, _page(
                f"{summary['task']}: parts report", _nav(tasks, task.key), task_html(summary),
                ["assets/plotly.min.js", f"data/{task.key}.js", "assets/report.js"], "PartsReport.task();"))
            pages.append(page)
            measures.append(report_data.run_measures(summary))
            lines.append(report_data.task_overview(task, summary, measures[-1]))
        measured = pd.concat(measures, ignore_index=True)
        tables = report_data.main_tables(root, results_file, tasks_files) if results_file is not None else []
        _write(staging, "data/overview.js", _script("PARTS_OVERVIEW", report_data.clean(
            {"figure": report_data.figure_json(report_data.overview_figure(measured))})))
        _write(staging, "index.html", _page(
            "parts report", _nav(tasks, None), overview_html(root.resolve().name, lines, measured, tables, skipped),
            ["assets/plotly.min.js", "data/overview.js", "assets/report.js"], "PartsReport.overview();"))
        _write(staging, "assets/plotly.min.js", _plotlyjs())
        for name in ASSETS:
            _write(staging, f"assets/{name}", _asset(name))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return Report(out, pages, len(tasks), sum(len(t.runs) for t in tasks), size, time.perf_counter() - started)
