"""The family table of docs/concepts/models.md, rendered from the family tests' results (docs/families.json).

    PARTS_UPDATE_FAMILY_TABLE=1 python -m pytest tests/test_families.py   # re-observe every family
    python scripts/family_table.py                                         # rewrite the table on that page

tests/test_families.py fails when a family's observed status differs from docs/families.json, or
when that page's table differs from what this script renders from it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.families import FAMILIES  # noqa: E402

START, END = "<!-- family-table:start -->", "<!-- family-table:end -->"
FEATURES = {
    "post-norms": "post-norm scales frozen and folded into each component",
    "final soft-cap (pre-cap logits decomposed)": "pre-soft-cap logits decomposed (recorded in the run's info)",
    "multipliers": "residual / logit multipliers applied",
    "MoE": "mixture of experts (`--split-experts`)",
    "eager attention": "eager attention (SDPA would drop its soft-cap, or it has none)",
    "prompts in full": "prompts run in full (a reused prefix would change its logits, or the bridge keeps no cache)",
}


def cell(result: dict) -> str:
    if result["status"] == "exact":
        return "exact"
    return f"refused: {result['reason']}".replace("|", "\\|")


def render(table: dict) -> str:
    lines = [START, "| family | models | `hf` engine | `bridge` engine | what parts does |", "|---|---|---|---|---|"]
    for family in FAMILIES:
        results = table[family]
        seen = [f for engine in ("hf", "bridge") for f in results[engine].get("features", [])]
        notes = "; ".join(FEATURES[f] for f in dict.fromkeys(seen)) or "-"
        lines.append(f"| `{family}` | {FAMILIES[family][1]} | {cell(results['hf'])} | {cell(results['bridge'])} | {notes} |")
    lines.append(END)
    return "\n".join(lines)


def section(readme: str) -> str:
    """The family table as the page has it now."""
    if START not in readme or END not in readme:
        return ""
    return readme[readme.index(START):readme.index(END) + len(END)]


def main() -> None:
    readme_path = ROOT / "docs" / "concepts" / "models.md"
    readme = readme_path.read_text()
    table = render(json.loads((ROOT / "docs" / "families.json").read_text()))
    if not section(readme):
        raise SystemExit(f"{readme_path} has no {START} ... {END} markers: add them where the table goes")
    readme_path.write_text(readme.replace(section(readme), table))


if __name__ == "__main__":
    main()
