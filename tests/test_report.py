"""`parts report`: the numbers it shows, the folder it writes, and the pages checked in headless Chromium.

The sweep is made by `parts.experiments.sweep.sweep` on a tiny random Llama saved to disk (two tasks,
two templates, two seeds, 12 test examples), with a results.csv and learned weights as `parts evaluate`
writes them. The browser is Debian's Chromium driven by Playwright (nothing is downloaded).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from parts.analysis import paper
from parts.analysis.analyze import component_table
from parts.analysis.stats import chance_extremes
from parts.cli import main
from parts.data.prompts import PromptSet
from parts.decomposition.runs import DecompositionRun
from parts.errors import PartsError
from parts.experiments.export import interval_tables
from parts.experiments.results import read_results, write_results
from parts.experiments.sweep import sweep
from parts.report import data as report_data
from parts.report.site import build_report
from parts.reweighting.reweight import ReweightResult, save_weights, weights_file

CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--no-first-run"]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, tiny_model_dir, tiny_task_file):
    """Two tasks x templates 1, 2 x seeds 0, 1 of the tiny model; results.csv and weights for task 'tiny'."""
    other = tiny_task_file.with_name("tiny2.json")
    spec = json.loads(tiny_task_file.read_text()) | {"name": "tiny2", "template": "the {text} is ?",
                                                     "label_words": [" bad", " good"], "label_names": ["bad", "good"]}
    other.write_text(json.dumps(spec))
    root = tmp_path_factory.mktemp("sweep")
    paths = sweep(str(tiny_model_dir), [str(tiny_task_file), str(other)], [1, 2], [0, 1], limit=12, out=root,
                  device="cpu", batch_size=4, progress=False)
    runs = [DecompositionRun.load(p) for p in paths]
    tiny = [(p, r) for p, r in zip(paths, runs, strict=True) if r.prompts.task == "tiny"]
    names = tiny[0][1].component_names
    weights = torch.linspace(-0.5, 1.5, len(names))
    save_weights(weights_file(tiny[1][0], 12), names, ReweightResult(weights, 10, "plateau", 1.0))
    rows = []
    for (_, run), k_shot, comprw in zip(tiny, (0.5, 0.75, 0.25, 0.5), (1.0, 0.5, 0.75, 0.75), strict=True):
        for method, labels, accuracy in (("icl", 4, k_shot), ("comprw", 12, comprw)):
            rows.append({"model": "tiny-model", "task": "tiny", "template": run.prompts.template, "seed": run.prompts.seed,
                         "shots": 4, "limit": 12, "method": method, "labels": labels, "accuracy": accuracy,
                         "n_test": 12, "note": ""})
    write_results(root / "results.csv", rows)
    return root, paths, runs


@pytest.fixture(scope="module")
def report(tiny_sweep, tmp_path_factory):
    root, _, _ = tiny_sweep
    out = tmp_path_factory.mktemp("report") / "site"
    build_report(root, out)
    return out


@pytest.fixture(scope="module")
def attention_report(tiny_sweep, tmp_path_factory):
    root, _, _ = tiny_sweep
    out = tmp_path_factory.mktemp("attention") / "site"
    assert main(["report", str(root), "--out", str(out), "--attention", "--heads", "2", "--examples", "2",
                 "--device", "cpu"]) == 0
    return out


def task_json(folder: Path, key: str) -> dict:
    text = (folder / "data" / f"{key}.js").read_text()
    return json.loads(text[text.index("=") + 1:].strip().rstrip(";"))


def call_json(path: Path) -> list:
    """The arguments of a `PartsReport.addX(...)` data script."""
    text = path.read_text()
    return json.loads("[" + text[text.index("(") + 1:text.rindex(")")] + "]")


# -- the numbers ------------------------------------------------------------------------------------
def test_collect_tasks_groups_test_runs_by_task_in_template_seed_order(tiny_sweep, tmp_path):
    root, _, runs = tiny_sweep
    tasks, skipped = report_data.collect_tasks(root)
    assert [t.key for t in tasks] == ["tiny", "tiny2"] and skipped == 0
    for task in tasks:
        assert [(r.prompts.template, r.prompts.seed) for r in task.runs] == [(1, 0), (1, 1), (2, 0), (2, 1)]
        assert all(r.prompts.task == task.key for r in task.runs)
    with pytest.raises(PartsError, match="no finished runs under"):
        report_data.collect_tasks(tmp_path)


def test_task_data_holds_every_runs_numbers(report, tiny_sweep):
    _, _, runs = tiny_sweep
    data = task_json(report, "tiny")
    tiny = sorted((r for r in runs if r.prompts.task == "tiny"), key=lambda r: (r.prompts.template, r.prompts.seed))
    assert [r["label"] for r in data["runs"]] == ["t1 s0", "t1 s1", "t2 s0", "t2 s1"]
    for i, run in enumerate(tiny):
        table = component_table(run)
        assert data["accuracy"][i] == pytest.approx(table["accuracy"].tolist(), abs=1e-4)
        assert [data["categories"][c] for c in data["category"][i]] == table["category"].tolist()
        shares = table[["share_negative", "share_positive"]].to_numpy()
        assert np.allclose(data["shares"][i], shares, atol=1e-4)
        assert data["runs"][i]["full_accuracy"] == pytest.approx(run.full_accuracy)
    assert data["mean"]["accuracy"] == pytest.approx(np.mean(data["accuracy"], 0).tolist(), abs=1e-4)
    # results.csv rows of this run's setting, by the main table's column names
    assert data["runs"][1]["results"] == {"k-shot ICL": 0.75, "CompRW 12": 0.5}
    assert data["weights"] == ["12"]
    assert task_json(report, "tiny2")["runs"][0]["results"] == {} and task_json(report, "tiny2")["weights"] == []


def test_stability_matrices_average_the_pairs_by_hand(tiny_sweep):
    root, _, _ = tiny_sweep
    task = report_data.collect_tasks(root)[0][0]
    accuracy = np.stack([r.component_accuracy.double().numpy() for r in task.runs])
    r = lambda a, b: float(np.corrcoef(accuracy[a], accuracy[b])[0, 1])  # noqa: E731
    runs = [{"template": run.prompts.template, "seed": run.prompts.seed, "full_accuracy": run.full_accuracy,
             "label_biased": 0} for run in task.runs]
    pairs = paper.agreement_pairs(report_data.runs_frame("tiny", runs, accuracy, 12, 2))
    matrices = report_data.stability_matrices(pairs, runs)
    # runs in order t1 s0, t1 s1, t2 s0, t2 s1
    # A run whose components all score alike has no correlation (NaN): the mean is over the pairs that have one.
    assert matrices["demonstrations"].loc["seed 0", "seed 1"] == pytest.approx(np.nanmean([r(0, 1), r(2, 3)]))
    assert matrices["templates"].loc["template 1", "template 2"] == pytest.approx(np.nanmean([r(0, 2), r(1, 3)]))
    assert matrices["runs"].loc["t1 s1", "t2 s0"] == pytest.approx(r(1, 2))
    assert matrices["runs"].loc["t2 s0", "t2 s0"] == 1.0


def test_layer_details_histograms_and_weights(report, tiny_sweep):
    root, _, _ = tiny_sweep
    task = report_data.collect_tasks(root)[0][0]
    data = task_json(report, "tiny")
    key, layer, detail = call_json(report / "data" / "tiny" / "layer-2.js")
    assert (key, layer) == ("tiny", 2) and sorted(detail) == ["L2H0", "L2H1", "L2H2", "L2H3", "MLP2"]
    index = data["components"].index("L2H1")
    margins = torch.stack([report_data.vote_margin(run)[:, index] for run in task.runs])
    low, high = float(margins.min()), float(margins.max())
    assert detail["L2H1"]["edges"] == pytest.approx([low, high], abs=1e-4)
    counts = np.array(detail["L2H1"]["counts"])  # [run gold bin]: one histogram per run (4 <= PER_RUN_HISTOGRAMS)
    assert counts.shape == (4, 2, report_data.HISTOGRAM_BINS)
    for i, run in enumerate(task.runs):
        assert counts[i].sum(-1).tolist() == torch.bincount(run.labels, minlength=2).tolist()
        # the largest margin among gold-1 examples lands in the top bin when it is the overall maximum
        values = margins[i][run.labels == 1]
        expected = np.histogram(values.numpy(), bins=report_data.HISTOGRAM_BINS, range=(low, high))[0]
        assert counts[i, 1].tolist() == expected.tolist()
    weights = torch.linspace(-0.5, 1.5, len(data["components"])).clamp(0, 1)
    assert detail["L2H1"]["weights"]["12"] == [None, pytest.approx(float(weights[index]), abs=1e-4), None, None]


def test_vote_margin_by_hand():

    logits = torch.tensor([[[1.0, 3.0, 2.0]], [[0.5, 0.0, 4.0]]])  # example component label
    prompts = PromptSet("t", 1, 0, 0, "test", ("a", "b", "c"), (" a", " b", " c"), (), (0, 1), ("x", "y"), (1, 0))
    run = DecompositionRun("m", prompts, [1, 2, 3], 1, 0, ["MLP0"], logits, torch.zeros(2, 3), logits.sum(1))
    # gold 1 (logit 3, best other 2) -> +1; gold 0 (logit 0.5, best other 4) -> -3.5
    assert report_data.vote_margin(run)[:, 0].tolist() == [1.0, -3.5]
    two = DecompositionRun("m", prompts, [1, 2], 1, 0, ["MLP0"], logits[..., :2], torch.zeros(2, 2), logits[..., :2].sum(1))
    assert report_data.vote_margin(two)[:, 0].tolist() == [2.0, -0.5]


def test_histogram_groups_pool_templates_for_a_long_sweep():
    def Run(template, seed):  # noqa: N802 - a run of this template and seed; only its prompts are read
        prompts = PromptSet("t", template, seed, 4, "test", ("a", "b"), (" a", " b"), (0,), (0,), ("p",), (0,))
        return DecompositionRun("m", prompts, [0, 1], 1, 1, ["L0H0", "MLP0"], torch.zeros(1, 2, 2), torch.zeros(1, 2),
                                torch.zeros(1, 2))

    few = [Run(t, s) for t in (1, 2) for s in range(3)]
    assert [g["runs"] for g in report_data.histogram_groups(few)] == [[i] for i in range(6)]
    many = [Run(t, s) for t in (1, 2) for s in range(report_data.PER_RUN_HISTOGRAMS)]
    groups = report_data.histogram_groups(many)
    assert [g["runs"] for g in groups] == [list(range(25)), list(range(25, 50))]
    assert groups[0]["label"] == "template 1 (25 seeds pooled)"


def test_overview_measures_are_the_papers_by_hand(tiny_sweep):
    root, _, _ = tiny_sweep
    task = report_data.collect_tasks(root)[0][0]
    data, _ = report_data.task_data(task, root)
    measures = report_data.run_measures(data)
    accuracy = np.stack([r.component_accuracy.double().numpy() for r in task.runs])
    assert measures["best"].tolist() == pytest.approx((100 * accuracy.max(1)).tolist(), abs=1e-2)
    assert measures["worst"].tolist() == pytest.approx((100 * accuracy.min(1)).tolist(), abs=1e-2)
    assert measures["full"].tolist() == pytest.approx([100 * r.full_accuracy for r in task.runs])
    one_label = [int((r.component_predictions == r.component_predictions[:1]).all(0).sum()) for r in task.runs]
    assert measures["label_biased"].tolist() == one_label
    best, worst = chance_extremes(12, 2, len(task.reference.component_names))
    assert data["yardsticks"] == pytest.approx({"best": best, "worst": worst})


def test_chance_is_one_over_the_labels_on_every_page(tiny_sweep, tmp_path):
    """One definition of chance (1 / labels) on the overview and the task page; the majority rate, which differs
    on an unbalanced test sample, is named as what it is."""
    import dataclasses

    _, paths, runs = tiny_sweep
    run = runs[0]
    labels = tuple([0] * (run.n_examples - 3) + [1] * 3)  # 9 of 12 examples negative
    unbalanced = dataclasses.replace(run, prompts=dataclasses.replace(run.prompts, labels=labels))
    unbalanced.save(tmp_path / "runs" / "t1")
    build_report(tmp_path / "runs", tmp_path / "site")
    data = task_json(tmp_path / "site", "tiny")
    assert data["chance"] == 0.5 and data["majority_rate"] == pytest.approx(9 / 12)
    page = (tmp_path / "site" / "task-tiny.html").read_text()
    assert "chance (1 / 2 labels) 50.0% · most frequent gold label\n75.0% of the examples" in page
    assert "majority rate" not in page and "majority rate" not in (Path(report_data.__file__).parent / "assets" /
                                                                   "report.js").read_text()
    assert data["mean"]["colorbar"]["ticktext"][data["mean"]["colorbar"]["tickvals"].index(0.5)] == "chance 50%"
    assert "(1 / number of labels)" in (tmp_path / "site" / "index.html").read_text()


def test_main_table_without_intervals_is_mean_and_sd_over_runs(tiny_sweep):
    root, _, _ = tiny_sweep
    (table,) = report_data.main_tables(root, root / "results.csv")
    # the rows are made up: their runs lack the weights and logits to recompute predictions from
    assert not table["intervals"] and "tiny" in table["note"]
    k_shot, comprw = np.array([0.5, 0.75, 0.25, 0.5]), np.array([1.0, 0.5, 0.75, 0.75])
    assert table["accuracy"].to_dict("records") == [
        {"task": "tiny", "runs": 4, "k-shot ICL": f"{100 * k_shot.mean():.1f} ± {100 * k_shot.std(ddof=1):.1f}",
         "CompRW 12": f"{100 * comprw.mean():.1f} ± {100 * comprw.std(ddof=1):.1f}"},
        {"task": "average", "runs": 4, "k-shot ICL": "50.0", "CompRW 12": "75.0"}]


def test_main_table_with_intervals_after_parts_evaluate(tmp_path, tiny_model_dir, tiny_task_file, capsys):
    argv = ["evaluate", "--model", str(tiny_model_dir), "--tasks", str(tiny_task_file), "--templates", "1",
            "--seeds", "0,1", "--labels", "12", "--limit", "8", "--out", str(tmp_path / "runs"), "--device", "cpu"]
    assert main(argv) == 0
    capsys.readouterr()
    report = build_report(tmp_path / "runs", tmp_path / "site", tasks_files={"tiny": tiny_task_file})
    assert report.tasks == 1 and report.runs == 2
    (table,) = report_data.main_tables(tmp_path / "runs", tmp_path / "runs" / "results.csv", {"tiny": tiny_task_file})
    assert table["intervals"] and table["note"] == ""
    rows = read_results(tmp_path / "runs" / "results.csv")
    accuracy, differences, _ = interval_tables(tmp_path / "runs", rows, {"tiny": tiny_task_file})
    assert table["accuracy"].equals(accuracy) and table["differences"].equals(differences)
    cell = accuracy.set_index("task").loc["tiny", "CompRW 12"]
    overview = (tmp_path / "site" / "index.html").read_text()
    assert cell in overview and "95% hierarchical bootstrap" in overview
    assert table["settings"] == interval_tables(tmp_path / "runs", rows, {"tiny": tiny_task_file})[2]
    assert table["settings"] == "Settings (template t, demonstration seed s): t1 × s0-1, 2 per task, 1 task, 2 in all."
    assert table["settings"] in overview
    assert "train runs (the labelled examples reweighting trains on) not shown" in overview
    data = task_json(tmp_path / "site", "tiny")
    k_shot = rows[(rows["method"] == "icl") & (rows["labels"] == 4) & (rows["seed"] == 1)]["accuracy"].item()
    assert data["runs"][1]["results"]["k-shot ICL"] == pytest.approx(k_shot)
    assert data["weights"] == ["12", "oracle"]


# -- the folder ---------------------------------------------------------------------------------------
def test_the_folder_holds_plotlyjs_once_and_every_page(report):
    files = sorted(str(p.relative_to(report)) for p in report.rglob("*") if p.is_file())
    assert [f for f in files if f.endswith(".js") and "plotly" in f] == ["assets/plotly.min.js"]
    assert {"index.html", "task-tiny.html", "task-tiny2.html", "data/overview.js"} <= set(files)
    # every folder records what parts wrote in it, so a rebuild may replace the report
    assert {".parts", "assets/.parts", "data/.parts", "data/tiny/.parts"} <= set(files)
    assert len([f for f in files if f.startswith("data/tiny/layer-")]) == 3
    for page in ("index.html", "task-tiny.html"):
        text = (report / page).read_text()
        assert text.count('src="assets/plotly.min.js"') == 1 and "http" not in text.replace("http-equiv", "")
    overview = (report / "index.html").read_text()
    k_shot = np.array([0.5, 0.75, 0.25, 0.5])
    assert "<th>k-shot ICL</th>" in overview and f"{100 * k_shot.mean():.1f} ± {100 * k_shot.std(ddof=1):.1f}" in overview


def test_out_is_new_empty_or_an_earlier_report(tiny_sweep, tmp_path):
    root, _, _ = tiny_sweep
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(PartsError, match="holds notes.txt, which parts did not write"):
        build_report(root, mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "file.html"
    a_file.write_text("mine")
    with pytest.raises(PartsError, match="is a file, where parts would write a folder"):
        build_report(root, a_file)
    assert a_file.read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    first = build_report(root, empty)
    second = build_report(root, empty)  # an earlier report is replaced whole
    assert first.pages == second.pages and (empty / "index.html").is_file()
    # a file of the user's put inside the report, even in a subfolder, is never deleted
    (empty / "data" / "tiny" / "my-notes.txt").write_text("mine too")
    with pytest.raises(PartsError, match="holds data, which parts did not write"):
        build_report(root, empty)
    assert (empty / "data" / "tiny" / "my-notes.txt").read_text() == "mine too"
    # no staging folder left behind (the lock file beside --out, `.empty.parts-lock`, stays, as filelock's do)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and not p.name.endswith(".parts-lock")]


def test_report_command_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "site")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("parts report: error: no finished runs under") and error.count("\n") == 1


# -- in the browser -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing (scripts/test.sh installs it)")
        pytest.skip(f"{CHROMIUM} is missing")
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield chromium
        chromium.close()


class Page:
    """A page of a report, with every console message, page error and request it made."""

    def __init__(self, browser, folder: Path, name: str, width: int = 1280):
        self.folder = folder
        self.page = browser.new_page(viewport={"width": width, "height": 900})
        self.problems: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.problems.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda error: self.problems.append(f"pageerror: {error}"))
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.goto((folder / name.split("#")[0]).resolve().as_uri() + ("#" + name.split("#")[1] if "#" in name else ""))
        self.page.wait_for_function("document.querySelector('.main-svg') !== null")

    def outside(self) -> list[str]:
        inside = self.folder.resolve().as_uri() + "/"
        return [url for url in self.requests if not url.startswith(inside)]

    def heatmap_z(self) -> list:
        return self.page.evaluate("() => document.getElementById('heatmap').data.map(t => t.z)")

    def close(self) -> None:
        self.page.close()


def test_every_page_loads_without_errors_or_outside_requests(browser, report):
    for name in ("index.html", "task-tiny.html", "task-tiny2.html", "task-tiny.html#run=1&component=L1H2"):
        page = Page(browser, report, name)
        if "component" in name:
            page.page.wait_for_selector("#component[data-ready='L1H2']")
            assert page.page.locator("#component-weights .plot-container").count() == 1  # weights of run t1 s1
        assert page.problems == [] and page.outside() == [], name
        assert page.requests[0].endswith(name.split("#")[0])
        page.close()


def test_clicking_a_heatmap_cell_opens_that_component(browser, report, tiny_sweep):
    _, _, runs = tiny_sweep
    page = Page(browser, report, "task-tiny.html")
    data = task_json(report, "tiny")
    for name in ("L2H3", "MLP1"):
        i = data["components"].index(name)
        box = page.page.evaluate("""(i) => {
            const T = window.PARTS_TASK, gd = document.getElementById('heatmap');
            const trace = T.kind[i] === 'head' ? 0 : 1, full = gd._fullData[trace];
            const xa = gd._fullLayout[full.xaxis.replace('x', 'xaxis')], ya = gd._fullLayout[full.yaxis.replace('y', 'yaxis')];
            gd.scrollIntoView();  // the open component view may have scrolled it away
            const rect = gd.getBoundingClientRect();
            return {x: rect.left + xa._offset + xa.l2p(trace === 0 ? T.head[i] : 0),
                    y: rect.top + ya._offset + ya.l2p(T.layer[i])};
        }""", i)
        page.page.mouse.move(box["x"], box["y"])
        page.page.mouse.click(box["x"], box["y"])
        page.page.wait_for_selector(f"#component[data-ready='{name}']")
        assert page.page.inner_text("#component-name") == name
        # the mean over the task's runs, as computed here
        tiny = [r for r in runs if r.prompts.task == "tiny"]
        expected = float(np.mean([component_table(r).set_index("component").loc[name, "accuracy"] for r in tiny]))
        shown = page.page.locator("#component-accuracy")
        assert float(shown.get_attribute("data-value")) == pytest.approx(expected, abs=1e-4)
        assert shown.inner_text() == f"{expected:.1%}"
        assert "component=" + name in page.page.url
    assert page.problems == [] and page.outside() == []
    page.close()


def test_the_run_selector_changes_the_heatmap(browser, report):
    data = task_json(report, "tiny")
    page = Page(browser, report, "task-tiny.html")

    def cell(z, name):
        i = data["components"].index(name)
        return z[0][data["layer"][i]][data["head"][i]] if data["kind"][i] == "head" else z[1][data["layer"][i]][0]

    mean = page.heatmap_z()
    assert cell(mean, "L0H1") == pytest.approx(data["mean"]["accuracy"][1])
    for run in (2, 0):
        page.page.select_option("#run-select", str(run))
        page.page.wait_for_function(f"location.hash === '#run={run}'")
        z = page.heatmap_z()
        assert z != mean
        for name in ("L0H0", "L2H3", "MLP2"):
            assert cell(z, name) == pytest.approx(data["accuracy"][run][data["components"].index(name)])
    # a row of the top table opens its component in the selected run
    first = page.page.locator("#top-table tbody tr").first
    name = first.get_attribute("data-component")
    first.click()
    page.page.wait_for_selector(f"#component[data-ready='{name}']")
    value = float(page.page.locator("#component-accuracy").get_attribute("data-value"))
    assert value == pytest.approx(max(data["accuracy"][0]), abs=1e-9)
    assert page.problems == []
    page.close()


PHONE_WIDTH = 420  # CSS pixels: a phone held upright


def test_every_page_reads_on_a_phone_without_sideways_scrolling(browser, report, attention_report):
    """At 420 px the page does not scroll sideways: nothing is wider than the window but what sits in a box of its
    own that scrolls (a wide table), and the figures are drawn at the window's width."""
    for folder, name in ((report, "index.html"), (report, "task-tiny.html"), (report, "task-tiny2.html"),
                         (report, "task-tiny.html#run=1&component=L1H2"), (attention_report, "task-tiny.html")):
        page = Page(browser, folder, name, width=PHONE_WIDTH)
        if "component" in name:
            page.page.wait_for_selector("#component[data-ready='L1H2']")
        page.page.wait_for_timeout(300)  # plotly redraws figures at the window's width
        sizes = page.page.evaluate("""() => {
          const inScrollBox = e => { for (let a = e.parentElement; a; a = a.parentElement) {
              if (['auto', 'scroll', 'hidden'].includes(getComputedStyle(a).overflowX)) return true; } return false; };
          return {scroll: document.documentElement.scrollWidth, inner: innerWidth,
            wide: [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > innerWidth + 1
                   && !inScrollBox(e)).map(e => e.tagName + '#' + e.id + '.' + e.className).slice(0, 5),
            figures: [...document.querySelectorAll('.main-svg')].map(e => e.getBoundingClientRect().width)}; }""")
        assert sizes["inner"] == PHONE_WIDTH
        assert sizes["scroll"] <= sizes["inner"], (name, sizes)
        assert sizes["wide"] == [], (name, sizes)
        assert sizes["figures"] and max(sizes["figures"]) <= PHONE_WIDTH, (name, sizes)
        assert page.problems == [], name
        page.close()


def test_a_screenshot_of_the_task_page_is_not_blank(browser, report):
    page = Page(browser, report, "task-tiny.html")
    png = page.page.screenshot()
    page.close()
    canvas = browser.new_page()
    colours = canvas.evaluate("""async (src) => {
        const image = new Image();
        image.src = src;
        await image.decode();
        const c = document.createElement('canvas');
        c.width = image.width; c.height = image.height;
        const g = c.getContext('2d');
        g.drawImage(image, 0, 0);
        const pixels = g.getImageData(0, 0, c.width, c.height).data, seen = new Set();
        for (let i = 0; i < pixels.length; i += 4) seen.add((pixels[i] << 16) | (pixels[i + 1] << 8) | pixels[i + 2]);
        return seen.size;
    }""", "data:image/png;base64," + base64.b64encode(png).decode())
    canvas.close()
    assert colours > 100  # the heatmap's shades, text and axes, not an empty page


def test_attention_view_marks_the_demonstrations_label_words(browser, attention_report, tiny_sweep):
    data = task_json(attention_report, "tiny")
    heads = data["attention"]["heads"]
    assert len(heads) == 2 and heads == report_data.attention_heads(data, 2)
    key, stored = call_json(attention_report / "data" / "tiny" / "attention.js")
    assert key == "tiny" and len(stored["examples"]) == 2 and set(stored["heads"]) == set(heads)
    for k, example in enumerate(stored["examples"]):
        assert len(example["label_positions"]) == data["shots"]
        assert {example["tokens"][p].strip() for p in example["label_positions"]} <= {"negative", "positive"}
        assert sum(stored["heads"][heads[0]][k]) == pytest.approx(1.0, abs=1e-3)
    page = Page(browser, attention_report, f"task-tiny.html#component={heads[0]}")
    page.page.wait_for_selector("#attention-1 .main-svg")
    assert page.page.locator("#component-attention .figure").count() == 2
    title = f"Attention of {heads[0]} from the last token, run t1 s0 (template 1, seed 0)"
    assert page.page.inner_text("#attention-title") == title
    # Another run chosen: the panel still shows run t1 s0, and says so.
    page.page.select_option("#run-select", "3")
    page.page.wait_for_function("location.hash.indexOf('run=3') >= 0")
    page.page.wait_for_selector("#attention-1 .main-svg")
    note = page.page.inner_text("#component-attention .note")
    assert note.startswith("Attention is stored for run t1 s0 only; the run chosen above (template 2, seed 1) "
                           "does not change it.")
    other = next(h for h in data["components"] if h.startswith("L") and h not in heads)
    page.page.evaluate(f"location.hash = 'run=3&component={other}'")
    page.page.wait_for_selector(f"#component[data-ready='{other}']")
    assert page.page.inner_text("#component-attention .note").startswith(
        f"No attention stored for {other}: it is stored for the 2 heads most accurate on average, in run t1 s0 only")
    assert page.problems == [] and page.outside() == []
    page.close()


def test_a_clicked_head_shows_its_tokens_coloured_by_contribution(browser, attention_report, tiny_sweep):
    """The stored contributions are the head's exact source split (they sum to its vote for the label it predicts,
    from the run's own component logits), and the page colours every token: blue for, red against, white at zero."""
    root, _, _ = tiny_sweep
    task = next(t for t in report_data.collect_tasks(root)[0] if t.key == "tiny")
    run = task.reference
    data = task_json(attention_report, "tiny")
    head = data["attention"]["heads"][0]
    _, stored = call_json(attention_report / "data" / "tiny" / "attention.js")
    logits = run.component_logits[:, run.component_index(head)]
    for k, example in enumerate(stored["examples"]):
        votes, own = stored["contributions"][head][k], logits[example["example"]]
        assert len(votes) == len(example["tokens"]) == len(run.token_ids[example["example"]])
        label = int(own.argmax())
        assert stored["predicted"][head][k] == run.prompts.label_names[label]
        # Stored to 4 significant digits each.
        assert sum(votes) == pytest.approx(float(own[label] - own.mean()), abs=1e-3 * sum(map(abs, votes)) + 1e-7)
    page = Page(browser, attention_report, f"task-tiny.html#component={head}")
    page.page.wait_for_selector("#token-colours-1 .token")
    spans = page.page.locator("#token-colours-0 .token")
    assert spans.count() == len(stored["examples"][0]["tokens"])
    votes = stored["contributions"][head][0]
    strongest = max(range(len(votes)), key=lambda p: abs(votes[p]))
    colour = spans.nth(strongest).evaluate("e => getComputedStyle(e).backgroundColor")
    assert colour == ("rgb(0, 0, 255)" if votes[strongest] > 0 else "rgb(255, 0, 0)")  # the scale's end
    assert spans.nth(strongest).text_content() == stored["examples"][0]["tokens"][strongest].replace("\n", "\u21b5")
    assert page.problems == [] and page.outside() == []
    page.close()


def test_split_experts_fill_their_own_grid_in_every_run(browser, tokenizer, tiny_task_file, tmp_path):
    """A --split-experts model (DeepSeek-V3's layout: a dense first MLP, then routed and shared experts): each run's
    view draws every expert in the experts grid, at the accuracy that run measured."""
    from families import make_config
    from transformers import AutoModelForCausalLM

    from parts.experiments.runner import decompose_task
    from parts.model.loading import from_hf

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf_model = AutoModelForCausalLM.from_config(make_config("deepseek_v3", len(tokenizer))).eval()
    model = from_hf(hf_model, tokenizer, "tiny-moe")
    runs = [decompose_task(model, tiny_task_file, template, 0, limit=8, device="cpu", split_experts=True, progress=False)
            for template in (1, 2)]
    for run in runs:
        run.save(tmp_path / "runs" / f"t{run.prompts.template}")
    build_report(tmp_path / "runs", tmp_path / "site")
    data = task_json(tmp_path / "site", "tiny")
    assert "MLP0" in data["components"] and "MLP1E3" in data["components"] and "MLP1S" in data["components"]
    page = Page(browser, tmp_path / "site", "task-tiny.html")
    for view in (1, 0):
        page.page.select_option("#run-select", str(view))
        page.page.wait_for_function(f"location.hash === '#run={view}'")
        z = page.heatmap_z()
        assert len(z) == 3  # heads, MLPs, experts
        for name in ("MLP0", "MLP1E0", "MLP1E3", "MLP1S", "L1H1"):
            i = data["components"].index(name)
            trace, layer, column = data["cell"][i]
            assert z[trace][layer][column] == pytest.approx(runs[view].component_accuracy[i].item(), abs=1e-3)
    assert page.problems == []
    page.close()
