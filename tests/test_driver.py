"""The settings driver in one process: a plan over two models loads each once, a finished plan loads none,
and every finished setting is recorded in the driver."""

from __future__ import annotations

from parts.experiments.driver import by_model, drive
from parts.experiments.options import RunOptions
from parts.experiments.runner import ModelSpec, PlannedRun

OPTIONS = RunOptions(device="cpu", batch_size=4, progress=False)


def test_a_plan_over_two_models_loads_each_once(tiny_task_file, tiny_llama, tmp_path):
    first, second = ModelSpec("a"), ModelSpec("b", revision="step1")
    # Interleaved on purpose: the driver groups by model (first appearance), plan order within each.
    plan = [PlannedRun.of(tmp_path, spec, str(tiny_task_file), 1, seed, limit=4, options=OPTIONS)
            for seed in (0, 1) for spec in (first, second)]
    assert [(w.model.label, w.seed) for w in by_model(plan)] == [("a", 0), ("a", 1), ("b@step1", 0), ("b@step1", 1)]
    loads: list[tuple[str, str | None]] = []
    recorded: list[str] = []

    def loader(name, **kwargs):
        loads.append((name, kwargs["revision"]))
        assert kwargs["device"] == "cpu" and kwargs["dtype"] == "float32"
        return tiny_llama

    assert drive(plan, OPTIONS, loader=loader, record=lambda work, result: recorded.append(work.label)) == 4
    assert loads == [("a", None), ("b", "step1")]
    assert recorded == ["tiny t1 s0", "tiny t1 s1", "tiny t1 s0", "tiny t1 s1"]
    assert all(work.finished for work in plan)
    assert (tmp_path / "b@step1" / "tiny" / "t1-s1-k4-test-n4" / "summary.json").is_file()

    def no_load(*args, **kwargs):
        raise AssertionError("a finished plan loaded a model")

    assert drive(plan, OPTIONS, loader=no_load) == 0
