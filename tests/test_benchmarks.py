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
