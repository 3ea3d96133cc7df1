"""parts: individual LLM components as classifiers (Chang, Thomason & Jia, EMNLP 2024).

The common entry points, at the top level as TransformerLens users expect::

    import parts
    model = parts.load_model()                                   # the embedded SmolLM2-135M-Instruct
    run = parts.decompose_task(model, "sst2", limit=64)           # a DecompositionRun
    run.save("runs/sst2"); parts.DecompositionRun.load("runs/sst2")

They are looked up on first use (PEP 562 module `__getattr__`), so `import parts` stays light: the
command line answers `--help` and mistakes without importing torch. Each lives in its own module
(`EXPORTS` says which); the package's layering is unchanged.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that owns it
EXPORTS = {
    "load_model": "parts.model.loading",
    "decompose_task": "parts.experiments.runner",
    "run_decomposition": "parts.experiments.runner",
    "DecompositionRun": "parts.decomposition.runs",
    "RunOptions": "parts.experiments.options",
    "get_task": "parts.data.tasks",
    "build_prompts": "parts.data.prompts",
    "sweep": "parts.experiments.sweep",
    "component_table": "parts.analysis.analyze",
    "inspect_head": "parts.analysis.inspect_head",
    "total_effects": "parts.decomposition.effects.api",
    "TotalEffects": "parts.decomposition.effect_data",
    "PartsError": "parts.errors",
}
__all__ = ["__version__", *EXPORTS]

def __getattr__(name: str) -> Any:
    if name not in EXPORTS:
        raise AttributeError(f"module 'parts' has no attribute {name!r}")
    value = getattr(importlib.import_module(EXPORTS[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(EXPORTS))
