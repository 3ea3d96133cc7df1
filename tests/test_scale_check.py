"""The scale check (benchmarks/scale_check.py), smoke-tested at its tiny shape: built in bf16, decomposed exactly,
and a shape that does not fit refused before anything is built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import scale_check  # noqa: E402

from parts.errors import PartsError  # noqa: E402

GIB = 2**30


def test_tiny_shape_runs_in_bf16_and_sums_to_the_model_logits(data_dir):
    """The script as CI runs it: its printed rows carry the reconstruction error within bf16's tolerance, the
    batch sizes auto chose, and the size of the run folder it saved."""
    result = subprocess.run([sys.executable, str(BENCHMARKS / "scale_check.py"), "--shape", "tiny", "--threads", "1",
                             "--data-dir", str(data_dir)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("| tiny")]
    assert len(lines) == 2  # sst2 at 4 shots (8 prompts) and at 24 shots (2)
    header = [cell.strip() for cell in result.stdout.splitlines()[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)) for line in lines]
    assert [row["prompts"] for row in rows] == ["sst2 4-shot", "sst2 24-shot"]
    assert [row["n"] for row in rows] == ["8", "2"]
    assert [row["batch"] for row in rows] == ["8", "2"]  # auto: every prompt in one batch at this size
    for row in rows:
        assert row["dtype"] == "bfloat16"
        assert 0 < float(row["max recon. error"]) <= float(row["tolerance"]) == 5e-2
        assert float(row["run folder MB"]) > 0
        assert float(row["peak GiB"]) <= 1.5 * float(row["estimate GiB"])
    # 24 shots share a longer prefix than 4 (prefix reuse on)
    shared = [int(row["tokens"].split("(")[1].split()[0]) for row in rows]
    assert shared[1] > 4 * shared[0] > 0


def test_the_model_is_built_in_bf16_from_the_meta_device():
    """Every parameter materialised in bfloat16 (none on meta, none float32): norms 1, weights drawn at std 0.02."""
    config = scale_check.shape_config("tiny")
    model = scale_check.meta_model(config, torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    scale_check.materialise(model, torch.bfloat16, torch.device("cpu"), config.initializer_range, seed=0)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cpu", torch.bfloat16)}
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    std = float(model.model.embed_tokens.weight.float().std())
    assert std == pytest.approx(0.02, rel=0.05)
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"  # buffers made for real, not on meta


def test_the_tokenizer_is_cut_to_the_shapes_vocabulary(tmp_path):
    tokenizer = scale_check.vocabulary_tokenizer(32000, tmp_path / "tokenizer")
    assert len(tokenizer) == 32000
    ids = tokenizer("Review: a gorgeously strange, unabashedly romantic film.\nSentiment: positive")["input_ids"]
    assert max(ids) < 32000
    assert tokenizer.decode(ids) == "Review: a gorgeously strange, unabashedly romantic film.\nSentiment: positive"


def test_a_shape_that_does_not_fit_is_refused_before_it_is_built(data_dir, monkeypatch):
    """Llama-2-7B against 8 GiB: one line with the estimate (12.6 GiB of weights) and the device that would fit,
    before a parameter is allocated."""
    monkeypatch.setattr(scale_check, "materialise", lambda *args: pytest.fail("the model was built"))
    with pytest.raises(PartsError) as refusal:
        scale_check.main(["--shape", "llama-2-7b", "--available-gib", "8", "--data-dir", str(data_dir)])
    message = str(refusal.value)
    assert "\n" not in message and message.startswith("shape llama-2-7b does not fit")
    assert "weights 12.6 GiB" in message and "8.0 GiB of available memory" in message
    assert "--device cuda" in message


def test_the_refusal_names_the_batch_size_that_fits():
    """Weights fit but a batch of 8 does not: the largest batch size that fits is named."""
    batches = {size: size * GIB for size in range(1, 9)}  # 1 GiB a prompt
    assert scale_check.check_fits("s", 10 * GIB, batches, GIB, 20 * GIB, "cpu", 8) == 19 * GIB
    with pytest.raises(PartsError, match=r"about 19.0 GiB needed .* 15.0 GiB of available memory: --batch-size 4 fits"):
        scale_check.check_fits("s", 10 * GIB, batches, GIB, 15 * GIB, "cpu", "auto")
    with pytest.raises(PartsError, match=r"of free GPU memory: a GPU with 12.0 GiB free"):
        scale_check.check_fits("s", 10 * GIB, batches, GIB, 11 * GIB, "cuda", 2)


def test_unknown_shape_is_refused(capsys):
    with pytest.raises(SystemExit):
        scale_check.main(["--shape", "llama-3-70b"])
    assert "invalid choice: 'llama-3-70b'" in capsys.readouterr().err


def test_a_device_this_machine_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(scale_check, "check_device", lambda device: (_ for _ in ()).throw(PartsError(f"no {device}")))
    with pytest.raises(PartsError, match="no cuda"):
        scale_check.main(["--shape", "tiny", "--device", "cuda"])


def test_rows_are_recorded_at_the_end_of_the_scale_check_section(tmp_path, monkeypatch):
    results = tmp_path / "results.md"
    results.write_text("# Benchmark results\n\n## Scale check: 7B shapes\n\nabout\n\n## Later section\n\nlater\n")
    monkeypatch.setattr(scale_check, "RESULTS", results)
    scale_check.record({"threads": 1}, "| a row |", ["--shape", "tiny"])
    text = results.read_text()
    assert text.index("about") < text.index("`python benchmarks/scale_check.py --shape tiny`") \
        < text.index("| a row |") < text.index("## Later section")
