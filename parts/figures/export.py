"""Writing figures: interactive HTML and static images (PNG, SVG, PDF) through kaleido 1.x.

Static export drives a headless Chromium. One browser serves every figure of a call
(`static_export`), since starting one costs seconds. Nothing here downloads anything: the
browser is the system's (Debian: `apt-get install -y chromium fonts-liberation`) and MathJax,
which kaleido would fetch from a CDN, is turned off. Every file is written under a temporary
name and renamed into place, so an interrupted export leaves no half-written figure. The same figure
exports to the same HTML and SVG bytes: plotly's random element, trace and drawing ids are fixed.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio

from parts import io
from parts.errors import PartsError
from parts.progress import Progress

CHROMIUM_INSTALL = "apt-get install -y chromium fonts-liberation"
STATIC_FORMATS = ("png", "svg", "pdf")
FORMATS = ("html", *STATIC_FORMATS)
PLOTLYJS_MODES = ("directory", "cdn", "inline")
PNG_SCALE = 2  # pixels per layout pixel: sharp on screens and slides


def find_chromium() -> str:
    """The Chromium (or Chrome) executable kaleido will drive; a PartsError naming the install if none."""
    from choreographer.browsers.chromium import Chromium

    path = Chromium.find_browser(skip_local=False)
    if not path:
        raise PartsError(f"static figure export needs a Chromium browser and none was found: {CHROMIUM_INSTALL}")
    return str(path)


def _start_browser() -> None:
    """Start kaleido's headless browser (the system's Chromium), kept for every image until stopped."""
    import kaleido

    find_chromium()
    # plotly passes its default HTTP headers as per-call options, which a running server
    # ignores with a warning; they only matter for map tiles.
    pio.defaults.headers = None
    kaleido.start_sync_server(mathjax=False, silence_warnings=True)


@contextmanager
def static_export() -> Iterator[None]:
    """One headless browser for every static image written inside the block."""
    import kaleido

    _start_browser()
    try:
        yield
    finally:
        kaleido.stop_sync_server(silence_warnings=True)


NOTEBOOK_PNG_SCALE = 1  # a notebook's stored PNG at the figure's own size: the notebook stays small


def notebook_figures(static: bool = True) -> str:
    """How a notebook stores the figures it shows; returns plotly's renderer name.

    Always as plotly JSON, which JupyterLab, VS Code and the docs site draw interactively. With `static`, also
    as a PNG beside it, which is what GitHub and nbviewer show (they do not run plotly). The PNG is drawn by
    kaleido with the system's Chromium, one browser kept for the session; with no Chromium, a PartsError
    names the install.
    """
    if not static:
        pio.renderers.default = "plotly_mimetype"
        return pio.renderers.default
    import atexit

    import kaleido

    _start_browser()
    atexit.register(kaleido.stop_sync_server, silence_warnings=True)
    pio.renderers.default = "plotly_mimetype+png"
    pio.renderers["png"].scale = NOTEBOOK_PNG_SCALE
    return pio.renderers.default


def figure_html(figure: go.Figure, plotlyjs: str = "directory", div_id: str | None = None) -> str:
    """A standalone page for the figure; `plotlyjs`: 'directory' (a shared plotly.min.js beside it),
    'cdn' (smallest, needs the network to view) or 'inline' (one self-contained file, ~4.6 MB). `div_id` names the
    figure's element (plotly draws a random one otherwise, and the page changes on every export)."""
    if plotlyjs not in PLOTLYJS_MODES:
        raise PartsError(f"plotly.js mode {plotlyjs!r} is not one of {', '.join(PLOTLYJS_MODES)}: choose one of them")
    include: str | bool = True if plotlyjs == "inline" else plotlyjs
    return pio.to_html(figure, include_plotlyjs=include, full_html=True, config={"displaylogo": False}, div_id=div_id)


_LAYOUT_UID = re.compile(rb'<defs id="defs-([0-9a-f]+)"')  # plotly.js's random `_uid` of the drawing
_ATTRIBUTE_VALUE = re.compile(rb'="[^"]*"')


def with_fixed_trace_uids(figure: go.Figure) -> dict[str, Any]:
    """The figure as a dict whose traces without a `uid` get their index as one (plotly.js draws random ones,
    which name the traces' classes and colour-bar gradients in an SVG). The figure itself is left as it was
    (`go.Figure(figure)` would reorder its traces' keys, and so its HTML)."""
    fixed = figure.to_dict()
    for index, trace in enumerate(fixed.get("data", [])):
        trace.setdefault("uid", str(index))
    return fixed


def deterministic_svg(svg: bytes) -> bytes:
    """The SVG with plotly.js's random drawing id replaced by one made from the drawing itself, so the same
    figure exports to the same bytes (no churn in git) and two different figures inlined in one page keep
    distinct clip-path and gradient ids. The id is replaced only inside attribute values, never in text."""
    found = _LAYOUT_UID.search(svg)
    if found is None:
        return svg
    random_uid = found.group(1)

    def replace(uid: bytes) -> bytes:
        return _ATTRIBUTE_VALUE.sub(lambda value: value.group(0).replace(random_uid, uid), svg)

    return replace(hashlib.sha256(replace(b"")).hexdigest()[: len(random_uid)].encode())


def _shared_plotlyjs(folder: Path) -> None:
    """The plotly.min.js that 'directory' HTML pages load, copied once per folder."""
    from plotly.offline import get_plotlyjs

    target = folder / "plotly.min.js"
    if not (target.is_file() and io.is_parts_file(target, PLOTLYJS_LEGACY)):  # a user's file there is refused
        io.write_bytes(target, get_plotlyjs().encode(), PLOTLYJS_LEGACY)


PLOTLYJS_LEGACY = io.contains("plotly.js v")  # the copy an older parts wrote before it marked its folders


def write_figure(
    figure: go.Figure,
    folder: str | Path,
    name: str,
    formats: Iterable[str] = ("html", "png", "svg"),
    plotlyjs: str = "directory",
) -> list[Path]:
    """Write `folder/name.<format>` for each format; static formats need a browser (see `static_export`)."""
    formats = list(formats)
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise PartsError(f"unknown figure format(s) {', '.join(unknown)}: choose from {', '.join(FORMATS)}")
    folder = Path(folder)
    written = []
    for fmt in formats:
        path = folder / f"{name}.{fmt}"
        if fmt == "html":
            io.write_bytes(path, figure_html(figure, plotlyjs, div_id=name).encode())
            if plotlyjs == "directory":
                _shared_plotlyjs(folder)
        else:
            scale = PNG_SCALE if fmt == "png" else 1
            image = pio.to_image(with_fixed_trace_uids(figure), format=fmt, scale=scale)
            io.write_bytes(path, deterministic_svg(image) if fmt == "svg" else image)
        written.append(path)
    return written


def write_figures(
    figures: Mapping[str, go.Figure],
    folder: str | Path,
    formats: Iterable[str] = ("html", "png", "svg"),
    plotlyjs: str = "directory",
    html_only: Iterable[str] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write every figure in every format with one browser; `html_only` (names or shell patterns
    like '*-heatmap') limits HTML to the figures it matches."""
    formats = list(formats)
    patterns = None if html_only is None else list(html_only)
    plan = {name: [f for f in formats if f != "html" or patterns is None or any(fnmatch(name, p) for p in patterns)]
            for name in figures}
    for name, chosen in plan.items():  # refuse before drawing anything if a file parts did not write is in the way
        for fmt in chosen:
            io.check_file(Path(folder) / f"{name}.{fmt}")
    written: list[Path] = []
    needs_browser = any(fmt in STATIC_FORMATS for fmt in formats)
    with static_export() if needs_browser else _nothing():
        with Progress(len(figures), "figures", "figure", progress) as bar:
            for name, figure in figures.items():
                written += write_figure(figure, folder, name, plan[name], plotlyjs)
                bar.update(1, name)
    return written


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def chromium_screenshot(html: str | Path, png: str | Path, width: int = 1000, height: int = 800) -> list[str]:
    """Open an HTML file in headless Chromium, save what it shows to `png`, and return the page's
    console messages (a script error shows up as one), to check that a page renders."""
    import subprocess

    browser = find_chromium()
    profile = tempfile.mkdtemp(prefix="parts-chromium-")
    try:
        done = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", "--virtual-time-budget=5000",
             "--enable-logging=stderr", "--v=0", f"--screenshot={Path(png).resolve()}", Path(html).resolve().as_uri()],
            check=True, capture_output=True, text=True, timeout=120,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return [line.split(":CONSOLE:", 1)[1].split("] ", 1)[-1] for line in done.stderr.splitlines() if ":CONSOLE:" in line]
