"""MkDocs hooks (mkdocs.yml `hooks:`): the API reference made from the package, the notebooks, and the check
that the public API is documented.

- The API reference pages (`reference/*.md`) are generated from the modules on disk, one page per
  subpackage with every module of it, so a new module is in the reference without editing a page.
- The committed figures (`figures/*.png`) are taken from `figures/`.
- The notebooks are taken from `notebooks/` and rendered with their committed outputs by mkdocs-jupyter; a plotly
  figure, stored as plotly JSON that nbconvert cannot show, is given an HTML form that draws it with the site's
  own copy of plotly.js (the pages work offline).
- Every public name (each name in `parts.__all__`, and every module-level function and class of every module
  whose name has no leading underscore) must have a docstring and appear in the built reference; otherwise
  the build fails, naming each missing one.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.parts")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "parts"
# The reference's pages: subpackage -> title. "base" is the modules at the top of the package.
PAGES = {
    "base": "The base layer: errors, files, component names, methods",
    "model": "parts.model: loading, engines, readout",
    "data": "parts.data: tasks and prompts",
    "decomposition": "parts.decomposition: the decomposition and its runs",
    "analysis": "parts.analysis: components as classifiers, statistics",
    "reweighting": "parts.reweighting: component reweighting and calibration",
    "experiments": "parts.experiments: sweeps, evaluation, transfer, controls",
    "figures": "parts.figures: plotting, figure sets, tables",
    "report": "parts.report: the static HTML report",
}
# The command line is documented by `parts COMMAND --help` and the guides, not here.
NOT_IN_REFERENCE = {"cli"}

_anchors: set[str] = set()  # the ids of the built reference pages
_staging: list[Path] = []  # the notebooks with their figures' HTML, removed after the build


def modules() -> dict[str, list[str]]:
    """Page -> the dotted names of the modules it documents (every module on disk but `__init__`/`__main__`)."""
    pages: dict[str, list[str]] = {page: [] for page in PAGES}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if path.stem.startswith("_") or relative.parts[0] in NOT_IN_REFERENCE:
            continue
        page = "base" if len(relative.parts) == 1 else relative.parts[0]
        if page not in pages:
            raise PluginError(f"parts/{relative.parts[0]}/ has no API reference page: add it to PAGES in {Path(__file__).name}")
        pages[page].append(".".join(("parts", *relative.with_suffix("").parts)))
    return pages


def public_names(module: str) -> dict[str, bool]:
    """A module's public functions and classes (its `__all__` where it has one) -> whether each has a docstring."""
    path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
    tree = ast.parse(path.read_text(), str(path))
    defined = {node.name: ast.get_docstring(node) is not None for node in tree.body
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    declared = next((ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                     and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)), None)
    names = declared if declared is not None else [name for name in defined if not name.startswith("_")]
    return {name: defined.get(name, True) for name in names if name in defined}


def exports() -> dict[str, str]:
    """`parts.__all__`'s names -> the module that owns each (`parts.EXPORTS`), read without importing torch."""
    import parts

    return {name: parts.EXPORTS[name] for name in parts.__all__ if name != "__version__"}


def page_text(page: str, names: list[str]) -> str:
    lines = [f"# {PAGES[page]}", "", "Generated from the docstrings (`scripts/docs_hooks.py`).", ""]
    for module in names:
        lines += [f"::: {module}", ""]
    return "\n".join(lines)


def index_text() -> str:
    lines = ["# API reference", "",
             "`import parts` gives the common entry points below, each imported on first use (so `import parts` alone",
             "loads no torch); `parts.__version__` is the installed version. Everything else is imported from the module",
             "that owns it; the pages in this section document every module, one page per subpackage, in the package's",
             "layers from the bottom up (see [Architecture](../concepts/architecture.md)).", "",
             "| name | where it lives |", "|---|---|"]
    for name, module in exports().items():
        page = "base" if module.count(".") == 1 else module.split(".")[1]
        lines.append(f"| [`parts.{name}`]({page}.md#{module}.{name}) | `{module}` |")
    return "\n".join(lines) + "\n"


PLOTLY_JSON = "application/vnd.plotly.v1+json"


def with_plotly_html(notebook: dict) -> dict:
    """`notebook` with an HTML form of every plotly output; the first loads plotly.js from the site's assets."""
    import plotly.io

    first = True
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if PLOTLY_JSON in data and "text/html" not in data:
                data["text/html"] = plotly.io.to_html(
                    data[PLOTLY_JSON], include_plotlyjs="../assets/plotly.min.js" if first else False, full_html=False,
                    validate=False, default_height="480px")
                first = False
    return notebook


def cli_text() -> str:
    """The command-line reference: every command's `--help`, from the parser itself (`parts.cli.build_parser`)."""
    import argparse
    import os

    from parts.cli import build_parser

    width, os.environ["COLUMNS"] = os.environ.get("COLUMNS"), "110"  # argparse wraps to $COLUMNS
    try:
        parser = build_parser()
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        lines = ["# The command line", "", "Every `parts` command's `--help`, generated from the parser (`parts.cli`);",
                 "the [how-to guides](../guide/sweeps.md) show them at work.", "", "```text", parser.format_help().rstrip(),
                 "```", ""]
        for name, command in commands.items():
            lines += [f"## parts {name}", "", "```text", command.format_help().rstrip(), "```", ""]
    finally:
        if width is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = width
    return "\n".join(lines)


@event_priority(100)  # before mkdocs-jupyter turns the notebooks into pages
def on_files(files: Files, config) -> Files:
    import plotly

    staging = Path(tempfile.mkdtemp(prefix="parts-docs-"))
    _staging.append(staging)
    (staging / "notebooks").mkdir()
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        rendered = with_plotly_html(json.loads(notebook.read_text()))
        (staging / "notebooks" / notebook.name).write_text(json.dumps(rendered))
        files.append(File(f"notebooks/{notebook.name}", str(staging), config.site_dir, config.use_directory_urls))
    for figure in sorted((ROOT / "figures").glob("*.png")):  # the committed figures, at the same relative path
        files.append(File(f"figures/{figure.name}", str(ROOT), config.site_dir, config.use_directory_urls))
    plotly_js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    files.append(File.generated(config, "assets/plotly.min.js", abs_src_path=str(plotly_js)))
    files.append(File.generated(config, "reference/index.md", content=index_text()))
    files.append(File.generated(config, "reference/cli.md", content=cli_text()))
    for page, names in modules().items():
        files.append(File.generated(config, f"reference/{page}.md", content=page_text(page, names)))
    changelog = ROOT / "CHANGELOG.md"
    files.append(File.generated(config, "changelog.md", content=changelog.read_text()))
    return files


def on_pre_build(config) -> None:
    _anchors.clear()


def on_page_content(html: str, page, config, files) -> str:
    if page.file.src_uri.startswith("reference/"):
        _anchors.update(re.findall(r'id="(parts\.[\w.]+)"', html))
    return html


def on_post_build(config) -> None:
    for staging in _staging:
        shutil.rmtree(staging, ignore_errors=True)
    _staging.clear()
    problems = []
    wanted = {f"{module}.{name}": documented for names in modules().values() for module in names
              for name, documented in public_names(module).items()}
    wanted.update({f"{module}.{name}": True for name, module in exports().items()})
    for name, documented in sorted(wanted.items()):
        if not documented:
            problems.append(f"{name} has no docstring")
        elif name not in _anchors:
            problems.append(f"{name} is not in the API reference")
    if problems:
        for problem in problems:
            log.error(problem)
        raise PluginError(f"{len(problems)} public name(s) undocumented: write their docstrings")
