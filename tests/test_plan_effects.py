"""`parts effects --dry-run` (parts.experiments.plan_effects): its predictions against the effects runs it plans.

Model calls and token positions are counted where the model runs (a pre-hook on the Hugging Face model and on
every block) and must equal the plan's exactly; effects.safetensors must have the bytes the plan computes from the
run's recorded info (exactly) and the plan's own prediction to within its timings' digits; the time estimate
within 2x of the command's CPU time (one thread, the rate probed in CPU time: the shared machine's load varies
within a minute). The dry run loads no weights and writes nothing.
"""

from __future__ import annotations

import time
from argparse import Namespace
from pathlib import Path

import pytest

from parts.cli import main
from parts.cli.effects import effects_wanted
from parts.decomposition.effect_data import TotalEffects
from parts.decomposition.effects import total_effects
from parts.decomposition.runs import DecompositionRun, find_runs
from parts.experiments import plan as plan_module
from parts.experiments import plan_effects
from parts.model import loading
from tests.test_effects import tiny_run


def counting(model, counted):
    """Count model calls, token positions and positions times blocks on a loaded model's own modules."""
    hf = loading.plain_model(model)

    def pre(_m, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        counted["forwards"] += 1
        counted["tokens"] += ids.numel()

    def block_pre(_m, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        counted["block_tokens"] += hidden.numel() // hidden.shape[-1]
    handles = [hf.register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [block.register_forward_pre_hook(block_pre, with_kwargs=True) for block in hf.model.layers]
    return handles


def test_effects_dry_run_predicts_calls_tokens_disk_and_time(tmp_path, data_dir, monkeypatch, capsys, cpu_rate):
    monkeypatch.setenv("PARTS_DATA_DIR", str(data_dir))
    out = tmp_path / "runs"
    assert main(["sweep", "--task", "sst2", "--templates", "1", "--seeds", "0", "--limit", "6", "--out", str(out),
                 "--device", "cpu"]) == 0
    path = find_runs(out)[0]
    run = DecompositionRun.load(path)
    real_load = loading.load_model
    for extra in ([], ["--method", "attribution"]):
        with pytest.MonkeyPatch.context() as patch:  # the plan loads no weights
            patch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the dry run loaded model weights"))
            assert main(["effects", str(out), "--dry-run", "--device", "cpu", *extra]) == 0
            printed = capsys.readouterr().out
            assert "1 to do, 0 already have these effects" in printed and "300 ablated per example" in printed
            assert not (Path(path) / "effects.safetensors").exists()
            target = plan_module.load_target(None, None, "float32", "cpu", "cpu-1core")
        method = extra[1] if extra else "exact"
        _, _, wanted, done = effects_wanted(path, Namespace(
            method=method, positions="last", ablation="mean", freeze_norm=False, model=None, dtype=None, engine=None,
            force=False, recompute_changed=False))
        assert not done
        plan = plan_effects.effects_plan(target, [(str(path), run, False, wanted)], method, "last", "mean", False, 4)
        plan.rate = cpu_rate(plan.shape)
        (passes,) = plan.passes
        counted = {"forwards": 0, "tokens": 0, "block_tokens": 0}

        def load(*args, counted=counted, **kwargs):
            model = real_load(*args, **kwargs)
            counting(model, counted)
            return model
        monkeypatch.setattr(loading, "load_model", load)
        start = time.process_time()
        assert main(["effects", str(out), "--device", "cpu", *extra]) == 0
        seconds = time.process_time() - start
        assert counted == {"forwards": passes.forwards, "tokens": passes.tokens, "block_tokens": passes.block_tokens}
        effects = TotalEffects.load(path)
        assert effects.info["method"] == method and (method == "attribution" or passes.kept)
        real = (Path(path) / "effects.safetensors").stat().st_size
        # Exact from what the run recorded; the plan's own guess differs by its timings' and fingerprint's digits.
        assert plan_effects.effects_file_bytes(run, effects.info) == real
        assert abs(plan.disk_bytes - real) <= 16, (plan.disk_bytes, real)
        info = plan_effects.effects_info(run, method, "last", "mean", False, "float32", effects.info["seconds"],
                                         effects.info["fingerprint"])
        info["cpu_seconds"] = effects.info["cpu_seconds"]
        assert info == effects.info
        assert 0.5 <= plan.seconds() / seconds <= 2, (method, plan.seconds(), seconds)
        (Path(path) / "effects.safetensors").unlink()
    # Planned with effects of these settings there: nothing to do; of other settings: to do.
    assert main(["effects", str(out), "--device", "cpu", "--ablation", "zero"]) == 0
    capsys.readouterr()
    assert main(["effects", str(out), "--dry-run", "--assume", "h200", "--ablation", "zero"]) == 0
    printed = capsys.readouterr().out
    assert "0 to do, 1 already have these effects" in printed and "h200 (assumed)" in printed
    assert main(["effects", str(out), "--dry-run", "--assume", "h200"]) == 0
    assert "1 to do, 0 already have these effects" in capsys.readouterr().out


@pytest.mark.parametrize(("positions", "ablation", "method"), [("last", "zero", "exact"), ("all", "zero", "exact"),
                                                               ("last", "resample", "exact"),
                                                               ("last", "mean", "attribution")])
def test_passes_count_every_forward_on_a_tiny_model(tiny_llama, positions, ablation, method):
    run = tiny_run(tiny_llama)
    hf = loading.plain_model(tiny_llama)
    shape = plan_module.ModelShape.from_config(hf.config, "tiny")
    passes = plan_effects.effects_passes(shape, "float32", "tiny", run.token_ids, run.component_names,
                                         len(run.label_token_ids), method, positions, ablation, 2)
    counted = {"forwards": 0, "tokens": 0, "block_tokens": 0}
    handles = counting(tiny_llama, counted)
    try:
        total_effects(tiny_llama, run, ablation, positions, method, batch_size=2)
    finally:
        for handle in handles:
            handle.remove()
    assert counted == {"forwards": passes.forwards, "tokens": passes.tokens, "block_tokens": passes.block_tokens}
