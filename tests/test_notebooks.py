"""The three notebooks run top to bottom on the embedded model, on small slices."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PLOTLY = "application/vnd.plotly.v1+json"
MAX_STORED_BYTES = 1_500_000  # committed notebooks keep small outputs


def execute(name: str) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    # The notebooks' own folder as working directory, so their relative defaults resolve as for a user.
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return notebook


def outputs(notebook: nbformat.NotebookNode) -> list[dict]:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def figures(notebook: nbformat.NotebookNode) -> list[dict]:
    return [output["data"][PLOTLY] for output in outputs(notebook) if PLOTLY in output.get("data", {})]


def assert_figures_have_static_images(notebook: nbformat.NotebookNode) -> None:
    """Every figure is stored as plotly JSON and as a PNG beside it (what GitHub shows), and nothing complained on
    stderr (the ipywidgets warning of tqdm in a notebook: ipywidgets is in the notebook extra)."""
    shown = [output["data"] for output in outputs(notebook) if PLOTLY in output.get("data", {})]
    assert shown
    for data in shown:
        png = base64.b64decode(data["image/png"])
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000  # a drawn figure, not an empty image
    assert [o for o in outputs(notebook) if o.get("name") == "stderr"] == []


@pytest.fixture
def small_slices(monkeypatch, data_dir, tmp_path):
    """The notebooks' size parameters, set small; the kernel inherits the environment."""
    monkeypatch.setenv("PARTS_DATA_DIR", str(data_dir))
    monkeypatch.setenv("PARTS_NB_LIMIT", "8")
    monkeypatch.setenv("PARTS_NB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("PARTS_NB_TASKS", "sst2")
    monkeypatch.setenv("PARTS_NB_TEMPLATES", "1,2")
    monkeypatch.setenv("PARTS_NB_SEEDS", "0,1")
    monkeypatch.setenv("PARTS_NB_FIGURES", str(tmp_path / "figures"))
    return tmp_path


@pytest.mark.integration
def test_explore_components(small_slices):
    notebook = execute("01_explore_components.ipynb")
    text = "".join(o.get("text", "") for o in outputs(notebook))
    assert "sst2 template 1 seed 0 | 4-shot | test n=8" in text
    heatmap = figures(notebook)[0]
    assert [trace["type"] for trace in heatmap["data"]] == ["heatmap", "heatmap"]
    assert len(heatmap["data"][0]["z"]) == 30 and len(heatmap["data"][0]["z"][0]) == 9  # SmolLM2: 30 layers x 9 heads
    assert_figures_have_static_images(notebook)


@pytest.mark.integration
def test_paper_figures(small_slices):
    notebook = execute("02_paper_figures.ipynb")
    text = "".join(o.get("text", "") for o in outputs(notebook))
    assert "4 runs under" in text and "4 decomposed now" in text  # 2 templates x 2 seeds, none saved before
    written = sorted(p.name for p in (small_slices / "figures").iterdir())
    assert {"sst2-accuracy-heatmap.png", "sst2-stability-templates.svg", "sst2-correlation.png"} <= set(written)
    assert any(name.startswith("sst2-head-L") for name in written)


@pytest.mark.integration
def test_inspect_head(small_slices):
    notebook = execute("03_inspect_head.ipynb")
    closeups = [f for f in figures(notebook) if f["layout"]["title"]["text"].startswith("L")]
    assert len(closeups) >= 1
    assert {trace["type"] for trace in closeups[0]["data"]} == {"box", "bar"}
    assert any("demonstration_label_word" in o.get("data", {}).get("text/html", "") for o in outputs(notebook))
    printed = "".join(o.get("text", "") for o in outputs(notebook) if o.get("output_type") == "stream")
    assert "copy score" in printed and "class matching" in printed  # parts.inspect_head's card
    assert any("copy_score" in o.get("data", {}).get("text/html", "") for o in outputs(notebook))
    assert_figures_have_static_images(notebook)


@pytest.mark.parametrize("name", ["01_explore_components.ipynb", "02_paper_figures.ipynb", "03_inspect_head.ipynb"])
def test_committed_notebooks_are_small_and_call_the_library(name):
    path = NOTEBOOKS / name
    assert path.stat().st_size < MAX_STORED_BYTES
    notebook = nbformat.read(path, as_version=4)
    source = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    assert 'os.environ.get("PARTS_NB_LIMIT"' in source  # the size parameter CI sets
    assert "def " not in source  # the library does the work
    assert "plotly.min.js" not in json.dumps(notebook)
    assert "notebook_figures()" in source  # figures stored with a PNG (parts.figures.export)
    if name != "02_paper_figures.ipynb":  # committed with its outputs: GitHub shows the PNGs
        assert_figures_have_static_images(notebook)


def test_notebook_figures_store_plotly_json_and_a_png():
    import plotly.graph_objects as go
    import plotly.io as pio

    from parts.figures.export import notebook_figures

    before = pio.renderers.default
    try:
        assert notebook_figures(static=False) == "plotly_mimetype"
        assert notebook_figures() == "plotly_mimetype+png"
        bundle = pio.renderers._build_mime_bundle(go.Figure(go.Bar(x=[1, 2], y=[3, 1])).to_dict())
        assert set(bundle) == {PLOTLY, "image/png"}
        assert base64.b64decode(bundle["image/png"]).startswith(b"\x89PNG")
    finally:
        pio.renderers.default = before
