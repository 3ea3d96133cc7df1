"""The GPU protocol benchmark and the lengths it runs on, smoke-tested on a tiny model on the CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from protocol_lengths import MAIN_TASKS, Protocol  # noqa: E402


def test_protocol_lengths_cover_the_main_table():
    protocol = Protocol.load()
    settings = protocol.settings()
    assert len(settings) == 120 and {t for t, _, _ in settings} == set(MAIN_TASKS)
    passes = {p.stage: p for p in protocol.passes("sst2", 1, 0, n_test=200, n_ctx=4096)}
    assert len(passes["test"].suffixes) == len(passes["many-shot"].suffixes) == 200
    assert len(passes["train"].suffixes) == 24 - 4  # the label budget minus the demonstrations
    assert passes["many-shot"].prefix > 4 * passes["test"].prefix  # 24 demonstrations against 4
    # boolq's 24-shot prompts do not fit 2,048 tokens: whole leading demonstrations are dropped to fit.
    long = {p.stage: p for p in protocol.passes("boolq", 1, 0, n_test=200, n_ctx=2048)}["many-shot"]
    assert long.prefix + max(long.suffixes) <= 2048
    assert long.prefix < {p.stage: p for p in protocol.passes("boolq", 1, 0, 200, 8192)}["many-shot"].prefix


def test_bench_protocol_runs_every_stage_on_a_tiny_model():
    from bench_protocol import main

    result = main(["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--tasks", "sst2,rte", "--limit", "4",
                   "--full-limit", "8", "--row-examples", "4", "--repeats", "1", "--no-save"])
    stages = {"decomposition (test, k-shot)", "decomposition (train, L - k)", "content-free prompts", "L-shot ICL",
              "training: CompRW", "training: oracle", "calibration (Calib+, contextual, batch)"}
    assert set(result["seconds"]) == stages == set(result["projected"])
    assert all(seconds > 0 for seconds in result["projected"].values())
    paper_methods = sum(v for k, v in result["projected"].items() if k != "training: oracle")
    assert result["projected_total_s"] == pytest.approx(paper_methods)
    assert result["tokens"]["full"] > result["tokens"]["measured"] > 0
    for row in result["rows"]:  # prefix reuse and the plain forward agree with the full-prompt decomposition
        assert row["max diff reuse-full / logit scale"] < 1e-5
        assert row["max diff logits-plain / logit scale"] < 1e-5


@pytest.mark.integration
def test_profile_setting_and_bench_methods_time_one_setting(tmp_path, data_dir):
    """Both scripts wrap the library's own functions: a renamed one would break them, so they run here (subprocesses:
    the wrapping stays out of the test process). The profile's stages add up to the setting, its padding analysis
    (tokenizer only) counts the tokens the profiled batches ran, and every method of `parts evaluate` is timed."""
    import json
    import os
    import subprocess

    from profile_setting import BEYOND_PAPER

    env = {**os.environ, "PARTS_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    root, profile = tmp_path / "root", tmp_path / "profile.json"
    run = subprocess.run([sys.executable, str(BENCHMARKS / "profile_setting.py"), "--task", "sst2", "--limit", "4",
                          "--out", str(root), "--json", str(profile), "--rate", "95"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "real and padding tokens equal" in run.stdout
    data = json.loads(profile.read_text())
    assert sum(stage["cpu_s"] for stage in data["stages"]) == pytest.approx(data["setting_cpu_s"], rel=0.05)
    test_run = data["runs"]["decomposition: test (k-shot)"]
    assert test_run["prompts"] == 4 and test_run["real"] > 0 and test_run["floor_s"] > 0
    assert data["runs"]["decomposition: train (L - k)"]["prompts"] == 24 - 4
    assert set(data["methods"]) == {"contextual", "batch", "oracle", "comprw", "calib+", *BEYOND_PAPER}

    bench = subprocess.run([sys.executable, str(BENCHMARKS / "bench_methods.py"), str(root), "--repeats", "1",
                            "--profile", str(profile)], env=env, capture_output=True, text=True)
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert "| sst2 t1 s0 | 4 |" in bench.stdout and "(profile)" in bench.stdout
