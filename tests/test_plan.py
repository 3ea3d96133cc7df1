"""`--dry-run` (parts.experiments.plan): its predictions against the runs it plans, on the embedded model at small n.

The forward tokens are counted where the model is run (the hf engine's prefix and batch forwards) and must equal
the plan's exactly; the run folders' tensors.safetensors and prompts.jsonl must have the bytes the plan says,
summary.json within 5%; the time estimate within 2x of the run's CPU time (one torch thread, the rate probed in CPU
time: the shared machine's load varies within a minute, as tests/test_plan_effects.py does). The plan never calls
the weight loader.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from parts.cli import main
from parts.errors import PartsError
from parts.experiments import plan as plan_module
from parts.experiments.options import RunOptions
from parts.model import engines, loading


@pytest.fixture
def count_forwards(monkeypatch):
    """Token positions the hf engine forwards (the shared prefix and every batch, padding included)."""
    counted = {"tokens": 0}
    run, prefix_cache = engines.HFEngine.run, engines.HFEngine.prefix_cache

    def counting_run(self, input_ids, *args, **kwargs):
        counted["tokens"] += input_ids.numel()
        return run(self, input_ids, *args, **kwargs)

    def counting_prefix(self, prefix):
        counted["tokens"] += prefix.numel()
        return prefix_cache(self, prefix)

    monkeypatch.setattr(engines.HFEngine, "run", counting_run)
    monkeypatch.setattr(engines.HFEngine, "prefix_cache", counting_prefix)
    return counted


def assert_files_as_planned(plan, out: Path) -> None:
    """Every file the plan names is written under `out` at the size it says, and nothing more: run folders' tensors
    and prompts and the cached logits exact, summary.json within 5%, the weights files and the results tables
    (their length depends on the descent) within a factor 4."""
    written = {str(p) for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert set(plan.files) == written
    for path, size in plan.files.items():
        real = Path(path).stat().st_size
        if path.endswith("summary.json"):
            assert abs(real - size) <= 0.05 * real, path
        elif "reweight-labels" in path or Path(path).parent == out:
            assert real / 4 <= size <= 4 * real, (path, size, real)
        else:
            assert real == size, path


def cpu_seconds(run) -> float:
    """The CPU time `run()` takes (with the `cpu_rate` fixture: one torch thread)."""
    start = time.process_time()
    run()
    return time.process_time() - start


@pytest.fixture
def no_weights(monkeypatch):
    """Fail if anything loads model weights (the plan must not)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the dry run loaded model weights")

    monkeypatch.setattr(loading, "load_model", refuse)
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_sweep_dry_run_predicts_tokens_disk_and_time(tmp_path, data_dir, monkeypatch, count_forwards, cpu_rate):
    from parts.experiments.sweep import plan_sweep, sweep

    monkeypatch.setenv("PARTS_DATA_DIR", str(data_dir))
    options = RunOptions(device="cpu", batch_size="auto", progress=False)
    out = tmp_path / "runs"
    planned = plan_sweep(None, ["sst2"], [1], [0, 1], limit=6, out=out, options=options)
    with pytest.MonkeyPatch.context() as patch:  # the plan loads no weights
        patch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the dry run loaded model weights"))
        import transformers

        patch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                      lambda *a, **k: pytest.fail("the dry run loaded model weights"))
        target = plan_module.load_target(None, None, "float32", "cpu", None, probe_seconds=0)
        plan = plan_module.sweep_plan(target, planned, options)
    plan.rate = target.rate = cpu_rate(plan.shape)  # the later plans of this target too
    assert [s.done for s in plan.settings] == [False, False]
    assert plan.shape.components == 30 * 10 == len(plan.calls) * 150
    seconds = cpu_seconds(lambda: sweep(None, ["sst2"], [1], [0, 1], limit=6, out=out, options=options))
    assert count_forwards["tokens"] == plan.forwarded
    assert_files_as_planned(plan, out)
    assert 0.5 <= plan.seconds() / seconds <= 2, (plan.seconds(), seconds)
    # Planned again, every run is done: nothing to forward or write, no load.
    again = plan_module.sweep_plan(target, planned, options)
    assert all(s.done for s in again.settings) and again.forwarded == 0 and again.disk_bytes == 0 and again.loads == 0


def test_cli_dry_run_prints_the_plan_and_writes_nothing(tmp_path, data_dir, monkeypatch, capsys, no_weights):
    monkeypatch.setenv("PARTS_DATA_DIR", str(data_dir))
    out = tmp_path / "runs"
    code = main(["sweep", "--task", "sst2", "--templates", "1", "--seeds", "0", "--limit", "4", "--out", str(out),
                 "--dry-run", "--assume", "h200", "--dtype", "bfloat16"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "h200 (assumed)" in printed and "1 to run, 0 already done" in printed and "300 (30 layers" in printed
    assert not out.exists()


def test_unknown_assumed_device_lists_the_known_ones(tmp_path, capsys):
    code = main(["sweep", "--task", "sst2", "--out", str(tmp_path), "--dry-run", "--assume", "tpu9"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "unknown device 'tpu9' for --assume" in error and "h200" in error and "cpu-2core" in error
    assert len(error.splitlines()) == 1
    code = main(["sweep", "--task", "sst2", "--out", str(tmp_path), "--assume", "h200"])
    assert code == 2 and "add --dry-run" in capsys.readouterr().err


def test_a_model_that_does_not_fit_is_refused_with_what_would():
    shape = plan_module.ModelShape.from_config(plan_module.named_config("llama-2-7b"), "llama-2-7b")
    assert shape.parameters == 6_738_415_616  # Llama-2-7B's own count
    assert shape.components == 32 * 33
    gib = plan_module.GIB
    # float32 on a 24 GiB CPU: the weights alone (25.1 GiB) do not fit; no batch size helps, bfloat16 would.
    with pytest.raises(PartsError, match=r"will not fit .*\(25\.1 GiB of weights .* use --dtype bfloat16 or "
                                         r"--device cuda on a GPU of 33 GiB or more \(h200"):
        plan_module.check_fits(shape, "float32", "cpu", 24 * gib, 200, 3000, 8)
    # bfloat16 on a 24 GiB GPU: batches of 64 at 1,100 tokens do not fit, the batch size named does, one more not.
    with pytest.raises(PartsError, match=r"use --batch-size (\d+)$") as refused:
        plan_module.check_fits(shape, "bfloat16", "cuda", 24 * gib, 100, 1000, 64)
    fitting = int(str(refused.value).rsplit(" ", 1)[1])
    plan_module.check_fits(shape, "bfloat16", "cuda", 24 * gib, 100, 1000, fitting)
    with pytest.raises(PartsError):
        plan_module.check_fits(shape, "bfloat16", "cuda", 24 * gib, 100, 1000, fitting + 1)
    plan_module.check_fits(shape, "bfloat16", "cuda", 139 * gib, 200, 3000, 8)  # fits an H200


def test_the_batch_size_auto_chooses_always_passes_the_check():
    """The check and `auto` share one budget: what `planned_batch_size` chooses is never refused (Llama-2-7B in
    float32 on an H200 once chose 15 prompts and was refused with "use --batch-size 13")."""
    shape = plan_module.ModelShape.from_config(plan_module.named_config("llama-2-7b"), "llama-2-7b")
    weights = shape.weights_bytes(4)
    for free_gib, prefix, suffix in [(139, 3000, 200), (139, 800, 60), (80, 3000, 200), (40, 100, 40)]:
        free = free_gib * plan_module.GIB
        tokens = [list(range(prefix + suffix))] * 64
        chosen = plan_module.planned_batch_size(shape, "cuda", 4, tokens, prefix, free - weights)
        plan_module.check_fits(shape, "float32", "cuda", free, suffix, prefix, chosen)
        if chosen < 64:  # one more than auto's choice is over the budget
            with pytest.raises(PartsError, match=rf"use --batch-size {chosen}$"):
                plan_module.check_fits(shape, "float32", "cuda", free, suffix, prefix, chosen + 1)


def test_probe_measures_a_rate():
    shape = plan_module.ModelShape("tiny", 2, 4, 2, 16, 64, 128, 100, 512, 0, 0)
    rate = plan_module.probe_rate(shape, "float32", "cpu", seconds=0.05, tokens=32)
    assert 1e6 < rate < 1e14


def test_batched_tokenisation_gives_the_ids_of_one_prompt_at_a_time(data_dir, monkeypatch):
    """The plan tokenises a prompt set in one batch call (`tokenize`; `CachedTokenizer` keeps them by text); the
    decomposition tokenises one prompt at a time (`Decomposer.tokenize`), and the counts must agree to the token: on
    every template's prompts with the BOS the bridge prepends, the content-free inputs ('N/A', '', '[MASK]'), the
    tokenizer's special tokens written in a prompt, blank lines and non-ASCII text."""
    from transformers import AutoTokenizer

    from parts.data.prompts import build_prompts
    from parts.data.tasks import get_task, load_split
    from parts.reweighting.calibration import content_free_prompts

    tokenizer = plan_module.bridge_tokenizer(AutoTokenizer.from_pretrained(plan_module.model_files_folder(None, None)))
    prompts = []
    for name, template in [("sst2", 1), ("sst2", 2), ("sst2", 3), ("boolq", 1), ("agnews", 2), ("arc", 3)]:
        task = get_task(name)
        built = build_prompts(task, template, 0, 4, "test", 4, data_dir)
        train = load_split(task, "train", data_dir)
        prompts += [*built.prompts, *content_free_prompts(task.template(template), [train[i] for i in built.demonstrations])]
    special = tokenizer.all_special_tokens
    assert tokenizer.bos_token in special
    prompts += [f"Review: {token} good{token}\n\nSentiment:" for token in special]
    prompts += ["Review: café — naïve 日本語\n\n\nSentiment: positive\n", " leading space", "\n"]
    one_at_a_time = [list(tokenizer(p)["input_ids"]) for p in prompts]
    assert plan_module.tokenize(tokenizer, prompts) == one_at_a_time
    assert all(ids[0] == tokenizer.bos_token_id for ids in one_at_a_time)  # the BOS the bridge prepends
    written = one_at_a_time[-3 - len(special):-3]  # a special token written in a prompt is its own id
    assert all(tokenizer.convert_tokens_to_ids(token) in ids[1:] for token, ids in zip(special, written, strict=True))
    cached = plan_module.CachedTokenizer(tokenizer)
    assert cached(prompts)["input_ids"] == one_at_a_time
    assert cached(prompts[::-1])["input_ids"] == one_at_a_time[::-1] and cached.held == sum(map(len, one_at_a_time))
    # Past its bound it lets the oldest go, and still gives the ids.
    monkeypatch.setattr(plan_module, "CACHED_TOKENS", 100)
    assert cached(prompts[:3])["input_ids"] == one_at_a_time[:3] and cached.held <= 100


def test_the_memory_line_gives_the_batch_sizes_as_a_range():
    assert [plan_module.batch_sizes_text(s) for s in ([8, 3, 8, 5], [8, 8], [])] == ["3-8", "8", "-"]


def test_evaluate_dry_run_predicts_tokens_disk_time_and_what_is_done(tmp_path, data_dir, monkeypatch, count_forwards,
                                                                    cpu_rate):
    """The test run, the content-free prompts, the 20 labelled examples' run and the 24-shot prompts of one setting:
    every forward counted, every file of the plan written at the size it says (the weights files' and results
    tables' estimated within a factor; their length depends on the descent), and nothing more."""
    from parts.experiments.evaluate import evaluation_plan, run_evaluation, sweep_settings
    from parts.experiments.runner import ModelSpec

    monkeypatch.setenv("PARTS_DATA_DIR", str(data_dir))
    options = RunOptions(device="cpu", batch_size="auto", progress=False)
    out = tmp_path / "runs"
    works = evaluation_plan(ModelSpec(), sweep_settings(["sst2"], [1], [0], 8, [24]), out)
    with pytest.MonkeyPatch.context() as patch:  # the plan loads no weights
        patch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the dry run loaded model weights"))
        target = plan_module.load_target(None, None, "float32", "cpu", None, probe_seconds=0)
        plan = plan_module.evaluate_plan(target, works, options)
    plan.rate = target.rate = cpu_rate(plan.shape)  # the later plans of this target too
    assert [s.done for s in plan.settings] == [False]
    # The k-shot test run (8), the content-free prompts (3), the 20 labelled examples' run, the 24-shot run (8).
    assert [c.prompts for c in plan.calls] == [8, 3, 20, 8]
    seconds = cpu_seconds(lambda: run_evaluation(works, options))
    assert count_forwards["tokens"] == plan.forwarded
    assert_files_as_planned(plan, out)
    assert 0.5 <= plan.seconds() / seconds <= 2, (plan.seconds(), seconds)
    # Planned again: the setting is done (its rows are in results.csv), nothing to forward or write, no load.
    again = plan_module.evaluate_plan(target, works, options)
    assert [s.done for s in again.settings] == [True] and again.forwarded == 0 and again.disk_bytes == 0
    assert again.loads == 0
    # A second seed beside it: one setting to run, the first done; its runs are new, nothing reused.
    more = evaluation_plan(ModelSpec(), sweep_settings(["sst2"], [1], [0, 1], 8, [24]), out)
    mixed = plan_module.evaluate_plan(target, more, options)
    assert [s.done for s in mixed.settings] == [True, False] and len(mixed.calls) == 4
    assert "2: 1 to run, 1 already done" in mixed.describe()


def test_cli_evaluate_dry_run_prints_the_plan_and_writes_nothing(tmp_path, data_dir, monkeypatch, capsys, no_weights):
    monkeypatch.setenv("PARTS_DATA_DIR", str(data_dir))
    tokenised: list[str] = []
    tokenize = plan_module.tokenize
    monkeypatch.setattr(plan_module, "tokenize", lambda tokenizer, prompts: tokenised.extend(prompts) or
                        tokenize(tokenizer, prompts))
    out = tmp_path / "runs"
    code = main(["evaluate", "--tasks", "sst2", "--templates", "1", "--seeds", "0", "--limit", "4", "--out", str(out),
                 "--gates", "--dry-run", "--assume", "h200"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "parts evaluate --dry-run" in printed and "1 to run, 0 already done" in printed
    assert "4 calls, 31 prompts" in printed and "not counted  gates (--gates)" in printed
    assert "GiB peak; batch size 3-20 (auto) of 139.0 GiB free" in printed
    # Every prompt tokenised once (the 24-shot prompts are checked against the context window, then counted).
    assert len(tokenised) == len(set(tokenised)) == 31
    assert not out.exists()


def test_transfer_dry_run_predicts_tokens_disk_time_and_what_is_done(tmp_path, data_dir, monkeypatch, count_forwards,
                                                                    cpu_rate):
    """The source's test and labelled runs and the target's run of one sst2 -> yelp setting: every forward counted,
    every file written at the size the plan says (transfer.csv and its table estimated), and nothing more."""
    from parts.experiments.runner import ModelSpec
    from parts.experiments.transfer import run_transfer, transfer_settings, transfer_works

    monkeypatch.setenv("PARTS_DATA_DIR", str(data_dir))
    options = RunOptions(device="cpu", batch_size="auto", progress=False)
    out = tmp_path / "runs"
    settings = transfer_settings([("sst2", "yelp")], [1], [0], 8, 6)
    with pytest.MonkeyPatch.context() as patch:  # the plan loads no weights
        patch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the dry run loaded model weights"))
        target = plan_module.load_target(None, None, "float32", "cpu", None, probe_seconds=0)
        plan = plan_module.transfer_plan(target, transfer_works(ModelSpec(), settings, out), options)
    plan.rate = target.rate = cpu_rate(plan.shape)  # the later plans of this target too
    assert [c.prompts for c in plan.calls] == [8, 20, 6]
    seconds = cpu_seconds(lambda: run_transfer(ModelSpec(), settings, out, options))
    assert count_forwards["tokens"] == plan.forwarded
    assert_files_as_planned(plan, out)
    assert 0.5 <= plan.seconds() / seconds <= 2, (plan.seconds(), seconds)
    again = plan_module.transfer_plan(target, transfer_works(ModelSpec(), settings, out), options)
    assert [s.done for s in again.settings] == [True] and again.forwarded == 0 and again.loads == 0
    # Another target size: its rows in transfer.csv were made otherwise, refused as the real command refuses them;
    # with --recompute-changed the setting is to run, the source's two runs reused (shared with `parts evaluate`).
    smaller = transfer_works(ModelSpec(), transfer_settings([("sst2", "yelp")], [1], [0], 8, 4), out)
    with pytest.raises(PartsError, match="target_sample differs"):
        plan_module.transfer_plan(target, smaller, options)
    other = plan_module.transfer_plan(target, smaller, options.replace(recompute_changed=True))
    assert [c.prompts for c in other.calls] == [4] and other.settings[0].reused == 2


@pytest.mark.parametrize("command", [
    ["sweep", "--task", "sst2", "--templates", "1", "--seeds", "0"],
    ["evaluate", "--tasks", "sst2", "--templates", "1", "--seeds", "0"],
    ["transfer", "--pairs", "sst2:yelp", "--templates", "1", "--seeds", "0", "--target-limit", "4"],
    ["decompose", "--task", "sst2"],
])
def test_a_run_that_will_not_fit_is_refused_before_the_weights_load(command, tmp_path, data_dir, monkeypatch, capsys,
                                                                    no_weights):
    """With 0.4 GiB free the embedded model's 0.50 GiB of weights do not fit: every command refuses in one line,
    naming the estimate and what would fit (bfloat16's 0.25 GiB would), before loading or writing."""
    monkeypatch.setenv("PARTS_DATA_DIR", str(data_dir))
    monkeypatch.setattr(plan_module, "free_bytes_here", lambda device: ("cpu", int(0.4 * plan_module.GIB)))
    out = tmp_path / "runs"
    code = main([*command, "--limit", "4", "--out", str(out), "--device", "cpu"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1, error
    assert "SmolLM2-135M-Instruct in float32 will not fit on cpu (this machine): about 0." in error
    assert "(0.5 GiB of weights" in error
    assert "against 0.4 GiB free (0.0 GiB of it for batches once the weights are in): use --" in error
    assert not out.exists()


def test_a_batch_too_large_is_refused_with_the_batch_size_that_fits(tmp_path, data_dir, monkeypatch, capsys,
                                                                    no_weights):
    monkeypatch.setenv("PARTS_DATA_DIR", str(data_dir))
    monkeypatch.setattr(plan_module, "free_bytes_here", lambda device: ("cpu", 3 * plan_module.GIB))
    sweep = ["sweep", "--task", "sst2", "--templates", "1", "--seeds", "0", "--limit", "64", "--shots", "24",
             "--out", str(tmp_path / "runs"), "--device", "cpu"]
    code = main([*sweep, "--batch-size", "64"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "will not fit" in error and "for a batch of 64 at" in error, error
    fitting = int(error.rsplit("--batch-size ", 1)[1])
    assert 1 <= fitting < 64
    # The batch size it names does fit (the dry run plans it and checks it too), one more does not.
    assert main([*sweep, "--batch-size", str(fitting), "--dry-run"]) == 0
    assert main([*sweep, "--batch-size", str(fitting + 1), "--dry-run"]) == 2
