"""The package's layering (README, Architecture): imports go down only, and saved data and
statistics load no model code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "parts"

# Lowest first; a module may import from its own layer or a lower one.
LAYERS = {
    "parts": 0, "parts.errors": 0, "parts.io": 0, "parts.components": 0, "parts.methods": 0,
    "parts.progress": 0,
    "parts.data": 1, "parts.model": 1,
    "parts.decomposition": 2,
    "parts.analysis": 3, "parts.reweighting": 3,
    "parts.experiments": 4,
    "parts.figures": 5, "parts.report": 5,
    "parts.cli": 6, "parts.__main__": 6,
}
# Same layer, but neither may import the other.
APART = {("parts.analysis", "parts.reweighting"), ("parts.reweighting", "parts.analysis")}
MODEL_LIBRARIES = ("transformer_lens", "transformers")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The layer entry a module belongs to: its subpackage, or itself for a top-level module."""
    pieces = module.split(".")
    for length in (2, 1):
        candidate = ".".join(pieces[:length])
        if candidate in LAYERS:
            return candidate
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to the README's Architecture)")


def imports(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function?) for every import of `parts` in a file."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    nested = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}:{node.lineno}: write imports of parts absolutely (from parts.x import y)"
            names = [node.module or ""]
        else:
            continue
        for name in names:
            if name == "parts" or name.startswith("parts."):
                found.append((name, node.lineno, id(node) in nested))
    return found


def all_modules() -> list[tuple[Path, str]]:
    return [(path, module_name(path)) for path in sorted(PACKAGE.rglob("*.py"))]


def test_every_module_has_a_layer():
    for _, module in all_modules():
        unit(module)


def test_no_module_imports_from_a_higher_layer():
    violations = []
    for path, module in all_modules():
        own = unit(module)
        for imported, line, _ in imports(path, module):
            other = unit(imported)
            if LAYERS[other] > LAYERS[own] or (own, other) in APART:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {imported} ({other})")
    assert not violations, "imports must go down the layers:\n" + "\n".join(violations)


def test_no_import_of_parts_hidden_in_a_function():
    # Only the command line imports lazily (so `parts --help` does not load torch).
    hidden = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported}"
              for path, module in all_modules() if unit(module) != "parts.cli"
              for imported, line, inside in imports(path, module) if inside]
    assert not hidden, "imports belong at the top of the module:\n" + "\n".join(hidden)


def test_the_checker_sees_a_violation(tmp_path):
    """The checks above can fail: an upward and a hidden import in a sample are found."""
    sample = PACKAGE / "data" / "sample.py"  # never written: only its path names the importer
    source = "from parts.figures import plotting\ndef f():\n    import parts.cli\n"
    fake = tmp_path / "sample.py"
    fake.write_text(source)
    found = imports(fake, module_name(sample))
    assert found == [("parts.figures", 1, False), ("parts.cli", 3, True)]
    assert LAYERS[unit(found[0][0])] > LAYERS[unit(module_name(sample))]


@pytest.mark.parametrize("module", ["parts.decomposition.runs", "parts.analysis.stats", "parts.components"])
def test_saved_data_and_statistics_load_no_model_code(module):
    code = (f"import sys, {module}\n"
            f"print(','.join(sorted(m for m in {MODEL_LIBRARIES!r} if m in sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"importing {module} loads {loaded}"
