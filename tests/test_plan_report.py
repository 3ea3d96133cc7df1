"""`parts report --attention --dry-run` (parts.report.plan_attention): its predictions against the report it plans.

Model calls and token positions are counted where the model runs (a pre-hook on the decomposition's Hugging Face
model, which source attribution forwards, and on the bridge's own, which every attention view forwards) and must
equal the plan's exactly. attention.js must hold the tokens and label-word positions the plan computed from the
tokenizer, its size between the plan's bounds (every number at its shortest and longest JSON text) and within 6% of
the plan's estimate (its numbers' digits vary with the heads: -5.3% to +3.5% on the main table's 8 files); the
time estimate within 2x of the command's CPU time at one thread. The dry run loads no weights and writes nothing.
"""

from __future__ import annotations

import json
import time

import pytest

from parts.analysis.inspect_head import view_tokens
from parts.cli import main
from parts.experiments import plan as plan_module
from parts.model import loading
from parts.report import data as report_data
from parts.report import plan_attention


def counting(model, counted):
    """Count model calls and token positions on both the bridge's model and the decomposition's copy of it."""

    def pre(_m, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        counted["forwards"] += 1
        counted["tokens"] += ids.numel()
    for module in (loading.plain_model(model), model.original_model):
        module.register_forward_pre_hook(pre, with_kwargs=True)


def test_report_attention_dry_run_predicts_calls_tokens_disk_and_time(tmp_path, data_dir, monkeypatch, capsys,
                                                                       cpu_rate):
    monkeypatch.setenv("PARTS_DATA_DIR", str(data_dir))
    runs, site = tmp_path / "runs", tmp_path / "site"
    assert main(["sweep", "--task", "sst2", "--templates", "1", "--seeds", "0", "--limit", "4", "--out", str(runs),
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    command = ["report", str(runs), "--out", str(site), "--attention", "--heads", "2", "--examples", "2",
               "--device", "cpu"]
    with pytest.MonkeyPatch.context() as patch:  # the plan loads no weights
        patch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the dry run loaded model weights"))
        assert main([*command, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "tasks        1 to capture" in printed and "2 per task of 270 (30 layers x 9 heads)" in printed
    assert "5 model calls (3 for source attribution in 1 task, 2 for the views)" in printed
    assert not site.exists()

    (task,) = report_data.collect_tasks(runs)[0]
    heads = report_data.attention_heads(report_data.task_data(task, runs, None)[0], 2)
    target = plan_module.load_target(None, None, "float32", "cpu", "cpu-1core")
    plan = plan_attention.attention_plan(target, [(task, heads)], 2, site)
    plan.rate = cpu_rate(plan.shape)
    assert f"{plan.forwarded:,} tokens forwarded" in printed
    counted = {"forwards": 0, "tokens": 0}
    real_load = loading.load_model

    def load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        counting(model, counted)
        return model
    monkeypatch.setattr(loading, "load_model", load)
    start = time.process_time()
    assert main(command) == 0
    seconds = time.process_time() - start
    assert counted == {"forwards": plan.forwards, "tokens": plan.forwarded} == {"forwards": 5, "tokens": 548}

    (path, estimate), = plan.files.items()
    real = (site / "data" / "sst2" / "attention.js").stat().st_size
    assert path == str(site / "data" / "sst2" / "attention.js")
    text = (site / "data" / "sst2" / "attention.js").read_text()
    key, data = json.loads("[" + text[text.index("(") + 1:text.rindex(")")] + "]")
    chosen = [shown["example"] for shown in data["examples"]]
    for shown in data["examples"]:  # what the plan sizes from the tokenizer alone is what the report shows
        _, tokens, positions = view_tokens(target.tokenizer, task.reference, shown["example"])
        assert (key, shown["tokens"], shown["label_positions"]) == ("sst2", tokens, positions)
    names = task.reference.prompts.label_names
    bounds = [plan_attention.attention_file_bytes(
        "sst2", task.reference, heads, target.tokenizer, chosen, pattern, vote,
        min(range(len(names)), key=lambda i: (len(names[i]) if side == "low" else -len(names[i]))))
        for side, pattern, vote in (("low", 0.0, 0.0), ("high", plan_attention.LONGEST_PATTERN,
                                                          plan_attention.LONGEST_VOTE))]
    assert bounds[0] <= real <= bounds[1], (bounds, real)
    assert abs(estimate - real) <= 0.06 * real, (estimate, real)
    assert 0.5 <= plan.seconds() / seconds <= 2, (plan.seconds(), seconds)


def test_report_dry_run_needs_attention_and_an_existing_runs_folder(tmp_path, capsys):
    code = main(["report", str(tmp_path), "--out", str(tmp_path / "site"), "--dry-run"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "add --attention" in error and len(error.splitlines()) == 1
    missing = tmp_path / "no-such-runs"
    code = main(["report", str(missing), "--out", str(tmp_path / "site"), "--attention", "--dry-run"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and f"runs folder {missing} does not exist" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "site").exists()
