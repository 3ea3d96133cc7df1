"""Figures: their data checked against hand-made tables and tiny-model runs; export and rendering."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from parts.analysis.inspect_head import demonstration_label_spans, head_inspection, spans_to_positions
from parts.cli import main
from parts.errors import PartsError
from parts.experiments.results import method_summary
from parts.figures import plotting
from parts.figures.export import CHROMIUM_INSTALL, chromium_screenshot, find_chromium, write_figure, write_figures
from parts.figures.figureset import figure_set, stability_pairs

# Two layers x two heads + two MLPs, with chance 0.5 and a full model at 0.7.
TABLE = pd.DataFrame({
    "component": ["L0H0", "L0H1", "L1H0", "L1H1", "MLP0", "MLP1"],
    "kind": ["head"] * 4 + ["mlp"] * 2,
    "layer": [0, 0, 1, 1, 0, 1],
    "head": [0, 1, 0, 1, -1, -1],
    "accuracy": [0.5, 0.0, 1.0, 0.6, 0.5, 0.9],
    "share_l0": [1.0, 0.5, 0.5, 0.4, 0.1, 0.4],
    "share_l1": [0.0, 0.5, 0.5, 0.6, 0.9, 0.6],
    "label_bias": [1.0, 0.5, 0.5, 0.6, 0.9, 0.6],
    "category": ["label-biased", "bad", "good", "neutral", "label-biased", "good"],
})
CHANCE, FULL = 0.5, 0.7


def traces(figure: go.Figure, kind: str) -> list:
    return [t for t in figure.data if t.type == kind]


# -- figure 1 ----------------------------------------------------------------------------------------
def test_heatmap_holds_every_accuracy_in_place():
    figure = plotting.accuracy_heatmap(TABLE, FULL, CHANCE, "tiny run")
    heads, mlps = traces(figure, "heatmap")
    assert np.array(heads.z, dtype=float).tolist() == [[0.5, 0.0], [1.0, 0.6]]  # [layer, head]
    assert np.array(mlps.z, dtype=float).tolist() == [[0.5], [0.9]]
    assert list(heads.x) == ["0", "1"] and list(mlps.x) == ["MLP"] and list(heads.y) == [0, 1]
    assert heads.customdata[1][0].tolist() == ["L1H0", 0.5, "good"]
    assert mlps.customdata[0][0].tolist() == ["MLP0", 0.9, "label-biased"]
    assert "label bias" in heads.hovertemplate and "customdata[2]" in heads.hovertemplate
    axis = figure.layout.coloraxis
    assert (axis.cmin, axis.cmax) == (0.0, 1.0)
    assert [list(stop) for stop in axis.colorscale][2] == [0.5, plotting.NEUTRAL]  # neutral colour at chance
    ticks = dict(zip(axis.colorbar.tickvals, axis.colorbar.ticktext, strict=True))
    assert ticks == {0.0: "0%", 0.25: "25%", 0.5: "chance 50%", 0.7: "full model 70% ◀", 1.0: "100%"}  # 0.75 is too close
    assert figure.layout.title.text == "tiny run"


def test_colorscale_is_centred_on_chance():
    scale = plotting.accuracy_colorscale(0.25)
    assert [stop[0] for stop in scale] == [0.0, 0.125, 0.25, 0.625, 1.0]
    assert scale[2][1] == plotting.NEUTRAL
    with pytest.raises(PartsError, match="chance accuracy must be between 0 and 1, got 1.0"):
        plotting.accuracy_colorscale(1.0)


def test_heatmap_refuses_a_table_without_the_columns():
    with pytest.raises(PartsError, match=r"the heatmap needs columns \['label_bias', 'category'\]"):
        plotting.accuracy_heatmap(TABLE.drop(columns=["label_bias", "category"]), FULL, CHANCE)


# -- figure 2 ----------------------------------------------------------------------------------------
def test_categorization_scatter_two_labels():
    figure = plotting.categorization_scatter(TABLE, FULL, CHANCE, ["l0", "l1"])
    heads, mlps = traces(figure, "scatter")
    assert (heads.name, mlps.name) == ("attention heads", "MLPs")
    assert list(heads.x) == [0.0, 0.5, 0.5, 0.6] and list(heads.y) == [0.5, 0.0, 1.0, 0.6]
    assert list(mlps.x) == [0.9, 0.6] and heads.marker.color != mlps.marker.color
    assert figure.layout.xaxis.title.text == "share of examples predicted 'l1'"
    rects = [(s.x0, s.x1, s.y0, s.y1) for s in figure.layout.shapes if s.type == "rect"]
    assert rects == [(-0.02, pytest.approx(0.1), 0, 1), (0.9, 1.02, 0, 1),  # both one-sided label bands
                     (0, 1, FULL, 1.02), (0, 1, -0.02, CHANCE)]  # good above the full model, bad below chance
    lines = sorted(s.y0 for s in figure.layout.shapes if s.type == "line")
    assert lines == [CHANCE, FULL]
    texts = [a.text for a in figure.layout.annotations]
    assert "good: ≥ full model and above chance (2)" in texts and "bad: below chance (1)" in texts
    assert "◀ label-biased (2) ▶" in texts


def test_categorization_scatter_more_labels_uses_the_bias_score():
    table = TABLE.drop(columns=["share_l0", "share_l1"])
    figure = plotting.categorization_scatter(table, FULL, 1 / 3, ["a", "b", "c"])
    assert list(traces(figure, "scatter")[0].x) == [1.0, 0.5, 0.5, 0.6]
    assert [(s.x0, s.x1) for s in figure.layout.shapes if s.type == "rect"][0] == (0.9, 1.02)
    assert figure.layout.xaxis.title.text.startswith("label-bias score")


# -- figure 3 ----------------------------------------------------------------------------------------
def test_stability_scatter_and_title():
    names = list(TABLE["component"])
    figure = plotting.stability_scatter(
        torch.tensor([0.5, 0.0, 1.0, 0.6, 0.5, 0.9]), [0.4, 0.1, 0.9, 0.6, 0.5, 0.8], names,
        {"pearson": 0.98765, "spearman": 0.5, "top_k_iou": 0.25}, "template 1", "template 2", CHANCE,
    )
    heads, mlps = traces(figure, "scatter")
    assert list(heads.x) == pytest.approx([0.5, 0.0, 1.0, 0.6]) and list(heads.y) == [0.4, 0.1, 0.9, 0.6]
    assert list(mlps.text) == ["MLP0", "MLP1"]
    assert "Pearson r = 0.99, Spearman ρ = 0.50, top-5 IoU = 0.25" in figure.layout.title.text
    assert figure.layout.xaxis.title.text == "accuracy, template 1"
    with pytest.raises(PartsError, match=r"runs differ in components \(6 vs 5\)"):
        plotting.stability_scatter([0.5] * 6, [0.5] * 5, names, {"pearson": 0, "spearman": 0}, "a", "b", CHANCE)


def test_correlation_heatmap():
    labels = ["t1 s0", "t1 s1", "t2 s0"]
    matrix = pd.DataFrame([[1.0, 0.5, 0.2], [0.5, 1.0, 0.8], [0.2, 0.8, 1.0]], index=labels, columns=labels)
    figure = plotting.correlation_heatmap(matrix, "agreement")
    (heatmap,) = traces(figure, "heatmap")
    assert np.array(heatmap.z).tolist() == matrix.to_numpy().tolist() and list(heatmap.x) == labels
    assert (heatmap.zmin, heatmap.zmax) == (-1, 1)
    assert figure.layout.title.text == "agreement<br><sup>mean over pairs r = 0.50</sup>"  # (0.5 + 0.2 + 0.8) / 3
    with pytest.raises(PartsError, match=r"must be square, got \(3, 2\)"):
        plotting.correlation_heatmap(matrix.iloc[:, :2])


# -- figure 4 ----------------------------------------------------------------------------------------
def test_distribution_per_layer():
    figure = plotting.accuracy_distribution(TABLE, FULL, CHANCE)
    (box,) = traces(figure, "box")
    (mlps,) = traces(figure, "scatter")
    assert list(box.x) == [0, 0, 1, 1] and list(box.y) == [0.5, 0.0, 1.0, 0.6] and box.boxpoints == "all"
    assert list(mlps.x) == [0 + plotting.MLP_OFFSET, 1 + plotting.MLP_OFFSET] and list(mlps.y) == [0.5, 0.9]
    assert sorted(s.y0 for s in figure.layout.shapes) == [CHANCE, FULL]


# -- figure 5 ----------------------------------------------------------------------------------------
RESULTS = pd.DataFrame({
    "task": ["sst2"] * 6 + ["agnews"] * 2,
    "template": [1, 2, 1, 2, 1, 2, 1, 2],
    "seed": [0] * 8,
    "method": ["comprw", "comprw", "icl", "icl", "oracle", "oracle", "icl", "icl"],
    "labels": [24, 24, 4, 4, 4, 4, 4, 4],
    "shots": [4] * 8,
    "accuracy": [0.8, 0.9, 0.5, 0.7, 1.0, 1.0, 0.3, 0.5],
})


def test_method_summary_by_hand():
    summary = method_summary(RESULTS)
    assert list(summary["label"]) == ["k-shot ICL", "k-shot ICL", "CompRW 24"]  # oracle left out
    assert list(summary["task"]) == ["sst2", "agnews", "sst2"]
    assert summary["mean"].tolist() == pytest.approx([0.6, 0.4, 0.85])
    assert summary["std"].tolist() == pytest.approx([0.1414214, 0.1414214, 0.0707107])  # sample sd of 2 values
    assert summary["count"].tolist() == [2, 2, 2]
    assert list(method_summary(RESULTS, include_oracle=True)["label"]) == ["k-shot ICL", "k-shot ICL", "CompRW 24",
                                                                           "Oracle RW (fit on test)"]


def test_method_bars():
    figure = plotting.method_bars(RESULTS)
    icl, comprw = traces(figure, "bar")
    assert (icl.name, comprw.name) == ("k-shot ICL (k = 4)", "CompRW 24")
    assert list(icl.x) == ["sst2", "agnews"] and list(icl.y) == pytest.approx([0.6, 0.4])
    assert list(comprw.error_y.array) == pytest.approx([0.0707107]) and figure.layout.barmode == "group"
    with pytest.raises(PartsError, match=r"lacks columns \['labels', 'shots'\]"):
        plotting.method_bars(RESULTS.drop(columns=["labels", "shots"]))


def test_k_shot_icl_is_one_series_when_tasks_differ_in_k():
    rows = [dict(task=t, method="icl", labels=k, shots=k, accuracy=a, template=1, seed=0)
            for t, k, a in (("sst2", 4, 0.6), ("mnli", 3, 0.4), ("rte", 4, 0.5))]
    rows.append(dict(task="mnli", method="icl", labels=24, shots=3, accuracy=0.3, template=1, seed=0))
    figure = plotting.method_bars(pd.DataFrame(rows))
    k_shot, many_shot = traces(figure, "bar")
    assert k_shot.name == "k-shot ICL (k = 4; 3 for mnli)" and list(k_shot.x) == ["sst2", "mnli", "rte"]
    assert list(k_shot.y) == pytest.approx([0.6, 0.4, 0.5])
    assert many_shot.name == "24-shot ICL" and list(many_shot.x) == ["mnli"]


def test_weights_heatmap_clips_like_predictions():
    names = ["L0H0", "L0H1", "L1H0", "L1H1", "MLP0", "MLP1"]
    figure = plotting.weights_heatmap(names, torch.tensor([-0.5, 0.3, 1.7, 0.9, 0.0, 0.6]))
    heads, mlps = traces(figure, "heatmap")
    np.testing.assert_allclose(np.array(heads.z, dtype=float), [[0.0, 0.3], [1.0, 0.9]], rtol=1e-6)
    np.testing.assert_allclose(np.array(mlps.z, dtype=float), [[0.0], [0.6]], rtol=1e-6)
    assert "4 of 6 components above 0.01" in figure.layout.title.text
    with pytest.raises(PartsError, match=r"\(5,\) weights for 6 components"):
        plotting.weights_heatmap(names, torch.ones(5))


# -- figure 6 ----------------------------------------------------------------------------------------
def test_label_word_spans_and_positions():
    prompt = "Review: good\nSentiment: positive\nReview: bad positive\nSentiment: negative\nReview: ok\nSentiment:"
    spans = demonstration_label_spans(prompt, [" negative", " positive"], "\n", "\nSentiment:")
    assert [prompt[a:b] for a, b in spans] == [" positive", " negative"]  # not the ' positive' inside a review
    assert spans == [(23, 32), (64, 73)]
    # without the template's tail, the ' positive' ending the review text would pass for a label
    assert len(demonstration_label_spans(prompt, [" negative", " positive"], "\n")) == 3
    offsets = [(0, 0), (0, 7), (7, 12), (12, 13), (13, 23), (23, 32), (32, 34), (60, 65), (65, 74)]
    assert spans_to_positions(offsets, spans) == [5, 8]


def test_head_logit_view_centres_more_than_two_labels():
    from parts.analysis.inspect_head import HeadInspection

    logits = torch.tensor([[1.0, 2.0, 6.0], [0.0, 3.0, 0.0]])
    inspection = HeadInspection("L0H0", 0, 0, 0.5, 0.5, "neutral", ("a", "b", "c"), logits, torch.tensor([2, 1]), [])
    view = plotting.head_logit_view(inspection)
    assert list(view) == ["'a' (centred)", "'b' (centred)", "'c' (centred)"]
    assert view["'a' (centred)"].tolist() == [-2.0, -1.0] and view["'c' (centred)"].tolist() == [3.0, -1.0]
    figure = plotting.head_closeup(inspection)  # no attention: the logits panel only
    assert [t.type for t in figure.data] == ["box"] * 3 and list(figure.data[0].x) == ["c", "b"]


def test_top_attended_and_picked_heads():
    from parts.analysis.inspect_head import AttentionView, pick_heads, top_attended

    view = AttentionView(0, 1, ["<s>", "a", " pos", "\n\n", "b"], torch.tensor([0.4, 0.1, 0.3, 0.0, 0.2]), [2])
    top = top_attended(view, k=3)
    assert top.to_dict("list") == {"position": [0, 2, 4], "token": ["<s>", " pos", "b"],
                                   "attention": pytest.approx([0.4, 0.3, 0.2]), "demonstration_label_word": [False, True, False]}
    assert pick_heads(TABLE) == {"good": "L1H0", "label-biased": "L0H0"}
    no_good = TABLE.assign(category="neutral")
    assert pick_heads(no_good) == {"good": "L1H0"}  # the most accurate head stands in


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, tiny_llama, tiny_task_file):
    """Three saved runs of a tiny random model (two seeds of template 1, template 2), results and weights."""
    from parts.experiments.runner import decompose_task, run_dir
    from parts.reweighting.reweight import ReweightResult, save_weights, weights_file

    root = tmp_path_factory.mktemp("runs")
    paths = []
    for template, seed in ((1, 0), (1, 1), (2, 0)):
        run = decompose_task(tiny_llama, str(tiny_task_file), template=template, seed=seed, limit=12, progress=False)
        paths.append(run.save(run_dir(root, run.model, str(tiny_task_file), template, seed, limit=12)))
    names = run.component_names
    weights = torch.linspace(-0.2, 1.2, len(names))
    save_weights(weights_file(paths[0]), names, ReweightResult(weights, 100, "plateau", 1.0))
    RESULTS.assign(model="tiny", task="tiny", limit=12, n_test=12, note="").to_csv(root / "results.csv", index=False)
    return root, paths


def test_inspect_head_on_a_tiny_model(tiny_runs, tiny_llama):
    from parts.analysis.analyze import component_table
    from parts.decomposition.runs import DecompositionRun

    run = DecompositionRun.load(tiny_runs[1][0])
    inspection = head_inspection(run, "L2H3", tiny_llama, examples=(0, 5))
    table = component_table(run)
    row = table[table["component"] == "L2H3"].iloc[0]
    assert (inspection.layer, inspection.head, inspection.accuracy) == (2, 3, row["accuracy"])
    assert inspection.label_bias == row["label_bias"] and inspection.category == row["category"]
    assert torch.equal(inspection.logits, run.component_logits[:, run.component_names.index("L2H3")])
    view = inspection.attention[1]
    tokens = tiny_llama.tokenizer(run.prompts.prompts[5])["input_ids"]
    assert view.example == 5 and view.gold == run.prompts.labels[5] and len(view.pattern) == len(tokens)
    assert float(view.pattern.sum()) == pytest.approx(1.0, abs=1e-5)
    # One marked position per demonstration, each a label word.
    assert len(view.label_positions) == run.prompts.shots
    assert {view.tokens[p].strip() for p in view.label_positions} == {"negative", "positive"}
    figure = plotting.head_closeup(inspection, example=1)
    boxes, bars = traces(figure, "box"), traces(figure, "bar")
    (box,) = boxes  # two labels: one box per gold label of the logit difference
    assert box.name == "logit 'positive' - logit 'negative'"
    assert list(box.y) == pytest.approx((inspection.logits[:, 1] - inspection.logits[:, 0]).tolist())
    assert list(bars[0].y) == pytest.approx(view.pattern.tolist())
    assert bars[0].marker.color[view.label_positions[0]] == plotting.CATEGORY_COLORS["label-biased"]
    assert figure.layout.title.text.startswith(f"L2H3 up close: accuracy {row['accuracy']:.0%}")
    with pytest.raises(PartsError, match="MLP1 is an MLP and has no attention pattern"):
        head_inspection(run, "MLP1", tiny_llama)
    with pytest.raises(PartsError, match="example 2 has no attention pattern: choose 0-1"):
        plotting.head_closeup(inspection, example=2)


# -- the figure set and the command ---------------------------------------------------------------------------
def test_figure_set_names_what_the_runs_support(tiny_runs, tiny_llama):
    root, _ = tiny_runs
    figures = figure_set(root, model_loader=lambda name: tiny_llama)
    head = [n for n in figures if n.startswith("tiny-head-")]
    assert sorted(figures) == sorted([
        "tiny-accuracy-heatmap", "tiny-categories", "tiny-distribution", "tiny-stability-demonstrations",
        "tiny-stability-templates", "tiny-correlation", "tiny-weights", *head, "reweighting-accuracy",
    ]) and len(head) == 1
    (matrix,) = traces(figures["tiny-correlation"], "heatmap")
    assert list(matrix.x) == ["t1 s0", "t1 s1", "t2 s0"]
    assert set(figure_set(root, tasks=["other"])) == set()
    assert set(figure_set(root, examples=99)) == set()  # runs and results.csv rows of 12 examples only
    assert set(figure_set(root, examples=12, only=["*-weights", "reweighting-*"])) == {"tiny-weights", "reweighting-accuracy"}


def test_stability_pairs_prefer_the_reference_template(tiny_runs):
    from parts.decomposition.runs import DecompositionRun

    runs = [DecompositionRun.load(p) for p in tiny_runs[1]]
    pairs = stability_pairs(runs)
    assert [(a.prompts.template, a.prompts.seed, b.prompts.template, b.prompts.seed) for a, b in pairs.values()] == [
        (1, 0, 1, 1), (1, 0, 2, 0)]


def test_figures_command_writes_html_and_png(tiny_runs, tmp_path, capsys):
    root, _ = tiny_runs
    out = tmp_path / "figures"
    assert main(["figures", str(root), "--out", str(out), "--formats", "html,png", "--no-model",
                 "--html-only", "tiny-accuracy-heatmap"]) == 0
    assert "wrote 9 files for 8 figures" in capsys.readouterr().out  # 8 PNG + 1 HTML
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".parts", ".parts-lock", "plotly.min.js", "tiny-accuracy-heatmap.html"]
        + [f"tiny-{n}.png" for n in ("accuracy-heatmap", "categories", "distribution", "stability-demonstrations",
                                     "stability-templates", "correlation", "weights")] + ["reweighting-accuracy.png"])
    assert (out / "tiny-categories.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_command_errors_are_one_line(tmp_path, capsys):
    assert main(["figures", str(tmp_path), "--out", str(tmp_path / "f")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"parts figures: error: no finished runs under {tmp_path}: run `parts sweep --out {tmp_path}` "
        "or `parts decompose` first"]
    assert main(["figures", str(tmp_path), "--out", str(tmp_path / "f"), "--formats", "png,gif"]) == 2
    assert "unknown format(s) gif: choose from html, png, svg, pdf" in capsys.readouterr().err


# -- export ------------------------------------------------------------------------------------------------------------
def test_static_export_writes_images(tmp_path):
    figure = plotting.accuracy_heatmap(TABLE, FULL, CHANCE, "tiny run")
    written = write_figures({"heatmap": figure}, tmp_path, ("png", "svg", "pdf"), progress=False)
    assert [p.name for p in written] == ["heatmap.png", "heatmap.svg", "heatmap.pdf"]
    png = (tmp_path / "heatmap.png").read_bytes()
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (760 * 2, 420 * 2)  # the layout's size at scale 2
    assert (tmp_path / "heatmap.svg").read_text().startswith("<svg") and "tiny run" in (tmp_path / "heatmap.svg").read_text()
    assert (tmp_path / "heatmap.pdf").read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in tmp_path.glob(".*")) == [".parts", ".parts-lock"]  # no temporary files left behind


def test_the_same_figure_exports_to_the_same_bytes(tmp_path):
    """plotly draws random element, trace and drawing ids: unfixed, every `parts tables` run changes the committed
    SVGs and HTML pages in git. Two exports (two browser sessions) must be byte-identical; two different figures
    must still get different drawing ids (their clip paths and gradients may share one page)."""
    from parts.figures.export import deterministic_svg

    heatmap = plotting.accuracy_heatmap(TABLE, FULL, CHANCE, "tiny run")  # colour bar: a gradient id
    lines = go.Figure([go.Scatter(x=[0, 1], y=[0.5, 0.7], name="full"), go.Bar(x=[0, 1], y=[0.2, 0.4], name="b")])
    figures = {"heatmap": heatmap, "lines": lines}  # a scatter's class names its trace's uid
    before = heatmap.to_json()
    for folder in ("a", "b"):
        write_figures(figures, tmp_path / folder, ("html", "svg"), progress=False)
    for name in ("heatmap.svg", "heatmap.html", "lines.svg", "lines.html"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert heatmap.to_json() == before  # the caller's figure is not changed by the export
    svg = (tmp_path / "a" / "heatmap.svg").read_text()
    drawing_id = svg.split('<defs id="defs-', 1)[1].split('"', 1)[0]
    assert f'clip-path="url(#clip{drawing_id}xyplot)"' in svg and f'id="clip{drawing_id}xyplot"' in svg
    assert drawing_id not in (tmp_path / "a" / "lines.svg").read_text()
    assert 'class="trace scatter trace0"' in (tmp_path / "a" / "lines.svg").read_text()
    assert '<div id="heatmap" class="plotly-graph-div"' in (tmp_path / "a" / "heatmap.html").read_text()
    # Only attribute values are rewritten: the same letters in a title's text stay.
    drawn = b'<svg><defs id="defs-abc123"/><g clip-path="url(#clipabc123x)"><text>abc123</text></g></svg>'
    fixed = deterministic_svg(drawn)
    assert fixed.count(b"abc123") == 1 and b"<text>abc123</text>" in fixed
    assert fixed == deterministic_svg(drawn.replace(b"abc123", b"fed987").replace(b"<text>fed987", b"<text>abc123"))


def test_missing_browser_names_the_install(monkeypatch):
    from choreographer.browsers.chromium import Chromium

    monkeypatch.setattr(Chromium, "find_browser", classmethod(lambda cls, **kwargs: None))
    with pytest.raises(PartsError) as error:
        find_chromium()
    assert str(error.value).endswith(": apt-get install -y chromium fonts-liberation")
    # The command the error names installs what CI installs (scripts/test.sh), and the README says the same.
    packages = CHROMIUM_INSTALL.removeprefix("apt-get install -y ").split()
    setup = next(line for line in (Path(__file__).parents[1] / "scripts" / "test.sh").read_text().splitlines()
                 if "apt-get install" in line)
    assert packages == ["chromium", "fonts-liberation"] and setup.split()[-len(packages):] == packages
    assert CHROMIUM_INSTALL in (Path(__file__).parents[1] / "README.md").read_text()


def test_unknown_format_and_plotlyjs_mode(tmp_path):
    figure = go.Figure()
    with pytest.raises(PartsError, match="unknown figure format"):
        write_figure(figure, tmp_path, "x", ["gif"])
    with pytest.raises(PartsError, match="plotly.js mode 'web' is not one of directory, cdn, inline"):
        write_figure(figure, tmp_path, "x", ["html"], plotlyjs="web")


def read_png(path: Path) -> np.ndarray:
    """Decode an 8-bit RGB(A) non-interlaced PNG (what Chromium writes) into [row, column, channel]."""
    data = path.read_bytes()
    chunks, at = {}, 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        chunks.setdefault(kind, []).append(data[at + 8:at + 8 + length])
        at += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"][0])
    assert depth == 8 and color in (2, 6) and interlace == 0
    channels = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(chunks[b"IDAT"])), dtype=np.uint8).reshape(height, -1)
    image = np.zeros((height, width * channels), dtype=np.int32)
    previous = np.zeros(width * channels, dtype=np.int32)
    for row in range(height):
        kind, line = raw[row, 0], raw[row, 1:].astype(np.int32)
        out = line.copy()
        if kind == 2:
            out = (line + previous) % 256
        elif kind in (1, 3, 4):
            for i in range(len(line)):
                left = out[i - channels] if i >= channels else 0
                up, corner = previous[i], previous[i - channels] if i >= channels else 0
                if kind == 1:
                    guess = left
                elif kind == 3:
                    guess = (left + up) // 2
                else:
                    p = left + up - corner
                    guess = min((abs(p - left), 0, left), (abs(p - up), 1, up), (abs(p - corner), 2, corner))[2]
                out[i] = (line[i] + guess) % 256
        image[row] = previous = out
    return image.reshape(height, width, channels)[..., :3]


def test_html_figure_renders_in_headless_chromium(tmp_path):
    figure = plotting.accuracy_heatmap(TABLE, FULL, CHANCE, "tiny run")
    write_figure(figure, tmp_path, "heatmap", ["html"], plotlyjs="directory")
    console = chromium_screenshot(tmp_path / "heatmap.html", tmp_path / "shot.png", width=500, height=420)
    assert console == []  # no script errors, no warnings
    pixels = read_png(tmp_path / "shot.png")
    assert pixels.shape == (420, 500, 3)
    colours = {tuple(p) for p in pixels.reshape(-1, 3).tolist()}
    assert len(colours) > 50  # text, axes and the colour scale, not a blank page
    # The heatmap's cells: L1H0 (accuracy 1.0) is the scale's deep blue, L0H1 (0.0) its deep red.
    assert (0x21, 0x66, 0xAC) in colours and (0xB2, 0x18, 0x2B) in colours


def test_a_script_error_shows_in_the_console(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>missingFunction();</script></body></html>")
    console = chromium_screenshot(page, tmp_path / "shot.png", width=200, height=100)
    assert console == ['"Uncaught ReferenceError: missingFunction is not defined", source: ' + page.as_uri() + " (1)"]


def test_heatmap_and_scatters_draw_split_experts():
    """With --split-experts a mixture-of-experts layer's MLP is its experts (MLP1E0, MLP1E2, shared MLP1S):
    they get their own [layer, expert] grid, and a place in the scatters."""
    experts = pd.DataFrame({
        "component": ["L0H0", "L1H0", "MLP0", "MLP1E0", "MLP1E2", "MLP1S"],
        "kind": ["head", "head", "mlp", "expert", "expert", "expert"],
        "layer": [0, 1, 0, 1, 1, 1],
        "head": [0, 0, -1, 0, 2, 1_000_000],
        "accuracy": [0.5, 0.6, 0.7, 0.8, 0.3, 0.9],
        "label_bias": [0.5] * 6,
        "category": ["neutral"] * 6,
    })
    heads, mlps, expert_grid = traces(plotting.accuracy_heatmap(experts, FULL, CHANCE), "heatmap")
    assert list(expert_grid.x) == ["E0", "E2", "S"]
    assert np.array(expert_grid.z, dtype=object).tolist() == [[None, None, None], [0.8, 0.3, 0.9]]
    assert expert_grid.customdata[1][2][0] == "MLP1S"
    assert np.array(mlps.z, dtype=object).tolist() == [[0.7], [None]]
    scatter = traces(plotting.categorization_scatter(experts, FULL, CHANCE, ["a", "b", "c"]), "scatter")
    assert [t.name for t in scatter] == ["attention heads", "MLPs", "experts"]
    assert list(scatter[2].y) == [0.8, 0.3, 0.9]
    stability = traces(plotting.stability_scatter(experts["accuracy"].tolist(), experts["accuracy"].tolist(),
                                                  experts["component"].tolist(), {"pearson": 1.0, "spearman": 1.0},
                                                  "a", "b", CHANCE), "scatter")
    assert [len(t.x) for t in stability] == [2, 1, 3]
    # the report redraws each run's grid from these cells: every component lands where the figure put it
    figure = plotting.accuracy_heatmap(experts, FULL, CHANCE)
    for (trace, layer, column), accuracy, name in zip(plotting.heatmap_cells(experts), experts["accuracy"],
                                                      experts["component"], strict=True):
        assert figure.data[trace].z[layer][column] == accuracy and figure.data[trace].customdata[layer][column][0] == name


def test_head_sources_figure_draws_each_heads_segment_shares_and_copy_score():
    rows = pd.DataFrame({"task": ["sst2", "sst2"], "head": ["L21H1", "L23H2"], "copy_score": [0.36, 0.25],
                         "share_BOS": [0.02, 0.05], "share_demo_text": [0.0, 0.17], "share_demo_label_word": [0.63, 0.77],
                         "share_separator": [0.0, 0.0], "share_query": [0.34, 0.01]})
    figure = plotting.head_sources_figure(rows)
    bars = {trace.name: list(trace.x) for trace in figure.data if trace.name}
    assert bars["demonstration label words"] == [0.63, 0.77] and bars["query"] == [0.34, 0.01]
    assert list(figure.data[-1].x) == [0.36, 0.25] and list(figure.data[-1].y) == ["sst2 L21H1", "sst2 L23H2"]
    with pytest.raises(PartsError, match="copy_score"):
        plotting.head_sources_figure(rows.drop(columns=["copy_score"]))


def test_figures_draw_chance_as_one_over_the_labels(tiny_runs):
    """Chance is 1 / labels in the figures as in the report, not the gold labels' majority rate (issue 28 §4)."""
    import dataclasses

    from parts.decomposition.runs import DecompositionRun, SavedRun
    from parts.figures.figureset import group_figures

    path = tiny_runs[1][0]
    run = DecompositionRun.load(path)
    n_labels = len(run.prompts.label_names)
    run.prompts = dataclasses.replace(run.prompts, labels=(0,) * (run.n_examples - 1) + (1,))  # unbalanced gold labels
    assert run.chance > 1 / n_labels
    figures = group_figures("tiny", [SavedRun(path, run)])
    ticks = figures["tiny-accuracy-heatmap"].layout.coloraxis.colorbar.ticktext
    assert f"chance {1 / n_labels:.0%}" in ticks and f"chance {run.chance:.0%}" not in ticks
