"""The documentation: the site builds strictly, its pages open offline with no console error, and the code in
the getting-started page and the README runs as written (so the docs cannot drift from the code)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from parts.decomposition.runs import find_runs

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.S | re.M)


def code_blocks(page: Path, languages: tuple[str, ...]) -> list[tuple[str, str]]:
    """(language, code) of every fenced block of `page` in one of `languages`, in page order."""
    return [(lang, code) for lang, code in FENCE.findall(page.read_text()) if lang in languages]


@pytest.fixture
def beside_the_data(tmp_path, data_dir, monkeypatch):
    """A working folder whose `../shared/data` is the data, as for a clone beside the shared folder."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(data_dir, target_is_directory=True)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("PARTS_DATA_DIR", raising=False)  # the pages say where the data is
    return work


SHELL = {"&&", "||", "|", ";", ">", ">>", "<", "&"}


def run_blocks(blocks: list[tuple[str, str]], work: Path) -> dict:
    """Run the blocks in order, python in one namespace, bash a command at a time: a plain `parts ...` line
    through the command's entry point in this process (what the `parts` script calls, without paying the
    imports again), any other line in a shell with the set-up `parts` first on PATH."""
    from parts.cli import main

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    namespace: dict = {}
    for language, code in blocks:
        if language == "python":
            exec(compile(code, "<docs>", "exec"), namespace)
            continue
        for line in code.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["parts"] and not SHELL & set(words):
                assert main(words[1:]) == 0, line
            elif words:
                done = subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=work, env=env, capture_output=True,
                                      text=True)
                assert done.returncode == 0, f"{line}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return namespace


@pytest.mark.integration
def test_every_code_block_of_getting_started_runs(beside_the_data):
    blocks = code_blocks(ROOT / "docs" / "getting-started.md", ("bash", "python"))
    assert [lang for lang, _ in blocks].count("python") >= 3 and len(blocks) >= 7
    namespace = run_blocks(blocks, beside_the_data)
    # What the page says it shows.
    assert tuple(namespace["run"].component_logits.shape) == (8, 300, 2)
    assert namespace["error"] < 1e-3
    assert len(namespace["table"]) == 300
    assert (beside_the_data / "report" / "index.html").is_file()
    assert [p.name for p in find_runs(beside_the_data / "sweep")] == ["t1-s0-k4-test-n8", "t2-s0-k4-test-n8"]
    assert namespace["rte"].n_examples == 8


@pytest.mark.integration
def test_every_python_block_of_the_readme_runs(beside_the_data):
    blocks = code_blocks(ROOT / "README.md", ("python",))
    assert blocks, "the README has a Python example"
    run_blocks(blocks, beside_the_data)


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_bytes()) <= 12_500


# -- The site ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The built site: the one scripts/test.sh built (PARTS_DOCS_SITE), else a strict build here."""
    if os.environ.get("PARTS_DOCS_SITE"):
        return Path(os.environ["PARTS_DOCS_SITE"])
    if shutil.which("mkdocs", path=str(BIN)) is None:
        pytest.skip("mkdocs is not installed (scripts/setup.sh --dev installs the docs extra)")
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-5000:]
    return out


def open_page(browser, path: Path):
    """A page opened from disk, and the list its console errors, warnings and any network request go to."""
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("request", lambda r: problems.append(f"request {r.url}") if not r.url.startswith("file:") else None)
    page.goto(path.as_uri())
    return page, problems


def test_three_pages_open_offline_with_no_console_error(site):
    from playwright.sync_api import sync_playwright

    if not Path("/usr/bin/chromium").exists():
        pytest.fail("no /usr/bin/chromium: apt-get install -y chromium fonts-liberation (scripts/test.sh does)")
    pages = {"getting-started.html": "Getting started", "notebooks/01_explore_components.html": "Explore components",
             "reference/index.html": "API reference"}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            for name, title in pages.items():
                page, problems = open_page(browser, site / name)
                page.wait_for_load_state("load")
                assert title in page.title(), page.title()
                assert problems == [], (name, problems)
                if name.startswith("notebooks/"):  # the notebook's plotly figures are drawn, from the site's plotly.js
                    page.wait_for_selector(".js-plotly-plot .main-svg")
                    assert page.locator(".js-plotly-plot").count() == 3
                if name.startswith("reference/"):  # every top-level name links to its entry
                    import parts

                    links = page.locator("table a").all()
                    assert len(links) == len(parts.EXPORTS)
                    links[list(parts.EXPORTS).index("DecompositionRun")].click()
                    page.wait_for_load_state("load")
                    assert page.url.endswith("decomposition.html#parts.decomposition.runs.DecompositionRun")
                    assert page.locator('[id="parts.decomposition.runs.DecompositionRun"]').count() == 1
                page.close()
        finally:
            browser.close()


def test_the_build_fails_on_an_undocumented_public_name(tmp_path, monkeypatch):
    """The hook's check: a public function without a docstring, or one missing from the reference, is named."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import docs_hooks
    finally:
        sys.path.pop(0)
    from mkdocs.exceptions import PluginError

    package = tmp_path / "parts"
    (package / "analysis").mkdir(parents=True)
    (package / "analysis" / "extra.py").write_text(
        '"""A module."""\n\ndef documented():\n    """Says what it does."""\n\n\ndef bare():\n    pass\n\n\n'
        'def _private():\n    pass\n\n\nclass Thing:\n    """A thing."""\n')
    monkeypatch.setattr(docs_hooks, "ROOT", tmp_path)
    monkeypatch.setattr(docs_hooks, "PACKAGE", package)
    monkeypatch.setattr(docs_hooks, "exports", lambda: {})
    assert docs_hooks.modules()["analysis"] == ["parts.analysis.extra"]
    assert docs_hooks.public_names("parts.analysis.extra") == {"documented": True, "bare": False, "Thing": True}
    docs_hooks._anchors.clear()
    docs_hooks._anchors.update({"parts.analysis.extra.documented"})
    with pytest.raises(PluginError, match="2 public name"):
        docs_hooks.on_post_build(None)
    docs_hooks._anchors.add("parts.analysis.extra.Thing")
    (package / "analysis" / "extra.py").write_text('"""A module."""\n\ndef bare():\n    """Now documented."""\n')
    docs_hooks._anchors.add("parts.analysis.extra.bare")
    docs_hooks.on_post_build(None)  # every public name documented and in the reference
    (package / "newpackage").mkdir()
    (package / "newpackage" / "thing.py").write_text('"""A module."""\n')
    with pytest.raises(PluginError, match="no API reference page"):
        docs_hooks.modules()


def test_the_readme_links_resolve():
    text = (ROOT / "README.md").read_text()
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if not t.startswith(("http", "#"))]
    assert len(targets) >= 20
    assert [t for t in targets if not (ROOT / t).exists()] == []
